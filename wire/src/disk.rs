//! Identity and trust state of a tracked disk, shared by the store, the wire and the CLI.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A disk's identifier, e.g. `vm42/vda`: 1–255 bytes of UTF-8 without control characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DiskId(String);

/// A disk id that breaks the naming rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid disk id {0:?}: use 1-255 bytes of printable UTF-8")]
pub struct InvalidDiskId(pub String);

impl DiskId {
    /// Validate and wrap a disk id.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidDiskId> {
        let s = s.into();
        if s.is_empty() || s.len() > 255 || s.chars().any(char::is_control) {
            return Err(InvalidDiskId(s));
        }
        Ok(DiskId(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DiskId {
    type Error = InvalidDiskId;
    fn try_from(s: String) -> Result<Self, InvalidDiskId> {
        DiskId::new(s)
    }
}

impl From<DiskId> for String {
    fn from(d: DiskId) -> String {
        d.0
    }
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DiskId {
    type Err = InvalidDiskId;
    fn from_str(s: &str) -> Result<Self, InvalidDiskId> {
        DiskId::new(s)
    }
}

/// How far a bitmap can be trusted. Only [`State::Consistent`] (and [`State::Recording`] while
/// its recorder is alive) promise the superset rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Verified, and a superset of the blocks changed since the checkpoint.
    Consistent,
    /// Live: a running recorder is adding marks. If that recorder dies, this becomes
    /// [`State::Inconsistent`] on the next load.
    Recording,
    /// A transfer has not finished; the bits present are real but some may be missing.
    Incomplete,
    /// Cannot be trusted (crash mid-recording, torn or corrupt file, checksum failure).
    Inconsistent,
    /// Being rebuilt from a reference; not yet trustworthy.
    Rebuilding,
}

impl State {
    /// The lowercase name used in JSON and on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Consistent => "consistent",
            State::Recording => "recording",
            State::Incomplete => "incomplete",
            State::Inconsistent => "inconsistent",
            State::Rebuilding => "rebuilding",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a bitmap counts from: normally the last good backup.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The backup's id, as the backup software names it.
    pub id: String,
    /// Root hash of that backup's block manifest, where known.
    pub manifest_root: Option<[u8; 32]>,
}
