//! The agent's QMP and NBD clients against real QEMU 10: `qemu-storage-daemon`,
//! `qemu-system-x86_64 -M none` (TCG, no guest) and `qemu-nbd`, with `bitferry qcow2 list`
//! and bitmaps computed from the writes as oracles.
//!
//! Randomised writes print their seed; replay with `BITFERRY_TEST_SEED=N`.

use agent::qemu::nbd::{self, BASE_ALLOCATION, NbdClient, NbdError, NbdOptions};
use agent::qemu::qmp::{
    Action, Backoff, DisconnectReason, ErrorClass, Notification, Qmp, QmpError, QmpOptions,
    ReconnectingQmp,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::Receiver;
use wire::{Bitmap, Extent, Geometry};

use crate::common::{bitferry, seed};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

pub(crate) fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bfqc")
        .tempdir_in("/tmp")
        .unwrap()
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

/// Write `(offset, length, pattern)` with one qemu-io process (`-f FMT IMAGE`, or an NBD URI
/// with `fmt` "raw"). `-t unsafe` skips the flushes that order qcow2 metadata updates (they
/// cost seconds for scattered writes to a 1 TiB image, and every reader here goes through the
/// same page cache); the bitmaps are still stored when qemu-io closes the image.
fn qemu_io(fmt: &str, target: &str, writes: &[(u64, u64, u8)]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-t", "unsafe", "-f", fmt]);
    for (o, l, p) in writes {
        cmd.arg("-c").arg(format!("write -P {p:#x} {o} {l}"));
    }
    let out = run(cmd.arg(target));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io: {text}");
}

/// A QEMU process, SIGKILLed and reaped on drop.
pub(crate) struct Proc {
    pub(crate) child: Child,
    what: &'static str,
}

impl Proc {
    fn spawn(what: &'static str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Proc { child, what }
    }

    /// Wait until `sock` accepts connections.
    fn wait_socket(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(sock).is_ok() {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited early: {st}", self.what);
            }
            assert!(
                Instant::now() < deadline,
                "{} never opened {sock:?}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait until the `qemu-nbd` serving `export` at `sock` completes a handshake (a proper NBD
/// session, ended with `NBD_CMD_DISC`, so the server logs no failed negotiation).
async fn wait_nbd(p: &mut Proc, sock: &Path, export: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if sock.exists()
            && let Ok(c) = NbdClient::connect_unix(sock, &NbdOptions::new(export)).await
        {
            c.disconnect().await.unwrap();
            return;
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!("{} exited early: {st}", p.what);
        }
        assert!(
            Instant::now() < deadline,
            "{} never served {sock:?}",
            p.what
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `qemu-storage-daemon` with `img` open as nodes `file0`/`fmt0` and a QMP monitor at `qmp`.
fn storage_daemon(img: &Path, qmp: &Path) -> Proc {
    let mut p = Proc::spawn(
        "qemu-storage-daemon",
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                img.display()
            ))
            .args(["--blockdev", "driver=qcow2,file=file0,node-name=fmt0"])
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                qmp.display()
            ))
            .args(["--monitor", "chardev=m"]),
    );
    p.wait_socket(qmp);
    p
}

/// `qemu-system-x86_64 -M none` (no guest) with `img` as `file0`/`fmt0` and one QMP monitor
/// per socket in `monitors`.
pub(crate) fn system_emulator(img: &Path, monitors: &[&Path]) -> Proc {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "none", "-nodefaults", "-display", "none"])
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=file0",
            img.display()
        ))
        .args(["-blockdev", "driver=qcow2,file=file0,node-name=fmt0"]);
    for m in monitors {
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", m.display()));
    }
    let mut p = Proc::spawn("qemu-system-x86_64", &mut cmd);
    for m in monitors {
        p.wait_socket(m);
    }
    p
}

