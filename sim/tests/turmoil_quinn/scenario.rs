//! One seeded run: a source and a destination agent driver, each on its own turmoil host, moving
//! a bitmap over a real quinn connection (mutual TLS, the agent's framing) through a lossy,
//! partitioned simulated link; then the checks of docs/simulation.md ("Real transport under
//! turmoil").

use crate::socket::{Faults, SimSocket};
use agent::migrate::io::{NetEvent, send, spawn_reader};
use agent::transport::{Endpoint, Limits, TlsIdentity, TransportOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{interval, sleep, timeout};
use wire::proto::{
    Action, CommitMeta, DestPhase, DestPolicy, DestSession, Expectation, Incoming, Mode, Outcome,
    SourceConfig, SourcePhase, SourceSession,
};
use wire::{Bitmap, DiskId, Geometry, State};

/// The destination's UDP port.
const PORT: u16 = 4433;
/// Idle timeout of both endpoints. Short partitions last at most a third of it, long ones at
/// least this plus a second, so whether a connection must survive is never borderline: quinn's
/// probe backoff can leave up to about one partition length without traffic after the link
/// heals, and during the handshake (initial RTT estimate 333 ms) probes leave after about 1,
/// 3 and 7 s.
pub const IDLE: Duration = Duration::from_secs(9);
/// Size of one 64 KiB bitmap chunk's worth of disk at 512 B granularity.
const CHUNK_DISK: u64 = (wire::CHUNK_BYTES as u64) * 8 * 512;
/// The source's ownership epoch before the migration.
const EPOCH: u64 = 7;
/// How often a driver takes its next batch of writes.
const TICK: Duration = Duration::from_millis(25);

/// Everything random about one run, derived from its seed.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The seed.
    pub seed: u64,
    /// Disk geometry (512 B granularity, a few 64 KiB chunks).
    pub geom: Geometry,
    /// Dirty ranges (offset, length) of the source's bitmap when the migration starts.
    pub initial: Vec<(u64, u64)>,
    /// Writes on the source, one batch per tick, during pre-copy.
    pub src_writes: Vec<Vec<(u64, u64)>>,
    /// Writes on the destination once it owns the disk.
    pub dst_writes: Vec<Vec<(u64, u64)>>,
    /// Post-copy switchover (else pre-copy).
    pub postcopy: bool,
    /// Probability of losing each datagram.
    pub loss: f64,
    /// Fixed one-way latency of the link.
    pub latency: Duration,
    /// When the partition starts: simulated time, or with `cut_on_switchover` the delay after
    /// the destination received the Switchover message.
    pub cut_at: Duration,
    /// Time the partition from the switchover (the riskiest moment for ownership).
    pub cut_on_switchover: bool,
    /// How long it lasts.
    pub cut_for: Duration,
}

impl Plan {
    /// The plan of `seed`.
    pub fn new(seed: u64) -> Self {
        let mut r = StdRng::seed_from_u64(seed);
        let chunks = r.random_range(3..=6u64);
        let geom = Geometry::new(chunks * CHUNK_DISK - r.random_range(0..CHUNK_DISK / 2), 512)
            .expect("valid geometry");
        let size = geom.size();
        let ranges = |r: &mut StdRng, n: usize| -> Vec<(u64, u64)> {
            (0..n)
                .map(|_| {
                    let off = r.random_range(0..size);
                    let len = r.random_range(1..=256u64 << 10).min(size - off);
                    (off, len)
                })
                .collect()
        };
        let n = r.random_range(1..=300);
        let mut initial = ranges(&mut r, n);
        // Scattered single blocks make chunks that travel raw (64 KiB each), so the bulk
        // takes hundreds of datagrams and a partition can land in the middle of it.
        let scattered = r.random_range(0..=20_000);
        initial.extend((0..scattered).map(|_| (r.random_range(0..size / 512) * 512, 1)));
        let src_writes = (0..r.random_range(3..=12))
            .map(|_| {
                let n = r.random_range(0..=40);
                let mut batch = ranges(&mut r, n);
                // Scattered writes dirty many chunks: a post-copy switchover then has several
                // raw chunks to stream, which a partition can cut.
                let scattered = r.random_range(0..=1_000);
                batch.extend((0..scattered).map(|_| (r.random_range(0..size / 512) * 512, 1)));
                batch
            })
            .collect();
        let dst_writes = (0..r.random_range(1..=4))
            .map(|_| {
                let n = r.random_range(1..=20);
                ranges(&mut r, n)
            })
            .collect();
        let postcopy = r.random_bool(0.4);
        let loss = r.random_range(0.0..0.10);
        let latency = Duration::from_millis(r.random_range(1..=10));
        let cut_on_switchover = r.random_bool(0.3);
        // After the switchover: within one one-way latency, while the final data is in flight.
        let cut_at = Duration::from_millis(if cut_on_switchover {
            r.random_range(0..=latency.as_millis() as u64)
        } else {
            r.random_range(0..=250)
        });
        // One seed in five loses the link for longer than the idle timeout.
        let cut_for = if r.random_bool(0.2) {
            IDLE + Duration::from_millis(r.random_range(1000..=2000))
        } else {
            Duration::from_millis(r.random_range(20..=IDLE.as_millis() as u64 / 3))
        };
        Plan {
            seed,
            geom,
            initial,
            src_writes,
            dst_writes,
            postcopy,
            loss,
            latency,
            cut_at,
            cut_on_switchover,
            cut_for,
        }
    }

