//! Value checks of single settings, for clap's value parsers and for the checks of
//! settings together (`check.rs`).

/// Why a value is refused: the text the operator reads (after clap's own, for a value
/// parser).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError(pub String);

impl std::fmt::Display for ValueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValueError {}

/// libvirt drivers the agent can drive: QEMU, and libvirt's in-process test driver.
const LIBVIRT_DRIVERS: [&str; 2] = ["qemu", "test"];
/// libvirt's remote transports (`qemu+ssh://...`).
const LIBVIRT_TRANSPORTS: [&str; 7] = ["unix", "ssh", "libssh", "libssh2", "tcp", "tls", "ext"];

/// `driver[+transport]://[user@][host][:port]/path[?query]` as libvirt parses it, with a
/// driver the agent can use; libvirt itself would only fail later, at the first VM call.
pub fn check_libvirt_uri(uri: &str) -> Result<(), ValueError> {
    const FORM: &str = "expected driver[+transport]://[host]/path, e.g. qemu:///system or \
                        qemu+ssh://root@host/system";
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(ValueError(format!("not a libvirt URI: {FORM}")));
    };
    let (driver, transport) = match scheme.split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (scheme, None),
    };
    if !LIBVIRT_DRIVERS.contains(&driver) {
        return Err(ValueError(format!(
            "driver {driver:?} is not one of {}: {FORM}",
            LIBVIRT_DRIVERS.join(", ")
        )));
    }
    if let Some(t) = transport
        && !LIBVIRT_TRANSPORTS.contains(&t)
    {
        return Err(ValueError(format!(
            "transport {t:?} is not one of {}",
            LIBVIRT_TRANSPORTS.join(", ")
        )));
    }
    let path = rest.split_once('?').map_or(rest, |(p, _)| p);
    let Some(slash) = path.find('/') else {
        return Err(ValueError(format!("no path: {FORM}")));
    };
    let (authority, path) = path.split_at(slash);
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ValueError(
            "the host part has whitespace or control characters".into(),
        ));
    }
    if driver == "qemu" && !matches!(path, "/system" | "/session" | "/embed") {
        return Err(ValueError(format!(
            "path {path:?}: the QEMU driver's are /system, /session and /embed"
        )));
    }
    Ok(())
}

/// A port number of a list setting (clap's own parser says only "invalid digit found in
/// string").
pub(super) fn parse_port(s: &str) -> Result<u16, ValueError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(ValueError(format!("{s:?} is not a port number (1..65535)"))),
    }
}
