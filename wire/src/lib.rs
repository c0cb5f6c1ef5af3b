//! `wire`: bitferry's pure protocol layer.
//!
//! Nothing in this crate reads a clock, a socket or a file. It holds the bitmap type and its
//! canonical byte form ([`bitmap`]), the chunked hash tree whose root is `blake3(raw bytes)`
//! ([`tree`]), and the per-chunk transfer/storage encodings ([`chunk`]). The agent, the simulator
//! and the tests all build on these.
//!
//! [`proto`] holds the migration protocol: messages, framing and the sans-IO sessions.

#![forbid(unsafe_code)]

pub mod bitmap;
pub mod chunk;
pub mod disk;
pub mod error;
pub mod geometry;
pub mod proto;
pub mod tree;

pub use bitmap::{Bitmap, Extent};
pub use chunk::{ChunkEncoding, ChunkKind, decode_chunk, encode_chunk};
pub use disk::{Checkpoint, DiskId, InvalidDiskId, State};
pub use error::{DecodeError, GeometryError, RangeError};
pub use geometry::{CHUNK_BYTES, Geometry, MAX_BLOCKS, MAX_GRANULARITY, MIN_GRANULARITY};
pub use tree::{Cv, Root};
