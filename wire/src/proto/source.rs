//! The migration source's state machine, sans I/O (docs/protocol.md §5).

use super::action::{Action, Failure, Outcome, Stats};
use super::delta;
use super::error::{FrameError, PeerError, UsageError};
use super::frame::frame_len;
use super::msg::{
    Abort, AbortReason, BoundedString, BoundedVec, ChunkHeader, DeltaHeader, Hello, MAX_HOST,
    Message, Mode, Offer, SUPPORTED_VERSIONS, Switchover, WireCheckpoint, features,
};
use crate::bitmap::Bitmap;
use crate::chunk::encode_chunk_owned;
use crate::disk::{Checkpoint, DiskId};
use crate::tree::{Root, chunk_cv};
use std::collections::VecDeque;

/// What the source agent knows when it starts a migration.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// This host's name (sent in Hello).
    pub host: String,
    /// The disk to migrate.
    pub disk: DiskId,
    /// Its current bitmap (the live recording).
    pub bitmap: Bitmap,
    /// What the bitmap counts from.
    pub checkpoint: Option<Checkpoint>,
    /// The source's ownership epoch.
    pub epoch: u64,
    /// Whether a post-copy switchover may be asked for later.
    pub mode: Mode,
}

/// Where a [`SourceSession`] is (docs/protocol.md §5); exported as `wire::proto::SourcePhase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Hello sent, waiting for the destination's Welcome.
    Hello,
    /// Offer sent, waiting for Accept (or a refusal).
    Offered,
    /// Bulk and pre-copy rounds; a switchover may be asked for.
    Rounds,
    /// Switched over; waiting for the destination's Committed.
    Switched,
    /// Over, one way or the other (see the session's outcome).
    Done,
}

impl Phase {
    /// The phase in words, for status displays and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Hello => "waiting for Welcome",
            Phase::Offered => "waiting for Accept",
            Phase::Rounds => "running pre-copy rounds",
            Phase::Switched => "switched over, waiting for Committed",
            Phase::Done => "finished",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Switched {
    epoch_next: u64,
    final_root: Root,
    postcopy: bool,
}

/// The source side of one disk's migration.
///
/// # How to drive
///
/// ```text
/// let mut s = SourceSession::new(cfg)?;        // queues Hello
/// loop {
///     while let Some(a) = s.poll_action() {    // Send / SendPayload / Retire / Finished / Failed
///         perform(a)                           // Finished or Failed: stop
///     }
///     select! {
///         bytes = quic.read()   => { dec.push(&bytes);
///                                    while let Some(item) = dec.next_item()? { s.handle(msg)? } }
///                                    // on a FrameError: s.on_frame_error(e)
///         write = tracker.next() => s.mark(write.offset, write.len)?,
///         cmd = control.next()  => match cmd { Round => s.start_round()?, Switchover(pc) => s.switchover(pc)?,
///                                              Abort => s.abort()? },
///         closed = quic.closed() => s.peer_lost()?,
///     }
/// }
/// ```
///
/// Bulk chunks are produced lazily by [`SourceSession::poll_action`], one chunk at a time, so the
/// driver's write speed is the flow control and marks keep landing while the bulk streams.
/// Round 0 (bulk) starts by itself when the destination accepts; every later round starts on
/// [`SourceSession::start_round`] and sends only the blocks newly set since the previous round.
#[derive(Debug)]
pub struct SourceSession {
    /// BLAKE3 of the Offer we sent; the destination must echo it in Accept.
    offer_hash: [u8; 32],
    host: BoundedString<MAX_HOST>,
    disk: DiskId,
    checkpoint: Option<WireCheckpoint>,
    epoch: u64,
    mode: Mode,
    phase: Phase,
    /// Exactly what the destination's copy holds once everything queued so far is delivered,
    /// except while `bulk_in_sent`.
    sent: Bitmap,
    /// Blocks marked that may not be in `sent` yet (docs/protocol.md §5.3).
    pending: Bitmap,
    /// The bulk round is streaming and `sent`'s chunks from the stream's cursor on are the
    /// offered bitmap's, not yet handed out. At Accept the offered bitmap *becomes* `sent`
    /// (a swap, not a copy per chunk), so streaming a chunk that no mark touched since costs
    /// one copy into the payload and nothing else. Either way the live bitmap is
    /// `sent ∪ pending`.
    bulk_in_sent: bool,
    queue: VecDeque<Action>,
    /// The round being streamed or, when nothing streams, the next round's number.
    round: u32,
    /// Next chunk to look at while a bulk or post-copy stream is running.
    streaming: Option<usize>,
    unacked: VecDeque<(u32, Root)>,
    switched: Option<Switched>,
    /// Whether the Switchover message has been handed to the driver (polled).
    switch_sent: bool,
    /// The Switchover withheld until the driver made the hand-over durable
    /// ([`Action::HandOver`]), and whether that action has been polled.
    withheld: Option<(Switchover, bool)>,
    postcopy_round: u32,
    counting: bool,
    stats: Stats,
    buf: Vec<u8>,
}

impl SourceSession {
    /// Start a session; the first action is the Hello.
    pub fn new(cfg: SourceConfig) -> Result<Self, UsageError> {
        let host = BoundedString::new(cfg.host)
            .ok_or_else(|| UsageError::Config(format!("host name over {MAX_HOST} bytes")))?;
        let checkpoint = match &cfg.checkpoint {
            None => None,
            Some(c) => Some(
                WireCheckpoint::from_checkpoint(c)
                    .ok_or_else(|| UsageError::Config("checkpoint id too long".into()))?,
            ),
        };
        if cfg.epoch == u64::MAX {
            return Err(UsageError::Config("epoch cannot be incremented".into()));
        }
        let geom = cfg.bitmap.geometry();
        let mut queue = VecDeque::new();
        queue.push_back(Action::Send(Message::Hello(Hello {
            protocol_versions: BoundedVec::new(SUPPORTED_VERSIONS.to_vec())
                .ok_or_else(|| UsageError::Config("too many versions".into()))?,
            features: features::ALL,
            host: host.clone(),
        })));
        Ok(SourceSession {
            offer_hash: [0; 32],
            host,
            disk: cfg.disk,
            checkpoint,
            epoch: cfg.epoch,
            mode: cfg.mode,
            phase: Phase::Hello,
            sent: Bitmap::new(geom),
            pending: cfg.bitmap,
            bulk_in_sent: false,
            queue,
            round: 0,
            streaming: None,
            unacked: VecDeque::new(),
            switched: None,
            switch_sent: false,
            withheld: None,
            postcopy_round: 0,
            counting: false,
            stats: Stats::default(),
            buf: Vec::new(),
        })
    }