/// Connect, retrying while QEMU still sets the monitor up (our own probe connection from
/// `wait_socket` may still occupy it for a moment).
pub(crate) async fn qmp(sock: &Path) -> Qmp {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Qmp::connect_with(
            sock,
            QmpOptions {
                handshake_timeout: Duration::from_secs(5),
                ..QmpOptions::default()
            },
        )
        .await
        {
            Ok(q) => return q,
            Err(e) => {
                assert!(Instant::now() < deadline, "QMP at {sock:?}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The next event named `name` (others are skipped); panics on a disconnect or after 20 s.
async fn event(rx: &mut Receiver<Notification>, name: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {name} event"))
            .expect("notification channel");
        match n {
            Notification::Event(e) if e.name == name => {
                assert!(e.timestamp.is_some(), "{e:?}");
                return e.data;
            }
            Notification::Event(_) | Notification::Connected { .. } => {}
            Notification::Disconnected(r) => panic!("disconnected waiting for {name}: {r}"),
        }
    }
}

async fn disconnected(rx: &mut Receiver<Notification>) -> DisconnectReason {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("no Disconnected notification")
            .expect("notification channel");
        if let Notification::Disconnected(r) = n {
            return r;
        }
    }
}

fn bitmaps_of(nodes: &Value, node: &str) -> Vec<Value> {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
        .unwrap_or_default()
}

/// Random writes within `size`, each with its own pattern byte (never 0).
fn random_writes(rng: &mut StdRng, size: u64, n: usize) -> Vec<(u64, u64, u8)> {
    (0..n)
        .map(|i| {
            let len = match i % 3 {
                0 => rng.random_range(1..=8 * KIB),
                1 => rng.random_range(1..=300 * KIB),
                _ => rng.random_range(1..=2 * MIB),
            }
            .min(size);
            let off = if i == n - 1 {
                size - len
            } else {
                rng.random_range(0..=size - len)
            };
            (off, len, rng.random_range(1..=255u8))
        })
        .collect()
}

fn bitmap_of(size: u64, g: u64, writes: &[(u64, u64, u8)]) -> Bitmap {
    let mut b = Bitmap::new(Geometry::new(size, g).unwrap());
    for (o, l, _) in writes {
        b.mark(*o, *l).unwrap();
    }
    b
}

/// The image's bytes after `writes` in order (for images small enough to hold in memory).
fn contents(size: u64, writes: &[(u64, u64, u8)]) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for (o, l, p) in writes {
        v[*o as usize..(*o + *l) as usize].fill(*p);
    }
    v
}

fn list_extents(img: &Path, name: &str) -> Vec<Extent> {
    let out = run(bitferry().args(["qcow2", "list"]).arg(img).arg("--json"));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = v["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {name}: {v}"));
    assert_eq!(b["state"], "consistent");
    serde_json::from_value(b["extents"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_against_storage_daemon() {
    let dir = tmp();
    let img = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let sock = dir.path().join("q.sock");
    let mut qsd = storage_daemon(&img, &sock);
    let q = qmp(&sock).await;

    // Greeting, capabilities, feature detection.
    let v = q.greeting().version.expect("version in the greeting");
    assert!(v.major >= 10, "{v}");
    assert!(q.has_command("x-debug-block-dirty-bitmap-sha256"));
    assert!(q.has_command("block-export-add") && q.has_command("transaction"));
    assert!(!q.has_command("human-monitor-command"), "qsd has no HMP");
    assert!(!q.has_command("qmp_capabilities_but_not"));

    // Commands and error mapping.
    let nodes = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    assert!(nodes.to_string().contains("\"fmt0\""), "{nodes}");
    let e = q.execute("no-such-command", json!({})).await.unwrap_err();
    assert_eq!(e.class(), Some(&ErrorClass::CommandNotFound), "{e}");
    let e = q
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "nope", "name": "b"}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, QmpError::Command { desc, .. } if desc.contains("nope")),
        "{e:?}"
    );
    let e = q
        .execute("query-named-block-nodes", json!({"flat": "yes"}))
        .await
        .unwrap_err();
    assert_eq!(e.class(), Some(&ErrorClass::GenericError), "{e}");

    // A transaction: all or nothing.
    q.transaction([
        Action::new(
            "block-dirty-bitmap-add",
            json!({"node": "fmt0", "name": "a", "granularity": 65536}),
        ),
        Action::new(
            "block-dirty-bitmap-add",
            json!({"node": "fmt0", "name": "b", "granularity": 4096, "disabled": true}),
        ),
    ])
    .await
    .unwrap();
    let e = q
        .transaction([
            Action::new(
                "block-dirty-bitmap-add",
                json!({"node": "fmt0", "name": "c"}),
            ),
            Action::new(
                "block-dirty-bitmap-add",
                json!({"node": "fmt0", "name": "a"}),
            ),
        ])
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Command { .. }), "{e:?}");
    let nodes = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let mut names: Vec<String> = bitmaps_of(&nodes, "fmt0")
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"], "the failed transaction added nothing");
    let sha = q
        .execute(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "fmt0", "name": "a"}),
        )
        .await
        .unwrap();
    assert_eq!(sha["sha256"].as_str().unwrap().len(), 64);

    // Events: an export's deletion; events this client has no name for pass through too.
    let mut rx = q.subscribe();
    let nbd_sock = dir.path().join("nbd.sock");
    q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd_sock}}}),
    )
    .await
    .unwrap();
    q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "fmt0", "name": "x", "writable": false}),
    )
    .await
    .unwrap();
    q.execute("block-export-del", json!({"id": "e1"}))
        .await
        .unwrap();
    assert_eq!(event(&mut rx, "BLOCK_EXPORT_DELETED").await["id"], "e1");
    q.execute("nbd-server-stop", Value::Null).await.unwrap();

    // Concurrent commands from clones of one connection.
    let q2 = q.clone();
    let (a, b) = tokio::join!(
        q2.execute("query-block-exports", Value::Null),
        q.execute("query-version", Value::Null)
    );
    assert_eq!(a.unwrap(), json!([]));
    assert!(b.unwrap()["qemu"]["major"].as_u64().unwrap() >= 10);

    // QEMU killed: the subscriber hears of it, commands fail typed.
    qsd.kill();
    let r = disconnected(&mut rx).await;
    assert!(
        matches!(r, DisconnectReason::Eof | DisconnectReason::Io(_)),
        "{r:?}"
    );
    let e = q.execute("query-version", Value::Null).await.unwrap_err();
    assert!(e.is_disconnect(), "{e:?}");
    assert!(!q.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_against_system_emulator_events_and_busy_monitor() {
    let dir = tmp();
    let img = dir.path().join("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
    let agent_sock = dir.path().join("agent.sock");
    let writer_sock = dir.path().join("writer.sock");
    let _vm = system_emulator(&img, &[&agent_sock, &writer_sock]);
    let q = qmp(&agent_sock).await;
    let w = qmp(&writer_sock).await;
    assert!(q.has_command("human-monitor-command"));
    assert!(q.has_command("x-debug-block-dirty-bitmap-sha256"));

    // A monitor serves one client: a second one gets no greeting, as a typed timeout.
    let e = Qmp::connect_with(
        &agent_sock,
        QmpOptions {
            handshake_timeout: Duration::from_millis(500),
            ..QmpOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, QmpError::Timeout { what, .. } if what == "greeting"),
        "{e:?}"
    );

    // stop/cont: STOP and RESUME arrive on the agent's monitor even when the writer's
    // monitor runs them.
    let mut rx = q.subscribe();
    w.execute("stop", Value::Null).await.unwrap();
    event(&mut rx, "STOP").await;
    let st = q.execute("query-status", Value::Null).await.unwrap();
    assert_eq!(st["running"], false, "{st}");
    w.execute("cont", Value::Null).await.unwrap();
    event(&mut rx, "RESUME").await;

    // Writes without a guest (HMP qemu-io) land in the agent's bitmap.
    q.execute(
        "block-dirty-bitmap-add",
        json!({"node": "fmt0", "name": "bf-live", "granularity": 65536, "persistent": false}),
    )
    .await
    .unwrap();
    w.execute(
        "human-monitor-command",
        json!({"command-line": "qemu-io fmt0 \"write -P 0x22 1M 4k\""}),
    )
    .await
    .unwrap();
    let nodes = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let b = bitmaps_of(&nodes, "fmt0");
    assert_eq!(b[0]["name"], "bf-live");
    assert_eq!(b[0]["count"], 65536, "{b:?}");

    // `quit`: the reply, then the connection ends like a QEMU that went away. QEMU exits
    // with the newline after `quit` unread, so the kernel often reports ECONNRESET, not EOF.
    q.execute("quit", Value::Null).await.unwrap();
    let r = disconnected(&mut rx).await;
    assert!(
        matches!(&r, DisconnectReason::Eof)
            || matches!(&r, DisconnectReason::Io(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_qemu_restarts() {
    let dir = tmp();
    let img = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    let sock = dir.path().join("q.sock");
    let rq = ReconnectingQmp::new(
        &sock,
        QmpOptions {
            handshake_timeout: Duration::from_secs(5),
            ..QmpOptions::default()
        },
        Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
    );
    let mut rx = rq.subscribe();
    // Not up yet: fail fast, typed.
    assert!(matches!(
        rq.execute("query-version", Value::Null).await,
        Err(QmpError::NotConnected { .. })
    ));
    let mut qsd = Proc::spawn(
        "qemu-storage-daemon",
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                img.display()
            ))
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                sock.display()
            ))
            .args(["--monitor", "chardev=m"]),
    );
    let (g, q) = tokio::time::timeout(Duration::from_secs(30), rq.connected())
        .await
        .unwrap();
    assert_eq!(g, 1);
    assert!(q.has_command("block-dirty-bitmap-add"));
    rq.execute(
        "block-dirty-bitmap-add",
        json!({"node": "file0", "name": "bf-1"}),
    )
    .await
    .unwrap();

    qsd.kill();
    disconnected(&mut rx).await;
    // The agent now knows QEMU went away; a new one comes up on the same socket path.
    let _qsd2 = Proc::spawn(
        "qemu-storage-daemon",
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                img.display()
            ))
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                sock.display()
            ))
            .args(["--monitor", "chardev=m"]),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("no reconnection")
            .unwrap();
        if let Notification::Connected { generation } = n {
            assert_eq!(generation, 2);
            break;
        }
    }
    assert_eq!(rq.generation(), 2);
    // A new process: the non-persistent bitmap of the old one is gone — exactly why a
    // caller must treat a new generation as "bits may be lost".
    let nodes = rq
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    assert!(bitmaps_of(&nodes, "file0").is_empty(), "{nodes}");
}

