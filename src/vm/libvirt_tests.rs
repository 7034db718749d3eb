//! The VM service over the libvirt hypervisor on libvirt's in-process test driver
//! (`test:///default`): what the service relies on libvirt itself for (its lifecycle
//! events, its network updates, what its test driver refuses). The service's own logic
//! is tested without libvirt (`service::tests`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::VmState;
use crate::store::Store;
use crate::store::vms::{self, SeedInputs, VmRow, test_row};
use crate::vm::driver::libvirt::testing::{self, ensure_loaded};
use crate::vm::driver::{Call, Driver, Hypervisor, volumes};
use crate::vm::service::Vms;
use crate::vm::service::tests::test_config;
use crate::vm::{VmConfig, VmError};

/// The service on the test driver, whose domains have made-up taps (`local: false`) and
/// whose guests are `i686`/`test`.
fn service() -> (Arc<Vms>, Store, Arc<dyn Hypervisor>) {
    let store = Store::open_in_memory().unwrap();
    let hv: Arc<dyn Hypervisor> = Arc::new(testing::hypervisor(false));
    let cfg = VmConfig {
        local: false,
        domain_type: "test".into(),
        default_arch: "i686".into(),
        ..test_config()
    };
    let driver = Driver::new(Arc::clone(&hv), Duration::from_secs(30));
    let vms = Arc::new(Vms::new(driver, store.clone(), cfg, None));
    vms.watch_events();
    (vms, store, hv)
}

/// A VM as a create leaves it, made directly (the test driver cannot upload a seed): its
/// row and its volumes; no domain.
fn planted(hv: &dyn Hypervisor, store: &Store, name: &str, mac: &str) -> VmRow {
    let row = VmRow {
        uuid: uuid::Uuid::new_v4().to_string(),
        ..test_row(name, mac)
    };
    store
        .transaction(|tx| vms::upsert(tx, &row, &SeedInputs::default()))
        .unwrap();
    // Asking for a volume loads libvirt and makes the agent's pool.
    hv.volume(&Call::new(None), &row.disk_volume).unwrap();
    let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let pool = conn.lookup_storage_pool_by_name(testing::POOL).unwrap();
    for v in [&row.disk_volume, &row.seed_volume] {
        let xml = format!(
            "<volume><name>{v}</name><capacity>1048576</capacity><target><format type='raw'/></target></volume>"
        );
        virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0).unwrap();
    }
    row
}

/// The reconcile defines again (and starts) a VM whose domain vanished, keeping its disk,
/// and never touches a domain the agent did not create.
#[tokio::test]
async fn on_libvirt_the_reconcile_restores_a_vanished_domain() {
    let (vms, store, hv) = service();
    planted(&*hv, &store, "lv-rec", "52:54:00:00:1a:01");
    let foreign = "<domain type='test'><name>lv-foreign</name><memory>8192</memory>\
                   <os><type>hvm</type></os></domain>";
    ensure_loaded().unwrap();
    let outside = virt::connect::Connect::open(Some("test:///default")).unwrap();
    outside.define_domain_xml(foreign).unwrap();
    let repaired = vms.reconcile().await.unwrap();
    assert_eq!(
        repaired,
        ["lv-rec: domain defined again", "lv-rec: domain started"]
    );
    let seen = hv.domain(&Call::new(None), "lv-rec").unwrap().unwrap();
    assert!(seen.active);
    assert!(vms.reconcile().await.unwrap().is_empty(), "libvirt matches");
    let theirs = hv.domain(&Call::new(None), "lv-foreign").unwrap().unwrap();
    assert!(!theirs.active, "never started by the agent");
    assert!(
        hv.volume(&Call::new(None), &volumes::disk("lv-rec"))
            .unwrap()
            .is_some()
    );
}

/// libvirt's lifecycle events: a domain destroyed outside the agent shows as `shutoff`
/// within a second, in the status and in `vms.last_state`.
#[tokio::test]
async fn on_libvirt_an_outside_destroy_reaches_the_status_within_a_second() {
    let (vms, store, hv) = service();
    planted(&*hv, &store, "lv-obs", "52:54:00:00:1b:01");
    vms.reconcile().await.unwrap();
    ensure_loaded().unwrap();
    let outside = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let dom = outside.lookup_domain_by_name("lv-obs").unwrap();
    let name = "lv-obs".parse().unwrap();
    let t0 = Instant::now();
    dom.destroy().unwrap();
    loop {
        let status = vms.status(&name).await.unwrap();
        if status.state == VmState::Shutoff {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", status.state);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dom.undefine().unwrap();
}

/// A create the test driver refuses part-way (it cannot upload the seed, after the disk
/// was made) answers libvirt's error and leaves nothing: no row, domain, volume or
/// DHCP host entry.
#[tokio::test]
async fn on_libvirt_a_create_refused_half_way_leaves_nothing_behind() {
    let (vms, store, hv) = service();
    let req = crate::vm::spec::VmSpec::from_json(serde_json::json!({
        "name": "lv-half", "kernel": "/nonexistent/vmlinuz", "memory_mib": 64, "disk_size_gb": 1
    }));
    let err = vms.create(req, "test").await.unwrap_err();
    assert!(matches!(err, VmError::Libvirt(_)), "{err:?}");
    assert!(
        err.to_string().contains("upload"),
        "the disk was made first: {err}"
    );
    let call = Call::new(None);
    assert_eq!(hv.domain(&call, "lv-half").unwrap(), None);
    assert_eq!(store.with(|c| vms::get(c, "lv-half")).unwrap(), None);
    assert_eq!(hv.volume(&call, &volumes::disk("lv-half")).unwrap(), None);
    let net = hv.network(&call, "default").unwrap();
    let named = net.subnets.iter().flat_map(|s| &s.hosts);
    assert_eq!(
        named
            .filter(|h| h.name.as_deref() == Some("lv-half"))
            .count(),
        0
    );
}

/// The reconcile puts back a pinned VM's entry after `virsh net-update ... delete`.
#[tokio::test]
async fn on_libvirt_the_reconcile_reasserts_an_entry_deleted_outside() {
    let (vms, store, hv) = service();
    let mut row = planted(&*hv, &store, "lv-pin", "52:54:00:00:1c:01");
    let ip = std::net::Ipv4Addr::new(192, 168, 122, 77);
    row.pinned_ip = Some(ip.into());
    store
        .transaction(|tx| vms::upsert(tx, &row, &SeedInputs::default()))
        .unwrap();
    let repaired = vms.reconcile().await.unwrap();
    assert!(
        repaired.contains(&"lv-pin: DHCP host entry added again".to_string()),
        "{repaired:?}"
    );
    let outside = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let net = outside.lookup_network_by_name("default").unwrap();
    let doc = format!("<host mac='{}' name='lv-pin' ip='{ip}'/>", row.mac);
    let flags =
        virt::sys::VIR_NETWORK_UPDATE_AFFECT_LIVE | virt::sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG;
    let (delete, section) = (
        virt::sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
        virt::sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
    );
    net.update(delete, section, -1, &doc, flags).unwrap();
    assert_eq!(
        vms.reconcile().await.unwrap(),
        ["lv-pin: DHCP host entry added again"]
    );
    vms.delete(&"lv-pin".parse().unwrap(), true).await.unwrap();
    let hosts = hv.network(&Call::new(None), "default").unwrap().subnets[0]
        .hosts
        .clone();
    assert!(
        !hosts.iter().any(|h| h.name.as_deref() == Some("lv-pin")),
        "{hosts:?}"
    );
}
