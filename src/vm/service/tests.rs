//! The VM service against libvirt's in-process test driver (`test:///default`, whose
//! state every connection of this process shares: names are unique per test).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{VmConfig, Vms};
use crate::model::{DesiredState, VmName, VmState};
use crate::store::Store;
use crate::store::vms::{self, SeedInputs, VmRow, test_row};
use crate::vm::domain::lookup;
use crate::vm::spec::Limits;
use crate::vm::spec::VmSpec;
use crate::vm::{Libvirt, VmError};
use crate::vm::{storage, xml};

/// The settings of the tests' VM side: a pool and paths that exist only in the test
/// driver's memory.
pub(crate) fn test_config() -> VmConfig {
    VmConfig {
        pool: "nva-test-pool".into(),
        pool_dir: "/nonexistent/nva-test-pool".into(),
        domain_type: "qemu".into(),
        default_network: "default".into(),
        default_arch: "x86_64".into(),
        default_image: "base".into(),
        default_image_url: String::new(),
        default_keys: Vec::new(),
        limits: Limits {
            max_memory_mib: 4096,
            max_vcpus: 4,
            max_disk_gb: 100,
        },
        stop_timeout: Duration::from_secs(1),
        lease_poll: Duration::from_millis(50),
        local: true,
    }
}

fn service() -> (Arc<Vms>, Store) {
    let store = Store::open_in_memory().unwrap();
    let lv = Libvirt::new("test:///default", Duration::from_secs(30));
    let vms = Arc::new(Vms::new(lv, store.clone(), test_config(), None));
    vms.watch_events();
    (vms, store)
}

