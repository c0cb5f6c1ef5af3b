//! The persistent bitmap store: one file per disk in a directory, committed atomically, verified
//! on every load, locked against a second writer.
//!
//! The safety rule lives here as much as anywhere: [`Store::load`] never returns a bitmap as
//! `consistent` unless its header hash, every chunk hash and the root verify and the file was not
//! left `recording` by a process that died.

pub mod format;
pub mod retired;
pub mod storage;

pub use format::{FormatError, Meta};
pub use storage::{FsStorage, Storage};

use rustix::fs::{FlockOperation, flock};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use wire::{Bitmap, DiskId, State};

/// Store errors: local I/O, misuse, or a store another process holds.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the store failed.
    #[error("store I/O on {path}")]
    Io {
        /// File or directory involved.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process (an agent, or another command) holds the store.
    #[error(
        "store {0} is locked by another process (a running agent? use --control SOCKET to go through it)"
    )]
    Locked(PathBuf),
    /// The store directory does not exist.
    #[error("store directory {0} does not exist (pass --store DIR, or create a bitmap first)")]
    Missing(PathBuf),
    /// No bitmap for that disk.
    #[error("no bitmap for disk {0:?} in this store")]
    NotFound(DiskId),
    /// A bitmap for that disk already exists.
    #[error("a bitmap for disk {0:?} already exists")]
    Exists(DiskId),
    /// The stored file is not trustworthy; carries the reason.
    #[error("bitmap for disk {disk:?} cannot be trusted: {reason}")]
    Untrusted {
        /// The disk.
        disk: DiskId,
        /// Why.
        reason: String,
    },
}

impl StoreError {
    /// The message followed by its causes, for logs (`%e` shows only the first line of the
    /// chain): "store I/O on DIR: Too many open files (os error 24)".
    pub fn detailed(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }
}

/// A bitmap as found in the store, with its effective state.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The metadata, when the header verified. `meta.state` is the *effective* state.
    pub meta: Option<Meta>,
    /// The bits, when every chunk and the root verified.
    pub bitmap: Option<Bitmap>,
    /// Why the effective state is not what the file says, or why it is not `consistent`.
    pub reason: Option<String>,
}

impl Loaded {
    /// The effective state: `inconsistent` whenever anything failed to verify.
    pub fn state(&self) -> State {
        match (&self.meta, &self.bitmap) {
            (Some(m), Some(_)) => m.state,
            _ => State::Inconsistent,
        }
    }

    /// The verified entry, or the reason it is not usable.
    pub fn into_entry(self, disk: &DiskId) -> Result<(Meta, Bitmap), StoreError> {
        match (self.meta, self.bitmap) {
            (Some(m), Some(b)) => Ok((m, b)),
            _ => Err(StoreError::Untrusted {
                disk: disk.clone(),
                reason: self.reason.unwrap_or_else(|| "unreadable".into()),
            }),
        }
    }
}

/// Whether this handle may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Shared lock: many readers, no writer.
    ReadOnly,
    /// Exclusive lock.
    ReadWrite,
}

/// File suffix of stored bitmaps.
pub const SUFFIX: &str = ".bfb";

/// A store handle.
pub struct Store {
    storage: Box<dyn Storage>,
    /// Held for the handle's lifetime; the flock dies with the process.
    _lock: Option<File>,
    access: Access,
    label: String,
}

