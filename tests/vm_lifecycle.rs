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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::netns::{enter_netns, run_ok};
use support::*;

static LIBVIRTD: Mutex<()> = Mutex::new(());

const URI: &str = "qemu:///system";
/// Bounds for a TCG guest on 2 shared cores; they only decide when a hung step fails.
const BOOT: Duration = Duration::from_secs(120);

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("virsh: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// libvirtd (and virtlogd) inside the node namespace; stopped on Drop, which also
/// destroys every domain and network of that daemon.
struct Libvirtd {
    ns: String,
}

impl Libvirtd {
    fn start(ns: &Netns) -> Libvirtd {
        run_ok(Command::new(script("libvirt-netns.sh")).args(["start", ns.name()]));
        Libvirtd {
            ns: ns.name().to_owned(),
        }
    }

    fn pid() -> Option<i32> {
        std::fs::read_to_string("/var/run/libvirtd.pid")
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// Kills libvirtd (not virtlogd, not the guests) and waits until it is gone.
    fn kill(&self) {
        if let Some(pid) = Libvirtd::pid() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Starts libvirtd again in the same namespace and waits until it answers.
    fn revive(&self) {
        run_ok(Command::new("ip").args(["netns", "exec", &self.ns, "libvirtd", "-d"]));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = Command::new("virsh")
                .args(["-c", URI, "version"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("libvirtd did not come back");
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = Command::new(script("libvirt-netns.sh"))
            .args(["stop", &self.ns])
            .status();
    }
}

/// A world-traversable scratch directory: libvirt's QEMU runs as another user and must
/// reach the pool and the guest's kernel.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("nva-vmtest-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
        Scratch { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The tiny guest's kernel and initramfs, copied here (libvirt chowns what it boots).
    fn guest(&self) -> (String, String) {
        let built = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tiny-guest");
        run_ok(Command::new(script("build-tiny-guest.sh")).arg(&built));
        let boot = self.path("boot");
        std::fs::create_dir_all(&boot).unwrap_or_else(|e| panic!("mkdir: {e}"));
        for f in ["vmlinuz", "initramfs.cpio.gz"] {
            std::fs::copy(built.join(f), boot.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
        }
        (
            boot.join("vmlinuz").to_string_lossy().into_owned(),
            boot.join("initramfs.cpio.gz")
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Everything one test needs: topology, libvirtd in its node namespace, the agent.
/// Field order is drop order: agent first, then libvirtd, then the namespaces.
struct Env {
    agent: Agent,
    libvirtd: Libvirtd,
    scratch: Scratch,
    pool: String,
    topo: Topology,
}

fn env(extra: &[(&str, &str)]) -> Env {
    let topo = Topology::new();
    let scratch = Scratch::new();
    let libvirtd = Libvirtd::start(&topo.node);
    let pool = format!("nva-test-{}", std::process::id());
    let pool_dir = scratch.path("pool");
    let pool_dir = pool_dir.to_string_lossy().into_owned();
    let mut settings: Vec<(&str, &str)> = vec![
        ("LIBVIRT_URI", URI),
        ("VMS_DOMAIN_TYPE", "qemu"),
        ("VMS_WORK_DIR", &pool_dir),
        ("VMS_POOL", &pool),
        ("VMS_BRIDGE", "virbr0"),
        ("VM_SUBNET", "192.168.122.0/24"),
        ("VMS_DEFAULT_IMAGE", "tiny"),
        ("VM_STOP_TIMEOUT", "60"),
    ];
    settings.extend_from_slice(extra);
    let agent = Agent::start_with(&topo, &settings);
    Env {
        agent,
        libvirtd,
        scratch,
        pool,
        topo,
    }
}

impl Env {
    fn volumes(&self) -> Vec<String> {
        let _ = virsh(&["pool-refresh", &self.pool]);
        virsh(&["vol-list", &self.pool])
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    fn domains(&self) -> Vec<String> {
        virsh(&["list", "--all", "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Uploads `bytes` as image `name` through `POST /images/{name}`.
    fn upload_image(&self, name: &str, bytes: &[u8]) -> Response {
        self.agent
            .api
            .request_bytes(
                "POST",
                &format!("/images/{name}"),
                Some(&self.agent.token),
                Some(bytes),
            )
            .unwrap_or_else(|e| panic!("upload: {e}"))
    }

    fn console(&self, vm: &str) -> String {
        let r = self
            .agent
            .api
            .get(&format!("/vms/{vm}/console?bytes=65536"));
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["console"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the console shows `n` READY markers; returns the last one's fields.
    fn wait_ready(&self, vm: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + BOOT;
        loop {
            let c = self.console(vm);
            let markers: Vec<&str> = c
                .lines()
                .filter_map(|l| l.trim().strip_prefix("TINY-GUEST-READY "))
                .collect();
            if markers.len() >= n {
                return markers[n - 1]
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "{vm}: {n} READY markers not seen within {BOOT:?}; console:\n{c}\nagent log:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn state(&self, vm: &str) -> String {
        let r = self.agent.api.get(&format!("/vms/{vm}/status"));
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["status"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn guest_http(&self, ip: Ipv4Addr, path: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http_get(self.topo.node.name(), sa(ip, 80), path) {
                Ok(b) => return b,
                Err(e) if Instant::now() > deadline => panic!("guest HTTP {path}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

fn tiny_vm(name: &str, kernel: &str, initrd: &str) -> Value {
    json!({
        "name": name,
        "memory_mib": 256,
        "vcpus": 1,
        "disk_size_gb": 1,
        "network_name": "default",
        "os_arch": "x86_64",
        "image": "tiny",
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": "console=ttyS0 loglevel=4 panic=-1",
    })
}

#[test]
fn a_vm_lives_its_whole_life_through_the_api() {
    let _turn = LIBVIRTD.lock().unwrap_or_else(|p| p.into_inner());
    let e = env(&[]);
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
    assert!(e.domains().is_empty(), "{:?}", e.domains());
    assert!(
        !e.volumes().iter().any(|v| v.starts_with("vm.")),
        "{:?}",
        e.volumes()
    );
    assert_eq!(e.agent.sql("select count(*) from vms").trim(), "0");

    // Create: the answer comes before the guest boots.
    let t = Instant::now();
    let r = api.post("/vms", &tiny_vm("tiny1", &kernel, &initrd));
    let create_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(r.status, 200, "{r:?}\n{}", e.agent.log());
    let created = r.json().clone();
    assert_eq!(created["ok"], true);
    assert_eq!(created["name"], "tiny1");
    eprintln!("POST /vms took {create_ms:.1} ms");
    let instance_id = created["instance_id"].as_str().unwrap().to_owned();
    let mac = created["mac"].as_str().unwrap().to_owned();
    assert_eq!(e.state("tiny1"), "running");
    let vols = e.volumes();
    for v in ["vm.tiny1.disk.qcow2", "vm.tiny1.seed.img"] {
        assert!(vols.contains(&v.to_owned()), "{v} missing: {vols:?}");
    }

    // The IP comes from the DHCP lease of the VM's MAC.
    let r = api.call_waiting("GET", "/vms/tiny1/ip?timeout=120&network=default", BOOT);
    assert_eq!(r.status, 200, "{r:?}");
    let ip: Ipv4Addr = r.json()["ip"].as_str().unwrap().parse().unwrap();
    assert_eq!(r.json()["name"], "tiny1");
    let lease = virsh(&["net-dhcp-leases", "default", "--mac", &mac]);
    assert!(lease.contains(&ip.to_string()), "{lease}");
    assert_eq!(
        e.agent
            .sql("select last_ip from vms where name='tiny1'")
            .trim(),
        ip.to_string()
    );

    // The guest booted with its own seed: hostname and instance-id are the VM's.
    let marker = e.wait_ready("tiny1", 1);
    assert_eq!(
        marker.get(1).map(String::as_str),
        Some("tiny1"),
        "{marker:?}"
    );
    assert_eq!(e.guest_http(ip, "/hostname").trim(), "tiny1");
    assert_eq!(e.guest_http(ip, "/instance-id").trim(), instance_id);

    // A port map reaches the guest's HTTP server from the client namespace.
    let r = api.post(
        "/ports",
        &json!({"listen_port": 18080, "target_ip": ip.to_string(), "target_port": 80}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        match http_get(e.topo.client.name(), sa(NODE_IP, 18080), "/hostname") {
            Ok(b) => break b,
            Err(err) if Instant::now() > deadline => panic!("through the port map: {err}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    assert_eq!(body.trim(), "tiny1");

    // Listed as the agent's, next to a domain someone else defined.
    let foreign = e.scratch.path("foreign.xml");
    std::fs::write(
        &foreign,
        "<domain type='qemu'><name>foreign1</name><memory unit='MiB'>64</memory>\
         <os><type arch='x86_64'>hvm</type></os></domain>",
    )
    .unwrap();
    virsh(&["define", &foreign.to_string_lossy()]);
    let r = api.get("/vms");
    assert_eq!(r.status, 200, "{r:?}");
    let list = r.json()["vms"].as_array().unwrap().clone();
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

    // Start again: same MAC, so the same lease; the guest answers again.
    let r = api.post("/vms/tiny1/start", &json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    e.wait_ready("tiny1", 2);
    let r = api.call_waiting("GET", "/vms/tiny1/ip?timeout=120", BOOT);
    assert_eq!(r.status, 200, "{r:?}");
    let ip2: Ipv4Addr = r.json()["ip"].as_str().unwrap().parse().unwrap();
    assert_eq!(e.guest_http(ip2, "/hostname").trim(), "tiny1");

    // Reboot: the guest comes up a third time without a stop in between.
    let r = api.post("/vms/tiny1/reboot", &json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    e.wait_ready("tiny1", 3);
    assert_eq!(e.state("tiny1"), "running");

    // Delete with files: domain, disk, seed and console go, and so does the port map
    // that pointed at the VM's address.
    let r = api.delete("/vms/tiny1?delete_files=true");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["deleted_files"], true);
    let removed = r.json()["removed_port_maps"].as_array().unwrap().clone();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(!e.domains().contains(&"tiny1".to_owned()));
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

/// Serves `bytes` once per connection, announcing `announce` bytes and closing after
/// `send` of them (an interrupted download when `send < announce`).
fn serve_once(ns: &Netns, bytes: Vec<u8>, announce: usize, send: usize) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    let name = ns.name().to_owned();
    std::thread::spawn(move || {
        enter_netns(&name).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
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
        }
    });
    rx.recv().unwrap()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn wait_image(api: &Api, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
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
        assert!(Instant::now() < deadline, "{name} still downloading");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn downloads_are_verified_interrupted_ones_leave_nothing_and_libvirtd_restarts_are_survived() {
    let _turn = LIBVIRTD.lock().unwrap_or_else(|p| p.into_inner());
    let e = env(&[]);
    let api = &e.agent.api;
    let content: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 251) as u8).collect();
    let sha = sha256_hex(&content);

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

    // libvirtd goes away: a clear 503, quickly; back: the next request works.
    e.libvirtd.kill();
    let t = Instant::now();
    let r = api.get("/vms");
    r.assert_error(|s| s == 503);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(api.get("/health").status, 200);
    e.libvirtd.revive();
    let r = api.get("/vms");
    assert_eq!(r.status, 200, "{r:?}\n{}", e.agent.log());
    let r = api.get("/images");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api.delete("/images/good").status, 200);
}
