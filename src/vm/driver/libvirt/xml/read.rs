//! What the agent reads back from libvirt's documents, through an XML reader.

use std::borrow::Cow;

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::{NsReader, XmlVersion};

use super::metadata::{METADATA_INSTANCE_ID, METADATA_NS, METADATA_ROOT};

/// What the agent needs back from a domain's XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainFacts {
    pub name: String,
    pub uuid: String,
    /// (MAC, network name) of each `<interface type='network'>`.
    pub interfaces: Vec<(String, String)>,
    /// (pool, volume) of each `<disk type='volume'>`.
    pub volumes: Vec<(String, String)>,
    /// The first serial port's log file: its `<log file>` (a pty port, as the agent
    /// writes it now), or its `<source path>` when the port is `type='file'` (as the
    /// agent wrote it before the interactive console).
    pub console_log: Option<String>,
    /// The instance-id in the agent's metadata element; `None` = not the agent's domain.
    pub instance_id: Option<String>,
    /// Host-side device (`<target dev>`, e.g. `vnet3`) of each network interface of a
    /// running domain, in the order of `interfaces`.
    pub taps: Vec<String>,
    /// The `type` of the first `<serial>` device.
    pub serial_type: Option<String>,
}

/// Why a document from libvirt could not be read.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("unreadable libvirt XML: {0}")]
    Syntax(#[from] quick_xml::Error),
    #[error("unreadable libvirt XML: {0}")]
    Attribute(#[from] quick_xml::events::attributes::AttrError),
    #[error("unreadable libvirt XML: unknown entity &{0};")]
    Entity(String),
    /// The document's shape is not one libvirt writes.
    #[error("unreadable libvirt XML: {0}")]
    Shape(&'static str),
    #[error("unreadable libvirt XML: root element is <{found}>, not <{expected}>")]
    Root {
        found: String,
        expected: &'static str,
    },
    /// An attribute whose value is not what it must be.
    #[error("unreadable libvirt XML: {key}={value:?} is not {expected}")]
    Value {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// One open element while reading: its local name, and whether it is in `METADATA_NS`.
struct Open {
    local: String,
    ours: bool,
}

/// A pull reader that yields each element as it opens and closes, with the path of open
/// elements in `stack`. libvirt's output uses single quotes, adds elements we never wrote
/// and may carry other applications' namespaces: callers act only on paths they know.
pub(super) struct Walk<'i> {
    reader: NsReader<&'i [u8]>,
    stack: Vec<Open>,
    text: String,
    /// The root element has closed; anything but trailing misc is an error.
    root_closed: bool,
}

pub(super) enum Step<'i> {
    /// An element opened (an empty element also yields `Close`).
    Open(BytesStart<'i>),
    /// The innermost element closed; `text` is its direct character data.
    Close {
        text: String,
    },
    Eof,
}

impl<'i> Walk<'i> {
    pub(super) fn new(xml: &'i str) -> Self {
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

    pub(super) fn path_is(&self, path: &[&str]) -> bool {
        self.stack.len() == path.len() && self.stack.iter().zip(path).all(|(o, p)| o.local == *p)
    }

    pub(super) fn next(&mut self) -> Result<Step<'i>, XmlError> {
        loop {
            let (ns, event) = self.reader.read_resolved_event()?;
            let ours = matches!(ns, ResolveResult::Bound(n) if n.0 == METADATA_NS);
            match event {
                Event::Start(start) => {
                    if self.root_closed {
                        return Err(XmlError::Shape("more than one root element"));
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
                        return Err(XmlError::Shape("document ends inside an element"));
                    }
                    return Ok(Step::Eof);
                }
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
                Event::Empty(_) => {
                    // Not produced with `expand_empty_elements`.
                    return Err(XmlError::Shape("unexpected empty-element event"));
                }
            }
        }
    }

    /// Pops the element `Close` referred to; call after handling it.
    pub(super) fn pop(&mut self) {
        self.stack.pop();
    }
}

fn resolve_ref(r: &BytesRef<'_>) -> Result<Cow<'static, str>, XmlError> {
    if let Some(c) = r.resolve_char_ref()? {
        return Ok(Cow::Owned(c.to_string()));
    }
    quick_xml::escape::resolve_predefined_entity(r)
        .map(Cow::Borrowed)
        .ok_or_else(|| XmlError::Entity((**r).to_string()))
}

/// Value of the unprefixed attribute `key`, unescaped.
pub(super) fn attr(start: &BytesStart<'_>, key: &str) -> Result<Option<String>, XmlError> {
    for a in start.attributes() {
        let a = a?;
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

/// What a domain's XML says, read element by element.
#[derive(Default)]
struct DomainReader {
    facts: DomainFacts,
    name: Option<String>,
    /// The device being read: (MAC, network) of a network interface, (pool, volume) of a
    /// volume disk; `None` inside devices of other types.
    iface: Option<Pair>,
    disk: Option<Pair>,
    serial_file: bool,
}

impl DomainReader {
    fn open(&mut self, stack: &[Open], start: &BytesStart<'_>) -> Result<(), XmlError> {
        let Some((this, parents)) = stack.split_last() else {
            return Ok(());
        };
        let parents: Vec<&str> = parents.iter().map(|o| o.local.as_str()).collect();
        let kind = || attr(start, "type");
        match (parents.as_slice(), this.local.as_str()) {
            ([], "domain") => {}
            ([], other) => {
                return Err(XmlError::Root {
                    found: other.to_owned(),
                    expected: "domain",
                });
            }
            (["domain", "devices"], "interface") => {
                self.iface = (kind()?.as_deref() == Some("network")).then(Pair::default);
            }
            (["domain", "devices"], "disk") => {
                self.disk = (kind()?.as_deref() == Some("volume")).then(Pair::default);
            }
            (["domain", "devices"], "serial") => {
                let kind = kind()?;
                self.serial_file = kind.as_deref() == Some("file");
                if self.facts.serial_type.is_none() {
                    self.facts.serial_type = Some(kind.unwrap_or_default());
                }
            }
            (["domain", "devices", "interface"], leaf) => self.interface(leaf, start)?,
            (["domain", "devices", "disk"], "source") => {
                if let Some(pair) = self.disk.as_mut() {
                    pair.first = attr(start, "pool")?;
                    pair.second = attr(start, "volume")?;
                }
            }
            // The console log: the first serial port's log file, or the source of the
            // first file-backed serial port (a definition from before the pty).
            (["domain", "devices", "serial"], "source")
                if self.serial_file && self.facts.console_log.is_none() =>
            {
                self.facts.console_log = attr(start, "path")?;
            }
            (["domain", "devices", "serial"], "log") if self.facts.console_log.is_none() => {
                self.facts.console_log = attr(start, "file")?;
            }
            _ => {}
        }
        Ok(())
    }

    /// An element inside a network `<interface>`: its MAC, tap or network.
    fn interface(&mut self, leaf: &str, start: &BytesStart<'_>) -> Result<(), XmlError> {
        let Some(pair) = self.iface.as_mut() else {
            return Ok(());
        };
        match leaf {
            "mac" => pair.first = attr(start, "address")?,
            "source" => pair.second = attr(start, "network")?,
            "target" => self.facts.taps.extend(attr(start, "dev")?),
            _ => {}
        }
        Ok(())
    }

    fn close(&mut self, walk: &Walk<'_>, text: String) {
        if walk.path_is(&["domain", "name"]) {
            self.name = Some(text);
        } else if walk.path_is(&["domain", "uuid"]) {
            self.facts.uuid = text;
        } else if walk.path_is(&["domain", "devices", "interface"]) {
            if let Some(mut pair) = self.iface.take() {
                self.facts.interfaces.push(pair.take());
            }
        } else if walk.path_is(&["domain", "devices", "disk"]) {
            if let Some(mut pair) = self.disk.take()
                && pair.first.is_some()
            {
                self.facts.volumes.push(pair.take());
            }
        } else if walk.path_is(&["domain", "devices", "serial"]) {
            self.serial_file = false;
        } else if is_instance_id(&walk.stack) && self.facts.instance_id.is_none() {
            self.facts.instance_id = Some(text);
        }
    }
}

pub fn parse_domain(xml: &str) -> Result<DomainFacts, XmlError> {
    let mut walk = Walk::new(xml);
    let mut reader = DomainReader::default();
    loop {
        match walk.next()? {
            Step::Eof => break,
            Step::Open(start) => reader.open(&walk.stack, &start)?,
            Step::Close { text } => {
                reader.close(&walk, text);
                walk.pop();
            }
        }
    }
    let mut facts = reader.facts;
    facts.name = reader
        .name
        .ok_or(XmlError::Shape("no <name> in <domain>"))?;
    Ok(facts)
}

/// The `<target><path>` of a storage pool's XML (tests read back the pool they wrote).
#[cfg(test)]
pub fn pool_path(xml: &str) -> Result<String, XmlError> {
    let mut walk = Walk::new(xml);
    let mut path = None;
    loop {
        match walk.next()? {
            Step::Eof => break,
            Step::Open(_) => {
                if walk.stack.len() == 1 && walk.stack[0].local != "pool" {
                    return Err(XmlError::Root {
                        found: walk.stack[0].local.clone(),
                        expected: "pool",
                    });
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
    path.ok_or(XmlError::Shape("no <target><path> in <pool>"))
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
