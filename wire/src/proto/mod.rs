//! The migration protocol (docs/protocol.md): messages, framing, delta encoding and the
//! source/destination session state machines.
//!
//! Everything here is sans-IO in the style of `quinn-proto`: a session takes events in
//! (`handle(msg)`, `on_payload(bytes)`, local calls such as `mark`, `start_round`,
//! `switchover`, `abort`, `committed_durably`, `peer_lost`) and hands actions out through
//! `poll_action()`. No clock, socket or file is touched, so the agent drives the sessions over
//! QUIC and the simulator drives the very same code over a virtual network.

pub mod action;
pub mod delta;
pub mod dest;
pub mod error;
pub mod frame;
pub mod msg;
pub mod source;

#[cfg(test)]
mod tests;

pub use action::{Action, CommitMeta, Failure, Outcome, Stats};
pub use dest::{DestPolicy, DestSession, Expectation, Phase as DestPhase};
pub use error::{FrameError, PeerError, UsageError};
pub use frame::{FrameDecoder, Incoming, MAX_FRAME, MAX_PAYLOAD};
pub use msg::{Message, Mode};
pub use source::{Phase as SourcePhase, SourceConfig, SourceSession};
