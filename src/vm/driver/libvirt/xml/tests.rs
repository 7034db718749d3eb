//! The writer and the reader against each other and against hostile values.

use super::read::{Step, Walk};
use super::*;
use quick_xml::XmlVersion;
use quick_xml::events::Event;

/// Every character that could break out of an attribute, a text node or a CDATA
/// section, plus a non-ASCII one.
const HOSTILE: &str = "a<b>&amp;c\"d'e]]>f<!--g--><![CDATA[h]]>ü";

pub(super) fn spec<'a>() -> DomainSpec<'a> {
    DomainSpec {
        name: "vm1",
        uuid: "6f1d3b8e-0a4c-4a53-9a8e-2b7c1c0e5d11",
        domain_type: "qemu",
        memory_mib: 256,
        vcpus: 1,
        arch: "x86_64",
        pool: "default-pool",
        disk_volume: "vm1-disk.qcow2",
        seed_volume: "vm1-seed.img",
        network: "default",
        mac: "52:54:00:12:34:56",
        console_log: Some("/var/log/vm1.log"),
        kernel: None,
        initrd: None,
        cmdline: None,
        instance_id: "i-0123",
    }
}

/// Test-only reader: (attributes, text) of every element at `path` (local names).
pub(super) fn find(xml: &str, path: &[&str]) -> Vec<(Vec<(String, String)>, String)> {
    let mut walk = Walk::new(xml);
    let mut open_attrs = Vec::new();
    let mut found = Vec::new();
    loop {
        match walk.next().unwrap() {
            Step::Eof => return found,
            Step::Open(start) => {
                let attrs: Vec<(String, String)> = start
                    .attributes()
                    .map(|a| {
                        let a = a.unwrap();
                        (
                            a.key.as_ref().to_owned(),
                            a.normalized_value(XmlVersion::Implicit1_0)
                                .unwrap()
                                .into_owned(),
                        )
                    })
                    .collect();
                open_attrs.push(attrs);
            }
            Step::Close { text } => {
                let attrs = open_attrs.pop().unwrap();
                if walk.path_is(path) {
                    found.push((attrs, text));
                }
                walk.pop();
            }
        }
    }
}