    /// The next thing to do, or `None` until an event arrives.
    pub fn poll_action(&mut self) -> Option<Action> {
        if matches!(self.withheld, Some((_, true))) {
            // Nothing may follow the hand-over until it is durable (or withdrawn).
            return None;
        }
        if self.queue.is_empty() {
            self.stream_next();
        }
        let a = self.queue.pop_front()?;
        if let (Action::HandOver { .. }, Some((_, polled))) = (&a, self.withheld.as_mut()) {
            *polled = true;
        }
        let n = match &a {
            Action::Send(m) => {
                match m {
                    Message::Chunk(_) => self.stats.chunks += 1,
                    Message::Delta(_) => self.stats.deltas += 1,
                    Message::Switchover(_) => self.switch_sent = true,
                    _ => {}
                }
                frame_len(m)
            }
            Action::SendPayload(p) => p.len(),
            _ => 0,
        } as u64;
        self.stats.bytes_total += n;
        if self.counting {
            self.stats.bytes_during_switchover += n;
        }
        Some(a)
    }

    /// Produce the next chunk of a running bulk or post-copy stream, or its end.
    fn stream_next(&mut self) {
        let Some(mut i) = self.streaming else {
            return;
        };
        let chunks = self.pending.chunks();
        while i < chunks
            && self.pending.chunk_is_clean(i)
            && (!self.bulk_in_sent || self.sent.chunk_is_clean(i))
        {
            i += 1;
        }
        let postcopy = self.switched.is_some_and(|s| s.postcopy);
        if i == chunks {
            self.streaming = None;
            self.bulk_in_sent = false;
            if let Some(sw) = self.switched {
                // docs/protocol.md §5.5: the post-copy stream ends with the final root.
                self.queue.push_back(Action::Send(Message::RoundEnd {
                    round: self.postcopy_round,
                    root: sw.final_root,
                }));
            } else {
                self.end_round();
            }
            return;
        }
        // Chunk content = sent ∪ pending; it replaces the destination's chunk (docs/protocol.md
        // §5.2), which in the bulk round is still empty.
        let mut raw = Vec::with_capacity(crate::CHUNK_BYTES);
        let (base, extra) = if self.bulk_in_sent {
            (&self.sent, &self.pending)
        } else {
            (&self.pending, &self.sent)
        };
        base.chunk_raw(i, &mut raw);
        let cv = if extra.chunk_is_clean(i) {
            // The hash the Offer's root (or an earlier round) computed, unless a mark changed
            // the chunk since.
            let cv = base.chunk_cv_of(i, &raw);
            if !self.bulk_in_sent {
                // Cannot fail: `raw` has the chunk's exact length and comes from a valid bitmap.
                let _ = self.sent.install_chunk_raw(i, &raw, cv);
            }
            cv
        } else {
            extra.chunk_raw(i, &mut self.buf);
            for (a, b) in raw.iter_mut().zip(&self.buf) {
                *a |= *b;
            }
            let cv = chunk_cv(i, &raw);
            // `cv` is its hash, so the round's root does not hash the chunk again.
            let _ = self.sent.install_chunk_raw(i, &raw, cv);
            cv
        };
        self.pending.clear_chunk(i);
        let enc = encode_chunk_owned(raw);
        let header = ChunkHeader {
            round: if postcopy {
                self.postcopy_round
            } else {
                self.round
            },
            index: i as u32,
            kind: enc.kind,
            cv,
            payload_len: enc.payload.len() as u32,
        };
        self.queue.push_back(Action::Send(Message::Chunk(header)));
        if !enc.payload.is_empty() {
            self.queue.push_back(Action::SendPayload(enc.payload));
        }
        self.streaming = Some(i + 1);
    }

