//! The chunked hash tree whose root is `blake3::hash(raw bitmap bytes)`.
//!
//! Every chunk of [`CHUNK_BYTES`](crate::CHUNK_BYTES) is an aligned BLAKE3 subtree, so its
//! chaining value ([`Cv`]) can be cached and the root rebuilt from the cached values with
//! `blake3::hazmat` merges. Changing one chunk costs one leaf hash plus one merge per tree level,
//! and anyone can check the root with `b3sum` on the exported raw bitmap.
//!
//! BLAKE3 trees are left-balanced: a node over `n ≥ 2` leaves puts the largest power of two
//! strictly below `n` on the left. Because our leaves are a power-of-two multiple of BLAKE3's
//! 1 KiB chunk, the same rule holds counted in leaves.

use blake3::hazmat::{HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A chaining value: the non-root BLAKE3 hash of one chunk at its offset. It binds the chunk's
/// content *and* its position.
pub type Cv = [u8; 32];

/// A bitmap root: BLAKE3 of the whole raw bitmap.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Root(pub [u8; 32]);

impl Root {
    /// Lowercase hex, as `b3sum` prints it.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(|h| Root(*h.as_bytes()))
    }
}

impl fmt::Debug for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Root({})", self.to_hex())
    }
}

impl fmt::Display for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Chaining value of chunk `index` whose bytes are `data`, for a raw bitmap of more than one
/// chunk. (A one-chunk bitmap's root is `blake3::hash(data)`; its chunk hash is still this.)
pub fn chunk_cv(index: usize, data: &[u8]) -> Cv {
    let mut h = blake3::Hasher::new();
    h.set_input_offset((index * crate::CHUNK_BYTES) as u64);
    h.update(data);
    h.finalize_non_root()
}

#[derive(Debug, Clone, Copy)]
enum Child {
    Leaf(usize),
    Node(usize),
}

#[derive(Debug, Clone)]
struct Node {
    hi: usize,
    left: Child,
    right: Child,
    cv: Cv,
    stale: bool,
}

/// Cached chaining values of every chunk and every interior node.
#[derive(Debug, Clone)]
pub struct HashTree {
    leaves: Vec<Cv>,
    leaf_stale: Vec<bool>,
    nodes: Vec<Node>,
    /// The top node when there are ≥ 2 leaves.
    top: Option<usize>,
}

impl HashTree {
    /// A tree over `chunks` leaves, all stale (nothing hashed yet).
    pub fn new(chunks: usize) -> Self {
        assert!(chunks >= 1, "a bitmap has at least one chunk");
        let mut t = HashTree {
            leaves: vec![[0; 32]; chunks],
            leaf_stale: vec![true; chunks],
            nodes: Vec::with_capacity(chunks.saturating_sub(1)),
            top: None,
        };
        if chunks >= 2 {
            match t.build(0, chunks) {
                Child::Node(i) => t.top = Some(i),
                Child::Leaf(_) => unreachable!("two or more leaves make a node"),
            }
        }
        t
    }

    fn build(&mut self, lo: usize, hi: usize) -> Child {
        if hi - lo == 1 {
            return Child::Leaf(lo);
        }
        let split = lo + largest_pow2_below(hi - lo);
        let left = self.build(lo, split);
        let right = self.build(split, hi);
        self.nodes.push(Node {
            hi,
            left,
            right,
            cv: [0; 32],
            stale: true,
        });
        Child::Node(self.nodes.len() - 1)
    }

    /// Number of leaves (chunks).
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    /// Always false: a tree has at least one leaf.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Forget chunk `i`'s hash; it is recomputed on the next [`HashTree::refresh`].
    pub fn invalidate(&mut self, i: usize) {
        if self.leaf_stale[i] {
            return;
        }
        self.leaf_stale[i] = true;
        let mut cur = self.top;
        while let Some(n) = cur {
            let node = &mut self.nodes[n];
            node.stale = true;
            let child = if i < self.split_of(n) {
                self.nodes[n].left
            } else {
                self.nodes[n].right
            };
            cur = match child {
                Child::Node(c) => Some(c),
                Child::Leaf(_) => None,
            };
        }
    }

    fn split_of(&self, n: usize) -> usize {
        match self.nodes[n].left {
            Child::Leaf(l) => l + 1,
            Child::Node(c) => self.nodes[c].hi,
        }
    }

    /// Install a chunk hash computed elsewhere (e.g. verified on load); marks the path stale.
    pub fn set_leaf(&mut self, i: usize, cv: Cv) {
        self.invalidate(i);
        self.leaves[i] = cv;
        self.leaf_stale[i] = false;
    }

