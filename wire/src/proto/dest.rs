//! The migration destination's state machine, sans I/O (docs/protocol.md §5).

use super::action::{Action, CommitMeta, Failure, Outcome, Stats};
use super::delta::{self, MAX_DELTA_PAYLOAD};
use super::error::{FrameError, PeerError, UsageError};
use super::frame::frame_len;
use super::msg::{
    Abort, AbortReason, BoundedString, ChunkHeader, DeltaHeader, Hello, Message, Mode, Offer,
    Refuse, RefuseReason, SUPPORTED_VERSIONS, Switchover, Welcome, features,
};
use crate::bitmap::Bitmap;
use crate::chunk::{ChunkKind, decode_chunk};
use crate::disk::{Checkpoint, DiskId, State};
use crate::geometry::Geometry;
use crate::tree::{Root, chunk_cv};
use std::borrow::Cow;
use std::collections::VecDeque;

/// One disk the destination was told to accept (`bitferry expect --disk ID [--from PEER]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// The disk.
    pub disk: DiskId,
    /// Accept it only from this peer (compared with the Hello's host; the agent should also
    /// check the TLS identity).
    pub from: Option<String>,
    /// The epoch at which this host already owns the disk, if it does: offers at that epoch or
    /// older are refused (docs/protocol.md §6).
    pub owned_epoch: Option<u64>,
    /// The epoch at which this host handed the disk over to another host, if it ever did (its
    /// retirement record): offers *below* it come from a stale copy and are refused. An offer
    /// at that epoch is the owner's own (docs/protocol.md §6).
    pub retired_at: Option<u64>,
    /// Why this host cannot tell which epochs of the disk are stale (an unreadable store file
    /// or retirement record), if it cannot: every offer for the disk is refused then, with
    /// this reason (docs/protocol.md §6).
    pub epoch_unknown: Option<String>,
}

/// The destination agent's authorization decision, supplied up front.
#[derive(Debug, Clone, Default)]
pub struct DestPolicy {
    /// Disks this destination accepts.
    pub expected: Vec<Expectation>,
    /// Whether a post-copy switchover may be offered.
    pub allow_postcopy: bool,
}

/// Where a [`DestSession`] is (docs/protocol.md §5); exported as `wire::proto::DestPhase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the source's Hello.
    Hello,
    /// Welcome sent, waiting for an Offer.
    Offer,
    /// Accepted; receiving bulk and pre-copy rounds.
    Receiving,
    /// Switched over in post-copy: owner, receiving the rest of the bitmap.
    PostCopy,
    /// Owner of a verified bitmap; the final Commit is queued or being made durable.
    Owner,
    /// Committed sent, waiting for the source's Retired.
    AwaitRetired,
    /// Over, one way or the other (see the session's outcome).
    Done,
}

impl Phase {
    /// The phase in words, for status displays and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Hello => "waiting for Hello",
            Phase::Offer => "waiting for Offer",
            Phase::Receiving => "receiving rounds",
            Phase::PostCopy => "receiving post-copy chunks",
            Phase::Owner => "committing",
            Phase::AwaitRetired => "waiting for Retired",
            Phase::Done => "finished",
        }
    }

    fn owns(self) -> bool {
        matches!(self, Phase::PostCopy | Phase::Owner | Phase::AwaitRetired)
    }
}

#[derive(Debug, Clone)]
struct Offered {
    disk: DiskId,
    geom: Geometry,
    checkpoint: Option<Checkpoint>,
    /// Whether the Offer allowed a post-copy switchover.
    mode: Mode,
}

#[derive(Debug, Clone, Copy)]
enum Pending {
    Chunk(ChunkHeader),
    Delta(DeltaHeader),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitKind {
    /// Post-copy: ownership taken, bitmap still incomplete; the session keeps tracking.
    Ownership,
    /// The verified bitmap; Committed follows once durable.
    Final,
    /// Incomplete, and the session ends.
    Terminal,
}

// The queue holds a handful of entries; boxing every message to shrink it buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Queued {
    Action(Action),
    /// The bitmap is taken when the action is polled, so marks made until then are included.
    Commit {
        kind: CommitKind,
        state: State,
        reason: Option<String>,
    },
}

