//! Load (issue 11 item 9): many concurrent migrations between two real agents.
//!
//! `load_256_concurrent_migrations` creates `BITFERRY_LOAD_DISKS` (default 256) disks on agent
//! A, marks every 4 KiB page of each bitmap (so every bitmap is fully resident: the worst case
//! for memory), runs that many one-shot `bitferry migrate` processes to agent B at once, and
//! checks that every one completed, that every disk's root on B equals A's root before the
//! migration, and that every disk is gone from A with a retirement record at epoch 2. It prints
//! the wall time and both agents' resident memory (VmRSS / VmHWM from /proc) at rest and at
//! peak, per disk. Disk geometry: `BITFERRY_LOAD_SIZE` (default 1G) and
//! `BITFERRY_LOAD_GRANULARITY` (default 64K); docs/operations.md §Memory has hand runs.

use crate::common::{AgentProc, agent_toml, bitferry, cluster_ca};
use agent::control::{Request, client};
use serde_json::Value;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn env_size(name: &str, default: u64) -> u64 {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    let v = v.trim().to_ascii_uppercase();
    let (num, mul) = match v.chars().last() {
        Some('K') => (&v[..v.len() - 1], 1u64 << 10),
        Some('M') => (&v[..v.len() - 1], 1 << 20),
        Some('G') => (&v[..v.len() - 1], 1 << 30),
        Some('T') => (&v[..v.len() - 1], 1 << 40),
        _ => (&v[..], 1),
    };
    num.parse::<u64>().expect("a size") * mul
}

