//! Pinned addresses against libvirt's test driver (`test:///default`, whose
//! `virNetworkUpdate` keeps DHCP host entries like libvirtd's network driver). Each test
//! has a network of its own: the driver's state is shared by every test of the process,
//! and each test's service has its own pinning lock.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Vms;
use super::tests::{audit, domain, planted, remote_service, test_config, vm};
use crate::model::{PortMap, Proto};
use crate::portmap::{MemoryFirewall, PortMaps};
use crate::store::Store;
use crate::store::vms::{self, test_row};
use crate::vm::dhcp_hosts::{self, Reservation};
use crate::vm::xml::{self, DhcpHost};
use crate::vm::{Libvirt, VmConfig, VmError};

/// Defines and starts network `name` on 10.77.`third`.0/24 with DHCP range .2-.`last`.
async fn network(vms: &Vms, name: &str, third: u8, last: u8) {
    let doc = format!(
        "<network><name>{name}</name><bridge name='vbr-{name}'/>\
         <ip address='10.77.{third}.1' netmask='255.255.255.0'><dhcp>\
         <range start='10.77.{third}.2' end='10.77.{third}.{last}'/></dhcp></ip></network>"
    );
    vms.lv
        .call(move |conn| {
            let net = conn
                .define_network_xml(&doc)
                .map_err(|e| VmError::libvirt("define network", e))?;
            net.create()
                .map_err(|e| VmError::libvirt("start network", e))?;
            Ok(())
        })
        .await
        .unwrap();
}

/// The network's DHCP host entries, as libvirt shows them.
async fn hosts(vms: &Vms, name: &str) -> Vec<DhcpHost> {
    let n = name.to_string();
    vms.lv
        .call(move |conn| {
            let net = dhcp_hosts::network(conn, &n)?;
            Ok(dhcp_hosts::subnets(&net)?
                .into_iter()
                .flat_map(|s| s.hosts)
                .collect())
        })
        .await
        .unwrap()
}

fn ip(third: u8, last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, third, last)
}

fn row_on(name: &str, mac: &str, net: &str) -> vms::VmRow {
    vms::VmRow {
        network_name: net.into(),
        ..test_row(name, mac)
    }
}

/// Eight creates pinning at once on a range of eight get eight distinct addresses of the
/// range, each written as a host entry; the ninth finds the range full (409); releasing
/// takes the entries away.
#[tokio::test]
async fn concurrent_pins_get_distinct_addresses_of_the_range_until_it_is_full() {
    let (vms, _store) = remote_service();
    network(&vms, "pin1", 1, 9).await;
    let rows: Vec<_> = (0..8)
        .map(|i| {
            row_on(
                &format!("pin1-{i}"),
                &format!("52:54:00:77:01:{i:02x}"),
                "pin1",
            )
        })
        .collect();
    let pins = rows.iter().map(|r| {
        let (vms, r) = (Arc::clone(&vms), r.clone());
        tokio::spawn(async move { vms.pin(&r, None, None).await })
    });
    let got: Vec<Reservation> = futures_util::future::join_all(pins)
        .await
        .into_iter()
        .map(|j| j.unwrap().unwrap())
        .collect();
    let ips: BTreeSet<Ipv4Addr> = got.iter().map(|r| r.ip).collect();
    assert_eq!(ips, (2..=9).map(|l| ip(1, l)).collect());
    let entries = hosts(&vms, "pin1").await;
    assert_eq!(entries.len(), 8, "{entries:?}");
    for (row, r) in rows.iter().zip(&got) {
        let e = entries
            .iter()
            .find(|h| h.mac.as_deref() == Some(&row.mac))
            .unwrap();
        assert_eq!(
            (e.ip, e.name.as_deref()),
            (Some(r.ip), Some(row.name.as_str()))
        );
    }

    let extra = row_on("pin1-x", "52:54:00:77:01:ff", "pin1");
    let full = vms.pin(&extra, None, None).await.unwrap_err();
    assert!(matches!(full, VmError::Conflict(_)), "{full:?}");
    assert!(full.to_string().contains("no free address"), "{full}");

    for (row, r) in rows.iter().zip(got) {
        vms.unpin(row, r).await;
    }
    assert!(hosts(&vms, "pin1").await.is_empty());
}

