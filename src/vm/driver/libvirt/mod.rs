//! The hypervisor is libvirt: everything here speaks libvirt's object model, nothing
//! outside does. `conn.rs` the connections (one call per connection at a time),
//! `loader.rs` the client library loaded on first use, `events.rs` the domain lifecycle
//! events, `domain.rs` a VM's steps, `storage.rs` the pool and volumes, `dhcp_hosts.rs`
//! and `leases.rs` a network's host entries and leases, `stats.rs` every domain's
//! statistics in one call, `xml/` the documents written and read.

mod conn;
mod console;
mod dhcp_hosts;
mod domain;
mod events;
mod leases;
mod loader;
mod place;
mod stats;
mod storage;
use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::Bytes;
use virt::connect::Connect;
use virt::storage_vol::StorageVol;

pub use conn::{KEEPALIVE_INTERVAL_S, Libvirt, is_local_uri};
pub use loader::LoadError;
pub use place::Place;
pub use xml::XmlError;

use super::error::OrLibvirt;
use super::{
    Call, Disk, Domain, DomainEvent, Host, HostEntry, Hypervisor, Lease, LibvirtFailure, Network,
    Op, SourceStopped, VmDefinition,
};
use crate::metrics::sample::DomainSample;
use crate::model::MacAddr;

/// [`Hypervisor`] over libvirt's API (the `virt` crate).
pub struct LibvirtHypervisor {
    lv: Arc<Libvirt>,
    place: Place,
}

impl LibvirtHypervisor {
    pub fn new(lv: Arc<Libvirt>, place: Place) -> Self {
        Self { lv, place }
    }

    fn run<T>(
        &self,
        call: &Call,
        f: impl FnOnce(&Connect) -> Result<T, LibvirtFailure>,
    ) -> Result<T, LibvirtFailure> {
        self.lv.run(call, f)
    }

    fn pool(&self, conn: &Connect) -> Result<virt::storage_pool::StoragePool, LibvirtFailure> {
        storage::ensure_pool(conn, &self.place.pool, &self.place.pool_dir)
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn domains(&self, call: &Call) -> Result<Vec<(String, Domain)>, LibvirtFailure> {
        self.run(call, |conn| {
            let doms = conn
                .list_all_domains(0)
                .or_libvirt(|| Op::new("listing domains"))?;
            let mut out = Vec::with_capacity(doms.len());
            for d in doms {
                let name = d.name().or_libvirt(|| Op::new("domain name"))?;
                out.push((name, domain::observe(&d)?));
            }
            Ok(out)
        })
    }

    fn domain(&self, call: &Call, name: &str) -> Result<Option<Domain>, LibvirtFailure> {
        self.run(call, |conn| {
            domain::lookup(conn, name)?
                .as_ref()
                .map(domain::observe)
                .transpose()
        })
    }

    fn stats(&self, call: &Call) -> Result<Vec<DomainSample>, LibvirtFailure> {
        self.run(call, |conn| {
            stats::read_all(conn).or_libvirt(|| Op::new("domain statistics"))
        })
    }

    fn host(&self, call: &Call, domain_type: &str) -> Result<Host, LibvirtFailure> {
        self.run(call, |conn| {
            let caps = conn
                .capabilities()
                .or_libvirt(|| Op::new("host capabilities"))?;
            let guests = xml::guest_support(&caps).map_err(|e| {
                LibvirtFailure::failed(Op::new("host capabilities"), super::Cause::Document(e))
            })?;
            let node = conn.node_info().or_libvirt(|| Op::new("host memory"))?;
            Ok(Host {
                guests,
                memory_kib: node.memory,
                max_vcpus: conn.max_vcpus(Some(domain_type)).ok(),
            })
        })
    }

    fn subscribe(&self, events: tokio::sync::mpsc::Sender<DomainEvent>) {
        self.lv.set_on_connect(move |conn| {
            if let Err(e) = events::subscribe(conn, &events) {
                tracing::warn!(error = %e, "libvirt domain events unavailable; outside changes show at the next listing");
            }
        });
    }

    fn in_use(&self) -> bool {
        loader::is_loaded()
    }

    fn define(
        &self,
        call: &Call,
        vm: &VmDefinition,
        disk: &Disk,
        seed: Option<&[u8]>,
        autostart: bool,
    ) -> Result<(), LibvirtFailure> {
        self.run(call, |conn| {
            domain::define(conn, &self.place, vm, disk, seed, autostart)
        })
    }

    fn start(&self, call: &Call, name: &str) -> Result<Option<bool>, LibvirtFailure> {
        self.run(call, |conn| domain::start(conn, &self.place, name))
    }

    fn shutdown(&self, call: &Call, name: &str) -> Result<Option<bool>, LibvirtFailure> {
        self.run(call, |conn| domain::shutdown(conn, name))
    }

    fn destroy(&self, call: &Call, name: &str) -> Result<(), LibvirtFailure> {
        self.run(call, |conn| domain::destroy(conn, name))
    }

    fn reboot(&self, call: &Call, name: &str) -> Result<Option<bool>, LibvirtFailure> {
        self.run(call, |conn| domain::reboot(conn, name))
    }

    fn undefine(&self, call: &Call, name: &str) -> Result<bool, LibvirtFailure> {
        self.run(call, |conn| domain::remove(conn, name))
    }

    fn delete_volumes(&self, call: &Call, name: &str) -> Result<Vec<&'static str>, LibvirtFailure> {
        self.run(call, |conn| domain::delete_volumes(conn, &self.place, name))
    }