/// `qemu-nbd -r -B`: block status of each bitmap equals `bitferry qcow2 list`; reads return
/// the written bytes and zeros elsewhere; `base:allocation` shows the unwritten clusters as
/// holes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_against_qemu_nbd_matches_qcow2_list() {
    let mut rng = StdRng::seed_from_u64(seed("nbd_against_qemu_nbd"));
    let dir = tmp();
    let img = dir.path().join("d.qcow2");
    let p = img.to_str().unwrap();
    let size = 256 * MIB + 3 * 512;
    qemu_img(&["create", "-q", "-f", "qcow2", p, &size.to_string()]);
    qemu_img(&["bitmap", "--add", "-g", "65536", p, "b64k"]);
    qemu_img(&["bitmap", "--add", "-g", "4096", p, "b4k"]);
    let mut writes = random_writes(&mut rng, size, 30);
    writes.push((4 * MIB, 1, 0x5a));
    qemu_io("qcow2", p, &writes);
    assert_eq!(
        list_extents(&img, "b64k"),
        bitmap_of(size, 65536, &writes)
            .extents()
            .collect::<Vec<_>>()
    );

    let sock = dir.path().join("nbd.sock");
    let mut server = Proc::spawn(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args([
                "-r", "-t", "-f", "qcow2", "-x", "exp", "-B", "b64k", "-B", "b4k", "-k",
            ])
            .arg(&sock)
            .arg(&img),
    );
    wait_nbd(&mut server, &sock, "exp").await;
    let opts = NbdOptions::new("exp")
        .context(nbd::dirty_bitmap_context("b64k"))
        .context(nbd::dirty_bitmap_context("b4k"))
        .context(BASE_ALLOCATION);
    let mut c = NbdClient::connect_unix(&sock, &opts).await.unwrap();
    assert_eq!(c.export().size, size);
    assert!(c.export().read_only());
    for name in ["b64k", "b4k"] {
        let got = c
            .dirty_extents(&nbd::dirty_bitmap_context(name))
            .await
            .unwrap();
        assert_eq!(got, list_extents(&img, name), "{name}");
    }

    // Data: the whole image through reads of mixed sizes (one over 32 MiB, split), against
    // the bytes written.
    let want = contents(size, &writes);
    let mut got = vec![0xeeu8; size as usize];
    let mut at = 0usize;
    for len in [1usize, 4095, 40 << 20, 3 << 20] {
        c.read_into(at as u64, &mut got[at..at + len])
            .await
            .unwrap();
        at += len;
    }
    c.read_into(at as u64, &mut got[at..]).await.unwrap();
    assert!(got == want, "NBD reads differ from the written bytes");

    // Allocation: every written byte is in a non-hole run; a cluster nothing touched is a
    // hole that reads as zeros.
    let alloc = c.allocation(0, size).await.unwrap();
    assert_eq!(alloc.iter().map(|a| a.length).sum::<u64>(), size);
    for (o, l, _) in &writes {
        for a in alloc
            .iter()
            .filter(|a| a.offset < o + l && *o < a.offset + a.length)
        {
            assert!(!a.hole, "written [{o}, +{l}) inside a hole {a:?}");
        }
    }
    let written = bitmap_of(size, 65536, &writes);
    let untouched = (0..size / 65536)
        .find(|b| !written.is_set(*b))
        .expect("an untouched cluster");
    let a = c.allocation(untouched * 65536, 65536).await.unwrap();
    assert!(a.iter().all(|a| a.hole && a.zero), "{a:?}");

    // A context that was not negotiated is misuse; a bitmap that is not exported is refused.
    let e = c
        .dirty_extents("qemu:dirty-bitmap:other")
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::InvalidRequest(_)), "{e:?}");
    c.disconnect().await.unwrap();
    let e = NbdClient::connect_unix(
        &sock,
        &NbdOptions::new("exp").context(nbd::dirty_bitmap_context("nope")),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, NbdError::NoSuchContext { .. }), "{e:?}");
    let e = NbdClient::connect_unix(&sock, &NbdOptions::new("wrong-name"))
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::OptionRefused { .. }), "{e:?}");

    // The server dies: a typed error, not a hang or a panic.
    let mut c = NbdClient::connect_unix(&sock, &opts).await.unwrap();
    server.kill();
    let e = c
        .dirty_extents(&nbd::dirty_bitmap_context("b4k"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, NbdError::Disconnected { .. } | NbdError::Io { .. }),
        "{e:?}"
    );
}