/// An `ip` outside the range (or the network's own) is 400, one another VM's entry
/// holds is 409; nothing is written for either. A network without a DHCP range is 409.
#[tokio::test]
async fn a_taken_ip_is_a_conflict_and_one_outside_the_range_is_invalid() {
    let (vms, store) = remote_service();
    network(&vms, "pin2", 2, 20).await;
    let a = row_on("pin2-a", "52:54:00:77:02:01", "pin2");
    let b = row_on("pin2-b", "52:54:00:77:02:02", "pin2");
    let r = vms.pin(&a, Some(ip(2, 15)), None).await.unwrap();
    assert_eq!(r.ip, ip(2, 15));
    for wrong in [ip(2, 21), ip(2, 1), Ipv4Addr::new(192, 0, 2, 5)] {
        let e = vms.pin(&b, Some(wrong), None).await.unwrap_err();
        assert!(matches!(e, VmError::Invalid(_)), "{wrong}: {e:?}");
    }
    let e = vms.pin(&b, Some(ip(2, 15)), None).await.unwrap_err();
    assert!(matches!(e, VmError::Conflict(_)), "{e:?}");
    assert!(e.to_string().contains("pin2-a"), "{e}");

    // Another VM's pinned address in the database counts too, entry or not.
    let mut c = row_on("pin2-c", "52:54:00:77:02:03", "pin2");
    c.pinned_ip = Some(ip(2, 2).to_string());
    store
        .transaction(|tx| vms::upsert(tx, &c, &Default::default()))
        .unwrap();
    let e = vms.pin(&b, Some(ip(2, 2)), None).await.unwrap_err();
    assert!(e.to_string().contains("pinned for VM pin2-c"), "{e}");
    assert_eq!(vms.pin(&b, None, None).await.unwrap().ip, ip(2, 3));
    assert_eq!(hosts(&vms, "pin2").await.len(), 2);

    let bare = "<network><name>pin2-bare</name><bridge name='vbr-pin2b'/>\
                <ip address='10.77.22.1' netmask='255.255.255.0'/></network>";
    vms.lv
        .call(move |conn| {
            let n = conn
                .define_network_xml(bare)
                .map_err(|e| VmError::libvirt("define", e))?;
            n.create().map_err(|e| VmError::libvirt("start", e))?;
            Ok(())
        })
        .await
        .unwrap();
    let d = row_on("pin2-d", "52:54:00:77:02:04", "pin2-bare");
    let e = vms.pin(&d, None, None).await.unwrap_err();
    assert!(matches!(e, VmError::Conflict(_)), "{e:?}");
    assert!(e.to_string().contains("no IPv4 DHCP range"), "{e}");
}

/// The service with a port-map service over the in-memory firewall, targets in
/// 10.77.0.0/16.
fn service_with_maps() -> (Arc<Vms>, Store, Arc<PortMaps>) {
    let store = Store::open_in_memory().unwrap();
    let pm = Arc::new(PortMaps::new(
        store.clone(),
        Arc::new(MemoryFirewall::with_empty_table()),
        crate::portmap::Policy::new(vec!["10.77.0.0/16".parse().unwrap()], Default::default()),
    ));
    let lv = Libvirt::new("test:///default", Duration::from_secs(30));
    let cfg = VmConfig {
        local: false,
        domain_type: "test".into(),
        default_arch: "i686".into(),
        ..test_config()
    };
    let vms = Arc::new(Vms::new(lv, store.clone(), cfg, Some(Arc::clone(&pm))));
    (vms, store, pm)
}

