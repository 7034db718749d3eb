//! Validation of settings: value parsers clap calls, and the checks of settings on
//! their own terms and together (`Settings::validate`).

use ipnetwork::Ipv4Network;

use super::Settings;

/// A setting that parsed but makes no sense on its own terms or with the others.
#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    #[error("invalid {variable}={value:?}: {reason}")]
    Invalid {
        variable: &'static str,
        value: String,
        reason: String,
    },
    /// One or two of the three join settings: the operator meant to join and forgot one.
    #[error(
        "{set} set but {missing} not: joining the mesh needs CONTROLLER_URL, JOIN_TOKEN \
         and NODE_ID together; unset {set_names} to run standalone"
    )]
    IncompleteJoin {
        set: String,
        missing: String,
        set_names: String,
    },
}

fn invalid(
    variable: &'static str,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> SettingError {
    SettingError::Invalid {
        variable,
        value: value.into(),
        reason: reason.into(),
    }
}

/// `A`, `A and B`, `A, B and C`, with the verb that agrees with the count.
pub(super) fn names_with_verb(names: &[&str]) -> String {
    let list = match names {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    };
    format!("{list} {}", if names.len() == 1 { "is" } else { "are" })
}

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
                    reason,
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
            .map_err(|reason| invalid("LIBVIRT_URI", &self.vms.libvirt_uri, reason))
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

/// libvirt drivers the agent can drive: QEMU, and libvirt's in-process test driver.
const LIBVIRT_DRIVERS: [&str; 2] = ["qemu", "test"];
/// libvirt's remote transports (`qemu+ssh://...`).
const LIBVIRT_TRANSPORTS: [&str; 7] = ["unix", "ssh", "libssh", "libssh2", "tcp", "tls", "ext"];

/// `driver[+transport]://[user@][host][:port]/path[?query]` as libvirt parses it, with a
/// driver the agent can use; libvirt itself would only fail later, at the first VM call.
pub fn check_libvirt_uri(uri: &str) -> Result<(), String> {
    const FORM: &str = "expected driver[+transport]://[host]/path, e.g. qemu:///system or \
                        qemu+ssh://root@host/system";
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(format!("not a libvirt URI: {FORM}"));
    };
    let (driver, transport) = match scheme.split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (scheme, None),
    };
    if !LIBVIRT_DRIVERS.contains(&driver) {
        return Err(format!(
            "driver {driver:?} is not one of {}: {FORM}",
            LIBVIRT_DRIVERS.join(", ")
        ));
    }
    if let Some(t) = transport
        && !LIBVIRT_TRANSPORTS.contains(&t)
    {
        return Err(format!(
            "transport {t:?} is not one of {}",
            LIBVIRT_TRANSPORTS.join(", ")
        ));
    }
    let path = rest.split_once('?').map_or(rest, |(p, _)| p);
    let Some(slash) = path.find('/') else {
        return Err(format!("no path: {FORM}"));
    };
    let (authority, path) = path.split_at(slash);
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("the host part has whitespace or control characters".into());
    }
    if driver == "qemu" && !matches!(path, "/system" | "/session" | "/embed") {
        return Err(format!(
            "path {path:?}: the QEMU driver's are /system, /session and /embed"
        ));
    }
    Ok(())
}

/// A port number of a list setting (clap's own parser says only "invalid digit found in
/// string").
pub(super) fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(format!("{s:?} is not a port number (1..65535)")),
    }
}
