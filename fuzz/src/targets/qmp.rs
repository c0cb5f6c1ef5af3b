//! The QMP client (`agent::qemu::qmp`): everything QEMU sends it, greeting, replies and events,
//! as newline-delimited JSON. Each line goes through the pure line parser
//! ([`agent::qemu::qmp::line::parse`]); then the whole input is what "QEMU" says to the real
//! async client over a pipe ([`super::peer`]): it connects (greeting, `qmp_capabilities`,
//! `query-commands`) and runs commands until the input runs out. Nothing may panic or hang.

use super::peer::with_peer;
use super::{MIB64, Target};
use agent::qemu::qmp::{Qmp, QmpOptions, line};
use std::time::Duration;

pub const TARGET: Target = Target {
    name: "qmp",
    decoder: "agent::qemu::qmp::{line::parse, Qmp::{from_stream, execute}} (QMP JSON lines)",
    run,
    max_alloc: MIB64,
    max_len: 1 << 16,
    smoke_runs: 6000,
    seeds,
};

fn run(data: &[u8]) {
    for l in data.split(|b| *b == b'\n') {
        let _ = line::parse(l);
    }
    let opts = QmpOptions {
        // The peer hangs up after the input: these bound only a client that ignores that.
        handshake_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(2),
        ..QmpOptions::default()
    };
    with_peer(data, |pipe| async move {
        let Ok(q) = Qmp::from_stream(pipe, "fuzz", opts).await else {
            return;
        };
        let _ = q.has_command("block-dirty-bitmap-add");
        let _ = q.greeting();
        // Each command consumes at least one line; once the input is used up the peer has hung
        // up and the next command fails at once.
        for _ in 0..64 {
            if q.execute("query-block", serde_json::json!({})).await.is_err() {
                break;
            }
        }
        q.close();
    });
}

fn seeds() -> Vec<Vec<u8>> {
    let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
    let ok = |id: &str| format!(r#"{{"return": {{}}, "id": {id}}}"#);
    let cmds = r#"{"return": [{"name": "query-block"}, {"name": "block-dirty-bitmap-add"}, {"name": "transaction"}], "id": 2}"#;
    let event = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;
    let err = r#"{"error": {"class": "GenericError", "desc": "no such node"}, "id": 4}"#;
    vec![
        format!(
            "{greeting}\r\n{}\r\n{cmds}\r\n{}\r\n{event}\r\n{err}\r\n",
            ok("1"),
            ok("3")
        )
        .into_bytes(),
        format!("{greeting}\n{}\n{event}\n{cmds}\n{event}\n", ok("1")).into_bytes(),
        format!("{greeting}\n").into_bytes(),
    ]
}
