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
//! | `vm.<name>.console.log.<n>` | older parts of it, rolled over by libvirt's virtlogd |

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

/// Whether `volume` is an older part of VM `vm`'s console log: virtlogd, which writes
/// the log when libvirt's `stdio_handler` is `logd`, rolls it over into `<log>.0`,
/// `<log>.1`, ... (`max_backups` of `/etc/libvirt/virtlogd.conf`).
pub fn is_console_part(vm: &str, volume: &str) -> bool {
    volume
        .strip_prefix(&console(vm))
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Bytes per GB of `disk_size_gb` (GiB, as `qemu-img resize NG` did in the original).
pub const GIB: u64 = 1 << 30;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rolled_over_parts_of_a_console_log_are_its_own_only() {
        assert!(is_console_part("a", "vm.a.console.log.0"));
        assert!(is_console_part("a", "vm.a.console.log.12"));
        assert!(!is_console_part("a", "vm.a.console.log"));
        assert!(!is_console_part("a", "vm.a.console.log."));
        assert!(!is_console_part("a", "vm.a.console.log.0x"));
        assert!(!is_console_part("a", "vm.a.b.console.log.0"));
        assert!(!is_console_part("a.b", "vm.a.console.log.0"));
        assert!(!is_console_part("a", "vm.a.disk.qcow2"));
    }
}
