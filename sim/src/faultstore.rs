//! A [`Storage`] wrapper that can crash its host in the middle of a write: the write lands torn
//! (the caller of `crash` tears it) and the agent never learns it returned, so nothing that
//! should follow the write happens. This is the only honest way to tear a write: tearing a write
//! the agent already acted on would break the durability contract, like `SkipFsync` does.

use crate::storage::SimStorage;
use agent::store::Storage;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// The store's view of a host's disk, with a crash trigger.
#[derive(Debug, Clone)]
pub struct FaultStorage {
    inner: SimStorage,
    armed: Arc<AtomicBool>,
    /// 0: no crash; 1: crashed inside a write (tear it); 2: crashed before a remove.
    tripped: Arc<AtomicU8>,
}

impl FaultStorage {
    /// Wrap `inner`.
    pub fn new(inner: SimStorage) -> Self {
        FaultStorage {
            inner,
            armed: Arc::default(),
            tripped: Arc::default(),
        }
    }

    /// Crash during the next write or remove.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Whether a store operation crashed the host (and clear it): `Some(true)` if the last write
    /// must be torn, `Some(false)` if the crash came before a remove.
    pub fn take_tripped(&self) -> Option<bool> {
        match self.tripped.swap(0, Ordering::SeqCst) {
            0 => None,
            1 => Some(true),
            _ => Some(false),
        }
    }

    /// Forget an armed crash (the host crashed some other way).
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
        self.tripped.store(0, Ordering::SeqCst);
    }
}

fn crashed() -> io::Error {
    io::Error::other("simulated host crash during the write")
}

impl Storage for FaultStorage {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.inner.read(name)
    }

    fn write_atomic(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        if self.armed.swap(false, Ordering::SeqCst) {
            // The bytes start landing; the crash (SimStorage::crash with tear) decides how many.
            self.inner.write_atomic(name, data)?;
            self.tripped.store(1, Ordering::SeqCst);
            return Err(crashed());
        }
        self.inner.write_atomic(name, data)
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        if self.armed.swap(false, Ordering::SeqCst) {
            // Crashed before the unlink reached the disk.
            self.tripped.store(2, Ordering::SeqCst);
            return Err(crashed());
        }
        self.inner.remove(name)
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
}
