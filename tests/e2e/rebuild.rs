//! `bitferry manifest create` and `bitferry rebuild`: exactness against the bytes, writers that
//! mark during a rebuild, refusal of bad references, and resume after SIGKILL.
//! Randomised tests print their seed; `BITFERRY_REBUILD_E2E_SEED=N` replays one.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::bitferry;

fn run(args: &[&str]) -> Output {
    bitferry().args(args).output().expect("spawn bitferry")
}

fn json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "bitferry {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The extents (offset, length) of the blocks whose bytes differ, merged and clipped.
fn truth(live: &[u8], reference: &[u8], g: usize) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in 0..live.len().div_ceil(g) {
        let end = ((b + 1) * g).min(live.len());
        let a = &live[b * g..end];
        let r = reference
            .get(b * g..((b + 1) * g).min(reference.len()))
            .unwrap_or(&[]);
        if a != r {
            match out.last_mut() {
                Some((o, l)) if *o + *l == (b * g) as u64 => *l = end as u64 - *o,
                _ => out.push(((b * g) as u64, (end - b * g) as u64)),
            }
        }
    }
    out
}

fn extents(v: &Value) -> Vec<(u64, u64)> {
    v["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn seeds(n: u64) -> Vec<u64> {
    match std::env::var("BITFERRY_REBUILD_E2E_SEED") {
        Ok(v) => vec![v.parse().expect("seed is a number")],
        Err(_) => {
            let base: u64 = rand::random::<u32>().into();
            (base..base + n).collect()
        }
    }
}

/// A sparse image: data extents (4 KiB aligned) between holes, so holes lie on either side.
fn sparse_image(rng: &mut StdRng, path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for _ in 0..rng.random_range(1..5) {
        let off = rng.random_range(0..size) & !4095;
        let len = rng.random_range(1..=(size - off).min(1 << 20));
        let mut d = vec![0u8; len as usize];
        rng.fill(&mut d[..]);
        f.write_all_at(&d, off).unwrap();
    }
}

/// Copy `src` to `dst` sparsely: zero 4 KiB blocks become holes, and about 2% of the data
/// blocks are left out too (holes in the live image where the backup has data).
fn sparse_copy(rng: &mut StdRng, src: &Path, dst: &Path) {
    let data = std::fs::read(src).unwrap();
    let f = File::create(dst).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for (k, chunk) in data.chunks(4096).enumerate() {
        if chunk.iter().any(|b| *b != 0) && !rng.random_bool(0.02) {
            f.write_all_at(chunk, k as u64 * 4096).unwrap();
        }
    }
}

fn modify(rng: &mut StdRng, path: &Path, g: u64) {
    let f = OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let size = f.metadata().unwrap().len();
    for _ in 0..rng.random_range(1..6) {
        let (off, len) = match rng.random_range(0..4) {
            0 => (rng.random_range(0..size), 1),
            1 => {
                let b = rng.random_range(0..size.div_ceil(g));
                (b * g, g.min(size - b * g))
            }
            2 => {
                // across a block border
                let border = (rng.random_range(1..size.div_ceil(g).max(2)) * g).min(size - 1);
                let from = border.saturating_sub(rng.random_range(1..=g.min(3000)));
                (from, (border + 100).min(size) - from)
            }
            _ => (size - 1, 1), // the (partial) last block
        };
        let mut d = vec![0u8; len as usize];
        f.read_exact_at(&mut d, off).unwrap();
        let i = rng.random_range(0..d.len());
        d[i] ^= 0x81;
        f.write_all_at(&d, off).unwrap();
    }
}

#[test]
fn rebuild_reports_exactly_the_differing_blocks() {
    let grans = [512u64, 4096, 65536, 1 << 20, 64 << 20];
    for seed in seeds(6) {
        println!("seed {seed} (replay: BITFERRY_REBUILD_E2E_SEED={seed})");
        let mut rng = StdRng::seed_from_u64(seed);
        // Consecutive seeds walk through every granularity.
        let g = grans[(seed % grans.len() as u64) as usize];
        // Sizes that are rarely a multiple of the granularity.
        let size = rng.random_range(1..=(4u64 << 20));
        let dir = tempfile::tempdir().unwrap();
        let (backup, live, man) = (
            dir.path().join("backup"),
            dir.path().join("live"),
            dir.path().join("backup.manifest"),
        );
        sparse_image(&mut rng, &backup, size);
        sparse_copy(&mut rng, &backup, &live);
        modify(&mut rng, &live, g);
        let expect = truth(
            &std::fs::read(&live).unwrap(),
            &std::fs::read(&backup).unwrap(),
            g as usize,
        );
        let gs = g.to_string();
        let m = json(&[
            "--json",
            "manifest",
            "create",
            "--image",
            s(&backup),
            "--granularity",
            &gs,
            "--out",
            s(&man),
        ]);
        assert_eq!(m["blocks"].as_u64(), Some(size.div_ceil(g)));
        for reference in ["--manifest", "--backup"] {
            let r = if reference == "--manifest" {
                &man
            } else {
                &backup
            };
            let v = json(&[
                "--json",
                "rebuild",
                "--image",
                s(&live),
                reference,
                s(r),
                "--granularity",
                &gs,
            ]);
            assert_eq!(
                extents(&v),
                expect,
                "seed {seed} g {g} size {size} {reference}"
            );
            assert_eq!(v["size"].as_u64(), Some(size));
            assert!(v["bytes_read"].as_u64().is_some() && v["seconds"].as_f64().is_some());
        }
    }
}

#[test]
fn size_mismatch_marks_the_tail_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (backup, live) = (dir.path().join("b"), dir.path().join("l"));
    std::fs::write(&backup, vec![7u8; 100_000]).unwrap();
    std::fs::write(&live, vec![7u8; 300_000]).unwrap();
    let v = json(&[
        "--json",
        "rebuild",
        "--image",
        s(&live),
        "--backup",
        s(&backup),
        "--granularity",
        "64K",
    ]);
    // Block 1 (65536..131072) is partial in the backup: dirty; all after it too.
    assert_eq!(extents(&v), vec![(65536, 300_000 - 65536)]);
    assert_eq!(v["size_mismatch"]["live"].as_u64(), Some(300_000));
    assert_eq!(v["size_mismatch"]["reference"].as_u64(), Some(100_000));
}

