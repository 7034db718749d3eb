//! The documents against libvirt's in-process test driver.

use super::tests::{find, spec};
use super::*;

//
// `test:///default` keeps one state per process, shared by every test thread, with a
// pool `default-pool` and a network `default`: each test uses names of its own.

use virt::connect::Connect;
use virt::storage_vol::StorageVol;

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[test]
fn test_driver_accepts_domain_and_reports_it_back() {
    super::super::loader::ensure_loaded().unwrap();
    let conn = Connect::open(Some("test:///default")).unwrap();
    let pool = conn.lookup_storage_pool_by_name("default-pool").unwrap();
    let name = unique("nva-dom");
    let disk_name = format!("{name}-disk.qcow2");
    let seed_name = format!("{name}-seed.img");
    let disk =
        StorageVol::create_xml(&pool, &volume(&disk_name, 1 << 30, "qcow2", None), 0).unwrap();
    let seed = StorageVol::create_xml(&pool, &volume(&seed_name, 1 << 20, "raw", None), 0).unwrap();

    let uuid = uuid::Uuid::new_v4().to_string();
    let s = DomainSpec {
        name: &name,
        uuid: &uuid,
        pool: "default-pool",
        disk_volume: &disk_name,
        seed_volume: &seed_name,
        network: "default",
        mac: "52:54:00:aa:bb:cc",
        console_log: Some("/tmp/nva-console.log"),
        kernel: Some("/boot/vmlinuz"),
        initrd: Some("/boot/initrd.img"),
        cmdline: Some("console=ttyS0"),
        instance_id: "i-test-driver",
        ..spec()
    };
    let dom = conn.define_domain_xml(&domain(&s)).unwrap();
    let back = dom.xml_desc(0).unwrap();
    let facts = parse_domain(&back);
    dom.undefine().unwrap();
    disk.delete(0).unwrap();
    seed.delete(0).unwrap();

    let facts = facts.unwrap();
    assert_eq!(
        facts,
        DomainFacts {
            name,
            uuid,
            interfaces: vec![("52:54:00:aa:bb:cc".into(), "default".into())],
            volumes: vec![
                ("default-pool".into(), disk_name),
                ("default-pool".into(), seed_name)
            ],
            console_log: Some("/tmp/nva-console.log".into()),
            instance_id: Some("i-test-driver".into()),
            // The test driver names the host side of a defined interface itself.
            taps: facts.taps.clone(),
            serial_type: Some("pty".into()),
        },
        "{back}"
    );
}

#[test]
fn test_driver_accepts_kvm_and_aarch64_domains() {
    super::super::loader::ensure_loaded().unwrap();
    let conn = Connect::open(Some("test:///default")).unwrap();
    for (domain_type, arch) in [("kvm", "x86_64"), ("qemu", "aarch64")] {
        let name = unique("nva-arch");
        let uuid = uuid::Uuid::new_v4().to_string();
        let s = DomainSpec {
            name: &name,
            uuid: &uuid,
            domain_type,
            arch,
            console_log: None,
            ..spec()
        };
        let dom = conn
            .define_domain_xml(&domain(&s))
            .unwrap_or_else(|e| panic!("{domain_type}/{arch}: {e}"));
        let facts = parse_domain(&dom.xml_desc(0).unwrap());
        dom.undefine().unwrap();
        let facts = facts.unwrap();
        assert_eq!(facts.name, name);
        assert_eq!(facts.instance_id.as_deref(), Some("i-0123"));
        assert_eq!(facts.console_log, None);
    }
}

#[test]
fn test_driver_accepts_backed_volume() {
    super::super::loader::ensure_loaded().unwrap();
    let conn = Connect::open(Some("test:///default")).unwrap();
    let pool = conn.lookup_storage_pool_by_name("default-pool").unwrap();
    let base_name = unique("nva-base");
    let base =
        StorageVol::create_xml(&pool, &volume(&base_name, 1 << 30, "qcow2", None), 0).unwrap();
    let base_path = base.path().unwrap();
    let name = unique("nva-overlay");
    let overlay = StorageVol::create_xml(
        &pool,
        &volume(&name, 2 << 30, "qcow2", Some((&base_path, "qcow2"))),
        0,
    );
    let described = overlay.as_ref().map(|v| v.xml_desc(0));
    if let Ok(v) = &overlay {
        v.delete(0).unwrap();
    }
    base.delete(0).unwrap();
    let described = described.unwrap().unwrap();
    assert_eq!(find(&described, &["volume", "name"])[0].1, name);
}

#[test]
fn test_driver_accepts_pool_and_pool_path_reads_it_back() {
    super::super::loader::ensure_loaded().unwrap();
    let conn = Connect::open(Some("test:///default")).unwrap();
    let name = unique("nva-pool");
    let path = format!("/srv/{name}/a&b");
    let pool = conn
        .define_storage_pool_xml(&super::pool(&name, &path), 0)
        .unwrap();
    let back = pool.xml_desc(0).unwrap();
    pool.undefine().unwrap();
    assert_eq!(pool_path(&back).unwrap(), path, "{back}");
}

#[test]
fn guest_support_lists_hvm_arches_with_their_domain_types() {
    let caps = "<capabilities><host><cpu><arch>x86_64</arch></cpu></host>\
        <guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>\
        <domain type='qemu'/><domain type='kvm'><emulator>/x</emulator></domain></arch></guest>\
        <guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/></arch></guest>\
        <guest><os_type>xen</os_type><arch name='aarch64'><domain type='xen'/></arch></guest>\
        </capabilities>";
    assert_eq!(
        guest_support(caps).unwrap(),
        [
            ("i686".to_owned(), "qemu".to_owned()),
            ("x86_64".to_owned(), "kvm".to_owned()),
            ("x86_64".to_owned(), "qemu".to_owned()),
        ]
    );
    // libvirt's test driver: its own domain type.
    super::super::loader::ensure_loaded().unwrap();
    let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let support = guest_support(&conn.capabilities().unwrap()).unwrap();
    assert!(
        support.contains(&("i686".to_owned(), "test".to_owned())),
        "{support:?}"
    );
    assert!(guest_support("<capabilities><guest>").is_err());
}
