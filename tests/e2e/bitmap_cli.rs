//! The offline bitmap commands: contract fields, root = BLAKE3 of the export, errors, and what a
//! corrupt or truncated store file does.

use crate::common::{json_in, run_in, seed};
use rand::{Rng, SeedableRng};

#[test]
fn show_reports_the_contract_fields_and_export_hashes_to_root() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    json_in(
        &store,
        &[
            "bitmap",
            "create",
            "--disk",
            "vm42/vda",
            "--size",
            "10G",
            "--granularity",
            "4K",
            "--checkpoint",
            "b1",
        ],
    );
    let m = json_in(
        &store,
        &[
            "bitmap",
            "mark",
            "--disk",
            "vm42/vda",
            "--range",
            "0:1",
            "--range",
            "8191:2",
            "--range",
            "10239M:1M",
        ],
    );
    assert_eq!(m["newly_dirty_blocks"], 1 + 2 + 256);
    let v = json_in(&store, &["bitmap", "show", "--disk", "vm42/vda"]);
    for k in [
        "disk",
        "size",
        "granularity",
        "state",
        "epoch",
        "checkpoint",
        "dirty_blocks",
        "root",
        "extents",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    assert_eq!(v["state"], "consistent");
    assert_eq!(v["checkpoint"], "b1");
    assert_eq!(v["dirty_blocks"], 259); // 0:1 and 8191:2 touch blocks 0, 1, 2: one extent
    assert_eq!(
        v["extents"],
        serde_json::json!([
            {"offset": 0, "length": 12288},
            {"offset": 10239u64 << 20, "length": 1u64 << 20}
        ])
    );
    let raw = dir.path().join("vda.raw");
    json_in(
        &store,
        &[
            "bitmap",
            "export",
            "--disk",
            "vm42/vda",
            "--raw",
            raw.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(
        bytes.len(),
        (10u64 << 30).div_ceil(4096).div_ceil(8) as usize
    );
    // What `b3sum FILE` prints.
    assert_eq!(
        blake3::hash(&bytes).to_hex().as_str(),
        v["root"].as_str().unwrap()
    );
    assert!(
        run_in(&store, &["bitmap", "verify", "--disk", "vm42/vda"])
            .status
            .success()
    );
}

#[test]
fn clear_errors_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let fails = |args: &[&str], code: i32, needle: &str| {
        let out = run_in(&store, args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    };
    fails(
        &[
            "bitmap",
            "create",
            "--disk",
            "d",
            "--size",
            "1G",
            "--granularity",
            "3000",
        ],
        1,
        "not a power of two",
    );
    fails(
        &[
            "bitmap",
            "create",
            "--disk",
            "d",
            "--size",
            "1G",
            "--granularity",
            "256",
        ],
        1,
        "512 B",
    );
    fails(
        &[
            "bitmap",
            "create",
            "--disk",
            "d",
            "--size",
            "1G",
            "--granularity",
            "128M",
        ],
        1,
        "64 MiB",
    );
    fails(
        &["bitmap", "create", "--disk", "d", "--size", "lots"],
        2,
        "not a size",
    );
    fails(&["bitmap", "show", "--disk", "nope"], 1, "does not exist");
    json_in(
        &store,
        &[
            "bitmap",
            "create",
            "--disk",
            "d",
            "--size",
            "1M",
            "--granularity",
            "64K",
        ],
    );
    fails(
        &["bitmap", "create", "--disk", "d", "--size", "1M"],
        1,
        "already exists",
    );
    fails(
        &["bitmap", "show", "--disk", "nope"],
        1,
        "no bitmap for disk",
    );
    fails(
        &["bitmap", "mark", "--disk", "d", "--range", "1M:1"],
        1,
        "past the disk size",
    );
    // A bad range among good ones changes nothing.
    fails(
        &[
            "bitmap", "mark", "--disk", "d", "--range", "0:1", "--range", "2M:1",
        ],
        1,
        "past the disk size",
    );
    assert_eq!(
        json_in(&store, &["bitmap", "show", "--disk", "d"])["dirty_blocks"],
        0
    );
    // A store held by another process is refused with exit code 4.
    let _held = agent::store::Store::open(&store, agent::store::Access::ReadWrite).unwrap();
    fails(
        &["bitmap", "mark", "--disk", "d", "--range", "0:1"],
        4,
        "locked",
    );
    fails(&["bitmap", "show", "--disk", "d"], 4, "locked");
}

/// Flip single bytes everywhere in a stored file and truncate it: every damaged file must load as
/// `inconsistent` (in-process for every byte; through the real binary for a sample).
#[test]
fn any_flipped_byte_or_truncation_is_inconsistent() {
    let seed = seed("any_flipped_byte_or_truncation_is_inconsistent");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    // 4 chunks: a sparse one (roaring), a dense noisy one (raw), empty ones (zero), a short tail.
    json_in(
        &store,
        &[
            "bitmap",
            "create",
            "--disk",
            "vm/x",
            "--size",
            "3900M",
            "--granularity",
            "2K",
        ],
    );
    let mut args = vec![
        "bitmap".to_string(),
        "mark".into(),
        "--disk".into(),
        "vm/x".into(),
    ];
    for _ in 0..300 {
        let off = rng.random_range(0..1000u64 << 20);
        args.push("--range".into());
        args.push(format!("{off}:{}", rng.random_range(1..100_000)));
    }
    for i in 0..64u64 {
        args.push("--range".into());
        args.push(format!(
            "{}:{}",
            (3000u64 << 20) + i * 1_000_000,
            rng.random_range(1..20_000)
        ));
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    json_in(&store, &a);
    let file = store.join(agent::store::file_name(&"vm/x".parse().unwrap()));
    let pristine = std::fs::read(&file).unwrap();
    eprintln!("stored file: {} bytes", pristine.len());

    let disk: wire::DiskId = "vm/x".parse().unwrap();
    let check = |bytes: &[u8], what: &str| {
        std::fs::write(&file, bytes).unwrap();
        let s = agent::store::Store::open(&store, agent::store::Access::ReadOnly).unwrap();
        let l = s.load(&disk).unwrap();
        assert_eq!(
            l.state(),
            wire::State::Inconsistent,
            "{what} went unnoticed"
        );
        assert!(l.bitmap.is_none() && l.reason.is_some(), "{what}");
    };
    for pos in 0..pristine.len() {
        let mut b = pristine.clone();
        b[pos] ^= 1 << rng.random_range(0..8);
        check(&b, &format!("flip at {pos}"));
    }
    for len in (0..pristine.len()).step_by(7).chain([pristine.len() - 1]) {
        check(&pristine[..len], &format!("truncation to {len}"));
    }
    let mut longer = pristine.clone();
    longer.push(0);
    check(&longer, "one trailing byte");

    // Through the real binary: verify exits 3, show says inconsistent, nothing panics.
    for round in 0..24 {
        let mut b = pristine.clone();
        if round % 3 == 2 {
            b.truncate(rng.random_range(0..pristine.len()));
        } else {
            let pos = rng.random_range(0..b.len());
            b[pos] ^= 1 << rng.random_range(0..8);
        }
        std::fs::write(&file, &b).unwrap();
        let v = run_in(&store, &["bitmap", "verify", "--disk", "vm/x"]);
        assert_eq!(
            v.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&v.stderr)
        );
        let s = run_in(&store, &["--json", "bitmap", "show", "--disk", "vm/x"]);
        assert!(
            s.status.success(),
            "show must report, not fail: {}",
            String::from_utf8_lossy(&s.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
        assert_eq!(j["state"], "inconsistent");
        assert!(j["extents"].is_null() && j["root"].is_null());
        let e = run_in(
            &store,
            &[
                "bitmap",
                "export",
                "--disk",
                "vm/x",
                "--raw",
                dir.path().join("r").to_str().unwrap(),
            ],
        );
        assert_eq!(e.status.code(), Some(3));
    }
    std::fs::write(&file, &pristine).unwrap();
    assert!(
        run_in(&store, &["bitmap", "verify", "--disk", "vm/x"])
            .status
            .success()
    );
}

/// The same flip-every-byte check on a file whose chunks use all three encodings, including a
/// dense noisy chunk stored raw.
#[test]
fn flips_in_raw_roaring_and_zero_chunks_are_all_detected() {
    let seed = seed("flips_in_raw_roaring_and_zero_chunks_are_all_detected");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let g = wire::Geometry::new(3 * (64 << 10) * 8 * 512 + 777, 512).unwrap(); // 4 chunks, short tail
    let mut b = wire::Bitmap::new(g);
    for blk in (0..(64u64 << 10) * 8).filter(|_| rng.random_bool(0.5)) {
        b.set_blocks(blk, blk + 1); // chunk 0: noise, stored raw
    }
    b.set_blocks(600_000, 600_100); // chunk 1: a run, stored roaring
    b.set_blocks(g.blocks() - 1, g.blocks()); // last block of the short tail chunk
    let meta = agent::store::Meta {
        disk: "vm/raw".parse().unwrap(),
        geometry: g,
        checkpoint: None,
        epoch: 3,
        state: wire::State::Consistent,
        reason: None,
        generation: 9,
    };
    let bytes = agent::store::format::encode(&meta, &mut b);
    let (m2, b2) = agent::store::format::decode(&bytes).unwrap();
    assert_eq!((m2, &b2), (meta, &b));
    for pos in 0..bytes.len() {
        let mut x = bytes.clone();
        x[pos] ^= 1 << rng.random_range(0..8);
        assert!(
            agent::store::format::decode(&x).is_err(),
            "seed {seed}: flip at {pos} undetected"
        );
    }
    for len in 0..bytes.len() {
        assert!(
            agent::store::format::decode(&bytes[..len]).is_err(),
            "truncation to {len}"
        );
    }
}
