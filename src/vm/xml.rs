//! libvirt XML documents, written with an XML writer (every value escaped) and read back
//! with an XML reader.
//!
//! Nothing here formats a value into markup: every attribute value and every text node
//! goes through `quick_xml`'s escaping, so a VM name, network or path holding `<`, `&`,
//! quotes or `]]>` cannot change the document's structure (the original agent put them
//! into an f-string). Values must still be characters XML 1.0 allows: callers validate
//! names and paths before they get here, and libvirt rejects a document that carries, say,
//! a NUL or an escape character.

use std::borrow::Cow;
use std::io;

use quick_xml::events::{BytesRef, BytesStart, BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::{NsReader, Writer, XmlVersion};

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
    /// One of `ARCHES`.
    pub arch: &'a str,
    /// The agent's storage pool; disk and seed are `<disk type='volume'>` in it.
    pub pool: &'a str,
    pub disk_volume: &'a str,
    pub seed_volume: &'a str,
    /// libvirt network name for the one virtio NIC.
    pub network: &'a str,
    /// `52:54:00:xx:xx:xx`.
    pub mac: &'a str,
    /// Serial console log file on the libvirt host (appended to across boots).
    pub console_log: Option<&'a str>,
    /// Direct kernel boot: paths the libvirt host can read.
    pub kernel: Option<&'a str>,
    pub initrd: Option<&'a str>,
    pub cmdline: Option<&'a str>,
    /// Written into the agent's `<metadata>` element, which also marks the domain as ours.
    pub instance_id: &'a str,
}

/// The architectures a VM may ask for (`os_arch`).
pub const ARCHES: &[&str] = &["x86_64", "aarch64"];

/// Namespace of the agent's element in a domain's `<metadata>`.
pub const METADATA_NS: &str = "https://github.com/node-vm-agent/xmlns/vm/1";

/// Prefix we write for `METADATA_NS`. Readers match the namespace URI, never this prefix:
/// libvirt keeps it, but another writer of the same namespace may choose its own.
const METADATA_PREFIX: &str = "nva";
/// Local names inside the agent's metadata element.
const METADATA_ROOT: &str = "vm";
const METADATA_INSTANCE_ID: &str = "instance-id";

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
    // The console is the first serial port: same type and source, so libvirt sees one
    // character device, not two competing for the log file.
    for tag in ["serial", "console"] {
        let target: &[(&str, &str)] = if tag == "serial" {
            &[("port", "0")]
        } else {
            &[("type", "serial"), ("port", "0")]
        };
        match spec.console_log {
            Some(path) => {
                w.create_element(tag)
                    .with_attribute(("type", "file"))
                    .write_inner_content(|w| {
                        empty_el(w, "source", &[("path", path), ("append", "on")])?;
                        empty_el(w, "target", target)
                    })?;
            }
            None => {
                w.create_element(tag)
                    .with_attribute(("type", "pty"))
                    .write_inner_content(|w| empty_el(w, "target", target))?;
            }
        }
    }
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

/// What the agent needs back from a domain's XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainFacts {
    pub name: String,
    pub uuid: String,
    /// (MAC, network name) of each `<interface type='network'>`.
    pub interfaces: Vec<(String, String)>,
    /// (pool, volume) of each `<disk type='volume'>`.
    pub volumes: Vec<(String, String)>,
    /// Path of a `<serial type='file'>` source.
    pub console_log: Option<String>,
    /// The instance-id in the agent's metadata element; `None` = not the agent's domain.
    pub instance_id: Option<String>,
    /// Host-side device (`<target dev>`, e.g. `vnet3`) of each network interface of a
    /// running domain, in the order of `interfaces`.
    pub taps: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("unreadable libvirt XML: {0}")]
pub struct XmlError(pub String);

impl From<quick_xml::Error> for XmlError {
    fn from(e: quick_xml::Error) -> Self {
        XmlError(e.to_string())
    }
}

/// One open element while reading: its local name, and whether it is in `METADATA_NS`.
struct Open {
    local: String,
    ours: bool,
}

/// A pull reader that yields each element as it opens and closes, with the path of open
/// elements in `stack`. libvirt's output uses single quotes, adds elements we never wrote
/// and may carry other applications' namespaces: callers act only on paths they know.
struct Walk<'i> {
    reader: NsReader<&'i [u8]>,
    stack: Vec<Open>,
    text: String,
    /// The root element has closed; anything but trailing misc is an error.
    root_closed: bool,
}

