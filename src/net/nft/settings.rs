//! What the NAT rules need to know about the node, from the settings.

use ipnetwork::Ipv4Network;

use super::error::NftError;
use super::table::IFNAMSIZ;
use crate::config::{MeshSettings, PortMapSettings};

/// What the NAT rules need to know about the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSettings {
    /// Bridge the VMs are attached to.
    pub vms_bridge: String,
    /// The VMs' subnet, masqueraded when it leaves for the outside.
    pub vm_subnet: Ipv4Network,
    /// WireGuard interface of the mesh, masqueraded for multi-hop proxy chains.
    pub wg_iface: Option<String>,
    /// Interface to the internet; `None` means "anything but the VM bridge".
    pub external_iface: Option<String>,
    /// Source networks that may only arrive through `wg_iface` (the controller's tunnel
    /// addresses, trusted by the API): dropped from any other interface.
    pub tunnel_sources: Vec<Ipv4Network>,
}

impl NatSettings {
    /// What the NAT rules need from the settings: the port maps' group and the mesh's
    /// interface. EXTERNAL_IFACE stays as set: when unset, the firewall looks up the
    /// default route's interface itself.
    pub fn from_settings(pm: &PortMapSettings, mesh: &MeshSettings) -> Self {
        Self {
            vms_bridge: pm.vms_bridge.clone(),
            vm_subnet: pm.vm_subnet,
            wg_iface: Some(mesh.wg_iface.clone()),
            external_iface: pm.external_iface.clone(),
            tunnel_sources: vec![],
        }
    }

    pub(super) fn validate(&self) -> Result<(), NftError> {
        let names = std::iter::once(("vms_bridge", Some(&self.vms_bridge)))
            .chain([
                ("wg_iface", self.wg_iface.as_ref()),
                ("external_iface", self.external_iface.as_ref()),
            ])
            .filter_map(|(what, name)| name.map(|n| (what, n)));
        for (what, name) in names {
            // The kernel compares oifname as IFNAMSIZ bytes including the NUL.
            if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
                return Err(NftError::Invalid(format!(
                    "{what} {name:?} is not an interface name (1 to 15 bytes)"
                )));
            }
        }
        Ok(())
    }
}