/// (VmRSS, VmHWM) of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .expect("field in /proc/PID/status")
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn call(a: &AgentProc, req: &Request) -> Value {
    client::call(&a.control, req, Some(Duration::from_secs(60)))
        .unwrap_or_else(|e| panic!("{req:?}: {e}"))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn write_config(dir: &Path, name: &str, ca: &Path, extra: &str) {
    std::fs::create_dir_all(dir).unwrap();
    // The default transport limits: hundreds of sessions on two shared cores must not trip the
    // short stall limits the other e2e tests use.
    std::fs::write(dir.join("agent.toml"), agent_toml(name, ca, None, extra)).unwrap();
}

#[test]
fn load_256_concurrent_migrations() {
    let n = std::env::var("BITFERRY_LOAD_DISKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256usize);
    let size = env_size("BITFERRY_LOAD_SIZE", 1 << 30);
    let gran = env_size("BITFERRY_LOAD_GRANULARITY", 64 << 10);
    let g = wire::Geometry::new(size, gran).unwrap();
    let raw = g.raw_len() as u64;
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let disks: Vec<String> = (0..n).map(|i| format!("load/d{i:04}")).collect();
    let expects: String = disks
        .iter()
        .map(|d| format!("[[expect]]\ndisk = \"{d}\"\nfrom = \"host-a\"\n"))
        .collect();
    // Every disk's `bitferry migrate` holds a control connection while it runs, so 256 of them
    // plus the test's own calls exceed the default cap of 256 connections (docs/operations.md
    // §Limits): an operator running this many at once raises it the same way.
    let limits = "[control_limits]\nmax_connections = 1024\n";
    write_config(&dir.path().join("a"), "host-a", &ca, limits);
    write_config(
        &dir.path().join("b"),
        "host-b",
        &ca,
        &format!("{limits}{expects}"),
    );
    let a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    let b = AgentProc::start(&dir.path().join("b"), "host-b", &ca, "");
    let (a0, _) = memory(a.child.id());
    let (b0, _) = memory(b.child.id());

    // Every disk: one block set in every 4 KiB page of its bitmap, at a varying place.
    let t = Instant::now();
    let per_page = 4096 * 8 * gran;
    let mut roots = Vec::with_capacity(n);
    for (i, d) in disks.iter().enumerate() {
        call(
            &a,
            &Request::Create {
                disk: d.parse().unwrap(),
                size,
                granularity: gran,
                checkpoint: Some("load-c0".into()),
            },
        );
        let ranges: Vec<(u64, u64)> = (0..raw.div_ceil(4096))
            .map(|p| {
                let block = (i as u64 * 7919 + p * 104_729) % (4096 * 8);
                let off = (p * per_page + block * gran).min(size - 1);
                (off / gran * gran, 1)
            })
            .collect();
        call(
            &a,
            &Request::Mark {
                disk: d.parse().unwrap(),
                ranges,
            },
        );
        let s = call(
            &a,
            &Request::Show {
                disk: d.parse().unwrap(),
                offset: None,
                limit: None,
            },
        );
        roots.push(s["root"].as_str().unwrap().to_string());
    }
    let setup = t.elapsed();
    // Let a flush commit everything, then measure at rest.
    std::thread::sleep(Duration::from_millis(1500));
    let (a1, _) = memory(a.child.id());

    let to = b.listen_addr();
    let phased = std::env::var("BITFERRY_LOAD_MODE").is_ok_and(|m| m == "phased");
    let t = Instant::now();
    let failures = if phased {
        migrate_phased(&a, &disks, &to)
    } else {
        migrate_oneshot(&a, &disks, &to)
    };
    let took = t.elapsed();
    let (a2, a_peak) = memory(a.child.id());
    let (b2, b_peak) = memory(b.child.id());
    assert!(
        failures.is_empty(),
        "{} of {n} migrations failed, e.g. {}",
        failures.len(),
        failures[0]
    );

    // Every root arrived intact; every source copy is gone and its retirement recorded.
    for (d, root) in disks.iter().zip(&roots) {
        let s = call(
            &b,
            &Request::Show {
                disk: d.parse().unwrap(),
                offset: None,
                limit: None,
            },
        );
        assert_eq!(s["root"].as_str(), Some(root.as_str()), "{d} on B: {s}");
        assert_eq!(s["epoch"], 2, "{d} on B: {s}");
        assert_eq!(s["state"], "recording", "{d} on B: {s}");
        assert_eq!(s["checkpoint"], "load-c0", "{d} on B: {s}");
        let gone = client::call(
            &a.control,
            &Request::Show {
                disk: d.parse().unwrap(),
                offset: None,
                limit: None,
            },
            Some(Duration::from_secs(20)),
        );
        assert!(gone.is_err(), "{d} is still on A: {gone:?}");
        let name = agent::store::file_name(&d.parse().unwrap());
        let stem = name.strip_suffix(".bfb").unwrap();
        let rec = std::fs::read_to_string(a.store.join(format!("{stem}.retired")))
            .unwrap_or_else(|e| panic!("{d}: no retirement record on A: {e}"));
        assert_eq!(rec.lines().nth(2), Some("2"), "{d}: {rec}");
    }
    let per = |x: u64, y: u64| mib(x.saturating_sub(y)) * 1024.0 / n as f64;
    eprintln!(
        "load: {n} disks of {} at {} ({} B of bitmap each, every page touched); setup {:.1} s\n\
         load: {n} concurrent {} migrations A -> B took {:.2} s, all completed, roots equal\n\
         load: A (source) RSS {:.1} MiB empty, {:.1} MiB with the disks ({:.1} KiB per disk), \
         peak {:.1} MiB ({:.1} KiB per disk above rest), {:.1} MiB after\n\
         load: B (destination) RSS {:.1} MiB empty, peak {:.1} MiB ({:.1} KiB per disk above \
         empty), {:.1} MiB after ({:.1} KiB per disk)",
        size,
        gran,
        raw,
        setup.as_secs_f64(),
        if phased {
            "start + switchover"
        } else {
            "one-shot"
        },
        took.as_secs_f64(),
        mib(a0),
        mib(a1),
        per(a1, a0),
        mib(a_peak),
        per(a_peak, a1),
        mib(a2),
        mib(b0),
        mib(b_peak),
        per(b_peak, b0),
        mib(b2),
        per(b2, b0),
    );
}

/// Every migration at once, each a one-shot `bitferry migrate` process (which polls the
/// agent every 25 ms until it ends). Returns the failures.
fn migrate_oneshot(a: &AgentProc, disks: &[String], to: &str) -> Vec<String> {
    let children: Vec<_> = disks
        .iter()
        .map(|d| {
            bitferry()
                .arg("--control")
                .arg(&a.control)
                .args(["--json", "migrate", "--disk", d, "--to", to])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn bitferry migrate")
        })
        .collect();
    let mut failures = Vec::new();
    for (d, c) in disks.iter().zip(children) {
        let out = c.wait_with_output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() || v["phase"] != "completed" {
            failures.push(format!(
                "{d}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    failures
}

/// `BITFERRY_LOAD_MODE=phased`: `migrate start` for every disk, then `migrate switchover
/// --no-wait` for each once its rounds converged, with this test polling the status (one
/// request per disk every 100 ms) instead of one polling process per migration.
fn migrate_phased(a: &AgentProc, disks: &[String], to: &str) -> Vec<String> {
    let run = |args: &[&str]| {
        let out = a.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for d in disks {
        run(&["--json", "migrate", "start", "--disk", d, "--to", to]);
    }
    let status = |d: &str| {
        call(
            a,
            &Request::MigrateStatus {
                disk: d.parse().unwrap(),
            },
        )
    };
    let mut waiting: Vec<&String> = disks.iter().collect();
    let t = Instant::now();
    let mut failures = Vec::new();
    while !waiting.is_empty() {
        waiting.retain(|d| {
            let st = status(d);
            if st["finished"] == true {
                failures.push(format!("{d} ended before its switchover: {st}"));
                false
            } else if st["converged"] == true {
                run(&["--json", "migrate", "switchover", "--disk", d, "--no-wait"]);
                false
            } else {
                true
            }
        });
        assert!(t.elapsed() < Duration::from_secs(600), "no convergence");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut waiting: Vec<&String> = disks.iter().collect();
    while !waiting.is_empty() {
        waiting.retain(|d| {
            let st = status(d);
            if st["finished"] != true {
                return true;
            }
            if st["phase"] != "completed" {
                failures.push(format!("{d}: {st}"));
            }
            false
        });
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "migrations did not end"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    failures
}
