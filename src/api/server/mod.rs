//! The API's HTTP server: an accept loop on hyper that gives every connection a budget.
//!
//! `axum::serve` has no header or body timeout and no connection cap, so a stranger
//! holding a thousand idle connections exhausted the descriptors and locked the API
//! out. Here each connection is timed while it is idle (HEADER_READ_TIMEOUT,
//! KEEPALIVE_TIMEOUT), request bodies are timed (`timed_body`), at most
//! MAX_CONNECTIONS are open (at the cap the one idle longest is shed for the newcomer,
//! see `budget`), and failed accepts back off (`backoff`).

mod backoff;
mod budget;
mod timed_body;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

pub use budget::Close;
pub use timed_body::{BodyTimeout, Rule};

use super::routes::{self, BodyRule};
use crate::config::ApiSettings;
use backoff::{AcceptBackoff, Episode};
use budget::{Admission, ConnState, Registration, Registry, Timeouts};

/// The connection a request came on: the peer and the local address it was accepted
/// on (the tunnel address, for the controller). Forwarding headers are never read. The
/// server gives it to every request as `ConnectInfo<ConnInfo>`.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    pub local: Option<std::net::SocketAddr>,
}

/// The connection budget's settings (HEADER_READ_TIMEOUT, BODY_READ_TIMEOUT,
/// KEEPALIVE_TIMEOUT, UPLOAD_MIN_BYTES, UPLOAD_WINDOW, and the connection cap derived
/// from MAX_CONNECTIONS and the descriptor limit).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read: Duration,
    pub body_read: Duration,
    pub keepalive: Duration,
    pub upload_min_bytes: u64,
    pub upload_window: Duration,
    pub max_connections: usize,
}

impl Limits {
    /// The limits of the settings, with `max_connections` the cap the agent settled on
    /// (see [`ApiSettings::configured_max_connections`]).
    pub fn from_settings(s: &ApiSettings, max_connections: usize) -> Self {
        let secs = Duration::from_secs;
        Self {
            header_read: secs(s.header_read_timeout),
            body_read: secs(s.body_read_timeout),
            keepalive: secs(s.keepalive_timeout),
            upload_min_bytes: s.upload_min_bytes,
            upload_window: secs(s.upload_window),
            max_connections,
        }
    }

    /// The rule for a request's body: a streamed body (an image upload, of any size)
    /// keeps a minimum throughput; every other body has a deadline. Judged before
    /// routing, from the route table (`routes::before_routing`).
    fn body_rule(&self, method: &Method, path: &str) -> Rule {
        let route = routes::before_routing(method, path);
        if route.is_some_and(|r| r.body == BodyRule::Streamed) {
            Rule::MinThroughput {
                bytes: self.upload_min_bytes,
                window: self.upload_window,
            }
        } else {
            Rule::Deadline(self.body_read)
        }
    }
}

/// What every connection's task shares.
struct Shared {
    app: Router,
    limits: Limits,
    registry: Arc<Registry>,
    http: http1::Builder,
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, closes
/// idle connections, lets requests in progress finish and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let registry = Registry::new(
        limits.max_connections,
        Timeouts {
            header_read: limits.header_read,
            keepalive: limits.keepalive,
        },
    );
    let mut http = http1::Builder::new();
    // The budget times headers itself (hyper's own timeout would also cut kept-alive
    // connections at the header timeout, and it needs hyper's timer).
    http.keep_alive(true)
        .header_read_timeout(None)
        .max_header_size(MAX_HEAD_BYTES);
    let shared = Arc::new(Shared {
        app,
        limits,
        registry: registry.clone(),
        http,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    accept_until(&listener, &shared, &stop_rx, shutdown).await;
    drop(listener);
    let _ = stop_tx.send(true);
    tracing::info!(
        open = registry.len(),
        "API: stopped accepting; closing idle connections, finishing requests in progress"
    );
    registry.emptied().await;
}

/// Largest request head (request line and headers) read, answered 431 beyond. hyper's
/// default is its whole read buffer, about 408 KiB, which a stranger could make the agent
/// hold on every connection up to the cap until the header timeout; our clients send a
/// request line, a token and a few headers.
const MAX_HEAD_BYTES: usize = 16 * 1024;

async fn accept_until(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    let mut at_cap = AtTheCap::default();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.succeeded();
                admit(shared, stream, peer, stop, &mut at_cap);
            }
            Err(e) if backoff::is_connection_error(&e) => {}
            Err(e) => {
                if backoff::is_out_of_descriptors(&e) {
                    shared.registry.shed_one();
                }
                let delay = backoff.failed(&e);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => return,
                }
            }
        }
    }
}

