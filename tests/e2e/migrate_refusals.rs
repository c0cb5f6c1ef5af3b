//! Migrations the destination agent must refuse: a client certificate from another CA, a disk
//! it was not told to expect (or not from this peer), a stale epoch (also at a host that retired
//! its copy of the disk), and a rogue source speaking
//! an unknown protocol version, sending a chunk that does not match its hash, or announcing a
//! 1 GiB frame, or stalling inside a frame. Each must fail with an error the operator can see,
//! leave both stores exactly as they were, and leave the agents running. And a source that goes
//! silent after a post-copy switchover: the destination gives up on it and keeps the disk
//! `incomplete`.

use crate::common::{AgentProc, bitferry, cluster_ca};
use agent::transport::{Endpoint, TlsIdentity, TransportOptions};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use wire::proto::frame;
use wire::proto::msg::*;
use wire::{DiskId, Geometry};

const DISK: &str = "vm/d";

/// What `bitmap show` says about every disk of an agent: the fields a refusal must not change.
fn snapshot(a: &AgentProc) -> Value {
    let list = a.json(&["bitmap", "list"]);
    let mut out = serde_json::Map::new();
    for row in list["bitmaps"].as_array().expect("bitmaps") {
        let disk = row["disk"].as_str().unwrap();
        let s = a.json(&["bitmap", "show", "--disk", disk]);
        out.insert(
            disk.to_string(),
            json!({
                "root": s["root"], "state": s["state"], "epoch": s["epoch"],
                "checkpoint": s["checkpoint"], "extents": s["extents"],
            }),
        );
    }
    Value::Object(out)
}

/// The agent still answers on its control socket.
fn alive(a: &AgentProc) {
    let st = a.json(&["status"]);
    assert!(st["uptime_seconds"].is_number(), "{st}");
}

fn create(a: &AgentProc, disk: &str, marks: &[&str]) {
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        disk,
        "--size",
        "64G",
        "--granularity",
        "4K",
    ]);
    let mut args = vec!["bitmap", "mark", "--disk", disk];
    for m in marks {
        args.extend(["--range", m]);
    }
    a.json(&args);
}

fn wait_log(a: &AgentProc, needle: &str) -> String {
    wait_log_more(a, needle, 0)
}

