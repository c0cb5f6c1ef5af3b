//! Transport errors, sorted by what the caller does about them: fix the configuration (TLS
//! files), fix the trust relationship (a peer refused or was refused), retry (I/O, timeout,
//! connection lost), or treat the peer as broken (oversized or truncated frames).

use quinn::{ConnectionError, ReadError, ReadExactError, StoppedError, WriteError};
use std::path::PathBuf;
use std::time::Duration;

/// TLS alert numbers that mean "your certificate is not acceptable" (RFC 8446 §6.2).
const CERT_ALERTS: [u8; 7] = [42, 43, 44, 45, 46, 48, 116];

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate, key or CA file could not be read or parsed.
    #[error("TLS file {}: {reason}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS material does not form a usable configuration (key does not match certificate,
    /// certificate not signed by the cluster CA, …).
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// We refused the peer's certificate (not from our cluster CA, expired, …).
    #[error("peer certificate refused: {0}")]
    PeerCertificateRefused(String),
    /// The peer refused our certificate, or the TLS handshake as a whole.
    #[error(
        "the peer refused our certificate ({0}); is this host's certificate signed by the peer's cluster CA?"
    )]
    RefusedByPeer(String),
    /// The peer completed QUIC and TLS but did not speak the bitferry transport.
    #[error("not a bitferry peer: {0}")]
    NotBitferry(String),
    /// The connection target is unusable (bad server name, unsupported address).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// Socket set-up failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Nothing happened within the allowed time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The connection was closed by the application on either side.
    #[error("connection closed by {} (code {code}): {reason}", if *by_peer { "the peer" } else { "us" })]
    Closed {
        /// Whether the peer closed it.
        by_peer: bool,
        /// Application close code.
        code: u64,
        /// Reason text.
        reason: String,
    },
    /// The connection failed otherwise (idle timeout, reset, protocol violation).
    #[error("connection lost: {0}")]
    ConnectionLost(ConnectionError),
    /// The peer abandoned the stream it was sending on.
    #[error("the peer reset the stream (code {0})")]
    StreamReset(u64),
    /// The peer stopped reading the stream we are sending on.
    #[error("the peer stopped reading the stream (code {0})")]
    PeerStopped(u64),
    /// A frame or payload length exceeds the configured maximum; nothing was allocated.
    #[error("{what} of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// `frame` or `payload`.
        what: &'static str,
        /// Declared length.
        len: u64,
        /// The maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame or payload.
    #[error("stream truncated: {what} ended after {got} of {expected} bytes")]
    Truncated {
        /// What was being read (`frame header`, `frame`, `payload`).
        what: &'static str,
        /// Bytes expected.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// Writing after `finish()`, or another use of a stream that no longer exists.
    #[error("stream already closed")]
    StreamClosed,
}

impl TransportError {
    /// Whether the failure is about certificates: either side refused the other.
    pub fn is_certificate_refusal(&self) -> bool {
        matches!(
            self,
            Self::PeerCertificateRefused(_) | Self::RefusedByPeer(_)
        )
    }
}

impl From<ConnectionError> for TransportError {
    fn from(e: ConnectionError) -> Self {
        match e {
            // The peer closed the connection during or right after the handshake with a TLS
            // alert: it refused us (most often our certificate).
            ConnectionError::ConnectionClosed(c) if is_crypto(u64::from(c.error_code)) => {
                let alert = u8::try_from(u64::from(c.error_code) - 0x100).ok();
                let what = match alert {
                    Some(a) if CERT_ALERTS.contains(&a) => {
                        format!("TLS alert {a}: {}", alert_name(a))
                    }
                    Some(a) => format!("TLS alert {a}"),
                    None => c.to_string(),
                };
                let reason = String::from_utf8_lossy(&c.reason).into_owned();
                Self::RefusedByPeer(if reason.is_empty() {
                    what
                } else {
                    format!("{what}; {reason}")
                })
            }
            // Our TLS stack failed the handshake: it refused the peer's certificate.
            ConnectionError::TransportError(t) if is_crypto(u64::from(t.code)) => {
                Self::PeerCertificateRefused(t.reason.clone())
            }
            ConnectionError::ApplicationClosed(a) => Self::Closed {
                by_peer: true,
                code: a.error_code.into_inner(),
                reason: String::from_utf8_lossy(&a.reason).into_owned(),
            },
            ConnectionError::LocallyClosed => Self::Closed {
                by_peer: false,
                code: 0,
                reason: "closed locally".into(),
            },
            other => Self::ConnectionLost(other),
        }
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100 + alert (RFC 9001 §4.8).
fn is_crypto(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

fn alert_name(a: u8) -> &'static str {
    match a {
        42 => "bad certificate",
        43 => "unsupported certificate",
        44 => "certificate revoked",
        45 => "certificate expired",
        46 => "certificate unknown",
        48 => "unknown CA",
        116 => "certificate required",
        _ => "",
    }
}

impl From<ReadError> for TransportError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Reset(code) => Self::StreamReset(code.into_inner()),
            ReadError::ConnectionLost(c) => c.into(),
            ReadError::ClosedStream => Self::StreamClosed,
            ReadError::IllegalOrderedRead => Self::StreamClosed,
            ReadError::ZeroRttRejected => Self::ConnectionLost(ConnectionError::Reset),
        }
    }
}

impl From<ReadExactError> for TransportError {
    fn from(e: ReadExactError) -> Self {
        match e {
            // Callers that know the expected size rewrite this into `Truncated`.
            ReadExactError::FinishedEarly(got) => Self::Truncated {
                what: "read",
                expected: 0,
                got: got as u64,
            },
            ReadExactError::ReadError(e) => e.into(),
        }
    }
}

impl From<WriteError> for TransportError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Stopped(code) => Self::PeerStopped(code.into_inner()),
            WriteError::ConnectionLost(c) => c.into(),
            WriteError::ClosedStream => Self::StreamClosed,
            WriteError::ZeroRttRejected => Self::ConnectionLost(ConnectionError::Reset),
        }
    }
}

impl From<StoppedError> for TransportError {
    fn from(e: StoppedError) -> Self {
        match e {
            StoppedError::ConnectionLost(c) => c.into(),
            StoppedError::ZeroRttRejected => Self::ConnectionLost(ConnectionError::Reset),
        }
    }
}

impl From<quinn::ClosedStream> for TransportError {
    fn from(_: quinn::ClosedStream) -> Self {
        Self::StreamClosed
    }
}