    fn put_seed(&self, call: &Call, vm: &VmDefinition, seed: &[u8]) -> Result<(), LibvirtFailure> {
        self.run(call, |conn| {
            let pool = self.pool(conn)?;
            domain::make_seed(conn, &pool, vm, seed)
        })
    }

    fn hairpin(&self, call: &Call, name: &str) -> Result<(), LibvirtFailure> {
        self.run(call, |conn| {
            if let Some(d) = domain::lookup(conn, name)?
                && d.is_active().unwrap_or(false)
            {
                domain::hairpin(&self.place, &d);
            }
            Ok(())
        })
    }

    fn console_tail(&self, call: &Call, name: &str, max: u64) -> Result<Vec<u8>, LibvirtFailure> {
        self.run(call, |conn| {
            let pool = self.pool(conn)?;
            let _ = pool.refresh(0);
            match storage::find_volume(&pool, &super::volumes::console(name))? {
                Some(v) => storage::tail(conn, &v, max),
                None => Ok(Vec::new()),
            }
        })
    }

    fn open_console(
        &self,
        call: &Call,
        name: &str,
        force: bool,
    ) -> Result<super::console::ConsoleOpen, LibvirtFailure> {
        console::open(&self.lv, call, name, force)
    }

    fn ensure_network(&self, call: &Call, name: &str) -> Result<(), LibvirtFailure> {
        self.run(call, |conn| domain::ensure_network(conn, name))
    }

    fn network(&self, call: &Call, name: &str) -> Result<Network, LibvirtFailure> {
        self.run(call, |conn| {
            let net = dhcp_hosts::network(conn, name)?;
            Ok(Network {
                subnets: dhcp_hosts::subnets(&net)?,
                leases: dhcp_hosts::current_leases(&net, None)?,
            })
        })
    }

    fn put_host_entry(
        &self,
        call: &Call,
        network: &str,
        entry: &HostEntry,
    ) -> Result<Option<Ipv4Addr>, LibvirtFailure> {
        self.run(call, |conn| dhcp_hosts::put(conn, network, entry))
    }

    fn remove_host_entry(
        &self,
        call: &Call,
        network: &str,
        mac: &MacAddr,
    ) -> Result<bool, LibvirtFailure> {
        self.run(call, |conn| {
            dhcp_hosts::remove(&dhcp_hosts::network(conn, network)?, mac)
        })
    }

