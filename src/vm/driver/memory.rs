//! The hypervisor's in-memory twin, for the VM service's unit tests (no libvirt needed):
//! domains, volumes, networks with their DHCP ranges, host entries and leases, and
//! lifecycle events, behaving as libvirt does where the service relies on it (a second
//! host entry of one name or address is refused, a domain needs its network to start).
//!
//! Failures on demand: [`MemoryHypervisor::refuse`] makes one step fail with the kind
//! asked for; [`MemoryHypervisor::away`] makes every call find libvirtd gone, and
//! [`MemoryHypervisor::away_after`] from a given step on (a connection lost halfway);
//! [`MemoryHypervisor::freeze`] holds every call at its start until the returned guard
//! is dropped (libvirtd stopped with SIGSTOP: a call whose caller gave up meanwhile never
//! starts). [`MemoryHypervisor::steps`] says which steps were asked for.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::mpsc::Sender;

use super::console::ConsoleOpen;
use super::memory_console::FakeConsoles;
use super::{
    Call, Cause, DhcpHost, Disk, Domain, DomainEvent, EventKind, Host, HostEntry, Hypervisor,
    Lease, LibvirtFailure, LibvirtKind, Network, Nic, Op, SerialPort, SourceStopped, Subnet,
    VmDefinition, volumes,
};
use crate::metrics::sample::DomainSample;
use crate::model::{MacAddr, VmState};

/// One method of [`Hypervisor`], for refusals and the log of calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    Domains,
    Domain,
    Stats,
    Host,
    Define,
    Start,
    Shutdown,
    Destroy,
    Reboot,
    Undefine,
    DeleteVolumes,
    PutSeed,
    Hairpin,
    ConsoleTail,
    OpenConsole,
    EnsureNetwork,
    Network,
    PutHostEntry,
    RemoveHostEntry,
    Leases,
    Volume,
    UploadVolume,
    CopyVolume,
    DeleteVolume,
    DeleteVolumesStarting,
}

struct FakeDomain {
    domain: Domain,
    /// The guest powers off on the ACPI button.
    obeys_acpi: bool,
}

#[derive(Default)]
struct FakeNetwork {
    active: bool,
    subnets: Vec<Subnet>,
    leases: Vec<Lease>,
}

#[derive(Default)]
struct World {
    domains: BTreeMap<String, FakeDomain>,
    /// Volumes of the pool: their capacity and what was written into them.
    volumes: BTreeMap<String, (u64, Vec<u8>)>,
    networks: BTreeMap<String, FakeNetwork>,
}

