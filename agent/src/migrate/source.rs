//! The source side: connect to the destination agent, run a [`SourceSession`] until it ends.
//!
//! Ownership rules the driver adds around the session (docs/protocol.md §6, docs/simulation.md):
//! - just before the Switchover message leaves, the local copy is committed durably as
//!   `incomplete` ("handed over"): from then on this host must never report it `consistent`,
//!   even after a clean agent stop;
//! - on `Retire` the local copy is deleted;
//! - if the session ends with the source still owner (abort before switchover), the copy goes
//!   back to `recording`.

use super::io::{NetEvent, send, spawn_reader};
use super::{Cmd, Migration, MigrationPhase, Role, Status, outcome_name};
use crate::daemon::Shared;
use crate::transport::Endpoint;
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use wire::proto::{Action, Mode, Outcome, SourceConfig, SourcePhase, SourceSession};
use wire::{DiskId, State};

/// Start migrating `disk` to the agent at `to`. Registers the migration and returns at once;
/// the task runs in the background.
pub fn start(
    shared: &Shared,
    endpoint: &Endpoint,
    my_name: &str,
    disk: DiskId,
    to: SocketAddr,
    server_name: String,
    rate: Option<u64>,
) -> Result<serde_json::Value> {
    let mut st = shared.lock().expect("state lock");
    if let Some(m) = st.migrations.get(&disk)
        && m.active()
    {
        bail!("a migration of {disk} is already running");
    }
    let t = st
        .disks
        .get(&disk)
        .ok_or_else(|| crate::store::StoreError::NotFound(disk.clone()))?;
    if !matches!(t.meta.state, State::Recording | State::Consistent) {
        return Err(crate::exit::Failure::untrusted(format!(
            "bitmap for {disk} is {}, not consistent: rebuild it before migrating",
            t.meta.state
        )));
    }
    let bitmap = t.bits.clone().context("bitmap has no verified bits")?;
    // Created under the state lock: no mark can fall between the snapshot and the session.
    let session = SourceSession::new(SourceConfig {
        host: my_name.to_string(),
        disk: disk.clone(),
        bitmap,
        checkpoint: t.meta.checkpoint.clone(),
        epoch: t.meta.epoch,
        mode: Mode::Postcopy,
    })?;
    let (tx, rx) = mpsc::unbounded_channel();
    let status = Arc::new(Mutex::new(Status::new(
        disk.clone(),
        Role::Source,
        to.to_string(),
    )));
    let switchover_requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
    st.migrations.insert(
        disk.clone(),
        Migration {
            role: Role::Source,
            cmd: tx,
            status: status.clone(),
            switchover_requested: switchover_requested.clone(),
        },
    );
    drop(st);
    let task = Task {
        shared: shared.clone(),
        disk: disk.clone(),
        status: status.clone(),
        switchover_requested,
        peer: to.to_string(),
        pacer: Pacer::new(rate),
    };
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        let r = task.run(endpoint, to, server_name, session, rx).await;
        let mut s = status.lock().expect("status lock");
        if let Err(e) = r {
            s.error.get_or_insert_with(|| format!("{e:#}"));
            s.phase = MigrationPhase::Failed;
            tracing::warn!(disk = %s.disk, error = %format!("{e:#}"), "migration failed");
        }
        s.finished = true;
        s.converged = false;
        s.seconds = Some(s.started.elapsed().as_secs_f64());
    });
    Ok(serde_json::json!({"disk": disk, "to": to, "started": true}))
}

struct Task {
    shared: Shared,
    disk: DiskId,
    status: Arc<Mutex<Status>>,
    /// Shared with the agent state: while set, marks are refused here (`Migration`).
    switchover_requested: Arc<std::sync::atomic::AtomicBool>,
    peer: String,
    pacer: Pacer,
}

/// Keeps the migration stream at or below a byte rate (so a migration does not starve the VM's
/// own migration traffic on the same link).
struct Pacer {
    rate: Option<u64>,
    start: tokio::time::Instant,
    sent: std::sync::atomic::AtomicU64,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Self {
        Pacer {
            rate: rate.filter(|r| *r > 0),
            start: tokio::time::Instant::now(),
            sent: 0.into(),
        }
    }

