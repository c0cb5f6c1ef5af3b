//! Ground truth: what the VM really wrote. Every block has a version counter (absent = 0, never
//! written); a backup (checkpoint) is a snapshot of the versions, and "changed since checkpoint
//! N" is exactly the set of blocks whose version differs from snapshot N.

use std::collections::{BTreeMap, BTreeSet};
use wire::Checkpoint;

/// The disk's real history.
#[derive(Debug, Clone)]
pub struct Truth {
    blocks: u64,
    versions: BTreeMap<u64, u32>,
    snapshots: Vec<BTreeMap<u64, u32>>,
    /// Per checkpoint, the blocks written since (versions only grow, so "written since" and
    /// "version differs" are the same set; kept incrementally so checks are cheap).
    changed: Vec<BTreeSet<u64>>,
}

/// The checkpoint id the simulator gives backup `n`.
pub fn checkpoint_id(n: usize) -> Checkpoint {
    Checkpoint {
        id: format!("ckpt-{n}"),
        manifest_root: None,
    }
}

/// Which backup a checkpoint names, if it is one the simulator made.
pub fn checkpoint_index(c: &Checkpoint) -> Option<usize> {
    c.id.strip_prefix("ckpt-")?.parse().ok()
}

impl Truth {
    /// A fresh disk of `blocks` blocks with backup 0 taken of it.
    pub fn new(blocks: u64) -> Self {
        Truth {
            blocks,
            versions: BTreeMap::new(),
            snapshots: vec![BTreeMap::new()],
            changed: vec![BTreeSet::new()],
        }
    }

    /// Blocks on the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The VM wrote blocks `first .. end`.
    pub fn write(&mut self, first: u64, end: u64) {
        for b in first..end.min(self.blocks) {
            *self.versions.entry(b).or_insert(0) += 1;
            for c in &mut self.changed {
                c.insert(b);
            }
        }
    }

    /// A backup: snapshot the versions; returns the new checkpoint's index.
    pub fn backup(&mut self) -> usize {
        self.snapshots.push(self.versions.clone());
        self.changed.push(BTreeSet::new());
        self.snapshots.len() - 1
    }

    /// The newest backup.
    pub fn latest(&self) -> usize {
        self.snapshots.len() - 1
    }

    /// Whether backup `n` exists.
    pub fn has(&self, n: usize) -> bool {
        n < self.snapshots.len()
    }

    /// Blocks changed since backup `n` (ground truth, for the checker).
    pub fn changed(&self, n: usize) -> &BTreeSet<u64> {
        &self.changed[n]
    }

    /// What a rebuild does: compare the live disk with backup `n` over blocks `lo .. hi`,
    /// calling `dirty` for each block whose content differs. Blocks never written on either
    /// side are holes and compare equal without being looked at.
    pub fn compare(&self, n: usize, lo: u64, hi: u64, mut dirty: impl FnMut(u64)) {
        let snap = &self.snapshots[n];
        for (&b, &v) in self.versions.range(lo..hi) {
            if snap.get(&b).copied().unwrap_or(0) != v {
                dirty(b);
            }
        }
    }
}
