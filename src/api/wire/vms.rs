//! `/vms` on the wire: the body and queries the VM routes read, and their answers, each
//! made from the VM service's values. The answers are written with their keys sorted
//! (`sorted.rs`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::names::{DesiredState, IpSource, VmState};
use crate::api::doc;
use crate::vm::service;
use crate::vm::spec::VmSpec;

/// Longest `/ip` wait, seconds.
pub const MAX_IP_TIMEOUT_S: u64 = 600;
/// Largest console tail, bytes.
pub const MAX_CONSOLE_BYTES: u64 = 1 << 20;

/// `POST /vms`. Unknown fields are refused.
// No `Debug`: the cloud-init inputs may hold secrets (the `VmSpec` it becomes leaves
// them out of its own).
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`.
    #[schema(schema_with = doc::name)]
    pub name: String,
    /// Default 1024.
    #[serde(default = "default_memory", deserialize_with = "whole_number")]
    pub memory_mib: u32,
    /// Default 1.
    #[serde(default = "default_vcpus", deserialize_with = "whole_number")]
    pub vcpus: u32,
    /// GiB, default 10; at least the image's virtual size.
    #[serde(default = "default_disk", deserialize_with = "whole_number")]
    pub disk_size_gb: u32,
    /// libvirt network; default VMS_NETWORK. Started and set to autostart if inactive.
    #[serde(default)]
    #[schema(schema_with = doc::name_or_null)]
    pub network_name: Option<String>,
    /// Default VMS_ARCH.
    #[serde(default)]
    #[schema(schema_with = doc::arch_or_null)]
    pub os_arch: Option<String>,
    /// Destroy an existing VM of this name (domain, disk, seed) and start afresh.
    #[serde(default)]
    pub recreate: bool,
    /// Base image name (`GET /images`); default VMS_DEFAULT_IMAGE, or a blank disk when
    /// `kernel` is given.
    #[serde(default)]
    #[schema(schema_with = doc::name_or_null)]
    pub image: Option<String>,
    /// Public keys for the image's default user (at most 64, each one line `<type>
    /// <base64> [comment]` of at most 16 KiB); default SSH_AUTHORIZED_KEYS.
    #[serde(default)]
    #[schema(schema_with = doc::ssh_keys_or_null)]
    pub ssh_authorized_keys: Option<Vec<String>>,
    /// Raw cloud-init user-data, used verbatim instead of the generated one; at most
    /// 32 KiB of UTF-8.
    #[serde(default)]
    #[schema(schema_with = doc::cloud_init_or_null)]
    pub user_data: Option<String>,
    /// Raw cloud-init network-config; at most 32 KiB of UTF-8.
    #[serde(default)]
    #[schema(schema_with = doc::cloud_init_or_null)]
    pub network_config: Option<String>,
    /// Default: the VM's name.
    #[serde(default)]
    #[schema(schema_with = doc::hostname_or_null)]
    pub hostname: Option<String>,
    /// Direct kernel boot: absolute paths the libvirt host can read.
    #[serde(default)]
    #[schema(schema_with = doc::host_path_or_null)]
    pub kernel: Option<String>,
    /// Needs `kernel`.
    #[serde(default)]
    #[schema(schema_with = doc::host_path_or_null)]
    pub initrd: Option<String>,
    /// Kernel command line, one line; needs `kernel`.
    #[serde(default)]
    #[schema(schema_with = doc::cmdline_or_null)]
    pub cmdline: Option<String>,
    /// The IPv4 address to pin, inside the network's DHCP range (400 when outside it,
    /// 409 when another VM, host entry or lease holds it); default: the lowest free one
    /// (a recreated VM keeps its own).
    #[serde(default, deserialize_with = "ipv4_or_null")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub ip: Option<std::net::Ipv4Addr>,
}

impl From<CreateVm> for VmSpec {
    fn from(b: CreateVm) -> Self {
        VmSpec {
            name: b.name,
            memory_mib: b.memory_mib,
            vcpus: b.vcpus,
            disk_size_gb: b.disk_size_gb,
            network_name: b.network_name,
            os_arch: b.os_arch,
            recreate: b.recreate,
            image: b.image,
            ssh_authorized_keys: b.ssh_authorized_keys,
            user_data: b.user_data,
            network_config: b.network_config,
            hostname: b.hostname,
            kernel: b.kernel,
            initrd: b.initrd,
            cmdline: b.cmdline,
            ip: b.ip,
        }
    }
}

