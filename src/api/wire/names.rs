//! The domain's enums as the wire spells them: lower-case names, each enum `From` its
//! domain type (a test holds every spelling to the domain's own `as_str`).

use serde::Serialize;
use utoipa::ToSchema;

use crate::model;

/// `tcp` or `udp`, as the document names a port map's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProtoName {
    Tcp,
    Udp,
}

impl From<model::Proto> for ProtoName {
    fn from(p: model::Proto) -> Self {
        match p {
            model::Proto::Tcp => Self::Tcp,
            model::Proto::Udp => Self::Udp,
        }
    }
}

/// What the operator last asked of a VM (`vms.desired_state`): the reconcile starts
/// a `Running` VM whose domain it had to define again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Stopped,
}

impl From<model::DesiredState> for DesiredState {
    fn from(s: model::DesiredState) -> Self {
        match s {
            model::DesiredState::Running => Self::Running,
            model::DesiredState::Stopped => Self::Stopped,
        }
    }
}

/// Where a base image is (`images.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Downloading,
    Ready,
    Failed,
}

impl From<model::ImageState> for ImageState {
    fn from(s: model::ImageState) -> Self {
        match s {
            model::ImageState::Downloading => Self::Downloading,
            model::ImageState::Ready => Self::Ready,
            model::ImageState::Failed => Self::Failed,
        }
    }
}

/// What a VM is, as `GET /vms` shows it: libvirt's state of its domain, or the
/// agent's word for a VM libvirt does not show. `vms.last_state` keeps the last one
/// observed for the agent's VMs (libvirt's states and `missing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Nostate,
    Running,
    Blocked,
    Paused,
    Shutdown,
    Shutoff,
    Crashed,
    Pmsuspended,
    Creating,
    Failed,
    Missing,
}

impl From<model::VmState> for VmState {
    fn from(s: model::VmState) -> Self {
        use model::VmState as S;
        match s {
            S::Nostate => Self::Nostate,
            S::Running => Self::Running,
            S::Blocked => Self::Blocked,
            S::Paused => Self::Paused,
            S::Shutdown => Self::Shutdown,
            S::Shutoff => Self::Shutoff,
            S::Crashed => Self::Crashed,
            S::Pmsuspended => Self::Pmsuspended,
            S::Creating => Self::Creating,
            S::Failed => Self::Failed,
            S::Missing => Self::Missing,
        }
    }
}

/// Where a VM's listed address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IpSource {
    /// The address the agent reserved for the VM (a DHCP host entry).
    Pinned,
    /// The address of the VM's last DHCP lease.
    Lease,
}

impl From<crate::vm::service::IpSource> for IpSource {
    fn from(s: crate::vm::service::IpSource) -> Self {
        match s {
            crate::vm::service::IpSource::Pinned => Self::Pinned,
            crate::vm::service::IpSource::Lease => Self::Lease,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spelled<T: Serialize>(v: T) -> String {
        serde_json::to_value(v)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_wire_spells_every_name_as_the_domain_does() {
        for p in model::Proto::ALL {
            assert_eq!(spelled(ProtoName::from(p)), p.as_str());
        }
        for s in model::DesiredState::ALL {
            assert_eq!(spelled(DesiredState::from(*s)), s.as_str());
        }
        for s in model::ImageState::ALL {
            assert_eq!(spelled(ImageState::from(*s)), s.as_str());
        }
        for s in model::VmState::ALL {
            assert_eq!(spelled(VmState::from(*s)), s.as_str());
        }
        for s in [
            crate::vm::service::IpSource::Pinned,
            crate::vm::service::IpSource::Lease,
        ] {
            assert_eq!(spelled(IpSource::from(s)), spelled(s));
        }
    }
}
