//! The last sample of every domain's statistics, for `GET /metrics`, kept so that a
//! scrape never waits behind a slow libvirt: a scrape that finds the sample older than
//! [`MAX_AGE`] starts one refresh (one at a time), waits for it at most
//! `observed::READ_WAIT`, and otherwise reports the last sample with its age.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::sample::DomainSample;

/// A sample younger than this is served as it is.
pub const MAX_AGE: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Inner {
    last: Option<(std::sync::Arc<Vec<DomainSample>>, Instant)>,
    /// Since when a refresh runs, if one does.
    refreshing: Option<Instant>,
}

/// The last sample and the one refresh that may run at a time.
#[derive(Default)]
pub struct StatsCache {
    inner: Mutex<Inner>,
    done: tokio::sync::Notify,
}

impl StatsCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last sample and its age, if there is one.
    pub fn last(&self) -> Option<(std::sync::Arc<Vec<DomainSample>>, Duration)> {
        let inner = self.lock();
        inner.last.as_ref().map(|(s, at)| (s.clone(), at.elapsed()))
    }

    /// Whether a refresh is due, claiming it if so (false while one runs, or the last
    /// sample is fresh).
    pub fn begin_refresh(&self) -> bool {
        let mut inner = self.lock();
        let fresh = inner
            .last
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < MAX_AGE);
        if fresh || inner.refreshing.is_some() {
            return false;
        }
        inner.refreshing = Some(Instant::now());
        true
    }

    /// Ends the refresh claimed by [`StatsCache::begin_refresh`]; a failure keeps the
    /// last sample.
    pub fn end_refresh(&self, found: Option<Vec<DomainSample>>) {
        let mut inner = self.lock();
        inner.refreshing = None;
        if let Some(found) = found {
            inner.last = Some((std::sync::Arc::new(found), Instant::now()));
        }
        drop(inner);
        self.done.notify_waiters();
    }

    /// Waits for a running refresh, at most until it has run for `wait`.
    pub async fn wait_refresh(&self, wait: Duration) {
        let done = self.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        let Some(since) = self.lock().refreshing else {
            return;
        };
        let left = wait.saturating_sub(since.elapsed());
        let _ = tokio::time::timeout(left, done).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_refresh_at_a_time_and_a_fresh_sample_is_served_as_it_is() {
        let c = StatsCache::default();
        assert!(c.begin_refresh());
        assert!(!c.begin_refresh(), "one runs");
        c.end_refresh(Some(vec![DomainSample::default()]));
        assert!(!c.begin_refresh(), "fresh");
        assert_eq!(c.last().unwrap().0.len(), 1);
    }

    #[tokio::test]
    async fn a_reader_waits_for_a_stuck_refresh_only_so_long() {
        let c = StatsCache::default();
        assert!(c.begin_refresh());
        let t = Instant::now();
        c.wait_refresh(Duration::from_millis(50)).await;
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(c.last().is_none());
    }
}
