//! The controller client: the original `/join` protocol, retries with backoff and jitter,
//! and the cache of the last response (SQLite, plus `$DATA_DIR/join.json` for operators).
//!
//! ```text
//! POST {CONTROLLER_URL}/join   X-Join-Token: {JOIN_TOKEN}
//! {"node_id": "node-1", "node_pubkey": "<base64>"}
//! -> {"ok": true, "node_id", "node_ip", "controller_pubkey", "endpoint", "allowed_ips", "wg_net"}
//! ```

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use defguard_wireguard_rs::key::Key;
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::config::JoinSettings;
use crate::keys::parse_remote_key;
use crate::store::mesh::{self, JoinRow};
use crate::store::{Store, StoreError};

pub const JOIN_JSON: &str = "join.json";

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The controller could not be reached (connection refused, timeout, DNS, TLS).
    #[error("controller unreachable: {0}")]
    Network(String),
    /// The controller failed (5xx); worth retrying.
    #[error("controller error {status}: {body}")]
    Server { status: u16, body: String },
    /// 403: the controller refused JOIN_TOKEN.
    #[error(
        "the controller refused the join token (403 forbidden): set JOIN_TOKEN to the controller's join token and restart"
    )]
    Forbidden,
    /// 400: the controller found the request incomplete.
    #[error(
        "the controller refused the request (400: {0}): check NODE_ID and the node key ($DATA_DIR/node.pub)"
    )]
    BadRequest(String),
    /// Another 4xx: most likely CONTROLLER_URL points at something that is not a controller.
    #[error("unexpected answer {status} from {url}: check CONTROLLER_URL")]
    Unexpected { status: u16, url: String },
    /// The controller answered 200 with something unusable: its configuration is wrong.
    #[error("the controller is misconfigured: {0}")]
    Misconfigured(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl JoinError {
    /// Whether another attempt can succeed without the operator changing something here.
    /// 403 and 400 stop at once; a misconfigured controller is retried slowly.
    pub fn kind(&self) -> Retry {
        match self {
            JoinError::Network(_)
            | JoinError::Server { .. }
            | JoinError::Store(_)
            | JoinError::Io { .. } => Retry::Backoff,
            JoinError::Misconfigured(_) => Retry::Slow,
            JoinError::Forbidden | JoinError::BadRequest(_) | JoinError::Unexpected { .. } => {
                Retry::Never
            }
        }
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Soon, with exponential backoff and jitter.
    Backoff,
    /// At the longest backoff delay: someone has to fix the controller.
    Slow,
    /// Not at all until restart: someone has to fix this node's settings.
    Never,
}

/// The request body, as the original agent sent it.
#[derive(Serialize)]
struct JoinRequest<'a> {
    node_id: &'a str,
    node_pubkey: &'a str,
}

/// The response as the controller sends it; every field optional so that a missing one
/// is reported by name rather than as a parse error.
#[derive(Deserialize)]
struct RawResponse {
    ok: Option<bool>,
    error: Option<String>,
    node_id: Option<String>,
    node_ip: Option<String>,
    controller_pubkey: Option<String>,
    endpoint: Option<String>,
    allowed_ips: Option<String>,
    wg_net: Option<String>,
}

/// A validated join response: everything the tunnel needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Join {
    pub node_id: String,
    pub node_ip: Ipv4Addr,
    pub controller_pubkey: Key,
    /// `host:port` as sent; resolved when the link is configured.
    pub endpoint: String,
    /// The controller's tunnel addresses (trusted on the tunnel).
    pub allowed_ips: Vec<Ipv4Network>,
    /// The whole mesh subnet, routed through the tunnel.
    pub wg_net: Ipv4Network,
    /// The response body as received.
    pub raw: String,
}

