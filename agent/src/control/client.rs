//! Client side of the control socket, used by the CLI.

use super::{MAX_LINE, Request, Response};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Control-socket failures, as seen by the client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached (agent not running?).
    #[error("cannot reach the agent at {path} (is `bitferry agent` running?)")]
    Connect {
        /// Socket path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The conversation broke off.
    #[error("control socket I/O")]
    Io(#[from] std::io::Error),
    /// The agent sent something that is not a response.
    #[error("malformed response from the agent: {0}")]
    Malformed(String),
    /// The agent refused or failed the request.
    #[error("{message}")]
    Refused {
        /// The agent's explanation.
        message: String,
        /// Exit code to use.
        exit_code: u8,
    },
}

/// `bitmap show` with every page of extents joined into one report (for callers whose bitmaps
/// are known to be small, such as the demo; the CLI streams the pages instead).
pub fn show_all(socket: &Path, disk: &wire::DiskId) -> Result<serde_json::Value, ControlError> {
    let mut offset = 0;
    let mut all: Vec<serde_json::Value> = Vec::new();
    loop {
        let req = Request::Show {
            disk: disk.clone(),
            offset: Some(offset),
            limit: Some(crate::report::SHOW_PAGE),
        };
        let mut page = call(socket, &req, Some(Duration::from_secs(600)))?;
        if let Some(e) = page["extents"].as_array_mut() {
            all.append(e);
        }
        match page["next_offset"].as_u64() {
            Some(next) if next > offset || all.is_empty() => offset = next,
            Some(_) => {
                return Err(ControlError::Malformed("show pages do not advance".into()));
            }
            None => {
                if !page["extents"].is_null() {
                    page["extents"] = serde_json::Value::Array(all);
                }
                if let Some(m) = page.as_object_mut() {
                    m.remove("next_offset");
                }
                return Ok(page);
            }
        }
    }
}

/// Send one request and wait for its response. `timeout` bounds the whole exchange.
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<serde_json::Value, ControlError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(timeout)?;
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    // An agent that will not serve this connection (too many connections, out of descriptors)
    // answers at once and closes, maybe before the request is written: the write then fails,
    // and the answer waiting to be read says why, which "broken pipe" would not.
    let written = s.write_all(&line);
    let mut reader = BufReader::new((&s).take(MAX_LINE as u64 + 1));
    let mut buf = Vec::new();
    let read = reader.read_until(b'\n', &mut buf);
    if read.is_err() || buf.is_empty() {
        written?;
        read?;
    }
    if buf.len() > MAX_LINE {
        return Err(ControlError::Malformed("response too long".into()));
    }
    let resp: Response =
        serde_json::from_slice(&buf).map_err(|e| ControlError::Malformed(e.to_string()))?;
    if resp.ok {
        Ok(resp.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlError::Refused {
            message: resp.error.unwrap_or_else(|| "request failed".into()),
            exit_code: resp.exit_code.unwrap_or(1),
        })
    }
}