/// A minimal answer for a connection refused at the cap, in the API's error shape;
/// written without waiting (it fits any socket buffer) and without reading the request.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nconnection: close\r\ncontent-length: 80\r\n\r\n\
{\"ok\":false,\"error\":\"too many connections in progress (MAX_CONNECTIONS); retry\"}";

/// Episodes of pressure on the cap, each logged when it starts and when it ends.
#[derive(Default)]
struct AtTheCap {
    /// Idle connections shed for new ones.
    shedding: Episode,
    /// New connections refused, every connection busy.
    refusing: Episode,
}

impl AtTheCap {
    fn admitted(&mut self, shed: bool, cap: usize) {
        if let Some((refused, lasted)) = self.refusing.ended() {
            tracing::warn!(
                refused,
                lasted_ms = lasted.as_millis() as u64,
                "API connections admitted again"
            );
        }
        if !shed {
            if let Some((shed, lasted)) = self.shedding.ended() {
                tracing::warn!(
                    shed,
                    lasted_ms = lasted.as_millis() as u64,
                    "API connections below the cap again"
                );
            }
        } else if self.shedding.failed() {
            tracing::warn!(
                cap,
                "connection cap reached: closing the connections idle longest for new ones \
                 (logged again when below the cap)"
            );
        }
    }

    fn refused(&mut self, cap: usize) {
        if self.refusing.failed() {
            tracing::warn!(
                cap,
                "connection cap reached and every connection busy: refusing new ones \
                 (logged again when they are admitted)"
            );
        }
    }
}

fn admit(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: &watch::Receiver<bool>,
    at_cap: &mut AtTheCap,
) {
    let cap = shared.limits.max_connections;
    match shared.registry.admit() {
        Admission::Admitted { registration, shed } => {
            at_cap.admitted(shed, cap);
            let task = connection(shared.clone(), stream, peer, registration, stop.clone());
            tokio::spawn(task);
        }
        Admission::Refused => {
            at_cap.refused(cap);
            let _ = stream.try_write(REFUSED);
        }
    }
}

/// One connection, from accept to close: hyper serves it while the budget watches it.
async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    registration: Registration,
    mut stop: watch::Receiver<bool>,
) {
    let state = registration.state.clone();
    let info = ConnInfo {
        peer,
        local: stream.local_addr().ok(),
    };
    let io = TokioIo::new(Watched {
        stream,
        state: state.clone(),
    });
    let service = ApiService {
        shared: shared.clone(),
        state: state.clone(),
        info,
    };
    // With upgrades: a console's WebSocket takes the connection over, and the budget lets
    // it go (the connection's task ends here; consoles have a budget of their own).
    let mut conn = pin!(shared.http.serve_connection(io, service).with_upgrades());
    let mut stopping = false;
    loop {
        let check_at = state.next_check(Instant::now());
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "API connection ended with an error");
                }
                return;
            }
            () = state.shed_requested() => {}
            () = tokio::time::sleep_until(check_at) => {}
            _ = stop.changed(), if !stopping => {
                stopping = true;
                // hyper would wait for a request on a connection that has sent nothing.
                if !state.is_busy() {
                    return;
                }
                conn.as_mut().graceful_shutdown();
            }
        }
        if let Some(why) = state.verdict(Instant::now()) {
            tracing::debug!(%peer, reason = why.as_str(), "closing API connection");
            return;
        }
    }
}

/// The connection's socket, telling the budget when bytes arrive.
struct Watched {
    stream: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The axum app as hyper calls it on one connection: the request's body under its
/// time rule, the connection's addresses as `ConnectInfo<ConnInfo>`, and the response's
/// end reported to the budget.
struct ApiService {
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    info: ConnInfo,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ApiService {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.state.request_started();
        let rule = self.shared.limits.body_rule(req.method(), req.uri().path());
        let mut req = req.map(|body| {
            if http_body::Body::is_end_stream(&body) {
                Body::new(body)
            } else {
                Body::new(timed_body::TimedBody::new(body, rule))
            }
        });
        req.extensions_mut().insert(ConnectInfo(self.info));
        let answer = tower::Service::call(&mut self.shared.app.clone(), req);
        let state = self.state.clone();
        Box::pin(async move {
            let resp = answer.await?;
            Ok(resp.map(|body| Tracked { body, state }))
        })
    }
}

/// A response body that tells the budget when hyper has taken all of it (or dropped it):
/// from then on the connection is idle.
struct Tracked {
    body: Body,
    state: Arc<ConnState>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.state.response_finished();
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests;
