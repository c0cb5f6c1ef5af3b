//! CI run: at least 2,000 seeds across every default scenario, zero violations.
//!
//! A failure prints the exact command that replays the seed.

use sim::run::replay_command;
use sim::{Scenario, run_seeds};

#[test]
fn two_thousand_seeds_without_violations() {
    let scenarios = Scenario::default_set();
    let per = 2_000u64.div_ceil(scenarios.len() as u64);
    let sums = run_seeds(0..per, &scenarios, &[]);
    let runs: u64 = sums.iter().map(|s| s.runs).sum();
    assert!(runs >= 2_000, "only {runs} runs");
    let mut report = String::new();
    for s in &sums {
        assert_eq!(s.runs, per);
        for f in &s.failures {
            report.push_str(&format!(
                "{} seed {}: {:?}\n  replay: {}\n",
                s.scenario.name(),
                f.seed,
                f.violations,
                replay_command(f.seed, s.scenario, &[])
            ));
        }
    }
    assert!(report.is_empty(), "violations:\n{report}");
    // Migrations really completed (bytes during switchover were measured) in the plain runs.
    let pre = sums
        .iter()
        .find(|s| s.scenario == Scenario::Precopy)
        .expect("precopy runs");
    assert!(pre.switch_max > 0);
}
