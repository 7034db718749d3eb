//! The VM layer's one error type. Each variant is a class the API maps to one status code
//! (`api/error.rs`); inside it, a typed kind of failure with the fields it needs and its
//! source where there is one. The texts are what API clients read.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::driver::LibvirtFailure;
use super::service::addresses::{AddrError, Lost};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// libvirt cannot be reached, or the agent cannot act on the VM yet: retry later (503).
    #[error("libvirt is unavailable: {0}")]
    Unavailable(Unavailable),
    /// No such VM, image or network (404).
    #[error(transparent)]
    NotFound(NotFound),
    /// The request is malformed or out of bounds (400).
    #[error(transparent)]
    Invalid(Invalid),
    /// The request clashes with what exists (409).
    #[error(transparent)]
    Conflict(Conflict),
    /// An upload larger than the node takes (VM_MAX_DISK_GB) (413).
    #[error(transparent)]
    TooLarge(TooLarge),
    /// Waiting for an IP lease ran out of time (504).
    #[error(transparent)]
    Timeout(NoLease),
    /// An operation's libvirt work outlived its request's wait; it goes on, holding its
    /// VM, and records its own outcome (504).
    #[error(transparent)]
    Stalled(Stalled),
    /// libvirt refused or failed an operation: its own error, kept whole; what it means
    /// is [`LibvirtFailure::kind`].
    #[error(transparent)]
    Libvirt(#[from] LibvirtFailure),
    /// The VM layer failed on its own side of an operation (500).
    #[error(transparent)]
    Internal(Internal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An image larger than the node takes.
#[derive(Debug, thiserror::Error)]
#[error("image is larger than {max_bytes} bytes (VM_MAX_DISK_GB)")]
pub struct TooLarge {
    pub max_bytes: u64,
}

/// An operation whose request stopped waiting for it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{operation}: libvirt did not finish within {} s; the operation goes on and its \
     outcome will show in GET /vms and the audit log",
    .waited.as_secs()
)]
pub struct Stalled {
    pub operation: Operation,
    pub waited: Duration,
}

/// An operation on a VM, as the audit log and a late outcome name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    Create { name: String, wait: bool },
    Start(String),
    Stop(String),
    Reboot(String),
    Delete(String),
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operation::Create { name, wait: true } => write!(f, "POST /vms {name}"),
            Operation::Create { name, wait: false } => {
                write!(f, "POST /vms {name} (wait=false)")
            }
            Operation::Start(name) => write!(f, "POST /vms/{name}/start"),
            Operation::Stop(name) => write!(f, "POST /vms/{name}/stop"),
            Operation::Reboot(name) => write!(f, "POST /vms/{name}/reboot"),
            Operation::Delete(name) => write!(f, "DELETE /vms/{name}"),
        }
    }
}

/// The agent's own reasons to answer 503 (libvirt's are [`VmError::Libvirt`]).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("the agent's own repair of {name} did not finish within {} s", .waited.as_secs())]
    Repairing { name: String, waited: Duration },
    #[error(
        "an earlier create of {name} was cut off inside libvirt, which may still carry out \
         what it sent; retry in {} s",
        .settle.as_secs()
    )]
    CutOff { name: String, settle: Duration },
    #[error(
        "the default image {name} is being downloaded from {url}; retry when GET /images \
         shows it ready"
    )]
    DefaultImageFetching { name: String, url: String },
    /// Reads answer from the last observation, and there is none.
    #[error("{}", .0.as_ref().map_or_else(|| "libvirt has not answered since the agent started".to_owned(), |f| f.reason()))]
    NotObserved(#[source] Option<Arc<LibvirtFailure>>),
}

#[derive(Debug, thiserror::Error)]
pub enum NotFound {
    #[error("no VM named {0}")]
    Vm(String),
    #[error("no VM named {0} managed by this agent")]
    ManagedVm(String),
    #[error("no network named {0}")]
    Network(String),
    #[error("{0} has no network interface")]
    NoInterface(String),
    #[error("image {0} is not available; add it with POST /images (see GET /images)")]
    Image(String),
    #[error("no image named {0}")]
    ImageRow(String),
    #[error("image {0} vanished")]
    ImageVanished(String),
    #[error("image {image} has no volume {volume} in pool {pool}; add the image again")]
    ImageVolume {
        image: String,
        volume: String,
        pool: String,
    },
    #[error("image {0:?} is gone")]
    ImageGone(Option<String>),
}

