//! The node's WireGuard key pair: `$DATA_DIR/node.key` (mode 0600) and `$DATA_DIR/node.pub`,
//! in the `wg genkey` / `wg pubkey` format (base64 of 32 bytes, one line), so the files of
//! a node that ran the original agent are used as they are.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use defguard_wireguard_rs::key::Key;

pub const PRIVATE_FILE: &str = "node.key";
pub const PUBLIC_FILE: &str = "node.pub";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A key file is not one base64 WireGuard key; it is never replaced silently.
    #[error(
        "key file {path} is not a WireGuard key (one line of base64, 32 bytes, as `wg genkey` writes): {reason}; \
         fix or remove it (removing node.key gives the node a new identity)"
    )]
    Malformed {
        path: String,
        #[source]
        reason: KeyFormatError,
    },
    /// node.pub does not belong to node.key.
    #[error(
        "key file {path} does not hold the public key of node.key; remove it and it is rewritten from node.key"
    )]
    Mismatch { path: String },
}

/// Where the key pair came from, for the startup log.
#[derive(Debug, PartialEq, Eq)]
pub enum KeySource {
    Existing,
    Generated,
}

/// The node's key pair. `Debug` never shows the private key.
#[derive(Clone)]
pub struct NodeKeys {
    private: Key,
    public: Key,
}

impl std::fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKeys {{ public: {} }}", self.public_base64())
    }
}

impl NodeKeys {
    /// A fresh pair, clamped as `wg genkey` does.
    pub fn generate() -> Self {
        let mut bytes = Key::generate().as_array();
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self::from_private(Key::new(bytes))
    }

    fn from_private(private: Key) -> Self {
        let public = private.public_key();
        Self { private, public }
    }

    pub fn private(&self) -> &Key {
        &self.private
    }

    pub fn public(&self) -> &Key {
        &self.public
    }

    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public.as_slice())
    }

    /// Reads the pair from `data_dir`, or generates it there on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<(Self, KeySource), KeyError> {
        let key_path = data_dir.join(PRIVATE_FILE);
        let pub_path = data_dir.join(PUBLIC_FILE);
        let (keys, source) = match std::fs::read_to_string(&key_path) {
            Ok(text) => {
                let keys = Self::from_private(parse_key(&text, &key_path)?);
                let meta = std::fs::metadata(&key_path).map_err(io(&key_path))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %key_path.display(), "private key file was readable by others; set its mode to 0600");
                    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                        .map_err(io(&key_path))?;
                }
                (keys, KeySource::Existing)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = Self::generate();
                let line = format!("{}\n", STANDARD.encode(keys.private.as_slice()));
                write_new(&key_path, line.as_bytes(), 0o600)?;
                (keys, KeySource::Generated)
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        match std::fs::read_to_string(&pub_path) {
            Ok(text) => {
                if parse_key(&text, &pub_path)? != keys.public {
                    return Err(KeyError::Mismatch {
                        path: pub_path.display().to_string(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let line = format!("{}\n", keys.public_base64());
                write_new(&pub_path, line.as_bytes(), 0o644)?;
            }
            Err(e) => return Err(io(&pub_path)(e)),
        }
        Ok((keys, source))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Why a text is no WireGuard key (one line of base64 of 32 bytes).
#[derive(Debug, thiserror::Error)]
pub enum KeyFormatError {
    #[error("{0} characters, expected 44")]
    Length(usize),
    #[error("{0}")]
    Base64(#[from] base64::DecodeError),
    #[error("{0} bytes, expected 32")]
    Bytes(usize),
}

/// Parses one `wg genkey`/`wg pubkey` line (surrounding whitespace allowed).
pub fn parse_key(text: &str, path: &Path) -> Result<Key, KeyError> {
    parse_remote_key(text).map_err(|reason| KeyError::Malformed {
        path: path.display().to_string(),
        reason,
    })
}

/// Parses a base64 key (a file's line, or the controller's `controller_pubkey`).
pub fn parse_remote_key(text: &str) -> Result<Key, KeyFormatError> {
    let line = text.trim();
    if line.len() != 44 {
        return Err(KeyFormatError::Length(line.len()));
    }
    let bytes: [u8; 32] = STANDARD
        .decode(line)?
        .try_into()
        .map_err(|b: Vec<u8>| KeyFormatError::Bytes(b.len()))?;
    Ok(Key::new(bytes))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_private_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let (a, src) = NodeKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(src, KeySource::Generated);
        let mode = std::fs::metadata(dir.path().join(PRIVATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, src) = NodeKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(src, KeySource::Existing);
        assert_eq!(a.public(), b.public());
        let pubtext = std::fs::read_to_string(dir.path().join(PUBLIC_FILE)).unwrap();
        assert_eq!(pubtext, format!("{}\n", a.public_base64()));
        assert!(!format!("{a:?}").contains(&STANDARD.encode(a.private().as_slice())));
    }

    /// A pair made by `wg genkey | tee node.key | wg pubkey > node.pub` (RFC 7748 test
    /// vector: Alice's private and public key).
    #[test]
    fn reads_the_files_of_an_original_node() {
        let dir = tempfile::tempdir().unwrap();
        let private = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
        let public = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        std::fs::write(dir.path().join(PRIVATE_FILE), format!("{private}\n")).unwrap();
        std::fs::write(dir.path().join(PUBLIC_FILE), format!("{public}\n")).unwrap();
        let (k, src) = NodeKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(src, KeySource::Existing);
        assert_eq!(k.public_base64(), public);
        // Mode repaired to 0600.
        let mode = std::fs::metadata(dir.path().join(PRIVATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn malformed_files_are_named_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PRIVATE_FILE);
        std::fs::write(&path, "not a key\n").unwrap();
        let e = NodeKeys::load_or_create(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node.key") && e.contains("not a WireGuard key"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key\n");

        let dir = tempfile::tempdir().unwrap();
        NodeKeys::load_or_create(dir.path()).unwrap();
        std::fs::write(
            dir.path().join(PUBLIC_FILE),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=\n",
        )
        .unwrap();
        let e = NodeKeys::load_or_create(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("node.pub"), "{e}");
    }
}
