//! Findings F4 and F5 of the hardening issue: a bitmap with more extents than one control reply
//! can carry is shown whole (paged through the agent, streamed by the CLI), and reading one
//! disk's large stored file for `verify` does not hold up another disk's marks.

use crate::common::{AgentProc, cluster_ca, json_in};
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// One request over a fresh connection; the whole response.
fn respond(sock: &std::path::Path, req: &serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp).unwrap();
    serde_json::from_str(&resp).unwrap()
}

/// One request that must succeed; its `result`.
fn call(sock: &std::path::Path, req: &serde_json::Value) -> serde_json::Value {
    let v = respond(sock, req);
    assert_eq!(v["ok"], true, "{req}: {v}");
    v["result"].clone()
}

/// 600,000 single-block extents: ~20 MB of JSON, more than a control reply may hold (16 MiB).
#[test]
fn show_of_more_extents_than_one_reply_holds_lists_every_extent() {
    const N: u64 = 600_000;
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let mut a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "frag",
        "--size",
        "1T",
        "--granularity",
        "4K",
    ]);
    // Every other block of the first 1.2 M blocks, in requests of 50,000 ranges.
    for batch in 0..N / 50_000 {
        let ranges: Vec<_> = (0..50_000u64)
            .map(|i| json!([(batch * 50_000 + i) * 2 * 4096, 1]))
            .collect();
        call(
            &a.control,
            &json!({"cmd": "mark", "disk": "frag", "ranges": ranges}),
        );
    }
    let check = |show: &serde_json::Value, how: &str| {
        let ext = show["extents"]
            .as_array()
            .unwrap_or_else(|| panic!("{how}: no extents"));
        assert_eq!(ext.len() as u64, N, "{how}: every extent listed");
        for (i, e) in ext.iter().enumerate() {
            assert_eq!(e["offset"], (i as u64) * 2 * 4096, "{how}: extent {i}");
            assert_eq!(e["length"], 4096, "{how}: extent {i}");
        }
        assert_eq!(show["dirty_blocks"], N, "{how}");
        assert!(show.get("next_offset").is_none(), "{how}: one document");
    };
    let show = a.json(&["bitmap", "show", "--disk", "frag"]);
    check(&show, "through the agent");
    // A single page is bounded, and names where the next one starts.
    let page = call(
        &a.control,
        &json!({"cmd": "show", "disk": "frag", "limit": 1000}),
    );
    assert_eq!(page["extents"].as_array().unwrap().len(), 1000);
    assert_eq!(page["next_offset"], 1000 * 2 * 4096);
    // A client that does not page is refused, never handed a partial list as the whole bitmap.
    let whole = respond(&a.control, &json!({"cmd": "show", "disk": "frag"}));
    assert_eq!(whole["ok"], false, "{whole}");
    let why = whole["error"].as_str().unwrap_or_default();
    assert!(why.contains("more than 250000 extents"), "{why}");
    assert!(a.terminate().success());
    check(
        &json_in(&a.store, &["bitmap", "show", "--disk", "frag"]),
        "on the store",
    );
}

/// While `verify` reads a 2 TiB disk's 64 MiB stored file, marks of another disk keep
/// completing. Before, verify held the agent's one lock for the whole read and every other
/// request waited.
#[test]
fn verifying_a_large_disk_does_not_hold_up_another_disks_marks() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    for (disk, size) in [("big", "2T"), ("small", "1G")] {
        a.json(&[
            "bitmap",
            "create",
            "--disk",
            disk,
            "--size",
            size,
            "--granularity",
            "4K",
        ]);
    }
    a.json(&["bitmap", "mark", "--disk", "big", "--range", "0:2T"]);
    // The first verify commits big's marks; the measured one only reads the file.
    a.json(&["bitmap", "verify", "--disk", "big"]);
    let control = a.control.clone();
    let verifier = std::thread::spawn(move || {
        let t0 = Instant::now();
        let v = call(&control, &json!({"cmd": "verify", "disk": "big"}));
        (t0, Instant::now(), v)
    });
    let mut done = Vec::new();
    let mut s = UnixStream::connect(&a.control).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut k = 0u64;
    while !verifier.is_finished() {
        let line = format!(
            "{}\n",
            json!({"cmd": "mark", "disk": "small", "ranges": [[(k % 1000) * 4096, 1]]})
        );
        s.write_all(line.as_bytes()).unwrap();
        let mut resp = String::new();
        r.read_line(&mut resp).unwrap();
        assert!(resp.contains("\"ok\":true"), "{resp}");
        done.push(Instant::now());
        k += 1;
    }
    let (t0, t1, v) = verifier.join().unwrap();
    assert_eq!(v["ok"], true, "{v}");
    // Marks that completed in the second half of the verify: none when verify holds the lock.
    let mid = t0 + (t1 - t0) / 2;
    let during = done.iter().filter(|t| **t > mid && **t < t1).count();
    eprintln!(
        "verify of 64 MiB took {:?}; {} marks of another disk, {during} in its second half",
        t1 - t0,
        done.len()
    );
    assert!(
        during > 0,
        "no mark of another disk completed during the second half of a {:?} verify",
        t1 - t0
    );
}
