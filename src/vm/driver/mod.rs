//! The hypervisor behind a trait, the way `portmap::Firewall` is for nftables: the VM
//! service and the images ask it for what they need in the domain's terms (define a VM,
//! start it, reserve an address entry, observe, statistics) and never see libvirt's
//! object model. `libvirt/` is the implementation (the connections, the client library
//! loaded on first use, events, storage, DHCP host entries, the domain and network XML);
//! `memory.rs` (tests) its in-memory twin, with failures on demand.
//!
//! The methods are blocking: they run off the async runtime, on a blocking thread, through
//! [`Driver`], which bounds the caller's wait ([`Driver::ask`]) or waits for the real
//! answer ([`Driver::work`]). Each method gets the [`Call`] it is part of: a method whose
//! caller gave up before it got libvirt's ear never starts (a create the client was told
//! failed must not be made later).

pub mod console;
pub mod error;
pub mod libvirt;
#[cfg(test)]
pub mod memory;
#[cfg(test)]
pub mod memory_console;
pub mod volumes;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use error::{Cause, LibvirtFailure, LibvirtKind, Op};

use crate::metrics::sample::DomainSample;
use crate::model::{MacAddr, VmName, VmState};

/// What the VM service and the images need of a hypervisor.
pub trait Hypervisor: Send + Sync + 'static {
    // What there is.

    /// Every domain, as it is now.
    fn domains(&self, call: &Call) -> Result<Vec<(String, Domain)>, LibvirtFailure>;
    /// One domain as it is now; `None` when there is no such domain.
    fn domain(&self, call: &Call, name: &str) -> Result<Option<Domain>, LibvirtFailure>;
    /// Every domain's statistics, in one call.
    fn stats(&self, call: &Call) -> Result<Vec<DomainSample>, LibvirtFailure>;
    /// What the host can run: its guests, its memory, the vCPUs a `domain_type` may have.
    fn host(&self, call: &Call, domain_type: &str) -> Result<Host, LibvirtFailure>;
    /// Sends each domain's lifecycle events (outside changes too) to `events`, from the
    /// next connection on.
    fn subscribe(&self, events: tokio::sync::mpsc::Sender<DomainEvent>);
    /// Whether the hypervisor has been used in this run (a port-map-only node never loads
    /// libvirt, and its scrapes do not ask for it).
    fn in_use(&self) -> bool;

    // A VM's life.

    /// Makes `vm` exist, stopped: its disk (`disk`), its seed volume (when `seed` is
    /// given; else the one there is kept) and its definition, set to start with the host
    /// when `autostart`. On failure, what it made is removed again.
    fn define(
        &self,
        call: &Call,
        vm: &VmDefinition,
        disk: &Disk,
        seed: Option<&[u8]>,
        autostart: bool,
    ) -> Result<(), LibvirtFailure>;
    /// Starts the domain: `Some(true)` when it was running already, `None` when there is
    /// no such domain.
    fn start(&self, call: &Call, name: &str) -> Result<Option<bool>, LibvirtFailure>;
    /// Asks the guest to power off (ACPI): `Some(was running)`, `None` without a domain.
    fn shutdown(&self, call: &Call, name: &str) -> Result<Option<bool>, LibvirtFailure>;
    /// Powers the domain off at once, if there is one and it runs.
    fn destroy(&self, call: &Call, name: &str) -> Result<(), LibvirtFailure>;
    /// Reboots a running domain (ACPI): `Some(false)` when it is not running, `None`
    /// without a domain.
    fn reboot(&self, call: &Call, name: &str) -> Result<Option<bool>, LibvirtFailure>;
    /// Stops and undefines the domain (volumes stay); false when there was none.
    fn undefine(&self, call: &Call, name: &str) -> Result<bool, LibvirtFailure>;
    /// Deletes VM `name`'s volumes (disk, seed, console log); says which were there.
    fn delete_volumes(&self, call: &Call, name: &str) -> Result<Vec<&'static str>, LibvirtFailure>;
    /// Writes the seed volume of `vm` anew.
    fn put_seed(&self, call: &Call, vm: &VmDefinition, seed: &[u8]) -> Result<(), LibvirtFailure>;
    /// Turns hairpin mode on for a running domain's taps where they are bridge ports of
    /// this host (a local libvirt); a domain started by someone else needs it again.
    fn hairpin(&self, call: &Call, name: &str) -> Result<(), LibvirtFailure>;
    /// The last `max` bytes of VM `name`'s serial console log.
    fn console_tail(&self, call: &Call, name: &str, max: u64) -> Result<Vec<u8>, LibvirtFailure>;

    /// Opens an interactive session on the domain's first serial port; `force` takes it
    /// from another client of the hypervisor.
    fn open_console(
        &self,
        call: &Call,
        name: &str,
        force: bool,
    ) -> Result<console::ConsoleOpen, LibvirtFailure>;

    // Networks and the VMs' addresses.

    /// Starts the network (and sets it to autostart) unless it runs.
    fn ensure_network(&self, call: &Call, name: &str) -> Result<(), LibvirtFailure>;
    /// The network's IPv4 subnets (ranges, host entries) and its current leases.
    fn network(&self, call: &Call, name: &str) -> Result<Network, LibvirtFailure>;
    /// Writes `entry`, replacing the entry of its MAC if there is one; returns that
    /// entry's address. If the write fails, the old entry is put back.
    fn put_host_entry(
        &self,
        call: &Call,
        network: &str,
        entry: &HostEntry,
    ) -> Result<Option<Ipv4Addr>, LibvirtFailure>;
    /// Removes the entry of `mac`; false when there was none.
    fn remove_host_entry(
        &self,
        call: &Call,
        network: &str,
        mac: &MacAddr,
    ) -> Result<bool, LibvirtFailure>;
    /// The network's current leases of `mac`.
    fn leases(
        &self,
        call: &Call,
        network: &str,
        mac: &MacAddr,
    ) -> Result<Vec<Lease>, LibvirtFailure>;

    // Volumes of the agent's pool (base images).

    /// A volume's size, or `None` when there is no such volume.
    fn volume(&self, call: &Call, name: &str) -> Result<Option<u64>, LibvirtFailure>;
    /// A new raw volume `name` holding `chunks`, in order; returns the bytes written. A
    /// chunk that is `Err` stops the upload: the volume is left for the caller to delete.
    fn upload_volume(
        &self,
        call: &Call,
        name: &str,
        chunks: &mut dyn Iterator<Item = Result<Bytes, SourceStopped>>,
    ) -> Result<u64, LibvirtFailure>;
    /// Copies volume `from` into a new volume `to` (replacing one of that name) of
    /// `capacity` bytes in `format`: libvirt cannot rename.
    fn copy_volume(
        &self,
        call: &Call,
        from: &str,
        to: &str,
        capacity: u64,
        format: &str,
    ) -> Result<(), LibvirtFailure>;
    /// Deletes volume `name`; false when there was none.
    fn delete_volume(&self, call: &Call, name: &str) -> Result<bool, LibvirtFailure>;
    /// Deletes every volume whose name starts with `prefix`; nothing (and no pool made)
    /// where the pool was never made. Returns their names.
    fn delete_volumes_starting(
        &self,
        call: &Call,
        prefix: &str,
    ) -> Result<Vec<String>, LibvirtFailure>;
}