    fn leases(
        &self,
        call: &Call,
        network: &str,
        mac: &MacAddr,
    ) -> Result<Vec<Lease>, LibvirtFailure> {
        self.run(call, |conn| {
            dhcp_hosts::current_leases(&dhcp_hosts::network(conn, network)?, Some(mac))
        })
    }

    fn volume(&self, call: &Call, name: &str) -> Result<Option<u64>, LibvirtFailure> {
        self.run(call, |conn| {
            let pool = self.pool(conn)?;
            // Let libvirt see the file as it is now (a finished upload's size).
            let _ = pool.refresh(0);
            storage::find_volume(&pool, name)?
                .map(|v| storage::capacity(&v))
                .transpose()
        })
    }

    fn upload_volume(
        &self,
        call: &Call,
        name: &str,
        chunks: &mut dyn Iterator<Item = Result<Bytes, SourceStopped>>,
    ) -> Result<u64, LibvirtFailure> {
        self.run(call, |conn| {
            let pool = self.pool(conn)?;
            let vol = storage::create_volume(&pool, name, &xml::volume(name, 0, "raw", None))?;
            storage::upload(conn, &vol, chunks)
        })
    }

    fn copy_volume(
        &self,
        call: &Call,
        from: &str,
        to: &str,
        capacity: u64,
        format: &str,
    ) -> Result<(), LibvirtFailure> {
        self.run(call, |conn| {
            let pool = self.pool(conn)?;
            let source = pool
                .lookup_storage_vol_by_name(from)
                .or_libvirt(|| Op::of("volume", from))?;
            let _ = storage::delete_volume(&pool, to);
            StorageVol::create_xml_from(&pool, &xml::volume(to, capacity, format, None), &source, 0)
                .or_libvirt(|| Op::of("storing image volume", to))
                .map(drop)
        })
    }

    fn delete_volume(&self, call: &Call, name: &str) -> Result<bool, LibvirtFailure> {
        self.run(call, |conn| storage::delete_volume(&self.pool(conn)?, name))
    }

    fn delete_volumes_starting(
        &self,
        call: &Call,
        prefix: &str,
    ) -> Result<Vec<String>, LibvirtFailure> {
        self.run(call, |conn| {
            // Nothing to clean where the pool was never made (and it is not made just
            // for this: an agent that never ran a VM leaves libvirt alone).
            let pool = match storage::existing_pool(conn, &self.place.pool)? {
                Some(p) if p.is_active().unwrap_or(false) => p,
                _ => return Ok(Vec::new()),
            };
            let _ = pool.refresh(0);
            let names = pool
                .list_volumes()
                .or_libvirt(|| Op::new("listing volumes"))?;
            let mut removed = Vec::new();
            for v in names.into_iter().filter(|v| v.starts_with(prefix)) {
                if storage::delete_volume(&pool, &v)? {
                    removed.push(v);
                }
            }
            Ok(removed)
        })
    }
}

#[cfg(test)]
mod tests;
mod xml;

/// What other modules' tests need of libvirt's in-process test driver (`test:///default`).
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    pub use super::loader::ensure_loaded;
    pub use super::xml::{DomainSpec, domain};
    use super::{Libvirt, LibvirtHypervisor, Place};
    use crate::vm::driver::Driver;

    /// The test driver's pool of the agent (in the driver's memory only).
    pub const POOL: &str = "nva-test-pool";

    /// The hypervisor over `test:///default`, taps treated as local (as the VM settings
    /// of the tests say: `service::tests::test_config`).
    pub fn driver() -> Driver {
        Driver::new(Arc::new(hypervisor(true)), Duration::from_secs(30))
    }

    pub fn hypervisor(local: bool) -> LibvirtHypervisor {
        let place = Place {
            pool: POOL.into(),
            pool_dir: "/nonexistent/nva-test-pool".into(),
            local,
        };
        LibvirtHypervisor::new(
            Libvirt::new("test:///default", Duration::from_secs(30)),
            place,
        )
    }
}
