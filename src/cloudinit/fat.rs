//! The seed's FAT12 image, formatted and filled in memory with `fatfs` (no `mkfs`, no
//! `cloud-localds`): the smallest size that holds the files, labelled CIDATA.

use std::io::{Cursor, Read, Seek, SeekFrom, Write};

/// Why no seed image could be made.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// More content than a FAT12 seed of [`MAX_IMAGE_BYTES`] holds.
    #[error(
        "cannot build the cloud-init seed: the seed's files are {content} bytes; at most {max} fit"
    )]
    TooLarge { content: u64, max: u64 },
    /// fatfs could not format or fill an image of the largest size.
    #[error(
        "cannot build the cloud-init seed: FAT image of {size} bytes for {content} bytes of content: {source}"
    )]
    Fat {
        size: u64,
        content: u64,
        #[source]
        source: std::io::Error,
    },
}

/// The volume label cloud-init's NoCloud datasource looks for (11 bytes, space padded).
pub const VOLUME_LABEL: [u8; 11] = *b"CIDATA     ";

/// The smallest image: 32 KiB. fatfs refuses to format FAT12 below 21 KiB ("unfortunate
/// disk size": the boot sector, two FATs and the 512-entry root directory take 17.5 KiB);
/// 32 KiB, the next power of two, leaves 29 clusters of 512 bytes (one per small file),
/// plenty for a typical seed, and checks clean with `fsck.fat`. Larger content doubles the
/// size until it fits.
pub const MIN_IMAGE_BYTES: u64 = 32 * 1024;

/// The largest image: FAT12 with fatfs's cluster size for 64 MiB (32 KiB) has ~2000
/// clusters; at 128 MiB it would exceed FAT12's 4084. Content that large is not a seed.
pub const MAX_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

/// Formats the smallest FAT12 image (from [`MIN_IMAGE_BYTES`], doubling) that holds
/// `files` in its root directory.
pub(super) fn image(files: &[(&str, &[u8])], volume_id: u32) -> Result<Vec<u8>, SeedError> {
    let content: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    if content > MAX_IMAGE_BYTES / 2 {
        return Err(SeedError::TooLarge {
            content,
            max: MAX_IMAGE_BYTES / 2,
        });
    }
    // A failed try costs one allocation and a few writes; even the largest accepted
    // content needs at most 11 doublings.
    let mut size = MIN_IMAGE_BYTES;
    loop {
        match image_of_size(size, files, volume_id) {
            Ok(image) => return Ok(image),
            Err(source) if size >= MAX_IMAGE_BYTES => {
                return Err(SeedError::Fat {
                    size,
                    content,
                    source,
                });
            }
            // Out of space (or an unlucky geometry): the next size up.
            Err(_) => size *= 2,
        }
    }
}

fn image_of_size(size: u64, files: &[(&str, &[u8])], volume_id: u32) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(size).map_err(std::io::Error::other)?;
    let mut disk = Cursor::new(vec![0u8; len]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat12)
            .volume_label(VOLUME_LABEL)
            .volume_id(volume_id),
    )?;
    disk.seek(SeekFrom::Start(0))?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            for (name, data) in files {
                let mut file = root.create_file(name)?;
                file.truncate()?;
                file.write_all(data)?;
                file.flush()?;
                // Read back the length: fatfs reports "no space" as a short write only
                // in some paths, so check that everything landed.
                file.seek(SeekFrom::Start(0))?;
                let mut back = Vec::with_capacity(data.len());
                file.read_to_end(&mut back)?;
                if back.as_slice() != *data {
                    return Err(std::io::Error::other(format!("{name} did not fit")));
                }
            }
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}
