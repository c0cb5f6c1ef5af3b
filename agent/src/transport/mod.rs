//! The QUIC transport between agents: mutual TLS with the cluster CA ([`tls`]), endpoints and
//! authenticated connections ([`endpoint`]), and framed streams that carry opaque protocol
//! frames and raw payload bytes ([`stream`]). What the frames mean is the protocol's business
//! (`wire::proto`); this module only moves bytes and says who is on the other end.
//!
//! Shutdown without losing data, in this order: the sender [`FrameWriter::finish`]es its
//! stream (waits until the peer has *received* everything); the receiver verifies what it got
//! and answers with an application-level acknowledgement frame (finishing its own stream without
//! waiting for `stopped`, since the sender may close as soon as it has read it); only then does
//! either side
//! [`Connection::close`] (which discards anything undelivered); both sides finally
//! [`Endpoint::wait_idle`].

pub mod bench;
pub mod endpoint;
pub mod error;
pub mod stream;
pub mod tls;

pub use endpoint::{Connection, Endpoint, Incoming, TransportOptions};
pub use error::TransportError;
pub use stream::{FrameReader, FrameWriter, FramedStream, Limits};
pub use tls::TlsIdentity;

#[cfg(test)]
mod tests;
