//! Framed streams: length-prefixed frames for protocol messages and raw payloads for bulk
//! bytes, on one QUIC stream.
//!
//! Wire format of a frame: `u32` little-endian body length, then the body — the same format
//! as the protocol crate's frame codec, so either side may decode it. A payload is raw bytes
//! with no prefix; the receiver knows its length from the frame before it (a postcard header
//! followed by raw bytes reaches near raw-QUIC throughput; payloads inside postcard frames cost
//! 20–45%). Declared lengths are checked against the stream's maximum before anything is
//! allocated, and a stream that ends inside a frame or payload is an error, never a short read.

use super::error::TransportError;
use bytes::{Bytes, BytesMut};
use quinn::{ReadExactError, RecvStream, SendStream, VarInt};

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;
/// Stream error code sent with STOP_SENDING when a peer announced an oversized frame.
pub const STOP_TOO_LARGE: u32 = 1;
/// Stream error code for an application that abandons a stream.
pub const STOP_ABANDONED: u32 = 2;
/// Frames up to this size are copied behind their header and written in one call; larger ones
/// are written in two calls instead of being copied.
const COALESCE_LIMIT: usize = 64 << 10;

/// Hard maximums of one stream, checked before anything is allocated. Set them to the
/// protocol's own (`wire::proto::frame::{MAX_FRAME, MAX_PAYLOAD}`) so the transport refuses
/// what the protocol would refuse, without buffering it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body (at most `u32::MAX`, the prefix's range).
    pub max_frame: usize,
    /// Largest single payload read.
    pub max_payload: usize,
    /// Longest wait for the next byte once a frame has begun (its first prefix byte read) and
    /// until its payload is complete. Between frames a stream may be quiet for as long as the
    /// connection lives; inside one, silence means a lost or corrupted length prefix (found by
    /// the simulator: both ends waited forever behind healthy keep-alives).
    pub frame_stall: std::time::Duration,
    /// Longest silence from the peer, once a migration has switched over, while this side
    /// waits for it: the source for `Committed` after it has sent everything, a post-copy
    /// destination for the next chunk. After it the peer counts as lost and the ownership
    /// rules apply (simulator rule 10); before a switchover nothing waits on the peer.
    pub switchover_silence: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 16 << 20,
            max_payload: 16 << 20,
            frame_stall: std::time::Duration::from_secs(30),
            switchover_silence: std::time::Duration::from_secs(120),
        }
    }
}

impl Limits {
    fn clamped(self) -> Self {
        Limits {
            max_frame: self.max_frame.min(u32::MAX as usize),
            ..self
        }
    }
}

/// The sending half of a framed stream.
#[derive(Debug)]
pub struct FrameWriter {
    send: SendStream,
    scratch: Vec<u8>,
    limits: Limits,
}

impl FrameWriter {
    /// Wrap a quinn send stream; frames above the limit are refused before sending.
    pub fn new(send: SendStream, limits: Limits) -> Self {
        FrameWriter {
            send,
            scratch: Vec::new(),
            limits: limits.clamped(),
        }
    }

    /// Send one frame: length prefix and body. Refuses bodies above the maximum, which the
    /// peer would refuse anyway.
    pub async fn send_frame(&mut self, body: &[u8]) -> Result<(), TransportError> {
        if body.len() > self.limits.max_frame {
            return Err(TransportError::TooLarge {
                what: "frame",
                len: body.len() as u64,
                max: self.limits.max_frame,
            });
        }
        let header = (body.len() as u32).to_le_bytes();
        if body.len() <= COALESCE_LIMIT {
            self.scratch.clear();
            self.scratch.extend_from_slice(&header);
            self.scratch.extend_from_slice(body);
            self.send.write_all(&self.scratch).await?;
        } else {
            self.send.write_all(&header).await?;
            self.send.write_all(body).await?;
        }
        Ok(())
    }

    /// The limits this writer was created with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Send raw bytes without framing or copying; the receiver must know their length from
    /// a preceding frame.
    pub async fn send_payload(&mut self, data: Bytes) -> Result<(), TransportError> {
        self.send.write_chunk(data).await?;
        Ok(())
    }

    /// Finish the stream and wait until the peer has received everything (or stopped
    /// reading, which is an error). Received is not processed: the protocol still needs its
    /// application-level acknowledgement before the connection may be closed.
    pub async fn finish(&mut self) -> Result<(), TransportError> {
        self.send.finish()?;
        match self.send.stopped().await? {
            None => Ok(()),
            Some(code) => Err(TransportError::PeerStopped(code.into_inner())),
        }
    }

    /// Abandon the stream: the peer's reads fail with [`TransportError::StreamReset`].
    pub fn reset(&mut self, code: u32) {
        let _ = self.send.reset(VarInt::from_u32(code));
    }

    /// The underlying quinn stream.
    pub fn quinn(&mut self) -> &mut SendStream {
        &mut self.send
    }
}

/// The receiving half of a framed stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: RecvStream,
    payload: BytesMut,
    limits: Limits,
}