/// The same client over TCP (loopback): `qemu-nbd -b 127.0.0.1 -p PORT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_over_tcp() {
    let dir = tmp();
    let img = dir.path().join("t.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "8M"]);
    qemu_img(&["bitmap", "--add", p, "b"]);
    qemu_io("qcow2", p, &[(MIB, 100, 0x42)]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Proc::spawn(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args([
                "-r",
                "-t",
                "-f",
                "qcow2",
                "-B",
                "b",
                "-b",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .arg(&img),
    );
    let ctx = nbd::dirty_bitmap_context("b");
    let opts = NbdOptions::new("").context(ctx.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c = loop {
        match NbdClient::connect_tcp(("127.0.0.1", port), &opts).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "qemu-nbd on port {port}: {e}");
                if let Ok(Some(st)) = server.child.try_wait() {
                    panic!("qemu-nbd exited: {st}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(
        c.dirty_extents(&ctx).await.unwrap(),
        [Extent {
            offset: MIB,
            length: 65536
        }]
    );
    assert_eq!(c.read(MIB - 1, 102).await.unwrap(), {
        let mut v = vec![0x42u8; 102];
        v[0] = 0;
        v[101] = 0;
        v
    });
    c.disconnect().await.unwrap();
}

/// Route B of the facts: a live bitmap in `qemu-storage-daemon` dirtied by writes through a
/// writable NBD export, swapped in one transaction, exported read-only with `bitmaps: [OLD]`
/// (all through the QMP client), and read with block status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_bitmap_over_storage_daemon_export() {
    let mut rng = StdRng::seed_from_u64(seed("live_bitmap_over_storage_daemon_export"));
    let dir = tmp();
    let img = dir.path().join("d.qcow2");
    let size = 128 * MIB + 512;
    let g = 65536;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
    let qmp_sock = dir.path().join("q.sock");
    let _qsd = storage_daemon(&img, &qmp_sock);
    let q = qmp(&qmp_sock).await;
    let nbd_sock = dir.path().join("nbd.sock");
    q.execute(
        "block-dirty-bitmap-add",
        json!({"node": "fmt0", "name": "bf-old", "granularity": g, "persistent": false}),
    )
    .await
    .unwrap();
    q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd_sock}}}),
    )
    .await
    .unwrap();
    q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "fmt0", "name": "w", "writable": true}),
    )
    .await
    .unwrap();
    let uri = format!("nbd+unix:///w?socket={}", nbd_sock.display());
    let first = random_writes(&mut rng, size, 20);
    qemu_io("raw", &uri, &first);

    // Swap: later writes land in bf-new only.
    q.transaction([
        Action::new(
            "block-dirty-bitmap-add",
            json!({"node": "fmt0", "name": "bf-new", "granularity": g, "persistent": false}),
        ),
        Action::new(
            "block-dirty-bitmap-disable",
            json!({"node": "fmt0", "name": "bf-old"}),
        ),
    ])
    .await
    .unwrap();
    let second = random_writes(&mut rng, size, 5);
    qemu_io("raw", &uri, &second);

    let mut rx = q.subscribe();
    q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "r", "node-name": "fmt0", "name": "r",
               "writable": false, "bitmaps": ["bf-old"]}),
    )
    .await
    .unwrap();
    let nodes = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let old = bitmaps_of(&nodes, "fmt0")
        .into_iter()
        .find(|b| b["name"] == "bf-old")
        .unwrap();
    assert_eq!(old["busy"], true, "an exported bitmap is busy: {old}");
    // An enabled bitmap cannot be exported read-only (the facts say so; check it stays so).
    let e = q
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "r2", "node-name": "fmt0", "name": "r2",
                   "writable": false, "bitmaps": ["bf-new"]}),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Command { .. }), "{e:?}");

    let ctx = nbd::dirty_bitmap_context("bf-old");
    let mut c = NbdClient::connect_unix(&nbd_sock, &NbdOptions::new("r").context(ctx.clone()))
        .await
        .unwrap();
    let got = c.dirty_extents(&ctx).await.unwrap();
    let want: Vec<Extent> = bitmap_of(size, g, &first).extents().collect();
    assert_eq!(got, want, "bf-old holds exactly the writes before the swap");
    // The data reads back as written by both batches.
    let mut all = first.clone();
    all.extend_from_slice(&second);
    let bytes = contents(size, &all);
    for (o, l, _) in &all {
        let v = c.read(*o, *l as usize).await.unwrap();
        assert!(
            v == bytes[*o as usize..(*o + *l) as usize],
            "read at {o}+{l}"
        );
    }
    c.disconnect().await.unwrap();

    q.execute("block-export-del", json!({"id": "r"}))
        .await
        .unwrap();
    assert_eq!(event(&mut rx, "BLOCK_EXPORT_DELETED").await["id"], "r");
    q.execute(
        "block-dirty-bitmap-remove",
        json!({"node": "fmt0", "name": "bf-old"}),
    )
    .await
    .unwrap();
    // bf-new counts the second batch only.
    let sha = q
        .execute(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "fmt0", "name": "bf-new"}),
        )
        .await
        .unwrap();
    let raw = bitmap_of(size, g, &second).to_raw();
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(&raw);
    h.update(&[0u8; 8][..(8 - raw.len() % 8) % 8]);
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sha["sha256"], hex);
}

