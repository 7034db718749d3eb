//! The agent's seed against the real cloud-init (Debian bookworm's 22.4.2): with the
//! request's `user_data`, the SSH keys the agent puts in the seed (the request's, or the
//! node's SSH_AUTHORIZED_KEYS when the request brings none) and the hostname must reach
//! the guest next to what that user-data does, and the user-data must reach cloud-init
//! byte for byte (docs/decisions/17-user-data-keys-in-meta-data.md).
//!
//! Opt-in (`#[ignore]`, not part of scripts/test.sh): both tests need the Debian guest
//! that `/work/shared/tools/realguest.sh` builds (a few hundred MB, about 10 minutes), in
//! `REALGUEST_DIR` (default /var/lib/realguest). `scripts/realguest-keys.sh` runs them:
//! - the offline one runs that guest's own cloud-init on its root filesystem in a
//!   throw-away overlay (scripts/cloud-init-chroot.sh), seconds per seed;
//! - the boot one creates the guest through the agent's API on a real libvirtd in the
//!   test namespace and reads the result over SSH, minutes under TCG.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use node_vm_agent::cloudinit::{self as seed, SeedSpec};
use serde_json::json;
use support::libvirt::{env, script};

/// Real public keys (private halves discarded), as in `vm::seed`'s tests.
const NODE_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdMCdPexVOBbnwk88Mu0xzRCNPTt7FdrDtvNeHvBpso node@agent";
const REQUEST_KEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDW18kOx/mrOdJ2piu2SsxNkIvjWgPuqf4jOSVVp7qxs90hhgfLcTjE4QZpiEjX5kl+pGllM/MWes4iCrcdwjx8DrdagfTbY/ui0tcmv3QH7RcA/ISxtA1Od347+rTY9KY1P03rkEv/2alB1MvlPN2zQsEZf4TNo/+NJAObp6wm/ZxrzrUsFjgwjt9Hf+cUM7XkYOZodzMuCMiJQ5DQdfKtSE0/ag7Pcx11jKe0wHl0oPq2dvvEjYhyLXifUdS09yxtIslbAa6yIPwnO124XkYxKAUkH3LE54Za3R3i0sYwQB7Jkamvk2liTY9EjyulA3r2sfls1pRQas0PeNUWM6Jn request@api";
/// The operator's own keys, inside their user-data: one for the image's default user
/// (top-level `ssh_authorized_keys`), one for a user of their own.
const OPERATOR_KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBIITcIgFl0bdDCkTL17h1pNpKJegKrjLfDhC6+uOp+9nvE4wqEjrIzq1R5nASF9ZrO1UfZFOZGQDyN2hny9BPOg= operator@desk";
const OPS_USER_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOpsOp ops@desk";

/// An operator's user-data as one might write it: its own keys for the default user, a
/// user of its own, CRLF line ends and no final newline (it must arrive unchanged).
fn operator_user_data(extra: &str) -> String {
    format!(
        "#cloud-config\r\n{extra}users:\r\n  - default\r\n  - name: ops\r\n    shell: /bin/bash\r\n    ssh_authorized_keys: [\"{OPS_USER_KEY}\"]\r\nssh_authorized_keys:\r\n  - {OPERATOR_KEY}\r\n# the operator's, byte for byte: ünïcødé"
    )
}

fn realguest_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("REALGUEST_DIR").unwrap_or_else(|_| "/var/lib/realguest".into()),
    );
    for f in [
        "rootfs/usr/bin/cloud-init",
        "debian.qcow2",
        "vmlinuz",
        "initrd.img",
        "id_test",
        "id_test.pub",
    ] {
        assert!(
            dir.join(f).exists(),
            "{} missing: build the guest with /work/shared/tools/realguest.sh (OUT={}) or set REALGUEST_DIR",
            dir.join(f).display(),
            dir.display()
        );
    }
    dir
}

/// The key lines of an authorized_keys file (options such as disable_root's stripped).
fn key_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let start = ["ssh-", "ecdsa-", "sk-"]
                .iter()
                .filter_map(|t| l.find(t))
                .min()?;
            Some(l[start..].trim().to_owned())
        })
        .collect()
}

