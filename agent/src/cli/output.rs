//! Printing a report either as JSON (`--json`) or as aligned text.

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
                other => out!("{k:width$}  {}", compact(other)),
            }
        }
    } else {
        out!("{}", compact(v));
    }
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
