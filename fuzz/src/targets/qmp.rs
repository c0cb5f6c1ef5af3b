//! The QMP client (`agent::qemu::qmp::Qmp`): everything QEMU sends it, greeting, replies and
//! events, as newline-delimited JSON over its unix socket. A peer thread plays QEMU and sends
//! the input verbatim; the client connects (greeting, `qmp_capabilities`) and runs commands
//! until the input runs out. Nothing may panic or hang (every read has a 2 s timeout).

use super::{MIB64, Target};
use agent::qemu::qmp::Qmp;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub const TARGET: Target = Target {
    name: "qmp",
    decoder: "agent::qemu::qmp::Qmp::{connect, execute} (QMP JSON lines)",
    run,
    max_alloc: MIB64,
    // Below a unix socket's send buffer, so the peer writes it all before the client reads.
    max_len: 1 << 16,
    smoke_runs: 6000,
    seeds,
};

struct Peer {
    path: PathBuf,
    next: Mutex<Sender<Vec<u8>>>,
}

/// Serve one connection: the input, then read whatever the client says until it hangs up.
fn serve(listener: UnixListener, inputs: Receiver<Vec<u8>>) {
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let Ok(input) = inputs.recv() else { return };
        let _ = s.write_all(&input);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = std::io::copy(&mut s, &mut std::io::sink());
    }
}

fn peer() -> &'static Peer {
    static PEER: OnceLock<Peer> = OnceLock::new();
    PEER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bitferry-fuzz-qmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind the QMP peer socket");
        let (tx, rx) = channel();
        std::thread::spawn(move || serve(listener, rx));
        Peer {
            path,
            next: Mutex::new(tx),
        }
    })
}

fn run(data: &[u8]) {
    let p = peer();
    p.next
        .lock()
        .expect("peer lock")
        .send(data.to_vec())
        .expect("the peer thread runs");
    let Ok(mut q) = Qmp::connect(&p.path, Duration::from_secs(2)) else {
        return;
    };
    // Each command consumes at least one line; stop when the input is used up.
    for _ in 0..=data.iter().filter(|b| **b == b'\n').count() {
        if q.execute("query-block", serde_json::json!({})).is_err() {
            break;
        }
    }
    let _ = q.events.len();
}

fn seeds() -> Vec<Vec<u8>> {
    let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
    let ok = |id: u32| format!(r#"{{"return": {{}}, "id": {id}}}"#);
    let event = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;
    let err = r#"{"error": {"class": "GenericError", "desc": "no such node"}, "id": 3}"#;
    vec![
        format!("{greeting}\n{}\n{}\n{event}\n{}\n{err}\n", ok(1), ok(2), ok(3)).into_bytes(),
        format!("{greeting}\n{}\n{event}\n{event}\n", ok(1)).into_bytes(),
        format!("{greeting}\n").into_bytes(),
    ]
}
