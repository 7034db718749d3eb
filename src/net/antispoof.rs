//! The mesh's anti-spoofing rule as its own small interface: the controller's tunnel
//! addresses may only arrive through the WireGuard link (docs/decisions/08-trusted-controller-path.md).
//!
//! It is not part of the port maps' `Firewall`: the mesh, not the port-map service,
//! decides these networks, and a port-map fake that silently ignored them hid whether
//! the rule was ever asked for.

use ipnetwork::Ipv4Network;

/// Keeps the controller's tunnel addresses from arriving on any interface but the
/// WireGuard link.
///
/// The rule lives in the agent's one nftables table, which is only ever written whole:
/// the networks set here take effect with the table's next whole rewrite
/// (`PortMaps::restore`, or a reconcile, which sees the difference as drift). The mesh
/// sets them and then restores the table before it trusts the tunnel.
pub trait TunnelGuard: Send + Sync + 'static {
    /// The networks that may arrive only through the WireGuard link (the controller's
    /// `allowed_ips`); empty for none.
    fn set_tunnel_sources(&self, nets: &[Ipv4Network]);
}
