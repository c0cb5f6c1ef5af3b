//! A small NBD client for reading live bitmaps and data from QEMU, `qemu-storage-daemon`
//! and `qemu-nbd` (no maintained Rust crate speaks structured replies and block status).
//!
//! The subset: fixed newstyle handshake, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT` (`base:allocation`, `qemu:dirty-bitmap:NAME`), `NBD_OPT_GO`;
//! `NBD_CMD_BLOCK_STATUS`, `NBD_CMD_READ` (structured: data, hole and error chunks),
//! `NBD_CMD_DISC`; unix sockets and TCP. No writes, no TLS, no extended headers.
//!
//! [`proto`] is the pure encoding and decoding (fuzzable), [`client`] the connection,
//! [`error`] the typed failures. Every length from the server is bounded before anything is
//! allocated; a server that answers nonsense or disappears gets a typed error, never a panic.

pub mod client;
pub mod error;
pub mod proto;

pub use client::{
    Allocation, BASE_ALLOCATION, ExportInfo, NbdClient, NbdOptions, dirty_bitmap_context,
};
pub use error::{NbdError, ProtoError};

#[cfg(test)]
mod tests;
