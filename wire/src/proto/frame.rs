//! Framing (docs/protocol.md §3): each message is a `u32` little-endian length followed by that
//! many bytes of postcard. A [`Message::Chunk`] or [`Message::Delta`] frame is followed on the
//! same stream by `payload_len` raw bytes that are *not* part of the frame, so bulk bytes are
//! never copied through postcard.
//!
//! The length is checked against [`MAX_FRAME`] before any byte is buffered for the body, and
//! a payload length against [`MAX_PAYLOAD`] before it is read.

use super::delta::MAX_DELTA_PAYLOAD;
use super::error::FrameError;
use super::msg::{MESSAGE_KINDS, Message};
use crate::CHUNK_BYTES;

/// Largest frame body. Messages are small (the largest is an Offer or a Refuse with a 1 KiB
/// detail); payload travels outside frames.
pub const MAX_FRAME: usize = 16 * 1024;

/// Largest raw payload after a header: a raw chunk or the largest delta.
pub const MAX_PAYLOAD: usize = if CHUNK_BYTES > MAX_DELTA_PAYLOAD {
    CHUNK_BYTES
} else {
    MAX_DELTA_PAYLOAD
};

/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

/// Encode `msg` as one frame (prefix + body). Fails only if the message would exceed
/// [`MAX_FRAME`], which bounded fields make impossible for messages built by this crate.
pub fn encode(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::Oversized {
            len: body.len() as u64,
            max: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(PREFIX + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Bytes `msg` occupies on the stream as a frame (prefix included).
pub fn frame_len(msg: &Message) -> usize {
    postcard::to_stdvec(msg).map_or(0, |b| b.len() + PREFIX)
}

/// Decode one frame body. Unknown message tags are reported as such (a newer peer), other
/// failures as malformed; leftover bytes are rejected.
pub fn decode_body(body: &[u8]) -> Result<Message, FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    if let Some(tag) = leading_varint(body)
        && tag >= u64::from(MESSAGE_KINDS)
    {
        return Err(FrameError::UnknownMessage { tag });
    }
    let (msg, rest) = postcard::take_from_bytes::<Message>(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    if msg.payload_len() > MAX_PAYLOAD {
        return Err(FrameError::PayloadOversized {
            len: msg.payload_len(),
            max: MAX_PAYLOAD,
        });
    }
    Ok(msg)
}

/// The LEB128 varint at the start of `b` (postcard's enum tag), if it is well formed.
fn leading_varint(b: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// What the stream carried next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message.
    Message(Message),
    /// The raw payload that follows a Chunk or Delta header, exactly `payload_len` bytes.
    Payload(Vec<u8>),
}

/// Incremental decoder: push any slices of the stream, pull messages and payloads.
///
/// After an error the decoder stays failed and keeps returning that error: a stream with a bad
/// frame cannot be resynchronised.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    pos: usize,
    /// Raw payload bytes still owed by the last header.
    payload: usize,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes. Memory grows only with what the caller pushes and has not pulled.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message or payload, `Ok(None)` if more bytes are needed.
    pub fn next_item(&mut self) -> Result<Option<Incoming>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.next_inner();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn next_inner(&mut self) -> Result<Option<Incoming>, FrameError> {
        let avail = &self.buf[self.pos..];
        if self.payload > 0 {
            if avail.len() < self.payload {
                return Ok(None);
            }
            let p = avail[..self.payload].to_vec();
            self.pos += self.payload;
            self.payload = 0;
            return Ok(Some(Incoming::Payload(p)));
        }
        if avail.len() < PREFIX {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::Oversized {
                len: len as u64,
                max: MAX_FRAME,
            });
        }
        if avail.len() < PREFIX + len {
            return Ok(None);
        }
        let msg = decode_body(&avail[PREFIX..PREFIX + len])?;
        self.pos += PREFIX + len;
        self.payload = msg.payload_len();
        Ok(Some(Incoming::Message(msg)))
    }

    /// Bytes pushed but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The stream ended: fine only at a frame boundary with no payload owed.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buffered() > 0 || self.payload > 0 {
            return Err(FrameError::Truncated(self.buffered()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::msg::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            protocol_versions: BoundedVec::new(vec![1, 2]).unwrap(),
            features: 1,
            host: BoundedString::new("h").unwrap(),
        })
    }

    #[test]
    fn roundtrip_byte_by_byte() {
        let mut stream = encode(&hello()).unwrap();
        stream.extend(
            encode(&Message::Delta(DeltaHeader {
                round: 1,
                base: 0,
                encoding: DeltaEncoding::VarintGaps,
                payload_len: 3,
            }))
            .unwrap(),
        );
        stream.extend([1, 2, 3]);
        stream.extend(encode(&Message::Accept { offer: [1; 32] }).unwrap());
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            while let Some(i) = d.next_item().unwrap() {
                got.push(i);
            }
        }
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], Incoming::Message(hello()));
        assert_eq!(got[2], Incoming::Payload(vec![1, 2, 3]));
        assert_eq!(
            got[3],
            Incoming::Message(Message::Accept { offer: [1; 32] })
        );
        d.finish().unwrap();
    }

    #[test]
    fn oversized_length_is_rejected_before_buffering_the_body() {
        let mut d = FrameDecoder::new();
        d.push(&((MAX_FRAME as u32) + 1).to_le_bytes());
        assert!(matches!(
            d.next_item(),
            Err(FrameError::Oversized { len, .. }) if len == MAX_FRAME as u64 + 1
        ));
        // Stays failed.
        d.push(&encode(&Message::Accept { offer: [1; 32] }).unwrap());
        assert!(d.next_item().is_err());
    }

    #[test]
    fn unknown_tag_trailing_and_truncation_are_typed() {
        let mut d = FrameDecoder::new();
        d.push(&[1, 0, 0, 0, MESSAGE_KINDS as u8]);
        assert_eq!(
            d.next_item(),
            Err(FrameError::UnknownMessage {
                tag: u64::from(MESSAGE_KINDS)
            })
        );
        let mut body = postcard::to_stdvec(&Message::Accept { offer: [1; 32] }).unwrap();
        body.push(0);
        assert_eq!(decode_body(&body), Err(FrameError::Trailing(1)));
        assert_eq!(decode_body(&[]), Err(FrameError::Empty));
        let mut d = FrameDecoder::new();
        let f = encode(&hello()).unwrap();
        d.push(&f[..f.len() - 1]);
        assert_eq!(d.next_item(), Ok(None));
        assert!(matches!(d.finish(), Err(FrameError::Truncated(_))));
    }

    #[test]
    fn payload_beyond_the_limit_is_rejected() {
        let m = Message::Chunk(ChunkHeader {
            round: 0,
            index: 0,
            kind: crate::ChunkKind::Raw,
            cv: [0; 32],
            payload_len: MAX_PAYLOAD as u32 + 1,
        });
        let mut d = FrameDecoder::new();
        d.push(&encode(&m).unwrap());
        assert!(matches!(
            d.next_item(),
            Err(FrameError::PayloadOversized { .. })
        ));
    }
}
