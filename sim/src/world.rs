//! The discrete-event world: virtual time, one seeded RNG, two hosts driving the real
//! `wire::proto` sessions and the real `agent::store::Store`, a VM writing to its disk, the
//! network, and the faults of the plan. The checker (`check.rs`) runs after every step.

use crate::agent::{HANDED_OVER, Host, HostMig, Rebuild, Role, Sess, Track};
use crate::faultstore::FaultStorage;
use crate::net::{Conn, NetCtx, NetParams, Packet, TICK, TickResult};
use crate::scenario::{Bug, Plan, Scenario, Side, Target};
use crate::storage::{Durability, SimStorage};
use crate::truth::{Truth, checkpoint_id, checkpoint_index};
use agent::store::{Access, Meta, Storage, Store, StoreError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::Path;
use wire::proto::frame;
use wire::proto::{
    Action, CommitMeta, DestPolicy, DestSession, Expectation, FrameDecoder, Incoming, Message,
    Mode, Outcome, SourceConfig, SourceSession,
};
use wire::{Bitmap, DiskId, Geometry, State};

const MS: u64 = 1_000;
/// The epoch tombstone's two copies (not `.bfb`, so the store ignores them).
const EPOCH_FILES: [&str; 2] = ["epoch-tombstone.0", "epoch-tombstone.1"];
/// Retry period of in-doubt resolution.
const RESOLVE_EVERY: u64 = 20 * MS;
/// Period of the migration orchestrator.
const DRIVE_EVERY: u64 = 3 * MS;
/// A partial frame that does not complete for this long is a framing error: a corrupted
/// length prefix would otherwise leave both ends waiting forever behind healthy keep-alives.
pub const FRAME_STALL: u64 = 250 * MS;
/// A session that switched over and has not finished this long after is aborted: a corrupted
/// `postcopy` flag can leave a pre-copy source waiting for Committed and a post-copy destination
/// waiting for chunks, forever, behind healthy keep-alives (found by the simulator).
pub const SWITCH_DEADLINE: u64 = 500 * MS;

/// The host crashed in the middle of what it was doing; stop processing for it.
#[derive(Debug)]
pub struct Crashed;

type Step = Result<(), Crashed>;

/// Something that happens at a virtual time.
#[derive(Debug)]
enum Ev {
    VmWrite,
    Flush(usize),
    Backup,
    Writeback(usize),
    Deliver(Packet),
    Tick { conn: u64, side: usize },
    MigStart(usize),
    MigDrive(usize),
    Crash(usize),
    Restart(usize),
    Resolve(usize),
    RebuildStep(usize),
    WireCorrupt,
    FaultsEnd,
}

struct Sched {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Sched {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Sched {}
impl PartialOrd for Sched {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sched {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, insertion order): equal times run in the order scheduled.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Where the VM is.
#[derive(Debug, Default, Clone, Copy)]
pub struct Vm {
    /// Running on this host.
    pub on: Option<usize>,
    /// Paused for the switchover of this migration.
    pub paused_by: Option<usize>,
}

/// What happened to one planned migration.
#[derive(Debug, Default, Clone)]
pub struct MigRec {
    /// Started (source and destination chosen).
    pub started: bool,
    /// Source host.
    pub src: usize,
    /// Destination host.
    pub dst: usize,
    /// Connection.
    pub conn: u64,
    /// Switchover was called.
    pub switched: bool,
    /// The abort was issued.
    pub aborted: bool,
    /// Pre-copy rounds started.
    pub rounds: u32,
    /// How the source's session ended (None: still running or killed by a crash).
    pub src_end: Option<Outcome>,
    /// How the destination's session ended.
    pub dst_end: Option<Outcome>,
    /// Bytes the source sent during switchover, when it completed.
    pub switch_bytes: Option<u64>,
    /// The destination's driver dropped a chunk (deliberate bug).
    pub chunk_skipped: bool,
}

/// The simulated world of one seed.
pub struct World {
    /// Virtual time (µs).
    pub now: u64,
    seq: u64,
    queue: BinaryHeap<Sched>,
    pub(crate) rng: StdRng,
    /// The seed's plan.
    pub plan: Plan,
    bugs: Vec<Bug>,
    /// Ground truth.
    pub truth: Truth,
    /// The disk's geometry.
    pub geom: Geometry,
    /// The disk.
    pub disk: DiskId,
    /// The hosts.
    pub hosts: Vec<Host>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    /// The VM.
    pub vm: Vm,
    /// Planned migrations and what became of them.
    pub migs: Vec<MigRec>,
    net: NetParams,
    wire_corrupt_armed: u32,
    /// Faults still being injected.
    pub faults_on: bool,
    /// Safety or liveness violations found.
    pub violations: Vec<String>,
    /// Event log, when tracing.
    pub trace: Option<Vec<String>>,
    /// Set by anything that may change what the checker must look at.
    pub(crate) recheck: bool,
    /// Blocks written by the last step, for the incremental check.
    pub(crate) last_write: Option<(u64, u64)>,
    /// Armed message-triggered crashes: (host, sent?, message name).
    crash_on: Vec<(usize, bool, &'static str, &'static str)>,
    /// Message-triggered crashes that fired, e.g. "source after sending Switchover".
    pub fired: Vec<String>,
    /// Which host first owned each epoch (ownership claims must be unique per epoch).
    pub(crate) epoch_owner: BTreeMap<u64, usize>,
    /// Stored-file cache for the checker: per host, (disk writes, disk generation) → verdict.
    pub(crate) file_cache: Vec<Option<((u64, u64), crate::check::FileVerdict)>>,
    steps: u64,
}

impl World {
    /// Build the world for `seed`.
    pub fn new(seed: u64, scenario: Scenario, bugs: &[Bug], trace: bool) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let plan = Plan::generate(scenario, &mut rng);
        let geom = Geometry::new(plan.blocks * 512, 512).expect("valid geometry");
        let disk = DiskId::new("vm1/vda").expect("valid disk id");
        let durability = if bugs.contains(&Bug::SkipFsync) {
            Durability::SkipFsync
        } else {
            Durability::Honest
        };
        let hosts = ["A", "B"]
            .iter()
            .map(|n| {
                let d = SimStorage::new(durability);
                let fs = FaultStorage::new(d.clone());
                Host {
                    name: n.to_string(),
                    up: true,
                    store: Some(Store::with_storage(
                        Box::new(fs.clone()),
                        Access::ReadWrite,
                        Path::new(n),
                    )),
                    disk: d,
                    fs,
                    role: Role::None,
                    mig: None,
                    disk_gen: 0,
                }
            })
            .collect();
        let mut w = World {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            net: plan.net,
            truth: Truth::new(plan.blocks),
            migs: vec![MigRec::default(); plan.migrations.len()],
            plan,
            rng,
            bugs: bugs.to_vec(),
            geom,
            disk,
            hosts,
            conns: BTreeMap::new(),
            next_conn: 0,
            vm: Vm::default(),
            wire_corrupt_armed: 0,
            faults_on: true,
            violations: Vec::new(),
            trace: trace.then(Vec::new),
            recheck: true,
            last_write: None,
            crash_on: Vec::new(),
            fired: Vec::new(),
            epoch_owner: BTreeMap::new(),
            file_cache: vec![None, None],
            steps: 0,
        };
        // Host A owns the disk at epoch 1, counting from backup 0, recording.
        let mut meta = Meta {
            disk: w.disk.clone(),
            geometry: geom,
            checkpoint: Some(checkpoint_id(0)),
            epoch: 1,
            state: State::Recording,
            reason: None,
            generation: 0,
        };
        let mut bitmap = Bitmap::new(geom);
        w.hosts[0]
            .store
            .as_mut()
            .expect("open")
            .create(&meta, &mut bitmap)
            .expect("create");
        meta.generation = 0;
        w.set_role(0, Role::Owner(Track::Live { meta, bitmap }));
        w.vm.on = Some(0);
        w.schedule(0, Ev::VmWrite);
        let (fe, be) = (w.plan.flush_every, w.plan.backup_every);
        for h in 0..2 {
            let t = w.rng.random_range(1..=fe);
            w.schedule(t, Ev::Flush(h));
            if w.has(Bug::SkipFsync) {
                w.schedule(200 * MS, Ev::Writeback(h));
            }
        }
        w.schedule(be, Ev::Backup);
        for (i, m) in w.plan.migrations.clone().iter().enumerate() {
            w.schedule(m.start_at, Ev::MigStart(i));
        }
        for (i, c) in w.plan.crashes.clone().iter().enumerate() {
            w.schedule(c.at, Ev::Crash(i));
        }
        for t in w.plan.wire_corruptions.clone() {
            w.schedule(t, Ev::WireCorrupt);
        }
        let fe = w.plan.faults_end;
        w.schedule(fe, Ev::FaultsEnd);
        let summary = w_plan_summary(&w.plan);
        w.log(|| format!("plan: {summary}"));
        w
    }

    fn has(&self, b: Bug) -> bool {
        self.bugs.contains(&b)
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Sched {
            at,
            seq: self.seq,
            ev,
        });
    }

    pub(crate) fn log(&mut self, f: impl FnOnce() -> String) {
        if self.trace.is_some() {
            let line = format!("{:>9} {}", self.now, f());
            if let Some(t) = self.trace.as_mut() {
                t.push(line);
            }
        }
    }

    fn violation(&mut self, v: String) {
        self.log(|| format!("VIOLATION {v}"));
        self.violations.push(format!("t={}µs: {v}", self.now));
    }

    pub(crate) fn set_role(&mut self, h: usize, role: Role) {
        let to = role.name();
        self.hosts[h].role = role;
        self.recheck = true;
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: role -> {to}"));
    }

    /// Run to the end of the plan, checking after every step. Stops at the first violation.
    pub fn run(&mut self) {
        while let Some(s) = self.queue.pop() {
            if s.at > self.plan.end {
                break;
            }
            self.now = s.at;
            self.last_write = None;
            self.step(s.ev);
            self.reconcile_vm();
            self.steps += 1;
            if self.steps.is_multiple_of(64) {
                self.recheck = true;
            }
            crate::check::after_step(self);
            if !self.violations.is_empty() {
                return;
            }
            if !self.faults_on && self.steps.is_multiple_of(16) && self.settled() {
                // Nothing can change any more but the VM writing: stop early.
                self.log(|| "settled".into());
                break;
            }
        }
        self.now = self.plan.end;
        self.recheck = true;
        crate::check::after_step(self);
        if self.violations.is_empty() {
            crate::check::at_end(self);
        }
    }

    /// Every migration ended, every host is up with a plain role, one owner, VM running.
    fn settled(&self) -> bool {
        let plain = self.hosts.iter().all(|h| {
            h.up && h.mig.is_none()
                && match &h.role {
                    Role::None => true,
                    Role::Owner(Track::Live { meta, .. }) => meta.state == State::Recording,
                    _ => false,
                }
        });
        plain
            && self.vm.on.is_some()
            && self
                .conns
                .values()
                .all(|c| c.ends.iter().all(|e| !e.alive || e.session_done))
    }

    fn step(&mut self, ev: Ev) {
        let _ = match ev {
            Ev::VmWrite => self.vm_write(),
            Ev::Flush(h) => self.flush(h),
            Ev::Backup => self.backup(),
            Ev::Writeback(h) => {
                self.hosts[h].disk.writeback();
                self.schedule(self.now + 200 * MS, Ev::Writeback(h));
                Ok(())
            }
            Ev::Deliver(p) => self.deliver(p),
            Ev::Tick { conn, side } => self.tick(conn, side),
            Ev::MigStart(i) => self.mig_start(i),
            Ev::MigDrive(i) => self.mig_drive(i),
            Ev::Crash(i) => self.crash_event(i),
            Ev::Restart(h) => self.restart(h),
            Ev::Resolve(h) => self.resolve(h),
            Ev::RebuildStep(h) => self.rebuild_step(h),
            Ev::WireCorrupt => {
                if self.faults_on {
                    self.wire_corrupt_armed += 1;
                }
                Ok(())
            }
            Ev::FaultsEnd => {
                self.faults_on = false;
                self.crash_on.clear();
                self.net = NetParams::calm(self.plan.net.latency);
                self.wire_corrupt_armed = 0;
                for h in &self.hosts {
                    h.fs.disarm();
                }
                self.log(|| "faults end".into());
                Ok(())
            }
        };
    }

    fn partitioned(&self) -> bool {
        self.faults_on
            && self
                .plan
                .partitions
                .iter()
                .any(|&(a, b)| (a..b).contains(&self.now))
    }

    // ----------------------------------------------------------------------------------------
    // The VM and the owner's periodic work

    fn vm_write(&mut self) -> Step {
        let next = self.now + self.rng.random_range(1..=2 * self.plan.write_every);
        self.schedule(next, Ev::VmWrite);
        let Some(h) = self.vm.on else { return Ok(()) };
        let blocks = self.truth.blocks();
        let len = self.rng.random_range(1..=self.plan.write_len);
        let first = if self.rng.random_bool(0.8) {
            let (s, l) = self.plan.hot;
            s + self.rng.random_range(0..l)
        } else {
            self.rng.random_range(0..blocks)
        };
        let end = (first + len).min(blocks);
        // One write in ten rewrites identical bytes: the tracker marks it, the content (and so
        // the ground truth) does not change. These are the extra bits precision counts.
        if self.rng.random_bool(0.9) {
            self.truth.write(first, end);
        }
        self.last_write = Some((first, end));
        self.mark(h, first, end);
        Ok(())
    }

    /// A write on host `h`: the agent's tracker (and the migration session) must see it.
    fn mark(&mut self, h: usize, first: u64, end: u64) {
        let host = &mut self.hosts[h];
        let ok = match &mut host.role {
            Role::Owner(Track::Live { bitmap, .. }) => {
                bitmap.set_blocks(first, end);
                if let Some(HostMig {
                    sess: Sess::Src(s), ..
                }) = host.mig.as_mut()
                {
                    // Refused only after switchover, when the VM is paused.
                    let _ = s.mark_blocks(first, end);
                }
                true
            }
            Role::Owner(Track::InSession { .. }) => match host.mig.as_mut() {
                Some(HostMig {
                    sess: Sess::Dst(d), ..
                }) => d.mark_blocks(first, end).is_ok(),
                _ => false,
            },
            Role::Owner(Track::Rebuild(r)) => {
                if r.marks_on {
                    r.marks.set_blocks(first, end);
                }
                true
            }
            _ => false,
        };
        if !ok {
            let name = self.hosts[h].name.clone();
            let role = self.hosts[h].role.name();
            self.violation(format!(
                "VM wrote blocks {first}..{end} on {name}, whose agent ({role}) cannot record it"
            ));
        }
    }

    fn flush(&mut self, h: usize) -> Step {
        self.schedule(self.now + self.plan.flush_every, Ev::Flush(h));
        if !self.hosts[h].up {
            return Ok(());
        }
        let as_consistent = self.has(Bug::RecordingAsConsistent);
        let Role::Owner(Track::Live { meta, bitmap }) = &self.hosts[h].role else {
            return Ok(());
        };
        if meta.state != State::Recording {
            return Ok(());
        }
        let (mut meta, mut bitmap) = (meta.clone(), bitmap.clone());
        if as_consistent {
            meta.state = State::Consistent;
        }
        self.store_commit(h, &mut meta, &mut bitmap)?;
        if let Role::Owner(Track::Live { meta: m, .. }) = &mut self.hosts[h].role {
            m.generation = meta.generation;
        }
        Ok(())
    }

    fn backup(&mut self) -> Step {
        self.schedule(self.now + self.plan.backup_every, Ev::Backup);
        if !self.faults_on {
            // Keep the end state comparable: no new checkpoints while settling.
            return Ok(());
        }
        let owner = (0..2).find(|&h| {
            let host = &self.hosts[h];
            host.up
                && host.mig.is_none()
                && matches!(&host.role, Role::Owner(Track::Live { meta, .. }) if meta.state == State::Recording)
        });
        let Some(h) = owner else { return Ok(()) };
        let n = self.truth.backup();
        let Role::Owner(Track::Live { meta, .. }) = &self.hosts[h].role else {
            return Ok(());
        };
        let mut meta = meta.clone();
        meta.checkpoint = Some(checkpoint_id(n));
        let mut bitmap = Bitmap::new(self.geom);
        self.log(|| format!("backup ckpt-{n}"));
        self.set_role(
            h,
            Role::Owner(Track::Live {
                meta: meta.clone(),
                bitmap: bitmap.clone(),
            }),
        );
        self.store_commit(h, &mut meta, &mut bitmap)
    }

    /// Start the VM on the owner when it is stopped and not paused for a switchover (the
    /// orchestrator resumes the VM where the tracking owner is).
    fn reconcile_vm(&mut self) {
        if self.vm.on.is_some() || self.vm.paused_by.is_some() {
            return;
        }
        let owners: Vec<usize> = (0..2)
            .filter(|&h| self.hosts[h].up && matches!(self.hosts[h].role, Role::Owner(_)))
            .collect();
        if let [h] = owners[..] {
            self.vm.on = Some(h);
            let name = self.hosts[h].name.clone();
            self.log(|| format!("VM runs on {name}"));
        }
    }

    // ----------------------------------------------------------------------------------------
    // Store operations; a crash inside one ends the host's step

    fn after_store_op<T>(&mut self, h: usize, r: Result<T, StoreError>) -> Result<T, Crashed> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Some(tear) = self.hosts[h].fs.take_tripped() {
                    let name = self.hosts[h].name.clone();
                    self.log(|| format!("{name}: crashed inside a store operation (tear={tear})"));
                    self.crash_now(h, tear);
                } else {
                    self.violation(format!("store error on {}: {e}", self.hosts[h].name));
                    self.crash_now(h, false);
                }
                Err(Crashed)
            }
        }
    }

    fn store_commit(&mut self, h: usize, meta: &mut Meta, bitmap: &mut Bitmap) -> Step {
        self.recheck = true;
        if meta.epoch > self.tombstone_read(h) {
            // Remember every epoch this host takes before its file says so (rule 7).
            self.tombstone_write(h, meta.epoch)?;
        }
        let name = self.hosts[h].name.clone();
        let (state, epoch) = (meta.state, meta.epoch);
        self.log(|| format!("{name}: commit {state} epoch {epoch}"));
        let Some(store) = self.hosts[h].store.as_mut() else {
            return Err(Crashed);
        };
        let r = store.commit(meta, bitmap);
        self.after_store_op(h, r)
    }

    fn store_remove(&mut self, h: usize) -> Step {
        self.recheck = true;
        self.hosts[h].disk_gen += 1;
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: remove its copy"));
        let disk = self.disk.clone();
        let Some(store) = self.hosts[h].store.as_mut() else {
            return Err(Crashed);
        };
        let r = store.remove(&disk);
        self.after_store_op(h, r)
    }

    /// Durably remember the highest epoch this host knows for the disk, in a small file beside
    /// the store that survives retiring the bitmap (docs/simulation.md, rule 7).
    /// Two copies, written one after the other, so a write torn by a crash leaves the other.
    fn tombstone_write(&mut self, h: usize, epoch: u64) -> Step {
        let epoch = epoch.max(self.tombstone_read(h));
        for slot in EPOCH_FILES {
            let mut fs = self.hosts[h].fs.clone();
            let r = fs
                .write_atomic(slot, format!("epoch {epoch}\n").as_bytes())
                .map_err(|e| StoreError::Io {
                    path: slot.into(),
                    source: e,
                });
            self.after_store_op(h, r)?;
        }
        Ok(())
    }

    /// The remembered epoch: the highest readable copy (0 if none).
    fn tombstone_read(&self, h: usize) -> u64 {
        EPOCH_FILES
            .iter()
            .filter_map(|slot| {
                let b = self.hosts[h].fs.read(slot).ok().flatten()?;
                let s = String::from_utf8(b).ok()?;
                s.strip_prefix("epoch ")?.strip_suffix('\n')?.parse().ok()
            })
            .max()
            .unwrap_or(0)
    }

    // ----------------------------------------------------------------------------------------
    // Crashes, restarts, resolution

    fn crash_event(&mut self, i: usize) -> Step {
        if !self.faults_on {
            return Ok(());
        }
        let c = self.plan.crashes[i].clone();
        let latest = self.migs.iter().rposition(|m| m.started);
        let owner = (0..2).find(|&h| matches!(self.hosts[h].role, Role::Owner(_)));
        let h = match (c.target, latest) {
            (Target::Source, Some(m)) => self.migs[m].src,
            (Target::Dest, Some(m)) => self.migs[m].dst,
            (Target::Source | Target::Owner, None) | (Target::Owner, Some(_)) => owner.unwrap_or(0),
            (Target::Dest, None) => 1 - owner.unwrap_or(0),
        };
        if !self.hosts[h].up {
            return Ok(());
        }
        if c.corrupt_file {
            let name = agent::store::file_name(&self.disk);
            let hit = self.hosts[h].disk.corrupt(&name, &mut self.rng);
            self.hosts[h].disk_gen += 1;
            self.recheck = true;
            let hn = self.hosts[h].name.clone();
            self.log(|| format!("{hn}: media corruption of its store file ({hit})"));
        }
        if let Some((sent, name)) = c.on_message {
            let hn = self.hosts[h].name.clone();
            let verb = if sent { "sending" } else { "handling" };
            self.log(|| format!("{hn}: will crash after {verb} {name}"));
            let label = match c.target {
                Target::Source => "source",
                Target::Dest => "destination",
                Target::Owner => "owner",
            };
            self.crash_on.push((h, sent, name, label));
        } else if c.in_write {
            // Fires at the host's next store write; disarmed when the faults end.
            let hn = self.hosts[h].name.clone();
            self.log(|| format!("{hn}: will crash inside its next store write"));
            self.hosts[h].fs.arm();
        } else {
            self.crash_now(h, false);
        }
        Ok(())
    }

    /// Crash `h` here if a message-triggered crash is armed for this point.
    fn crash_point(&mut self, h: usize, sent: bool, name: &'static str) -> Step {
        if !self.faults_on || !self.hosts[h].up {
            return Ok(());
        }
        let Some(i) = self
            .crash_on
            .iter()
            .position(|&(x, s, n, _)| x == h && s == sent && n == name)
        else {
            return Ok(());
        };
        let (.., role) = self.crash_on.remove(i);
        let verb = if sent { "sending" } else { "handling" };
        self.fired.push(format!("{role} after {verb} {name}"));
        self.crash_now(h, false);
        Err(Crashed)
    }

    fn crash_now(&mut self, h: usize, tear: bool) {
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: CRASH (tear={tear})"));
        let host = &mut self.hosts[h];
        host.up = false;
        host.store = None;
        host.mig = None;
        host.fs.disarm();
        host.disk.crash(&mut self.rng, tear);
        host.disk_gen += 1;
        self.set_role(h, Role::None);
        for c in self.conns.values_mut() {
            for e in &mut c.ends {
                if e.host == h {
                    e.alive = false;
                }
            }
        }
        if self.vm.on == Some(h) {
            self.vm.on = None;
        }
        if let Some(k) = self.vm.paused_by
            && self.migs[k].src == h
        {
            // The paused VM died with its host; it restarts wherever the owner is.
            self.vm.paused_by = None;
        }
        let down = self
            .plan
            .crashes
            .iter()
            .map(|c| c.down_for)
            .max()
            .unwrap_or(10 * MS);
        let at = self.now + self.rng.random_range(1..=down);
        self.schedule(at, Ev::Restart(h));
    }

    fn restart(&mut self, h: usize) -> Step {
        if self.hosts[h].up {
            return Ok(());
        }
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: restart"));
        let host = &mut self.hosts[h];
        host.up = true;
        host.fs.disarm();
        host.store = Some(Store::with_storage(
            Box::new(host.fs.clone()),
            Access::ReadWrite,
            Path::new(&name),
        ));
        let loaded = host.store.as_ref().expect("open").load(&self.disk);
        match loaded {
            Err(StoreError::NotFound(_)) => self.set_role(h, Role::None),
            Err(_) => {
                self.set_role(h, Role::Unknown { epoch: None });
                self.schedule(self.now, Ev::Resolve(h));
            }
            Ok(l) => {
                let state = l.state();
                match (l.meta, l.bitmap) {
                    (Some(mut meta), Some(mut bitmap)) => match state {
                        State::Consistent => {
                            meta.state = State::Recording;
                            meta.reason = None;
                            self.set_role(
                                h,
                                Role::Owner(Track::Live {
                                    meta: meta.clone(),
                                    bitmap: bitmap.clone(),
                                }),
                            );
                            self.store_commit(h, &mut meta, &mut bitmap)?;
                        }
                        State::Incomplete if meta.reason.as_deref() == Some(HANDED_OVER) => {
                            self.set_role(h, Role::InDoubt { meta, bitmap });
                            self.schedule(self.now, Ev::Resolve(h));
                        }
                        State::Inconsistent if self.has(Bug::ConsistentOnRestart) => {
                            meta.state = State::Recording;
                            meta.reason = None;
                            self.set_role(
                                h,
                                Role::Owner(Track::Live {
                                    meta: meta.clone(),
                                    bitmap: bitmap.clone(),
                                }),
                            );
                            self.store_commit(h, &mut meta, &mut bitmap)?;
                        }
                        // Left `recording` by the crash, post-copy incomplete, or a rebuild
                        // that was running: this host owns the disk and must rebuild.
                        _ => self.begin_rebuild(h, meta, Some(bitmap))?,
                    },
                    (meta, _) => {
                        self.set_role(
                            h,
                            Role::Unknown {
                                epoch: meta.map(|m| m.epoch),
                            },
                        );
                        self.schedule(self.now, Ev::Resolve(h));
                    }
                }
            }
        }
        Ok(())
    }

    /// Ask the peer who owns the disk (an out-of-band control call that works only when the
    /// peer is up and reachable). The peer first fences any incoming session that has not taken
    /// ownership, so a Switchover still in flight can no longer make it an owner.
    fn resolve(&mut self, h: usize) -> Step {
        if !self.hosts[h].up
            || self.hosts[h].mig.is_some()
            || !matches!(
                self.hosts[h].role,
                Role::InDoubt { .. } | Role::Unknown { .. }
            )
        {
            return Ok(());
        }
        let p = 1 - h;
        if !self.hosts[p].up || self.partitioned() {
            self.schedule(self.now + RESOLVE_EVERY, Ev::Resolve(h));
            return Ok(());
        }
        if let Some(HostMig {
            sess: Sess::Dst(d), ..
        }) = self.hosts[p].mig.as_mut()
            && !d.owns()
        {
            let _ = d.abort();
            let pn = self.hosts[p].name.clone();
            self.log(|| format!("{pn}: fenced its incoming session"));
            if self.drive(p).is_err() {
                self.schedule(self.now + RESOLVE_EVERY, Ev::Resolve(h));
                return Ok(());
            }
        }
        let peer_owner = self.hosts[p].role.owner_epoch();
        let (peer_epoch, peer_nothing) = match &self.hosts[p].role {
            Role::Owner(_) => (peer_owner, false),
            // It handed the disk over at `epoch`: epoch + 1 may be in use (by us).
            Role::InDoubt { meta, .. } => (Some(meta.epoch + 1), false),
            Role::Unknown { epoch } => (*epoch, false),
            Role::None => (None, true),
        };
        let name = self.hosts[h].name.clone();
        if let Some(e) = peer_owner {
            self.log(|| format!("{name}: resolve: peer owns at epoch {e}; dropping my copy"));
            self.tombstone_write(h, e)?;
            self.store_remove(h)?;
            self.set_role(h, Role::None);
            return Ok(());
        }
        // A new claim must use an epoch nobody ever used: the highest either side knows of,
        // including the tombstones that survive retired copies, plus one.
        let known = peer_epoch
            .unwrap_or(0)
            .max(self.tombstone_read(h))
            .max(self.tombstone_read(p));
        let role = std::mem::replace(&mut self.hosts[h].role, Role::None);
        match role {
            Role::InDoubt {
                mut meta,
                mut bitmap,
            } if peer_nothing => {
                // The peer never durably owned the disk, so the VM never ran there: the
                // handed-over copy is complete (the VM was paused since). Take it back.
                // We handed over at `meta.epoch`: the peer may have owned epoch + 1.
                meta.epoch = (meta.epoch + 1).max(known) + 1;
                meta.state = State::Recording;
                meta.reason = None;
                self.log(|| format!("{name}: resolve: peer holds nothing; reclaiming"));
                self.set_role(
                    h,
                    Role::Owner(Track::Live {
                        meta: meta.clone(),
                        bitmap: bitmap.clone(),
                    }),
                );
                self.store_commit(h, &mut meta, &mut bitmap)
            }
            Role::InDoubt { mut meta, bitmap } => {
                // We handed over at `meta.epoch`: the peer may have owned epoch + 1.
                meta.epoch = (meta.epoch + 1).max(known) + 1;
                self.log(|| format!("{name}: resolve: nobody owns; rebuilding"));
                self.begin_rebuild(h, meta, Some(bitmap))
            }
            Role::Unknown { epoch } => {
                let epoch = epoch.unwrap_or(0).max(known) + 1;
                let meta = Meta {
                    disk: self.disk.clone(),
                    geometry: self.geom,
                    checkpoint: None,
                    epoch,
                    state: State::Rebuilding,
                    reason: None,
                    generation: 0,
                };
                self.log(|| format!("{name}: resolve: nobody owns; rebuilding from scratch"));
                self.begin_rebuild(h, meta, None)
            }
            other => {
                self.hosts[h].role = other;
                Ok(())
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Rebuild (model: compare versions with the checkpoint snapshot, range by range)

    fn begin_rebuild(&mut self, h: usize, mut meta: Meta, base: Option<Bitmap>) -> Step {
        let known = meta
            .checkpoint
            .as_ref()
            .and_then(checkpoint_index)
            .filter(|&n| self.truth.has(n));
        let (ckpt, base) = match (known, base) {
            (Some(n), Some(b)) if b.geometry() == self.geom => (n, b),
            // Bits counted from an unknown checkpoint are worthless: start from the latest.
            _ => (self.truth.latest(), Bitmap::new(self.geom)),
        };
        meta.checkpoint = Some(checkpoint_id(ckpt));
        meta.state = State::Rebuilding;
        meta.reason = Some("rebuild running".into());
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: rebuild against ckpt-{ckpt} starts"));
        let mut b = base.clone();
        self.set_role(
            h,
            Role::Owner(Track::Rebuild(Box::new(Rebuild {
                meta: meta.clone(),
                base,
                marks: Bitmap::new(self.geom),
                found: Bitmap::new(self.geom),
                pos: 0,
                ckpt,
                marks_on: !self.has(Bug::RebuildMarksLate),
            }))),
        );
        // Durably an owner before the VM may run here again.
        self.store_commit(h, &mut meta, &mut b)?;
        let at = self.now + self.plan.rebuild_step_us;
        self.schedule(at, Ev::RebuildStep(h));
        Ok(())
    }

    fn rebuild_step(&mut self, h: usize) -> Step {
        if !self.hosts[h].up {
            return Ok(());
        }
        let blocks = self.truth.blocks();
        let n = blocks / self.plan.rebuild_steps + 1;
        let truth = &self.truth;
        let Role::Owner(Track::Rebuild(r)) = &mut self.hosts[h].role else {
            return Ok(());
        };
        let (lo, hi) = (r.pos, (r.pos + n).min(blocks));
        let found = &mut r.found;
        truth.compare(r.ckpt, lo, hi, |b| {
            found.set_blocks(b, b + 1);
        });
        r.pos = hi;
        if !r.marks_on && r.pos >= blocks / 2 {
            r.marks_on = true;
        }
        if r.pos < blocks {
            let at = self.now + self.plan.rebuild_step_us;
            self.schedule(at, Ev::RebuildStep(h));
            return Ok(());
        }
        let mut bitmap = r.found.clone();
        let _ = bitmap.merge(&r.marks);
        let _ = bitmap.merge(&r.base);
        let mut meta = r.meta.clone();
        meta.state = State::Recording;
        meta.reason = None;
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: rebuild done"));
        self.set_role(
            h,
            Role::Owner(Track::Live {
                meta: meta.clone(),
                bitmap: bitmap.clone(),
            }),
        );
        self.store_commit(h, &mut meta, &mut bitmap)
    }

    // ----------------------------------------------------------------------------------------
    // Migrations

    fn mig_start(&mut self, i: usize) -> Step {
        if !self.faults_on {
            return Ok(());
        }
        let src = (0..2).find(|&h| {
            let host = &self.hosts[h];
            host.up
                && host.mig.is_none()
                && matches!(&host.role, Role::Owner(Track::Live { meta, .. }) if meta.state == State::Recording)
        });
        let ready = src.is_some_and(|s| {
            let d = &self.hosts[1 - s];
            d.mig.is_none() && matches!(d.role, Role::None) && self.vm.paused_by.is_none()
        });
        let Some(s) = src.filter(|_| ready) else {
            self.schedule(self.now + 50 * MS, Ev::MigStart(i));
            return Ok(());
        };
        let d = 1 - s;
        let mp = self.plan.migrations[i].clone();
        let Role::Owner(Track::Live { meta, bitmap }) = &self.hosts[s].role else {
            return Ok(());
        };
        let cfg = SourceConfig {
            host: self.hosts[s].name.clone(),
            disk: self.disk.clone(),
            bitmap: bitmap.clone(),
            checkpoint: meta.checkpoint.clone(),
            epoch: meta.epoch,
            mode: if mp.postcopy {
                Mode::Postcopy
            } else {
                Mode::Precopy
            },
        };
        let Ok(ss) = SourceSession::new(cfg) else {
            self.violation("SourceSession::new refused a valid config".into());
            return Ok(());
        };
        let id = self.next_conn;
        self.next_conn += 1;
        let d_up = self.hosts[d].up;
        self.conns.insert(id, Conn::new(id, s, d, d_up, self.now));
        self.hosts[s].mig = Some(HostMig {
            id: i,
            conn: id,
            side: 0,
            sess: Sess::Src(Box::new(ss)),
            dec: FrameDecoder::new(),
            last_item: self.now,
            messages: 0,
            skip_payload: false,
            switched_at: None,
        });
        if d_up {
            let policy = DestPolicy {
                expected: vec![Expectation {
                    disk: self.disk.clone(),
                    from: Some(self.hosts[s].name.clone()),
                    owned_epoch: self.hosts[d].role.owner_epoch(),
                }],
                allow_postcopy: true,
            };
            self.hosts[d].mig = Some(HostMig {
                id: i,
                conn: id,
                side: 1,
                sess: Sess::Dst(Box::new(DestSession::new(policy))),
                dec: FrameDecoder::new(),
                last_item: self.now,
                messages: 0,
                skip_payload: false,
                switched_at: None,
            });
        }
        self.migs[i] = MigRec {
            started: true,
            src: s,
            dst: d,
            conn: id,
            ..MigRec::default()
        };
        let (sn, dn, pc) = (
            self.hosts[s].name.clone(),
            self.hosts[d].name.clone(),
            mp.postcopy,
        );
        self.log(|| format!("migration {i}: {sn} -> {dn} (postcopy={pc}) starts"));
        self.schedule(self.now + TICK, Ev::Tick { conn: id, side: 0 });
        self.schedule(self.now + TICK, Ev::Tick { conn: id, side: 1 });
        self.schedule(self.now + DRIVE_EVERY, Ev::MigDrive(i));
        self.drive(s)
    }

    fn session_of(&mut self, h: usize, i: usize) -> Option<&mut Sess> {
        let host = &mut self.hosts[h];
        if !host.up {
            return None;
        }
        match host.mig.as_mut() {
            Some(m) if m.id == i => Some(&mut m.sess),
            _ => None,
        }
    }

    /// The orchestrator (a hypervisor hook): rounds, switchover and abort as planned.
    fn mig_drive(&mut self, i: usize) -> Step {
        let rec = self.migs[i].clone();
        let mp = self.plan.migrations[i].clone();
        let (s, d) = (rec.src, rec.dst);
        let active = self.session_of(s, i).is_some() || self.session_of(d, i).is_some();
        if !active {
            return Ok(());
        }
        self.schedule(self.now + DRIVE_EVERY, Ev::MigDrive(i));
        let started = self.now; // (times are relative to the plan's start)
        let since = started.saturating_sub(mp.start_at);
        if let Some((at, side)) = mp.abort
            && since >= at
            && !rec.aborted
            && self.faults_on
        {
            self.migs[i].aborted = true;
            let h = if side == Side::Source { s } else { d };
            let hn = self.hosts[h].name.clone();
            self.log(|| format!("migration {i}: {hn} aborts"));
            match self.session_of(h, i) {
                Some(Sess::Src(x)) => {
                    let _ = x.abort();
                }
                Some(Sess::Dst(x)) => {
                    let _ = x.abort();
                }
                None => {}
            }
            self.drive(h)?;
        }
        let rounds = rec.rounds;
        let force = !self.faults_on;
        let Some(Sess::Src(ss)) = self.session_of(s, i) else {
            return Ok(());
        };
        if !rec.switched && (since >= mp.switch_after || force) {
            // A destination that did not negotiate post-copy gets a pre-copy switchover, as a
            // hook would fall back (the Welcome decides, docs/protocol.md §4).
            let ok = match ss.switchover(mp.postcopy) {
                Err(wire::proto::UsageError::PostcopyUnavailable) => ss.switchover(false).is_ok(),
                r => r.is_ok(),
            };
            if ok {
                self.migs[i].switched = true;
                // The hypervisor paused the VM for the switchover.
                if self.vm.on == Some(s) {
                    self.vm.on = None;
                }
                self.vm.paused_by = Some(i);
                if mp.postcopy && self.has(Bug::ResumeBeforeOwnership) && self.hosts[d].up {
                    self.vm.paused_by = None;
                    self.vm.on = Some(d);
                }
                self.log(|| format!("migration {i}: switchover (VM paused)"));
                return self.drive(s);
            }
        } else if !rec.switched
            && rounds < mp.rounds
            && !ss.is_streaming()
            && ss.rounds_acked()
            && ss.start_round().is_ok()
        {
            self.migs[i].rounds += 1;
            return self.drive(s);
        }
        Ok(())
    }

    /// Perform every action the session on `h` has for us, in order.
    fn drive(&mut self, h: usize) -> Step {
        loop {
            let Some(m) = self.hosts[h].mig.as_mut() else {
                return Ok(());
            };
            let a = match &mut m.sess {
                Sess::Src(s) => s.poll_action(),
                Sess::Dst(d) => d.poll_action(),
            };
            let Some(a) = a else { return Ok(()) };
            self.perform(h, a)?;
        }
    }

    fn perform(&mut self, h: usize, a: Action) -> Step {
        let Some(m) = self.hosts[h].mig.as_ref() else {
            return Ok(());
        };
        let (conn, side, id, is_src) = (m.conn, m.side, m.id, matches!(m.sess, Sess::Src(_)));
        match a {
            Action::Send(msg) => {
                if is_src && matches!(msg, Message::Switchover(_)) {
                    self.source_hands_over(h)?;
                }
                let name = self.hosts[h].name.clone();
                let mname = msg.name();
                self.log(|| format!("{name}: send {mname}"));
                let bytes = frame::encode(&msg).expect("sessions emit encodable messages");
                self.net_write(conn, side, &bytes);
                if mname == "Switchover"
                    && let Some(m) = self.hosts[h].mig.as_mut()
                {
                    m.switched_at = Some(self.now);
                }
                self.crash_point(h, true, mname)?;
            }
            Action::SendPayload(p) => self.net_write(conn, side, &p),
            Action::Commit { meta, bitmap } => self.dest_commit(h, id, meta, bitmap)?,
            Action::Retire { epoch, .. } => {
                self.tombstone_write(h, epoch)?;
                self.store_remove(h)?;
                self.set_role(h, Role::None);
            }
            Action::RebuildNeeded { .. } => {
                let role = std::mem::replace(&mut self.hosts[h].role, Role::None);
                match role {
                    Role::Owner(Track::Live { meta, bitmap }) => {
                        self.begin_rebuild(h, meta, Some(bitmap))?
                    }
                    other => {
                        self.hosts[h].role = other;
                        self.violation("RebuildNeeded without an owned bitmap".into());
                    }
                }
            }
            Action::Finished(o) => self.session_end(h, o, None)?,
            Action::Failed(f) => self.session_end(h, f.outcome, Some(f.error.to_string()))?,
        }
        Ok(())
    }

    /// The source's copy stops being an ownership claim, durably, before the Switchover
    /// message can leave (docs/simulation.md, rule 2).
    fn source_hands_over(&mut self, h: usize) -> Step {
        let role = std::mem::replace(&mut self.hosts[h].role, Role::None);
        let Role::Owner(Track::Live {
            mut meta,
            mut bitmap,
        }) = role
        else {
            self.hosts[h].role = role;
            self.violation("switchover from a host that is not the live owner".into());
            return Ok(());
        };
        meta.state = State::Incomplete;
        meta.reason = Some(HANDED_OVER.into());
        if !self.has(Bug::NoHandoverMark) {
            self.store_commit(h, &mut meta, &mut bitmap)?;
        }
        self.set_role(h, Role::InDoubt { meta, bitmap });
        Ok(())
    }

    fn dest_commit(&mut self, h: usize, i: usize, cm: CommitMeta, mut bitmap: Bitmap) -> Step {
        let mut meta = Meta {
            disk: cm.disk,
            geometry: cm.geometry,
            checkpoint: cm.checkpoint,
            epoch: cm.epoch,
            state: cm.state,
            reason: cm.reason,
            generation: 0,
        };
        self.store_commit(h, &mut meta, &mut bitmap)?;
        if let Some(HostMig {
            sess: Sess::Dst(d), ..
        }) = self.hosts[h].mig.as_mut()
        {
            let _ = d.committed_durably();
        }
        let in_session = matches!(self.hosts[h].role, Role::Owner(Track::InSession { .. }));
        match meta.state {
            State::Consistent => {
                // The VM runs (or resumes) here: the store must say `recording` before it
                // writes, or a crash would leave a stale `consistent` file.
                meta.state = State::Recording;
                meta.reason = None;
                self.set_role(
                    h,
                    Role::Owner(Track::Live {
                        meta: meta.clone(),
                        bitmap: bitmap.clone(),
                    }),
                );
                self.store_commit(h, &mut meta, &mut bitmap)?;
                self.vm_moves_to(h, i);
            }
            _ if in_session => {
                // Post-copy cut: the session hands the marks back; RebuildNeeded follows.
                self.set_role(h, Role::Owner(Track::Live { meta, bitmap }));
            }
            _ => {
                let epoch = meta.epoch;
                self.set_role(h, Role::Owner(Track::InSession { epoch }));
                self.vm_moves_to(h, i);
            }
        }
        Ok(())
    }

    fn vm_moves_to(&mut self, h: usize, i: usize) {
        if self.vm.paused_by == Some(i) {
            self.vm.paused_by = None;
            self.vm.on = Some(h);
            let name = self.hosts[h].name.clone();
            self.log(|| format!("VM resumes on {name}"));
        }
    }

    fn session_end(&mut self, h: usize, o: Outcome, err: Option<String>) -> Step {
        let Some(m) = self.hosts[h].mig.take() else {
            return Ok(());
        };
        let name = self.hosts[h].name.clone();
        self.log(|| format!("{name}: session ends {o:?} {}", err.unwrap_or_default()));
        if let Some(c) = self.conns.get_mut(&m.conn) {
            c.ends[m.side].session_done = true;
        }
        match m.sess {
            Sess::Src(s) => {
                self.migs[m.id].src_end = Some(o);
                if matches!(o, Outcome::Migrated { .. }) {
                    self.migs[m.id].switch_bytes = Some(s.stats().bytes_during_switchover);
                }
                match o {
                    Outcome::SourceKeeps => {
                        let role = std::mem::replace(&mut self.hosts[h].role, Role::None);
                        match role {
                            Role::InDoubt {
                                mut meta,
                                mut bitmap,
                            } => {
                                // The destination said it did not take the disk.
                                meta.state = State::Recording;
                                meta.reason = None;
                                self.set_role(
                                    h,
                                    Role::Owner(Track::Live {
                                        meta: meta.clone(),
                                        bitmap: bitmap.clone(),
                                    }),
                                );
                                self.store_commit(h, &mut meta, &mut bitmap)?;
                            }
                            other => self.hosts[h].role = other,
                        }
                    }
                    Outcome::HandedOver | Outcome::InDoubt => {
                        if matches!(self.hosts[h].role, Role::Owner(_)) {
                            self.source_hands_over(h)?;
                        }
                        self.schedule(self.now, Ev::Resolve(h));
                    }
                    _ => {}
                }
                if self.vm.paused_by == Some(m.id) {
                    self.vm.paused_by = None;
                }
            }
            Sess::Dst(_) => {
                self.migs[m.id].dst_end = Some(o);
            }
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // Network glue

    fn net_write(&mut self, conn: u64, side: usize, bytes: &[u8]) {
        let mut out = Vec::new();
        if let Some(c) = self.conns.get_mut(&conn) {
            let mut ctx = NetCtx {
                now: self.now,
                rng: &mut self.rng,
                params: self.net,
                out: &mut out,
            };
            c.write(side, bytes, &mut ctx);
        }
        self.send_packets(out);
    }

    fn send_packets(&mut self, out: Vec<(u64, Packet)>) {
        for (at, p) in out {
            self.schedule(at, Ev::Deliver(p));
        }
    }

    fn deliver(&mut self, p: Packet) -> Step {
        if self.partitioned() {
            return Ok(());
        }
        let mut out = Vec::new();
        let (conn, to) = (p.conn, p.to);
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        let host = c.ends[to].host;
        let mut ctx = NetCtx {
            now: self.now,
            rng: &mut self.rng,
            params: self.net,
            out: &mut out,
        };
        let mut bytes = c.receive(p, &mut ctx);
        self.send_packets(out);
        if bytes.is_empty() {
            return Ok(());
        }
        // `wire-corruption` hits data after the handshake (Hello/Offer, Welcome/Accept);
        // `offer-corruption` hits the handshake itself.
        let seen = self.hosts[host]
            .mig
            .as_ref()
            .filter(|m| m.conn == conn)
            .map(|m| m.messages);
        let eligible = match seen {
            None => false,
            // The Offer (at the destination) or the Accept (at the source).
            Some(n) if self.plan.corrupt_handshake => n == 1,
            Some(n) => n >= 2,
        };
        if self.wire_corrupt_armed > 0 && eligible {
            self.wire_corrupt_armed -= 1;
            let at = self.rng.random_range(0..bytes.len());
            let bit = self.rng.random_range(0..8);
            bytes[at] ^= 1 << bit;
            self.log(|| format!("wire corruption: flipped bit {bit} of a delivered byte"));
        }
        self.on_bytes(host, conn, &bytes)
    }

    fn on_bytes(&mut self, h: usize, conn: u64, bytes: &[u8]) -> Step {
        match self.hosts[h].mig.as_mut() {
            Some(m) if m.conn == conn => m.dec.push(bytes),
            _ => return Ok(()),
        }
        loop {
            let Some(m) = self.hosts[h].mig.as_mut() else {
                return Ok(());
            };
            if m.conn != conn {
                return Ok(());
            }
            let item = m.dec.next_item();
            if matches!(item, Ok(Some(_))) {
                m.last_item = self.now;
            }
            if matches!(item, Ok(Some(Incoming::Message(_)))) {
                m.messages += 1;
            }
            let name = self.hosts[h].name.clone();
            match &item {
                Ok(None) => return Ok(()),
                Ok(Some(Incoming::Message(msg))) => {
                    let mname = msg.name();
                    self.log(|| format!("{name}: recv {mname}"));
                }
                Ok(Some(Incoming::Payload(_))) => {}
                Err(e) => {
                    let e = e.to_string();
                    self.log(|| format!("{name}: frame error {e}"));
                }
            }
            let Some(m) = self.hosts[h].mig.as_mut() else {
                return Ok(());
            };
            // Exactly what a real driver does with each decoded item (docs/protocol.md §9);
            // usage errors (a finished session) are ignored as a driver would.
            // Deliberate bug: drop one chunk with a payload, header and bytes.
            if self.bugs.contains(&Bug::DestSkipsChunk) && matches!(m.sess, Sess::Dst(_)) {
                let skip = match &item {
                    Ok(Some(Incoming::Message(Message::Chunk(c)))) => {
                        c.payload_len > 0 && !self.migs[m.id].chunk_skipped
                    }
                    Ok(Some(Incoming::Payload(_))) => m.skip_payload,
                    _ => false,
                };
                if skip {
                    let is_payload = matches!(item, Ok(Some(Incoming::Payload(_))));
                    m.skip_payload = !is_payload;
                    self.migs[m.id].chunk_skipped = true;
                    continue;
                }
            }
            let failed = item.is_err();
            let handled = match &item {
                Ok(Some(Incoming::Message(msg))) => Some(msg.name()),
                _ => None,
            };
            let _ = match (item, &mut m.sess) {
                (Ok(Some(Incoming::Message(msg))), Sess::Src(s)) => s.handle(msg),
                (Ok(Some(Incoming::Message(msg))), Sess::Dst(d)) => d.handle(msg),
                (Ok(Some(Incoming::Payload(p))), Sess::Dst(d)) => d.on_payload(&p),
                (Ok(Some(Incoming::Payload(_))), Sess::Src(_)) => Ok(()),
                (Err(e), Sess::Src(s)) => s.on_frame_error(e),
                (Err(e), Sess::Dst(d)) => d.on_frame_error(e),
                (Ok(None), _) => Ok(()),
            };
            if failed {
                return self.drive(h);
            }
            if let Some(n) = handled {
                if n == "Switchover"
                    && let Some(m) = self.hosts[h].mig.as_mut()
                {
                    m.switched_at = Some(self.now);
                }
                self.drive(h)?;
                self.crash_point(h, false, n)?;
            }
            self.drive(h)?;
        }
    }

    fn tick(&mut self, conn: u64, side: usize) -> Step {
        let mut out = Vec::new();
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        let mut ctx = NetCtx {
            now: self.now,
            rng: &mut self.rng,
            params: self.net,
            out: &mut out,
        };
        let r = c.tick(side, &mut ctx);
        let e = &mut c.ends[side];
        let host = e.host;
        if e.alive && e.session_done && e.all_acked() {
            e.alive = false;
        }
        let alive = e.alive;
        let both_dead = c.ends.iter().all(|e| !e.alive);
        self.send_packets(out);
        if both_dead {
            self.conns.remove(&conn);
        } else if alive {
            self.schedule(self.now + TICK, Ev::Tick { conn, side });
        }
        if r == TickResult::Lost {
            let hit = matches!(self.hosts[host].mig.as_ref(), Some(m) if m.conn == conn);
            if hit && self.hosts[host].up {
                let name = self.hosts[host].name.clone();
                self.log(|| format!("{name}: idle timeout, peer lost"));
                if let Some(m) = self.hosts[host].mig.as_mut() {
                    let _ = match &mut m.sess {
                        Sess::Src(s) => s.peer_lost(),
                        Sess::Dst(d) => d.peer_lost(),
                    };
                }
                return self.drive(host);
            }
        }
        let up = self.hosts[host].up;
        let stalled = match self.hosts[host].mig.as_mut() {
            Some(m) if m.conn == conn && up => {
                let b = m.dec.buffered();
                (b > 0 && self.now.saturating_sub(m.last_item) >= FRAME_STALL).then_some(b)
            }
            _ => None,
        };
        let late = matches!(self.hosts[host].mig.as_ref(),
            Some(m) if m.conn == conn && up
                && m.switched_at.is_some_and(|t| self.now.saturating_sub(t) >= SWITCH_DEADLINE));
        if late {
            let name = self.hosts[host].name.clone();
            self.log(|| format!("{name}: switchover deadline passed; aborting"));
            if let Some(m) = self.hosts[host].mig.as_mut() {
                let _ = match &mut m.sess {
                    Sess::Src(s) => s.abort(),
                    Sess::Dst(d) => d.abort(),
                };
            }
            return self.drive(host);
        }
        if let Some(b) = stalled {
            let name = self.hosts[host].name.clone();
            self.log(|| format!("{name}: partial frame stalled ({b} bytes buffered)"));
            let e = wire::proto::FrameError::Truncated(b);
            if let Some(m) = self.hosts[host].mig.as_mut() {
                let _ = match &mut m.sess {
                    Sess::Src(s) => s.on_frame_error(e),
                    Sess::Dst(d) => d.on_frame_error(e),
                };
            }
            return self.drive(host);
        }
        Ok(())
    }
}

fn w_plan_summary(p: &Plan) -> String {
    format!(
        "blocks={} loss={:.3} dup={:.3} corrupt={:.3} jitter={}µs migrations={} crashes={} partitions={:?} wire_corruptions={}",
        p.blocks,
        p.net.loss,
        p.net.dup,
        p.net.corrupt,
        p.net.jitter,
        p.migrations.len(),
        p.crashes.len(),
        p.partitions,
        p.wire_corruptions.len()
    )
}
