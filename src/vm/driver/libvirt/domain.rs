//! The blocking libvirt side of the VM lifecycle: what each step does to libvirt
//! (volumes, domain XML, define, start, undefine, reconcile of one row). Called by
//! `service` on libvirt's blocking threads, never on the async runtime.

use std::time::Instant;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::sys;

use super::{VmConfig, VmError, storage, xml};
use crate::cloudinit as seed;
use crate::model::{DesiredState, IfaceName, ImageState, VmState};
use crate::store::vms::{ImageRow, SeedInputs, VmRow};

/// libvirt's domain state as the agent spells it.
pub fn vm_state(state: sys::virDomainState) -> VmState {
    match state {
        sys::VIR_DOMAIN_RUNNING => VmState::Running,
        sys::VIR_DOMAIN_BLOCKED => VmState::Blocked,
        sys::VIR_DOMAIN_PAUSED => VmState::Paused,
        sys::VIR_DOMAIN_SHUTDOWN => VmState::Shutdown,
        sys::VIR_DOMAIN_SHUTOFF => VmState::Shutoff,
        sys::VIR_DOMAIN_CRASHED => VmState::Crashed,
        sys::VIR_DOMAIN_PMSUSPENDED => VmState::Pmsuspended,
        _ => VmState::Nostate,
    }
}

pub(super) fn domain_state(dom: &Domain) -> Result<(bool, VmState), VmError> {
    let info = dom
        .info()
        .map_err(|e| VmError::libvirt("domain state", e))?;
    let active = dom
        .is_active()
        .map_err(|e| VmError::libvirt("domain state", e))?;
    Ok((active, vm_state(info.state.to_raw())))
}

pub(super) fn lookup(conn: &Connect, name: &str) -> Result<Option<Domain>, VmError> {
    match conn.lookup_domain_by_name(name) {
        Ok(d) => Ok(Some(d)),
        Err(e) => {
            let e = VmError::libvirt(format!("domain {name}"), e);
            if e.is_not_found() { Ok(None) } else { Err(e) }
        }
    }
}

/// The domain, or 404.
pub(super) fn existing(conn: &Connect, name: &str) -> Result<Domain, VmError> {
    lookup(conn, name)?.ok_or_else(|| VmError::NotFound(format!("no VM named {name}")))
}

pub(super) fn facts(dom: &Domain) -> Result<xml::DomainFacts, VmError> {
    let text = dom
        .xml_desc(0)
        .map_err(|e| VmError::libvirt("domain XML", e))?;
    xml::parse_domain(&text).map_err(|e| VmError::Internal(e.to_string()))
}

/// Hairpin mode on the running domain's taps, where they are bridge ports in the
/// agent's own namespace (a local libvirt); elsewhere nothing to do.
pub(super) fn hairpin(cfg: &VmConfig, dom: &Domain) {
    if !cfg.local {
        // The taps are on another host; a local device of the same name is not ours.
        return;
    }
    let Ok(f) = facts(dom) else { return };
    // A tap libvirt names oddly is no bridge port of ours to touch.
    for tap in f.taps.iter().filter_map(|t| t.parse::<IfaceName>().ok()) {
        match crate::net::link::enable_hairpin(&tap) {
            Ok(Some(true)) => tracing::debug!(tap = %tap, "hairpin mode on"),
            Ok(_) => {}
            Err(e) => tracing::warn!(tap = %tap, error = %e, "cannot set hairpin mode"),
        }
    }
}

