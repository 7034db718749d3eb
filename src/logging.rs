//! The log: text or JSON on stderr, with no control character of anyone's choosing.
//!
//! Field values are written as given, and some come from requests (a path, a name in
//! an error). JSON escapes control characters itself; for text, every line passes
//! through [`Plain`], which writes control characters as `\u{..}` escapes, so a value
//! holding CR/LF can never start a line of its own.

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Installs the global subscriber: `RUST_LOG` (default `info`), colour only on a
/// terminal (and not with `NO_COLOR`).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour);
    match format {
        LogFormat::Text => builder.with_writer(Plain { colour }).init(),
        LogFormat::Json => builder.json().with_writer(io::stderr).init(),
    }
}

/// Makes stderr writers that escape control characters (see the module doc).
#[derive(Clone, Copy)]
pub struct Plain {
    /// ESC is kept for the formatter's own colours (on a terminal only).
    colour: bool,
}

impl<'a> MakeWriter<'a> for Plain {
    type Writer = PlainWriter<io::Stderr>;
    fn make_writer(&'a self) -> Self::Writer {
        PlainWriter {
            inner: io::stderr(),
            colour: self.colour,
        }
    }
}

pub struct PlainWriter<W: Write> {
    inner: W,
    colour: bool,
}

impl<W: Write> Write for PlainWriter<W> {
    /// One call carries one formatted event, ending in its newline: only that last
    /// newline is kept as it is.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write_all(&escape(buf, self.colour))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `buf` with every control character but a final newline (and ESC when `keep_esc`)
/// written as a `\u{..}` escape.
pub fn escape(buf: &[u8], keep_esc: bool) -> Vec<u8> {
    let (body, end) = match buf.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (buf, &b""[..]),
    };
    let mut out = Vec::with_capacity(buf.len() + 8);
    for &b in body {
        let control = b < 0x20 || b == 0x7f;
        if control && !(keep_esc && b == 0x1b) {
            out.extend_from_slice(format!("\\u{{{b:x}}}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(end);
    out
}

/// `s` with its control characters written as `\u{..}` escapes, for text stored where
/// operators read it (audit rows).
pub fn escape_str(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    format!("\\u{{{:x}}}", u32::from(c))
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Says something at most once a minute: for errors that can repeat with every request
/// (a full disk), where one line per request would fill the log's disk too.
#[derive(Default)]
pub struct Occasionally {
    /// Seconds since the Unix epoch of the last time it spoke.
    last: std::sync::atomic::AtomicU64,
}

impl Occasionally {
    pub fn say(&self, f: impl FnOnce()) {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now >= last + 60)
            && self
                .last
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_with_line_breaks_stays_on_its_line() {
        let line = b"2026-11-28T10:00:00Z ERROR x: failed url=http://h/x\r\n2026 INFO forged\n";
        let out = String::from_utf8(escape(line, false)).unwrap();
        assert_eq!(
            out,
            "2026-11-28T10:00:00Z ERROR x: failed url=http://h/x\\u{d}\\u{a}2026 INFO forged\n"
        );
        assert_eq!(out.matches('\n').count(), 1);
        assert_eq!(
            escape(b"\x1b[1mbold\x1b[0m\n", true),
            b"\x1b[1mbold\x1b[0m\n"
        );
        assert_eq!(escape(b"\x1b[1m\n", false), b"\\u{1b}[1m\n");
        assert_eq!(escape(b"tab\there", false), b"tab\\u{9}here");
    }

    #[test]
    fn stored_text_is_escaped_too() {
        assert_eq!(escape_str("plain"), "plain");
        assert_eq!(escape_str("a\r\nb\u{7}"), "a\\u{d}\\u{a}b\\u{7}");
    }

    #[test]
    fn occasionally_speaks_once_a_minute() {
        let o = Occasionally::default();
        let mut n = 0;
        for _ in 0..1000 {
            o.say(|| n += 1);
        }
        assert_eq!(n, 1);
    }
}
