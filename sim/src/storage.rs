//! Simulated storage behind the store's [`Storage`] seam: files in memory, with the two failure
//! modes the fault model names — a write torn by a crash, and (as a deliberate bug) writes that
//! were acknowledged without reaching stable storage.

use agent::store::Storage;
use rand::Rng;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

/// How honest the simulated disk is about durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `write_atomic` is durable when it returns (what the real `FsStorage` guarantees).
    Honest,
    /// Deliberate bug: writes reach stable storage only at the next `writeback()`; a crash
    /// before that loses them. The checker must catch the consequences.
    SkipFsync,
}

#[derive(Debug, Default)]
struct Inner {
    /// What reads see now.
    visible: BTreeMap<String, Vec<u8>>,
    /// What survives a crash.
    durable: BTreeMap<String, Vec<u8>>,
    /// The last write, for tearing: (name, old content, new content).
    last_write: Option<(String, Option<Vec<u8>>, Vec<u8>)>,
    writes: u64,
}

/// A host's disk. Clones share the same files (the store holds one, the simulator another).
#[derive(Debug, Clone)]
pub struct SimStorage {
    inner: Arc<Mutex<Inner>>,
    durability: Durability,
}

impl SimStorage {
    /// An empty disk.
    pub fn new(durability: Durability) -> Self {
        SimStorage {
            inner: Arc::default(),
            durability,
        }
    }

    /// Kernel writeback: everything visible becomes durable.
    pub fn writeback(&self) {
        let mut i = self.inner.lock().expect("storage lock");
        i.durable = i.visible.clone();
    }

    /// The host crashes: what was not durable is lost. With `tear`, the last write is left
    /// half old, half new (as a disk that tore a sector write would), whatever the durability.
    pub fn crash(&self, rng: &mut impl Rng, tear: bool) {
        let mut i = self.inner.lock().expect("storage lock");
        i.visible = i.durable.clone();
        if tear && let Some((name, old, new)) = i.last_write.take() {
            let old = old.unwrap_or_default();
            let cut = rng.random_range(0..=new.len());
            let mut torn = new[..cut].to_vec();
            if old.len() > cut {
                torn.extend_from_slice(&old[cut..]);
            }
            i.visible.insert(name.clone(), torn.clone());
            i.durable.insert(name, torn);
        }
        i.last_write = None;
    }

    /// Flip one byte of a stored file (media corruption). Returns false if the file is absent.
    pub fn corrupt(&self, name: &str, rng: &mut impl Rng) -> bool {
        let mut i = self.inner.lock().expect("storage lock");
        let Some(f) = i.visible.get_mut(name) else {
            return false;
        };
        if f.is_empty() {
            return false;
        }
        let at = rng.random_range(0..f.len());
        f[at] ^= 1 << rng.random_range(0..8);
        let copy = f.clone();
        i.durable.insert(name.to_string(), copy);
        true
    }

    /// Number of writes so far.
    pub fn writes(&self) -> u64 {
        self.inner.lock().expect("storage lock").writes
    }
}

impl Storage for SimStorage {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self
            .inner
            .lock()
            .expect("storage lock")
            .visible
            .get(name)
            .cloned())
    }

    fn write_atomic(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let mut i = self.inner.lock().expect("storage lock");
        let old = i.visible.insert(name.to_string(), data.to_vec());
        i.last_write = Some((name.to_string(), old, data.to_vec()));
        i.writes += 1;
        if self.durability == Durability::Honest {
            i.durable.insert(name.to_string(), data.to_vec());
        }
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        let mut i = self.inner.lock().expect("storage lock");
        i.visible.remove(name);
        if self.durability == Durability::Honest {
            i.durable.remove(name);
        }
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self
            .inner
            .lock()
            .expect("storage lock")
            .visible
            .keys()
            .cloned()
            .collect())
    }
}
