//! The local control API: newline-delimited JSON over a unix socket. The CLI (`--control
//! SOCKET`) and hypervisor hooks talk to a running agent through it.
//!
//! Each connection carries request lines; each request gets exactly one response line:
//! `{"ok": true, "result": {...}}` or `{"ok": false, "error": "...", "exit_code": N}`.
//! Responses are limited to [`MAX_LINE`] bytes, requests to the agent's `[control_limits]
//! max_line_bytes` ([`MAX_LINE`] by default). An agent that will not serve a connection (too
//! many connections, out of descriptors) sends one such error line at once and closes it, and
//! it closes connections that stay silent or leave a request unfinished for too long
//! (docs/operations.md §Limits).

pub mod client;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use wire::DiskId;

/// Longest response line the client accepts, and the agent's default longest request line.
pub const MAX_LINE: usize = 16 << 20;

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// `bitmap create`.
    Create {
        /// Disk id.
        disk: DiskId,
        /// Disk size in bytes.
        size: u64,
        /// Granularity in bytes.
        granularity: u64,
        /// Checkpoint id.
        checkpoint: Option<String>,
    },
    /// `bitmap mark`.
    Mark {
        /// Disk id.
        disk: DiskId,
        /// Byte ranges `(offset, length)`.
        ranges: Vec<(u64, u64)>,
    },
    /// `bitmap show`: the header and one page of extents. The reply's `next_offset` is the
    /// `offset` of the next page (`null` after the last one).
    Show {
        /// Disk id.
        disk: DiskId,
        /// Start at the first dirty block at or after this byte (default 0).
        #[serde(default)]
        offset: Option<u64>,
        /// At most this many extents (capped at `report::SHOW_PAGE_MAX`). Without it, every
        /// extent, or an error when there are more than `report::SHOW_PAGE_MAX`: never a
        /// partial list to a client that does not page.
        #[serde(default)]
        limit: Option<usize>,
    },
    /// `bitmap verify`.
    Verify {
        /// Disk id.
        disk: DiskId,
    },
    /// `bitmap export --raw`.
    Export {
        /// Disk id.
        disk: DiskId,
        /// Output file (written by the agent).
        raw: PathBuf,
        /// Export a non-consistent bitmap anyway.
        allow_untrusted: bool,
        /// Replace `raw` if it exists (otherwise an existing file is refused).
        #[serde(default)]
        force: bool,
    },
    /// `bitmap list`.
    List,
    /// `expect`: accept this disk as a migration destination.
    Expect {
        /// Disk id.
        disk: DiskId,
        /// Only from this peer (certificate name).
        from: Option<String>,
    },
    /// `status`: the agent's state.
    Status,
    /// Commit everything and stop the agent.
    Shutdown,
    /// `migrate start`: connect to the destination and run bulk and pre-copy rounds.
    MigrateStart {
        /// Disk id.
        disk: DiskId,
        /// Destination agent, `HOST:PORT`.
        to: String,
        /// Name to verify the destination's certificate against (default: HOST).
        server_name: Option<String>,
        /// Limit on the migration stream, bytes per second (unlimited when absent).
        #[serde(default)]
        rate: Option<u64>,
    },
    /// `migrate switchover`: the VM is paused; switch over.
    MigrateSwitchover {
        /// Disk id.
        disk: DiskId,
        /// Resume the VM on the destination before everything is sent.
        postcopy: bool,
    },
    /// `migrate status`.
    MigrateStatus {
        /// Disk id.
        disk: DiskId,
    },
    /// `migrate abort`.
    MigrateAbort {
        /// Disk id.
        disk: DiskId,
    },
    /// `rebuild --disk`: start a background rebuild of the disk's bitmap in the agent.
    RebuildStart {
        /// Disk id.
        disk: DiskId,
        /// The live image (absolute path: the agent resolves it, not the CLI's directory).
        image: PathBuf,
        /// Block manifest of the reference.
        manifest: Option<PathBuf>,
        /// Raw backup image as the reference.
        backup: Option<PathBuf>,
        /// Block size; the disk's (or the configured reference's) when absent.
        granularity: Option<u64>,
        /// Read at most this many bytes per second.
        #[serde(default)]
        rate: Option<u64>,
    },
    /// `rebuild status`: progress of one disk's rebuild job, or of all.
    RebuildStatus {
        /// Disk id; every job when absent.
        disk: Option<DiskId>,
    },
    /// `rebuild cancel`: stop a disk's rebuild job (the disk stays untrusted).
    RebuildCancel {
        /// Disk id.
        disk: DiskId,
    },
}

/// A response line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The report, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// What went wrong, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The exit code the CLI should use, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u8>,
}
