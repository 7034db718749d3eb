//! The port maps as a scrape of `GET /metrics` sees them: how many, and their counters
//! (per map up to `metrics::sample::MAX_MAP_SERIES`, totals always).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::{LIST_MAX_AGE, PortMapError, PortMaps};
use crate::metrics::sample::{MAX_MAP_SERIES, MapsSample};
use crate::model::{MapCounters, Proto};

impl PortMaps {
    /// How many maps there are by protocol, and their counters. Blocking: call it on a
    /// blocking thread. The counters are read from the kernel at most once per
    /// [`LIST_MAX_AGE`], however often Prometheus scrapes.
    pub fn metrics_sample(&self) -> Result<MapsSample, PortMapError> {
        let (tcp, udp) = self.store.with(|c| {
            let n = |proto: &str| {
                c.query_row(
                    "SELECT count(*) FROM port_maps WHERE proto = ?1",
                    [proto],
                    |r| r.get::<_, i64>(0),
                )
            };
            Ok::<_, crate::store::StoreError>((n("tcp")?, n("udp")?))
        })?;
        let counters = self.counters_recent();
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
    fn counters_recent(&self) -> Arc<BTreeMap<(Proto, u16), MapCounters>> {
        let mut cache = self
            .counters_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((c, at)) = cache.as_ref()
            && at.elapsed() < LIST_MAX_AGE
        {
            return Arc::clone(c);
        }
        let fresh = Arc::new(self.counters_or_zero());
        *cache = Some((Arc::clone(&fresh), Instant::now()));
        fresh
    }
}
