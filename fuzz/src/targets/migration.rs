//! The sans-IO sessions against each other: a real `SourceSession` and a real `DestSession`
//! joined by two byte streams through the real frame codec, driven by a script the input
//! spells (deliver some bytes either way, poll some actions, marks on either side, rounds,
//! switchover, aborts, lost peers, commits made durable or failed, forged bytes).
//!
//! Neither session may panic, whatever the order of events. And unless the script forged
//! source→destination bytes (a lying source is out of the protocol's reach: it proves only
//! that the destination holds what the source claims), the safety rule must hold: every
//! `consistent` commit of the destination is a superset of every block the source or the
//! destination marked before it, and no session fails blaming its peer (bad chunk, bad delta,
//! root mismatch, unexpected message, malformed frame) when both peers were honest.

use super::input::Input;
use super::{MIB64, Target};
use wire::proto::msg::Mode;
use wire::proto::{
    Action, DestPolicy, DestSession, Expectation, FrameDecoder, Incoming, PeerError, SourceConfig,
    SourceSession, frame,
};
use wire::{Bitmap, CHUNK_BYTES, Checkpoint, DiskId, Geometry, State};

pub const TARGET: Target = Target {
    name: "migration",
    decoder: "wire::proto::{SourceSession, DestSession} driven against each other by a script",
    run,
    max_alloc: MIB64,
    max_len: 4096,
    smoke_runs: 2400,
    seeds,
};

/// Blocks per 64 KiB chunk of raw bitmap.
const CHUNK_BLOCKS: u64 = CHUNK_BYTES as u64 * 8;

/// The disk every fixed configuration migrates.
pub fn disk() -> DiskId {
    DiskId::new("vm1/vda").expect("valid disk id")
}

/// Geometries small enough to run thousands of times a second, from one block to a chunk and a
/// bit of a second one (every chunk-boundary case: one short chunk, one full, full + short).
fn geometry(pick: u8) -> Geometry {
    let blocks = match pick % 6 {
        0 => 1,
        1 => 777,
        2 => 4096 * 8 + 3,
        3 => CHUNK_BLOCKS,
        4 => CHUNK_BLOCKS + 4099,
        _ => CHUNK_BLOCKS + 1,
    };
    Geometry::new(blocks * 512 - 100, 512).expect("valid geometry")
}

/// The source bitmap of the fixed configuration ([`fixed_source`]): two chunks, the last one
/// short, with blocks in both (small enough for thousands of runs a second).
fn fixed_bitmap() -> Bitmap {
    let mut b = Bitmap::new(geometry(4));
    for (a, e) in [(3, 9), (70_000, 70_001), (CHUNK_BLOCKS + 5, CHUNK_BLOCKS + 300)] {
        b.set_blocks(a, e);
    }
    b.set_blocks(CHUNK_BLOCKS + 4000, CHUNK_BLOCKS + 4099);
    b
}

/// The source configuration `source_stream` fuzzes, and the transcripts' source.
pub fn fixed_source(mode: Mode) -> SourceConfig {
    SourceConfig {
        host: "src".into(),
        disk: disk(),
        bitmap: fixed_bitmap(),
        checkpoint: Some(Checkpoint {
            id: "backup-1".into(),
            manifest_root: Some([4; 32]),
        }),
        epoch: 5,
        mode,
    }
}

/// The destination policy `dest_stream` fuzzes, and the transcripts' destination.
pub fn fixed_policy() -> DestPolicy {
    DestPolicy {
        expected: vec![Expectation {
            disk: disk(),
            from: None,
            owned_epoch: None,
            retired_at: None,
            epoch_unknown: None,
        }],
        allow_postcopy: true,
    }
}

/// Whether a failure blames the peer for something an honest peer never does.
pub fn blames_peer(e: &PeerError) -> bool {
    !matches!(
        e,
        PeerError::Lost | PeerError::Aborted { .. } | PeerError::Refused { .. }
    )
}

struct Side {
    /// Bytes sent towards this side, not yet delivered.
    inbox: Vec<u8>,
    dec: FrameDecoder,
    frame_failed: bool,
    done: bool,
}

