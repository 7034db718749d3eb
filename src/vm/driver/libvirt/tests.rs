//! The libvirt hypervisor against libvirt's in-process test driver (`test:///default`,
//! whose state every connection of this process shares: names are unique per test).
//! What is proved here is libvirt's own behaviour as the driver meets it: its error
//! numbers, its host entries, what its test driver cannot do.

use std::net::Ipv4Addr;

use virt::connect::Connect;
use virt::error::ErrorNumber;

use super::testing::hypervisor;
use super::{LibvirtHypervisor, loader};
use crate::model::MacAddr;
use crate::vm::VmError;
use crate::vm::driver::{
    Call, DhcpHost, Disk, HostEntry, Hypervisor, LibvirtFailure, LibvirtKind, Op, VmDefinition,
    volumes,
};

fn call() -> Call {
    Call::new(None)
}

fn test_conn() -> Connect {
    loader::ensure_loaded().unwrap();
    Connect::open(Some("test:///default")).unwrap()
}

/// Defines and starts network `name` on 10.79.`third`.0/24 with DHCP range .2-.9.
fn network(name: &str, third: u8) {
    let doc = format!(
        "<network><name>{name}</name><bridge name='vbr-{name}'/>\
         <ip address='10.79.{third}.1' netmask='255.255.255.0'><dhcp>\
         <range start='10.79.{third}.2' end='10.79.{third}.9'/></dhcp></ip></network>"
    );
    let net = test_conn().define_network_xml(&doc).unwrap();
    net.create().unwrap();
}

fn entry(name: &str, mac: MacAddr, third: u8, last: u8) -> HostEntry {
    HostEntry {
        mac,
        name: name.parse().unwrap(),
        ip: Ipv4Addr::new(10, 79, third, last),
    }
}

#[test]
fn a_libvirt_failure_keeps_libvirts_number_and_the_operation_and_reads_as_before() {
    let e = test_conn().lookup_domain_by_name("no-such-vm").unwrap_err();
    let message = e.message().to_string();
    let f = LibvirtFailure::libvirt(Op::of("domain", "no-such-vm"), e);
    assert_eq!(f.code(), Some(ErrorNumber::NoDomain));
    assert_eq!(f.kind(), LibvirtKind::NotFound);
    assert_eq!(f.to_string(), format!("domain no-such-vm: {message}"));
    let v = VmError::from(f);
    assert!(v.is_not_found() && !v.is_unavailable());
    let source = std::error::Error::source(&v).and_then(std::error::Error::source);
    assert!(source.is_some(), "libvirt's error is kept whole");
}

/// The test driver has no DHCP leases: its "not supported" is a limit of that libvirt
/// (501), named, not a fault of the agent; a network's own read gets no leases instead.
#[test]
fn an_operation_the_driver_lacks_is_unsupported_and_named() {
    let hv = hypervisor(false);
    let mac = MacAddr::qemu([0x79, 0, 1]);
    let f = hv.leases(&call(), "default", &mac).unwrap_err();
    assert_eq!(f.kind(), LibvirtKind::Unsupported);
    let text = VmError::from(f).to_string();
    assert!(
        text.starts_with("this node's libvirt cannot do it: reading DHCP leases: "),
        "{text}"
    );
    assert!(text.contains("virNetworkGetDHCPLeases"), "{text}");
    let net = hv.network(&call(), "default").unwrap();
    assert!(net.leases.is_empty());
    assert!(!net.subnets[0].ranges.is_empty());
    let gone = hv.network(&call(), "no-such-network").unwrap_err();
    assert_eq!(gone.kind(), LibvirtKind::NotFound);
}

/// An entry is written and read back; writing a MAC's entry again replaces it (and says
/// what it had); libvirt refuses a second entry of one name (409), and the first stays.
#[test]
fn host_entries_are_written_replaced_refused_and_removed() {
    let hv = hypervisor(false);
    network("drv1", 1);
    let (a, b) = (MacAddr::qemu([0x79, 1, 1]), MacAddr::qemu([0x79, 1, 2]));
    assert_eq!(
        hv.put_host_entry(&call(), "drv1", &entry("a", a.clone(), 1, 5))
            .unwrap(),
        None
    );
    let moved = hv.put_host_entry(&call(), "drv1", &entry("a", a.clone(), 1, 6));
    assert_eq!(moved.unwrap(), Some(Ipv4Addr::new(10, 79, 1, 5)));
    let clash = hv.put_host_entry(&call(), "drv1", &entry("a", b.clone(), 1, 7));
    let clash = clash.unwrap_err();
    assert!(
        matches!(clash.kind(), LibvirtKind::Conflict | LibvirtKind::Failed),
        "{clash}"
    );
    let hosts: Vec<DhcpHost> = hv.network(&call(), "drv1").unwrap().subnets[0]
        .hosts
        .clone();
    let want = DhcpHost {
        mac: Some(a.clone()),
        name: Some("a".into()),
        ip: Some(Ipv4Addr::new(10, 79, 1, 6)),
    };
    assert_eq!(hosts, [want]);
    assert!(hv.remove_host_entry(&call(), "drv1", &a).unwrap());
    assert!(!hv.remove_host_entry(&call(), "drv1", &b).unwrap());
    assert!(
        hv.network(&call(), "drv1").unwrap().subnets[0]
            .hosts
            .is_empty()
    );
}

