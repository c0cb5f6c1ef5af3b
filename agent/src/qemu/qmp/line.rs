//! One QMP line, parsed without I/O.
//!
//! QMP is newline-delimited JSON. QEMU sends four kinds of objects: the greeting (`"QMP"`),
//! command replies (`"return"` or `"error"`, with the `"id"` the command carried), and
//! asynchronous events (`"event"`, `"data"`, `"timestamp"`). [`parse`] classifies one line
//! and keeps only what bitferry needs; unknown members are ignored, events of any name are
//! accepted, and a JSON object of none of these shapes is returned as [`Message::Unknown`] so
//! a newer QEMU cannot break the stream. What is not a JSON object is an error.
//!
//! The function is pure and total (errors, never panics) so a fuzz target can call it.

use serde_json::{Map, Value};

/// Longest QMP line accepted from QEMU: 16 MiB. The largest real replies
/// (`query-named-block-nodes` on a VM with many disks, `query-qmp-schema`) are well below;
/// a longer line is an error, never an allocation.
pub const MAX_LINE: usize = 16 << 20;

/// How much of an offending line an error message quotes.
const QUOTE: usize = 200;

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting QEMU sends first on every connection.
    Greeting(Greeting),
    /// A successful command reply.
    Return {
        /// The `id` the command carried, if QEMU echoed one.
        id: Option<Value>,
        /// The `return` value (`{}` for commands without a result).
        value: Value,
    },
    /// A failed command reply.
    Error {
        /// The `id` the command carried; QEMU omits it when it could not parse the command.
        id: Option<Value>,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
    /// A JSON object of no known shape (tolerated: a future QEMU may send new kinds).
    Unknown(Value),
}

/// The QMP greeting: QEMU's version and the optional capabilities it offers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Greeting {
    /// QEMU's version, when the greeting carries a well-formed one.
    pub version: Option<QemuVersion>,
    /// The distribution's package string (may be empty).
    pub package: String,
    /// Capabilities offered for `qmp_capabilities` (e.g. `oob`).
    pub capabilities: Vec<String>,
}

/// A QEMU version triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// An asynchronous QMP event, whatever its name.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `STOP`, `JOB_STATUS_CHANGE`, `BLOCK_EXPORT_DELETED`.
    pub name: String,
    /// The event's `data` object, or `Value::Null` when QEMU sent none (e.g. `STOP`).
    pub data: Value,
    /// When QEMU emitted it, if the event carried a well-formed timestamp.
    pub timestamp: Option<Timestamp>,
}

/// QEMU's event timestamp (host wall clock at emission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// Why a line is not a QMP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line exceeds the bound (reported by the reader before anything is allocated).
    #[error("QMP line longer than {max} bytes")]
    TooLong {
        /// The bound.
        max: usize,
    },
    /// Not valid JSON.
    #[error("QMP line is not JSON ({detail}): {quote}")]
    NotJson {
        /// The parser's complaint.
        detail: String,
        /// The start of the line.
        quote: String,
    },
    /// Valid JSON, but not an object.
    #[error("QMP line is not a JSON object: {quote}")]
    NotObject {
        /// The start of the line.
        quote: String,
    },
    /// A known kind of message with a member of the wrong type.
    #[error("malformed QMP {kind}: {detail}")]
    Malformed {
        /// Which kind (`greeting`, `event`, `error reply`).
        kind: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// The start of `bytes` as text, for error messages.
pub fn quote(bytes: &[u8]) -> String {
    let end = bytes.len().min(QUOTE);
    let mut s = String::from_utf8_lossy(&bytes[..end]).into_owned();
    if bytes.len() > QUOTE {
        s.push('…');
    }
    s
}

/// Parse one line (without or with its trailing `\r\n`).
pub fn parse(line: &[u8]) -> Result<Message, LineError> {
    let v: Value = serde_json::from_slice(line).map_err(|e| LineError::NotJson {
        detail: e.to_string(),
        quote: quote(line),
    })?;
    let Value::Object(mut obj) = v else {
        return Err(LineError::NotObject { quote: quote(line) });
    };
    if let Some(g) = obj.remove("QMP") {
        return greeting(g).map(Message::Greeting);
    }
    if let Some(name) = obj.remove("event") {
        return event(name, &mut obj).map(Message::Event);
    }
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(e) = obj.remove("error") {
        let Value::Object(e) = e else {
            return Err(malformed("error reply", "`error` is not an object"));
        };
        let class = match e.get("class") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(malformed("error reply", "`error.class` is not a string")),
        };
        let desc = match e.get("desc") {
            Some(Value::String(s)) => s.clone(),
            None => String::new(),
            Some(_) => return Err(malformed("error reply", "`error.desc` is not a string")),
        };
        return Ok(Message::Error { id, class, desc });
    }
    if let Some(id) = id {
        obj.insert("id".into(), id);
    }
    Ok(Message::Unknown(Value::Object(obj)))
}

