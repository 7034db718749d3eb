//! `vms` and `images`: the desired VMs and base images.

use std::net::{IpAddr, Ipv4Addr};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::{NOW, StoreError};
use crate::model::{DesiredState, ImageState, MacAddr, VmName, VmState};

/// One VM as the operator asked for it, plus what the agent last saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmRow {
    pub name: VmName,
    pub uuid: String,
    pub instance_id: String,
    pub hostname: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub disk_size_gb: u32,
    pub network_name: String,
    pub os_arch: String,
    pub domain_type: String,
    pub image: Option<String>,
    pub mac: MacAddr,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// How many SSH keys went into the seed (the keys themselves are in `vm_seeds`).
    pub ssh_keys: u32,
    /// Whether the seed's user-data came verbatim from the request.
    pub user_data: bool,
    pub disk_volume: String,
    pub seed_volume: String,
    pub desired_state: DesiredState,
    pub last_state: Option<VmState>,
    /// The address of the last DHCP lease the agent saw (`GET /vms/{name}/ip`).
    pub last_ip: Option<IpAddr>,
    pub last_ip_at: Option<String>,
    /// The address reserved for the VM in its network's DHCP range (a host entry);
    /// `None` for a VM created before schema 7, which gets whatever DHCP gives it.
    pub pinned_ip: Option<IpAddr>,
    pub created_at: String,
    pub updated_at: String,
    pub created_by: String,
}

const VM_COLUMNS: &str = "name, uuid, instance_id, hostname, memory_mib, vcpus, disk_size_gb, \
    network_name, os_arch, domain_type, image, mac, kernel, initrd, cmdline, ssh_keys, user_data, \
    disk_volume, seed_volume, desired_state, last_state, last_ip, last_ip_at, created_at, \
    updated_at, created_by, pinned_ip";

fn vm_from_row(r: &Row<'_>) -> rusqlite::Result<VmRow> {
    Ok(VmRow {
        name: r.get(0)?,
        uuid: r.get(1)?,
        instance_id: r.get(2)?,
        hostname: r.get(3)?,
        memory_mib: r.get(4)?,
        vcpus: r.get(5)?,
        disk_size_gb: r.get(6)?,
        network_name: r.get(7)?,
        os_arch: r.get(8)?,
        domain_type: r.get(9)?,
        image: r.get(10)?,
        mac: r.get(11)?,
        kernel: r.get(12)?,
        initrd: r.get(13)?,
        cmdline: r.get(14)?,
        ssh_keys: r.get(15)?,
        user_data: r.get(16)?,
        disk_volume: r.get(17)?,
        seed_volume: r.get(18)?,
        desired_state: r.get(19)?,
        last_state: r.get(20)?,
        last_ip: ip_column(r, 21)?,
        last_ip_at: r.get(22)?,
        created_at: r.get(23)?,
        updated_at: r.get(24)?,
        created_by: r.get(25)?,
        pinned_ip: ip_column(r, 26)?,
    })
}

