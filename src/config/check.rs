//! Checks of the settings on their own terms and together (`Settings::validate`).

use ipnetwork::Ipv4Network;

use super::Settings;
use super::error::{SettingError, invalid};
use super::values::check_libvirt_uri;

impl Settings {
    /// Checks of values that need more than their parser, and of settings together;
    /// pure (nothing on the machine is looked at: see `agent::preflight`).
    pub fn validate(&self) -> Result<(), SettingError> {
        self.mesh.join_settings()?;
        if let Some(url) = &self.mesh.controller_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "CONTROLLER_URL",
                url,
                "must start with http:// or https://",
            ));
        }
        if let Some(id) = &self.mesh.node_id
            && (id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control()))
        {
            return Err(invalid("NODE_ID", id, "1 to 128 printable characters"));
        }
        self.validate_tokens()?;
        self.validate_networks()?;
        for (i, key) in self.vms.default_ssh_keys().iter().enumerate() {
            if let Err(reason) = crate::model::ssh_key::validate_ssh_key(key) {
                return Err(invalid(
                    "SSH_AUTHORIZED_KEYS",
                    format!("line {}", i + 1),
                    reason.to_string(),
                ));
            }
        }
        for (variable, dir) in [
            ("VMS_WORK_DIR", Some(&self.vms.vms_work_dir)),
            ("VMS_HOST_DIR", self.vms.vms_host_dir.as_ref()),
        ] {
            if let Some(dir) = dir
                && !dir.is_absolute()
            {
                return Err(invalid(
                    variable,
                    dir.display().to_string(),
                    "must be an absolute path (libvirt's storage pool lives there)",
                ));
            }
        }
        check_libvirt_uri(&self.vms.libvirt_uri)
            .map_err(|reason| invalid("LIBVIRT_URI", &self.vms.libvirt_uri, reason.0))
    }

    fn validate_tokens(&self) -> Result<(), SettingError> {
        for (variable, value) in [
            ("API_TOKEN", &self.api.api_token),
            ("PORTMAP_TOKEN", &self.api.portmap_token),
        ] {
            // The value itself is never echoed: it is a secret.
            if let Some(token) = value
                && (token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(invalid(
                    variable,
                    "<hidden>",
                    "a token needs at least 16 characters and no whitespace",
                ));
            }
        }
        if let (Some(a), Some(b)) = (&self.api.api_token, &self.api.portmap_token)
            && a != b
        {
            return Err(invalid(
                "PORTMAP_TOKEN",
                "<hidden>",
                "differs from API_TOKEN; set only one of them",
            ));
        }
        Ok(())
    }

    fn validate_networks(&self) -> Result<(), SettingError> {
        if self.portmaps.vm_subnet.prefix() == 0 {
            return Err(invalid(
                "VM_SUBNET",
                self.portmaps.vm_subnet.to_string(),
                "0.0.0.0/0 would make every address a port-map target",
            ));
        }
        check_no_host_bits("VM_SUBNET", &self.portmaps.vm_subnet)?;
        if let Some(ext) = &self.portmaps.external_iface
            && ext == &self.portmaps.vms_bridge
        {
            return Err(invalid("EXTERNAL_IFACE", ext, "is the VMS_BRIDGE itself"));
        }
        for net in &self.portmaps.allowed_targets {
            if net.prefix() == 0 {
                return Err(invalid(
                    "ALLOWED_TARGETS",
                    net.to_string(),
                    "0.0.0.0/0 would turn the node into an open relay",
                ));
            }
            check_no_host_bits("ALLOWED_TARGETS", net)?;
        }
        Ok(())
    }
}

/// A network setting written with host bits (`10.0.0.5/8`) is most likely a typo for
/// an address, or for another prefix: refuse it rather than guess.
fn check_no_host_bits(variable: &'static str, net: &Ipv4Network) -> Result<(), SettingError> {
    if net.ip() == net.network() {
        return Ok(());
    }
    Err(invalid(
        variable,
        net.to_string(),
        format!(
            "host bits are set; the network is {}/{}",
            net.network(),
            net.prefix()
        ),
    ))
}
