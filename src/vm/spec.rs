//! What a new VM is asked to be, and its validation: everything that can be checked
//! without asking libvirt. The API reads `POST /vms` into a [`VmSpec`]
//! (`api::wire::vms::CreateVm`).

use super::{Invalid, VmError};
use crate::model::name::check_name as name_rule;
use crate::model::{SshKey, VmName};

/// A VM as a request asks for it, defaults filled in, not yet validated
/// ([`VmSpec::validate`]). Its `Debug` leaves the cloud-init inputs out: they may hold
/// secrets, and a debug line must never show them.
#[derive(Clone)]
pub struct VmSpec {
    /// Kept as sent until [`VmSpec::validate`] parses it, so that a bad name is refused
    /// with the message that names the field.
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// GiB; at least the image's virtual size.
    pub disk_size_gb: u32,
    /// libvirt network; `None`: VMS_NETWORK.
    pub network_name: Option<String>,
    /// `None`: VMS_ARCH.
    pub os_arch: Option<String>,
    /// Destroy an existing VM of this name (domain, disk, seed) and start afresh.
    pub recreate: bool,
    /// Base image name; `None`: VMS_DEFAULT_IMAGE, or a blank disk when `kernel` is
    /// given.
    pub image: Option<String>,
    /// Public keys for the image's default user; `None`: SSH_AUTHORIZED_KEYS.
    pub ssh_authorized_keys: Option<Vec<String>>,
    /// Raw cloud-init user-data, used verbatim instead of the generated one.
    pub user_data: Option<String>,
    /// Raw cloud-init network-config.
    pub network_config: Option<String>,
    /// `None`: the VM's name, made valid.
    pub hostname: Option<String>,
    /// Direct kernel boot: absolute paths the libvirt host can read.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// The IPv4 address to pin; `None`: the lowest free one (a recreated VM keeps its
    /// own).
    pub ip: Option<std::net::Ipv4Addr>,
}

impl std::fmt::Debug for VmSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = |v: &Option<String>| v.as_ref().map(|s| format!("<{} bytes>", s.len()));
        f.debug_struct("VmSpec")
            .field("name", &self.name)
            .field("memory_mib", &self.memory_mib)
            .field("vcpus", &self.vcpus)
            .field("disk_size_gb", &self.disk_size_gb)
            .field("network_name", &self.network_name)
            .field("os_arch", &self.os_arch)
            .field("recreate", &self.recreate)
            .field("image", &self.image)
            .field("ssh_authorized_keys", &self.ssh_authorized_keys)
            .field("user_data", &size(&self.user_data))
            .field("network_config", &size(&self.network_config))
            .field("hostname", &self.hostname)
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("ip", &self.ip)
            .finish()
    }
}

/// The architectures a VM may ask for (`os_arch`).
pub const ARCHES: &[&str] = &["x86_64", "aarch64"];

/// Largest raw user-data or network-config accepted (the seed is built in memory).
pub const MAX_CLOUD_INIT_BYTES: usize = 32 * 1024;
/// Most SSH keys a VM may be given.
const MAX_KEYS: usize = 64;
/// Smallest memory a VM may have, MiB.
pub const MIN_MEMORY_MIB: u32 = 64;

/// Bounds from the settings (the host's capacity is checked against libvirt later).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_memory_mib: u64,
    pub max_vcpus: u32,
    pub max_disk_gb: u64,
}

/// Checks an image or network name (the rule of [`VmName`]) and says which field was
/// wrong.
pub fn check_name(field: &'static str, value: &str) -> Result<(), VmError> {
    name_rule(value)
        .map(drop)
        .map_err(|reason| invalid_name(field, value, reason))
}

/// Parses a VM's name from a request; a bad one is refused (400) naming the field.
pub fn vm_name(field: &'static str, value: &str) -> Result<VmName, VmError> {
    value
        .parse()
        .map_err(|reason| invalid_name(field, value, reason))
}

fn invalid_name(
    field: &'static str,
    value: &str,
    reason: crate::model::name::NameError,
) -> VmError {
    Invalid::Name {
        field,
        value: value.to_owned(),
        reason,
    }
    .into()
}

