//! Printing a report either as JSON (`--json`) or as aligned text. In text, byte counts read
//! `1 GiB (1073741824 bytes)`; JSON always carries the exact number.

use serde_json::Value;
use std::io::Write;

/// Print a line to stdout; a closed pipe (`bitferry … | head`) is not an error worth a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Print `v` as one JSON document, or as `key  value` lines for people.
pub fn print(json: bool, v: &Value) {
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(v).expect("JSON values serialize")
        );
        return;
    }
    if let Value::Object(map) = v {
        let width = map.keys().map(String::len).max().unwrap_or(0);
        for (k, val) in map {
            match val {
                Value::Array(items) => {
                    out!("{k:width$}  {} item(s)", items.len());
                    for it in items.iter().take(20) {
                        out!("{:width$}    {}", "", compact(it));
                    }
                    if items.len() > 20 {
                        out!(
                            "{:width$}    … {} more (use --json for all)",
                            "",
                            items.len() - 20
                        );
                    }
                }
                Value::Number(n) if is_size(k) && n.as_u64().is_some() => {
                    out!(
                        "{k:width$}  {}",
                        super::units::human_bytes(n.as_u64().expect("checked"))
                    );
                }
                other => out!("{k:width$}  {}", compact(other)),
            }
        }
    } else {
        out!("{}", compact(v));
    }
}

/// Keys whose values are byte counts (sizes, offsets, amounts transferred or read).
pub const SIZE_KEYS: &[&str] = &[
    "size",
    "granularity",
    "virtual_size",
    "cluster_size",
    "bytes",
    "bytes_read",
    "bytes_total",
    "bytes_during_switchover",
    "done",
    "total",
    "resumed_from",
];

fn is_size(key: &str) -> bool {
    SIZE_KEYS.contains(&key)
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Object(m) if m.contains_key("offset") && m.contains_key("length") => {
            format!("{}+{}", m["offset"], m["length"])
        }
        other => other.to_string(),
    }
}
