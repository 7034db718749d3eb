//! The VM lifecycle against a real libvirtd and a real guest: libvirtd runs inside the
//! test topology's node namespace (scripts/libvirt-netns.sh), so its bridge virbr0,
//! dnsmasq and the guests exist only there; the guest is the tiny TCG guest of
//! scripts/build-tiny-guest.sh, booted directly from its kernel with a disk backed by an
//! uploaded image and the agent's cloud-init seed.
//!
//! libvirtd's control socket is machine-wide, so the tests of this file take turns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::libvirt::{
    BOOT, Env, WAIT, env, libvirtd_speed, remote_env, tiny_vm, virsh, wait_until,
};
use support::netns::enter_netns;
use support::*;

/// SSH_AUTHORIZED_KEYS of the lifecycle test's agent; a create may bring its own.
const DEFAULT_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdMCdPexVOBbnwk88Mu0xzRCNPTt7FdrDtvNeHvBpso ops@node";

#[test]
fn a_vm_lives_its_whole_life_through_the_api() {
    let _turn = support::libvirt::turn();
    let e = env(&[
        ("RECONCILE_INTERVAL", "2"),
        ("SSH_AUTHORIZED_KEYS", DEFAULT_KEY),
    ]);
    let api = &e.agent.api;
    let (kernel, initrd) = e.scratch.guest();

    // An image arrives as a raw upload (a small blank raw disk is enough for a guest
    // that lives in its initramfs).
    let r = e.upload_image("tiny", &vec![0u8; 4 << 20]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["image"]["state"], "ready");
    assert!(
        e.volumes().contains(&"image.tiny".to_owned()),
        "{:?}",
        e.volumes()
    );

    // Refused creates leave nothing behind.
    for bad in [
        json!({"name": "../x"}),
        json!({"name": "a'b\""}),
        json!({"name": "<x>"}),
        json!({"name": "x".repeat(200)}),
        json!({"name": "ok1", "network_name": "no-such-net", "image": "tiny"}),
        json!({"name": "ok2", "memory_mib": 0, "image": "tiny"}),
        json!({"name": "ok3", "memory_mib": 16_000_000, "image": "tiny"}),
        json!({"name": "ok4", "image": "missing"}),
        json!({"name": "ok5", "image": "tiny", "disk_size_gb": "big"}),
        json!({"name": "ok6", "image": "tiny", "unknown": 1}),
    ] {
        let r = api.post("/vms", &bad);
        r.assert_error(|s| (400..500).contains(&s));
    }
    // An architecture the libvirt host has no emulator for (this one installs only
    // qemu-system-x86) is a 400 that says what the host offers, not a libvirt error.
    if !virsh(&["capabilities"]).contains("<arch name='aarch64'>") {
        let r = api.post(
            "/vms",
            &json!({"name": "ok7", "image": "tiny", "os_arch": "aarch64"}),
        );
        r.assert_error(|s| s == 400);
        let msg = r.json()["error"].as_str().unwrap_or_default();
        assert!(msg.contains("cannot run aarch64 guests"), "{msg}");
        assert!(msg.contains("x86_64/qemu"), "{msg}");
    }
    // A start that fails is the create's own error, and what the create made is gone
    // again; a kernel the libvirt host cannot read is the request's fault (400).
    let mut unbootable = tiny_vm("ok8", "/nonexistent/vmlinuz", &initrd);
    unbootable["initrd"] = json!(initrd);
    let r = api.post("/vms", &unbootable);
    r.assert_error(|s| s == 400);
    let msg = r.json()["error"].as_str().unwrap_or_default();
    assert!(msg.contains("/nonexistent/vmlinuz"), "{msg}");
    assert!(e.domains().is_empty(), "{:?}", e.domains());
    assert!(
        !e.volumes().iter().any(|v| v.starts_with("vm.")),
        "{:?}",
        e.volumes()
    );
    assert_eq!(e.agent.sql("select count(*) from vms").trim(), "0");

    // An inactive network is started (and set to autostart) by the create, as the
    // original did.
    virsh(&["net-destroy", "default"]);
    assert!(virsh(&["net-info", "default"]).contains("Active:         no"));

    // Create, twice at once: one wins, the other gets a 409 (busy, or exists).
    let body = tiny_vm("tiny1", &kernel, &initrd);
    let (r, other) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let t = Instant::now();
            (api.post("/vms", &body), t.elapsed())
        });
        let b = s.spawn(|| api.post("/vms", &body));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (r, took) = r;
    let (r, other) = if r.status == 200 {
        (r, other)
    } else {
        (other, r)
    };
    let create_ms = took.as_secs_f64() * 1000.0;
    assert_eq!(r.status, 200, "{r:?}\n{}", e.agent.log());
    other.assert_error(|s| s == 409);
    assert_eq!(e.domains(), vec!["tiny1".to_owned()]);
    let created = r.json().clone();
    assert_eq!(created["ok"], true);
    assert_eq!(created["name"], "tiny1");
    eprintln!("POST /vms took {create_ms:.1} ms");
    let instance_id = created["instance_id"].as_str().unwrap().to_owned();
    let mac = created["mac"].as_str().unwrap().to_owned();
    assert_eq!(e.state("tiny1"), "running");
    let net = virsh(&["net-info", "default"]);
    assert!(net.contains("Active:         yes"), "{net}");
    assert!(net.contains("Autostart:      yes"), "{net}");
    let vols = e.volumes();
    for v in ["vm.tiny1.disk.qcow2", "vm.tiny1.seed.img"] {
        assert!(vols.contains(&v.to_owned()), "{v} missing: {vols:?}");
    }

    // Its tap is a bridge port here, so it gets hairpin mode (a VM reaching a node port
    // mapped back to a VM on the same bridge, with br_netfilter loaded).
    let tap = tap_of("tiny1", &mac);
    let hairpin = e
        .topo
        .node
        .exec_ok(&["cat", &format!("/sys/class/net/{tap}/brport/hairpin_mode")]);
    assert_eq!(hairpin.trim(), "1", "hairpin on {tap}");

    // The address is pinned before the first boot: the create answered it, the network
    // holds its DHCP host entry, and `/ip` answers it at once (no lease to wait for).
    let ip: Ipv4Addr = created["ip"].as_str().unwrap().parse().unwrap();
    let t = Instant::now();
    let r = api.get("/vms/tiny1/ip?timeout=120&network=default");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(r.json()["ip"], ip.to_string());
    assert_eq!(r.json()["name"], "tiny1");
    let entry = format!("<host mac='{mac}' name='tiny1' ip='{ip}'/>");
    assert!(
        virsh(&["net-dumpxml", "default"]).contains(&entry),
        "{entry}"
    );
    assert_eq!(
        e.agent
            .sql("select pinned_ip from vms where name='tiny1'")
            .trim(),
        ip.to_string()
    );
    // The listing and the status tell the same address, and that it is pinned.
    let listed = api.get("/vms");
    let shown = listed.json()["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tiny1")
        .cloned()
        .unwrap_or_else(|| panic!("{listed:?}"));
    let status = api.get("/vms/tiny1/status").json()["status"].clone();
    for v in [&shown, &status] {
        assert_eq!(
            (v["ip"].as_str(), v["ip_source"].as_str()),
            (Some(ip.to_string().as_str()), Some("pinned")),
            "{v}"
        );
    }

    // The guest booted with its own seed: hostname and instance-id are the VM's.
    let marker = e.wait_ready("tiny1", 1);
    // Its first DHCP lease is the pinned address.
    let lease = virsh(&["net-dhcp-leases", "default", "--mac", &mac]);
    assert!(lease.contains(&format!("{ip}/")), "{lease}");
    assert_eq!(
        marker.get(1).map(String::as_str),
        Some("tiny1"),
        "{marker:?}"
    );
    assert_eq!(e.guest_http(ip, "/hostname").trim(), "tiny1");
    assert_eq!(e.guest_http(ip, "/instance-id").trim(), instance_id);
    // The generated user-data carries the default key (the request brought none), sets
    // the hostname, and has no password of any kind.
    let user_data = e.guest_http(ip, "/user-data");
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    assert!(user_data.contains(DEFAULT_KEY), "{user_data}");
    assert!(user_data.contains("\"hostname\":\"tiny1\""), "{user_data}");
    assert!(!user_data.contains("passw"), "{user_data}");

    // A port map reaches the guest's HTTP server from the client namespace.
    let r = api.post(
        "/ports",
        &json!({"listen_port": 18080, "target_ip": ip.to_string(), "target_port": 80}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let body = e.via_node_port(18080, "/hostname");
    assert_eq!(body.trim(), "tiny1");
    // So does a map that names the VM: it goes to the pinned address.
    let r = api.post(
        "/ports",
        &json!({"listen_port": 18081, "target_vm": "tiny1", "target_port": 80}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["rule"]["target_ip"], ip.to_string());
    assert_eq!(e.via_node_port(18081, "/hostname").trim(), "tiny1");
    // Its counters saw that request: at least one connection, packets both ways.
    let one = api.get("/ports/18081").json()["rule"].clone();
    assert_eq!(one["target_vm"], "tiny1", "{one}");
    assert!(one["connections"].as_u64() >= Some(1), "{one}");
    assert!(one["packets"].as_u64() >= Some(4), "{one}");
    assert!(one["bytes"].as_u64() > one["packets"].as_u64(), "{one}");
    // The VM's status lists both maps to its address.
    let maps = api.get("/vms/tiny1/status").json()["status"]["port_maps"].clone();
    assert_eq!(maps.as_array().map(Vec::len), Some(2), "{maps}");
    assert_eq!(maps[0]["rule_id"], "18080", "{maps}");
    assert_eq!(maps[0]["target_ip"], ip.to_string(), "{maps}");
    assert_eq!(maps[1]["rule_id"], "18081", "{maps}");
    assert_eq!(maps[1]["target_vm"], "tiny1", "{maps}");

    // Listed as the agent's, next to a domain someone else defined.
    let foreign = e.scratch.path("foreign.xml");
    std::fs::write(
        &foreign,
        "<domain type='qemu'><name>foreign1</name><memory unit='MiB'>64</memory>\
         <os><type arch='x86_64'>hvm</type></os><devices><interface type='network'>\
         <source network='default'/><mac address='52:54:00:99:99:99'/></interface>\
         </devices></domain>",
    )
    .unwrap();
    virsh(&["define", &foreign.to_string_lossy()]);
    // Reads answer from the last observation: an outside change shows within a second
    // (libvirt's event), not necessarily in the very next read.
    let defined = Instant::now();
    let list = loop {
        let r = api.get("/vms");
        assert_eq!(r.status, 200, "{r:?}");
        let list = r.json()["vms"].as_array().unwrap().clone();
        if list.iter().any(|v| v["name"] == "foreign1") {
            break list;
        }
        assert!(
            defined.elapsed() < Duration::from_secs(1),
            "a domain defined outside the agent is not listed after a second"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let find = |n: &str| {
        list.iter()
            .find(|v| v["name"] == n)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(find("tiny1")["managed"], true);
    assert_eq!(find("tiny1")["state"], "running");
    assert_eq!(find("foreign1")["managed"], false);
    api.delete("/vms/foreign1?delete_files=true")
        .assert_error(|s| s == 409);
    assert!(e.domains().contains(&"foreign1".to_owned()));
    // No lease for its MAC: a bounded wait, then 504.
    let t = Instant::now();
    api.call_waiting("GET", "/vms/foreign1/ip?timeout=1", BOOT)
        .assert_error(|s| s == 504);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // Graceful stop: the guest powers off on the ACPI button, nothing is forced.
    let r = api.call_waiting("POST", "/vms/tiny1/stop", BOOT);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["forced"], false, "{r:?}");
    assert_eq!(e.state("tiny1"), "shutoff");
    assert_eq!(
        e.agent
            .sql("select desired_state from vms where name='tiny1'")
            .trim(),
        "stopped"
    );

    // As an agent before the interactive console defined it: a file for its serial
    // port, which libvirt cannot open a console on.
    let pty = virsh(&["dumpxml", "--inactive", "tiny1"]);
    let (log, old) = with_a_file_for_its_serial_port(&pty);
    let path = e.scratch.path("tiny1-old.xml");
    std::fs::write(&path, old).unwrap();
    virsh(&["define", &path.to_string_lossy()]);
    assert!(virsh(&["dumpxml", "tiny1"]).contains("<serial type='file'>"));

    // Start again: defined again with a pty that logs to the same file (the console
    // still shows the first boot: two READY markers); the pinned address again; the
    // guest answers on it.
    let r = api.post("/vms/tiny1/start", &json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    e.wait_ready("tiny1", 2);
    let now = virsh(&["dumpxml", "tiny1"]);
    assert!(now.contains("<serial type='pty'>"), "{now}");
    assert!(
        now.contains(&format!("<log file='{log}' append='on'/>")),
        "{now}"
    );
    let r = api.call_waiting("GET", "/vms/tiny1/ip?timeout=120", BOOT);
    assert_eq!(r.status, 200, "{r:?}");
    let ip2: Ipv4Addr = r.json()["ip"].as_str().unwrap().parse().unwrap();
    assert_eq!(ip2, ip);
    assert_eq!(e.guest_http(ip2, "/hostname").trim(), "tiny1");
    let lease = virsh(&["net-dhcp-leases", "default", "--mac", &mac]);
    assert!(lease.contains(&format!("{ip}/")), "{lease}");

    // Reboot: the guest comes up a third time without a stop in between.
    let r = api.post("/vms/tiny1/reboot", &json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    e.wait_ready("tiny1", 3);
    assert_eq!(e.state("tiny1"), "running");

    twin_creates_get_different_addresses(&e, ip, &kernel, &initrd);

    // The image backs the VM's disk: it cannot go.
    api.delete("/images/tiny").assert_error(|s| s == 409);

    // Someone destroys the domain behind the agent's back: libvirt's lifecycle event
    // has it in the status within a second (the last full listing, kept 1 s, said
    // `running`), and in `vms.last_state`.
    assert_eq!(e.state("tiny1"), "running");
    virsh(&["destroy", "tiny1"]);
    let destroyed = Instant::now();
    while e.state("tiny1") != "shutoff" {
        assert!(
            destroyed.elapsed() < Duration::from_secs(1),
            "the outside destroy was not seen within a second"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("outside destroy seen after {:?}", destroyed.elapsed());
    let recorded = Instant::now();
    while e
        .agent
        .sql("select last_state from vms where name = 'tiny1'")
        .trim()
        != "shutoff"
    {
        assert!(
            recorded.elapsed() < Duration::from_secs(5),
            "vms.last_state"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... then undefines it: reconcile defines it again from its row and starts it
    // (desired state: running).
    virsh(&["undefine", "tiny1"]);
    wait_redefined(&e, "tiny1");
    e.wait_ready("tiny1", 4);
    // What the agent did on its own is in the audit trail.
    assert_eq!(
        e.agent
            .sql("select identity, parameters from audit_log where action = 'reconcile VM'")
            .trim(),
        r#"agent|{"repaired":["domain defined again","domain started"],"vm":"tiny1"}"#
    );

    // The same name again is a conflict; with "recreate" it is a fresh VM: new
    // instance-id, new disk and seed, and the guest boots with the new identity.
    api.post("/vms", &tiny_vm("tiny1", &kernel, &initrd))
        .assert_error(|s| s == 409);
    let mut again = tiny_vm("tiny1", &kernel, &initrd);
    again["recreate"] = json!(true);
    // This time with the operator's own user-data, which the seed carries verbatim.
    let raw = "#cloud-config\nruncmd:\n  - [\"echo\", \"<hi & 'bye'>\"]\n";
    again["user_data"] = json!(raw);
    let r = api.post("/vms", &again);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["recreated"], true);
    let new_id = r.json()["instance_id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, instance_id);
    // The console log went with the old disk, so this is the first boot of the new VM.
    let marker = e.wait_ready("tiny1", 1);
    assert_eq!(marker.get(2), Some(&new_id), "{marker:?}");
    assert_eq!(
        e.agent
            .sql("select instance_id from vms where name='tiny1'")
            .trim(),
        new_id
    );
    // It kept its MAC, so it has its address again and the port map reaches the new VM.
    assert_eq!(r.json()["mac"], mac.as_str());
    let r = api.call_waiting("GET", "/vms/tiny1/ip?timeout=120", BOOT);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ip"], ip.to_string());
    let body = e.via_node_port(18080, "/instance-id");
    assert_eq!(body.trim(), new_id);
    assert_eq!(e.via_node_port(18081, "/instance-id").trim(), new_id);
    assert_eq!(e.guest_http(ip, "/user-data"), raw);

    // Someone deletes the running VM's seed volume: the next boot needs it, so
    // reconcile makes it again.
    virsh(&["vol-delete", "--pool", &e.pool, "vm.tiny1.seed.img"]);
    wait_until(
        "the deleted seed made again by reconcile",
        || e.volumes().contains(&"vm.tiny1.seed.img".to_owned()),
        || e.agent.log(),
    );
    assert_eq!(e.state("tiny1"), "running");

    // Then the domain is undefined and the seed deleted again: reconcile builds the
    // same seed from the database (same instance-id, the operator's user-data, not the
    // defaults) and keeps the disk, which is the VM's data. A hard link holds the disk's
    // inode, so a re-created disk could not get the same one.
    use std::os::unix::fs::MetadataExt;
    let disk = e.scratch.path("pool").join("vm.tiny1.disk.qcow2");
    let held = e.scratch.path("disk-held");
    std::fs::hard_link(&disk, &held).unwrap();
    virsh(&["destroy", "tiny1"]);
    virsh(&["undefine", "tiny1"]);
    virsh(&["vol-delete", "--pool", &e.pool, "vm.tiny1.seed.img"]);
    wait_redefined(&e, "tiny1");
    assert_eq!(
        std::fs::metadata(&disk).unwrap().ino(),
        std::fs::metadata(&held).unwrap().ino(),
        "the VM's disk was re-created"
    );
    std::fs::remove_file(&held).unwrap();
    assert_eq!(
        e.agent
            .sql("select parameters from audit_log where action = 'reconcile VM' order by id desc limit 2")
            .trim(),
        concat!(
            r#"{"repaired":["seed volume made again","domain defined again","domain started"],"vm":"tiny1"}"#,
            "\n",
            r#"{"repaired":["seed volume made again"],"vm":"tiny1"}"#
        )
    );
    assert!(e.volumes().contains(&"vm.tiny1.seed.img".to_owned()));
    let marker = e.wait_ready("tiny1", 2);
    assert_eq!(marker.get(2), Some(&new_id), "{marker:?}");
    let r = api.call_waiting("GET", "/vms/tiny1/ip?timeout=120", BOOT);
    assert_eq!(r.json()["ip"], ip.to_string());
    assert_eq!(e.guest_http(ip, "/user-data"), raw);
    // The seed's inputs are in the database, never in an answer or the audit log.
    let listed = api.get("/vms").body;
    let status = api.get("/vms/tiny1/status").body;
    let audit = e.agent.sql("select parameters from audit_log");
    for text in [&listed, &status, &audit] {
        assert!(!text.contains("bye'>"), "user-data leaked: {text}");
    }
    assert_eq!(
        e.agent
            .sql("select user_data from vm_seeds where name='tiny1'")
            .trim_end(),
        raw.trim_end()
    );

    // Recreated at another address of the range: the map naming the VM follows it (an
    // audit row says so); a map to the old address would not, so that one goes first.
    assert_eq!(api.delete("/ports/18080").status, 200);
    // From the top of the range, where the agents of the tests beside this one (which
    // share the network and pick from the bottom) are not.
    let hosts = virsh(&["net-dumpxml", "default"]);
    let [a, b, c, _] = ip.octets();
    let moved_to = (200..=250u8)
        .rev()
        .map(|d| Ipv4Addr::new(a, b, c, d))
        .find(|m| !hosts.contains(&format!("ip='{m}'")))
        .expect("a free address at the top of the range");
    let mut third = tiny_vm("tiny1", &kernel, &initrd);
    third["recreate"] = json!(true);
    third["ip"] = json!(moved_to.to_string());
    let r = api.post("/vms", &third);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["ip"], moved_to.to_string());
    let third_id = r.json()["instance_id"].as_str().unwrap().to_owned();
    e.wait_ready("tiny1", 1);
    assert_eq!(e.via_node_port(18081, "/instance-id").trim(), third_id);
    let listed = api.get("/ports").json()["rules"]["18081"].clone();
    assert_eq!(listed["target_ip"], moved_to.to_string(), "{listed}");
    assert_eq!(listed["target_vm"], "tiny1", "{listed}");
    assert_eq!(
        e.agent
            .sql("select count(*) from audit_log where action = 'POST /ports (VM readdressed)'")
            .trim(),
        "1"
    );

    // Delete with files: domain, disk, seed and console go, and so does the port map
    // that named the VM.
    let r = api.delete("/vms/tiny1?delete_files=true");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["deleted_files"], true);
    let removed = r.json()["removed_port_maps"].as_array().unwrap().clone();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(
        e.agent
            .sql("select identity, parameters like '%\"vm\":\"tiny1\"%' from audit_log where action = 'DELETE /ports (VM deleted)'")
            .trim(),
        "agent|1"
    );
    assert!(!e.domains().contains(&"tiny1".to_owned()));
    assert!(
        !virsh(&["net-dumpxml", "default"]).contains(&mac),
        "the DHCP host entry went with the VM"
    );
    let vols = e.volumes();
    assert!(!vols.iter().any(|v| v.starts_with("vm.tiny1")), "{vols:?}");
    assert_eq!(api.get("/ports").json()["rules"], json!({}));
    api.get("/vms/tiny1/status").assert_error(|s| s == 404);

    // The image is free again and can go.
    assert_eq!(api.delete("/images/tiny").status, 200);
    assert!(!e.volumes().contains(&"image.tiny".to_owned()));
    let root = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&root.stdout).contains("node_vm_agent"),
        "the agent's table leaked into the root namespace"
    );
}

/// The agent drives a libvirtd on another host through its URI alone (`qemu+tcp://`
/// here; `qemu+ssh://` and `qemu+tls://` differ only in libvirt's transport). Nothing is
/// shared with that host but the RPC: the pool directory is the host's path and does
/// not exist in the agent's VMS_WORK_DIR, the image and the seed go up and the console
/// comes back through libvirt streams, the lease is read over RPC, and the guest's
/// network lives only on that host.
#[test]
fn a_remote_libvirtd_is_driven_through_its_uri_alone() {
    let _turn = support::libvirt::turn();
    let e = remote_env(&[("RECONCILE_INTERVAL", "1")]);
    let api = &e.agent.api;
    let (kernel, initrd) = e.scratch.guest();
    assert!(!e.scratch.path("not-on-the-agent-host").exists());
    // No libvirt network in the agent's namespace: the guest's bridge is remote.
    let links = e.topo.node.exec_ok(&["ip", "-o", "link", "show"]);
    assert!(!links.contains("virbr0"), "{links}");

    let r = e.upload_image("tiny", &vec![0u8; 4 << 20]);
    assert_eq!(r.status, 200, "{r:?}");
    let r = api.post("/vms", &tiny_vm("far1", &kernel, &initrd));
    assert_eq!(r.status, 200, "{r:?}");
    let instance_id = r.json()["instance_id"].as_str().unwrap().to_owned();
    let mac = r.json()["mac"].as_str().unwrap().to_owned();
    assert_eq!(e.state("far1"), "running");
    let vols = e.volumes();
    for v in ["image.tiny", "vm.far1.disk.qcow2", "vm.far1.seed.img"] {
        assert!(vols.contains(&v.to_owned()), "{v} missing: {vols:?}");
    }

    // The seed arrived: the guest reports its own identity on the console, which the
    // agent reads back through a download stream.
    let marker = e.wait_ready("far1", 1);
    assert_eq!(
        marker.get(1).map(String::as_str),
        Some("far1"),
        "{marker:?}"
    );
    assert_eq!(marker.get(2), Some(&instance_id), "{marker:?}");

    // The lease, read on the remote host over RPC, is the guest's address there.
    let r = api.call_waiting("GET", "/vms/far1/ip?timeout=120", BOOT);
    assert_eq!(r.status, 200, "{r:?}");
    let ip: Ipv4Addr = r.json()["ip"].as_str().unwrap().parse().unwrap();
    let lease = virsh(&["net-dhcp-leases", "default", "--mac", &mac]);
    assert!(lease.contains(&ip.to_string()), "{lease}");
    assert_eq!(e.guest_http(ip, "/instance-id").trim(), instance_id);

    // The guest's tap is a device of the remote host. A bridge port of the same name
    // here is somebody else's: reconcile (every second) leaves its hairpin mode alone.
    let tap = tap_of("far1", &mac);
    let node = &e.topo.node;
    let peer = format!("{tap}p");
    node.exec_ok(&[
        "ip", "link", "add", &tap, "type", "veth", "peer", "name", &peer,
    ]);
    node.exec_ok(&["ip", "link", "set", &tap, "master", &e.topo.bridge]);
    let hairpin = format!("/sys/class/net/{tap}/brport/hairpin_mode");
    assert_eq!(node.exec_ok(&["cat", &hairpin]).trim(), "0");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        node.exec_ok(&["cat", &hairpin]).trim(),
        "0",
        "{}",
        e.agent.log()
    );

    let listed = api.get("/vms");
    assert_eq!(listed.status, 200, "{listed:?}");
    assert!(listed.body.contains("\"far1\""), "{listed:?}");
    let stats = api.get("/stats");
    assert_eq!(stats.status, 200, "{stats:?}");
    assert_eq!(stats.json()["vms"]["running"], 1, "{stats:?}");
    let r = api.post("/vms/far1/stop", &json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(e.state("far1"), "shutoff");

    let r = api.delete("/vms/far1?delete_files=true");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!e.domains().contains(&"far1".to_owned()));
    let vols = e.volumes();
    assert!(!vols.iter().any(|v| v.starts_with("vm.far1")), "{vols:?}");
    assert_eq!(api.delete("/images/tiny").status, 200);
    assert!(e.volumes().is_empty(), "{:?}", e.volumes());
}

/// Two creates at the same moment on the real libvirtd, next to a running VM pinned at
/// `taken`: each gets its own address, and the network holds one host entry per VM.
/// Both go again at once; so do their entries.
fn twin_creates_get_different_addresses(e: &Env, taken: Ipv4Addr, kernel: &str, initrd: &str) {
    let api = &e.agent.api;
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| api.post("/vms", &tiny_vm("twin1", kernel, initrd)));
        let b = s.spawn(|| api.post("/vms", &tiny_vm("twin2", kernel, initrd)));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.status, 200, "{a:?}\n{}", e.agent.log());
    assert_eq!(b.status, 200, "{b:?}\n{}", e.agent.log());
    let ip_of = |r: &Response| -> Ipv4Addr { r.json()["ip"].as_str().unwrap().parse().unwrap() };
    let (ip_a, ip_b) = (ip_of(&a), ip_of(&b));
    assert_ne!(ip_a, ip_b, "two simultaneous creates got the same address");
    assert!(![ip_a, ip_b].contains(&taken), "{ip_a} {ip_b} vs {taken}");
    let net = virsh(&["net-dumpxml", "default"]);
    for (name, r, ip) in [("twin1", &a, ip_a), ("twin2", &b, ip_b)] {
        let mac = r.json()["mac"].as_str().unwrap().to_owned();
        let entry = format!("<host mac='{mac}' name='{name}' ip='{ip}'/>");
        assert!(net.contains(&entry), "{entry} not in\n{net}");
        assert_eq!(
            net.matches(&format!("ip='{ip}'")).count(),
            1,
            "{ip} held twice:\n{net}"
        );
    }
    std::thread::scope(|s| {
        for name in ["twin1", "twin2"] {
            s.spawn(move || {
                let r = api.delete(&format!("/vms/{name}"));
                assert_eq!(r.status, 200, "DELETE {name}: {r:?}");
            });
        }
    });
    let net = virsh(&["net-dumpxml", "default"]);
    assert!(!net.contains("twin"), "host entries left behind:\n{net}");
    let domains = e.domains();
    assert!(
        !domains.iter().any(|d| d.starts_with("twin")),
        "{domains:?}"
    );
}

/// The tap device of `vm`'s NIC with `mac`, as libvirt reports it.
/// A domain's XML as libvirt shows the agent's pty serial port and console, turned into
/// what the agent wrote before the interactive console: both `type='file'` on the log.
/// Returns the log's path and the XML.
fn with_a_file_for_its_serial_port(xml: &str) -> (String, String) {
    let log = xml
        .split("<log file='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no <log file> in\n{xml}"))
        .to_owned();
    let block = |tag: &str| {
        let start = xml.find(&format!("<{tag} type='pty'>")).unwrap();
        let end = xml[start..].find(&format!("</{tag}>")).unwrap() + start + tag.len() + 3;
        start..end
    };
    let (serial, console) = (block("serial"), block("console"));
    assert!(serial.end <= console.start, "{xml}");
    let source = format!("<source path='{log}' append='on'/>");
    let old = format!(
        "{}<serial type='file'>{source}<target port='0'/></serial>{}\
         <console type='file'>{source}<target type='serial' port='0'/></console>{}",
        &xml[..serial.start],
        &xml[serial.end..console.start],
        &xml[console.end..]
    );
    (log, old)
}

fn tap_of(vm: &str, mac: &str) -> String {
    let iflist = virsh(&["domiflist", vm]);
    iflist
        .lines()
        .find(|l| l.contains(mac))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no tap for {mac}: {iflist}"))
        .to_owned()
}

/// Waits for reconcile to define `vm` again and start it.
fn wait_redefined(e: &Env, vm: &str) {
    wait_until(
        &format!("{vm} defined again and running"),
        || e.domains().contains(&vm.to_owned()) && e.state(vm) == "running",
        || e.agent.log(),
    );
}

/// Serves `bytes` once per connection, announcing `announce` bytes and closing after
/// `send` of them (an interrupted download when `send < announce`).
fn serve_once(ns: &Netns, bytes: Vec<u8>, announce: usize, send: usize) -> u16 {
    serve(ns, 0, bytes, announce, send, Duration::ZERO)
}

/// As [`serve_once`], on a given port of the namespace's loopback (0: any).
fn serve_on(ns: &Netns, port: u16, bytes: Vec<u8>, announce: usize, send: usize) -> u16 {
    serve(ns, port, bytes, announce, send, Duration::ZERO)
}

/// Serves `send` of `announce` bytes, then holds the connection open without sending
/// more (a download that stalls).
fn serve_stalling(ns: &Netns, bytes: Vec<u8>, announce: usize, send: usize) -> u16 {
    serve(ns, 0, bytes, announce, send, Duration::from_secs(120))
}

/// The test download server: up to 4 connections, each answered with `send` of
/// `announce` bytes, then held open for `hold` before it is closed.
fn serve(
    ns: &Netns,
    port: u16,
    bytes: Vec<u8>,
    announce: usize,
    send: usize,
    hold: Duration,
) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    let name = ns.name().to_owned();
    std::thread::spawn(move || {
        enter_netns(&name).unwrap();
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        tx.send(l.local_addr().unwrap().port()).unwrap();
        for conn in l.incoming().take(4) {
            let Ok(mut c) = conn else { continue };
            let mut req = [0u8; 4096];
            let _ = c.read(&mut req);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {announce}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
            );
            let _ = c.write_all(head.as_bytes());
            let _ = c.write_all(&bytes[..send.min(bytes.len())]);
            std::thread::sleep(hold);
        }
    });
    rx.recv().unwrap()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn wait_image(api: &Api, name: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = api.get("/images");
        assert_eq!(r.status, 200, "{r:?}");
        let img = r.json()["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {r:?}"));
        if img["state"] != "downloading" {
            return img;
        }
        assert!(
            Instant::now() < deadline,
            "{name} still downloading after {} s; {}",
            WAIT.as_secs(),
            libvirtd_speed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn downloads_are_verified_interrupted_ones_leave_nothing_and_libvirtd_restarts_are_survived() {
    let _turn = support::libvirt::turn();
    let mut e = env(&[
        ("LIBVIRT_TIMEOUT", "3"),
        ("VMS_DEFAULT_IMAGE", "deflt"),
        ("VMS_DEFAULT_IMAGE_URL", "http://127.0.0.1:18999/deflt.img"),
        ("UPLOAD_WINDOW", "1"),
    ]);
    let api = &e.agent.api;
    let content: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 251) as u8).collect();
    let sha = sha256_hex(&content);

    // An upload that stalls after 1 KiB of 4 MiB: 408 after one UPLOAD_WINDOW (1 s, less
    // than UPLOAD_MIN_BYTES), no image, no partial volume.
    let mut s = support::netns::in_netns(e.topo.client.name(), || {
        std::net::TcpStream::connect_timeout(&sa(NODE_IP, API_PORT), Duration::from_secs(2))
    })
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /images/stalled HTTP/1.1\r\nHost: n\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\n\r\n",
        e.agent.token,
        4 << 20
    )
    .unwrap();
    s.write_all(&[0u8; 1024]).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("UPLOAD_MIN_BYTES"), "{answer}");
    assert!(
        !e.volumes()
            .iter()
            .any(|v| v == "image.stalled" || v.starts_with("partial.")),
        "{:?}",
        e.volumes()
    );

    // Cut off after 1 MiB of 6: failed, no image, no partial volume.
    let port = serve_once(&e.topo.node, content.clone(), content.len(), 1 << 20);
    let r = api.post(
        "/images",
        &json!({"name": "cut", "url": format!("http://127.0.0.1:{port}/img"), "sha256": sha}),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let img = wait_image(api, "cut");
    assert_eq!(img["state"], "failed", "{img}");
    assert!(
        !e.volumes()
            .iter()
            .any(|v| v == "image.cut" || v.starts_with("partial.")),
        "{:?}",
        e.volumes()
    );

    // Complete but not what the checksum says: failed too.
    let port = serve_once(&e.topo.node, content.clone(), content.len(), content.len());
    let r = api.post(
        "/images",
        &json!({"name": "wrong", "url": format!("http://127.0.0.1:{port}/img"), "sha256": "0".repeat(64)}),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let img = wait_image(api, "wrong");
    assert_eq!(img["state"], "failed", "{img}");
    assert!(img["error"].as_str().unwrap().contains("sha256"), "{img}");
    assert!(
        !e.volumes()
            .iter()
            .any(|v| v == "image.wrong" || v.starts_with("partial."))
    );

    // Complete and right: ready, with the checksum recorded.
    let port = serve_once(&e.topo.node, content.clone(), content.len(), content.len());
    let r = api.post(
        "/images",
        &json!({"name": "good", "url": format!("http://127.0.0.1:{port}/img"), "sha256": sha}),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let img = wait_image(api, "good");
    assert_eq!(img["state"], "ready", "{img}");
    assert_eq!(img["sha256"], sha.as_str());
    assert_eq!(img["size_bytes"], content.len());
    assert!(e.volumes().contains(&"image.good".to_owned()));
    // The same name again is a conflict, not a silent overwrite.
    api.post(
        "/images",
        &json!({"name": "good", "url": format!("http://127.0.0.1:{port}/img"), "sha256": sha}),
    )
    .assert_error(|s| s == 409);
    // Hostile names and bad checksums are refused before anything starts.
    for bad in [
        json!({"name": "../x", "url": "http://127.0.0.1:1/x", "sha256": sha}),
        json!({"name": "ok", "url": "file:///etc/passwd", "sha256": sha}),
        json!({"name": "ok", "url": "http://127.0.0.1:1/x", "sha256": "xyz"}),
        json!({"name": "ok", "url": "http://127.0.0.1:1/x"}),
    ] {
        api.post("/images", &bad)
            .assert_error(|s| (400..500).contains(&s));
    }

    // A create that names no image fetches the default image on first use: 503 while
    // it downloads, then the image is there.
    serve_on(
        &e.topo.node,
        18999,
        content.clone(),
        content.len(),
        content.len(),
    );
    let r = api.post("/vms", &json!({"name": "needs-default"}));
    r.assert_error(|s| s == 503);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("being downloaded"),
        "{r:?}"
    );
    let img = wait_image(api, "deflt");
    assert_eq!(img["state"], "ready", "{img}");
    assert_eq!(img["source"], "http://127.0.0.1:18999/deflt.img");
    assert!(e.domains().is_empty());

    // libvirtd hangs: reads answer at once from the last observation, /health too; a
    // change waits LIBVIRT_TIMEOUT (3 s) for libvirt and answers 504.
    let observed = api.get("/vms");
    assert_eq!(observed.status, 200, "{observed:?}");
    let pid = support::libvirt::Libvirtd::pid().unwrap();
    let _ = Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(1_100)); // the last listing is now stale
    let mut read_ms = Vec::new();
    let mut read = None;
    for _ in 0..3 {
        let t = Instant::now();
        read = Some(api.call_waiting("GET", "/vms", Duration::from_secs(30)));
        read_ms.push(t.elapsed());
    }
    let read = read.unwrap();
    let t = Instant::now();
    let change = api.call_waiting("POST", "/vms/nosuchvm/start", Duration::from_secs(30));
    let change_s = t.elapsed();
    let t = Instant::now();
    let health = api.get("/health");
    let health_ms = t.elapsed();
    let _ = Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status();
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(
        read.json()["vms"],
        observed.json()["vms"],
        "the last observation"
    );
    assert!(
        read_ms.iter().all(|t| *t < Duration::from_millis(200)),
        "{read_ms:?}"
    );
    change.assert_error(|s| s == 504);
    assert!(change_s < Duration::from_secs(10), "{change_s:?}");
    assert_eq!(health.status, 200);
    assert!(health_ms < Duration::from_secs(1), "{health_ms:?}");

    // libvirtd goes away: reads still answer from the last observation, a change gets
    // a clear 503 quickly; back: the next request works.
    e.libvirtd.kill();
    std::thread::sleep(Duration::from_millis(1_100));
    let t = Instant::now();
    let r = api.get("/vms");
    assert_eq!(r.status, 200, "{r:?}");
    let r = api.call("POST", "/vms/nosuchvm/start", None);
    r.assert_error(|s| s == 503);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(api.get("/health").status, 200);
    e.libvirtd.revive();
    let r = api.get("/vms");
    assert_eq!(r.status, 200, "{r:?}\n{}", e.agent.log());
    let r = api.get("/images");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api.delete("/images/good").status, 200);
    assert_eq!(api.delete("/images/deflt").status, 200);

    // A download in flight: its progress is visible and it cannot be deleted. Then the
    // agent is killed: after the restart its partial volume is gone and the image is
    // failed, not half there.
    let port = serve_stalling(&e.topo.node, content.clone(), content.len(), 1 << 20);
    let r = e.agent.api.post(
        "/images",
        &json!({"name": "stalled", "url": format!("http://127.0.0.1:{port}/img"), "sha256": sha}),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let deadline = Instant::now() + WAIT;
    loop {
        let r = e.agent.api.get("/images");
        let img = r.json()["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "stalled")
            .cloned()
            .unwrap();
        if img["received_bytes"] == json!(1 << 20) {
            assert_eq!(img["state"], "downloading", "{img}");
            assert_eq!(img["total_bytes"], json!(content.len()), "{img}");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {img}");
        std::thread::sleep(Duration::from_millis(100));
    }
    e.agent
        .api
        .delete("/images/stalled")
        .assert_error(|s| s == 409);
    assert!(
        e.volumes()
            .iter()
            .any(|v| v.starts_with("partial.stalled."))
    );
    e.agent.kill9();
    e.agent.start_again();
    let img = wait_image(&e.agent.api, "stalled");
    assert_eq!(img["state"], "failed", "{img}");
    wait_until(
        "the partial volume of the killed download removed",
        || !e.volumes().iter().any(|v| v.starts_with("partial.")),
        || format!("{:?}\n{}", e.volumes(), e.agent.log()),
    );
    assert!(!e.volumes().contains(&"image.stalled".to_owned()));
}

/// `/dev/kvm`'s group and mode, put back as they were on drop.
struct KvmNode {
    gid: u32,
    mode: u32,
}

const KVM: &str = "/dev/kvm";

impl KvmNode {
    fn save() -> KvmNode {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(KVM).unwrap();
        KvmNode {
            gid: m.gid(),
            mode: m.mode() & 0o7777,
        }
    }

    fn set(gid: u32, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(KVM, None, Some(gid)).unwrap();
        std::fs::set_permissions(KVM, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

impl Drop for KvmNode {
    fn drop(&mut self) {
        KvmNode::set(self.gid, self.mode);
    }
}

/// On some machines `/dev/kvm` carries a group that is not `kvm`; libvirtd then re-probes
/// QEMU on almost every call (seconds each, a define about a minute). The setup script
/// gives the device to the `kvm` group before it starts the daemon, says so, and checks
/// that libvirtd answers a plain call fast.
#[test]
fn the_libvirt_setup_makes_kvm_consistent_before_it_starts_the_daemon() {
    let _turn = support::libvirt::turn();
    if !std::path::Path::new(KVM).exists() {
        eprintln!("skipped: this machine has no {KVM}, so libvirt has no view of KVM to fix");
        return;
    }
    let _restore = KvmNode::save();
    // `nogroup`: certainly not the kvm group; and no access for the group either.
    KvmNode::set(65534, 0o600);
    let ns = Netns::new("kvmfix");
    let libvirtd = support::libvirt::Libvirtd::start(&ns);
    let said = &libvirtd.setup_log;
    assert!(
        said.contains("changed /dev/kvm's group from gid 65534 to kvm"),
        "{said}"
    );
    assert!(
        said.contains("changed /dev/kvm's mode from 600 to 660"),
        "{said}"
    );
    assert!(
        said.contains("libvirtd answers 'virsh version' in"),
        "{said}"
    );
    let kvm_gid = support::netns::run_ok(Command::new("getent").args(["group", "kvm"]));
    let kvm_gid: u32 = kvm_gid.split(':').nth(2).unwrap().trim().parse().unwrap();
    let now = KvmNode::save();
    assert_eq!((now.gid, now.mode & 0o060), (kvm_gid, 0o060));
    // A define is one of the calls that took a minute with the wrong group.
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("probe.xml");
    std::fs::write(
        &xml,
        "<domain type='qemu'><name>kvmprobe</name><memory unit='MiB'>64</memory>\
         <os><type arch='x86_64'>hvm</type></os></domain>",
    )
    .unwrap();
    let t = Instant::now();
    virsh(&["define", &xml.to_string_lossy()]);
    eprintln!("define after the fix: {:.2} s", t.elapsed().as_secs_f64());
    assert!(virsh(&["list", "--all", "--name"]).contains("kvmprobe"));
    drop(libvirtd);

    // Already consistent: nothing to change, nothing said about it.
    let again = support::libvirt::Libvirtd::start(&ns);
    assert!(!again.setup_log.contains("/dev/kvm"), "{}", again.setup_log);
}