impl Side {
    fn new() -> Self {
        Side {
            inbox: Vec::new(),
            dec: FrameDecoder::new(),
            frame_failed: false,
            done: false,
        }
    }
}

/// One run of both sessions.
struct Run {
    src: SourceSession,
    dst: DestSession,
    /// Source → destination stream (at the destination's side) and back.
    at_dst: Side,
    at_src: Side,
    /// Every block either side marked so far (with the source's starting bitmap).
    truth: Bitmap,
    /// The destination agent's marks for the arriving disk: the agent holds them outside the
    /// session and merges them into the committed bitmap at adoption (docs/protocol.md §5.5),
    /// so a consistent commit together with these must cover `truth`.
    held: Bitmap,
    /// Source hand-overs polled and not yet answered.
    handovers: u32,
    /// Source → destination bytes were forged: the safety checks are off.
    forged: bool,
    /// Destination → source bytes were forged: either side may now blame the other.
    replies_forged: bool,
    /// Destination commits polled and not yet answered.
    commits: u32,
    /// The source handed out a frame whose payload it has not handed out yet.
    src_owes_payload: bool,
    /// Answer commits at once (the transcripts).
    auto_durable: bool,
    /// Every byte each way, and the source's frames one by one (the transcripts).
    s2d: Vec<u8>,
    d2s: Vec<u8>,
    s2d_frames: Vec<Vec<u8>>,
}

impl Run {
    fn new(cfg: SourceConfig, policy: DestPolicy) -> Run {
        let mut truth = Bitmap::new(cfg.bitmap.geometry());
        let _ = truth.merge(&cfg.bitmap);
        Run {
            held: Bitmap::new(cfg.bitmap.geometry()),
            handovers: 0,
            src: SourceSession::new(cfg).expect("valid source config"),
            dst: DestSession::new(policy),
            at_dst: Side::new(),
            at_src: Side::new(),
            truth,
            forged: false,
            replies_forged: false,
            src_owes_payload: false,
            commits: 0,
            auto_durable: false,
            s2d: Vec::new(),
            d2s: Vec::new(),
            s2d_frames: Vec::new(),
        }
    }

    fn check_failure(&self, who: &str, e: &PeerError) {
        if !self.forged && !self.replies_forged {
            assert!(
                !blames_peer(e),
                "{who} failed blaming an honest peer: {e} ({e:?})"
            );
        }
    }

    /// Before the source gets another event, the driver sends the payload of a frame it
    /// started: a frame and its payload leave together (the agent's driver handles events only
    /// with the action queue drained; a session that aborted between them would put its Abort
    /// where the payload belongs).
    fn finish_src_frame(&mut self) {
        if self.src_owes_payload {
            self.poll_src(1);
        }
    }

    /// Poll up to `n` source actions.
    fn poll_src(&mut self, n: usize) {
        for _ in 0..n {
            let Some(a) = self.src.poll_action() else {
                return;
            };
            self.src_owes_payload = matches!(&a, Action::Send(m) if m.payload_len() > 0);
            match a {
                Action::Send(m) => {
                    let f = frame::encode(&m).expect("source messages fit a frame");
                    self.at_dst.inbox.extend_from_slice(&f);
                    self.s2d.extend_from_slice(&f);
                    self.s2d_frames.push(f);
                }
                Action::SendPayload(p) => {
                    self.at_dst.inbox.extend_from_slice(&p);
                    self.s2d.extend_from_slice(&p);
                }
                Action::Failed(f) => {
                    self.check_failure("source", &f.error);
                    self.at_src.done = true;
                }
                Action::Finished(_) => self.at_src.done = true,
                Action::HandOver { .. } => {
                    if self.auto_durable {
                        let _ = self.src.handed_over_durably();
                    } else {
                        self.handovers += 1;
                    }
                }
                _ => {}
            }
        }
    }

