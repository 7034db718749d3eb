//! Which address a create gets, against the twin: distinct under concurrency, the
//! request's own when free, kept by a recreate, never a leftover's obstacle.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use super::{harness, ip, planted, request};
use crate::model::MacAddr;
use crate::store::vms::{VmRow, test_row};
use crate::vm::driver::DhcpHost;
use crate::vm::service::IpSource;
use crate::vm::{Conflict, Invalid, VmError};

/// Network `pin1`'s address `10.78.1.<last>`.
fn on(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, 1, last)
}

/// Eight creates at once on a range of eight get eight distinct addresses, each written
/// as its host entry; the ninth finds the range full (409); deletes take the entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_get_distinct_addresses_until_the_range_is_full() {
    let h = harness();
    h.hv.add_network("pin1", on(1), (on(2), on(9)));
    let creates = (0..8).map(|i| {
        let vms = Arc::clone(&h.vms);
        let req = request(
            &format!("pin1-{i}"),
            serde_json::json!({"network_name": "pin1"}),
        );
        tokio::spawn(async move { vms.create(req, "t").await })
    });
    let made: Vec<_> = futures_util::future::join_all(creates)
        .await
        .into_iter()
        .map(|j| j.unwrap().unwrap())
        .collect();
    let ips: BTreeSet<IpAddr> = made.iter().map(|c| c.ip).collect();
    let range: BTreeSet<IpAddr> = (2..=9).map(|l| on(l).into()).collect();
    assert_eq!(ips, range);
    let entries = h.hv.host_entries("pin1");
    assert_eq!(entries.len(), 8, "{entries:?}");
    for c in &made {
        let e = entries
            .iter()
            .find(|e| e.name.as_deref() == Some(&c.name))
            .unwrap();
        assert_eq!(e.ip.map(IpAddr::V4), Some(c.ip));
    }
    let full = h
        .vms
        .create(
            request("pin1-x", serde_json::json!({"network_name": "pin1"})),
            "t",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(full, VmError::Conflict(Conflict::Address(_))),
        "{full:?}"
    );
    assert!(full.to_string().contains("no free address"), "{full}");
    for c in made {
        h.vms.delete(&c.name.parse().unwrap(), true).await.unwrap();
    }
    assert!(h.hv.host_entries("pin1").is_empty());
}

/// An `ip` outside the range (or the network's own) is 400, one another VM holds is 409;
/// a network without a DHCP range is 409; nothing is written for any.
#[tokio::test]
async fn a_taken_ip_is_a_conflict_and_one_outside_the_range_is_invalid() {
    let h = harness();
    let a = h
        .vms
        .create(request("a", serde_json::json!({"ip": "10.77.0.15"})), "t")
        .await;
    assert_eq!(a.unwrap().ip, ip(15));
    for wrong in ["10.77.0.51", "10.77.0.1", "192.0.2.5"] {
        let e = h
            .vms
            .create(request("b", serde_json::json!({"ip": wrong})), "t")
            .await;
        assert!(
            matches!(e, Err(VmError::Invalid(Invalid::Address(_)))),
            "{wrong}: {e:?}"
        );
    }
    let e = h
        .vms
        .create(request("b", serde_json::json!({"ip": "10.77.0.15"})), "t")
        .await;
    let e = e.unwrap_err();
    assert!(matches!(e, VmError::Conflict(_)), "{e:?}");
    assert!(e.to_string().contains("pinned for VM a"), "{e}");
    // Another MAC's entry (someone's `virsh net-update`) and a lease count too.
    let outsider = DhcpHost {
        mac: Some(MacAddr::qemu([9, 9, 9])),
        name: Some("outsider".into()),
        ip: Some(ip(2)),
    };
    h.hv.add_outside_entry("default", outsider);
    h.hv.add_lease("default", &MacAddr::qemu([8, 8, 8]), ip(3));
    h.vms.reconcile().await.unwrap();
    let b = h
        .vms
        .create(request("b", serde_json::json!({})), "t")
        .await
        .unwrap();
    assert_eq!(
        b.ip,
        ip(4),
        "the entry's and the lease's addresses are held"
    );
    let e = h
        .vms
        .create(
            request("d", serde_json::json!({"network_name": "nowhere"})),
            "t",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, VmError::Invalid(Invalid::NoNetwork(_))),
        "{e:?}"
    );
}

