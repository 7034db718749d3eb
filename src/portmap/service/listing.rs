//! The reads: the maps as SQLite holds them, with their counters from the kernel. A read
//! never takes the writer lock. `GET /ports` walks every row with its counters under the
//! store's lock (the API writes its JSON), and the written listing is cached until the
//! next change, for at most [`LIST_MAX_AGE`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rusqlite::Connection;

use super::{LIST_MAX_AGE, ListCache, PortMapError, PortMaps};
use crate::model::{MapCounters, Proto};
use crate::portmap::Firewall;
use crate::store::StoreError;
use crate::store::portmaps::{self, PortMapRow};

/// One map as the listing shows it: its row and its counters.
#[derive(Clone, Copy, Debug)]
pub struct Listed<'a> {
    pub row: &'a PortMapRow,
    pub counters: MapCounters,
}

/// Every map, for a writer to walk once.
pub struct Listing<'a> {
    conn: &'a Connection,
    counters: &'a BTreeMap<(Proto, u16), MapCounters>,
    len: usize,
}

impl Listing<'_> {
    /// How many maps there are.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` with every map in order (protocol, then listen port), without
    /// collecting them; stops at `f`'s first error.
    pub fn for_each<E: From<StoreError>>(
        &self,
        mut f: impl FnMut(Listed<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut stopped = None;
        let walked = portmaps::for_each(self.conn, |row| {
            let counters = self
                .counters
                .get(&(row.map.proto, row.map.listen_port))
                .copied()
                .unwrap_or_default();
            f(Listed { row, counters }).map_err(|e| {
                stopped = Some(e);
                StoreError::Task("the listing's writer stopped".into())
            })
        });
        match (stopped, walked) {
            (Some(e), _) => Err(e),
            (None, walked) => walked.map_err(E::from),
        }
    }
}

impl PortMaps {
    pub async fn list(&self) -> Result<Vec<PortMapRow>, PortMapError> {
        Ok(self.store.run(|s| s.with(portmaps::list)).await?)
    }

    /// The written listing if it is cached and fresh (no waiting).
    pub fn cached_listing(&self) -> Option<Bytes> {
        cached(&self.list_cache)
    }

    /// Every map's counters, zeros (and a warning) when the kernel cannot be read so a
    /// listing still answers; read on a blocking thread. The dump of 10,000 maps'
    /// counters allocates about a megabyte for a moment; on a runtime worker that lands
    /// in the worker's malloc arena among the connections' long-lived allocations, where
    /// `malloc_trim` cannot give it back (1.0 % more resident memory after a listing,
    /// docs/benchmarks.md (e)); a blocking thread's arena is empty again afterwards. No
    /// lock is held: this is not a kernel call inside a store transaction.
    pub(super) async fn counters_off_the_workers(&self) -> BTreeMap<(Proto, u16), MapCounters> {
        let fw = Arc::clone(&self.fw);
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || runtime.block_on(counters_or_zero(&*fw)))
            .await
            .unwrap_or_default()
    }

    /// One map with its live counters (read from the kernel now); `None` when there is
    /// no such map.
    pub async fn get(
        &self,
        proto: Proto,
        listen_port: u16,
    ) -> Result<Option<(PortMapRow, MapCounters)>, PortMapError> {
        let row = self
            .store
            .run(move |s| s.with(|c| portmaps::get(c, proto, listen_port)))
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let counters = self
            .fw
            .counters()
            .await
            .map_err(PortMapError::Read)?
            .remove(&(proto, listen_port))
            .unwrap_or_default();
        Ok(Some((row, counters)))
    }

    /// The listing as `write` writes it, cached until the next change.
    ///
    /// One listing is written at a time: a load that starts on an empty cache misses on
    /// every connection at once, and each would otherwise dump the kernel's counters
    /// and write its own copy of the whole listing (2.5 MB with 10,000 maps); those that
    /// waited find what the first one wrote. It is written under the store lock, and a
    /// change clears the cache after its commit, so a listing of rows a change has since
    /// replaced is never served.
    pub async fn listing<E>(
        &self,
        write: impl FnOnce(Listing<'_>) -> Result<Bytes, E> + Send + 'static,
    ) -> Result<Bytes, E>
    where
        E: From<PortMapError> + From<StoreError> + Send + 'static,
    {
        if let Some(v) = self.cached_listing() {
            return Ok(v);
        }
        let _one = self.list_builder.lock().await;
        if let Some(v) = self.cached_listing() {
            return Ok(v);
        }
        let counters = self.counters_off_the_workers().await;
        let cache = self.list_cache.clone();
        let body = self
            .store
            .run(move |s| {
                s.with(|conn| {
                    let len = portmaps::count(conn).map_err(PortMapError::from)?.max(0) as usize;
                    let bytes = write(Listing {
                        conn,
                        counters: &counters,
                        len,
                    })?;
                    if let Ok(mut c) = cache.write() {
                        *c = Some((bytes.clone(), Instant::now()));
                    }
                    Ok::<_, E>(bytes)
                })
            })
            .await?;
        crate::memory::release_free_heap();
        Ok(body)
    }
}

/// Every map's counters from `fw`; zeros (and a warning) when it cannot read them.
async fn counters_or_zero(fw: &dyn Firewall) -> BTreeMap<(Proto, u16), MapCounters> {
    fw.counters().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the port maps' counters; listing zeros");
        BTreeMap::new()
    })
}

/// The cached listing, if it is fresh.
fn cached(cache: &ListCache) -> Option<Bytes> {
    let c = cache.read().ok()?;
    let (body, at) = c.as_ref()?;
    (at.elapsed() < LIST_MAX_AGE).then(|| body.clone())
}
