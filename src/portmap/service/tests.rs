//! The port-map service against the in-memory firewall.

use super::*;
use crate::portmap::MemoryFirewall;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

fn setup() -> (PortMaps, Arc<MemoryFirewall>) {
    let fw = Arc::new(MemoryFirewall::default());
    let mut reserved = BTreeMap::new();
    reserved.insert(22, "SSH".to_string());
    let svc = PortMaps::new(
        Store::open_in_memory().unwrap(),
        fw.clone(),
        Policy::new(vec!["10.0.0.0/24".parse().unwrap()], reserved),
    );
    svc.restore().unwrap();
    (svc, fw)
}

fn map(proto: Proto, port: u16, host: u8, target: u16) -> PortMap {
    PortMap {
        proto,
        listen_port: port,
        target_ip: Ipv4Addr::new(10, 0, 0, host),
        target_port: target,
    }
}

fn kernel(fw: &MemoryFirewall) -> Vec<PortMap> {
    fw.maps().unwrap().into_iter().collect()
}

fn stored(svc: &PortMaps) -> Vec<PortMap> {
    let mut v: Vec<_> = svc.list().unwrap().into_iter().map(|r| r.map).collect();
    v.sort();
    v
}

#[test]
fn the_maps_of_a_target_go_in_one_transaction_with_their_audit_rows_or_not_at_all() {
    let (svc, fw) = setup();
    let (a, b, c) = (
        map(Proto::Tcp, 2222, 5, 22),
        map(Proto::Udp, 5353, 5, 53),
        map(Proto::Tcp, 8080, 6, 80),
    );
    for m in [a, b, c] {
        svc.create(m, false, "t", None).unwrap();
    }
    let entry = |m: &PortMap| {
        Entry::by_agent(
            format!("DELETE /ports/{} (VM deleted)", m.listen_port),
            None,
        )
    };
    let audit_rows = |svc: &PortMaps| -> i64 {
        svc.store()
            .with(|c| {
                Ok::<_, crate::store::StoreError>(c.query_row(
                    "SELECT count(*) FROM audit_log",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap()
    };
    // The kernel refuses: nothing changes anywhere.
    fw.fail_next("Operation not permitted");
    assert!(
        svc.delete_targeting(&[Ipv4Addr::new(10, 0, 0, 5)], None, entry)
            .is_err()
    );
    assert_eq!(stored(&svc), vec![a, c, b]);
    assert_eq!(kernel(&fw).len(), 3);
    assert_eq!(audit_rows(&svc), 0);

    let gone = svc
        .delete_targeting(&[Ipv4Addr::new(10, 0, 0, 5)], None, entry)
        .unwrap();
    assert_eq!(gone, vec![a, b]);
    assert_eq!(stored(&svc), vec![c]);
    assert_eq!(kernel(&fw), vec![c]);
    assert_eq!(audit_rows(&svc), 2);
    assert!(
        svc.delete_targeting(&[Ipv4Addr::new(10, 0, 0, 9)], None, entry)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_comparison_that_cannot_read_the_kernel_says_so_and_not_refused() {
    let (svc, fw) = setup();
    fw.fail_next("Operation not permitted (errno 1)");
    let e = svc.drift().unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot read the kernel's nftables state: Operation not permitted (errno 1)"
    );
}

#[test]
fn create_is_idempotent_and_conflicts_need_replace() {
    let (svc, fw) = setup();
    let a = map(Proto::Tcp, 8080, 2, 80);
    assert_eq!(
        svc.create(a, false, "t", None).unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        svc.create(a, false, "t", None).unwrap(),
        CreateOutcome::Unchanged
    );
    let b = map(Proto::Tcp, 8080, 3, 80);
    assert!(matches!(
        svc.create(b, false, "t", None),
        Err(PortMapError::Conflict { .. })
    ));
    assert_eq!(kernel(&fw), vec![a]);
    assert_eq!(
        svc.create(b, true, "t", None).unwrap(),
        CreateOutcome::Replaced { previous: a.into() }
    );
    assert_eq!(kernel(&fw), vec![b]);
    assert_eq!(stored(&svc), vec![b]);
    // The same port in UDP is another map.
    let u = map(Proto::Udp, 8080, 2, 53);
    svc.create(u, false, "t", None).unwrap();
    assert_eq!(stored(&svc), kernel(&fw));
}

#[test]
fn a_kernel_refusal_leaves_the_database_untouched() {
    let (svc, fw) = setup();
    let a = map(Proto::Tcp, 8080, 2, 80);
    svc.create(a, false, "t", None).unwrap();
    fw.fail_next("Operation not permitted");
    let err = svc
        .create(map(Proto::Tcp, 8080, 3, 80), true, "t", None)
        .unwrap_err();
    assert!(err.to_string().contains("Operation not permitted"), "{err}");
    assert_eq!(stored(&svc), vec![a]);
    fw.fail_next("Operation not permitted");
    svc.create(map(Proto::Tcp, 9090, 3, 80), false, "t", None)
        .unwrap_err();
    fw.fail_next("Operation not permitted");
    svc.delete(Proto::Tcp, 8080, None).unwrap_err();
    assert_eq!(stored(&svc), vec![a]);
    assert_eq!(kernel(&fw), vec![a]);
}

#[test]
fn policy_refusals_change_nothing() {
    let (svc, fw) = setup();
    assert!(matches!(
        svc.create(map(Proto::Tcp, 22, 2, 80), false, "t", None),
        Err(PortMapError::Policy(_))
    ));
    let outside = PortMap {
        target_ip: Ipv4Addr::new(1, 1, 1, 1),
        ..map(Proto::Tcp, 8080, 2, 80)
    };
    assert!(matches!(
        svc.create(outside, false, "t", None),
        Err(PortMapError::Policy(_))
    ));
    // The node's own address inside the VM subnet (the bridge's) is not a VM.
    fw.add_local_address(Ipv4Addr::new(10, 0, 0, 1));
    let e = svc
        .create(map(Proto::Tcp, 8080, 1, 22), false, "t", None)
        .unwrap_err();
    assert!(e.to_string().contains("node itself"), "{e}");
    assert!(stored(&svc).is_empty());
    assert!(kernel(&fw).is_empty());
}

#[test]
fn delete_reports_whether_something_was_deleted() {
    let (svc, fw) = setup();
    let a = map(Proto::Udp, 5353, 2, 53);
    svc.create(a, false, "t", None).unwrap();
    assert_eq!(svc.delete(Proto::Tcp, 5353, None).unwrap(), None);
    assert_eq!(svc.delete(Proto::Udp, 5353, None).unwrap(), Some(a));
    assert_eq!(svc.delete(Proto::Udp, 5353, None).unwrap(), None);
    assert!(kernel(&fw).is_empty());
}

#[test]
fn reconcile_repairs_a_wiped_table_and_is_quiet_when_in_sync() {
    let (svc, fw) = setup();
    let a = map(Proto::Tcp, 8080, 2, 80);
    svc.create(a, false, "t", None).unwrap();
    let r = svc.reconcile().unwrap();
    assert!(!r.changed(), "{r:?}");
    fw.wipe();
    assert_eq!(svc.drift().unwrap(), vec!["table missing".to_string()]);
    let r = svc.reconcile().unwrap();
    assert!(r.rewritten);
    assert_eq!(kernel(&fw), vec![a]);
    let audited: i64 = svc
        .store()
        .with(|c| {
            Ok::<_, StoreError>(c.query_row(
                "SELECT count(*) FROM audit_log WHERE action = 'reconcile'",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    assert_eq!(audited, 1);
}

fn reconcile_rows(svc: &PortMaps) -> Vec<String> {
    svc.store()
        .with(|c| {
            let mut stmt = c.prepare(
                "SELECT parameters FROM audit_log WHERE action = 'reconcile' ORDER BY id",
            )?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, StoreError>(rows)
        })
        .unwrap()
}

#[test]
fn a_change_to_a_table_deleted_behind_the_agents_back_repairs_it_first() {
    let (svc, fw) = setup();
    let (a, b, c) = (
        map(Proto::Tcp, 8080, 2, 80),
        map(Proto::Udp, 5353, 2, 53),
        map(Proto::Tcp, 9090, 3, 80),
    );
    svc.create(a, false, "t", None).unwrap();
    svc.create(b, false, "t", None).unwrap();

    // Add: the kernel says ENOENT; the table comes back with every map and the new one.
    fw.wipe();
    assert_eq!(
        svc.create(c, false, "t", None).unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(kernel(&fw), vec![a, c, b]);
    assert_eq!(stored(&svc), kernel(&fw));
    let rows = reconcile_rows(&svc);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].contains("No such file or directory"), "{rows:?}");

    // Delete and replace alike.
    fw.wipe();
    assert_eq!(svc.delete(Proto::Tcp, 8080, None).unwrap(), Some(a));
    assert_eq!(kernel(&fw), vec![c, b]);
    fw.wipe();
    let c2 = map(Proto::Tcp, 9090, 4, 80);
    assert_eq!(
        svc.create(c2, true, "t", None).unwrap(),
        CreateOutcome::Replaced { previous: c.into() }
    );
    assert_eq!(kernel(&fw), vec![c2, b]);
    fw.wipe();
    svc.delete_targeting(&[Ipv4Addr::new(10, 0, 0, 2)], None, |_| {
        Entry::by_agent("DELETE (VM deleted)", None)
    })
    .unwrap();
    assert_eq!(kernel(&fw), vec![c2]);
    assert_eq!(stored(&svc), vec![c2]);
    assert_eq!(reconcile_rows(&svc).len(), 4);
    assert!(!svc.reconcile().unwrap().changed());
}

#[test]
fn a_drifted_table_that_cannot_be_repaired_changes_nothing_and_says_try_again() {
    let (svc, fw) = setup();
    let a = map(Proto::Tcp, 8080, 2, 80);
    svc.create(a, false, "t", None).unwrap();
    fw.fail_next_as(
        crate::portmap::FirewallErrorKind::NotFound,
        "No such file or directory",
    );
    fw.fail_next("Operation not permitted");
    let e = svc
        .create(map(Proto::Tcp, 9090, 3, 80), false, "t", None)
        .unwrap_err();
    assert!(matches!(e, PortMapError::Drifted { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(text.contains("try again"), "{text}");
    assert_eq!(stored(&svc), vec![a]);
    assert_eq!(kernel(&fw), vec![a]);
    assert!(reconcile_rows(&svc).is_empty());
    // Other refusals are not drift: no repair is tried.
    fw.fail_next("Operation not permitted");
    let e = svc
        .create(map(Proto::Tcp, 9090, 3, 80), false, "t", None)
        .unwrap_err();
    assert!(matches!(e, PortMapError::Kernel(_)), "{e:?}");
}

#[test]
fn tunnel_sources_take_effect_with_the_next_whole_table_write() {
    use crate::net::antispoof::TunnelGuard;
    let (svc, fw) = setup();
    let nets = vec!["10.50.0.1/32".parse().unwrap()];
    fw.set_tunnel_sources(&nets);
    assert_eq!(fw.tunnel_sources_in_force(), Some(vec![]));
    assert_eq!(svc.drift().unwrap().len(), 1);
    svc.restore().unwrap();
    assert_eq!(fw.tunnel_sources_in_force(), Some(nets));
    assert!(svc.drift().unwrap().is_empty());
}

#[test]
fn the_list_cache_follows_every_change() {
    let (svc, _fw) = setup();
    let json = |svc: &PortMaps| -> serde_json::Value {
        let body: serde_json::Value = serde_json::from_slice(&svc.list_body().unwrap()).unwrap();
        assert_eq!(body["ok"], true);
        body["rules"].clone()
    };
    assert_eq!(json(&svc).as_object().unwrap().len(), 0);
    svc.create(map(Proto::Tcp, 8080, 2, 80), false, "t", None)
        .unwrap();
    svc.create(map(Proto::Udp, 8080, 2, 53), false, "t", None)
        .unwrap();
    let v = json(&svc);
    assert_eq!(v["8080"]["target_port"], 80);
    assert_eq!(v["8080/udp"]["proto"], "udp");
    svc.delete(Proto::Tcp, 8080, None).unwrap();
    assert!(json(&svc).get("8080").is_none());
}

#[test]
fn an_allow_list_is_stored_and_sent_with_its_map_and_changing_it_is_a_replace() {
    let (svc, fw) = setup();
    let m = map(Proto::Tcp, 8080, 5, 80);
    let allow = crate::model::AllowList::parse(&["192.0.2.0/24"]).unwrap();
    let rule = PortRule {
        map: m,
        allow_from: allow.clone(),
    };
    assert_eq!(
        svc.create(rule.clone(), false, "t", None).unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        fw.rules().unwrap().into_iter().collect::<Vec<_>>(),
        std::slice::from_ref(&rule)
    );
    assert_eq!(svc.list().unwrap()[0].allow_from, allow);
    assert_eq!(
        svc.create(rule.clone(), false, "t", None).unwrap(),
        CreateOutcome::Unchanged
    );
    // The same target without the list: a change, so 409 without replace.
    let open = PortRule::from(m);
    let err = svc.create(open.clone(), false, "t", None).unwrap_err();
    assert!(
        err.to_string()
            .contains("10.0.0.5:80 (allow_from [192.0.2.0/24])"),
        "{err}"
    );
    assert_eq!(
        svc.create(open.clone(), true, "t", None).unwrap(),
        CreateOutcome::Replaced { previous: rule }
    );
    assert_eq!(fw.rules().unwrap().into_iter().collect::<Vec<_>>(), [open]);
    assert!(svc.drift().unwrap().is_empty());
}

#[test]
fn counters_are_listed_and_read_for_one_map_and_a_replace_resets_them() {
    let (svc, fw) = setup();
    let m = map(Proto::Udp, 5353, 5, 53);
    svc.create(m, false, "t", None).unwrap();
    let c = crate::model::MapCounters {
        packets: 10,
        bytes: 1000,
        connections: 5,
        drops: 1,
    };
    fw.count(Proto::Udp, 5353, c);
    let (row, got) = svc.get(Proto::Udp, 5353).unwrap().unwrap();
    assert_eq!((row.map, got), (m, c));
    assert!(svc.get(Proto::Tcp, 5353).unwrap().is_none());
    let json = PortMaps::rule_json(&row, got);
    assert_eq!(json["rule_id"], "5353/udp");
    assert_eq!(json["connections"], 5);
    assert_eq!(json["allow_from"], serde_json::json!([]));

    // The listing carries them; a restore keeps them (the map is unchanged).
    let body: serde_json::Value = serde_json::from_slice(&svc.list_body().unwrap()).unwrap();
    assert_eq!(body["rules"]["5353/udp"]["packets"], 10);
    svc.restore().unwrap();
    assert_eq!(svc.get(Proto::Udp, 5353).unwrap().unwrap().1, c);
    svc.create(map(Proto::Udp, 5353, 6, 53), true, "t", None)
        .unwrap();
    assert_eq!(
        svc.get(Proto::Udp, 5353).unwrap().unwrap().1,
        crate::model::MapCounters::default()
    );
}

/// A VM row in the service's store, pinned to 10.0.0.`host` (`None`: a VM from before
/// pinned addresses, with its last seen address `last`).
fn plant_vm(svc: &PortMaps, name: &str, pinned: Option<u8>, last: Option<u8>) {
    let ip = |h: Option<u8>| h.map(|h| std::net::Ipv4Addr::new(10, 0, 0, h).into());
    let row = crate::store::vms::VmRow {
        pinned_ip: ip(pinned),
        last_ip: ip(last),
        ..crate::store::vms::test_row(
            name,
            &format!(
                "52:54:00:00:{:02x}:{:02x}",
                name.as_bytes()[0],
                name.as_bytes()[1]
            ),
        )
    };
    svc.store()
        .transaction(|tx| crate::store::vms::upsert(tx, &row, &Default::default()))
        .unwrap();
}

fn naming(svc: &PortMaps, vm: &str, port: u16) -> Result<CreateOutcome, PortMapError> {
    let ip = svc.vm_address(vm)?;
    svc.create_naming(
        map(Proto::Tcp, port, ip.octets()[3], 80).into(),
        Some(vm),
        false,
        "t",
        None,
    )
}

#[test]
fn a_map_naming_a_vm_goes_to_its_pinned_address_and_is_stored_by_name() {
    let (svc, fw) = setup();
    plant_vm(&svc, "web1", Some(7), Some(9));
    plant_vm(&svc, "old1", None, Some(9));
    plant_vm(&svc, "new1", None, None);
    assert_eq!(naming(&svc, "web1", 2222).unwrap(), CreateOutcome::Created);
    // A VM from before pinning: its last seen address; none seen yet: 409, nothing made.
    naming(&svc, "old1", 2223).unwrap();
    assert!(matches!(
        naming(&svc, "new1", 2224),
        Err(PortMapError::VmWithoutAddress(_))
    ));
    assert!(matches!(
        naming(&svc, "nobody", 2225),
        Err(PortMapError::UnknownVm(_))
    ));
    assert_eq!(
        kernel(&fw),
        vec![map(Proto::Tcp, 2222, 7, 80), map(Proto::Tcp, 2223, 9, 80)]
    );
    let rows = svc.list().unwrap();
    assert_eq!(rows[0].target_vm.as_deref(), Some("web1"));
    assert_eq!(rows[1].target_vm.as_deref(), Some("old1"));
    // The same again is unchanged; the same address without the name is a change.
    assert_eq!(
        naming(&svc, "web1", 2222).unwrap(),
        CreateOutcome::Unchanged
    );
    assert!(matches!(
        svc.create(map(Proto::Tcp, 2222, 7, 80), false, "t", None),
        Err(PortMapError::Conflict { .. })
    ));
}

#[test]
fn a_create_whose_vm_moved_meanwhile_changes_nothing() {
    let (svc, fw) = setup();
    plant_vm(&svc, "web1", Some(7), None);
    let ip = svc.vm_address("web1").unwrap();
    // Recreated with another address between the lookup and the transaction.
    plant_vm(&svc, "web1", Some(8), None);
    let r = svc.create_naming(
        map(Proto::Tcp, 2222, ip.octets()[3], 80).into(),
        Some("web1"),
        false,
        "t",
        None,
    );
    assert!(matches!(r, Err(PortMapError::VmMoved(_))), "{r:?}");
    assert!(kernel(&fw).is_empty());
    assert!(svc.list().unwrap().is_empty());
}

#[test]
fn maps_naming_a_vm_follow_its_new_address_and_go_with_it() {
    let (svc, fw) = setup();
    plant_vm(&svc, "web1", Some(7), None);
    naming(&svc, "web1", 2222).unwrap();
    svc.create(map(Proto::Tcp, 8080, 7, 80), false, "t", None)
        .unwrap();
    svc.create(map(Proto::Tcp, 9090, 6, 80), false, "t", None)
        .unwrap();
    let audit = |old: &PortMap, new: &PortMap| {
        Entry::by_agent(
            "POST /ports (VM readdressed)",
            Some(format!("{} -> {}", old.target_ip, new.target_ip)),
        )
    };
    // Same address: nothing moves.
    assert!(svc.follow_vm("web1", audit).unwrap().is_empty());
    // Recreated at .8: the map naming it follows; the map to its old address does not.
    plant_vm(&svc, "web1", Some(8), None);
    assert_eq!(
        svc.follow_vm("web1", audit).unwrap(),
        vec![map(Proto::Tcp, 2222, 8, 80)]
    );
    assert_eq!(
        kernel(&fw),
        vec![
            map(Proto::Tcp, 2222, 8, 80),
            map(Proto::Tcp, 8080, 7, 80),
            map(Proto::Tcp, 9090, 6, 80)
        ]
    );
    assert_eq!(stored(&svc), kernel(&fw));
    let moved: String = svc
        .store()
        .with(|c| {
            Ok::<_, crate::store::StoreError>(c.query_row(
                "SELECT parameters FROM audit_log WHERE action = 'POST /ports (VM readdressed)'",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    assert_eq!(moved, "10.0.0.7 -> 10.0.0.8");
    // Deleted: the map naming it goes by name, the one to its old address by address.
    let gone = svc
        .delete_targeting(&[Ipv4Addr::new(10, 0, 0, 7)], Some("web1"), |m| {
            Entry::by_agent(
                format!("DELETE /ports/{} (VM deleted)", m.listen_port),
                None,
            )
        })
        .unwrap();
    assert_eq!(
        gone,
        vec![map(Proto::Tcp, 2222, 8, 80), map(Proto::Tcp, 8080, 7, 80)]
    );
    assert_eq!(kernel(&fw), vec![map(Proto::Tcp, 9090, 6, 80)]);
}
