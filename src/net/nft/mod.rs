//! nftables over netlink: the agent-owned port-map table, its read-back and drift
//! check, and the accept rule that lets DNAT'd traffic past libvirt's reject rules.
//!
//! ```text
//! table ip node_vm_agent {
//!   map tcp_ports { type inet_service : ipv4_addr . inet_service; counter; }
//!   map udp_ports { type inet_service : ipv4_addr . inet_service; counter; }
//!   set tcp_flows, tcp_restricted, tcp_allow, tcp_drops (and udp_*): see `sets.rs`
//!   chain prerouting  { type nat hook prerouting priority dstnat; policy accept;
//!     meta l4proto tcp tcp dport @tcp_restricted fib daddr type local
//!       tcp dport . ip saddr != @tcp_allow tcp dport @tcp_drops drop
//!     fib daddr type local meta l4proto tcp dnat ip to tcp dport map @tcp_ports
//!     (the same two for udp) }
//!   chain output      { type nat hook output priority -100; policy accept;
//!     ip daddr != 127.0.0.0/8 (then the same four: loopback stays the node's own) }
//!   chain forward     { type filter hook forward priority filter; policy accept;
//!     ct status dnat meta l4proto tcp ct original proto-dst @tcp_flows
//!     ct status dnat meta l4proto udp ct original proto-dst @udp_flows
//!     ct status dnat accept }
//!   chain antispoof   { type filter hook prerouting priority raw; policy accept;
//!     iifname != "<wg_iface>" ip saddr <controller net> drop }  (one per net, once joined)
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ct status dnat oifname "<vms_bridge>" masquerade
//!     oifname "<wg_iface>" masquerade                       (only with a wg_iface)
//!     ip saddr <vm_subnet> ip daddr != <vm_subnet> oifname "<external_iface>" masquerade }
//! }
//! ```
//!
//! Port maps, their allow-lists and their counters are set elements, so a lookup costs
//! the same for one map or 30,000, and adding or removing one is a one-transaction
//! change of a few elements (docs/decisions/22-allow-lists-and-counters-as-set-elements.md).

mod apply;
mod drift;
mod driver;
mod dump;
mod error;
mod forward;
mod readback;
pub mod ruleset;
pub mod sets;
mod settings;
mod table;
mod xt;

pub use drift::{Drift, diff};
pub use driver::Nft;
pub use error::NftError;
pub use forward::{ForwardAcceptReport, ForwardChainOutcome};
pub use readback::KernelState;
pub use sets::ElementCounters;
pub use settings::NatSettings;
