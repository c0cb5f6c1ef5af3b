//! The destination session fed an arbitrary source byte stream through the frame decoder, with
//! the fixed policy of `migration::fixed_policy` (its seeds are honest transcripts, so
//! mutations start deep inside a migration). Nothing may panic; commits are answered durably
//! or failed as the first byte says.

use super::migration::fixed_policy;
use super::{MIB64, Target};
use wire::proto::{Action, DestSession, FrameDecoder, Incoming};

pub const TARGET: Target = Target {
    name: "dest_stream",
    decoder: "wire::proto::DestSession::{handle, on_payload} behind FrameDecoder",
    run,
    max_alloc: MIB64,
    max_len: 1 << 18,
    smoke_runs: 6000,
    seeds,
};

fn drain(d: &mut DestSession, fail_commits: bool) -> bool {
    let mut done = false;
    while let Some(a) = d.poll_action() {
        match a {
            Action::Commit { .. } => {
                let _ = if fail_commits {
                    d.commit_failed("fuzz")
                } else {
                    d.committed_durably()
                };
            }
            Action::Finished(_) | Action::Failed(_) => done = true,
            _ => {}
        }
    }
    done
}

fn run(data: &[u8]) {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let fail_commits = ctl & 0x80 != 0;
    let slice = match usize::from(ctl & 0x7f) {
        0 => stream.len().max(1),
        n => n * 97,
    };
    let mut d = DestSession::new(fixed_policy());
    let mut dec = FrameDecoder::new();
    for piece in stream.chunks(slice) {
        dec.push(piece);
        loop {
            let r = match dec.next_item() {
                Ok(Some(Incoming::Message(m))) => d.handle(m),
                Ok(Some(Incoming::Payload(p))) => d.on_payload(&p),
                Ok(None) => break,
                Err(e) => {
                    let _ = d.on_frame_error(e);
                    let _ = drain(&mut d, fail_commits);
                    return;
                }
            };
            let _ = r;
            if drain(&mut d, fail_commits) {
                return;
            }
        }
    }
    let _ = dec.finish();
    let _ = d.peer_lost();
    let _ = drain(&mut d, fail_commits);
    let _ = (d.state(), d.owns(), d.phase(), d.stats());
}

fn seeds() -> Vec<Vec<u8>> {
    super::migration::fixed_transcripts()
        .into_iter()
        .flat_map(|(_, t)| [[&[0u8][..], &t.s2d].concat(), [&[3u8][..], &t.s2d].concat()])
        .collect()
}
