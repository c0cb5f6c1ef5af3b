//! QMP failures, by whose fault they are: the local side (connecting, misuse), QEMU refusing a
//! command, QEMU misbehaving, or QEMU going away.

use super::line::LineError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything a QMP call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the monitor socket failed (no such socket, permission denied, refused).
    #[error("connecting to QMP socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// QEMU did not answer in time. For a command this says nothing about whether QEMU ran it.
    /// A greeting that never comes usually means another client holds the monitor (each QMP
    /// monitor serves one client at a time; the next waits in the socket's backlog).
    #[error("QMP {what}: no answer within {after:?}")]
    Timeout {
        /// What was waited for (`greeting`, `command query-status`).
        what: String,
        /// How long.
        after: Duration,
    },
    /// The connection is gone: QEMU exited, closed the monitor, or misbehaved so that the
    /// client dropped it. Commands in flight may or may not have run.
    #[error("QMP connection lost: {0}")]
    Disconnected(DisconnectReason),
    /// QEMU sent something that is not QMP (during the handshake or as a reply).
    #[error("QMP protocol violation: {0}")]
    Protocol(ProtocolError),
    /// QEMU refused the command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: ErrorClass,
        /// QEMU's description.
        desc: String,
    },
    /// The caller asked for something QMP cannot carry (arguments that are not an object,
    /// an empty command name).
    #[error("invalid QMP request: {0}")]
    InvalidRequest(String),
    /// A reconnecting client has no connection at the moment.
    #[error("not connected to the QMP socket {path} (QEMU is gone or not up yet)")]
    NotConnected {
        /// The socket path.
        path: PathBuf,
    },
}

impl QmpError {
    /// True if the error means the connection to QEMU is gone (or never came up), as opposed to
    /// QEMU answering with an error.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            QmpError::Disconnected(_) | QmpError::NotConnected { .. } | QmpError::Connect { .. }
        )
    }

    /// The error class, if QEMU refused a command.
    pub fn class(&self) -> Option<&ErrorClass> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// QEMU's error classes (`qapi/error.json`); unknown ones are kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// Most errors.
    GenericError,
    /// The command does not exist in this QEMU.
    CommandNotFound,
    /// A device (or block node) was not found.
    DeviceNotFound,
    /// The device is not active.
    DeviceNotActive,
    /// KVM lacks a capability.
    KvmMissingCap,
    /// A class this client does not know.
    Other(String),
}

impl ErrorClass {
    /// Map QEMU's class string.
    pub fn from_qmp(s: &str) -> ErrorClass {
        match s {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "KVMMissingCap" => ErrorClass::KvmMissingCap,
            other => ErrorClass::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
            ErrorClass::Other(s) => s,
        })
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DisconnectReason {
    /// QEMU closed the socket (it exited, or `quit` was run).
    #[error("QEMU closed the connection")]
    Eof,
    /// Reading or writing the socket failed.
    #[error("socket error: {0}")]
    Io(Arc<std::io::Error>),
    /// QEMU sent something that is not QMP, so the client dropped the connection.
    #[error("dropped after a protocol violation: {0}")]
    Protocol(ProtocolError),
    /// This client closed it.
    #[error("closed by this client")]
    Closed,
}

/// What QEMU did wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProtocolError {
    /// A line that is not a QMP message (too long, not JSON, malformed).
    #[error(transparent)]
    Line(#[from] LineError),
    /// The connection ended in the middle of a line.
    #[error("connection closed in the middle of a line")]
    TruncatedLine,
    /// The first message was not the greeting.
    #[error("expected the QMP greeting, got: {0}")]
    NoGreeting(String),
    /// A reply whose value does not have the shape the command documents.
    #[error("unexpected reply to {command}: {detail}")]
    BadReply {
        /// The command.
        command: String,
        /// What is wrong.
        detail: String,
    },
}