pub(super) fn random_mac() -> String {
    let b: [u8; 3] = rand::random();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// Refuses (400) an architecture and domain type the libvirt host has no emulator for
/// (aarch64 without qemu-system-arm, kvm without usable /dev/kvm), before anything is
/// made, instead of a libvirt error at define or start.
pub(super) fn check_guest_support(
    conn: &Connect,
    arch: &str,
    domain_type: &str,
) -> Result<(), VmError> {
    let caps = conn
        .capabilities()
        .map_err(|e| VmError::libvirt("host capabilities", e))?;
    let support = xml::guest_support(&caps)
        .map_err(|e| VmError::Internal(format!("reading host capabilities: {}", e.0)))?;
    if support.iter().any(|(a, t)| a == arch && t == domain_type) {
        return Ok(());
    }
    let offered: Vec<String> = support.iter().map(|(a, t)| format!("{a}/{t}")).collect();
    Err(VmError::Invalid(format!(
        "this libvirt host cannot run {arch} guests with domain type {domain_type} \
         (VMS_DOMAIN_TYPE); it offers {}",
        if offered.is_empty() {
            "none".to_owned()
        } else {
            offered.join(", ")
        }
    )))
}

/// The network, started and set to autostart if it was not (as the original did).
pub(super) fn ensure_network(conn: &Connect, name: &str) -> Result<(), VmError> {
    let net = conn.lookup_network_by_name(name).map_err(|e| {
        let e = VmError::libvirt(format!("network {name}"), e);
        if e.is_not_found() {
            VmError::Invalid(format!("network {name:?} does not exist in libvirt"))
        } else {
            e
        }
    })?;
    if !net
        .is_active()
        .map_err(|e| VmError::libvirt("network state", e))?
    {
        tracing::info!(network = name, "starting inactive network");
        net.create()
            .map_err(|e| VmError::libvirt(format!("starting network {name}"), e))?;
    }
    if !net.autostart().unwrap_or(true) {
        let _ = net.set_autostart(true);
    }
    Ok(())
}

pub(super) fn domain_xml(cfg: &VmConfig, row: &VmRow, pool_dir: &str) -> String {
    let console = format!(
        "{}/{}",
        pool_dir.trim_end_matches('/'),
        storage::console_volume(&row.name)
    );
    xml::domain(&xml::DomainSpec {
        name: &row.name,
        uuid: &row.uuid,
        domain_type: &row.domain_type,
        memory_mib: u64::from(row.memory_mib),
        vcpus: row.vcpus,
        arch: &row.os_arch,
        pool: &cfg.pool,
        disk_volume: &row.disk_volume,
        seed_volume: &row.seed_volume,
        network: &row.network_name,
        mac: &row.mac,
        console_log: Some(&console),
        kernel: row.kernel.as_deref(),
        initrd: row.initrd.as_deref(),
        cmdline: row.cmdline.as_deref(),
        instance_id: &row.instance_id,
    })
}

/// Creates the seed volume and uploads `seed_bytes` into it through a libvirt stream;
/// removes the volume again if the upload fails.
fn make_seed(
    conn: &Connect,
    pool: &StoragePool,
    row: &VmRow,
    seed_bytes: &[u8],
) -> Result<(), VmError> {
    let seed_xml = xml::volume(&row.seed_volume, seed_bytes.len() as u64, "raw", None);
    let seed_vol = storage::create_volume(pool, &row.seed_volume, &seed_xml)?;
    let once = std::iter::once(Ok(bytes::Bytes::copy_from_slice(seed_bytes)));
    if let Err(e) = storage::upload(conn, &seed_vol, once) {
        let _ = storage::delete_volume(pool, &row.seed_volume);
        return Err(e);
    }
    Ok(())
}

/// Creates the disk (backed by the image) and the seed, defines the domain and starts
/// it. On failure everything it made is removed again.
pub(super) fn build_vm(
    conn: &Connect,
    cfg: &VmConfig,
    row: &VmRow,
    image: Option<&ImageRow>,
    seed_bytes: &[u8],
    start: bool,
) -> Result<(), VmError> {
    let pool = storage::ensure_pool(conn, &cfg.pool, &cfg.pool_dir)?;
    let backing = match image {
        Some(img) => {
            let vol = storage::find_volume(&pool, &img.volume)?.ok_or_else(|| {
                VmError::NotFound(format!(
                    "image {} has no volume {} in pool {}; add the image again",
                    img.name, img.volume, cfg.pool
                ))
            })?;
            let info = vol.info().map_err(|e| VmError::libvirt("image size", e))?;
            let want = u64::from(row.disk_size_gb) * storage::GIB;
            if info.capacity > want {
                return Err(VmError::Invalid(format!(
                    "disk_size_gb {} is smaller than image {} ({} GiB)",
                    row.disk_size_gb,
                    img.name,
                    info.capacity.div_ceil(storage::GIB)
                )));
            }
            Some((
                storage::volume_path(&vol)?,
                img.format.clone().unwrap_or_else(|| "qcow2".into()),
            ))
        }
        None => None,
    };
    let mut made: Vec<String> = Vec::new();
    let result = (|| {
        let disk_xml = xml::volume(
            &row.disk_volume,
            u64::from(row.disk_size_gb) * storage::GIB,
            "qcow2",
            backing.as_ref().map(|(p, f)| (p.as_str(), f.as_str())),
        );
        let t = Instant::now();
        storage::create_volume(&pool, &row.disk_volume, &disk_xml)?;
        made.push(row.disk_volume.clone());
        let disk_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        make_seed(conn, &pool, row, seed_bytes)?;
        made.push(row.seed_volume.clone());
        let seed_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        let dom = conn
            .define_domain_xml(&domain_xml(cfg, row, &cfg.pool_dir))
            .map_err(|e| VmError::libvirt(format!("defining domain {}", row.name), e))?;
        let define_ms = t.elapsed().as_secs_f64() * 1000.0;
        let mut start_ms = 0.0;
        let started = (|| {
            dom.set_autostart(start)
                .map_err(|e| VmError::libvirt("domain autostart", e))?;
            if start {
                // libvirt launching QEMU: the one step whose time is libvirt's alone.
                let t = Instant::now();
                dom.create()
                    .map_err(|e| VmError::libvirt(format!("starting {}", row.name), e))?;
                start_ms = t.elapsed().as_secs_f64() * 1000.0;
                hairpin(cfg, &dom);
            }
            Ok(())
        })();
        if let Err(e) = started {
            let _ = dom.undefine();
            return Err(e);
        }
        tracing::debug!(disk_ms, seed_ms, define_ms, start_ms, "VM build steps");
        Ok(())
    })();
    if result.is_err() {
        // A start that failed may have opened the console log (a file the pool only
        // lists after a refresh).
        let _ = pool.refresh(0);
        made.push(storage::console_volume(&row.name));
        for v in made {
            let _ = storage::delete_volume(&pool, &v);
        }
    }
    result
}

/// Undefines the domain with whatever it left in libvirt (managed save, snapshot
/// metadata, NVRAM). A driver that does not know a flag refuses the call with
/// `VIR_ERR_INVALID_ARG` (the test driver has no NVRAM, nor has QEMU on some hosts):
/// then the same without NVRAM, then a plain undefine, as `virsh undefine` does.
fn undefine(dom: &Domain) -> Result<(), virt::error::Error> {
    let keep = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
    let unknown_flag =
        |e: &virt::error::Error| e.code().known() == Some(virt::error::ErrorNumber::InvalidArg);
    match dom.undefine_flags(keep | sys::VIR_DOMAIN_UNDEFINE_NVRAM) {
        Err(e) if unknown_flag(&e) => match dom.undefine_flags(keep) {
            Err(e) if unknown_flag(&e) => dom.undefine(),
            other => other.map(drop),
        },
        other => other.map(drop),
    }
}

/// Stops and undefines the domain, and with `files` deletes its volumes.
pub(super) fn remove_vm(
    conn: &Connect,
    cfg: &VmConfig,
    name: &str,
    dom: Option<Domain>,
    files: bool,
) -> Result<(), VmError> {
    if let Some(dom) = dom {
        if dom.is_active().unwrap_or(false) {
            dom.destroy()
                .map_err(|e| VmError::libvirt(format!("stopping {name}"), e))?;
        }
        undefine(&dom).map_err(|e| VmError::libvirt(format!("undefining {name}"), e))?;
    }
    if files {
        let pool = storage::ensure_pool(conn, &cfg.pool, &cfg.pool_dir)?;
        // The console log only shows up as a volume after a refresh.
        let _ = pool.refresh(0);
        for v in [
            storage::disk_volume(name),
            storage::seed_volume(name),
            storage::console_volume(name),
        ] {
            storage::delete_volume(&pool, &v)?;
        }
    }
    Ok(())
}

/// One row of the reconcile; returns what it repaired (empty: libvirt matched).
///
/// - The domain exists: only a vanished seed volume is made again (the next boot
///   needs it); a running domain's tap gets hairpin mode again.
/// - The domain vanished, its disk is there: the disk is the VM's data and is kept; the
///   seed is made again if it vanished; the domain is defined, and started if it
///   should run.
/// - The disk vanished too: a new disk from the image, with the same seed.
///
/// The seed is the create's: same instance-id (so cloud-init does not run again on a
/// disk it already set up), keys, user-data and network-config; a VM created before
/// they were kept gets the default keys.
pub(super) fn reconcile_one(
    conn: &Connect,
    cfg: &VmConfig,
    row: &VmRow,
    inputs: Option<&SeedInputs>,
    images: &[ImageRow],
) -> Result<Vec<&'static str>, VmError> {
    let seed_bytes = || {
        let defaults = SeedInputs {
            ssh_authorized_keys: cfg.default_keys.clone(),
            ..SeedInputs::default()
        };
        let inputs = inputs.unwrap_or(&defaults);
        seed::build(&seed::SeedSpec {
            instance_id: &row.instance_id,
            hostname: &row.hostname,
            ssh_authorized_keys: &inputs.ssh_authorized_keys,
            user_data: inputs.user_data.as_deref(),
            network_config: inputs.network_config.as_deref(),
        })
        .map_err(|e| VmError::Internal(e.to_string()))
    };
    let mut repaired = Vec::new();
    let dom = lookup(conn, &row.name)?;
    let pool = storage::ensure_pool(conn, &cfg.pool, &cfg.pool_dir)?;
    let has_seed = storage::find_volume(&pool, &row.seed_volume)?.is_some();
    if let Some(d) = dom {
        if !has_seed {
            make_seed(conn, &pool, row, &seed_bytes()?)?;
            repaired.push("seed volume made again");
        }
        // A domain started by someone else gets a new tap without hairpin.
        if d.is_active().unwrap_or(false) {
            hairpin(cfg, &d);
        }
        return Ok(repaired);
    }
    let start = row.desired_state == DesiredState::Running;
    if storage::find_volume(&pool, &row.disk_volume)?.is_none() {
        let image = row.image.as_ref().and_then(|n| {
            images
                .iter()
                .find(|i| &i.name == n && i.state == ImageState::Ready)
        });
        if row.image.is_some() && image.is_none() {
            return Err(VmError::NotFound(format!("image {:?} is gone", row.image)));
        }
        remove_vm(conn, cfg, &row.name, None, true)?;
        build_vm(conn, cfg, row, image, &seed_bytes()?, start)?;
        repaired.push("disk and seed made again from the image");
        repaired.push("domain defined again");
        if start {
            repaired.push("domain started");
        }
        return Ok(repaired);
    }
    if !has_seed {
        make_seed(conn, &pool, row, &seed_bytes()?)?;
        repaired.push("seed volume made again");
    }
    let d = match conn.define_domain_xml(&domain_xml(cfg, row, &cfg.pool_dir)) {
        Ok(d) => d,
        Err(e) => {
            if !has_seed {
                let _ = storage::delete_volume(&pool, &row.seed_volume);
            }
            return Err(VmError::libvirt(format!("defining domain {}", row.name), e));
        }
    };
    repaired.push("domain defined again");
    let _ = d.set_autostart(start);
    if start {
        // A restore is whole or not at all: a domain left defined but stopped would look
        // repaired to every later pass (they start nothing that exists), so the VM would
        // never run again. Undefined, the next pass tries again (a seed deleted by hand
        // just after the undefine this repairs, say, is made again then).
        if let Err(e) = d.create() {
            if let Err(u) = undefine(&d) {
                tracing::warn!(vm = %row.name, error = %u, "cannot undefine the domain whose restore failed to start");
            }
            return Err(VmError::libvirt(format!("starting {}", row.name), e));
        }
        hairpin(cfg, &d);
        repaired.push("domain started");
    }
    Ok(repaired)
}
