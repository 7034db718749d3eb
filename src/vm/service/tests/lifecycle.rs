//! Start, stop, reboot, delete and the reads, against the twin.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Harness, harness, ip, request, vm};
use crate::model::{DesiredState, PortMap, Proto, VmState};
use crate::portmap::{MemoryFirewall, PortMaps};
use crate::store::vms;
use crate::vm::driver::{Driver, SerialPort};
use crate::vm::service::{IpSource, Vms};
use crate::vm::{Conflict, VmError};

fn desired(h: &Harness, name: &str) -> Option<DesiredState> {
    h.store
        .with(|c| vms::get(c, name))
        .unwrap()
        .map(|r| r.desired_state)
}

/// Stop, start, reboot and delete: the hypervisor, the status and the row agree after
/// each; a delete takes the domain, its volumes, its entry and the row.
#[tokio::test]
async fn stop_start_and_delete_change_the_hypervisor_the_status_and_the_row_together() {
    let h = harness();
    let made = h
        .vms
        .create(request("life", serde_json::json!({})), "t")
        .await
        .unwrap();
    let name = vm("life");
    assert!(
        !h.vms.stop(&name, false).await.unwrap(),
        "it obeyed the ACPI button"
    );
    assert_eq!(h.hv.running("life"), Some(false));
    assert_eq!(h.vms.status(&name).await.unwrap().state, VmState::Shutoff);
    assert_eq!(desired(&h, "life"), Some(DesiredState::Stopped));
    assert!(
        h.vms.reconcile().await.unwrap().is_empty(),
        "a stopped VM stays stopped"
    );
    let e = h.vms.reboot(&name).await.unwrap_err();
    assert!(
        matches!(e, VmError::Conflict(Conflict::NotRunning(_))),
        "{e:?}"
    );
    assert!(!h.vms.start(&name).await.unwrap(), "it was not running");
    assert_eq!(h.vms.status(&name).await.unwrap().state, VmState::Running);
    assert_eq!(desired(&h, "life"), Some(DesiredState::Running));
    assert!(h.vms.start(&name).await.unwrap(), "already running");
    h.vms.reboot(&name).await.unwrap();
    let deleted = h.vms.delete(&name, true).await.unwrap();
    assert!(deleted.deleted_files);
    assert_eq!(h.hv.running("life"), None);
    assert_eq!(desired(&h, "life"), None, "the row is gone");
    assert!(!h.hv.volumes().iter().any(|v| v.contains("life")));
    assert!(h.hv.host_entries("default").is_empty());
    assert!(h.vms.status(&name).await.unwrap_err().is_not_found());
    let gone = h.vms.start(&name).await.unwrap_err();
    assert!(gone.is_not_found(), "{gone:?}");
    assert_eq!(made.ip, ip(2));
}

/// A guest that ignores the ACPI button is forced off after VM_STOP_TIMEOUT; `force`
/// does it at once.
#[tokio::test]
async fn a_stop_forces_a_guest_that_ignores_the_button() {
    let h = harness();
    h.vms
        .create(request("deaf", serde_json::json!({})), "t")
        .await
        .unwrap();
    h.hv.ignore_acpi("deaf");
    let t0 = Instant::now();
    assert!(h.vms.stop(&vm("deaf"), false).await.unwrap(), "forced");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "VM_STOP_TIMEOUT was waited"
    );
    assert_eq!(h.hv.running("deaf"), Some(false));
    h.vms.start(&vm("deaf")).await.unwrap();
    let t0 = Instant::now();
    assert!(h.vms.stop(&vm("deaf"), true).await.unwrap());
    assert!(t0.elapsed() < Duration::from_secs(1));
}

/// A domain the agent did not create is listed, never deleted by it.
#[tokio::test]
async fn a_foreign_domain_is_listed_and_never_deleted() {
    let h = harness();
    h.hv.add_foreign_domain("theirs");
    let listed = h.vms.list().await.unwrap();
    let theirs = listed.iter().find(|s| s.name == "theirs").unwrap();
    assert!(!theirs.managed && theirs.instance_id.is_none());
    let e = h.vms.delete(&vm("theirs"), true).await.unwrap_err();
    assert!(
        matches!(e, VmError::Conflict(Conflict::NotOurs(_))),
        "{e:?}"
    );
    assert_eq!(h.hv.running("theirs"), Some(false));
    let e = h
        .vms
        .create(request("theirs", serde_json::json!({})), "t")
        .await;
    assert!(
        matches!(e, Err(VmError::Conflict(Conflict::Exists(_)))),
        "{e:?}"
    );
    let replace = request("theirs", serde_json::json!({"recreate": true}));
    let e = h.vms.create(replace, "t").await;
    assert!(
        matches!(e, Err(VmError::Conflict(Conflict::NotOurs(_)))),
        "{e:?}"
    );
}

