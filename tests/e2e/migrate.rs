//! Migration between two real `bitferry agent` processes over loopback QUIC with mutual TLS:
//! pre-copy with marks during rounds, post-copy with marks on the destination, and a source
//! SIGKILLed mid-post-copy.

use crate::common::{AgentProc, cluster_ca, seed};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::time::{Duration, Instant};
use wire::{Bitmap, Geometry};

const SIZE: u64 = 64 << 30; // 64 GiB at 4 KiB: 2 MiB of bitmap, 32 chunks
const GRAN: u64 = 4096;

struct Pair {
    _dir: tempfile::TempDir,
    src: AgentProc,
    dst: AgentProc,
    truth: Bitmap,
    rng: rand::rngs::StdRng,
}

fn pair(test: &str) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let src = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    let dst = AgentProc::start(&dir.path().join("b"), "host-b", &ca, "");
    Pair {
        _dir: dir,
        src,
        dst,
        truth: Bitmap::new(Geometry::new(SIZE, GRAN).unwrap()),
        rng: rand::rngs::StdRng::seed_from_u64(seed(test)),
    }
}

/// A handle that only talks to an agent, so writes can borrow the pair mutably.
struct AgentRef(std::path::PathBuf);

impl AgentRef {
    fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = crate::common::bitferry()
            .arg("--control")
            .arg(&self.0)
            .args(&full)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Pair {
    fn migrate_status(&self, on: &AgentProc) -> Value {
        on.json(&["migrate", "status", "--disk", "vm/d"])
    }

    fn wait(&self, on: &AgentProc, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let st = self.migrate_status(on);
            if done(&st) {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}: {st}\nsource log:\n{}\ndestination log:\n{}",
                self.src.log(),
                self.dst.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `n` writes of the VM, reported to the source or the destination agent and recorded in
    /// the ground truth.
    fn write_on(&mut self, dest: bool, n: usize) {
        let target = AgentRef(if dest {
            self.dst.control.clone()
        } else {
            self.src.control.clone()
        });
        let mut args = vec![
            "bitmap".to_string(),
            "mark".into(),
            "--disk".into(),
            "vm/d".into(),
        ];
        for _ in 0..n {
            let off = self.rng.random_range(0..SIZE - (1 << 20));
            let len = self.rng.random_range(1..(256 << 10));
            self.truth.mark(off, len).unwrap();
            args.push("--range".into());
            args.push(format!("{off}:{len}"));
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        target.json(&a);
    }
}

fn dirty_superset(show: &Value, truth: &Bitmap) -> bool {
    let mut got = Bitmap::new(truth.geometry());
    for e in show["extents"].as_array().unwrap() {
        got.mark(e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap())
            .unwrap();
    }
    truth.runs().all(|(a, b)| (a..b).all(|blk| got.is_set(blk)))
}

#[test]
fn precopy_with_marks_during_rounds_moves_ownership_with_the_same_root() {
    let mut p = pair("precopy_with_marks_during_rounds_moves_ownership_with_the_same_root");
    p.src.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/d",
        "--size",
        "64G",
        "--granularity",
        "4K",
        "--checkpoint",
        "b1",
    ]);
    p.write_on(false, 300);
    p.dst
        .json(&["expect", "--disk", "vm/d", "--from", "host-a"]);
    let to = p.dst.listen_addr();
    p.src
        .json(&["migrate", "start", "--disk", "vm/d", "--to", &to]);
    // The VM keeps writing while bulk and pre-copy rounds run.
    for _ in 0..10 {
        p.write_on(false, 20);
        std::thread::sleep(Duration::from_millis(30));
    }
    p.wait(&p.src, "convergence", |s| {
        s["converged"] == true || s["finished"] == true
    });
    // Pause the VM (no more writes), switch over.
    let done = p.src.json(&["migrate", "switchover", "--disk", "vm/d"]);
    assert_eq!(done["phase"], "completed", "{done}");
    assert!(done["rounds"].as_u64().unwrap() >= 2, "{done}");
    let mut truth = p.truth.clone();
    let want_root = truth.root().to_hex();
    assert_eq!(done["root"], want_root.as_str());
    assert_eq!(done["epoch"], 2);
    assert_eq!(
        done["state"], "consistent",
        "the report names the destination's state"
    );
    for k in [
        "rounds",
        "bytes_total",
        "bytes_during_switchover",
        "seconds",
        "root",
        "state",
    ] {
        assert!(!done[k].is_null(), "migrate report lacks {k}: {done}");
    }
    let d = p.dst.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_eq!(d["root"], want_root.as_str(), "destination root differs");
    assert_eq!(d["epoch"], 2);
    assert_eq!(d["state"], "recording");
    assert_eq!(d["checkpoint"], "b1");
    // The source retired its copy.
    let gone = p.src.cli(&["bitmap", "show", "--disk", "vm/d"]);
    assert!(!gone.status.success());
    let dst_status = p.wait(&p.dst, "destination finished", |s| s["finished"] == true);
    assert_eq!(dst_status["phase"], "completed");
}

#[test]
fn postcopy_with_marks_on_the_destination_ends_with_the_verified_union() {
    let mut p = pair("postcopy_with_marks_on_the_destination_ends_with_the_verified_union");
    p.src.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/d",
        "--size",
        "64G",
        "--granularity",
        "4K",
    ]);
    p.write_on(false, 300);
    p.dst.json(&["expect", "--disk", "vm/d"]);
    let to = p.dst.listen_addr();
    // A slow stream, so the switchover lands while the bulk is still running.
    p.src.json(&[
        "migrate", "start", "--disk", "vm/d", "--to", &to, "--rate", "1K",
    ]);
    std::thread::sleep(Duration::from_millis(200));
    p.src.json(&[
        "migrate",
        "switchover",
        "--disk",
        "vm/d",
        "--postcopy",
        "--no-wait",
    ]);
    p.wait(&p.src, "post-copy", |s| {
        s["phase"] == "post-copy" || s["finished"] == true
    });
    // The VM runs on the destination now: its writes are tracked there at once.
    // The source can no longer get a write to the destination: it must say so, not swallow it.
    let late = p
        .src
        .cli(&["bitmap", "mark", "--disk", "vm/d", "--range", "0:1"]);
    assert!(
        !late.status.success(),
        "a mark after switchover was accepted by the source"
    );
    assert!(String::from_utf8_lossy(&late.stderr).contains("NOT recorded"));
    p.wait(&p.dst, "destination in post-copy", |s| {
        assert_ne!(
            s["finished"], true,
            "the stream ended before the post-copy switchover: {s}"
        );
        s["phase"] == "post-copy"
    });
    for _ in 0..5 {
        p.write_on(true, 20);
    }
    let mid = p.dst.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_ne!(mid["state"], "consistent");
    let end = p.wait(&p.dst, "destination finished", |s| s["finished"] == true);
    assert_eq!(end["phase"], "completed", "{end}");
    let d = p.dst.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_eq!(d["state"], "recording");
    let mut truth = p.truth.clone();
    assert_eq!(
        d["root"],
        truth.root().to_hex().as_str(),
        "destination must hold source ∪ local marks"
    );
    assert!(dirty_superset(&d, &p.truth));
}