    /// Poll up to `n` destination actions.
    fn poll_dst(&mut self, n: usize) {
        for _ in 0..n {
            let Some(a) = self.dst.poll_action() else {
                return;
            };
            match a {
                Action::Send(m) => {
                    let f = frame::encode(&m).expect("destination messages fit a frame");
                    self.at_src.inbox.extend_from_slice(&f);
                    self.d2s.extend_from_slice(&f);
                }
                Action::SendPayload(p) => {
                    self.at_src.inbox.extend_from_slice(&p);
                    self.d2s.extend_from_slice(&p);
                }
                Action::Commit { meta, bitmap } => {
                    if meta.state == State::Consistent && !self.forged {
                        let mut missing = Bitmap::new(self.truth.geometry());
                        let _ = missing.merge(&self.truth);
                        let _ = missing.subtract(&bitmap);
                        let _ = missing.subtract(&self.held);
                        assert!(
                            missing.is_clean(),
                            "safety rule: a consistent commit lacks blocks {:?}",
                            missing.runs().take(4).collect::<Vec<_>>()
                        );
                    }
                    self.commits += 1;
                    if self.auto_durable {
                        self.commits -= 1;
                        let _ = self.dst.committed_durably();
                    }
                }
                Action::Failed(f) => {
                    self.check_failure("destination", &f.error);
                    self.at_dst.done = true;
                }
                Action::Finished(_) => self.at_dst.done = true,
                _ => {}
            }
        }
    }

    /// Deliver up to `n` bytes source → destination.
    fn deliver_to_dst(&mut self, n: usize) {
        let n = n.min(self.at_dst.inbox.len());
        let bytes: Vec<u8> = self.at_dst.inbox.drain(..n).collect();
        self.at_dst.dec.push(&bytes);
        loop {
            let r = match self.at_dst.dec.next_item() {
                Ok(Some(Incoming::Message(m))) => self.dst.handle(m),
                Ok(Some(Incoming::Payload(p))) => self.dst.on_payload(&p),
                Ok(None) => break,
                Err(e) => {
                    assert!(self.forged, "honest source bytes did not decode: {e}");
                    if !std::mem::replace(&mut self.at_dst.frame_failed, true) {
                        let _ = self.dst.on_frame_error(e);
                    }
                    break;
                }
            };
            let _ = r;
            self.poll_dst(usize::MAX);
        }
    }

    /// Deliver up to `n` bytes destination → source.
    fn deliver_to_src(&mut self, n: usize) {
        let n = n.min(self.at_src.inbox.len());
        let bytes: Vec<u8> = self.at_src.inbox.drain(..n).collect();
        self.at_src.dec.push(&bytes);
        loop {
            match self.at_src.dec.next_item() {
                Ok(Some(Incoming::Message(m))) => {
                    self.finish_src_frame();
                    let _ = self.src.handle(m);
                }
                Ok(Some(Incoming::Payload(_))) => {
                    panic!("a destination message announced a payload")
                }
                Ok(None) => break,
                Err(e) => {
                    if !std::mem::replace(&mut self.at_src.frame_failed, true) {
                        self.finish_src_frame();
                        let _ = self.src.on_frame_error(e);
                    }
                    break;
                }
            }
            self.poll_src(64);
        }
    }