/// Why the request cannot be served as it is (400).
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    /// A name that breaks the naming rule (`reason` is the rule's own words).
    #[error("{field} {value:?} is not valid: {reason}")]
    Name {
        field: &'static str,
        value: String,
        #[source]
        reason: crate::model::name::NameError,
    },
    #[error("hostname {0:?} is not valid: labels of letters, digits and '-', separated by dots")]
    Hostname(String),
    #[error("{field} must be an absolute path on the libvirt host")]
    NotAbsolute { field: &'static str },
    #[error("{field} must not contain '..'")]
    DotDot { field: &'static str },
    #[error("os_arch {arch:?} is not supported; one of {}", .supported.join(", "))]
    Arch {
        arch: String,
        supported: &'static [&'static str],
    },
    /// A number outside the node's bounds (`setting` names the bound, if one does).
    #[error("{field} must be {min}..={max}{}, not {value}", .setting.map(|s| format!(" ({s})")).unwrap_or_default())]
    Bound {
        field: &'static str,
        min: u64,
        max: u64,
        setting: Option<&'static str>,
        value: u64,
    },
    #[error("at most {0} ssh_authorized_keys")]
    TooManyKeys(usize),
    /// An SSH key that does not parse (`reason` is the key rule's own words).
    #[error("ssh_authorized_keys[{index}]: {reason}")]
    SshKey {
        index: usize,
        #[source]
        reason: crate::model::ssh_key::SshKeyError,
    },
    #[error("{field} is larger than {max} bytes")]
    CloudInitTooLarge { field: &'static str, max: usize },
    #[error("{field} needs kernel")]
    NeedsKernel { field: &'static str },
    #[error("cmdline must be one line of at most 4096 characters")]
    Cmdline,
    #[error(
        "{field} {path}: {problem} (kernel and initrd must be files the libvirt host can read)"
    )]
    BootFile {
        field: &'static str,
        path: String,
        #[source]
        problem: BootFile,
    },
    #[error(
        "this libvirt host cannot run {arch} guests with domain type {domain_type} \
         (VMS_DOMAIN_TYPE); it offers {}",
        list_guests(.offered)
    )]
    Guest {
        arch: String,
        domain_type: String,
        /// `(arch, domain type)` of each guest it can run.
        offered: Vec<(String, String)>,
    },
    #[error("network {0:?} does not exist in libvirt")]
    NoNetwork(String),
    #[error("memory_mib {asked} is more than the host has ({host_mib} MiB)")]
    HostMemory { asked: u32, host_mib: u64 },
    #[error("vcpus {asked} is more than libvirt allows for {domain_type} domains ({max})")]
    HostVcpus {
        asked: u32,
        domain_type: String,
        max: u32,
    },
    #[error("disk_size_gb {disk_gb} is smaller than image {image} ({image_gib} GiB)")]
    DiskSmallerThanImage {
        disk_gb: u32,
        image: String,
        image_gib: u64,
    },
    /// An `ip` outside the network's DHCP range.
    #[error(transparent)]
    Address(AddrError),
    #[error("url must not contain control characters (CR, LF, tab, ...)")]
    UrlControl,
    #[error("url must be at most {max} characters")]
    UrlTooLong { max: usize },
    #[error(
        "url must be a plain http:// or https:// URL: a DNS name or IPv4 address, an \
         optional port, then a path and query of URL characters (no user name, fragment, \
         space or other character that needs escaping)"
    )]
    UrlNotPlain,
    #[error("url is not a valid URL: {0}")]
    Url(#[source] UrlError),
    #[error("url must be http:// or https://")]
    UrlScheme,
    #[error("sha256 must be 64 hexadecimal digits")]
    Sha256Format,
    #[error("sha256 mismatch: expected {expected}, got {got}")]
    Sha256Mismatch { expected: String, got: String },
    #[error("the image is empty")]
    EmptyImage,
    #[error("transfer ended after {received} of {total} bytes")]
    Truncated { received: u64, total: u64 },
    /// The upload's body broke off (its source says why).
    #[error("{0}")]
    Transfer(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// `x86_64/kvm, x86_64/qemu` (or `none`), for [`Invalid::Guest`].
fn list_guests(guests: &[(String, String)]) -> String {
    if guests.is_empty() {
        return "none".to_owned();
    }
    let each: Vec<String> = guests.iter().map(|(a, t)| format!("{a}/{t}")).collect();
    each.join(", ")
}

/// Why a URL does not parse (the `url` crate's error, as reqwest re-exports its `Url`).
pub type UrlError = <reqwest::Url as std::str::FromStr>::Err;

/// Why a boot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BootFile {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("not a regular file")]
    NotAFile,
}

/// Why the request clashes with what exists (409).
#[derive(Debug, thiserror::Error)]
pub enum Conflict {
    #[error("another operation on {0} is in progress")]
    Busy(String),
    #[error("VM {0} already exists; pass \"recreate\": true to replace it with a fresh one")]
    Exists(String),
    #[error("domain {0} was not created by this agent; it is never replaced or deleted by it")]
    NotOurs(String),
    #[error("{0} is not running; start it instead")]
    NotRunning(String),
    /// The address asked for is held, the range has none left, or there is no range.
    #[error(transparent)]
    Address(AddrError),
    /// The address the agent chose (and answered with) turned out held when its DHCP host
    /// entry was to be written: the create fails instead of giving the VM another one.
    #[error(
        "the address {ip} chosen for {name} is no longer free on network {network} ({why}); \
         the VM was not created (it never gets another address than the one it was given)"
    )]
    AddressLost {
        name: String,
        ip: IpAddr,
        network: String,
        why: Lost,
    },
    #[error("image {0} is still downloading; see GET /images")]
    ImageDownloading(String),
    #[error("image {0} already exists; delete it first")]
    ImageExists(String),
    #[error("image {0} is being transferred")]
    ImageInTransfer(String),
    #[error("image {name} backs the disk of {}; delete those VMs first", .users.join(", "))]
    ImageInUse { name: String, users: Vec<String> },
}

