//! Moving protocol frames and payloads between a session and a QUIC stream.
//!
//! Reading runs in its own task that reads whole items off the stream and forwards them, so the
//! session loop can `select!` on items and commands without cancelling a half-read frame.
//!
//! The reader reads each frame's length prefix, checks it against the protocol's maximum before
//! reading the body, decodes the body, then reads exactly the announced payload straight into
//! the buffer it forwards: one copy out of quinn, none through an intermediate decoder buffer
//! (the bulk path's hot loop; `bitferry bench migrate`). It reports exactly what
//! [`wire::proto::FrameDecoder`] would for the same bytes.

use crate::transport::{FrameReader, FrameWriter, TransportError};
use bytes::Bytes;
use quinn::{ReadExactError, RecvStream};
use std::time::Duration;
use tokio::sync::mpsc;
use wire::proto::{Action, FrameError, Incoming, MAX_FRAME, frame};

/// What the reader task saw.
#[derive(Debug)]
pub enum NetEvent {
    /// A message or the payload after a Chunk/Delta header.
    Item(Incoming),
    /// The peer sent bytes that are not a valid frame.
    Bad(FrameError),
    /// The stream or connection ended (cleanly or not).
    Lost(String),
}

/// Read `r` until it ends, forwarding decoded items. Memory is bounded by the channel's
/// capacity times the largest item. Inside a frame (from its first byte to the end of its
/// payload) every read must make progress within the reader's `frame_stall` limit, or the
/// stream is reported as [`FrameError::Stalled`].
pub fn spawn_reader(mut r: FrameReader) -> mpsc::Receiver<NetEvent> {
    let (tx, rx) = mpsc::channel(64);
    let stall = r.limits().frame_stall;
    tokio::spawn(async move {
        let q = r.quinn();
        let mut body = Vec::new();
        loop {
            let (msg, ev) = match read_message(q, &mut body, stall).await {
                Ok(m) => (m.payload_len(), NetEvent::Item(Incoming::Message(m))),
                Err(ev) => {
                    let _ = tx.send(ev).await;
                    return;
                }
            };
            if tx.send(ev).await.is_err() {
                return;
            }
            if msg > 0 {
                // `decode_body` bounded the announced length by MAX_PAYLOAD.
                let frame_len = frame::PREFIX + body.len();
                let ev = match read_payload(q, msg, stall, frame_len).await {
                    Ok(p) => NetEvent::Item(Incoming::Payload(p)),
                    Err(ev) => {
                        let _ = tx.send(ev).await;
                        return;
                    }
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next frame's message; `Err` with the event that ends the stream.
async fn read_message(
    q: &mut RecvStream,
    body: &mut Vec<u8>,
    stall: Duration,
) -> Result<wire::proto::Message, NetEvent> {
    let mut prefix = [0u8; frame::PREFIX];
    // Waiting for a frame to begin has no limit: a stream is quiet between rounds.
    match q.read_exact(&mut prefix[..1]).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => {
            return Err(NetEvent::Lost("the peer finished its stream".into()));
        }
        Err(e) => return Err(ended(e, 0)),
    }
    read_within(q, &mut prefix[1..], stall, 1).await?;
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(NetEvent::Bad(FrameError::Oversized {
            len: len as u64,
            max: MAX_FRAME,
        }));
    }
    body.clear();
    body.resize(len, 0);
    read_within(q, body, stall, frame::PREFIX).await?;
    frame::decode_body(body).map_err(NetEvent::Bad)
}

/// Fill `buf`, each read making progress within `stall` (`before`: bytes of this frame
/// already received, for the error).
async fn read_within(
    q: &mut RecvStream,
    buf: &mut [u8],
    stall: Duration,
    before: usize,
) -> Result<(), NetEvent> {
    let mut got = 0;
    while got < buf.len() {
        match tokio::time::timeout(stall, q.read(&mut buf[got..])).await {
            Err(_) => return Err(stalled(before + got, stall)),
            Ok(Ok(Some(n))) => got += n,
            Ok(Ok(None)) => return Err(NetEvent::Bad(FrameError::Truncated(before + got))),
            Ok(Err(e)) => return Err(NetEvent::Lost(e.to_string())),
        }
    }
    Ok(())
}

/// Exactly `len` bytes of payload, read into spare capacity (no zero-fill first: 64 KiB per
/// bulk chunk), each read making progress within `stall`.
async fn read_payload(
    q: &mut RecvStream,
    len: usize,
    stall: Duration,
    before: usize,
) -> Result<Vec<u8>, NetEvent> {
    use tokio::io::AsyncReadExt;
    let mut p = Vec::with_capacity(len);
    while p.len() < len {
        // `take` keeps the read from running past this payload into the next frame.
        let want = (len - p.len()) as u64;
        match tokio::time::timeout(stall, (&mut *q).take(want).read_buf(&mut p)).await {
            Err(_) => return Err(stalled(before + p.len(), stall)),
            Ok(Ok(0)) => return Err(NetEvent::Bad(FrameError::Truncated(before + p.len()))),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(NetEvent::Lost(e.to_string())),
        }
    }
    Ok(p)
}

fn stalled(buffered: usize, stall: Duration) -> NetEvent {
    NetEvent::Bad(FrameError::Stalled {
        buffered,
        ms: stall.as_millis() as u64,
    })
}

/// The event for a read that stopped early (after `before` bytes of the item already read)
/// or a lost stream.
fn ended(e: ReadExactError, before: usize) -> NetEvent {
    match e {
        ReadExactError::FinishedEarly(got) => NetEvent::Bad(FrameError::Truncated(before + got)),
        ReadExactError::ReadError(e) => NetEvent::Lost(e.to_string()),
    }
}

/// Perform a `Send` or `SendPayload` action. Other actions are the caller's. A write that
/// quinn cannot accept within the writer's `frame_stall` limit (the peer stopped reading, so
/// flow control holds it) fails with [`TransportError::Timeout`]: the peer counts as lost.
pub async fn send(w: &mut FrameWriter, a: Action) -> Result<(), TransportError> {
    let bytes = match a {
        // Every field of a wire message is bounded, so it always fits a frame.
        Action::Send(m) => Bytes::from(frame::encode(&m).expect("wire messages fit in a frame")),
        Action::SendPayload(p) => Bytes::from(p),
        other => unreachable!("not a send action: {other:?}"),
    };
    let stall = w.limits().frame_stall;
    match tokio::time::timeout(stall, w.send_payload(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout {
            what: "the peer to read what was sent",
            after: stall,
        }),
    }
}