impl Join {
    /// Parses and checks a 200 response body.
    pub fn parse(body: &str) -> Result<Self, JoinError> {
        let bad = |m: String| JoinError::Misconfigured(m);
        let r: RawResponse = serde_json::from_str(body)
            .map_err(|e| bad(format!("its /join answer is not the expected JSON: {e}")))?;
        if r.ok == Some(false) {
            return Err(bad(format!(
                "it answered ok=false: {}",
                r.error.unwrap_or_default()
            )));
        }
        let field = |name: &str, v: Option<String>| {
            v.map(|s| s.trim().to_string())
                .ok_or_else(|| bad(format!("its /join answer has no {name}")))
        };
        let node_ip_text = field("node_ip", r.node_ip)?;
        let node_ip: Ipv4Addr = node_ip_text
            .parse()
            .map_err(|_| bad(format!("node_ip {node_ip_text:?} is not an IPv4 address")))?;
        let key_text = field("controller_pubkey", r.controller_pubkey)?;
        let controller_pubkey = parse_remote_key(&key_text)
            .map_err(|e| bad(format!("controller_pubkey is not a WireGuard key: {e}")))?;
        let endpoint = field("endpoint", r.endpoint)?;
        if endpoint.is_empty() {
            return Err(bad(
                "it returned an empty endpoint: set the controller's public WireGuard endpoint (host:port)"
                    .into(),
            ));
        }
        if endpoint
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(bad(format!("endpoint {endpoint:?} is not host:port")));
        }
        let allowed_text = field("allowed_ips", r.allowed_ips)?;
        let allowed_ips = allowed_text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<Ipv4Network>()
                    .map_err(|_| bad(format!("allowed_ips {s:?} is not an IPv4 CIDR")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if allowed_ips.is_empty() || allowed_ips.iter().any(|n| n.prefix() == 0) {
            return Err(bad(format!(
                "allowed_ips {allowed_text:?} must name the controller's tunnel address(es), not everything"
            )));
        }
        let wg_net_text = field("wg_net", r.wg_net)?;
        let wg_net: Ipv4Network = wg_net_text
            .parse()
            .map_err(|_| bad(format!("wg_net {wg_net_text:?} is not an IPv4 CIDR")))?;
        if wg_net.prefix() == 0 || !wg_net.contains(node_ip) {
            return Err(bad(format!(
                "wg_net {wg_net} must be the mesh subnet holding node_ip {node_ip}"
            )));
        }
        Ok(Join {
            node_id: r.node_id.unwrap_or_default(),
            node_ip,
            controller_pubkey,
            endpoint,
            allowed_ips,
            wg_net,
            raw: body.to_string(),
        })
    }

    pub fn allowed_ips_text(&self) -> String {
        self.allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// What the tunnel is made of; a change in it needs the link reconfigured.
    pub fn link_differs(&self, other: &Join) -> bool {
        self.node_ip != other.node_ip
            || self.controller_pubkey != other.controller_pubkey
            || self.endpoint != other.endpoint
            || self.allowed_ips != other.allowed_ips
            || self.wg_net != other.wg_net
    }
}

/// The HTTP side of the join.
pub struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
    node_id: String,
    node_pubkey: String,
}

impl Client {
    pub fn new(
        s: JoinSettings<'_>,
        node_pubkey: String,
        timeout: Duration,
    ) -> Result<Self, JoinError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| JoinError::Network(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            url: format!("{}/join", s.url.trim_end_matches('/')),
            token: s.token.to_string(),
            node_id: s.node_id.to_string(),
            node_pubkey,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One attempt.
    pub async fn join_once(&self) -> Result<Join, JoinError> {
        let resp = self
            .http
            .post(&self.url)
            .header("X-Join-Token", &self.token)
            .json(&JoinRequest {
                node_id: &self.node_id,
                node_pubkey: &self.node_pubkey,
            })
            .send()
            .await
            .map_err(|e| JoinError::Network(error_chain(&e)))?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|e| JoinError::Network(error_chain(&e)))?;
        match status {
            200..=299 => Join::parse(&body),
            403 => Err(JoinError::Forbidden),
            400 => Err(JoinError::BadRequest(error_text(&body))),
            500..=599 => Err(JoinError::Server {
                status,
                body: error_text(&body),
            }),
            _ => Err(JoinError::Unexpected {
                status,
                url: self.url.clone(),
            }),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The `error` of an `{"ok": false, "error": ...}` body, else the body's start.
fn error_text(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(200).collect())
}

/// Exponential backoff with jitter: attempt n waits a random time in
/// `[d/2, d]` with `d = min(max, initial * 2^n)`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay; `unit` in [0, 1) is the jitter draw.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }
}

/// The cached join of a previous run, if any (and if it still parses), with the node's
/// public key (base64) it was made for.
pub fn load_cached(store: &Store) -> Result<Option<(Join, String)>, StoreError> {
    let Some(row) = store.with(mesh::load)? else {
        return Ok(None);
    };
    match Join::parse(&row.raw_response) {
        Ok(j) => Ok(Some((j, row.node_pubkey))),
        Err(e) => {
            tracing::warn!(error = %e, "the cached join response no longer parses; ignoring it");
            Ok(None)
        }
    }
}

/// Keeps a successful join: SQLite first (the desired state), then `join.json` (written
/// atomically, for operators used to the original agent's file).
pub fn save(
    store: &Store,
    data_dir: &Path,
    join: &Join,
    node_id: &str,
    node_pubkey: &str,
    controller_url: &str,
) -> Result<(), JoinError> {
    let row = JoinRow {
        node_id: node_id.to_string(),
        node_pubkey: node_pubkey.to_string(),
        node_ip: join.node_ip.to_string(),
        controller_pubkey: join.controller_pubkey.to_string(),
        endpoint: join.endpoint.clone(),
        allowed_ips: join.allowed_ips_text(),
        wg_net: join.wg_net.to_string(),
        controller_url: controller_url.to_string(),
        raw_response: join.raw.clone(),
        joined_at: String::new(),
    };
    store.with(|c| mesh::save(c, &row))?;
    let path = data_dir.join(JOIN_JSON);
    let tmp = data_dir.join(format!("{JOIN_JSON}.tmp"));
    let io = |source| JoinError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(&tmp, join.raw.as_bytes()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const OK: &str = r#"{"ok": true, "node_id": "node-1", "node_ip": "10.50.0.2",
        "controller_pubkey": "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
        "endpoint": "203.0.113.7:51820", "allowed_ips": "10.50.0.1/32", "wg_net": "10.50.0.0/24"}"#;

    #[test]
    fn parses_the_original_response() {
        let j = Join::parse(OK).unwrap();
        assert_eq!(j.node_ip, Ipv4Addr::new(10, 50, 0, 2));
        assert_eq!(j.endpoint, "203.0.113.7:51820");
        assert_eq!(j.allowed_ips_text(), "10.50.0.1/32");
        assert_eq!(j.wg_net.to_string(), "10.50.0.0/24");
    }

    #[test]
    fn an_empty_endpoint_is_the_controllers_misconfiguration() {
        let body = OK.replace("203.0.113.7:51820", "");
        let e = Join::parse(&body).unwrap_err();
        assert_eq!(e.kind(), Retry::Slow);
        let text = e.to_string();
        assert!(
            text.contains("controller is misconfigured") && text.contains("empty endpoint"),
            "{text}"
        );
        for (from, to, what) in [
            ("10.50.0.2", "10.50.0.999", "node_ip"),
            ("10.50.0.0/24", "10.60.0.0/24", "wg_net"),
            ("10.50.0.1/32", "0.0.0.0/0", "allowed_ips"),
            (
                "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
                "x",
                "controller_pubkey",
            ),
        ] {
            let e = Join::parse(&OK.replace(from, to)).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
    }

    #[test]
    fn fatal_errors_stop_and_say_what_to_fix() {
        assert_eq!(JoinError::Forbidden.kind(), Retry::Never);
        assert!(JoinError::Forbidden.to_string().contains("JOIN_TOKEN"));
        assert_eq!(JoinError::BadRequest("x".into()).kind(), Retry::Never);
        assert_eq!(JoinError::Network("x".into()).kind(), Retry::Backoff);
        assert_eq!(
            JoinError::Server {
                status: 502,
                body: String::new()
            }
            .kind(),
            Retry::Backoff
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_bound() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_with(1.0), Duration::from_millis(100));
        assert_eq!(b.next_with(0.0), Duration::from_millis(100));
        assert_eq!(b.next_with(1.0), Duration::from_millis(400));
        for _ in 0..40 {
            let d = b.next_with(0.999);
            assert!(
                d <= Duration::from_secs(1) && d >= Duration::from_millis(500),
                "{d:?}"
            );
        }
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn saved_joins_come_back_and_join_json_is_the_raw_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("agent.db")).unwrap();
        assert!(load_cached(&store).unwrap().is_none());
        let j = Join::parse(OK).unwrap();
        save(&store, dir.path(), &j, "node-1", "pk", "http://c").unwrap();
        assert_eq!(load_cached(&store).unwrap(), Some((j, "pk".to_string())));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(JOIN_JSON)).unwrap(),
            OK
        );
    }
}
