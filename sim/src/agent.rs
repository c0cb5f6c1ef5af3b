//! The simulated agent's state for the one disk: what a host believes about ownership and
//! where the disk's dirty bits live right now (docs/simulation.md, "Agent model").

use crate::faultstore::FaultStorage;
use crate::storage::SimStorage;
use agent::store::{Meta, Store};
use wire::Bitmap;
use wire::proto::{DestSession, FrameDecoder, SourceSession};

/// Reason written into the source's store file when it hands the disk over.
pub const HANDED_OVER: &str = "handed over";

/// Where the owner's marks go.
// One per host; boxing the live bitmap would only add indirection on every write.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Track {
    /// The agent's own live bitmap (`meta.state` is `recording`; `incomplete` for a post-copy
    /// destination until its final commit, or while a post-copy cut waits for its rebuild).
    Live {
        /// Metadata as last committed (state as the tracker reports it).
        meta: Meta,
        /// The live bitmap.
        bitmap: Bitmap,
    },
    /// A rebuild is running; marks made since it started are kept apart and merged at the end.
    Rebuild(Box<Rebuild>),
}

/// A running rebuild: compare the live disk with the backup, block range by block range.
#[derive(Debug)]
pub struct Rebuild {
    /// Metadata (epoch, checkpoint the rebuild is bound to).
    pub meta: Meta,
    /// Bits known before the rebuild (merged in: extra bits are allowed).
    pub base: Bitmap,
    /// Writes since the rebuild started.
    pub marks: Bitmap,
    /// Differences found by the scan.
    pub found: Bitmap,
    /// Next block to compare.
    pub pos: u64,
    /// Backup index the comparison runs against.
    pub ckpt: usize,
    /// Whether writes are being recorded into `marks` (always, except under a deliberate bug).
    pub marks_on: bool,
}

/// What this host believes about the disk.
#[derive(Debug)]
pub enum Role {
    /// Holds nothing.
    None,
    /// Owns the disk's tracking.
    Owner(Track),
    /// Handed the disk over (its file says so) and does not know whether the other side took
    /// it; resolved by asking the peer.
    InDoubt {
        /// The committed handed-over metadata.
        meta: Meta,
        /// The bitmap as of the handover (the VM was paused since).
        bitmap: Bitmap,
    },
    /// Its file is unreadable: it may or may not have owned the disk; resolved by asking.
    Unknown {
        /// The epoch from the file header, if that much verified.
        epoch: Option<u64>,
    },
}

impl Role {
    /// The epoch this host owns at, if it owns.
    pub fn owner_epoch(&self) -> Option<u64> {
        match self {
            Role::Owner(Track::Live { meta, .. }) => Some(meta.epoch),
            Role::Owner(Track::Rebuild(r)) => Some(r.meta.epoch),
            _ => None,
        }
    }

    /// A short name for traces.
    pub fn name(&self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Owner(Track::Live { .. }) => "owner/live",
            Role::Owner(Track::Rebuild(_)) => "owner/rebuilding",
            Role::InDoubt { .. } => "in-doubt",
            Role::Unknown { .. } => "unknown",
        }
    }
}

/// A session and its side of the stream.
#[derive(Debug)]
pub enum Sess {
    /// Migrating out.
    Src(Box<SourceSession>),
    /// Migrating in.
    Dst(Box<DestSession>),
}

/// A host's part in a migration.
#[derive(Debug)]
pub struct HostMig {
    /// Index into the world's migrations.
    pub id: usize,
    /// Connection id.
    pub conn: u64,
    /// This host's end of the connection.
    pub side: usize,
    /// The session.
    pub sess: Sess,
    /// Frame decoder for received bytes.
    pub dec: FrameDecoder,
    /// Last time a complete message or payload came out of the decoder (µs).
    pub last_item: u64,
    /// Messages decoded so far.
    pub messages: u32,
    /// Drop the next payload (deliberate bug `dest-skips-chunk`).
    pub skip_payload: bool,
    /// When this side sent (source) or handled (destination) the Switchover.
    pub switched_at: Option<u64>,
    /// Destination: writes reported here while the disk arrives, held beside the session and
    /// merged into every commit — the agent's rule (`AgentState::arriving` / `adopt`).
    pub held: Option<Bitmap>,
    /// Destination, deliberate bug `dest-marks-via-session-queue` only: writes acknowledged
    /// but still queued for the session task (the agent before the F1 fix).
    pub inbox: Vec<(u64, u64)>,
}

/// One simulated host.
pub struct Host {
    /// Name (sent in Hello).
    pub name: String,
    /// Running (false while crashed).
    pub up: bool,
    /// Its disk (survives crashes).
    pub disk: SimStorage,
    /// The store's view of the disk, with the crash-inside-a-write trigger.
    pub fs: FaultStorage,
    /// The agent's open store, while up.
    pub store: Option<Store>,
    /// What it believes.
    pub role: Role,
    /// A running migration session.
    pub mig: Option<HostMig>,
    /// Bumped on changes to the disk that `SimStorage::writes` does not count.
    pub disk_gen: u64,
    /// Writes of the VM on this host whose report has not reached the agent yet, in order:
    /// (first block, end block, whether the content changes). A write lands only once its
    /// report is acknowledged (a tracker that reports before the write completes), and the
    /// hypervisor drains them before it pauses the VM.
    pub reports: std::collections::VecDeque<(u64, u64, bool)>,
}
