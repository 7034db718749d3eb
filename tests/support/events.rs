//! A `GET /events` client: reads the Server-Sent Events stream line by line, as a
//! dashboard or `curl -N` would.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::netns::in_netns;

pub struct EventStream {
    reader: BufReader<TcpStream>,
    /// Every event read so far, in order.
    pub log: Vec<Value>,
    /// The HTTP status line and headers.
    pub head: String,
}

impl EventStream {
    /// Opens the stream from namespace `ns` (`last_id`: the `Last-Event-ID` to send).
    pub fn open(
        ns: &str,
        addr: SocketAddr,
        token: &str,
        last_id: Option<&str>,
    ) -> io::Result<Self> {
        let stream = in_netns(ns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?;
        Self::request(stream, addr, token, last_id)
    }

    /// [`EventStream::open`] on a socket whose receive buffer is 4 KiB (set before the
    /// connect, so the window never grows): a reader that stops reading backs the
    /// agent up after a few KiB.
    pub fn open_small_window(ns: &str, addr: SocketAddr, token: &str) -> io::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, connect, setsockopt, socket, sockopt,
        };
        use std::os::fd::AsRawFd;
        let SocketAddr::V4(v4) = addr else {
            return Err(io::Error::other("IPv4 only"));
        };
        let fd = in_netns(ns, || {
            socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )
        })?;
        setsockopt(&fd, sockopt::RcvBuf, &4096)?;
        connect(fd.as_raw_fd(), &SockaddrIn::from(v4))?;
        Self::request(TcpStream::from(fd), addr, token, None)
    }

    fn request(
        mut stream: TcpStream,
        addr: SocketAddr,
        token: &str,
        last_id: Option<&str>,
    ) -> io::Result<Self> {
        let mut req = format!(
            "GET /events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n"
        );
        if let Some(id) = last_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes())?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        Ok(Self {
            reader,
            log: Vec::new(),
            head,
        })
    }

    pub fn status(&self) -> u16 {
        self.head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The next event's JSON, waiting at most `within`; `None` when none came in time
    /// or the stream ended. The body is chunked: chunk-size lines are skipped.
    pub fn next(&mut self, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.reader
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            if let Some(json) = line.trim_end().strip_prefix("data: ") {
                let event: Value = serde_json::from_str(json).ok()?;
                self.log.push(event.clone());
                return Some(event);
            }
        }
    }

    /// Events until one for which `want` is true (returned last), waiting at most
    /// `within` in all; panics with what came when it does not arrive.
    pub fn until(&mut self, within: Duration, want: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(e) => {
                    let done = want(&e);
                    seen.push(e);
                    if done {
                        return seen;
                    }
                }
                None => break,
            }
        }
        panic!("the awaited event did not come within {within:?}; came: {seen:#?}");
    }

    /// Reads what is left until the agent ends the stream; true if it did within `within`.
    pub fn ended_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let _ = self
                .reader
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
        false
    }

    pub fn socket(&self) -> &TcpStream {
        self.reader.get_ref()
    }
}
