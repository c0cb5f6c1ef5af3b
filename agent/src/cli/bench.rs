//! `bitferry bench …`: reproducible measurements, each figure printed beside a baseline measured
//! in the same run, and their ratio. Never used as timed assertions in tests.

use super::Ctx;
use super::output::print;
use super::units::{human, parse_size};
use anyhow::Result;
use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wire::{Bitmap, Geometry};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Cost of marking one block and recomputing the root, against hashing the whole raw bitmap.
    Root(RootArgs),
    /// Raw quinn bulk throughput over loopback with mutual TLS (the migration baseline), with
    /// BLAKE3 per 1 MiB, and through framed header + payload.
    Quic(QuicArgs),
    /// Rebuild throughput: manifest mode vs a plain read, vs backup mode, and a 90%-holes image.
    Rebuild(RebuildBenchArgs),
    /// Migration: switchover bytes against QEMU's stop-and-copy payload at several disk sizes,
    /// and dense bulk throughput against raw quinn.
    Migrate(MigrateBenchArgs),
    /// One `bitmap mark` in the agent as disks grow, against the smallest disk and against one
    /// full recount of the bitmap (what each mark cost before).
    Mark(MarkBenchArgs),
}

/// `bench mark` arguments.
#[derive(Debug, Args)]
pub struct MarkBenchArgs {
    /// Disk sizes; the first is the baseline. Each is half dirty.
    #[arg(long, value_parser = parse_size, value_delimiter = ',', default_value = "64G,1T,16T")]
    pub sizes: Vec<u64>,
    /// Granularity.
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    pub granularity: u64,
    /// Marks timed per size.
    #[arg(long, default_value_t = 2000)]
    pub marks: usize,
}

