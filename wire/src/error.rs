//! Error types of the pure protocol layer, one per domain.

use thiserror::Error;

/// A disk geometry (size, granularity) that bitferry cannot represent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GeometryError {
    /// Granularity is not a power of two.
    #[error("granularity {0} is not a power of two")]
    NotPowerOfTwo(u64),
    /// Granularity is outside 512 B ..= 64 MiB.
    #[error("granularity {0} is outside 512 B ..= 64 MiB")]
    GranularityOutOfRange(u64),
    /// A disk of zero bytes has no blocks to track.
    #[error("disk size must be at least one byte")]
    ZeroSize,
    /// The bitmap would have more blocks than bitferry allows.
    #[error("{blocks} blocks exceed the limit of {max} (choose a larger granularity)")]
    TooManyBlocks {
        /// Blocks the geometry asks for.
        blocks: u64,
        /// The limit, [`crate::MAX_BLOCKS`].
        max: u64,
    },
}

/// A byte range that does not fit the disk.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("range {offset}+{length} ends past the disk size {size}")]
pub struct RangeError {
    /// First byte of the range.
    pub offset: u64,
    /// Length of the range in bytes.
    pub length: u64,
    /// The disk's size in bytes.
    pub size: u64,
}

/// Bytes that do not decode into what they claim to be. Always the peer's or the file's fault,
/// never a reason to panic.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Raw bitmap bytes of the wrong length.
    #[error("raw bitmap has {got} bytes, expected {expected}")]
    RawLength {
        /// Bytes given.
        got: usize,
        /// Bytes the geometry requires.
        expected: usize,
    },
    /// Bits set past the last block.
    #[error("raw bitmap has bits set past the last block")]
    TailBits,
    /// A chunk payload larger than the chunk it encodes could need.
    #[error("chunk payload of {got} bytes exceeds the limit of {max}")]
    Oversized {
        /// Payload length.
        got: usize,
        /// Largest acceptable payload.
        max: usize,
    },
    /// A roaring payload that does not parse or holds positions outside the chunk.
    #[error("malformed roaring chunk: {0}")]
    Roaring(String),
    /// A zero-chunk that carries payload.
    #[error("an all-zero chunk must have no payload")]
    ZeroWithPayload,
    /// An unknown chunk encoding tag.
    #[error("unknown chunk encoding {0}")]
    UnknownKind(u8),
}
