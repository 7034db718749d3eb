//! The cloud-init seed from `cloudinit::build`, read by a real guest: the tiny guest
//! (scripts/build-tiny-guest.sh) boots under QEMU/TCG with the seed as a read-only
//! virtio disk, finds it by its CIDATA label, and reports the seed's hostname and
//! instance-id on the console marker and over HTTP. On the ACPI power button (QMP
//! `system_powerdown`, what libvirt's shutdown and reboot send) it powers off by itself.
//!
//! QEMU runs directly (no libvirtd) inside a fresh network namespace, with user-mode
//! networking: its DHCP server and the `hostfwd` port live inside the QEMU process and
//! that namespace's loopback, so nothing can leave the namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use node_vm_agent::cloudinit::{self as seed, SeedSpec};
use support::http_get;
use support::netns::{Netns, run_ok, unique_id};

/// Bound on boot → marker. A boot takes ~5-10 s under TCG here; a loaded CI machine may
/// be several times slower, and the bound only decides when a hung guest fails the test.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The guest's port 80, forwarded by QEMU to this port on the namespace's loopback.
const HOST_PORT: u16 = 8080;
/// Bound on `system_powerdown` → QEMU exit. It took well under a second here; the bound
/// only decides when a guest that ignores the power button fails the test.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Boots the tiny guest in `ns`; `seed` becomes a read-only virtio disk, `qmp` a QMP
    /// monitor socket (a filesystem path, so reachable from outside the namespace).
    fn boot(
        ns: &Netns,
        work: &Path,
        seed: Option<&Path>,
        qmp: Option<&Path>,
        cmdline_hostname: &str,
    ) -> Qemu {
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
        if let Some(qmp) = qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
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
            if let Some(fields) = support::ready_markers(&console).into_iter().next() {
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

/// A QMP client: greeting read and capabilities negotiated by `connect`.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events (`{"event": ...}`) seen while waiting for replies, in order.
    events: Vec<String>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to QMP at {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read_message();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities");
        qmp
    }

    fn read_message(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QMP closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs `command` (no arguments); returns its `return` value. Events that arrive
    /// before the reply (system_powerdown's POWERDOWN does) are kept in `events`.
    fn execute(&mut self, command: &str) -> serde_json::Value {
        let request = serde_json::json!({ "execute": command }).to_string();
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .expect("write to QMP");
        loop {
            let mut message = self.read_message();
            if let Some(ret) = message.get_mut("return") {
                return ret.take();
            }
            if let Some(event) = message.get("event") {
                self.events
                    .push(event.as_str().unwrap_or_default().to_string());
                continue;
            }
            panic!("QMP {command}: {message}");
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
    let mut qemu = Qemu::boot(&ns, work.path(), Some(&seed_path), None, "from-cmdline");
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
    let mut qemu = Qemu::boot(&ns, work.path(), None, None, "no-seed-1");
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

/// What libvirt's graceful `shutdown` (and, followed by a reset, `reboot`) does: press the
/// ACPI power button. The guest must sync, say `TINY-GUEST-POWEROFF` and power off, and
/// QEMU must then exit by itself (`-no-reboot`; libvirt sees the domain shut off).
#[test]
fn tiny_guest_powers_off_on_the_acpi_power_button() {
    let _one = BOOT.lock().unwrap_or_else(|p| p.into_inner());
    let instance_id = format!("i-{}-{}", std::process::id(), unique_id());
    let image = seed::build(&SeedSpec {
        instance_id: &instance_id,
        hostname: "acpi-test-1",
        ssh_authorized_keys: &[],
        user_data: None,
        network_config: None,
    })
    .expect("seed");
    let work = tempfile::tempdir().expect("tempdir");
    let seed_path = work.path().join("seed.img");
    fs::write(&seed_path, &image).expect("write seed");
    let qmp_path = work.path().join("qmp.sock");

    let ns = Netns::new("acpivm");
    let mut qemu = Qemu::boot(
        &ns,
        work.path(),
        Some(&seed_path),
        Some(&qmp_path),
        "from-cmdline",
    );
    let (fields, took) = qemu.wait_ready(work.path());
    eprintln!(
        "tiny guest (acpi): marker after {:.1} s: {fields:?}",
        took.as_secs_f64()
    );
    assert_eq!(fields[1], "acpi-test-1", "{}", qemu.console());
    assert!(
        qemu.console()
            .contains("tiny-guest: acpid listening for the ACPI power button"),
        "{}",
        qemu.console()
    );

    let mut qmp = Qmp::connect(&qmp_path);
    let pressed = Instant::now();
    qmp.execute("system_powerdown");

    let deadline = pressed + POWEROFF_TIMEOUT;
    let status = loop {
        if let Some(status) = qemu.child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            panic!(
                "qemu still runs {POWEROFF_TIMEOUT:?} after system_powerdown\nconsole:\n{}",
                qemu.console()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let to_exit = pressed.elapsed();
    eprintln!(
        "tiny guest (acpi): system_powerdown -> qemu exit ({status}) in {:.2} s; QMP events {:?}",
        to_exit.as_secs_f64(),
        qmp.events
    );
    let console = qemu.console();
    for line in console
        .lines()
        .filter(|l| l.contains("acpid") || l.contains("POWEROFF") || l.contains("Power down"))
    {
        eprintln!("  console: {}", line.trim_end());
    }

    assert!(status.success(), "qemu exit status {status}\n{console}");
    assert!(
        console.lines().any(|l| l.trim() == "TINY-GUEST-POWEROFF"),
        "no TINY-GUEST-POWEROFF line on the console\n{console}"
    );
    // QEMU stopped because the guest powered off, not because of an error: the SHUTDOWN
    // event (if it arrived before the socket closed) says the guest asked for it.
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut qmp.reader, &mut rest);
    if let Some(line) = rest.lines().find(|l| l.contains("\"SHUTDOWN\"")) {
        assert!(line.contains("guest-shutdown"), "{line}");
        eprintln!("tiny guest (acpi): {line}");
    }
    drop(qemu);
}