    /// Whether the partition outlasts the idle timeout (the connection may die).
    pub fn long_cut(&self) -> bool {
        self.cut_for > IDLE
    }

    fn bitmap(&self, ranges: &[(u64, u64)]) -> Bitmap {
        let mut b = Bitmap::new(self.geom);
        for &(o, l) in ranges {
            b.mark(o, l).expect("ranges are inside the disk");
        }
        b
    }
}

/// What the source driver saw.
#[derive(Debug, Default)]
pub struct SrcReport {
    /// How the session ended.
    pub outcome: Option<Outcome>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Initial bitmap ∪ every write taken before switchover (what the destination must get).
    pub final_bitmap: Option<Bitmap>,
    /// The epoch of a `Retire` action.
    pub retired: Option<u64>,
    /// Packets quinn declared lost on the source's connection.
    pub lost_packets: u64,
    /// The transport connection (handshake and greeting) was established.
    pub connected: bool,
}

/// What the destination driver saw.
#[derive(Debug, Default)]
pub struct DstReport {
    /// How the session ended (`None`: no connection was ever established).
    pub outcome: Option<Outcome>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The last durable commit: what this host's store would hold.
    pub committed: Option<(CommitMeta, Bitmap)>,
    /// Writes made here after taking ownership.
    pub writes: Vec<(u64, u64)>,
    /// A rebuild was requested.
    pub rebuild: bool,
    /// Packets quinn declared lost on the destination's connection.
    pub lost_packets: u64,
}

/// The result of one run.
#[derive(Debug)]
pub struct Run {
    /// The plan.
    pub plan: Plan,
    /// Source side.
    pub src: SrcReport,
    /// Destination side.
    pub dst: DstReport,
    /// Datagram counters of the adapter.
    pub sent: u64,
    /// Dropped by the random loss.
    pub lost: u64,
    /// Sent into the partition.
    pub cut: u64,
    /// Refused by turmoil (a misconfigured simulation, not a network fault).
    pub send_errors: u64,
    /// Simulated time the run took.
    pub elapsed: Duration,
    /// An error of the simulation itself (a driver failed to set up, or time ran out).
    pub sim_error: Option<String>,
}

fn options() -> TransportOptions {
    TransportOptions {
        idle_timeout: IDLE,
        keep_alive: Duration::from_secs(1),
        // Longer than the idle timeout: a handshake cut by a long partition dies of the
        // idle timeout first, like an established connection.
        handshake_timeout: IDLE * 2,
        stream_window: 1 << 20,
        conn_window: 2 << 20,
        send_window: 2 << 20,
        disable_gso: true,
        socket_buffer: 0,
        limits: Limits {
            max_frame: wire::proto::MAX_FRAME,
            max_payload: wire::proto::MAX_PAYLOAD,
            ..Limits::default()
        },
        max_bidi_streams: 4,
    }
}

