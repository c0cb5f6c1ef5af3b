//! `sim`: run seeds of the deterministic simulation and report violations.
//!
//! `cargo run -p sim --release -- --seeds A..B [--scenario NAME] [--bug NAME] [--verbose] [--trace]`

use sim::run::replay_command;
use sim::{Bug, Scenario, run_seed, run_seeds};
use std::process::ExitCode;
use std::time::Instant;

fn usage() -> ExitCode {
    eprintln!(
        "usage: sim --seeds A..B [--scenario NAME]... [--bug NAME]... [--verbose] [--trace]\n\
         scenarios: {} (default: all but the known gaps {})\nbugs: {}",
        Scenario::ALL.map(|s| s.name()).join(", "),
        Scenario::KNOWN_GAPS.map(|s| s.name()).join(", "),
        Bug::ALL.map(|b| b.name()).join(", ")
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut seeds = 0..100u64;
    let mut scenarios = Vec::new();
    let mut bugs = Vec::new();
    let (mut verbose, mut trace) = (false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seeds" => {
                let Some(v) = args.next() else { return usage() };
                let Some((a, b)) = v.split_once("..") else {
                    return usage();
                };
                match (a.parse(), b.parse()) {
                    (Ok(a), Ok(b)) if a < b => seeds = a..b,
                    _ => return usage(),
                }
            }
            "--scenario" => match args.next().as_deref().and_then(Scenario::parse) {
                Some(s) => scenarios.push(s),
                None => return usage(),
            },
            "--bug" => match args.next().as_deref().and_then(Bug::parse) {
                Some(b) => bugs.push(b),
                None => return usage(),
            },
            "--verbose" => verbose = true,
            "--trace" => trace = true,
            _ => return usage(),
        }
    }
    if scenarios.is_empty() {
        scenarios = Scenario::default_set();
    }
    // Panics are caught per seed and reported as violations; keep stderr readable.
    if !trace {
        std::panic::set_hook(Box::new(|_| {}));
    }
    if trace {
        let mut bad = false;
        for &sc in &scenarios {
            for seed in seeds.clone() {
                let r = run_seed(seed, sc, &bugs, true);
                println!("== seed {seed} scenario {}", sc.name());
                for l in &r.trace {
                    println!("{l}");
                }
                for v in &r.violations {
                    println!("VIOLATION: {v}");
                    bad = true;
                }
            }
        }
        return if bad {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let t0 = Instant::now();
    let sums = run_seeds(seeds.clone(), &scenarios, &bugs);
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{:<26} {:>7} {:>10} {:>10} {:>12} {:>10}",
        "scenario", "runs", "violations", "precision", "switch mean", "switch max"
    );
    let mut total = 0;
    let mut runs = 0;
    for s in &sums {
        println!(
            "{:<26} {:>7} {:>10} {:>10.3} {:>10.0} B {:>8} B",
            s.scenario.name(),
            s.runs,
            s.failed,
            s.precision,
            s.switch_mean,
            s.switch_max
        );
        total += s.failed;
        runs += s.runs;
        for f in &s.failures {
            println!(
                "  seed {} violates: {}",
                f.seed,
                f.violations.first().map(String::as_str).unwrap_or("")
            );
            if verbose {
                for v in f.violations.iter().skip(1) {
                    println!("      {v}");
                }
            }
            println!("    replay: {}", replay_command(f.seed, s.scenario, &bugs));
        }
    }
    println!(
        "{runs} runs in {secs:.1} s ({:.0} seeds/minute), {total} with violations",
        runs as f64 / secs * 60.0
    );
    if total > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
