//! The persisted state of a rebuild job: what it is comparing, how far it got, and the partial
//! result, so a restarted job resumes instead of starting over.
//!
//! ```text
//! | magic "BFRBSTAT" | version u32 LE | body_len u64 LE | body (postcard JobState) | blake3(all before) |
//! ```
//! Written atomically (temp file, fsync, rename, fsync directory). A file that does not decode,
//! fails its checksum, or describes another comparison is ignored: the job then starts over,
//! which is always safe.

use super::RebuildError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"BFRBSTAT";
const VERSION: u32 = 1;
/// Largest state file accepted (checked before reading it whole): a 2 GiB bitmap plus slack.
pub const MAX_STATE: u64 = (2 << 30) + (1 << 20);

/// What a job compares; a state file is only resumed by a job with the same identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Live image path as given.
    pub live: String,
    /// Live image size when the job started.
    pub live_size: u64,
    /// Block size.
    pub granularity: u64,
    /// The reference.
    pub reference: RefIdentity,
}

/// Identity of the reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefIdentity {
    /// A manifest, by its verified root and described size.
    Manifest {
        /// Root over the entries.
        root: [u8; 32],
        /// Described image size.
        size: u64,
    },
    /// A backup image, by path, size and modification time (a changed backup starts over).
    Backup {
        /// Path as given.
        path: String,
        /// Size.
        size: u64,
        /// Modification time, nanoseconds since the epoch.
        mtime_ns: i128,
    },
}

/// A job's persisted progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    /// What is compared.
    pub identity: Identity,
    /// Opaque tag of the caller (the CLI binds the state to the store entry it started).
    pub tag: String,
    /// Blocks before this one are decided.
    pub cursor_block: u64,
    /// Raw bitmap bytes (QEMU layout, live geometry) of the blocks decided dirty so far.
    pub partial: Vec<u8>,
    /// Reference entry hashes already appended to the side file (backup mode with root).
    pub hashes: u64,
}

/// Encode and write `state` to `path` atomically.
pub fn save(path: &Path, state: &JobState) -> Result<(), RebuildError> {
    let body = postcard::to_allocvec(state).expect("JobState serializes");
    let mut bytes = Vec::with_capacity(body.len() + 52);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&body);
    let sum = blake3::hash(&bytes);
    bytes.extend_from_slice(sum.as_bytes());
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let err = |e| RebuildError::io(path, e);
    let mut tmp = tempfile::Builder::new()
        .prefix(".rebuild-state.")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(&bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RebuildError::io(dir, e))
}

/// Why a state file was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Not a state file, or damaged.
    #[error("state file is damaged: {0}")]
    Damaged(&'static str),
}

/// Decode a state file's bytes. Never panics, never allocates from an unchecked length.
pub fn decode(bytes: &[u8]) -> Result<JobState, StateError> {
    if bytes.len() < 20 + 32 || &bytes[..8] != MAGIC {
        return Err(StateError::Damaged("bad magic or too short"));
    }
    if bytes[8..12] != VERSION.to_le_bytes() {
        return Err(StateError::Damaged("unknown version"));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&bytes[12..20]);
    let body_len = u64::from_le_bytes(l);
    if body_len != (bytes.len() - 20 - 32) as u64 {
        return Err(StateError::Damaged("length does not match"));
    }
    let (head, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(head).as_bytes() != sum {
        return Err(StateError::Damaged("checksum mismatch"));
    }
    let (state, rest) = postcard::take_from_bytes::<JobState>(&head[20..])
        .map_err(|_| StateError::Damaged("body does not decode"))?;
    if !rest.is_empty() {
        return Err(StateError::Damaged("trailing bytes"));
    }
    Ok(state)
}

/// Load `path`: `Ok(None)` when absent or unusable (the reason is logged), never an error for a
/// damaged file, since starting over is always safe.
pub fn load(path: &Path) -> Result<Option<JobState>, RebuildError> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RebuildError::io(path, e)),
    };
    if len > MAX_STATE {
        tracing::warn!(path = %path.display(), len, "rebuild state file too large; starting over");
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| RebuildError::io(path, e))?;
    match decode(&bytes) {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring rebuild state; starting over");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let s = JobState {
            identity: Identity {
                live: "/dev/x".into(),
                live_size: 1 << 30,
                granularity: 65536,
                reference: RefIdentity::Manifest {
                    root: [7; 32],
                    size: 1 << 30,
                },
            },
            tag: "t".into(),
            cursor_block: 42,
            partial: vec![1, 2, 3],
            hashes: 0,
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("st");
        save(&p, &s).unwrap();
        assert_eq!(load(&p).unwrap(), Some(s));
        let good = std::fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert!(decode(&b).is_err(), "flip at {i} accepted");
        }
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_err());
        }
        assert_eq!(load(&dir.path().join("missing")).unwrap(), None);
    }
}
