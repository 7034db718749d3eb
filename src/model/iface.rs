//! A network interface name as the kernel accepts it: the bridge, the egress and the
//! WireGuard interface of the settings, and the VMs' taps read back from libvirt.

/// IFNAMSIZ (16 with the NUL), no '/', no whitespace; nothing but letters, digits and
/// `-_.@`, so the name is also safe inside a `/sys/class/net/<name>/...` path.
pub fn check_ifname(s: &str) -> Result<String, IfaceNameError> {
    if s.is_empty() || s.len() > 15 {
        return Err(IfaceNameError::Length);
    }
    if s == "." || s == ".." {
        return Err(IfaceNameError::Dots);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')))
    {
        return Err(IfaceNameError::Char(c));
    }
    Ok(s.to_string())
}

/// What is wrong with an interface name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IfaceNameError {
    #[error("an interface name has 1 to 15 characters")]
    Length,
    #[error("not a valid interface name")]
    Dots,
    #[error("character {0:?} is not allowed in an interface name")]
    Char(char),
}

checked_string!(
    /// A Linux network interface name.
    IfaceName,
    check_ifname,
    IfaceNameError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_what_the_kernel_takes_and_path_safe() {
        for good in [
            "wg0",
            "virbr0",
            "vnet12",
            "br-lan.10",
            "eth0@if3",
            "a23456789012345",
        ] {
            assert_eq!(good.parse::<IfaceName>().unwrap(), *good);
        }
        for (bad, why) in [
            ("", "1 to 15"),
            ("a234567890123456", "1 to 15"),
            (".", "not a valid"),
            ("..", "not a valid"),
            ("a/b", "character '/'"),
            ("a b", "character ' '"),
        ] {
            let err = bad.parse::<IfaceName>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