/// An address column (TEXT): NULL, or an address that must parse; a stored value that no
/// longer does is an error, not a missing address.
fn ip_column(r: &Row<'_>, idx: usize) -> rusqlite::Result<Option<IpAddr>> {
    let Some(text) = r.get::<_, Option<String>>(idx)? else {
        return Ok(None);
    };
    text.parse().map(Some).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// An address as its column holds it.
fn ip_text(ip: Option<IpAddr>) -> Option<String> {
    ip.map(|i| i.to_string())
}

/// A port map's target among a VM's addresses: IPv4 only (the agent's table is `ip`).
fn v4(ip: Option<IpAddr>) -> Option<Ipv4Addr> {
    match ip {
        Some(IpAddr::V4(v4)) => Some(v4),
        _ => None,
    }
}

pub fn list(conn: &Connection) -> Result<Vec<VmRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"))?;
    let rows = stmt.query_map([], vm_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn get(conn: &Connection, name: &str) -> Result<Option<VmRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1"))?;
    Ok(stmt.query_row([name], vm_from_row).optional()?)
}

pub fn mac_in_use(conn: &Connection, mac: &MacAddr) -> Result<bool, StoreError> {
    let n: i64 = conn.query_row("SELECT count(*) FROM vms WHERE mac = ?1", [mac], |r| {
        r.get(0)
    })?;
    Ok(n > 0)
}

/// Whether a VM row has MAC `mac` on network `network`.
pub fn mac_on_network(conn: &Connection, mac: &MacAddr, network: &str) -> Result<bool, StoreError> {
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM vms WHERE mac = ?1 AND network_name = ?2",
        params![mac, network],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// How many images are ready, and their bytes together.
pub fn ready_image_totals(conn: &Connection) -> Result<(i64, i64), StoreError> {
    Ok(conn.query_row(
        "SELECT count(*), coalesce(sum(size_bytes), 0) FROM images WHERE state = 'ready'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// Where port maps that name VM `name` go: `None` when there is no such VM; else its
/// pinned address, or, for a VM from before pinning, the last address the agent saw
/// (`Some(None)`: none yet).
pub fn map_address(conn: &Connection, name: &str) -> Result<Option<Option<Ipv4Addr>>, StoreError> {
    let row: Option<(Option<IpAddr>, Option<IpAddr>)> = conn
        .query_row(
            "SELECT pinned_ip, last_ip FROM vms WHERE name = ?1",
            [name],
            |r| Ok((ip_column(r, 0)?, ip_column(r, 1)?)),
        )
        .optional()?;
    Ok(row.map(|(pinned, last)| v4(pinned.or(last))))
}

/// The MAC of every VM.
pub fn macs(conn: &Connection) -> Result<Vec<MacAddr>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT mac FROM vms")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The pinned addresses on `network` of every VM but `except`, with the VM holding each.
pub fn pinned_on(
    conn: &Connection,
    network: &str,
    except: &str,
) -> Result<Vec<(IpAddr, VmName)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT pinned_ip, name FROM vms \
         WHERE network_name = ?1 AND name <> ?2 AND pinned_ip IS NOT NULL",
    )?;
    let rows = stmt.query_map([network, except], |r| {
        let ip = ip_column(r, 0)?;
        Ok(ip.map(|ip| (ip, r.get::<_, VmName>(1))))
    })?;
    let mut out = Vec::new();
    for row in rows {
        if let Some((ip, name)) = row? {
            out.push((ip, name?));
        }
    }
    Ok(out)
}

/// What a VM's cloud-init seed was built from (`vm_seeds`), kept so that reconcile can
/// build the same seed again. `user_data` may hold secrets: this is never serialized
/// into an answer or the audit log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedInputs {
    pub ssh_authorized_keys: Vec<String>,
    pub user_data: Option<String>,
    pub network_config: Option<String>,
}

/// Inserts a new VM, or replaces the VM of the same name (recreate), with its seed
/// inputs. `created_at`, `updated_at` are set here; the caller's values are ignored.
/// Call it inside a transaction: it writes two tables.
pub fn upsert(conn: &Connection, vm: &VmRow, seed: &SeedInputs) -> Result<(), StoreError> {
    upsert_row(conn, vm)?;
    let keys = serde_json::to_string(&seed.ssh_authorized_keys)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.execute(
        "INSERT OR REPLACE INTO vm_seeds (name, ssh_authorized_keys, user_data, network_config) \
         VALUES (?1, ?2, ?3, ?4)",
        params![vm.name, keys, seed.user_data, seed.network_config],
    )?;
    Ok(())
}

/// The seed inputs of a VM; None for a VM created before schema 4.
pub fn seed(conn: &Connection, name: &str) -> Result<Option<SeedInputs>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT ssh_authorized_keys, user_data, network_config FROM vm_seeds WHERE name = ?1",
    )?;
    Ok(stmt
        .query_row([name], |r| {
            let keys: String = r.get(0)?;
            let keys = serde_json::from_str(&keys).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
            Ok(SeedInputs {
                ssh_authorized_keys: keys,
                user_data: r.get(1)?,
                network_config: r.get(2)?,
            })
        })
        .optional()?)
}

fn upsert_row(conn: &Connection, vm: &VmRow) -> Result<(), StoreError> {
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO vms ({VM_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
             ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, {NOW}, {NOW}, ?24, ?25)"
        ),
        params![
            vm.name,
            vm.uuid,
            vm.instance_id,
            vm.hostname,
            vm.memory_mib,
            vm.vcpus,
            vm.disk_size_gb,
            vm.network_name,
            vm.os_arch,
            vm.domain_type,
            vm.image,
            vm.mac,
            vm.kernel,
            vm.initrd,
            vm.cmdline,
            vm.ssh_keys,
            vm.user_data,
            vm.disk_volume,
            vm.seed_volume,
            vm.desired_state,
            vm.last_state,
            ip_text(vm.last_ip),
            vm.last_ip_at,
            vm.created_by,
            ip_text(vm.pinned_ip),
        ],
    )?;
    Ok(())
}