fn rng_seed(seed: u64, side: u8) -> [u8; 32] {
    let mut s = [side; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s
}

/// Run `plan` with the cluster identities `src_id` and `dst_id` (names `src` and `dst`).
pub fn run(plan: &Plan, src_id: Arc<TlsIdentity>, dst_id: Arc<TlsIdentity>) -> Run {
    let faults = Arc::new(Faults::new(plan.loss));
    let src = Arc::new(Mutex::new(SrcReport::default()));
    let dst = Arc::new(Mutex::new(DstReport::default()));
    let src_done = Arc::new(Notify::new());
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(plan.latency)
        .max_message_latency(plan.latency)
        .udp_capacity(4096)
        .rng_seed(plan.seed)
        .build();
    {
        let (plan, faults, report, done) =
            (plan.clone(), faults.clone(), dst.clone(), src_done.clone());
        sim.client("dst", async move {
            destination(plan, dst_id, faults, report, done).await?;
            Ok(())
        });
    }
    {
        let (plan, faults, report, done) =
            (plan.clone(), faults.clone(), src.clone(), src_done.clone());
        sim.client("src", async move {
            let r = source(plan, src_id, faults, report).await;
            done.notify_one();
            r?;
            Ok(())
        });
    }
    let mut cut_from = (!plan.cut_on_switchover).then_some(plan.cut_at);
    let mut cut = false;
    let sim_error = loop {
        let now = sim.elapsed();
        if cut_from.is_none() && faults.switch_seen.load(Ordering::Relaxed) {
            cut_from = Some(now + plan.cut_at);
        }
        let want = cut_from.is_some_and(|from| now >= from && now < from + plan.cut_for);
        if want != cut {
            if want {
                sim.partition("src", "dst");
            } else {
                sim.repair("src", "dst");
            }
            faults.partitioned.store(want, Ordering::Relaxed);
            cut = want;
        }
        match sim.step() {
            Ok(true) => break None,
            Ok(false) => {}
            Err(e) => break Some(e.to_string()),
        }
    };
    let elapsed = sim.elapsed();
    drop(sim);
    fn take<T: Default>(m: &Mutex<T>) -> T {
        std::mem::take(&mut *m.lock().expect("report lock"))
    }
    Run {
        plan: plan.clone(),
        src: take(&src),
        dst: take(&dst),
        sent: faults.sent.load(Ordering::Relaxed),
        lost: faults.lost.load(Ordering::Relaxed),
        cut: faults.cut.load(Ordering::Relaxed),
        send_errors: faults.send_errors.load(Ordering::Relaxed),
        elapsed,
        sim_error,
    }
}

/// The source agent: the same loop as `agent::migrate::source`, with writes from the plan and
/// the store replaced by the report.
async fn source(
    plan: Plan,
    id: Arc<TlsIdentity>,
    faults: Arc<Faults>,
    report: Arc<Mutex<SrcReport>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let set = |f: &mut dyn FnMut(&mut SrcReport)| f(&mut report.lock().expect("report lock"));
    // Let the destination bind first.
    sleep(Duration::from_millis(10)).await;
    let socket = SimSocket::bind(
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        faults,
        plan.seed,
    )
    .await?;
    let ep = Endpoint::with_socket(
        socket,
        Arc::new(quinn::TokioRuntime),
        &id,
        options(),
        false,
        Some(rng_seed(plan.seed, 1)),
    )?;
    let mut live = plan.bitmap(&plan.initial);
    let mut session = SourceSession::new(SourceConfig {
        host: "src".into(),
        disk: DiskId::new("vm-disk0")?,
        bitmap: live.clone(),
        checkpoint: None,
        epoch: EPOCH,
        mode: Mode::Postcopy,
    })?;
    let to = SocketAddr::new(turmoil::lookup("dst"), PORT);
    let conn = match ep.connect(to, "dst").await {
        Ok(c) => c,
        Err(e) => {
            // Nothing left this host: the source keeps the disk.
            set(&mut |r| {
                r.outcome = Some(Outcome::SourceKeeps);
                r.error = Some(format!("connect: {e}"));
            });
            return Ok(());
        }
    };
    set(&mut |r| r.connected = true);
    let stream = match conn.open_stream().await {
        Ok(s) => s,
        Err(e) => {
            set(&mut |r| {
                r.outcome = Some(Outcome::SourceKeeps);
                r.error = Some(format!("open stream: {e}"));
            });
            return Ok(());
        }
    };
    let (mut w, r) = stream.split();
    let mut net = spawn_reader(r);
    let mut net_open = true;
    let mut writes = plan.src_writes.iter();
    let mut tick = interval(TICK);
    let mut marked = false;
    let mut switched = false;
    let over = |s: &SourceSession| s.phase() == SourcePhase::Done;
    let end = 'session: loop {
        if let Some(a) = session.poll_action() {
            match a {
                a @ (Action::Send(_) | Action::SendPayload(_)) => {
                    if send(&mut w, a).await.is_err() && !over(&session) {
                        session.peer_lost()?;
                    }
                }
                Action::Retire { epoch, .. } => set(&mut |r| r.retired = Some(epoch)),
                Action::Finished(o) => break 'session o,
                Action::Failed(f) => {
                    set(&mut |r| r.error = Some(f.error.to_string()));
                    break 'session f.outcome;
                }
                // The report is the store: nothing to make durable.
                Action::HandOver { .. } => session.handed_over_durably()?,
                Action::Commit { .. } | Action::RebuildNeeded { .. } => {}
            }
            continue;
        }
        tokio::select! {
            ev = net.recv(), if net_open => {
                if over(&session) {
                    net_open = false;
                    continue;
                }
                match ev {
                    Some(NetEvent::Item(Incoming::Message(m))) => session.handle(m)?,
                    Some(NetEvent::Item(Incoming::Payload(_))) => {
                        session.on_frame_error(wire::proto::FrameError::Malformed(
                            "unexpected payload from the destination".into(),
                        ))?;
                        net_open = false;
                    }
                    Some(NetEvent::Bad(e)) => {
                        session.on_frame_error(e)?;
                        net_open = false;
                    }
                    Some(NetEvent::Lost(_)) | None => {
                        session.peer_lost()?;
                        net_open = false;
                    }
                }
            }
            _ = tick.tick() => {
                if over(&session) || switched {
                    continue;
                }
                if let Some(batch) = writes.next() {
                    for &(o, l) in batch {
                        session.mark(o, l)?;
                        live.mark(o, l)?;
                        marked = true;
                    }
                    if marked && session.rounds_acked() && !session.is_streaming()
                        && session.round() >= 1
                    {
                        session.start_round()?;
                        marked = false;
                    }
                } else if session.phase() == SourcePhase::Rounds {
                    // The VM pauses: everything written so far must reach the destination.
                    // (Only once the destination accepted: before that there is nothing to
                    // switch over to, and the session refuses.)
                    session.switchover(plan.postcopy)?;
                    switched = true;
                    let snapshot = live.clone();
                    set(&mut |r| r.final_bitmap = Some(snapshot.clone()));
                }
            }
        }
    };
    let lost = conn.quinn().stats().path.lost_packets;
    set(&mut |r| {
        r.outcome = Some(end);
        r.lost_packets = lost;
    });
    // Orderly close: what we sent (Retired) is received, then close.
    let _ = timeout(Duration::from_secs(5), w.finish()).await;
    conn.close(agent::transport::endpoint::CLOSE_OK, "done");
    let _ = timeout(Duration::from_secs(5), ep.wait_idle()).await;
    Ok(())
}