    fn end_round(&mut self) {
        let root = self.sent.root();
        self.queue.push_back(Action::Send(Message::RoundEnd {
            round: self.round,
            root,
        }));
        self.unacked.push_back((self.round, root));
        self.round += 1;
    }

    /// If the bulk is streaming with its unsent chunks in `sent`, move them to `pending`, so
    /// that `sent` is again exactly what the destination will hold.
    fn return_unsent_bulk(&mut self) {
        if !std::mem::take(&mut self.bulk_in_sent) {
            return;
        }
        let from = self.streaming.unwrap_or(0);
        let mut buf = Vec::new();
        for c in from..self.sent.chunks() {
            if !self.sent.chunk_is_clean(c) {
                self.sent.chunk_raw(c, &mut buf);
                // Cannot fail: same geometry, so `buf` has the chunk's exact length.
                let _ = self.pending.apply_chunk_raw(c, &buf, true);
                self.sent.clear_chunk(c);
            }
        }
    }

    /// Queue Delta messages for every pending bit not yet sent, in round `round`, and fold them
    /// into `sent`.
    fn queue_deltas(&mut self, round: u32) {
        // Only the *newly* set bits travel (docs/protocol.md §5.3).
        let _ = self.pending.subtract(&self.sent);
        for d in delta::encode_bits(&self.pending) {
            self.queue
                .push_back(Action::Send(Message::Delta(DeltaHeader {
                    round,
                    base: d.base,
                    encoding: d.encoding,
                    payload_len: d.payload.len() as u32,
                })));
            self.queue.push_back(Action::SendPayload(d.payload));
        }
        let _ = self.sent.merge(&self.pending);
        for c in 0..self.pending.chunks() {
            self.pending.clear_chunk(c);
        }
    }

