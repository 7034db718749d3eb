//! Base images: downloaded (in the background, checksum verified) or uploaded, always
//! into a temporary `partial.*` volume first. Only a complete, verified file becomes the
//! volume `image.<name>`: libvirt cannot rename a volume, so it copies the partial one
//! (`virStorageVolCreateXMLFrom`, done by libvirtd) and the partial one is deleted. An
//! interrupted transfer therefore never leaves an image behind, and at startup any
//! leftover partial volume is removed and its row marked failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use virt::storage_vol::StorageVol;

use super::{Libvirt, VmError, storage, xml};
use crate::model::ImageState;
use crate::store::Store;
use crate::store::vms::{self, ImageRow};

mod leftovers;

/// At most one `image.progress` event per transfer this often.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// An image as `GET /images` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    #[serde(flatten)]
    pub row: ImageRow,
    /// Bytes received so far, while downloading.
    pub received_bytes: Option<u64>,
    /// Expected size, while downloading (when the server said).
    pub total_bytes: Option<u64>,
    /// Managed VMs whose disk is backed by this image.
    pub used_by: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    received: u64,
    total: Option<u64>,
}

pub struct Images {
    lv: Arc<Libvirt>,
    store: Store,
    pool: String,
    pool_dir: String,
    http: reqwest::Client,
    progress: Mutex<HashMap<String, Progress>>,
    /// Largest image accepted, bytes.
    max_bytes: u64,
}

/// What a finished transfer produced.
struct Stored {
    sha256: String,
    format: &'static str,
    size: u64,
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

/// 64 hex digits in either case, as written: nothing around them
/// (`api::doc::SHA256_PATTERN`).
fn check_sha256(s: &str) -> Result<String, VmError> {
    let s = s.to_ascii_lowercase();
    if s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(VmError::Invalid(
            "sha256 must be 64 hexadecimal digits".into(),
        ));
    }
    Ok(s)
}

