//! `POST /vms` against the twin: the answer, the address, what a failure leaves.

use std::time::{Duration, Instant};

use super::{Harness, audit, eventually, harness, harness_with, ip, request, test_config, vm};
use crate::model::VmState;
use crate::store::vms;
use crate::vm::driver::memory::Step;
use crate::vm::driver::{DhcpHost, LibvirtKind, volumes};
use crate::vm::{Conflict, Invalid, VmError};

#[tokio::test]
async fn a_claim_lives_as_long_as_its_work_and_a_late_outcome_is_recorded() {
    let h = harness();
    let claim = h.vms.claim("late1").await.unwrap();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let work = async move {
        let _ = finished.await;
        Err::<(), _>(VmError::from(Conflict::NotRunning("late1".into())))
    };
    let operation = crate::vm::Operation::Create {
        name: "late1".into(),
        wait: true,
    };
    let answer = h
        .vms
        .to_the_end(claim, operation, Duration::from_millis(50), work)
        .await;
    assert!(matches!(answer, Err(VmError::Stalled(_))), "{answer:?}");
    // The request has its 504; the work goes on and keeps the name.
    assert!(
        matches!(h.vms.claim("late1").await, Err(VmError::Conflict(_))),
        "the name was freed while its work still ran"
    );
    finish.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.vms.claim("late1").await.is_err() {
        assert!(Instant::now() < deadline, "the claim outlived its work");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        audit(&h.store),
        vec![(
            "POST /vms late1 (finished after the answer)".to_string(),
            "failed".to_string(),
            Some("late1 is not running; start it instead".to_string())
        )]
    );
}

#[tokio::test]
async fn a_vm_being_created_shows_as_creating_and_reads_do_not_wait_for_it() {
    let h = harness();
    let name = vm("cre1");
    h.vms
        .set_pending("cre1", Some(super::super::Pending::Creating));
    let t0 = Instant::now();
    let listed = h.vms.list().await.unwrap();
    let status = h.vms.status(&name).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    let shown = listed.iter().find(|s| s.name == "cre1").unwrap();
    assert_eq!(shown.state, VmState::Creating);
    assert_eq!(status.state, VmState::Creating);
    let failed = super::super::Pending::Failed("libvirt: boom".into());
    h.vms.set_pending("cre1", Some(failed));
    let status = h.vms.status(&name).await.unwrap();
    assert_eq!(status.state, VmState::Failed);
    assert_eq!(status.error.as_deref(), Some("libvirt: boom"));
    h.vms.set_pending("cre1", None);
    assert!(h.vms.status(&name).await.unwrap_err().is_not_found());
}

/// A create answers with the lowest free address of the range; the VM runs, its host
/// entry and its row hold that address.
#[tokio::test]
async fn a_create_makes_the_vm_at_its_address_with_its_entry_and_row() {
    let h = harness();
    let created = h
        .vms
        .create(request("web1", serde_json::json!({})), "t")
        .await
        .unwrap();
    assert_eq!(created.ip, ip(2));
    assert_eq!(h.hv.running("web1"), Some(true));
    let row = h.store.with(|c| vms::get(c, "web1")).unwrap().unwrap();
    assert_eq!(row.pinned_ip, Some(ip(2).into()));
    assert_eq!(row.mac.to_string(), created.mac);
    let entry = DhcpHost {
        mac: Some(row.mac.clone()),
        name: Some("web1".into()),
        ip: Some(ip(2)),
    };
    assert_eq!(h.hv.host_entries("default"), [entry]);
    let vols = h.hv.volumes();
    assert!(vols.contains(&volumes::disk("web1")) && vols.contains(&volumes::seed("web1")));
    let again = h
        .vms
        .create(request("web1", serde_json::json!({})), "t")
        .await;
    assert!(
        matches!(again, Err(VmError::Conflict(Conflict::Exists(_)))),
        "{again:?}"
    );
    let next = h
        .vms
        .create(request("web2", serde_json::json!({})), "t")
        .await
        .unwrap();
    assert_eq!(next.ip, ip(3));
}

