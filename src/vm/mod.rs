//! Virtual machines through libvirt's API only: the connection, storage pool and volumes,
//! domain XML, DHCP leases and pinned addresses (DHCP host entries).

mod abandoned;
pub mod addresses;
mod claims;
mod config;
pub mod conn;
pub mod dhcp_hosts;
mod domain;
mod error;
pub mod events;
pub mod images;
pub mod leases;
pub mod libvirt_so;
pub mod observed;
pub mod service;
pub mod spec;
pub mod stats;
pub mod storage;
mod stray_pins;
pub mod xml;

pub use config::VmConfig;
pub use conn::Libvirt;
pub use error::{LibvirtFailure, LibvirtKind, VmError};
