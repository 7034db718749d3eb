//! The server in-process on loopback, with small routers standing in for the API: what
//! reaches handlers, refusals at the cap, and shutdown. Timeouts against the real
//! binary are in tests/connections.rs.

use std::sync::Arc;

use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};

use super::*;

const LIMITS: Limits = Limits {
    header_read: Duration::from_secs(30),
    body_read: Duration::from_secs(30),
    keepalive: Duration::from_secs(30),
    upload_min_bytes: 1024,
    upload_window: Duration::from_secs(30),
    max_connections: 64,
};

/// Serves `app` on a loopback port until the returned sender fires or is dropped.
async fn start(
    app: Router,
    limits: Limits,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(listener, app, limits, async move {
        let _ = rx.await;
    }));
    (addr, tx, served)
}

/// Sends `request` and reads until the server closes the connection.
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "not closed: {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn handlers_see_both_addresses_of_the_connection() {
    let app = Router::new().route(
        "/who",
        get(|ConnectInfo(c): ConnectInfo<ConnInfo>| async move {
            format!(
                "{} {}",
                c.peer,
                c.local.map_or("-".into(), |l| l.to_string())
            )
        }),
    );
    let (addr, _stop, _) = start(app, LIMITS).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"GET /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut s).await;
    assert!(answer.ends_with(&format!("{me} {addr}")), "{answer}");
}

#[test]
fn the_refusal_is_a_well_formed_json_error() {
    let text = std::str::from_utf8(REFUSED).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 503 "));
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len());
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("MAX_CONNECTIONS"));
}

/// A route whose requests wait until the test lets them go.
fn held_route(release: Arc<Notify>, started: Arc<Notify>) -> Router {
    Router::new().route(
        "/hold",
        get(move || {
            let (release, started) = (release.clone(), started.clone());
            async move {
                started.notify_one();
                release.notified().await;
                "released"
            }
        }),
    )
}

#[tokio::test]
async fn at_the_cap_with_every_connection_busy_a_newcomer_gets_a_503() {
    let (release, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let limits = Limits {
        max_connections: 1,
        ..LIMITS
    };
    let (addr, _stop, _) = start(held_route(release.clone(), started.clone()), limits).await;
    let busy = tokio::spawn(exchange(
        addr,
        "GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ));
    started.notified().await;
    let refused = exchange(addr, "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    release.notify_one();
    let answer = busy.await.unwrap();
    assert!(answer.ends_with("released"), "{answer}");
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_lets_requests_finish() {
    let (release, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (addr, stop, served) = start(held_route(release.clone(), started.clone()), LIMITS).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let busy = tokio::spawn(exchange(addr, "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n"));
    started.notified().await;
    stop.send(()).unwrap();
    // The idle one (nothing sent) is closed at once; the request in progress is not.
    assert_eq!(read_to_close(&mut idle).await, "");
    assert!(!served.is_finished());
    release.notify_one();
    let answer = busy.await.unwrap();
    assert!(answer.ends_with("released"), "{answer}");
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .unwrap()
        .unwrap();
}

/// `POST /images/{name}` that reads the body as the upload handler does, and says how
/// many bytes came or why it stopped.
fn upload_route() -> Router {
    Router::new().route(
        "/images/{name}",
        post(|body: Body| async move {
            use futures_util::StreamExt;
            let mut stream = body.into_data_stream();
            let mut n = 0usize;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => n += c.len(),
                    Err(e) => return format!("failed after {n}: {e}"),
                }
            }
            format!("stored {n}")
        }),
    )
}

/// Sends `chunks` pieces of `size` bytes, `every` apart, announcing `total` bytes.
async fn slow_upload(
    addr: SocketAddr,
    total: usize,
    chunks: usize,
    size: usize,
    every: Duration,
) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /images/base HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Length: {total}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..chunks {
        tokio::time::sleep(every).await;
        if s.write_all(&vec![b'x'; size]).await.is_err() {
            break;
        }
    }
    read_to_close(&mut s).await
}

#[tokio::test]
async fn an_upload_that_keeps_up_outlasts_the_body_timeout_and_one_that_stalls_is_cut() {
    let limits = Limits {
        body_read: Duration::from_millis(300),
        upload_min_bytes: 1024,
        upload_window: Duration::from_millis(500),
        ..LIMITS
    };
    let (addr, _stop, _) = start(upload_route(), limits).await;
    // 2 KiB every 100 ms for 1.5 s: five times the body timeout, well over the minimum.
    let kept_up = slow_upload(addr, 15 * 2048, 15, 2048, Duration::from_millis(100)).await;
    assert!(
        kept_up.ends_with(&format!("stored {}", 15 * 2048)),
        "{kept_up}"
    );
    // 2 KiB, then nothing: cut one empty window later, with the rule in the message.
    let t0 = Instant::now();
    let stalled = slow_upload(addr, 1 << 20, 1, 2048, Duration::from_millis(10)).await;
    assert!(
        stalled.contains("failed after 2048")
            && stalled.contains("UPLOAD_MIN_BYTES per UPLOAD_WINDOW"),
        "{stalled}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
