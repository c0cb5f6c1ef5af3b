//! Migration sessions in the agent: the async drivers that run `wire::proto`'s sans-IO
//! [`SourceSession`](wire::proto::SourceSession) and [`DestSession`](wire::proto::DestSession)
//! over the QUIC transport, and perform their actions on the agent's store.
//!
//! One migration per disk at a time. Its handle ([`Migration`]) lives in the agent state so the
//! control socket can route marks, switchover and abort to it and report its status.

pub use phase::MigrationPhase;

pub mod bench;
pub mod dest;
pub mod io;
pub mod phase;
pub mod source;

use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;
use wire::DiskId;
use wire::proto::Stats;

/// Which end of a migration this agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends the bitmap.
    Source,
    /// Receives it and takes ownership.
    Destination,
}

/// Commands from the control socket to a running migration task.
#[derive(Debug, Clone)]
pub enum Cmd {
    /// The VM wrote these byte ranges.
    Mark(Vec<(u64, u64)>),
    /// The VM is paused: switch over (post-copy if asked).
    Switchover {
        /// Resume the VM on the destination before everything is sent.
        postcopy: bool,
    },
    /// Give up.
    Abort,
}

/// What a migration task reports.
#[derive(Debug, Clone)]
pub struct Status {
    /// The disk.
    pub disk: DiskId,
    /// Our role.
    pub role: Role,
    /// The peer (certificate name, or address until known).
    pub peer: String,
    /// Where the task is.
    pub phase: MigrationPhase,
    /// When the migration started.
    pub started: Instant,
    /// Seconds it took, once finished.
    pub seconds: Option<f64>,
    /// Bytes and rounds so far.
    pub stats: Stats,
    /// The final root, once verified.
    pub root: Option<String>,
    /// State of the disk's bitmap after the migration: on a source that completed, the
    /// destination's committed state (the local copy is retired); otherwise this host's.
    pub state: Option<wire::State>,
    /// The destination's epoch after switchover.
    pub epoch: Option<u64>,
    /// How it ended.
    pub outcome: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// The last command the session refused (e.g. a switchover before the destination
    /// accepted); the migration goes on.
    pub notice: Option<String>,
    /// Why the last requested switchover was withdrawn (the hand-over could not be made
    /// durable); cleared when a switchover is requested again. The migration goes on.
    pub switchover_error: Option<String>,
    /// Whether the task has ended.
    pub finished: bool,
    /// Source: every pre-copy round so far was acknowledged and no mark arrived since the last
    /// one started — the moment to pause the VM and switch over.
    pub converged: bool,
}

impl Status {
    /// A fresh status.
    pub fn new(disk: DiskId, role: Role, peer: String) -> Self {
        Status {
            disk,
            role,
            peer,
            phase: MigrationPhase::Connecting,
            started: Instant::now(),
            seconds: None,
            stats: Stats::default(),
            root: None,
            state: None,
            epoch: None,
            outcome: None,
            error: None,
            notice: None,
            switchover_error: None,
            finished: false,
            converged: false,
        }
    }

    /// The `migrate status --json` report.
    pub fn to_json(&self) -> Value {
        json!({
            "disk": self.disk,
            "role": match self.role { Role::Source => "source", Role::Destination => "destination" },
            "peer": self.peer,
            "phase": self.phase.as_str(),
            "finished": self.finished,
            "converged": self.converged,
            "rounds": self.stats.rounds,
            "bytes_total": self.stats.bytes_total,
            "bytes_during_switchover": self.stats.bytes_during_switchover,
            "chunks": self.stats.chunks,
            "deltas": self.stats.deltas,
            "seconds": self.seconds.unwrap_or_else(|| self.started.elapsed().as_secs_f64()),
            "root": self.root,
            "state": self.state,
            "epoch": self.epoch,
            "outcome": self.outcome,
            "error": self.error,
            "notice": self.notice,
            "switchover_error": self.switchover_error,
        })
    }
}

/// A migration's handle in the agent state.
#[derive(Debug, Clone)]
pub struct Migration {
    /// Our role.
    pub role: Role,
    /// Commands to the task (closed once it ended).
    pub cmd: UnboundedSender<Cmd>,
    /// What it reports.
    pub status: Arc<Mutex<Status>>,
    /// A switchover was requested: from then on marks for the disk cannot reach the destination
    /// through this source and are refused (unless the migration ends with the source owner).
    pub switchover_requested: Arc<std::sync::atomic::AtomicBool>,
}

impl Migration {
    /// Whether this source has passed the point where a mark could still reach the
    /// destination: a switchover was requested and the migration did not end with the source
    /// keeping the disk.
    pub fn source_handed_off(&self) -> bool {
        if self.role != Role::Source
            || !self
                .switchover_requested
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return false;
        }
        let s = self.status.lock().expect("status lock");
        !(s.finished && s.state == Some(wire::State::Recording))
    }

    /// Whether the task is still running.
    pub fn active(&self) -> bool {
        !self.status.lock().expect("status lock").finished
    }
}

/// Describe an outcome for people and JSON.
pub fn outcome_name(o: &wire::proto::Outcome) -> String {
    use wire::proto::Outcome::*;
    match o {
        Migrated { epoch, .. } => format!("migrated (destination owns epoch {epoch})"),
        SourceKeeps => "aborted before switchover (source keeps ownership)".into(),
        DestOwnsIncomplete { epoch } => {
            format!("destination owns epoch {epoch} but the bitmap is incomplete (rebuild needed)")
        }
        HandedOver => "handed over (destination owns)".into(),
        InDoubt => "in doubt: switchover sent, no answer (the destination's epoch decides)".into(),
    }
}