/// A pinned VM: its `/ip` answers at once, its status lists the maps to its address; the
/// reconcile writes its host entry before starting it and puts it back after an outside
/// delete; a delete takes the entry and the maps away.
#[tokio::test]
async fn the_reconcile_reasserts_the_entry_and_a_delete_removes_it() {
    let (vms, store, pm) = service_with_maps();
    network(&vms, "pin3", 3, 50).await;
    let mac = "52:54:00:77:03:01";
    planted(&vms, &store, "pin3-a", mac).await;
    store
        .with(|c| {
            c.execute(
                "UPDATE vms SET network_name = 'pin3', pinned_ip = '10.77.3.7' WHERE name = 'pin3-a'",
                [],
            )
            .map_err(crate::store::StoreError::from)
        })
        .unwrap();
    assert_eq!(vms.pinned_ip("pin3-a").await.unwrap(), Some(ip(3, 7)));

    let repaired = vms.reconcile().await.unwrap();
    assert!(
        repaired.contains(&"pin3-a: DHCP host entry added again".to_string()),
        "{repaired:?}"
    );
    assert!(
        repaired.contains(&"pin3-a: domain started".to_string()),
        "{repaired:?}"
    );
    assert_eq!(domain(&vms, "pin3-a").await, Some(true));
    let entry = || DhcpHost {
        mac: Some(mac.into()),
        name: Some("pin3-a".into()),
        ip: Some(ip(3, 7)),
    };
    assert_eq!(hosts(&vms, "pin3").await, [entry()]);
    assert!(vms.reconcile().await.unwrap().is_empty(), "libvirt matches");

    // Someone runs `virsh net-update pin3 delete ip-dhcp-host ...`.
    crate::vm::libvirt_so::ensure_loaded().unwrap();
    let outside = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let net = outside.lookup_network_by_name("pin3").unwrap();
    let doc = xml::dhcp_host(mac, Some("pin3-a"), Some(ip(3, 7)));
    net.update(
        virt::sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
        virt::sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
        -1,
        &doc,
        virt::sys::VIR_NETWORK_UPDATE_AFFECT_LIVE | virt::sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG,
    )
    .unwrap();
    assert!(hosts(&vms, "pin3").await.is_empty());
    assert_eq!(
        vms.reconcile().await.unwrap(),
        ["pin3-a: DHCP host entry added again"]
    );
    assert_eq!(hosts(&vms, "pin3").await, [entry()]);
    assert!(audit(&store).iter().any(|r| r.0 == "reconcile VM"));

    let t0 = Instant::now();
    let got = vms
        .ip(&vm("pin3-a"), None, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got, "10.77.3.7");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "no lease to wait for"
    );

    let map = PortMap {
        proto: Proto::Tcp,
        listen_port: 47001,
        target_ip: ip(3, 7),
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
    pm.create(to(map), "test", None).await.unwrap();
    let other = PortMap {
        listen_port: 47002,
        target_ip: ip(3, 8),
        ..map
    };
    pm.create(to(other), "test", None).await.unwrap();
    let status = vms.status(&vm("pin3-a")).await.unwrap();
    assert_eq!(status.pinned_ip.as_deref(), Some("10.77.3.7"));
    let maps = status.port_maps.clone().unwrap();
    assert_eq!(maps.len(), 1, "{maps:?}");
    assert_eq!(
        (maps[0].listen_port, maps[0].rule_id.as_str()),
        (47001, "47001")
    );
    let listed = vms.list().await.unwrap();
    let shown = listed.iter().find(|s| s.name == "pin3-a").unwrap();
    assert!(shown.port_maps.is_none(), "only the status lists the maps");
    // The listing and the status tell the address `/ip` answers, and that it is pinned
    // (the VM never had a lease here).
    for s in [shown, &status] {
        assert_eq!(
            (s.ip.as_deref(), s.ip_source),
            (Some("10.77.3.7"), Some(super::IpSource::Pinned)),
            "{s:?}"
        );
    }

    let deleted = vms.delete(&vm("pin3-a"), true).await.unwrap();
    assert_eq!(deleted.removed_port_maps, ["47001/tcp -> 10.77.3.7:22"]);
    assert!(hosts(&vms, "pin3").await.is_empty());
    assert_eq!(
        pm.list().await.unwrap().len(),
        1,
        "the other VM's map stays"
    );
}

/// A recreate keeps the VM's address (its entry is left as it is); a failed create
/// leaves no entry behind. The test driver refuses every create at the seed upload,
/// after the address was pinned.
#[tokio::test]
async fn a_failed_create_leaves_no_entry_and_a_recreate_keeps_the_address() {
    let (vms, store) = remote_service();
    network(&vms, "pin4", 4, 30).await;
    let req = |name: &str, extra: serde_json::Value| {
        let mut v = serde_json::json!({"name": name, "network_name": "pin4",
            "kernel": "/nonexistent/vmlinuz", "memory_mib": 64});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        crate::vm::spec::VmSpec::from_json(v)
    };
    let e = vms
        .create(req("pin4-a", serde_json::json!({})), "t")
        .await
        .unwrap_err();
    assert!(
        !matches!(e, VmError::Conflict(_) | VmError::Invalid(_)),
        "{e:?}"
    );
    assert!(
        hosts(&vms, "pin4").await.is_empty(),
        "the failed create's entry is gone"
    );

    let out = req("pin4-b", serde_json::json!({"ip": "10.77.4.31"}));
    let e = vms.create(out, "t").await.unwrap_err();
    assert!(matches!(e, VmError::Invalid(_)), "{e:?}");

    // A recreate of a pinned VM: the entry of its MAC keeps its address.
    let mut row = row_on("pin4-c", "52:54:00:77:04:01", "pin4");
    let r = vms.pin(&row, Some(ip(4, 20)), None).await.unwrap();
    row.pinned_ip = Some(r.ip.to_string());
    store
        .transaction(|tx| vms::upsert(tx, &row, &Default::default()))
        .unwrap();
    let e = vms
        .create(req("pin4-c", serde_json::json!({"recreate": true})), "t")
        .await
        .unwrap_err();
    assert!(!matches!(e, VmError::Conflict(_)), "{e:?}");
    let left = hosts(&vms, "pin4").await;
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].ip,
        Some(ip(4, 20)),
        "the old VM's entry is as it was"
    );
}