#[derive(Default)]
struct Faults {
    frozen: bool,
    away: bool,
    /// libvirtd goes away once this step is done (a connection lost halfway).
    away_after: Option<Step>,
    refused: HashMap<Step, (LibvirtKind, &'static str)>,
}

/// The in-memory hypervisor.
pub struct MemoryHypervisor {
    world: Mutex<World>,
    faults: Mutex<Faults>,
    thawed: Condvar,
    events: Mutex<Option<Sender<DomainEvent>>>,
    steps: Mutex<Vec<Step>>,
    host: Host,
    consoles: FakeConsoles,
}

impl Default for MemoryHypervisor {
    fn default() -> Self {
        Self {
            world: Mutex::default(),
            faults: Mutex::default(),
            thawed: Condvar::new(),
            events: Mutex::default(),
            steps: Mutex::default(),
            consoles: FakeConsoles::default(),
            host: Host {
                guests: vec![
                    ("x86_64".into(), "kvm".into()),
                    ("x86_64".into(), "qemu".into()),
                ],
                memory_kib: 16 << 20,
                max_vcpus: Some(64),
            },
        }
    }
}

/// Held while the twin is frozen; dropping it thaws it (also when a test panics).
pub struct Frozen(Arc<MemoryHypervisor>);

impl Drop for Frozen {
    fn drop(&mut self) {
        lock(&self.0.faults).frozen = false;
        self.0.thawed.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn not_found(op: Op, what: &'static str) -> LibvirtFailure {
    LibvirtFailure::refused(op, LibvirtKind::NotFound, what)
}

impl MemoryHypervisor {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A running network `name` on `address`/24 whose DHCP range is `range`.
    pub fn add_network(&self, name: &str, address: Ipv4Addr, range: (Ipv4Addr, Ipv4Addr)) {
        let subnet = Subnet {
            address: Some(address),
            prefix: 24,
            ranges: vec![range],
            hosts: Vec::new(),
        };
        let net = FakeNetwork {
            active: true,
            subnets: vec![subnet],
            leases: Vec::new(),
        };
        lock(&self.world).networks.insert(name.to_owned(), net);
    }

    /// A DHCP host entry someone else wrote (`virsh net-update`).
    pub fn add_outside_entry(&self, network: &str, host: DhcpHost) {
        if let Some(n) = lock(&self.world).networks.get_mut(network) {
            n.subnets[0].hosts.push(host);
        }
    }

    /// Someone deletes the entry of `mac` (`virsh net-update ... delete`).
    pub fn remove_outside_entry(&self, network: &str, mac: &MacAddr) {
        if let Some(n) = lock(&self.world).networks.get_mut(network) {
            n.subnets[0].hosts.retain(|h| h.mac.as_ref() != Some(mac));
        }
    }

    /// The DHCP server leases `ip` to `mac`.
    pub fn add_lease(&self, network: &str, mac: &MacAddr, ip: Ipv4Addr) {
        if let Some(n) = lock(&self.world).networks.get_mut(network) {
            n.leases.push(Lease {
                mac: mac.clone(),
                ip: IpAddr::V4(ip),
                expiry: 1,
            });
        }
    }

    /// The network's host entries.
    pub fn host_entries(&self, network: &str) -> Vec<DhcpHost> {
        lock(&self.world)
            .networks
            .get(network)
            .map(|n| n.subnets.iter().flat_map(|s| s.hosts.clone()).collect())
            .unwrap_or_default()
    }

    /// A domain the agent did not create, stopped.
    pub fn add_foreign_domain(&self, name: &str) {
        let domain = Domain {
            active: false,
            state: VmState::Shutoff,
            uuid: uuid::Uuid::new_v4().to_string(),
            instance_id: None,
            nics: Vec::new(),
            serial: SerialPort::Pty,
        };
        let d = FakeDomain {
            domain,
            obeys_acpi: true,
        };
        lock(&self.world).domains.insert(name.to_owned(), d);
    }

    /// The domain's first serial port: `File` as an agent before the interactive
    /// console defined it.
    pub fn set_serial(&self, name: &str, serial: SerialPort) {
        if let Some(d) = lock(&self.world).domains.get_mut(name) {
            d.domain.serial = serial;
        }
    }

    pub fn serial(&self, name: &str) -> Option<SerialPort> {
        lock(&self.world).domains.get(name).map(|d| d.domain.serial)
    }

    /// Whether the domain exists (and runs).
    pub fn running(&self, name: &str) -> Option<bool> {
        lock(&self.world).domains.get(name).map(|d| d.domain.active)
    }

    /// The volumes of the pool.
    pub fn volumes(&self) -> Vec<String> {
        lock(&self.world).volumes.keys().cloned().collect()
    }

    /// A volume of `capacity` bytes, made outside the agent's steps (an image).
    pub fn add_volume(&self, name: &str, capacity: u64) {
        lock(&self.world)
            .volumes
            .insert(name.to_owned(), (capacity, Vec::new()));
    }

    /// Someone deletes volume `name` (`virsh vol-delete`).
    pub fn delete_outside(&self, name: &str) {
        lock(&self.world).volumes.remove(name);
    }

    /// What was written into volume `name`.
    pub fn volume_content(&self, name: &str) -> Option<Vec<u8>> {
        lock(&self.world).volumes.get(name).map(|v| v.1.clone())
    }

    /// Someone powers the domain off (`virsh destroy`), and libvirt says so.
    pub fn destroy_outside(&self, name: &str) {
        let stopped = lock(&self.world)
            .domains
            .get_mut(name)
            .map(|d| stop(&mut d.domain));
        if stopped == Some(true) {
            self.emit(name, EventKind::Stopped("destroyed"));
        }
    }

    /// Someone undefines the domain (`virsh undefine`), and libvirt says so.
    pub fn undefine_outside(&self, name: &str) {
        if lock(&self.world).domains.remove(name).is_some() {
            self.emit(name, EventKind::Undefined);
        }
    }

    /// The guest of `name` ignores the ACPI button (a stop must force it off).
    pub fn ignore_acpi(&self, name: &str) {
        if let Some(d) = lock(&self.world).domains.get_mut(name) {
            d.obeys_acpi = false;
        }
    }

    /// Makes `step` fail with `kind` (and `why`) until [`MemoryHypervisor::allow`].
    pub fn refuse(&self, step: Step, kind: LibvirtKind, why: &'static str) {
        lock(&self.faults).refused.insert(step, (kind, why));
    }

    pub fn allow(&self, step: Step) {
        lock(&self.faults).refused.remove(&step);
    }

    /// Every call finds libvirtd away (`true`) or back (`false`).
    pub fn away(&self, away: bool) {
        lock(&self.faults).away = away;
    }

    /// libvirtd goes away right after `step` (which succeeds): every later call finds it
    /// away until [`MemoryHypervisor::away`]`(false)`.
    pub fn away_after(&self, step: Step) {
        lock(&self.faults).away_after = Some(step);
    }

    /// Holds every call at its start until the guard is dropped.
    pub fn freeze(self: &Arc<Self>) -> Frozen {
        lock(&self.faults).frozen = true;
        Frozen(Arc::clone(self))
    }

    /// The steps asked for so far (those that started).
    pub fn steps(&self) -> Vec<Step> {
        lock(&self.steps).clone()
    }

    fn emit(&self, name: &str, kind: EventKind) {
        if matches!(kind, EventKind::Stopped(_) | EventKind::Undefined) {
            self.consoles.hang_up(name);
        }
        if let Some(tx) = lock(&self.events).as_ref() {
            let _ = tx.try_send(DomainEvent {
                domain: name.to_owned(),
                kind: Some(kind),
            });
        }
    }

    /// The start of every call: frozen, away, refused, or on.
    fn enter(
        &self,
        call: &Call,
        step: Step,
        op: Op,
    ) -> Result<MutexGuard<'_, World>, LibvirtFailure> {
        let mut faults = lock(&self.faults);
        while faults.frozen {
            faults = self.thawed.wait(faults).unwrap_or_else(|p| p.into_inner());
        }
        if call.gave_up() {
            return Err(LibvirtFailure::refused(
                op,
                LibvirtKind::Unavailable,
                "the caller gave up before the call started",
            ));
        }
        if faults.away {
            return Err(LibvirtFailure::refused(
                op,
                LibvirtKind::Unavailable,
                "libvirtd is away",
            ));
        }
        if let Some((kind, why)) = faults.refused.get(&step) {
            return Err(LibvirtFailure::refused(op, *kind, why));
        }
        if faults.away_after == Some(step) {
            faults.away = true;
            faults.away_after = None;
        }
        drop(faults);
        call.reach();
        lock(&self.steps).push(step);
        Ok(lock(&self.world))
    }
}

/// Powers a domain off; true when it ran.
fn stop(d: &mut Domain) -> bool {
    let was = d.active;
    d.active = false;
    d.state = VmState::Shutoff;
    was
}

fn network<'a>(w: &'a mut World, name: &str) -> Result<&'a mut FakeNetwork, LibvirtFailure> {
    w.networks
        .get_mut(name)
        .ok_or_else(|| not_found(Op::of("network", name), "Network not found"))
}

