//! Source and destination driven against each other in memory, through the real frame codec.
//!
//! Randomised tests print their seed; replay one with `BITFERRY_SEED=<n>`.

use super::msg::*;
use super::*;
use crate::{Bitmap, CHUNK_BYTES, DiskId, Geometry, State};

// ---------------------------------------------------------------------------------------------
// Helpers

struct Rng(u64);

impl Rng {
    fn seeded(test: &str) -> Self {
        let seed = std::env::var("BITFERRY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_1234_abcd_0001u64);
        eprintln!("{test}: seed {seed} (replay with BITFERRY_SEED={seed})");
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Four and a bit chunks at 512 B granularity (~1 GiB disk, 256 KiB of raw bitmap).
fn geom() -> Geometry {
    let blocks = 4 * CHUNK_BYTES as u64 * 8 + 1000;
    Geometry::new(blocks * 512 - 100, 512).unwrap()
}

fn disk() -> DiskId {
    DiskId::new("vm1/vda").unwrap()
}

fn policy(owned: Option<u64>) -> DestPolicy {
    DestPolicy {
        expected: vec![Expectation {
            disk: disk(),
            from: None,
            owned_epoch: owned,
            retired_at: None,
            epoch_unknown: None,
        }],
        allow_postcopy: true,
    }
}

fn source(bitmap: Bitmap, epoch: u64, mode: Mode) -> SourceSession {
    SourceSession::new(SourceConfig {
        host: "src".into(),
        disk: disk(),
        bitmap,
        checkpoint: Some(crate::Checkpoint {
            id: "backup-7".into(),
            manifest_root: None,
        }),
        epoch,
        mode,
    })
    .unwrap()
}

/// Mark `n` random small writes into both the session (through `mark`) and the ground truth.
fn random_marks(rng: &mut Rng, n: usize, mut mark: impl FnMut(u64, u64), truth: &mut Bitmap) {
    let g = truth.geometry();
    for _ in 0..n {
        let off = rng.below(g.size());
        let len = (1 + rng.below(4096)).min(g.size() - off);
        mark(off, len);
        truth.mark(off, len).unwrap();
    }
}

#[derive(Debug, Clone)]
enum End {
    Finished(Outcome),
    Failed(Failure),
}

impl End {
    fn outcome(&self) -> Outcome {
        match self {
            End::Finished(o) => *o,
            End::Failed(f) => f.outcome,
        }
    }
    fn error(&self) -> Option<&PeerError> {
        match self {
            End::Finished(_) => None,
            End::Failed(f) => Some(&f.error),
        }
    }
}

type Tamper = Box<dyn FnMut(&mut Action) -> bool>;

/// Moves actions of each session onto an in-memory "stream" and feeds the other side through a
/// [`FrameDecoder`], in slices of `slice` bytes.
struct Pump {
    src: SourceSession,
    dst: DestSession,
    s2d: Vec<u8>,
    d2s: Vec<u8>,
    sdec: FrameDecoder,
    ddec: FrameDecoder,
    /// Every Commit as the agent stores it: the session's bitmap merged with the agent's local
    /// marks (docs/protocol.md §5.5).
    commits: Vec<(CommitMeta, Bitmap)>,
    /// The agent's side of a destination: local writes held from Accept until the first
    /// Commit, then the owned bitmap every later write and Commit merges into.
    held: Option<Bitmap>,
    owned: Option<Bitmap>,
    /// Hand-overs the source asked for (epoch_next), made durable at once unless
    /// `fail_handover`.
    handovers: Vec<u64>,
    fail_handover: bool,
    rebuilds: Vec<String>,
    retired: Option<u64>,
    src_end: Option<End>,
    dst_end: Option<End>,
    auto_durable: bool,
    slice: usize,
    /// Applied to every source action before it is sent; `false` drops it.
    tamper: Option<Tamper>,
    /// Every byte the source put on the stream.
    transcript: Vec<u8>,
}

impl Pump {
    fn new(src: SourceSession, dst: DestSession) -> Self {
        Pump {
            src,
            dst,
            s2d: Vec::new(),
            d2s: Vec::new(),
            sdec: FrameDecoder::new(),
            ddec: FrameDecoder::new(),
            commits: Vec::new(),
            held: None,
            owned: None,
            handovers: Vec::new(),
            fail_handover: false,
            rebuilds: Vec::new(),
            retired: None,
            src_end: None,
            dst_end: None,
            auto_durable: true,
            slice: 7000,
            tamper: None,
            transcript: Vec::new(),
        }
    }

    fn pull_src(&mut self, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(mut a) = self.src.poll_action() else {
                break;
            };
            // The hand-over is local bookkeeping, not a step on the stream.
            if !matches!(a, Action::HandOver { .. }) {
                n += 1;
            }
            if let Some(t) = self.tamper.as_mut()
                && !t(&mut a)
            {
                continue;
            }
            match a {
                Action::Send(m) => {
                    let f = frame::encode(&m).unwrap();
                    self.s2d.extend_from_slice(&f);
                    self.transcript.extend_from_slice(&f);
                }
                Action::SendPayload(p) => {
                    self.s2d.extend_from_slice(&p);
                    self.transcript.extend_from_slice(&p);
                }
                Action::HandOver { epoch_next, .. } => {
                    self.handovers.push(epoch_next);
                    if self.fail_handover {
                        self.src.hand_over_failed().unwrap();
                    } else {
                        self.src.handed_over_durably().unwrap();
                    }
                }
                Action::Retire { epoch, .. } => self.retired = Some(epoch),
                Action::Finished(o) => self.src_end = Some(End::Finished(o)),
                Action::Failed(f) => self.src_end = Some(End::Failed(f)),
                a => panic!("source emitted {a:?}"),
            }
        }
        n
    }

    fn pull_dst(&mut self) -> usize {
        let mut n = 0;
        while let Some(a) = self.dst.poll_action() {
            n += 1;
            match a {
                Action::Send(m) => self.d2s.extend_from_slice(&frame::encode(&m).unwrap()),
                Action::SendPayload(p) => self.d2s.extend_from_slice(&p),
                Action::Commit { meta, mut bitmap } => {
                    // What the agent does: fold its local marks into what it stores.
                    if let Some(h) = self.held.take() {
                        bitmap.merge(&h).unwrap();
                    }
                    if let Some(o) = self.owned.take() {
                        bitmap.merge(&o).unwrap();
                    }
                    self.owned = Some(bitmap.clone());
                    self.commits.push((meta, bitmap));
                    if self.auto_durable {
                        self.dst.committed_durably().unwrap();
                    }
                }
                Action::RebuildNeeded { reason, .. } => self.rebuilds.push(reason),
                Action::Finished(o) => self.dst_end = Some(End::Finished(o)),
                Action::Failed(f) => self.dst_end = Some(End::Failed(f)),
                a => panic!("destination emitted {a:?}"),
            }
        }
        n
    }

    /// Deliver everything in flight both ways. Returns whether any byte moved.
    fn deliver(&mut self) -> bool {
        let moved = !self.s2d.is_empty() || !self.d2s.is_empty();
        let bytes = std::mem::take(&mut self.s2d);
        for piece in bytes.chunks(self.slice.max(1)) {
            self.ddec.push(piece);
            loop {
                match self.ddec.next_item() {
                    Ok(Some(Incoming::Message(m))) => {
                        let _ = self.dst.handle(m);
                    }
                    Ok(Some(Incoming::Payload(p))) => {
                        let _ = self.dst.on_payload(&p);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = self.dst.on_frame_error(e);
                        break;
                    }
                }
            }
        }
        let bytes = std::mem::take(&mut self.d2s);
        self.sdec.push(&bytes);
        loop {
            match self.sdec.next_item() {
                Ok(Some(Incoming::Message(m))) => {
                    let _ = self.src.handle(m);
                }
                Ok(Some(Incoming::Payload(_))) => panic!("destination sent a payload"),
                Ok(None) => break,
                Err(e) => {
                    let _ = self.src.on_frame_error(e);
                    break;
                }
            }
        }
        moved
    }

    /// Run until nothing moves any more.
    fn run(&mut self) {
        for _ in 0..1_000_000 {
            let n = self.pull_src(usize::MAX) + self.pull_dst();
            if !self.deliver() && n == 0 {
                return;
            }
        }
        panic!("pump did not settle");
    }

    /// One exchange with the source limited to `max` actions.
    fn step_src(&mut self, max: usize) {
        self.pull_src(max);
        self.pull_dst();
        self.deliver();
        self.pull_dst();
        self.deliver();
    }

    /// A write on the destination host, recorded the way the agent does: nothing to record it
    /// in before the disk is accepted (`false`), held beside the session until the first
    /// Commit, in the owned bitmap after it.
    fn dst_mark(&mut self, offset: u64, len: u64) -> bool {
        if let Some(o) = self.owned.as_mut() {
            o.mark(offset, len).unwrap();
            return true;
        }
        let Some(g) = self.dst.geometry() else {
            return false;
        };
        self.held
            .get_or_insert_with(|| Bitmap::new(g))
            .mark(offset, len)
            .unwrap();
        true
    }

    fn dst_mark_blocks(&mut self, first: u64, end: u64) {
        let g = self.dst.geometry().expect("disk accepted");
        let b = g.granularity();
        assert!(self.dst_mark(first * b, (end - first) * b));
    }

    fn last_commit(&self) -> &(CommitMeta, Bitmap) {
        self.commits.last().expect("a commit")
    }

    fn src_outcome(&self) -> Option<Outcome> {
        self.src_end.as_ref().map(End::outcome)
    }

    fn dst_outcome(&self) -> Option<Outcome> {
        self.dst_end.as_ref().map(End::outcome)
    }
}

// ---------------------------------------------------------------------------------------------
// Happy paths

#[test]
fn precopy_rounds_converge_and_source_retires() {
    let mut rng = Rng::seeded("precopy_rounds_converge_and_source_retires");
    let g = geom();
    let mut truth = Bitmap::new(g);
    let mut initial = Bitmap::new(g);
    random_marks(&mut rng, 300, |o, l| drop(initial.mark(o, l)), &mut truth);
    truth.set_blocks(5 * 64, 5 * 64 + 3000); // a run across words
    initial.set_blocks(5 * 64, 5 * 64 + 3000);
    let mut p = Pump::new(
        source(initial, 7, Mode::Precopy),
        DestSession::new(policy(Some(3))),
    );
    // Bulk streamed a few chunks at a time, with writes landing in between, some on chunks
    // already sent and some on chunks still to come.
    for _ in 0..10 {
        p.step_src(3);
        let src = &mut p.src;
        random_marks(
            &mut rng,
            20,
            |o, l| {
                src.mark(o, l).unwrap();
            },
            &mut truth,
        );
    }
    p.run();
    assert!(!p.src.is_streaming());
    for _ in 0..3 {
        let src = &mut p.src;
        random_marks(
            &mut rng,
            50,
            |o, l| {
                src.mark(o, l).unwrap();
            },
            &mut truth,
        );
        p.src.start_round().unwrap();
        p.run();
        assert!(p.src.rounds_acked());
    }
    // A few writes in the last round, then switchover.
    let src = &mut p.src;
    random_marks(
        &mut rng,
        5,
        |o, l| {
            src.mark(o, l).unwrap();
        },
        &mut truth,
    );
    p.src.switchover(false).unwrap();
    assert!(p.src.mark(0, 1).is_err(), "no marks after switchover");
    p.run();

    let want_root = truth.root();
    assert_eq!(
        p.src_outcome(),
        Some(Outcome::Migrated {
            epoch: 8,
            root: want_root
        })
    );
    assert_eq!(
        p.dst_outcome(),
        Some(Outcome::Migrated {
            epoch: 8,
            root: want_root
        })
    );
    assert_eq!(p.retired, Some(8));
    assert_eq!(p.commits.len(), 1);
    let (meta, bm) = p.last_commit();
    assert_eq!(meta.epoch, 8);
    assert_eq!(meta.state, State::Consistent);
    assert_eq!(meta.checkpoint.as_ref().unwrap().id, "backup-7");
    assert_eq!(bm, &truth);
    assert_eq!(bm.clone().root(), want_root);
    let s = p.src.stats();
    assert_eq!(s.rounds, 4, "bulk + 3 rounds acknowledged");
    assert!(s.chunks >= 4 && s.deltas >= 3, "{s:?}");
    // The paused phase costs what the last round changed, not the disk size.
    assert!(
        s.bytes_during_switchover < 1024,
        "switchover sent {} bytes",
        s.bytes_during_switchover
    );
    assert!(s.bytes_total > s.bytes_during_switchover);
    assert_eq!(p.dst.state(), State::Consistent);
}

#[test]
fn postcopy_merges_verified_source_chunks_with_local_marks() {
    let mut rng = Rng::seeded("postcopy_merges_verified_source_chunks_with_local_marks");
    let g = geom();
    let mut src_truth = Bitmap::new(g);
    let mut initial = Bitmap::new(g);
    random_marks(
        &mut rng,
        200,
        |o, l| drop(initial.mark(o, l)),
        &mut src_truth,
    );
    let mut p = Pump::new(
        source(initial, 1, Mode::Postcopy),
        DestSession::new(policy(None)),
    );
    p.run(); // bulk
    // Writes the source never sends as a delta: they go in post-copy chunks.
    let src = &mut p.src;
    random_marks(
        &mut rng,
        100,
        |o, l| {
            src.mark(o, l).unwrap();
        },
        &mut src_truth,
    );
    p.src.switchover(true).unwrap();
    // The VM may resume (and write) on the destination before the Switchover message arrives.
    let mut local = Bitmap::new(g);
    p.dst_mark_blocks(33, 35);
    local.set_blocks(33, 35);
    // Deliver only the Switchover: the destination owns now and tracks locally at once.
    p.step_src(1);
    assert!(p.dst.owns());
    assert_eq!(p.dst.state(), State::Incomplete);
    assert_eq!(p.commits.len(), 1);
    assert_eq!(p.commits[0].0.state, State::Incomplete);
    assert_eq!(p.commits[0].0.epoch, 2);
    assert!(p.commits[0].1.is_set(33) && p.commits[0].1.is_set(34));
    let mut writes = Bitmap::new(g);
    random_marks(&mut rng, 100, |o, l| drop(writes.mark(o, l)), &mut local);
    for (o, l) in writes
        .extents()
        .map(|e| (e.offset, e.length))
        .collect::<Vec<_>>()
    {
        assert!(p.dst_mark(o, l));
    }
    // A local mark inside a chunk the source is about to replace must survive.
    p.dst_mark_blocks(17, 18);
    local.set_blocks(17, 18);
    p.run();

    let mut union = src_truth.clone();
    union.merge(&local).unwrap();
    let (meta, bm) = p.last_commit();
    assert_eq!(meta.state, State::Consistent);
    assert_eq!(meta.epoch, 2);
    assert_eq!(bm, &union);
    assert_eq!(p.dst.state(), State::Consistent);
    assert_eq!(p.owned.as_ref(), Some(&union));
    let root = src_truth.root();
    assert_eq!(p.src_outcome(), Some(Outcome::Migrated { epoch: 2, root }));
    assert_eq!(p.dst_outcome(), Some(Outcome::Migrated { epoch: 2, root }));
    assert_eq!(p.retired, Some(2));
    assert!(p.src.stats().bytes_during_switchover > 0);
}

#[test]
fn postcopy_straight_after_accept_sends_everything_as_chunks() {
    let g = geom();
    let mut initial = Bitmap::new(g);
    initial.set_blocks(0, 10);
    initial.set_blocks(g.blocks() - 3, g.blocks());
    let truth = initial.clone();
    let mut p = Pump::new(
        source(initial, 1, Mode::Postcopy),
        DestSession::new(policy(None)),
    );
    // Hello, Welcome, Offer, Accept — then switch over before any bulk chunk is pulled.
    for _ in 0..2 {
        p.step_src(1);
    }
    assert!(p.src.is_streaming());
    assert_eq!(p.src.stats().chunks, 0);
    p.src.switchover(true).unwrap();
    p.run();
    assert_eq!(p.last_commit().1, truth);
    assert_eq!(p.last_commit().0.state, State::Consistent);
    assert_eq!(p.retired, Some(2));
}

#[test]
fn switchover_in_the_middle_of_the_bulk_delivers_every_block() {
    // The source streams the bulk out of the offered bitmap itself (moved, not copied, at
    // Accept). Cut that stream after two of five chunks, with marks landing before and after
    // the cursor, and the destination must still end with exactly the union.
    let per_chunk = CHUNK_BYTES as u64 * 8;
    for postcopy in [false, true] {
        let g = geom();
        let mut initial = Bitmap::new(g);
        for c in 0..g.chunks() as u64 {
            initial.set_blocks(c * per_chunk + 7, c * per_chunk + 900);
        }
        let mut truth = initial.clone();
        let mode = if postcopy {
            Mode::Postcopy
        } else {
            Mode::Precopy
        };
        let mut p = Pump::new(source(initial, 1, mode), DestSession::new(policy(None)));
        for _ in 0..2 {
            p.step_src(1);
        }
        assert!(p.src.is_streaming());
        // Chunks 0 and 1: a header and a payload each.
        p.step_src(4);
        assert_eq!(p.src.stats().chunks, 2, "postcopy {postcopy}");
        for (a, b) in [
            (5, 6),                                      // chunk 0: already streamed
            (3 * per_chunk + 1, 3 * per_chunk + 2),      // chunk 3: not yet streamed
            (2 * per_chunk + 800, 2 * per_chunk + 1000), // chunk 2: partly new
            (g.blocks() - 1, g.blocks()),                // last block
        ] {
            p.src.mark_blocks(a, b).unwrap();
            truth.set_blocks(a, b);
        }
        p.src.switchover(postcopy).unwrap();
        p.run();
        let (meta, got) = p.last_commit();
        assert_eq!(meta.state, State::Consistent, "postcopy {postcopy}");
        assert_eq!(got, &truth, "postcopy {postcopy}");
        assert_eq!(p.retired, Some(2), "postcopy {postcopy}");
    }
}

/// docs/protocol.md §5.4: a hand-over the source cannot make durable (a full store) withdraws
/// the switchover before anything of it leaves. The session is back in its rounds, nothing was
/// committed on the destination, and a later switchover completes with every block: whether the
/// first attempt cut the bulk, and in either mode.
#[test]
fn a_failed_hand_over_withdraws_the_switchover_and_a_later_one_completes() {
    let per_chunk = CHUNK_BYTES as u64 * 8;
    for (postcopy, mid_bulk) in [(false, false), (false, true), (true, false), (true, true)] {
        let what = format!("postcopy {postcopy}, mid-bulk {mid_bulk}");
        let g = geom();
        let mut initial = Bitmap::new(g);
        for c in 0..g.chunks() as u64 {
            initial.set_blocks(c * per_chunk + 3, c * per_chunk + 500);
        }
        let mut truth = initial.clone();
        let mode = if postcopy {
            Mode::Postcopy
        } else {
            Mode::Precopy
        };
        let mut p = Pump::new(source(initial, 1, mode), DestSession::new(policy(None)));
        if mid_bulk {
            for _ in 0..2 {
                p.step_src(1);
            }
            p.step_src(4);
            assert!(p.src.is_streaming(), "{what}");
        } else {
            p.run();
        }
        p.src.mark_blocks(10, 20).unwrap();
        truth.set_blocks(10, 20);
        p.fail_handover = true;
        p.src.switchover(postcopy).unwrap();
        p.run();
        assert_eq!(p.handovers, vec![2], "{what}");
        assert!(p.commits.is_empty(), "{what}: nothing switched over");
        assert!(!p.dst.owns(), "{what}");
        assert_eq!(p.src_outcome(), None, "{what}: the session goes on");
        assert_eq!(p.src.phase(), SourcePhase::Rounds, "{what}");
        // The VM kept running here: more writes, then a round, then the switchover again.
        p.src
            .mark_blocks(3 * per_chunk + 9, 3 * per_chunk + 11)
            .unwrap();
        truth.set_blocks(3 * per_chunk + 9, 3 * per_chunk + 11);
        p.src.start_round().unwrap();
        p.run();
        p.fail_handover = false;
        p.src.switchover(postcopy).unwrap();
        p.run();
        let (meta, got) = p.last_commit();
        assert_eq!(meta.state, State::Consistent, "{what}");
        assert_eq!(got, &truth, "{what}");
        assert_eq!(p.retired, Some(2), "{what}");
        assert_eq!(p.handovers, vec![2, 2], "{what}");
    }
}

#[test]
fn source_lost_mid_postcopy_leaves_dest_incomplete_with_local_marks() {
    let mut rng = Rng::seeded("source_lost_mid_postcopy_leaves_dest_incomplete_with_local_marks");
    let g = geom();
    let mut truth = Bitmap::new(g);
    let mut initial = Bitmap::new(g);
    random_marks(&mut rng, 50, |o, l| drop(initial.mark(o, l)), &mut truth);
    let mut p = Pump::new(
        source(initial, 4, Mode::Postcopy),
        DestSession::new(policy(Some(2))),
    );
    // Handshake only; the bulk never completes.
    for _ in 0..3 {
        p.step_src(1);
    }
    p.step_src(2); // one bulk chunk
    let src = &mut p.src;
    random_marks(
        &mut rng,
        50,
        |o, l| {
            src.mark(o, l).unwrap();
        },
        &mut truth,
    );
    p.src.switchover(true).unwrap();
    p.step_src(3); // Switchover + one post-copy chunk
    let mut local = Bitmap::new(g);
    let mut writes = Bitmap::new(g);
    random_marks(&mut rng, 30, |o, l| drop(writes.mark(o, l)), &mut local);
    for (o, l) in writes
        .extents()
        .map(|e| (e.offset, e.length))
        .collect::<Vec<_>>()
    {
        assert!(p.dst_mark(o, l));
    }
    p.dst.peer_lost().unwrap();
    p.pull_dst();

    assert_eq!(
        p.dst_outcome(),
        Some(Outcome::DestOwnsIncomplete { epoch: 5 })
    );
    assert_eq!(p.dst.state(), State::Incomplete);
    assert!(p.dst.owns());
    assert_eq!(p.rebuilds.len(), 1);
    assert!(
        p.commits.iter().all(|(m, _)| m.state == State::Incomplete),
        "never consistent"
    );
    let (meta, bm) = p.last_commit();
    assert_eq!(meta.epoch, 5);
    assert!(meta.reason.as_deref().unwrap().contains("lost"));
    // Every local mark kept; every source bit present is a real source bit.
    let mut with_local = bm.clone();
    with_local.merge(&local).unwrap();
    assert_eq!(&with_local, bm, "local marks kept");
    let mut union = truth.clone();
    union.merge(&local).unwrap();
    let mut outside = bm.clone();
    outside.subtract(&union).unwrap();
    assert!(outside.is_clean(), "no invented bits");
    assert!(bm.count() > local.count(), "verified source chunks merged");
}

// ---------------------------------------------------------------------------------------------
// Refusals and corruption

#[test]
fn refuses_a_disk_it_was_not_told_to_expect() {
    let mut pol = policy(None);
    pol.expected[0].disk = DiskId::new("vm9/vdb").unwrap();
    let mut p = Pump::new(
        source(Bitmap::new(geom()), 1, Mode::Precopy),
        DestSession::new(pol),
    );
    p.run();
    assert!(matches!(
        p.src_end.as_ref().unwrap().error(),
        Some(PeerError::Refused {
            reason: RefuseReason::NotExpected,
            ..
        })
    ));
    assert_eq!(p.src_outcome(), Some(Outcome::SourceKeeps));
    assert_eq!(p.dst_outcome(), Some(Outcome::SourceKeeps));
    assert!(p.commits.is_empty());
    assert!(p.retired.is_none());

    let mut pol = policy(None);
    pol.expected[0].from = Some("someone-else".into());
    let mut p = Pump::new(
        source(Bitmap::new(geom()), 1, Mode::Precopy),
        DestSession::new(pol),
    );
    p.run();
    assert!(matches!(
        p.src_end.as_ref().unwrap().error(),
        Some(PeerError::Refused {
            reason: RefuseReason::NotExpected,
            ..
        })
    ));
}

#[test]
fn refuses_offers_at_or_below_the_owned_epoch() {
    refuses_stale_offers(
        |owned| policy(Some(owned)),
        &[(5, 5, false), (4, 5, false), (6, 5, true)],
    );
}

#[test]
fn refuses_offers_below_the_epoch_this_host_handed_the_disk_over_to() {
    // Retired at 5: the owner at 5 (or later) may offer the disk back; 4 is a stale copy.
    let retired = |at| {
        let mut p = policy(None);
        p.expected[0].retired_at = Some(at);
        p
    };
    refuses_stale_offers(
        retired,
        &[(4, 5, false), (1, 5, false), (5, 5, true), (6, 5, true)],
    );
}

#[test]
fn an_unreadable_retirement_record_refuses_every_offer_and_says_so() {
    // The agent says why it cannot tell which epochs are stale (an unreadable record, e.g.
    // EMFILE): the refusal must carry that, not "older than epoch 18446744073709551615".
    let mut p = policy(None);
    p.expected[0].epoch_unknown =
        Some("its retirement record cannot be read (Too many open files (os error 24))".into());
    refuses_stale_offers(|_| p.clone(), &[(1, 0, false), (1000, 0, false)]);
    let mut pump = Pump::new(
        source(Bitmap::new(geom()), 7, Mode::Precopy),
        DestSession::new(p),
    );
    pump.run();
    let e = pump.src_end.as_ref().unwrap().error().unwrap().to_string();
    assert!(
        e.contains("retirement record cannot be read")
            && e.contains("Too many open files")
            && !e.contains(&u64::MAX.to_string()),
        "{e}"
    );
}

/// For each `(offered, epoch, accepted)`: an offer at `offered` to a destination whose policy
/// `policy(epoch)` builds is accepted and migrates, or is refused as stale with nothing
/// committed and the source still the owner.
fn refuses_stale_offers(policy: impl Fn(u64) -> DestPolicy, cases: &[(u64, u64, bool)]) {
    for &(offered, owned, ok) in cases {
        let mut p = Pump::new(
            source(Bitmap::new(geom()), offered, Mode::Precopy),
            DestSession::new(policy(owned)),
        );
        p.run();
        if ok {
            assert!(p.src_end.is_none(), "offer {offered} over owned {owned}");
            p.src.switchover(false).unwrap();
            p.run();
            assert_eq!(p.last_commit().0.epoch, offered + 1);
        } else {
            assert!(
                matches!(
                    p.src_end.as_ref().unwrap().error(),
                    Some(PeerError::Refused {
                        reason: RefuseReason::StaleEpoch,
                        ..
                    })
                ),
                "{:?}",
                p.src_end
            );
            assert!(p.commits.is_empty());
            assert_eq!(p.src_outcome(), Some(Outcome::SourceKeeps));
        }
    }
}

#[test]
fn refuses_unknown_protocol_versions() {
    let mut d = DestSession::new(policy(None));
    d.handle(Message::Hello(Hello {
        protocol_versions: BoundedVec::new(vec![0, 99]).unwrap(),
        features: 0,
        host: BoundedString::new("future").unwrap(),
    }))
    .unwrap();
    let a = d.poll_action().unwrap();
    assert!(matches!(
        a,
        Action::Send(Message::Refuse(Refuse {
            reason: RefuseReason::UnsupportedVersion,
            ..
        }))
    ));
    assert!(matches!(
        d.poll_action(),
        Some(Action::Failed(Failure {
            error: PeerError::UnsupportedVersion { .. },
            outcome: Outcome::SourceKeeps
        }))
    ));
    assert!(d.poll_action().is_none());

    // A destination answering with a version the source never offered.
    let mut s = source(Bitmap::new(geom()), 1, Mode::Precopy);
    assert!(matches!(
        s.poll_action(),
        Some(Action::Send(Message::Hello(_)))
    ));
    s.handle(Message::Welcome(Welcome {
        version: 42,
        features: 0,
    }))
    .unwrap();
    assert!(matches!(
        s.poll_action(),
        Some(Action::Send(Message::Abort(_)))
    ));
    assert!(matches!(
        s.poll_action(),
        Some(Action::Failed(Failure {
            error: PeerError::UnsupportedVersion { .. },
            outcome: Outcome::SourceKeeps
        }))
    ));
    // And a message from a newer protocol is a typed frame error.
    let mut dec = FrameDecoder::new();
    dec.push(&[1, 0, 0, 0, 100]);
    assert!(matches!(
        dec.next_item(),
        Err(FrameError::UnknownMessage { tag: 100 })
    ));
}

fn corrupted_run(tamper: Tamper, rounds: bool) -> Pump {
    let mut rng = Rng::seeded("corrupted_run");
    let g = geom();
    let mut truth = Bitmap::new(g);
    let mut initial = Bitmap::new(g);
    random_marks(&mut rng, 100, |o, l| drop(initial.mark(o, l)), &mut truth);
    let mut p = Pump::new(
        source(initial, 1, Mode::Precopy),
        DestSession::new(policy(None)),
    );
    p.tamper = Some(tamper);
    p.run();
    if rounds && p.src_end.is_none() {
        let src = &mut p.src;
        random_marks(
            &mut rng,
            100,
            |o, l| {
                src.mark(o, l).unwrap();
            },
            &mut truth,
        );
        p.src.start_round().unwrap();
        p.run();
    }
    if p.src_end.is_none() {
        p.src.switchover(false).unwrap();
        p.run();
    }
    p
}

fn assert_aborted_cleanly(p: &Pump, want: impl Fn(&PeerError) -> bool) {
    let err = p
        .dst_end
        .as_ref()
        .and_then(End::error)
        .expect("dest failed");
    assert!(want(err), "unexpected error {err:?}");
    assert!(p.commits.is_empty(), "destination must never commit");
    assert_eq!(p.dst_outcome(), Some(Outcome::SourceKeeps));
    assert_eq!(p.src_outcome(), Some(Outcome::SourceKeeps));
    assert!(matches!(
        p.src_end.as_ref().unwrap().error(),
        Some(PeerError::Aborted { .. })
    ));
    assert!(p.retired.is_none());
}

#[test]
fn a_chunk_with_a_bad_hash_aborts_without_commit() {
    let mut n = 0;
    let p = corrupted_run(
        Box::new(move |a| {
            if let Action::Send(Message::Chunk(h)) = a {
                n += 1;
                if n == 2 {
                    h.cv[0] ^= 1;
                }
            }
            true
        }),
        false,
    );
    assert_aborted_cleanly(
        &p,
        |e| matches!(e, PeerError::BadChunk { why, .. } if why.contains("hash")),
    );
}

#[test]
fn a_flipped_payload_bit_aborts_without_commit() {
    let mut n = 0;
    let p = corrupted_run(
        Box::new(move |a| {
            if let Action::SendPayload(pl) = a {
                n += 1;
                if n == 1 {
                    let last = pl.len() - 1;
                    pl[last / 2] ^= 0x10;
                }
            }
            true
        }),
        false,
    );
    assert_aborted_cleanly(&p, |e| matches!(e, PeerError::BadChunk { .. }));
}

#[test]
fn a_dropped_delta_is_caught_by_the_round_root() {
    let mut skip_payload = false;
    let p = corrupted_run(
        Box::new(move |a| {
            // Drop the first delta and its payload: the stream stays well formed, only the
            // round root can tell.
            if std::mem::take(&mut skip_payload) {
                return false;
            }
            if matches!(a, Action::Send(Message::Delta(_))) {
                skip_payload = true;
                return false;
            }
            true
        }),
        true,
    );
    assert_aborted_cleanly(&p, |e| matches!(e, PeerError::RootMismatch { .. }));
}

#[test]
fn a_wrong_final_root_aborts_and_the_source_keeps_the_disk() {
    let p = corrupted_run(
        Box::new(|a| {
            if let Action::Send(Message::Switchover(s)) = a {
                s.final_root.0[5] ^= 1;
            }
            true
        }),
        true,
    );
    assert_aborted_cleanly(&p, |e| matches!(e, PeerError::RootMismatch { .. }));
}

#[test]
fn a_stale_switchover_epoch_is_refused() {
    let p = corrupted_run(
        Box::new(|a| {
            if let Action::Send(Message::Switchover(s)) = a {
                s.epoch_next += 1;
            }
            true
        }),
        false,
    );
    assert_aborted_cleanly(&p, |e| matches!(e, PeerError::BadEpoch { .. }));
}

#[test]
fn an_oversized_frame_aborts_before_allocation() {
    let mut p = Pump::new(
        source(Bitmap::new(geom()), 1, Mode::Precopy),
        DestSession::new(policy(None)),
    );
    p.run();
    p.s2d.extend_from_slice(&u32::MAX.to_le_bytes());
    p.run();
    assert!(matches!(
        p.dst_end.as_ref().unwrap().error(),
        Some(PeerError::Frame(FrameError::Oversized { .. }))
    ));
    assert!(p.commits.is_empty());
    assert_eq!(p.src_outcome(), Some(Outcome::SourceKeeps));
}

#[test]
fn a_message_out_of_place_is_a_protocol_error() {
    let mut d = DestSession::new(policy(None));
    d.handle(Message::Accept { offer: [0; 32] }).unwrap();
    assert!(matches!(
        d.poll_action(),
        Some(Action::Send(Message::Abort(Abort {
            reason: AbortReason::Protocol,
            dest_owns: false,
            ..
        })))
    ));
    assert!(matches!(
        d.poll_action(),
        Some(Action::Failed(Failure {
            error: PeerError::Unexpected { got: "Accept", .. },
            ..
        }))
    ));
    assert_eq!(
        d.handle(Message::Accept { offer: [0; 32] }),
        Err(UsageError::Finished)
    );
}

#[test]
fn local_misuse_is_a_usage_error_and_changes_nothing() {
    let g = geom();
    let mut p = Pump::new(
        source(Bitmap::new(g), 1, Mode::Precopy),
        DestSession::new(policy(None)),
    );
    assert_eq!(
        p.dst.on_payload(&[1, 2, 3]),
        Err(UsageError::Payload {
            expected: 0,
            got: 3
        })
    );
    assert_eq!(p.dst.committed_durably(), Err(UsageError::NoCommitPending));
    assert_eq!(
        p.src.handed_over_durably(),
        Err(UsageError::NoHandOverPending)
    );
    assert_eq!(p.src.hand_over_failed(), Err(UsageError::NoHandOverPending));
    assert!(
        !p.dst_mark(0, 1),
        "nothing to record a write in before Accept"
    );
    assert!(matches!(
        p.src.start_round(),
        Err(UsageError::WrongPhase { .. })
    ));
    assert!(matches!(p.src.mark(g.size(), 1), Err(UsageError::Range(_))));
    p.src.mark_blocks(0, 100).unwrap();
    for _ in 0..2 {
        p.step_src(1);
    }
    // Bulk is streaming: a new round must wait; post-copy was not offered.
    assert!(p.src.is_streaming());
    assert_eq!(p.src.start_round(), Err(UsageError::RoundInProgress(0)));
    assert_eq!(p.src.switchover(true), Err(UsageError::PostcopyUnavailable));
    let other = Bitmap::new(Geometry::new(4096, 512).unwrap());
    assert!(matches!(
        p.src.local_marks(&other),
        Err(UsageError::Geometry(_))
    ));
    // None of that disturbed the migration.
    p.run();
    p.src.switchover(false).unwrap();
    p.run();
    assert!(matches!(
        p.src_outcome(),
        Some(Outcome::Migrated { epoch: 2, .. })
    ));
    let mut want = Bitmap::new(g);
    want.set_blocks(0, 100);
    assert_eq!(p.last_commit().1, want);
    assert_eq!(p.src.abort(), Err(UsageError::Finished));
}

#[test]
fn a_failed_store_commit_never_leaves_two_owners() {
    // Pre-copy: the destination's commit fails before Committed: the source keeps the disk.
    let mut initial = Bitmap::new(geom());
    initial.set_blocks(10, 20);
    let mut p = Pump::new(
        source(initial.clone(), 1, Mode::Postcopy),
        DestSession::new(policy(None)),
    );
    p.run();
    p.auto_durable = false;
    p.src.switchover(false).unwrap();
    p.run();
    assert_eq!(p.commits.len(), 1);
    p.dst.commit_failed("disk full").unwrap();
    p.run();
    assert_eq!(p.dst_outcome(), Some(Outcome::SourceKeeps));
    assert_eq!(p.src_outcome(), Some(Outcome::SourceKeeps));
    assert!(p.retired.is_none());

    // Post-copy: the destination owns regardless; it stays incomplete and rebuilds.
    let mut p = Pump::new(
        source(initial, 1, Mode::Postcopy),
        DestSession::new(policy(None)),
    );
    p.run();
    p.auto_durable = false;
    p.src.mark_blocks(500, 600).unwrap();
    p.src.switchover(true).unwrap();
    p.run();
    assert_eq!(
        p.commits.len(),
        2,
        "ownership commit, then the consistent one"
    );
    p.dst.committed_durably().unwrap(); // the incomplete ownership commit made it
    p.dst.commit_failed("disk full").unwrap();
    p.run();
    assert_eq!(
        p.dst_outcome(),
        Some(Outcome::DestOwnsIncomplete { epoch: 2 })
    );
    assert_eq!(p.src_outcome(), Some(Outcome::HandedOver));
    assert_eq!(p.rebuilds.len(), 1);
    assert!(p.retired.is_none());
    assert_eq!(p.dst.state(), State::Incomplete);
}

// ---------------------------------------------------------------------------------------------
// Aborts at every phase

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Dest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    BeforeHello,
    AfterOffer,
    MidBulk,
    AfterRound,
    /// Pre-copy switchover delivered, final commit not yet durable.
    SwitchedNotDurable,
    /// Pre-copy: Committed sent, Retired not yet delivered.
    CommittedNotRetired,
    MidPostcopy,
}

fn abort_at(point: Point, side: Side) -> Pump {
    let g = geom();
    let mut initial = Bitmap::new(g);
    for c in 0..g.chunks() as u64 {
        initial.set_blocks(
            c * CHUNK_BYTES as u64 * 8 + 3,
            c * CHUNK_BYTES as u64 * 8 + 9,
        );
    }
    let mode = if point == Point::MidPostcopy {
        Mode::Postcopy
    } else {
        Mode::Precopy
    };
    let mut p = Pump::new(source(initial, 10, mode), DestSession::new(policy(None)));
    match point {
        Point::BeforeHello => {}
        Point::AfterOffer => {
            p.step_src(1);
            p.step_src(1);
        }
        Point::MidBulk => {
            for _ in 0..3 {
                p.step_src(1);
            }
            p.step_src(2);
            assert!(p.src.is_streaming());
        }
        Point::AfterRound => {
            p.run();
            p.src.mark_blocks(100, 200).unwrap();
            p.src.start_round().unwrap();
            p.run();
        }
        Point::SwitchedNotDurable => {
            p.run();
            p.auto_durable = false;
            p.src.switchover(false).unwrap();
            p.run();
            assert_eq!(p.commits.len(), 1);
        }
        Point::CommittedNotRetired => {
            p.run();
            p.src.switchover(false).unwrap();
            p.pull_src(usize::MAX);
            p.deliver();
            p.pull_dst(); // Commit, durable, Committed queued and sent
            assert!(p.src_end.is_none());
        }
        Point::MidPostcopy => {
            p.run();
            p.src.mark_blocks(100, 200).unwrap();
            p.src.switchover(true).unwrap();
            p.step_src(2); // Switchover + first post-copy chunk header
        }
    }
    match side {
        Side::Source => p.src.abort().unwrap(),
        Side::Dest => p.dst.abort().unwrap(),
    }
    p.run();
    // Whatever was left pending durability is now made durable.
    while p.dst.committed_durably().is_ok() {}
    p.run();
    p
}

#[test]
fn every_abort_point_leaves_exactly_the_right_owner() {
    use Outcome::*;
    for side in [Side::Source, Side::Dest] {
        for point in [
            Point::BeforeHello,
            Point::AfterOffer,
            Point::MidBulk,
            Point::AfterRound,
            Point::SwitchedNotDurable,
            Point::CommittedNotRetired,
            Point::MidPostcopy,
        ] {
            let p = abort_at(point, side);
            let (s, d) = (p.src_outcome(), p.dst_outcome());
            let ctx = format!("{side:?} aborts at {point:?}: source {s:?}, dest {d:?}");
            let s = s.unwrap_or_else(|| panic!("source did not end: {ctx}"));
            let d = d.unwrap_or_else(|| panic!("dest did not end: {ctx}"));
            assert!(!(s.source_owns() && d.dest_owns()), "two owners: {ctx}");
            match point {
                Point::BeforeHello | Point::AfterOffer | Point::MidBulk | Point::AfterRound => {
                    assert_eq!((s, d), (SourceKeeps, SourceKeeps), "{ctx}");
                    assert!(p.commits.is_empty(), "{ctx}");
                }
                Point::SwitchedNotDurable | Point::CommittedNotRetired => {
                    // The destination verified and committed: it owns, whoever aborts. The
                    // source retires only if the durable Committed reached it first.
                    assert!(matches!(d, Migrated { epoch: 11, .. }), "{ctx}");
                    assert_eq!(p.last_commit().0.state, State::Consistent, "{ctx}");
                    match s {
                        Migrated { epoch: 11, .. } => {
                            assert_eq!(point, Point::CommittedNotRetired, "{ctx}");
                            assert_eq!(p.retired, Some(11), "{ctx}");
                        }
                        InDoubt | HandedOver => assert!(p.retired.is_none(), "{ctx}"),
                        _ => panic!("{ctx}"),
                    }
                }
                Point::MidPostcopy => {
                    assert_eq!(d, DestOwnsIncomplete { epoch: 11 }, "{ctx}");
                    assert_eq!(s, HandedOver, "{ctx}");
                    assert_eq!(p.last_commit().0.state, State::Incomplete, "{ctx}");
                    assert_eq!(p.rebuilds.len(), 1, "{ctx}");
                }
            }
        }
    }
}

#[test]
fn peer_lost_before_switchover_keeps_the_source_owner() {
    let mut p = Pump::new(
        source(Bitmap::new(geom()), 1, Mode::Precopy),
        DestSession::new(policy(None)),
    );
    p.run();
    p.src.peer_lost().unwrap();
    p.dst.peer_lost().unwrap();
    p.run();
    assert_eq!(p.src_outcome(), Some(Outcome::SourceKeeps));
    assert_eq!(p.dst_outcome(), Some(Outcome::SourceKeeps));
    assert!(p.commits.is_empty());
    // After switchover without an answer the source is in doubt, never owner.
    let mut p = Pump::new(
        source(Bitmap::new(geom()), 1, Mode::Precopy),
        DestSession::new(policy(None)),
    );
    p.run();
    p.src.switchover(false).unwrap();
    p.pull_src(usize::MAX);
    p.src.peer_lost().unwrap();
    p.pull_src(usize::MAX);
    assert_eq!(p.src_outcome(), Some(Outcome::InDoubt));
    // But a Switchover that never left the session was never acted on.
    let mut p = Pump::new(
        source(Bitmap::new(geom()), 1, Mode::Precopy),
        DestSession::new(policy(None)),
    );
    p.run();
    p.src.switchover(false).unwrap();
    p.src.abort().unwrap();
    p.run();
    assert_eq!(p.src_outcome(), Some(Outcome::SourceKeeps));
    assert_eq!(p.dst_outcome(), Some(Outcome::SourceKeeps));
    assert!(p.commits.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Delta size

#[test]
fn scattered_new_bits_on_a_huge_bitmap_cost_a_small_delta() {
    let mut rng = Rng::seeded("scattered_new_bits_on_a_huge_bitmap_cost_a_small_delta");
    let g = Geometry::new((1u64 << 28) * 512, 512).unwrap();
    assert_eq!(g.blocks(), 1 << 28);
    let mut p = Pump::new(
        source(Bitmap::new(g), 1, Mode::Precopy),
        DestSession::new(policy(None)),
    );
    p.run(); // empty bulk: just RoundEnd
    let mut n = 0;
    while n < 16_384 {
        let b = rng.below(1 << 28);
        n += p.src.mark_blocks(b, b + 1).unwrap() as usize;
    }
    let before = p.src.stats();
    p.src.start_round().unwrap();
    let mut delta_bytes = 0usize;
    let mut in_delta = false;
    while let Some(a) = p.src.poll_action() {
        match &a {
            Action::Send(m @ Message::Delta(_)) => {
                delta_bytes += frame::encode(m).unwrap().len();
                in_delta = true;
            }
            Action::SendPayload(pl) if in_delta => delta_bytes += pl.len(),
            _ => in_delta = false,
        }
        match a {
            Action::Send(m) => p.s2d.extend(frame::encode(&m).unwrap()),
            Action::SendPayload(pl) => p.s2d.extend(pl),
            _ => {}
        }
    }
    eprintln!(
        "16384 scattered bits on 2^28 blocks: {delta_bytes} bytes of delta ({} round bytes)",
        p.src.stats().bytes_total - before.bytes_total
    );
    assert!(delta_bytes > 16_384, "suspiciously small: {delta_bytes}");
    assert!(delta_bytes < 64 * 1024, "delta of {delta_bytes} bytes");
    p.run();
    assert!(p.src.rounds_acked(), "destination agrees on the round root");
    assert!(p.src_end.is_none() && p.dst_end.is_none());
}

// ---------------------------------------------------------------------------------------------
// Robustness against garbage

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// A complete, valid source transcript of a small pre-copy migration.
    fn transcript() -> (Vec<u8>, Bitmap) {
        let g = Geometry::new(3 * CHUNK_BYTES as u64 * 8 * 512 + 777, 512).unwrap();
        let mut b = Bitmap::new(g);
        for i in 0..40u64 {
            b.set_blocks(i * 40_009 % g.blocks(), i * 40_009 % g.blocks() + 1 + i);
        }
        let mut p = Pump::new(
            SourceSession::new(SourceConfig {
                host: "src".into(),
                disk: disk(),
                bitmap: b.clone(),
                checkpoint: None,
                epoch: 1,
                mode: Mode::Precopy,
            })
            .unwrap(),
            DestSession::new(policy(None)),
        );
        p.run();
        for i in 0..30u64 {
            let blk = i * 77_777 % g.blocks();
            p.src.mark_blocks(blk, blk + 1).unwrap();
            b.set_blocks(blk, blk + 1);
        }
        p.src.start_round().unwrap();
        p.run();
        p.src.switchover(false).unwrap();
        p.run();
        assert_eq!(p.last_commit().1, b);
        (p.transcript, b)
    }

    /// Feed bytes to a fresh destination in slices; return every commit.
    fn feed(bytes: &[u8], slice: usize) -> Vec<(CommitMeta, Bitmap)> {
        let mut d = DestSession::new(policy(None));
        let mut dec = FrameDecoder::new();
        let mut commits = Vec::new();
        'outer: for piece in bytes.chunks(slice.max(1)) {
            dec.push(piece);
            loop {
                let r = match dec.next_item() {
                    Ok(Some(Incoming::Message(m))) => d.handle(m),
                    Ok(Some(Incoming::Payload(p))) => d.on_payload(&p),
                    Ok(None) => break,
                    Err(e) => {
                        let _ = d.on_frame_error(e);
                        break 'outer;
                    }
                };
                if r.is_err() {
                    break 'outer;
                }
                while let Some(a) = d.poll_action() {
                    if let Action::Commit { meta, bitmap } = a {
                        commits.push((meta, bitmap));
                        let _ = d.committed_durably();
                    }
                }
            }
        }
        let _ = d.peer_lost();
        while let Some(a) = d.poll_action() {
            if let Action::Commit { meta, bitmap } = a {
                commits.push((meta, bitmap));
            }
        }
        commits
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A write on the source (before switchover) or the destination (after).
        Write(u64, u64),
        /// Start a pre-copy round if possible.
        Round,
        /// A write on the destination, whatever the phase (the session takes it or refuses).
        DestWrite(u64, u64),
        /// Move at most this many source actions and deliver.
        Step(usize),
        /// Switch over (post-copy if true) if not yet done.
        Switch(bool),
        /// The link dies.
        Lost,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<u64>(), 1u64..20_000).prop_map(|(o, l)| Op::Write(o, l)),
            1 => (any::<u64>(), 1u64..20_000).prop_map(|(o, l)| Op::DestWrite(o, l)),
            2 => Just(Op::Round),
            4 => (1usize..6).prop_map(Op::Step),
            1 => any::<bool>().prop_map(Op::Switch),
            1 => Just(Op::Lost),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Random interleavings of writes, rounds, partial delivery, switchover (either mode)
        /// and link loss. Whatever happens: at most one owner; a consistent commit holds every
        /// source write; no commit invents a bit; local marks recorded by the agent are never
        /// dropped from what it owns; the source retires only after a consistent commit.
        #[test]
        fn random_migrations_keep_the_safety_rule(
            ops in prop::collection::vec(op(), 1..40),
            slice in 1usize..20_000,
        ) {
            let g = geom();
            let mut src_truth = Bitmap::new(g);
            let mut initial = Bitmap::new(g);
            initial.set_blocks(1000, 1200);
            src_truth.set_blocks(1000, 1200);
            let mut p = Pump::new(source(initial, 3, Mode::Postcopy), DestSession::new(policy(Some(1))));
            p.slice = slice;
            let mut dst_truth = Bitmap::new(g);
            let mut switched = false;
            let mut lost = false;
            for op in ops {
                if lost {
                    break;
                }
                match op {
                    Op::Write(o, l) => {
                        let o = o % g.size();
                        let l = l.min(g.size() - o);
                        if !switched {
                            p.src.mark(o, l).unwrap();
                            src_truth.mark(o, l).unwrap();
                        } else if p.dst_mark(o, l) {
                            dst_truth.mark(o, l).unwrap();
                        }
                    }
                    Op::DestWrite(o, l) => {
                        let o = o % g.size();
                        let l = l.min(g.size() - o);
                        if p.dst_mark(o, l) {
                            dst_truth.mark(o, l).unwrap();
                        }
                    }
                    Op::Round => { let _ = p.src.start_round(); }
                    Op::Step(n) => p.step_src(n),
                    Op::Switch(pc) => {
                        if !switched && p.src.switchover(pc).is_ok() {
                            switched = true;
                        }
                    }
                    Op::Lost => {
                        p.pull_src(usize::MAX);
                        p.pull_dst();
                        let _ = p.src.peer_lost();
                        let _ = p.dst.peer_lost();
                        p.pull_src(usize::MAX);
                        p.pull_dst();
                        lost = true;
                    }
                }
            }
            if !lost {
                p.run();
                if !switched {
                    p.src.switchover(false).unwrap();
                }
                p.run();
            }
            let mut union = src_truth.clone();
            union.merge(&dst_truth).unwrap();
            for (meta, bm) in &p.commits {
                prop_assert_eq!(meta.epoch, 4);
                let mut extra = bm.clone();
                extra.subtract(&union).unwrap();
                prop_assert!(extra.is_clean(), "commit invented bits");
                if meta.state == State::Consistent {
                    // Every source write is in it (local writes made after it went to the
                    // owned bitmap, checked below).
                    let mut missing = src_truth.clone();
                    missing.subtract(bm).unwrap();
                    prop_assert!(missing.is_clean(), "consistent commit lacks {} source blocks", missing.count());
                }
            }
            // Every local mark the agent recorded is in what it owns once a commit happened.
            if let Some(owned) = p.owned.as_ref() {
                let mut missing = dst_truth.clone();
                missing.subtract(owned).unwrap();
                prop_assert!(missing.is_clean(), "local marks dropped");
            }
            let s = p.src_outcome();
            let d = p.dst_outcome();
            if let (Some(s), Some(d)) = (s, d) {
                prop_assert!(!(s.source_owns() && d.dest_owns()), "two owners: {:?} {:?}", s, d);
            }
            if p.retired.is_some() {
                prop_assert!(p.commits.iter().any(|(m, _)| m.state == State::Consistent));
                let dest_migrated = matches!(d, Some(Outcome::Migrated { .. }));
                prop_assert!(dest_migrated, "retired but dest ended {:?}", d);
            }
            if !lost {
                prop_assert!(s.is_some() && d.is_some(), "both sides end: {:?} {:?}", s, d);
                prop_assert!(p.retired.is_some());
            }
        }
    }

