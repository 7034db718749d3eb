//! The port-map service against the in-memory firewall.

use super::*;
use crate::portmap::MemoryFirewall;
use crate::portmap::firewall::{Firewall, FwFuture};
use crate::portmap::policy::Policy;
use crate::store::StoreError;
use crate::store::audit::Entry;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

async fn setup() -> (PortMaps, Arc<MemoryFirewall>) {
    let fw = Arc::new(MemoryFirewall::default());
    let mut reserved = BTreeMap::new();
    reserved.insert(22, "SSH".to_string());
    let svc = PortMaps::new(
        Store::open_in_memory().unwrap(),
        fw.clone(),
        Policy::new(vec!["10.0.0.0/24".parse().unwrap()], reserved),
    );
    svc.restore().await.unwrap();
    (svc, fw)
}

/// `POST /ports` of `rule` to its address, as the handler makes it; what it did.
async fn create(
    svc: &PortMaps,
    rule: impl Into<PortRule>,
    replace: bool,
) -> Result<CreateOutcome, PortMapError> {
    let rule = rule.into();
    let new = NewMap {
        proto: rule.map.proto,
        listen_port: rule.map.listen_port,
        target: Target::Ip(rule.map.target_ip),
        target_port: rule.map.target_port,
        allow_from: rule.allow_from,
        replace,
    };
    svc.create(new, "t", None).await.map(|m| m.outcome)
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

async fn stored(svc: &PortMaps) -> Vec<PortMap> {
    let mut v: Vec<_> = svc
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.map)
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_maps_of_a_target_go_in_one_transaction_with_their_audit_rows_or_not_at_all() {
    let (svc, fw) = setup().await;
    let (a, b, c) = (
        map(Proto::Tcp, 2222, 5, 22),
        map(Proto::Udp, 5353, 5, 53),
        map(Proto::Tcp, 8080, 6, 80),
    );
    for m in [a, b, c] {
        create(&svc, m, false).await.unwrap();
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
            .await
            .is_err()
    );
    assert_eq!(stored(&svc).await, vec![a, c, b]);
    assert_eq!(kernel(&fw).len(), 3);
    assert_eq!(audit_rows(&svc), 0);

    let gone = svc
        .delete_targeting(&[Ipv4Addr::new(10, 0, 0, 5)], None, entry)
        .await
        .unwrap();
    assert_eq!(gone, vec![a, b]);
    assert_eq!(stored(&svc).await, vec![c]);
    assert_eq!(kernel(&fw), vec![c]);
    assert_eq!(audit_rows(&svc), 2);
    assert!(
        svc.delete_targeting(&[Ipv4Addr::new(10, 0, 0, 9)], None, entry)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_comparison_that_cannot_read_the_kernel_says_so_and_not_refused() {
    let (svc, fw) = setup().await;
    fw.fail_next("Operation not permitted (errno 1)");
    let e = svc.drift().await.unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot read the kernel's nftables state: Operation not permitted (errno 1)"
    );
}

#[tokio::test]
async fn create_is_idempotent_and_conflicts_need_replace() {
    let (svc, fw) = setup().await;
    let a = map(Proto::Tcp, 8080, 2, 80);
    assert_eq!(
        create(&svc, a, false).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        create(&svc, a, false).await.unwrap(),
        CreateOutcome::Unchanged
    );
    let b = map(Proto::Tcp, 8080, 3, 80);
    assert!(matches!(
        create(&svc, b, false).await,
        Err(PortMapError::Conflict { .. })
    ));
    assert_eq!(kernel(&fw), vec![a]);
    assert_eq!(
        create(&svc, b, true).await.unwrap(),
        CreateOutcome::Replaced { previous: a.into() }
    );
    assert_eq!(kernel(&fw), vec![b]);
    assert_eq!(stored(&svc).await, vec![b]);
    // The same port in UDP is another map.
    let u = map(Proto::Udp, 8080, 2, 53);
    create(&svc, u, false).await.unwrap();
    assert_eq!(stored(&svc).await, kernel(&fw));
}

#[tokio::test]
async fn a_kernel_refusal_leaves_the_database_untouched() {
    let (svc, fw) = setup().await;
    let a = map(Proto::Tcp, 8080, 2, 80);
    create(&svc, a, false).await.unwrap();
    fw.fail_next("Operation not permitted");
    let err = create(&svc, map(Proto::Tcp, 8080, 3, 80), true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Operation not permitted"), "{err}");
    assert_eq!(stored(&svc).await, vec![a]);
    fw.fail_next("Operation not permitted");
    create(&svc, map(Proto::Tcp, 9090, 3, 80), false)
        .await
        .unwrap_err();
    fw.fail_next("Operation not permitted");
    svc.delete(Proto::Tcp, 8080, None).await.unwrap_err();
    assert_eq!(stored(&svc).await, vec![a]);
    assert_eq!(kernel(&fw), vec![a]);
}

#[tokio::test]
async fn policy_refusals_change_nothing() {
    let (svc, fw) = setup().await;
    assert!(matches!(
        create(&svc, map(Proto::Tcp, 22, 2, 80), false).await,
        Err(PortMapError::Policy(_))
    ));
    let outside = PortMap {
        target_ip: Ipv4Addr::new(1, 1, 1, 1),
        ..map(Proto::Tcp, 8080, 2, 80)
    };
    assert!(matches!(
        create(&svc, outside, false).await,
        Err(PortMapError::Policy(_))
    ));
    // The node's own address inside the VM subnet (the bridge's) is not a VM.
    fw.add_local_address(Ipv4Addr::new(10, 0, 0, 1));
    let e = create(&svc, map(Proto::Tcp, 8080, 1, 22), false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("node itself"), "{e}");
    assert!(stored(&svc).await.is_empty());
    assert!(kernel(&fw).is_empty());
}

#[tokio::test]
async fn delete_reports_whether_something_was_deleted() {
    let (svc, fw) = setup().await;
    let a = map(Proto::Udp, 5353, 2, 53);
    create(&svc, a, false).await.unwrap();
    assert_eq!(svc.delete(Proto::Tcp, 5353, None).await.unwrap(), None);
    assert_eq!(svc.delete(Proto::Udp, 5353, None).await.unwrap(), Some(a));
    assert_eq!(svc.delete(Proto::Udp, 5353, None).await.unwrap(), None);
    assert!(kernel(&fw).is_empty());
}

#[tokio::test]
async fn reconcile_repairs_a_wiped_table_and_is_quiet_when_in_sync() {
    let (svc, fw) = setup().await;
    let a = map(Proto::Tcp, 8080, 2, 80);
    create(&svc, a, false).await.unwrap();
    let r = svc.reconcile().await.unwrap();
    assert!(!r.changed(), "{r:?}");
    fw.wipe();
    assert_eq!(
        svc.drift().await.unwrap(),
        vec!["table missing".to_string()]
    );
    let r = svc.reconcile().await.unwrap();
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

#[tokio::test]
async fn a_change_to_a_table_deleted_behind_the_agents_back_repairs_it_first() {
    let (svc, fw) = setup().await;
    let (a, b, c) = (
        map(Proto::Tcp, 8080, 2, 80),
        map(Proto::Udp, 5353, 2, 53),
        map(Proto::Tcp, 9090, 3, 80),
    );
    create(&svc, a, false).await.unwrap();
    create(&svc, b, false).await.unwrap();

    // Add: the kernel says ENOENT; the table comes back with every map and the new one.
    fw.wipe();
    assert_eq!(
        create(&svc, c, false).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(kernel(&fw), vec![a, c, b]);
    assert_eq!(stored(&svc).await, kernel(&fw));
    let rows = reconcile_rows(&svc);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].contains("No such file or directory"), "{rows:?}");

    // Delete and replace alike.
    fw.wipe();
    assert_eq!(svc.delete(Proto::Tcp, 8080, None).await.unwrap(), Some(a));
    assert_eq!(kernel(&fw), vec![c, b]);
    fw.wipe();
    let c2 = map(Proto::Tcp, 9090, 4, 80);
    assert_eq!(
        create(&svc, c2, true).await.unwrap(),
        CreateOutcome::Replaced { previous: c.into() }
    );
    assert_eq!(kernel(&fw), vec![c2, b]);
    fw.wipe();
    svc.delete_targeting(&[Ipv4Addr::new(10, 0, 0, 2)], None, |_| {
        Entry::by_agent("DELETE (VM deleted)", None)
    })
    .await
    .unwrap();
    assert_eq!(kernel(&fw), vec![c2]);
    assert_eq!(stored(&svc).await, vec![c2]);
    assert_eq!(reconcile_rows(&svc).len(), 4);
    assert!(!svc.reconcile().await.unwrap().changed());
}

#[tokio::test]
async fn a_drifted_table_that_cannot_be_repaired_changes_nothing_and_says_try_again() {
    let (svc, fw) = setup().await;
    let a = map(Proto::Tcp, 8080, 2, 80);
    create(&svc, a, false).await.unwrap();
    fw.fail_next_as(
        crate::portmap::FirewallErrorKind::NotFound,
        "No such file or directory",
    );
    fw.fail_next("Operation not permitted");
    let e = create(&svc, map(Proto::Tcp, 9090, 3, 80), false)
        .await
        .unwrap_err();
    assert!(matches!(e, PortMapError::Drifted { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(text.contains("try again"), "{text}");
    assert_eq!(stored(&svc).await, vec![a]);
    assert_eq!(kernel(&fw), vec![a]);
    assert!(reconcile_rows(&svc).is_empty());
    // Other refusals are not drift: no repair is tried.
    fw.fail_next("Operation not permitted");
    let e = create(&svc, map(Proto::Tcp, 9090, 3, 80), false)
        .await
        .unwrap_err();
    assert!(matches!(e, PortMapError::Kernel(_)), "{e:?}");
}

#[tokio::test]
async fn tunnel_sources_take_effect_with_the_next_whole_table_write() {
    use crate::net::antispoof::TunnelGuard;
    let (svc, fw) = setup().await;
    let nets = vec!["10.50.0.1/32".parse().unwrap()];
    fw.set_tunnel_sources(&nets);
    assert_eq!(fw.tunnel_sources_in_force(), Some(vec![]));
    assert_eq!(svc.drift().await.unwrap().len(), 1);
    svc.restore().await.unwrap();
    assert_eq!(fw.tunnel_sources_in_force(), Some(nets));
    assert!(svc.drift().await.unwrap().is_empty());
}

/// The listing as a writer sees it, one `rule_id target_port packets` line per map
/// (the API writes its JSON; what it is given is the service's business).
async fn listed(svc: &PortMaps) -> Vec<String> {
    let written = svc
        .listing(|l| {
            let mut lines = vec![format!("{} maps", l.len())];
            l.for_each(|m| {
                let (row, c) = (m.row, m.counters);
                lines.push(format!(
                    "{} {} {}",
                    row.map.rule_id(),
                    row.map.target_port,
                    c.packets
                ));
                Ok::<_, PortMapError>(())
            })?;
            Ok::<_, PortMapError>(bytes::Bytes::from(lines.join("\n")))
        })
        .await
        .unwrap();
    assert_eq!(
        svc.cached_listing(),
        Some(written.clone()),
        "kept until a change"
    );
    String::from_utf8(written.to_vec())
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn the_list_cache_follows_every_change() {
    let (svc, _fw) = setup().await;
    assert_eq!(listed(&svc).await, ["0 maps"]);
    create(&svc, map(Proto::Tcp, 8080, 2, 80), false)
        .await
        .unwrap();
    assert_eq!(svc.cached_listing(), None, "a change empties it");
    create(&svc, map(Proto::Udp, 8080, 2, 53), false)
        .await
        .unwrap();
    assert_eq!(listed(&svc).await, ["2 maps", "8080 80 0", "8080/udp 53 0"]);
    svc.delete(Proto::Tcp, 8080, None).await.unwrap();
    assert_eq!(listed(&svc).await, ["1 maps", "8080/udp 53 0"]);
}

#[tokio::test]
async fn an_allow_list_is_stored_and_sent_with_its_map_and_changing_it_is_a_replace() {
    let (svc, fw) = setup().await;
    let m = map(Proto::Tcp, 8080, 5, 80);
    let allow = crate::model::AllowList::parse(&["192.0.2.0/24"]).unwrap();
    let rule = PortRule {
        map: m,
        allow_from: allow.clone(),
    };
    assert_eq!(
        create(&svc, rule.clone(), false).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        fw.rules().unwrap().into_iter().collect::<Vec<_>>(),
        std::slice::from_ref(&rule)
    );
    assert_eq!(svc.list().await.unwrap()[0].allow_from, allow);
    assert_eq!(
        create(&svc, rule.clone(), false).await.unwrap(),
        CreateOutcome::Unchanged
    );
    // The same target without the list: a change, so 409 without replace.
    let open = PortRule::from(m);
    let err = create(&svc, open.clone(), false).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("10.0.0.5:80 (allow_from [192.0.2.0/24])"),
        "{err}"
    );
    assert_eq!(
        create(&svc, open.clone(), true).await.unwrap(),
        CreateOutcome::Replaced { previous: rule }
    );
    assert_eq!(fw.rules().unwrap().into_iter().collect::<Vec<_>>(), [open]);
    assert!(svc.drift().await.unwrap().is_empty());
}

#[tokio::test]
async fn counters_are_listed_and_read_for_one_map_and_a_replace_resets_them() {
    let (svc, fw) = setup().await;
    let m = map(Proto::Udp, 5353, 5, 53);
    create(&svc, m, false).await.unwrap();
    let c = crate::model::MapCounters {
        packets: 10,
        bytes: 1000,
        connections: 5,
        drops: 1,
    };
    fw.count(Proto::Udp, 5353, c);
    let (row, got) = svc.get(Proto::Udp, 5353).await.unwrap().unwrap();
    assert_eq!((row.map, got), (m, c));
    assert!(svc.get(Proto::Tcp, 5353).await.unwrap().is_none());
    assert_eq!(row.map.rule_id(), "5353/udp");
    assert!(row.allow_from.is_empty());

    // The listing carries them; a restore keeps them (the map is unchanged).
    assert_eq!(listed(&svc).await, ["1 maps", "5353/udp 53 10"]);
    svc.restore().await.unwrap();
    assert_eq!(svc.get(Proto::Udp, 5353).await.unwrap().unwrap().1, c);
    create(&svc, map(Proto::Udp, 5353, 6, 53), true)
        .await
        .unwrap();
    assert_eq!(
        svc.get(Proto::Udp, 5353).await.unwrap().unwrap().1,
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

/// `POST /ports` of `port` to VM `vm`'s port 80, by name.
async fn naming(svc: &PortMaps, vm: &str, port: u16) -> Result<CreateOutcome, PortMapError> {
    let new = NewMap {
        proto: Proto::Tcp,
        listen_port: port,
        target: Target::Vm(vm.parse().unwrap()),
        target_port: 80,
        allow_from: Default::default(),
        replace: false,
    };
    svc.create(new, "t", None).await.map(|m| m.outcome)
}

#[tokio::test]
async fn a_map_naming_a_vm_goes_to_its_pinned_address_and_is_stored_by_name() {
    let (svc, fw) = setup().await;
    plant_vm(&svc, "web1", Some(7), Some(9));
    plant_vm(&svc, "old1", None, Some(9));
    plant_vm(&svc, "new1", None, None);
    assert_eq!(
        naming(&svc, "web1", 2222).await.unwrap(),
        CreateOutcome::Created
    );
    // A VM from before pinning: its last seen address; none seen yet: 409, nothing made.
    naming(&svc, "old1", 2223).await.unwrap();
    assert!(matches!(
        naming(&svc, "new1", 2224).await,
        Err(PortMapError::VmWithoutAddress(_))
    ));
    assert!(matches!(
        naming(&svc, "nobody", 2225).await,
        Err(PortMapError::UnknownVm(_))
    ));
    assert_eq!(
        kernel(&fw),
        vec![map(Proto::Tcp, 2222, 7, 80), map(Proto::Tcp, 2223, 9, 80)]
    );
    let rows = svc.list().await.unwrap();
    assert_eq!(rows[0].target_vm.as_deref(), Some("web1"));
    assert_eq!(rows[1].target_vm.as_deref(), Some("old1"));
    // The same again is unchanged; the same address without the name is a change.
    assert_eq!(
        naming(&svc, "web1", 2222).await.unwrap(),
        CreateOutcome::Unchanged
    );
    assert!(matches!(
        create(&svc, map(Proto::Tcp, 2222, 7, 80), false).await,
        Err(PortMapError::Conflict { .. })
    ));
}

/// A firewall that runs a hook before each `add`: what happens between a change's plan
/// and its commit.
struct Hooked {
    fw: Arc<MemoryFirewall>,
    before_add: Box<dyn Fn() + Send + Sync>,
}

impl Firewall for Hooked {
    fn apply_all<'a>(&'a self, rules: &'a [PortRule]) -> FwFuture<'a, ()> {
        self.fw.apply_all(rules)
    }
    fn add<'a>(&'a self, rule: &'a PortRule) -> FwFuture<'a, ()> {
        (self.before_add)();
        self.fw.add(rule)
    }
    fn remove<'a>(&'a self, rules: &'a [PortRule]) -> FwFuture<'a, ()> {
        self.fw.remove(rules)
    }
    fn replace<'a>(&'a self, old: &'a PortRule, new: &'a PortRule) -> FwFuture<'a, ()> {
        self.fw.replace(old, new)
    }
    fn drift<'a>(&'a self, desired: &'a [PortRule]) -> FwFuture<'a, Vec<String>> {
        self.fw.drift(desired)
    }
    fn counters(&self) -> FwFuture<'_, BTreeMap<(Proto, u16), crate::model::MapCounters>> {
        self.fw.counters()
    }
    fn forward_accept_drift(&self) -> FwFuture<'_, Vec<String>> {
        self.fw.forward_accept_drift()
    }
    fn ensure_forward_accept(&self) -> FwFuture<'_, Vec<String>> {
        self.fw.ensure_forward_accept()
    }
    fn cleanup(&self) -> FwFuture<'_, ()> {
        self.fw.cleanup()
    }
    fn is_local_address(&self, ip: Ipv4Addr) -> FwFuture<'_, bool> {
        self.fw.is_local_address(ip)
    }
}

/// The VM a map names is recreated at another address while the kernel makes the map:
/// the commit finds it moved, nothing is stored, and the kernel is rewritten from the
/// database, so neither holds the map.
#[tokio::test]
async fn a_create_whose_vm_moved_meanwhile_changes_nothing() {
    let fw = Arc::new(MemoryFirewall::default());
    let store = Store::open_in_memory().unwrap();
    let moving = store.clone();
    let hooked = Hooked {
        fw: fw.clone(),
        before_add: Box::new(move || {
            let row = crate::store::vms::VmRow {
                pinned_ip: Some([10, 0, 0, 8].into()),
                ..crate::store::vms::test_row("web1", "52:54:00:00:77:65")
            };
            moving
                .transaction(|tx| crate::store::vms::upsert(tx, &row, &Default::default()))
                .unwrap();
        }),
    };
    let svc = PortMaps::new(
        store,
        Arc::new(hooked),
        Policy::new(vec!["10.0.0.0/24".parse().unwrap()], BTreeMap::new()),
    );
    svc.restore().await.unwrap();
    plant_vm(&svc, "web1", Some(7), None);
    let r = naming(&svc, "web1", 2222).await;
    assert!(matches!(r, Err(PortMapError::VmMoved(_))), "{r:?}");
    assert!(kernel(&fw).is_empty());
    assert!(svc.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn maps_naming_a_vm_follow_its_new_address_and_go_with_it() {
    let (svc, fw) = setup().await;
    plant_vm(&svc, "web1", Some(7), None);
    naming(&svc, "web1", 2222).await.unwrap();
    create(&svc, map(Proto::Tcp, 8080, 7, 80), false)
        .await
        .unwrap();
    create(&svc, map(Proto::Tcp, 9090, 6, 80), false)
        .await
        .unwrap();
    let audit = |old: &PortMap, new: &PortMap| {
        Entry::by_agent(
            "POST /ports (VM readdressed)",
            Some(format!("{} -> {}", old.target_ip, new.target_ip)),
        )
    };
    // Same address: nothing moves.
    assert!(svc.follow_vm("web1", audit).await.unwrap().is_empty());
    // Recreated at .8: the map naming it follows; the map to its old address does not.
    plant_vm(&svc, "web1", Some(8), None);
    assert_eq!(
        svc.follow_vm("web1", audit).await.unwrap(),
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
    assert_eq!(stored(&svc).await, kernel(&fw));
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
        .await
        .unwrap();
    assert_eq!(
        gone,
        vec![map(Proto::Tcp, 2222, 8, 80), map(Proto::Tcp, 8080, 7, 80)]
    );
    assert_eq!(kernel(&fw), vec![map(Proto::Tcp, 9090, 6, 80)]);
}