impl Store {
    /// Open the store in `dir` (created for `ReadWrite` if missing), taking the lock without
    /// waiting.
    pub fn open(dir: &Path, access: Access) -> Result<Store, StoreError> {
        let io_err = |source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        };
        if access == Access::ReadWrite {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        } else if !dir.is_dir() {
            return Err(StoreError::Missing(dir.to_path_buf()));
        }
        let lock_path = dir.join(".lock");
        let lock = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(access == Access::ReadWrite)
            .truncate(false)
            .open(&lock_path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A store nobody ever wrote: read-only access sees it as empty, with no lock.
                if dir.is_dir() {
                    return Ok(Store::with_storage(
                        Box::new(FsStorage::new(dir)),
                        access,
                        dir,
                    ));
                }
                return Err(io_err(e));
            }
            Err(e) => return Err(io_err(e)),
        };
        let op = match access {
            Access::ReadOnly => FlockOperation::NonBlockingLockShared,
            Access::ReadWrite => FlockOperation::NonBlockingLockExclusive,
        };
        flock(&lock, op).map_err(|_| StoreError::Locked(dir.to_path_buf()))?;
        let mut storage = FsStorage::new(dir);
        if access == Access::ReadWrite {
            // We hold the exclusive lock, so temp files are leftovers of a killed writer.
            storage.remove_leftovers().map_err(io_err)?;
        }
        let mut s = Store::with_storage(Box::new(storage), access, dir);
        s._lock = Some(lock);
        Ok(s)
    }

    /// A store over any [`Storage`] (the simulator's seam). Locking is the caller's business.
    pub fn with_storage(storage: Box<dyn Storage>, access: Access, label: &Path) -> Store {
        Store {
            storage,
            _lock: None,
            access,
            label: label.display().to_string(),
        }
    }

    fn io(&self, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.label.clone(),
            source,
        }
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.access == Access::ReadWrite {
            Ok(())
        } else {
            Err(self.io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "store opened read-only",
            )))
        }
    }

    /// Disks with a file in the store (whether or not their file verifies).
    pub fn list(&self) -> Result<Vec<DiskId>, StoreError> {
        let names = self.storage.list().map_err(|e| self.io(e))?;
        Ok(names
            .iter()
            .filter_map(|n| n.strip_suffix(SUFFIX))
            .filter_map(unescape)
            .filter_map(|s| DiskId::new(s).ok())
            .collect())
    }

    /// Whether a file exists for `disk`.
    pub fn contains(&self, disk: &DiskId) -> Result<bool, StoreError> {
        Ok(self
            .storage
            .read(&file_name(disk))
            .map_err(|e| self.io(e))?
            .is_some())
    }

    fn read(&self, disk: &DiskId) -> Result<Vec<u8>, StoreError> {
        self.storage
            .read(&file_name(disk))
            .map_err(|e| self.io(e))?
            .ok_or_else(|| StoreError::NotFound(disk.clone()))
    }

    /// Load and verify `disk`'s bitmap. Corruption is not an error here: it comes back as
    /// [`Loaded`] with state `inconsistent` and the reason. A file left `recording` loads as
    /// `inconsistent`, because its recorder died before closing it.
    pub fn load(&self, disk: &DiskId) -> Result<Loaded, StoreError> {
        let bytes = self.read(disk)?;
        Ok(match format::decode(&bytes) {
            Ok((mut meta, bitmap)) => {
                if meta.disk != *disk {
                    return Ok(Loaded {
                        meta: None,
                        bitmap: None,
                        reason: Some(format!("file holds disk {:?}, not {:?}", meta.disk, disk)),
                    });
                }
                let mut reason = meta.reason.clone();
                if meta.state == State::Recording {
                    meta.state = State::Inconsistent;
                    reason = Some(
                        "was being recorded by a process that stopped without closing it".into(),
                    );
                    meta.reason = reason.clone();
                }
                Loaded {
                    meta: Some(meta),
                    bitmap: Some(bitmap),
                    reason,
                }
            }
            Err(e) => {
                let meta = format::decode_meta(&bytes).ok().map(|mut m| {
                    m.state = State::Inconsistent;
                    m.reason = Some(e.to_string());
                    m
                });
                Loaded {
                    meta,
                    bitmap: None,
                    reason: Some(e.to_string()),
                }
            }
        })
    }

    /// Load `disk` as the process that wrote it: like [`Store::load`], but a `recording` state is
    /// kept as is. Only the live recorder holding the store lock may use this (the agent checking
    /// its own flushed file); anyone else must use [`Store::load`].
    pub fn load_own(&self, disk: &DiskId) -> Result<Loaded, StoreError> {
        let bytes = self.read(disk)?;
        Ok(match format::decode(&bytes) {
            Ok((meta, bitmap)) => Loaded {
                reason: meta.reason.clone(),
                meta: Some(meta),
                bitmap: Some(bitmap),
            },
            Err(e) => Loaded {
                meta: None,
                bitmap: None,
                reason: Some(e.to_string()),
            },
        })
    }

    /// Create a new bitmap; refuses to replace an existing one.
    pub fn create(&mut self, meta: &Meta, bitmap: &mut Bitmap) -> Result<(), StoreError> {
        if self.contains(&meta.disk)? {
            return Err(StoreError::Exists(meta.disk.clone()));
        }
        self.write(meta, bitmap)
    }

    /// Durably replace `meta.disk`'s bitmap, bumping the generation. Once this returns, a crash
    /// cannot lose what was written.
    pub fn commit(&mut self, meta: &mut Meta, bitmap: &mut Bitmap) -> Result<(), StoreError> {
        meta.generation += 1;
        self.write(meta, bitmap)
    }

    fn write(&mut self, meta: &Meta, bitmap: &mut Bitmap) -> Result<(), StoreError> {
        self.check_writable()?;
        debug_assert_eq!(meta.geometry, bitmap.geometry());
        let bytes = format::encode(meta, bitmap);
        self.storage
            .write_atomic(&file_name(&meta.disk), &bytes)
            .map_err(|e| self.io(e))
    }

    /// Remove `disk`'s bitmap (e.g. the source retiring its copy after a migration).
    pub fn remove(&mut self, disk: &DiskId) -> Result<(), StoreError> {
        self.check_writable()?;
        self.storage
            .remove(&file_name(disk))
            .map_err(|e| self.io(e))
    }
}

