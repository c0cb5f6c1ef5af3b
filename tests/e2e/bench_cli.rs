//! `bitferry bench migrate` through the real binary, small: the JSON fields that reports and
//! docs/performance.md rely on, their consistency, and the text report for people.

use crate::common::bitferry;
use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    let out = bitferry()
        .args(["bench", "migrate", "--sizes", "64G", "--dense-bytes", "4M"])
        .args(["--iterations", "2"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn bench_migrate_reports_consistent_figures_as_json_and_text() {
    let v: Value = serde_json::from_slice(&bench(&["--json"]).stdout).unwrap();
    let s = &v["switchover"][0];
    let sw = s["bytes_during_switchover"].as_u64().unwrap();
    assert!(sw > 0 && sw <= 256 << 10, "{s}");
    assert!(s["qemu_stop_copy_bytes"].as_u64().unwrap() > sw * 10, "{s}");
    assert_eq!(s["meets_target"], true);
    let b = &v["bulk"];
    assert_eq!(b["bitmap_bytes"], 4 << 20);
    assert_eq!(b["chunks_verified"], 64);
    assert_eq!(b["iterations"], 2);
    let pairs = b["per_iteration"]["ratios"].as_array().unwrap();
    assert_eq!(pairs.len(), 2);
    for key in [
        "bulk_seconds",
        "baseline_seconds",
        "cpu_seconds",
        "baseline_cpu_seconds",
    ] {
        let all = b["per_iteration"][key].as_array().unwrap();
        assert_eq!(all.len(), 2, "{key}");
        assert!(all.iter().all(|x| x.as_f64().unwrap() > 0.0), "{key}: {b}");
    }
    // Each pair's ratio is its baseline over its migration time.
    for (i, r) in pairs.iter().enumerate() {
        let want = b["per_iteration"]["baseline_seconds"][i].as_f64().unwrap()
            / b["per_iteration"]["bulk_seconds"][i].as_f64().unwrap();
        assert!((r.as_f64().unwrap() - want).abs() < 1e-9, "{b}");
    }
    let ratio = b["ratio"].as_f64().unwrap();
    assert_eq!(b["meets_target"], ratio >= 0.6);

    let out = bench(&[]);
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "Switchover (VM paused)",
        "64 GiB",
        "Dense bulk",
        "raw quinn",
        "ratio",
    ] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    let progress = String::from_utf8(out.stderr).unwrap();
    assert!(
        progress.contains("dense bulk: iteration 2 of 2"),
        "{progress}"
    );
}
