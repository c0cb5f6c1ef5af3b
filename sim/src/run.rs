//! Running seeds: one world per seed, panics caught and reported as violations.

use crate::check;
use crate::scenario::{Bug, Scenario};
use crate::world::World;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The seed.
    pub seed: u64,
    /// The scenario.
    pub scenario: Scenario,
    /// Violations (empty: the run was clean).
    pub violations: Vec<String>,
    /// Extra bits / true bits of the final bitmap, if anything changed.
    pub precision: Option<f64>,
    /// Bytes the source sent while the VM was paused, per completed migration.
    pub switch_bytes: Vec<u64>,
    /// The event log, when asked for.
    pub trace: Vec<String>,
    /// Migrations whose destination dropped a chunk (bug `dest-skips-chunk`): how each
    /// destination session ended (None: killed by a crash or still running).
    pub skipped: Vec<Option<wire::proto::Outcome>>,
    /// Protocol-step crashes that fired (e.g. "source after sending Switchover").
    pub crash_points: Vec<String>,
}

/// Run one seed.
pub fn run_seed(seed: u64, scenario: Scenario, bugs: &[Bug], trace: bool) -> RunResult {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut w = World::new(seed, scenario, bugs, trace);
        w.run();
        let precision = check::precision(&w);
        let switch_bytes = w.migs.iter().filter_map(|m| m.switch_bytes).collect();
        let skipped = w
            .migs
            .iter()
            .filter(|m| m.chunk_skipped)
            .map(|m| m.dst_end)
            .collect();
        let fired = w.fired.clone();
        (
            w.violations,
            precision,
            switch_bytes,
            w.trace.unwrap_or_default(),
            skipped,
            fired,
        )
    }));
    let (violations, precision, switch_bytes, trace, skipped, crash_points) = match r {
        Ok(v) => v,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            (
                vec![format!("panic: {msg}")],
                None,
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            )
        }
    };
    RunResult {
        seed,
        scenario,
        violations,
        precision,
        switch_bytes,
        trace,
        skipped,
        crash_points,
    }
}

/// Per-scenario totals.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The scenario.
    pub scenario: Scenario,
    /// Seeds run.
    pub runs: u64,
    /// Seeds with a violation (first few kept).
    pub failures: Vec<RunResult>,
    /// Number of failing seeds.
    pub failed: u64,
    /// Mean precision over runs that changed something.
    pub precision: f64,
    /// Mean and max bytes during switchover.
    pub switch_mean: f64,
    /// Max bytes during switchover.
    pub switch_max: u64,
}

/// Run `seeds` of every scenario in `scenarios`.
pub fn run_seeds(seeds: Range<u64>, scenarios: &[Scenario], bugs: &[Bug]) -> Vec<Summary> {
    scenarios
        .iter()
        .map(|&sc| {
            let mut s = Summary {
                scenario: sc,
                runs: 0,
                failures: Vec::new(),
                failed: 0,
                precision: 0.0,
                switch_mean: 0.0,
                switch_max: 0,
            };
            let (mut psum, mut pn, mut bsum, mut bn) = (0.0, 0u64, 0u64, 0u64);
            for seed in seeds.clone() {
                let r = run_seed(seed, sc, bugs, false);
                s.runs += 1;
                if let Some(p) = r.precision.filter(|_| r.violations.is_empty()) {
                    psum += p;
                    pn += 1;
                }
                for &b in &r.switch_bytes {
                    bsum += b;
                    bn += 1;
                    s.switch_max = s.switch_max.max(b);
                }
                if !r.violations.is_empty() {
                    s.failed += 1;
                    if s.failures.len() < 5 {
                        s.failures.push(r);
                    }
                }
            }
            s.precision = if pn > 0 { psum / pn as f64 } else { 0.0 };
            s.switch_mean = if bn > 0 { bsum as f64 / bn as f64 } else { 0.0 };
            s
        })
        .collect()
}

/// The command that replays one seed.
pub fn replay_command(seed: u64, scenario: Scenario, bugs: &[Bug]) -> String {
    let mut c = format!(
        "cargo run -p sim --release -- --seeds {seed}..{} --scenario {}",
        seed + 1,
        scenario.name()
    );
    for b in bugs {
        c.push_str(&format!(" --bug {}", b.name()));
    }
    c
}