fn definition(name: &str) -> VmDefinition {
    VmDefinition {
        name: name.parse().unwrap(),
        uuid: uuid::Uuid::new_v4().to_string(),
        instance_id: format!("iid-{name}"),
        domain_type: "test".into(),
        arch: "i686".into(),
        memory_mib: 64,
        vcpus: 1,
        network: "default".into(),
        mac: MacAddr::qemu([0x79, 2, 1]),
        disk_volume: volumes::disk(name),
        seed_volume: volumes::seed(name),
        kernel: None,
        initrd: None,
        cmdline: None,
    }
}

/// The test driver cannot upload (no `virStorageVolUpload`): a define with a seed fails
/// after the disk was made, and removes it again.
#[test]
fn a_define_that_fails_half_way_removes_what_it_made() {
    let hv = hypervisor(false);
    let vm = definition("drv-half");
    let disk = Disk::New {
        size_bytes: 1 << 20,
        backing: None,
    };
    let e = hv
        .define(&call(), &vm, &disk, Some(b"seed"), true)
        .unwrap_err();
    assert!(e.to_string().contains("upload"), "{e}");
    assert_eq!(hv.volume(&call(), &vm.disk_volume).unwrap(), None);
    assert_eq!(hv.domain(&call(), "drv-half").unwrap(), None);
}

/// A VM's life on the test driver: defined (disk made, seed kept out), observed with the
/// agent's instance-id and its NIC, started, stopped, undefined, its volumes deleted.
#[test]
fn a_vm_lives_its_life_on_the_test_driver() {
    let hv: LibvirtHypervisor = hypervisor(false);
    let vm = definition("drv-life");
    let disk = Disk::New {
        size_bytes: 1 << 20,
        backing: None,
    };
    hv.define(&call(), &vm, &disk, None, false).unwrap();
    let seen = hv.domain(&call(), "drv-life").unwrap().unwrap();
    assert_eq!(seen.instance_id.as_deref(), Some("iid-drv-life"));
    assert_eq!(
        (seen.nics[0].mac.clone(), seen.uuid.clone()),
        (vm.mac.clone(), vm.uuid.clone())
    );
    assert!(!seen.active);
    assert_eq!(hv.start(&call(), "drv-life").unwrap(), Some(false));
    assert_eq!(hv.start(&call(), "drv-life").unwrap(), Some(true));
    assert_eq!(hv.reboot(&call(), "drv-life").unwrap(), Some(true));
    let all = hv.domains(&call()).unwrap();
    assert!(all.iter().any(|(n, d)| n == "drv-life" && d.active));
    hv.destroy(&call(), "drv-life").unwrap();
    assert_eq!(hv.reboot(&call(), "drv-life").unwrap(), Some(false));
    assert!(hv.undefine(&call(), "drv-life").unwrap());
    assert!(!hv.undefine(&call(), "drv-life").unwrap());
    assert_eq!(hv.start(&call(), "drv-life").unwrap(), None);
    assert_eq!(hv.delete_volumes(&call(), "drv-life").unwrap(), ["disk"]);
    let host = hv.host(&call(), "test").unwrap();
    assert!(
        host.guests.contains(&("i686".into(), "test".into())),
        "{host:?}"
    );
    assert!(hv.stats(&call()).unwrap().iter().any(|d| d.name == "test"));
}

/// What a transfer does to the pool, and the cleanup of a killed run's leftovers.
#[test]
fn volumes_are_copied_and_leftovers_of_a_prefix_deleted() {
    let hv = hypervisor(false);
    let conn = test_conn();
    let pool = super::storage::ensure_pool(&conn, super::testing::POOL, "/x").unwrap();
    let xml = super::xml::volume("drv-partial.1", 1 << 20, "raw", None);
    super::storage::create_volume(&pool, "drv-partial.1", &xml).unwrap();
    hv.copy_volume(&call(), "drv-partial.1", "drv-image", 2 << 20, "raw")
        .unwrap();
    assert_eq!(hv.volume(&call(), "drv-image").unwrap(), Some(2 << 20));
    let gone = hv.delete_volumes_starting(&call(), "drv-partial.").unwrap();
    assert_eq!(gone, ["drv-partial.1"]);
    assert!(hv.delete_volume(&call(), "drv-image").unwrap());
    assert!(!hv.delete_volume(&call(), "drv-image").unwrap());
}
