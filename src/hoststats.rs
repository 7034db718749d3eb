//! Host figures for `GET /stats`, in the original agent's shape.
//!
//! What the original measured (`vm_manager.py`, `VmManager.host_stats()`, in
//! andreykanava/CardProd-Node at commit fa7b66fe; `app.py` adds `ok` and `vms`):
//!
//! - `cores`: Python's `os.cpu_count()`, the machine's online logical CPUs (glibc reads
//!   `/sys/devices/system/cpu/online`), not the process's affinity or cgroup quota. A
//!   scheduler compares it with the vCPUs of the guests it places, and guests are not
//!   confined to the agent's cgroup, so we count the same thing.
//! - `load1/5/15`: `os.getloadavg()`: the same kernel averages we read from
//!   `/proc/loadavg`, which rounds them to two decimals (3.62 where Python showed the
//!   fixed-point 3.623046875).
//! - `ram.total_mb` / `ram.free_mb`: `MemTotal` and **`MemAvailable`** (not `MemFree`)
//!   from `/proc/meminfo`, kB floor-divided by 1024 (so MiB, named MB).
//! - `disk`: `shutil.disk_usage(VMS_WORK_DIR)`, the filesystem holding the VM images:
//!   total = `f_blocks * f_frsize`, free = `f_bavail * f_frsize` (space an unprivileged
//!   writer can use, not `f_bfree`), each floor-divided by 2^30 into a whole number (GiB,
//!   named GB). Our fields are `f64`, so JSON shows `37.0` where the original showed `37`;
//!   the values are the same whole GiB.
//!
//! Where the original swallowed every error into zeros, `collect` reports it: a zero
//! `free_gb` would tell a scheduler the node is full when it only failed to look.

use std::io;
use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cpu {
    pub cores: u32,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ram {
    pub total_mb: u64,
    pub free_mb: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Disk {
    pub total_gb: f64,
    pub free_gb: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostStats {
    pub cpu: Cpu,
    pub ram: Ram,
    pub disk: Disk,
}

const ONLINE_CPUS: &str = "/sys/devices/system/cpu/online";
const LOADAVG: &str = "/proc/loadavg";
const MEMINFO: &str = "/proc/meminfo";
const GIB: u64 = 1 << 30;

/// Reads /proc and statvfs(`disk_path`). Blocking (small file reads).
///
/// `disk_path` is where the VM images live (the storage pool's directory), the
/// equivalent of the original's `VMS_WORK_DIR`.
pub fn collect(disk_path: &Path) -> io::Result<HostStats> {
    let (load1, load5, load15) = parse_loadavg(&std::fs::read_to_string(LOADAVG)?)?;
    let ram = parse_meminfo(&std::fs::read_to_string(MEMINFO)?)?;
    let vfs = nix::sys::statvfs::statvfs(disk_path).map_err(io::Error::from)?;
    #[allow(
        clippy::useless_conversion,
        reason = "fsblkcnt_t and c_ulong are u32 on 32-bit targets"
    )]
    let disk = disk_from_statvfs(
        u64::from(vfs.blocks()),
        u64::from(vfs.blocks_available()),
        u64::from(vfs.fragment_size()),
    );
    Ok(HostStats {
        cpu: Cpu {
            cores: online_cpus()?,
            load1,
            load5,
            load15,
        },
        ram,
        disk,
    })
}

/// Online logical CPUs; if sysfs is not mounted (some containers), what this process may
/// use is the closest figure left.
fn online_cpus() -> io::Result<u32> {
    if let Some(n) = std::fs::read_to_string(ONLINE_CPUS)
        .ok()
        .and_then(|s| parse_cpu_list(&s))
    {
        return Ok(n);
    }
    let n = std::thread::available_parallelism()?;
    Ok(u32::try_from(n.get()).unwrap_or(u32::MAX))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The three load averages at the start of `/proc/loadavg`
/// (`0.52 0.58 0.59 2/512 12345`).
fn parse_loadavg(s: &str) -> io::Result<(f64, f64, f64)> {
    let mut fields = s.split_ascii_whitespace().map(str::parse::<f64>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => Ok((a, b, c)),
        _ => Err(invalid("unreadable /proc/loadavg")),
    }
}

/// `MemTotal` and `MemAvailable` in MiB. Kernels before 3.14 lack `MemAvailable`;
/// `MemFree` is then the nearest lower bound (the original reported 0).
fn parse_meminfo(s: &str) -> io::Result<Ram> {
    let kib = |key: &str| {
        s.lines().find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?;
            let mut parts = rest.split_ascii_whitespace();
            let value = parts.next()?.parse::<u64>().ok()?;
            // Every field we read is in kB; anything else is not the file we know.
            matches!(parts.next(), Some("kB")).then_some(value)
        })
    };
    let total = kib("MemTotal").ok_or_else(|| invalid("no MemTotal in /proc/meminfo"))?;
    let free = kib("MemAvailable")
        .or_else(|| kib("MemFree"))
        .ok_or_else(|| invalid("no MemAvailable or MemFree in /proc/meminfo"))?;
    Ok(Ram {
        total_mb: total / 1024,
        free_mb: free / 1024,
    })
}