pub fn delete(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn.execute("DELETE FROM vms WHERE name = ?1", [name])? > 0)
}

pub fn set_desired_state(
    conn: &Connection,
    name: &str,
    state: DesiredState,
) -> Result<(), StoreError> {
    conn.execute(
        &format!("UPDATE vms SET desired_state = ?2, updated_at = {NOW} WHERE name = ?1"),
        params![name, state],
    )?;
    Ok(())
}

/// Records what libvirt last showed of each VM (`VmState::OBSERVED`), writing only the
/// rows whose state changed (no `updated_at` change: not an operator's act). Names
/// without a row are ignored. Returns how many rows changed.
pub fn set_last_states(
    conn: &Connection,
    states: &[(String, VmState)],
) -> Result<usize, StoreError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE vms SET last_state = ?2 WHERE name = ?1 AND last_state IS NOT ?2",
    )?;
    let mut changed = 0;
    for (name, state) in states {
        changed += stmt.execute(params![name, state])?;
    }
    Ok(changed)
}

pub fn set_last_ip(conn: &Connection, name: &str, ip: IpAddr) -> Result<(), StoreError> {
    conn.execute(
        &format!("UPDATE vms SET last_ip = ?2, last_ip_at = {NOW} WHERE name = ?1"),
        params![name, ip.to_string()],
    )?;
    Ok(())
}

/// Names of the VMs whose disk is backed by `image`.
pub fn using_image(conn: &Connection, image: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT name FROM vms WHERE image = ?1 ORDER BY name")?;
    let rows = stmt.query_map([image], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One base image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageRow {
    pub name: String,
    pub source: String,
    pub sha256_expected: Option<String>,
    pub sha256: Option<String>,
    pub format: Option<String>,
    pub size_bytes: Option<i64>,
    pub state: ImageState,
    pub error: Option<String>,
    pub volume: String,
    pub created_at: String,
    pub updated_at: String,
    pub created_by: String,
}

const IMAGE_COLUMNS: &str = "name, source, sha256_expected, sha256, format, size_bytes, state, \
    error, volume, created_at, updated_at, created_by";

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        name: r.get(0)?,
        source: r.get(1)?,
        sha256_expected: r.get(2)?,
        sha256: r.get(3)?,
        format: r.get(4)?,
        size_bytes: r.get(5)?,
        state: r.get(6)?,
        error: r.get(7)?,
        volume: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        created_by: r.get(11)?,
    })
}

pub fn images(conn: &Connection) -> Result<Vec<ImageRow>, StoreError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"))?;
    let rows = stmt.query_map([], image_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn image(conn: &Connection, name: &str) -> Result<Option<ImageRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"
    ))?;
    Ok(stmt.query_row([name], image_from_row).optional()?)
}

/// A new image row in state `downloading` (replacing a failed one of the same name).
pub fn image_begin(
    conn: &Connection,
    name: &str,
    source: &str,
    sha256_expected: Option<&str>,
    volume: &str,
    created_by: &str,
) -> Result<(), StoreError> {
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO images (name, source, sha256_expected, state, volume, created_at, updated_at, created_by)
             VALUES (?1, ?2, ?3, 'downloading', ?4, {NOW}, {NOW}, ?5)"
        ),
        params![name, source, sha256_expected, volume, created_by],
    )?;
    Ok(())
}

pub fn image_ready(
    conn: &Connection,
    name: &str,
    sha256: &str,
    format: &str,
    size_bytes: i64,
) -> Result<(), StoreError> {
    conn.execute(
        &format!(
            "UPDATE images SET state = 'ready', error = NULL, sha256 = ?2, format = ?3, size_bytes = ?4, updated_at = {NOW}
             WHERE name = ?1"
        ),
        params![name, sha256, format, size_bytes],
    )?;
    Ok(())
}

pub fn image_failed(conn: &Connection, name: &str, error: &str) -> Result<(), StoreError> {
    conn.execute(
        &format!(
            "UPDATE images SET state = 'failed', error = ?2, updated_at = {NOW} WHERE name = ?1"
        ),
        params![name, error],
    )?;
    Ok(())
}

pub fn image_delete(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn.execute("DELETE FROM images WHERE name = ?1", [name])? > 0)
}

