//! A small synchronous QMP client: newline-delimited JSON over a unix socket.
//!
//! Connect reads the greeting and negotiates capabilities; [`Qmp::execute`] sends one command
//! with an id and returns its `return` value, skipping asynchronous events (kept in
//! [`Qmp::events`] for callers that care).

use serde_json::{Value, json};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest line accepted from QEMU (a `query-named-block-nodes` reply can be large, but not
/// this large); guards against a peer that never sends a newline.
const MAX_LINE: usize = 64 << 20;
/// Events kept for callers; older ones are dropped so a chatty QEMU cannot grow memory.
const MAX_EVENTS: usize = 1024;

/// QMP failures.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Socket I/O failed (or timed out).
    #[error("QMP I/O: {0}")]
    Io(#[from] io::Error),
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// A connected QMP session in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// Events received while waiting for replies, oldest first (at most the last 1024).
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connect to the QMP socket at `path`, read the greeting and send `qmp_capabilities`.
    /// Every read and write times out after `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            next_id: 1,
            events: Vec::new(),
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = Read::by_ref(&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(QmpError::Protocol("QEMU closed the connection".into()));
        }
        if !line.ends_with(b"\n") {
            return Err(QmpError::Protocol("reply line too long".into()));
        }
        serde_json::from_slice(&line)
            .map_err(|e| QmpError::Protocol(format!("reply is not JSON: {e}")))
    }

    /// Run `command` with `arguments` (an object; `{}` for none) and return its `return`
    /// value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("JSON values serialize");
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        loop {
            let v = self.read_message()?;
            if v.get("event").is_some() {
                if self.events.len() == MAX_EVENTS {
                    self.events.remove(0);
                }
                self.events.push(v);
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Protocol(format!("unexpected reply {v}")));
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "reply without return or error: {v}"
            )));
        }
    }
}
