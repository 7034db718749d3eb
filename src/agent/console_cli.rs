//! `node-vm-agent console NAME`: a terminal attached to a VM's serial console through
//! this node's API (its WebSocket route), for an operator on the node. The token comes
//! from API_TOKEN (or PORTMAP_TOKEN), else from $DATA_DIR/api.token. The terminal is put
//! in raw mode and given back as it was on every way out (detach, the session closed by
//! the agent, an error, SIGTERM or SIGHUP, a panic). `Ctrl-]` detaches, as in `virsh
//! console`.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::net::TcpStream;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::tungstenite::{self, http};

use crate::config::ConsoleArgs;

/// The byte `Ctrl-]` sends.
pub const DETACH: u8 = 0x1d;

/// Why the console command could not attach.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleCliError {
    #[error("no API token: set API_TOKEN, or run where {0} is readable")]
    NoToken(String),
    #[error("cannot reach the agent's API at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent refused the console ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
}

/// Attaches the terminal to VM `args.name`'s console until detached or closed.
pub async fn run(args: ConsoleArgs) -> Result<ExitCode, ConsoleCliError> {
    let token = token(&args)?;
    let addr = api_addr(&args);
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out after 5 s")))
        .map_err(|source| ConsoleCliError::Connect { addr, source })?;
    let request = request(&args, addr, &token)?;
    let (ws, _) = match tokio_tungstenite::client_async(request, stream).await {
        Ok(v) => v,
        Err(tungstenite::Error::Http(resp)) => return Err(refused(&resp)),
        Err(e) => return Err(e.into()),
    };
    let raw = RawTerminal::enter();
    eprint!(
        "Connected to the console of VM {}. Escape character is ^] (Ctrl-]).\r\n",
        args.name
    );
    let ended = session(ws).await;
    drop(raw);
    eprintln!("\n{ended}");
    Ok(ExitCode::SUCCESS)
}

fn token(args: &ConsoleArgs) -> Result<String, ConsoleCliError> {
    if let Some(t) = args.api.configured_token() {
        return Ok(t.to_string());
    }
    let path = args.state.data_dir.join("api.token");
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .ok()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ConsoleCliError::NoToken(path.display().to_string()))
}

/// The API's address on this node: API_LISTEN, or loopback when it listens on all.
fn api_addr(args: &ConsoleArgs) -> SocketAddr {
    let ip = match args.api.api_listen {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, args.api.node_api_port)
}

fn request(
    args: &ConsoleArgs,
    addr: SocketAddr,
    token: &str,
) -> Result<http::Request<()>, ConsoleCliError> {
    let uri = format!(
        "ws://{addr}/vms/{}/console/attach?force={}",
        args.name, args.force
    );
    let mut req = uri.into_client_request()?;
    let bearer = http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|e| tungstenite::Error::HttpFormat(e.into()))?;
    req.headers_mut()
        .insert(http::header::AUTHORIZATION, bearer);
    Ok(req)
}

/// The agent's JSON error of a refused upgrade.
fn refused(resp: &http::Response<Option<Vec<u8>>>) -> ConsoleCliError {
    let body = resp.body().as_deref().unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    ConsoleCliError::Refused {
        status: resp.status().as_u16(),
        message,
    }
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Moves bytes between the terminal and the WebSocket; returns how it ended, for a
/// person.
async fn session(mut ws: Ws) -> String {
    let mut keys = stdin_reader();
    let (mut term, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(h)) => (t, h),
        _ => return "cannot watch for signals".into(),
    };
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            typed = keys.recv() => {
                let Some(bytes) = typed else { return detach(&mut ws, "standard input closed").await };
                if let Some(at) = bytes.iter().position(|b| *b == DETACH) {
                    if at > 0 {
                        let _ = ws.send(Message::binary(bytes[..at].to_vec())).await;
                    }
                    return detach(&mut ws, "detached").await;
                }
                if ws.send(Message::binary(bytes)).await.is_err() {
                    return "the connection to the agent was lost".into();
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => { let _ = out.write_all(&b); let _ = out.flush(); }
                Some(Ok(Message::Text(t))) => { let _ = out.write_all(t.as_bytes()); let _ = out.flush(); }
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(f) => format!("closed by the agent ({}): {}", u16::from(f.code), f.reason),
                        None => "closed by the agent".into(),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("the connection to the agent failed: {e}"),
                None => return "the connection to the agent was lost".into(),
            },
            _ = term.recv() => return detach(&mut ws, "terminated (SIGTERM)").await,
            _ = hup.recv() => return detach(&mut ws, "hung up (SIGHUP)").await,
        }
    }
}

async fn detach(ws: &mut Ws, why: &str) -> String {
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    why.to_string()
}

/// Standard input, read on a thread of its own (a blocked read must not keep the
/// process from exiting).
fn stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// The terminal in raw mode while this lives (when standard input is one).
struct RawTerminal {
    saved: Option<Termios>,
}

impl RawTerminal {
    fn enter() -> RawTerminal {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return RawTerminal { saved: None };
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawTerminal { saved: None };
        }
        RawTerminal { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}