/// Block status over a 1 TiB export with a sparse 64 KiB bitmap (scattered writes), and over
/// a fully dirty one: exact extents and how long a full pass takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_over_a_1_tib_sparse_export() {
    let mut rng = StdRng::seed_from_u64(seed("block_status_over_a_1_tib_sparse_export"));
    let dir = tmp();
    let img = dir.path().join("big.qcow2");
    let p = img.to_str().unwrap();
    let size = 1 << 40;
    qemu_img(&["create", "-q", "-f", "qcow2", p, "1T"]);
    qemu_img(&["bitmap", "--add", "-g", "65536", p, "sparse"]);
    let n = 2000;
    let writes: Vec<(u64, u64, u8)> = (0..n)
        .map(|_| (rng.random_range(0..size / 4096) * 4096, 4096, 0x11))
        .collect();
    // A few qemu-io processes (argument lists stay short).
    for batch in writes.chunks(500) {
        qemu_io("qcow2", p, batch);
    }
    let sock = dir.path().join("nbd.sock");
    let mut server = Proc::spawn(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-B", "sparse", "-k"])
            .arg(&sock)
            .arg(&img),
    );
    wait_nbd(&mut server, &sock, "").await;
    let ctx = nbd::dirty_bitmap_context("sparse");
    let mut c = NbdClient::connect_unix(&sock, &NbdOptions::new("").context(ctx.clone()))
        .await
        .unwrap();
    assert_eq!(c.export().size, size);
    let t = Instant::now();
    let mut descriptors = 0u64;
    c.walk(&ctx, 0, size, |_, _, _| descriptors += 1)
        .await
        .unwrap();
    let walk = t.elapsed();
    let t = Instant::now();
    let got = c.dirty_extents(&ctx).await.unwrap();
    let extents = t.elapsed();
    let requests = size.div_ceil(0xfc00_0000);
    let want: Vec<Extent> = bitmap_of(size, 65536, &writes).extents().collect();
    assert_eq!(got, want);
    assert_eq!(got, list_extents(&img, "sparse"));
    eprintln!(
        "1 TiB export, {} dirty extents from {n} scattered 4 KiB writes: {descriptors} descriptors \
         in >= {requests} requests; walk {walk:?}, dirty_extents {extents:?}",
        got.len()
    );
    c.disconnect().await.unwrap();
}

