//! The dirty bitmap: one bit per block, in memory as `Vec<u64>`, canonically as QEMU's bytes.
//!
//! Word `w` holds blocks `64w .. 64w+63`, least significant bit first, so the little-endian bytes
//! of the words *are* QEMU's layout (byte `k` holds blocks `8k .. 8k+7`, LSB first). Bits past
//! the last block are always zero. Every change invalidates the affected chunks of the cached
//! [`HashTree`], so [`Bitmap::root`] rehashes only what changed.
//!
//! A per-chunk summary records which chunks may hold a set bit. A chunk outside it is known to
//! be all zero without reading its memory, so walking a sparse bitmap (runs, counts, deltas,
//! clean-chunk checks, hashing) costs nothing for its clean chunks, and a lazily zeroed bitmap
//! ([`Bitmap::new`]) stays unmapped where nothing was written.

use crate::error::{DecodeError, RangeError};
use crate::geometry::{CHUNK_BYTES, Geometry};
use crate::tree::{Cv, HashTree, Root};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const WORDS_PER_CHUNK: usize = CHUNK_BYTES / 8;

/// A run of dirty bytes on the disk: adjacent dirty blocks merged, clipped to the disk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// A dirty bitmap over a disk of some [`Geometry`].
#[derive(Debug)]
pub struct Bitmap {
    geom: Geometry,
    words: Vec<u64>,
    /// Bit `c` set: chunk `c` may hold a set bit. Clear: every word of chunk `c` is zero. Every
    /// write to `words` sets its chunk's bit first; only [`Bitmap::clear_chunk`] clears one.
    touched: Vec<u64>,
    tree: HashTree,
    /// Dirty blocks per chunk, or [`STALE`] until counted again after a change: `count` costs
    /// one popcount of each chunk changed since the last count, not of the whole bitmap
    /// (finding F5: a mark's report used to recount every dirty chunk). Atomics only so that
    /// `count(&self)` can fill the cache; the bitmap is never shared mutably.
    counts: Vec<AtomicU32>,
    /// The sum of `counts`, or [`STALE_TOTAL`]: a mark adds what it newly set, so its report's
    /// count costs nothing however many chunks the bitmap has (16 TiB at 4 KiB is 8,192 chunks).
    total: AtomicU64,
}

/// A chunk's cached count is out of date.
const STALE: u32 = u32::MAX;
/// The cached total is out of date.
const STALE_TOTAL: u64 = u64::MAX;

/// Copies only the touched chunks into fresh lazily zeroed memory: cloning a sparse bitmap costs
/// its dirty chunks, not its size.
impl Clone for Bitmap {
    fn clone(&self) -> Self {
        let mut words = vec![0u64; self.words.len()];
        for c in (0..self.chunks()).filter(|&c| self.is_touched(c)) {
            let r = chunk_word_range(c, words.len());
            words[r.clone()].copy_from_slice(&self.words[r]);
        }
        Bitmap {
            geom: self.geom,
            words,
            touched: self.touched.clone(),
            tree: self.tree.clone(),
            counts: self
                .counts
                .iter()
                .map(|c| AtomicU32::new(c.load(Ordering::Relaxed)))
                .collect(),
            total: AtomicU64::new(self.total.load(Ordering::Relaxed)),
        }
    }
}

impl PartialEq for Bitmap {
    fn eq(&self, other: &Self) -> bool {
        self.geom == other.geom && self.words == other.words
    }
}
impl Eq for Bitmap {}

impl Bitmap {
    /// An all-clean bitmap. Its memory is lazily zeroed (the system maps a page on its first
    /// write), and untouched chunks are never read, so creating even a 512 MiB bitmap costs
    /// nothing until blocks are marked, and only the chunks written to ever take page faults
    /// (about 2 µs per 4 KiB page on the development VM: ~70 ms for 128 MiB zeroed up front).
    /// A chunk's first write never reads it first, so its pages fault once, not once to map
    /// the zero page and again to copy it.
    pub fn new(geom: Geometry) -> Self {
        Bitmap {
            words: vec![0; geom.blocks().div_ceil(64) as usize],
            touched: vec![0; geom.chunks().div_ceil(64)],
            tree: HashTree::new(geom.chunks()),
            counts: (0..geom.chunks()).map(|_| AtomicU32::new(0)).collect(),
            total: AtomicU64::new(0),
            geom,
        }
    }

