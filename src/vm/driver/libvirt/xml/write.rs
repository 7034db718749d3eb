//! The documents the agent sends to libvirt, through an XML writer: every value escaped.

use std::io;

use quick_xml::Writer;
use quick_xml::events::BytesText;

use super::metadata::{METADATA_INSTANCE_ID, METADATA_NS, METADATA_PREFIX, METADATA_ROOT};

/// One VM's domain definition.
#[derive(Debug, Clone)]
pub struct DomainSpec<'a> {
    pub name: &'a str,
    /// Canonical UUID string.
    pub uuid: &'a str,
    /// `kvm` or `qemu` (VMS_DOMAIN_TYPE).
    pub domain_type: &'a str,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// One of `vm::spec::ARCHES`.
    pub arch: &'a str,
    /// The agent's storage pool; disk and seed are `<disk type='volume'>` in it.
    pub pool: &'a str,
    pub disk_volume: &'a str,
    pub seed_volume: &'a str,
    /// libvirt network name for the one virtio NIC.
    pub network: &'a str,
    /// `52:54:00:xx:xx:xx`.
    pub mac: &'a str,
    /// Serial console log file on the libvirt host (appended to across boots), the
    /// `<log>` of the pty serial port.
    pub console_log: Option<&'a str>,
    /// Direct kernel boot: paths the libvirt host can read.
    pub kernel: Option<&'a str>,
    pub initrd: Option<&'a str>,
    pub cmdline: Option<&'a str>,
    /// Written into the agent's `<metadata>` element, which also marks the domain as ours.
    pub instance_id: &'a str,
}

type W = Writer<Vec<u8>>;

/// Runs `body` against an indenting writer and returns the document.
///
/// The writer's sink is a `Vec`, whose `io::Write` never fails, so the error arm is
/// unreachable in practice; should it ever happen, the empty string makes libvirt refuse
/// the document with its own error instead of this process panicking.
fn render(body: impl FnOnce(&mut W) -> io::Result<()>) -> String {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    if body(&mut w).is_err() {
        return String::new();
    }
    // Every byte came from `&str` values or ASCII markup, so this is valid UTF-8.
    String::from_utf8(w.into_inner()).unwrap_or_default()
}

/// `<tag>text</tag>`, text escaped.
fn text_el(w: &mut W, tag: &str, text: &str) -> io::Result<()> {
    w.create_element(tag)
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

/// `<tag a="v" .../>`, values escaped.
fn empty_el(w: &mut W, tag: &str, attrs: &[(&str, &str)]) -> io::Result<()> {
    w.create_element(tag)
        .with_attributes(attrs.iter().copied())
        .write_empty()?;
    Ok(())
}

pub fn domain(spec: &DomainSpec<'_>) -> String {
    render(|w| write_domain(w, spec))
}

fn write_domain(w: &mut W, spec: &DomainSpec<'_>) -> io::Result<()> {
    let kvm = spec.domain_type == "kvm";
    let aarch64 = spec.arch == "aarch64";
    let memory = spec.memory_mib.to_string();
    let vcpus = spec.vcpus.to_string();

    w.create_element("domain")
        .with_attribute(("type", spec.domain_type))
        .write_inner_content(|w| {
            text_el(w, "name", spec.name)?;
            text_el(w, "uuid", spec.uuid)?;
            w.create_element("metadata").write_inner_content(|w| {
                let root = format!("{METADATA_PREFIX}:{METADATA_ROOT}");
                let xmlns = format!("xmlns:{METADATA_PREFIX}");
                w.create_element(root.as_str())
                    .with_attribute((xmlns.as_str(), METADATA_NS))
                    .write_inner_content(|w| {
                        let id = format!("{METADATA_PREFIX}:{METADATA_INSTANCE_ID}");
                        text_el(w, &id, spec.instance_id)
                    })?;
                Ok(())
            })?;
            w.create_element("memory")
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(&memory))?;
            // No balloon target below the maximum.
            w.create_element("currentMemory")
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(&memory))?;
            w.create_element("vcpu")
                .with_attribute(("placement", "static"))
                .write_text_content(BytesText::new(&vcpus))?;
            write_os(w, spec, aarch64)?;
            w.create_element("features").write_inner_content(|w| {
                empty_el(w, "acpi", &[])?;
                // The APIC is an x86 device; aarch64's interrupt controller (GIC) is
                // chosen by libvirt for the `virt` machine.
                if !aarch64 {
                    empty_el(w, "apic", &[])?;
                }
                Ok(())
            })?;
            if kvm {
                empty_el(w, "cpu", &[("mode", "host-passthrough")])?;
            } else if aarch64 {
                // Without a model QEMU's `virt` machine emulates a 32-bit Cortex-A15,
                // which cannot run an aarch64 guest; `maximum` is TCG's `max` CPU.
                empty_el(w, "cpu", &[("mode", "maximum")])?;
            }
            empty_el(w, "clock", &[("offset", "utc")])?;
            text_el(w, "on_poweroff", "destroy")?;
            text_el(w, "on_reboot", "restart")?;
            text_el(w, "on_crash", "destroy")?;
            w.create_element("devices")
                .write_inner_content(|w| write_devices(w, spec))?;
            Ok(())
        })?;
    Ok(())
}