    /// Indices of chunks whose hash must be recomputed.
    pub fn stale_leaves(&self) -> impl Iterator<Item = usize> + '_ {
        self.leaf_stale
            .iter()
            .enumerate()
            .filter(|(_, s)| **s)
            .map(|(i, _)| i)
    }

    /// Chunk `i`'s hash if it is current (computed or installed since the chunk last changed).
    pub fn fresh_leaf(&self, i: usize) -> Option<&Cv> {
        (!self.leaf_stale[i]).then(|| &self.leaves[i])
    }

    /// Cached hash of chunk `i` (valid only after [`HashTree::refresh`]).
    pub fn leaf(&self, i: usize) -> &Cv {
        &self.leaves[i]
    }

    /// All chunk hashes (valid only after [`HashTree::refresh`]).
    pub fn leaves(&self) -> &[Cv] {
        &self.leaves
    }

    /// Recompute stale leaves and interior nodes, then return the root. `fill(i, buf)` must
    /// replace `buf`'s contents with chunk `i`'s raw bytes.
    pub fn refresh(&mut self, mut fill: impl FnMut(usize, &mut Vec<u8>)) -> Root {
        let mut buf = Vec::with_capacity(crate::CHUNK_BYTES);
        for i in 0..self.leaves.len() {
            if self.leaf_stale[i] {
                fill(i, &mut buf);
                self.leaves[i] = chunk_cv(i, &buf);
                self.leaf_stale[i] = false;
            }
        }
        match self.top {
            None => {
                fill(0, &mut buf);
                Root(*blake3::hash(&buf).as_bytes())
            }
            Some(top) => {
                let (l, r) = (self.nodes[top].left, self.nodes[top].right);
                let (l, r) = (self.child_cv(l), self.child_cv(r));
                Root(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
            }
        }
    }

    fn child_cv(&mut self, c: Child) -> Cv {
        match c {
            Child::Leaf(i) => self.leaves[i],
            Child::Node(n) => {
                if self.nodes[n].stale {
                    let (l, r) = (self.nodes[n].left, self.nodes[n].right);
                    let (l, r) = (self.child_cv(l), self.child_cv(r));
                    self.nodes[n].cv = merge_subtrees_non_root(&l, &r, Mode::Hash);
                    self.nodes[n].stale = false;
                }
                self.nodes[n].cv
            }
        }
    }
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn largest_pow2_below(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CHUNK_BYTES;

    fn fill_from(data: &[u8]) -> impl FnMut(usize, &mut Vec<u8>) + '_ {
        move |i, buf| {
            buf.clear();
            buf.extend_from_slice(&data[i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(data.len())]);
        }
    }

    fn root_of(data: &[u8]) -> Root {
        HashTree::new(data.len().div_ceil(CHUNK_BYTES)).refresh(fill_from(data))
    }

    #[test]
    fn pow2_below() {
        assert_eq!(largest_pow2_below(2), 1);
        assert_eq!(largest_pow2_below(3), 2);
        assert_eq!(largest_pow2_below(4), 2);
        assert_eq!(largest_pow2_below(5), 4);
        assert_eq!(largest_pow2_below(9), 8);
    }

    #[test]
    fn root_equals_plain_hash_for_many_lengths() {
        for len in [
            1,
            1023,
            1024,
            1025,
            CHUNK_BYTES - 1,
            CHUNK_BYTES,
            CHUNK_BYTES + 1,
            2 * CHUNK_BYTES,
            3 * CHUNK_BYTES + 7,
            5 * CHUNK_BYTES,
            7 * CHUNK_BYTES + 1,
            13 * CHUNK_BYTES - 5,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            assert_eq!(
                root_of(&data).0,
                *blake3::hash(&data).as_bytes(),
                "len {len}"
            );
        }
    }

    #[test]
    fn invalidating_one_leaf_recomputes_only_that_leaf() {
        let mut data: Vec<u8> = vec![0; 11 * CHUNK_BYTES + 100];
        let mut t = HashTree::new(12);
        t.refresh(fill_from(&data));
        for (pos, chunk) in [
            (5usize, 0usize),
            (11 * CHUNK_BYTES + 3, 11),
            (CHUNK_BYTES * 8, 8),
        ] {
            data[pos] ^= 0x5a;
            t.invalidate(chunk);
            assert_eq!(t.stale_leaves().collect::<Vec<_>>(), vec![chunk]);
            let r = t.refresh(fill_from(&data));
            assert_eq!(r.0, *blake3::hash(&data).as_bytes());
        }
    }
}
