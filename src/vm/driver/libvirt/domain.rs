//! The blocking libvirt side of a VM's life: what each step does to libvirt (volumes,
//! domain XML, define, start, undefine). Called by `LibvirtHypervisor` on a connection of
//! its own, never on the async runtime.

use std::time::Instant;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::sys;

use super::place::Place;
use super::{storage, xml};
use crate::model::{IfaceName, VmState};
use crate::vm::driver::error::OrLibvirt;
use crate::vm::driver::{
    self, Backing, Cause, Disk, LibvirtFailure, Nic, Op, SerialPort, VmDefinition, volumes,
};

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

pub fn lookup(conn: &Connect, name: &str) -> Result<Option<Domain>, LibvirtFailure> {
    match conn
        .lookup_domain_by_name(name)
        .or_libvirt(|| Op::of("domain", name))
    {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_active(dom: &Domain) -> Result<bool, LibvirtFailure> {
    dom.is_active().or_libvirt(|| Op::new("domain state"))
}

pub fn facts(dom: &Domain) -> Result<xml::DomainFacts, LibvirtFailure> {
    let text = dom.xml_desc(0).or_libvirt(|| Op::new("domain XML"))?;
    xml::parse_domain(&text)
        .map_err(|e| LibvirtFailure::failed(Op::new("domain XML"), Cause::Document(e)))
}

/// The domain as the driver describes it. A document it cannot read leaves the facts
/// out (the state is still worth showing).
pub fn observe(dom: &Domain) -> Result<driver::Domain, LibvirtFailure> {
    let info = dom.info().or_libvirt(|| Op::new("domain state"))?;
    let active = is_active(dom)?;
    let facts = facts(dom).unwrap_or_default();
    let nics = facts
        .interfaces
        .into_iter()
        .filter_map(|(mac, network)| {
            Some(Nic {
                mac: mac.parse().ok()?,
                network,
            })
        })
        .collect();
    let serial = match facts.serial_type.as_deref() {
        Some("pty") => SerialPort::Pty,
        Some("file") => SerialPort::File,
        _ => SerialPort::Other,
    };
    Ok(driver::Domain {
        active,
        state: vm_state(info.state.to_raw()),
        uuid: facts.uuid,
        instance_id: facts.instance_id,
        nics,
        serial,
    })
}

/// Hairpin mode on the running domain's taps, where they are bridge ports in the
/// agent's own namespace (a local libvirt); elsewhere nothing to do.
pub fn hairpin(place: &Place, dom: &Domain) {
    if !place.local {
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

/// The network, started and set to autostart if it was not (as the original did).
pub fn ensure_network(conn: &Connect, name: &str) -> Result<(), LibvirtFailure> {
    let net = super::dhcp_hosts::network(conn, name)?;
    if !net.is_active().or_libvirt(|| Op::new("network state"))? {
        tracing::info!(network = name, "starting inactive network");
        net.create()
            .or_libvirt(|| Op::of("starting network", name))?;
    }
    if !net.autostart().unwrap_or(true) {
        let _ = net.set_autostart(true);
    }
    Ok(())
}

fn domain_xml(place: &Place, vm: &VmDefinition) -> String {
    let console = format!(
        "{}/{}",
        place.pool_dir.trim_end_matches('/'),
        volumes::console(&vm.name)
    );
    xml::domain(&xml::DomainSpec {
        name: &vm.name,
        uuid: &vm.uuid,
        domain_type: &vm.domain_type,
        memory_mib: u64::from(vm.memory_mib),
        vcpus: vm.vcpus,
        arch: &vm.arch,
        pool: &place.pool,
        disk_volume: &vm.disk_volume,
        seed_volume: &vm.seed_volume,
        network: &vm.network,
        mac: &vm.mac,
        console_log: Some(&console),
        kernel: vm.kernel.as_deref(),
        initrd: vm.initrd.as_deref(),
        cmdline: vm.cmdline.as_deref(),
        instance_id: &vm.instance_id,
    })
}

/// Creates the seed volume and uploads `seed` into it through a libvirt stream; removes
/// the volume again if the upload fails.
pub fn make_seed(
    conn: &Connect,
    pool: &StoragePool,
    vm: &VmDefinition,
    seed: &[u8],
) -> Result<(), LibvirtFailure> {
    let seed_xml = xml::volume(&vm.seed_volume, seed.len() as u64, "raw", None);
    let vol = storage::create_volume(pool, &vm.seed_volume, &seed_xml)?;
    let mut once = std::iter::once(Ok(bytes::Bytes::copy_from_slice(seed)));
    if let Err(e) = storage::upload(conn, &vol, &mut once) {
        let _ = storage::delete_volume(pool, &vm.seed_volume);
        return Err(e);
    }
    Ok(())
}

/// A new disk for `vm`: `size_bytes`, backed by `backing`'s volume when given.
fn make_disk(
    pool: &StoragePool,
    vm: &VmDefinition,
    size_bytes: u64,
    backing: Option<&Backing>,
) -> Result<(), LibvirtFailure> {
    let backing_path = match backing {
        Some(b) => {
            let vol = pool
                .lookup_storage_vol_by_name(&b.volume)
                .or_libvirt(|| Op::of("volume", &b.volume))?;
            Some((storage::volume_path(&vol)?, b.format.as_str()))
        }
        None => None,
    };
    let disk_xml = xml::volume(
        &vm.disk_volume,
        size_bytes,
        "qcow2",
        backing_path.as_ref().map(|(p, f)| (p.as_str(), *f)),
    );
    storage::create_volume(pool, &vm.disk_volume, &disk_xml).map(drop)
}

/// [`driver::Hypervisor::define`]: the disk and seed asked for, then the domain; what it
/// made is removed again when a later step fails.
pub fn define(
    conn: &Connect,
    place: &Place,
    vm: &VmDefinition,
    disk: &Disk,
    seed: Option<&[u8]>,
    autostart: bool,
) -> Result<(), LibvirtFailure> {
    let pool = storage::ensure_pool(conn, &place.pool, &place.pool_dir)?;
    let mut made: Vec<&str> = Vec::new();
    let result = (|| {
        let t = Instant::now();
        if let Disk::New {
            size_bytes,
            backing,
        } = disk
        {
            make_disk(&pool, vm, *size_bytes, backing.as_ref())?;
            made.push(&vm.disk_volume);
        }
        let disk_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        if let Some(seed) = seed {
            make_seed(conn, &pool, vm, seed)?;
            made.push(&vm.seed_volume);
        }
        let seed_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        let dom = conn
            .define_domain_xml(&domain_xml(place, vm))
            .or_libvirt(|| Op::of("defining domain", &vm.name))?;
        let define_ms = t.elapsed().as_secs_f64() * 1000.0;
        if let Err(e) = dom.set_autostart(autostart) {
            let _ = undefine(&dom);
            return Err(LibvirtFailure::libvirt(Op::new("domain autostart"), e));
        }
        tracing::debug!(disk_ms, seed_ms, define_ms, "VM define steps");
        Ok(())
    })();
    if result.is_err() {
        for v in made {
            let _ = storage::delete_volume(&pool, v);
        }
    }
    result
}

/// Starts the domain unless it runs; `None` without one.
pub fn start(conn: &Connect, place: &Place, name: &str) -> Result<Option<bool>, LibvirtFailure> {
    let Some(dom) = lookup(conn, name)? else {
        return Ok(None);
    };
    if is_active(&dom)? {
        return Ok(Some(true));
    }
    // libvirt launching QEMU: the one step whose time is libvirt's alone.
    let t = Instant::now();
    dom.create().or_libvirt(|| Op::of("starting", name))?;
    tracing::debug!(start_ms = t.elapsed().as_secs_f64() * 1000.0, "VM start");
    hairpin(place, &dom);
    Ok(Some(false))
}

/// ACPI shutdown of a running domain; `Some(was running)`.
pub fn shutdown(conn: &Connect, name: &str) -> Result<Option<bool>, LibvirtFailure> {
    let Some(dom) = lookup(conn, name)? else {
        return Ok(None);
    };
    let active = is_active(&dom)?;
    if active {
        dom.shutdown()
            .or_libvirt(|| Op::of("shutting down", name))?;
    }
    Ok(Some(active))
}

/// Powers a running domain off.
pub fn destroy(conn: &Connect, name: &str) -> Result<(), LibvirtFailure> {
    if let Some(dom) = lookup(conn, name)?
        && dom.is_active().unwrap_or(false)
    {
        dom.destroy().or_libvirt(|| Op::of("forcing off", name))?;
    }
    Ok(())
}

/// ACPI reboot of a running domain; `Some(false)` when it does not run.
pub fn reboot(conn: &Connect, name: &str) -> Result<Option<bool>, LibvirtFailure> {
    let Some(dom) = lookup(conn, name)? else {
        return Ok(None);
    };
    if !is_active(&dom)? {
        return Ok(Some(false));
    }
    dom.reboot(0).or_libvirt(|| Op::of("rebooting", name))?;
    Ok(Some(true))
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

/// Stops and undefines the domain; false when there was none.
pub fn remove(conn: &Connect, name: &str) -> Result<bool, LibvirtFailure> {
    let Some(dom) = lookup(conn, name)? else {
        return Ok(false);
    };
    if dom.is_active().unwrap_or(false) {
        dom.destroy().or_libvirt(|| Op::of("stopping", name))?;
    }
    undefine(&dom).or_libvirt(|| Op::of("undefining", name))?;
    Ok(true)
}

/// Deletes VM `name`'s volumes; says which were there.
pub fn delete_volumes(
    conn: &Connect,
    place: &Place,
    name: &str,
) -> Result<Vec<&'static str>, LibvirtFailure> {
    let pool = storage::ensure_pool(conn, &place.pool, &place.pool_dir)?;
    // The console log only shows up as a volume after a refresh.
    let _ = pool.refresh(0);
    let mut deleted = Vec::new();
    for (what, v) in [
        ("disk", volumes::disk(name)),
        ("seed", volumes::seed(name)),
        ("console log", volumes::console(name)),
    ] {
        if storage::delete_volume(&pool, &v)? {
            deleted.push(what);
        }
    }
    let parts = pool
        .list_volumes()
        .or_libvirt(|| Op::new("listing volumes"))?;
    let mut rolled = false;
    for v in parts.iter().filter(|v| volumes::is_console_part(name, v)) {
        rolled |= storage::delete_volume(&pool, v)?;
    }
    if rolled {
        deleted.push("console log's older parts");
    }
    Ok(deleted)
}
