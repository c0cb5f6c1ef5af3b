//! Errors of the migration protocol, split by whose fault they are: [`FrameError`] and
//! [`PeerError`] mean the peer (or the link) misbehaved; [`UsageError`] means the local caller
//! used a session wrongly (docs/protocol.md §8).

use super::msg::{AbortReason, RefuseReason};
use crate::tree::Root;
use thiserror::Error;

/// Bytes on the stream that are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length prefix exceeds the hard maximum (checked before anything is allocated).
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversized {
        /// Declared length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A frame with an empty body.
    #[error("empty frame")]
    Empty,
    /// A message tag this build does not know: the peer speaks a newer protocol than it
    /// negotiated.
    #[error("unknown message tag {tag} (peer speaks a newer protocol version)")]
    UnknownMessage {
        /// The tag.
        tag: u64,
    },
    /// The body does not decode as a message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The body decoded but bytes were left over.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A header announces more raw payload than any message may carry.
    #[error("announced payload of {len} bytes exceeds the maximum of {max}")]
    PayloadOversized {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended in the middle of a frame or payload.
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// No byte arrived for too long in the middle of a frame or payload (docs/protocol.md §3):
    /// a lost or corrupted length prefix would otherwise leave both ends waiting forever.
    #[error("no data for {ms} ms inside a frame ({buffered} bytes of it received)")]
    Stalled {
        /// Bytes of the frame (prefix, body and payload) received before the silence.
        buffered: usize,
        /// How long the silence lasted.
        ms: u64,
    },
}

/// The peer misbehaved, refused, aborted, or vanished. The session has failed; see the
/// accompanying [`super::Outcome`] for who owns the disk now.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PeerError {
    /// A bad frame on the stream.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A message that is not allowed in the current phase.
    #[error("unexpected {got} while {phase}")]
    Unexpected {
        /// The message's name.
        got: &'static str,
        /// What the session was doing.
        phase: &'static str,
    },
    /// No protocol version in common, or the peer chose one we did not offer.
    #[error("no common protocol version (peer speaks {peer:?}, we speak {ours:?})")]
    UnsupportedVersion {
        /// What the peer offered or chose.
        peer: Vec<u16>,
        /// What we speak.
        ours: Vec<u16>,
    },
    /// The peer announced features we did not offer.
    #[error("peer chose features {0:#x} we did not offer")]
    BadFeatures(u64),
    /// The destination refused.
    #[error("refused ({reason:?}): {detail}")]
    Refused {
        /// Why.
        reason: RefuseReason,
        /// Human-readable detail.
        detail: String,
    },
    /// The peer aborted.
    #[error("peer aborted ({reason:?}): {detail}")]
    Aborted {
        /// Why.
        reason: AbortReason,
        /// Human-readable detail.
        detail: String,
    },
    /// The destination's Accept names an Offer other than the one sent (corrupted metadata).
    #[error("the destination accepted an offer that differs from the one sent")]
    OfferMismatch,
    /// A chunk did not decode, or its bytes do not match its hash.
    #[error("bad chunk {index}: {why}")]
    BadChunk {
        /// Chunk index.
        index: u32,
        /// What was wrong.
        why: String,
    },
    /// A delta did not decode or pointed outside the bitmap.
    #[error("bad delta: {0}")]
    BadDelta(String),
    /// The two sides' roots differ.
    #[error("root mismatch in round {round}: expected {expected}, got {got}")]
    RootMismatch {
        /// Round (or the switchover round).
        round: u32,
        /// The root we hold or were promised.
        expected: Root,
        /// The root the peer claims or we computed.
        got: Root,
    },
    /// A message for another round than the current one.
    #[error("message for round {got} while in round {expected}")]
    WrongRound {
        /// Current round.
        expected: u32,
        /// Round in the message.
        got: u32,
    },
    /// An epoch that does not follow the ownership rules (docs/protocol.md §6).
    #[error("bad epoch: expected {expected}, got {got}")]
    BadEpoch {
        /// Epoch required.
        expected: u64,
        /// Epoch received.
        got: u64,
    },
    /// A header field out of range (chunk index, payload length, base block).
    #[error("bad header: {0}")]
    BadHeader(String),
    /// The connection was lost.
    #[error("connection to the peer was lost")]
    Lost,
}

/// The local caller used a session wrongly; the session's state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UsageError {
    /// The operation is not possible in the current phase.
    #[error("{op} is not possible while {phase}")]
    WrongPhase {
        /// The operation.
        op: &'static str,
        /// What the session is doing.
        phase: &'static str,
    },
    /// The previous round is still being streamed.
    #[error("round {0} is still being sent")]
    RoundInProgress(u32),
    /// A byte range outside the disk.
    #[error(transparent)]
    Range(#[from] crate::error::RangeError),
    /// A bitmap of another geometry.
    #[error(transparent)]
    Geometry(#[from] crate::bitmap::GeometryMismatch),
    /// Payload given when none was announced, or of the wrong length.
    #[error("payload of {got} bytes given, {expected} expected")]
    Payload {
        /// Bytes the last header announced (0: none).
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// `committed_durably` without a pending Commit.
    #[error("no commit is pending")]
    NoCommitPending,
    /// `handed_over_durably` / `hand_over_failed` without a polled HandOver.
    #[error("no hand-over is pending")]
    NoHandOverPending,
    /// Post-copy was not offered or not negotiated.
    #[error("post-copy was not offered or not negotiated")]
    PostcopyUnavailable,
    /// A configuration value the protocol cannot carry.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The session has finished.
    #[error("the session has finished")]
    Finished,
}