/// Wait until `needle` occurs in the agent's log more than `seen` times.
fn wait_log_more(a: &AgentProc, needle: &str, seen: usize) -> String {
    let t = Instant::now();
    loop {
        let log = a.log();
        if log.matches(needle).count() > seen {
            return log;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{needle:?} never appeared in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start migrating DISK from `src` to `dst` and wait until the source's migration has ended;
/// returns its final status.
fn migrate_until_finished(src: &AgentProc, dst: &AgentProc) -> Value {
    let to = dst.listen_addr();
    src.json(&["migrate", "start", "--disk", DISK, "--to", &to]);
    let t = Instant::now();
    loop {
        let st = src.json(&["migrate", "status", "--disk", DISK]);
        if st["finished"] == true {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "migration did not end: {st}\nsource log:\n{}\ndestination log:\n{}",
            src.log(),
            dst.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination has no bitmap for DISK.
fn no_disk(dst: &AgentProc) {
    let out = dst.cli(&["bitmap", "show", "--disk", DISK]);
    assert!(
        !out.status.success(),
        "the destination must not hold {DISK}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A refused migration between two real agents: the source reports `error` containing
/// `want_error` and keeps its bitmap; the destination logs `want_log`; nothing changed.
fn assert_refused(src: &AgentProc, dst: &AgentProc, want_error: &str, want_log: &str) {
    let (s0, d0) = (snapshot(src), snapshot(dst));
    let seen = dst.log().matches(want_log).count();
    let st = migrate_until_finished(src, dst);
    assert_eq!(st["phase"], "failed", "{st}");
    let err = st["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(want_error),
        "source error {err:?} lacks {want_error:?}: {st}"
    );
    wait_log_more(dst, want_log, seen);
    alive(src);
    alive(dst);
    assert_eq!(snapshot(src), s0, "the source store changed");
    assert_eq!(snapshot(dst), d0, "the destination store changed");
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let other = cluster_ca(&dir.path().join("other-ca"));
    let dst = AgentProc::start(&dir.path().join("b"), "host-b", &ca, "");
    // The intruder trusts the real CA (so it accepts the destination's server certificate) but
    // its own certificate is signed by another CA, which the destination does not trust.
    let bundle = dir.path().join("both-cas");
    std::fs::create_dir_all(&bundle).unwrap();
    let mut pem = std::fs::read(ca.join("ca.pem")).unwrap();
    pem.extend(std::fs::read(other.join("ca.pem")).unwrap());
    std::fs::write(bundle.join("ca.pem"), pem).unwrap();
    let adir = dir.path().join("a");
    std::fs::create_dir_all(&adir).unwrap();
    let out = bitferry()
        .args(["cert", "issue", "--ca"])
        .arg(&other)
        .args(["--name", "host-a", "--out"])
        .arg(&adir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src = AgentProc::start(&adir, "host-a", &bundle, "");
    create(&src, DISK, &["0:1M", "5G:64K"]);
    create(&dst, "vm/other", &["1G:4K"]);
    dst.json(&["expect", "--disk", DISK]);
    assert_refused(&src, &dst, "connecting to", "refused a connection");
    no_disk(&dst);
}

#[test]
fn disk_not_expected_or_expected_from_another_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let src = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    let dst = AgentProc::start(&dir.path().join("b"), "host-b", &ca, "");
    create(&src, DISK, &["0:1M", "7G:128K"]);
    create(&dst, "vm/other", &["3G:4K"]);
    // No expectation at all.
    assert_refused(&src, &dst, "is not expected here", "is not expected here");
    no_disk(&dst);
    // Expected, but from another host: host-a's certificate does not match.
    dst.json(&["expect", "--disk", DISK, "--from", "other-host"]);
    assert_refused(
        &src,
        &dst,
        // The destination only considers expectations naming this peer, so it does not
        // tell an unauthorised peer that someone else is expected.
        "is not expected here",
        "is not expected here",
    );
    no_disk(&dst);
}

#[test]
fn stale_epoch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    let b = AgentProc::start(&dir.path().join("b"), "host-b", &ca, "");
    let c = AgentProc::start(&dir.path().join("c"), "host-c", &ca, "");
    // A and C both hold the disk at epoch 1 (C's is an older copy); A migrates it to B.
    create(&a, DISK, &["0:1M"]);
    create(&c, DISK, &["9G:64K"]);
    b.json(&["expect", "--disk", DISK, "--from", "host-a"]);
    a.json(&["migrate", "start", "--disk", DISK, "--to", &b.listen_addr()]);
    let t = Instant::now();
    while a.json(&["migrate", "status", "--disk", DISK])["converged"] != true {
        assert!(t.elapsed() < Duration::from_secs(30), "no convergence");
        std::thread::sleep(Duration::from_millis(20));
    }
    let done = a.json(&["migrate", "switchover", "--disk", DISK]);
    assert_eq!(done["phase"], "completed", "{done}");
    assert_eq!(b.json(&["bitmap", "show", "--disk", DISK])["epoch"], 2);
    // B now owns epoch 2; C offers epoch 1 and must be refused even though B expects it.
    b.json(&["expect", "--disk", DISK, "--from", "host-c"]);
    assert_refused(
        &c,
        &b,
        "not newer than the epoch 2",
        "not newer than the epoch 2",
    );
    let st = c.json(&["bitmap", "show", "--disk", DISK]);
    assert_eq!(st["epoch"], 1);
    assert_eq!(st["state"], "recording", "{st}");
    // A retired its copy when B took the disk at epoch 2, and remembers that epoch: C's stale
    // copy at epoch 1 is refused there too, though A holds no bitmap for the disk any more
    // (without the retirement record A would accept it and become a second owner).
    no_disk(&a);
    a.json(&["expect", "--disk", DISK, "--from", "host-c"]);
    assert_refused(
        &c,
        &a,
        "older than epoch 2, to which this host handed the disk over",
        "older than epoch 2, to which this host handed the disk over",
    );
    no_disk(&a);
}

/// A source written with the library that sends whatever bytes a test wants.
struct Rogue {
    rt: tokio::runtime::Runtime,
    id: TlsIdentity,
}

/// How the destination answered a rogue stream.
#[derive(Debug)]
struct Answer {
    /// Decoded frames in order, until the stream ended or was reset.
    messages: Vec<Message>,
}

impl Rogue {
    fn new(dir: &Path, ca: &Path) -> Rogue {
        let out = bitferry()
            .args(["cert", "issue", "--ca"])
            .arg(ca)
            .args(["--name", "rogue", "--out"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = TlsIdentity::load(
            &ca.join("ca.pem"),
            &dir.join("rogue.pem"),
            &dir.join("rogue.key"),
        )
        .expect("rogue identity");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Rogue { rt, id }
    }

    /// Connect to `addr`, write `bytes` on one stream, and read the destination's frames until
    /// it ends the stream.
    fn exchange(&self, addr: &str, bytes: Vec<u8>) -> Answer {
        let addr = addr.parse().unwrap();
        self.rt.block_on(async {
            let ep = Endpoint::client(&self.id, TransportOptions::default()).unwrap();
            let conn = ep.connect(addr, "127.0.0.1").await.expect("connect");
            let mut s = conn.open_stream().await.unwrap();
            // The destination may stop reading as soon as it has seen enough: ignore errors.
            let _ = s.writer.quinn().write_all(&bytes).await;
            let mut messages = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), async {
                // Ends cleanly or with a reset; either way the frames so far are the answer.
                while let Ok(Some(body)) = s.recv_frame().await {
                    messages.push(frame::decode_body(&body).expect("a valid frame"));
                }
            })
            .await
            .expect("the destination answered within 20 s");
            conn.close(0, "done");
            Answer { messages }
        })
    }
}

fn hello(versions: Vec<u16>) -> Vec<u8> {
    frame::encode(&Message::Hello(Hello {
        protocol_versions: BoundedVec::new(versions).unwrap(),
        features: 0,
        host: BoundedString::new("rogue").unwrap(),
    }))
    .unwrap()
}

fn offer(g: Geometry) -> Vec<u8> {
    frame::encode(&Message::Offer(Offer {
        disk: DiskId::new(DISK).unwrap(),
        size: g.size(),
        granularity: g.granularity(),
        checkpoint: None,
        epoch: 1,
        chunk_bytes: wire::CHUNK_BYTES as u32,
        chunks: g.chunks() as u32,
        root: wire::Root([0; 32]),
        mode: Mode::Precopy,
    }))
    .unwrap()
}

fn aborted(a: &Answer, reason: AbortReason) -> String {
    let found = a.messages.iter().find_map(|m| match m {
        Message::Abort(ab) => Some(ab.clone()),
        _ => None,
    });
    let ab = found.unwrap_or_else(|| panic!("no Abort from the destination: {a:?}"));
    assert_eq!(ab.reason, reason, "{a:?}");
    assert!(!ab.dest_owns, "{a:?}");
    ab.detail.as_str().to_string()
}

/// A destination agent expecting DISK from "rogue", and the rogue source (same cluster CA).
fn rogue_and_destination(dir: &Path) -> (AgentProc, Rogue) {
    let ca = cluster_ca(&dir.join("ca"));
    let dst = AgentProc::start(&dir.join("b"), "host-b", &ca, "");
    let rogue_dir = dir.join("rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    let rogue = Rogue::new(&rogue_dir, &ca);
    dst.json(&["expect", "--disk", DISK, "--from", "rogue"]);
    (dst, rogue)
}

#[test]
fn rogue_source_version_bad_chunk_and_oversized_frame_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The test agents' frame-stall limit is 2 s (common.rs), so case 4 answers quickly.
    let (dst, rogue) = rogue_and_destination(dir.path());
    create(&dst, "vm/other", &["2G:8K"]);
    let addr = dst.listen_addr();
    let g = Geometry::new(64 << 30, 4096).unwrap();
    let before = snapshot(&dst);
    let unchanged = |what: &str| {
        alive(&dst);
        assert_eq!(
            snapshot(&dst),
            before,
            "{what}: the destination store changed"
        );
        no_disk(&dst);
    };

    // 1. Only an unsupported protocol version.
    let a = rogue.exchange(&addr, hello(vec![999]));
    match a.messages.first() {
        Some(Message::Refuse(r)) => {
            assert_eq!(r.reason, RefuseReason::UnsupportedVersion, "{a:?}");
            assert!(r.detail.as_str().contains("999"), "{a:?}");
        }
        other => panic!("expected a Refuse, got {other:?} ({a:?})"),
    }
    wait_log(&dst, "no common protocol version");
    unchanged("unknown version");

    // 2. A correct Hello and Offer, then a raw chunk whose hash does not match its payload.
    let mut bytes = hello(vec![PROTOCOL_V1]);
    bytes.extend(offer(g));
    let raw_len = g.chunk_range(0).len();
    bytes.extend(
        frame::encode(&Message::Chunk(ChunkHeader {
            round: 0,
            index: 0,
            kind: wire::ChunkKind::Raw,
            cv: [0x5a; 32],
            payload_len: raw_len as u32,
        }))
        .unwrap(),
    );
    bytes.extend(std::iter::repeat_n(0xff_u8, raw_len));
    let a = rogue.exchange(&addr, bytes);
    assert!(
        matches!(a.messages.first(), Some(Message::Welcome(_))),
        "{a:?}"
    );
    assert!(
        a.messages
            .iter()
            .any(|m| matches!(m, Message::Accept { .. })),
        "{a:?}"
    );
    let detail = aborted(&a, AbortReason::BadChunk);
    assert!(detail.contains("bad chunk 0"), "{detail}");
    wait_log(&dst, "incoming migration refused or aborted");
    let st = dst.json(&["migrate", "status", "--disk", DISK]);
    assert_eq!(st["phase"], "failed", "{st}");
    assert!(
        st["error"].as_str().unwrap().contains("bad chunk 0"),
        "{st}"
    );
    unchanged("bad chunk");

    // 3. A correct Hello and Offer, then a length prefix of 1 GiB.
    let mut bytes = hello(vec![PROTOCOL_V1]);
    bytes.extend(offer(g));
    bytes.extend((1u32 << 30).to_le_bytes());
    bytes.extend([0u8; 64]);
    let a = rogue.exchange(&addr, bytes);
    let detail = aborted(&a, AbortReason::Protocol);
    assert!(detail.contains("1073741824"), "{detail}");
    unchanged("oversized frame");
    wait_log(&dst, "1073741824");

    // 4. A correct Hello and Offer, then two bytes of a length prefix and silence: without a
    //    stall limit both ends would wait forever behind keep-alives.
    let mut bytes = hello(vec![PROTOCOL_V1]);
    bytes.extend(offer(g));
    bytes.extend([0x10, 0x00]);
    let t = std::time::Instant::now();
    let a = rogue.exchange(&addr, bytes);
    let detail = aborted(&a, AbortReason::Protocol);
    assert!(detail.contains("no data for 2000 ms"), "{detail}");
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    unchanged("stalled frame");
    wait_log(&dst, "no data for 2000 ms inside a frame");
}

/// A rogue source switches over to post-copy at once and then says nothing more, over a
/// connection kept alive: after `switchover_silence_ms` (4 s in the test agents) the
/// destination treats it as lost, keeps owning the disk as `incomplete` (the VM may run there),
/// and does not wait forever.
#[test]
fn silent_source_after_a_postcopy_switchover_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let (dst, rogue) = rogue_and_destination(dir.path());
    let g = Geometry::new(64 << 30, 4096).unwrap();
    let mut bytes = frame::encode(&Message::Hello(Hello {
        protocol_versions: BoundedVec::new(vec![PROTOCOL_V1]).unwrap(),
        features: features::POSTCOPY,
        host: BoundedString::new("rogue").unwrap(),
    }))
    .unwrap();
    let mut o = offer(g);
    // The same Offer with mode Postcopy (the last field: re-encode rather than patch bytes).
    if let Ok(Message::Offer(mut of)) = frame::decode_body(&o[frame::PREFIX..]) {
        of.mode = Mode::Postcopy;
        o = frame::encode(&Message::Offer(of)).unwrap();
    }
    bytes.extend(o);
    bytes.extend(
        frame::encode(&Message::Switchover(Switchover {
            epoch_next: 2,
            final_root: wire::Root([7; 32]),
            postcopy: true,
        }))
        .unwrap(),
    );
    let t = Instant::now();
    let a = rogue.exchange(&dst.listen_addr(), bytes);
    let waited = t.elapsed();
    assert!(
        a.messages
            .iter()
            .any(|m| matches!(m, Message::Accept { .. })),
        "{a:?}"
    );
    assert!(waited >= Duration::from_millis(3500), "{waited:?}");
    wait_log(&dst, "no word from the source during post-copy");
    let st = dst.json(&["migrate", "status", "--disk", DISK]);
    assert_eq!(st["phase"], "incomplete", "{st}");
    let show = dst.json(&["bitmap", "show", "--disk", DISK]);
    assert_eq!(show["state"], "incomplete", "{show}");
    assert_eq!(show["epoch"], 2, "{show}");
    alive(&dst);
}

/// A rogue destination that follows the protocol up to the switchover (Welcome, Accept with the
/// Offer's hash, RoundAck for every round) and then says nothing more, over a connection kept
/// alive. After `switchover_silence_ms` (4 s in the test agents) the source must give up, stay
/// out of ownership ("handed over", never `consistent` again), and keep running.
#[test]
fn silent_destination_after_the_switchover_leaves_the_source_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let src = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    create(&src, DISK, &["0:1M", "7G:64K"]);
    let rogue_dir = dir.path().join("rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    let rogue = Rogue::new(&rogue_dir, &ca);
    let ep = {
        let _guard = rogue.rt.enter();
        Endpoint::server(
            "127.0.0.1:0".parse().unwrap(),
            &rogue.id,
            TransportOptions::default(),
        )
        .unwrap()
    };
    let addr = ep.local_addr().unwrap().to_string();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<&'static str>();
    rogue.rt.spawn(async move {
        let conn = ep.accept().await.unwrap().establish().await.unwrap();
        let mut s = conn.accept_stream().await.unwrap();
        while let Ok(Some(body)) = s.recv_frame().await {
            let reply = match frame::decode_body(&body).unwrap() {
                Message::Hello(_) => Some(Message::Welcome(Welcome {
                    version: PROTOCOL_V1,
                    features: 0,
                })),
                Message::Offer(o) => Some(Message::Accept {
                    offer: offer_hash(&o),
                }),
                m @ (Message::Chunk(_) | Message::Delta(_)) => {
                    s.recv_payload(m.payload_len()).await.unwrap();
                    None
                }
                Message::RoundEnd { round, root } => Some(Message::RoundAck { round, root }),
                Message::Switchover(_) => {
                    let _ = seen_tx.send("switchover");
                    None
                }
                _ => None,
            };
            if let Some(m) = reply {
                s.send_frame(&frame::encode(&m).unwrap()[frame::PREFIX..])
                    .await
                    .unwrap();
            }
        }
        // Keep the connection (and its keep-alives) up until the runtime goes away.
        std::future::pending::<()>().await;
    });
    src.json(&[
        "migrate",
        "start",
        "--disk",
        DISK,
        "--to",
        &addr,
        "--server-name",
        "rogue",
    ]);
    let t = Instant::now();
    while src.json(&["migrate", "status", "--disk", DISK])["converged"] != true {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", src.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Returns once the switchover has left (the destination never commits).
    // Waits until the destination owns the disk or the migration ends: here, the latter.
    let sw = Instant::now();
    let _ = src.cli(&["migrate", "switchover", "--disk", DISK]);
    assert_eq!(
        seen_rx.recv_timeout(Duration::from_secs(10)),
        Ok("switchover")
    );
    let st = loop {
        let st = src.json(&["migrate", "status", "--disk", DISK]);
        if st["finished"] == true {
            break st;
        }
        assert!(
            sw.elapsed() < Duration::from_secs(20),
            "{st}\n{}",
            src.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(sw.elapsed() >= Duration::from_millis(3500), "{st}");
    assert!(st["outcome"].as_str().unwrap().contains("in doubt"), "{st}");
    wait_log(&src, "no word from the destination since the switchover");
    assert_ne!(st["outcome"], "migrated", "{st}");
    let show = src.json(&["bitmap", "show", "--disk", DISK]);
    assert_ne!(show["state"], "consistent", "{show}");
    assert_ne!(show["state"], "recording", "{show}");
    alive(&src);
}
