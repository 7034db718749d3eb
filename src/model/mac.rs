//! A NIC's MAC address, as libvirt writes it in a domain and in a network's DHCP host
//! entries: six pairs of hex digits separated by colons, kept in lowercase so that two
//! spellings of one address compare equal.

/// A text that is not a MAC address (as given).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (six pairs of hex digits separated by ':')")]
pub struct MacError(String);

/// Checks a MAC address; returns it in lowercase.
pub fn check_mac(s: &str) -> Result<String, MacError> {
    let pairs: Vec<&str> = s.split(':').collect();
    let well_formed = pairs.len() == 6
        && pairs
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(MacError(s.to_owned()));
    }
    Ok(s.to_ascii_lowercase())
}

checked_string!(
    /// A MAC address (`52:54:00:ab:cd:ef`), lowercase.
    MacAddr,
    check_mac,
    MacError
);

impl MacAddr {
    /// `52:54:00:` (QEMU's locally administered prefix) followed by `tail`: the MACs the
    /// agent gives its VMs.
    pub fn qemu(tail: [u8; 3]) -> MacAddr {
        MacAddr(format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            tail[0], tail[1], tail[2]
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_six_hex_pairs_kept_in_lowercase() {
        let m: MacAddr = "52:54:00:AB:cd:0E".parse().unwrap();
        assert_eq!(m, "52:54:00:ab:cd:0e");
        assert_eq!(MacAddr::qemu([0xab, 0xcd, 0x0e]), m);
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0e:ff",
            "52-54-00-ab-cd-0e",
            "52:54:00:ab:cd:0g",
            "52:54:00:ab:cd:e",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