/// The destination side of one disk's migration.
///
/// # How to drive
///
/// ```text
/// let mut d = DestSession::new(policy);
/// loop {
///     select! {
///         bytes = quic.read() => { dec.push(&bytes);
///             loop { match dec.next_item() {
///                 Ok(Some(Incoming::Message(m))) => d.handle(m)?,
///                 Ok(Some(Incoming::Payload(p))) => d.on_payload(&p)?,   // d.expected_payload() bytes
///                 Ok(None) => break,
///                 Err(e) => { d.on_frame_error(e)?; break } } } }
///         closed = quic.closed() => d.peer_lost()?,
///     }
///     while let Some(a) = d.poll_action() {
///         match a {                                                    // in order:
///             Action::Commit { meta, bitmap } => match store.commit(meta, bitmap) {
///                 Ok(()) => d.committed_durably()?,
///                 Err(e) => d.commit_failed(&e.to_string())? },
///             Action::RebuildNeeded { .. } => start_rebuild(),
///             Action::Send(m) / Action::SendPayload(p) => quic.write(..),
///             Action::Finished(_) | Action::Failed(_) => stop,
///             _ => {}
///         }
///     }
/// }
/// ```
///
/// The session holds only what the source sent. Writes made on this host (the VM may resume
/// here at a post-copy switchover, or before the Switchover message arrives) are the agent's to
/// record: it keeps them beside the session and merges every `Commit`'s bitmap into them
/// under one lock, so no write can fall between the session and the store whatever order the
/// driver sees events in (docs/protocol.md §5.5).
#[derive(Debug)]
pub struct DestSession {
    policy: DestPolicy,
    phase: Phase,
    features: u64,
    peer_host: String,
    offer: Option<Offered>,
    /// The source's bitmap as received (verified per chunk and per round). Created at Accept;
    /// its memory is mapped only as chunks land ([`Bitmap::new`]), so the page faults of a
    /// large bitmap (~70 ms for 128 MiB) spread over the transfer instead of holding it up.
    src: Option<Bitmap>,
    /// After switchover: the bitmap this host owns as far as the source is concerned (`src`,
    /// then every verified post-copy chunk OR-ed in); the agent merges its local marks.
    live: Option<Bitmap>,
    round: u32,
    payload: Option<Pending>,
    epoch_next: u64,
    final_root: Option<Root>,
    durable_wait: VecDeque<CommitKind>,
    /// This host owns the disk: set at switchover, cleared only when a pre-copy final commit
    /// fails (the source keeps the disk then).
    owner: bool,
    postcopy: bool,
    state: State,
    counting: bool,
    stats: Stats,
    queue: VecDeque<Queued>,
}

impl DestSession {
    /// A destination waiting for a Hello, with the agent's authorization decision.
    pub fn new(policy: DestPolicy) -> Self {
        DestSession {
            policy,
            phase: Phase::Hello,
            features: 0,
            peer_host: String::new(),
            offer: None,
            src: None,
            live: None,
            round: 0,
            payload: None,
            epoch_next: 0,
            final_root: None,
            durable_wait: VecDeque::new(),
            owner: false,
            postcopy: false,
            state: State::Incomplete,
            counting: false,
            stats: Stats::default(),
            queue: VecDeque::new(),
        }
    }

    fn send(&mut self, m: Message) {
        self.queue.push_back(Queued::Action(Action::Send(m)));
    }

    fn push(&mut self, a: Action) {
        self.queue.push_back(Queued::Action(a));
    }

    fn queue_commit(&mut self, kind: CommitKind, state: State, reason: Option<String>) {
        // `durable_wait` gets the commit when the driver polls it, not now: an answer before
        // the driver has even seen the Commit must not send Committed (found by the
        // `migration` fuzz target, docs/fuzzing.md).
        self.queue.push_back(Queued::Commit {
            kind,
            state,
            reason,
        });
    }

