//! An SSH public key line as the agent accepts it (in `ssh_authorized_keys` and
//! SSH_AUTHORIZED_KEYS): checked here once, for the settings, the API and the seed.

use base64::Engine as _;

/// Longest accepted SSH public key line (an 16384-bit RSA key is ~2.8 KiB).
pub const MAX_SSH_KEY_BYTES: usize = 16 * 1024;

/// Key types accepted in `ssh_authorized_keys` (OpenSSH's names).
pub const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// What is wrong with an SSH public key line (said of "the key": the caller names it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SshKeyError {
    #[error("is {0} bytes long; at most {MAX_SSH_KEY_BYTES} are accepted")]
    TooLong(usize),
    #[error("is empty")]
    Empty,
    #[error("must be a single line (found a line break)")]
    LineBreak,
    #[error(
        "contains control character U+{code:04X} at byte {pos}; fields must be separated by spaces"
    )]
    Control { code: u32, pos: usize },
    #[error("unknown key type {} (expected one of: {})", quoted_prefix(.0), SSH_KEY_TYPES.join(", "))]
    UnknownType(String),
    #[error("has no base64 key data after \"{0}\"")]
    NoData(String),
    #[error("key data after \"{key_type}\" is not valid base64: {source}")]
    Base64 {
        key_type: String,
        source: base64::DecodeError,
    },
    #[error("key type is \"{declared}\" but the key data is a {} key", quoted_prefix(.actual))]
    TypeMismatch { declared: String, actual: String },
    #[error("key data after \"{0}\" is not an SSH public key (too short)")]
    TooShort(String),
}

/// Checks one SSH public key line: a known key type, base64 body, one line, no control
/// characters. Returns the trimmed key.
pub fn validate_ssh_key(key: &str) -> Result<String, SshKeyError> {
    if key.len() > MAX_SSH_KEY_BYTES {
        return Err(SshKeyError::TooLong(key.len()));
    }
    let key = key.trim();
    if key.is_empty() {
        return Err(SshKeyError::Empty);
    }
    if key.contains(['\n', '\r']) {
        return Err(SshKeyError::LineBreak);
    }
    if let Some((pos, c)) = key.char_indices().find(|(_, c)| c.is_control()) {
        return Err(SshKeyError::Control {
            code: c as u32,
            pos,
        });
    }
    let mut fields = key.split(' ').filter(|f| !f.is_empty());
    let key_type = fields.next().unwrap_or_default();
    if !SSH_KEY_TYPES.contains(&key_type) {
        return Err(SshKeyError::UnknownType(key_type.to_owned()));
    }
    let Some(body) = fields.next() else {
        return Err(SshKeyError::NoData(key_type.to_owned()));
    };
    let blob = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|source| SshKeyError::Base64 {
            key_type: key_type.to_owned(),
            source,
        })?;
    // The blob starts with the key type as an SSH string (u32 length, then the name).
    let blob_type = blob
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4usize.saturating_add(n)));
    match blob_type {
        Some(t) if t == key_type.as_bytes() => Ok(key.to_string()),
        Some(t) => Err(SshKeyError::TypeMismatch {
            declared: key_type.to_owned(),
            actual: String::from_utf8_lossy(t).into_owned(),
        }),
        None => Err(SshKeyError::TooShort(key_type.to_owned())),
    }
}

checked_string!(
    /// One SSH public key line that passed [`validate_ssh_key`], trimmed.
    SshKey,
    validate_ssh_key,
    SshKeyError
);

/// `s` quoted and escaped for an error message, cut to 40 characters.
fn quoted_prefix(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}…")
    } else {
        format!("{s:?}")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Real public keys (no private half anywhere), for this and other modules' tests.
    pub(crate) const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdMCdPexVOBbnwk88Mu0xzRCNPTt7FdrDtvNeHvBpso alice@example";
    pub(crate) const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDW18kOx/mrOdJ2piu2SsxNkIvjWgPuqf4jOSVVp7qxs90hhgfLcTjE4QZpiEjX5kl+pGllM/MWes4iCrcdwjx8DrdagfTbY/ui0tcmv3QH7RcA/ISxtA1Od347+rTY9KY1P03rkEv/2alB1MvlPN2zQsEZf4TNo/+NJAObp6wm/ZxrzrUsFjgwjt9Hf+cUM7XkYOZodzMuCMiJQ5DQdfKtSE0/ag7Pcx11jKe0wHl0oPq2dvvEjYhyLXifUdS09yxtIslbAa6yIPwnO124XkYxKAUkH3LE54Za3R3i0sYwQB7Jkamvk2liTY9EjyulA3r2sfls1pRQas0PeNUWM6Jn";
    pub(crate) const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBIITcIgFl0bdDCkTL17h1pNpKJegKrjLfDhC6+uOp+9nvE4wqEjrIzq1R5nASF9ZrO1UfZFOZGQDyN2hny9BPOg= bob laptop";

    #[test]
    fn real_keys_are_accepted_and_trimmed() {
        for key in [ED25519, RSA, ECDSA] {
            assert_eq!(validate_ssh_key(key).as_deref(), Ok(key));
            assert_eq!(validate_ssh_key(&format!(" {key}\n")).as_deref(), Ok(key));
        }
        // No comment at all, and a comment with spaces.
        let bare = ED25519.rsplit_once(' ').map(|(k, _)| k).unwrap_or(ED25519);
        assert_eq!(validate_ssh_key(bare).as_deref(), Ok(bare));
        let spaced = format!("{bare} my key  with   spaces");
        assert_eq!(validate_ssh_key(&spaced).as_deref(), Ok(spaced.as_str()));
    }

    #[test]
    fn bad_keys_are_rejected_with_a_precise_reason() {
        let cases: &[(String, &str)] = &[
            (String::new(), "is empty"),
            ("   \n".into(), "is empty"),
            ("foo AAAA".into(), "unknown key type \"foo\""),
            ("garbage".into(), "unknown key type \"garbage\""),
            (
                "ssh-ed25519".into(),
                "has no base64 key data after \"ssh-ed25519\"",
            ),
            ("ssh-ed25519 not*base64!".into(), "is not valid base64"),
            ("ssh-ed25519 AAAA".into(), "too short"),
            (format!("{ED25519}\n{RSA}"), "single line"),
            (format!("{ED25519}\r{RSA}"), "single line"),
            (ED25519.replace(' ', "\t"), "control character U+0009"),
            (format!("{ED25519}\u{1b}[31m"), "control character U+001B"),
            // The right base64 under the wrong name.
            (
                ED25519.replacen("ssh-ed25519", "ssh-rsa", 1),
                "key type is \"ssh-rsa\" but the key data is a \"ssh-ed25519\" key",
            ),
            (
                format!("ssh-rsa {}", "A".repeat(MAX_SSH_KEY_BYTES)),
                "bytes long; at most 16384",
            ),
            // authorized_keys options are not accepted.
            (
                format!("from=\"10.0.0.1\" {ED25519}"),
                "unknown key type \"from=\\\"10.0.0.1\\\"\"",
            ),
        ];
        for (key, want) in cases {
            let err = validate_ssh_key(key).expect_err(key).to_string();
            assert!(err.contains(want), "{key:?}: got {err:?}, want {want:?}");
        }
        assert_eq!(
            format!(" {ED25519}\n").parse::<SshKey>().unwrap().as_str(),
            ED25519
        );
        assert!("garbage".parse::<SshKey>().is_err());
        // Long garbage is cut in the message.
        let err = validate_ssh_key(&"x".repeat(1000))
            .expect_err("garbage")
            .to_string();
        assert!(err.len() < 300, "{err}");
    }
}
