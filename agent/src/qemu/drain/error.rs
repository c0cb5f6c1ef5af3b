//! What a drain can fail with, by whose fault (QEMU refused, QEMU misbehaved, QEMU is gone,
//! local I/O, the caller's sink, misuse), and what became of the bits it was draining.

use crate::qcow2::ReadError;
use crate::qemu::nbd::NbdError;
use crate::qemu::qmp::QmpError;
use std::path::PathBuf;

/// What a sink may fail with: anything, as long as it did not make the bits durable.
pub type SinkError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything attaching or draining can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The QMP connection is gone (QEMU exited or was killed, or the monitor closed). Every
    /// non-persistent bitmap of that QEMU, bitferry's included, is gone with it.
    #[error("QEMU is gone during {during}: {source}")]
    QemuGone {
        /// The step (`swap`, `carrier merge`, ...).
        during: &'static str,
        /// The client's error.
        #[source]
        source: QmpError,
    },
    /// QEMU answered a command with an error (or did not answer in time).
    #[error("QEMU refused {during}: {source}")]
    QemuRefused {
        /// The step.
        during: &'static str,
        /// The client's error.
        #[source]
        source: QmpError,
    },
    /// QEMU answered, but not in the shape its schema documents (a missing node, a bitmap
    /// that is not where it was just added, a reply member of the wrong type).
    #[error("QEMU misbehaved during {during}: {detail}")]
    QemuMisbehaved {
        /// The step.
        during: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// bitferry's tracking bitmap is no longer on the node (someone removed it, or the node
    /// was replaced): writes since the last drain may be lost.
    #[error("tracking bitmap {name:?} is gone from node {node:?}")]
    BitmapGone {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
    /// The bits read do not hash to what `x-debug-block-dirty-bitmap-sha256` says QEMU holds.
    #[error(
        "bitmap {name:?} read over the {route} route hashes to {ours}, QEMU says {qemu}: \
         the read is wrong, the bits were not handed on"
    )]
    ShaMismatch {
        /// The drained bitmap.
        name: String,
        /// The route it was read over.
        route: &'static str,
        /// SHA-256 (hex) of the bits read, rendered as QEMU hashes them.
        ours: String,
        /// QEMU's answer.
        qemu: String,
    },
    /// The NBD read failed.
    #[error("reading bitmap {name:?} over NBD: {source}")]
    Nbd {
        /// The drained bitmap.
        name: String,
        /// The client's error.
        #[source]
        source: NbdError,
    },
    /// A local file operation failed (the carrier image).
    #[error("{during} {path}: {source}")]
    Io {
        /// The step.
        during: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The carrier QEMU wrote could not be read back as a trustworthy bitmap.
    #[error("reading carrier {path}: {source}")]
    Carrier {
        /// The carrier file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: ReadError,
    },
    /// The caller's sink failed: the bits are not durable.
    #[error("the sink did not make the bits durable: {0}")]
    Sink(#[source] SinkError),
    /// The caller asked for something impossible (an unknown node, a bad prefix or
    /// granularity, a route QEMU cannot serve).
    #[error("{0}")]
    Misuse(String),
}

impl DrainError {
    /// Classify a QMP failure of `during`: gone or refused.
    pub fn qmp(during: &'static str, source: QmpError) -> DrainError {
        if source.is_disconnect() {
            DrainError::QemuGone { during, source }
        } else {
            DrainError::QemuRefused { during, source }
        }
    }

    /// True if QEMU is gone (tracking of this node has ended; writes since the last drain
    /// may be lost).
    pub fn is_qemu_gone(&self) -> bool {
        match self {
            DrainError::QemuGone { .. } => true,
            DrainError::Nbd { source, .. } => matches!(
                source,
                NbdError::Disconnected { .. } | NbdError::Connect { .. }
            ),
            _ => false,
        }
    }
}

/// What became of the drained bitmap's bits when a drain failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitsFate {
    /// Nothing was swapped: the live bitmap still holds every bit, and keeps recording.
    Untouched,
    /// The old bitmap was merged back into the live one and removed: the next drain has them.
    MergedBack,
    /// Merging back failed while QEMU still runs: the old bitmap (disabled, holding the bits)
    /// stays in QEMU under this name; the next drain merges it first.
    KeptInQemu(String),
    /// The sink made them durable, but QEMU went away before the old bitmap was removed.
    Committed,
    /// QEMU is gone and the bits with it: the disk is not trustworthy any more.
    Lost,
}

impl std::fmt::Display for BitsFate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BitsFate::Untouched => f.write_str("nothing was swapped, the live bitmap has them"),
            BitsFate::MergedBack => f.write_str("merged back into the live bitmap"),
            BitsFate::KeptInQemu(n) => write!(f, "kept in QEMU as {n:?} for the next drain"),
            BitsFate::Committed => f.write_str("committed by the sink"),
            BitsFate::Lost => f.write_str("lost with QEMU"),
        }
    }
}

/// A failed drain: why, and where the bits are now.
#[derive(Debug, thiserror::Error)]
#[error("drain failed: {error} (bits: {bits})")]
pub struct DrainFailed {
    /// What went wrong first.
    #[source]
    pub error: DrainError,
    /// Where the bits are.
    pub bits: BitsFate,
    /// If merging back failed too, why.
    pub merge_back_error: Option<Box<DrainError>>,
}
