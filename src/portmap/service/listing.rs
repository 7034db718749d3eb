//! The reads: the maps as SQLite holds them, with their counters from the kernel. A
//! read never takes the writer lock.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;

use super::{LIST_MAX_AGE, ListCache, PortMapError, PortMaps};
use crate::model::{MapCounters, Proto};
use crate::store::StoreError;
use crate::store::portmaps::{self, PortMapRow};

/// One rule of the `GET /ports` listing: the row, its id and its counters.
#[derive(serde::Serialize)]
struct RuleView<'a> {
    #[serde(flatten)]
    row: &'a PortMapRow,
    rule_id: &'a str,
    #[serde(flatten)]
    counters: MapCounters,
}

impl PortMaps {
    pub async fn list(&self) -> Result<Vec<PortMapRow>, PortMapError> {
        Ok(self.store.run(|s| s.with(portmaps::list)).await?)
    }

    /// The `GET /ports` body if it is cached and fresh (no waiting).
    pub fn cached_list_body(&self) -> Option<Bytes> {
        cached(&self.list_cache)
    }

    /// Every map's counters; zeros (and a warning) when the kernel cannot be read, so a
    /// listing still answers.
    pub(super) async fn counters_or_zero(&self) -> BTreeMap<(Proto, u16), MapCounters> {
        self.fw.counters().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the port maps' counters; listing zeros");
            BTreeMap::new()
        })
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

    /// A map as the listing shows it, `{"listen_port":..,...,"rule_id":..,"packets":..}`.
    pub fn rule_json(row: &PortMapRow, counters: MapCounters) -> serde_json::Value {
        let rule_id = row.map.rule_id();
        serde_json::to_value(RuleView {
            row,
            rule_id: &rule_id,
            counters,
        })
        .unwrap_or_default()
    }

    /// The `GET /ports` body, `{"ok":true,"rules":{"<rule_id>":{...},...}}` (the original
    /// agent's shape plus bookkeeping), cached until the next change.
    pub async fn list_body(&self) -> Result<Bytes, PortMapError> {
        if let Some(v) = self.cached_list_body() {
            return Ok(v);
        }
        // One listing is built at a time: a load that starts on an empty cache misses on
        // every connection at once, and each would otherwise dump the kernel's counters
        // and build its own copy of the whole listing (2.5 MB with 10,000 maps). Those
        // that waited find the body the first one built.
        let _one = self.list_builder.lock().await;
        if let Some(v) = self.cached_list_body() {
            return Ok(v);
        }
        let counters = self.counters_or_zero().await;
        let cache = self.list_cache.clone();
        // Built under the store lock, and a change clears the cache after its commit:
        // a body built from rows a change has since replaced is never served.
        let body = self
            .store
            .run(move |s| {
                s.with(|conn| {
                    let bytes = body(conn, &counters)?;
                    if let Ok(mut c) = cache.write() {
                        *c = Some((bytes.clone(), Instant::now()));
                    }
                    Ok::<_, PortMapError>(bytes)
                })
            })
            .await?;
        crate::memory::release_free_heap();
        Ok(body)
    }
}

/// The cached body, if it is fresh.
fn cached(cache: &ListCache) -> Option<Bytes> {
    let c = cache.read().ok()?;
    let (body, at) = c.as_ref()?;
    (at.elapsed() < LIST_MAX_AGE).then(|| body.clone())
}

/// The listing's body from the rows and `counters`. Rows are streamed into the buffer:
/// with 10,000 maps a per-row JSON value tree would cost the idle agent megabytes of heap.
fn body(
    conn: &rusqlite::Connection,
    counters: &BTreeMap<(Proto, u16), MapCounters>,
) -> Result<Bytes, PortMapError> {
    let mut out = Vec::with_capacity(32 + 320 * portmaps::count(conn)?.max(0) as usize);
    out.extend_from_slice(br#"{"ok":true,"rules":{"#);
    let mut first = true;
    portmaps::for_each(conn, |row| {
        if !first {
            out.push(b',');
        }
        first = false;
        let rule_id = row.map.rule_id();
        serde_json::to_writer(&mut out, &rule_id)
            .and_then(|()| {
                out.push(b':');
                serde_json::to_writer(
                    &mut out,
                    &RuleView {
                        row,
                        rule_id: &rule_id,
                        counters: counters
                            .get(&(row.map.proto, row.map.listen_port))
                            .copied()
                            .unwrap_or_default(),
                    },
                )
            })
            .map_err(|e| StoreError::Task(format!("serialize: {e}")))
    })?;
    out.extend_from_slice(b"}}");
    // The estimate above is generous; the cache keeps the body for as long as the maps
    // do not change, so it should not keep the slack too.
    out.shrink_to_fit();
    Ok(Bytes::from(out))
}
