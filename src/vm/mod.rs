//! Virtual machines. `service/` the VM service (what the API calls: create, lifecycle,
//! reads, addresses, reconcile), `images/` base images and their downloads, `driver/` the
//! hypervisor behind a trait (`driver/libvirt/` the only code that speaks libvirt),
//! `spec.rs` the body of `POST /vms`, `config.rs` what the layer is configured with,
//! `error.rs` its one error type.

mod config;
pub mod console;
pub mod driver;
mod error;
pub mod images;
#[cfg(test)]
mod libvirt_tests;
pub mod service;
pub mod spec;

pub use config::VmConfig;
pub use driver::LibvirtKind;
pub use error::{
    BootFile, Conflict, Internal, Invalid, NoLease, NotFound, Operation, Stalled, TooLarge,
    Unavailable, VmError,
};
