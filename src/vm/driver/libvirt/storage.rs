//! The agent's storage pool and its volumes, through libvirt only: no path has to be
//! valid in the agent's own filesystem, so the same code serves a local socket, a socket
//! mounted into a container, or a remote URI. The volumes' names are
//! `driver::volumes`.

use bytes::Bytes;
use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::xml;
use crate::vm::driver::error::OrLibvirt;
use crate::vm::driver::{Cause, LibvirtFailure, Op, SourceStopped};

/// The pool, defined, built, started and set to autostart when any of that is missing.
pub fn ensure_pool(conn: &Connect, name: &str, dir: &str) -> Result<StoragePool, LibvirtFailure> {
    let pool = match existing_pool(conn, name)? {
        Some(pool) => pool,
        None => {
            tracing::info!(pool = name, dir, "defining the agent's storage pool");
            let pool = conn
                .define_storage_pool_xml(&xml::pool(name, dir), 0)
                .or_libvirt(|| Op::of("defining storage pool", name))?;
            pool.build(0)
                .or_libvirt(|| Op::of("building storage pool", format_args!("{name} at {dir}")))?;
            pool
        }
    };
    if !pool
        .is_active()
        .or_libvirt(|| Op::new("storage pool state"))?
        && pool.create(0).is_err()
    {
        // Its directory may be gone (a wiped disk, a new host dir): build makes it.
        pool.build(0)
            .or_libvirt(|| Op::of("building storage pool", name))?;
        pool.create(0)
            .or_libvirt(|| Op::of("starting storage pool", name))?;
    }
    if !pool.autostart().unwrap_or(true) {
        let _ = pool.set_autostart(true);
    }
    Ok(pool)
}

/// The pool if it is defined.
pub fn existing_pool(conn: &Connect, name: &str) -> Result<Option<StoragePool>, LibvirtFailure> {
    match conn
        .lookup_storage_pool_by_name(name)
        .or_libvirt(|| Op::of("storage pool", name))
    {
        Ok(pool) => Ok(Some(pool)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The volume, or `None` when it does not exist.
pub fn find_volume(pool: &StoragePool, name: &str) -> Result<Option<StorageVol>, LibvirtFailure> {
    match pool
        .lookup_storage_vol_by_name(name)
        .or_libvirt(|| Op::of("volume", name))
    {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes the volume if it exists; true when something was deleted.
pub fn delete_volume(pool: &StoragePool, name: &str) -> Result<bool, LibvirtFailure> {
    match find_volume(pool, name)? {
        Some(v) => {
            v.delete(0).or_libvirt(|| Op::of("deleting volume", name))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

pub fn volume_path(vol: &StorageVol) -> Result<String, LibvirtFailure> {
    vol.path().or_libvirt(|| Op::new("volume path"))
}

/// The volume's capacity in bytes.
pub fn capacity(vol: &StorageVol) -> Result<u64, LibvirtFailure> {
    Ok(vol.info().or_libvirt(|| Op::new("volume size"))?.capacity)
}

/// A new volume from `xml`.
pub fn create_volume(
    pool: &StoragePool,
    name: &str,
    xml: &str,
) -> Result<StorageVol, LibvirtFailure> {
    StorageVol::create_xml(pool, xml, 0).or_libvirt(|| Op::of("creating volume", name))
}

/// Writes `chunks` into `vol` from offset 0 through a libvirt stream (the daemon writes
/// the file; nothing is written by the agent itself). A chunk that is `Err` aborts the
/// stream.
pub fn upload(
    conn: &Connect,
    vol: &StorageVol,
    chunks: &mut dyn Iterator<Item = Result<Bytes, SourceStopped>>,
) -> Result<u64, LibvirtFailure> {
    let stream = Stream::new(conn, 0).or_libvirt(|| Op::new("opening a stream"))?;
    vol.upload(&stream, 0, 0, 0)
        .or_libvirt(|| Op::new("starting an upload"))?;
    let mut total = 0u64;
    for chunk in chunks {
        let Ok(chunk) = chunk else {
            let _ = stream.abort();
            return Err(LibvirtFailure::failed(
                Op::new("uploading"),
                Cause::SourceStopped,
            ));
        };
        if let Err(e) = send_all(&stream, &chunk) {
            let _ = stream.abort();
            return Err(e);
        }
        total += chunk.len() as u64;
    }
    stream
        .finish()
        .or_libvirt(|| Op::new("finishing an upload"))?;
    Ok(total)
}

fn send_all(stream: &Stream, chunk: &[u8]) -> Result<(), LibvirtFailure> {
    let mut rest = chunk;
    while !rest.is_empty() {
        match stream.send(rest).or_libvirt(|| Op::new("uploading"))? {
            n if n > 0 => rest = &rest[n as usize..],
            _ => {
                return Err(LibvirtFailure::failed(
                    Op::new("uploading"),
                    Cause::StreamStalled,
                ));
            }
        }
    }
    Ok(())
}

/// The last `max` bytes of a volume (e.g. a console log).
pub fn tail(conn: &Connect, vol: &StorageVol, max: u64) -> Result<Vec<u8>, LibvirtFailure> {
    let size = capacity(vol)?;
    if size == 0 {
        return Ok(Vec::new());
    }
    let offset = size.saturating_sub(max);
    let stream = Stream::new(conn, 0).or_libvirt(|| Op::new("opening a stream"))?;
    vol.download(&stream, offset, size - offset, 0)
        .or_libvirt(|| Op::new("starting a download"))?;
    let mut out = Vec::with_capacity((size - offset) as usize);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.recv(&mut buf) {
            Ok(n) if n > 0 => out.extend_from_slice(&buf[..n as usize]),
            Ok(_) => break,
            Err(e) => {
                let _ = stream.abort();
                return Err(LibvirtFailure::libvirt(Op::new("downloading"), e));
            }
        }
    }
    let _ = stream.finish();
    Ok(out)
}