    /// The next thing to do, or `None` until an event arrives.
    pub fn poll_action(&mut self) -> Option<Action> {
        let a = match self.queue.pop_front()? {
            Queued::Action(a) => a,
            Queued::Commit {
                kind,
                state,
                reason,
            } => {
                let bitmap = match kind {
                    CommitKind::Ownership => self.live.clone(),
                    CommitKind::Final | CommitKind::Terminal => self.live.take(),
                };
                let offer = self.offer.as_ref()?;
                self.durable_wait.push_back(kind);
                let bitmap = bitmap.unwrap_or_else(|| Bitmap::new(offer.geom));
                Action::Commit {
                    meta: CommitMeta {
                        disk: offer.disk.clone(),
                        geometry: offer.geom,
                        checkpoint: offer.checkpoint.clone(),
                        epoch: self.epoch_next,
                        state,
                        reason,
                    },
                    bitmap,
                }
            }
        };
        let n = match &a {
            Action::Send(m) => frame_len(m),
            Action::SendPayload(p) => p.len(),
            _ => 0,
        } as u64;
        self.stats.bytes_total += n;
        if self.counting {
            self.stats.bytes_during_switchover += n;
            if matches!(a, Action::Send(Message::Committed { .. })) {
                self.counting = false;
            }
        }
        Some(a)
    }

    /// A message from the source.
    pub fn handle(&mut self, msg: Message) -> Result<(), UsageError> {
        if self.phase == Phase::Done {
            return Err(UsageError::Finished);
        }
        if self.payload.is_some() && !matches!(msg, Message::Abort(_)) {
            self.fail(
                PeerError::Unexpected {
                    got: msg.name(),
                    phase: "waiting for a payload",
                },
                AbortReason::Protocol,
            );
            return Ok(());
        }
        match (self.phase, msg) {
            (Phase::Hello, Message::Hello(h)) => self.on_hello(h),
            (Phase::Offer, Message::Offer(o)) => self.on_offer(o),
            (Phase::Receiving | Phase::PostCopy, Message::Chunk(h)) => self.on_chunk_header(h),
            (Phase::Receiving, Message::Delta(h)) => self.on_delta_header(h),
            (Phase::Receiving | Phase::PostCopy, Message::RoundEnd { round, root }) => {
                self.on_round_end(round, root)
            }
            (Phase::Receiving, Message::Switchover(s)) => self.on_switchover(s),
            (Phase::AwaitRetired, Message::Retired) => {
                let root = self.final_root.unwrap_or(Root([0; 32]));
                self.push(Action::Finished(Outcome::Migrated {
                    epoch: self.epoch_next,
                    root,
                }));
                self.phase = Phase::Done;
            }
            (phase, Message::Abort(a)) => {
                let error = PeerError::Aborted {
                    reason: a.reason,
                    detail: a.detail.as_str().to_owned(),
                };
                if phase == Phase::PostCopy {
                    self.owner_incomplete(
                        format!("source aborted during post-copy: {error}"),
                        None,
                        Some(error),
                    );
                } else {
                    self.finish_failed(error);
                }
            }
            (phase, m) => self.fail(
                PeerError::Unexpected {
                    got: m.name(),
                    phase: phase.name(),
                },
                AbortReason::Protocol,
            ),
        }
        Ok(())
    }

    fn on_hello(&mut self, h: Hello) {
        // docs/protocol.md §4: the highest version both speak.
        let common = h
            .protocol_versions
            .as_slice()
            .iter()
            .filter(|v| SUPPORTED_VERSIONS.contains(v))
            .max()
            .copied();
        let Some(version) = common else {
            self.refuse(
                RefuseReason::UnsupportedVersion,
                format!(
                    "no common protocol version: peer speaks {:?}, we speak {:?}",
                    h.protocol_versions.as_slice(),
                    SUPPORTED_VERSIONS
                ),
                Some(PeerError::UnsupportedVersion {
                    peer: h.protocol_versions.as_slice().to_vec(),
                    ours: SUPPORTED_VERSIONS.to_vec(),
                }),
            );
            return;
        };
        let ours = if self.policy.allow_postcopy {
            features::ALL
        } else {
            features::ALL & !features::POSTCOPY
        };
        self.features = h.features & ours;
        self.peer_host = h.host.as_str().to_owned();
        self.send(Message::Welcome(Welcome {
            version,
            features: self.features,
        }));
        self.phase = Phase::Offer;
    }

