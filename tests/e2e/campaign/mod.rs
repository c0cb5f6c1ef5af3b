//! # The kill campaign
//!
//! Two real `bitferry agent` processes (`host-a`, `host-b`) on loopback with a cluster CA, a
//! "VM" per iteration whose writes land in a sparse live image and are reported with real
//! `bitferry --control SOCK bitmap mark` processes (three in parallel), and SIGKILLs at chosen
//! moments of every phase of a disk's life. After each kill the victim restarts on the same
//! store, the survivors settle, and a ground-truth checker compares what every host reports
//! (`bitmap show --json` through its control socket) with what the markers were told.
//!
//! ## An iteration
//!
//! 1. A new disk `vm/kI` (16 GiB at 4 KiB: 512 KiB of bitmap, 8 chunks) is created on one host
//!    and pre-filled with marks across all chunks; sometimes (a "hop") it first migrates cleanly
//!    to the other host, so the kill happens at epoch 2 → 3 and the first host holds a
//!    retirement record.
//! 2. Markers start on the host the VM runs on. Each one writes non-zero random bytes into the
//!    disk's live image and then marks the range (write first, mark after: the tracker
//!    convention rebuilds rely on, docs/rebuild.md). Routing follows the hook contract of
//!    docs/operations.md §Migrations: a mark goes to the VM's host; when that host refuses it
//!    because a switchover was requested ("this mark was NOT recorded here"), the marker reports
//!    it to the destination instead. The VM moves to the destination when `migrate switchover`
//!    exits 0.
//! 3. A phase is run and one agent is killed in it ([`Phase`]): idle owner with marks, bulk
//!    (rate-limited), pre-copy rounds, right after a pre-copy `migrate switchover`, right after
//!    a `--postcopy` switchover, during the post-copy stream, during a rebuild (the owner is
//!    killed once to lose its bitmap, restarts, rebuilds it from its `[[reference]]` at a
//!    limited rate while marks keep coming, and is killed again mid-scan), and during a clean
//!    stop (SIGTERM, then SIGKILL a few milliseconds later, while `close()` commits).
//!    The victim (source or destination) and the delay are random.
//! 4. Markers keep running on the survivor until its side of the migration ends; it must end
//!    within the configured limits (idle timeout, switchover silence, frame stall, plus slack):
//!    otherwise it is reported **stuck**. Then the VM pauses (markers stop), the victim restarts
//!    on its store, the harness finds the owner (the host at the highest epoch, unless that is
//!    the source's handed-over `incomplete` copy: then there is none) and the VM runs there for
//!    a random while (markers on the owner, also during the automatic rebuilds a restart
//!    starts). Then markers stop, rebuilds are given time to finish, and every disk of the
//!    current window (this iteration's and the earlier ones since the last reset) is checked on
//!    both hosts.
//! 5. Every few iterations both agents stop cleanly (SIGTERM), restart, every disk is checked
//!    once more, and the stores are wiped.
//!
//! Most disks have a `[[reference]]` (the live image against an all-zero backup, the state at
//! creation), so an agent that restarts with a disk `inconsistent` (a `recording` file left by
//! the kill) or `incomplete` after a cut post-copy rebuilds it by itself; some have none and
//! stay untrusted.
//!
//! ## What is checked
//!
//! An **acknowledged** mark is a `bitmap mark` that exited 0, on whichever host answered (also a
//! destination answering `"forwarded_to_migration": true`). All acknowledged marks of a disk
//! count, from its creation on: no checkpoint is ever taken, and a rebuild's checkpoint is the
//! all-zero backup, the state at creation. Per disk, over the entries the hosts hold:
//!
//! 1. **Superset**: an entry reported `recording` or `consistent` contains every block of every
//!    acknowledged range (its extents, compared block by block at the disk's granularity).
//! 2. **One entry per epoch**: no two hosts hold an entry (in any state) at the same epoch.
//! 3. **No stale owner**: an entry in an owner state — `recording`, `consistent`,
//!    `rebuilding`, `inconsistent` — is at the highest epoch known for the disk (over all
//!    entries and all retirement records), and above the epoch its own host retired the disk at.
//!    `incomplete` below the top is allowed: a source keeps its copy `incomplete` after the
//!    switchover without owning it (docs/protocol.md §6).
//!
//! With 2 and 3, at most one host claims ownership — holds an owner state, or `incomplete` at
//! the highest epoch — which is the protocol's "exactly one owner per epoch". No owner at all
//! (only the source's `incomplete` copy) is allowed (§6: safe, not live) and counted.
//! `inconsistent`, `incomplete` and `rebuilding` are the code saying it cannot prove the
//! superset: allowed, counted by kind. Also violations: a migration that does not end within
//! the limits after its peer died, a mark or CLI command that hangs, an agent that panics (its
//! log) or does not restart, and a clean migration (no fault) that fails.
//!
//! ## Running it
//!
//! `cargo build --bin bitferry && cargo nextest run -E 'test(kill_campaign)'` runs the CI size
//! (`BITFERRY_KILLS`, default 30 SIGKILLs). `BITFERRY_TEST_SEED=N` replays a run's choices
//! (phases, victims, delays, ranges; process timing is not replayed), and
//! `BITFERRY_KILL_ITERATIONS=7,12` (or `7..12`) runs only those iterations of that seed. A long
//! hand run: `BITFERRY_KILLS=500 cargo nextest run --no-capture -E 'test(kill_campaign)'`.
//! On a violation the test fails, prints each with its iteration and replay command, and keeps
//! its directory (agent logs, stores) for inspection.

pub mod checker;

pub use crate::common::Limits;
use crate::common::{AgentProc, agent_toml, bitferry, bitferry_path, cluster_ca};
use agent::control::{Request, client};
use checker::{Ack, DiskView, Entry};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wire::Geometry;

/// Disk size: 16 GiB at 4 KiB is 512 KiB of bitmap in 8 chunks, so a bulk has chunks to cut.
pub const SIZE: u64 = 16 << 30;
/// Granularity.
pub const GRAN: u64 = 4096;
const MIB: u64 = 1 << 20;

/// The phases a kill lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// The owner records marks, no migration.
    Idle,
    /// A rate-limited bulk (round 0) is streaming.
    Bulk,
    /// Pre-copy rounds after the first round was acknowledged.
    Precopy,
    /// Right after `migrate switchover` (pre-copy) was called.
    Switchover,
    /// Right after `migrate switchover --postcopy` was called.
    PostcopySwitchover,
    /// While the post-copy stream runs.
    Postcopy,
    /// While the owner rebuilds the bitmap from its reference.
    Rebuild,
    /// While the agent stops cleanly (SIGTERM, then SIGKILL).
    Shutdown,
}

impl Phase {
    /// Every phase, in the order the scheduler cycles through them.
    pub const ALL: [Phase; 8] = [
        Phase::Idle,
        Phase::Bulk,
        Phase::Precopy,
        Phase::Switchover,
        Phase::PostcopySwitchover,
        Phase::Postcopy,
        Phase::Rebuild,
        Phase::Shutdown,
    ];

    /// Its id in `BITFERRY_KILL_PHASES`.
    pub fn id(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Bulk => "bulk",
            Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::PostcopySwitchover => "postcopy-switchover",
            Phase::Postcopy => "postcopy",
            Phase::Rebuild => "rebuild",
            Phase::Shutdown => "shutdown",
        }
    }

    /// Its name in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle owner",
            Phase::Bulk => "bulk",
            Phase::Precopy => "pre-copy rounds",
            Phase::Switchover => "after pre-copy switchover",
            Phase::PostcopySwitchover => "after post-copy switchover",
            Phase::Postcopy => "during post-copy",
            Phase::Rebuild => "during rebuild",
            Phase::Shutdown => "during clean stop",
        }
    }
}

