//! The maps as `GET /ports` lists them: every row with its counters, walked in order
//! under the store's lock, written by the caller (the API writes its JSON), and the
//! written listing cached until the next change, for at most [`LIST_MAX_AGE`].

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use rusqlite::Connection;

use super::{LIST_MAX_AGE, PortMapError, PortMaps};
use crate::model::{MapCounters, Proto};
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
    /// The written listing if it is cached and fresh (no blocking).
    pub fn cached_listing(&self) -> Option<Bytes> {
        let c = self.list_cache.read().ok()?;
        let (body, at) = c.as_ref()?;
        (at.elapsed() < LIST_MAX_AGE).then(|| body.clone())
    }

    /// The listing as `write` writes it, cached until the next change. Blocking.
    ///
    /// Written under the store lock so that a change cannot slip in between reading the
    /// rows and filling the cache. Callers that missed the cache together queue at the
    /// lock and find what the first one wrote, rather than each writing a copy of the
    /// whole listing (2.5 MB with 10,000 maps).
    pub fn listing<E: From<PortMapError> + From<StoreError>>(
        &self,
        write: impl FnOnce(Listing<'_>) -> Result<Bytes, E>,
    ) -> Result<Bytes, E> {
        if let Some(v) = self.cached_listing() {
            return Ok(v);
        }
        let (body, written) = self.store.with(|conn| {
            if let Some(v) = self.cached_listing() {
                return Ok((v, false));
            }
            let counters = self.counters_or_zero();
            let len = portmaps::count(conn).map_err(PortMapError::from)?.max(0) as usize;
            let bytes = write(Listing {
                conn,
                counters: &counters,
                len,
            })?;
            if let Ok(mut c) = self.list_cache.write() {
                *c = Some((bytes.clone(), Instant::now()));
            }
            Ok::<_, E>((bytes, true))
        })?;
        if written {
            crate::memory::release_free_heap();
        }
        Ok(body)
    }
}