    fn on_offer(&mut self, o: Offer) {
        let offer = super::msg::offer_hash(&o);
        // docs/protocol.md §6: authorization first, then the epoch rule, then the layout.
        let Some(exp) = self
            .policy
            .expected
            .iter()
            .find(|e| e.disk == o.disk)
            .cloned()
        else {
            let d = format!("disk {} is not expected here", o.disk);
            self.refuse(RefuseReason::NotExpected, d, None);
            return;
        };
        if exp.from.as_ref().is_some_and(|f| *f != self.peer_host) {
            let d = format!("disk {} is not expected from {}", o.disk, self.peer_host);
            self.refuse(RefuseReason::NotExpected, d, None);
            return;
        }
        if let Some(why) = &exp.epoch_unknown {
            let d = format!(
                "this host cannot tell whether epoch {} of disk {} is stale: {why}",
                o.epoch, o.disk
            );
            self.refuse(RefuseReason::StaleEpoch, d, None);
            return;
        }
        if let Some(owned) = exp.owned_epoch
            && o.epoch <= owned
        {
            let d = format!(
                "offered epoch {} is not newer than the epoch {owned} owned here",
                o.epoch
            );
            self.refuse(RefuseReason::StaleEpoch, d, None);
            return;
        }
        if let Some(retired) = exp.retired_at
            && o.epoch < retired
        {
            let d = format!(
                "offered epoch {} is older than epoch {retired}, to which this host handed the \
                 disk over: the offer comes from a stale copy",
                o.epoch
            );
            self.refuse(RefuseReason::StaleEpoch, d, None);
            return;
        }
        let geom = match Geometry::new(o.size, o.granularity) {
            Ok(g) => g,
            Err(e) => {
                let d = format!("bad geometry: {e}");
                self.refuse(RefuseReason::BadOffer, d, None);
                return;
            }
        };
        if o.epoch == u64::MAX
            || o.chunk_bytes as usize != crate::CHUNK_BYTES
            || o.chunks as usize != geom.chunks()
        {
            let d = format!(
                "bad layout: epoch {}, {} chunks of {} bytes (expected {} of {})",
                o.epoch,
                o.chunks,
                o.chunk_bytes,
                geom.chunks(),
                crate::CHUNK_BYTES
            );
            self.refuse(RefuseReason::BadOffer, d, None);
            return;
        }
        if o.mode == Mode::Postcopy && self.features & features::POSTCOPY == 0 {
            let d = "post-copy is not allowed here".to_string();
            self.refuse(RefuseReason::PostcopyNotAllowed, d, None);
            return;
        }
        self.offer = Some(Offered {
            disk: o.disk,
            geom,
            checkpoint: o.checkpoint.map(|c| c.to_checkpoint()),
            mode: o.mode,
        });
        self.epoch_next = o.epoch + 1;
        self.src = Some(Bitmap::new(geom));
        self.send(Message::Accept { offer });
        self.phase = Phase::Receiving;
    }

    fn check_round(&mut self, got: u32) -> bool {
        if got != self.round {
            self.fail(
                PeerError::WrongRound {
                    expected: self.round,
                    got,
                },
                AbortReason::Protocol,
            );
            return false;
        }
        true
    }

    fn on_chunk_header(&mut self, h: ChunkHeader) {
        if !self.check_round(h.round) {
            return;
        }
        let Some(geom) = self.offer.as_ref().map(|o| o.geom) else {
            return;
        };
        let index = h.index as usize;
        let len = h.payload_len as usize;
        let bad = if index >= geom.chunks() {
            Some(format!("chunk index {index} of {}", geom.chunks()))
        } else {
            let raw_len = geom.chunk_range(index).len();
            match h.kind {
                ChunkKind::Zero if len != 0 => Some("zero chunk with payload".into()),
                ChunkKind::Raw if len != raw_len => {
                    Some(format!("raw chunk of {len} bytes, expected {raw_len}"))
                }
                ChunkKind::Roaring if len == 0 || len > raw_len => {
                    Some(format!("roaring chunk of {len} bytes"))
                }
                _ => None,
            }
        };
        if let Some(why) = bad {
            self.fail(
                PeerError::BadChunk {
                    index: h.index,
                    why,
                },
                AbortReason::BadChunk,
            );
            return;
        }
        if len == 0 {
            self.apply_chunk(h, &[]);
        } else {
            self.payload = Some(Pending::Chunk(h));
        }
    }

