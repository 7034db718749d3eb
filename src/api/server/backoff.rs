//! What the acceptor does when `accept` fails for lack of resources (EMFILE, ENFILE,
//! ENOBUFS, ENOMEM): the pending connection stays in the kernel's queue, so retrying at
//! once fails again at once. It sleeps instead, exponentially longer up to a bound, and
//! says so once per episode (when it starts, and how it ended), not once per error.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// First sleep after a failed accept.
const FIRST_DELAY: Duration = Duration::from_millis(5);
/// Longest sleep: a freed descriptor is used within this time.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// A run of failures (or refusals) between two successes, for the log.
#[derive(Debug, Default)]
pub struct Episode {
    started: Option<(Instant, u64)>,
}

impl Episode {
    /// Counts one failure; true for the first of an episode (the one to log).
    pub fn failed(&mut self) -> bool {
        match &mut self.started {
            Some((_, n)) => {
                *n += 1;
                false
            }
            None => {
                self.started = Some((Instant::now(), 1));
                true
            }
        }
    }

    /// Ends the episode, if one was running: how many failures and how long it lasted.
    pub fn ended(&mut self) -> Option<(u64, Duration)> {
        self.started.take().map(|(at, n)| (n, at.elapsed()))
    }
}

/// The acceptor's state after failed accepts.
#[derive(Debug)]
pub struct AcceptBackoff {
    delay: Duration,
    episode: Episode,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self {
            delay: FIRST_DELAY,
            episode: Episode::default(),
        }
    }
}

impl AcceptBackoff {
    /// How long to sleep after this failure; logs the first of an episode.
    pub fn failed(&mut self, error: &io::Error) -> Duration {
        if self.episode.failed() {
            tracing::warn!(
                %error,
                "cannot accept API connections; retrying with backoff (up to {} ms), \
                 logged again when accepts work",
                MAX_DELAY.as_millis()
            );
        }
        let d = self.delay;
        self.delay = (d * 2).min(MAX_DELAY);
        d
    }

    /// An accept worked: the episode, if any, is over.
    pub fn succeeded(&mut self) {
        if let Some((errors, lasted)) = self.episode.ended() {
            tracing::warn!(
                errors,
                lasted_ms = lasted.as_millis() as u64,
                "accepting API connections again"
            );
        }
        self.delay = FIRST_DELAY;
    }
}

/// Errors of the one connection being accepted (it was reset or aborted before the
/// accept): the next accept may well work, so no backoff.
pub fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Out of descriptors: closing an idle connection gives the queued one a chance.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_bound_and_restart_after_a_success() {
        let mut b = AcceptBackoff::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let delays: Vec<u128> = (0..10).map(|_| b.failed(&emfile).as_millis()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(&emfile), FIRST_DELAY);
    }

    #[tokio::test]
    async fn an_episode_is_reported_once_at_its_start_and_once_at_its_end() {
        let mut e = Episode::default();
        assert_eq!(e.ended(), None);
        assert!(e.failed());
        assert!(!e.failed());
        assert!(!e.failed());
        assert_eq!(e.ended().map(|(n, _)| n), Some(3));
        assert_eq!(e.ended(), None);
        assert!(e.failed());
    }

    #[test]
    fn resource_errors_back_off_and_connection_errors_do_not() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!is_connection_error(&io::Error::from_raw_os_error(errno)));
        }
        assert!(is_out_of_descriptors(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!is_out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ENOBUFS
        )));
        assert!(is_connection_error(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