    /// A message from the destination.
    pub fn handle(&mut self, msg: Message) -> Result<(), UsageError> {
        if self.phase == Phase::Done {
            return Err(UsageError::Finished);
        }
        match (self.phase, msg) {
            (Phase::Hello, Message::Welcome(w)) => {
                if !SUPPORTED_VERSIONS.contains(&w.version) {
                    self.fail(
                        PeerError::UnsupportedVersion {
                            peer: vec![w.version],
                            ours: SUPPORTED_VERSIONS.to_vec(),
                        },
                        AbortReason::Protocol,
                        None,
                    );
                    return Ok(());
                }
                if w.features & !features::ALL != 0 {
                    self.fail(
                        PeerError::BadFeatures(w.features),
                        AbortReason::Protocol,
                        None,
                    );
                    return Ok(());
                }
                if w.features & features::POSTCOPY == 0 {
                    self.mode = Mode::Precopy;
                }
                let geom = self.pending.geometry();
                let root = self.pending.root();
                let offer = Offer {
                    disk: self.disk.clone(),
                    size: geom.size(),
                    granularity: geom.granularity(),
                    checkpoint: self.checkpoint.clone(),
                    epoch: self.epoch,
                    chunk_bytes: crate::CHUNK_BYTES as u32,
                    chunks: geom.chunks() as u32,
                    root,
                    mode: self.mode,
                };
                self.offer_hash = super::msg::offer_hash(&offer);
                self.queue.push_back(Action::Send(Message::Offer(offer)));
                self.phase = Phase::Offered;
            }
            (Phase::Hello | Phase::Offered, Message::Refuse(r)) => {
                self.finish_failed(
                    PeerError::Refused {
                        reason: r.reason,
                        detail: r.detail.as_str().to_owned(),
                    },
                    None,
                );
            }
            (Phase::Offered, Message::Accept { offer }) if offer != self.offer_hash => {
                // The destination accepted metadata we did not send (docs/protocol.md §7).
                self.fail(PeerError::OfferMismatch, AbortReason::Protocol, None);
            }
            (Phase::Offered, Message::Accept { .. }) => {
                // docs/protocol.md §5.2: round 0 is the bulk, streamed lazily. `sent` is still
                // empty: swap, and marks from now on land in the empty bitmap.
                std::mem::swap(&mut self.sent, &mut self.pending);
                self.bulk_in_sent = true;
                self.phase = Phase::Rounds;
                self.streaming = Some(0);
            }
            (Phase::Rounds | Phase::Switched, Message::RoundAck { round, root }) => {
                match self.unacked.front() {
                    Some(&(r, expected)) if r == round => {
                        if expected != root {
                            self.fail(
                                PeerError::RootMismatch {
                                    round,
                                    expected,
                                    got: root,
                                },
                                AbortReason::RootMismatch,
                                None,
                            );
                        } else {
                            self.unacked.pop_front();
                            self.stats.rounds += 1;
                        }
                    }
                    _ => self.fail(
                        PeerError::WrongRound {
                            expected: self.unacked.front().map_or(self.round, |u| u.0),
                            got: round,
                        },
                        AbortReason::Protocol,
                        None,
                    ),
                }
            }
            (Phase::Switched, Message::Committed { epoch, root }) => {
                let Some(sw) = self.switched else {
                    return Ok(());
                };
                if self.streaming.is_some() {
                    self.fail(
                        PeerError::Unexpected {
                            got: "Committed",
                            phase: "still streaming post-copy chunks",
                        },
                        AbortReason::Protocol,
                        None,
                    );
                } else if epoch != sw.epoch_next {
                    self.fail(
                        PeerError::BadEpoch {
                            expected: sw.epoch_next,
                            got: epoch,
                        },
                        AbortReason::StaleEpoch,
                        None,
                    );
                } else if root != sw.final_root {
                    self.fail(
                        PeerError::RootMismatch {
                            round: self.round,
                            expected: sw.final_root,
                            got: root,
                        },
                        AbortReason::RootMismatch,
                        None,
                    );
                } else {
                    // docs/protocol.md §5.6: retire only after the durable Committed.
                    self.counting = false;
                    self.queue.push_back(Action::Retire {
                        disk: self.disk.clone(),
                        epoch,
                    });
                    self.queue.push_back(Action::Send(Message::Retired));
                    self.queue
                        .push_back(Action::Finished(Outcome::Migrated { epoch, root }));
                    self.phase = Phase::Done;
                }
            }
            (_, Message::Abort(a)) => {
                self.finish_failed(
                    PeerError::Aborted {
                        reason: a.reason,
                        detail: a.detail.as_str().to_owned(),
                    },
                    Some(a.dest_owns),
                );
            }
            (phase, m) => self.fail(
                PeerError::Unexpected {
                    got: m.name(),
                    phase: phase.name(),
                },
                AbortReason::Protocol,
                None,
            ),
        }
        Ok(())
    }

