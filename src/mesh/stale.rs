//! When the tunnel to the controller is dead: nothing came from the controller (no
//! handshake, no byte; the mesh task probes a quiet tunnel, and a live controller
//! answers) for WG_STALE_AFTER, counted from the tunnel's set-up before anything came.
//! A controller that restarted and forgot its WireGuard peers (the original
//! controller's entrypoint does not add them back) answers nothing until the node joins
//! again; waiting for JOIN_REFRESH_INTERVAL cut a node off for five minutes. Dead, the
//! node re-joins after a random delay of at most a quarter of WG_STALE_AFTER and
//! [`SPREAD`]: nodes that booted together go dead together, and would otherwise all
//! re-join in the same second (measured: 20 nodes within 0.8 s). Then with the join
//! backoff, capped at [`RETRY_MAX`], while it stays dead: a controller down for minutes
//! has its nodes back within that of answering again, not JOIN_RETRY_MAX (60 s) later.

use std::time::{Duration, Instant, SystemTime};

use crate::join::Backoff;

/// The longest random delay of the first re-join of a stale tunnel.
pub const SPREAD: Duration = Duration::from_secs(10);

/// The longest delay between two re-joins of a dead tunnel (JOIN_RETRY_MAX when shorter).
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// How often the mesh task looks at a live tunnel, and at one quiet for over half of
/// WG_STALE_AFTER (so a dead one is seen within a second of WG_STALE_AFTER, not five).
pub const LOOK: Duration = Duration::from_secs(5);
pub const LOOK_QUIET: Duration = Duration::from_secs(1);

/// What the mesh task should do after a look at the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing (alive, or stale and waiting for the next re-join).
    Wait,
    /// The tunnel just went stale (`first`: re-join after `delay`), or stays stale and
    /// its backoff ran out (re-join now).
    Rejoin {
        age: Duration,
        first: bool,
        delay: Duration,
    },
    /// A handshake again after being stale.
    Back { after: Duration },
}

pub struct StaleWatch {
    /// WG_STALE_AFTER; `None`: never stale (the setting is 0).
    after: Option<Duration>,
    backoff: Backoff,
    stale: Option<Stale>,
    /// When the tunnel was last (re)configured: the age counts from there until the
    /// first handshake after it.
    configured_at: Option<SystemTime>,
    /// The peer's received bytes at the last look, and when they last grew.
    rx: (u64, Option<SystemTime>),
    /// At the last check: alive, but quiet for over half of `after`.
    quiet: bool,
}

/// A dead tunnel: since when, and when it may re-join again.
#[derive(Clone, Copy)]
struct Stale {
    since: SystemTime,
    since_mono: Instant,
    next: Instant,
}

impl StaleWatch {
    /// `after`: WG_STALE_AFTER (`None`: off); `first` and `longest`: the join backoff's
    /// delays, the longest capped at [`RETRY_MAX`].
    pub fn new(after: Option<Duration>, first: Duration, longest: Duration) -> Self {
        Self {
            after,
            backoff: Backoff::new(first, longest.min(RETRY_MAX)),
            stale: None,
            configured_at: None,
            rx: (0, None),
            quiet: false,
        }
    }

    /// The peer's received-bytes counter at `now`; true when it grew since the last look
    /// (the controller answered something). A smaller count is a peer configured anew:
    /// anything in it came since.
    pub fn received(&mut self, rx_bytes: u64, now: SystemTime) -> bool {
        let grew = rx_bytes > self.rx.0 || (rx_bytes < self.rx.0 && rx_bytes > 0);
        self.rx.0 = rx_bytes;
        if grew {
            self.rx.1 = Some(now);
        }
        grew
    }

    /// The tunnel was (re)configured now: a handshake is due from now on.
    pub fn configured(&mut self, at: SystemTime) {
        self.configured_at = Some(at);
    }

    /// When to look again at a tunnel with a handshake: [`LOOK_QUIET`] once it has been
    /// quiet for over half of WG_STALE_AFTER (or is stale), else [`LOOK`].
    pub fn look_interval(&self) -> Duration {
        if self.quiet || self.stale.is_some() {
            LOOK_QUIET
        } else {
            LOOK
        }
    }

