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
    Action, CommitMeta, DestPhase, DestPolicy, DestSession, Expectation, FrameDecoder, Incoming,
    Message, Mode, Outcome, SourceConfig, SourceSession,
};
use wire::{Bitmap, DiskId, Geometry, State};

mod migration;
mod netglue;
mod recovery;

const MS: u64 = 1_000;
/// The epoch tombstone's two copies (not `.bfb`, so the store ignores them).
const EPOCH_FILES: [&str; 2] = ["epoch-tombstone.0", "epoch-tombstone.1"];
/// Retry period of in-doubt resolution.
const RESOLVE_EVERY: u64 = 20 * MS;
/// Period of the migration orchestrator.
const DRIVE_EVERY: u64 = 3 * MS;
/// Longest time a write's report takes to reach the agent (control socket and scheduling).
const REPORT_DELAY: u64 = 1_500;
/// Longest time the (deliberately buggy) destination task leaves its queue unread.
const INBOX_DELAY: u64 = 10 * MS;
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
    /// The oldest pending write report of this host reaches its agent.
    Report(usize),
    /// Deliberate bug `dest-marks-via-session-queue`: the session task gets to its queue.
    Inbox(usize),
    Flush(usize),
    Backup,
    Writeback(usize),
    Deliver(Packet),
    Tick {
        conn: u64,
        side: usize,
    },
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
    /// The VM resumed on the destination before it owned the disk (post-copy early resume).
    pub vm_left: bool,
    /// The source's epoch and checkpoint when it started.
    pub src_epoch: u64,
    /// The source's checkpoint when it started.
    pub checkpoint: Option<wire::Checkpoint>,
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
                    reports: Default::default(),
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
            Ev::Report(h) => {
                self.deliver_report(h);
                Ok(())
            }
            Ev::Inbox(h) => {
                self.session_inbox(h);
                Ok(())
            }
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
        let changes = self.rng.random_bool(0.9);
        // The write is reported to the agent over its control socket and lands once the
        // report is acknowledged; reports of one host arrive in order.
        self.hosts[h].reports.push_back((first, end, changes));
        let delay = self.rng.random_range(0..=REPORT_DELAY);
        self.schedule(self.now + delay, Ev::Report(h));
        Ok(())
    }

    /// The oldest pending report of host `h` reaches its agent; once recorded, the write lands.
    fn deliver_report(&mut self, h: usize) {
        if !self.hosts[h].up {
            return;
        }
        let Some((first, end, changes)) = self.hosts[h].reports.pop_front() else {
            return;
        };
        self.mark(h, first, end);
        if changes {
            self.truth.write(first, end);
        }
        self.last_write = Some((first, end));
    }

    /// The hypervisor pauses the VM on `h`: the writes in flight complete first.
    pub(crate) fn drain_reports(&mut self, h: usize) {
        while !self.hosts[h].reports.is_empty() {
            self.deliver_report(h);
            crate::check::after_step(self);
        }
    }

    /// A write on host `h` reaches its agent, which must record it: the owner's live bitmap
    /// (and an outgoing session), a rebuild's mark set, or, for a disk arriving here and not
    /// adopted yet, the writes held beside the session (docs/protocol.md §5.5).
    fn mark(&mut self, h: usize, first: u64, end: u64) {
        let via_queue = self.has(Bug::DestMarksViaSessionQueue);
        let ignore_early = self.has(Bug::DestIgnoresEarlyWrites);
        let host = &mut self.hosts[h];
        let mut queued = false;
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
            Role::Owner(Track::Rebuild(r)) => {
                if r.marks_on {
                    r.marks.set_blocks(first, end);
                }
                true
            }
            // Not the owner yet, but the VM resumed here early (post-copy).
            _ => match host.mig.as_mut() {
                Some(HostMig {
                    sess: Sess::Dst(d),
                    held,
                    inbox,
                    ..
                }) => match d.geometry() {
                    None => false,
                    Some(_) if ignore_early => true,
                    Some(_) if via_queue => {
                        inbox.push((first, end));
                        queued = true;
                        true
                    }
                    Some(g) => {
                        held.get_or_insert_with(|| Bitmap::new(g))
                            .set_blocks(first, end);
                        true
                    }
                },
                _ => false,
            },
        };
        if queued {
            // The task drains its queue when its event loop gets to it, after whatever
            // network events it picked first.
            let delay = self.rng.random_range(0..=INBOX_DELAY);
            self.schedule(self.now + delay, Ev::Inbox(h));
        }
        if !ok {
            let name = self.hosts[h].name.clone();
            let role = self.hosts[h].role.name();
            self.violation(format!(
                "VM wrote blocks {first}..{end} on {name}, whose agent ({role}) cannot record it"
            ));
        }
    }

    /// Deliberate bug `dest-marks-via-session-queue`: what the destination's task did with a
    /// queued write before the F1 fix. While the session still took marks (receiving rounds
    /// or post-copy chunks) it kept them for its next commit; once the final commit had been
    /// taken it refused them, and the task parked them for a commit that never came.
    fn session_inbox(&mut self, h: usize) {
        let geom = self.geom;
        let host = &mut self.hosts[h];
        let Some(m) = host.mig.as_mut() else {
            return;
        };
        let pending = std::mem::take(&mut m.inbox);
        let takes = matches!(&m.sess, Sess::Dst(d)
            if matches!(d.phase(), DestPhase::Receiving | DestPhase::PostCopy));
        if !takes {
            let name = host.name.clone();
            let n = pending.len();
            self.log(|| format!("{name}: {n} queued writes refused by the session and parked"));
            return;
        }
        for (first, end) in pending {
            match &mut host.role {
                Role::Owner(Track::Live { bitmap, .. }) => {
                    bitmap.set_blocks(first, end);
                }
                _ => {
                    m.held
                        .get_or_insert_with(|| Bitmap::new(geom))
                        .set_blocks(first, end);
                }
            }
        }
        self.recheck = true;
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
