//! The source session fed an arbitrary destination byte stream through the frame decoder,
//! with the fixed configuration of `migration::fixed_source` (its seeds are the honest
//! destination's replies, so mutations start deep inside a migration). The harness drives the
//! source as the transcripts did: after round 0 is acknowledged a mark and round 1, after round
//! 1 the switchover. Nothing may panic.

use super::migration::fixed_source;
use super::{MIB64, Target};
use wire::proto::msg::Mode;
use wire::proto::{Action, FrameDecoder, Incoming, SourceSession};

pub const TARGET: Target = Target {
    name: "source_stream",
    decoder: "wire::proto::SourceSession::handle behind FrameDecoder",
    run,
    max_alloc: MIB64,
    max_len: 1 << 16,
    smoke_runs: 6000,
    seeds,
};

fn drain(s: &mut SourceSession) -> bool {
    let mut done = false;
    while let Some(a) = s.poll_action() {
        if matches!(a, Action::Finished(_) | Action::Failed(_)) {
            done = true;
        }
    }
    done
}

fn run(data: &[u8]) {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let mode = if ctl & 1 != 0 {
        Mode::Postcopy
    } else {
        Mode::Precopy
    };
    let slice = match usize::from(ctl >> 1) {
        0 => stream.len().max(1),
        n => n,
    };
    let mut s = SourceSession::new(fixed_source(mode)).expect("valid config");
    let mut dec = FrameDecoder::new();
    drain(&mut s);
    for piece in stream.chunks(slice) {
        dec.push(piece);
        loop {
            match dec.next_item() {
                Ok(Some(Incoming::Message(m))) => {
                    let _ = s.handle(m);
                }
                Ok(Some(Incoming::Payload(_))) => {
                    // A destination never announces a payload; the source never sees one
                    // unless the driver misroutes it. Tell the session the stream is bad.
                    let _ = s.on_frame_error(wire::proto::FrameError::Empty);
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = s.on_frame_error(e);
                    drain(&mut s);
                    return;
                }
            }
            if drain(&mut s) {
                return;
            }
            if s.rounds_acked() && !s.is_streaming() {
                match s.round() {
                    1 => {
                        let _ = s.mark(16, 1 + 3 * 512);
                        let _ = s.start_round();
                    }
                    2 => {
                        let _ = s.switchover(mode == Mode::Postcopy);
                    }
                    _ => {}
                }
                if drain(&mut s) {
                    return;
                }
            }
        }
    }
    let _ = s.peer_lost();
    drain(&mut s);
    let _ = (s.phase(), s.stats(), s.round());
}

fn seeds() -> Vec<Vec<u8>> {
    super::migration::fixed_transcripts()
        .into_iter()
        .flat_map(|(mode, t)| {
            let m = u8::from(mode == Mode::Postcopy);
            [[&[m][..], &t.d2s].concat(), [&[m | 14][..], &t.d2s].concat()]
        })
        .collect()
}
