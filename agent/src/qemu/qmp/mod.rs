//! An asynchronous QMP client, hand-written on tokio.
//!
//! Hand-written rather than the `qapi` crate: its event enum has no catch-all, so an event
//! it does not know breaks its stream — an agent that outlives QEMU upgrades cannot accept
//! that — and it costs ~34 s of cold build. QMP is newline-delimited JSON; this client:
//!
//! - keeps one connection per QEMU monitor ([`Qmp`]), matches replies to commands by `id`,
//!   and fans events out to subscribers ([`Qmp::subscribe`], [`Notification`]);
//! - tolerates events of any name, unknown members, and objects of unknown shape;
//! - bounds every line ([`line::MAX_LINE`], 16 MiB): a longer one ends the connection with a
//!   typed error before it is buffered;
//! - detects features from `query-commands` ([`Qmp::has_command`]);
//! - reconnects with backoff and renegotiates ([`ReconnectingQmp`]), telling subscribers when
//!   QEMU went away and when a connection is back.
//!
//! [`mod@line`] is the pure parser of one line (fuzzable); [`error`] the typed failures.

pub mod client;
pub mod error;
pub mod line;
pub mod reconnect;

pub use client::{Action, Notification, Qmp, QmpOptions};
pub use error::{DisconnectReason, ErrorClass, ProtocolError, QmpError};
pub use line::{Event, Greeting, QemuVersion, Timestamp};
pub use reconnect::{Backoff, ReconnectingQmp};

#[cfg(test)]
mod tests;