    thread_local! {
        static GOOD: (Vec<u8>, Bitmap) = transcript();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096),
                                    slice in 1usize..300) {
            let mut dec = FrameDecoder::new();
            for piece in bytes.chunks(slice) {
                dec.push(piece);
                while let Ok(Some(_)) = dec.next_item() {}
            }
            let commits = feed(&bytes, slice);
            prop_assert!(commits.is_empty());
            // The source decodes untrusted bytes too.
            let mut s = source(Bitmap::new(geom()), 1, Mode::Precopy);
            while s.poll_action().is_some() {}
            let mut dec = FrameDecoder::new();
            for piece in bytes.chunks(slice) {
                dec.push(piece);
                loop {
                    match dec.next_item() {
                        Ok(Some(Incoming::Message(m))) => { let _ = s.handle(m); }
                        Ok(Some(Incoming::Payload(_))) => {}
                        Ok(None) => break,
                        Err(e) => { let _ = s.on_frame_error(e); break; }
                    }
                    while let Some(a) = s.poll_action() {
                        let retire = matches!(a, Action::Retire { .. });
                        prop_assert!(!retire, "garbage made the source retire");
                    }
                }
            }
        }

        /// A valid transcript with random corruption: never a panic, and the destination
        /// either commits exactly the source's bitmap as consistent or nothing consistent.
        #[test]
        fn corrupted_transcripts_never_yield_a_wrong_consistent_bitmap(
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            cut in prop::option::of(any::<prop::sample::Index>()),
            slice in 1usize..70_000,
        ) {
            let (mut bytes, truth) = GOOD.with(|g| g.clone());
            for (i, x) in &flips {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len()));
            }
            for (meta, bm) in feed(&bytes, slice) {
                if meta.state == State::Consistent {
                    prop_assert_eq!(&bm, &truth);
                    prop_assert_eq!(meta.epoch, 2);
                }
            }
        }
    }
}

