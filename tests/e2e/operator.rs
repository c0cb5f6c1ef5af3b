//! What an operator relies on (issue 15): files that guard themselves (no silent overwrite, no
//! manifest of the live image itself), log filters by the program's name, `agent --check`,
//! signals (SIGHUP reloads, SIGTERM/SIGINT commit), and the one-JSON-document contract.

use crate::common::{AgentProc, bitferry, cluster_ca, json_in, run_in};
use serde_json::Value;
use std::path::Path;
use std::process::Output;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every JSON document on `stdout`; panics if it is not a sequence of JSON values.
fn documents(stdout: &[u8]) -> Vec<Value> {
    serde_json::Deserializer::from_slice(stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(stdout)
            )
        })
}

/// The command failed with exactly one JSON document on stdout, whose `exit_code` is the
/// process's and whose `error` says something. Returns it.
fn one_failure(what: &str, o: &Output) -> Value {
    let docs = documents(&o.stdout);
    assert_eq!(
        docs.len(),
        1,
        "{what}: {} JSON documents on stdout: {}",
        docs.len(),
        String::from_utf8_lossy(&o.stdout)
    );
    let d = docs.into_iter().next().unwrap();
    let code = o.status.code().expect("exited");
    assert_ne!(code, 0, "{what}: succeeded: {d}");
    assert_eq!(d["exit_code"].as_i64(), Some(code.into()), "{what}: {d}");
    assert!(
        d["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: no error text: {d}"
    );
    d
}

/// The block manifest format version 1 (no image identity), written by hand as bitferry
/// before version 2 wrote it.
fn manifest_v1(data: &[u8], g: u64) -> Vec<u8> {
    let blocks = (data.len() as u64).div_ceil(g);
    let entries: Vec<u8> = data
        .chunks(g as usize)
        .flat_map(|b| *blake3::hash(b).as_bytes())
        .collect();
    let mut f = b"BFMANIF\0".to_vec();
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&(data.len() as u64).to_le_bytes());
    f.extend_from_slice(&g.to_le_bytes());
    f.extend_from_slice(&blocks.to_le_bytes());
    f.extend_from_slice(blake3::hash(&entries).as_bytes());
    f.extend_from_slice(&entries);
    f
}