impl Images {
    pub fn new(
        lv: Arc<Libvirt>,
        store: Store,
        pool: String,
        pool_dir: String,
        max_bytes: u64,
    ) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            // A server that stops sending fails the download instead of holding the
            // image name in "downloading" for ever.
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        Arc::new(Self {
            lv,
            store,
            pool,
            pool_dir,
            http,
            progress: Mutex::new(HashMap::new()),
            max_bytes,
        })
    }

    pub async fn list(&self) -> Result<Vec<ImageInfo>, VmError> {
        let (rows, vms) = self
            .store
            .run(|s| {
                s.with(|c| Ok::<_, crate::store::StoreError>((vms::images(c)?, vms::list(c)?)))
            })
            .await?;
        let progress = self.progress.lock().map(|p| p.clone()).unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|row| {
                let p = progress.get(&row.name).copied();
                let used_by = vms
                    .iter()
                    .filter(|v| v.image.as_deref() == Some(row.name.as_str()))
                    .map(|v| v.name.clone())
                    .collect();
                ImageInfo {
                    received_bytes: p
                        .map(|p| p.received)
                        .filter(|_| row.state == ImageState::Downloading),
                    total_bytes: p
                        .and_then(|p| p.total)
                        .filter(|_| row.state == ImageState::Downloading),
                    row,
                    used_by,
                }
            })
            .collect())
    }

    /// Claims `name` for a new transfer: 409 while it exists or is in transfer.
    async fn begin(
        &self,
        name: &str,
        source: &str,
        sha256: Option<&str>,
        by: &str,
    ) -> Result<(), VmError> {
        super::spec::check_name("image name", name)?;
        let (n, src, sha, by) = (
            name.to_string(),
            source.to_string(),
            sha256.map(str::to_string),
            by.to_string(),
        );
        self.store
            .run(move |s| {
                s.transaction(|tx| {
                    match vms::image(tx, &n)? {
                        Some(r) if r.state == ImageState::Ready => {
                            return Err(VmError::Conflict(format!(
                                "image {n} already exists; delete it first"
                            )));
                        }
                        Some(r) if r.state == ImageState::Downloading => {
                            return Err(VmError::Conflict(format!(
                                "image {n} is being transferred already"
                            )));
                        }
                        _ => {}
                    }
                    vms::image_begin(
                        tx,
                        &n,
                        &src,
                        sha.as_deref(),
                        &storage::image_volume(&n),
                        &by,
                    )?;
                    Ok(())
                })
            })
            .await?;
        if let Ok(mut p) = self.progress.lock() {
            p.insert(name.to_string(), Progress::default());
        }
        Ok(())
    }

    async fn finish(&self, name: &str, result: &Result<Stored, VmError>) {
        if let Ok(mut p) = self.progress.lock() {
            p.remove(name);
        }
        let n = name.to_string();
        let outcome = match result {
            Ok(s) => {
                let (sha, fmt, size) = (s.sha256.clone(), s.format, s.size as i64);
                tracing::info!(image = name, size, format = fmt, "image stored");
                crate::events::publish(
                    crate::events::Kind::ImageReady,
                    name,
                    serde_json::json!({ "size_bytes": size, "format": fmt }),
                );
                self.store
                    .run(move |st| st.with(|c| vms::image_ready(c, &n, &sha, fmt, size)))
                    .await
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!(image = name, error = %msg, "image transfer failed; nothing was kept");
                crate::events::publish(
                    crate::events::Kind::ImageFailed,
                    name,
                    serde_json::json!({ "error": msg }),
                );
                self.store
                    .run(move |st| st.with(|c| vms::image_failed(c, &n, &msg)))
                    .await
            }
        };
        if let Err(e) = outcome {
            tracing::error!(image = name, error = %e, "cannot record the image's state");
        }
    }

    /// `POST /images`: starts a background download and returns at once.
    pub async fn download(
        self: &Arc<Self>,
        name: &str,
        url: &str,
        sha256: Option<&str>,
        by: &str,
    ) -> Result<(), VmError> {
        // The URL parser would quietly drop CR, LF and tabs; the raw text is stored and
        // logged, so refuse them (and every other control character) instead.
        if url.chars().any(char::is_control) {
            return Err(VmError::Invalid(
                "url must not contain control characters (CR, LF, tab, ...)".into(),
            ));
        }
        if !plain_url(url) {
            return Err(VmError::Invalid(
                "url must be a plain http:// or https:// URL: a DNS name or IPv4 address, an \
                 optional port, then a path and query of URL characters (no user name, \
                 fragment, space or other character that needs escaping)"
                    .into(),
            ));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| VmError::Invalid(format!("url is not a valid URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(VmError::Invalid("url must be http:// or https://".into()));
        }
        let sha = sha256.map(check_sha256).transpose()?;
        self.begin(name, url, sha.as_deref(), by).await?;
        let this = Arc::clone(self);
        let (name, url) = (name.to_string(), url.to_string());
        tokio::spawn(async move {
            let result = this.fetch(&name, &url, sha.as_deref()).await;
            this.finish(&name, &result).await;
        });
        Ok(())
    }

    async fn fetch(&self, name: &str, url: &str, sha256: Option<&str>) -> Result<Stored, VmError> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| VmError::Internal(format!("download of {url} failed: {e}")))?;
        if !resp.status().is_success() {
            return Err(VmError::Internal(format!(
                "download of {url} failed: HTTP {}",
                resp.status()
            )));
        }
        let total = resp.content_length();
        let stream = resp
            .bytes_stream()
            .map(|r| r.map_err(|e| format!("download interrupted: {e}")));
        self.ingest(name, stream, total, sha256).await
    }

    /// `POST /images/{name}`: stores the request body as the image (in the request).
    pub async fn upload<S>(
        &self,
        name: &str,
        body: S,
        total: Option<u64>,
        sha256: Option<&str>,
        by: &str,
    ) -> Result<ImageRow, VmError>
    where
        S: Stream<Item = Result<Bytes, String>> + Send + Unpin + 'static,
    {
        let sha = sha256.map(check_sha256).transpose()?;
        self.begin(name, "upload", sha.as_deref(), by).await?;
        let result = self.ingest(name, body, total, sha.as_deref()).await;
        self.finish(name, &result).await;
        result?;
        let n = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::image(c, &n)))
            .await?
            .ok_or_else(|| VmError::NotFound(format!("image {name} vanished")))
    }

    /// Streams `body` into a partial volume, checks it, and turns it into the image.
    async fn ingest<S>(
        &self,
        name: &str,
        mut body: S,
        total: Option<u64>,
        sha256: Option<&str>,
    ) -> Result<Stored, VmError>
    where
        S: Stream<Item = Result<Bytes, String>> + Send + Unpin + 'static,
    {
        if let Some(t) = total
            && t > self.max_bytes
        {
            return Err(VmError::TooLarge(format!(
                "image is larger than {} bytes (VM_MAX_DISK_GB)",
                self.max_bytes
            )));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, VmError>>(16);
        let partial = storage::partial_volume(name);
        let final_name = storage::image_volume(name);
        let (pool_name, pool_dir) = (self.pool.clone(), self.pool_dir.clone());
        let expected = sha256.map(str::to_string);
        let writer = self.lv.call_unbounded(move |conn| {
            let pool = storage::ensure_pool(conn, &pool_name, &pool_dir)?;
            let vol =
                storage::create_volume(&pool, &partial, &xml::volume(&partial, 0, "raw", None))?;
            let mut hasher = Sha256::new();
            let mut head: Vec<u8> = Vec::with_capacity(8);
            let chunks = std::iter::from_fn(|| rx.blocking_recv()).inspect(|c| {
                if let Ok(c) = c {
                    hasher.update(c);
                    if head.len() < 4 {
                        head.extend_from_slice(&c[..c.len().min(4 - head.len())]);
                    }
                }
            });
            let uploaded = storage::upload(conn, &vol, chunks);
            let stored = (|| {
                let size = uploaded?;
                let sha = hex::encode(hasher.finalize());
                if let Some(want) = &expected
                    && want != &sha
                {
                    return Err(VmError::Invalid(format!(
                        "sha256 mismatch: expected {want}, got {sha}"
                    )));
                }
                if size == 0 {
                    return Err(VmError::Invalid("the image is empty".into()));
                }
                let format: &'static str = if head.starts_with(b"QFI\xfb") {
                    "qcow2"
                } else {
                    "raw"
                };
                // Let libvirt see the file as it is now (format, virtual size).
                let _ = pool.refresh(0);
                let vol = storage::find_volume(&pool, &partial)?
                    .ok_or_else(|| VmError::Internal("the partial volume vanished".into()))?;
                let capacity = vol.info().map(|i| i.capacity).unwrap_or(size).max(size);
                let _ = storage::delete_volume(&pool, &final_name);
                StorageVol::create_xml_from(
                    &pool,
                    &xml::volume(&final_name, capacity, format, None),
                    &vol,
                    0,
                )
                .map_err(|e| VmError::libvirt(format!("storing image volume {final_name}"), e))?;
                Ok(Stored {
                    sha256: sha,
                    format,
                    size,
                })
            })();
            let _ = storage::delete_volume(&pool, &partial);
            stored
        });
        let name_owned = name.to_string();
        let progress = &self.progress;
        let max_bytes = self.max_bytes;
        let feeder = async move {
            let mut received = 0u64;
            let mut told: Option<std::time::Instant> = None;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(VmError::Invalid);
                let failed = chunk.is_err();
                if let Ok(c) = &chunk {
                    received += c.len() as u64;
                    if let Ok(mut p) = progress.lock() {
                        p.insert(name_owned.clone(), Progress { received, total });
                    }
                    if told.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                        told = Some(std::time::Instant::now());
                        crate::events::publish(
                            crate::events::Kind::ImageProgress,
                            name_owned.clone(),
                            serde_json::json!({ "received_bytes": received, "total_bytes": total }),
                        );
                    }
                    if received > max_bytes {
                        let _ = tx
                            .send(Err(VmError::TooLarge(format!(
                                "image is larger than {max_bytes} bytes (VM_MAX_DISK_GB)"
                            ))))
                            .await;
                        return;
                    }
                }
                if tx.send(chunk).await.is_err() || failed {
                    return;
                }
            }
            if let Some(t) = total
                && received != t
            {
                let _ = tx
                    .send(Err(VmError::Invalid(format!(
                        "transfer ended after {received} of {t} bytes"
                    ))))
                    .await;
            }
        };
        let (_, stored) = tokio::join!(feeder, writer);
        stored
    }

    /// `DELETE /images/{name}`: refused while a VM uses it or while it is in transfer.
    pub async fn delete(&self, name: &str) -> Result<(), VmError> {
        super::spec::check_name("image name", name)?;
        let n = name.to_string();
        let (row, users) = self
            .store
            .run(move |s| {
                s.with(|c| {
                    Ok::<_, crate::store::StoreError>((
                        vms::image(c, &n)?,
                        vms::using_image(c, &n)?,
                    ))
                })
            })
            .await?;
        let row = row.ok_or_else(|| VmError::NotFound(format!("no image named {name}")))?;
        if row.state == ImageState::Downloading {
            return Err(VmError::Conflict(format!(
                "image {name} is being transferred"
            )));
        }
        if !users.is_empty() {
            return Err(VmError::Conflict(format!(
                "image {name} backs the disk of {}; delete those VMs first",
                users.join(", ")
            )));
        }
        let (pool_name, pool_dir, vol) =
            (self.pool.clone(), self.pool_dir.clone(), row.volume.clone());
        self.lv
            .call(move |conn| {
                let pool = storage::ensure_pool(conn, &pool_name, &pool_dir)?;
                storage::delete_volume(&pool, &vol).map(|_| ())
            })
            .await?;
        let n = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::image_delete(c, &n)))
            .await?;
        Ok(())
    }
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
