//! The same seed gives the same trace, event for event.

use sim::{Scenario, run_seed};

#[test]
fn same_seed_same_trace() {
    for (seed, sc) in [
        (7, Scenario::Chaos),
        (11, Scenario::Postcopy),
        (3, Scenario::SourceCrash),
    ] {
        let a = run_seed(seed, sc, &[], true);
        let b = run_seed(seed, sc, &[], true);
        assert!(
            a.trace.len() > 20,
            "seed {seed} {}: trace too short to mean anything: {:?}",
            sc.name(),
            a.trace
        );
        assert_eq!(
            a.trace,
            b.trace,
            "seed {seed} {} is not deterministic",
            sc.name()
        );
        assert_eq!(a.violations, b.violations);
    }
    // And different seeds differ (the trace depends on the seed at all).
    let a = run_seed(1, Scenario::Chaos, &[], true);
    let b = run_seed(2, Scenario::Chaos, &[], true);
    assert_ne!(a.trace, b.trace);
}

#[test]
fn traces_show_the_migration_flow() {
    let r = run_seed(5, Scenario::Precopy, &[], true);
    let text = r.trace.join("\n");
    for needle in [
        "send Hello",
        "recv Offer",
        "switchover",
        "send Committed",
        "recv Retired",
    ] {
        assert!(text.contains(needle), "no {needle:?} in trace:\n{text}");
    }
    assert!(r.violations.is_empty(), "{:?}", r.violations);
}