impl FrameReader {
    /// Wrap a quinn receive stream; frames and payloads above the limits are refused.
    pub fn new(recv: RecvStream, limits: Limits) -> Self {
        FrameReader {
            recv,
            payload: BytesMut::new(),
            limits: limits.clamped(),
        }
    }

    /// The limits this reader enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The next frame's body, or `None` when the peer finished the stream cleanly at a frame
    /// boundary.
    pub async fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        let mut body = Vec::new();
        Ok(self.recv_frame_into(&mut body).await?.then_some(body))
    }

    /// Like [`recv_frame`](Self::recv_frame) into a caller-owned buffer (cleared first) so a
    /// loop reuses one allocation. Returns `false` at a clean end of stream.
    pub async fn recv_frame_into(&mut self, body: &mut Vec<u8>) -> Result<bool, TransportError> {
        body.clear();
        let mut header = [0u8; HEADER_LEN];
        match self.recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => return Ok(false),
            Err(ReadExactError::FinishedEarly(got)) => {
                return Err(TransportError::Truncated {
                    what: "frame header",
                    expected: HEADER_LEN as u64,
                    got: got as u64,
                });
            }
            Err(ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(header) as usize;
        self.check_len("frame", len, self.limits.max_frame)?;
        body.reserve(len);
        while body.len() < len {
            match self.recv.read_chunk(len - body.len(), true).await? {
                Some(chunk) => body.extend_from_slice(&chunk.bytes),
                None => {
                    return Err(TransportError::Truncated {
                        what: "frame",
                        expected: len as u64,
                        got: body.len() as u64,
                    });
                }
            }
        }
        Ok(true)
    }

    /// Exactly `len` raw payload bytes. The buffer is reused across calls once the previous
    /// payload has been dropped.
    pub async fn recv_payload(&mut self, len: usize) -> Result<Bytes, TransportError> {
        self.check_len("payload", len, self.limits.max_payload)?;
        self.payload.clear();
        self.payload.reserve(len);
        while self.payload.len() < len {
            match self.recv.read_chunk(len - self.payload.len(), true).await? {
                // A chunk that is the whole payload needs no copy.
                Some(chunk) if self.payload.is_empty() && chunk.bytes.len() == len => {
                    return Ok(chunk.bytes);
                }
                Some(chunk) => self.payload.extend_from_slice(&chunk.bytes),
                None => {
                    return Err(TransportError::Truncated {
                        what: "payload",
                        expected: len as u64,
                        got: self.payload.len() as u64,
                    });
                }
            }
        }
        Ok(self.payload.split().freeze())
    }

    /// Refuse a length above the maximum before allocating, and tell the peer to stop sending.
    fn check_len(
        &mut self,
        what: &'static str,
        len: usize,
        max: usize,
    ) -> Result<(), TransportError> {
        if len > max {
            let _ = self.recv.stop(VarInt::from_u32(STOP_TOO_LARGE));
            return Err(TransportError::TooLarge {
                what,
                len: len as u64,
                max,
            });
        }
        Ok(())
    }

    /// Tell the peer we will read no more.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(VarInt::from_u32(code));
    }

    /// The underlying quinn stream.
    pub fn quinn(&mut self) -> &mut RecvStream {
        &mut self.recv
    }
}

/// A bidirectional framed stream. [`split`](Self::split) it to send and receive from
/// different tasks.
#[derive(Debug)]
pub struct FramedStream {
    /// Sending half.
    pub writer: FrameWriter,
    /// Receiving half.
    pub reader: FrameReader,
}

impl FramedStream {
    /// Wrap a quinn bidirectional stream.
    pub fn new(send: SendStream, recv: RecvStream, limits: Limits) -> Self {
        FramedStream {
            writer: FrameWriter::new(send, limits),
            reader: FrameReader::new(recv, limits),
        }
    }

    /// See [`FrameWriter::send_frame`].
    pub async fn send_frame(&mut self, body: &[u8]) -> Result<(), TransportError> {
        self.writer.send_frame(body).await
    }

    /// See [`FrameWriter::send_payload`].
    pub async fn send_payload(&mut self, data: Bytes) -> Result<(), TransportError> {
        self.writer.send_payload(data).await
    }

    /// See [`FrameReader::recv_frame`].
    pub async fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        self.reader.recv_frame().await
    }

    /// See [`FrameReader::recv_frame_into`].
    pub async fn recv_frame_into(&mut self, body: &mut Vec<u8>) -> Result<bool, TransportError> {
        self.reader.recv_frame_into(body).await
    }

    /// See [`FrameReader::recv_payload`].
    pub async fn recv_payload(&mut self, len: usize) -> Result<Bytes, TransportError> {
        self.reader.recv_payload(len).await
    }

    /// See [`FrameWriter::finish`].
    pub async fn finish(&mut self) -> Result<(), TransportError> {
        self.writer.finish().await
    }

    /// The two halves.
    pub fn split(self) -> (FrameWriter, FrameReader) {
        (self.writer, self.reader)
    }
}