impl Hypervisor for MemoryHypervisor {
    fn domains(&self, call: &Call) -> Result<Vec<(String, Domain)>, LibvirtFailure> {
        let w = self.enter(call, Step::Domains, Op::new("listing domains"))?;
        Ok(w.domains
            .iter()
            .map(|(n, d)| (n.clone(), d.domain.clone()))
            .collect())
    }

    fn domain(&self, call: &Call, name: &str) -> Result<Option<Domain>, LibvirtFailure> {
        let w = self.enter(call, Step::Domain, Op::of("domain", name))?;
        Ok(w.domains.get(name).map(|d| d.domain.clone()))
    }

    fn stats(&self, call: &Call) -> Result<Vec<DomainSample>, LibvirtFailure> {
        let w = self.enter(call, Step::Stats, Op::new("domain statistics"))?;
        Ok(w.domains
            .iter()
            .map(|(n, d)| DomainSample {
                name: n.clone(),
                state: if d.domain.active { 1 } else { 5 },
                ..DomainSample::default()
            })
            .collect())
    }

    fn host(&self, call: &Call, _domain_type: &str) -> Result<Host, LibvirtFailure> {
        drop(self.enter(call, Step::Host, Op::new("host capabilities"))?);
        Ok(self.host.clone())
    }

    fn subscribe(&self, events: Sender<DomainEvent>) {
        *lock(&self.events) = Some(events);
    }

