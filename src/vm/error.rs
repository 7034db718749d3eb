//! The VM layer's one error type. The API maps each kind to one status code.

use virt::error::ErrorNumber;

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
    /// libvirt refused or failed an operation the request asked for (500).
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VmError {
    /// A libvirt error, with `what` saying which operation failed. Lookups of missing
    /// objects become `NotFound`, a lost connection `Unavailable`.
    pub fn libvirt(what: impl std::fmt::Display, e: virt::error::Error) -> Self {
        let message = format!("{what}: {}", e.message());
        match e.code().known() {
            Some(
                ErrorNumber::NoDomain
                | ErrorNumber::NoNetwork
                | ErrorNumber::NoStoragePool
                | ErrorNumber::NoStorageVolume,
            ) => VmError::NotFound(message),
            Some(ErrorNumber::NoConnect | ErrorNumber::Rpc) => VmError::Unavailable(message),
            Some(ErrorNumber::OperationInvalid) => VmError::Conflict(message),
            _ => VmError::Libvirt(message),
        }
    }

    /// Whether this is libvirt saying "no such object".
    pub fn is_not_found(&self) -> bool {
        matches!(self, VmError::NotFound(_))
    }
}