/// What cloud-init in the guest's root filesystem made of one seed.
struct Applied {
    hostname: String,
    /// user -> key lines of its authorized_keys
    keys: Vec<(String, Vec<String>)>,
    user_data: Vec<u8>,
    log: String,
}

impl Applied {
    fn keys_of(&self, user: &str) -> Vec<String> {
        self.keys
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, k)| k.clone())
            .unwrap_or_else(|| {
                panic!(
                    "no authorized_keys for {user}: {:?}\n{}",
                    self.keys, self.log
                )
            })
    }
}

/// Builds the seed for hostname `web-1` with `keys` and `user_data`, and runs the
/// guest's cloud-init on it (scripts/cloud-init-chroot.sh).
fn chroot_cloud_init(rootfs: &Path, keys: &[String], user_data: Option<&str>) -> Applied {
    let spec = SeedSpec {
        instance_id: "iid-realguest-keys",
        hostname: "web-1",
        ssh_authorized_keys: keys,
        user_data,
        network_config: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("seed.img");
    std::fs::write(&image, seed::build(&spec).unwrap()).unwrap();
    let out = dir.path().join("out");
    let run = Command::new(script("cloud-init-chroot.sh"))
        .arg(rootfs)
        .arg(&image)
        .arg(&out)
        .output()
        .unwrap();
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    let log = format!(
        "{}{}\ninit.out:\n{}\ncloud-init.log (last 40 lines):\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
        read("init.out"),
        read("cloud-init.log")
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(run.status.success(), "cloud-init-chroot.sh failed: {log}");
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(user) = name.strip_prefix("authorized_keys.") {
            keys.push((user.to_owned(), key_lines(&read(&name))));
        }
    }
    Applied {
        hostname: read("hostname").trim().to_owned(),
        keys,
        user_data: std::fs::read(out.join("user-data.txt")).unwrap_or_default(),
        log,
    }
}

#[test]
#[ignore = "opt-in: needs the realguest.sh guest; run by scripts/realguest-keys.sh"]
fn real_cloud_init_applies_the_agent_keys_and_hostname_beside_the_operators_user_data() {
    let rootfs = realguest_dir().join("rootfs");
    // What the service hands the seed: the node's keys when the request brings none,
    // else the request's.
    let node = [NODE_KEY.to_owned()];
    let request = [REQUEST_KEY.to_owned()];
    let with_keys = operator_user_data("");
    let with_hostname = operator_user_data("hostname: ops-host\r\n");

    // The operator's user-data with its own keys and users: every key set lands where
    // it belongs, the hostname is the agent's, the user-data arrives unchanged.
    for keys in [&node, &request] {
        let a = chroot_cloud_init(&rootfs, keys, Some(&with_keys));
        assert_eq!(a.user_data, with_keys.as_bytes(), "{}", a.log);
        let debian = a.keys_of("debian");
        for k in keys.iter().map(String::as_str).chain([OPERATOR_KEY]) {
            assert!(
                debian.iter().any(|l| l == k),
                "{k} not in debian's {debian:?}\n{}",
                a.log
            );
        }
        assert_eq!(a.keys_of("ops"), [OPS_USER_KEY], "{}", a.log);
        assert_eq!(a.hostname, "web-1", "{}", a.log);
    }
    // The operator's own hostname wins over the agent's (meta-data and vendor-data sit
    // under user-data); the keys still land.
    let a = chroot_cloud_init(&rootfs, &node, Some(&with_hostname));
    assert_eq!(a.hostname, "ops-host", "{}", a.log);
    assert!(
        a.keys_of("debian").iter().any(|l| l == NODE_KEY),
        "{}",
        a.log
    );
    // Without the request's user-data: the generated one, as before.
    let a = chroot_cloud_init(&rootfs, &request, None);
    assert!(
        a.keys_of("debian").iter().any(|l| l == REQUEST_KEY),
        "{}",
        a.log
    );
    assert_eq!(a.hostname, "web-1", "{}", a.log);
}

/// Runs `cmd` in the guest as `debian` over SSH with the realguest key, from libvirtd's
/// namespace (the only place the guest's address is reachable).
fn ssh(ns: &str, key: &Path, ip: &str, cmd: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ssh", "-i"])
        .arg(key)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("debian@{ip}"))
        .arg(cmd)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Bound on create -> SSH answers with cloud-init done: a Debian boot under TCG on 2
/// shared cores takes minutes; the bound only decides when a hung guest fails the test.
const GUEST_BOOT: Duration = Duration::from_secs(20 * 60);

#[test]
#[ignore = "opt-in: needs the realguest.sh guest and boots it (minutes); run by scripts/realguest-keys.sh"]
fn a_real_debian_guest_created_with_user_data_gets_the_request_keys_too() {
    let dir = realguest_dir();
    let _turn = support::libvirt::turn();
    let e = env(&[("SSH_AUTHORIZED_KEYS", NODE_KEY)]);
    let api = &e.agent.api;

    let r = e.upload_image("debian", &std::fs::read(dir.join("debian.qcow2")).unwrap());
    assert_eq!(r.status, 200, "{r:?}");
    // libvirt takes ownership of what it boots: boot copies in the scratch directory.
    let boot = e.scratch.path("realguest");
    std::fs::create_dir_all(&boot).unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(dir.join(f), boot.join(f)).unwrap();
    }
    let test_key = std::fs::read_to_string(dir.join("id_test.pub"))
        .unwrap()
        .trim()
        .to_owned();
    let user_data = operator_user_data("");
    let r = api.post(
        "/vms",
        &json!({
            "name": "rg1",
            "memory_mib": 1024,
            "vcpus": 1,
            "disk_size_gb": 3,
            "image": "debian",
            "kernel": boot.join("vmlinuz"),
            "initrd": boot.join("initrd.img"),
            "cmdline": "root=/dev/vda rw console=ttyS0",
            "user_data": user_data,
            "ssh_authorized_keys": [test_key, REQUEST_KEY],
        }),
    );
    assert_eq!(r.status, 200, "{r:?}\n{}", e.agent.log());
    let instance_id = r.json()["instance_id"].as_str().unwrap().to_owned();
    let status = api.get("/vms/rg1/status");
    assert_eq!(status.json()["status"]["instance_id"], instance_id.as_str());

    let ip = api.call_waiting("GET", "/vms/rg1/ip?timeout=600", Duration::from_secs(620));
    assert_eq!(ip.status, 200, "{ip:?}\n{}", e.console("rg1"));
    let ip = ip.json()["ip"].as_str().unwrap().to_owned();

    // Logging in with the request's key is the first proof; then what cloud-init did,
    // once it says it is done.
    let script = "cloud-init status --wait >/dev/null; echo ==keys; cat ~/.ssh/authorized_keys; \
        echo ==ops; sudo cat /home/ops/.ssh/authorized_keys; echo ==hostname; hostname; \
        echo ==user-data; sudo base64 -w0 /var/lib/cloud/instance/user-data.txt; echo";
    let start = Instant::now();
    let out = loop {
        match ssh(&e.guest_ns, &dir.join("id_test"), &ip, script) {
            Ok(out) => break out,
            Err(err) => {
                assert!(
                    start.elapsed() < GUEST_BOOT,
                    "no SSH login with the request's key within {GUEST_BOOT:?}: {err}\nconsole:\n{}",
                    e.console("rg1")
                );
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    };
    eprintln!(
        "guest answered after {:.0} s:\n{out}",
        start.elapsed().as_secs_f64()
    );
    let section = |name: &str| -> String {
        out.split(&format!("=={name}\n"))
            .nth(1)
            .and_then(|s| s.split("\n==").next())
            .unwrap_or_default()
            .to_owned()
    };
    let debian = key_lines(&section("keys"));
    for k in [test_key.as_str(), REQUEST_KEY, OPERATOR_KEY] {
        assert!(
            debian.iter().any(|l| l == k),
            "{k} not in debian's {debian:?}\n{out}"
        );
    }
    assert_eq!(key_lines(&section("ops")), [OPS_USER_KEY], "{out}");
    assert_eq!(section("hostname").trim(), "rg1", "{out}");
    use base64::Engine as _;
    let sent = base64::engine::general_purpose::STANDARD
        .decode(section("user-data").trim())
        .unwrap();
    assert_eq!(sent, user_data.as_bytes(), "{out}");
    let r = api.delete("/vms/rg1?delete_files=true");
    assert_eq!(r.status, 200, "{r:?}");
}