/// (action, outcome, error) of every audit row.
pub(super) fn audit(store: &Store) -> Vec<(String, String, Option<String>)> {
    store
        .with(|c| {
            let mut st = c.prepare("SELECT action, outcome, error FROM audit_log ORDER BY id")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok::<_, crate::store::StoreError>(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .unwrap()
}

#[tokio::test]
async fn a_claim_lives_as_long_as_its_work_and_a_late_outcome_is_recorded() {
    let (vms, store) = service();
    let claim = vms.claim("late1").await.unwrap();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let work = async move {
        let _ = finished.await;
        Err::<(), _>(VmError::Internal("define failed".into()))
    };
    let answer = vms
        .to_the_end(
            claim,
            "POST /vms late1".into(),
            Duration::from_millis(50),
            work,
        )
        .await;
    assert!(matches!(answer, Err(VmError::Stalled(_))), "{answer:?}");
    // The request has its 504; the work goes on and keeps the name.
    assert!(
        matches!(vms.claim("late1").await, Err(VmError::Conflict(_))),
        "the name was freed while its work still ran"
    );
    finish.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while vms.claim("late1").await.is_err() {
        assert!(Instant::now() < deadline, "the claim outlived its work");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rows = audit(&store);
    assert_eq!(
        rows,
        vec![(
            "POST /vms late1 (finished after the answer)".to_string(),
            "failed".to_string(),
            Some("libvirt: define failed".to_string())
        )]
    );
}

#[tokio::test]
async fn a_vm_being_created_shows_as_creating_and_reads_do_not_wait_for_it() {
    let (vms, _store) = service();
    let name: crate::model::VmName = "cre1".parse().unwrap();
    vms.set_pending("cre1", Some(super::Pending::Creating));
    let t0 = Instant::now();
    let listed = vms.list().await.unwrap();
    let status = vms.status(&name).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    let shown = listed.iter().find(|s| s.name == "cre1").unwrap();
    assert_eq!(shown.state, VmState::Creating);
    assert_eq!(status.state, VmState::Creating);
    vms.set_pending("cre1", Some(super::Pending::Failed("libvirt: boom".into())));
    let status = vms.status(&name).await.unwrap();
    assert_eq!(status.state, VmState::Failed);
    assert_eq!(status.error.as_deref(), Some("libvirt: boom"));
    vms.set_pending("cre1", None);
    assert!(vms.status(&name).await.unwrap_err().is_not_found());
}

pub(super) fn vm(name: &str) -> VmName {
    name.parse().unwrap()
}

/// A service whose VMs never touch the host's taps (`local: false`: the test driver's
/// domains have made-up interfaces), creating the guests the test driver offers.
pub(super) fn remote_service() -> (Arc<Vms>, Store) {
    let store = Store::open_in_memory().unwrap();
    let lv = Libvirt::new("test:///default", Duration::from_secs(30));
    let cfg = VmConfig {
        local: false,
        domain_type: "test".into(),
        default_arch: "i686".into(),
        ..test_config()
    };
    let vms = Arc::new(Vms::new(lv, store.clone(), cfg, None));
    vms.watch_events();
    (vms, store)
}

/// A VM as a create leaves it, made directly (the test driver cannot upload a seed):
/// its row with seed inputs, its disk and seed volumes in the pool; no domain.
pub(super) async fn planted(vms: &Vms, store: &Store, name: &str, mac: &str) -> VmRow {
    let row = VmRow {
        uuid: uuid::Uuid::new_v4().to_string(),
        disk_volume: storage::disk_volume(name),
        seed_volume: storage::seed_volume(name),
        ..test_row(name, mac)
    };
    store
        .transaction(|tx| vms::upsert(tx, &row, &SeedInputs::default()))
        .unwrap();
    let (cfg, r) = (vms.cfg.clone(), row.clone());
    vms.lv
        .call(move |conn| {
            let pool = storage::ensure_pool(conn, &cfg.pool, &cfg.pool_dir)?;
            for v in [&r.disk_volume, &r.seed_volume] {
                storage::create_volume(&pool, v, &xml::volume(v, 1 << 20, "raw", None))?;
            }
            Ok(())
        })
        .await
        .unwrap();
    row
}

/// Whether libvirt has the domain, and whether it runs.
pub(super) async fn domain(vms: &Vms, name: &str) -> Option<bool> {
    let n = name.to_string();
    vms.lv
        .call(move |conn| Ok(lookup(conn, &n)?.map(|d| d.is_active().unwrap())))
        .await
        .unwrap()
}

/// Which of `names` the pool holds.
async fn volumes(vms: &Vms, names: &[String]) -> Vec<String> {
    let (cfg, names) = (vms.cfg.clone(), names.to_vec());
    vms.lv
        .call(move |conn| {
            let pool = storage::ensure_pool(conn, &cfg.pool, &cfg.pool_dir)?;
            let mut have = Vec::new();
            for n in names {
                if storage::find_volume(&pool, &n)?.is_some() {
                    have.push(n);
                }
            }
            Ok(have)
        })
        .await
        .unwrap()
}

fn last_state(store: &Store, name: &str) -> Option<String> {
    store
        .with(|c| {
            Ok::<_, crate::store::StoreError>(c.query_row(
                "SELECT last_state FROM vms WHERE name = ?1",
                [name],
                |r| r.get(0),
            )?)
        })
        .unwrap()
}

/// The reconcile defines again (and starts, as desired) a VM whose domain vanished,
/// keeping its disk; it leaves alone a VM that matches, a VM another operation holds
/// (until it is done), and domains the agent did not create.
#[tokio::test]
async fn the_reconcile_restores_a_vanished_domain_and_touches_nothing_else() {
    let (vms, store) = remote_service();
    planted(&vms, &store, "rec-a", "52:54:00:00:0a:01").await;
    planted(&vms, &store, "rec-b", "52:54:00:00:0a:02").await;
    let foreign = "<domain type='test'><name>rec-foreign</name><memory>8192</memory>\
                   <os><type>hvm</type></os></domain>";
    vms.lv
        .call(move |conn| {
            conn.define_domain_xml(foreign)
                .map_err(|e| VmError::libvirt("define", e))?;
            Ok(())
        })
        .await
        .unwrap();

    let held = vms.claim("rec-b").await.unwrap();
    let repaired = vms.reconcile().await.unwrap();
    assert_eq!(
        repaired,
        ["rec-a: domain defined again", "rec-a: domain started"]
    );
    assert_eq!(domain(&vms, "rec-a").await, Some(true));
    assert_eq!(
        domain(&vms, "rec-b").await,
        None,
        "a held VM is its holder's"
    );
    assert_eq!(domain(&vms, "rec-foreign").await, Some(false));

    drop(held);
    let repaired = vms.reconcile().await.unwrap();
    assert_eq!(
        repaired,
        ["rec-b: domain defined again", "rec-b: domain started"]
    );
    assert!(vms.reconcile().await.unwrap().is_empty(), "libvirt matches");
    assert_eq!(domain(&vms, "rec-foreign").await, Some(false));
    let status = vms.status(&vm("rec-foreign")).await.unwrap();
    assert!(!status.managed);

    let rows = audit(&store);
    assert_eq!(
        rows.iter()
            .filter(|r| r.0 == "reconcile VM" && r.1 == "ok")
            .count(),
        2,
        "{rows:?}"
    );
    let disks = volumes(&vms, &[storage::disk_volume("rec-a")]).await;
    assert_eq!(disks.len(), 1, "the disk is the VM's data: kept");
}

/// A domain destroyed outside the agent shows as `shutoff` within a second, in the
/// status and in `vms.last_state` (for those who audit the node with sqlite3).
#[tokio::test]
async fn an_outside_destroy_reaches_the_status_and_the_database_within_a_second() {
    let (vms, store) = remote_service();
    planted(&vms, &store, "obs-a", "52:54:00:00:0b:01").await;
    vms.reconcile().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while last_state(&store, "obs-a").as_deref() != Some("running") {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            last_state(&store, "obs-a")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    crate::vm::libvirt_so::ensure_loaded().unwrap();
    let outside = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let dom = outside.lookup_domain_by_name("obs-a").unwrap();
    let t0 = Instant::now();
    dom.destroy().unwrap();
    loop {
        let status = vms.status(&vm("obs-a")).await.unwrap();
        if status.state == VmState::Shutoff
            && last_state(&store, "obs-a").as_deref() == Some("shutoff")
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{:?} / {:?}",
            status.state,
            last_state(&store, "obs-a")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dom.undefine().unwrap();
    let t0 = Instant::now();
    while last_state(&store, "obs-a").as_deref() != Some("missing") {
        assert!(t0.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        vms.status(&vm("obs-a")).await.unwrap().state,
        VmState::Missing
    );
}

/// Stop, start and delete through the service: libvirt, the status and the row agree
/// after each; a delete takes the domain, its volumes and the row.
#[tokio::test]
async fn stop_start_and_delete_change_libvirt_the_status_and_the_row_together() {
    let (vms, store) = remote_service();
    let row = planted(&vms, &store, "life-a", "52:54:00:00:0c:01").await;
    vms.reconcile().await.unwrap();
    let desired = |store: &Store| {
        store
            .with(|c| vms::get(c, "life-a"))
            .unwrap()
            .map(|r| r.desired_state)
    };

    vms.stop(&vm("life-a"), false).await.unwrap();
    assert_eq!(domain(&vms, "life-a").await, Some(false));
    assert_eq!(
        vms.status(&vm("life-a")).await.unwrap().state,
        VmState::Shutoff
    );
    assert_eq!(desired(&store), Some(DesiredState::Stopped));
    assert!(
        vms.reconcile().await.unwrap().is_empty(),
        "a stopped VM stays stopped"
    );

    assert!(
        !vms.start(&vm("life-a")).await.unwrap(),
        "it was not running"
    );
    assert_eq!(domain(&vms, "life-a").await, Some(true));
    assert_eq!(
        vms.status(&vm("life-a")).await.unwrap().state,
        VmState::Running
    );
    assert_eq!(desired(&store), Some(DesiredState::Running));
    assert!(vms.start(&vm("life-a")).await.unwrap(), "already running");

    let deleted = vms.delete(&vm("life-a"), true).await.unwrap();
    assert!(deleted.deleted_files);
    assert_eq!(domain(&vms, "life-a").await, None);
    assert_eq!(desired(&store), None, "the row is gone");
    assert!(
        volumes(&vms, &[row.disk_volume, row.seed_volume])
            .await
            .is_empty()
    );
    assert!(vms.status(&vm("life-a")).await.unwrap_err().is_not_found());
}

/// A create that libvirt refuses part-way (the test driver cannot upload the seed,
/// after the disk was made) answers the error and leaves nothing: no row, no domain,
/// no volume, the name free and not shown.
#[tokio::test]
async fn a_create_libvirt_refuses_half_way_leaves_nothing_behind() {
    let (vms, store) = remote_service();
    let (cfg, image_volume) = (vms.cfg.clone(), storage::image_volume("half-img"));
    let vol = image_volume.clone();
    vms.lv
        .call(move |conn| {
            let pool = storage::ensure_pool(conn, &cfg.pool, &cfg.pool_dir)?;
            storage::create_volume(&pool, &vol, &xml::volume(&vol, 1 << 20, "qcow2", None))?;
            Ok(())
        })
        .await
        .unwrap();
    store
        .with(|c| {
            vms::image_begin(c, "half-img", "upload", None, &image_volume, "test")?;
            vms::image_ready(c, "half-img", "00", "qcow2", 1 << 20)
        })
        .unwrap();

    let req = VmSpec::from_json(serde_json::json!({
        "name": "half-a", "image": "half-img", "memory_mib": 64, "disk_size_gb": 1
    }));
    let err = vms.create(req, "test").await.unwrap_err();
    assert!(matches!(err, VmError::Libvirt(_)), "{err:?}");
    assert!(
        err.to_string().contains("upload"),
        "the disk was made first: {err}"
    );

    assert_eq!(domain(&vms, "half-a").await, None);
    assert_eq!(store.with(|c| vms::get(c, "half-a")).unwrap(), None);
    let left = volumes(
        &vms,
        &[
            storage::disk_volume("half-a"),
            storage::seed_volume("half-a"),
        ],
    )
    .await;
    assert!(left.is_empty(), "{left:?}");
    // Its address was pinned before libvirt refused: the DHCP host entry went too.
    let entries = vms
        .lv
        .call(|conn| {
            let net = crate::vm::dhcp_hosts::network(conn, "default")?;
            crate::vm::dhcp_hosts::subnets(&net)
        })
        .await
        .unwrap();
    let named = entries
        .iter()
        .flat_map(|s| &s.hosts)
        .filter(|h| h.name.as_deref() == Some("half-a"))
        .count();
    assert_eq!(named, 0, "{entries:?}");
    assert!(vms.status(&vm("half-a")).await.unwrap_err().is_not_found());
    drop(vms.claim("half-a").await.expect("the name is free"));
}

/// With libvirtd on this host, a kernel or initrd this host cannot read is the request's
/// fault, found before libvirt is asked for anything (no text of libvirt's is read for
/// it); a remote libvirtd's files are its own business.
#[tokio::test]
async fn boot_files_libvirt_cannot_read_are_refused_before_anything_is_defined() {
    let (vms, _store) = service();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let kernel = kernel.to_string_lossy().into_owned();
    let dir_path = dir.path().to_string_lossy().into_owned();
    let request = |name: &str, kernel: &str, initrd: Option<&str>| {
        let mut v = serde_json::json!({"name": name, "kernel": kernel, "memory_mib": 64});
        if let Some(i) = initrd {
            v["initrd"] = serde_json::json!(i);
        }
        VmSpec::from_json(v)
    };
    for (req, names, why) in [
        (
            request("boot1", "/nonexistent/vmlinuz", None),
            "/nonexistent/vmlinuz",
            "No such file",
        ),
        (
            request("boot2", &kernel, Some("/nonexistent/initrd.img")),
            "/nonexistent/initrd.img",
            "No such file",
        ),
        (
            request("boot3", &dir_path, None),
            &dir_path,
            "not a regular file",
        ),
    ] {
        let e = vms.create(req, "t").await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, VmError::Invalid(_)), "{e:?}");
        assert!(text.contains(names) && text.contains(why), "{text}");
    }
    let defined = vms
        .lv
        .call(|conn| {
            Ok(conn
                .list_all_domains(0)
                .map_err(|e| VmError::libvirt("listing", e))?
                .iter()
                .filter_map(|d| d.name().ok())
                .filter(|n| n.starts_with("boot"))
                .count())
        })
        .await
        .unwrap();
    assert_eq!(defined, 0);

    // A remote libvirtd reads its own files: the request goes on to libvirt (whose test
    // driver then refuses the guest for its own reasons).
    let store = Store::open_in_memory().unwrap();
    let lv = Libvirt::new("test:///default", Duration::from_secs(30));
    let remote = Arc::new(Vms::new(
        lv,
        store,
        VmConfig {
            local: false,
            ..test_config()
        },
        None,
    ));
    let e = remote
        .create(request("boot4", "/nonexistent/vmlinuz", None), "t")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot run x86_64 guests"), "{e:?}");
}

/// A VM's listed address: the pinned one when there is one (even after a lease gave
/// another, e.g. before pinning), else the last lease, else none; and where it is from.
#[test]
fn the_listed_address_is_the_pinned_one_first_then_the_last_lease() {
    use super::IpSource;
    let row = |pinned: Option<&str>, lease: Option<&str>| VmRow {
        pinned_ip: pinned.map(Into::into),
        last_ip: lease.map(Into::into),
        ..test_row("a", "52:54:00:00:00:01")
    };
    let show = IpSource::of;
    assert_eq!(
        show(&row(Some("10.0.0.7"), Some("10.0.0.9"))),
        (Some("10.0.0.7".into()), Some(IpSource::Pinned))
    );
    assert_eq!(
        show(&row(None, Some("10.0.0.9"))),
        (Some("10.0.0.9".into()), Some(IpSource::Lease))
    );
    assert_eq!(show(&row(None, None)), (None, None));
    let wire = serde_json::to_value(IpSource::Pinned).unwrap();
    assert_eq!(wire, "pinned");
}