/// Number of CPUs in a kernel CPU list (`0-3,8,10-11`); `None` if it is not one.
fn parse_cpu_list(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    s.split(',').try_fold(0u32, |n, part| {
        let count = match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (lo.parse::<u32>().ok()?, hi.parse::<u32>().ok()?);
                hi.checked_sub(lo)?.checked_add(1)?
            }
            None => part.parse::<u32>().map(|_| 1).ok()?,
        };
        n.checked_add(count)
    })
}

/// Whole GiB, floored, as `shutil.disk_usage` + `// 1024**3` gave them.
fn disk_from_statvfs(blocks: u64, blocks_available: u64, fragment_size: u64) -> Disk {
    let gib = |count: u64| (u128::from(count) * u128::from(fragment_size) / u128::from(GIB)) as f64;
    Disk {
        total_gb: gib(blocks),
        free_gb: gib(blocks_available),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO_SAMPLE: &str = "\
MemTotal:       24684092 kB
MemFree:         4270488 kB
MemAvailable:   23212328 kB
Buffers:          118300 kB
Cached:         18290316 kB
SwapCached:            0 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
";

    #[test]
    fn meminfo_uses_mem_available_floored_to_mib() {
        assert_eq!(
            parse_meminfo(MEMINFO_SAMPLE).unwrap(),
            Ram {
                total_mb: 24684092 / 1024,
                free_mb: 23212328 / 1024,
            }
        );
        // 1023 kB is 0 MiB, as `// 1024` gave.
        let tiny = "MemTotal: 2047 kB\nMemAvailable: 1023 kB\n";
        assert_eq!(
            parse_meminfo(tiny).unwrap(),
            Ram {
                total_mb: 1,
                free_mb: 0,
            }
        );
    }

    #[test]
    fn meminfo_without_mem_available_falls_back_to_mem_free() {
        let old = "MemTotal: 2097152 kB\nMemFree: 1048576 kB\nBuffers: 10 kB\n";
        assert_eq!(
            parse_meminfo(old).unwrap(),
            Ram {
                total_mb: 2048,
                free_mb: 1024,
            }
        );
    }

    #[test]
    fn meminfo_rejects_what_it_cannot_read() {
        assert!(parse_meminfo("").is_err());
        assert!(parse_meminfo("MemFree: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").is_err());
        // A key that merely starts like ours is not ours.
        assert!(parse_meminfo("MemTotalX: 5 kB\nMemAvailable: 1 kB\n").is_err());
    }

    #[test]
    fn loadavg_takes_the_first_three_fields() {
        assert_eq!(
            parse_loadavg("4.29 3.27 2.18 4/106 15743\n").unwrap(),
            (4.29, 3.27, 2.18)
        );
        assert_eq!(
            parse_loadavg("0.00 0.01 0.05 1/1 1").unwrap(),
            (0.0, 0.01, 0.05)
        );
        assert!(parse_loadavg("").is_err());
        assert!(parse_loadavg("1.0 2.0").is_err());
        assert!(parse_loadavg("1.0 x 3.0 1/1 1").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(1));
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
        assert_eq!(parse_cpu_list("0,,1"), None);
    }

    #[test]
    fn disk_is_whole_gib_of_available_blocks() {
        // 4 KiB fragments: 10 GiB + 1 block total, 3.5 GiB available (f_bavail, not f_bfree).
        let per_gib = GIB / 4096;
        let disk = disk_from_statvfs(10 * per_gib + 1, 3 * per_gib + per_gib / 2, 4096);
        assert_eq!(
            disk,
            Disk {
                total_gb: 10.0,
                free_gb: 3.0,
            }
        );
        // Huge filesystems do not overflow.
        let disk = disk_from_statvfs(u64::MAX, u64::MAX, 1 << 20);
        assert!(disk.total_gb > 1e9);
    }

    #[test]
    fn serialises_in_the_original_shape() {
        let stats = HostStats {
            cpu: Cpu {
                cores: 2,
                load1: 0.5,
                load5: 0.25,
                load15: 0.0,
            },
            ram: Ram {
                total_mb: 24105,
                free_mb: 22668,
            },
            disk: Disk {
                total_gb: 97.0,
                free_gb: 40.0,
            },
        };
        assert_eq!(
            serde_json::to_value(&stats).unwrap(),
            serde_json::json!({
                "cpu": {"cores": 2, "load1": 0.5, "load5": 0.25, "load15": 0.0},
                "ram": {"total_mb": 24105, "free_mb": 22668},
                "disk": {"total_gb": 97.0, "free_gb": 40.0},
            })
        );
    }

    #[test]
    fn real_machine_numbers_are_sane() {
        let stats = collect(Path::new("/")).unwrap();
        assert!(stats.cpu.cores >= 1, "{stats:?}");
        for load in [stats.cpu.load1, stats.cpu.load5, stats.cpu.load15] {
            assert!(load.is_finite() && load >= 0.0, "{stats:?}");
        }
        assert!(stats.ram.total_mb > 0, "{stats:?}");
        assert!(stats.ram.total_mb >= stats.ram.free_mb, "{stats:?}");
        assert!(stats.disk.total_gb >= stats.disk.free_gb, "{stats:?}");
        assert!(stats.disk.free_gb >= 0.0, "{stats:?}");
        assert_eq!(stats.disk.total_gb.fract(), 0.0, "{stats:?}");

        // A path that does not exist is an error, not zeros.
        assert!(collect(Path::new("/nonexistent/nva-stats")).is_err());
    }
}