/// The destination agent: the same loop as `agent::migrate::dest`, with the store replaced by
/// the report's `committed` and writes from the plan once it owns the disk.
async fn destination(
    plan: Plan,
    id: Arc<TlsIdentity>,
    faults: Arc<Faults>,
    report: Arc<Mutex<DstReport>>,
    src_done: Arc<Notify>,
) -> Result<(), Box<dyn std::error::Error>> {
    let set = |f: &mut dyn FnMut(&mut DstReport)| f(&mut report.lock().expect("report lock"));
    let socket = SimSocket::bind(
        (std::net::Ipv4Addr::UNSPECIFIED, PORT).into(),
        faults.clone(),
        plan.seed ^ 0x5eed,
    )
    .await?;
    let ep = Endpoint::with_socket(
        socket,
        Arc::new(quinn::TokioRuntime),
        &id,
        options(),
        true,
        Some(rng_seed(plan.seed, 2)),
    )?;
    // Accept until a connection is established or the source has given up.
    let conn = loop {
        tokio::select! {
            inc = ep.accept() => match inc {
                Some(inc) => match inc.establish().await {
                    Ok(c) => break c,
                    Err(e) => set(&mut |r| r.error = Some(format!("establish: {e}"))),
                },
                None => return Ok(()),
            },
            _ = src_done.notified() => return Ok(()),
        }
    };
    let mut session = DestSession::new(DestPolicy {
        expected: vec![Expectation {
            disk: DiskId::new("vm-disk0")?,
            from: Some(conn.peer_name().to_string()),
            owned_epoch: None,
            retired_at: None,
            epoch_unknown: None,
        }],
        allow_postcopy: true,
    });
    let stream = tokio::select! {
        s = conn.accept_stream() => s,
        _ = src_done.notified() => return Ok(()),
    };
    let Ok(stream) = stream else {
        set(&mut |r| r.outcome = Some(Outcome::SourceKeeps));
        return Ok(());
    };
    let (mut w, r) = stream.split();
    let mut net = spawn_reader(r);
    let mut writes = plan.dst_writes.iter();
    let mut tick = interval(TICK);
    // Writes made here before the first commit, held for it (the agent's rule,
    // `AgentState::arriving`).
    let mut early: Vec<(u64, u64)> = Vec::new();
    let over = |s: &DestSession| s.phase() == DestPhase::Done;
    let end = 'session: loop {
        while let Some(a) = session.poll_action() {
            match a {
                Action::Commit { meta, mut bitmap } => {
                    // `AgentState::adopt`: the session's bitmap ∪ the held writes ∪ what this
                    // host already owns at that epoch.
                    for (o, l) in early.drain(..) {
                        bitmap.mark(o, l)?;
                    }
                    if let Some((m, owned)) = report.lock().expect("report lock").committed.as_ref()
                        && m.epoch == meta.epoch
                    {
                        bitmap.merge(owned)?;
                    }
                    set(&mut |r| r.committed = Some((meta.clone(), bitmap.clone())));
                    session.committed_durably()?;
                }
                Action::RebuildNeeded { .. } => set(&mut |r| r.rebuild = true),
                a @ (Action::Send(_) | Action::SendPayload(_)) => {
                    if send(&mut w, a).await.is_err() && !over(&session) {
                        session.peer_lost()?;
                    }
                }
                Action::Finished(o) => break 'session o,
                Action::Failed(f) => {
                    set(&mut |r| r.error = Some(f.error.to_string()));
                    break 'session f.outcome;
                }
                Action::Retire { .. } | Action::HandOver { .. } => {}
            }
        }
        tokio::select! {
            ev = net.recv() => match ev {
                Some(NetEvent::Item(Incoming::Message(m))) => {
                    if matches!(m, wire::proto::Message::Switchover(_)) {
                        faults.switch_seen.store(true, Ordering::Relaxed);
                    }
                    session.handle(m)?
                }
                Some(NetEvent::Item(Incoming::Payload(p))) => session.on_payload(&p)?,
                Some(NetEvent::Bad(e)) => session.on_frame_error(e)?,
                Some(NetEvent::Lost(_)) | None => session.peer_lost()?,
            },
            _ = tick.tick() => {
                // The VM runs here once this host owns the disk (post-copy, or after the
                // final commit).
                if !session.owns() {
                    continue;
                }
                let Some(batch) = writes.next() else { continue };
                for &(o, l) in batch {
                    // The agent records local writes itself: in what it owns once it
                    // committed, held for the first commit before.
                    let mut r = report.lock().expect("report lock");
                    match r.committed.as_mut() {
                        Some((_, b)) => {
                            b.mark(o, l)?;
                        }
                        None => early.push((o, l)),
                    }
                    r.writes.push((o, l));
                }
            }
        }
    };
    let lost = conn.quinn().stats().path.lost_packets;
    set(&mut |r| {
        r.outcome = Some(end);
        r.lost_packets = lost;
    });
    let _ = timeout(Duration::from_secs(2), w.finish()).await;
    // The source closes once it has seen everything; give it a moment, then close ourselves.
    let _ = timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(agent::transport::endpoint::CLOSE_OK, "done");
    let _ = timeout(Duration::from_secs(5), ep.wait_idle()).await;
    Ok(())
}

