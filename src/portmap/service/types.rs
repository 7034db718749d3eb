//! The port-map service's words: what it is asked, what it answers, how it fails.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::super::firewall::FirewallError;
use super::super::policy::PolicyError;
use crate::model::{MapCounters, PortRule, Proto, VmName};
use crate::store::StoreError;

/// Every map's counters, and when they were read.
pub(super) type CountersCache =
    std::sync::Mutex<Option<(Arc<BTreeMap<(Proto, u16), MapCounters>>, Instant)>>;

/// How long a `GET /ports` body (with its counters) is served from the cache: the
/// listing of 10,000 maps is megabytes and six kernel dumps, so a load of listings
/// rebuilds it at most once a second. A change to the maps clears it at once.
pub const LIST_MAX_AGE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    /// Refused by policy (reserved port, target outside the VM networks).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The listen port is mapped to another target and the request did not ask to replace.
    #[error(
        "{proto} listen_port {listen_port} is already mapped to {target}; \
         send \"replace\": true to switch it"
    )]
    Conflict {
        proto: Proto,
        listen_port: u16,
        target: String,
    },
    /// The kernel refused the change; nothing was stored.
    #[error("nftables refused the change: {0}")]
    Kernel(#[from] FirewallError),
    /// The kernel had drifted from the database (someone deleted the table, a map or an
    /// element) and rewriting the table from the database failed too; nothing was
    /// stored. A reconcile is due: try again.
    #[error(
        "nftables no longer held what the database says ({drift}) and the repair failed: \
         {repair}; a reconcile is due, try again"
    )]
    Drifted {
        drift: FirewallError,
        #[source]
        repair: FirewallError,
    },
    /// The kernel's state could not be read (a comparison, which changes nothing).
    #[error("cannot read the kernel's nftables state: {0}")]
    Read(FirewallError),
    /// `target_vm` names no VM.
    #[error("no VM named {0}")]
    UnknownVm(VmName),
    /// The VM named has no address to map to yet: it was created before pinned
    /// addresses and no lease of it has been seen.
    #[error(
        "VM {0} has no known address yet (created before pinned addresses, no lease seen): \
         try again once GET /vms/{0}/ip answers"
    )]
    VmWithoutAddress(VmName),
    /// The VM named got another address while the map was being made.
    #[error("VM {0} changed its address while the map was being made; try again")]
    VmMoved(VmName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a new map goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An address (in VM_SUBNET or ALLOWED_TARGETS).
    Ip(Ipv4Addr),
    /// A VM of the agent, by name: its pinned address (for a VM from before pinned
    /// addresses, its last seen one), followed through a recreate, removed with it.
    Vm(VmName),
}

/// A map to make: `POST /ports` as the service takes it.
#[derive(Clone, Debug)]
pub struct NewMap {
    pub proto: Proto,
    pub listen_port: u16,
    pub target: Target,
    pub target_port: u16,
    pub allow_from: crate::model::AllowList,
    /// Switch an existing map of the port to this one instead of refusing (409).
    pub replace: bool,
}

/// What a create did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// The same map existed already: nothing changed.
    Unchanged,
    /// The listen port pointed elsewhere (or had another allow-list) and was switched.
    Replaced {
        previous: PortRule,
    },
}

/// A create's result: what it did, and the map as it now is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Made {
    pub outcome: CreateOutcome,
    pub rule: PortRule,
    /// The VM the map names, if it names one.
    pub target_vm: Option<VmName>,
}

/// The `GET /ports` body cache: the body and when it was built.
pub(super) type ListCache = Arc<RwLock<Option<(Bytes, Instant)>>>;

/// What a reconcile found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Differences found between the kernel and the database before repairing.
    pub drift: Vec<String>,
    /// Whether the whole table was rewritten.
    pub rewritten: bool,
    /// Changes made to keep forwarded DNAT traffic past libvirt's reject rules.
    pub forward_accept: Vec<String>,
    /// Maps in the database (and so in the kernel afterwards).
    pub maps: usize,
}

impl ReconcileReport {
    pub fn changed(&self) -> bool {
        self.rewritten || !self.forward_accept.is_empty()
    }
}