    fn in_use(&self) -> bool {
        true
    }

    fn define(
        &self,
        call: &Call,
        vm: &VmDefinition,
        disk: &Disk,
        seed: Option<&[u8]>,
        _autostart: bool,
    ) -> Result<(), LibvirtFailure> {
        let op = Op::of("defining domain", &vm.name);
        let mut w = self.enter(call, Step::Define, op.clone())?;
        if w.domains
            .get(vm.name.as_str())
            .is_some_and(|d| d.domain.uuid != vm.uuid)
        {
            return Err(LibvirtFailure::refused(
                op,
                LibvirtKind::Failed,
                "a domain of that name exists with another uuid",
            ));
        }
        if let Disk::New {
            size_bytes,
            backing,
        } = disk
        {
            if let Some(b) = backing
                && !w.volumes.contains_key(&b.volume)
            {
                return Err(not_found(
                    Op::of("volume", &b.volume),
                    "Storage volume not found",
                ));
            }
            w.volumes
                .insert(vm.disk_volume.clone(), (*size_bytes, Vec::new()));
        }
        if let Some(seed) = seed {
            w.volumes
                .insert(vm.seed_volume.clone(), (seed.len() as u64, seed.to_vec()));
        }
        let domain = Domain {
            active: false,
            state: VmState::Shutoff,
            uuid: vm.uuid.clone(),
            instance_id: Some(vm.instance_id.clone()),
            nics: vec![Nic {
                mac: vm.mac.clone(),
                network: vm.network.clone(),
            }],
            serial: SerialPort::Pty,
        };
        let d = FakeDomain {
            domain,
            obeys_acpi: true,
        };
        w.domains.insert(vm.name.to_string(), d);
        drop(w);
        self.emit(&vm.name, EventKind::Defined);
        Ok(())
    }

    fn start(&self, call: &Call, name: &str) -> Result<Option<bool>, LibvirtFailure> {
        let op = Op::of("starting", name);
        let mut w = self.enter(call, Step::Start, op.clone())?;
        let World {
            domains, networks, ..
        } = &mut *w;
        let Some(d) = domains.get_mut(name) else {
            return Ok(None);
        };
        if d.domain.active {
            return Ok(Some(true));
        }
        if let Some(nic) = d.domain.nics.first()
            && !networks.get(&nic.network).is_some_and(|n| n.active)
        {
            return Err(not_found(op, "Network not found or not running"));
        }
        d.domain.active = true;
        d.domain.state = VmState::Running;
        drop(w);
        self.emit(name, EventKind::Started);
        Ok(Some(false))
    }

    fn shutdown(&self, call: &Call, name: &str) -> Result<Option<bool>, LibvirtFailure> {
        let mut w = self.enter(call, Step::Shutdown, Op::of("shutting down", name))?;
        let Some(d) = w.domains.get_mut(name) else {
            return Ok(None);
        };
        let active = d.domain.active;
        let stopped = active && d.obeys_acpi && stop(&mut d.domain);
        drop(w);
        if stopped {
            self.emit(name, EventKind::Stopped("shutdown"));
        }
        Ok(Some(active))
    }

    fn destroy(&self, call: &Call, name: &str) -> Result<(), LibvirtFailure> {
        let mut w = self.enter(call, Step::Destroy, Op::of("forcing off", name))?;
        let stopped = w.domains.get_mut(name).is_some_and(|d| stop(&mut d.domain));
        drop(w);
        if stopped {
            self.emit(name, EventKind::Stopped("destroyed"));
        }
        Ok(())
    }