/// A plausible row for tests (instance-id `iid-<mac>`); other modules' tests use it too.
#[cfg(test)]
pub(crate) fn test_row(name: &str, mac: &str) -> VmRow {
    VmRow {
        name: name.parse().expect("a test VM's name"),
        uuid: format!("uuid-{name}-{mac}"),
        instance_id: format!("iid-{mac}"),
        hostname: name.into(),
        memory_mib: 128,
        vcpus: 1,
        disk_size_gb: 1,
        network_name: "default".into(),
        os_arch: "x86_64".into(),
        domain_type: "qemu".into(),
        image: None,
        mac: mac.parse().expect("a test VM's MAC"),
        kernel: None,
        initrd: None,
        cmdline: None,
        ssh_keys: 1,
        user_data: true,
        disk_volume: format!("vm.{name}.disk.qcow2"),
        seed_volume: format!("vm.{name}.seed.img"),
        desired_state: DesiredState::Running,
        last_state: None,
        last_ip: None,
        last_ip_at: None,
        pinned_ip: None,
        created_at: String::new(),
        updated_at: String::new(),
        created_by: "test".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// `pinned_ip` is kept with the row; a VM without one (created before schema 7)
    /// reads as `None` and holds nothing on its network.
    #[test]
    fn pinned_addresses_are_read_per_vm_and_per_network() {
        let store = Store::open_in_memory().unwrap();
        let pinned = |name: &str, mac: &str, net: &str, ip: Option<&str>| VmRow {
            network_name: net.into(),
            pinned_ip: ip.map(|i| i.parse().unwrap()),
            ..test_row(name, mac)
        };
        for row in [
            pinned("a", "52:54:00:00:00:01", "default", Some("192.168.122.2")),
            pinned("b", "52:54:00:00:00:02", "default", Some("192.168.122.3")),
            pinned("c", "52:54:00:00:00:03", "other", Some("10.0.0.2")),
            pinned("old", "52:54:00:00:00:04", "default", None),
        ] {
            store
                .transaction(|tx| upsert(tx, &row, &SeedInputs::default()))
                .unwrap();
        }
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            store.with(|c| map_address(c, "a")).unwrap(),
            Some(Some(v4("192.168.122.2")))
        );
        assert_eq!(store.with(|c| map_address(c, "old")).unwrap(), Some(None));
        assert_eq!(store.with(|c| map_address(c, "nobody")).unwrap(), None);
        assert_eq!(
            store.with(|c| get(c, "b")).unwrap().unwrap().pinned_ip,
            Some(ip("192.168.122.3"))
        );
        assert_eq!(
            store.with(|c| pinned_on(c, "default", "a")).unwrap(),
            [(ip("192.168.122.3"), "b".parse().unwrap())]
        );
        assert_eq!(store.with(macs).unwrap().len(), 4);
    }

    #[test]
    fn seed_inputs_follow_their_vm() {
        let store = Store::open_in_memory().unwrap();
        let first = SeedInputs {
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA a \"quoted\" comment".into()],
            user_data: Some("#cloud-config\nbootcmd: [x]\n".into()),
            network_config: None,
        };
        store
            .transaction(|tx| upsert(tx, &test_row("a", "52:54:00:00:00:01"), &first))
            .unwrap();
        assert_eq!(store.with(|c| seed(c, "a")).unwrap(), Some(first));

        // Recreate replaces both the row and its seed inputs.
        let second = SeedInputs {
            ssh_authorized_keys: vec![],
            user_data: None,
            network_config: Some("version: 2\n".into()),
        };
        store
            .transaction(|tx| upsert(tx, &test_row("a", "52:54:00:00:00:01"), &second))
            .unwrap();
        assert_eq!(store.with(|c| seed(c, "a")).unwrap(), Some(second));

        // Delete takes them too; a VM without any (created before schema 4) has None.
        assert!(store.with(|c| delete(c, "a")).unwrap());
        assert_eq!(store.with(|c| seed(c, "a")).unwrap(), None);
        store
            .with(|c| upsert_row(c, &test_row("old", "52:54:00:00:00:02")))
            .unwrap();
        assert_eq!(store.with(|c| seed(c, "old")).unwrap(), None);
        let n: i64 = store
            .with(|c| {
                Ok::<_, StoreError>(c.query_row("SELECT count(*) FROM vm_seeds", [], |r| r.get(0))?)
            })
            .unwrap();
        assert_eq!(n, 0);
    }
}
