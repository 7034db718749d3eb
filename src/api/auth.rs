//! The credentials: the API token (`Authorization: Bearer <token>`, or the original
//! controller's `X-Portmap-Token: <token>`, one credential) and how a request was
//! authorised. `admit.rs` checks them.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

/// How a request was authorised; recorded in the audit log and in `created_by`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// Not authorised (refused, or a public route).
    None,
    /// A valid bearer token.
    Token,
    /// No token, but the request came through the WireGuard tunnel from the
    /// controller's address (TRUST_CONTROLLER_TUNNEL).
    Controller,
}

impl Identity {
    pub fn as_str(self) -> &'static str {
        match self {
            Identity::None => "none",
            Identity::Token => "token",
            Identity::Controller => "controller-tunnel",
        }
    }
}

/// The WebSocket subprotocol that carries the token, before the token itself
/// (unpadded base64url).
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// The API token. Its `Debug` never shows the secret.
pub struct ApiToken(String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<hidden>)")
    }
}

/// Where the token came from, for the startup log.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenSource {
    Setting,
    File(PathBuf),
    Generated(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read or write the API token file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the API token file {0} is empty or has fewer than 16 characters")]
    Weak(String),
}

impl ApiToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The configured token, else the one in `$DATA_DIR/api.token`, else a new random one
    /// written there with mode 0600.
    pub fn load_or_create(
        configured: Option<&str>,
        data_dir: &Path,
    ) -> Result<(Self, TokenSource), TokenError> {
        if let Some(t) = configured {
            return Ok((Self(t.to_string()), TokenSource::Setting));
        }
        let path = data_dir.join("api.token");
        let io = |source| TokenError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let token = text.trim().to_string();
                if token.len() < 16 {
                    return Err(TokenError::Weak(path.display().to_string()));
                }
                // A secret readable by others is repaired rather than refused: the node
                // must keep serving its controller.
                let meta = std::fs::metadata(&path).map_err(io)?;
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "API token file was readable by others; set its mode to 0600");
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                        .map_err(io)?;
                }
                Ok((Self(token), TokenSource::File(path)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token: String = rand::random::<[u8; 32]>()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io)?;
                f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                Ok((Self(token), TokenSource::Generated(path)))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Constant-time check of an `Authorization` header value: the scheme `Bearer` in
    /// any case (RFC 7235: schemes are case-insensitive), then the token.
    pub fn matches_header(&self, value: &[u8]) -> bool {
        const SCHEME: &[u8] = b"bearer";
        if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
            return false;
        }
        let rest = &value[SCHEME.len()..];
        let given = rest.trim_ascii_start();
        if given.len() == rest.len() {
            // `BearerX...`: no separator, another scheme.
            return false;
        }
        given.ct_eq(self.0.as_bytes()).into()
    }

    /// Constant-time check of a `Sec-WebSocket-Protocol` header value for a browser's
    /// token: one of its comma-separated protocols is
    /// `base64url.bearer.authorization.k8s.io.<token in unpadded base64url>`, as
    /// Kubernetes accepts it (a browser cannot set `Authorization` on a WebSocket).
    pub fn matches_subprotocols(&self, value: &[u8]) -> bool {
        use base64::Engine;
        let Ok(value) = std::str::from_utf8(value) else {
            return false;
        };
        value
            .split(',')
            .filter_map(|p| p.trim().strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
            .filter_map(|b| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(b.trim_end_matches('='))
                    .ok()
            })
            .any(|given| bool::from(given.ct_eq(self.0.as_bytes())))
    }

    /// Constant-time check of an `X-Portmap-Token` header value: the bare token, as the
    /// original controller's proxy sends it (its `NODE_PORTMAP_TOKENS`).
    pub fn matches_portmap_header(&self, value: &[u8]) -> bool {
        !value.is_empty() && value.ct_eq(self.0.as_bytes()).into()
    }
}

/// The original controller's header for the node's token (it sends it on `/ports` calls
/// when its `NODE_PORTMAP_TOKENS` names the node).
pub const PORTMAP_TOKEN_HEADER: &str = "x-portmap-token";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_private_token_once_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let (a, src) = ApiToken::load_or_create(None, dir.path()).unwrap();
        assert!(matches!(src, TokenSource::Generated(_)));
        let mode = std::fs::metadata(dir.path().join("api.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, src) = ApiToken::load_or_create(None, dir.path()).unwrap();
        assert!(matches!(src, TokenSource::File(_)));
        assert_eq!(a.0, b.0);
        assert_eq!(a.0.len(), 64);
        assert!(!format!("{a:?}").contains(&a.0));
    }

    #[test]
    fn a_configured_token_wins_and_headers_are_checked_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (t, src) = ApiToken::load_or_create(Some("0123456789abcdef"), dir.path()).unwrap();
        assert_eq!(src, TokenSource::Setting);
        assert!(!dir.path().join("api.token").exists());
        assert!(t.matches_header(b"Bearer 0123456789abcdef"));
        assert!(!t.matches_header(b"Bearer 0123456789abcde"));
        assert!(!t.matches_header(b"Bearer 0123456789abcdefX"));
        assert!(t.matches_header(b"bearer 0123456789abcdef"));
        assert!(t.matches_header(b"BEARER  0123456789abcdef"));
        assert!(!t.matches_header(b"Bearer0123456789abcdef"));
        assert!(!t.matches_header(b"Bearer "));
        assert!(!t.matches_header(b"Basic 0123456789abcdef"));
        assert!(!t.matches_header(b"0123456789abcdef"));
        assert!(t.matches_portmap_header(b"0123456789abcdef"));
        assert!(!t.matches_portmap_header(b"Bearer 0123456789abcdef"));
        assert!(!t.matches_portmap_header(b"0123456789abcde"));
        assert!(!t.matches_portmap_header(b""));
    }
}