/// `bench migrate` arguments.
#[derive(Debug, Args)]
pub struct MigrateBenchArgs {
    /// Disk sizes of the switchover scenarios (4K granularity).
    #[arg(long, value_parser = parse_size, value_delimiter = ',', default_value = "64G,1T,16T")]
    pub sizes: Vec<u64>,
    /// Granularity of the switchover scenarios.
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    pub granularity: u64,
    /// Random clean blocks marked for the pre-copy round, and again during the last one.
    #[arg(long, default_value_t = 16384)]
    pub marks: usize,
    /// Raw bytes of the dense bitmap of the bulk-throughput figure.
    #[arg(long, value_parser = parse_size, default_value = "128M")]
    pub dense_bytes: u64,
    /// Runs of the throughput figures, each migration paired with a raw quinn transfer run
    /// just before it (the median of the paired ratios is reported). Single pairs spread by
    /// ±30 % on a shared 2-core machine; 15 keeps the median's own spread near ±3 %.
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
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

/// `bench quic` arguments.
#[derive(Debug, Args)]
pub struct QuicArgs {
    /// Bytes per run.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub bytes: u64,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub iterations: usize,
    /// Bytes per write (and per BLAKE3 hash / header frame); the migration protocol's chunks
    /// are 64K.
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub chunk: u64,
    /// Turn off UDP segmentation offload.
    #[arg(long)]
    pub disable_gso: bool,
}

/// Run a benchmark.
pub fn run(ctx: &Ctx, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Root(a) => root(ctx, a),
        BenchCmd::Quic(a) => quic(ctx, a),
        BenchCmd::Migrate(a) => {
            let p = crate::migrate::bench::Params {
                sizes: a.sizes,
                granularity: a.granularity,
                marks: a.marks,
                dense_bytes: a.dense_bytes,
                iterations: a.iterations,
                seed: a.seed,
                progress: if ctx.json {
                    |_| {}
                } else {
                    |m| eprintln!("… {m}")
                },
            };
            let v = crate::migrate::bench::run(&p)?;
            if ctx.json {
                print(true, &v);
            } else {
                migrate_text(&v);
            }
            Ok(())
        }
        BenchCmd::Mark(a) => {
            let v = super::bench_mark::run(&super::bench_mark::Params {
                sizes: a.sizes,
                granularity: a.granularity,
                marks: a.marks,
                seed: 1,
            })?;
            print(ctx.json, &v);
            Ok(())
        }
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
        // Always a clean block, so every iteration really invalidates a chunk.
        let block = loop {
            let c = rng.random_range(0..g.blocks());
            if !b.is_set(c) {
                break c;
            }
        };
        assert_eq!(b.set_blocks(block, block + 1), 1);
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

fn quic(ctx: &Ctx, a: QuicArgs) -> Result<()> {
    use crate::transport::TransportOptions;
    use crate::transport::bench::{Mode, bulk, ephemeral_cluster, pattern};
    let chunk = usize::try_from(a.chunk)
        .ok()
        .filter(|c| (1..=u32::MAX as usize).contains(c))
        .ok_or_else(|| anyhow::anyhow!("--chunk must be between 1 byte and 4 GiB"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ids = ephemeral_cluster(&["bench-dst", "bench-src"])?;
    let opts = TransportOptions {
        disable_gso: a.disable_gso,
        ..TransportOptions::default()
    };
    let modes = [Mode::Raw, Mode::RawBlake3, Mode::FramedBlake3];
    let len = usize::try_from(a.bytes).map_err(|_| anyhow::anyhow!("--bytes too large"))?;
    let data = bytes::Bytes::from(pattern(len));
    let mut rates: [Vec<f64>; 3] = Default::default();
    // Interleave the modes so drift (other load, thermal) hits all of them alike.
    for _ in 0..a.iterations.max(1) {
        for (i, mode) in modes.iter().enumerate() {
            let run = rt.block_on(bulk(&ids[0], &ids[1], &opts, data.clone(), chunk, *mode))?;
            rates[i].push(run.mib_per_s());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [raw, hashed, framed] = rates.each_mut().map(med);
    print(
        ctx.json,
        &json!({
            "bench": "quic",
            "bytes": a.bytes,
            "iterations": a.iterations.max(1),
            "chunk": chunk,
            "gso": !a.disable_gso,
            "stream_window": opts.stream_window,
            "baseline": "raw quinn, one stream, write_chunk per chunk, loopback, mutual TLS",
            "raw_mib_s": raw,
            "raw_blake3_mib_s": hashed,
            "framed_blake3_mib_s": framed,
            "raw_blake3_ratio": hashed / raw,
            "framed_blake3_ratio": framed / raw,
            "summary": format!(
                "raw {raw:.0} MiB/s; with BLAKE3 {hashed:.0} MiB/s ({:.2}x); \
                 header frame + payload with BLAKE3 {framed:.0} MiB/s ({:.2}x)",
                hashed / raw,
                framed / raw
            ),
        }),
    );
    Ok(())
}

/// `bench migrate` for people: the switchover table and the bulk figures with their targets.
fn migrate_text(v: &Value) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    let f = |x: &Value| x.as_f64().unwrap_or(f64::NAN);
    let mark = |ok: &Value| if ok == true { "met" } else { "MISSED" };
    let _ = writeln!(
        o,
        "Switchover (VM paused): bytes sent by bitferry vs QEMU's stop-and-copy of the same bitmap"
    );
    let _ = writeln!(
        o,
        "  {:>8}  {:>8}  {:>6}  {:>12}  {:>13}  {:>13}  {:>9}  target ≤ 256 KiB",
        "disk", "bitmap", "rounds", "bytes total", "at switchover", "QEMU", "QEMU / us"
    );
    for s in v["switchover"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:>8}  {:>8}  {:>6}  {:>12}  {:>13}  {:>13}  {:>8.0}×  {}",
            human(n(&s["size"])),
            human(n(&s["bitmap_bytes"])),
            n(&s["rounds"]),
            n(&s["bytes_total"]),
            n(&s["bytes_during_switchover"]),
            n(&s["qemu_stop_copy_bytes"]),
            f(&s["ratio_qemu_over_bitferry"]),
            mark(&s["meets_target"]),
        );
    }
    let b = &v["bulk"];
    let _ = writeln!(
        o,
        "\nDense bulk: a {} bitmap of random bytes, every chunk's hash and the root verified",
        human(n(&b["bitmap_bytes"]))
    );
    let _ = writeln!(
        o,
        "  migration  {:.3} s  {:>5.0} MiB/s  {:.2} CPU-s   (medians of {} runs)",
        f(&b["bulk_seconds"]),
        f(&b["mib_s"]),
        f(&b["cpu_seconds"]),
        n(&b["iterations"])
    );
    let _ = writeln!(
        o,
        "  raw quinn  {:.3} s  {:>5.0} MiB/s  {:.2} CPU-s   (same bytes, receiver only counts)",
        f(&b["baseline_seconds"]),
        f(&b["baseline_mib_s"]),
        f(&b["baseline_cpu_seconds"])
    );
    let _ = writeln!(
        o,
        "  ratio {:.2} (median of paired runs; target ≥ {:.1}: {}); ratio of medians {:.2}; \
         CPU ratio {:.2}",
        f(&b["ratio"]),
        f(&b["target_ratio_at_least"]),
        mark(&b["meets_target"]),
        f(&b["ratio_of_medians"]),
        f(&b["cpu_ratio"])
    );
    let _ = writeln!(
        o,
        "  sessions alone (no network): {:.3} s, of which the source {:.3} s",
        f(&b["sessions_only_seconds"]),
        f(&b["sessions_only_source_seconds"])
    );
    let _ = writeln!(o, "\n{}", v["summary"].as_str().unwrap_or_default());
}