    /// Account for `bytes` about to be sent and wait until the rate allows them.
    async fn pace(&self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        let total = self
            .sent
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed)
            + bytes as u64;
        let due = self.start + Duration::from_secs_f64(total as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
    }
}

impl Task {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    async fn run(
        &self,
        endpoint: Endpoint,
        to: SocketAddr,
        server_name: String,
        mut session: SourceSession,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
    ) -> Result<()> {
        let conn = match endpoint.connect(to, &server_name).await {
            Ok(c) => c,
            Err(e) => {
                // Nothing left this host: the source still owns the disk.
                self.set(|s| s.outcome = Some(outcome_name(&Outcome::SourceKeeps)));
                return Err(e).with_context(|| format!("connecting to {to}"));
            }
        };
        self.set(|s| {
            s.peer = conn.peer_name().to_string();
            s.phase = MigrationPhase::Negotiating;
        });
        let (mut w, r) = conn.open_stream().await?.split();
        let silence = w.limits().switchover_silence;
        let mut net = spawn_reader(r);
        // Last time the peer spoke or we sent something (docs/protocol.md §5.6).
        let mut quiet_since = tokio::time::Instant::now();
        let mut marked_since_round = false;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut switched = false;
        let mut net_open = true;
        // A switchover asked for before the destination accepted waits until it has.
        let mut pending_switchover: Option<bool> = None;
        let end: Outcome = 'session: loop {
            // Commands and peer messages first, so marks and a switchover interleave with a long
            // bulk stream (the session produces chunks lazily, one per poll).
            while let Ok(cmd) = cmds.try_recv() {
                self.on_cmd(
                    &mut session,
                    Some(cmd),
                    &mut marked_since_round,
                    &mut pending_switchover,
                )?;
            }
            while net_open && let Ok(ev) = net.try_recv() {
                quiet_since = tokio::time::Instant::now();
                net_open = self.on_net(&mut session, Some(ev))?;
            }
            if let Some(postcopy) = pending_switchover
                && !matches!(session.phase(), SourcePhase::Hello | SourcePhase::Offered)
            {
                pending_switchover = None;
                if !session_over(&session)
                    && let Err(e) = session.switchover(postcopy)
                {
                    tracing::warn!(disk = %self.disk, error = %e, "switchover refused");
                    self.set(|s| s.notice = Some(format!("switchover refused: {e}")));
                }
            }
            if let Some(a) = session.poll_action() {
                quiet_since = tokio::time::Instant::now();
                match a {
                    Action::HandOver {
                        epoch_next,
                        postcopy,
                        ..
                    } => {
                        let reason =
                            format!("switching over to {} (epoch {epoch_next})", self.peer);
                        match self.hand_over(&reason) {
                            Ok(()) => {
                                switched = true;
                                self.set(|s| {
                                    s.phase = if postcopy {
                                        MigrationPhase::PostCopy
                                    } else {
                                        MigrationPhase::SwitchingOver
                                    }
                                });
                                session.handed_over_durably()?;
                            }
                            Err(e) => self.withdraw_switchover(&mut session, &e)?,
                        }
                    }
                    a @ (Action::Send(_) | Action::SendPayload(_)) => {
                        // Paced as a whole before its header leaves, so a frame's payload
                        // follows it at once (the destination's frame-stall limit,
                        // docs/protocol.md §3).
                        if let Action::Send(m) = &a {
                            let n = wire::proto::frame::frame_len(m) + m.payload_len();
                            self.pacer.pace(n).await;
                        }
                        if let Err(e) = send(&mut w, a).await {
                            self.lost(&mut session, &e)?;
                        }
                    }
                    Action::Retire { disk, epoch } => self.retire(&disk, epoch)?,
                    Action::Finished(o) => break 'session o,
                    Action::Failed(f) => {
                        self.set(|s| s.error = Some(f.error.to_string()));
                        break 'session f.outcome;
                    }
                    Action::Commit { .. } | Action::RebuildNeeded { .. } => {}
                }
                self.report(&session, switched, marked_since_round);
                continue;
            }
            self.report(&session, switched, marked_since_round);
            tokio::select! {
                ev = net.recv(), if net_open => {
                    quiet_since = tokio::time::Instant::now();
                    net_open = self.on_net(&mut session, ev)?;
                }
                cmd = cmds.recv() => self.on_cmd(&mut session, cmd, &mut marked_since_round, &mut pending_switchover)?,
                _ = tick.tick() => {
                    // Switched over, everything sent, and the destination silent for too long:
                    // it is lost, and the ownership rules decide (simulator rule 10).
                    if switched && !session_over(&session) && quiet_since.elapsed() > silence {
                        tracing::warn!(disk = %self.disk, ?silence, "no word from the destination since the switchover; treating it as lost");
                        self.set(|s| s.notice = Some(format!("destination silent for {silence:?} after the switchover")));
                        session.peer_lost()?;
                        continue;
                    }
                    // Keep pre-copy rounds going while the VM writes: a new round as soon as
                    // the previous one is acknowledged and there is something to send.
                    if !switched
                        && marked_since_round
                        && session.rounds_acked()
                        && !session.is_streaming()
                        && session.round() >= 1
                    {
                        session.start_round()?;
                        marked_since_round = false;
                    }
                }
            }
        };
        self.finish(end, switched)?;
        // Orderly close: everything we sent is received, then close.
        let _ = tokio::time::timeout(Duration::from_secs(5), w.finish()).await;
        conn.close(crate::transport::endpoint::CLOSE_OK, "done");
        Ok(())
    }

    /// A write to the peer failed: to the session that is the peer going away (the outcome then
    /// follows the ownership rules), not a local failure.
    fn lost(
        &self,
        session: &mut SourceSession,
        e: &crate::transport::TransportError,
    ) -> Result<()> {
        tracing::info!(disk = %self.disk, error = %e, "sending to the destination failed");
        if !session_over(session) {
            session.peer_lost()?;
        }
        Ok(())
    }

    fn report(&self, session: &SourceSession, switched: bool, marked_since_round: bool) {
        let stats = session.stats();
        self.set(|s| {
            s.stats = stats;
            if !switched && s.phase != MigrationPhase::Failed {
                s.phase = match session.phase() {
                    SourcePhase::Hello | SourcePhase::Offered => MigrationPhase::Negotiating,
                    _ if stats.rounds == 0 => MigrationPhase::Bulk,
                    _ => MigrationPhase::PreCopy,
                };
            }
            s.converged = !switched
                && stats.rounds >= 1
                && session.rounds_acked()
                && !session.is_streaming()
                && !marked_since_round;
        });
    }

    /// Feed a network event to the session; returns whether the stream is still open.
    fn on_net(&self, session: &mut SourceSession, ev: Option<NetEvent>) -> Result<bool> {
        if session_over(session) {
            // Its last actions (Retire, Finished) are still queued; the peer closing now is
            // the normal end, not news for the session.
            return Ok(false);
        }
        match ev {
            Some(NetEvent::Item(wire::proto::Incoming::Message(m))) => session.handle(m)?,
            Some(NetEvent::Item(wire::proto::Incoming::Payload(_))) => {
                session.on_frame_error(wire::proto::FrameError::Malformed(
                    "unexpected payload from the destination".into(),
                ))?;
                return Ok(false);
            }
            Some(NetEvent::Bad(e)) => {
                session.on_frame_error(e)?;
                return Ok(false);
            }
            Some(NetEvent::Lost(why)) => {
                tracing::info!(disk = %self.disk, %why, "migration stream ended");
                session.peer_lost()?;
                return Ok(false);
            }
            None => {
                session.peer_lost()?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn on_cmd(
        &self,
        session: &mut SourceSession,
        cmd: Option<Cmd>,
        marked_since_round: &mut bool,
        pending_switchover: &mut Option<bool>,
    ) -> Result<()> {
        if session_over(session) {
            return Ok(());
        }
        match cmd {
            Some(Cmd::Mark(ranges)) => {
                for (o, l) in ranges {
                    // After switchover the VM runs on the destination; a late mark here is
                    // already in the local copy, which is no longer authoritative.
                    if let Err(e) = session.mark(o, l) {
                        tracing::warn!(disk = %self.disk, error = %e, "mark not sent to the destination");
                    }
                }
                *marked_since_round = true;
            }
            Some(Cmd::Switchover { postcopy }) => *pending_switchover = Some(postcopy),
            Some(Cmd::Abort) | None => session.abort()?,
        }
        Ok(())
    }

    /// Durably mark the local copy as no longer authoritative, before the switchover leaves.
    fn hand_over(&self, reason: &str) -> Result<()> {
        let mut st = self.shared.lock().expect("state lock");
        st.set_state(&self.disk, State::Incomplete, Some(reason.to_string()))?;
        Ok(())
    }

    /// The hand-over could not be made durable (finding F7: a full store). Nothing of the
    /// switchover left this host and the entry kept its `recording` state, so the switchover
    /// is withdrawn: this host stays the owner, takes marks again, and the migration goes on
    /// in pre-copy until a switchover is asked for again.
    fn withdraw_switchover(&self, session: &mut SourceSession, e: &anyhow::Error) -> Result<()> {
        tracing::error!(disk = %self.disk, error = %format!("{e:#}"), "could not record the hand-over; switchover withdrawn");
        session.hand_over_failed()?;
        // Under the state lock, like the check in `AgentState::mark`.
        let _st = self.shared.lock().expect("state lock");
        self.switchover_requested
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.set(|s| {
            s.switchover_error = Some(format!(
                "switchover withdrawn: the hand-over could not be recorded durably ({e:#}); \
                 this host still owns the disk and keeps recording; ask for the switchover \
                 again once the store is writable"
            ));
        });
        Ok(())
    }

    fn retire(&self, disk: &DiskId, epoch: u64) -> Result<()> {
        let mut st = self.shared.lock().expect("state lock");
        st.retire(disk, epoch)?;
        tracing::info!(%disk, epoch, "destination owns the disk; local copy retired");
        Ok(())
    }

    fn finish(&self, end: Outcome, switched: bool) -> Result<()> {
        let mut st = self.shared.lock().expect("state lock");
        let state = match end {
            Outcome::SourceKeeps => {
                if switched {
                    st.set_state(&self.disk, State::Recording, None)?;
                }
                Some(State::Recording)
            }
            // The destination committed it durably and said so (Committed): that bitmap, the
            // only copy left, is consistent. Ours is retired.
            Outcome::Migrated { .. } => Some(State::Consistent),
            Outcome::HandedOver | Outcome::InDoubt | Outcome::DestOwnsIncomplete { .. } => {
                st.set_state(
                    &self.disk,
                    State::Incomplete,
                    Some(format!("{} ({})", outcome_name(&end), self.peer)),
                )?;
                Some(State::Incomplete)
            }
        };
        drop(st);
        self.set(|s| {
            s.outcome = Some(outcome_name(&end));
            s.state = state;
            match end {
                Outcome::Migrated { epoch, root } => {
                    s.epoch = Some(epoch);
                    s.root = Some(root.to_hex());
                    s.phase = MigrationPhase::Completed;
                }
                Outcome::SourceKeeps => {
                    s.phase = if s.error.is_some() {
                        MigrationPhase::Failed
                    } else {
                        MigrationPhase::Aborted
                    }
                }
                _ => {
                    s.phase = if s.error.is_some() {
                        MigrationPhase::Failed
                    } else {
                        MigrationPhase::HandedOver
                    }
                }
            }
        });
        Ok(())
    }
}

/// Whether the session has reached its end (its final actions may still be queued).
fn session_over(session: &SourceSession) -> bool {
    session.phase() == SourcePhase::Done
}