fn malformed(kind: &'static str, detail: &str) -> LineError {
    LineError::Malformed {
        kind,
        detail: detail.to_string(),
    }
}

fn greeting(g: Value) -> Result<Greeting, LineError> {
    let Value::Object(g) = g else {
        return Err(malformed("greeting", "`QMP` is not an object"));
    };
    let version = g.get("version");
    let num = |k: &str| {
        version
            .and_then(|v| v.get("qemu"))
            .and_then(|q| q.get(k))
            .and_then(Value::as_u64)
    };
    let version = match (num("major"), num("minor"), num("micro")) {
        (Some(major), Some(minor), Some(micro)) => Some(QemuVersion {
            major,
            minor,
            micro,
        }),
        _ => None,
    };
    let package = g
        .get("version")
        .and_then(|v| v.get("package"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let capabilities = match g.get("capabilities") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|c| c.as_str().map(str::to_string))
            .collect(),
        Some(_) => return Err(malformed("greeting", "`capabilities` is not an array")),
    };
    Ok(Greeting {
        version,
        package,
        capabilities,
    })
}

fn event(name: Value, obj: &mut Map<String, Value>) -> Result<Event, LineError> {
    let Value::String(name) = name else {
        return Err(malformed("event", "`event` is not a string"));
    };
    let data = obj.remove("data").unwrap_or(Value::Null);
    let timestamp = obj.get("timestamp").and_then(|t| {
        Some(Timestamp {
            seconds: t.get("seconds")?.as_i64()?,
            microseconds: t.get("microseconds")?.as_i64()?,
        })
    });
    Ok(Event {
        name,
        data,
        timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn real_qemu_lines() {
        let g = parse(
            br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2"}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        assert_eq!(
            g,
            Message::Greeting(Greeting {
                version: Some(QemuVersion {
                    major: 10,
                    minor: 0,
                    micro: 2
                }),
                package: "Debian 1:10.0.2".into(),
                capabilities: vec!["oob".into()],
            })
        );
        assert_eq!(
            parse(b"{\"return\": {}, \"id\": 1}\r\n").unwrap(),
            Message::Return {
                id: Some(json!(1)),
                value: json!({})
            }
        );
        assert_eq!(
            parse(br#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}"#)
                .unwrap(),
            Message::Error {
                id: Some(json!(1)),
                class: "CommandNotFound".into(),
                desc: "The command x has not been found".into()
            }
        );
        // An error for input QEMU could not parse carries no id.
        assert!(matches!(
            parse(br#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#).unwrap(),
            Message::Error { id: None, .. }
        ));
        assert_eq!(
            parse(
                br#"{"timestamp": {"seconds": 1700000000, "microseconds": 12}, "event": "STOP"}"#
            )
            .unwrap(),
            Message::Event(Event {
                name: "STOP".into(),
                data: Value::Null,
                timestamp: Some(Timestamp {
                    seconds: 1_700_000_000,
                    microseconds: 12
                }),
            })
        );
    }

    #[test]
    fn unknown_things_are_tolerated() {
        // An event nobody has heard of, with extra members and a strange timestamp.
        let m = parse(
            br#"{"event": "X_FUTURE_THING", "data": {"a": [1]}, "timestamp": "soon", "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            Message::Event(Event {
                name: "X_FUTURE_THING".into(),
                data: json!({"a": [1]}),
                timestamp: None
            })
        );
        // Extra members in replies and greetings.
        assert!(matches!(
            parse(br#"{"return": 5, "id": "a", "new": true}"#).unwrap(),
            Message::Return { .. }
        ));
        assert!(matches!(
            parse(br#"{"QMP": {"version": "eleven", "capabilities": [1, "oob"], "x": 2}}"#).unwrap(),
            Message::Greeting(Greeting { version: None, ref capabilities, .. }) if capabilities == &["oob"]
        ));
        // A new kind of message.
        assert_eq!(
            parse(br#"{"notice": "hi", "id": 3}"#).unwrap(),
            Message::Unknown(json!({"notice": "hi", "id": 3}))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"garbage",
            b"{\"return\": ",
            b"[1,2]",
            b"\"QMP\"",
            b"\xff\xfe{}",
            b"{\"error\": 5}",
            b"{\"error\": {\"desc\": \"no class\"}}",
            b"{\"event\": 7}",
            b"{\"QMP\": []}",
            b"{\"QMP\": {\"capabilities\": 1}}",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'x'; 10_000];
        let LineError::NotJson { quote, .. } = parse(&long).unwrap_err() else {
            panic!()
        };
        assert!(quote.chars().count() <= QUOTE + 1);
    }
}