    /// The transport delivered bytes that are not a valid frame.
    pub fn on_frame_error(&mut self, e: FrameError) -> Result<(), UsageError> {
        if self.phase == Phase::Done {
            return Err(UsageError::Finished);
        }
        self.fail(PeerError::Frame(e), AbortReason::Protocol, None);
        Ok(())
    }

    /// Who owns the disk if the session ends now (docs/protocol.md §6). `dest_says` is the
    /// destination's own claim, when it sent one.
    fn outcome(&self, dest_says: Option<bool>) -> Outcome {
        match self.switched {
            None => Outcome::SourceKeeps,
            // The VM leaves on a post-copy switchover whatever happens to the message.
            Some(sw) if sw.postcopy => Outcome::HandedOver,
            // A pre-copy Switchover that never left this session cannot have been acted on.
            Some(_) if !self.switch_sent => Outcome::SourceKeeps,
            Some(_) => match dest_says {
                Some(true) => Outcome::HandedOver,
                Some(false) => Outcome::SourceKeeps,
                None => Outcome::InDoubt,
            },
        }
    }

    /// Fail, telling the peer why.
    fn fail(&mut self, error: PeerError, reason: AbortReason, dest_says: Option<bool>) {
        let detail = BoundedString::truncating(error.to_string());
        self.finish_failed(error, dest_says);
        self.queue.push_front(Action::Send(Message::Abort(Abort {
            reason,
            detail,
            dest_owns: false,
        })));
    }

    /// Fail without sending anything (the peer refused, aborted or vanished). Unsent actions
    /// are dropped: nothing more goes to a failed peer.
    fn finish_failed(&mut self, error: PeerError, dest_says: Option<bool>) {
        let outcome = self.outcome(dest_says);
        self.queue.clear();
        self.streaming = None;
        self.queue
            .push_back(Action::Failed(Failure { error, outcome }));
        self.phase = Phase::Done;
    }

    /// The connection is gone.
    pub fn peer_lost(&mut self) -> Result<(), UsageError> {
        if self.phase == Phase::Done {
            return Err(UsageError::Finished);
        }
        self.finish_failed(PeerError::Lost, None);
        Ok(())
    }

    /// Abort on the operator's request. Before switchover the source stays owner.
    pub fn abort(&mut self) -> Result<(), UsageError> {
        if self.phase == Phase::Done {
            return Err(UsageError::Finished);
        }
        let outcome = self.outcome(None);
        self.queue.clear();
        self.streaming = None;
        self.queue.push_back(Action::Send(Message::Abort(Abort {
            reason: AbortReason::Requested,
            detail: BoundedString::truncating("aborted by the source"),
            dest_owns: false,
        })));
        self.queue.push_back(Action::Finished(outcome));
        self.phase = Phase::Done;
        Ok(())
    }

    fn check_marks(&self, op: &'static str) -> Result<(), UsageError> {
        match self.phase {
            Phase::Hello | Phase::Offered | Phase::Rounds => Ok(()),
            p => Err(UsageError::WrongPhase {
                op,
                phase: p.name(),
            }),
        }
    }

    /// A write touched bytes `offset .. offset+len` while the migration runs. Returns blocks
    /// newly marked since the last round. Not allowed after switchover (the VM has left).
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<u64, UsageError> {
        self.check_marks("mark")?;
        Ok(self.pending.mark(offset, len)?)
    }

    /// Blocks `first .. end` were written.
    pub fn mark_blocks(&mut self, first: u64, end: u64) -> Result<u64, UsageError> {
        self.check_marks("mark_blocks")?;
        Ok(self.pending.set_blocks(first, end))
    }

    /// OR a bitmap of local marks in.
    pub fn local_marks(&mut self, marks: &Bitmap) -> Result<(), UsageError> {
        self.check_marks("local_marks")?;
        Ok(self.pending.merge(marks)?)
    }

