//! QEMU qcow2 persistent bitmaps: read them exactly as QEMU would load them, and write
//! *carriers* (new images holding one bitmap) that QEMU accepts.
//!
//! [`format`] is pure parsing and encoding of the on-disk structures, [`reader`] does the
//! positioned reads, [`writer`] writes carriers. See `docs/qemu.md`.

pub mod format;
pub mod reader;
pub mod writer;

pub use format::{DirEntry, FormatError, Header};
pub use reader::{FileSource, Image, ReadError, Source, Trust};
pub use writer::{CarrierInfo, WriteError, write_carrier};

#[cfg(test)]
mod tests;
