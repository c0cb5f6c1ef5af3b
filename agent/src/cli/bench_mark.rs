//! `bitferry bench mark`: what one `bitmap mark` costs the agent as disks grow (finding F5 of
//! the hardening issue: each mark used to recount every dirty chunk under the agent's lock).
//! The agent state runs in process over a temporary store; each size's mark latency is printed
//! beside the smallest size's (the baseline) and beside one full recount of the same bitmap,
//! which is what every mark paid before.

use crate::control::Request;
use crate::daemon::state::AgentState;
use crate::store::{Access, Store};
use anyhow::Result;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wire::{Bitmap, DiskId};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Params {
    /// Disk sizes (the first is the baseline).
    pub sizes: Vec<u64>,
    /// Granularity.
    pub granularity: u64,
    /// Marks timed per size (the median is reported).
    pub marks: usize,
    /// RNG seed.
    pub seed: u64,
}

/// Run the benchmark and report one row per size.
pub fn run(p: &Params) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), Access::ReadWrite)?;
    let mut st = AgentState::open(store, Vec::new())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let mut rows = Vec::new();
    let mut base: Option<f64> = None;
    for (i, &size) in p.sizes.iter().enumerate() {
        let disk = DiskId::new(format!("bench/{i}"))?;
        st.execute(Request::Create {
            disk: disk.clone(),
            size,
            granularity: p.granularity,
            checkpoint: None,
        })?;
        // Half dirty: the first half of the disk, then one read of the count to settle it.
        st.mark(&disk, &[(0, size / 2)])?;
        let blocks = size / p.granularity;
        // Cold: each mark lands in a part of the bitmap never written, so it pays the kernel's
        // first touch of that memory (a page fault, with a transparent huge page up to 2 MiB
        // zeroed) — a cost of memory, paid once per page, not of the bitmap's size.
        // Warm: the neighbouring block of each cold mark, same page, which is what a VM's
        // steady writes cost.
        let picks: Vec<u64> = (0..p.marks)
            .map(|_| rng.random_range(blocks / 2..blocks - 1))
            .collect();
        let cold = time_marks(&mut st, &disk, p.granularity, picks.iter().copied())?;
        let warm = time_marks(&mut st, &disk, p.granularity, picks.iter().map(|b| b + 1))?;
        let recount = recount_seconds(&st.bits_of(&disk)?);
        let baseline = *base.get_or_insert(warm.0);
        rows.push(json!({
            "size": size,
            "granularity": p.granularity,
            "bitmap_bytes": blocks.div_ceil(8),
            "mark_median_seconds": warm.0,
            "mark_p99_seconds": warm.1,
            "ratio_to_smallest": warm.0 / baseline,
            "first_touch_mark_median_seconds": cold.0,
            "first_touch_mark_p99_seconds": cold.1,
            "full_recount_seconds": recount,
            "mark_vs_full_recount": warm.0 / recount,
        }));
        st.forget(&disk);
    }
    Ok(json!({
        "bench": "mark",
        "marks_per_size": p.marks,
        "sizes": rows,
        "target": "mark cost independent of the bitmap's size (ratio_to_smallest near 1)",
    }))
}

/// Median and 99th percentile seconds of one single-block mark at each of `blocks`.
fn time_marks(
    st: &mut AgentState,
    disk: &DiskId,
    granularity: u64,
    blocks: impl Iterator<Item = u64>,
) -> Result<(f64, f64)> {
    let mut lat = Vec::new();
    for b in blocks {
        let t = Instant::now();
        st.mark(disk, &[(b * granularity, 1)])?;
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok((
        lat[lat.len() / 2].as_secs_f64(),
        lat[lat.len() * 99 / 100].as_secs_f64(),
    ))
}

/// Seconds of one popcount over every dirty chunk: what each mark's report cost before the
/// bitmap cached its counts (median of five).
fn recount_seconds(b: &Bitmap) -> f64 {
    let mut v: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let raw = b.to_raw();
            let n: u64 = raw.iter().map(|x| u64::from(x.count_ones())).sum();
            std::hint::black_box(n);
            t.elapsed()
        })
        .collect();
    v.sort();
    v[2].as_secs_f64()
}