    /// The disk geometry this bitmap covers.
    pub fn geometry(&self) -> Geometry {
        self.geom
    }

    /// Set every block that the byte range `offset .. offset+length` touches. A zero-length
    /// range touches nothing. Returns how many blocks were newly set.
    pub fn mark(&mut self, offset: u64, length: u64) -> Result<u64, RangeError> {
        let size = self.geom.size();
        let end = offset.checked_add(length).filter(|e| *e <= size);
        let Some(end) = end else {
            return Err(RangeError {
                offset,
                length,
                size,
            });
        };
        if length == 0 {
            return Ok(0);
        }
        let g = self.geom.granularity();
        Ok(self.set_blocks(offset / g, (end - 1) / g + 1))
    }

    /// Set blocks `first .. end` (end exclusive, clamped to the block count). Returns how many
    /// were newly set.
    pub fn set_blocks(&mut self, first: u64, end: u64) -> u64 {
        let end = end.min(self.geom.blocks());
        if first >= end {
            return 0;
        }
        let (fw, lw) = ((first / 64) as usize, ((end - 1) / 64) as usize);
        let total = *self.total.get_mut();
        let mut newly = 0u64;
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { (end - 1) % 64 + 1 } else { 64 };
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let c = w / WORDS_PER_CHUNK;
            // An untouched chunk is all zero: no need to read (and fault in) its word.
            let old = if self.is_touched(c) { self.words[w] } else { 0 };
            let added = mask & !old;
            if added != 0 {
                newly += u64::from(added.count_ones());
                self.touch(c);
                self.words[w] = old | added;
                self.changed(c);
            }
        }
        // Exactly `newly` bits were added, so a known total stays known.
        if total != STALE_TOTAL {
            *self.total.get_mut() = total + newly;
        }
        newly
    }

    /// Whether block `block` is dirty.
    pub fn is_set(&self, block: u64) -> bool {
        let w = (block / 64) as usize;
        block < self.geom.blocks()
            && self.is_touched(w / WORDS_PER_CHUNK)
            && self.words[w] >> (block % 64) & 1 == 1
    }

    /// Number of dirty blocks. Counts only the chunks changed since the last call; the rest
    /// come from the cache.
    pub fn count(&self) -> u64 {
        let cached = self.total.load(Ordering::Relaxed);
        if cached != STALE_TOTAL {
            return cached;
        }
        let total = (0..self.chunks())
            .filter(|&c| self.is_touched(c))
            .map(|c| {
                let cached = self.counts[c].load(Ordering::Relaxed);
                if cached != STALE {
                    return u64::from(cached);
                }
                let n: u32 = self.chunk_words(c).iter().map(|w| w.count_ones()).sum();
                self.counts[c].store(n, Ordering::Relaxed);
                u64::from(n)
            })
            .sum();
        self.total.store(total, Ordering::Relaxed);
        total
    }

    /// Chunk `c`'s words changed: its hash and its count must be computed again.
    fn changed(&mut self, c: usize) {
        self.tree.invalidate(c);
        *self.counts[c].get_mut() = STALE;
        *self.total.get_mut() = STALE_TOTAL;
    }

    /// Whether no block is dirty.
    pub fn is_clean(&self) -> bool {
        (0..self.chunks()).all(|c| self.chunk_is_clean(c))
    }

    /// `Ok` if `other` covers the same disk geometry, so the two can be combined word by word.
    fn same_geometry(&self, other: &Bitmap) -> Result<(), GeometryMismatch> {
        if self.geom == other.geom {
            return Ok(());
        }
        Err(GeometryMismatch {
            ours: self.geom,
            theirs: other.geom,
        })
    }

    /// Whether chunk `c` may hold a set bit (if not, all its words are zero).
    fn is_touched(&self, c: usize) -> bool {
        in_summary(&self.touched, c)
    }

    /// Record that chunk `c` may hold a set bit; call before writing any of its words.
    fn touch(&mut self, c: usize) {
        self.touched[c / 64] |= 1 << (c % 64);
    }

    /// OR `other` into `self`. Both must have the same geometry.
    pub fn merge(&mut self, other: &Bitmap) -> Result<(), GeometryMismatch> {
        self.combine(other, false, |a, b| a | b)
    }

    /// Replace every word `a` by `op(a, b)`, `b` the same word of `other`, invalidating the
    /// hash of every chunk that changed. Both must have the same geometry. `op(a, 0)` must be
    /// `a` (so chunks clean in `other` are skipped unread); with `zero_stays` also `op(0, b)`
    /// must be `0` (chunks clean in `self` are skipped too).
    fn combine(
        &mut self,
        other: &Bitmap,
        zero_stays: bool,
        op: impl Fn(u64, u64) -> u64,
    ) -> Result<(), GeometryMismatch> {
        self.same_geometry(other)?;
        for c in 0..self.chunks() {
            if !other.is_touched(c) || (zero_stays && !self.is_touched(c)) {
                continue;
            }
            let r = chunk_word_range(c, self.words.len());
            let mut changed = false;
            let was_touched = self.is_touched(c);
            let pairs = self.words[r.clone()].iter_mut().zip(&other.words[r]);
            if was_touched {
                for (a, b) in pairs {
                    let w = op(*a, *b);
                    changed |= w != *a;
                    *a = w;
                }
            } else {
                // All zero: write without reading, so a lazily zeroed page faults once.
                for (a, b) in pairs {
                    *a = op(0, *b);
                    changed |= *a != 0;
                }
            }
            self.touch(c);
            if changed {
                self.changed(c);
            }
        }
        Ok(())
    }

    /// Runs of dirty blocks as `(first, end)` block indices, end exclusive.
    pub fn runs(&self) -> Runs<'_> {
        self.runs_in(0, self.geom.blocks())
    }

    /// Runs of dirty blocks within blocks `lo .. hi`, clipped to that window. Scans only the
    /// words of the window, so walking a large bitmap window by window stays linear.
    pub fn runs_in(&self, lo: u64, hi: u64) -> Runs<'_> {
        let hi = hi.min(self.geom.blocks());
        Runs {
            words: &self.words[..(hi.div_ceil(64) as usize).min(self.words.len())],
            touched: &self.touched,
            pos: lo.min(hi),
            blocks: hi,
        }
    }

    /// Clear every bit that is set in `other` (`self &= !other`). Both must have the same
    /// geometry. The migration source uses it to keep only the *newly* set bits of a round.
    pub fn subtract(&mut self, other: &Bitmap) -> Result<(), GeometryMismatch> {
        self.combine(other, true, |a, b| a & !b)
    }

    /// Clear every bit of chunk `i` (no-op past the last chunk).
    pub fn clear_chunk(&mut self, i: usize) {
        if i >= self.chunks() || !self.is_touched(i) {
            return;
        }
        let r = chunk_word_range(i, self.words.len());
        if self.words[r.clone()].iter().any(|w| *w != 0) {
            self.words[r].fill(0);
            self.tree.invalidate(i);
        }
        *self.counts[i].get_mut() = 0;
        *self.total.get_mut() = STALE_TOTAL;
        self.touched[i / 64] &= !(1 << (i % 64));
    }

    /// Dirty extents in bytes: adjacent dirty blocks merged, the last clipped to the disk size.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        let (g, size) = (self.geom.granularity(), self.geom.size());
        self.runs().map(move |(a, b)| {
            let offset = a * g;
            Extent {
                offset,
                length: (b * g).min(size) - offset,
            }
        })
    }

    /// The canonical raw bytes (QEMU's layout).
    pub fn to_raw(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_le(&self.words, self.geom.raw_len(), &mut out);
        out
    }

    /// Parse canonical raw bytes; the length must match and bits past the last block be zero.
    pub fn from_raw(geom: Geometry, raw: &[u8]) -> Result<Self, DecodeError> {
        if raw.len() != geom.raw_len() {
            return Err(DecodeError::RawLength {
                got: raw.len(),
                expected: geom.raw_len(),
            });
        }
        let mut b = Bitmap::new(geom);
        store_le(&mut b.words, raw);
        b.touched.fill(u64::MAX);
        for c in &mut b.counts {
            *c.get_mut() = STALE;
        }
        *b.total.get_mut() = STALE_TOTAL;
        b.check_tail()?;
        Ok(b)
    }

    fn check_tail(&self) -> Result<(), DecodeError> {
        let used = self.geom.blocks() % 64;
        if used != 0 && self.words.last().is_some_and(|w| w >> used != 0) {
            return Err(DecodeError::TailBits);
        }
        Ok(())
    }

    /// Number of chunks of the raw form.
    pub fn chunks(&self) -> usize {
        self.tree.len()
    }

    fn chunk_words(&self, i: usize) -> &[u64] {
        &self.words[chunk_word_range(i, self.words.len())]
    }

    /// Replace `buf` with chunk `i`'s raw bytes.
    pub fn chunk_raw(&self, i: usize, buf: &mut Vec<u8>) {
        chunk_bytes(self.geom, &self.words, &self.touched, i, buf);
    }

    /// Whether chunk `i` has no dirty block.
    pub fn chunk_is_clean(&self, i: usize) -> bool {
        !self.is_touched(i) || self.chunk_words(i).iter().all(|w| *w == 0)
    }

    /// Overwrite (`or == false`) or OR-merge (`or == true`) chunk `i` from raw bytes, which must be
    /// exactly the chunk's length and keep tail bits zero. On error nothing is changed.
    pub fn apply_chunk_raw(&mut self, i: usize, raw: &[u8], or: bool) -> Result<(), DecodeError> {
        let words = self.chunk_words_for(i, raw)?;
        if !self.is_touched(i) {
            if raw.iter().all(|b| *b == 0) {
                // Zeros over zeros (a clean chunk loaded from the store): nothing changes, and
                // the chunk's memory stays unmapped.
                return Ok(());
            }
            // All zero, so OR-ing is overwriting: write without reading (one fault per page
            // of a lazily zeroed bitmap, not a copy-on-write one).
            self.touch(i);
            store_le(&mut self.words[words], raw);
            self.changed(i);
            return Ok(());
        }
        // In place, word by word: this is the migration bulk's hot path (bench migrate).
        if load_le(&mut self.words[words], raw, or) {
            self.changed(i);
        }
        Ok(())
    }

    /// Overwrite chunk `i` with `raw` and install `cv`, the chunk's chaining value
    /// ([`crate::tree::chunk_cv`] of `raw` at `i`) that the caller has just computed or
    /// verified, so the next [`Bitmap::root`] does not hash the chunk again (the migration's
    /// bulk path hashes every chunk once per side instead of twice). The words are written
    /// without being read first, so a lazily zeroed page ([`Bitmap::new`]) takes
    /// one fault, not a copy-on-write one. The same checks as [`Bitmap::apply_chunk_raw`]; on
    /// error nothing is changed.
    pub fn install_chunk_raw(
        &mut self,
        i: usize,
        raw: &[u8],
        cv: crate::tree::Cv,
    ) -> Result<(), DecodeError> {
        let words = self.chunk_words_for(i, raw)?;
        self.touch(i);
        store_le(&mut self.words[words], raw);
        self.tree.set_leaf(i, cv);
        *self.counts[i].get_mut() = STALE;
        *self.total.get_mut() = STALE_TOTAL;
        Ok(())
    }

    /// The word range of chunk `i` if `raw` may replace or join it: exactly the chunk's length
    /// and no bit past the last block. OR-ing keeps the existing tail bits, which are zero, so
    /// the new bytes' last word decides alone.
    fn chunk_words_for(
        &self,
        i: usize,
        raw: &[u8],
    ) -> Result<std::ops::RangeInclusive<usize>, DecodeError> {
        let range = self.geom.chunk_range(i);
        if raw.len() != range.len() || i >= self.chunks() {
            return Err(DecodeError::RawLength {
                got: raw.len(),
                expected: range.len(),
            });
        }
        let start = i * WORDS_PER_CHUNK;
        let n = raw.len().div_ceil(8);
        let last = start + n - 1;
        let used = self.geom.blocks() % 64;
        if last == self.words.len() - 1 && used != 0 && le_word(&raw[(n - 1) * 8..]) >> used != 0 {
            return Err(DecodeError::TailBits);
        }
        Ok(start..=last)
    }

    /// The root: BLAKE3 of [`Bitmap::to_raw`], rehashing only chunks changed since last time.
    pub fn root(&mut self) -> Root {
        let Bitmap {
            geom,
            words,
            touched,
            tree,
            ..
        } = self;
        tree.refresh(|i, buf| chunk_bytes(*geom, words, touched, i, buf))
    }

    /// The root `self ∪ other` would have, without building it: `self`'s cached chunk hashes
    /// except for the chunks where `other` has a set bit, which are hashed from the union of
    /// both. The migration source computes the post-copy final root this way while the VM is
    /// paused (a clone of a 128 MiB bitmap plus a merge took ~85 ms there).
    pub fn union_root(&mut self, other: &Bitmap) -> Result<Root, GeometryMismatch> {
        self.same_geometry(other)?;
        self.root();
        let mut tree = self.tree.clone();
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        let mut union = |i: usize, buf: &mut Vec<u8>| {
            chunk_bytes(self.geom, &self.words, &self.touched, i, buf);
            chunk_bytes(other.geom, &other.words, &other.touched, i, &mut theirs);
            for (a, b) in buf.iter_mut().zip(&theirs) {
                *a |= *b;
            }
        };
        for c in (0..self.chunks()).filter(|&c| !other.chunk_is_clean(c)) {
            union(c, &mut mine);
            tree.set_leaf(c, crate::tree::chunk_cv(c, &mine));
        }
        // Every leaf is fresh now; `union` is only asked for the whole of a one-chunk bitmap.
        Ok(tree.refresh(union))
    }

    /// Chunk `i`'s chaining value ([`crate::tree::chunk_cv`] of [`Bitmap::chunk_raw`]): the
    /// cached one when the chunk has not changed since it was last hashed, else computed from
    /// `raw`, which the caller has just filled with the chunk's bytes. Saves the migration
    /// source a second hash of every bulk chunk after the Offer's root hashed them all.
    pub fn chunk_cv_of(&self, i: usize, raw: &[u8]) -> Cv {
        match self.tree.fresh_leaf(i) {
            Some(cv) => *cv,
            None => crate::tree::chunk_cv(i, raw),
        }
    }

    /// Per-chunk chaining values, current as of this call.
    pub fn chunk_hashes(&mut self) -> &[Cv] {
        self.root();
        self.tree.leaves()
    }

    /// Install chunk hashes already verified elsewhere (e.g. just checked on load), so the next
    /// [`Bitmap::root`] does not rehash. The caller vouches that each hash matches its chunk.
    pub fn adopt_verified_hashes(&mut self, cvs: &[Cv]) {
        for (i, cv) in cvs.iter().enumerate().take(self.chunks()) {
            self.tree.set_leaf(i, *cv);
        }
    }
}

