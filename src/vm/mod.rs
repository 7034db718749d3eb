//! Virtual machines through libvirt's API only: the connection, storage pool and volumes,
//! domain XML, the in-memory cloud-init seed, DHCP leases, and host statistics.

pub mod hoststats;
pub mod seed;
pub mod xml;
