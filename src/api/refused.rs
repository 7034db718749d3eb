//! Requests refused for want of authentication, counted in memory and written to the
//! `refused_requests` table once a minute: one row per source address and period, with
//! a count and the routes asked for. A stranger's request costs a hash-map update, never
//! a database row or a read of its body.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;
use crate::store::audit::{self, RefusedRow};

/// Source addresses counted apart per period; the rest share one row, so a spread-out
/// flood costs bounded memory and rows too.
const MAX_ADDRESSES: usize = 1024;
/// Routes named apart per address; the rest are counted as "other routes".
const MAX_ROUTES: usize = 16;
/// The row of the addresses past [`MAX_ADDRESSES`].
pub const OTHER_ADDRESSES: &str = "(other addresses)";
const OTHER_ROUTES: &str = "(other routes)";

#[derive(Default)]
struct Bucket {
    requests: u64,
    routes: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Period {
    /// When the first request of this period was counted (ISO-8601 UTC).
    since: Option<String>,
    by_addr: HashMap<String, Bucket>,
}

/// The counts of the current period.
#[derive(Default)]
pub struct RefusedRequests {
    period: Mutex<Period>,
}

impl RefusedRequests {
    /// Counts one refused request from `addr` to `route` (the route's template, e.g.
    /// `POST /ports`, so that the set of names is small).
    pub fn count(&self, addr: Option<IpAddr>, route: &str) {
        crate::metrics::global().refused_requests.inc();
        let Ok(mut p) = self.period.lock() else {
            return;
        };
        if p.since.is_none() {
            p.since = Some(crate::model::time::now_iso());
        }
        let key = addr.map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let key = if p.by_addr.contains_key(&key) || p.by_addr.len() < MAX_ADDRESSES {
            key
        } else {
            OTHER_ADDRESSES.to_string()
        };
        let bucket = p.by_addr.entry(key).or_default();
        bucket.requests += 1;
        let route = if bucket.routes.contains_key(route) || bucket.routes.len() < MAX_ROUTES {
            route
        } else {
            OTHER_ROUTES
        };
        *bucket.routes.entry(route.to_string()).or_default() += 1;
    }

    /// Ends the current period: its rows, and counting starts afresh.
    pub fn take(&self) -> Vec<RefusedRow> {
        let Ok(mut p) = self.period.lock() else {
            return Vec::new();
        };
        let Period { since, by_addr } = std::mem::take(&mut *p);
        let Some(since) = since else {
            return Vec::new();
        };
        let until = crate::model::time::now_iso();
        let mut rows: Vec<RefusedRow> = by_addr
            .into_iter()
            .map(|(client_addr, b)| RefusedRow {
                since: since.clone(),
                until: until.clone(),
                client_addr,
                requests: b.requests,
                routes: b
                    .routes
                    .iter()
                    .map(|(r, n)| format!("{r} x{n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
            .collect();
        rows.sort_by(|a, b| a.client_addr.cmp(&b.client_addr));
        rows
    }

    /// Writes the current period's rows (blocking).
    pub fn flush(&self, store: &Store) {
        let rows = self.take();
        if rows.is_empty() {
            return;
        }
        if let Err(e) = store.transaction(|tx| audit::record_refused(tx, &rows)) {
            tracing::error!(error = %e, rows = rows.len(), "could not write the refused-request counts");
        }
    }

    /// Flushes every `every` until `stop` changes, then once more.
    pub async fn flush_every(
        self: Arc<Self>,
        store: Store,
        every: Duration,
        stop: watch::Receiver<bool>,
    ) {
        let (this, st) = (Arc::clone(&self), store.clone());
        crate::periodic::every(
            every,
            crate::periodic::First::AfterInterval,
            stop,
            move || {
                let (this, st) = (Arc::clone(&this), st.clone());
                async move { this.flush_now(st).await }
            },
        )
        .await;
        // Once more at the stop, so the last counts are not lost.
        self.flush_now(store).await;
    }

    async fn flush_now(self: Arc<Self>, store: Store) {
        if let Err(e) = tokio::task::spawn_blocking(move || self.flush(&store)).await {
            tracing::error!(error = %e, "refused-request flush task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_one_row_per_address_with_its_routes() {
        let r = RefusedRequests::default();
        let a: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..100_000 {
            r.count(Some(a), "POST /ports");
        }
        r.count(Some(a), "DELETE /ports/{listen_port}");
        r.count(None, "GET /vms");
        let rows = r.take();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].client_addr, "10.0.0.7");
        assert_eq!(rows[0].requests, 100_001);
        assert_eq!(
            rows[0].routes,
            "DELETE /ports/{listen_port} x1, POST /ports x100000"
        );
        assert_eq!(rows[1].client_addr, "unknown");
        assert!(r.take().is_empty(), "a new period starts empty");
    }

    #[test]
    fn addresses_and_routes_are_bounded() {
        let r = RefusedRequests::default();
        for i in 0..(MAX_ADDRESSES as u32 + 500) {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            r.count(Some(a), &format!("GET /r{}", i % 40));
        }
        let rows = r.take();
        assert_eq!(rows.len(), MAX_ADDRESSES + 1);
        let other = rows
            .iter()
            .find(|row| row.client_addr == OTHER_ADDRESSES)
            .unwrap();
        assert_eq!(other.requests, 500);
        assert!(
            other.routes.contains("(other routes) x"),
            "{}",
            other.routes
        );
    }

    #[test]
    fn flushed_rows_are_plain_sql() {
        let store = Store::open_in_memory().unwrap();
        let r = RefusedRequests::default();
        r.count(Some("10.0.0.7".parse().unwrap()), "POST /ports");
        r.flush(&store);
        r.flush(&store);
        let rows: Vec<(String, i64, String)> = store
            .with(|c| {
                let mut s =
                    c.prepare("SELECT client_addr, requests, routes FROM refused_requests")?;
                let v = s
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, crate::store::StoreError>(v)
            })
            .unwrap();
        assert_eq!(rows, [("10.0.0.7".into(), 1, "POST /ports x1".into())]);
    }
}
