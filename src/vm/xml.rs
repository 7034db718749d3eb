//! libvirt XML documents, written with an XML writer (every value escaped) and read back
//! with an XML reader. Interface stub: the implementation lands with branch `xml`.

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

pub fn domain(_spec: &DomainSpec<'_>) -> String {
    String::new()
}

/// A `dir` storage pool at `path` (a path on the libvirt host).
pub fn pool(_name: &str, _path: &str) -> String {
    String::new()
}

/// A volume of `capacity_bytes` in `format` (`qcow2` or `raw`), optionally backed by
/// another volume's path (on the libvirt host) and format.
pub fn volume(
    _name: &str,
    _capacity_bytes: u64,
    _format: &str,
    _backing: Option<(&str, &str)>,
) -> String {
    String::new()
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
}

#[derive(Debug, thiserror::Error)]
#[error("unreadable libvirt XML: {0}")]
pub struct XmlError(pub String);

pub fn parse_domain(_xml: &str) -> Result<DomainFacts, XmlError> {
    Err(XmlError("not implemented yet".into()))
}

/// The `<target><path>` of a storage pool's XML.
pub fn pool_path(_xml: &str) -> Result<String, XmlError> {
    Err(XmlError("not implemented yet".into()))
}
