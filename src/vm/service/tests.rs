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
    vms.set_pending("cre1", Some(super::Pending::Creating));
    let t0 = Instant::now();
    let listed = vms.list().await.unwrap();
    let status = vms.status("cre1").await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    let shown = listed.iter().find(|s| s.name == "cre1").unwrap();
    assert_eq!(shown.state, "creating");
    assert_eq!(status.state, "creating");
    vms.set_pending("cre1", Some(super::Pending::Failed("libvirt: boom".into())));
    let status = vms.status("cre1").await.unwrap();
    assert_eq!(status.state, "failed");
    assert_eq!(status.error.as_deref(), Some("libvirt: boom"));
    vms.set_pending("cre1", None);
    assert!(vms.status("cre1").await.unwrap_err().is_not_found());
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
        serde_json::from_value::<crate::vm::spec::CreateVm>(v).unwrap()
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
