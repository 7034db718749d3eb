//! The process's file-descriptor budget: the soft RLIMIT_NOFILE raised to the hard one,
//! and the share of it that API connections may take.
//!
//! systemd starts services with a soft limit of 1,024 (and a hard one far above it), so
//! an agent that keeps the soft limit runs out of descriptors after about a thousand
//! connections, whatever MAX_CONNECTIONS says.

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// Descriptors kept for the agent itself, never given to API connections: SQLite (the
/// database, its WAL and shared-memory files, per connection), netlink sockets (nftables,
/// routes, links), the libvirt connection, the WireGuard device (tun, its control socket,
/// boringtun's epoll, event and UDP descriptors), the join's and image downloads' HTTP
/// connections, the runtime's epoll and wakers, the listener, stdio. An idle standalone
/// agent has 17 open (measured); the rest is room for the WireGuard device, image
/// transfers and libvirt streams.
pub const RESERVED_FDS: u64 = 128;

/// Above this the kernel refuses any RLIMIT_NOFILE (`fs.nr_open`'s default); used when
/// the hard limit is "unlimited".
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// The soft limit before and after [`raise_nofile`], and the hard limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    pub before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit. The agent does not use `select()`,
/// the one reason to keep a soft limit of 1,024 (libvirt's client and tokio use poll
/// and epoll). On failure the limit stays as it was and the error is returned with it.
pub fn raise_nofile() -> Result<NoFile, (NoFile, nix::Error)> {
    let (before, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            let unknown = NoFile {
                before: 0,
                soft: 0,
                hard: 0,
            };
            return Err((unknown, e));
        }
    };
    let target = if hard == RLIM_INFINITY {
        NR_OPEN_DEFAULT
    } else {
        hard
    };
    let kept = NoFile {
        before,
        soft: before,
        hard,
    };
    if before >= target {
        return Ok(kept);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => Ok(NoFile {
            before,
            soft: target,
            hard,
        }),
        Err(e) => Err((kept, e)),
    }
}

/// The connection cap that fits the soft limit: MAX_CONNECTIONS, or fewer when the
/// limit would not leave [`RESERVED_FDS`] for the agent. On a node whose limit is tiny,
/// half of it goes to connections. Never 0: one connection at a time still serves.
pub fn connection_cap(configured: usize, soft_limit: u64) -> usize {
    let fits = soft_limit
        .saturating_sub(RESERVED_FDS)
        .max(soft_limit / 2)
        .max(1);
    configured
        .min(usize::try_from(fits).unwrap_or(usize::MAX))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_the_agents_own_descriptors() {
        // systemd's default soft limit: the configured cap would not fit.
        assert_eq!(connection_cap(4096, 1024), 896);
        // A raised limit: the configured cap is kept.
        assert_eq!(connection_cap(1024, 524_288), 1024);
        // A tiny limit: half of it stays with the agent.
        assert_eq!(connection_cap(1024, 200), 100);
        assert_eq!(connection_cap(1024, 64), 32);
        assert_eq!(connection_cap(1024, 1), 1);
        assert_eq!(connection_cap(16, 0), 1);
    }

    #[test]
    fn raising_keeps_the_hard_limit_and_never_lowers_the_soft_one() {
        let r = raise_nofile().unwrap_or_else(|(n, e)| panic!("{n:?}: {e}"));
        assert!(r.soft >= r.before);
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((soft, hard), (r.soft, r.hard));
    }
}
