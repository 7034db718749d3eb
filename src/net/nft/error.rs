//! The nftables driver's one error type.

/// Errors of the nftables driver. Kernel refusals keep nlink's error, whose text is
/// the kernel's reason (`Operation not permitted (errno 1)`, the refused operation).
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The nftables netlink socket could not be opened or configured.
    #[error("nftables socket: {0}")]
    Socket(String),
    /// The kernel (or nlink, before sending) refused an operation.
    #[error("{op}: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: nlink::Error,
    },
    /// The request cannot be expressed as the agent's ruleset.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Several independent operations failed (teardown goes on after a failure).
    #[error("{} operations failed: {}", .0.len(), join_errors(.0))]
    Several(Vec<NftError>),
}

fn join_errors(errors: &[NftError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl NftError {
    pub(super) fn kernel(op: &'static str) -> impl FnOnce(nlink::Error) -> NftError {
        move |source| NftError::Kernel { op, source }
    }

    /// The kernel's errno, when the kernel refused the operation.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Kernel { source, .. } => source.errno(),
            NftError::Several(errors) => errors.iter().find_map(NftError::errno),
            _ => None,
        }
    }

    /// The kernel's reason as text (`No such file or directory`), for API replies.
    pub fn reason(&self) -> String {
        match self.errno() {
            Some(errno) => nix::errno::Errno::from_raw(errno).desc().to_string(),
            None => self.to_string(),
        }
    }

    /// `ENOENT`: the table, map or element is not there.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }
}