/// The address is the agent's choice: with the hypervisor frozen, `wait=false` answers
/// at once with it (the network was seen before), the VM shows as `creating`; after the
/// thaw the VM runs at that address, with its host entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_false_answers_with_the_address_while_the_hypervisor_is_frozen() {
    let h = harness();
    h.vms
        .create(request("first", serde_json::json!({})), "t")
        .await
        .unwrap();
    h.vms.list().await.unwrap();
    let frozen = h.hv.freeze();
    let steps_before = h.hv.steps().len();
    let t0 = Instant::now();
    let ip_answered = h
        .vms
        .create_in_background(request("second", serde_json::json!({})), "t")
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(ip_answered, ip(3));
    assert_eq!(
        h.hv.steps().len(),
        steps_before,
        "nothing asked of the hypervisor"
    );
    let status = h.vms.status(&vm("second")).await.unwrap();
    assert_eq!(status.state, VmState::Creating);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.hv.running("second"), None, "frozen: not made yet");
    drop(frozen);
    eventually("the VM runs after the thaw", || {
        h.hv.running("second") == Some(true)
    })
    .await;
    let entries = h.hv.host_entries("default");
    assert!(
        entries
            .iter()
            .any(|e| e.name.as_deref() == Some("second") && e.ip == Some(ip(3))),
        "{entries:?}"
    );
    eventually("the row is written", || {
        h.store.with(|c| vms::get(c, "second")).unwrap().is_some()
    })
    .await;
}

/// An address that turned out held when its entry was to be written (someone else took
/// it after the agent last saw the network) fails the create visibly: `failed` with the
/// reason, an audit row; no VM, no entry, and never another address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_taken_behind_the_agents_back_fails_the_create_visibly() {
    let h = harness();
    h.vms
        .create(request("first", serde_json::json!({})), "t")
        .await
        .unwrap();
    let frozen = h.hv.freeze();
    let promised = h
        .vms
        .create_in_background(request("late", serde_json::json!({})), "t")
        .await
        .unwrap();
    assert_eq!(promised, ip(3));
    let outsider = DhcpHost {
        mac: Some("52:54:00:99:99:99".parse().unwrap()),
        name: Some("outsider".into()),
        ip: Some(ip(3)),
    };
    h.hv.add_outside_entry("default", outsider);
    drop(frozen);
    // Its outcome is recorded once its work ended: then it shows as failed.
    let action = "POST /vms late (wait=false) (finished after the answer)";
    let recorded = || audit(&h.store).into_iter().find(|r| r.0 == action);
    eventually("the create's outcome is recorded", || recorded().is_some()).await;
    assert_eq!(recorded().unwrap().1, "failed");
    let status = h.vms.status(&vm("late")).await.unwrap();
    assert_eq!(status.state, VmState::Failed);
    let why = status.error.unwrap();
    assert!(
        why.contains("10.77.0.3") && why.contains("outsider"),
        "{why}"
    );
    assert_eq!(h.hv.running("late"), None);
    let entries = h.hv.host_entries("default");
    assert!(
        !entries.iter().any(|e| e.name.as_deref() == Some("late")),
        "{entries:?}"
    );
    // The next create sees the network as it is now.
    let next = h
        .vms
        .create(request("late", serde_json::json!({})), "t")
        .await
        .unwrap();
    assert_eq!(next.ip, ip(4));
}

/// A create the hypervisor refuses part-way (the start) answers the error and leaves
/// nothing: no row, no domain, no volume, no entry, the name free and not shown.
#[tokio::test]
async fn a_create_the_hypervisor_refuses_half_way_leaves_nothing_behind() {
    let h = harness();
    h.hv.refuse(Step::Start, LibvirtKind::Failed, "QEMU did not start");
    let err = h
        .vms
        .create(request("half", serde_json::json!({})), "t")
        .await
        .unwrap_err();
    assert!(matches!(err, VmError::Libvirt(_)), "{err:?}");
    assert!(err.to_string().contains("QEMU did not start"), "{err}");
    assert_eq!(h.hv.running("half"), None);
    assert_eq!(h.store.with(|c| vms::get(c, "half")).unwrap(), None);
    assert_eq!(h.hv.volumes(), [volumes::image("base")]);
    assert!(h.hv.host_entries("default").is_empty());
    assert!(h.vms.status(&vm("half")).await.unwrap_err().is_not_found());
    drop(h.vms.claim("half").await.expect("the name is free"));
    h.hv.allow(Step::Start);
    let made = h
        .vms
        .create(request("half", serde_json::json!({})), "t")
        .await
        .unwrap();
    assert_eq!(made.ip, ip(2), "its address was given back");
}

