//! Port maps: the service that keeps the desired maps (SQLite) and the kernel's
//! (nftables) in step, under the node's policy. The map itself is a domain type
//! (`model::portmap`).

mod firewall;
mod import;
mod kernel;
mod policy;
mod service;

pub use firewall::{Firewall, FirewallError, FirewallErrorKind, MemoryFirewall};
pub use import::import_original_state;
pub use kernel::NftFirewall;
pub use policy::Policy;
pub use service::listing::{Listed, Listing};
pub use service::{CreateOutcome, Made, NewMap, PortMapError, PortMaps, ReconcileReport, Target};