/// File name for a disk id: `[A-Za-z0-9_-]` and non-leading `.` kept, every other byte `%XX`.
pub fn file_name(disk: &DiskId) -> String {
    let mut s = String::new();
    for (i, b) in disk.as_str().bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s + SUFFIX
}

fn unescape(s: &str) -> Option<String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detailed_errors_name_the_os_error() {
        let e = StoreError::Io {
            path: "/s".into(),
            source: io::Error::from_raw_os_error(24),
        };
        assert_eq!(e.to_string(), "store I/O on /s");
        assert!(
            e.detailed()
                .starts_with("store I/O on /s: Too many open files"),
            "{}",
            e.detailed()
        );
        assert_eq!(
            StoreError::NotFound(DiskId::new("a").unwrap()).detailed(),
            StoreError::NotFound(DiskId::new("a").unwrap()).to_string()
        );
    }
    use wire::Geometry;

    #[test]
    fn names_round_trip() {
        for id in ["vm42/vda", ".hidden", "a b%c", "ünï"] {
            let d = DiskId::new(id).unwrap();
            let n = file_name(&d);
            assert!(!n.starts_with('.') && !n.contains('/'));
            assert_eq!(unescape(n.strip_suffix(SUFFIX).unwrap()).unwrap(), id);
        }
    }

    #[test]
    fn commit_load_and_recording_crash() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), Access::ReadWrite).unwrap();
        let disk = DiskId::new("vm1/vda").unwrap();
        let mut meta = Meta {
            disk: disk.clone(),
            geometry: Geometry::new(10 << 30, 4096).unwrap(),
            checkpoint: None,
            epoch: 1,
            state: State::Consistent,
            reason: None,
            generation: 0,
        };
        let mut b = Bitmap::new(meta.geometry);
        b.mark(12345, 100000).unwrap();
        s.create(&meta, &mut b).unwrap();
        assert!(matches!(
            s.create(&meta, &mut b),
            Err(StoreError::Exists(_))
        ));
        let l = s.load(&disk).unwrap();
        assert_eq!(l.state(), State::Consistent);
        assert_eq!(l.bitmap.as_ref().unwrap(), &b);
        meta.state = State::Recording;
        s.commit(&mut meta, &mut b).unwrap();
        let l = s.load(&disk).unwrap();
        assert_eq!(l.state(), State::Inconsistent);
        assert!(l.reason.unwrap().contains("recorded"));
        assert_eq!(s.list().unwrap(), vec![disk]);
        // A second writer is refused while the first holds the lock.
        assert!(matches!(
            Store::open(dir.path(), Access::ReadWrite),
            Err(StoreError::Locked(_))
        ));
        assert!(matches!(
            Store::open(dir.path(), Access::ReadOnly),
            Err(StoreError::Locked(_))
        ));
    }
}
