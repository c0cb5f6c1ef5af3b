//! `bitferry bench …`: reproducible measurements, each figure printed beside a baseline measured
//! in the same run, and their ratio. Never used as timed assertions in tests.

use super::Ctx;
use super::output::print;
use super::units::{human, parse_size};
use anyhow::Result;
use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::{Duration, Instant};
use wire::{Bitmap, Geometry};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Cost of marking one block and recomputing the root, against hashing the whole raw bitmap.
    Root(RootArgs),
    /// Rebuild throughput: manifest mode vs a plain read, vs backup mode, and a 90%-holes image.
    Rebuild(RebuildBenchArgs),
}

/// `bench rebuild` arguments.
#[derive(Debug, Args)]
pub struct RebuildBenchArgs {
    /// Image size (at least 4G for the reported figures).
    #[arg(long, value_parser = parse_size, default_value = "4G")]
    pub size: u64,
    /// Granularity.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub granularity: u64,
    /// Measured repetitions of each figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub iterations: usize,
    /// Repetitions of the cold-cache figures (0 skips them).
    #[arg(long, default_value_t = 3)]
    pub cold_iterations: usize,
    /// Directory for the temporary images (about 2.5x --size of disk space).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub dir: std::path::PathBuf,
}

/// `bench root` arguments.
#[derive(Debug, Args)]
pub struct RootArgs {
    /// Disk size.
    #[arg(long, value_parser = parse_size, default_value = "1T")]
    pub size: u64,
    /// Granularity.
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    pub granularity: u64,
    /// Measured repetitions of each figure (the median is reported).
    #[arg(long, default_value_t = 30)]
    pub iterations: usize,
    /// RNG seed for the marked blocks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Run a benchmark.
pub fn run(ctx: &Ctx, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Root(a) => root(ctx, a),
        BenchCmd::Rebuild(a) => {
            let p = crate::rebuild::bench::BenchParams {
                size: a.size,
                granularity: a.granularity,
                iterations: a.iterations,
                dir: a.dir,
                seed: 1,
                cold_iterations: a.cold_iterations,
            };
            print(ctx.json, &crate::rebuild::bench::run(&p)?);
            Ok(())
        }
    }
}

/// Median of `n` timings of `f`.
pub fn median(n: usize, mut f: impl FnMut()) -> Duration {
    let mut v: Vec<Duration> = (0..n.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}

fn root(ctx: &Ctx, a: RootArgs) -> Result<()> {
    let g = Geometry::new(a.size, a.granularity)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut b = Bitmap::new(g);
    // Half the bitmap dirty in runs, so hashing sees realistic bytes.
    let mut blk = 0;
    while blk < g.blocks() {
        let run = rng.random_range(1..4096);
        if rng.random_bool(0.5) {
            b.set_blocks(blk, blk + run);
        }
        blk += run;
    }
    let raw = b.to_raw();
    let full = median(a.iterations, || {
        std::hint::black_box(blake3::hash(std::hint::black_box(&raw)));
    });
    drop(raw);
    b.root();
    let incremental = median(a.iterations, || {
        let block = rng.random_range(0..g.blocks());
        b.set_blocks(block, block + 1);
        std::hint::black_box(b.root());
    });
    let ratio = incremental.as_secs_f64() / full.as_secs_f64();
    print(
        ctx.json,
        &json!({
            "bench": "root",
            "size": a.size,
            "granularity": a.granularity,
            "raw_bytes": g.raw_len(),
            "chunks": g.chunks(),
            "iterations": a.iterations,
            "baseline_full_hash_seconds": full.as_secs_f64(),
            "mark_one_block_and_root_seconds": incremental.as_secs_f64(),
            "ratio": ratio,
            "target_ratio_below": 0.01,
            "summary": format!(
                "mark 1 block + root: {:.1} µs vs blake3 of the whole {} bitmap: {:.1} µs ({:.3}%)",
                incremental.as_secs_f64() * 1e6,
                human(g.raw_len() as u64),
                full.as_secs_f64() * 1e6,
                ratio * 100.0
            ),
        }),
    );
    Ok(())
}