/// Whether chunk `c` is in a `touched` summary (may hold a set bit).
fn in_summary(touched: &[u64], c: usize) -> bool {
    touched[c / 64] >> (c % 64) & 1 == 1
}

/// The indices into a bitmap's `n_words` words that chunk `c` covers.
fn chunk_word_range(c: usize, n_words: usize) -> std::ops::Range<usize> {
    let start = c * WORDS_PER_CHUNK;
    start..(start + WORDS_PER_CHUNK).min(n_words)
}

/// Replace `buf` with chunk `i`'s raw bytes; an untouched chunk is zeros, its memory unread.
fn chunk_bytes(geom: Geometry, words: &[u64], touched: &[u64], i: usize, buf: &mut Vec<u8>) {
    let len = geom.chunk_range(i).len();
    if in_summary(touched, i) {
        write_le(&words[chunk_word_range(i, words.len())], len, buf);
    } else {
        buf.clear();
        buf.resize(len, 0);
    }
}

/// One little-endian word from up to 8 bytes, zero-padded.
fn le_word(bytes: &[u8]) -> u64 {
    let mut le = [0u8; 8];
    le[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(le)
}

/// Overwrite (or OR into) `dst` with the little-endian words of `raw` (the last one
/// zero-padded; `dst` holds exactly `raw.len().div_ceil(8)` words) and say whether any word
/// changed. Whole words go through `chunks_exact`, so the loop compiles to vector loads instead
/// of one variable-length copy per word (the bulk paths of `bench migrate` spent a tenth of
/// their time in those copies).
fn load_le(dst: &mut [u64], raw: &[u8], or: bool) -> bool {
    let whole = raw.chunks_exact(8);
    let rest = whole.remainder();
    let mut changed = false;
    let mut put = |d: &mut u64, w: u64| {
        let w = if or { w | *d } else { w };
        changed |= *d != w;
        *d = w;
    };
    let (body, tail) = dst.split_at_mut(raw.len() / 8);
    for (d, b) in body.iter_mut().zip(whole) {
        put(
            d,
            u64::from_le_bytes(b.try_into().expect("chunks_exact(8)")),
        );
    }
    if let Some(d) = tail.first_mut() {
        put(d, le_word(rest));
    }
    changed
}

/// Overwrite `dst` with the little-endian words of `raw` (see [`load_le`]) without reading it.
/// On a little-endian machine the words' memory *is* the raw layout: one `memcpy`.
#[cfg(target_endian = "little")]
fn store_le(dst: &mut [u64], raw: &[u8]) {
    let bytes = bytemuck::cast_slice_mut::<u64, u8>(dst);
    bytes[..raw.len()].copy_from_slice(raw);
    bytes[raw.len()..].fill(0);
}

/// Overwrite `dst` with the little-endian words of `raw` (see [`load_le`]) without reading it.
#[cfg(not(target_endian = "little"))]
fn store_le(dst: &mut [u64], raw: &[u8]) {
    let whole = raw.chunks_exact(8);
    let rest = whole.remainder();
    let (body, tail) = dst.split_at_mut(raw.len() / 8);
    for (d, b) in body.iter_mut().zip(whole) {
        *d = u64::from_le_bytes(b.try_into().expect("chunks_exact(8)"));
    }
    if let Some(d) = tail.first_mut() {
        *d = le_word(rest);
    }
}

/// Replace `out` with the first `len` bytes of `words` in little-endian order (`len` at most
/// 8 per word). On a little-endian machine that is the words' memory: one `memcpy`, no
/// zero-fill first.
#[cfg(target_endian = "little")]
fn write_le(words: &[u64], len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&bytemuck::cast_slice::<u64, u8>(words)[..len]);
}