    fn reboot(&self, call: &Call, name: &str) -> Result<Option<bool>, LibvirtFailure> {
        let w = self.enter(call, Step::Reboot, Op::of("rebooting", name))?;
        Ok(w.domains.get(name).map(|d| d.domain.active))
    }

    fn undefine(&self, call: &Call, name: &str) -> Result<bool, LibvirtFailure> {
        let mut w = self.enter(call, Step::Undefine, Op::of("undefining", name))?;
        let gone = w.domains.remove(name);
        drop(w);
        if let Some(d) = &gone {
            if d.domain.active {
                self.emit(name, EventKind::Stopped("destroyed"));
            }
            self.emit(name, EventKind::Undefined);
        }
        Ok(gone.is_some())
    }

    fn delete_volumes(&self, call: &Call, name: &str) -> Result<Vec<&'static str>, LibvirtFailure> {
        let mut w = self.enter(
            call,
            Step::DeleteVolumes,
            Op::of("deleting volumes of", name),
        )?;
        let mut deleted = Vec::new();
        for (what, v) in [
            ("disk", volumes::disk(name)),
            ("seed", volumes::seed(name)),
            ("console log", volumes::console(name)),
        ] {
            if w.volumes.remove(&v).is_some() {
                deleted.push(what);
            }
        }
        Ok(deleted)
    }

    fn put_seed(&self, call: &Call, vm: &VmDefinition, seed: &[u8]) -> Result<(), LibvirtFailure> {
        let mut w = self.enter(
            call,
            Step::PutSeed,
            Op::of("creating volume", &vm.seed_volume),
        )?;
        w.volumes
            .insert(vm.seed_volume.clone(), (seed.len() as u64, seed.to_vec()));
        Ok(())
    }

    fn hairpin(&self, call: &Call, name: &str) -> Result<(), LibvirtFailure> {
        drop(self.enter(call, Step::Hairpin, Op::of("hairpin of", name))?);
        Ok(())
    }

    fn console_tail(&self, call: &Call, name: &str, max: u64) -> Result<Vec<u8>, LibvirtFailure> {
        let w = self.enter(call, Step::ConsoleTail, Op::new("downloading"))?;
        let log = w
            .volumes
            .get(&volumes::console(name))
            .map(|v| v.1.clone())
            .unwrap_or_default();
        let from = log
            .len()
            .saturating_sub(usize::try_from(max).unwrap_or(usize::MAX));
        Ok(log[from..].to_vec())
    }

    fn open_console(
        &self,
        call: &Call,
        name: &str,
        force: bool,
    ) -> Result<ConsoleOpen, LibvirtFailure> {
        let w = self.enter(
            call,
            Step::OpenConsole,
            Op::of("opening the console of", name),
        )?;
        match w.domains.get(name) {
            None => return Ok(ConsoleOpen::NoDomain),
            Some(d) if !d.domain.active => return Ok(ConsoleOpen::NotRunning),
            Some(_) => {}
        }
        drop(w);
        Ok(self.consoles.open(name, force))
    }

    fn ensure_network(&self, call: &Call, name: &str) -> Result<(), LibvirtFailure> {
        let mut w = self.enter(call, Step::EnsureNetwork, Op::of("network", name))?;
        network(&mut w, name)?.active = true;
        Ok(())
    }

    fn network(&self, call: &Call, name: &str) -> Result<Network, LibvirtFailure> {
        let mut w = self.enter(call, Step::Network, Op::of("network", name))?;
        let n = network(&mut w, name)?;
        Ok(Network {
            subnets: n.subnets.clone(),
            leases: n.leases.clone(),
        })
    }

    fn put_host_entry(
        &self,
        call: &Call,
        network_name: &str,
        entry: &HostEntry,
    ) -> Result<Option<Ipv4Addr>, LibvirtFailure> {
        let op = Op::of("adding DHCP host entry", &entry.name);
        let mut w = self.enter(call, Step::PutHostEntry, op.clone())?;
        let hosts = &mut network(&mut w, network_name)?.subnets[0].hosts;
        let clash = hosts.iter().any(|h| {
            h.mac.as_ref() != Some(&entry.mac)
                && (h.name.as_deref() == Some(entry.name.as_str()) || h.ip == Some(entry.ip))
        });
        if clash {
            return Err(LibvirtFailure::refused(
                op,
                LibvirtKind::Conflict,
                "there is an existing dhcp host entry in the network that matches",
            ));
        }
        let previous = hosts.iter().find(|h| h.mac.as_ref() == Some(&entry.mac));
        let was = previous.and_then(|h| h.ip);
        hosts.retain(|h| h.mac.as_ref() != Some(&entry.mac));
        hosts.push(DhcpHost {
            mac: Some(entry.mac.clone()),
            name: Some(entry.name.to_string()),
            ip: Some(entry.ip),
        });
        Ok(was)
    }

    fn remove_host_entry(
        &self,
        call: &Call,
        network_name: &str,
        mac: &MacAddr,
    ) -> Result<bool, LibvirtFailure> {
        let op = Op::of("deleting DHCP host entry of", mac);
        let mut w = self.enter(call, Step::RemoveHostEntry, op)?;
        let hosts = &mut network(&mut w, network_name)?.subnets[0].hosts;
        let before = hosts.len();
        hosts.retain(|h| h.mac.as_ref() != Some(mac));
        Ok(hosts.len() != before)
    }

    fn leases(
        &self,
        call: &Call,
        network_name: &str,
        mac: &MacAddr,
    ) -> Result<Vec<Lease>, LibvirtFailure> {
        let mut w = self.enter(call, Step::Leases, Op::new("reading DHCP leases"))?;
        let n = network(&mut w, network_name)?;
        Ok(n.leases.iter().filter(|l| &l.mac == mac).cloned().collect())
    }

    fn volume(&self, call: &Call, name: &str) -> Result<Option<u64>, LibvirtFailure> {
        let w = self.enter(call, Step::Volume, Op::of("volume", name))?;
        Ok(w.volumes.get(name).map(|v| v.0))
    }

    fn upload_volume(
        &self,
        call: &Call,
        name: &str,
        chunks: &mut dyn Iterator<Item = Result<Bytes, SourceStopped>>,
    ) -> Result<u64, LibvirtFailure> {
        let op = Op::of("creating volume", name);
        drop(self.enter(call, Step::UploadVolume, op)?);
        let mut content = Vec::new();
        let mut outcome = Ok(());
        for chunk in chunks {
            match chunk {
                Ok(c) => content.extend_from_slice(&c),
                Err(SourceStopped) => {
                    outcome = Err(LibvirtFailure::failed(
                        Op::new("uploading"),
                        Cause::SourceStopped,
                    ));
                    break;
                }
            }
        }
        let size = content.len() as u64;
        lock(&self.world)
            .volumes
            .insert(name.to_owned(), (size, content));
        outcome.map(|()| size)
    }

    fn copy_volume(
        &self,
        call: &Call,
        from: &str,
        to: &str,
        capacity: u64,
        _format: &str,
    ) -> Result<(), LibvirtFailure> {
        let mut w = self.enter(call, Step::CopyVolume, Op::of("storing image volume", to))?;
        let Some((_, content)) = w.volumes.get(from).cloned() else {
            return Err(not_found(
                Op::of("volume", from),
                "Storage volume not found",
            ));
        };
        w.volumes.insert(to.to_owned(), (capacity, content));
        Ok(())
    }

    fn delete_volume(&self, call: &Call, name: &str) -> Result<bool, LibvirtFailure> {
        let mut w = self.enter(call, Step::DeleteVolume, Op::of("deleting volume", name))?;
        Ok(w.volumes.remove(name).is_some())
    }

    fn delete_volumes_starting(
        &self,
        call: &Call,
        prefix: &str,
    ) -> Result<Vec<String>, LibvirtFailure> {
        let mut w = self.enter(
            call,
            Step::DeleteVolumesStarting,
            Op::new("listing volumes"),
        )?;
        let gone: Vec<String> = w
            .volumes
            .keys()
            .filter(|v| v.starts_with(prefix))
            .cloned()
            .collect();
        for v in &gone {
            w.volumes.remove(v);
        }
        Ok(gone)
    }
}
