//! Base images: downloaded (in the background, checksum verified; `download.rs` is the
//! HTTP client) or uploaded, always into a temporary `partial.*` volume first. Only a
//! complete, verified file becomes the volume `image.<name>`: libvirt cannot rename a
//! volume, so the hypervisor copies the partial one and the partial one is deleted. An
//! interrupted transfer therefore never leaves an image behind, and at startup any
//! leftover partial volume is removed and its row marked failed (`leftovers.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::driver::{Call, Driver, Hypervisor, SourceStopped, volumes};
use super::{Conflict, Internal, Invalid, NotFound, TooLarge, VmError};
use crate::model::ImageState;
use crate::store::Store;
use crate::store::vms::{self, ImageRow};

mod download;
mod leftovers;

pub use download::MAX_URL_LEN;
#[cfg(test)]
pub use download::plain_url;

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
    driver: Driver,
    store: Store,
    downloader: download::Downloader,
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

/// 64 hex digits in either case, as written: nothing around them
/// (`api::doc::SHA256_PATTERN`).
fn check_sha256(s: &str) -> Result<String, VmError> {
    let s = s.to_ascii_lowercase();
    if s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Invalid::Sha256Format.into());
    }
    Ok(s)
}

impl Images {
    pub fn new(driver: Driver, store: Store, max_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            driver,
            store,
            downloader: download::Downloader::new(),
            progress: Mutex::new(HashMap::new()),
            max_bytes,
        })
    }

    fn progress(&self) -> MutexGuard<'_, HashMap<String, Progress>> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn list(&self) -> Result<Vec<ImageInfo>, VmError> {
        let (rows, vms) = self
            .store
            .run(|s| {
                s.with(|c| Ok::<_, crate::store::StoreError>((vms::images(c)?, vms::list(c)?)))
            })
            .await?;
        let progress = self.progress().clone();
        Ok(rows
            .into_iter()
            .map(|row| {
                let p = progress
                    .get(&row.name)
                    .copied()
                    .filter(|_| row.state == ImageState::Downloading);
                let used_by = vms
                    .iter()
                    .filter(|v| v.image.as_deref() == Some(row.name.as_str()))
                    .map(|v| v.name.to_string())
                    .collect();
                ImageInfo {
                    received_bytes: p.map(|p| p.received),
                    total_bytes: p.and_then(|p| p.total),
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
                    match vms::image(tx, &n)?.map(|r| r.state) {
                        Some(ImageState::Ready) => return Err(Conflict::ImageExists(n).into()),
                        Some(ImageState::Downloading) => {
                            return Err(Conflict::ImageInTransfer(n).into());
                        }
                        _ => {}
                    }
                    vms::image_begin(tx, &n, &src, sha.as_deref(), &volumes::image(&n), &by)?;
                    Ok::<_, VmError>(())
                })
            })
            .await?;
        self.progress()
            .insert(name.to_string(), Progress::default());
        Ok(())
    }

    async fn finish(&self, name: &str, result: &Result<Stored, VmError>) {
        self.progress().remove(name);
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
        download::check_url(url)?;
        let sha = sha256.map(check_sha256).transpose()?;
        self.begin(name, url, sha.as_deref(), by).await?;
        let this = Arc::clone(self);
        let (name, url) = (name.to_string(), url.to_string());
        tokio::spawn(async move {
            let result = match this.downloader.get(&url).await {
                Ok((total, body)) => this.ingest(&name, body, total, sha.as_deref()).await,
                Err(e) => Err(e),
            };
            this.finish(&name, &result).await;
        });
        Ok(())
    }

    /// `POST /images/{name}`: stores the request body as the image (in the request).
    pub async fn upload<S, E>(
        &self,
        name: &str,
        body: S,
        total: Option<u64>,
        sha256: Option<&str>,
        by: &str,
    ) -> Result<ImageRow, VmError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
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
            .ok_or_else(|| NotFound::ImageVanished(name.to_owned()).into())
    }

    /// Streams `body` into a partial volume, checks it, and turns it into the image.
    async fn ingest<S, E>(
        &self,
        name: &str,
        body: S,
        total: Option<u64>,
        sha256: Option<&str>,
    ) -> Result<Stored, VmError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if total.is_some_and(|t| t > self.max_bytes) {
            return Err(VmError::TooLarge(TooLarge {
                max_bytes: self.max_bytes,
            }));
        }
        let (tx, rx) = mpsc::channel::<Result<Bytes, SourceStopped>>(16);
        let target = Target {
            image: name.to_string(),
            partial: volumes::partial(name),
            expected: sha256.map(str::to_string),
        };
        let writer = self
            .driver
            .work(move |hv, call| store_image(hv, call, &target, rx));
        let feeder = self.feed(name, body, total, tx);
        let (fed, stored) = tokio::join!(feeder, writer);
        // A feed that stopped knows why; the writer only saw its end.
        fed?;
        stored
    }

    /// Sends `body`'s chunks to the writer, counting them (progress, the size bound, the
    /// announced length); returns why it stopped early, if it did.
    async fn feed<S, E>(
        &self,
        name: &str,
        mut body: S,
        total: Option<u64>,
        tx: mpsc::Sender<Result<Bytes, SourceStopped>>,
    ) -> Result<(), VmError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut received = 0u64;
        let mut told: Option<std::time::Instant> = None;
        let stop = |tx: mpsc::Sender<_>, why: VmError| async move {
            let _ = tx.send(Err(SourceStopped)).await;
            Err(why)
        };
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => return stop(tx, Invalid::Transfer(e.into()).into()).await,
            };
            received += chunk.len() as u64;
            self.progress()
                .insert(name.to_owned(), Progress { received, total });
            if told.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                told = Some(std::time::Instant::now());
                crate::events::publish(
                    crate::events::Kind::ImageProgress,
                    name,
                    serde_json::json!({ "received_bytes": received, "total_bytes": total }),
                );
            }
            if received > self.max_bytes {
                let too_large = VmError::TooLarge(TooLarge {
                    max_bytes: self.max_bytes,
                });
                return stop(tx, too_large).await;
            }
            if tx.send(Ok(chunk)).await.is_err() {
                // The writer stopped: its error says why.
                return Ok(());
            }
        }
        match total {
            Some(t) if received != t => {
                stop(tx, Invalid::Truncated { received, total: t }.into()).await
            }
            _ => Ok(()),
        }
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
        let row = row.ok_or_else(|| NotFound::ImageRow(name.to_owned()))?;
        if row.state == ImageState::Downloading {
            return Err(Conflict::ImageInTransfer(name.to_owned()).into());
        }
        if !users.is_empty() {
            return Err(Conflict::ImageInUse {
                name: name.to_owned(),
                users,
            }
            .into());
        }
        let vol = row.volume.clone();
        self.driver
            .ask(move |hv, call| hv.delete_volume(call, &vol))
            .await?;
        let n = name.to_string();
        self.store
            .run(move |s| s.with(|c| vms::image_delete(c, &n)))
            .await?;
        Ok(())
    }
}