    fn on_delta_header(&mut self, h: DeltaHeader) {
        if !self.check_round(h.round) {
            return;
        }
        let blocks = self.offer.as_ref().map_or(0, |o| o.geom.blocks());
        let len = h.payload_len as usize;
        if len == 0 || len > MAX_DELTA_PAYLOAD || h.base >= blocks {
            self.fail(
                PeerError::BadHeader(format!(
                    "delta of {len} bytes at base {} (bitmap of {blocks} blocks)",
                    h.base
                )),
                AbortReason::BadDelta,
            );
            return;
        }
        self.payload = Some(Pending::Delta(h));
    }

    /// Raw bytes of the payload the last Chunk or Delta header announced: exactly
    /// [`DestSession::expected_payload`] bytes.
    pub fn on_payload(&mut self, bytes: &[u8]) -> Result<(), UsageError> {
        if self.phase == Phase::Done {
            return Err(UsageError::Finished);
        }
        let expected = self.expected_payload();
        if expected == 0 || bytes.len() != expected {
            return Err(UsageError::Payload {
                expected,
                got: bytes.len(),
            });
        }
        match self.payload.take() {
            Some(Pending::Chunk(h)) => self.apply_chunk(h, bytes),
            Some(Pending::Delta(h)) => {
                let Some(src) = self.src.as_mut() else {
                    return Ok(());
                };
                match delta::apply(src, h.base, h.encoding, bytes) {
                    Ok(_) => self.stats.deltas += 1,
                    Err(why) => self.fail(PeerError::BadDelta(why), AbortReason::BadDelta),
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Bytes of raw payload the session is waiting for (0: none; read the next frame).
    pub fn expected_payload(&self) -> usize {
        match self.payload {
            Some(Pending::Chunk(h)) => h.payload_len as usize,
            Some(Pending::Delta(h)) => h.payload_len as usize,
            None => 0,
        }
    }

    /// docs/protocol.md §7: a chunk is verified against its hash *before* it touches any
    /// bitmap; in post-copy it then replaces the source copy's chunk and is OR-ed into the
    /// owned bitmap.
    fn apply_chunk(&mut self, h: ChunkHeader, payload: &[u8]) {
        match self.install_verified(h, payload) {
            Ok(true) => self.stats.chunks += 1,
            Ok(false) => {}
            Err(why) => self.fail(
                PeerError::BadChunk {
                    index: h.index,
                    why,
                },
                AbortReason::BadChunk,
            ),
        }
    }

    /// Decode and verify chunk `h`, then install it; `Ok(false)` when there is no copy to
    /// install it in, `Err` with why the chunk is bad (nothing changed then).
    fn install_verified(&mut self, h: ChunkHeader, payload: &[u8]) -> Result<bool, String> {
        let Some(geom) = self.offer.as_ref().map(|o| o.geom) else {
            return Ok(false);
        };
        let index = h.index as usize;
        let raw_len = geom.chunk_range(index).len();
        // A raw payload of the right length is verified and applied where it lies; the other
        // forms are decoded first (and a wrong length is decode_chunk's error to report).
        let raw = match h.kind {
            ChunkKind::Raw if payload.len() == raw_len => Cow::Borrowed(payload),
            kind => Cow::Owned(decode_chunk(kind, payload, raw_len).map_err(|e| e.to_string())?),
        };
        if chunk_cv(index, &raw) != h.cv {
            return Err("content does not match its hash".into());
        }
        let Some(src) = self.src.as_mut() else {
            return Ok(false);
        };
        // `h.cv` was just checked against `raw`: the round's root need not hash it again.
        src.install_chunk_raw(index, &raw, h.cv)
            .map_err(|e| e.to_string())?;
        if self.phase == Phase::PostCopy
            && let Some(live) = self.live.as_mut()
        {
            // Same bytes as just applied to `src`: cannot fail.
            let _ = live.apply_chunk_raw(index, &raw, true);
        }
        Ok(true)
    }

    fn on_round_end(&mut self, round: u32, root: Root) {
        if !self.check_round(round) {
            return;
        }
        let Some(got) = self.src.as_mut().map(|s| s.root()) else {
            return;
        };
        if self.phase == Phase::PostCopy {
            // docs/protocol.md §5.5: the source's final root over the source chunks received.
            let expected = self.final_root.unwrap_or(root);
            if root != expected || got != expected {
                self.fail(
                    PeerError::RootMismatch {
                        round,
                        expected,
                        got,
                    },
                    AbortReason::RootMismatch,
                );
                return;
            }
            self.stats.rounds += 1;
            self.state = State::Consistent;
            self.src = None;
            self.queue_commit(CommitKind::Final, State::Consistent, None);
            self.phase = Phase::Owner;
            return;
        }
        if got != root {
            self.fail(
                PeerError::RootMismatch {
                    round,
                    expected: root,
                    got,
                },
                AbortReason::RootMismatch,
            );
            return;
        }
        self.send(Message::RoundAck { round, root });
        self.stats.rounds += 1;
        self.round += 1;
    }

    fn on_switchover(&mut self, s: Switchover) {
        self.counting = true;
        let epoch_next = self.epoch_next;
        if s.postcopy {
            self.postcopy = true;
            // docs/protocol.md §5.5: the VM resumes here now, so this host owns the disk from
            // this moment whatever follows; the bitmap stays incomplete until verified.
            self.final_root = Some(s.final_root);
            self.live = self.src.clone();
            self.owner = true;
            self.round += 1;
            self.phase = Phase::PostCopy;
            self.state = State::Incomplete;
            self.queue_commit(
                CommitKind::Ownership,
                State::Incomplete,
                Some("post-copy migration in progress".into()),
            );
            // A post-copy this session never agreed to. Owned anyway, as above: the VM may be
            // running here now, and incomplete is the truth.
            let unagreed = if self.features & features::POSTCOPY == 0 {
                Some("post-copy was not negotiated")
            } else if !self
                .offer
                .as_ref()
                .is_some_and(|o| o.mode == Mode::Postcopy)
            {
                // The Offer's mode, confirmed by its hash in Accept.
                Some("the Offer was pre-copy")
            } else {
                None
            };
            if s.epoch_next != epoch_next {
                self.fail(
                    PeerError::BadEpoch {
                        expected: epoch_next,
                        got: s.epoch_next,
                    },
                    AbortReason::StaleEpoch,
                );
            } else if let Some(phase) = unagreed {
                self.fail(
                    PeerError::Unexpected {
                        got: "post-copy Switchover",
                        phase,
                    },
                    AbortReason::Protocol,
                );
            }
            return;
        }
        if s.epoch_next != epoch_next {
            self.fail(
                PeerError::BadEpoch {
                    expected: epoch_next,
                    got: s.epoch_next,
                },
                AbortReason::StaleEpoch,
            );
            return;
        }
        let Some(got) = self.src.as_mut().map(|b| b.root()) else {
            return;
        };
        if got != s.final_root {
            self.fail(
                PeerError::RootMismatch {
                    round: self.round,
                    expected: s.final_root,
                    got,
                },
                AbortReason::RootMismatch,
            );
            return;
        }
        // docs/protocol.md §5.4: verified; take ownership at epoch + 1.
        self.final_root = Some(s.final_root);
        self.live = self.src.take();
        self.owner = true;
        self.state = State::Consistent;
        self.stats.rounds += 1;
        self.queue_commit(CommitKind::Final, State::Consistent, None);
        self.phase = Phase::Owner;
    }

    /// The agent made the last polled Commit durable (fsync done).
    pub fn committed_durably(&mut self) -> Result<(), UsageError> {
        let Some(kind) = self.durable_wait.pop_front() else {
            return Err(UsageError::NoCommitPending);
        };
        if kind == CommitKind::Final && self.phase == Phase::Owner {
            // docs/protocol.md §5.6: only now may the source retire.
            self.send(Message::Committed {
                epoch: self.epoch_next,
                root: self.final_root.unwrap_or(Root([0; 32])),
            });
            self.phase = Phase::AwaitRetired;
        }
        Ok(())
    }

    /// The agent could not make the last polled Commit durable. Pre-copy: nothing here is
    /// durable and the source was not told, so the source keeps the disk (the agent removes
    /// whatever it wrote at the new epoch). Post-copy: this host owns the disk regardless; it
    /// stays `incomplete` and a rebuild is requested (docs/protocol.md §6).
    pub fn commit_failed(&mut self, why: &str) -> Result<(), UsageError> {
        let Some(kind) = self.durable_wait.pop_front() else {
            return Err(UsageError::NoCommitPending);
        };
        match self.phase {
            Phase::Done => {}
            Phase::Owner if kind == CommitKind::Final && !self.postcopy => {
                self.owner = false;
                self.live = None;
                self.send(Message::Abort(Abort {
                    reason: AbortReason::Internal,
                    detail: BoundedString::truncating(format!(
                        "destination could not commit: {why}"
                    )),
                    dest_owns: false,
                }));
                self.push(Action::Finished(Outcome::SourceKeeps));
                self.phase = Phase::Done;
            }
            _ => self.owner_incomplete(
                format!("store commit failed: {why}"),
                Some(AbortReason::Internal),
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
        self.fail(PeerError::Frame(e), AbortReason::Protocol);
        Ok(())
    }

    /// The connection to the source is gone.
    pub fn peer_lost(&mut self) -> Result<(), UsageError> {
        match self.phase {
            Phase::Done => Err(UsageError::Finished),
            Phase::PostCopy => {
                self.owner_incomplete(
                    "source lost during post-copy".into(),
                    None,
                    Some(PeerError::Lost),
                );
                Ok(())
            }
            Phase::Owner | Phase::AwaitRetired => {
                // Verified and committed (or being committed): this host owns the disk even
                // if the source never hears so; the source will report InDoubt.
                self.finish_owner(None);
                Ok(())
            }
            _ => {
                self.finish_failed(PeerError::Lost);
                Ok(())
            }
        }
    }

    /// Abort on the operator's request: before switchover the source keeps the disk; after
    /// it this host keeps ownership.
    pub fn abort(&mut self) -> Result<(), UsageError> {
        let abort = |dest_owns| {
            Message::Abort(Abort {
                reason: AbortReason::Requested,
                detail: BoundedString::truncating("aborted by the destination"),
                dest_owns,
            })
        };
        match self.phase {
            Phase::Done => return Err(UsageError::Finished),
            Phase::PostCopy => {
                self.owner_incomplete(
                    "migration aborted during post-copy".into(),
                    Some(AbortReason::Requested),
                    None,
                );
            }
            Phase::Owner | Phase::AwaitRetired => {
                self.send(abort(true));
                self.finish_owner(None);
            }
            _ => {
                self.discard();
                self.send(abort(false));
                self.push(Action::Finished(Outcome::SourceKeeps));
                self.phase = Phase::Done;
            }
        }
        Ok(())
    }

    fn finish_owner(&mut self, error: Option<PeerError>) {
        let outcome = Outcome::Migrated {
            epoch: self.epoch_next,
            root: self.final_root.unwrap_or(Root([0; 32])),
        };
        self.push(match error {
            Some(error) => Action::Failed(Failure { error, outcome }),
            None => Action::Finished(outcome),
        });
        self.phase = Phase::Done;
    }

    /// Forget everything received: before switchover nothing here is owned.
    fn discard(&mut self) {
        self.queue.clear();
        self.src = None;
        self.live = None;
        self.payload = None;
    }

    /// Refuse a Hello or an Offer. The session's error is `error`, or by default the refusal
    /// itself.
    fn refuse(&mut self, reason: RefuseReason, detail: String, error: Option<PeerError>) {
        let error = error.unwrap_or_else(|| PeerError::Refused {
            reason,
            detail: detail.clone(),
        });
        self.discard();
        self.send(Message::Refuse(Refuse {
            reason,
            detail: BoundedString::truncating(detail),
        }));
        self.push(Action::Failed(Failure {
            error,
            outcome: Outcome::SourceKeeps,
        }));
        self.phase = Phase::Done;
    }

    /// The peer misbehaved: tell it why and end, leaving ownership as the phase dictates.
    fn fail(&mut self, error: PeerError, reason: AbortReason) {
        let owns = self.phase.owns();
        let abort = Message::Abort(Abort {
            reason,
            detail: BoundedString::truncating(error.to_string()),
            dest_owns: owns,
        });
        match self.phase {
            Phase::PostCopy => {
                self.owner_incomplete(
                    format!("post-copy failed: {error}"),
                    Some(reason),
                    Some(error),
                );
            }
            Phase::Owner | Phase::AwaitRetired => {
                // Keep the queued Commit: the verified bitmap is ours regardless.
                self.send(abort);
                self.finish_owner(Some(error));
            }
            _ => {
                self.discard();
                self.send(abort);
                self.push(Action::Failed(Failure {
                    error,
                    outcome: Outcome::SourceKeeps,
                }));
                self.phase = Phase::Done;
            }
        }
    }

    /// The peer refused, aborted or vanished before switchover: discard, source keeps.
    fn finish_failed(&mut self, error: PeerError) {
        if self.phase.owns() {
            self.finish_owner(Some(error));
            return;
        }
        self.discard();
        self.push(Action::Failed(Failure {
            error,
            outcome: Outcome::SourceKeeps,
        }));
        self.phase = Phase::Done;
    }

    /// Post-copy cut short: this host owns the disk, keeps its local marks and the verified
    /// source chunks, commits `incomplete` and asks for a rebuild (docs/protocol.md §5.5).
    fn owner_incomplete(
        &mut self,
        reason: String,
        send_abort: Option<AbortReason>,
        error: Option<PeerError>,
    ) {
        self.payload = None;
        self.state = State::Incomplete;
        // After a consistent Commit was polled the agent holds the bitmap and tracks on its
        // own; there is nothing left here to commit.
        if self.live.is_some() {
            self.queue_commit(
                CommitKind::Terminal,
                State::Incomplete,
                Some(reason.clone()),
            );
        }
        let disk = self.offer.as_ref().map(|o| o.disk.clone());
        if let Some(disk) = disk {
            self.push(Action::RebuildNeeded {
                disk,
                reason: reason.clone(),
            });
        }
        if let Some(r) = send_abort {
            self.send(Message::Abort(Abort {
                reason: r,
                detail: BoundedString::truncating(reason),
                dest_owns: true,
            }));
        }
        let outcome = Outcome::DestOwnsIncomplete {
            epoch: self.epoch_next,
        };
        self.push(match error {
            Some(error) => Action::Failed(Failure { error, outcome }),
            None => Action::Finished(outcome),
        });
        self.phase = Phase::Done;
    }

    /// Trust state of what this host holds: `incomplete` until every chunk and the final root
    /// are verified, then `consistent`.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether this host owns the disk now: a switchover was accepted and, if it was a
    /// pre-copy one, its commit did not fail (docs/protocol.md §6). The agent keeps an owned
    /// disk whatever else fails; it forgets what it wrote only when this is `false`.
    pub fn owns(&self) -> bool {
        self.owner
    }

    /// Where the session is ([`Phase::name`] says it in words).
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bytes and rounds so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The peer's host name from its Hello.
    pub fn peer_host(&self) -> &str {
        &self.peer_host
    }

    /// The disk being received, once offered and accepted.
    pub fn disk(&self) -> Option<&DiskId> {
        self.offer.as_ref().map(|o| &o.disk)
    }

    /// The accepted disk's geometry (what the agent's local marks for it must use).
    pub fn geometry(&self) -> Option<Geometry> {
        self.offer.as_ref().map(|o| o.geom)
    }
}
