//! README's first command runs `bitferry demo`: it must keep working, and its own safety checks
//! (every write since the backup present in every bitmap reported trustworthy) must pass.

use crate::common::bitferry;

#[test]
fn demo_runs_and_its_safety_checks_pass() {
    let out = bitferry()
        .arg("demo")
        .output()
        .expect("spawn bitferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("safety check:").count(), 2, "{stdout}");
    assert!(stdout.contains("Demo finished"), "{stdout}");
}