/// A create cut off inside libvirt (its connection lost after the define: its undo could
/// not reach libvirt either) is remembered: the next create of the name first removes what
/// it made, then is told to retry (503) while libvirt may still carry out what it sent.
#[tokio::test]
async fn a_create_cut_off_inside_libvirt_is_removed_by_the_next_one() {
    let h = harness();
    h.hv.away_after(Step::Define);
    let err = h
        .vms
        .create(request("cut", serde_json::json!({})), "t")
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(h.hv.running("cut"), Some(false), "defined, never started");
    h.hv.away(false);
    let again = h
        .vms
        .create(request("cut", serde_json::json!({})), "t")
        .await;
    assert!(
        matches!(
            &again,
            Err(VmError::Unavailable(crate::vm::Unavailable::CutOff { .. }))
        ),
        "{again:?}"
    );
    assert_eq!(h.hv.running("cut"), None);
    assert!(!h.hv.volumes().contains(&volumes::disk("cut")));
    assert!(
        audit(&h.store)
            .iter()
            .any(|r| r.0 == "remove abandoned create")
    );
    // Its entry's removal was cut off too: the reconcile takes it away.
    h.vms.reconcile().await.unwrap();
    assert!(h.hv.host_entries("default").is_empty());
}

/// The first create on a network the agent has not seen asks libvirt for it, and waits
/// at most LIBVIRT_TIMEOUT (503); nothing is held for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_never_seen_is_asked_for_and_waited_for_only_so_long() {
    let h = harness_with(test_config(), Duration::from_millis(300));
    let frozen = h.hv.freeze();
    let t0 = Instant::now();
    let err = h
        .vms
        .create_in_background(request("x", serde_json::json!({})), "t")
        .await;
    assert!(err.as_ref().is_err_and(VmError::is_unavailable), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    drop(frozen);
    assert!(h.vms.status(&vm("x")).await.unwrap_err().is_not_found());
}

/// With libvirtd on this host, a kernel or initrd this host cannot read is the request's
/// fault, found before the hypervisor is asked for anything; a remote libvirtd's files
/// are its own business.
#[tokio::test]
async fn boot_files_the_host_cannot_read_are_refused_before_anything_is_defined() {
    let h = harness();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let kernel = kernel.to_string_lossy().into_owned();
    let dir_path = dir.path().to_string_lossy().into_owned();
    for (name, body, names, why) in [
        (
            "boot1",
            serde_json::json!({"kernel": "/nonexistent/vmlinuz"}),
            "/nonexistent/vmlinuz",
            "No such file",
        ),
        (
            "boot2",
            serde_json::json!({"kernel": kernel, "initrd": "/nonexistent/initrd.img"}),
            "/nonexistent/initrd.img",
            "No such file",
        ),
        (
            "boot3",
            serde_json::json!({"kernel": dir_path}),
            dir_path.as_str(),
            "not a regular file",
        ),
    ] {
        let e = h.vms.create(request(name, body), "t").await.unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, VmError::Invalid(Invalid::BootFile { .. })),
            "{e:?}"
        );
        assert!(text.contains(names) && text.contains(why), "{text}");
    }
    assert!(h.hv.steps().is_empty(), "{:?}", h.hv.steps());
    let remote = harness_with(
        crate::vm::VmConfig {
            local: false,
            ..test_config()
        },
        Duration::from_secs(30),
    );
    let req = request(
        "boot4",
        serde_json::json!({"kernel": "/nonexistent/vmlinuz"}),
    );
    remote.vms.create(req, "t").await.unwrap();
    assert_eq!(remote.hv.running("boot4"), Some(true));
}

/// What the host cannot run is refused (400) before the address's entry is written.
#[tokio::test]
async fn what_the_host_cannot_run_is_refused_before_the_entry_is_written() {
    let h: Harness = harness();
    let arm = request("arm", serde_json::json!({"os_arch": "aarch64"}));
    let e = h.vms.create(arm, "t").await.unwrap_err();
    assert!(
        matches!(e, VmError::Invalid(Invalid::Guest { .. })),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("it offers x86_64/kvm, x86_64/qemu"),
        "{e}"
    );
    let big = request("big", serde_json::json!({"memory_mib": 4096, "vcpus": 4}));
    h.vms.create(big, "t").await.unwrap();
    assert!(!h.hv.steps().contains(&Step::RemoveHostEntry));
    assert_eq!(h.hv.host_entries("default").len(), 1);
}