/// How a run ended, when it ended safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Both sides say migrated; the destination's bitmap is exactly the source's final one
    /// plus the destination's own writes.
    Completed,
    /// No transport connection came up (the QUIC handshake or the greeting timed out): the
    /// source keeps the disk, the destination holds nothing.
    NoConnection,
    /// The migration died before switchover: the source keeps the disk, the destination
    /// holds nothing.
    SourceKept,
    /// The link died after a post-copy switchover: the destination owns an `incomplete`
    /// bitmap and asked for a rebuild.
    DestIncomplete,
    /// The link died right after a post-copy switchover, before the destination heard of it:
    /// the source handed over, the destination holds nothing; nobody claims a bitmap.
    HandedOverUnseen,
    /// The link died after a pre-copy switchover: the source does not act as owner; the
    /// destination either owns a verified bitmap or nothing.
    InDoubt,
}

/// Check the rules of docs/simulation.md on a finished run.
pub fn verify(run: &mut Run) -> Result<Verdict, String> {
    if let Some(e) = &run.sim_error {
        return Err(format!("simulation failed: {e}"));
    }
    if run.send_errors > 0 {
        return Err(format!("turmoil refused {} datagrams", run.send_errors));
    }
    let src_out = run.src.outcome.ok_or("the source never finished")?;
    let dst_out = run.dst.outcome;
    // The one rule that matters most: a consistent bitmap holds every write.
    if let Some((meta, bitmap)) = &mut run.dst.committed
        && meta.state == State::Consistent
    {
        let mut expected = run
            .src
            .final_bitmap
            .clone()
            .ok_or("destination committed consistent, but the source never switched over")?;
        for &(o, l) in &run.dst.writes {
            expected.mark(o, l).map_err(|e| e.to_string())?;
        }
        if *bitmap != expected {
            let missing = {
                let mut m = expected.clone();
                let _ = m.subtract(bitmap);
                m.count()
            };
            return Err(format!(
                "destination committed a consistent bitmap that differs from source ∪ \
                 destination writes ({missing} blocks missing)"
            ));
        }
        if bitmap.root() != expected.root() {
            return Err("consistent bitmap: roots differ".into());
        }
        if meta.epoch != EPOCH + 1 {
            return Err(format!(
                "committed at epoch {}, want {}",
                meta.epoch,
                EPOCH + 1
            ));
        }
    }
    let committed_state = run.dst.committed.as_ref().map(|(m, _)| m.state);
    match (src_out, dst_out) {
        (
            Outcome::Migrated { epoch, root },
            Some(Outcome::Migrated {
                epoch: de,
                root: dr,
            }),
        ) => {
            let mut fin = run
                .src
                .final_bitmap
                .clone()
                .ok_or("migrated without switchover")?;
            if epoch != EPOCH + 1 || de != epoch {
                return Err(format!("epochs: source {epoch}, destination {de}"));
            }
            if root != dr || root != fin.root() {
                return Err("final roots differ".into());
            }
            if run.src.retired != Some(epoch) {
                return Err("source finished migrated without retiring".into());
            }
            if committed_state != Some(State::Consistent) {
                return Err(format!(
                    "destination migrated but committed {committed_state:?}"
                ));
            }
            Ok(Verdict::Completed)
        }
        (Outcome::Migrated { .. }, other) => Err(format!(
            "source retired but the destination ended {other:?}"
        )),
        (Outcome::SourceKeeps, d) => {
            if committed_state.is_some() || d.is_some_and(|o| o.dest_owns()) {
                return Err(format!(
                    "source keeps the disk but the destination ended {d:?} with a commit \
                     {committed_state:?}: two owners"
                ));
            }
            Ok(if run.src.connected {
                Verdict::SourceKept
            } else {
                Verdict::NoConnection
            })
        }
        (Outcome::HandedOver, Some(Outcome::DestOwnsIncomplete { epoch })) => {
            if !run.plan.postcopy {
                return Err("pre-copy run ended incomplete at the destination".into());
            }
            if epoch != EPOCH + 1 || committed_state != Some(State::Incomplete) {
                return Err(format!(
                    "post-copy cut: epoch {epoch}, committed {committed_state:?}"
                ));
            }
            if !run.dst.rebuild {
                return Err("post-copy cut without a rebuild request".into());
            }
            Ok(Verdict::DestIncomplete)
        }
        (Outcome::HandedOver | Outcome::InDoubt, Some(Outcome::Migrated { .. })) => {
            // The destination verified and committed; the source never heard. The bitmap
            // was checked above.
            if committed_state != Some(State::Consistent) {
                return Err(format!(
                    "destination migrated but committed {committed_state:?}"
                ));
            }
            Ok(Verdict::InDoubt)
        }
        (Outcome::HandedOver, d) if run.plan.postcopy && committed_state.is_none() => {
            if d.is_some_and(|o| o.dest_owns()) {
                return Err(format!("destination owns without a commit: {d:?}"));
            }
            Ok(Verdict::HandedOverUnseen)
        }
        (Outcome::InDoubt, d) if !run.plan.postcopy => {
            if committed_state.is_some() || d.is_some_and(|o| o.dest_owns()) {
                return Err(format!("in doubt, destination ended {d:?}"));
            }
            Ok(Verdict::InDoubt)
        }
        (s, d) => Err(format!(
            "unexpected outcomes: source {s:?}, destination {d:?}"
        )),
    }
}
