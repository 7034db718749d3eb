//! The agent's storage pool and its volumes, through libvirt only: no path has to be
//! valid in the agent's own filesystem, so the same code serves a local socket, a socket
//! mounted into a container, or a remote URI.
//!
//! Volume names (names are `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`, so a fixed prefix and
//! suffix make each kind unambiguous):
//!
//! | volume | what |
//! |---|---|
//! | `image.<name>` | a base image, complete and verified |
//! | `partial.<name>.<id>` | an image being downloaded or uploaded |
//! | `vm.<name>.disk.qcow2` | a VM's disk, backed by its image |
//! | `vm.<name>.seed.img` | a VM's cloud-init seed (FAT, label CIDATA) |
//! | `vm.<name>.console.log` | a VM's serial console, appended across boots |

use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::{VmError, xml};

pub fn image_volume(name: &str) -> String {
    format!("image.{name}")
}

pub fn partial_volume(name: &str) -> String {
    format!("partial.{name}.{}", uuid::Uuid::new_v4().simple())
}

pub const PARTIAL_PREFIX: &str = "partial.";

pub fn disk_volume(vm: &str) -> String {
    format!("vm.{vm}.disk.qcow2")
}

pub fn seed_volume(vm: &str) -> String {
    format!("vm.{vm}.seed.img")
}

pub fn console_volume(vm: &str) -> String {
    format!("vm.{vm}.console.log")
}

/// Bytes per GB of `disk_size_gb` (GiB, as `qemu-img resize NG` did in the original).
pub const GIB: u64 = 1 << 30;

/// The pool, defined, built, started and set to autostart when any of that is missing.
pub fn ensure_pool(conn: &Connect, name: &str, dir: &str) -> Result<StoragePool, VmError> {
    let pool = match conn.lookup_storage_pool_by_name(name) {
        Ok(pool) => pool,
        Err(e) => {
            let e = VmError::libvirt(format!("storage pool {name}"), e);
            if !e.is_not_found() {
                return Err(e);
            }
            tracing::info!(pool = name, dir, "defining the agent's storage pool");
            let pool = conn
                .define_storage_pool_xml(&xml::pool(name, dir), 0)
                .map_err(|e| VmError::libvirt(format!("defining storage pool {name}"), e))?;
            pool.build(0).map_err(|e| {
                VmError::libvirt(format!("building storage pool {name} at {dir}"), e)
            })?;
            pool
        }
    };
    if !pool
        .is_active()
        .map_err(|e| VmError::libvirt("storage pool state", e))?
        && pool.create(0).is_err()
    {
        // Its directory may be gone (a wiped disk, a new host dir): build makes it.
        pool.build(0)
            .map_err(|e| VmError::libvirt(format!("building storage pool {name}"), e))?;
        pool.create(0)
            .map_err(|e| VmError::libvirt(format!("starting storage pool {name}"), e))?;
    }
    if !pool.autostart().unwrap_or(true) {
        let _ = pool.set_autostart(true);
    }
    Ok(pool)
}

/// The volume, or `None` when it does not exist.
pub fn find_volume(pool: &StoragePool, name: &str) -> Result<Option<StorageVol>, VmError> {
    match pool.lookup_storage_vol_by_name(name) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let e = VmError::libvirt(format!("volume {name}"), e);
            if e.is_not_found() { Ok(None) } else { Err(e) }
        }
    }
}

/// Deletes the volume if it exists; true when something was deleted.
pub fn delete_volume(pool: &StoragePool, name: &str) -> Result<bool, VmError> {
    match find_volume(pool, name)? {
        Some(v) => {
            v.delete(0)
                .map_err(|e| VmError::libvirt(format!("deleting volume {name}"), e))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

pub fn volume_path(vol: &StorageVol) -> Result<String, VmError> {
    vol.path().map_err(|e| VmError::libvirt("volume path", e))
}

/// A new volume from `xml`.
pub fn create_volume(pool: &StoragePool, name: &str, xml: &str) -> Result<StorageVol, VmError> {
    StorageVol::create_xml(pool, xml, 0)
        .map_err(|e| VmError::libvirt(format!("creating volume {name}"), e))
}

/// Writes `chunks` into `vol` from offset 0 through a libvirt stream (the daemon writes
/// the file; nothing is written by the agent itself). A failing chunk aborts the stream
/// and its error is the upload's.
pub fn upload<I>(conn: &Connect, vol: &StorageVol, chunks: I) -> Result<u64, VmError>
where
    I: IntoIterator<Item = Result<bytes::Bytes, VmError>>,
{
    let stream = Stream::new(conn, 0).map_err(|e| VmError::libvirt("opening a stream", e))?;
    vol.upload(&stream, 0, 0, 0)
        .map_err(|e| VmError::libvirt("starting an upload", e))?;
    let mut total = 0u64;
    for chunk in chunks {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = stream.abort();
                return Err(e);
            }
        };
        let mut rest: &[u8] = &chunk;
        while !rest.is_empty() {
            match stream.send(rest) {
                Ok(n) if n > 0 => rest = &rest[n as usize..],
                Ok(_) => {
                    let _ = stream.abort();
                    return Err(VmError::Internal(
                        "upload stream stopped accepting data".into(),
                    ));
                }
                Err(e) => {
                    let _ = stream.abort();
                    return Err(VmError::libvirt("uploading", e));
                }
            }
        }
        total += chunk.len() as u64;
    }
    stream
        .finish()
        .map_err(|e| VmError::libvirt("finishing an upload", e))?;
    Ok(total)
}

/// The last `max` bytes of a volume (e.g. a console log).
pub fn tail(conn: &Connect, vol: &StorageVol, max: u64) -> Result<Vec<u8>, VmError> {
    let size = vol
        .info()
        .map_err(|e| VmError::libvirt("volume size", e))?
        .capacity;
    if size == 0 {
        return Ok(Vec::new());
    }
    let offset = size.saturating_sub(max);
    let stream = Stream::new(conn, 0).map_err(|e| VmError::libvirt("opening a stream", e))?;
    vol.download(&stream, offset, size - offset, 0)
        .map_err(|e| VmError::libvirt("starting a download", e))?;
    let mut out = Vec::with_capacity((size - offset) as usize);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.recv(&mut buf) {
            Ok(0) => break,
            Ok(n) if n > 0 => out.extend_from_slice(&buf[..n as usize]),
            Ok(_) => break,
            Err(e) => {
                let _ = stream.abort();
                return Err(VmError::libvirt("downloading", e));
            }
        }
    }
    let _ = stream.finish();
    Ok(out)
}
