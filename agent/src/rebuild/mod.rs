//! Rebuilding a lost bitmap by comparing the live disk with a reference (bitmap-diff).
//!
//! The reference is either a raw backup image or a [`manifest::Manifest`] (one BLAKE3 hash per
//! block, written at backup time) so only the live disk has to be read. [`scan`] is the fast
//! comparison engine (large sequential reads overlapped with hashing on all cores, holes compared
//! as zero blocks without reading them); [`job::RebuildJob`] wraps it as a resumable background
//! job with progress, rate limit, cancel and a persisted state file.
//!
//! Safety: a scan reads each block once, at some moment. A write that lands after that moment is
//! not seen by the scan, so every rebuild must be paired with marks recorded from *before* the
//! scan starts and merged into the result at the end (see [`job::RebuildJob::marks`] and
//! docs/rebuild.md).

pub mod bench;
pub mod holes;
pub mod job;
pub mod manifest;
pub mod scan;
pub mod state;
#[cfg(test)]
mod tests;

use crate::store::Meta;
use std::io;
use std::path::Path;

/// Why a rebuild or a manifest operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// A manifest that does not check out.
    #[error("manifest {path} refused: {reason}")]
    BadManifest {
        /// The manifest file.
        path: String,
        /// What does not check out.
        reason: String,
    },
    /// The reference cannot be used with these parameters.
    #[error("reference refused: {0}")]
    BadReference(String),
    /// A manifest made from the very image a rebuild is asked to scan: its entries describe
    /// that image when the manifest was made, not the backup.
    #[error(
        "manifest {manifest} was made from {made_from}, which is the live image {live} itself \
         (device {dev}, inode {ino}), not a backup: comparing with it would find only the writes \
         since the manifest was made and miss the rest. Make the manifest from the backup image \
         (`bitferry manifest create --image BACKUP --out FILE`), or compare with the backup \
         directly (`--backup BACKUP`)"
    )]
    SameImage {
        /// The manifest file.
        manifest: String,
        /// The live image as given.
        live: String,
        /// The path the manifest recorded.
        made_from: String,
        /// Device of both.
        dev: u64,
        /// Inode of both.
        ino: u64,
    },
    /// An output file exists and replacing it was not asked for.
    #[error("{0} already exists; pass --force to replace it")]
    OutputExists(String),
    /// The disk geometry is not representable.
    #[error(transparent)]
    Geometry(#[from] wire::GeometryError),
    /// The job was cancelled; its state (if any) was persisted for a later resume.
    #[error("rebuild cancelled at byte {cursor}")]
    Cancelled {
        /// How far the scan got.
        cursor: u64,
    },
    /// A scan worker died.
    #[error("rebuild worker failed: {0}")]
    Worker(String),
}

impl RebuildError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: io::Error) -> Self {
        RebuildError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Size of a regular file or a block device (whose metadata length is 0), by seeking to its end.
pub fn file_size(f: &std::fs::File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = f.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = f;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// The stored entry a rebuild starts from: `rebuilding` (durably an owner before the VM may
/// write), keeping the checkpoint, epoch and generation of the entry it replaces, if any.
pub fn rebuilding_meta(
    disk: wire::DiskId,
    geometry: wire::Geometry,
    prior: Option<&Meta>,
    reason: String,
) -> Meta {
    Meta {
        disk,
        geometry,
        checkpoint: prior.and_then(|m| m.checkpoint.clone()),
        epoch: prior.map_or(1, |m| m.epoch),
        state: wire::State::Rebuilding,
        reason: Some(reason),
        generation: prior.map_or(0, |m| m.generation),
    }
}
