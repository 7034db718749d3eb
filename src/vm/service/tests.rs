//! The VM service against libvirt's in-process test driver (`test:///default`, whose
//! state every connection of this process shares: names are unique per test).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{VmConfig, Vms};
use crate::store::Store;
use crate::vm::spec::Limits;
use crate::vm::{Libvirt, VmError};

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
fn audit(store: &Store) -> Vec<(String, String, Option<String>)> {
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
        Err::<(), _>(VmError::Libvirt("define failed".into()))
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
    assert_eq!(shown.state, "creating");
    assert_eq!(status.state, "creating");
    vms.set_pending("cre1", Some(super::Pending::Failed("libvirt: boom".into())));
    let status = vms.status(&name).await.unwrap();
    assert_eq!(status.state, "failed");
    assert_eq!(status.error.as_deref(), Some("libvirt: boom"));
    vms.set_pending("cre1", None);
    assert!(vms.status(&name).await.unwrap_err().is_not_found());
}