/// `ip`: a dotted IPv4 address or null; the refusal names the field (the parser's own
/// message does not).
fn ipv4_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::Ipv4Addr>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|t| {
        t.parse().map_err(|_| {
            serde::de::Error::custom(format!("ip must be an IPv4 address (a.b.c.d), not {t:?}"))
        })
    })
    .transpose()
}

/// A `u32` written as a JSON integer or with a zero fraction (`2048.0`): JSON Schema
/// counts both as integers, and the original agent's `int()` took both.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    struct Whole;
    impl serde::de::Visitor<'_> for Whole {
        type Value = u32;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a whole number from 0 to 4294967295")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u32, E> {
            u32::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u32, E> {
            if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
                Ok(v as u32)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(Whole)
}

fn default_memory() -> u32 {
    1024
}
fn default_vcpus() -> u32 {
    1
}
fn default_disk() -> u32 {
    10
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// `false`: answer 202 at once, the VM `creating`; its outcome shows in
    /// `GET /vms/{name}/status` (running, or `failed` with `error`) and the audit log.
    /// Default `true`: answer once the domain runs.
    pub wait: Option<bool>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StopQuery {
    /// Power off at once instead of an ACPI shutdown.
    pub force: Option<bool>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Also delete the disk, seed and console volumes.
    pub delete_files: Option<bool>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct IpQuery {
    /// Seconds to wait for a lease, 0..=600 (default 120).
    pub timeout: Option<u64>,
    /// Network whose leases to read (default: the VM's).
    pub network: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// How many bytes of the end of the log (default 16384, at most 1 MiB).
    pub bytes: Option<u64>,
}

/// What `POST /vms` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    pub name: String,
    pub uuid: String,
    pub mac: String,
    pub instance_id: String,
    pub hostname: String,
    pub image: Option<String>,
    pub recreated: bool,
    /// The address pinned for the VM in its network's DHCP range: its DHCP lease,
    /// from the first boot on.
    #[schema(format = Ipv4)]
    pub ip: String,
}

impl From<service::Created> for Created {
    fn from(c: service::Created) -> Self {
        let service::Created {
            name,
            uuid,
            mac,
            instance_id,
            hostname,
            image,
            recreated,
            ip,
        } = c;
        Self {
            name,
            uuid,
            mac,
            instance_id,
            hostname,
            image,
            recreated,
            ip: ip.to_string(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmCreated {
    pub ok: bool,
    #[serde(flatten)]
    pub created: Created,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmCreating {
    pub ok: bool,
    pub name: String,
    /// `creating`.
    pub state: String,
    /// The address pinned for the VM (its DHCP lease once it boots).
    #[schema(format = Ipv4)]
    pub ip: String,
}

/// One port map to a VM, as `GET /ports` lists it (the row and its `rule_id`).
#[derive(Debug, Serialize, ToSchema)]
pub struct VmPortMap {
    /// `tcp` or `udp`.
    pub proto: String,
    pub listen_port: u16,
    #[schema(format = Ipv4)]
    pub target_ip: String,
    pub target_port: u16,
    /// The VM the map names; null for a map to the VM's address.
    pub target_vm: Option<String>,
    /// Sources allowed to connect; empty: every source.
    pub allow_from: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
    pub created_by: String,
    pub updated_by: String,
    /// The map's key in `GET /ports` (`8080`, `8080/udp`).
    pub rule_id: String,
}

impl From<service::VmPortMap> for VmPortMap {
    fn from(m: service::VmPortMap) -> Self {
        let service::VmPortMap {
            proto,
            listen_port,
            target_ip,
            target_port,
            target_vm,
            allow_from,
            created_at,
            updated_at,
            created_by,
            updated_by,
            rule_id,
        } = m;
        Self {
            proto,
            listen_port,
            target_ip,
            target_port,
            target_vm,
            allow_from,
            created_at,
            updated_at,
            created_by,
            updated_by,
            rule_id,
        }
    }
}

/// One VM as `GET /vms` and `/status` show it.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmStatus {
    pub name: String,
    pub active: bool,
    pub state: VmState,
    pub uuid: String,
    /// The cloud-init instance-id in the VM's seed (`meta-data`), as `POST /vms` answered
    /// it: from the agent's row, else from the agent's metadata in the domain's XML;
    /// null for a domain the agent did not create.
    pub instance_id: Option<String>,
    /// Created (and so deletable) by this agent.
    pub managed: bool,
    /// The address a client can use, as `GET /vms/{name}/ip` answers it: the pinned
    /// address when the agent reserved one, else the one the VM's last DHCP lease gave
    /// (`GET /vms/{name}/ip` records it); null while neither is known.
    pub ip: Option<String>,
    /// Where `ip` comes from: `pinned` (the agent's reservation, known before the VM
    /// boots) or `lease` (the last DHCP lease seen); null with `ip`.
    pub ip_source: Option<IpSource>,
    /// The address the agent reserved for the VM (absent for VMs created before
    /// pinning, and for domains the agent did not create).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Ipv4)]
    pub pinned_ip: Option<String>,
    pub mac: Option<String>,
    pub network: Option<String>,
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub image: Option<String>,
    pub desired_state: Option<DesiredState>,
    pub created_at: Option<String>,
    /// When libvirt was last asked about this domain (ISO 8601, UTC, as the `*_at`
    /// columns); `null` when it has not answered since the agent started. Reads never
    /// wait behind libvirt, so this says how current `state` is.
    pub observed_at: Option<String>,
    /// Why a create failed after its request stopped waiting (state `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `GET /vms/{name}/status` only: the port maps whose target is the VM's pinned or
    /// last address, as `GET /ports` lists them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_maps: Option<Vec<VmPortMap>>,
}

impl From<service::VmStatus> for VmStatus {
    fn from(s: service::VmStatus) -> Self {
        let service::VmStatus {
            name,
            active,
            state,
            uuid,
            instance_id,
            managed,
            ip,
            ip_source,
            pinned_ip,
            mac,
            network,
            memory_mib,
            vcpus,
            image,
            desired_state,
            created_at,
            observed_at,
            error,
            port_maps,
        } = s;
        Self {
            name,
            active,
            state: state.into(),
            uuid,
            instance_id,
            managed,
            ip: ip.map(|i| i.to_string()),
            ip_source: ip_source.map(Into::into),
            pinned_ip: pinned_ip.map(|i| i.to_string()),
            mac,
            network,
            memory_mib,
            vcpus,
            image,
            desired_state: desired_state.map(Into::into),
            created_at,
            observed_at,
            error,
            port_maps: port_maps.map(|m| m.into_iter().map(Into::into).collect()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmList {
    pub ok: bool,
    /// The agent's VMs and every other domain (`managed: false`).
    pub vms: Vec<VmStatus>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmStatusAnswer {
    pub ok: bool,
    pub status: VmStatus,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmStarted {
    pub ok: bool,
    pub name: String,
    pub was_running: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmStopped {
    pub ok: bool,
    pub name: String,
    pub forced: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmRebooted {
    pub ok: bool,
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub name: String,
    pub deleted_files: bool,
    /// Port maps that targeted the VM's address, removed with it (see docs/decisions/09-vms-through-libvirt-api.md).
    pub removed_port_maps: Vec<String>,
}

impl From<service::Deleted> for Deleted {
    fn from(d: service::Deleted) -> Self {
        let service::Deleted {
            name,
            deleted_files,
            removed_port_maps,
        } = d;
        Self {
            name,
            deleted_files,
            removed_port_maps,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmDeleted {
    pub ok: bool,
    #[serde(flatten)]
    pub deleted: Deleted,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmIp {
    pub ok: bool,
    pub name: String,
    #[schema(format = Ipv4)]
    pub ip: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmConsole {
    pub ok: bool,
    pub name: String,
    pub console: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(json: serde_json::Value) -> Result<CreateVm, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn defaults_fill_what_a_body_leaves_out() {
        let v = VmSpec::from(vm(serde_json::json!({"name": "web-1"})).unwrap());
        assert_eq!((v.memory_mib, v.vcpus, v.disk_size_gb), (1024, 1, 10));
        assert!(!v.recreate && v.image.is_none() && v.ip.is_none());
    }

    #[test]
    fn whole_numbers_may_be_written_with_a_zero_fraction() {
        let v = vm(serde_json::json!({"name": "a", "memory_mib": 2048.0, "vcpus": 2e0})).unwrap();
        assert_eq!((v.memory_mib, v.vcpus), (2048, 2));
        for bad in [
            serde_json::json!({"name": "a", "memory_mib": 2048.5}),
            serde_json::json!({"name": "a", "memory_mib": -1.0}),
            serde_json::json!({"name": "a", "memory_mib": 5e9}),
            serde_json::json!({"name": "a", "disk_size_gb": "10"}),
            serde_json::json!({"name": "a", "vcpus": null}),
            serde_json::json!({"name": "a", "colour": "red"}),
            serde_json::json!({"name": "a", "memory_mib": "lots"}),
            serde_json::json!({"name": "a", "memory_mib": -1}),
        ] {
            assert!(vm(bad.clone()).is_err(), "{bad}");
        }
    }
}
