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
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
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
    let mut stall = StallClock::new(r.limits().frame_stall);
    tokio::spawn(async move {
        let q = r.quinn();
        let mut body = Vec::new();
        loop {
            let (msg, ev) = match read_message(q, &mut body, &mut stall).await {
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
                let ev = match read_payload(q, msg, &mut stall, frame_len).await {
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

/// The frame-stall limit: inside a frame, every read must make progress within `limit`.
///
/// One timer per reader, re-armed only when it fires (then to the last progress + `limit`),
/// instead of a fresh `timeout` around every read: a bulk chunk takes dozens of reads, and
/// registering and cancelling a timer for each was measurable in `bench migrate`.
struct StallClock {
    limit: Duration,
    last_progress: Instant,
    timer: Pin<Box<Sleep>>,
}

impl StallClock {
    fn new(limit: Duration) -> Self {
        StallClock {
            limit,
            last_progress: Instant::now(),
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }

    /// A frame begins: the limit counts from now.
    fn start(&mut self) {
        self.last_progress = Instant::now();
    }

    /// Run `read`; `None` if it made no progress within the limit (since the last progress).
    async fn guard<T>(&mut self, read: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(read);
        loop {
            tokio::select! {
                biased;
                v = &mut read => {
                    self.last_progress = Instant::now();
                    return Some(v);
                }
                () = &mut self.timer => {
                    let due = self.last_progress + self.limit;
                    if Instant::now() >= due {
                        return None;
                    }
                    // Progress since the timer was armed: wait for the rest.
                    self.timer.as_mut().reset(due);
                }
            }
        }
    }
}

/// The next frame's message; `Err` with the event that ends the stream.
async fn read_message(
    q: &mut RecvStream,
    body: &mut Vec<u8>,
    stall: &mut StallClock,
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
    stall.start();
    fill(q, &mut prefix[1..], frame::PREFIX - 1, stall, 1).await?;
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(NetEvent::Bad(FrameError::Oversized {
            len: len as u64,
            max: MAX_FRAME,
        }));
    }
    body.clear();
    body.reserve(len);
    fill(q, &mut *body, len, stall, frame::PREFIX).await?;
    frame::decode_body(body).map_err(NetEvent::Bad)
}

/// Read exactly `len` bytes into `buf` (a slice, or a `Vec`'s spare capacity: no zero-fill
/// first, 64 KiB per bulk chunk), each read making progress within the stall limit
/// (`before`: bytes of this frame already received, for the error).
async fn fill(
    q: &mut RecvStream,
    mut buf: impl bytes::BufMut,
    len: usize,
    stall: &mut StallClock,
    before: usize,
) -> Result<(), NetEvent> {
    use tokio::io::AsyncReadExt;
    let mut got = 0;
    while got < len {
        // `take` keeps the read from running past this item into the next one.
        let want = (len - got) as u64;
        match stall.guard((&mut *q).take(want).read_buf(&mut buf)).await {
            None => return Err(stalled(before + got, stall.limit)),
            Some(Ok(0)) => return Err(NetEvent::Bad(FrameError::Truncated(before + got))),
            Some(Ok(n)) => got += n,
            Some(Err(e)) => return Err(NetEvent::Lost(e.to_string())),
        }
    }
    Ok(())
}

/// Exactly `len` bytes of payload (see [`fill`]).
async fn read_payload(
    q: &mut RecvStream,
    len: usize,
    stall: &mut StallClock,
    before: usize,
) -> Result<Vec<u8>, NetEvent> {
    let mut p = Vec::with_capacity(len);
    fill(q, &mut p, len, stall, before).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_stall_limit_counts_from_the_last_progress_not_the_frame_start() {
        let limit = Duration::from_secs(10);
        let mut clock = StallClock::new(limit);
        // A long quiet spell between frames leaves the timer armed in the past.
        tokio::time::sleep(Duration::from_secs(25)).await;
        clock.start();
        // Five reads of 6 s each: 30 s inside one frame, never 10 s without progress.
        for _ in 0..5 {
            let read = tokio::time::sleep(Duration::from_secs(6));
            assert_eq!(clock.guard(read).await, Some(()));
        }
        // Then no progress at all: given up once the limit has passed since the last read.
        let t = Instant::now();
        assert_eq!(clock.guard(std::future::pending::<()>()).await, None);
        let waited = t.elapsed();
        assert!(
            waited >= limit && waited < limit + Duration::from_millis(5),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_that_starts_after_a_quiet_spell_gets_the_whole_limit() {
        let limit = Duration::from_secs(10);
        let mut clock = StallClock::new(limit);
        tokio::time::sleep(Duration::from_secs(9)).await;
        clock.start();
        // The timer was armed at creation (due at 10 s); the frame started at 9 s and a read of
        // 8 s is within its limit.
        let read = tokio::time::sleep(Duration::from_secs(8));
        assert_eq!(clock.guard(read).await, Some(()));
    }
}