    /// Run honestly until nothing moves (bounded).
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let before = (self.at_dst.inbox.len(), self.at_src.inbox.len());
            self.poll_src(usize::MAX);
            self.deliver_to_dst(usize::MAX);
            self.poll_dst(usize::MAX);
            self.deliver_to_src(usize::MAX);
            if (self.at_dst.inbox.len(), self.at_src.inbox.len()) == (0, 0) && before == (0, 0) {
                return;
            }
        }
    }

    fn range(&self, inp: &mut Input) -> (u64, u64) {
        let size = self.truth.geometry().size();
        let off = inp.u64() % size;
        let len = 1 + u64::from(inp.u16()) * 512;
        (off, len.min(size - off))
    }

    fn step(&mut self, inp: &mut Input) {
        let op = inp.below(16);
        if matches!(op, 4 | 5 | 7 | 8 | 11) {
            self.finish_src_frame();
        }
        match op {
            0 => self.deliver_to_dst(usize::from(inp.u16())),
            1 => self.deliver_to_src(usize::from(inp.u8())),
            2 => self.poll_src(usize::from(inp.u8() % 8) + 1),
            3 => self.poll_dst(usize::from(inp.u8() % 8) + 1),
            4 | 5 => {
                let (off, len) = self.range(inp);
                if self.src.mark(off, len).is_ok() {
                    let _ = self.truth.mark(off, len);
                }
            }
            6 => {
                // A write on the destination host, acknowledged by its agent into the held
                // marks of the arriving disk.
                let (off, len) = self.range(inp);
                if self.held.mark(off, len).is_ok() {
                    let _ = self.truth.mark(off, len);
                }
            }
            7 => {
                let _ = self.src.start_round();
            }
            8 => {
                let _ = self.src.switchover(inp.u8() & 1 == 1);
            }
            9 if inp.u8() & 1 == 1 => {
                if self.handovers > 0 {
                    self.handovers -= 1;
                    let _ = self.src.handed_over_durably();
                } else {
                    assert!(self.src.handed_over_durably().is_err());
                }
            }
            10 if inp.u8() & 1 == 1 => {
                if self.handovers > 0 {
                    self.handovers -= 1;
                    let _ = self.src.hand_over_failed();
                }
            }
            9 => {
                if self.commits > 0 {
                    self.commits -= 1;
                    let _ = self.dst.committed_durably();
                } else {
                    // Misuse is an error, not a panic.
                    assert!(self.dst.committed_durably().is_err());
                }
            }
            10 => {
                if self.commits > 0 {
                    self.commits -= 1;
                    let _ = self.dst.commit_failed("disk full");
                }
            }
            11 => match inp.u8() % 4 {
                0 => {
                    let _ = self.src.peer_lost();
                }
                1 => {
                    let _ = self.dst.peer_lost();
                }
                2 => {
                    let _ = self.src.abort();
                }
                _ => {
                    let _ = self.dst.abort();
                }
            },
            12 => self.settle(),
            13 => {
                // Forge: flip a byte of the source's bytes in flight.
                let at = usize::from(inp.u16());
                let x = inp.u8() | 1;
                if let Some(b) = self.at_dst.inbox.get_mut(at) {
                    *b ^= x;
                    self.forged = true;
                }
            }
            14 => {
                // Forge: insert or cut bytes in the source's stream.
                let at = usize::from(inp.u16()).min(self.at_dst.inbox.len());
                let n = usize::from(inp.u8() % 16);
                let bytes = inp.bytes(n);
                if inp.u8() & 1 == 0 {
                    self.at_dst.inbox.splice(at..at, bytes.iter().copied());
                    self.forged |= !bytes.is_empty();
                } else {
                    let end = (at + bytes.len()).min(self.at_dst.inbox.len());
                    self.forged |= end > at;
                    self.at_dst.inbox.drain(at..end);
                }
            }
            _ => {
                // The destination's replies may be damaged too; the source must cope.
                let at = usize::from(inp.u8());
                let x = inp.u8() | 1;
                if let Some(b) = self.at_src.inbox.get_mut(at) {
                    *b ^= x;
                    self.replies_forged = true;
                }
            }
        }
    }
}

fn setup(inp: &mut Input) -> Run {
    let g = geometry(inp.u8());
    let flags = inp.u8();
    let mut bitmap = Bitmap::new(g);
    for _ in 0..inp.below(4) {
        let a = inp.u64() % g.blocks();
        let e = (a + 1 + u64::from(inp.u16())).min(g.blocks());
        bitmap.set_blocks(a, e);
    }
    let mode = if flags & 1 != 0 {
        Mode::Postcopy
    } else {
        Mode::Precopy
    };
    let cfg = SourceConfig {
        bitmap,
        epoch: u64::from(flags >> 4),
        mode,
        ..fixed_source(mode)
    };
    let mut policy = fixed_policy();
    policy.allow_postcopy = flags & 2 != 0;
    let exp = &mut policy.expected[0];
    if flags & 4 != 0 {
        exp.owned_epoch = Some(u64::from(inp.u8() % 8));
    }
    if flags & 8 != 0 {
        exp.retired_at = Some(u64::from(inp.u8() % 8));
    }
    Run::new(cfg, policy)
}

fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut r = setup(&mut inp);
    let mut steps = 0;
    while !inp.is_empty() && steps < 2000 {
        r.step(&mut inp);
        steps += 1;
    }
    // Whatever happened, both sessions still answer without panicking.
    r.settle();
    let _ = (r.src.phase(), r.dst.phase(), r.dst.state(), r.dst.owns());
}

/// What an honest migration of the fixed configuration sends each way.
pub struct Transcript {
    /// Source → destination bytes.
    pub s2d: Vec<u8>,
    /// Destination → source bytes.
    pub d2s: Vec<u8>,
    /// The source's frames, one by one.
    pub s2d_frames: Vec<Vec<u8>>,
}

/// Scripts for honest migrations: (flags byte, marks between rounds, postcopy switchover).
fn scripts() -> Vec<Vec<u8>> {
    // setup: geometry 4, flags, no extra marks.
    let pre = |flags: u8, postcopy: u8| -> Vec<u8> {
        let mut s = vec![4, flags, 0];
        s.push(12); // settle: bulk + round 0 ack
        s.extend([4, 0x10, 0, 0, 0, 0, 0, 0, 0, 3, 0]); // source mark at 16 + 3*512 bytes
        s.extend([7, 12]); // round 1, settle
        s.extend([6, 0x20, 0, 0, 0, 0, 0, 0, 0, 1, 0]); // destination early mark
        s.extend([4, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0]); // source mark in the last chunk
        s.extend([8, postcopy, 12]); // switchover, settle
        s.extend([9, 1, 12]); // hand-over durable (the Switchover leaves), settle
        s.extend([9, 0, 12, 9, 0, 12]); // commits durable, settle
        s
    };
    vec![
        pre(0x52, 0),
        pre(0x53, 1),
        pre(0x53, 0),
        // A post-copy cut by a lost source.
        vec![4, 0x53, 0, 12, 8, 1, 9, 1, 2, 3, 0, 0x40, 11, 1, 12, 9, 0, 9, 0],
        // Refused: stale epoch (offered 0, owned 0).
        vec![2, 0x04, 0, 0, 12],
    ]
}

/// Transcripts of the honest scripts, with the commits answered at once.
pub fn transcripts() -> Vec<Transcript> {
    scripts()
        .into_iter()
        .map(|script| {
            let mut inp = Input::new(&script);
            let mut r = setup(&mut inp);
            r.auto_durable = true;
            while !inp.is_empty() {
                r.step(&mut inp);
            }
            r.settle();
            Transcript {
                s2d: r.s2d,
                d2s: r.d2s,
                s2d_frames: r.s2d_frames,
            }
        })
        .collect()
}

/// The fixed configuration's own transcripts (what `dest_stream` and `source_stream` replay):
/// bulk, one round after a mark, switchover, commits answered at once.
pub fn fixed_transcripts() -> Vec<(Mode, Transcript)> {
    [(Mode::Precopy, 0u8), (Mode::Postcopy, 1)]
        .into_iter()
        .map(|(mode, postcopy)| {
            let mut r = Run::new(fixed_source(mode), fixed_policy());
            r.auto_durable = true;
            let script = [
                12u8, 4, 0x10, 0, 0, 0, 0, 0, 0, 0, 3, 0, 7, 12, 8, postcopy, 12,
            ];
            let mut inp = Input::new(&script);
            while !inp.is_empty() {
                r.step(&mut inp);
            }
            r.settle();
            let t = Transcript {
                s2d: r.s2d,
                d2s: r.d2s,
                s2d_frames: r.s2d_frames,
            };
            (mode, t)
        })
        .collect()
}

fn seeds() -> Vec<Vec<u8>> {
    scripts()
}