/// A pinned VM: `/ip` answers at once, its status lists the maps to its address, the
/// listing shows the address as pinned; a delete takes its maps away.
#[tokio::test]
async fn a_pinned_vms_address_is_answered_at_once_and_its_maps_go_with_it() {
    let store = crate::store::Store::open_in_memory().unwrap();
    let policy =
        crate::portmap::Policy::new(vec!["10.77.0.0/16".parse().unwrap()], Default::default());
    let pm = Arc::new(PortMaps::new(
        store.clone(),
        Arc::new(MemoryFirewall::default()),
        policy,
    ));
    pm.restore().await.unwrap();
    let hv = crate::vm::driver::memory::MemoryHypervisor::new();
    hv.add_network("default", ip(1), (ip(2), ip(50)));
    let driver = Driver::new(hv.clone(), Duration::from_secs(30));
    let cfg = super::test_config();
    let vms = Arc::new(Vms::new(driver, store.clone(), cfg, Some(Arc::clone(&pm))));
    let kernel = serde_json::json!({"kernel": "/bin/sh"});
    vms.create(request("p", kernel), "t").await.unwrap();
    let t0 = Instant::now();
    let got = vms
        .ip(&vm("p"), None, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got, ip(2));
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "no lease to wait for"
    );
    let map = |port, last| PortMap {
        proto: Proto::Tcp,
        listen_port: port,
        target_ip: ip(last),
        target_port: 22,
    };
    let to = |m: PortMap| crate::portmap::NewMap {
        proto: m.proto,
        listen_port: m.listen_port,
        target: crate::portmap::Target::Ip(m.target_ip),
        target_port: m.target_port,
        allow_from: Default::default(),
        replace: false,
    };
    pm.create(to(map(47001, 2)), "test", None).await.unwrap();
    pm.create(to(map(47002, 9)), "test", None).await.unwrap();
    let status = vms.status(&vm("p")).await.unwrap();
    let maps = status.port_maps.clone().unwrap();
    assert_eq!(maps.len(), 1, "{maps:?}");
    assert_eq!(
        (maps[0].listen_port, maps[0].rule_id.as_str()),
        (47001, "47001")
    );
    let listed = vms.list().await.unwrap();
    let shown = listed.iter().find(|s| s.name == "p").unwrap();
    assert!(shown.port_maps.is_none(), "only the status lists the maps");
    for s in [shown, &status] {
        assert_eq!(
            (s.ip, s.ip_source),
            (Some(ip(2).into()), Some(IpSource::Pinned))
        );
    }
    let deleted = vms.delete(&vm("p"), true).await.unwrap();
    assert_eq!(deleted.removed_port_maps, ["47001/tcp -> 10.77.0.2:22"]);
    assert_eq!(pm.list().await.unwrap().len(), 1, "the other map stays");
}

/// A VM without a pinned address (created before pinning) gets its lease's address, and
/// `/ip` records it; without a lease in time, 504.
#[tokio::test]
async fn an_unpinned_vms_address_comes_from_its_lease() {
    let h = harness();
    let row = super::planted(&h, "old", "52:54:00:00:0d:01");
    let quick = Duration::from_millis(100);
    let e = h.vms.ip(&vm("old"), None, quick).await.unwrap_err();
    assert!(matches!(e, VmError::Timeout(_)), "{e:?}");
    h.hv.add_lease("default", &row.mac, ip(40));
    assert_eq!(h.vms.ip(&vm("old"), None, quick).await.unwrap(), ip(40));
    let stored = h.store.with(|c| vms::get(c, "old")).unwrap().unwrap();
    assert_eq!(stored.last_ip, Some(ip(40).into()));
}

/// A VM an older agent defined with a file for its serial port (no console can attach)
/// is defined again with a pty before it starts, and by the reconcile while it is
/// stopped; a running one keeps its device.
#[tokio::test]
async fn a_vm_with_a_file_for_its_serial_port_gets_a_pty_at_its_next_start() {
    let h = harness();
    h.vms
        .create(request("old", serde_json::json!({})), "t")
        .await
        .unwrap();
    let name = vm("old");
    h.hv.set_serial("old", SerialPort::File);
    assert!(h.vms.reconcile().await.unwrap().is_empty(), "it runs");
    assert_eq!(h.hv.serial("old"), Some(SerialPort::File));
    h.vms.stop(&name, true).await.unwrap();
    h.hv.set_serial("old", SerialPort::File);
    assert!(!h.vms.start(&name).await.unwrap());
    assert_eq!(h.hv.serial("old"), Some(SerialPort::Pty));
    assert_eq!(h.hv.running("old"), Some(true));

    h.vms.stop(&name, true).await.unwrap();
    h.hv.set_serial("old", SerialPort::File);
    let repaired = h.vms.reconcile().await.unwrap();
    assert_eq!(h.hv.serial("old"), Some(SerialPort::Pty), "{repaired:?}");
    assert_eq!(
        h.hv.running("old"),
        Some(false),
        "a stopped VM stays stopped"
    );
    assert!(
        format!("{repaired:?}").contains("pty"),
        "the reconcile says what it did: {repaired:?}"
    );
}
