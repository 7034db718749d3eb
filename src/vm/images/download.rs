//! The images' own HTTP client: base images downloaded from a plain http(s) URL, with
//! timeouts so that a server that stops sending fails the download instead of holding
//! the image's name in `downloading` for ever.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::vm::{Internal, Invalid, VmError};

/// A download's body broke off.
#[derive(Debug, thiserror::Error)]
#[error("download interrupted: {0}")]
pub struct Interrupted(#[source] reqwest::Error);

/// The HTTP client of image downloads.
pub struct Downloader {
    http: reqwest::Client,
}

impl Downloader {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            // A server that stops sending fails the download instead of holding the
            // image name in "downloading" for ever.
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        Self { http }
    }

    /// `url`'s body as a stream, and its length when the server says it.
    pub async fn get(
        &self,
        url: &str,
    ) -> Result<
        (
            Option<u64>,
            impl Stream<Item = Result<Bytes, Interrupted>> + use<>,
        ),
        VmError,
    > {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|source| Internal::Download {
                url: url.to_owned(),
                source,
            })?;
        if !resp.status().is_success() {
            return Err(Internal::HttpStatus {
                url: url.to_owned(),
                status: resp.status(),
            }
            .into());
        }
        let total = resp.content_length();
        Ok((total, resp.bytes_stream().map(|r| r.map_err(Interrupted))))
    }
}

/// The longest `url` of `POST /images` (the document's maxLength says the same).
pub const MAX_URL_LEN: usize = 4096;

/// Refuses (400) a URL the agent does not download from: see [`plain_url`].
pub fn check_url(url: &str) -> Result<(), VmError> {
    if url.len() > MAX_URL_LEN {
        return Err(Invalid::UrlTooLong { max: MAX_URL_LEN }.into());
    }
    // The URL parser would quietly drop CR, LF and tabs; the raw text is stored and
    // logged, so refuse them (and every other control character) instead.
    if url.chars().any(char::is_control) {
        return Err(Invalid::UrlControl.into());
    }
    if !plain_url(url) {
        return Err(Invalid::UrlNotPlain.into());
    }
    let parsed = reqwest::Url::parse(url).map_err(Invalid::Url)?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Invalid::UrlScheme.into());
    }
    Ok(())
}

/// Characters of a path segment (RFC 3986 `pchar`, with `%` on its own): what a URL
/// parser keeps as it is.
const URL_PATH_CHARS: &str = "._~!$&'()*+,;=:@%-";

/// A URL the agent downloads from: `http(s)://host[:port][/path][?query]`, the host a
/// DNS name (labels of letters and digits with inner hyphens, the last one starting with
/// a letter) or a dotted-quad IPv4 address, the port 1..65535. The document states the
/// same as `api::doc::URL_PATTERN` (a test holds them equal). Plainer than what a URL
/// parser takes, on purpose: no credentials in a URL that is stored and logged, no
/// fragment, no host a parser would reinterpret (`0x7f.1`, `010.0.0.1`, an `xn--` label).
pub fn plain_url(url: &str) -> bool {
    let rest = match (url.get(..7), url.get(..8)) {
        (Some(p), _) if p.eq_ignore_ascii_case("http://") => &url[7..],
        (_, Some(p)) if p.eq_ignore_ascii_case("https://") => &url[8..],
        _ => return false,
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let label = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && !l.contains("--")
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let domain = host.split('.').all(label)
        && host
            .rsplit('.')
            .next()
            .is_some_and(|last| last.starts_with(|c: char| c.is_ascii_alphabetic()));
    if !(domain || host.parse::<std::net::Ipv4Addr>().is_ok()) {
        return false;
    }
    if let Some(p) = port
        && !(!p.is_empty()
            && p.len() <= 5
            && !p.starts_with('0')
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| n <= 65535))
    {
        return false;
    }
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, q),
        None => (tail, ""),
    };
    let url_char = |c: char, extra: &str| {
        c.is_ascii_alphanumeric() || URL_PATH_CHARS.contains(c) || extra.contains(c)
    };
    path.chars().all(|c| url_char(c, "/")) && query.chars().all(|c| url_char(c, "/?"))
}

#[cfg(test)]
mod tests {
    use super::plain_url;

    #[test]
    fn image_urls_are_plain_http_urls() {
        for ok in [
            "https://cloud-images.ubuntu.com/jammy/current/jammy-server-cloudimg-amd64.img",
            "http://127.0.0.1:8080/img",
            "HTTP://Mirror.Example/a/b.qcow2?sig=a%2Fb&x=1",
        ] {
            assert!(plain_url(ok), "{ok}");
        }
        for bad in [
            "ftp://h/x",
            "http://user:secret@h/x",
            "http://h/x#frag",
            "http://h/a b",
            "http://010.0.0.1/x",
            "http://0x7f.1/x",
            "http://xn--bad/x",
            "http://h:0/x",
            "http://h:65536/x",
            "http://[::1]/x",
            "http://h/\u{e9}",
        ] {
            assert!(!plain_url(bad), "{bad}");
        }
    }
}