/// No DHCP lease in time (504).
#[derive(Debug, thiserror::Error)]
#[error("no DHCP lease for {name} ({mac}) on network {network} within {} s", .waited.as_secs())]
pub struct NoLease {
    pub name: String,
    pub mac: String,
    pub network: String,
    pub waited: Duration,
}

/// The VM layer's own failures (500).
#[derive(Debug, thiserror::Error)]
pub enum Internal {
    #[error("{operation}: the operation failed: {source}")]
    Task {
        operation: Operation,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error(transparent)]
    Seed(#[from] crate::cloudinit::SeedError),
    #[error("download of {url} failed: {source}")]
    Download {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("download of {url} failed: HTTP {status}")]
    HttpStatus {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("the partial volume of image {0} vanished")]
    PartialVanished(String),
}

impl From<Unavailable> for VmError {
    fn from(e: Unavailable) -> Self {
        VmError::Unavailable(e)
    }
}

impl From<NotFound> for VmError {
    fn from(e: NotFound) -> Self {
        VmError::NotFound(e)
    }
}

impl From<Invalid> for VmError {
    fn from(e: Invalid) -> Self {
        VmError::Invalid(e)
    }
}

impl From<Conflict> for VmError {
    fn from(e: Conflict) -> Self {
        VmError::Conflict(e)
    }
}

impl From<Internal> for VmError {
    fn from(e: Internal) -> Self {
        VmError::Internal(e)
    }
}

impl From<crate::cloudinit::SeedError> for VmError {
    fn from(e: crate::cloudinit::SeedError) -> Self {
        VmError::Internal(Internal::Seed(e))
    }
}

impl From<AddrError> for VmError {
    fn from(e: AddrError) -> Self {
        match e {
            AddrError::OutOfRange { .. } => VmError::Invalid(Invalid::Address(e)),
            _ => VmError::Conflict(Conflict::Address(e)),
        }
    }
}

impl VmError {
    /// No such object: the agent's own finding, or libvirt's.
    pub fn is_not_found(&self) -> bool {
        match self {
            VmError::NotFound(_) => true,
            VmError::Libvirt(f) => f.is_not_found(),
            _ => false,
        }
    }

    /// libvirt cannot be reached (retry later): the agent's own finding, or libvirt's.
    pub fn is_unavailable(&self) -> bool {
        match self {
            VmError::Unavailable(_) => true,
            VmError::Libvirt(f) => f.is_unavailable(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::vm::driver::{Cause, LibvirtKind, Op};

    /// A listing's failure, told again by a read that has nothing else to answer, says
    /// "libvirt is unavailable" once.
    #[test]
    fn an_unavailable_reason_told_again_says_it_once() {
        let away = LibvirtFailure::unavailable(Cause::NoAnswer(Duration::from_secs(3)));
        assert_eq!(
            away.to_string(),
            "libvirt is unavailable: libvirt did not answer within 3 s"
        );
        let read = VmError::from(Unavailable::NotObserved(Some(Arc::new(away))));
        assert_eq!(
            read.to_string(),
            "libvirt is unavailable: libvirt did not answer within 3 s"
        );
        assert!(read.is_unavailable());
        let never = VmError::from(Unavailable::NotObserved(None));
        assert_eq!(
            never.to_string(),
            "libvirt is unavailable: libvirt has not answered since the agent started"
        );
    }

    /// Each kind of libvirt failure reads with the prefix clients have always seen.
    #[test]
    fn a_failures_kind_decides_its_prefix_and_a_lost_connection_is_unavailable() {
        let op = || Op::of("defining domain", "web1");
        let failed = LibvirtFailure::failed(op(), Cause::StreamStalled);
        assert_eq!(
            failed.to_string(),
            "libvirt: defining domain web1: the upload stream stopped accepting data"
        );
        let lost = failed.connection_lost();
        assert_eq!(lost.kind(), LibvirtKind::Unavailable);
        assert_eq!(
            lost.to_string(),
            "libvirt is unavailable: defining domain web1: the upload stream stopped accepting data"
        );
        let stalled = VmError::Stalled(Stalled {
            operation: Operation::Create {
                name: "web1".into(),
                wait: false,
            },
            waited: Duration::from_secs(5),
        });
        assert!(stalled.to_string().starts_with(
            "POST /vms web1 (wait=false): libvirt did not finish within 5 s; the operation goes on"
        ));
    }
}
