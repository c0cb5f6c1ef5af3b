//! Where one migration task is, as `migrate status` reports it.

/// The phase of a migration task (the `phase` field of `migrate status --json`, spelled as
/// [`MigrationPhase::as_str`] says). Source: `connecting` → `negotiating` → `bulk` →
/// `pre-copy` → `switching over` or `post-copy` → `completed` (or `failed`, `aborted`,
/// `handed over`). Destination: `connecting` → `receiving` → `post-copy` or `owner` →
/// `completed` or `incomplete` (or `failed`, `aborted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationPhase {
    /// The task has started; no session yet.
    Connecting,
    /// Source: Hello and Offer sent, waiting for the destination to accept.
    Negotiating,
    /// Source: streaming the first (bulk) round.
    Bulk,
    /// Source: pre-copy rounds; a switchover may be requested.
    PreCopy,
    /// Source: the hand-over is durable and the pre-copy switchover sent.
    SwitchingOver,
    /// Post-copy: the destination owns the disk while the rest of the bitmap streams.
    PostCopy,
    /// Destination: accepted, receiving rounds.
    Receiving,
    /// Destination: owner of a verified bitmap, committing it.
    Owner,
    /// The destination owns the disk with a verified bitmap.
    Completed,
    /// Destination: owner, but the bitmap is `incomplete` (post-copy source lost).
    Incomplete,
    /// Source: it handed the disk over and did not learn the outcome (in doubt).
    HandedOver,
    /// Ended on a request or a refusal; the source keeps the disk.
    Aborted,
    /// Ended with an error (see the status's `error`).
    Failed,
}

impl MigrationPhase {
    /// The phase as `migrate status` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Connecting => "connecting",
            MigrationPhase::Negotiating => "negotiating",
            MigrationPhase::Bulk => "bulk",
            MigrationPhase::PreCopy => "pre-copy",
            MigrationPhase::SwitchingOver => "switching over",
            MigrationPhase::PostCopy => "post-copy",
            MigrationPhase::Receiving => "receiving",
            MigrationPhase::Owner => "owner",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Incomplete => "incomplete",
            MigrationPhase::HandedOver => "handed over",
            MigrationPhase::Aborted => "aborted",
            MigrationPhase::Failed => "failed",
        }
    }

    /// Whether a source in this phase may still be asked to switch over.
    pub fn before_switchover(self) -> bool {
        matches!(
            self,
            MigrationPhase::Connecting
                | MigrationPhase::Negotiating
                | MigrationPhase::Bulk
                | MigrationPhase::PreCopy
        )
    }
}

impl std::fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
