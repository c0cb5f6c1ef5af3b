//! Exactness of the bitmap-diff: random images, random modifications, every granularity, both
//! reference kinds, sparse files. Seeds are printed; set `BITFERRY_REBUILD_SEED=N` to replay one.

use super::RebuildError;
use super::job::{JobConfig, RebuildJob, ReferenceSpec};
use super::manifest;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustix::fs::{FallocateFlags, fallocate};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Blocks whose bytes differ (lengths included), over the live image's blocks.
pub(crate) fn truth(live: &[u8], reference: &[u8], g: usize) -> Vec<u64> {
    (0..live.len().div_ceil(g))
        .filter(|&b| {
            let a = &live[b * g..((b + 1) * g).min(live.len())];
            let r = reference
                .get(b * g..((b + 1) * g).min(reference.len()))
                .unwrap_or(&[]);
            a != r
        })
        .map(|b| b as u64)
        .collect()
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

/// A random image: sparse with data extents (4 KiB aligned so they make real holes), some
/// of them explicit zeros.
fn random_image(rng: &mut StdRng, path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let extents = rng.random_range(0..6);
    for _ in 0..extents {
        let off = rng.random_range(0..size) & !4095;
        let len = rng.random_range(1..=(size - off).min(3 << 20));
        let mut data = vec![0u8; len as usize];
        if rng.random_bool(0.8) {
            rng.fill(&mut data[..]);
        }
        f.write_all_at(&data, off).unwrap();
    }
}

/// Random modifications of `path` at granularity `g`.
fn modify(rng: &mut StdRng, path: &Path, g: u64) {
    let f = open_rw(path);
    let size = f.metadata().unwrap().len();
    for _ in 0..rng.random_range(0..8) {
        let (off, len) = match rng.random_range(0..6) {
            // one byte
            0 => (rng.random_range(0..size), 1),
            // a whole block
            1 => {
                let b = rng.random_range(0..size.div_ceil(g));
                (b * g, g.min(size - b * g))
            }
            // a range crossing a block border
            2 => {
                let b = rng.random_range(1..size.div_ceil(g).max(2));
                let border = (b * g).min(size - 1);
                let from = border.saturating_sub(rng.random_range(1..=g.min(4096)));
                (
                    from,
                    (border - from + rng.random_range(1..4096)).min(size - from),
                )
            }
            // the partial (or last) block's last byte
            3 => (size - 1, 1),
            // punch a hole (reads back as zeros)
            4 => {
                let off = rng.random_range(0..size) & !4095;
                let len = rng.random_range(1..=(size - off).min(1 << 20));
                fallocate(
                    &f,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    off,
                    len,
                )
                .unwrap();
                continue;
            }
            // a random range
            _ => {
                let off = rng.random_range(0..size);
                (off, rng.random_range(1..=(size - off).min(200_000)))
            }
        };
        let mut data = vec![0u8; len as usize];
        f.read_exact_at(&mut data, off).unwrap();
        // Flip so the content really changes (or, rarely, rewrite the same bytes: not dirty).
        if rng.random_bool(0.9) {
            let i = rng.random_range(0..data.len());
            data[i] ^= 1 + rng.random_range(0..255u8);
        }
        f.write_all_at(&data, off).unwrap();
    }
    // Sometimes the live disk was resized.
    if rng.random_bool(0.15) {
        let new = (size as i64 + rng.random_range(-(g.min(size - 1) as i64)..=g as i64 * 2)).max(1);
        f.set_len(new as u64).unwrap();
    }
}

fn seeds(n: u64) -> Vec<u64> {
    match std::env::var("BITFERRY_REBUILD_SEED") {
        Ok(s) => vec![s.parse().expect("BITFERRY_REBUILD_SEED is a number")],
        Err(_) => {
            let base: u64 = rand::random::<u32>().into();
            (base..base + n).collect()
        }
    }
}

#[test]
fn rebuilt_extents_equal_differing_blocks() {
    let grans = [512u64, 4096, 65536, 1 << 20, 64 << 20];
    for seed in seeds(24) {
        println!("seed {seed} (replay with BITFERRY_REBUILD_SEED={seed})");
        let mut rng = StdRng::seed_from_u64(seed);
        // Consecutive seeds walk through every granularity.
        let g = grans[(seed % grans.len() as u64) as usize];
        let size = rng.random_range(1..=(8u64 << 20));
        let dir = tempfile::tempdir().unwrap();
        let (backup, live) = (dir.path().join("backup"), dir.path().join("live"));
        random_image(&mut rng, &backup, size);
        // Copy preserving holes: same extents, then modify.
        std::fs::copy(&backup, &live).unwrap();
        modify(&mut rng, &live, g);
        let (lb, bb) = (
            std::fs::read(&live).unwrap(),
            std::fs::read(&backup).unwrap(),
        );
        let expect = truth(&lb, &bb, g as usize);
        let mpath = dir.path().join("m");
        let created = manifest::create(&backup, g, &mpath).unwrap();
        for spec in [
            ReferenceSpec::Backup(backup.clone()),
            ReferenceSpec::Manifest(mpath.clone()),
        ] {
            let mut cfg = JobConfig::new(live.clone(), spec.clone(), g);
            cfg.want_reference_root = true;
            // Small reads so segments and block runs meet many boundaries.
            cfg.segment_bytes = g * rng.random_range(1..5);
            let out = RebuildJob::open(cfg).unwrap().run().unwrap();
            let got: Vec<u64> = out.bitmap.runs().flat_map(|(a, b)| a..b).collect();
            assert_eq!(got, expect, "seed {seed} g {g} size {size} {spec:?}");
            assert_eq!(
                out.reference_root,
                Some(created.root),
                "seed {seed} {spec:?}"
            );
            assert_eq!(out.size_mismatch.is_some(), lb.len() != bb.len());
        }
    }
}

#[test]
fn resume_continues_from_the_persisted_cursor() {
    for seed in seeds(3) {
        println!("seed {seed} (replay with BITFERRY_REBUILD_SEED={seed})");
        let mut rng = StdRng::seed_from_u64(seed);
        let g = 4096;
        let dir = tempfile::tempdir().unwrap();
        let (backup, live) = (dir.path().join("backup"), dir.path().join("live"));
        let size = 4u64 << 20;
        let mut data = vec![0u8; size as usize];
        rng.fill(&mut data[..]);
        std::fs::write(&backup, &data).unwrap();
        for _ in 0..50 {
            let i = rng.random_range(0..data.len());
            data[i] ^= 0x5a;
        }
        std::fs::write(&live, &data).unwrap();
        let expect = truth(&data, &std::fs::read(&backup).unwrap(), g as usize);
        let state = dir.path().join("state");
        let mut cfg = JobConfig::new(live.clone(), ReferenceSpec::Backup(backup.clone()), g);
        cfg.want_reference_root = true;
        cfg.state_file = Some(state.clone());
        cfg.segment_bytes = 64 << 10;
        cfg.persist_bytes = 64 << 10;
        // Cancel once about half is done.
        let job = RebuildJob::open(cfg.clone()).unwrap();
        let (progress, cancel) = (job.progress(), job.cancel_flag());
        let h = std::thread::spawn(move || job.run());
        while progress.snapshot().done < size / 2 && !h.is_finished() {
            std::thread::yield_now();
        }
        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        let first = h.join().unwrap();
        let job = RebuildJob::open(cfg).unwrap();
        let Err(super::RebuildError::Cancelled { cursor }) = first else {
            // Finished before the cancel landed: nothing to resume, which is fine but rare.
            continue;
        };
        assert_eq!(job.resume_point().map(|r| r.0), Some(cursor));
        let out = job.run().unwrap();
        assert_eq!(out.resumed_from, Some(cursor));
        assert!(
            out.bytes_read <= 2 * (size - cursor),
            "{} re-read",
            out.bytes_read
        );
        let got: Vec<u64> = out.bitmap.runs().flat_map(|(a, b)| a..b).collect();
        assert_eq!(got, expect, "seed {seed}");
        let m = dir.path().join("m");
        assert_eq!(
            out.reference_root,
            Some(manifest::create(&backup, g, &m).unwrap().root)
        );
        assert!(!state.exists(), "state file removed after success");
    }
}

#[test]
fn concurrent_marks_are_merged() {
    let dir = tempfile::tempdir().unwrap();
    let (backup, live) = (dir.path().join("backup"), dir.path().join("live"));
    std::fs::write(&backup, vec![3u8; 1 << 20]).unwrap();
    std::fs::write(&live, vec![3u8; 1 << 20]).unwrap();
    let job = RebuildJob::open(JobConfig::new(live, ReferenceSpec::Backup(backup), 4096)).unwrap();
    job.marks().lock().unwrap().mark(5000, 10).unwrap();
    let out = job.run().unwrap();
    assert_eq!(out.scan_dirty_blocks, 0);
    assert_eq!(out.bitmap.runs().collect::<Vec<_>>(), vec![(1, 2)]);
}

#[test]
fn refuses_mismatched_manifest_granularity() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![1u8; 100_000]).unwrap();
    let backup = dir.path().join("backup");
    std::fs::write(&backup, vec![1u8; 100_000]).unwrap();
    let m = dir.path().join("m");
    manifest::create(&backup, 4096, &m).unwrap();
    let err = RebuildJob::open(JobConfig::new(img, ReferenceSpec::Manifest(m), 65536))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("granularity 4096"), "{err}");
}

#[test]
fn refuses_a_manifest_or_backup_of_the_live_image_itself() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![1u8; 100_000]).unwrap();
    let m = dir.path().join("m");
    manifest::create(&img, 4096, &m).unwrap();
    let err = RebuildJob::open(JobConfig::new(
        img.clone(),
        ReferenceSpec::Manifest(m),
        4096,
    ))
    .err()
    .expect("refused");
    assert!(matches!(err, RebuildError::SameImage { .. }), "{err}");
    let err = RebuildJob::open(JobConfig::new(
        img.clone(),
        ReferenceSpec::Backup(img),
        4096,
    ))
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("is the live image"), "{err}");
}