/// An entry of the VM's name that a cut-off create left (its MAC is no VM's and has no
/// lease) does not keep the name from being created again: it is replaced. One whose
/// MAC is a VM's of the agent stays, and libvirt refuses the second entry of that name.
#[tokio::test]
async fn a_leftover_entry_of_the_name_is_replaced_and_a_vms_entry_is_not() {
    let (vms, store) = remote_service();
    network(&vms, "pin5", 5, 40).await;
    let left = row_on("pin5-a", "52:54:00:77:05:99", "pin5");
    vms.pin(&left, Some(ip(5, 30)), None).await.unwrap();
    let again = row_on("pin5-a", "52:54:00:77:05:01", "pin5");
    let r = vms.pin(&again, None, None).await.unwrap();
    let entries = hosts(&vms, "pin5").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].mac.as_deref(), Some("52:54:00:77:05:01"));
    assert_eq!(r.ip, ip(5, 2));

    // The entry's MAC is a VM's (a row of another name, say): not a leftover.
    store
        .transaction(|tx| {
            vms::upsert(
                tx,
                &row_on("pin5-b", "52:54:00:77:05:01", "pin5"),
                &Default::default(),
            )
        })
        .unwrap();
    let third = row_on("pin5-a", "52:54:00:77:05:02", "pin5");
    let e = vms.pin(&third, None, None).await.unwrap_err();
    assert!(matches!(e, VmError::Libvirt(_)), "{e:?}");
    assert_eq!(hosts(&vms, "pin5").await.len(), 1);
}

/// The entry of a failed create that libvirt still holds (its removal was cut off) is
/// removed by the reconcile, with an audit row; a stray MAC that a VM row holds on that
/// network is the row's, and stays.
#[tokio::test]
async fn the_reconcile_removes_a_failed_creates_entry_and_keeps_a_vms() {
    let (vms, store) = remote_service();
    network(&vms, "pin6", 6, 40).await;
    let lost = row_on("pin6-lost", "52:54:00:77:06:01", "pin6");
    vms.pin(&lost, None, None).await.unwrap();
    let kept = planted(&vms, &store, "pin6-kept", "52:54:00:77:06:02").await;
    store
        .with(|c| {
            c.execute(
                "UPDATE vms SET network_name = 'pin6' WHERE name = 'pin6-kept'",
                [],
            )
            .map_err(crate::store::StoreError::from)
        })
        .unwrap();
    let kept = vms::VmRow {
        network_name: "pin6".into(),
        ..kept
    };
    vms.pin(&kept, None, None).await.unwrap();
    assert_eq!(hosts(&vms, "pin6").await.len(), 2);
    // What `unpin` does when libvirt is away.
    vms.stray_pins.add("pin6", &lost.mac);
    vms.stray_pins.add("pin6", &kept.mac);

    let repaired = vms.reconcile().await.unwrap();
    assert!(
        repaired.contains(&"pin6: DHCP host entry of 52:54:00:77:06:01 removed".to_string()),
        "{repaired:?}"
    );
    let left = hosts(&vms, "pin6").await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].mac.as_deref(), Some(kept.mac.as_str()));
    assert!(
        audit(&store)
            .iter()
            .any(|r| r.0 == "remove a failed create's DHCP host entry"),
        "{:?}",
        audit(&store)
    );
    assert_eq!(
        vms.stray_pins.due(),
        [(lost.mac.clone(), "pin6".to_owned())],
        "the VM's MAC is forgotten; the lost one is looked for until it settles"
    );
}