#[test]
fn postcopy_switchover_after_a_precopy_offer_is_refused_but_owned_incomplete() {
    let g = geom();
    let mut initial = Bitmap::new(g);
    initial.set_blocks(10, 5000);
    let mut p = Pump::new(
        source(initial.clone(), 1, Mode::Precopy),
        DestSession::new(policy(None)),
    );
    p.run();
    assert!(p.src.rounds_acked());
    // A source that ignores its own Offer (the real one refuses: PostcopyUnavailable).
    p.dst
        .handle(Message::Switchover(Switchover {
            epoch_next: 2,
            final_root: initial.root(),
            postcopy: true,
        }))
        .unwrap();
    let mut actions = Vec::new();
    while let Some(a) = p.dst.poll_action() {
        actions.push(a);
    }
    // Owned as incomplete first (the VM may run here now), then the abort says so.
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Commit { meta, .. } if meta.state == State::Incomplete && meta.epoch == 2
        )),
        "{actions:?}"
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Send(Message::Abort(Abort {
            reason: AbortReason::Protocol,
            dest_owns: true,
            ..
        }))
    )));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Failed(Failure {
            error: PeerError::Unexpected {
                phase: "the Offer was pre-copy",
                ..
            },
            ..
        })
    )));
    assert_ne!(p.dst.state(), State::Consistent);
}

