//! The VM layer's one error type. The API maps each kind to one status code.

use virt::error::{ErrorDomain, ErrorNumber};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// libvirtd cannot be reached, or did not answer in time: retry later (503).
    #[error("libvirt is unavailable: {0}")]
    Unavailable(String),
    /// No such VM, image or network (404).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or out of bounds (400).
    #[error("{0}")]
    Invalid(String),
    /// The request clashes with what exists (409).
    #[error("{0}")]
    Conflict(String),
    /// An upload larger than the node takes (VM_MAX_DISK_GB) (413).
    #[error("{0}")]
    TooLarge(String),
    /// Waiting for something (an IP lease) ran out of time (504).
    #[error("{0}")]
    Timeout(String),
    /// An operation's libvirt work outlived its request's wait; it goes on, holding its
    /// VM, and records its own outcome (504).
    #[error("{0}")]
    Stalled(String),
    /// libvirt refused or failed an operation: its own error, kept whole; what it means
    /// is [`LibvirtFailure::kind`], decided by libvirt's error number.
    #[error(transparent)]
    Libvirt(#[from] LibvirtFailure),
    /// The VM layer failed on its own side of an operation (a task that died, a document
    /// from libvirt it cannot read, a download, a seed it cannot build) (500).
    #[error("libvirt: {0}")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a libvirt error means to the agent, decided by libvirt's error number alone.
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

/// A libvirt call that failed: the operation the agent asked for, and libvirt's own
/// error (its number, domain and message), so that callers decide by the number and
/// never by the text. Shown as `<op>: <libvirt's message>`.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}", self.text())]
pub struct LibvirtFailure {
    pub op: String,
    #[source]
    pub error: virt::error::Error,
}

impl LibvirtFailure {
    pub fn new(op: impl std::fmt::Display, error: virt::error::Error) -> Self {
        Self {
            op: op.to_string(),
            error,
        }
    }

    /// libvirt's error number, when this libvirt build's `virt` crate knows it.
    pub fn code(&self) -> Option<ErrorNumber> {
        self.error.code().known()
    }

    /// The libvirt subsystem that raised it (`VIR_FROM_QEMU`, `VIR_FROM_SECURITY`...).
    pub fn domain(&self) -> Option<ErrorDomain> {
        self.error.domain().known()
    }

    pub fn kind(&self) -> LibvirtKind {
        match self.code() {
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

    /// The text API clients have always seen for this kind of failure.
    fn text(&self) -> String {
        let said = format!("{}: {}", self.op, self.error.message());
        match self.kind() {
            LibvirtKind::NotFound | LibvirtKind::Conflict => said,
            LibvirtKind::Unavailable => format!("libvirt is unavailable: {said}"),
            LibvirtKind::Unsupported => format!("this node's libvirt cannot do it: {said}"),
            LibvirtKind::Failed => format!("libvirt: {said}"),
        }
    }
}

impl VmError {
    /// A libvirt error, with `what` saying which operation failed.
    pub fn libvirt(what: impl std::fmt::Display, e: virt::error::Error) -> Self {
        VmError::Libvirt(LibvirtFailure::new(what, e))
    }

    fn libvirt_kind(&self) -> Option<LibvirtKind> {
        match self {
            VmError::Libvirt(f) => Some(f.kind()),
            _ => None,
        }
    }

    /// No such object: the agent's own finding, or libvirt's.
    pub fn is_not_found(&self) -> bool {
        matches!(self, VmError::NotFound(_)) || self.libvirt_kind() == Some(LibvirtKind::NotFound)
    }

    /// libvirt cannot be reached (retry later): the agent's own finding, or libvirt's.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, VmError::Unavailable(_))
            || self.libvirt_kind() == Some(LibvirtKind::Unavailable)
    }

    /// Why libvirt is unavailable, to be wrapped in [`VmError::Unavailable`] (whose
    /// text adds "libvirt is unavailable: " itself): the reason without that prefix,
    /// so that it is never said twice.
    pub fn unavailable_reason(&self) -> String {
        match self {
            VmError::Unavailable(reason) => reason.clone(),
            VmError::Libvirt(f) if f.kind() == LibvirtKind::Unavailable => {
                format!("{}: {}", f.op, f.error.message())
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real libvirt error, from the test driver: no domain of that name.
    fn no_domain() -> virt::error::Error {
        crate::vm::libvirt_so::ensure_loaded().unwrap();
        let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
        conn.lookup_domain_by_name("no-such-vm").unwrap_err()
    }

    #[test]
    fn a_libvirt_failure_keeps_libvirts_number_and_the_operation_and_reads_as_before() {
        let e = no_domain();
        let message = e.message().to_string();
        let v = VmError::libvirt("domain no-such-vm", e);
        assert!(v.is_not_found());
        assert!(!v.is_unavailable());
        let VmError::Libvirt(f) = &v else {
            panic!("{v:?}")
        };
        assert_eq!(f.code(), Some(ErrorNumber::NoDomain));
        assert_eq!(f.op, "domain no-such-vm");
        assert_eq!(v.to_string(), format!("domain no-such-vm: {message}"));
        assert!(std::error::Error::source(&v).is_some());
    }

    /// A failure already saying "libvirt is unavailable" is not said twice when a read
    /// wraps it again.
    #[test]
    fn an_unavailable_reason_wrapped_again_says_it_once() {
        let first = VmError::Unavailable("cannot connect to qemu:///system: gone".into());
        let again = VmError::Unavailable(first.unavailable_reason());
        assert_eq!(
            again.to_string(),
            "libvirt is unavailable: cannot connect to qemu:///system: gone"
        );
    }

    /// The test driver has no DHCP leases: its "not supported" is a limit of that
    /// libvirt (501), named, not a fault of the agent.
    #[test]
    fn an_operation_the_driver_lacks_is_unsupported_and_named() {
        crate::vm::libvirt_so::ensure_loaded().unwrap();
        let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
        let net = conn.lookup_network_by_name("default").unwrap();
        let v = crate::vm::leases::leases(&net, None).unwrap_err();
        let VmError::Libvirt(f) = &v else {
            panic!("{v:?}")
        };
        assert_eq!(f.kind(), LibvirtKind::Unsupported);
        let text = v.to_string();
        assert!(
            text.starts_with("this node's libvirt cannot do it: reading DHCP leases: "),
            "{text}"
        );
        assert!(text.contains("virNetworkGetDHCPLeases"), "{text}");
    }
}
