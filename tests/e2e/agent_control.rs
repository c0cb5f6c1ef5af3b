//! The agent daemon through its control socket: live recording, the store lock, a clean
//! shutdown versus a SIGKILL.

use crate::common::{AgentProc, cluster_ca, run_in};

#[test]
fn agent_records_live_and_a_killed_agent_leaves_inconsistent_not_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let mut a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm1/vda",
        "--size",
        "20G",
        "--granularity",
        "64K",
        "--checkpoint",
        "c1",
    ]);
    let m = a.json(&["bitmap", "mark", "--disk", "vm1/vda", "--range", "1G:1M"]);
    assert_eq!(m["newly_dirty_blocks"], 16);
    let s = a.json(&["bitmap", "show", "--disk", "vm1/vda"]);
    assert_eq!(s["state"], "recording");
    assert_eq!(s["dirty_blocks"], 16);
    let v = a.json(&["bitmap", "verify", "--disk", "vm1/vda"]);
    assert_eq!(v["root"], s["root"]);
    // The store is the agent's: direct access is refused with exit code 4.
    let direct = run_in(&a.store, &["bitmap", "show", "--disk", "vm1/vda"]);
    assert_eq!(
        direct.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&direct.stderr)
    );
    // Errors travel back with their exit codes.
    assert_eq!(
        a.cli(&["bitmap", "mark", "--disk", "vm1/vda", "--range", "20G:1"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        a.cli(&["bitmap", "show", "--disk", "nope"]).status.code(),
        Some(1)
    );

    // SIGKILL: the file says `recording`, so the next reader sees `inconsistent`, never a
    // `consistent` bitmap that might miss marks acknowledged since the last flush.
    a.json(&["bitmap", "mark", "--disk", "vm1/vda", "--range", "2G:1"]);
    a.kill();
    let after = crate::common::json_in(&a.store, &["bitmap", "show", "--disk", "vm1/vda"]);
    assert_eq!(after["state"], "inconsistent");
    assert!(after["reason"].as_str().unwrap().contains("recorded"));
}

#[test]
fn clean_shutdown_commits_consistent_with_every_mark() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let mut a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm2/vda",
        "--size",
        "1G",
        "--granularity",
        "4K",
    ]);
    for i in 0..50u64 {
        a.json(&[
            "bitmap",
            "mark",
            "--disk",
            "vm2/vda",
            "--range",
            &format!("{}:1", i * 8192),
        ]);
    }
    let live = a.json(&["bitmap", "show", "--disk", "vm2/vda"]);
    assert!(a.terminate().success());
    let s = crate::common::json_in(&a.store, &["bitmap", "show", "--disk", "vm2/vda"]);
    assert_eq!(s["state"], "consistent");
    assert_eq!(s["dirty_blocks"], 50);
    assert_eq!(s["root"], live["root"]);
    // Restarting takes it over again as `recording`.
    let a2 = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    assert_eq!(
        a2.json(&["bitmap", "show", "--disk", "vm2/vda"])["state"],
        "recording"
    );
    assert_eq!(a2.json(&["status"])["disks"], 1);
}
