//! "Crash in every phase" is real: across the crash scenarios, a crash fires right after every
//! message each side sends or handles, and every run stays clean.

use sim::run::replay_command;
use sim::{Scenario, run_seed};
use std::collections::BTreeSet;

#[test]
fn crashes_hit_every_protocol_step() {
    let mut seen = BTreeSet::new();
    for sc in [Scenario::SourceCrash, Scenario::DestCrash] {
        for seed in 0..400 {
            let r = run_seed(seed, sc, &[], false);
            assert!(
                r.violations.is_empty(),
                "{:?}\n  replay: {}",
                r.violations,
                replay_command(seed, sc, &[])
            );
            seen.extend(r.crash_points);
        }
    }
    let want = [
        "source after sending Hello",
        "source after sending Offer",
        "source after sending Chunk",
        "source after sending Delta",
        "source after sending RoundEnd",
        "source after sending Switchover",
        "source after sending Retired",
        "source after handling Welcome",
        "source after handling Accept",
        "source after handling RoundAck",
        "source after handling Committed",
        "destination after sending Welcome",
        "destination after sending Accept",
        "destination after sending RoundAck",
        "destination after sending Committed",
        "destination after handling Hello",
        "destination after handling Offer",
        "destination after handling Chunk",
        "destination after handling RoundEnd",
        "destination after handling Switchover",
    ];
    let missing: Vec<_> = want.iter().filter(|w| !seen.contains(**w)).collect();
    assert!(
        missing.is_empty(),
        "never crashed at {missing:?}; saw {seen:?}"
    );
}