#[test]
fn manifest_and_export_refuse_existing_files_and_rebuild_refuses_a_manifest_of_the_live_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("store");
    let g = 4096u64;
    let backup_data: Vec<u8> = (0..(256 * 1024u32)).map(|i| (i % 251) as u8).collect();
    let mut live_data = backup_data.clone();
    for blk in [3usize, 17, 40] {
        live_data[blk * g as usize + 7] ^= 0xff;
    }
    let (backup, live) = (d.join("backup.img"), d.join("live.img"));
    std::fs::write(&backup, &backup_data).unwrap();
    std::fs::write(&live, &live_data).unwrap();
    let man = d.join("backup.manifest");
    let create = |image: &Path, out: &Path, force: bool| {
        let mut args = vec![
            "manifest",
            "create",
            "--image",
            s(image),
            "--granularity",
            "4K",
            "--out",
            s(out),
        ];
        if force {
            args.push("--force");
        }
        run_in(&store, &args)
    };
    assert!(create(&backup, &man, false).status.success());
    let first = std::fs::read(&man).unwrap();

    // An existing --out is refused without --force, and left as it was.
    std::fs::write(&man, b"not a manifest").unwrap();
    let o = create(&backup, &man, false);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("already exists") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&man).unwrap(), b"not a manifest");
    let o = create(&backup, &man, true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&man).unwrap().len(), first.len());
    // --force never lets the manifest replace the image it is made from.
    let o = create(&backup, &backup, true);
    assert!(!o.status.success() && stderr(&o).contains("is the image itself"));
    assert_eq!(std::fs::read(&backup).unwrap(), backup_data);

    // A bitmap to rebuild, with one mark, so a refused rebuild can be seen to change nothing.
    json_in(
        &store,
        &[
            "bitmap",
            "create",
            "--disk",
            "vm/a",
            "--size",
            "256K",
            "--granularity",
            "4K",
        ],
    );
    json_in(
        &store,
        &["bitmap", "mark", "--disk", "vm/a", "--range", "0:1"],
    );
    let before = json_in(&store, &["bitmap", "show", "--disk", "vm/a"]);
    let rebuild = |manifest: &Path| {
        run_in(
            &store,
            &[
                "--json",
                "rebuild",
                "--image",
                s(&live),
                "--manifest",
                s(manifest),
                "--granularity",
                "4K",
                "--disk",
                "vm/a",
            ],
        )
    };
    // The slip: a manifest made from the live image (also reached through another path).
    let of_live = d.join("live.manifest");
    assert!(create(&live, &of_live, false).status.success());
    std::fs::hard_link(&live, d.join("live-link.img")).unwrap();
    for (what, out) in [
        ("same path", rebuild(&of_live)),
        (
            "hard link",
            run_in(
                &store,
                &[
                    "--json",
                    "rebuild",
                    "--image",
                    s(&d.join("live-link.img")),
                    "--manifest",
                    s(&of_live),
                    "--granularity",
                    "4K",
                    "--disk",
                    "vm/a",
                ],
            ),
        ),
    ] {
        let doc = one_failure(what, &out);
        let e = doc["error"].as_str().unwrap();
        assert!(
            e.contains("was made from") && e.contains("--backup") && e.contains("inode"),
            "{what}: {e}"
        );
        assert_eq!(
            json_in(&store, &["bitmap", "show", "--disk", "vm/a"]),
            before,
            "{what}: a refused rebuild changed the bitmap"
        );
    }
    // The backup's manifest works and finds exactly the changed blocks.
    let out = rebuild(&man);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dirty_blocks"].as_u64(), Some(3), "{v}");
    // A version 1 manifest (no identity) is still read, with the same result.
    let v1 = d.join("backup.v1.manifest");
    std::fs::write(&v1, manifest_v1(&backup_data, g)).unwrap();
    let out = rebuild(&v1);
    assert!(out.status.success(), "{}", stderr(&out));
    let w: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(w["extents"], v["extents"]);
    assert_eq!(w["dirty_blocks"].as_u64(), Some(3));

    // bitmap export --raw: the same rule.
    let raw = d.join("a.raw");
    json_in(
        &store,
        &["bitmap", "export", "--disk", "vm/a", "--raw", s(&raw)],
    );
    let exported = std::fs::read(&raw).unwrap();
    std::fs::write(&raw, b"keep me").unwrap();
    let o = run_in(
        &store,
        &[
            "--json",
            "bitmap",
            "export",
            "--disk",
            "vm/a",
            "--raw",
            s(&raw),
        ],
    );
    let doc = one_failure("export over a file", &o);
    assert!(doc["error"].as_str().unwrap().contains("--force"), "{doc}");
    assert_eq!(std::fs::read(&raw).unwrap(), b"keep me");
    json_in(
        &store,
        &[
            "bitmap",
            "export",
            "--disk",
            "vm/a",
            "--raw",
            s(&raw),
            "--force",
        ],
    );
    assert_eq!(std::fs::read(&raw).unwrap(), exported);
}

