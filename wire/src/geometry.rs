//! Disk geometry: size and granularity, and the chunk layout derived from them.

use crate::error::GeometryError;
use serde::{Deserialize, Serialize};

/// Smallest granularity (QEMU's smallest, 2^9).
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity (64 MiB).
pub const MAX_GRANULARITY: u64 = 64 << 20;
/// Most blocks one bitmap may have: 2^34 bits = 2 GiB of raw bitmap (e.g. 64 TiB at 4 KiB).
/// Bounds the memory any peer or file can make us allocate.
pub const MAX_BLOCKS: u64 = 1 << 34;
/// Bytes of raw bitmap per chunk: the unit of hashing, change tracking and transfer.
///
/// 64 KiB (2^19 blocks) keeps "mark one block, recompute the root" well under 1% of hashing a
/// 32 MiB bitmap (one 64 KiB leaf plus log2(n) merges) while chunk headers stay negligible.
/// It is a power of two and a multiple of BLAKE3's 1 KiB chunk, so every chunk is an aligned
/// BLAKE3 subtree (see [`crate::tree`]).
pub const CHUNK_BYTES: usize = 64 << 10;

/// A validated (size, granularity) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Geometry {
    size: u64,
    granularity: u64,
}

impl Geometry {
    /// Validate a geometry: granularity a power of two in 512 B ..= 64 MiB, size ≥ 1, and at
    /// most [`MAX_BLOCKS`] blocks.
    pub fn new(size: u64, granularity: u64) -> Result<Self, GeometryError> {
        if !granularity.is_power_of_two() {
            return Err(GeometryError::NotPowerOfTwo(granularity));
        }
        if !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) {
            return Err(GeometryError::GranularityOutOfRange(granularity));
        }
        if size == 0 {
            return Err(GeometryError::ZeroSize);
        }
        let blocks = size.div_ceil(granularity);
        if blocks > MAX_BLOCKS {
            return Err(GeometryError::TooManyBlocks {
                blocks,
                max: MAX_BLOCKS,
            });
        }
        Ok(Self { size, granularity })
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per block (one bit).
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Number of blocks; the last may be partial.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Length of the canonical raw form: `ceil(blocks / 8)` bytes.
    pub fn raw_len(&self) -> usize {
        self.blocks().div_ceil(8) as usize
    }

    /// Number of [`CHUNK_BYTES`] chunks of the raw form (the last may be short).
    pub fn chunks(&self) -> usize {
        self.raw_len().div_ceil(CHUNK_BYTES)
    }

    /// Byte range of chunk `i` within the raw form.
    pub fn chunk_range(&self, i: usize) -> std::ops::Range<usize> {
        let start = i * CHUNK_BYTES;
        start..(start + CHUNK_BYTES).min(self.raw_len())
    }

    /// Chunk that holds block `block`.
    pub fn chunk_of_block(&self, block: u64) -> usize {
        (block / (CHUNK_BYTES as u64 * 8)) as usize
    }
}
