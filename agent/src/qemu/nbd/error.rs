//! NBD failures: the server violated the protocol or refused something, the server went away,
//! local I/O failed, or the caller asked for something impossible.

use std::sync::Arc;
use std::time::Duration;

/// A protocol violation found by the pure decoders in [`super::proto`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number is wrong (not an NBD server, or the stream lost its framing).
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What arrived.
        got: u64,
    },
    /// The server speaks the oldstyle handshake, which carries no options.
    #[error("server uses the oldstyle handshake (no options, no structured replies)")]
    Oldstyle,
    /// A length field is outside what the protocol (or this client) allows.
    #[error("{what} length {len} out of bounds ({min}..={max})")]
    Length {
        /// Which length.
        what: &'static str,
        /// The value sent.
        len: u64,
        /// Smallest acceptable.
        min: u64,
        /// Largest acceptable.
        max: u64,
    },
    /// A field has a value the protocol forbids.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A reply for another request (only one is ever in flight).
    #[error("reply carries handle {got}, expected {expected}")]
    UnexpectedHandle {
        /// The request's handle.
        expected: u64,
        /// The reply's.
        got: u64,
    },
    /// A reply chunk type that does not belong to this request.
    #[error("unexpected reply chunk type {kind} to {command}")]
    UnexpectedChunk {
        /// The command.
        command: &'static str,
        /// The chunk type.
        kind: u16,
    },
    /// Too short to hold the structure.
    #[error("truncated {what}: {len} bytes, need {need}")]
    Truncated {
        /// Which structure.
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
}

impl ProtoError {
    pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> ProtoError {
        ProtoError::Malformed {
            what,
            detail: detail.into(),
        }
    }
}

/// Everything an NBD call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NbdError {
    /// Connecting failed (no such socket, refused).
    #[error("connecting to NBD server {target}: {source}")]
    Connect {
        /// Socket path or address.
        target: String,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Reading or writing the socket failed.
    #[error("NBD socket error during {during}: {source}")]
    Io {
        /// What was going on.
        during: &'static str,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The server closed the connection (possibly in the middle of a reply).
    #[error("NBD server closed the connection during {during}")]
    Disconnected {
        /// What was going on.
        during: &'static str,
    },
    /// The server did not answer in time.
    #[error("NBD server did not answer {during} within {after:?}")]
    Timeout {
        /// What was going on.
        during: &'static str,
        /// How long.
        after: Duration,
    },
    /// The server violated the protocol.
    #[error("NBD protocol violation: {0}")]
    Protocol(#[from] ProtoError),
    /// The server refused a handshake option.
    #[error("NBD server refused {option}: {}{}", rep_err_name(*.reply), if .message.is_empty() { String::new() } else { format!(" ({})", .message) })]
    OptionRefused {
        /// The option, e.g. `NBD_OPT_GO`.
        option: &'static str,
        /// The reply type (an `NBD_REP_ERR_*` value).
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// The server lacks something this client needs (fixed newstyle, structured replies).
    #[error("NBD server unsupported: {0}")]
    Unsupported(String),
    /// A requested metadata context is not offered (e.g. no bitmap of that name is exported).
    #[error("NBD server does not offer metadata context {name:?}")]
    NoSuchContext {
        /// The context.
        name: String,
    },
    /// The server answered a command with an error.
    #[error("NBD {command} failed on the server: {} ({errno}){}", errno_name(*.errno), if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Server {
        /// The command.
        command: &'static str,
        /// NBD error number (errno values: 1 EPERM, 5 EIO, 12 ENOMEM, 22 EINVAL, 28 ENOSPC,
        /// 75 EOVERFLOW, 95 ENOTSUP, 108 ESHUTDOWN).
        errno: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The caller asked for something impossible (a range past the export's end, a context not
    /// negotiated, an over-long name).
    #[error("invalid NBD request: {0}")]
    InvalidRequest(String),
    /// An earlier failure left the stream out of step; this connection cannot be used.
    #[error("NBD connection unusable after an earlier error: {0}")]
    Broken(String),
}

impl NbdError {
    /// True if the connection can still be used after this error (the server answered in step).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, NbdError::Server { .. } | NbdError::InvalidRequest(_))
    }
}

/// Name of an NBD error number.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Name of an `NBD_REP_ERR_*` option reply.
pub fn rep_err_name(reply: u32) -> &'static str {
    match reply & !(1 << 31) {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN (no such export)",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        10 => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown option error",
    }
}