/// A hostname: dot-separated RFC 1123 labels, at most 253 characters, with at most one
/// trailing dot (`api::doc::HOSTNAME_PATTERN` says the same).
pub fn check_hostname(h: &str) -> Result<(), VmError> {
    let bad = || VmError::from(Invalid::Hostname(h.to_owned()));
    if h.is_empty() || h.len() > 253 {
        return Err(bad());
    }
    for label in h.strip_suffix('.').unwrap_or(h).split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad());
        }
    }
    Ok(())
}

fn check_host_path(field: &'static str, p: &str) -> Result<(), VmError> {
    if !p.starts_with('/') || p.len() > 4096 || p.chars().any(|c| c.is_control()) {
        return Err(Invalid::NotAbsolute { field }.into());
    }
    if p.split('/').any(|c| c == "..") {
        return Err(Invalid::DotDot { field }.into());
    }
    Ok(())
}

/// `value` within `min..=max` (the bound `setting` gives), or refused naming `field`.
fn check_bound(
    field: &'static str,
    value: u32,
    min: u64,
    max: u64,
    setting: &'static str,
) -> Result<(), VmError> {
    let value = u64::from(value);
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(Invalid::Bound {
        field,
        min,
        max,
        setting: Some(setting),
        value,
    }
    .into())
}

impl VmSpec {
    /// Everything that needs no libvirt: names, bounds, keys, sizes. Returns the VM's
    /// name, parsed (the body keeps the string it was sent, so that a bad name is
    /// refused here, after the body's shape, with the message that names the field).
    pub fn validate(&self, limits: &Limits) -> Result<VmName, VmError> {
        let name = vm_name("name", &self.name)?;
        if let Some(n) = &self.network_name {
            check_name("network_name", n)?;
        }
        if let Some(i) = &self.image {
            check_name("image", i)?;
        }
        if let Some(a) = &self.os_arch
            && !ARCHES.contains(&a.as_str())
        {
            return Err(Invalid::Arch {
                arch: a.clone(),
                supported: ARCHES,
            }
            .into());
        }
        let memory = (u64::from(MIN_MEMORY_MIB), limits.max_memory_mib);
        check_bound(
            "memory_mib",
            self.memory_mib,
            memory.0,
            memory.1,
            "VM_MAX_MEMORY_MIB",
        )?;
        let vcpus = u64::from(limits.max_vcpus);
        check_bound("vcpus", self.vcpus, 1, vcpus, "VM_MAX_VCPUS")?;
        check_bound(
            "disk_size_gb",
            self.disk_size_gb,
            1,
            limits.max_disk_gb,
            "VM_MAX_DISK_GB",
        )?;
        check_hostname(self.hostname.as_deref().unwrap_or(&self.name)).or_else(|e| {
            // A name like "web_1" is a fine VM name but not a hostname: say so only
            // when the hostname was given; otherwise derive one.
            if self.hostname.is_some() {
                Err(e)
            } else {
                Ok(())
            }
        })?;
        self.check_cloud_init()?;
        self.check_boot()?;
        Ok(name)
    }

    /// The keys, the user-data and the network-config.
    fn check_cloud_init(&self) -> Result<(), VmError> {
        if let Some(keys) = &self.ssh_authorized_keys {
            if keys.len() > MAX_KEYS {
                return Err(Invalid::TooManyKeys(MAX_KEYS).into());
            }
            for (index, k) in keys.iter().enumerate() {
                k.parse::<SshKey>()
                    .map_err(|reason| Invalid::SshKey { index, reason })?;
            }
        }
        for (field, v) in [
            ("user_data", &self.user_data),
            ("network_config", &self.network_config),
        ] {
            if v.as_ref().is_some_and(|v| v.len() > MAX_CLOUD_INIT_BYTES) {
                return Err(Invalid::CloudInitTooLarge {
                    field,
                    max: MAX_CLOUD_INIT_BYTES,
                }
                .into());
            }
        }
        Ok(())
    }

    /// A direct kernel boot's files and command line.
    fn check_boot(&self) -> Result<(), VmError> {
        if let Some(k) = &self.kernel {
            check_host_path("kernel", k)?;
        }
        if let Some(i) = &self.initrd {
            check_host_path("initrd", i)?;
            if self.kernel.is_none() {
                return Err(Invalid::NeedsKernel { field: "initrd" }.into());
            }
        }
        if let Some(c) = &self.cmdline {
            if self.kernel.is_none() {
                return Err(Invalid::NeedsKernel { field: "cmdline" }.into());
            }
            if c.len() > 4096 || c.chars().any(|c| c.is_control()) {
                return Err(Invalid::Cmdline.into());
            }
        }
        Ok(())
    }

