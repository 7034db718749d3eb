//! The API's connection budget, fitted to the descriptor limit.

use crate::api;
use crate::config::ApiSettings;

/// Raises the soft descriptor limit to the hard one and says what it got: the limit
/// systemd gives a service (1,024) is what strangers' idle connections used to exhaust.
/// Returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    match crate::fdlimit::raise_nofile() {
        Ok(n) if n.soft > n.before => {
            tracing::info!(
                soft = n.soft,
                hard = n.hard,
                before = n.before,
                "file descriptors: soft RLIMIT_NOFILE raised to the hard limit"
            );
            n.soft
        }
        Ok(n) => {
            tracing::info!(
                soft = n.soft,
                hard = n.hard,
                "file descriptors: soft RLIMIT_NOFILE already at the hard limit"
            );
            n.soft
        }
        Err((n, error)) => {
            tracing::warn!(%error, soft = n.soft, hard = n.hard, "cannot raise RLIMIT_NOFILE; keeping it");
            n.soft
        }
    }
}

/// The API server's connection budget from the settings, with a cap that fits the
/// descriptor limit (logged, as a warning when it is below MAX_CONNECTIONS).
pub(super) fn connection_limits(settings: &ApiSettings) -> api::server::Limits {
    let soft = raise_fd_limit();
    let configured = settings.configured_max_connections();
    let cap = crate::fdlimit::connection_cap(configured, soft);
    if cap < configured {
        tracing::warn!(
            cap,
            configured,
            nofile = soft,
            reserved = crate::fdlimit::RESERVED_FDS,
            "connection cap lowered below MAX_CONNECTIONS to fit the descriptor limit \
             (the agent keeps `reserved` descriptors for itself)"
        );
    } else {
        tracing::info!(
            cap,
            configured,
            nofile = soft,
            "connection cap (MAX_CONNECTIONS)"
        );
    }
    api::server::Limits::from_settings(settings, cap)
}
