//! Value checks of single settings, for clap's value parsers and for the checks of
//! settings together (`check.rs`).

/// libvirt drivers the agent can drive: QEMU, and libvirt's in-process test driver.
const LIBVIRT_DRIVERS: [&str; 2] = ["qemu", "test"];
/// libvirt's remote transports (`qemu+ssh://...`).
const LIBVIRT_TRANSPORTS: [&str; 7] = ["unix", "ssh", "libssh", "libssh2", "tcp", "tls", "ext"];

/// What is wrong with a LIBVIRT_URI.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LibvirtUriError {
    #[error("not a libvirt URI: {FORM}")]
    NotAUri,
    #[error("driver {0:?} is not one of {drivers}: {FORM}", drivers = LIBVIRT_DRIVERS.join(", "))]
    Driver(String),
    #[error("transport {0:?} is not one of {transports}", transports = LIBVIRT_TRANSPORTS.join(", "))]
    Transport(String),
    #[error("no path: {FORM}")]
    NoPath,
    #[error("the host part has whitespace or control characters")]
    Host,
    #[error("path {0:?}: the QEMU driver's are /system, /session and /embed")]
    QemuPath(String),
}

const FORM: &str =
    "expected driver[+transport]://[host]/path, e.g. qemu:///system or qemu+ssh://root@host/system";

/// `driver[+transport]://[user@][host][:port]/path[?query]` as libvirt parses it, with a
/// driver the agent can use; libvirt itself would only fail later, at the first VM call.
pub fn check_libvirt_uri(uri: &str) -> Result<(), LibvirtUriError> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(LibvirtUriError::NotAUri);
    };
    let (driver, transport) = match scheme.split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (scheme, None),
    };
    if !LIBVIRT_DRIVERS.contains(&driver) {
        return Err(LibvirtUriError::Driver(driver.to_owned()));
    }
    if let Some(t) = transport
        && !LIBVIRT_TRANSPORTS.contains(&t)
    {
        return Err(LibvirtUriError::Transport(t.to_owned()));
    }
    let path = rest.split_once('?').map_or(rest, |(p, _)| p);
    let Some(slash) = path.find('/') else {
        return Err(LibvirtUriError::NoPath);
    };
    let (authority, path) = path.split_at(slash);
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(LibvirtUriError::Host);
    }
    if driver == "qemu" && !matches!(path, "/system" | "/session" | "/embed") {
        return Err(LibvirtUriError::QemuPath(path.to_owned()));
    }
    Ok(())
}

/// A list setting's item that is not a port number (clap's own parser says only
/// "invalid digit found in string").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a port number (1..65535)")]
pub struct PortError(String);

/// A port number of a list setting.
pub(super) fn parse_port(s: &str) -> Result<u16, PortError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(PortError(s.to_owned())),
    }
}
