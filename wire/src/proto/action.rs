//! What the sessions ask their driver to do ([`Action`]), how a session ends ([`Outcome`]) and
//! what it measured ([`Stats`]).

use super::error::PeerError;
use super::msg::Message;
use crate::bitmap::Bitmap;
use crate::disk::{Checkpoint, DiskId, State};
use crate::geometry::Geometry;
use crate::tree::Root;

/// One thing for the driver to do, in order.
#[derive(Debug, Clone)]
pub enum Action {
    /// Send this message as one frame.
    Send(Message),
    /// Send these raw bytes right after the previous frame (the payload of a Chunk or Delta).
    SendPayload(Vec<u8>),
    /// Destination: write this bitmap to the store with this metadata, durably, then call
    /// `committed_durably()` (docs/protocol.md §6).
    Commit {
        /// Metadata to store.
        meta: CommitMeta,
        /// The bitmap, as of the moment this action was polled.
        bitmap: Bitmap,
    },
    /// Source: the Switchover is about to leave. Record durably that this host no longer owns
    /// the disk (its copy becomes `incomplete`, "handed over"), then call
    /// `handed_over_durably()`; the Switchover message follows only after that. If it cannot be
    /// made durable, call `hand_over_failed()`: the switchover is withdrawn and the source keeps
    /// the disk (docs/protocol.md §5.4).
    HandOver {
        /// The disk.
        disk: DiskId,
        /// The epoch the destination will own at.
        epoch_next: u64,
        /// Whether this is a post-copy switchover (the VM resumes on the destination).
        postcopy: bool,
    },
    /// Source: the destination durably owns the disk at `epoch`; retire the local copy.
    Retire {
        /// The disk.
        disk: DiskId,
        /// The destination's new epoch.
        epoch: u64,
    },
    /// Destination: the bitmap is incomplete and owned here; start a rebuild whose result is
    /// merged with the local tracking (docs/protocol.md §5.5).
    RebuildNeeded {
        /// The disk.
        disk: DiskId,
        /// Why.
        reason: String,
    },
    /// The session ended; no further actions follow.
    Finished(Outcome),
    /// The session failed; no further actions follow.
    Failed(Failure),
}

/// Metadata of a destination commit, mapping 1:1 onto the store's `Meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitMeta {
    /// The disk.
    pub disk: DiskId,
    /// Its geometry.
    pub geometry: Geometry,
    /// What the bitmap counts from.
    pub checkpoint: Option<Checkpoint>,
    /// The destination's (new) ownership epoch.
    pub epoch: u64,
    /// `consistent` after a verified transfer, `incomplete` otherwise.
    pub state: State,
    /// Why the state is not consistent.
    pub reason: Option<String>,
}

/// Who owns the disk's tracking when a session ends (docs/protocol.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The destination owns a verified bitmap at `epoch`; the source retired (or, seen from a
    /// destination that lost the link after Committed, will never own again).
    Migrated {
        /// The destination's epoch.
        epoch: u64,
        /// The source's final root, verified by the destination.
        root: Root,
    },
    /// Ended before switchover: the source still owns; the destination holds nothing.
    SourceKeeps,
    /// Destination: it owns the disk at `epoch` but the bitmap is `incomplete` (post-copy cut);
    /// a rebuild was requested.
    DestOwnsIncomplete {
        /// The destination's epoch.
        epoch: u64,
    },
    /// Source: ownership passed to the destination (post-copy switchover, or the destination
    /// said it owns). The source must stop tracking and never report its copy as consistent.
    HandedOver,
    /// Source: switchover was sent but no answer came. The source must not act as owner; the
    /// epoch in the destination's store decides.
    InDoubt,
}

impl Outcome {
    /// Whether the source (still) owns the disk.
    pub fn source_owns(&self) -> bool {
        matches!(self, Outcome::SourceKeeps)
    }

    /// Whether the destination owns the disk.
    pub fn dest_owns(&self) -> bool {
        matches!(
            self,
            Outcome::Migrated { .. } | Outcome::DestOwnsIncomplete { .. }
        )
    }
}

/// A failed session: what went wrong and who owns the disk now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What the peer did.
    pub error: PeerError,
    /// Ownership after the failure.
    pub outcome: Outcome,
}

/// Bytes and rounds a session emitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Rounds whose root both sides agreed on.
    pub rounds: u32,
    /// Bytes of frames and payloads emitted.
    pub bytes_total: u64,
    /// Bytes emitted from switchover until the final root was acknowledged (source: until
    /// Committed arrived; destination: until Committed was sent).
    pub bytes_during_switchover: u64,
    /// Chunk messages emitted (source) or verified (destination).
    pub chunks: u64,
    /// Delta messages emitted (source) or applied (destination).
    pub deltas: u64,
}