#[test]
fn log_filters_use_the_programs_name_flags_win_and_invalid_filters_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // A failing command logs "command failed" at debug (target agent::cli).
    let run = |log: &str, flags: &[&str]| {
        let mut c = bitferry();
        c.env("BITFERRY_LOG", log).arg("--store").arg(&store);
        c.args(flags)
            .args(["bitmap", "show", "--disk", "nope"])
            .output()
            .unwrap()
    };
    let debug_line = |o: &Output| stderr(o).contains("command failed");
    assert!(
        debug_line(&run("bitferry=debug", &[])),
        "bitferry=debug logs nothing"
    );
    assert!(debug_line(&run("bitferry::cli=debug", &[])));
    assert!(!debug_line(&run("warn", &[])));
    assert!(!debug_line(&run("bitferry=info", &[])));
    assert!(debug_line(&run("warn", &["-vv"])), "-vv");
    assert!(!debug_line(&run("warn", &["-v"])), "-v is info");
    assert!(!debug_line(&run("bitferry=debug", &["-q"])), "-q wins");
    // Invalid: exit 2 (usage) with a clear message, and the command does not run.
    let o = bitferry()
        .env("BITFERRY_LOG", "bitferry=loud")
        .arg("--store")
        .arg(&store)
        .args([
            "bitmap",
            "create",
            "--disk",
            "vm/b",
            "--size",
            "1M",
            "--granularity",
            "4K",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("BITFERRY_LOG") && stderr(&o).contains("not a valid log filter"),
        "{}",
        stderr(&o)
    );
    // It did not run: the same command with a valid filter creates the bitmap now.
    json_in(
        &store,
        &[
            "bitmap",
            "create",
            "--disk",
            "vm/b",
            "--size",
            "1M",
            "--granularity",
            "4K",
        ],
    );
    let o = bitferry()
        .env("BITFERRY_LOG", "bitferry=loud")
        .args(["--json", "bitmap", "list", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    assert_eq!(one_failure("invalid filter --json", &o)["exit_code"], 2);
}

/// An agent config in `dir` with the given TLS paths and extra keys.
fn config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("agent.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn agent_check_reports_every_planted_problem_on_its_own_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = cluster_ca(&d.join("ca"));
    let o = bitferry()
        .args(["cert", "issue", "--ca"])
        .arg(&ca)
        .args(["--name", "host-a", "--out"])
        .arg(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(d.join("backup.img"), vec![1u8; 65536]).unwrap();
    std::fs::write(d.join("live.img"), vec![1u8; 65536]).unwrap();
    let o = bitferry()
        .args(["manifest", "create", "--image"])
        .arg(d.join("live.img"))
        .arg("--out")
        .arg(d.join("live.manifest"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let good = format!(
        "listen = \"127.0.0.1:0\"\nstore = \"store\"\ncontrol = \"control.sock\"\n\
         [tls]\nca = \"{}\"\ncert = \"host-a.pem\"\nkey = \"host-a.key\"\n\
         [[reference]]\ndisk = \"vm/a\"\nimage = \"live.img\"\nbackup = \"backup.img\"\n",
        ca.join("ca.pem").display()
    );
    let check = |cfg: &Path, json: bool| {
        let mut c = bitferry();
        if json {
            c.arg("--json");
        }
        c.arg("agent")
            .arg("--config")
            .arg(cfg)
            .arg("--check")
            .output()
            .unwrap()
    };
    let cfg = config(d, &good);
    let o = check(&cfg, false);
    assert!(
        o.status.success(),
        "a good config fails: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains(": ok"));
    assert!(!d.join("store").exists(), "--check created the store");

    // Plant: a missing CA, a listen address of no interface here, a metrics port in use, a
    // store that is a file, a reference whose image is missing, one whose manifest is
    // missing, and one whose manifest was made from its own live image.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    std::fs::write(d.join("not-a-dir"), b"x").unwrap();
    let bad = format!(
        "listen = \"192.0.2.1:7400\"\nstore = \"not-a-dir\"\ncontrol = \"control.sock\"\n\
         metrics = \"127.0.0.1:{port}\"\n\
         [tls]\nca = \"missing-ca.pem\"\ncert = \"host-a.pem\"\nkey = \"host-a.key\"\n\
         [[reference]]\ndisk = \"vm/a\"\nimage = \"gone.img\"\nbackup = \"backup.img\"\n\
         [[reference]]\ndisk = \"vm/b\"\nimage = \"live.img\"\nmanifest = \"gone.manifest\"\n\
         [[reference]]\ndisk = \"vm/c\"\nimage = \"live.img\"\nmanifest = \"live.manifest\"\n"
    );
    let cfg = config(d, &bad);
    let o = check(&cfg, false);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let problems: Vec<&str> = out.lines().filter(|l| l.starts_with("problem: ")).collect();
    let expect = [
        ("tls.ca", "missing-ca.pem"),
        ("listen", "192.0.2.1:7400"),
        ("metrics", &format!("127.0.0.1:{port}")),
        ("store", "not a directory"),
        ("vm/a image", "does not exist"),
        ("vm/b manifest", "gone.manifest"),
        ("vm/c manifest", "was made from"),
    ];
    for (what, detail) in expect {
        assert_eq!(
            problems
                .iter()
                .filter(|l| l.contains(what) && l.contains(detail))
                .count(),
            1,
            "{what} ({detail}) not reported once:\n{out}"
        );
    }
    assert_eq!(problems.len(), expect.len(), "unexpected problems:\n{out}");
    assert!(stderr(&o).contains("7 problems"), "{}", stderr(&o));
    // The same as one JSON document.
    let doc = one_failure("check --json", &check(&cfg, true));
    assert_eq!(doc["problems"].as_array().map(Vec::len), Some(expect.len()));
    drop(taken);
    // A config that does not parse is one problem.
    let cfg = config(d, "listen = 5\n");
    let o = check(&cfg, false);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("problem: "))
            .count(),
        1
    );
}

fn show(a: &AgentProc, disk: &str) -> Value {
    a.json(&["bitmap", "show", "--disk", disk])
}

fn offline_show(store: &Path, disk: &str) -> Value {
    json_in(store, &["bitmap", "show", "--disk", disk])
}

fn wait_log(a: &AgentProc, needle: &str) {
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(10) {
        if a.log().contains(needle) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("agent log never said {needle:?}:\n{}", a.log());
}

fn signal(a: &AgentProc, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(a.child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn sighup_reloads_without_losing_state_and_sigterm_sigint_commit() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let adir = dir.path().join("a");
    let mut a = AgentProc::start(&adir, "host-a", &ca, "");
    for disk in ["vm/1", "vm/2"] {
        a.json(&[
            "bitmap",
            "create",
            "--disk",
            disk,
            "--size",
            "1G",
            "--granularity",
            "64K",
        ]);
        a.json(&[
            "bitmap",
            "mark",
            "--disk",
            disk,
            "--range",
            "0:1",
            "--range",
            "512M:70000",
        ]);
    }
    let marked = show(&a, "vm/1")["extents"].clone();
    assert_eq!(marked.as_array().map(Vec::len), Some(2), "{marked}");

    // HUP with an unchanged config: the agent stays, says so, loses nothing.
    signal(&a, "HUP");
    wait_log(&a, "config reloaded: nothing changed");
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "SIGHUP killed the agent"
    );
    assert_eq!(show(&a, "vm/1")["extents"], marked);
    assert_eq!(show(&a, "vm/1")["state"], "recording");

    // HUP after an edit: an expectation, a reference and the log filter are applied; a new
    // listen address cannot be and is said to need a restart.
    let cfg_path = adir.join("agent.toml");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(adir.join("backup.img"), vec![0u8; 4096]).unwrap();
    std::fs::write(adir.join("disk.img"), vec![0u8; 4096]).unwrap();
    let (head, tables) = original.split_at(original.find("[tls]").expect("[tls] in the config"));
    let edited = format!(
        "{}log = \"bitferry=debug\"\n{tables}\n\
         [[expect]]\ndisk = \"vm/new\"\nfrom = \"host-b\"\n\
         [[reference]]\ndisk = \"vm/1\"\nimage = \"disk.img\"\nbackup = \"backup.img\"\n",
        head.replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"", 1)
    );
    std::fs::write(&cfg_path, &edited).unwrap();
    signal(&a, "HUP");
    wait_log(&a, "config reloaded");
    wait_log(&a, "expectation added: vm/new from host-b");
    wait_log(&a, "reference added for vm/1");
    wait_log(&a, "`listen` changed in the config but cannot be reloaded");
    let status = a.json(&["status"]);
    assert!(
        status["expectations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["disk"] == "vm/new"),
        "{status}"
    );
    // BITFERRY_LOG (set by the test harness) wins over the config's `log`: said, not applied.
    wait_log(&a, "BITFERRY_LOG sets the log filter");
    // A config that no longer loads changes nothing and the agent keeps running.
    std::fs::write(&cfg_path, "listen = [").unwrap();
    signal(&a, "HUP");
    wait_log(
        &a,
        "config reload failed; the running config stays in force",
    );
    assert_eq!(show(&a, "vm/2")["extents"], marked);
    std::fs::write(&cfg_path, &original).unwrap();

    // SIGTERM: a clean stop, every bitmap committed consistent with its marks.
    signal(&a, "TERM");
    let st = a.child.wait().unwrap();
    assert!(st.success(), "SIGTERM: {st}\n{}", a.log());
    for disk in ["vm/1", "vm/2"] {
        let v = offline_show(&a.store, disk);
        assert_eq!(v["state"], "consistent", "{disk} after SIGTERM: {v}");
        assert_eq!(v["extents"], marked, "{disk} after SIGTERM");
    }
    drop(a);

    // SIGINT after a restart and a HUP: the same.
    let mut a = AgentProc::start(&adir, "host-a", &ca, "");
    a.json(&["bitmap", "mark", "--disk", "vm/2", "--range", "1M:1"]);
    signal(&a, "HUP");
    wait_log(&a, "config reloaded");
    signal(&a, "INT");
    let st = a.child.wait().unwrap();
    assert!(st.success(), "SIGINT: {st}\n{}", a.log());
    let v = offline_show(&a.store, "vm/2");
    assert_eq!(v["state"], "consistent", "{v}");
    assert_eq!(v["dirty_blocks"].as_u64(), Some(1 + 2 + 1), "{v}");
    assert_eq!(offline_show(&a.store, "vm/1")["state"], "consistent");
}

#[test]
fn with_json_every_failure_prints_exactly_one_document() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("store");
    let st = s(&store).to_string();
    let missing = s(&d.join("missing")).to_string();
    let nosock = s(&d.join("no.sock")).to_string();
    std::fs::write(d.join("img"), vec![0u8; 8192]).unwrap();
    let img = s(&d.join("img")).to_string();
    json_in(
        &store,
        &[
            "bitmap",
            "create",
            "--disk",
            "vm/a",
            "--size",
            "1M",
            "--granularity",
            "4K",
        ],
    );
    std::fs::write(d.join("exists"), b"x").unwrap();
    let exists = s(&d.join("exists")).to_string();
    let cases: Vec<(&str, Vec<&str>, i32)> = vec![
        // Usage errors, caught by the parser.
        ("no command", vec![], 2),
        ("unknown command", vec!["frobnicate"], 2),
        ("missing subcommand", vec!["bitmap"], 2),
        ("missing argument", vec!["bitmap", "show"], 2),
        (
            "bad size",
            vec![
                "bitmap",
                "create",
                "--disk",
                "x",
                "--size",
                "lots",
                "--granularity",
                "4K",
            ],
            2,
        ),
        ("bench usage", vec!["bench", "root", "--nonsense"], 2),
        ("demo usage", vec!["demo", "--nonsense"], 2),
        ("cert usage", vec!["cert"], 2),
        // Failures of each command.
        (
            "bitmap create twice",
            vec![
                "--store",
                &st,
                "bitmap",
                "create",
                "--disk",
                "vm/a",
                "--size",
                "1M",
                "--granularity",
                "4K",
            ],
            1,
        ),
        (
            "bitmap mark",
            vec![
                "--store", &st, "bitmap", "mark", "--disk", "nope", "--range", "0:1",
            ],
            1,
        ),
        (
            "bitmap show",
            vec!["--store", &st, "bitmap", "show", "--disk", "nope"],
            1,
        ),
        (
            "bitmap verify",
            vec!["--store", &st, "bitmap", "verify", "--disk", "nope"],
            1,
        ),
        (
            "bitmap export",
            vec![
                "--store", &st, "bitmap", "export", "--disk", "vm/a", "--raw", &exists,
            ],
            1,
        ),
        ("bitmap list", vec!["--store", &exists, "bitmap", "list"], 1),
        ("qcow2 list", vec!["qcow2", "list", &missing], 1),
        (
            "qcow2 import",
            vec![
                "--store", &st, "qcow2", "import", &img, "--bitmap", "b", "--disk", "vm/q",
            ],
            1,
        ),
        (
            "qcow2 export",
            vec![
                "--store", &st, "qcow2", "export", "--disk", "nope", "--bitmap", "b", &missing,
            ],
            1,
        ),
        (
            "qcow2 export-raw",
            vec![
                "qcow2",
                "export-raw",
                &img,
                "--bitmap",
                "b",
                "--raw",
                &missing,
            ],
            1,
        ),
        (
            "manifest create",
            vec!["manifest", "create", "--image", &missing, "--out", &missing],
            1,
        ),
        (
            "rebuild",
            vec![
                "--store", &st, "rebuild", "--image", &missing, "--backup", &img,
            ],
            1,
        ),
        (
            "rebuild status",
            vec!["--control", &nosock, "rebuild", "status"],
            1,
        ),
        (
            "cert init",
            vec![
                "cert", "issue", "--ca", &missing, "--name", "h", "--out", &missing,
            ],
            1,
        ),
        ("agent", vec!["agent", "--config", &missing], 1),
        (
            "agent --check",
            vec!["agent", "--config", &missing, "--check"],
            1,
        ),
        (
            "expect",
            vec!["--control", &nosock, "expect", "--disk", "vm/a"],
            1,
        ),
        ("status", vec!["--control", &nosock, "status"], 1),
        ("shutdown", vec!["--control", &nosock, "shutdown"], 1),
        (
            "migrate without agent",
            vec!["migrate", "--disk", "vm/a", "--to", "127.0.0.1:1"],
            1,
        ),
        (
            "migrate status",
            vec!["--control", &nosock, "migrate", "status", "--disk", "vm/a"],
            1,
        ),
        (
            "migrate abort",
            vec!["--control", &nosock, "migrate", "abort", "--disk", "vm/a"],
            1,
        ),
    ];
    for (what, args, code) in &cases {
        let o = bitferry().arg("--json").args(args).output().unwrap();
        let doc = one_failure(what, &o);
        // Exit codes beyond 2 (3: untrusted, 4: locked) are fine where the command says so.
        if *code == 2 {
            assert_eq!(doc["exit_code"], 2, "{what}: {doc}");
        } else {
            assert_ne!(doc["exit_code"], 2, "{what}: a usage error? {doc}");
        }
    }

    // A migration that fails once started (nobody listens at the destination): one document,
    // the final status with `error` and `exit_code` (it used to be the status, then the error).
    let ca = cluster_ca(&d.join("ca"));
    let a = AgentProc::start(&d.join("a"), "host-a", &ca, "");
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/m",
        "--size",
        "1M",
        "--granularity",
        "4K",
    ]);
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = dead.local_addr().unwrap().to_string();
    drop(dead);
    let o = a.cli(&["--json", "migrate", "--disk", "vm/m", "--to", &to]);
    let doc = one_failure("migrate to nobody", &o);
    assert_eq!(doc["disk"], "vm/m", "{doc}");
}