#[test]
fn bad_references_are_refused_before_any_scan() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (img, man) = (dir.path().join("img"), dir.path().join("m"));
    let mut data = vec![0u8; 1 << 20];
    StdRng::seed_from_u64(5).fill(&mut data[..]);
    std::fs::write(&img, &data).unwrap();
    // The manifest of a backup with the same bytes (one of `img` itself is refused outright).
    let backup = dir.path().join("backup");
    std::fs::write(&backup, &data).unwrap();
    json(&[
        "--json",
        "manifest",
        "create",
        "--image",
        s(&backup),
        "--granularity",
        "4K",
        "--out",
        s(&man),
    ]);
    json(&[
        "--json",
        "--store",
        s(&store),
        "bitmap",
        "create",
        "--disk",
        "vm/a",
        "--size",
        "1M",
        "--granularity",
        "4K",
    ]);
    json(&[
        "--json",
        "--store",
        s(&store),
        "bitmap",
        "mark",
        "--disk",
        "vm/a",
        "--range",
        "0:1",
    ]);
    let before = json(&[
        "--json",
        "--store",
        s(&store),
        "bitmap",
        "show",
        "--disk",
        "vm/a",
    ]);
    let good = std::fs::read(&man).unwrap();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut flipped = good.clone();
    let in_entries = good.len() - 40;
    flipped[in_entries] ^= 1;
    cases.push(("hash", flipped, "root does not match"));
    let mut identity = good.clone();
    identity[72 + 3] ^= 1;
    cases.push(("identity", identity, "identity"));
    cases.push(("truncated", good[..good.len() - 32].to_vec(), "truncated"));
    let mut size = good.clone();
    size[16..24].copy_from_slice(&(2u64 << 20).to_le_bytes());
    cases.push(("size", size, "blocks"));
    let mut gran = good.clone();
    gran[24..32].copy_from_slice(&3000u64.to_le_bytes());
    cases.push(("granularity", gran, "granularity"));
    for (what, bytes, msg) in cases {
        let bad = dir.path().join(format!("bad-{what}"));
        std::fs::write(&bad, bytes).unwrap();
        let out = run(&[
            "--store",
            s(&store),
            "rebuild",
            "--image",
            s(&img),
            "--manifest",
            s(&bad),
            "--granularity",
            "4K",
            "--disk",
            "vm/a",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(
            err.contains(msg) && err.contains("manifest"),
            "{what}: unclear error: {err}"
        );
    }
    // A good manifest at another granularity, an empty backup, a missing backup.
    let out = run(&[
        "--store",
        s(&store),
        "rebuild",
        "--image",
        s(&img),
        "--manifest",
        s(&man),
        "--granularity",
        "64K",
        "--disk",
        "vm/a",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("granularity 4096"));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    for b in [empty, dir.path().join("missing")] {
        let out = run(&[
            "--store",
            s(&store),
            "rebuild",
            "--image",
            s(&img),
            "--backup",
            s(&b),
            "--granularity",
            "4K",
            "--disk",
            "vm/a",
        ]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(s(&b)));
    }
    // Nothing touched the store.
    let after = json(&[
        "--json",
        "--store",
        s(&store),
        "bitmap",
        "show",
        "--disk",
        "vm/a",
    ]);
    assert_eq!(before, after);
}

/// Mark through the CLI, retrying while another command (the rebuild's last step) holds the
/// store.
fn mark(store: &Path, disk: &str, off: u64, len: u64) -> String {
    let range = format!("{off}:{len}");
    let t = Instant::now();
    loop {
        let out = run(&[
            "--json",
            "--store",
            s(store),
            "bitmap",
            "mark",
            "--disk",
            disk,
            "--range",
            &range,
        ]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
            return v["state"].as_str().unwrap_or_default().to_string();
        }
        assert_eq!(
            out.status.code(),
            Some(4),
            "mark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "store locked for 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_for_state(store: &Path, disk: &str, state: &str) {
    let t = Instant::now();
    loop {
        let out = run(&[
            "--json",
            "--store",
            s(store),
            "bitmap",
            "show",
            "--disk",
            disk,
        ]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["state"] == state {
                return;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{disk} never became {state}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn writes_marked_during_a_rebuild_are_in_the_result() {
    for seed in seeds(1) {
        println!("seed {seed} (replay: BITFERRY_REBUILD_E2E_SEED={seed})");
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let (backup, live) = (dir.path().join("backup"), dir.path().join("live"));
        let size = 12u64 << 20;
        let g = 65536u64;
        let mut data = vec![0u8; size as usize];
        rng.fill(&mut data[..]);
        std::fs::write(&backup, &data).unwrap();
        for _ in 0..20 {
            let i = rng.random_range(0..data.len());
            data[i] ^= 1;
        }
        std::fs::write(&live, &data).unwrap();
        // Reads 24 MiB (live + backup) at 8 MiB/s: about 3 s of scan.
        let mut child = bitferry()
            .args([
                "--json",
                "--store",
                s(&store),
                "rebuild",
                "--image",
                s(&live),
                "--backup",
                s(&backup),
            ])
            .args(["--granularity", "64K", "--disk", "vm/w", "--rate", "8M"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_state(&store, "vm/w", "rebuilding");
        // The writer: write, then report the write with `bitmap mark`, while the scan runs.
        let f = OpenOptions::new().write(true).open(&live).unwrap();
        let mut writes = 0;
        let mut during = 0;
        let mut marked_rebuilding = 0;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(2500) {
            let off = rng.random_range(0..size);
            let len = rng.random_range(1..=(size - off).min(3 * g));
            let mut d = vec![0u8; len as usize];
            rng.fill(&mut d[..]);
            f.write_all_at(&d, off).unwrap();
            let state = mark(&store, "vm/w", off, len);
            writes += 1;
            if child.try_wait().unwrap().is_none() {
                during += 1;
            }
            if state == "rebuilding" {
                marked_rebuilding += 1;
            }
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            during > 3,
            "only {during} of {writes} writes landed during the scan"
        );
        assert!(v["marked_during_scan"].as_u64().unwrap() > 0);
        assert!(
            marked_rebuilding > 0,
            "bitmap mark kept the rebuilding state"
        );
        let shown = json(&[
            "--json",
            "--store",
            s(&store),
            "bitmap",
            "show",
            "--disk",
            "vm/w",
        ]);
        assert_eq!(shown["state"], "consistent");
        assert_eq!(shown["checkpoint"], "backup");
        let have: Vec<(u64, u64)> = extents(&shown);
        let covered = |o: u64, l: u64| have.iter().any(|(a, b)| *a <= o && o + l <= a + b);
        let expect = truth(
            &std::fs::read(&live).unwrap(),
            &std::fs::read(&backup).unwrap(),
            g as usize,
        );
        for (o, l) in &expect {
            for blk in (*o..o + l).step_by(g as usize) {
                assert!(
                    covered(blk, 1),
                    "seed {seed}: differing block at {blk} missing from the bitmap"
                );
            }
        }
        println!(
            "{writes} writes, {during} during the scan; {} differing extents all covered",
            expect.len()
        );
    }
}

#[test]
fn killed_rebuild_resumes_from_its_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (backup, live, man, state) = (
        dir.path().join("backup"),
        dir.path().join("live"),
        dir.path().join("m"),
        dir.path().join("rebuild.state"),
    );
    let size = 24u64 << 20;
    let mut data = vec![0u8; size as usize];
    StdRng::seed_from_u64(9).fill(&mut data[..]);
    std::fs::write(&backup, &data).unwrap();
    for k in 0..24 {
        data[k * (1 << 20) + 12345] ^= 0xff;
    }
    std::fs::write(&live, &data).unwrap();
    json(&[
        "--json",
        "manifest",
        "create",
        "--image",
        s(&backup),
        "--granularity",
        "64K",
        "--out",
        s(&man),
    ]);
    let args = [
        "--json",
        "--store",
        s(&store),
        "rebuild",
        "--image",
        s(&live),
        "--manifest",
        s(&man),
        "--granularity",
        "64K",
        "--disk",
        "vm/k",
        "--state",
        s(&state),
    ];
    // 24 MiB at 4 MiB/s: about 6 s. Kill it once some progress is persisted.
    let mut child = bitferry()
        .args(args)
        .args(["--rate", "4M"])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !state.exists() || t.elapsed() < Duration::from_millis(2500) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no state file written"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let shown = json(&[
        "--json",
        "--store",
        s(&store),
        "bitmap",
        "show",
        "--disk",
        "vm/k",
    ]);
    assert_eq!(
        shown["state"], "rebuilding",
        "a killed rebuild leaves the entry untrusted"
    );
    let v = json(&args);
    let resumed = v["resumed_from"].as_u64().expect("resumed_from");
    assert!(resumed > 0 && resumed < size, "resumed_from {resumed}");
    assert_eq!(
        v["bytes_read"].as_u64(),
        Some(size - resumed),
        "only the rest is read"
    );
    assert_eq!(
        extents(&v),
        truth(&data, &std::fs::read(&backup).unwrap(), 65536)
    );
    assert_eq!(v["state"], "consistent");
    assert!(!state.exists(), "state file removed once committed");
    let _: PathBuf = state;
}

#[test]
fn rebuild_replaces_an_untrusted_entry_and_keeps_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (backup, live) = (dir.path().join("b"), dir.path().join("l"));
    std::fs::write(&backup, vec![1u8; 1 << 20]).unwrap();
    let mut l = vec![1u8; 1 << 20];
    l[300_000] = 2;
    std::fs::write(&live, &l).unwrap();
    json(&[
        "--json",
        "--store",
        s(&store),
        "bitmap",
        "create",
        "--disk",
        "vm/c",
        "--size",
        "1M",
        "--granularity",
        "64K",
        "--checkpoint",
        "backup-7",
    ]);
    // Damage the stored file: the entry becomes inconsistent.
    let file = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "bfb"))
        .expect("store file");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let shown = json(&[
        "--json",
        "--store",
        s(&store),
        "bitmap",
        "show",
        "--disk",
        "vm/c",
    ]);
    assert_eq!(shown["state"], "inconsistent");
    let v = json(&[
        "--json",
        "--store",
        s(&store),
        "rebuild",
        "--image",
        s(&live),
        "--backup",
        s(&backup),
        "--granularity",
        "64K",
        "--disk",
        "vm/c",
    ]);
    assert_eq!(v["state"], "consistent");
    assert_eq!(v["checkpoint"], "backup-7");
    assert_eq!(v["epoch"], 1);
    assert_eq!(extents(&v), vec![(262_144, 65_536)]);
    let out = run(&["--store", s(&store), "bitmap", "verify", "--disk", "vm/c"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