/// The source of an upload stopped (it knows why).
#[derive(Debug)]
pub struct SourceStopped;

/// One domain as the hypervisor shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub active: bool,
    pub state: VmState,
    pub uuid: String,
    /// The instance-id in the agent's metadata; `None`: not a domain of the agent's.
    pub instance_id: Option<String>,
    pub nics: Vec<Nic>,
    /// The first serial port, as the domain is defined now (live while it runs).
    pub serial: SerialPort,
}

/// What a domain's first serial port is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SerialPort {
    /// A pty: an interactive console can attach (as the agent defines VMs).
    Pty,
    /// A plain file, as the agent defined VMs before the interactive console: libvirt
    /// refuses a console on it, and the agent defines the VM again before it starts.
    File,
    /// Another kind, or none.
    #[default]
    Other,
}

/// A network interface of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    pub mac: MacAddr,
    pub network: String,
}

/// What the hypervisor's host can run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// `(arch, domain type)` of every hvm guest it offers.
    pub guests: Vec<(String, String)>,
    pub memory_kib: u64,
    /// The most vCPUs a domain of the type asked about may have (`None`: not said).
    pub max_vcpus: Option<u32>,
}

/// A VM as the hypervisor is to hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDefinition {
    pub name: VmName,
    pub uuid: String,
    /// Written into the agent's metadata element, which marks the domain as the agent's.
    pub instance_id: String,
    /// `kvm` or `qemu` (VMS_DOMAIN_TYPE).
    pub domain_type: String,
    pub arch: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub network: String,
    pub mac: MacAddr,
    pub disk_volume: String,
    pub seed_volume: String,
    /// Direct kernel boot: paths the hypervisor's host can read.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

