//! Failures that carry a process exit code, shared by the CLI and the control socket (whose
//! responses tell the CLI which code to exit with).
//!
//! Exit codes: 0 success; 1 error; 2 usage; 3 the bitmap is not trustworthy; 4 the store is
//! locked by another process.

use crate::store::StoreError;

/// A failure with a specific exit code and message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Process exit code.
    pub code: u8,
    /// What went wrong, for people.
    pub message: String,
}

impl Failure {
    /// The request itself is wrong (exit 2).
    pub fn usage(message: impl Into<String>) -> anyhow::Error {
        Failure {
            code: 2,
            message: message.into(),
        }
        .into()
    }

    /// The bitmap is not trustworthy (exit 3).
    pub fn untrusted(message: impl Into<String>) -> anyhow::Error {
        Failure {
            code: 3,
            message: message.into(),
        }
        .into()
    }
}

/// The exit code for an error chain.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.code;
        }
        if let Some(crate::control::client::ControlError::Refused { exit_code, .. }) =
            cause.downcast_ref()
        {
            return *exit_code;
        }
        match cause.downcast_ref::<StoreError>() {
            Some(StoreError::Locked(_)) => return 4,
            Some(StoreError::Untrusted { .. }) => return 3,
            _ => {}
        }
    }
    1
}

/// An error chain as one line: each cause once, even when a message already quotes its source
/// (an OS error is then not printed twice).
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}