    /// Looks at the last handshake (`None`: none yet) at `now`. Once stale, only a
    /// handshake newer than that ends it (a re-join and a restarted handshake do not).
    pub fn check(
        &mut self,
        last_handshake: Option<SystemTime>,
        now: SystemTime,
        mono: Instant,
    ) -> Verdict {
        let (Some(after), Some(configured)) = (self.after, self.configured_at) else {
            return Verdict::Wait;
        };
        match self.stale {
            None => {
                let alive_at = [last_handshake, self.rx.1]
                    .into_iter()
                    .flatten()
                    .fold(configured, SystemTime::max);
                let age = now.duration_since(alive_at).unwrap_or_default();
                self.quiet = age > after / 2;
                if age <= after {
                    return Verdict::Wait;
                }
                let delay = (after / 4).min(SPREAD).mul_f64(rand::random::<f64>());
                self.stale = Some(Stale {
                    since: now,
                    since_mono: mono,
                    next: mono + delay + self.backoff.next_delay(),
                });
                Verdict::Rejoin {
                    age,
                    first: true,
                    delay,
                }
            }
            Some(st)
                if last_handshake.is_some_and(|h| h > st.since)
                    || self.rx.1.is_some_and(|r| r > st.since) =>
            {
                self.stale = None;
                self.backoff.reset();
                Verdict::Back {
                    after: mono.saturating_duration_since(st.since_mono),
                }
            }
            Some(st) if mono >= st.next => {
                self.stale = Some(Stale {
                    next: mono + self.backoff.next_delay(),
                    ..st
                });
                let age = last_handshake
                    .map_or(configured, |h| h.max(configured))
                    .min(st.since);
                Verdict::Rejoin {
                    age: now.duration_since(age).unwrap_or_default(),
                    first: false,
                    delay: Duration::ZERO,
                }
            }
            Some(_) => Verdict::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_tunnel_re_joins_after_a_random_delay_then_with_backoff_and_says_when_it_is_back() {
        let mut w = StaleWatch::new(
            Some(Duration::from_secs(135)),
            Duration::from_secs(2),
            Duration::from_secs(60),
        );
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let m0 = Instant::now();
        let at = |s: u64| (t0 + Duration::from_secs(s), m0 + Duration::from_secs(s));
        // Not configured yet: never stale.
        assert_eq!(w.check(None, at(500).0, at(500).1), Verdict::Wait);
        w.configured(t0);
        // No handshake yet: the age counts from the set-up.
        assert_eq!(w.check(None, at(100).0, at(100).1), Verdict::Wait);
        let hs = Some(t0 + Duration::from_secs(100));
        assert_eq!(w.check(hs, at(200).0, at(200).1), Verdict::Wait);
        // 136 s after the last handshake: re-join, after a random delay of at most 10 s.
        let Verdict::Rejoin { age, first, delay } = w.check(hs, at(236).0, at(236).1) else {
            panic!("not stale")
        };
        assert_eq!((age, first), (Duration::from_secs(136), true));
        assert!(delay <= SPREAD, "{delay:?}");
        let next = w.stale.unwrap().next;
        assert!(w.stale.is_some());
        // Still stale just before the delay and the backoff ran out: waits.
        assert_eq!(
            w.check(hs, at(237).0, next - Duration::from_millis(1)),
            Verdict::Wait
        );
        assert_eq!(
            w.check(
                hs,
                at(236).0 + Duration::from_millis(500),
                at(236).1 + Duration::from_millis(500)
            ),
            Verdict::Wait
        );
        // Then: re-join again.
        assert!(matches!(
            w.check(hs, at(239).0, next),
            Verdict::Rejoin { first: false, .. }
        ));
        // The re-join configured the tunnel anew: still stale without a handshake.
        w.configured(at(239).0);
        assert_eq!(w.check(hs, at(239).0, next), Verdict::Wait);
        // A new handshake: back, 4 s after it went stale.
        let hs = Some(t0 + Duration::from_secs(240));
        assert_eq!(
            w.check(hs, at(240).0, at(240).1),
            Verdict::Back {
                after: Duration::from_secs(4)
            }
        );
        // A quarter of WG_STALE_AFTER when that is less than 10 s.
        let mut short = StaleWatch::new(
            Some(Duration::from_secs(20)),
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        short.configured(t0);
        for s in 0..50u64 {
            short.stale = None;
            let Verdict::Rejoin { delay, .. } = short.check(None, at(30 + s).0, at(30 + s).1)
            else {
                panic!("not stale")
            };
            assert!(delay <= Duration::from_secs(5), "{delay:?}");
        }
        assert!(w.stale.is_none());
        // Bytes from the controller (the probe's answer) keep a tunnel alive without a
        // handshake, and end a stale spell.
        let mut w = StaleWatch::new(
            Some(Duration::from_secs(30)),
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        w.configured(t0);
        assert!(w.received(100, at(20).0));
        assert!(!w.received(100, at(25).0), "nothing new");
        assert_eq!(w.check(None, at(30).0, at(30).1), Verdict::Wait);
        assert_eq!(w.look_interval(), LOOK, "quiet 10 s of 30");
        assert_eq!(w.check(None, at(45).0, at(45).1), Verdict::Wait);
        assert_eq!(w.look_interval(), LOOK_QUIET, "quiet 25 s of 30");
        assert!(matches!(
            w.check(None, at(51).0, at(51).1),
            Verdict::Rejoin { first: true, .. }
        ));
        // The peer configured anew: its counter starts again; 92 bytes are an answer.
        assert!(w.received(92, at(52).0));
        assert!(matches!(
            w.check(None, at(52).0, at(52).1),
            Verdict::Back { .. }
        ));
        // Off: never stale.
        let mut off = StaleWatch::new(None, Duration::from_secs(1), Duration::from_secs(1));
        off.configured(t0);
        assert_eq!(off.check(None, at(10_000).0, at(10_000).1), Verdict::Wait);
    }

    #[test]
    fn a_tunnel_dead_for_minutes_re_joins_at_least_every_ten_seconds() {
        // JOIN_RETRY_MAX 60 s: a controller down for minutes would have its nodes back
        // up to a minute after it answers again; while dead the gap is at most 10 s.
        let mut w = StaleWatch::new(
            Some(Duration::from_secs(20)),
            Duration::from_millis(500),
            Duration::from_secs(60),
        );
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let m0 = Instant::now();
        w.configured(t0);
        let at = |s: Duration| (t0 + s, m0 + s);
        let (now, mono) = at(Duration::from_secs(21));
        assert!(matches!(
            w.check(None, now, mono),
            Verdict::Rejoin { first: true, .. }
        ));
        let mut last = mono;
        let mut gaps = Vec::new();
        for _ in 0..40 {
            let next = w.stale.unwrap().next;
            let (now, _) = at(next - m0);
            assert!(matches!(
                w.check(None, now, next),
                Verdict::Rejoin { first: false, .. }
            ));
            gaps.push(next - last);
            last = next;
        }
        assert!(gaps.iter().all(|g| *g <= SPREAD + RETRY_MAX), "{gaps:?}");
        assert!(gaps[1..].iter().all(|g| *g <= RETRY_MAX), "{gaps:?}");
        assert!(gaps[30..].iter().all(|g| *g >= RETRY_MAX / 2), "{gaps:?}");
    }
}
