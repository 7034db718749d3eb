//! Kernel networking: nftables port maps and link-level helpers, all over netlink/procfs.

pub mod antispoof;
pub mod link;
pub mod nft;
pub mod wireguard;