    /// The hostname the guest gets: the one asked for, else the name made valid.
    pub fn effective_hostname(&self) -> String {
        match &self.hostname {
            Some(h) => h.strip_suffix('.').unwrap_or(h).to_string(),
            None => {
                let h: String = self
                    .name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect();
                let h = h.trim_matches(|c| c == '-' || c == '.').to_string();
                if h.is_empty() { "vm".into() } else { h }
            }
        }
    }
}

#[cfg(test)]
impl VmSpec {
    /// A spec from a `POST /vms` body, read as the API reads it: how tests write them.
    #[allow(clippy::expect_used, reason = "tests only")]
    pub(crate) fn from_json(v: serde_json::Value) -> Self {
        serde_json::from_value::<crate::api::wire::vms::CreateVm>(v)
            .map(Self::from)
            .expect("a body the API reads")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_memory_mib: 4096,
            max_vcpus: 4,
            max_disk_gb: 100,
        }
    }

    /// A spec as the API reads it from a body.
    fn vm(json: serde_json::Value) -> Result<VmSpec, serde_json::Error> {
        serde_json::from_value::<crate::api::wire::vms::CreateVm>(json).map(VmSpec::from)
    }

    #[test]
    fn debug_output_shows_no_cloud_init_input() {
        let v = VmSpec::from_json(serde_json::json!(
            {"name": "a", "user_data": "password: hunter2", "network_config": "psk: swordfish"}
        ));
        let d = format!("{v:?}");
        assert!(!d.contains("hunter2") && !d.contains("swordfish"), "{d}");
        assert!(d.contains("<17 bytes>"), "{d}");
    }

    #[test]
    fn defaults_and_a_valid_request() {
        let v = vm(serde_json::json!({"name": "web-1"})).unwrap();
        assert_eq!((v.memory_mib, v.vcpus, v.disk_size_gb), (1024, 1, 10));
        v.validate(&limits()).unwrap();
        assert_eq!(v.effective_hostname(), "web-1");
        let v = vm(serde_json::json!({"name": "web_1.a"})).unwrap();
        v.validate(&limits()).unwrap();
        assert_eq!(v.effective_hostname(), "web-1.a");
    }

    #[test]
    fn hostile_or_out_of_range_input_is_refused() {
        for bad in [
            serde_json::json!({"name": "../x"}),
            serde_json::json!({"name": "a'b"}),
            serde_json::json!({"name": "a<b"}),
            serde_json::json!({"name": "x".repeat(200)}),
            serde_json::json!({"name": ""}),
            serde_json::json!({"name": "a", "memory_mib": 0}),
            serde_json::json!({"name": "a", "memory_mib": 4097}),
            serde_json::json!({"name": "a", "vcpus": 0}),
            serde_json::json!({"name": "a", "vcpus": 5}),
            serde_json::json!({"name": "a", "disk_size_gb": 0}),
            serde_json::json!({"name": "a", "disk_size_gb": 101}),
            serde_json::json!({"name": "a", "network_name": "x/../y"}),
            serde_json::json!({"name": "a", "os_arch": "x86_64'"}),
            serde_json::json!({"name": "a", "image": "../etc"}),
            serde_json::json!({"name": "a", "hostname": "-bad"}),
            serde_json::json!({"name": "a", "kernel": "relative/vmlinuz"}),
            serde_json::json!({"name": "a", "kernel": "/a/../b"}),
            serde_json::json!({"name": "a", "initrd": "/x"}),
            serde_json::json!({"name": "a", "kernel": "/k", "cmdline": "a\nb"}),
            serde_json::json!({"name": "a", "user_data": "x".repeat(MAX_CLOUD_INIT_BYTES + 1)}),
        ] {
            let v = vm(bad.clone()).unwrap();
            assert!(
                matches!(v.validate(&limits()), Err(VmError::Invalid(_))),
                "{bad} was accepted"
            );
        }
        assert!(vm(serde_json::json!({"name": "a", "colour": "red"})).is_err());
        assert!(vm(serde_json::json!({"name": "a", "memory_mib": "lots"})).is_err());
        assert!(vm(serde_json::json!({"name": "a", "memory_mib": -1})).is_err());
    }
}
