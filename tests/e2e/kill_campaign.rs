//! The kill campaign (issue 11 item 8): SIGKILLs of real agents in every phase of a disk's
//! life, checked against ground truth after each. The harness and its rules are in
//! `campaign/mod.rs`; this is the CI-sized run (`BITFERRY_KILLS`, default 30) and, with a
//! larger `BITFERRY_KILLS`, the long run by hand.

use crate::campaign::{Campaign, Limits, binary, iterations_from_env};
use crate::common::seed;

#[test]
fn kill_campaign() {
    binary();
    let seed = seed("kill_campaign");
    let kills: u32 = std::env::var("BITFERRY_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let only = iterations_from_env();
    let mut c = Campaign::new("kill_campaign", seed, Limits::CAMPAIGN);
    if let Ok(ids) = std::env::var("BITFERRY_KILL_PHASES") {
        c.only_phases(&ids);
    }
    c.run(kills, only.clone());
    let summary = c.summary();
    eprintln!("{summary}");
    let kept = c.keep_dir();
    assert!(
        c.violations.is_empty(),
        "{summary}\nagent logs and stores kept in {kept:?}"
    );
    if only.is_none() {
        assert!(c.stats.kills >= kills, "{summary}");
    }
}
