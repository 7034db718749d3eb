//! The port maps as a scrape of `GET /metrics` sees them: how many, and their counters
//! (per map up to `metrics::sample::MAX_MAP_SERIES`, totals always).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::{LIST_MAX_AGE, PortMapError, PortMaps};
use crate::metrics::sample::{MAX_MAP_SERIES, MapsSample};
use crate::model::{MapCounters, Proto};
use crate::store::{StoreError, portmaps};

impl PortMaps {
    /// How many maps there are by protocol, and their counters. The counters are read
    /// from the kernel at most once per [`LIST_MAX_AGE`], however often Prometheus
    /// scrapes.
    pub async fn metrics_sample(&self) -> Result<MapsSample, PortMapError> {
        let (tcp, udp) = self
            .store
            .run(|s| {
                s.with(|c| {
                    Ok::<_, StoreError>((
                        portmaps::count_of(c, Proto::Tcp)?,
                        portmaps::count_of(c, Proto::Udp)?,
                    ))
                })
            })
            .await?;
        let counters = self.counters_recent().await;
        let mut totals = MapCounters::default();
        for c in counters.values() {
            totals.packets += c.packets;
            totals.bytes += c.bytes;
            totals.connections += c.connections;
            totals.drops += c.drops;
        }
        let maps = (tcp + udp).max(0) as usize;
        let per_map = (maps <= MAX_MAP_SERIES).then(|| {
            counters
                .iter()
                .map(|(&(proto, port), &c)| (proto, port, c))
                .collect()
        });
        Ok(MapsSample {
            tcp: tcp.max(0) as usize,
            udp: udp.max(0) as usize,
            totals,
            per_map,
        })
    }

    /// The counters, read again when the last read is older than [`LIST_MAX_AGE`].
    async fn counters_recent(&self) -> Arc<BTreeMap<(Proto, u16), MapCounters>> {
        if let Some((c, at)) = self.counters_cache.lock().ok().and_then(|c| c.clone())
            && at.elapsed() < LIST_MAX_AGE
        {
            return c;
        }
        let fresh = Arc::new(self.counters_off_the_workers().await);
        if let Ok(mut cache) = self.counters_cache.lock() {
            *cache = Some((Arc::clone(&fresh), Instant::now()));
        }
        fresh
    }
}