/// Replace `out` with the first `len` bytes of `words` in little-endian order.
#[cfg(not(target_endian = "little"))]
fn write_le(words: &[u64], len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.resize(words.len() * 8, 0);
    for (dst, w) in out.chunks_exact_mut(8).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    out.truncate(len);
}

/// Two bitmaps of different geometry cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("geometry mismatch: {ours:?} vs {theirs:?}")]
pub struct GeometryMismatch {
    /// This bitmap's geometry.
    pub ours: Geometry,
    /// The other bitmap's geometry.
    pub theirs: Geometry,
}

/// Iterator over runs of dirty blocks; see [`Bitmap::runs`].
pub struct Runs<'a> {
    words: &'a [u64],
    /// The bitmap's summary of chunks that may hold a set bit.
    touched: &'a [u64],
    pos: u64,
    blocks: u64,
}

impl Runs<'_> {
    /// First block ≥ `from` whose bit equals `want`, or `blocks`.
    fn find_bit(&self, from: u64, want: bool) -> u64 {
        let mut w = (from / 64) as usize;
        if w >= self.words.len() {
            return self.blocks;
        }
        let flip = if want { 0 } else { u64::MAX };
        let mut cur = (self.word(w) ^ flip) & (u64::MAX << (from % 64));
        loop {
            if cur != 0 {
                return (w as u64 * 64 + u64::from(cur.trailing_zeros())).min(self.blocks);
            }
            w += 1;
            if want {
                // Looking for a set bit: skip untouched chunks without reading them.
                let mut c = w / WORDS_PER_CHUNK;
                if w < self.words.len() && !self.is_touched(c) {
                    while c * WORDS_PER_CHUNK < self.words.len() && !self.is_touched(c) {
                        c += 1;
                    }
                    w = c * WORDS_PER_CHUNK;
                }
            }
            if w >= self.words.len() {
                return self.blocks;
            }
            cur = self.word(w) ^ flip;
        }
    }

    fn is_touched(&self, c: usize) -> bool {
        in_summary(self.touched, c)
    }

    /// Word `w`; zero, unread, in an untouched chunk.
    fn word(&self, w: usize) -> u64 {
        if self.is_touched(w / WORDS_PER_CHUNK) {
            self.words[w]
        } else {
            0
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        if self.pos >= self.blocks {
            return None;
        }
        let start = self.find_bit(self.pos, true);
        if start >= self.blocks {
            self.pos = self.blocks;
            return None;
        }
        let end = self.find_bit(start, false);
        self.pos = end;
        Some((start, end))
    }
}