/// Serve a carrier holding bitmap `name` with every other block dirty, via `qemu-nbd`.
async fn alternating(dir: &Path, name: &str, size: u64, g: u64) -> (Proc, PathBuf) {
    let img = dir.join(format!("{name}.qcow2"));
    let geom = Geometry::new(size, g).unwrap();
    let raw = vec![0x55u8; (geom.blocks() / 8) as usize];
    let b = Bitmap::from_raw(geom, &raw).unwrap();
    agent::qcow2::write_carrier(&img, name, &b, false).unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let mut server = Proc::spawn(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-B", name, "-k"])
            .arg(&sock)
            .arg(&img),
    );
    wait_nbd(&mut server, &sock, "").await;
    (server, sock)
}

/// QEMU answers at most 128 Ki descriptors per block status reply, whatever the request
/// length: an 8 GiB export with a 4 KiB bitmap of alternating blocks (2 Mi runs) takes many
/// short replies, and paging must still find every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_pages_through_capped_replies() {
    let dir = tmp();
    let (size, g) = (8 * 1024 * MIB, 4096);
    let (_server, sock) = alternating(dir.path(), "alt4k", size, g).await;
    let ctx = nbd::dirty_bitmap_context("alt4k");
    let mut c = NbdClient::connect_unix(&sock, &NbdOptions::new("").context(ctx.clone()))
        .await
        .unwrap();
    let reply = c.block_status(0, 0xfc00_0000).await.unwrap();
    let (_, d) = &reply[0];
    let covered: u64 = d.iter().map(|e| u64::from(e.0)).sum();
    assert_eq!(d.len(), 128 * 1024, "QEMU's cap on descriptors per reply");
    assert_eq!(
        covered,
        128 * 1024 * g,
        "so one reply covers 512 MiB of the 4 GiB asked"
    );
    let e = c.dirty_extents(&ctx).await.unwrap();
    assert_eq!(e.len() as u64, size / g / 2);
    assert!(
        e.iter()
            .enumerate()
            .all(|(i, x)| x.offset == 2 * g * i as u64 && x.length == g)
    );
}

