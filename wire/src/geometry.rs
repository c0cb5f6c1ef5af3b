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
///
/// Deserializing validates too (through [`Geometry::new`]): a geometry read from a file or a
/// peer is refused, not trusted, when it breaks the rules (a granularity of 0 used to divide
/// by zero on the first `blocks()`; found by the `store_file` fuzz target, docs/fuzzing.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "UncheckedGeometry")]
pub struct Geometry {
    size: u64,
    granularity: u64,
}

/// The serialized form of a [`Geometry`], before it is checked (same fields, same layout).
#[derive(Deserialize)]
struct UncheckedGeometry {
    size: u64,
    granularity: u64,
}

impl TryFrom<UncheckedGeometry> for Geometry {
    type Error = GeometryError;
    fn try_from(g: UncheckedGeometry) -> Result<Self, GeometryError> {
        Geometry::new(g.size, g.granularity)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializing_checks_the_geometry_like_new() {
        let good = Geometry::new(1 << 30, 65536).unwrap();
        let bytes = postcard::to_stdvec(&good).unwrap();
        assert_eq!(postcard::from_bytes::<Geometry>(&bytes), Ok(good));
        // The layout did not change: two varints, size then granularity.
        assert_eq!(bytes, postcard::to_stdvec(&(1u64 << 30, 65536u64)).unwrap());
        for (size, granularity) in [
            (1u64 << 30, 0u64),
            (1 << 30, 1000),
            (1 << 30, 256),
            (1 << 30, 1 << 27),
            (0, 65536),
            (u64::MAX, 512),
        ] {
            let bytes = postcard::to_stdvec(&(size, granularity)).unwrap();
            assert!(
                postcard::from_bytes::<Geometry>(&bytes).is_err(),
                "{size} / {granularity} accepted"
            );
        }
    }
}