enum Step<'i> {
    /// An element opened (an empty element also yields `Close`).
    Open(BytesStart<'i>),
    /// The innermost element closed; `text` is its direct character data.
    Close {
        text: String,
    },
    Eof,
}

impl<'i> Walk<'i> {
    fn new(xml: &'i str) -> Self {
        let mut reader = NsReader::from_str(xml);
        let config = reader.config_mut();
        config.expand_empty_elements = true;
        config.check_end_names = true;
        Walk {
            reader,
            stack: Vec::new(),
            text: String::new(),
            root_closed: false,
        }
    }

    fn path_is(&self, path: &[&str]) -> bool {
        self.stack.len() == path.len() && self.stack.iter().zip(path).all(|(o, p)| o.local == *p)
    }

    fn next(&mut self) -> Result<Step<'i>, XmlError> {
        loop {
            let (ns, event) = self.reader.read_resolved_event()?;
            let ours = matches!(ns, ResolveResult::Bound(n) if n.0 == METADATA_NS);
            match event {
                Event::Start(start) => {
                    if self.root_closed {
                        return Err(XmlError("more than one root element".into()));
                    }
                    self.stack.push(Open {
                        local: start.local_name().as_ref().to_owned(),
                        ours,
                    });
                    self.text.clear();
                    return Ok(Step::Open(start));
                }
                Event::End(_) => {
                    // The element stays on `stack` until `pop`, so the caller still sees
                    // the path it closes.
                    self.root_closed = self.stack.len() == 1;
                    let text = std::mem::take(&mut self.text);
                    return Ok(Step::Close { text });
                }
                Event::Text(t) => self.text.push_str(&t.xml_content(XmlVersion::Implicit1_0)),
                Event::CData(c) => self.text.push_str(&c.xml_content(XmlVersion::Implicit1_0)),
                Event::GeneralRef(r) => self.text.push_str(&resolve_ref(&r)?),
                Event::Eof => {
                    if !self.stack.is_empty() {
                        return Err(XmlError("document ends inside an element".into()));
                    }
                    return Ok(Step::Eof);
                }
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
                Event::Empty(_) => {
                    // Not produced with `expand_empty_elements`.
                    return Err(XmlError("unexpected empty-element event".into()));
                }
            }
        }
    }

    /// Pops the element `Close` referred to; call after handling it.
    fn pop(&mut self) {
        self.stack.pop();
    }
}

