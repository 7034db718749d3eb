//! The reconcile and the observation, against the twin.

use std::time::{Duration, Instant};

use super::{audit, eventually, harness, ip, last_state, planted, request, vm};
use crate::model::VmState;
use crate::vm::driver::DhcpHost;
use crate::vm::driver::volumes;

/// The reconcile defines again (and starts, as desired) a VM whose domain vanished,
/// keeping its disk; it leaves alone a VM that matches, a VM another operation holds
/// (until it is done), and domains the agent did not create.
#[tokio::test]
async fn the_reconcile_restores_a_vanished_domain_and_touches_nothing_else() {
    let h = harness();
    planted(&h, "rec-a", "52:54:00:00:0a:01");
    planted(&h, "rec-b", "52:54:00:00:0a:02");
    h.hv.add_foreign_domain("rec-foreign");
    let held = h.vms.claim("rec-b").await.unwrap();
    let repaired = h.vms.reconcile().await.unwrap();
    assert_eq!(
        repaired,
        ["rec-a: domain defined again", "rec-a: domain started"]
    );
    assert_eq!(h.hv.running("rec-a"), Some(true));
    assert_eq!(h.hv.running("rec-b"), None, "a held VM is its holder's");
    drop(held);
    let repaired = h.vms.reconcile().await.unwrap();
    assert_eq!(
        repaired,
        ["rec-b: domain defined again", "rec-b: domain started"]
    );
    assert!(
        h.vms.reconcile().await.unwrap().is_empty(),
        "the hypervisor matches"
    );
    assert_eq!(h.hv.running("rec-foreign"), Some(false));
    assert!(!h.vms.status(&vm("rec-foreign")).await.unwrap().managed);
    let rows = audit(&h.store);
    let repairs = rows.iter().filter(|r| r.0 == "reconcile VM" && r.1 == "ok");
    assert_eq!(repairs.count(), 2, "{rows:?}");
    assert!(
        h.hv.volumes().contains(&volumes::disk("rec-a")),
        "the disk is kept"
    );
}

/// A vanished seed is made again, of a defined domain too; a vanished disk is made again
/// from the image with the seed.
#[tokio::test]
async fn the_reconcile_makes_vanished_volumes_again() {
    let h = harness();
    h.vms
        .create(request("vol", serde_json::json!({})), "t")
        .await
        .unwrap();
    h.hv.delete_outside(&volumes::seed("vol"));
    assert_eq!(
        h.vms.reconcile().await.unwrap(),
        ["vol: seed volume made again"]
    );
    h.hv.undefine_outside("vol");
    h.hv.delete_outside(&volumes::disk("vol"));
    let repaired = h.vms.reconcile().await.unwrap();
    assert_eq!(
        repaired,
        [
            "vol: disk and seed made again from the image",
            "vol: domain defined again",
            "vol: domain started"
        ]
    );
    assert_eq!(h.hv.running("vol"), Some(true));
}

/// A domain destroyed outside the agent shows as `shutoff` within a second, in the
/// status and in `vms.last_state` (for those who audit the node with sqlite3); one
/// undefined outside, as `missing`.
#[tokio::test]
async fn an_outside_destroy_reaches_the_status_and_the_database_within_a_second() {
    let h = harness();
    planted(&h, "obs", "52:54:00:00:0b:01");
    h.vms.reconcile().await.unwrap();
    eventually("running recorded", || {
        last_state(&h.store, "obs").as_deref() == Some("running")
    })
    .await;
    let t0 = Instant::now();
    h.hv.destroy_outside("obs");
    loop {
        let status = h.vms.status(&vm("obs")).await.unwrap();
        if status.state == VmState::Shutoff
            && last_state(&h.store, "obs").as_deref() == Some("shutoff")
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", status.state);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.hv.undefine_outside("obs");
    eventually("missing recorded", || {
        last_state(&h.store, "obs").as_deref() == Some("missing")
    })
    .await;
    assert_eq!(
        h.vms.status(&vm("obs")).await.unwrap().state,
        VmState::Missing
    );
}

/// The reconcile writes a pinned VM's host entry before it starts the VM, and puts it
/// back after someone removed it.
#[tokio::test]
async fn the_reconcile_reasserts_a_pinned_vms_entry() {
    let h = harness();
    let mut row = planted(&h, "pin", "52:54:00:00:0e:01");
    row.pinned_ip = Some(ip(7).into());
    h.store
        .transaction(|tx| crate::store::vms::upsert(tx, &row, &Default::default()))
        .unwrap();
    let repaired = h.vms.reconcile().await.unwrap();
    assert_eq!(
        repaired,
        [
            "pin: DHCP host entry added again",
            "pin: domain defined again",
            "pin: domain started"
        ]
    );
    let entry = DhcpHost {
        mac: Some(row.mac.clone()),
        name: Some("pin".into()),
        ip: Some(ip(7)),
    };
    assert_eq!(h.hv.host_entries("default"), std::slice::from_ref(&entry));
    assert!(h.vms.reconcile().await.unwrap().is_empty());
    h.hv.remove_outside_entry("default", &row.mac);
    assert_eq!(
        h.vms.reconcile().await.unwrap(),
        ["pin: DHCP host entry added again"]
    );
    assert_eq!(h.hv.host_entries("default"), [entry]);
}

/// The entry of a failed create that libvirt still holds (its removal was cut off) is
/// removed by the reconcile, with an audit row; its address is not given to a create
/// meanwhile. A stray MAC that a VM row holds on that network is the row's, and stays.
#[tokio::test]
async fn the_reconcile_removes_a_failed_creates_entry_and_keeps_a_vms() {
    let h = harness();
    h.hv.away_after(crate::vm::driver::memory::Step::PutHostEntry);
    let e = h
        .vms
        .create(request("lost", serde_json::json!({})), "t")
        .await;
    assert!(
        e.as_ref().is_err_and(crate::vm::VmError::is_unavailable),
        "{e:?}"
    );
    h.hv.away(false);
    assert_eq!(h.hv.host_entries("default").len(), 1, "left in libvirt");
    let next = h
        .vms
        .create(request("next", serde_json::json!({})), "t")
        .await
        .unwrap();
    assert_eq!(next.ip, ip(3), "the stray entry's address is held");
    let repaired = h.vms.reconcile().await.unwrap();
    let lost = repaired
        .iter()
        .filter(|r| r.contains("DHCP host entry of"))
        .count();
    assert_eq!(lost, 1, "{repaired:?}");
    let left = h.hv.host_entries("default");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].name.as_deref(), Some("next"));
    let rows = audit(&h.store);
    assert!(
        rows.iter()
            .any(|r| r.0 == "remove a failed create's DHCP host entry")
    );
    let mac: crate::model::MacAddr = next.mac.parse().unwrap();
    h.vms.addresses.strays.add("default", &mac, ip(3));
    h.vms.reconcile().await.unwrap();
    assert_eq!(
        h.hv.host_entries("default").len(),
        1,
        "the VM's entry stays"
    );
    let due = h.vms.addresses.strays.due();
    assert!(
        !due.iter().any(|(m, _)| *m == mac),
        "forgotten as a stray: {due:?}"
    );
}