#[test]
fn source_killed_mid_postcopy_leaves_the_destination_incomplete_with_its_marks() {
    let mut p = pair("source_killed_mid_postcopy_leaves_the_destination_incomplete_with_its_marks");
    p.src.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/d",
        "--size",
        "64G",
        "--granularity",
        "4K",
    ]);
    p.write_on(false, 2000);
    p.dst.json(&["expect", "--disk", "vm/d"]);
    let to = p.dst.listen_addr();
    p.src.json(&[
        "migrate", "start", "--disk", "vm/d", "--to", &to, "--rate", "1K",
    ]);
    std::thread::sleep(Duration::from_millis(100));
    p.src.json(&[
        "migrate",
        "switchover",
        "--disk",
        "vm/d",
        "--postcopy",
        "--no-wait",
    ]);
    p.wait(&p.dst, "destination in post-copy", |s| {
        s["phase"] == "post-copy"
    });
    let before = p.truth.clone();
    p.write_on(true, 30);
    // What the destination recorded itself must survive the cut.
    let mut local_only = p.truth.clone();
    local_only.subtract(&before).unwrap();
    p.src.kill();
    let end = p.wait(&p.dst, "destination gives up on the source", |s| {
        s["finished"] == true
    });
    assert_eq!(end["phase"], "incomplete", "{end}");
    let d = p.dst.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_eq!(
        d["state"], "incomplete",
        "never consistent after a cut post-copy: {d}"
    );
    assert_eq!(d["epoch"], 2);
    assert!(
        dirty_superset(&d, &local_only),
        "the destination lost its own marks"
    );
    // The killed source's store never claims the disk either.
    let s = crate::common::json_in(&p.src.store, &["bitmap", "show", "--disk", "vm/d"]);
    assert_ne!(s["state"], "consistent", "{s}");
}