fn resolve_ref(r: &BytesRef<'_>) -> Result<Cow<'static, str>, XmlError> {
    if let Some(c) = r.resolve_char_ref()? {
        return Ok(Cow::Owned(c.to_string()));
    }
    quick_xml::escape::resolve_predefined_entity(r)
        .map(Cow::Borrowed)
        .ok_or_else(|| XmlError(format!("unknown entity &{};", &**r)))
}

/// Value of the unprefixed attribute `key`, unescaped.
fn attr(start: &BytesStart<'_>, key: &str) -> Result<Option<String>, XmlError> {
    for a in start.attributes() {
        let a = a.map_err(|e| XmlError(e.to_string()))?;
        if a.key.prefix().is_none() && a.key.local_name().as_ref() == key {
            return Ok(Some(
                a.normalized_value(XmlVersion::Implicit1_0)?.into_owned(),
            ));
        }
    }
    Ok(None)
}

/// An `<interface type='network'>` or `<disk type='volume'>` being read.
#[derive(Default)]
struct Pair {
    first: Option<String>,
    second: Option<String>,
}

impl Pair {
    fn take(&mut self) -> (String, String) {
        (
            self.first.take().unwrap_or_default(),
            self.second.take().unwrap_or_default(),
        )
    }
}

/// `domain/metadata/{METADATA_NS}vm/{METADATA_NS}instance-id`, whatever the prefixes.
fn is_instance_id(stack: &[Open]) -> bool {
    match stack {
        [domain, metadata, root, id] => {
            domain.local == "domain"
                && metadata.local == "metadata"
                && root.ours
                && root.local == METADATA_ROOT
                && id.ours
                && id.local == METADATA_INSTANCE_ID
        }
        _ => false,
    }
}

pub fn parse_domain(xml: &str) -> Result<DomainFacts, XmlError> {
    let mut walk = Walk::new(xml);
    let mut facts = DomainFacts::default();
    let mut name = None;
    // The device being read: (MAC, network) of a network interface, (pool, volume) of a
    // volume disk; `None` inside devices of other types.
    let mut iface: Option<Pair> = None;
    let mut disk: Option<Pair> = None;
    let mut serial_file = false;

    loop {
        match walk.next()? {
            Step::Eof => break,
            Step::Open(start) => {
                let Some((this, parents)) = walk.stack.split_last() else {
                    continue;
                };
                let parents: Vec<&str> = parents.iter().map(|o| o.local.as_str()).collect();
                let kind = || attr(&start, "type");
                match (parents.as_slice(), this.local.as_str()) {
                    ([], "domain") => {}
                    ([], other) => {
                        return Err(XmlError(format!("root element is <{other}>, not <domain>")));
                    }
                    (["domain", "devices"], "interface") => {
                        iface = (kind()?.as_deref() == Some("network")).then(Pair::default);
                    }
                    (["domain", "devices"], "disk") => {
                        disk = (kind()?.as_deref() == Some("volume")).then(Pair::default);
                    }
                    (["domain", "devices"], "serial") => {
                        serial_file = kind()?.as_deref() == Some("file");
                    }
                    (["domain", "devices", "interface"], "mac") => {
                        if let Some(pair) = iface.as_mut() {
                            pair.first = attr(&start, "address")?;
                        }
                    }
                    (["domain", "devices", "interface"], "target") => {
                        if iface.is_some()
                            && let Some(dev) = attr(&start, "dev")?
                        {
                            facts.taps.push(dev);
                        }
                    }
                    (["domain", "devices", "interface"], "source") => {
                        if let Some(pair) = iface.as_mut() {
                            pair.second = attr(&start, "network")?;
                        }
                    }
                    (["domain", "devices", "disk"], "source") => {
                        if let Some(pair) = disk.as_mut() {
                            pair.first = attr(&start, "pool")?;
                            pair.second = attr(&start, "volume")?;
                        }
                    }
                    // The first file-backed serial port is the console log.
                    (["domain", "devices", "serial"], "source")
                        if serial_file && facts.console_log.is_none() =>
                    {
                        facts.console_log = attr(&start, "path")?;
                    }
                    _ => {}
                }
            }
            Step::Close { text } => {
                if walk.path_is(&["domain", "name"]) {
                    name = Some(text);
                } else if walk.path_is(&["domain", "uuid"]) {
                    facts.uuid = text;
                } else if walk.path_is(&["domain", "devices", "interface"]) {
                    if let Some(mut pair) = iface.take() {
                        facts.interfaces.push(pair.take());
                    }
                } else if walk.path_is(&["domain", "devices", "disk"]) {
                    if let Some(mut pair) = disk.take()
                        && pair.first.is_some()
                    {
                        facts.volumes.push(pair.take());
                    }
                } else if walk.path_is(&["domain", "devices", "serial"]) {
                    serial_file = false;
                } else if is_instance_id(&walk.stack) && facts.instance_id.is_none() {
                    facts.instance_id = Some(text);
                }
                walk.pop();
            }
        }
    }
    facts.name = name.ok_or_else(|| XmlError("no <name> in <domain>".into()))?;
    Ok(facts)
}

/// The `<target><path>` of a storage pool's XML.
pub fn pool_path(xml: &str) -> Result<String, XmlError> {
    let mut walk = Walk::new(xml);
    let mut path = None;
    loop {
        match walk.next()? {
            Step::Eof => break,
            Step::Open(_) => {
                if walk.stack.len() == 1 && walk.stack[0].local != "pool" {
                    return Err(XmlError(format!(
                        "root element is <{}>, not <pool>",
                        walk.stack[0].local
                    )));
                }
            }
            Step::Close { text } => {
                if walk.path_is(&["pool", "target", "path"]) && path.is_none() {
                    path = Some(text);
                }
                walk.pop();
            }
        }
    }
    path.ok_or_else(|| XmlError("no <target><path> in <pool>".into()))
}

/// The `(arch, domain type)` pairs of hvm guests a libvirt host can run, from its
/// capabilities XML (`capabilities/guest[os_type=hvm]/arch[@name]/domain[@type]`).
pub fn guest_support(xml: &str) -> Result<Vec<(String, String)>, XmlError> {
    let mut walk = Walk::new(xml);
    let mut out = Vec::new();
    let mut hvm = false;
    let mut arch: Option<String> = None;
    let mut found: Vec<(String, String)> = Vec::new();
    loop {
        match walk.next()? {
            Step::Eof => break,
            Step::Open(start) => {
                if walk.path_is(&["capabilities", "guest"]) {
                    hvm = false;
                    found.clear();
                } else if walk.path_is(&["capabilities", "guest", "arch"]) {
                    arch = attr(&start, "name")?;
                } else if walk.path_is(&["capabilities", "guest", "arch", "domain"])
                    && let (Some(a), Some(t)) = (&arch, attr(&start, "type")?)
                {
                    found.push((a.clone(), t));
                }
            }
            Step::Close { text } => {
                if walk.path_is(&["capabilities", "guest", "os_type"]) {
                    hvm = text.trim() == "hvm";
                } else if walk.path_is(&["capabilities", "guest"]) && hvm {
                    out.append(&mut found);
                }
                walk.pop();
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every character that could break out of an attribute, a text node or a CDATA
    /// section, plus a non-ASCII one.
    const HOSTILE: &str = "a<b>&amp;c\"d'e]]>f<!--g--><![CDATA[h]]>ü";

    fn spec<'a>() -> DomainSpec<'a> {
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
    fn find(xml: &str, path: &[&str]) -> Vec<(Vec<(String, String)>, String)> {
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
        let serial = &find(&xml, &["domain", "devices", "serial"])[0];
        assert_eq!(attr_of(serial, "type").as_deref(), Some("file"));
        let console = &find(&xml, &["domain", "devices", "console"])[0];
        assert_eq!(attr_of(console, "type").as_deref(), Some("file"));
        let rng = &find(&xml, &["domain", "devices", "rng", "backend"])[0];
        assert_eq!(rng.1, "/dev/urandom");
        assert_eq!(find(&xml, &["domain", "on_poweroff"])[0].1, "destroy");
        assert_eq!(find(&xml, &["domain", "on_reboot"])[0].1, "restart");
        assert_eq!(find(&xml, &["domain", "on_crash"])[0].1, "destroy");
        assert_eq!(find(&xml, &["domain", "memory"])[0].1, "256");
        assert_eq!(find(&xml, &["domain", "currentMemory"])[0].1, "256");

        // Without a log file both are ptys and parse_domain reports no log.
        let xml = domain(&DomainSpec {
            console_log: None,
            ..spec()
        });
        let serial = &find(&xml, &["domain", "devices", "serial"])[0];
        assert_eq!(attr_of(serial, "type").as_deref(), Some("pty"));
        let console = &find(&xml, &["domain", "devices", "console"])[0];
        assert_eq!(attr_of(console, "type").as_deref(), Some("pty"));
        assert_eq!(parse_domain(&xml).unwrap().console_log, None);
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

    // ---- libvirt's in-process test driver ----
    //
    // `test:///default` keeps one state per process, shared by every test thread, with a
    // pool `default-pool` and a network `default`: each test uses names of its own.

    use virt::connect::Connect;
    use virt::storage_vol::StorageVol;

    fn unique(prefix: &str) -> String {
        format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
    }

    #[test]
    fn test_driver_accepts_domain_and_reports_it_back() {
        crate::vm::libvirt_so::ensure_loaded().unwrap();
        let conn = Connect::open(Some("test:///default")).unwrap();
        let pool = conn.lookup_storage_pool_by_name("default-pool").unwrap();
        let name = unique("nva-dom");
        let disk_name = format!("{name}-disk.qcow2");
        let seed_name = format!("{name}-seed.img");
        let disk =
            StorageVol::create_xml(&pool, &volume(&disk_name, 1 << 30, "qcow2", None), 0).unwrap();
        let seed =
            StorageVol::create_xml(&pool, &volume(&seed_name, 1 << 20, "raw", None), 0).unwrap();

        let uuid = uuid::Uuid::new_v4().to_string();
        let s = DomainSpec {
            name: &name,
            uuid: &uuid,
            pool: "default-pool",
            disk_volume: &disk_name,
            seed_volume: &seed_name,
            network: "default",
            mac: "52:54:00:aa:bb:cc",
            console_log: Some("/tmp/nva-console.log"),
            kernel: Some("/boot/vmlinuz"),
            initrd: Some("/boot/initrd.img"),
            cmdline: Some("console=ttyS0"),
            instance_id: "i-test-driver",
            ..spec()
        };
        let dom = conn.define_domain_xml(&domain(&s)).unwrap();
        let back = dom.xml_desc(0).unwrap();
        let facts = parse_domain(&back);
        dom.undefine().unwrap();
        disk.delete(0).unwrap();
        seed.delete(0).unwrap();

        let facts = facts.unwrap();
        assert_eq!(
            facts,
            DomainFacts {
                name,
                uuid,
                interfaces: vec![("52:54:00:aa:bb:cc".into(), "default".into())],
                volumes: vec![
                    ("default-pool".into(), disk_name),
                    ("default-pool".into(), seed_name)
                ],
                console_log: Some("/tmp/nva-console.log".into()),
                instance_id: Some("i-test-driver".into()),
                // The test driver names the host side of a defined interface itself.
                taps: facts.taps.clone(),
            },
            "{back}"
        );
    }

    #[test]
    fn test_driver_accepts_kvm_and_aarch64_domains() {
        crate::vm::libvirt_so::ensure_loaded().unwrap();
        let conn = Connect::open(Some("test:///default")).unwrap();
        for (domain_type, arch) in [("kvm", "x86_64"), ("qemu", "aarch64")] {
            let name = unique("nva-arch");
            let uuid = uuid::Uuid::new_v4().to_string();
            let s = DomainSpec {
                name: &name,
                uuid: &uuid,
                domain_type,
                arch,
                console_log: None,
                ..spec()
            };
            let dom = conn
                .define_domain_xml(&domain(&s))
                .unwrap_or_else(|e| panic!("{domain_type}/{arch}: {e}"));
            let facts = parse_domain(&dom.xml_desc(0).unwrap());
            dom.undefine().unwrap();
            let facts = facts.unwrap();
            assert_eq!(facts.name, name);
            assert_eq!(facts.instance_id.as_deref(), Some("i-0123"));
            assert_eq!(facts.console_log, None);
        }
    }

    #[test]
    fn test_driver_accepts_backed_volume() {
        crate::vm::libvirt_so::ensure_loaded().unwrap();
        let conn = Connect::open(Some("test:///default")).unwrap();
        let pool = conn.lookup_storage_pool_by_name("default-pool").unwrap();
        let base_name = unique("nva-base");
        let base =
            StorageVol::create_xml(&pool, &volume(&base_name, 1 << 30, "qcow2", None), 0).unwrap();
        let base_path = base.path().unwrap();
        let name = unique("nva-overlay");
        let overlay = StorageVol::create_xml(
            &pool,
            &volume(&name, 2 << 30, "qcow2", Some((&base_path, "qcow2"))),
            0,
        );
        let described = overlay.as_ref().map(|v| v.xml_desc(0));
        if let Ok(v) = &overlay {
            v.delete(0).unwrap();
        }
        base.delete(0).unwrap();
        let described = described.unwrap().unwrap();
        assert_eq!(find(&described, &["volume", "name"])[0].1, name);
    }

    #[test]
    fn test_driver_accepts_pool_and_pool_path_reads_it_back() {
        crate::vm::libvirt_so::ensure_loaded().unwrap();
        let conn = Connect::open(Some("test:///default")).unwrap();
        let name = unique("nva-pool");
        let path = format!("/srv/{name}/a&b");
        let pool = conn
            .define_storage_pool_xml(&super::pool(&name, &path), 0)
            .unwrap();
        let back = pool.xml_desc(0).unwrap();
        pool.undefine().unwrap();
        assert_eq!(pool_path(&back).unwrap(), path, "{back}");
    }

    #[test]
    fn guest_support_lists_hvm_arches_with_their_domain_types() {
        let caps = "<capabilities><host><cpu><arch>x86_64</arch></cpu></host>\
            <guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>\
            <domain type='qemu'/><domain type='kvm'><emulator>/x</emulator></domain></arch></guest>\
            <guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/></arch></guest>\
            <guest><os_type>xen</os_type><arch name='aarch64'><domain type='xen'/></arch></guest>\
            </capabilities>";
        assert_eq!(
            guest_support(caps).unwrap(),
            [
                ("i686".to_owned(), "qemu".to_owned()),
                ("x86_64".to_owned(), "kvm".to_owned()),
                ("x86_64".to_owned(), "qemu".to_owned()),
            ]
        );
        // libvirt's test driver: its own domain type.
        crate::vm::libvirt_so::ensure_loaded().unwrap();
        let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
        let support = guest_support(&conn.capabilities().unwrap()).unwrap();
        assert!(
            support.contains(&("i686".to_owned(), "test".to_owned())),
            "{support:?}"
        );
        assert!(guest_support("<capabilities><guest>").is_err());
    }
}