/// Found by the `migration` fuzz target (fuzz/corpus/migration/crash-durable-before-poll): a
/// driver that answered `committed_durably` before it had polled the Commit made the
/// destination send Committed (the source then retires) for a bitmap not yet written.
#[test]
fn committed_durably_before_the_commit_is_polled_is_refused() {
    let g = geom();
    let mut b = Bitmap::new(g);
    b.set_blocks(5, 9);
    let mut s = source(b, 1, Mode::Precopy);
    let mut d = DestSession::new(policy(None));
    let to_dst = |s: &mut SourceSession, d: &mut DestSession| {
        while let Some(a) = s.poll_action() {
            match a {
                Action::Send(m) => d.handle(m).unwrap(),
                Action::SendPayload(p) => d.on_payload(&p).unwrap(),
                // The hand-over is recorded at once, so the Switchover leaves.
                Action::HandOver { .. } => s.handed_over_durably().unwrap(),
                _ => {}
            }
        }
    };
    for _ in 0..4 {
        to_dst(&mut s, &mut d);
        while let Some(a) = d.poll_action() {
            if let Action::Send(m) = a {
                s.handle(m).unwrap();
            }
        }
    }
    s.switchover(false).unwrap();
    to_dst(&mut s, &mut d);
    assert_eq!(d.committed_durably(), Err(UsageError::NoCommitPending));
    assert!(matches!(d.poll_action(), Some(Action::Commit { .. })));
    assert_eq!(
        d.poll_action().map(|_| ()),
        None,
        "nothing before the answer"
    );
    d.committed_durably().unwrap();
    assert!(matches!(
        d.poll_action(),
        Some(Action::Send(Message::Committed { .. }))
    ));
}