impl Limits {
    /// The campaign's limits (small, so a dead peer is noticed quickly).
    pub const CAMPAIGN: Limits = Limits {
        idle_ms: 2000,
        keep_alive_ms: 300,
        frame_stall_ms: 2000,
        silence_ms: 3000,
        flush_ms: 100,
    };

    /// How long a migration may still run after its peer died: every limit that can apply in
    /// turn, plus slack for a loaded machine.
    pub fn stuck_after(&self) -> Duration {
        Duration::from_millis(self.idle_ms + self.frame_stall_ms + self.silence_ms + 10_000)
    }
}

/// A `[[reference]]` entry of an agent config.
#[derive(Debug, Clone)]
struct Reference {
    disk: String,
    image: PathBuf,
    rate: Option<u64>,
}

/// One agent of the campaign: its directory, config and process, restarted on the same store.
pub struct Host {
    /// Certificate name.
    pub name: String,
    dir: PathBuf,
    ca: PathBuf,
    backup: PathBuf,
    limits: Limits,
    proc: Option<AgentProc>,
    references: Vec<Reference>,
    /// Logs of earlier runs of this agent (each run truncates `agent.log`).
    archive: PathBuf,
}

impl Host {
    fn new(dir: &Path, name: &str, ca: &Path, backup: &Path, limits: Limits) -> Host {
        std::fs::create_dir_all(dir).unwrap();
        let out = bitferry()
            .args(["cert", "issue", "--ca"])
            .arg(ca)
            .args(["--name", name, "--out"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cert issue: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Host {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            ca: ca.to_path_buf(),
            backup: backup.to_path_buf(),
            limits,
            proc: None,
            references: Vec::new(),
            archive: dir.join("agent.log.all"),
        }
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn write_config(&self) {
        let mut c = String::new();
        for r in &self.references {
            let _ = write!(
                c,
                "\n[[reference]]\ndisk = \"{}\"\nimage = \"{}\"\nbackup = \"{}\"\n",
                r.disk,
                r.image.display(),
                self.backup.display()
            );
            if let Some(rate) = r.rate {
                let _ = writeln!(c, "rate = {rate}");
            }
        }
        std::fs::write(
            self.dir.join("agent.toml"),
            agent_toml(&self.name, &self.ca, Some(self.limits), &c),
        )
        .unwrap();
    }

    /// Move the current log to the archive; return what it said about panics.
    fn archive_log(&self) -> Option<String> {
        let log_path = self.dir.join("agent.log");
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.is_empty() {
            return None;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.archive)
            .unwrap();
        std::io::Write::write_all(&mut f, log.as_bytes()).unwrap();
        std::io::Write::write_all(&mut f, b"----- (agent run ended) -----\n").unwrap();
        let _ = std::fs::remove_file(&log_path);
        log.find("panicked").map(|at| {
            let start = log[..at].rfind('\n').map_or(0, |p| p + 1);
            log[start..].lines().take(6).collect::<Vec<_>>().join("\n")
        })
    }

    /// Start the agent (writing its config first) and wait until it answers.
    fn start(&mut self) -> Result<(), String> {
        assert!(self.proc.is_none(), "{} is already running", self.name);
        self.write_config();
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        let child = bitferry()
            .env("BITFERRY_LOG", "info")
            .arg("agent")
            .arg("--config")
            .arg(self.dir.join("agent.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        let mut p = AgentProc {
            child,
            control: self.control(),
            store: self.store(),
            dir: self.dir.clone(),
        };
        let t = Instant::now();
        loop {
            if let Some(st) = p.child.try_wait().unwrap() {
                return Err(format!(
                    "{} exited at start-up ({st}): {}",
                    self.name,
                    p.log()
                ));
            }
            if std::os::unix::net::UnixStream::connect(&p.control).is_ok()
                && p.log().contains("agent ready")
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                p.kill();
                return Err(format!("{} did not come up within 30 s", self.name));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.proc = Some(p);
        Ok(())
    }

    fn running(&self) -> bool {
        self.proc.is_some()
    }

    fn addr(&self) -> String {
        self.proc.as_ref().expect("running").listen_addr()
    }

    /// SIGKILL. `Ok(())` if the process was alive when the signal went, else how it had
    /// ended by itself.
    fn kill(&mut self) -> Result<(), Option<std::process::ExitStatus>> {
        let Some(mut p) = self.proc.take() else {
            return Err(None);
        };
        let exited = p.child.try_wait().unwrap();
        p.kill();
        match exited {
            None => Ok(()),
            Some(st) => Err(Some(st)),
        }
    }

    fn sigterm(&self) {
        if let Some(p) = &self.proc {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(p.child.id().to_string())
                .status();
        }
    }

    /// SIGTERM, then SIGKILL after `delay`; as [`Host::kill`].
    fn terminate_then_kill(
        &mut self,
        delay: Duration,
    ) -> Result<(), Option<std::process::ExitStatus>> {
        self.sigterm();
        std::thread::sleep(delay);
        self.kill()
    }

    /// SIGTERM and wait up to 30 s for the exit (then SIGKILL); `Err` says what went wrong.
    fn stop(&mut self) -> Result<(), String> {
        if self.proc.is_none() {
            return Ok(());
        }
        self.sigterm();
        let t = Instant::now();
        let mut p = self.proc.take().unwrap();
        loop {
            if let Some(st) = p.child.try_wait().unwrap() {
                return if st.success() {
                    Ok(())
                } else {
                    Err(format!("{} exited with {st} on SIGTERM", self.name))
                };
            }
            if t.elapsed() > Duration::from_secs(30) {
                p.kill();
                return Err(format!("{} did not stop within 30 s of SIGTERM", self.name));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// One control request through the library client (the same socket the CLI uses).
    fn call(&self, req: &Request) -> Result<Value, String> {
        client::call(&self.control(), req, Some(Duration::from_secs(20))).map_err(|e| e.to_string())
    }

    fn migrate_status(&self, disk: &str) -> Option<Value> {
        self.call(&Request::MigrateStatus {
            disk: disk.parse().unwrap(),
        })
        .ok()
    }

    /// Rebuild jobs still running on this agent.
    fn rebuilds_running(&self) -> Vec<String> {
        match self.call(&Request::Status) {
            Ok(v) => v["rebuilds"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|r| r["state"] == "running")
                        .map(|r| r["disk"].as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// `bitmap show --json` with the real CLI: the entry, `None` when the host has none.
    fn show(&self, disk: &str) -> Result<Option<Entry>, String> {
        let out = run_cli(
            &self.control(),
            &["--json", "bitmap", "show", "--disk", disk],
            Duration::from_secs(20),
        );
        if out.code != Some(0) {
            let text = format!("{}{}", out.stdout, out.stderr);
            if text.contains("no bitmap for disk") {
                // A file the agent skipped as unreadable is not "nothing".
                let file = self
                    .store()
                    .join(agent::store::file_name(&disk.parse().unwrap()));
                if file.exists() {
                    return Ok(Some(Entry {
                        host: self.name.clone(),
                        state: "unreadable".into(),
                        epoch: 0,
                        extents: None,
                        reason: Some("file exists but the agent does not hold it".into()),
                    }));
                }
                return Ok(None);
            }
            return Err(format!("bitmap show on {}: {text}", self.name));
        }
        let v: Value = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("bitmap show on {}: {e}: {}", self.name, out.stdout))?;
        let extents = v["extents"].as_array().map(|a| {
            a.iter()
                .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
                .collect()
        });
        Ok(Some(Entry {
            host: self.name.clone(),
            state: v["state"].as_str().unwrap_or("?").to_string(),
            epoch: v["epoch"].as_u64().unwrap_or(0),
            extents,
            reason: v["reason"].as_str().map(str::to_string),
        }))
    }

    /// The epoch in this host's retirement record for `disk`, if any.
    fn retired_at(&self, disk: &str) -> Option<u64> {
        let name = agent::store::file_name(&disk.parse().unwrap());
        let stem = name.strip_suffix(".bfb").unwrap_or(&name);
        let text = std::fs::read_to_string(self.store().join(format!("{stem}.retired"))).ok()?;
        text.lines().nth(2)?.parse().ok()
    }
}

/// What a CLI process did.
#[derive(Debug, Default)]
pub struct CliOut {
    /// Exit code; `None` if it was killed (timeout) or died by a signal.
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// It did not exit within the timeout and was killed.
    pub timed_out: bool,
}

fn spawn_cli(control: &Path, args: &[&str]) -> Child {
    bitferry()
        .arg("--control")
        .arg(control)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bitferry")
}

/// Wait for a CLI child at most `timeout`; kill it after that. Its pipes are drained while it
/// runs (a `bitmap show` of a busy bitmap prints more than a pipe holds).
fn finish_cli(mut child: Child, timeout: Duration) -> CliOut {
    fn drain(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    }
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let t = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            timed_out = true;
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    CliOut {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        timed_out,
    }
}

/// Run `bitferry --control SOCK ARGS…` with a timeout.
pub fn run_cli(control: &Path, args: &[&str], timeout: Duration) -> CliOut {
    finish_cli(spawn_cli(control, args), timeout)
}

/// Where the VM's writes are reported.
#[derive(Debug, Clone, Default)]
struct Route {
    /// The VM's host (name, control socket); `None` while the VM is paused.
    primary: Option<(String, PathBuf)>,
    /// Where a mark refused for a requested switchover goes (the migration's destination).
    fallback: Option<(String, PathBuf)>,
}

/// Mark counters of a run.
#[derive(Debug, Default, Clone)]
pub struct MarkCounts {
    /// `bitmap mark` processes run.
    pub attempts: u64,
    /// … that exited 0.
    pub acked: u64,
    /// … acknowledged by the destination after the source refused them.
    pub redirected: u64,
    /// … acknowledged with `"forwarded_to_migration": true`.
    pub forwarded: u64,
    /// … refused by the source because a switchover was requested.
    pub refused_switchover: u64,
    /// … that failed otherwise (agent down, disk unknown, …): not acknowledged.
    pub failed: u64,
    /// Failures by where they happened and why (numbers replaced by `N`).
    pub why_failed: BTreeMap<String, u64>,
}

impl MarkCounts {
    fn add(&mut self, o: &MarkCounts) {
        self.attempts += o.attempts;
        self.acked += o.acked;
        self.redirected += o.redirected;
        self.forwarded += o.forwarded;
        self.refused_switchover += o.refused_switchover;
        self.failed += o.failed;
        for (k, v) in &o.why_failed {
            *self.why_failed.entry(k.clone()).or_default() += v;
        }
    }
}

/// A failed CLI call's reason, with numbers replaced by `N` so they group.
fn why(out: &CliOut) -> String {
    let text = serde_json::from_str::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| out.stderr.lines().last().unwrap_or("").to_string());
    let mut norm = String::new();
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            if !norm.ends_with('N') {
                norm.push('N');
            }
        } else {
            norm.push(ch);
        }
    }
    norm.chars().take(100).collect()
}

struct MarkShared {
    disk: String,
    image: PathBuf,
    t0: Instant,
    route: Mutex<Route>,
    inflight: AtomicUsize,
    stop: AtomicBool,
    acks: Arc<Mutex<Vec<Ack>>>,
    counts: Mutex<MarkCounts>,
    problems: Mutex<Vec<String>>,
    written: std::sync::atomic::AtomicU64,
}

/// The VM's writers: threads that write the live image and report each write with a
/// `bitmap mark` process, following the hook contract.
struct Markers {
    shared: Arc<MarkShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Markers {
    fn start(
        disk: &str,
        image: &Path,
        acks: Arc<Mutex<Vec<Ack>>>,
        t0: Instant,
        rng: &mut StdRng,
    ) -> Markers {
        let shared = Arc::new(MarkShared {
            disk: disk.to_string(),
            image: image.to_path_buf(),
            t0,
            route: Mutex::new(Route::default()),
            inflight: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            acks,
            counts: Mutex::new(MarkCounts::default()),
            problems: Mutex::new(Vec::new()),
            written: 0.into(),
        });
        let threads = (0..3)
            .map(|_| {
                let s = shared.clone();
                let seed: u64 = rng.random();
                std::thread::spawn(move || marker(&s, StdRng::seed_from_u64(seed), None))
            })
            .collect();
        Markers { shared, threads }
    }

    /// A burst of writes from `threads` more writers, `each` writes apiece, on the current
    /// route: what a VM's queue drains while its switchover is requested.
    fn burst(&mut self, threads: usize, each: usize, rng: &mut StdRng) {
        for _ in 0..threads {
            let s = self.shared.clone();
            let seed: u64 = rng.random();
            self.threads.push(std::thread::spawn(move || {
                marker(&s, StdRng::seed_from_u64(seed), Some(each))
            }));
        }
    }

    /// The VM runs on `primary`; refused marks go to `fallback`.
    fn route(&self, primary: &Host, fallback: Option<&Host>) {
        *self.shared.route.lock().unwrap() = Route {
            primary: Some((primary.name.clone(), primary.control())),
            fallback: fallback.map(|f| (f.name.clone(), f.control())),
        };
    }

    /// Pause the VM: no new marks, and wait until the ones in flight have ended.
    fn pause(&self) {
        self.shared.route.lock().unwrap().primary = None;
        let t = Instant::now();
        while self.shared.inflight.load(Ordering::SeqCst) > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "marks in flight for a minute"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn stop(self) -> (MarkCounts, Vec<String>, u64) {
        self.pause();
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("marker thread");
        }
        let c = self.shared.counts.lock().unwrap().clone();
        let p = self.shared.problems.lock().unwrap().clone();
        (c, p, self.shared.written.load(Ordering::SeqCst))
    }
}

/// Random ranges of one write: mostly small, sometimes up to 256 KiB.
fn ranges(rng: &mut StdRng, n: usize) -> Vec<(u64, u64)> {
    (0..n)
        .map(|_| {
            let len = if rng.random_bool(0.03) {
                rng.random_range(16 << 10..256 << 10)
            } else {
                rng.random_range(1..16 << 10)
            };
            (rng.random_range(0..SIZE - len), len)
        })
        .collect()
}

/// Write non-zero random bytes (so every written block differs from the all-zero backup).
fn write_image(file: &std::fs::File, rng: &mut StdRng, rs: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    for &(o, l) in rs {
        let mut buf = vec![0u8; l as usize];
        rng.fill(&mut buf[..]);
        for b in &mut buf {
            *b |= 1;
        }
        file.write_all_at(&buf, o).unwrap();
        total += l;
    }
    total
}

fn mark_args<'a>(disk: &'a str, specs: &'a [String]) -> Vec<&'a str> {
    let mut a = vec!["--json", "bitmap", "mark", "--disk", disk];
    for s in specs {
        a.extend(["--range", s.as_str()]);
    }
    a
}

/// One writer: until stopped, or for `limit` writes (a burst).
fn marker(s: &MarkShared, mut rng: StdRng, limit: Option<usize>) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap();
    let mut done = 0;
    while !s.stop.load(Ordering::SeqCst) && limit.is_none_or(|l| done < l) {
        let route = {
            let r = s.route.lock().unwrap();
            if r.primary.is_some() {
                s.inflight.fetch_add(1, Ordering::SeqCst);
                Some(r.clone())
            } else {
                None
            }
        };
        let Some(route) = route else {
            if limit.is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        done += 1;
        let n = rng.random_range(1..4);
        let rs = ranges(&mut rng, n);
        let w = write_image(&file, &mut rng, &rs);
        s.written.fetch_add(w, Ordering::SeqCst);
        let specs: Vec<String> = rs.iter().map(|(o, l)| format!("{o}:{l}")).collect();
        let (pname, psock) = route.primary.clone().unwrap();
        let out = run_cli(&psock, &mark_args(&s.disk, &specs), Duration::from_secs(15));
        let mut c = MarkCounts {
            attempts: 1,
            ..Default::default()
        };
        let mut acked = None;
        if out.timed_out {
            s.problems.lock().unwrap().push(format!(
                "a bitmap mark on {pname} did not return within 15 s"
            ));
        } else if out.code == Some(0) {
            acked = Some((pname.clone(), out, format!("vm on {pname}")));
        } else if (out.stderr.contains("NOT recorded") || out.stdout.contains("NOT recorded"))
            && let Some((fname, fsock)) = route.fallback.clone()
        {
            c.refused_switchover += 1;
            c.attempts += 1;
            let out2 = run_cli(&fsock, &mark_args(&s.disk, &specs), Duration::from_secs(15));
            if out2.timed_out {
                s.problems.lock().unwrap().push(format!(
                    "a bitmap mark on {fname} did not return within 15 s"
                ));
            } else if out2.code == Some(0) {
                c.redirected += 1;
                acked = Some((
                    fname.clone(),
                    out2,
                    format!("redirected to {fname} after {pname} refused it"),
                ));
            } else {
                c.failed += 1;
                c.why_failed
                    .insert(format!("destination, after a refusal: {}", why(&out2)), 1);
            }
        } else {
            if out.stderr.contains("NOT recorded") || out.stdout.contains("NOT recorded") {
                c.refused_switchover += 1;
            }
            c.failed += 1;
            c.why_failed.insert(format!("vm host: {}", why(&out)), 1);
        }
        if c.failed > 0 {
            // The host is down or does not know the disk: do not spin.
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some((host, out, why)) = acked {
            let forwarded = out.stdout.contains("\"forwarded_to_migration\":true")
                || out.stdout.contains("\"forwarded_to_migration\": true");
            c.acked += 1;
            c.forwarded += u64::from(forwarded);
            s.acks.lock().unwrap().push(Ack {
                ranges: rs,
                host,
                at_ms: s.t0.elapsed().as_millis() as u64,
                route: why,
                forwarded,
            });
        }
        s.counts.lock().unwrap().add(&c);
        s.inflight.fetch_sub(1, Ordering::SeqCst);
        if limit.is_none() {
            let pause = rng.random_range(0..8);
            std::thread::sleep(Duration::from_millis(pause));
        }
    }
}

/// What the scheduler decided for one iteration (a pure function of the seed and the index).
#[derive(Debug, Clone)]
struct Plan {
    phase: Phase,
    /// Index of the host the disk is created on.
    first: usize,
    /// Migrate cleanly to the other host first.
    hop: bool,
    /// Kill the migration's destination (or, idle and shutdown, the host that is not the
    /// owner) instead of the source/owner.
    kill_dest: bool,
    /// A `[[reference]]` is configured for the disk.
    reference: bool,
    /// Where the kill lands inside its window, 0..1.
    at: f64,
    /// The clean stop of the shutdown phase happens during a pre-copy migration.
    shutdown_migrating: bool,
    /// RNG for everything else in the iteration.
    seed: u64,
}

fn plan(seed: u64, i: usize, phases: &[Phase]) -> Plan {
    // Phases cycle in a fresh random order every `phases.len()` iterations.
    let cycle = i / phases.len();
    let mut order = phases.to_vec();
    order.shuffle(&mut StdRng::seed_from_u64(
        seed ^ (cycle as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    ));
    let phase = order[i % phases.len()];
    let mut rng = StdRng::seed_from_u64(
        seed.wrapping_add((i as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03)),
    );
    Plan {
        phase,
        first: rng.random_range(0..2),
        hop: rng.random_bool(0.25),
        kill_dest: rng.random_bool(0.5),
        reference: phase == Phase::Rebuild || rng.random_bool(0.8),
        at: rng.random(),
        shutdown_migrating: rng.random_bool(0.5),
        seed: rng.random(),
    }
}

/// A disk of the current window.
struct DiskRec {
    disk: String,
    iteration: usize,
    phase: Phase,
    acks: Arc<Mutex<Vec<Ack>>>,
}

/// A violation, with where to replay it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Iteration index.
    pub iteration: usize,
    /// Its phase.
    pub phase: Phase,
    /// What went wrong.
    pub text: String,
}

/// Counters for the summary.
#[derive(Debug, Default)]
pub struct Stats {
    /// SIGKILLs that hit a live agent.
    pub kills: u32,
    /// … by phase.
    pub by_phase: BTreeMap<&'static str, u32>,
    /// … by victim role (source, destination, owner, non-owner).
    pub by_victim: BTreeMap<String, u32>,
    /// The source's migration phase (or rebuild state) just before each kill.
    pub observed: BTreeMap<String, u32>,
    /// How each iteration's disk ended on each host (`role:state`), after settling.
    pub outcomes: BTreeMap<String, u32>,
    /// Every entry seen at every check, by state.
    pub states: BTreeMap<String, u32>,
    /// Iterations in which no host owned the disk (only a source's `incomplete` copy).
    pub no_owner: u32,
    /// Marks.
    pub marks: MarkCounts,
    /// Bytes the VMs wrote.
    pub written: u64,
    /// Longest time a survivor's migration took to end after the kill.
    pub max_end_ms: u64,
    /// Rebuilds still running when a check gave up waiting.
    pub rebuilds_unfinished: u32,
    /// Clean stops that finished before their SIGKILL.
    pub stopped_before_kill: u32,
    /// Iterations run.
    pub iterations: usize,
}

fn bump<K: Ord>(m: &mut BTreeMap<K, u32>, k: K) {
    *m.entry(k).or_default() += 1;
}

/// The campaign: two hosts, the current window of disks, counters and violations.
pub struct Campaign {
    seed: u64,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    hosts: [Host; 2],
    window: Vec<DiskRec>,
    generation: u32,
    /// Counters.
    pub stats: Stats,
    /// Violations so far.
    pub violations: Vec<Violation>,
    limits: Limits,
    /// When the current iteration started, and what happened in it so far.
    t0: Instant,
    events: Vec<String>,
    /// The timelines of iterations with violations.
    timelines: BTreeMap<usize, String>,
    /// Checker findings already reported (a lasting one is reported once).
    reported: std::collections::BTreeSet<String>,
    /// The phases to cycle through (`BITFERRY_KILL_PHASES`; all by default).
    phases: Vec<Phase>,
    /// Iterations per window before both stores are wiped.
    pub window_len: usize,
    test: String,
}

impl Campaign {
    /// Set up the CA, the shared all-zero backup and two agents.
    pub fn new(test: &str, seed: u64, limits: Limits) -> Campaign {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let ca = cluster_ca(&root.join("ca"));
        let backup = root.join("zero.img");
        std::fs::File::create(&backup)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        std::fs::create_dir_all(root.join("images")).unwrap();
        let hosts = [
            Host::new(&root.join("a"), "host-a", &ca, &backup, limits),
            Host::new(&root.join("b"), "host-b", &ca, &backup, limits),
        ];
        Campaign {
            seed,
            dir: Some(dir),
            root,
            hosts,
            window: Vec::new(),
            generation: 0,
            stats: Stats::default(),
            violations: Vec::new(),
            limits,
            t0: Instant::now(),
            events: Vec::new(),
            timelines: BTreeMap::new(),
            reported: Default::default(),
            phases: Phase::ALL.to_vec(),
            window_len: 6,
            test: test.to_string(),
        }
    }

    fn event(&mut self, text: String) {
        let ms = self.t0.elapsed().as_millis();
        self.events.push(format!("{ms} ms {text}"));
    }

    fn image(&self, disk: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.img", disk.replace('/', "_")))
    }

    fn violation(&mut self, i: usize, phase: Phase, text: String) {
        eprintln!("VIOLATION (iteration {i}, {}): {text}", phase.name());
        self.event(format!(
            "VIOLATION: {}",
            text.chars().take(200).collect::<String>()
        ));
        self.violations.push(Violation {
            iteration: i,
            phase,
            text,
        });
    }

    /// Start a window: wipe both stores and images, configure references for the window's
    /// disks, start both agents.
    fn begin_window(&mut self, iterations: &[usize]) {
        self.generation += 1;
        let refs: Vec<Reference> = iterations
            .iter()
            .map(|&i| (i, plan(self.seed, i, &self.phases)))
            .filter(|(_, p)| p.reference)
            .map(|(i, p)| {
                let disk = format!("vm/k{i}");
                Reference {
                    image: self.image(&disk),
                    disk,
                    // A rebuild phase needs a scan slow enough to be killed in.
                    rate: (p.phase == Phase::Rebuild).then_some(4 * MIB),
                }
            })
            .collect();
        for h in &mut self.hosts {
            let _ = std::fs::remove_dir_all(h.store());
            h.references = refs.clone();
            if let Err(e) = h.start() {
                panic!("{e}");
            }
        }
    }

    /// End a window: stop both agents cleanly, restart them, check every disk, wipe.
    fn end_window(&mut self) {
        let Some(last) = self.window.last().map(|r| (r.iteration, r.phase)) else {
            return;
        };
        self.t0 = Instant::now();
        self.events.clear();
        let before = self.violations.len();
        for k in 0..2 {
            if let Err(e) = self.hosts[k].stop() {
                self.violation(last.0, last.1, e);
            }
            self.restart(k, last.0, last.1);
        }
        self.settle_rebuilds();
        self.check_window(last.0, last.1, "after a clean stop and restart");
        for k in 0..2 {
            let _ = self.hosts[k].kill();
            if let Some(p) = self.hosts[k].archive_log() {
                let name = self.hosts[k].name.clone();
                self.violation(last.0, last.1, format!("{name} panicked: {p}"));
            }
        }
        if self.violations.len() > before {
            let t = self.timelines.entry(last.0).or_default();
            t.push_str("\n      end of the window: ");
            t.push_str(&self.events.join("\n      "));
        }
        for r in self.window.drain(..) {
            let _ = std::fs::remove_file(
                self.root
                    .join("images")
                    .join(format!("{}.img", r.disk.replace('/', "_"))),
            );
        }
    }

    /// Restart host `k` on its store (archiving its log and reporting a panic in it).
    fn restart(&mut self, k: usize, i: usize, phase: Phase) {
        if let Some(p) = self.hosts[k].archive_log() {
            let name = self.hosts[k].name.clone();
            self.violation(i, phase, format!("{name} panicked: {p}"));
        }
        if self.hosts[k].running() {
            return;
        }
        let name = self.hosts[k].name.clone();
        self.event(format!("restart {name}"));
        if let Err(e) = self.hosts[k].start() {
            self.violation(i, phase, format!("restart failed: {e}"));
            // Try once more, so the campaign can go on; a second failure ends it.
            if let Err(e) = self.hosts[k].start() {
                panic!("seed {}: {e}", self.seed);
            }
        }
    }

    /// SIGKILL host `k` in `phase`, counting it; an agent that had died by itself is a
    /// violation.
    fn kill(&mut self, k: usize, i: usize, phase: Phase, role: &str, observed: String) {
        match self.hosts[k].kill() {
            Ok(()) => self.count_kill(phase, role, observed),
            Err(st) => {
                let name = self.hosts[k].name.clone();
                self.violation(
                    i,
                    phase,
                    format!("{name} had exited by itself before its kill: {st:?}"),
                );
            }
        }
    }

    fn count_kill(&mut self, phase: Phase, role: &str, observed: String) {
        self.event(format!("SIGKILL hit the {role} ({observed})"));
        self.stats.kills += 1;
        bump(&mut self.stats.by_phase, phase.name());
        bump(&mut self.stats.by_victim, role.to_string());
        bump(
            &mut self.stats.observed,
            format!("{}: {observed}", phase.name()),
        );
    }

    /// Run the campaign until `kills` SIGKILLs, or exactly the iterations `only`.
    pub fn run(&mut self, kills: u32, only: Option<Vec<usize>>) {
        let t = Instant::now();
        let mut next = 0usize;
        loop {
            let batch: Vec<usize> = match &only {
                Some(list) => {
                    if next >= list.len() {
                        break;
                    }
                    let b = list[next..(next + self.window_len).min(list.len())].to_vec();
                    next += b.len();
                    b
                }
                None => {
                    if self.stats.kills >= kills {
                        break;
                    }
                    let b: Vec<usize> = (next..next + self.window_len).collect();
                    next += self.window_len;
                    b
                }
            };
            self.begin_window(&batch);
            for &i in &batch {
                if only.is_none() && self.stats.kills >= kills {
                    break;
                }
                self.iteration(i);
                eprintln!(
                    "[{:>6.1} s] iteration {i} ({}) done: {} kills, {} violations",
                    t.elapsed().as_secs_f64(),
                    plan(self.seed, i, &self.phases).phase.name(),
                    self.stats.kills,
                    self.violations.len()
                );
            }
            self.end_window();
        }
        eprintln!("campaign took {:.1} s", t.elapsed().as_secs_f64());
    }

    /// Wait until `host`'s migration of `disk` has finished; reports a stuck one.
    fn wait_migration_end(&mut self, k: usize, disk: &str, since: Instant, i: usize, phase: Phase) {
        if !self.hosts[k].running() {
            return;
        }
        let limit = self.limits.stuck_after();
        loop {
            match self.hosts[k].migrate_status(disk) {
                None => return,
                Some(st) if st["finished"] == true => {
                    let ms = since.elapsed().as_millis() as u64;
                    self.stats.max_end_ms = self.stats.max_end_ms.max(ms);
                    let name = self.hosts[k].name.clone();
                    self.event(format!(
                        "{name}'s migration ended {ms} ms after the kill: {} / {}{}",
                        st["phase"].as_str().unwrap_or("?"),
                        st["outcome"].as_str().unwrap_or("?"),
                        st["error"]
                            .as_str()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ));
                    return;
                }
                Some(st) => {
                    if since.elapsed() > limit {
                        let name = self.hosts[k].name.clone();
                        self.violation(
                            i,
                            phase,
                            format!(
                                "stuck: {name}'s migration of {disk} still runs {:.1} s after the \
                                 kill (limit {:.1} s): {st}",
                                since.elapsed().as_secs_f64(),
                                limit.as_secs_f64()
                            ),
                        );
                        let _ = self.hosts[k].call(&Request::MigrateAbort {
                            disk: disk.parse().unwrap(),
                        });
                        std::thread::sleep(Duration::from_secs(1));
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Poll the source's migration until `done` holds (or it finished); returns the status.
    fn wait_status(
        &self,
        k: usize,
        disk: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let t = Instant::now();
        loop {
            let st = self.hosts[k].migrate_status(disk)?;
            if done(&st) || st["finished"] == true {
                return Some(st);
            }
            if t.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn observe(&self, k: usize, disk: &str) -> String {
        match self.hosts[k].migrate_status(disk) {
            Some(st) => format!(
                "{} phase {}",
                self.hosts[k].name,
                st["phase"].as_str().unwrap_or("?")
            ),
            None => format!("{} no migration", self.hosts[k].name),
        }
    }

    /// Give running rebuilds up to 30 s to finish.
    fn settle_rebuilds(&mut self) {
        let t = Instant::now();
        loop {
            let running: Vec<String> = self
                .hosts
                .iter()
                .filter(|h| h.running())
                .flat_map(|h| h.rebuilds_running())
                .collect();
            if running.is_empty() {
                return;
            }
            if t.elapsed() > Duration::from_secs(30) {
                self.stats.rebuilds_unfinished += running.len() as u32;
                eprintln!("rebuilds still running after 30 s: {running:?}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Read every host's entry for `disk`.
    fn view(&self, disk: &str) -> Result<DiskView, String> {
        let mut entries = Vec::new();
        let mut retired = BTreeMap::new();
        for h in &self.hosts {
            if let Some(e) = h.show(disk)? {
                entries.push(e);
            }
            if let Some(r) = h.retired_at(disk) {
                retired.insert(h.name.clone(), r);
            }
        }
        Ok(DiskView {
            disk: disk.to_string(),
            geometry: Geometry::new(SIZE, GRAN).unwrap(),
            entries,
            retired,
        })
    }

    /// Check every disk of the window.
    fn check_window(&mut self, i: usize, phase: Phase, when: &str) {
        let disks: Vec<(String, Vec<Ack>, usize, Phase)> = self
            .window
            .iter()
            .map(|r| {
                (
                    r.disk.clone(),
                    r.acks.lock().unwrap().clone(),
                    r.iteration,
                    r.phase,
                )
            })
            .collect();
        for (disk, acks, di, dphase) in disks {
            match self.view(&disk) {
                Err(e) => self.violation(i, phase, format!("{when}: {e}")),
                Ok(v) => {
                    for e in &v.entries {
                        bump(&mut self.stats.states, e.state.clone());
                    }
                    for text in checker::check(&v, &acks) {
                        // A violation that persists is reported once, where it appeared.
                        if !self.reported.insert(text.clone()) {
                            continue;
                        }
                        let at = if di == i {
                            String::new()
                        } else {
                            format!(" (disk of iteration {di}, {})", dphase.name())
                        };
                        self.violation(i, phase, format!("{when}{at}: {text}"));
                    }
                }
            }
        }
    }

    /// The host that owns `disk` now, if any: the one at the highest epoch, unless that entry
    /// is the source's handed-over `incomplete` copy.
    fn owner(&self, disk: &str, src: usize) -> Option<usize> {
        let mut best: Option<(u64, usize, String)> = None;
        for (k, h) in self.hosts.iter().enumerate() {
            if let Ok(Some(e)) = h.show(disk)
                && best.as_ref().is_none_or(|b| e.epoch > b.0)
            {
                best = Some((e.epoch, k, e.state));
            }
        }
        let (_, k, state) = best?;
        if k == src && state == "incomplete" {
            None
        } else {
            Some(k)
        }
    }

    /// Create the iteration's disk on host `k` with marks across all chunks.
    fn create_disk(&mut self, k: usize, i: usize, p: &Plan, rng: &mut StdRng) -> DiskRec {
        let disk = format!("vm/k{i}");
        let image = self.image(&disk);
        std::fs::File::create(&image)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        let h = &self.hosts[k];
        let out = run_cli(
            &h.control(),
            &[
                "--json",
                "bitmap",
                "create",
                "--disk",
                &disk,
                "--size",
                &SIZE.to_string(),
                "--granularity",
                &GRAN.to_string(),
            ],
            Duration::from_secs(20),
        );
        assert_eq!(out.code, Some(0), "bitmap create: {out:?}");
        // Pre-fill: a few writes in every chunk (and, for a rebuild, enough data to make the
        // rate-limited scan last a couple of seconds).
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        let chunk_bytes = SIZE / 8;
        let mut rs = Vec::new();
        for c in 0..8 {
            for _ in 0..rng.random_range(4..24) {
                let len = rng.random_range(1..32 << 10);
                rs.push((
                    c * chunk_bytes + rng.random_range(0..chunk_bytes - len),
                    len,
                ));
            }
        }
        if p.phase == Phase::Rebuild {
            for _ in 0..48 {
                rs.push((rng.random_range(0..SIZE - MIB), 64 << 10));
            }
        }
        let written = write_image(&file, rng, &rs);
        self.stats.written += written;
        let specs: Vec<String> = rs.iter().map(|(o, l)| format!("{o}:{l}")).collect();
        let out = run_cli(
            &h.control(),
            &mark_args(&disk, &specs),
            Duration::from_secs(20),
        );
        assert_eq!(out.code, Some(0), "pre-fill mark: {out:?}");
        let acks = Arc::new(Mutex::new(vec![Ack {
            ranges: rs,
            host: h.name.clone(),
            at_ms: 0,
            route: "pre-fill".into(),
            forwarded: false,
        }]));
        DiskRec {
            disk,
            iteration: i,
            phase: p.phase,
            acks,
        }
    }

    fn migrate_start(&mut self, src: usize, dst: usize, disk: &str, rate: Option<u64>) -> CliOut {
        let (s, d) = (&self.hosts[src], &self.hosts[dst]);
        let exp = run_cli(
            &d.control(),
            &["--json", "expect", "--disk", disk, "--from", &s.name],
            Duration::from_secs(20),
        );
        assert_eq!(exp.code, Some(0), "expect: {exp:?}");
        let to = d.addr();
        let rate = rate.map(|r| r.to_string());
        let mut args = vec!["--json", "migrate", "start", "--disk", disk, "--to", &to];
        if let Some(r) = &rate {
            args.extend(["--rate", r.as_str()]);
        }
        let out = run_cli(&s.control(), &args, Duration::from_secs(20));
        let line = format!(
            "migrate start {} -> {} (rate {rate:?}) exited {:?}",
            s.name, d.name, out.code
        );
        self.event(line);
        out
    }

    /// One iteration: create, (hop), phase with its kill, settle, check.
    fn iteration(&mut self, i: usize) {
        let p = plan(self.seed, i, &self.phases);
        let mut rng = StdRng::seed_from_u64(p.seed);
        self.stats.iterations += 1;
        let t0 = Instant::now();
        self.t0 = t0;
        self.events.clear();
        let before = self.violations.len();
        let (mut src, mut dst) = (p.first, 1 - p.first);
        let rec = self.create_disk(src, i, &p, &mut rng);
        let disk = rec.disk.clone();
        let name = self.hosts[src].name.clone();
        self.event(format!("created {disk} on {name}: {p:?}"));
        let acks = rec.acks.clone();
        self.window.push(rec);
        let image = self.image(&disk);
        let mut markers = Markers::start(&disk, &image, acks, t0, &mut rng);
        markers.route(&self.hosts[src], Some(&self.hosts[dst]));
        if p.hop {
            // A clean migration while the VM writes (no fault: it must succeed), switched over
            // as a hook does, with a burst of writes draining as the switchover is requested.
            let out = self.migrate_start(src, dst, &disk, None);
            assert_eq!(out.code, Some(0), "migrate start: {out:?}");
            self.wait_status(src, &disk, Duration::from_secs(20), |s| {
                s["converged"] == true || s["rounds"].as_u64() >= Some(3)
            });
            let child = spawn_cli(
                &self.hosts[src].control(),
                &["--json", "migrate", "switchover", "--disk", &disk],
            );
            markers.burst(4, 6, &mut rng);
            let out = finish_cli(child, Duration::from_secs(60));
            if out.code != Some(0) {
                self.violation(
                    i,
                    p.phase,
                    format!("a clean migration (no fault) failed: {out:?}"),
                );
                let (counts, _, written) = markers.stop();
                self.stats.marks.add(&counts);
                self.stats.written += written;
                return;
            }
            std::mem::swap(&mut src, &mut dst);
            markers.route(&self.hosts[src], Some(&self.hosts[dst]));
            let name = self.hosts[src].name.clone();
            self.event(format!("hopped cleanly to {name}"));
        }
        // A background `migrate switchover` whose success moves the VM.
        let mut switchover: Option<Child> = None;
        let mut postcopy_handed = false;
        let victim;
        let kill_at;
        match p.phase {
            Phase::Idle | Phase::Shutdown => {
                let migrating = p.phase == Phase::Shutdown && p.shutdown_migrating;
                if migrating {
                    let out = self.migrate_start(src, dst, &disk, None);
                    assert_eq!(out.code, Some(0), "migrate start: {out:?}");
                    self.wait_status(src, &disk, Duration::from_secs(20), |s| {
                        s["rounds"].as_u64() >= Some(1)
                    });
                }
                std::thread::sleep(Duration::from_millis(50 + (p.at * 400.0) as u64));
                let (k, role) = match (p.kill_dest, migrating) {
                    (false, false) => (src, "owner"),
                    (true, false) => (dst, "non-owner"),
                    (false, true) => (src, "source"),
                    (true, true) => (dst, "destination"),
                };
                victim = k;
                kill_at = Instant::now();
                let observed = self.observe(src, &disk);
                if p.phase == Phase::Idle {
                    self.kill(k, i, p.phase, role, observed);
                } else {
                    let delay = Duration::from_micros(rng.random_range(0..30_000));
                    let name = self.hosts[k].name.clone();
                    self.event(format!("SIGTERM {name}, SIGKILL in {delay:?}"));
                    match self.hosts[k].terminate_then_kill(delay) {
                        Ok(()) => self.count_kill(p.phase, role, observed),
                        Err(Some(st)) if st.success() => self.stats.stopped_before_kill += 1,
                        Err(st) => {
                            let name = self.hosts[k].name.clone();
                            self.violation(
                                i,
                                p.phase,
                                format!("{name} exited with {st:?} on SIGTERM"),
                            );
                        }
                    }
                }
            }
            Phase::Bulk => {
                let rate = rng.random_range(256..1024);
                let out = self.migrate_start(src, dst, &disk, Some(rate));
                assert_eq!(out.code, Some(0), "migrate start: {out:?}");
                self.wait_status(src, &disk, Duration::from_secs(20), |s| {
                    s["phase"] == "bulk"
                });
                std::thread::sleep(Duration::from_millis((p.at * 1500.0) as u64));
                victim = if p.kill_dest { dst } else { src };
                let observed = self.observe(src, &disk);
                kill_at = Instant::now();
                self.kill(victim, i, p.phase, role(p.kill_dest), observed);
            }
            Phase::Precopy => {
                let out = self.migrate_start(src, dst, &disk, None);
                assert_eq!(out.code, Some(0), "migrate start: {out:?}");
                self.wait_status(src, &disk, Duration::from_secs(20), |s| {
                    s["phase"] == "pre-copy" && s["rounds"].as_u64() >= Some(1)
                });
                std::thread::sleep(Duration::from_millis((p.at * 600.0) as u64));
                victim = if p.kill_dest { dst } else { src };
                let observed = self.observe(src, &disk);
                kill_at = Instant::now();
                self.kill(victim, i, p.phase, role(p.kill_dest), observed);
            }
            Phase::Switchover | Phase::PostcopySwitchover => {
                let post = p.phase == Phase::PostcopySwitchover;
                let rate = post.then(|| rng.random_range(2048..8192));
                let out = self.migrate_start(src, dst, &disk, rate);
                assert_eq!(out.code, Some(0), "migrate start: {out:?}");
                if post {
                    self.wait_status(src, &disk, Duration::from_secs(20), |s| {
                        s["phase"] == "bulk"
                    });
                    std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
                } else {
                    // A hook switches over once converged, or after a few rounds of writes.
                    self.wait_status(src, &disk, Duration::from_secs(20), |s| {
                        s["converged"] == true || s["rounds"].as_u64() >= Some(3)
                    });
                }
                let mut args = vec!["--json", "migrate", "switchover", "--disk", &disk];
                if post {
                    args.push("--postcopy");
                }
                switchover = Some(spawn_cli(&self.hosts[src].control(), &args));
                markers.burst(4, 6, &mut rng);
                self.event(format!("spawned {args:?}"));
                std::thread::sleep(Duration::from_micros((p.at * 80_000.0) as u64));
                victim = if p.kill_dest { dst } else { src };
                let observed = self.observe(src, &disk);
                kill_at = Instant::now();
                self.kill(victim, i, p.phase, role(p.kill_dest), observed);
            }
            Phase::Postcopy => {
                let rate = rng.random_range(256..1024);
                let out = self.migrate_start(src, dst, &disk, Some(rate));
                assert_eq!(out.code, Some(0), "migrate start: {out:?}");
                self.wait_status(src, &disk, Duration::from_secs(20), |s| {
                    s["phase"] == "bulk"
                });
                markers.burst(4, 6, &mut rng);
                let out = run_cli(
                    &self.hosts[src].control(),
                    &[
                        "--json",
                        "migrate",
                        "switchover",
                        "--disk",
                        &disk,
                        "--postcopy",
                    ],
                    Duration::from_secs(30),
                );
                self.event(format!(
                    "migrate switchover --postcopy exited {:?}",
                    out.code
                ));
                if out.code == Some(0) {
                    // The VM resumes on the destination.
                    postcopy_handed = true;
                    markers.route(&self.hosts[dst], None);
                } else {
                    self.violation(
                        i,
                        p.phase,
                        format!("post-copy switchover without a fault failed: {out:?}"),
                    );
                }
                std::thread::sleep(Duration::from_millis((p.at * 1200.0) as u64));
                victim = if p.kill_dest { dst } else { src };
                let observed = self.observe(dst, &disk);
                kill_at = Instant::now();
                self.kill(victim, i, p.phase, role(p.kill_dest), observed);
            }
            Phase::Rebuild => {
                // Lose the bitmap: kill the owner while it records (an idle kill).
                std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
                let observed = self.observe(src, &disk);
                self.kill(src, i, Phase::Idle, "owner", observed);
                markers.pause();
                self.restart(src, i, p.phase);
                markers.route(&self.hosts[src], None);
                // The agent rebuilds from the reference by itself, rate-limited.
                let t = Instant::now();
                let mut seen = false;
                while t.elapsed() < Duration::from_secs(5) {
                    if self.hosts[src].rebuilds_running().contains(&disk) {
                        seen = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                if seen {
                    std::thread::sleep(Duration::from_millis((p.at * 1500.0) as u64));
                }
                victim = src;
                let observed = match self.hosts[src].call(&Request::RebuildStatus {
                    disk: Some(disk.parse().unwrap()),
                }) {
                    Ok(v) => {
                        let (done, total) = (
                            v["done"].as_u64().unwrap_or(0),
                            v["total"].as_u64().unwrap_or(1).max(1),
                        );
                        // Grouped by tenths of the scan, so the summary stays short.
                        format!(
                            "rebuild {}, {}0-{}0 % scanned",
                            v["state"].as_str().unwrap_or("?"),
                            done * 10 / total,
                            done * 10 / total + 1
                        )
                    }
                    Err(_) => "no rebuild".into(),
                };
                kill_at = Instant::now();
                self.kill(src, i, p.phase, "owner", observed);
            }
        }
        // The survivor settles while the VM keeps writing where it runs.
        let survivor = 1 - victim;
        self.wait_migration_end(survivor, &disk, kill_at, i, p.phase);
        if let Some(child) = switchover.take() {
            let out = finish_cli(child, self.limits.stuck_after());
            self.event(format!(
                "migrate switchover exited {:?}: {}",
                out.code,
                out.stdout
                    .lines()
                    .find(|l| l.contains("\"phase\"") || l.contains("error"))
                    .unwrap_or("")
                    .trim()
            ));
            if out.timed_out {
                self.violation(
                    i,
                    p.phase,
                    format!("`migrate switchover` still waiting after the kill: {out:?}"),
                );
            } else if out.code == Some(0) {
                markers.route(&self.hosts[dst], None);
                postcopy_handed |= p.phase == Phase::PostcopySwitchover;
            }
        }
        let _ = postcopy_handed;
        markers.pause();
        self.restart(victim, i, p.phase);
        // The VM runs wherever the disk is owned now; with no owner it stays paused.
        let owner = self.owner(&disk, src);
        let name = owner.map_or("none".to_string(), |k| self.hosts[k].name.clone());
        self.event(format!("owner after the restart: {name}"));
        match owner {
            Some(k) => {
                markers.route(&self.hosts[k], None);
                std::thread::sleep(Duration::from_millis(rng.random_range(100..400)));
            }
            None => self.stats.no_owner += 1,
        }
        let (counts, problems, written) = markers.stop();
        self.stats.marks.add(&counts);
        self.stats.written += written;
        for pr in problems {
            self.violation(i, p.phase, pr);
        }
        self.settle_rebuilds();
        for (k, role) in [(src, "source"), (dst, "destination")] {
            let e = self.hosts[k].show(&disk).ok().flatten();
            bump(
                &mut self.stats.outcomes,
                checker::outcome_key(role, e.as_ref()),
            );
        }
        self.check_window(i, p.phase, "after the kill");
        if self.violations.len() > before {
            self.timelines.insert(i, self.events.join("\n      "));
        }
    }

    /// The summary, and the replay command for each violation.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let st = &self.stats;
        let _ = writeln!(
            s,
            "kill campaign, seed {} (replay: BITFERRY_TEST_SEED={}): {} iterations, {} SIGKILLs",
            self.seed, self.seed, st.iterations, st.kills
        );
        let _ = writeln!(s, "kills by phase:");
        for (k, v) in &st.by_phase {
            let _ = writeln!(s, "  {v:>5}  {k}");
        }
        let _ = writeln!(s, "kills by victim:");
        for (k, v) in &st.by_victim {
            let _ = writeln!(s, "  {v:>5}  {k}");
        }
        let _ = writeln!(
            s,
            "what the victim's migration was doing just before the kill:"
        );
        for (k, v) in &st.observed {
            let _ = writeln!(s, "  {v:>5}  {k}");
        }
        let _ = writeln!(s, "the iteration's disk after settling (role:state):");
        for (k, v) in &st.outcomes {
            let _ = writeln!(s, "  {v:>5}  {k}");
        }
        let _ = writeln!(s, "entries seen at all checks, by state:");
        for (k, v) in &st.states {
            let _ = writeln!(s, "  {v:>5}  {k}");
        }
        let m = &st.marks;
        let _ = writeln!(
            s,
            "marks: {} runs, {} acknowledged ({} by the destination after a refusal, {} as \
             forwarded_to_migration), {} refused for a switchover, {} failed; {:.1} MiB written",
            m.attempts,
            m.acked,
            m.redirected,
            m.forwarded,
            m.refused_switchover,
            m.failed,
            st.written as f64 / MIB as f64
        );
        for (k, v) in &m.why_failed {
            let _ = writeln!(s, "  {v:>5}  failed on the {k}");
        }
        let _ = writeln!(
            s,
            "no owner after {} iteration(s); clean stops done before their SIGKILL: {}; \
             rebuilds unfinished at a check: {}; longest end of a survivor's migration: {} ms",
            st.no_owner, st.stopped_before_kill, st.rebuilds_unfinished, st.max_end_ms
        );
        let _ = writeln!(s, "violations: {}", self.violations.len());
        let mut iters: Vec<usize> = self.violations.iter().map(|v| v.iteration).collect();
        iters.dedup();
        for v in &self.violations {
            let _ = writeln!(
                s,
                "  iteration {} ({}): {}",
                v.iteration,
                v.phase.name(),
                v.text
            );
        }
        for (i, t) in &self.timelines {
            let _ = writeln!(s, "  timeline of iteration {i}:\n      {t}");
        }
        if !iters.is_empty() {
            iters.sort_unstable();
            iters.dedup();
            let list: Vec<String> = iters.iter().map(ToString::to_string).collect();
            let phases = if self.phases.len() == Phase::ALL.len() {
                String::new()
            } else {
                let ids: Vec<&str> = self.phases.iter().map(|p| p.id()).collect();
                format!("BITFERRY_KILL_PHASES={} ", ids.join(","))
            };
            let _ = writeln!(
                s,
                "replay: cargo build --bin bitferry && BITFERRY_TEST_SEED={} {phases}\
                 BITFERRY_KILL_ITERATIONS={} cargo nextest run --no-capture -E 'test({})'",
                self.seed,
                list.join(","),
                self.test
            );
        }
        s
    }

    /// Only these phases (`BITFERRY_KILL_PHASES=switchover,postcopy-switchover`, ids of
    /// [`Phase::id`]).
    pub fn only_phases(&mut self, ids: &str) {
        self.phases = ids
            .split(',')
            .map(|id| {
                *Phase::ALL
                    .iter()
                    .find(|p| p.id() == id.trim())
                    .unwrap_or_else(|| panic!("unknown phase {id:?}"))
            })
            .collect();
        assert!(!self.phases.is_empty());
    }

    /// Keep the directory (logs, stores) when there were violations; returns its path.
    pub fn keep_dir(&mut self) -> Option<PathBuf> {
        for h in &mut self.hosts {
            let _ = h.kill();
            let _ = h.archive_log();
        }
        if self.violations.is_empty() {
            return None;
        }
        self.dir.take().map(tempfile::TempDir::keep)
    }
}

fn role(kill_dest: bool) -> &'static str {
    if kill_dest { "destination" } else { "source" }
}

/// `BITFERRY_KILL_ITERATIONS`: `7`, `7,12`, `7..12`.
pub fn iterations_from_env() -> Option<Vec<usize>> {
    let v = std::env::var("BITFERRY_KILL_ITERATIONS").ok()?;
    let mut out = Vec::new();
    for part in v.split(',').filter(|p| !p.trim().is_empty()) {
        if let Some((a, b)) = part.split_once("..") {
            let (a, b): (usize, usize) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
            out.extend(a..b);
        } else {
            out.push(part.trim().parse().unwrap());
        }
    }
    Some(out)
}

/// Make sure the binary exists before the campaign starts its clock.
pub fn binary() -> PathBuf {
    bitferry_path()
}