/// The disk [`Hypervisor::define`] gives the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disk {
    /// The VM's disk volume is there: it is the VM's data, kept.
    Keep,
    /// A new qcow2 disk of `size_bytes`, backed by a base image's volume (or blank).
    New {
        size_bytes: u64,
        backing: Option<Backing>,
    },
}

/// A base image's volume under a new disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    pub volume: String,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// A network's IPv4 subnets and current leases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Network {
    pub subnets: Vec<Subnet>,
    pub leases: Vec<Lease>,
}

/// One IPv4 `<ip>` element of a network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subnet {
    /// The host's own address on the network (the gateway the guests see).
    pub address: Option<Ipv4Addr>,
    pub prefix: u8,
    /// `<dhcp><range start end/>`, inclusive.
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// `<dhcp><host/>`: the reservations, as the network shows them.
    pub hosts: Vec<DhcpHost>,
}

/// One `<dhcp><host mac name ip/>` entry as a network shows it (any attribute may be
/// missing: others than the agent write entries too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: Option<MacAddr>,
    pub name: Option<String>,
    pub ip: Option<Ipv4Addr>,
}

/// The entry the agent writes for one VM: its MAC gets `ip` on every lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEntry {
    pub mac: MacAddr,
    pub name: VmName,
    pub ip: Ipv4Addr,
}

/// A DHCP lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub mac: MacAddr,
    pub ip: IpAddr,
    /// Seconds since the epoch.
    pub expiry: i64,
}

/// The IPv4 address leased to `mac`, the newest lease when there are several.
pub fn ipv4_of(leases: &[Lease], mac: &MacAddr) -> Option<Ipv4Addr> {
    leases
        .iter()
        .filter(|l| &l.mac == mac)
        .filter_map(|l| match l.ip {
            IpAddr::V4(ip) => Some((l.expiry, ip)),
            IpAddr::V6(_) => None,
        })
        .max_by_key(|(expiry, _)| *expiry)
        .map(|(_, ip)| ip)
}

/// A domain's lifecycle event (the agent's own changes and outside ones alike).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainEvent {
    pub domain: String,
    /// `None` for an event libvirt added after the agent was written.
    pub kind: Option<EventKind>,
}

/// What happened to a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    /// With why, in libvirt's words (`shutdown`, `destroyed`, `crashed`, ...).
    Stopped(&'static str),
    Shutdown,
    PmSuspended,
    Crashed,
}

impl DomainEvent {
    /// Whether the event may leave an agent's VM in need of a repair (its domain gone,
    /// stopped or crashed), so the VM reconcile should run now.
    pub fn may_need_repair(&self) -> bool {
        matches!(
            self.kind,
            Some(EventKind::Undefined | EventKind::Stopped(_) | EventKind::Crashed)
        )
    }
}

/// One request's use of the hypervisor, handed to every method it calls: until when it
/// waits for a connection, whether its caller gave up, and whether any of its methods got
/// libvirt's ear (an abandoned create that never did made nothing).
pub struct Call {
    deadline: Option<Instant>,
    gave_up: Arc<AtomicBool>,
    reached: Arc<AtomicBool>,
}

