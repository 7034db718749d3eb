//! Tiny servers that run inside a test namespace and say who they are, so a test can
//! tell which host answered and from which address it saw the connection.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::netns::Netns;

/// How often stopped servers notice the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// An HTTP/1.x responder. Body: `<label> <peer ip:port>`.
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    handle: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(ns: &Netns, addr: SocketAddr, label: &str) -> HttpServer {
        let listener = ns
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind http {addr} in {}: {e}", ns.name()));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("nonblocking: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop2, hits2, label) = (stop.clone(), hits.clone(), label.to_owned());
        let handle = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        hits2.fetch_add(1, Ordering::SeqCst);
                        // Errors of one connection (client gave up) are the client's
                        // business; the server keeps serving.
                        let _ = serve_http(stream, peer, &label);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        HttpServer {
            addr,
            stop,
            hits,
            handle: Some(handle),
        }
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn serve_http(mut stream: std::net::TcpStream, peer: SocketAddr, label: &str) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.set_write_timeout(Some(Duration::from_secs(3)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let body = format!("{label} {peer}");
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes())?;
    stream.flush()
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A UDP echo. Reply: `<label> <peer ip:port> <payload>`.
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    handle: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr, label: &str) -> UdpEcho {
        let sock = ns
            .run(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind udp {addr} in {}: {e}", ns.name()));
        sock.set_read_timeout(Some(POLL))
            .unwrap_or_else(|e| panic!("timeout: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop2, hits2, label) = (stop.clone(), hits.clone(), label.to_owned());
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    hits2.fetch_add(1, Ordering::SeqCst);
                    let reply = format!("{label} {peer} {}", String::from_utf8_lossy(&buf[..n]));
                    let _ = sock.send_to(reply.as_bytes(), peer);
                }
            }
        });
        UdpEcho {
            addr,
            stop,
            hits,
            handle: Some(handle),
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The label part of a server reply (`vm`, `far`, ...).
pub fn who(reply: &str) -> &str {
    reply.split(' ').next().unwrap_or("")
}

/// The peer address the server saw, as `ip:port`.
pub fn peer(reply: &str) -> &str {
    reply.split(' ').nth(1).unwrap_or("")
}

/// The peer IP the server saw.
pub fn peer_ip(reply: &str) -> &str {
    peer(reply).split(':').next().unwrap_or("")
}