/// A failed create leaves no entry; a recreate keeps the VM's address (its entry is left
/// as it is, also when the recreate fails).
#[tokio::test]
async fn a_failed_create_leaves_no_entry_and_a_recreate_keeps_the_address() {
    let h = harness();
    let c = h
        .vms
        .create(request("c", serde_json::json!({"ip": "10.77.0.20"})), "t")
        .await;
    let c = c.unwrap();
    let recreated = h
        .vms
        .create(request("c", serde_json::json!({"recreate": true})), "t")
        .await
        .unwrap();
    assert!(recreated.recreated);
    assert_eq!((recreated.ip, &recreated.mac), (c.ip, &c.mac));
    h.hv.refuse(
        crate::vm::driver::memory::Step::Start,
        crate::vm::LibvirtKind::Failed,
        "no",
    );
    let e = h
        .vms
        .create(request("c", serde_json::json!({"recreate": true})), "t")
        .await;
    assert!(e.is_err());
    let left = h.hv.host_entries("default");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].ip, Some(ip(20)), "the old VM's entry is as it was");
    let e = h.vms.create(request("e", serde_json::json!({})), "t").await;
    assert!(e.is_err());
    assert_eq!(
        h.hv.host_entries("default").len(),
        1,
        "the failed create's entry is gone"
    );
}

/// An entry of the VM's name that a cut-off create left (its MAC is no VM's and has no
/// lease) does not keep the name from being created again: it is replaced. One whose MAC
/// is a VM's of the agent stays, and the hypervisor refuses the second entry of a name.
#[tokio::test]
async fn a_leftover_entry_of_the_name_is_replaced_and_a_vms_entry_is_not() {
    let h = harness();
    let leftover = DhcpHost {
        mac: Some(MacAddr::qemu([7, 7, 0x99])),
        name: Some("pin5".into()),
        ip: Some(ip(30)),
    };
    h.hv.add_outside_entry("default", leftover);
    let made = h
        .vms
        .create(request("pin5", serde_json::json!({})), "t")
        .await
        .unwrap();
    let entries = h.hv.host_entries("default");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        entries[0].mac.as_ref().map(ToString::to_string),
        Some(made.mac)
    );
    // An entry of the name whose MAC is another VM's (a row of another name, say).
    let other: VmRow = planted(&h, "other", "52:54:00:07:07:01");
    let theirs = DhcpHost {
        mac: Some(other.mac.clone()),
        name: Some("pin6".into()),
        ip: Some(ip(31)),
    };
    h.hv.add_outside_entry("default", theirs);
    let e = h
        .vms
        .create(request("pin6", serde_json::json!({})), "t")
        .await
        .unwrap_err();
    assert!(matches!(e, VmError::Libvirt(_)), "{e:?}");
    assert_eq!(h.hv.host_entries("default").len(), 2);
}

/// A VM's listed address: the pinned one when there is one (even after a lease gave
/// another, e.g. before pinning), else the last lease, else none; and where it is from.
#[test]
fn the_listed_address_is_the_pinned_one_first_then_the_last_lease() {
    let row = |pinned: Option<&str>, lease: Option<&str>| VmRow {
        pinned_ip: pinned.map(|i| i.parse().unwrap()),
        last_ip: lease.map(|i| i.parse().unwrap()),
        ..test_row("a", "52:54:00:00:00:01")
    };
    let addr = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    let show = IpSource::of;
    assert_eq!(
        show(&row(Some("10.0.0.7"), Some("10.0.0.9"))),
        (addr("10.0.0.7"), Some(IpSource::Pinned))
    );
    assert_eq!(
        show(&row(None, Some("10.0.0.9"))),
        (addr("10.0.0.9"), Some(IpSource::Lease))
    );
    assert_eq!(show(&row(None, None)), (None, None));
    assert_eq!(serde_json::to_value(IpSource::Pinned).unwrap(), "pinned");
}

/// A deleted VM's lease outlives it (dnsmasq keeps it until it expires): the next create
/// chooses another address instead of the leased one, and is not refused for it.
#[tokio::test]
async fn a_create_after_a_delete_does_not_choose_the_deleted_vms_leased_address() {
    let h = harness();
    let first = h
        .vms
        .create(request("gone", serde_json::json!({})), "t")
        .await
        .unwrap();
    let IpAddr::V4(leased) = first.ip else {
        panic!("{first:?}")
    };
    let mac: MacAddr = first.mac.parse().unwrap();
    h.hv.add_lease("default", &mac, leased);
    h.vms.delete(&super::vm("gone"), true).await.unwrap();
    let next = h
        .vms
        .create(request("next", serde_json::json!({})), "t")
        .await
        .unwrap();
    assert_ne!(next.ip, IpAddr::V4(leased), "{next:?}");
}
