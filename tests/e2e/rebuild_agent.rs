//! Rebuild jobs inside the agent: writers that mark through the control socket during the scan,
//! resume after SIGKILL, the automatic rebuild of a configured disk, and progress in `status`.
//! Randomised tests print their seed; `BITFERRY_TEST_SEED=N` replays one.

use crate::common::{AgentProc, bitferry, cluster_ca, json_in, seed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const G: u64 = 64 << 10;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A backup with random data in its first `data` bytes and a hole after; a live copy of it with
/// a few 4 KiB writes; a manifest of the backup. Returns the manifest's root.
fn images(rng: &mut StdRng, dir: &Path, data: u64) -> String {
    images_at(rng, dir, SIZE, data, "64K")
}

/// [`images`] with another image size and manifest granularity.
fn images_at(rng: &mut StdRng, dir: &Path, size: u64, data: u64, g: &str) -> String {
    let backup = File::create(dir.join("backup.img")).unwrap();
    backup.set_len(size).unwrap();
    let mut chunk = vec![0u8; MIB as usize];
    for off in (0..data).step_by(MIB as usize) {
        rng.fill(&mut chunk[..]);
        backup.write_all_at(&chunk, off).unwrap();
    }
    std::fs::copy(dir.join("backup.img"), dir.join("live.img")).unwrap();
    for _ in 0..8 {
        let off = rng.random_range(0..size - 4096);
        write_random(rng, &dir.join("live.img"), off);
    }
    let m = json_in(
        dir,
        &[
            "manifest",
            "create",
            "--image",
            s(&dir.join("backup.img")),
            "--granularity",
            g,
            "--out",
            s(&dir.join("backup.manifest")),
        ],
    );
    m["root"].as_str().expect("manifest root").to_string()
}

/// Overwrite 4 KiB at `off` with random bytes; returns the range written.
fn write_random(rng: &mut StdRng, live: &Path, off: u64) -> (u64, u64) {
    let f = OpenOptions::new().write(true).open(live).unwrap();
    let mut d = vec![0u8; 4096];
    rng.fill(&mut d[..]);
    f.write_all_at(&d, off).unwrap();
    (off, 4096)
}

/// Blocks whose bytes differ between the two images.
fn truth(dir: &Path) -> BTreeSet<u64> {
    truth_at(dir, G)
}

/// [`truth`] at granularity `g`.
fn truth_at(dir: &Path, g: u64) -> BTreeSet<u64> {
    let live = std::fs::read(dir.join("live.img")).unwrap();
    let backup = std::fs::read(dir.join("backup.img")).unwrap();
    live.chunks(g as usize)
        .zip(backup.chunks(g as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u64)
        .collect()
}

/// The blocks covered by a `bitmap show` report's extents.
fn blocks(v: &Value) -> BTreeSet<u64> {
    blocks_at(v, G)
}

/// [`blocks`] at granularity `g`.
fn blocks_at(v: &Value, g: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for e in v["extents"].as_array().expect("extents") {
        let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        out.extend(o / g..(o + l).div_ceil(g));
    }
    out
}

/// Poll `rebuild status --disk` until the job is no longer running.
fn wait_done(a: &AgentProc, disk: &str, within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let v = a.json(&["rebuild", "status", "--disk", disk]);
        if v["state"] != "running" {
            return v;
        }
        assert!(t.elapsed() < within, "rebuild still running: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Poll until the job has decided at least `bytes`.
fn wait_progress(a: &AgentProc, disk: &str, bytes: u64) -> Value {
    let t = Instant::now();
    loop {
        let v = a.json(&["rebuild", "status", "--disk", disk]);
        if v["done"].as_u64().unwrap() >= bytes || v["state"] != "running" {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no progress: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_args<'a>(dir: &'a Path, disk: &'a str, rate: &'a str) -> Vec<&'a str> {
    vec![
        "rebuild",
        "--disk",
        disk,
        "--image",
        s(dir.join("live.img").leak()),
        "--manifest",
        s(dir.join("backup.manifest").leak()),
        "--granularity",
        "64K",
        "--rate",
        rate,
    ]
}

#[test]
fn writes_marked_through_the_agent_during_its_rebuild_are_kept() {
    let seed = seed("rebuild_agent_writer");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = images(&mut rng, d, 48 * MIB);
    let ca = cluster_ca(&d.join("ca"));
    let a = AgentProc::start(&d.join("a"), "host-a", &ca, "");
    let started = a.json(&start_args(d, "vm/a", "16M"));
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(
        a.json(&["bitmap", "show", "--disk", "vm/a"])["state"],
        "rebuilding"
    );

    // The writer: writes behind the scan (which the scan cannot see) and ahead of it, each
    // reported through the agent after it lands.
    let mut marked = BTreeSet::new();
    let mut behind = 0;
    loop {
        let p = a.json(&["rebuild", "status", "--disk", "vm/a"]);
        if p["state"] != "running" || p["done"].as_u64().unwrap() > 40 * MIB {
            break;
        }
        let done = p["done"].as_u64().unwrap();
        let off = if rng.random_bool(0.5) && done > 4 * MIB {
            behind += 1;
            rng.random_range(0..done - 4096) & !4095
        } else {
            rng.random_range(done..SIZE - 4096) & !4095
        };
        let (o, l) = write_random(&mut rng, &d.join("live.img"), off);
        let r = format!("{o}:{l}");
        a.json(&["bitmap", "mark", "--disk", "vm/a", "--range", &r]);
        marked.insert(o / G);
        std::thread::sleep(Duration::from_millis(40));
    }
    assert!(behind > 0, "the writer never wrote behind the scan");
    let end = wait_done(&a, "vm/a", Duration::from_secs(15));
    assert_eq!(end["state"], "completed", "{end}");
    let r = &end["result"];
    assert!(r["marked_during_scan"].as_u64().unwrap() >= marked.len() as u64);
    assert_eq!(r["manifest_root"].as_str(), Some(root.as_str()), "{end}");
    assert_eq!(r["checkpoint"], "backup.manifest");

    let show = a.json(&["bitmap", "show", "--disk", "vm/a"]);
    assert_eq!(show["state"], "recording");
    assert_eq!(show["checkpoint"], "backup.manifest");
    let got = blocks(&show);
    let want = truth(d);
    assert!(
        want.is_subset(&got),
        "blocks that differ but are not dirty: {:?}",
        want.difference(&got).collect::<Vec<_>>()
    );
    assert!(marked.is_subset(&got));
    // Every write changed its block (random data), so nothing more than the truth is dirty.
    assert_eq!(got, want);
}

#[test]
fn a_killed_agent_resumes_its_rebuild_from_the_persisted_cursor() {
    let seed = seed("rebuild_agent_resume");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = images(&mut rng, d, 56 * MIB);
    let ca = cluster_ca(&d.join("ca"));
    let mut a = AgentProc::start(&d.join("a"), "host-a", &ca, "");
    a.json(&start_args(d, "vm/b", "16M"));
    let p = wait_progress(&a, "vm/b", 24 * MIB);
    assert_eq!(p["state"], "running", "{p}");
    // A write behind the scan, marked: the persisted partial result cannot hold it, only the
    // entry's committed marks can, which the resumed job must start from.
    let (o, l) = write_random(&mut rng, &d.join("live.img"), MIB + 8192);
    a.json(&[
        "bitmap",
        "mark",
        "--disk",
        "vm/b",
        "--range",
        &format!("{o}:{l}"),
    ]);
    // The state file is persisted every 0.5 s.
    std::thread::sleep(Duration::from_millis(700));
    a.kill();
    assert!(
        d.join("a/store/.rebuild/vm%2Fb.state").exists(),
        "no state file"
    );

    // Restarted, the agent resumes the job by itself (the state file records the reference).
    let a = AgentProc::start(&d.join("a"), "host-a", &ca, "");
    let end = wait_done(&a, "vm/b", Duration::from_secs(15));
    assert_eq!(end["state"], "completed", "{end}");
    assert_eq!(end["auto"], true);
    let r = &end["result"];
    let from = r["resumed_from"].as_u64().expect("resumed");
    let read = r["bytes_read"].as_u64().unwrap();
    eprintln!("resumed_from {from}, bytes_read {read} of {SIZE}");
    assert!(from > 0);
    assert!(
        read < SIZE && read <= SIZE - from,
        "read {read}, resumed at {from}"
    );
    assert_eq!(r["manifest_root"].as_str(), Some(root.as_str()));
    let show = a.json(&["bitmap", "show", "--disk", "vm/b"]);
    assert_eq!(show["state"], "recording");
    assert_eq!(blocks(&show), truth(d));
    assert!(!d.join("a/store/.rebuild/vm%2Fb.state").exists());
}

#[test]
fn a_configured_reference_rebuilds_a_bitmap_lost_in_a_crash() {
    let seed = seed("rebuild_agent_auto");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(&mut rng, d, 32 * MIB);
    let ca = cluster_ca(&d.join("ca"));
    let extra = format!(
        "[[reference]]\ndisk = \"vm/c\"\nimage = \"{}\"\nmanifest = \"{}\"\nrate = {}\n",
        s(&d.join("live.img")),
        s(&d.join("backup.manifest")),
        32 * MIB
    );
    let mut a = AgentProc::start(&d.join("a"), "host-a", &ca, &extra);
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/c",
        "--size",
        "64M",
        "--granularity",
        "64K",
    ]);
    a.json(&["bitmap", "mark", "--disk", "vm/c", "--range", "0:1"]);
    // The agent dies while recording; the VM keeps writing meanwhile, untracked.
    a.kill();
    for _ in 0..5 {
        let off = rng.random_range(0..SIZE - 4096);
        write_random(&mut rng, &d.join("live.img"), off);
    }
    let mut a = AgentProc::start(&d.join("a"), "host-a", &ca, &extra);
    let first = a.json(&["status"]);
    assert_eq!(first["rebuilds"][0]["disk"], "vm/c", "{first}");
    assert_eq!(first["rebuilds"][0]["auto"], true);
    let end = wait_done(&a, "vm/c", Duration::from_secs(15));
    assert_eq!(end["state"], "completed", "{end}");
    let show = a.json(&["bitmap", "show", "--disk", "vm/c"]);
    assert_eq!(show["state"], "recording");
    let want = truth(d);
    assert_eq!(blocks(&show), want);
    assert!(!want.contains(&0) || blocks(&show).contains(&0));
    // A clean stop leaves it consistent, with exactly those extents.
    assert!(a.terminate().success());
    let off = json_in(&a.store, &["bitmap", "show", "--disk", "vm/c"]);
    assert_eq!(off["state"], "consistent", "{off}");
    assert_eq!(blocks(&off), want);
}

#[test]
fn status_shows_progress_and_cancel_leaves_the_disk_untrusted() {
    let seed = seed("rebuild_agent_status");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(&mut rng, d, 48 * MIB);
    let ca = cluster_ca(&d.join("ca"));
    let a = AgentProc::start(&d.join("a"), "host-a", &ca, "");
    a.json(&start_args(d, "vm/d", "8M"));
    wait_progress(&a, "vm/d", MIB);
    std::thread::sleep(Duration::from_millis(300));
    let s1 = a.json(&["status"]);
    let j = &s1["rebuilds"][0];
    assert_eq!(j["disk"], "vm/d");
    assert_eq!(j["state"], "running");
    assert_eq!(j["total"], SIZE);
    let done = j["done"].as_u64().unwrap();
    assert!(done > 0 && done < SIZE, "{j}");
    assert!(j["rate"].as_f64().unwrap() > 0.0, "{j}");
    assert!(j["eta_seconds"].as_f64().unwrap() > 0.0, "{j}");
    eprintln!("status while running: {j}");
    // The limit holds (an upper bound: a loaded machine only makes it slower).
    assert!(j["rate"].as_f64().unwrap() <= 1.5 * (8 * MIB) as f64, "{j}");
    std::thread::sleep(Duration::from_millis(400));
    let s2 = a.json(&["status"]);
    assert!(s2["rebuilds"][0]["done"].as_u64().unwrap() > done);

    let c = a.json(&["rebuild", "cancel", "--disk", "vm/d"]);
    assert_eq!(c["state"], "cancelled", "{c}");
    let show = a.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_eq!(show["state"], "inconsistent");
    assert!(a.cli(&["bitmap", "verify", "--disk", "vm/d"]).status.code() == Some(3));

    // Run again to the end with --wait: it blocks until committed.
    let mut args = start_args(d, "vm/d", "1G");
    args.push("--wait");
    let w = a.json(&args);
    assert_eq!(w["state"], "completed", "{w}");
    let show = a.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_eq!(show["state"], "recording");
    assert_eq!(blocks(&show), truth(d));
    // Without an agent, status and cancel say so.
    let out = bitferry().args(["rebuild", "status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_clean_stop_pauses_the_rebuild_and_the_next_start_resumes_it() {
    let seed = seed("rebuild_agent_pause");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(&mut rng, d, 40 * MIB);
    let ca = cluster_ca(&d.join("ca"));
    let mut a = AgentProc::start(&d.join("a"), "host-a", &ca, "");
    a.json(&start_args(d, "vm/e", "16M"));
    let p = wait_progress(&a, "vm/e", 8 * MIB);
    assert_eq!(p["state"], "running", "{p}");
    assert!(a.terminate().success());
    // Never `consistent` while paused.
    let off = json_in(&a.store, &["bitmap", "show", "--disk", "vm/e"]);
    assert_eq!(off["state"], "rebuilding", "{off}");
    let a = AgentProc::start(&d.join("a"), "host-a", &ca, "");
    let end = wait_done(&a, "vm/e", Duration::from_secs(15));
    assert_eq!(end["state"], "completed", "{end}");
    assert!(end["result"]["resumed_from"].as_u64().expect("resumed") >= 8 * MIB);
    let show = a.json(&["bitmap", "show", "--disk", "vm/e"]);
    assert_eq!(show["state"], "recording");
    assert_eq!(blocks(&show), truth(d));
}

#[test]
fn a_cut_postcopy_is_rebuilt_by_the_destination_with_a_configured_reference() {
    let seed = seed("rebuild_agent_postcopy");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The tracked disk is large (64 GiB at 4 KiB: 2 MiB of bitmap in 32 chunks), so its bulk
    // takes long at 1 KiB/s and the post-copy can be cut; the rebuild then takes the live
    // image's geometry (16 MiB at the disk's 4 KiB).
    images_at(&mut rng, d, 16 * MIB, 8 * MIB, "4K");
    let ca = cluster_ca(&d.join("ca"));
    let mut src = AgentProc::start(&d.join("a"), "host-a", &ca, "");
    let extra = format!(
        "[[reference]]\ndisk = \"vm/p\"\nimage = \"{}\"\nmanifest = \"{}\"\n",
        s(&d.join("live.img")),
        s(&d.join("backup.manifest"))
    );
    let dst = AgentProc::start(&d.join("b"), "host-b", &ca, &extra);
    src.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/p",
        "--size",
        "64G",
        "--granularity",
        "4K",
    ]);
    let ranges: Vec<String> = (0..2000)
        .map(|_| format!("{}:65536", rng.random_range(0..63u64 << 30)))
        .collect();
    let mut args = vec!["bitmap", "mark", "--disk", "vm/p"];
    for r in &ranges {
        args.extend(["--range", r.as_str()]);
    }
    src.json(&args);
    dst.json(&["expect", "--disk", "vm/p"]);
    let to = dst.listen_addr();
    src.json(&[
        "migrate", "start", "--disk", "vm/p", "--to", &to, "--rate", "1K",
    ]);
    std::thread::sleep(Duration::from_millis(100));
    src.json(&[
        "migrate",
        "switchover",
        "--disk",
        "vm/p",
        "--postcopy",
        "--no-wait",
    ]);
    let t = Instant::now();
    while dst.json(&["migrate", "status", "--disk", "vm/p"])["phase"] != "post-copy" {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no post-copy: {}",
            dst.json(&["migrate", "status", "--disk", "vm/p"])
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    src.kill();
    // The destination gives up on the source, the disk is `incomplete`, and the configured
    // reference makes it rebuild by itself.
    let t = Instant::now();
    let job = loop {
        let st = dst.json(&["status"]);
        if let Some(j) = st["rebuilds"].as_array().and_then(|a| a.first()) {
            break j.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no rebuild: {st}\n{}",
            dst.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(job["disk"], "vm/p");
    assert_eq!(job["auto"], true);
    let end = wait_done(&dst, "vm/p", Duration::from_secs(15));
    assert_eq!(end["state"], "completed", "{end}");
    let show = dst.json(&["bitmap", "show", "--disk", "vm/p"]);
    assert_eq!(show["state"], "recording", "{show}");
    assert_eq!(show["size"], 16 * MIB);
    assert_eq!(blocks_at(&show, 4096), truth_at(d, 4096));
}

#[test]
fn an_unreadable_file_takes_the_references_geometry() {
    let seed = seed("rebuild_agent_unreadable");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = images(&mut rng, d, 8 * MIB);
    let ca = cluster_ca(&d.join("ca"));
    // A store file whose header does not decode: no geometry, no granularity.
    std::fs::create_dir_all(d.join("a/store")).unwrap();
    std::fs::write(d.join("a/store/vm%2Ff.bfb"), b"not a bitmap file at all").unwrap();
    let extra = format!(
        "[[reference]]\ndisk = \"vm/f\"\nimage = \"{}\"\nmanifest = \"{}\"\n",
        s(&d.join("live.img")),
        s(&d.join("backup.manifest"))
    );
    let a = AgentProc::start(&d.join("a"), "host-a", &ca, &extra);
    let end = wait_done(&a, "vm/f", Duration::from_secs(15));
    assert_eq!(end["state"], "completed", "{end}");
    assert_eq!(end["result"]["manifest_root"].as_str(), Some(root.as_str()));
    let show = a.json(&["bitmap", "show", "--disk", "vm/f"]);
    assert_eq!(show["state"], "recording");
    assert_eq!(
        (show["size"].as_u64(), show["granularity"].as_u64()),
        (Some(SIZE), Some(G))
    );
    assert_eq!(blocks(&show), truth(d));
}