    /// Start the next pre-copy round: send the blocks newly set since the previous round, then
    /// the round's root. Returns the round number. The bulk (round 0) must have been fully
    /// handed out by [`SourceSession::poll_action`] first.
    pub fn start_round(&mut self) -> Result<u32, UsageError> {
        if self.phase != Phase::Rounds {
            return Err(UsageError::WrongPhase {
                op: "start_round",
                phase: self.phase.name(),
            });
        }
        if self.streaming.is_some() {
            return Err(UsageError::RoundInProgress(self.round));
        }
        let r = self.round;
        self.queue_deltas(r);
        self.end_round();
        Ok(r)
    }

    /// Switch over. Pre-copy: send the last delta and the final root; the destination commits
    /// and answers Committed. Post-copy: send the final root at once, then every chunk that
    /// differs from what the destination holds (docs/protocol.md §5.4, §5.5).
    pub fn switchover(&mut self, postcopy: bool) -> Result<(), UsageError> {
        if self.phase != Phase::Rounds {
            return Err(UsageError::WrongPhase {
                op: "switchover",
                phase: self.phase.name(),
            });
        }
        if postcopy && self.mode != Mode::Postcopy {
            return Err(UsageError::PostcopyUnavailable);
        }
        self.counting = true;
        // A bulk still streaming is cut here; its unsent chunks go back to `pending`.
        self.return_unsent_bulk();
        self.streaming = None;
        let epoch_next = self.epoch + 1;
        let final_root = if postcopy {
            // Blocks marked again after they were sent need no chunk of their own.
            let _ = self.pending.subtract(&self.sent);
            // No copy of the bitmap while the VM waits.
            self.sent
                .union_root(&self.pending)
                .expect("sent and pending both have the offered geometry")
        } else {
            self.queue_deltas(self.round);
            self.sent.root()
        };
        // docs/protocol.md §5.4: the hand-over is durable before the Switchover can leave.
        self.queue.push_back(Action::HandOver {
            disk: self.disk.clone(),
            epoch_next,
            postcopy,
        });
        self.withheld = Some((
            Switchover {
                epoch_next,
                final_root,
                postcopy,
            },
            false,
        ));
        self.switched = Some(Switched {
            epoch_next,
            final_root,
            postcopy,
        });
        if postcopy {
            self.postcopy_round = self.round + 1;
            self.streaming = Some(0);
        }
        self.phase = Phase::Switched;
        Ok(())
    }

    /// The driver made the polled [`Action::HandOver`] durable: the Switchover leaves next.
    pub fn handed_over_durably(&mut self) -> Result<(), UsageError> {
        match self.withheld.take() {
            Some((sw, true)) if self.phase == Phase::Switched => {
                self.queue.push_front(Action::Send(Message::Switchover(sw)));
                Ok(())
            }
            other => {
                self.withheld = other;
                Err(UsageError::NoHandOverPending)
            }
        }
    }

    /// The driver could not make the polled [`Action::HandOver`] durable (e.g. the store is
    /// full). Nothing of the switchover left this host, so it is withdrawn: the session is
    /// back in its pre-copy rounds, the source still owns the disk, and a switchover may be
    /// asked for again once the store is writable (docs/protocol.md §5.4).
    pub fn hand_over_failed(&mut self) -> Result<(), UsageError> {
        match self.withheld.take() {
            Some((_, true)) if self.phase == Phase::Switched => {
                // What was queued before the hand-over (the last delta) has been handed out and
                // is part of `sent`; a later round or switchover carries on from there.
                self.switched = None;
                self.streaming = None;
                self.counting = false;
                self.postcopy_round = 0;
                self.phase = Phase::Rounds;
                Ok(())
            }
            other => {
                self.withheld = other;
                Err(UsageError::NoHandOverPending)
            }
        }
    }

    /// Where the session is ([`Phase::name`] says it in words).
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bytes and rounds so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The round being streamed, or the next round's number.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Whether a bulk or post-copy stream still has chunks to hand out.
    pub fn is_streaming(&self) -> bool {
        self.streaming.is_some()
    }

    /// Whether every round sent so far has been acknowledged.
    pub fn rounds_acked(&self) -> bool {
        self.unacked.is_empty()
    }

    /// The disk being migrated.
    pub fn disk(&self) -> &DiskId {
        &self.disk
    }

    /// The source's ownership epoch (the destination will own at this + 1).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// This host's name as sent in Hello.
    pub fn host(&self) -> &str {
        self.host.as_str()
    }
}