fn write_os(w: &mut W, spec: &DomainSpec<'_>, aarch64: bool) -> io::Result<()> {
    let mut os = w.create_element("os");
    if aarch64 {
        // libvirt picks an AAVMF build from QEMU's firmware descriptors.
        os = os.with_attribute(("firmware", "efi"));
    }
    os.write_inner_content(|w| {
        let mut ty = w.create_element("type").with_attribute(("arch", spec.arch));
        // x86_64 omits the machine: libvirt then fills in QEMU's default for the domain
        // type (an `pc-i440fx-*` or `pc-q35-*` version it knows), valid for kvm and qemu
        // alike, where a fixed name could be one this QEMU build lacks.
        if aarch64 {
            ty = ty.with_attribute(("machine", "virt"));
        }
        ty.write_text_content(BytesText::new("hvm"))?;
        match spec.kernel {
            Some(kernel) => {
                text_el(w, "kernel", kernel)?;
                if let Some(initrd) = spec.initrd {
                    text_el(w, "initrd", initrd)?;
                }
                if let Some(cmdline) = spec.cmdline {
                    text_el(w, "cmdline", cmdline)?;
                }
            }
            None => empty_el(w, "boot", &[("dev", "hd")])?,
        }
        Ok(())
    })?;
    Ok(())
}

fn write_devices(w: &mut W, spec: &DomainSpec<'_>) -> io::Result<()> {
    w.create_element("disk")
        .with_attributes([("type", "volume"), ("device", "disk")])
        .write_inner_content(|w| {
            empty_el(w, "driver", &[("name", "qemu"), ("type", "qcow2")])?;
            empty_el(
                w,
                "source",
                &[("pool", spec.pool), ("volume", spec.disk_volume)],
            )?;
            empty_el(w, "target", &[("dev", "vda"), ("bus", "virtio")])
        })?;
    w.create_element("disk")
        .with_attributes([("type", "volume"), ("device", "disk")])
        .write_inner_content(|w| {
            empty_el(w, "driver", &[("name", "qemu"), ("type", "raw")])?;
            empty_el(
                w,
                "source",
                &[("pool", spec.pool), ("volume", spec.seed_volume)],
            )?;
            empty_el(w, "target", &[("dev", "vdb"), ("bus", "virtio")])?;
            empty_el(w, "readonly", &[])
        })?;
    w.create_element("interface")
        .with_attribute(("type", "network"))
        .write_inner_content(|w| {
            empty_el(w, "source", &[("network", spec.network)])?;
            empty_el(w, "mac", &[("address", spec.mac)])?;
            empty_el(w, "model", &[("type", "virtio")])
        })?;
    // The first serial port is a pty, so that libvirt can open an interactive console
    // on it (it refuses one on a `type='file'` device), with everything the guest writes
    // also appended to the log file (`<log>`; libvirt's virtlogd writes it when
    // `stdio_handler` is `logd`). The console is that same serial port: libvirt gives it
    // the serial port's source, log included.
    let serial = w.create_element("serial").with_attribute(("type", "pty"));
    match spec.console_log {
        Some(path) => serial.write_inner_content(|w| {
            empty_el(w, "log", &[("file", path), ("append", "on")])?;
            empty_el(w, "target", &[("port", "0")])
        })?,
        None => serial.write_inner_content(|w| empty_el(w, "target", &[("port", "0")]))?,
    };
    w.create_element("console")
        .with_attribute(("type", "pty"))
        .write_inner_content(|w| empty_el(w, "target", &[("type", "serial"), ("port", "0")]))?;
    w.create_element("rng")
        .with_attribute(("model", "virtio"))
        .write_inner_content(|w| {
            w.create_element("backend")
                .with_attribute(("model", "random"))
                .write_text_content(BytesText::new("/dev/urandom"))?;
            Ok(())
        })?;
    Ok(())
}

/// A `dir` storage pool at `path` (a path on the libvirt host).
pub fn pool(name: &str, path: &str) -> String {
    render(|w| {
        w.create_element("pool")
            .with_attribute(("type", "dir"))
            .write_inner_content(|w| {
                text_el(w, "name", name)?;
                w.create_element("target").write_inner_content(|w| {
                    text_el(w, "path", path)?;
                    // Traversable by the qemu user, not listable: volume names stay private.
                    w.create_element("permissions")
                        .write_inner_content(|w| text_el(w, "mode", "0711"))?;
                    Ok(())
                })?;
                Ok(())
            })?;
        Ok(())
    })
}

/// A volume of `capacity_bytes` in `format` (`qcow2` or `raw`), optionally backed by
/// another volume's path (on the libvirt host) and format.
pub fn volume(
    name: &str,
    capacity_bytes: u64,
    format: &str,
    backing: Option<(&str, &str)>,
) -> String {
    let capacity = capacity_bytes.to_string();
    render(|w| {
        w.create_element("volume").write_inner_content(|w| {
            text_el(w, "name", name)?;
            w.create_element("capacity")
                .with_attribute(("unit", "bytes"))
                .write_text_content(BytesText::new(&capacity))?;
            // Sparse: space is taken as the guest writes.
            text_el(w, "allocation", "0")?;
            w.create_element("target")
                .write_inner_content(|w| empty_el(w, "format", &[("type", format)]))?;
            if let Some((path, backing_format)) = backing {
                w.create_element("backingStore").write_inner_content(|w| {
                    text_el(w, "path", path)?;
                    empty_el(w, "format", &[("type", backing_format)])
                })?;
            }
            Ok(())
        })?;
        Ok(())
    })
}

/// `<host mac= name= ip=/>`: one DHCP host entry of a network, as `virNetworkUpdate`
/// takes it (section `IP_DHCP_HOST`). `ip` is omitted when `None` (a delete matches on
/// the attributes given).
pub fn dhcp_host(mac: &str, name: Option<&str>, ip: Option<std::net::Ipv4Addr>) -> String {
    let ip = ip.map(|i| i.to_string());
    let mut attrs = vec![("mac", mac)];
    if let Some(n) = name {
        attrs.push(("name", n));
    }
    if let Some(i) = &ip {
        attrs.push(("ip", i.as_str()));
    }
    render(|w| empty_el(w, "host", &attrs))
}
