//! Moving protocol frames and payloads between a session and a QUIC stream.
//!
//! Reading runs in its own task that feeds a [`FrameDecoder`] and forwards whole items, so the
//! session loop can `select!` on items and commands without cancelling a half-read frame.

use crate::transport::{FrameReader, FrameWriter, TransportError};
use bytes::Bytes;
use tokio::sync::mpsc;
use wire::proto::{Action, FrameDecoder, FrameError, Incoming, frame};

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
/// capacity times the largest item.
pub fn spawn_reader(mut r: FrameReader) -> mpsc::Receiver<NetEvent> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut dec = FrameDecoder::new();
        loop {
            match r.quinn().read_chunk(1 << 20, true).await {
                Ok(Some(chunk)) => {
                    dec.push(&chunk.bytes);
                    loop {
                        match dec.next_item() {
                            Ok(Some(item)) => {
                                if tx.send(NetEvent::Item(item)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx.send(NetEvent::Bad(e)).await;
                                return;
                            }
                        }
                    }
                }
                Ok(None) => {
                    let ev = match dec.finish() {
                        Ok(()) => NetEvent::Lost("the peer finished its stream".into()),
                        Err(e) => NetEvent::Bad(e),
                    };
                    let _ = tx.send(ev).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(NetEvent::Lost(e.to_string())).await;
                    return;
                }
            }
        }
    });
    rx
}

/// Perform a `Send` or `SendPayload` action. Other actions are the caller's.
pub async fn send(w: &mut FrameWriter, a: Action) -> Result<(), TransportError> {
    match a {
        Action::Send(m) => {
            // Every field of a wire message is bounded, so it always fits a frame.
            let f = frame::encode(&m).expect("wire messages fit in a frame");
            w.send_payload(Bytes::from(f)).await
        }
        Action::SendPayload(p) => w.send_payload(Bytes::from(p)).await,
        other => unreachable!("not a send action: {other:?}"),
    }
}