/// Block status over a 1 TiB export whose 64 KiB bitmap has every other block dirty (8 Mi
/// runs, 16 Mi descriptors), written as a carrier by bitferry and served by `qemu-nbd`.
/// Prints the throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_over_a_1_tib_alternating_bitmap() {
    let dir = tmp();
    let (size, g) = (1u64 << 40, 65536);
    let (_server, sock) = alternating(dir.path(), "alt", size, g).await;
    let ctx = nbd::dirty_bitmap_context("alt");
    let mut c = NbdClient::connect_unix(&sock, &NbdOptions::new("").context(ctx.clone()))
        .await
        .unwrap();
    let t = Instant::now();
    let (mut descriptors, mut dirty) = (0u64, 0u64);
    c.walk(&ctx, 0, size, |_, len, flags| {
        descriptors += 1;
        if flags & 1 != 0 {
            dirty += len;
        }
    })
    .await
    .unwrap();
    let took = t.elapsed();
    assert_eq!(dirty, size / 2);
    eprintln!(
        "1 TiB, 64 KiB granularity, every other block dirty: {descriptors} descriptors in {took:?} \
         ({:.1} M descriptors/s)",
        descriptors as f64 / took.as_secs_f64() / 1e6
    );
    let t = Instant::now();
    let e = c.dirty_extents(&ctx).await.unwrap();
    eprintln!("dirty_extents: {} extents in {:?}", e.len(), t.elapsed());
    assert_eq!(e.len() as u64, size / g / 2);
}
