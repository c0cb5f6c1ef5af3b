//! `bitferry cert init` / `cert issue`: files the transport's loader accepts, no silent
//! overwrite, private keys readable by the owner only.

use crate::common::bitferry;
use agent::transport::{TlsIdentity, TransportError};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn run(args: &[&str]) -> std::process::Output {
    bitferry().args(args).output().expect("spawn bitferry")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = run(&full);
    assert!(
        out.status.success(),
        "bitferry {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn init_and_issue_produce_loadable_private_files() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    let hosts = d.path().join("hosts");

    let v = ok_json(&["cert", "init", "--dir", s(&ca)]);
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{v}");
    assert!(ca.join("ca.pem").exists());
    assert_eq!(mode(&ca.join("ca.key")), 0o600);

    let v = ok_json(&[
        "cert",
        "issue",
        "--ca",
        s(&ca),
        "--name",
        "node-a",
        "--out",
        s(&hosts),
        "--san",
        "10.0.0.7",
        "--san",
        "node-a.example",
    ]);
    assert_eq!(v["name"], "node-a");
    assert_eq!(
        v["sans"],
        serde_json::json!(["node-a", "10.0.0.7", "node-a.example"])
    );
    ok_json(&[
        "cert",
        "issue",
        "--ca",
        s(&ca),
        "--name",
        "node-b",
        "--out",
        s(&hosts),
    ]);
    for n in ["node-a", "node-b"] {
        assert_eq!(mode(&hosts.join(format!("{n}.key"))), 0o600, "{n}");
        let id = TlsIdentity::load(
            &ca.join("ca.pem"),
            &hosts.join(format!("{n}.pem")),
            &hosts.join(format!("{n}.key")),
        )
        .unwrap();
        assert_eq!(id.name(), n);
    }

    // Where openssl is installed, it agrees: valid for both TLS client and server use.
    if let Ok(v) = std::process::Command::new("openssl")
        .arg("version")
        .output()
        && v.status.success()
    {
        for purpose in ["sslclient", "sslserver"] {
            let out = std::process::Command::new("openssl")
                .args([
                    "verify",
                    "-CAfile",
                    s(&ca.join("ca.pem")),
                    "-purpose",
                    purpose,
                ])
                .arg(hosts.join("node-a.pem"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl verify -purpose {purpose}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }

    // A certificate from another cluster's CA is not accepted with this CA.
    let other = d.path().join("other");
    ok_json(&["cert", "init", "--dir", s(&other)]);
    ok_json(&[
        "cert",
        "issue",
        "--ca",
        s(&other),
        "--name",
        "x",
        "--out",
        s(&other),
    ]);
    let e = TlsIdentity::load(
        &ca.join("ca.pem"),
        &other.join("x.pem"),
        &other.join("x.key"),
    )
    .unwrap_err();
    assert!(matches!(e, TransportError::TlsConfig(_)), "{e}");
    // Nor a key that belongs to another certificate.
    let e = TlsIdentity::load(
        &ca.join("ca.pem"),
        &hosts.join("node-a.pem"),
        &hosts.join("node-b.key"),
    )
    .unwrap_err();
    assert!(matches!(e, TransportError::TlsConfig(_)), "{e}");
}

#[test]
fn existing_files_are_not_overwritten_without_force() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path();
    ok_json(&["cert", "init", "--dir", s(ca)]);
    let before = std::fs::read(ca.join("ca.key")).unwrap();

    let out = run(&["cert", "init", "--dir", s(ca)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(ca.join("ca.key")).unwrap(), before);

    ok_json(&[
        "cert",
        "issue",
        "--ca",
        s(ca),
        "--name",
        "h",
        "--out",
        s(ca),
    ]);
    let cert = std::fs::read(ca.join("h.pem")).unwrap();
    let out = run(&[
        "cert",
        "issue",
        "--ca",
        s(ca),
        "--name",
        "h",
        "--out",
        s(ca),
    ]);
    assert!(!out.status.success());
    assert_eq!(std::fs::read(ca.join("h.pem")).unwrap(), cert);

    // --force replaces, and the new key is still private.
    ok_json(&["cert", "init", "--dir", s(ca), "--force"]);
    assert_ne!(std::fs::read(ca.join("ca.key")).unwrap(), before);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
}

#[test]
fn bad_names_and_missing_ca_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&[
        "cert",
        "issue",
        "--ca",
        s(d.path()),
        "--name",
        "../evil",
        "--out",
        s(d.path()),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid name"));
    let out = run(&[
        "cert",
        "issue",
        "--ca",
        s(d.path()),
        "--name",
        "ok",
        "--out",
        s(d.path()),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca.pem"));
    assert!(!d.path().join("ok.key").exists());
}
