//! Clients that run from inside a namespace: a plain TCP/HTTP GET, a UDP round trip, and
//! the agent's JSON API. Timeouts are bounded (5 s unless a test allows more); nothing
//! here measures time.

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use serde_json::Value;

use super::netns::in_netns;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn connect_from(ns: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    connect_with_timeout(ns, addr, IO_TIMEOUT)
}

fn connect_with_timeout(ns: &str, addr: SocketAddr, io_timeout: Duration) -> io::Result<TcpStream> {
    let stream = in_netns(ns, || TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    Ok(stream)
}

/// `GET /` from namespace `ns` to `addr`; returns the body (a test server's reply).
pub fn tcp_get(ns: &str, addr: SocketAddr) -> io::Result<String> {
    http_get(ns, addr, "/")
}

/// `GET path` (HTTP/1.0) from namespace `ns` to `addr`; returns the body.
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut stream = connect_from(ns, addr)?;
    stream.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") => Ok(body.to_owned()),
        _ => Err(io::Error::other(format!("not an HTTP response: {resp:?}"))),
    }
}

/// One UDP datagram from a fresh socket in `ns` (a fresh source port, so no conntrack
/// entry of an earlier test step is reused), up to 3 tries; returns the reply.
pub fn udp_roundtrip(ns: &str, addr: SocketAddr, payload: &str) -> io::Result<String> {
    let sock = in_netns(ns, || UdpSocket::bind("0.0.0.0:0"))?;
    // connect(): only datagrams from `addr` are accepted, which is what a DNAT'd reply
    // looks like once conntrack has reversed it.
    sock.connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_millis(700)))?;
    let mut buf = [0u8; 2048];
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "no reply");
    for _ in 0..3 {
        sock.send(payload.as_bytes())?;
        match sock.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// The body parsed as JSON, when it is JSON.
    pub json: Option<Value>,
}

impl Response {
    /// The JSON body, panicking with the raw body when there is none.
    pub fn json(&self) -> &Value {
        self.json
            .as_ref()
            .unwrap_or_else(|| panic!("status {} non-JSON body {:?}", self.status, self.body))
    }

    /// Asserts the agent's error shape `{"ok":false,"error":"..."}`.
    pub fn assert_error(&self, status_ok: impl Fn(u16) -> bool) {
        assert!(status_ok(self.status), "unexpected status: {self:?}");
        let j = self.json();
        assert_eq!(j["ok"], Value::Bool(false), "error body: {self:?}");
        assert!(
            j["error"].as_str().is_some_and(|s| !s.is_empty()),
            "error message missing: {self:?}"
        );
    }
}

/// An HTTP/1.1 client for the agent API that connects from inside a namespace.
#[derive(Debug, Clone)]
pub struct Api {
    pub ns: String,
    pub addr: SocketAddr,
    pub token: String,
    /// How long an answer may take before the call fails (5 s; the VM tests allow
    /// minutes: a slow libvirtd is not a failure of the agent).
    pub timeout: Duration,
    /// Says what else was slow when a call times out (e.g. libvirtd's own answer time).
    pub diagnose: Option<fn() -> String>,
}

impl Api {
    pub fn new(ns: &str, addr: SocketAddr, token: &str) -> Api {
        Api {
            ns: ns.to_owned(),
            addr,
            token: token.to_owned(),
            timeout: IO_TIMEOUT,
            diagnose: None,
        }
    }

    /// The panic message of a call that got no answer: what was asked, how long it was
    /// given, and (through `diagnose`) what else was slow.
    fn no_answer(&self, method: &str, path: &str, e: &io::Error, waited: Duration) -> String {
        let what = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "{method} {path} did not answer within {} s",
                waited.as_secs()
            ),
            _ => format!("{method} {path}: {e}"),
        };
        match self.diagnose {
            Some(d) => format!("{what}; {}", d()),
            None => what,
        }
    }

    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.call("POST", path, Some(&body.to_string()))
    }

    pub fn delete(&self, path: &str) -> Response {
        self.call("DELETE", path, None)
    }

    /// With the right token; panics on transport errors (the agent must answer).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.request(method, path, Some(&self.token), body)
            .unwrap_or_else(|e| panic!("{}", self.no_answer(method, path, &e, self.timeout)))
    }

    /// The raw request: any token (or none), any body (not necessarily JSON).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> io::Result<Response> {
        self.request_bytes(method, path, token, body.map(str::as_bytes))
    }

    pub fn request_bytes(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        self.request_with_headers(method, path, token, &[], body)
    }

    /// A call whose answer may take up to `wait` (e.g. `/vms/{name}/ip` waiting for a
    /// lease); panics on transport errors.
    pub fn call_waiting(&self, method: &str, path: &str, wait: Duration) -> Response {
        self.request_timed(method, path, Some(&self.token), &[], None, wait)
            .unwrap_or_else(|e| panic!("{}", self.no_answer(method, path, &e, wait)))
    }

    /// As `request_bytes`, with extra request headers (e.g. forged forwarding headers).
    pub fn request_with_headers(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        self.request_timed(method, path, token, headers, body, self.timeout)
    }

    fn request_timed(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        io_timeout: Duration,
    ) -> io::Result<Response> {
        let mut stream = connect_with_timeout(&self.ns, self.addr, io_timeout)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.addr
        );
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        if let Some(b) = body {
            write_body(&mut stream, b)?;
        }
        let mut raw = Vec::new();
        // A server that refuses a body early (413) may reset the connection after its
        // answer; what was received before the reset is still the answer.
        if let Err(e) = stream.read_to_end(&mut raw)
            && raw.is_empty()
        {
            return Err(e);
        }
        parse_response(&raw)
    }
}

/// Writes a body in pieces and stops as soon as the server has answered (it may refuse
/// an oversized body without reading it) or stopped reading.
fn write_body(stream: &mut TcpStream, body: &[u8]) -> io::Result<()> {
    for chunk in body.chunks(64 * 1024) {
        stream.set_nonblocking(true)?;
        let mut probe = [0u8; 1];
        let answered = matches!(stream.peek(&mut probe), Ok(n) if n > 0);
        stream.set_nonblocking(false)?;
        if answered {
            return Ok(());
        }
        if stream.write_all(chunk).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads one response from a kept-alive connection: the head, then as many bytes of
/// body as its Content-Length says (for benchmarks that time requests on one connection).
pub fn read_response(reader: &mut impl BufRead) -> io::Result<Response> {
    let mut raw = Vec::new();
    let mut length = 0usize;
    loop {
        let start = raw.len();
        if reader.read_until(b'\n', &mut raw)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = String::from_utf8_lossy(&raw[start..]);
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().map_err(io::Error::other)?;
        }
    }
    let start = raw.len();
    raw.resize(start + length, 0);
    reader.read_exact(&mut raw[start..])?;
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            io::Error::other(format!(
                "no header end in {:?}",
                String::from_utf8_lossy(raw)
            ))
        })?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse().ok();
            }
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest[..n.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    let body = String::from_utf8_lossy(&body).into_owned();
    let json = serde_json::from_str(&body).ok();
    Ok(Response { status, body, json })
}

fn dechunk(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| io::Error::other("truncated chunk size"))?;
        let size_str = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| io::Error::other(format!("chunk size {size_str:?}: {e}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err(io::Error::other("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

/// The value of one series of a Prometheus scrape (its name and labels exactly as the
/// agent writes them), if present.
pub fn series_value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
