//! `wire::proto::frame`: one frame body (`decode_body`, postcard `Message`), and a byte stream
//! through `FrameDecoder` pushed in slices whose sizes the input picks.

use super::{MIB64, Target};
use wire::proto::frame::{self, FrameDecoder, Incoming, MAX_PAYLOAD};

pub const TARGET: Target = Target {
    name: "frame",
    decoder: "wire::proto::frame::{decode_body, FrameDecoder} (postcard Message)",
    run,
    max_alloc: MIB64,
    max_len: 1 << 16,
    smoke_runs: 16000,
    seeds,
};

/// Every message that decodes re-encodes into a frame that decodes to the same message.
fn round_trips(m: &wire::proto::Message) {
    let f = frame::encode(m).expect("a decoded message fits a frame");
    assert_eq!(
        frame::decode_body(&f[frame::PREFIX..]).as_ref(),
        Ok(m),
        "re-encoded message differs"
    );
}

fn run(data: &[u8]) {
    if let Ok(m) = frame::decode_body(data) {
        assert!(m.payload_len() <= MAX_PAYLOAD);
        round_trips(&m);
    }
    // Byte 0 picks the slice size (1..=256 bytes, 0 = all at once); the rest is the stream.
    let Some((&slice, stream)) = data.split_first() else {
        return;
    };
    let slice = if slice == 0 {
        stream.len().max(1)
    } else {
        usize::from(slice)
    };
    let mut d = FrameDecoder::new();
    let mut owed = 0;
    for piece in stream.chunks(slice) {
        d.push(piece);
        loop {
            match d.next_item() {
                Ok(Some(Incoming::Message(m))) => {
                    assert_eq!(owed, 0, "a message while a payload was owed");
                    owed = m.payload_len();
                    round_trips(&m);
                }
                Ok(Some(Incoming::Payload(p))) => {
                    assert_eq!(p.len(), owed, "payload of the wrong length");
                    owed = 0;
                }
                Ok(None) => break,
                Err(e) => {
                    // Stays failed with the same error.
                    assert_eq!(d.next_item(), Err(e));
                    return;
                }
            }
        }
        assert!(d.buffered() <= stream.len());
    }
    let _ = d.finish();
}

fn seeds() -> Vec<Vec<u8>> {
    super::migration::transcripts()
        .into_iter()
        .flat_map(|t| {
            let first = t.s2d_frames.first().cloned().unwrap_or_default();
            [
                [&[0u8][..], &t.s2d].concat(),
                [&[7u8][..], &t.d2s].concat(),
                first[frame::PREFIX..].to_vec(),
            ]
        })
        .collect()
}
