//! `bitferry demo`: a complete run on this machine, narrated, in a temporary directory.
//!
//! Two real agents (child processes of this binary) with a private cluster CA; a VM-like writer
//! that writes a real disk image and reports every write; a pre-copy migration while it writes;
//! a post-copy migration back whose source is killed mid-stream; and a rebuild from the backup's
//! block manifest. Every step checks the safety rule against the writer's ground truth.

use super::Ctx;
use super::units::human;
use crate::control::{Request, client::call};
use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wire::{Bitmap, DiskId, Geometry};

/// `demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's directory (stores, logs, images) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Seed of the writer's random writes.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

const DISK: &str = "vm42/vda";
const SIZE: u64 = 4 << 30;
const GRAN: u64 = 64 << 10;

/// An agent child process, killed on drop.
struct AgentChild {
    name: &'static str,
    child: Child,
    control: PathBuf,
    listen: String,
    dir: PathBuf,
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentChild {
    fn call(&self, req: Request) -> Result<Value> {
        call(&self.control, &req, Some(Duration::from_secs(60)))
            .with_context(|| format!("talking to {}", self.name))
    }

    fn status(&self) -> Result<Value> {
        self.call(Request::MigrateStatus {
            disk: DISK.parse()?,
        })
    }

    fn show(&self) -> Result<Value> {
        crate::control::client::show_all(&self.control, &DISK.parse()?)
            .with_context(|| format!("talking to {}", self.name))
    }

    fn wait(&self, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let t = Instant::now();
        loop {
            let st = self.status()?;
            if done(&st) {
                return Ok(st);
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("{what} did not happen within 30 s on {}: {st}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The VM: writes random data to the live image and reports each write to the agent the VM runs
/// on. Records every write since the backup as ground truth.
struct Vm {
    image: PathBuf,
    owner: Mutex<Option<PathBuf>>,
    truth: Mutex<Bitmap>,
    running: AtomicBool,
    writes: std::sync::atomic::AtomicU64,
}

impl Vm {
    fn write_once(&self, rng: &mut impl Rng) -> Result<()> {
        // Held for the whole write, so pausing the VM (`set_owner`) waits for a write in
        // flight to be reported, as a hypervisor's pause does.
        let guard = self.owner.lock().expect("vm lock");
        let Some(owner) = guard.clone() else {
            return Ok(());
        };
        let off = rng.random_range(0..SIZE / 4096) * 4096;
        let len = (rng.random_range(1..64u64) * 4096).min(SIZE - off);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let mut f = std::fs::OpenOptions::new().write(true).open(&self.image)?;
        f.seek(SeekFrom::Start(off))?;
        f.write_all(&data)?;
        // Marked after the write completes, like a real tracker.
        self.truth.lock().expect("vm lock").mark(off, len)?;
        call(
            &owner,
            &Request::Mark {
                disk: DISK.parse()?,
                ranges: vec![(off, len)],
            },
            Some(Duration::from_secs(10)),
        )?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        drop(guard);
        Ok(())
    }

    fn run(self: Arc<Self>, seed: u64) -> std::thread::JoinHandle<Result<()>> {
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while self.running.load(Ordering::Relaxed) {
                self.write_once(&mut rng)?;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    }

    /// Pause (the hypervisor stops the guest), or resume on another host.
    fn set_owner(&self, owner: Option<&Path>) {
        *self.owner.lock().expect("vm lock") = owner.map(Path::to_path_buf);
    }
}

fn say(step: &str) {
    println!("\n== {step}");
}

fn run_cli(exe: &Path, args: &[&str]) -> Result<Value> {
    println!("$ bitferry {}", args.join(" "));
    let out = Command::new(exe)
        .arg("--json")
        .args(args)
        .output()
        .context("running bitferry")?;
    if !out.status.success() {
        bail!(
            "bitferry {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

fn start_agent(exe: &Path, root: &Path, name: &'static str) -> Result<AgentChild> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    run_cli(
        exe,
        &[
            "cert",
            "issue",
            "--ca",
            &root.join("ca").to_string_lossy(),
            "--name",
            name,
            "--out",
            &dir.to_string_lossy(),
        ],
    )?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nstore = \"store\"\ncontrol = \"control.sock\"\n\
             flush_interval_ms = 200\n\n[tls]\nca = \"../ca/ca.pem\"\ncert = \"{name}.pem\"\nkey = \"{name}.key\"\n\n\
             [transport]\nidle_timeout_ms = 2000\nkeep_alive_ms = 300\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = Command::new(exe)
        .env("BITFERRY_LOG", "info")
        .args(["agent", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut a = AgentChild {
        name,
        child,
        control: dir.join("control.sock"),
        listen: String::new(),
        dir,
    };
    let t = Instant::now();
    loop {
        let log = std::fs::read_to_string(a.dir.join("agent.log")).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains("agent ready")) {
            let at = line.find("listen=").context("listen= in the ready line")? + 7;
            a.listen = line[at..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
            break;
        }
        if let Some(st) = a.child.try_wait()? {
            bail!("agent {name} exited ({st}): {log}");
        }
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "agent {name} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "  agent {name} listening on {} (QUIC), control {}",
        a.listen,
        a.control.display()
    );
    Ok(a)
}

/// Whether the reported extents cover every block of `truth`.
fn covers(show: &Value, truth: &Bitmap) -> Result<bool> {
    let mut got = Bitmap::new(truth.geometry());
    for e in show["extents"].as_array().context("extents")? {
        got.mark(
            e["offset"].as_u64().context("offset")?,
            e["length"].as_u64().context("length")?,
        )?;
    }
    let mut missing = truth.clone();
    missing.subtract(&got)?;
    Ok(missing.is_clean())
}

/// Run the demo.
pub fn run(_ctx: &Ctx, a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("bitferry-demo-")
        .tempdir()?;
    let root = tmp.path().to_path_buf();
    let exe = std::env::current_exe()?;
    let disk: DiskId = DISK.parse()?;
    println!("bitferry demo — two agents, a writing VM, migrations with faults, and a rebuild.");
    println!("(working in {}; pass --keep to keep it)", root.display());

    say("1. A cluster CA and one certificate per host: the agents only talk over mutual TLS.");
    run_cli(
        &exe,
        &["cert", "init", "--dir", &root.join("ca").to_string_lossy()],
    )?;
    let host_a = start_agent(&exe, &root, "host-a")?;
    let mut host_b = start_agent(&exe, &root, "host-b")?;

    say("2. A 4 GiB disk with some data, backed up as 'nightly-1' (image + per-block manifest).");
    let live = root.join("live.img");
    let backup = root.join("backup.img");
    {
        let f = std::fs::File::create(&live)?;
        f.set_len(SIZE)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed ^ 1);
        let mut f = std::fs::OpenOptions::new().write(true).open(&live)?;
        for _ in 0..64 {
            let off = rng.random_range(0..SIZE / GRAN) * GRAN;
            let data: Vec<u8> = (0..GRAN).map(|_| rng.random()).collect();
            f.seek(SeekFrom::Start(off))?;
            f.write_all(&data)?;
        }
    }
    let copied = Command::new("cp")
        .arg("--sparse=always")
        .arg(&live)
        .arg(&backup)
        .status()?;
    ensure!(copied.success(), "copying the backup image failed");
    let manifest = root.join("backup.manifest");
    let m = run_cli(
        &exe,
        &[
            "manifest",
            "create",
            "--image",
            &backup.to_string_lossy(),
            "--granularity",
            "64K",
            "--out",
            &manifest.to_string_lossy(),
        ],
    )?;
    println!("  manifest root {}", m["root"].as_str().unwrap_or("?"));
    host_a.call(Request::Create {
        disk: disk.clone(),
        size: SIZE,
        granularity: GRAN,
        checkpoint: Some("nightly-1".into()),
    })?;
    println!("  host-a tracks {DISK} from checkpoint nightly-1 (64 KiB blocks)");

    let vm = Arc::new(Vm {
        image: live.clone(),
        owner: Mutex::new(Some(host_a.control.clone())),
        truth: Mutex::new(Bitmap::new(Geometry::new(SIZE, GRAN)?)),
        running: AtomicBool::new(true),
        writes: 0.into(),
    });
    let writer = vm.clone().run(a.seed);
    std::thread::sleep(Duration::from_millis(500));

    say("3. Live migration host-a → host-b, pre-copy, while the VM keeps writing.");
    host_b.call(Request::Expect {
        disk: disk.clone(),
        from: Some("host-a".into()),
    })?;
    host_a.call(Request::MigrateStart {
        disk: disk.clone(),
        to: host_b.listen.clone(),
        server_name: Some("127.0.0.1".into()),
        rate: None,
    })?;
    std::thread::sleep(Duration::from_millis(600));
    let st = host_a.wait("pre-copy convergence", |s| {
        s["rounds"].as_u64() >= Some(2) || s["finished"] == true
    })?;
    println!(
        "  {} pre-copy rounds done while the VM wrote {} times",
        st["rounds"],
        vm.writes.load(Ordering::Relaxed)
    );
    vm.set_owner(None); // the hypervisor pauses the VM for switchover
    // Every write made before the pause; host-b's bitmap must cover them (it may hold more: the
    // VM resumes on host-b before we look).
    let at_pause = vm.truth.lock().expect("vm lock").clone();
    let writes_at_pause = vm.writes.load(Ordering::Relaxed);
    host_a.call(Request::MigrateSwitchover {
        disk: disk.clone(),
        postcopy: false,
    })?;
    let done = host_a.wait("switchover", |s| s["finished"] == true)?;
    ensure!(done["phase"] == "completed", "pre-copy failed: {done}");
    vm.set_owner(Some(&host_b.control)); // the VM resumes on host-b
    let b = host_b.show()?;
    let raw = root.join("final.raw");
    host_b.call(Request::Export {
        disk: disk.clone(),
        raw: raw.clone(),
        allow_untrusted: false,
        force: false,
    })?;
    let qemu = crate::migrate::bench::qemu_stop_copy_bytes(&std::fs::read(&raw)?);
    let during = done["bytes_during_switchover"].as_u64().unwrap_or(0);
    println!(
        "  done in {:.2} s: {} sent in total; while the VM was paused: {} (QEMU's stop-and-copy would send {} for this bitmap, {:.0}x more)",
        done["seconds"].as_f64().unwrap_or(0.0),
        human(done["bytes_total"].as_u64().unwrap_or(0)),
        human(during),
        human(qemu),
        qemu as f64 / during.max(1) as f64
    );
    println!(
        "  host-b owns it now: epoch {}, state {}, root {} (= host-a's final root: {})",
        b["epoch"],
        b["state"].as_str().unwrap_or("?"),
        &b["root"].as_str().unwrap_or("?")[..16],
        b["root"] == done["root"]
    );
    ensure!(covers(&b, &at_pause)?, "host-b's bitmap misses a write");
    println!(
        "  safety check: host-b's bitmap covers all {writes_at_pause} writes made before the switchover ✓"
    );

    say("4. Post-copy back to host-a: the VM resumes there at once; then host-b dies mid-stream.");
    std::thread::sleep(Duration::from_millis(300));
    host_a.call(Request::Expect {
        disk: disk.clone(),
        from: Some("host-b".into()),
    })?;
    host_b.call(Request::MigrateStart {
        disk: disk.clone(),
        to: host_a.listen.clone(),
        server_name: Some("127.0.0.1".into()),
        rate: Some(512), // a slow link, so the stream is still running when host-b dies
    })?;
    std::thread::sleep(Duration::from_millis(200));
    vm.set_owner(None);
    host_b.call(Request::MigrateSwitchover {
        disk: disk.clone(),
        postcopy: true,
    })?;
    host_a.wait("post-copy switchover", |s| {
        s["phase"] == "post-copy" || s["finished"] == true
    })?;
    vm.set_owner(Some(&host_a.control));
    println!(
        "  host-a owns the disk (epoch 3) and records the VM's writes while the bitmap streams in"
    );
    std::thread::sleep(Duration::from_millis(400));
    println!("  SIGKILL host-b (the post-copy source)");
    let _ = host_b.child.kill();
    let _ = host_b.child.wait();
    let end = host_a.wait("host-a to give up on host-b", |s| s["finished"] == true)?;
    let a_show = host_a.show()?;
    println!(
        "  host-a: migration {}; bitmap state {} — not consistent, so no backup trusts it; its own writes are kept",
        end["phase"].as_str().unwrap_or("?"),
        a_show["state"].as_str().unwrap_or("?")
    );
    ensure!(
        a_show["state"] != "consistent" && a_show["state"] != "recording",
        "a cut post-copy must not look trustworthy: {a_show}"
    );

    say(
        "5. Rebuild host-a's bitmap in the background against the backup's manifest; the VM keeps writing.",
    );
    host_a.call(Request::RebuildStart {
        disk: disk.clone(),
        image: live.clone(),
        manifest: Some(manifest.clone()),
        backup: None,
        granularity: Some(GRAN),
        rate: Some(64 << 20), // 64 MiB/s, so the scan visibly overlaps the VM's writes
    })?;
    let writes_before = vm.writes.load(Ordering::Relaxed);
    let t = Instant::now();
    let job = loop {
        let j = host_a.call(Request::RebuildStatus {
            disk: Some(disk.clone()),
        })?;
        if j["state"] != "running" {
            break j;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "rebuild did not finish: {j}"
        );
        println!(
            "  scanning: {} of {} read at {}/s",
            human(j["done"].as_u64().unwrap_or(0)),
            human(j["total"].as_u64().unwrap_or(0)),
            human(j["rate"].as_f64().unwrap_or(0.0) as u64)
        );
        std::thread::sleep(Duration::from_millis(400));
    };
    ensure!(
        job["state"] == "completed",
        "rebuild did not complete: {job}"
    );
    println!(
        "  done: read {} of the live disk (holes skipped) in {:.1} s; the VM wrote {} times meanwhile",
        human(job["bytes_read"].as_u64().unwrap_or(0)),
        t.elapsed().as_secs_f64(),
        vm.writes.load(Ordering::Relaxed) - writes_before
    );
    std::thread::sleep(Duration::from_millis(300));
    vm.running.store(false, Ordering::Relaxed);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let r = host_a.show()?;
    let truth = vm.truth.lock().expect("vm lock").clone();
    println!(
        "  host-a: state {}, {} dirty blocks, checkpoint {} (bound to the manifest's root)",
        r["state"].as_str().unwrap_or("?"),
        r["dirty_blocks"],
        r["checkpoint"].as_str().unwrap_or("?")
    );
    ensure!(
        r["state"] == "recording",
        "the rebuilt bitmap is not live: {r}"
    );
    ensure!(covers(&r, &truth)?, "the rebuilt bitmap misses a write");
    println!(
        "  safety check: the bitmap covers all {} writes since the backup, including those made during the scan ✓",
        vm.writes.load(Ordering::Relaxed)
    );
    let v = host_a.call(Request::Verify { disk: disk.clone() })?;
    println!("  verify: ok, root {}", v["root"].as_str().unwrap_or("?"));

    println!("\nDemo finished in {:.1} s.", t0.elapsed().as_secs_f64());
    if a.keep {
        drop(host_a);
        drop(host_b);
        println!("kept {}", tmp.keep().display());
    }
    Ok(())
}
