//! A full store is a transient condition, never lost tracking (findings F6 and F7 of the
//! hardening issue). Each agent's store sits on its own small tmpfs that the test fills up with
//! a filler file and later frees; the disk is what runs out, exactly as it would in production.
//! Mounting needs root (CI runs as root); the test says so if it cannot.

use crate::common::{AgentProc, blocks_missing, cluster_ca};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wire::{Bitmap, Geometry};

const SIZE: u64 = 64 << 30;
const GRAN: u64 = 4096;

/// A tmpfs mounted at a directory for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill a store and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Fill what is left with a filler file; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let block = vec![0xa5u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        // Page-sized leftovers too, so even a small store file cannot be written.
        while f.write_all(&block[..512]).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn wait(agent: &AgentProc, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let st = agent.json(&["migrate", "status", "--disk", "vm/d"]);
        if done(&st) {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}: {st}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn extents_cover(show: &Value, truth: &Bitmap) -> bool {
    blocks_missing(show["extents"].as_array().expect("extents"), truth) == 0
}

fn mark(agent: &AgentProc, truth: &mut Bitmap, off: u64, len: u64) -> std::process::Output {
    let out = agent.cli(&[
        "bitmap",
        "mark",
        "--disk",
        "vm/d",
        "--range",
        &format!("{off}:{len}"),
    ]);
    if out.status.success() {
        truth.mark(off, len).unwrap();
    }
    out
}

/// F7: the source's store is full when the switchover comes. The hand-over cannot be made
/// durable, so the switchover is withdrawn: the source still owns the disk, takes marks, and
/// once space returns the same migration switches over and carries every mark.
#[test]
fn a_full_source_store_withdraws_the_switchover_and_keeps_tracking() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let fs = Tmpfs::mount(&dir.path().join("a/store"), "4m");
    let a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    let b = AgentProc::start(&dir.path().join("b"), "host-b", &ca, "");
    let mut truth = Bitmap::new(Geometry::new(SIZE, GRAN).unwrap());
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/d",
        "--size",
        "64G",
        "--granularity",
        "4K",
    ]);
    for k in 0..50u64 {
        assert!(mark(&a, &mut truth, k * (1 << 30), 8192).status.success());
    }
    b.json(&["expect", "--disk", "vm/d", "--from", "host-a"]);
    a.json(&[
        "migrate",
        "start",
        "--disk",
        "vm/d",
        "--to",
        &b.listen_addr(),
    ]);
    wait(&a, "convergence", |s| s["converged"] == true);
    let filler = fs.fill();
    let out = a.cli(&["migrate", "switchover", "--disk", "vm/d"]);
    assert!(
        !out.status.success(),
        "a switchover whose hand-over cannot be recorded must fail"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("withdrawn") && err.to_lowercase().contains("no space"),
        "the error names the cause: {err}"
    );
    // Still the owner: marks are accepted (in memory; the store cannot take them yet).
    for k in 0..20u64 {
        let out = mark(&a, &mut truth, k * (1 << 30) + (1 << 20), 4096);
        assert!(
            out.status.success(),
            "mark refused after a withdrawn switchover: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let show = a.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_eq!(show["state"], "recording", "{show}");
    assert!(extents_cover(&show, &truth));
    let st = a.json(&["migrate", "status", "--disk", "vm/d"]);
    assert_eq!(st["finished"], false, "the migration goes on: {st}");
    // Space returns: the same migration switches over and carries everything.
    std::fs::remove_file(filler).unwrap();
    wait(&a, "convergence after the new marks", |s| {
        s["converged"] == true
    });
    let done = a.json(&["migrate", "switchover", "--disk", "vm/d"]);
    assert_eq!(done["phase"], "completed", "{done}");
    let show = b.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_eq!(show["state"], "recording", "{show}");
    assert_eq!(show["epoch"], 2);
    assert!(
        extents_cover(&show, &truth),
        "marks lost across the full store"
    );
}

/// F6: post-copy into a destination whose store is full. The destination owns the disk from
/// the switchover whatever its store says: it keeps the bitmap in memory as `incomplete`, takes
/// marks, and writes it once space returns. Nothing is ever `consistent` without being durable.
#[test]
fn postcopy_into_a_full_store_keeps_the_owned_bitmap_and_its_marks() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let fs = Tmpfs::mount(&dir.path().join("b/store"), "4m");
    let a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    let b = AgentProc::start(&dir.path().join("b"), "host-b", &ca, "");
    let mut truth = Bitmap::new(Geometry::new(SIZE, GRAN).unwrap());
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/d",
        "--size",
        "64G",
        "--granularity",
        "4K",
    ]);
    for k in 0..50u64 {
        assert!(mark(&a, &mut truth, k * (1 << 30), 8192).status.success());
    }
    b.json(&["expect", "--disk", "vm/d", "--from", "host-a"]);
    let filler = fs.fill();
    a.json(&[
        "migrate",
        "start",
        "--disk",
        "vm/d",
        "--to",
        &b.listen_addr(),
    ]);
    wait(&a, "convergence", |s| s["converged"] == true);
    // The source hears that the destination could not write, but owns nothing any more.
    let _ = a.cli(&["migrate", "switchover", "--disk", "vm/d", "--postcopy"]);
    let src = wait(&a, "the source to finish", |s| s["finished"] == true);
    assert_eq!(src["state"], "incomplete", "{src}");
    let end = wait(&b, "the destination to finish", |s| s["finished"] == true);
    assert_eq!(end["phase"], "incomplete", "{end}");
    // The VM runs here now: the destination holds the bitmap and records its writes.
    for k in 0..20u64 {
        let out = mark(&b, &mut truth, k * (1 << 30) + (2 << 20), 4096);
        assert!(
            out.status.success(),
            "the owner refused a mark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let show = b.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_eq!(show["state"], "incomplete", "never consistent: {show}");
    assert_eq!(show["epoch"], 2);
    assert!(
        show["reason"].as_str().unwrap_or("").contains("space"),
        "the reason names the full store: {show}"
    );
    assert!(extents_cover(&show, &truth), "the owned bitmap lost bits");
    // Space returns: the flusher writes the owned bitmap, still incomplete, with every mark.
    std::fs::remove_file(filler).unwrap();
    let t = Instant::now();
    loop {
        let v = b.cli(&["bitmap", "verify", "--disk", "vm/d"]);
        // `verify` flushes first and then checks the stored file against the live bitmap: it
        // answers "not consistent" (exit 3) once the file is there and matches.
        let err = String::from_utf8_lossy(&v.stderr).to_string();
        if err.contains("incomplete") && !err.contains("does not match") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the owned bitmap never reached the store: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
