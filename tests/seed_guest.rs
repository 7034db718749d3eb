//! The cloud-init seed from `vm::seed::build`, read by a real guest: the tiny guest
//! (scripts/build-tiny-guest.sh) boots under QEMU/TCG with the seed as a read-only
//! virtio disk, finds it by its CIDATA label, and reports the seed's hostname and
//! instance-id on the console marker and over HTTP.
//!
//! QEMU runs directly (no libvirtd) inside a fresh network namespace, with user-mode
//! networking: its DHCP server and the `hostfwd` port live inside the QEMU process and
//! that namespace's loopback, so nothing can leave the namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use node_vm_agent::vm::seed::{self, SeedSpec};
use support::http_get;
use support::netns::{Netns, run_ok, unique_id};

/// Bound on boot → marker. A boot takes ~5-10 s under TCG here; a loaded CI machine may
/// be several times slower, and the bound only decides when a hung guest fails the test.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The guest's port 80, forwarded by QEMU to this port on the namespace's loopback.
const HOST_PORT: u16 = 8080;

/// One guest at a time: on 2 shared cores two TCG guests slow each other down, which
/// would make the measured boot times meaningless.
static BOOT: Mutex<()> = Mutex::new(());

fn ensure_qemu() {
    let have = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if have {
        return;
    }
    // Only the emulator: no libvirt, so nothing starts a daemon. Its hard dependencies
    // (seabios, ipxe-qemu for the virtio-net option ROM) come with it.
    eprintln!("seed_guest: installing qemu-system-x86 with apt-get");
    run_ok(Command::new("apt-get").args(["update", "-q"]));
    run_ok(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "qemu-system-x86",
            ]),
    );
}

/// Builds (or finds up to date) the tiny guest under target/tmp, once per test process.
fn tiny_guest() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        ensure_qemu();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tiny-guest");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-tiny-guest.sh");
        run_ok(Command::new(script).arg(&dir));
        dir
    })
}

/// A QEMU process; killed and reaped on Drop, also when the test panics.
struct Qemu {
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// Boots the tiny guest in `ns`; `seed` becomes a read-only virtio disk.
    fn boot(ns: &Netns, work: &Path, seed: Option<&Path>, cmdline_hostname: &str) -> Qemu {
        let guest = tiny_guest();
        let log = work.join("console.log");
        let mut cmd = ns.cmd("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-machine", "pc", "-m", "256", "-smp", "1"])
            .args(["-nographic", "-monitor", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initramfs.cpio.gz"))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 loglevel=4 panic=-1 tinyguest.hostname={cmdline_hostname}"
            ))
            .arg("-netdev")
            .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{HOST_PORT}-:80"))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()));
        if let Some(seed) = seed {
            cmd.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,readonly=on",
                seed.display()
            ));
        }
        let stderr = fs::File::create(work.join("qemu.stderr")).expect("stderr file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // `ip netns exec` execs QEMU in place, so the child's pid is QEMU's.
        let child = cmd.spawn().expect("spawn qemu-system-x86_64");
        Qemu {
            child,
            log,
            started: Instant::now(),
        }
    }

    fn console(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits for `TINY-GUEST-READY ...`; returns its fields after the marker and the
    /// time since QEMU started.
    fn wait_ready(&mut self, work: &Path) -> (Vec<String>, Duration) {
        let deadline = self.started + BOOT_TIMEOUT;
        loop {
            let console = self.console();
            if let Some(line) = console
                .lines()
                .find_map(|l| l.trim().strip_prefix("TINY-GUEST-READY "))
            {
                let fields = line.split_whitespace().map(String::from).collect();
                return (fields, self.started.elapsed());
            }
            let stderr = fs::read_to_string(work.join("qemu.stderr")).unwrap_or_default();
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "qemu exited ({status}) before the marker\nstderr: {stderr}\nconsole:\n{console}"
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no TINY-GUEST-READY within {BOOT_TIMEOUT:?}\nstderr: {stderr}\nconsole:\n{console}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn get(ns: &Netns, path: &str) -> String {
    let addr: SocketAddr = ([127, 0, 0, 1], HOST_PORT).into();
    http_get(ns.name(), addr, path).unwrap_or_else(|e| panic!("GET {path} from the guest: {e}"))
}

#[test]
fn tiny_guest_takes_hostname_and_instance_id_from_the_seed() {
    let _one = BOOT.lock().unwrap_or_else(|p| p.into_inner());
    let guest = tiny_guest();
    assert!(guest.join("vmlinuz").exists());

    let instance_id = format!("i-{}-{}", std::process::id(), unique_id());
    let keys = vec![
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdMCdPexVOBbnwk88Mu0xzRCNPTt7FdrDtvNeHvBpso t@x"
            .to_string(),
    ];
    let image = seed::build(&SeedSpec {
        instance_id: &instance_id,
        hostname: "seed-test-1",
        ssh_authorized_keys: &keys,
        user_data: None,
        network_config: None,
    })
    .expect("seed");
    eprintln!("seed image: {} bytes", image.len());

    let work = tempfile::tempdir().expect("tempdir");
    let seed_path = work.path().join("seed.img");
    fs::write(&seed_path, &image).expect("write seed");

    let ns = Netns::new("seedvm");
    let mut qemu = Qemu::boot(&ns, work.path(), Some(&seed_path), "from-cmdline");
    let (fields, took) = qemu.wait_ready(work.path());
    eprintln!(
        "tiny guest with seed: marker after {:.1} s: {fields:?}",
        took.as_secs_f64()
    );
    let console = qemu.console();
    for line in console.lines().filter(|l| l.starts_with("tiny-guest:")) {
        eprintln!("  console: {}", line.trim_end());
    }

    assert_eq!(fields.len(), 3, "marker fields: {fields:?}\n{console}");
    assert_ne!(
        fields[0], "none",
        "no DHCP lease from QEMU's user network\n{console}"
    );
    assert_eq!(
        fields[1], "seed-test-1",
        "hostname from the seed, not the cmdline\n{console}"
    );
    assert_eq!(
        fields[2], instance_id,
        "instance-id from the seed\n{console}"
    );
    assert!(
        console.contains("tiny-guest: seed on /dev/vda"),
        "{console}"
    );

    assert_eq!(get(&ns, "/instance-id").trim(), instance_id);
    assert_eq!(get(&ns, "/hostname").trim(), "seed-test-1");
    assert!(get(&ns, "/").contains("hostname: seed-test-1"));
    drop(qemu);
}

#[test]
fn tiny_guest_without_a_seed_keeps_the_cmdline_hostname() {
    let _one = BOOT.lock().unwrap_or_else(|p| p.into_inner());
    let work = tempfile::tempdir().expect("tempdir");
    let ns = Netns::new("noseedvm");
    let mut qemu = Qemu::boot(&ns, work.path(), None, "no-seed-1");
    let (fields, took) = qemu.wait_ready(work.path());
    eprintln!(
        "tiny guest without seed: marker after {:.1} s: {fields:?}",
        took.as_secs_f64()
    );
    let console = qemu.console();

    assert_eq!(fields.len(), 3, "marker fields: {fields:?}\n{console}");
    assert_eq!(fields[1], "no-seed-1", "{console}");
    assert_eq!(fields[2], "none", "{console}");
    assert_eq!(get(&ns, "/instance-id").trim(), "none");
    assert_eq!(get(&ns, "/hostname").trim(), "no-seed-1");
    drop(qemu);
}
