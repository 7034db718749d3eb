//! libvirt XML documents, written with an XML writer (every value escaped) and read back
//! with an XML reader.
//!
//! Nothing here formats a value into markup: every attribute value and every text node
//! goes through `quick_xml`'s escaping, so a VM name, network or path holding `<`, `&`,
//! quotes or `]]>` cannot change the document's structure (the original agent put them
//! into an f-string). Values must still be characters XML 1.0 allows: callers validate
//! names and paths before they get here, and libvirt rejects a document that carries, say,
//! a NUL or an escape character.
//!
//! `write.rs` makes the documents the agent sends (domain, pool, volume); `read.rs` reads
//! back what libvirt returns (a domain's facts, a pool's path, the host's capabilities).

mod metadata;
mod network;
mod read;
mod write;

pub use network::parse_network;
#[cfg(test)]
pub use read::pool_path;
pub use read::{DomainFacts, XmlError, guest_support, parse_domain};
pub use write::{DomainSpec, dhcp_host, domain, pool, volume};

#[cfg(test)]
mod driver_tests;
#[cfg(test)]
mod tests;