impl Call {
    /// A call whose caller waits until `deadline` (`None`: for the real answer).
    pub fn new(deadline: Option<Instant>) -> Call {
        Call {
            deadline,
            gave_up: Arc::default(),
            reached: Arc::default(),
        }
    }

    /// Until when a method may wait for a connection.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the caller stopped waiting: a method that has not started must not.
    pub fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::Acquire)
    }

    /// Said by a method once it is about to ask libvirt for something.
    pub fn reach(&self) {
        self.reached.store(true, Ordering::Release);
    }

    /// Whether any method of the call asked libvirt for something; readable after the
    /// call moved to its thread.
    pub fn reached_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.reached)
    }
}

/// Sets its call's `gave_up` when dropped: the caller stopped waiting (timed out, or its
/// request went away). Work that has not started by then never starts.
struct GiveUpOnDrop(Arc<AtomicBool>);

impl Drop for GiveUpOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The hypervisor as the service uses it: each piece of work on a blocking thread, the
/// caller's wait bounded by LIBVIRT_TIMEOUT or not.
#[derive(Clone)]
pub struct Driver {
    hv: Arc<dyn Hypervisor>,
    timeout: Duration,
}

impl Driver {
    pub fn new(hv: Arc<dyn Hypervisor>, timeout: Duration) -> Driver {
        Driver { hv, timeout }
    }

    /// LIBVIRT_TIMEOUT: how long a caller waits for an answer ([`Driver::ask`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn hypervisor(&self) -> &dyn Hypervisor {
        &*self.hv
    }

    /// Runs `f` and waits for it at most LIBVIRT_TIMEOUT: after that the caller is told
    /// libvirt is unavailable at once, and what `f` has not started by then never starts;
    /// what it had started finishes on its own thread.
    pub async fn ask<T, E>(
        &self,
        f: impl FnOnce(&dyn Hypervisor, &Call) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<LibvirtFailure> + Send + 'static,
    {
        let hv = Arc::clone(&self.hv);
        bounded(self.timeout, move |call| f(&*hv, call)).await
    }

    /// Runs `f` and waits for libvirt's real answer however long it takes (the caller
    /// bounds its own wait, as `Vms::to_the_end` does).
    pub async fn work<T, E>(
        &self,
        f: impl FnOnce(&dyn Hypervisor, &Call) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<LibvirtFailure> + Send + 'static,
    {
        self.work_as(Call::new(None), f).await
    }

    /// [`Driver::work`] as part of `call` (whose flags the caller keeps).
    pub async fn work_as<T, E>(
        &self,
        call: Call,
        f: impl FnOnce(&dyn Hypervisor, &Call) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<LibvirtFailure> + Send + 'static,
    {
        let hv = Arc::clone(&self.hv);
        unbounded(call, move |call| f(&*hv, call)).await
    }
}

/// Runs `f` on a blocking thread as a call its caller waits for at most `timeout`.
pub(crate) async fn bounded<T, E>(
    timeout: Duration,
    f: impl FnOnce(&Call) -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<LibvirtFailure> + Send + 'static,
{
    let call = Call::new(Some(Instant::now() + timeout));
    // Set when this future ends, however it ends (timed out, dropped with its request,
    // or done, when it no longer matters).
    let _give_up = GiveUpOnDrop(Arc::clone(&call.gave_up));
    let task = tokio::task::spawn_blocking(move || f(&call));
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(LibvirtFailure::task(join).into()),
        Err(_) => Err(LibvirtFailure::unavailable(Cause::NoAnswer(timeout)).into()),
    }
}

/// Runs `f` on a blocking thread as `call`, waiting for its end.
pub(crate) async fn unbounded<T, E>(
    call: Call,
    f: impl FnOnce(&Call) -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<LibvirtFailure> + Send + 'static,
{
    let _give_up = GiveUpOnDrop(Arc::clone(&call.gave_up));
    tokio::task::spawn_blocking(move || f(&call))
        .await
        .map_err(LibvirtFailure::task)?
}
