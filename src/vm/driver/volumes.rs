//! The names of the agent's volumes in its storage pool. Names are
//! `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`, so a fixed prefix and suffix make each kind
//! unambiguous:
//!
//! | volume | what |
//! |---|---|
//! | `image.<name>` | a base image, complete and verified |
//! | `partial.<name>.<id>` | an image being downloaded or uploaded |
//! | `vm.<name>.disk.qcow2` | a VM's disk, backed by its image |
//! | `vm.<name>.seed.img` | a VM's cloud-init seed (FAT, label CIDATA) |
//! | `vm.<name>.console.log` | a VM's serial console, appended across boots |

pub fn image(name: &str) -> String {
    format!("image.{name}")
}

/// A new transfer's volume (a fresh id each time: two transfers never share one).
pub fn partial(name: &str) -> String {
    format!("{PARTIAL_PREFIX}{name}.{}", uuid::Uuid::new_v4().simple())
}

pub const PARTIAL_PREFIX: &str = "partial.";

pub fn disk(vm: &str) -> String {
    format!("vm.{vm}.disk.qcow2")
}

pub fn seed(vm: &str) -> String {
    format!("vm.{vm}.seed.img")
}

pub fn console(vm: &str) -> String {
    format!("vm.{vm}.console.log")
}

/// Bytes per GB of `disk_size_gb` (GiB, as `qemu-img resize NG` did in the original).
pub const GIB: u64 = 1 << 30;