/// Where a transfer goes, and the checksum it must have.
struct Target {
    image: String,
    partial: String,
    expected: Option<String>,
}

/// The writer of a transfer: the chunks into the partial volume (hashed on the way), the
/// checks, the copy into the image's volume; the partial volume is deleted in every
/// case. Blocking.
fn store_image(
    hv: &dyn Hypervisor,
    call: &Call,
    t: &Target,
    mut rx: mpsc::Receiver<Result<Bytes, SourceStopped>>,
) -> Result<Stored, VmError> {
    let mut hasher = Sha256::new();
    let mut head: Vec<u8> = Vec::with_capacity(8);
    let mut chunks = std::iter::from_fn(|| rx.blocking_recv()).inspect(|c| {
        if let Ok(c) = c {
            hasher.update(c);
            if head.len() < 4 {
                head.extend_from_slice(&c[..c.len().min(4 - head.len())]);
            }
        }
    });
    let uploaded = hv.upload_volume(call, &t.partial, &mut chunks);
    drop(chunks);
    let stored = uploaded
        .map_err(VmError::from)
        .and_then(|size| keep_image(hv, call, t, size, hex::encode(hasher.finalize()), &head));
    let _ = hv.delete_volume(call, &t.partial);
    stored
}

/// Checks a complete transfer (its checksum, that it is not empty) and copies it into the
/// image's volume in the format its first bytes say. Blocking.
fn keep_image(
    hv: &dyn Hypervisor,
    call: &Call,
    t: &Target,
    size: u64,
    sha: String,
    head: &[u8],
) -> Result<Stored, VmError> {
    if let Some(want) = &t.expected
        && want != &sha
    {
        return Err(Invalid::Sha256Mismatch {
            expected: want.clone(),
            got: sha,
        }
        .into());
    }
    if size == 0 {
        return Err(Invalid::EmptyImage.into());
    }
    let format: &'static str = if head.starts_with(b"QFI\xfb") {
        "qcow2"
    } else {
        "raw"
    };
    let capacity = hv
        .volume(call, &t.partial)?
        .ok_or_else(|| Internal::PartialVanished(t.image.clone()))?
        .max(size);
    hv.copy_volume(
        call,
        &t.partial,
        &volumes::image(&t.image),
        capacity,
        format,
    )?;
    Ok(Stored {
        sha256: sha,
        format,
        size,
    })
}