fn attr_of(el: &(Vec<(String, String)>, String), key: &str) -> Option<String> {
    el.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// Well-formed by a strict reader: every end tag matches and the document ends closed.
fn assert_well_formed(xml: &str) {
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut depth = 0i32;
    let mut roots = 0;
    loop {
        match reader.read_event().unwrap() {
            Event::Start(_) => {
                if depth == 0 {
                    roots += 1;
                }
                depth += 1;
            }
            Event::Empty(_) if depth == 0 => roots += 1,
            Event::End(_) => depth -= 1,
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!((depth, roots), (0, 1), "{xml}");
}

#[test]
fn hostile_values_round_trip_and_stay_well_formed() {
    let hostile = |tag: &str| format!("{tag}{HOSTILE}");
    let (name, uuid, pool, disk, seed, net, mac, log, kernel, initrd, cmdline, id) = (
        hostile("name"),
        hostile("uuid"),
        hostile("pool"),
        hostile("disk"),
        hostile("seed"),
        hostile("net"),
        hostile("mac"),
        hostile("log"),
        hostile("kernel"),
        hostile("initrd"),
        hostile("cmdline"),
        hostile("id"),
    );
    let (dtype, arch) = (hostile("type"), hostile("arch"));
    let s = DomainSpec {
        name: &name,
        uuid: &uuid,
        domain_type: &dtype,
        arch: &arch,
        pool: &pool,
        disk_volume: &disk,
        seed_volume: &seed,
        network: &net,
        mac: &mac,
        console_log: Some(&log),
        kernel: Some(&kernel),
        initrd: Some(&initrd),
        cmdline: Some(&cmdline),
        instance_id: &id,
        ..spec()
    };
    let xml = domain(&s);
    assert_well_formed(&xml);
    assert!(!xml.contains("]]>"), "{xml}");
    assert!(!xml.contains("<!--"), "{xml}");

    let facts = parse_domain(&xml).unwrap();
    assert_eq!(
        facts,
        DomainFacts {
            name: name.clone(),
            uuid: uuid.clone(),
            interfaces: vec![(mac.clone(), net.clone())],
            volumes: vec![(pool.clone(), disk.clone()), (pool.clone(), seed.clone())],
            console_log: Some(log.clone()),
            instance_id: Some(id.clone()),
            taps: vec![],
            serial_type: Some("pty".into()),
        }
    );
    // Fields parse_domain does not return come back unchanged too.
    assert_eq!(
        attr_of(&find(&xml, &["domain"])[0], "type"),
        Some(dtype.clone())
    );
    let os_type = &find(&xml, &["domain", "os", "type"])[0];
    assert_eq!(attr_of(os_type, "arch"), Some(arch.clone()));
    assert_eq!(find(&xml, &["domain", "os", "kernel"])[0].1, kernel);
    assert_eq!(find(&xml, &["domain", "os", "initrd"])[0].1, initrd);
    assert_eq!(find(&xml, &["domain", "os", "cmdline"])[0].1, cmdline);

    let pool_xml = super::pool(&name, &log);
    assert_well_formed(&pool_xml);
    assert_eq!(pool_path(&pool_xml).unwrap(), log);
    assert_eq!(find(&pool_xml, &["pool", "name"])[0].1, name);

    let vol = volume(&disk, 1 << 30, &dtype, Some((&kernel, &arch)));
    assert_well_formed(&vol);
    assert_eq!(find(&vol, &["volume", "name"])[0].1, disk);
    let fmt = &find(&vol, &["volume", "target", "format"])[0];
    assert_eq!(attr_of(fmt, "type"), Some(dtype.clone()));
    assert_eq!(find(&vol, &["volume", "backingStore", "path"])[0].1, kernel);
    let bfmt = &find(&vol, &["volume", "backingStore", "format"])[0];
    assert_eq!(attr_of(bfmt, "type"), Some(arch));
}

#[test]
fn whitespace_in_attribute_values_survives() {
    // Attribute-value normalisation turns literal tabs and newlines into spaces; the
    // writer must escape them as character references.
    let log = "/tmp/a\tb\nc\r d";
    let s = DomainSpec {
        console_log: Some(log),
        ..spec()
    };
    assert_eq!(
        parse_domain(&domain(&s)).unwrap().console_log.as_deref(),
        Some(log)
    );
}

#[test]
fn disk_boot_without_kernel() {
    let xml = domain(&spec());
    let boot = find(&xml, &["domain", "os", "boot"]);
    assert_eq!(boot.len(), 1);
    assert_eq!(attr_of(&boot[0], "dev").as_deref(), Some("hd"));
    assert!(find(&xml, &["domain", "os", "kernel"]).is_empty());
    assert!(find(&xml, &["domain", "os", "initrd"]).is_empty());
    assert!(find(&xml, &["domain", "os", "cmdline"]).is_empty());
}

#[test]
fn direct_kernel_boot_replaces_boot_device() {
    let s = DomainSpec {
        kernel: Some("/boot/vmlinuz"),
        initrd: Some("/boot/initrd.img"),
        cmdline: Some("console=ttyS0 quiet"),
        ..spec()
    };
    let xml = domain(&s);
    assert!(find(&xml, &["domain", "os", "boot"]).is_empty());
    assert_eq!(
        find(&xml, &["domain", "os", "kernel"])[0].1,
        "/boot/vmlinuz"
    );
    assert_eq!(
        find(&xml, &["domain", "os", "initrd"])[0].1,
        "/boot/initrd.img"
    );
    assert_eq!(
        find(&xml, &["domain", "os", "cmdline"])[0].1,
        "console=ttyS0 quiet"
    );

    // initrd and cmdline are optional.
    let s = DomainSpec {
        kernel: Some("/boot/vmlinuz"),
        ..spec()
    };
    let xml = domain(&s);
    assert_eq!(find(&xml, &["domain", "os", "kernel"]).len(), 1);
    assert!(find(&xml, &["domain", "os", "initrd"]).is_empty());
    assert!(find(&xml, &["domain", "os", "cmdline"]).is_empty());
}

#[test]
fn arch_and_domain_type_shape_os_features_and_cpu() {
    // x86_64 under TCG: no machine (libvirt's default), APIC, no <cpu>.
    let xml = domain(&spec());
    let ty = &find(&xml, &["domain", "os", "type"])[0];
    assert_eq!(ty.1, "hvm");
    assert_eq!(attr_of(ty, "machine"), None);
    assert_eq!(attr_of(&find(&xml, &["domain", "os"])[0], "firmware"), None);
    assert_eq!(find(&xml, &["domain", "features", "apic"]).len(), 1);
    assert_eq!(find(&xml, &["domain", "features", "acpi"]).len(), 1);
    assert!(find(&xml, &["domain", "cpu"]).is_empty());
    assert!(find(&xml, &["domain", "devices", "graphics"]).is_empty());

    // kvm passes the host CPU through.
    let xml = domain(&DomainSpec {
        domain_type: "kvm",
        ..spec()
    });
    let cpu = find(&xml, &["domain", "cpu"]);
    assert_eq!(
        attr_of(&cpu[0], "mode").as_deref(),
        Some("host-passthrough")
    );

    // aarch64: virt machine, UEFI, no APIC.
    let xml = domain(&DomainSpec {
        arch: "aarch64",
        ..spec()
    });
    let ty = &find(&xml, &["domain", "os", "type"])[0];
    assert_eq!(attr_of(ty, "arch").as_deref(), Some("aarch64"));
    assert_eq!(attr_of(ty, "machine").as_deref(), Some("virt"));
    let os = &find(&xml, &["domain", "os"])[0];
    assert_eq!(attr_of(os, "firmware").as_deref(), Some("efi"));
    assert!(find(&xml, &["domain", "features", "apic"]).is_empty());
    assert_eq!(find(&xml, &["domain", "features", "acpi"]).len(), 1);
}

#[test]
fn devices_and_lifecycle() {
    let xml = domain(&spec());
    let disks = find(&xml, &["domain", "devices", "disk"]);
    assert_eq!(disks.len(), 2);
    let drivers = find(&xml, &["domain", "devices", "disk", "driver"]);
    assert_eq!(attr_of(&drivers[0], "type").as_deref(), Some("qcow2"));
    assert_eq!(attr_of(&drivers[1], "type").as_deref(), Some("raw"));
    let targets = find(&xml, &["domain", "devices", "disk", "target"]);
    assert_eq!(attr_of(&targets[0], "dev").as_deref(), Some("vda"));
    assert_eq!(attr_of(&targets[1], "dev").as_deref(), Some("vdb"));
    assert_eq!(
        find(&xml, &["domain", "devices", "disk", "readonly"]).len(),
        1
    );
    // A pty libvirt can open a console on, logging to the file; the console is that
    // port, without a source or log of its own.
    let serial = &find(&xml, &["domain", "devices", "serial"])[0];
    assert_eq!(attr_of(serial, "type").as_deref(), Some("pty"));
    let log = &find(&xml, &["domain", "devices", "serial", "log"])[0];
    assert_eq!(attr_of(log, "file").as_deref(), Some("/var/log/vm1.log"));
    assert_eq!(attr_of(log, "append").as_deref(), Some("on"));
    assert!(find(&xml, &["domain", "devices", "serial", "source"]).is_empty());
    let console = &find(&xml, &["domain", "devices", "console"])[0];
    assert_eq!(attr_of(console, "type").as_deref(), Some("pty"));
    assert!(find(&xml, &["domain", "devices", "console", "log"]).is_empty());
    let rng = &find(&xml, &["domain", "devices", "rng", "backend"])[0];
    assert_eq!(rng.1, "/dev/urandom");
    assert_eq!(find(&xml, &["domain", "on_poweroff"])[0].1, "destroy");
    assert_eq!(find(&xml, &["domain", "on_reboot"])[0].1, "restart");
    assert_eq!(find(&xml, &["domain", "on_crash"])[0].1, "destroy");
    assert_eq!(find(&xml, &["domain", "memory"])[0].1, "256");
    assert_eq!(find(&xml, &["domain", "currentMemory"])[0].1, "256");

    // Without a log file there is no <log> and parse_domain reports none.
    let xml = domain(&DomainSpec {
        console_log: None,
        ..spec()
    });
    let serial = &find(&xml, &["domain", "devices", "serial"])[0];
    assert_eq!(attr_of(serial, "type").as_deref(), Some("pty"));
    let console = &find(&xml, &["domain", "devices", "console"])[0];
    assert_eq!(attr_of(console, "type").as_deref(), Some("pty"));
    assert!(find(&xml, &["domain", "devices", "serial", "log"]).is_empty());
    assert_eq!(parse_domain(&xml).unwrap().console_log, None);
}

/// A running domain's serial port as libvirt 9.0 shows the pty the agent defines: its
/// `<source path>` is the pty, not the log.
#[test]
fn the_log_of_a_pty_serial_port_is_the_console_log() {
    let xml = r#"<domain type='qemu'><name>vm1</name><uuid>u</uuid><devices>
<serial type='pty'>
  <source path='/dev/pts/4'/>
  <log file='/var/lib/nva/pool/vm1.console.log' append='on'/>
  <target type='isa-serial' port='0'><model name='isa-serial'/></target>
  <alias name='serial0'/>
</serial>
<console type='pty' tty='/dev/pts/4'>
  <source path='/dev/pts/4'/>
  <log file='/var/lib/nva/pool/vm1.console.log' append='on'/>
  <target type='serial' port='0'/>
</console>
</devices></domain>"#;
    assert_eq!(
        parse_domain(xml).unwrap().console_log.as_deref(),
        Some("/var/lib/nva/pool/vm1.console.log")
    );
}

/// Shaped like libvirt's own output: single quotes, elements we never wrote, our
/// namespace under another prefix, a foreign element with our local names, devices
/// of other types.
const LIBVIRT_STYLE: &str = r#"<?xml version="1.0"?>
<!-- edited by hand -->
<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web&#45;1 &amp; co</name>
  <uuid>0b1c3e4f-aaaa-bbbb-cccc-123456789abc</uuid>
  <metadata>
<other:vm xmlns:other='urn:someone-else'>
  <other:instance-id>not-ours</other:instance-id>
  <name>decoy</name>
</other:vm>
<x:vm xmlns:x="https://github.com/node-vm-agent/xmlns/vm/1">
  <x:instance-id><![CDATA[i-<42>]]></x:instance-id>
</x:vm>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <devices>
<emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='cdrom'>
  <source file='/iso/x.iso'/>
  <target dev='sda' bus='sata'/>
</disk>
<disk type='volume' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source pool='agent' volume='web-1.qcow2'/>
  <backingStore type='file'><source file='/base.qcow2'/></backingStore>
  <target dev='vda' bus='virtio'/>
</disk>
<interface type='bridge'>
  <mac address='52:54:00:00:00:01'/>
  <source bridge='br0'/>
</interface>
<interface type="network">
  <mac address="52:54:00:ab:cd:ef"/>
  <source network="default" portid="9a1e" bridge="virbr0"/>
  <target dev="vnet3"/>
  <model type="virtio"/>
</interface>
<serial type='pty'><source path='/dev/pts/3'/><target port='1'/></serial>
<serial type='file'>
  <source path='/var/log/web-1.log' append='on'/>
  <target type='isa-serial' port='0'><model name='isa-serial'/></target>
</serial>
<console type='file'><source path='/other.log'/><target type='serial' port='0'/></console>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'/>
</domain>
"#;

#[test]
fn parses_libvirt_style_output() {
    let facts = parse_domain(LIBVIRT_STYLE).unwrap();
    assert_eq!(
        facts,
        DomainFacts {
            name: "web-1 & co".into(),
            uuid: "0b1c3e4f-aaaa-bbbb-cccc-123456789abc".into(),
            interfaces: vec![("52:54:00:ab:cd:ef".into(), "default".into())],
            volumes: vec![("agent".into(), "web-1.qcow2".into())],
            console_log: Some("/var/log/web-1.log".into()),
            instance_id: Some("i-<42>".into()),
            taps: vec!["vnet3".into()],
            serial_type: Some("pty".into()),
        }
    );
}

#[test]
fn foreign_domain_has_no_instance_id() {
    let xml = r#"<domain type='qemu'><name>theirs</name>
        <metadata><nva:vm xmlns:nva='urn:not-the-agent'><nva:instance-id>x</nva:instance-id></nva:vm></metadata>
        <nva:vm xmlns:nva='https://github.com/node-vm-agent/xmlns/vm/1'><nva:instance-id>outside-metadata</nva:instance-id></nva:vm>
        </domain>"#;
    let facts = parse_domain(xml).unwrap();
    assert_eq!(facts.name, "theirs");
    assert_eq!(facts.instance_id, None);
    assert!(facts.interfaces.is_empty() && facts.volumes.is_empty());
}

#[test]
fn rejects_what_is_not_a_domain() {
    assert!(parse_domain("").is_err());
    assert!(parse_domain("<pool type='dir'><name>x</name></pool>").is_err());
    assert!(parse_domain("<domain><name>x</name>").is_err());
    assert!(parse_domain("<domain><name>x</nme></domain>").is_err());
    assert!(parse_domain("<domain><name>&bogus;</name></domain>").is_err());
    assert!(parse_domain("<domain><uuid>u</uuid></domain>").is_err());
    assert!(
        parse_domain("<domain><name>a</name></domain><domain><name>b</name></domain>").is_err()
    );
    assert!(pool_path("<domain><name>x</name></domain>").is_err());
    assert!(pool_path("<pool><target/></pool>").is_err());
    assert_eq!(
        pool_path("<pool type='dir'><target><path>/a&amp;b</path></target></pool>").unwrap(),
        "/a&b"
    );
}
