//! `/vms` and `/stats` through the whole application, over libvirt's in-process test
//! driver.

use super::*;

/// Requests to refuse, part 1.
fn bad_vm_requests_1(long: &str) -> Vec<(&str, String, Option<String>, StatusCode)> {
    vec![
        (
            "POST",
            "/vms".into(),
            Some("{".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some("[]".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some("".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"../x"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a'b"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a\"b"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"<x>"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(format!(r#"{{"name":"{long}"}}"#)),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","memory_mib":0}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","memory_mib":99999999999}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
    ]
}

/// Requests to refuse, part 2.
fn bad_vm_requests_2() -> Vec<(&'static str, String, Option<String>, StatusCode)> {
    vec![
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","memory_mib":"1024"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","vcpus":-1}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","disk_size_gb":0}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","os_arch":"z80"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","network_name":"../n"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","ssh_authorized_keys":["not a key"]}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a","extra":true}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        // No such image (the default image has no URL here): 404, nothing made.
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"a"}"#.into()),
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/vms/..%2Fx/status".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
    ]
}

/// Requests to refuse, part 3.
fn bad_vm_requests_3() -> Vec<(&'static str, String, Option<String>, StatusCode)> {
    vec![
        (
            "GET",
            "/vms/a'b/status".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/vms/nope/status".into(),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/vms/nope/start".into(),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/vms/nope/stop?force=yes".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/vms/nope/stop?colour=red".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "DELETE",
            "/vms/nope?delete_files=true".into(),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/vms/nope/ip?timeout=601".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/vms/nope/ip?timeout=-1".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/vms/nope/ip?network=../x".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/vms/nope/console?bytes=0".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
    ]
}

/// Requests to refuse, part 4.
fn bad_vm_requests_4() -> Vec<(&'static str, String, Option<String>, StatusCode)> {
    vec![
        (
            "POST",
            "/images".into(),
            Some(r#"{"name":"../i","url":"http://h/x","sha256":"00"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images".into(),
            Some(format!(
                r#"{{"name":"i","url":"ftp://h/x","sha256":"{}"}}"#,
                "0".repeat(64)
            )),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images".into(),
            Some(r#"{"name":"i","url":"http://h/x","sha256":"zz"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images".into(),
            Some(r#"{"name":"i","url":"http://h/x"}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images/..%2Fi".into(),
            Some("data".into()),
            StatusCode::BAD_REQUEST,
        ),
        // A URL with CR/LF would put a line of the sender's choosing into the log.
        (
            "POST",
            "/images".into(),
            Some(format!(
                r#"{{"name":"i","url":"http://h/x
FAKE LOG LINE","sha256":"{}"}}"#,
                "0".repeat(64)
            )),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/images".into(),
            Some(format!(
                r#"{{"name":"i","url":"http://h/x","sha256":"{}"}}"#,
                "0".repeat(64)
            )),
            StatusCode::BAD_REQUEST,
        ),
        // A secret field of the wrong type is refused without quoting it.
        (
            "POST",
            "/vms".into(),
            Some(r#"{"name":"ok9","user_data":424242}"#.into()),
            StatusCode::BAD_REQUEST,
        ),
    ]
}

/// Requests to refuse, part 5.
fn bad_vm_requests_5() -> Vec<(&'static str, String, Option<String>, StatusCode)> {
    vec![("DELETE", "/images/nope".into(), None, StatusCode::NOT_FOUND)]
}

#[tokio::test]
async fn bad_vm_requests_get_a_json_4xx_and_change_nothing() {
    let h = harness();
    let before = vm_snapshot(&h).await;
    let long = "x".repeat(200);
    let cases: Vec<(&str, String, Option<String>, StatusCode)> = [
        bad_vm_requests_1(&long),
        bad_vm_requests_2(),
        bad_vm_requests_3(),
        bad_vm_requests_4(),
        bad_vm_requests_5(),
    ]
    .concat();
    for (method, uri, body, want) in &cases {
        let (s, v) = h.authed(method, uri, body.as_deref()).await;
        assert_eq!(s, *want, "{method} {uri} {body:?}: {v}");
        assert_eq!(v["ok"], false, "{method} {uri}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert!(!v.to_string().contains("424242"), "{v}");
    }
    assert!(
        !format!("{:?}", h.audit_rows()).contains("424242"),
        "{:?}",
        h.audit_rows()
    );
    assert_eq!(vm_snapshot(&h).await, before);
    // Every route needs the token.
    for (m, u) in [
        ("GET", "/vms"),
        ("POST", "/vms"),
        ("GET", "/images"),
        ("GET", "/stats"),
        ("POST", "/images/x"),
    ] {
        let (s, v) = h.call(m, u, None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {u}: {v}");
    }
}

#[tokio::test]
async fn the_vm_list_and_stats_come_from_libvirt() {
    let h = harness();
    let (s, v) = h.authed("GET", "/vms", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // libvirt's test driver always has its domain "test", which the agent did not make.
    let test = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "test")
        .cloned()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(test["managed"], false);
    assert_eq!(test["state"], "running");
    // ... and the agent never deletes it.
    let (s, e) = h
        .authed("DELETE", "/vms/test?delete_files=true", None)
        .await;
    assert_error(s, &e, StatusCode::CONFLICT, "not created by this agent");
    let (s, st) = h.authed("GET", "/stats", None).await;
    assert_eq!(s, StatusCode::OK, "{st}");
    assert_eq!(st["ok"], true);
    assert!(st["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(st["ram"]["total_mb"].as_u64().unwrap() >= st["ram"]["free_mb"].as_u64().unwrap());
    assert!(st["vms"]["total"].as_u64().unwrap() >= 1, "{st}");
}

/// An operation the connection's libvirt driver lacks (the test driver has no DHCP
/// leases) is a 501 naming it, not a 500: the node's libvirt, not the agent, is what
/// cannot do it (found by schemathesis).
#[tokio::test]
async fn an_operation_the_libvirt_driver_lacks_is_a_501_that_names_it() {
    let h = harness();
    let (s, e) = h.authed("GET", "/vms/test/ip?timeout=0", None).await;
    assert_error(
        s,
        &e,
        StatusCode::NOT_IMPLEMENTED,
        "this node's libvirt cannot do it: reading DHCP leases",
    );
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("virNetworkGetDHCPLeases"),
        "{e}"
    );
    let doc = h.authed("GET", "/openapi.json", None).await.1;
    let ip = &doc["paths"]["/vms/{name}/ip"]["get"]["responses"]["501"];
    assert!(ip.is_object(), "the document lists the 501");
}

#[tokio::test]
async fn the_vm_list_and_status_show_the_instance_id() {
    let h = harness();
    let id = uuid::Uuid::new_v4().simple().to_string();
    // A VM whose domain runs (the test driver's own "test", given a row in this harness's
    // store), one whose domain vanished ("missing"), and a domain carrying the agent's
    // metadata without a row.
    let gone = format!("nva-gone-{id}");
    let rows = [
        ("test", format!("iid-running-{id}"), "52:54:00:00:00:41"),
        (gone.as_str(), format!("iid-gone-{id}"), "52:54:00:00:00:42"),
    ];
    for (name, iid, mac) in &rows {
        let mut row = crate::store::vms::test_row(name, mac);
        row.instance_id = iid.clone();
        h.store
            .transaction(|tx| {
                crate::store::vms::upsert(tx, &row, &crate::store::vms::SeedInputs::default())
            })
            .unwrap();
    }
    let orphan = format!("nva-orphan-{id}");
    let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let orphan_uuid = uuid::Uuid::new_v4().to_string();
    let orphan_iid = format!("iid-orphan-{id}");
    let dom = conn
        .define_domain_xml(&crate::vm::driver::libvirt::testing::domain(
            &crate::vm::driver::libvirt::testing::DomainSpec {
                name: &orphan,
                uuid: &orphan_uuid,
                domain_type: "qemu",
                memory_mib: 128,
                vcpus: 1,
                arch: "x86_64",
                pool: "default-pool",
                disk_volume: "nva-orphan-disk.qcow2",
                seed_volume: "nva-orphan-seed.img",
                network: "default",
                mac: "52:54:00:00:00:43",
                console_log: None,
                kernel: None,
                initrd: None,
                cmdline: None,
                instance_id: &orphan_iid,
            },
        ))
        .unwrap();
    let (s, list) = h.authed("GET", "/vms", None).await;
    let mut statuses = Vec::new();
    for name in ["test", gone.as_str(), orphan.as_str()] {
        statuses.push(h.authed("GET", &format!("/vms/{name}/status"), None).await);
    }
    dom.undefine().unwrap();

    assert_eq!(s, StatusCode::OK, "{list}");
    let want = [
        ("test", json!(format!("iid-running-{id}")), true),
        (gone.as_str(), json!(format!("iid-gone-{id}")), true),
        (orphan.as_str(), json!(orphan_iid), false),
    ];
    for ((name, iid, managed), (s, status)) in want.iter().zip(&statuses) {
        let listed = list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == *name)
            .unwrap_or_else(|| panic!("{name} not in {list}"));
        assert_eq!(listed["instance_id"], *iid, "{listed}");
        assert_eq!(listed["managed"], *managed, "{listed}");
        assert_eq!(*s, StatusCode::OK, "{status}");
        assert_eq!(status["status"]["instance_id"], *iid, "{status}");
        // The status is the listing's entry plus the VM's port maps.
        let mut status = status["status"].clone();
        let maps = status.as_object_mut().unwrap().remove("port_maps");
        assert_eq!(maps, Some(json!([])), "{status}");
        assert_eq!(status, *listed);
    }
    assert_eq!(statuses[1].1["status"]["state"], "missing");
    // Another harness (no row for "test"): a domain the agent did not create has none.
    let other = harness();
    let (_, st) = other.authed("GET", "/vms/test/status", None).await;
    assert!(st["status"]["instance_id"].is_null(), "{st}");
    assert_eq!(st["status"]["managed"], false);
    // The document says so (scripts/contract.sh holds every answer to it).
    let doc = served_document().await;
    let prop = &doc["components"]["schemas"]["VmStatus"]["properties"]["instance_id"];
    assert_eq!(prop["type"], json!(["string", "null"]), "{prop}");
}

/// `ip` on `POST /vms`: not an IPv4 address, or outside the network's DHCP range, is a
/// 400 in the usual error shape, before anything is created.
#[tokio::test]
async fn a_create_asking_for_an_ip_outside_the_range_is_refused() {
    let h = harness();
    let kernel = tempfile::NamedTempFile::new().unwrap();
    let kernel = kernel.path().to_string_lossy().into_owned();
    for (ip, says) in [
        ("::1", "ip"),
        ("192.168.122.300", "ip"),
        ("10.9.9.9", "DHCP range"),
    ] {
        let body = json!({"name": "ipwant", "kernel": kernel, "memory_mib": 64, "ip": ip});
        let (s, v) = h.authed("POST", "/vms", Some(&body.to_string())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{ip}: {v}");
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{ip}: {v}");
    }
    let (s, _) = h.authed("GET", "/vms/ipwant/status", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A domain started and destroyed outside the agent (another connection to the same
/// test driver, as `virsh` would be) shows in `GET /vms/{name}/status` through libvirt's
/// lifecycle events: seen before the agent's own listing is old enough to be redone
/// (`observed::FRESH`), so nothing but the event can have told it.
#[tokio::test]
async fn an_outside_change_reaches_the_status_through_libvirt_events() {
    use crate::vm::service::FRESH;
    use std::time::{Duration, Instant};
    let h = harness();
    let seen_within = |name: &'static str, want: &'static str, since: Instant| {
        let h = &h;
        async move {
            loop {
                let (s, v) = h.authed("GET", &format!("/vms/{name}/status"), None).await;
                let state = if s == StatusCode::OK {
                    v["status"]["state"].as_str().unwrap_or_default().to_owned()
                } else {
                    s.as_u16().to_string()
                };
                if state == want {
                    return since.elapsed();
                }
                assert!(
                    since.elapsed() < FRESH - Duration::from_millis(100),
                    "{name} not {want} after {:?} (last: {state})",
                    since.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    crate::vm::driver::libvirt::testing::ensure_loaded().unwrap();
    let outside = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let xml = "<domain type='test'><name>evtest</name><memory>8192</memory>\
               <os><type>hvm</type></os></domain>";

    let (s, v) = h.authed("GET", "/vms", None).await;
    let listed = Instant::now();
    assert_eq!(s, StatusCode::OK, "{v}");
    let dom = outside.define_domain_xml(xml).unwrap();
    dom.create().unwrap();
    seen_within("evtest", "running", listed).await;

    let (s, v) = h.authed("GET", "/vms", None).await;
    let listed = Instant::now();
    assert_eq!(s, StatusCode::OK, "{v}");
    dom.destroy().unwrap();
    seen_within("evtest", "shutoff", listed).await;
    dom.undefine().unwrap();
    seen_within("evtest", "404", listed).await;
}

/// `POST /vms?wait=false` answers 202 at once with the VM `creating`; a failure that
/// comes later (here libvirt's test driver refuses the guest) shows in the VM's status,
/// state `failed` with the error, and in the audit log. A bad request is still refused
/// at once, and the default stays synchronous.
#[tokio::test]
async fn a_create_without_waiting_answers_202_and_its_later_failure_is_visible() {
    let h = harness();
    // A kernel this host can read: the harness's libvirt counts as local, and a missing
    // one would be refused at once.
    let kernel = tempfile::NamedTempFile::new().unwrap();
    let kernel = kernel.path().to_string_lossy().into_owned();
    let body = json!({"name": "bg1", "kernel": kernel, "memory_mib": 64}).to_string();
    let (s, v) = h.authed("POST", "/vms?wait=false", Some(&body)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let ip: std::net::Ipv4Addr = v["ip"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        ip.octets()[..3],
        [192, 168, 122],
        "pinned in the test network's range"
    );
    assert_eq!(
        v,
        json!({"ok": true, "name": "bg1", "state": "creating", "ip": ip.to_string()})
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        let (s, v) = h.authed("GET", "/vms/bg1/status", None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if v["status"]["state"] != "creating" {
            break v["status"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("cannot run x86_64 guests"),
        "{status}"
    );
    let (s, v) = h.authed("GET", "/vms", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|vm| vm["name"] == "bg1" && vm["state"] == "failed"),
        "{v}"
    );
    // The late outcome's audit row follows the state within moments.
    let late = |r: &AuditRow| r.1 == "POST /vms bg1 (wait=false) (finished after the answer)";
    while !h.audit_rows().iter().any(late) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let rows = h.audit_rows();
    assert!(
        rows.iter()
            .any(|r| r.1 == "POST /vms" && r.2 == "ok" && r.3 == Some(202)),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(
            |r| r.1 == "POST /vms bg1 (wait=false) (finished after the answer)"
                && r.2 == "failed"
                && r.4
                    .as_deref()
                    .is_some_and(|e| e.contains("cannot run x86_64 guests"))
        ),
        "{rows:?}"
    );
    // Deleting the failed create clears it.
    let (s, v) = h.authed("DELETE", "/vms/bg1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) = h.authed("GET", "/vms/bg1/status", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v) = h
        .authed("POST", "/vms?wait=false", Some(r#"{"name": "bad name"}"#))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // The texts clients see for a bad name (`model::name` holds the rule).
    assert_eq!(
        v["error"],
        "name \"bad name\" is not valid: character ' ' is not allowed in a name \
         (letters, digits, '_', '.', '-')"
    );
    let (s, v) = h.authed("POST", "/vms/-x/start", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        v["error"],
        "VM name \"-x\" is not valid: a name must start with a letter or digit"
    );
    let (s, v) = h.authed("POST", "/vms?wait=maybe", Some(&body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = h.authed("POST", "/vms", Some(&body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "synchronous by default: {v}");
}
