//! The one way the agent runs a job every interval until it shuts down (the port-map
//! and VM reconciles, audit pruning, the refused-request counts).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

/// When the first pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum First {
    /// At once (the job has not run yet).
    Now,
    /// After one interval (startup just did the job).
    AfterInterval,
}

/// Runs `pass` every `every` until `stop` changes. Passes never overlap; a pass that
/// runs late delays the next instead of bunching them; a stop during a pass is seen
/// when it ends.
pub async fn every<F, Fut>(every: Duration, first: First, stop: watch::Receiver<bool>, pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    every_or_woken(every, first, stop, std::future::pending::<()>, pass).await;
}

/// [`every`], and also at once whenever `woken()` resolves (the interval then starts
/// again from that pass): the VM reconcile, woken by libvirt's events.
pub async fn every_or_woken<F, Fut, W, WFut>(
    every: Duration,
    first: First,
    mut stop: watch::Receiver<bool>,
    mut woken: W,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
    W: FnMut() -> WFut,
    WFut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    if first == First::AfterInterval {
        tick.tick().await; // the first tick of an interval is immediate
    }
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = woken() => tick.reset(),
            _ = stop.changed() => return,
        }
        pass().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn passes_follow_the_interval_and_end_with_the_stop() {
        for (first, after_15ms) in [(First::Now, 2), (First::AfterInterval, 1)] {
            let (tx, rx) = watch::channel(false);
            let n = Arc::new(AtomicUsize::new(0));
            let m = Arc::clone(&n);
            let job = tokio::spawn(every(Duration::from_millis(10), first, rx, move || {
                let m = Arc::clone(&m);
                async move {
                    m.fetch_add(1, Ordering::SeqCst);
                }
            }));
            tokio::time::sleep(Duration::from_millis(15)).await;
            assert_eq!(n.load(Ordering::SeqCst), after_15ms, "{first:?}");
            tx.send(true).unwrap();
            job.await.unwrap();
            let ended = n.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(n.load(Ordering::SeqCst), ended, "no pass after the stop");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_runs_a_pass_at_once() {
        let (_tx, rx) = watch::channel(false);
        let n = Arc::new(AtomicUsize::new(0));
        let wake = Arc::new(tokio::sync::Notify::new());
        let (m, w) = (Arc::clone(&n), Arc::clone(&wake));
        tokio::spawn(every_or_woken(
            Duration::from_secs(3600),
            First::AfterInterval,
            rx,
            move || {
                let w = Arc::clone(&w);
                async move { w.notified().await }
            },
            move || {
                let m = Arc::clone(&m);
                async move {
                    m.fetch_add(1, Ordering::SeqCst);
                }
            },
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(n.load(Ordering::SeqCst), 0);
        wake.notify_one();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "woken long before the interval"
        );
    }
}
