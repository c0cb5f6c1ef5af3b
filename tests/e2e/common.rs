//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of the `bitferry` binary built next to this test binary (`<target>/<profile>/bitferry`).
/// The README's test command builds it first (`cargo build --bin bitferry`).
pub fn bitferry_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in <target>/<profile>/deps");
    let bin = profile_dir.join("bitferry");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bin bitferry` before the tests (see README.md)",
        bin.display()
    );
    bin
}

/// A `bitferry` command with logs quiet.
pub fn bitferry() -> Command {
    let mut c = Command::new(bitferry_path());
    c.env_remove("BITFERRY_STORE").env("BITFERRY_LOG", "warn");
    c
}

/// Run `bitferry --store STORE ARGS…` and return its output.
pub fn run_in(store: &std::path::Path, args: &[&str]) -> Output {
    bitferry()
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("spawn bitferry")
}

/// Like [`run_in`] but the command must succeed; returns stdout parsed as JSON (`--json` added).
pub fn json_in(store: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = run_in(store, &full);
    assert!(
        out.status.success(),
        "bitferry {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bitferry {args:?}: stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A seed from `BITFERRY_TEST_SEED` or fresh, printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("BITFERRY_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {s} (replay with BITFERRY_TEST_SEED={s})");
    s
}
