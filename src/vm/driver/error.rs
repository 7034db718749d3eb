//! What a hypervisor call that failed says: the operation the agent asked for, what the
//! failure means to the agent (its kind, decided once: from libvirt's error number, or by
//! the driver for its own findings), and its cause, kept whole as the error's source.

use std::time::Duration;

use virt::error::ErrorNumber;

use super::libvirt::{LoadError, XmlError};

/// What a failure means to the agent. The API maps each kind to one status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LibvirtKind {
    /// No such domain, network, pool or volume (404).
    NotFound,
    /// The connection is gone or never came up: retry later (503).
    Unavailable,
    /// The object is not in a state that allows the operation (409).
    Conflict,
    /// The connection's driver cannot do the operation at all (libvirt's "not
    /// supported"): a limit of that libvirt, not a fault of the agent (501).
    Unsupported,
    /// Anything else (500).
    Failed,
}

impl LibvirtKind {
    /// What libvirt's error number means.
    fn of(code: Option<ErrorNumber>) -> LibvirtKind {
        match code {
            Some(
                ErrorNumber::NoDomain
                | ErrorNumber::NoNetwork
                | ErrorNumber::NoStoragePool
                | ErrorNumber::NoStorageVolume,
            ) => LibvirtKind::NotFound,
            Some(ErrorNumber::NoConnect | ErrorNumber::Rpc) => LibvirtKind::Unavailable,
            Some(ErrorNumber::OperationInvalid) => LibvirtKind::Conflict,
            Some(ErrorNumber::NoSupport | ErrorNumber::ArgumentUnsupported) => {
                LibvirtKind::Unsupported
            }
            _ => LibvirtKind::Failed,
        }
    }
}

/// The operation a failure is about: what the agent asked libvirt for, and of which
/// object (`defining domain web-1`, `network default`, `listing domains`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    what: &'static str,
    of: Option<String>,
}

impl Op {
    pub fn new(what: &'static str) -> Op {
        Op { what, of: None }
    }

    pub fn of(what: &'static str, object: impl std::fmt::Display) -> Op {
        Op {
            what,
            of: Some(object.to_string()),
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.of {
            Some(object) => write!(f, "{} {object}", self.what),
            None => f.write_str(self.what),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// libvirt's own error: its number, domain and message.
    #[error("{}", .0.message())]
    Libvirt(#[source] virt::error::Error),
    /// The client library is not there (or too old) on this node.
    #[error(transparent)]
    NotLoaded(LoadError),
    /// libvirtd refused or never answered a new connection.
    #[error("cannot connect to {uri}: {}", .source.message())]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    /// Every connection the agent may open was in use for as long as the call waits.
    #[error("all {connections} libvirt connections stayed busy for {} s", .waited.as_secs())]
    Busy {
        connections: usize,
        waited: Duration,
    },
    /// The call's caller stopped waiting (LIBVIRT_TIMEOUT) before libvirt answered.
    #[error("libvirt did not answer within {} s", .0.as_secs())]
    NoAnswer(Duration),
    /// A document from libvirt the agent cannot read.
    #[error(transparent)]
    Document(XmlError),
    /// An upload stream stopped taking data without an error.
    #[error("the upload stream stopped accepting data")]
    StreamStalled,
    /// The data of an upload stopped coming (its source says why).
    #[error("the data to upload stopped coming")]
    SourceStopped,
    /// The blocking thread of the call died.
    #[error("the libvirt call failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The in-memory twin refused, as it was told to (tests).
    #[cfg(test)]
    #[error("{0}")]
    Refused(&'static str),
}

/// A hypervisor call that failed: shown as `<op>: <cause>`, prefixed by its kind the way
/// API clients have always read it (`libvirt: `, `libvirt is unavailable: `, ...).
#[derive(Debug, thiserror::Error)]
#[error("{}", self.text())]
pub struct LibvirtFailure {
    op: Option<Op>,
    kind: LibvirtKind,
    #[source]
    cause: Cause,
}

impl LibvirtFailure {
    /// libvirt refused `op`; what that means comes from its error number.
    pub fn libvirt(op: Op, error: virt::error::Error) -> Self {
        Self {
            kind: LibvirtKind::of(error.code().known()),
            op: Some(op),
            cause: Cause::Libvirt(error),
        }
    }

    /// libvirt cannot be reached at all (no operation of its own to name).
    pub fn unavailable(cause: Cause) -> Self {
        Self {
            op: None,
            kind: LibvirtKind::Unavailable,
            cause,
        }
    }

    /// `op` failed on the agent's side of the call (a document it cannot read, a stream).
    pub fn failed(op: Op, cause: Cause) -> Self {
        Self {
            op: Some(op),
            kind: LibvirtKind::Failed,
            cause,
        }
    }

    /// The blocking thread of a call died.
    pub fn task(join: tokio::task::JoinError) -> Self {
        Self {
            op: None,
            kind: LibvirtKind::Failed,
            cause: Cause::Task(join),
        }
    }

    /// A refusal of the in-memory twin, of the kind it was told to answer with.
    #[cfg(test)]
    pub fn refused(op: Op, kind: LibvirtKind, why: &'static str) -> Self {
        Self {
            op: Some(op),
            kind,
            cause: Cause::Refused(why),
        }
    }

    /// The call failed on a connection that turned out dead: whatever libvirt said, the
    /// daemon is away (retry later).
    pub fn connection_lost(self) -> Self {
        Self {
            kind: LibvirtKind::Unavailable,
            ..self
        }
    }

    pub fn kind(&self) -> LibvirtKind {
        self.kind
    }

    /// libvirt's error number, when libvirt said it and this `virt` crate knows it.
    pub fn code(&self) -> Option<ErrorNumber> {
        match &self.cause {
            Cause::Libvirt(e) => e.code().known(),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == LibvirtKind::NotFound
    }

    pub fn is_unavailable(&self) -> bool {
        self.kind == LibvirtKind::Unavailable
    }

    /// `<op>: <cause>`, without the kind's prefix (for a text that adds its own).
    pub fn reason(&self) -> String {
        match &self.op {
            Some(op) => format!("{op}: {}", self.cause),
            None => self.cause.to_string(),
        }
    }

    fn text(&self) -> String {
        let said = self.reason();
        match self.kind {
            LibvirtKind::NotFound | LibvirtKind::Conflict => said,
            LibvirtKind::Unavailable => format!("libvirt is unavailable: {said}"),
            LibvirtKind::Unsupported => format!("this node's libvirt cannot do it: {said}"),
            LibvirtKind::Failed => format!("libvirt: {said}"),
        }
    }
}

/// `.or_libvirt(op)` on a `virt` result: its error as a [`LibvirtFailure`] about `op`.
pub trait OrLibvirt<T> {
    fn or_libvirt(self, op: impl FnOnce() -> Op) -> Result<T, LibvirtFailure>;
}

impl<T> OrLibvirt<T> for Result<T, virt::error::Error> {
    fn or_libvirt(self, op: impl FnOnce() -> Op) -> Result<T, LibvirtFailure> {
        self.map_err(|e| LibvirtFailure::libvirt(op(), e))
    }
}
