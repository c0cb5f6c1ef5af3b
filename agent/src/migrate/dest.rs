//! The destination side: accept migrations from other agents and run a [`DestSession`] for each.
//!
//! Authorization: the session only accepts disks this agent was told to expect (`expect`, or
//! `[[expect]]` in the config), and only from the named peer when one was given. The peer's name
//! comes from its certificate, checked by mutual TLS, not from what it claims in Hello.
//!
//! Writes reported here for the disk while it arrives never go through this task: the agent
//! state holds them from Accept on and merges them into whatever the session commits, under its
//! lock (`AgentState::arriving` / `adopt`). A queue between the control socket and the session
//! would let an acknowledged write fall between the session's final commit and the adopted
//! disk (finding F1).

use super::io::{NetEvent, send, spawn_reader};
use super::{Cmd, Migration, MigrationPhase, Role, Status, outcome_name};
use crate::daemon::Shared;
use crate::transport::{Connection, Endpoint};
use anyhow::Result;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use wire::proto::{Action, DestPolicy, DestSession, Expectation, Incoming, Outcome};
use wire::{Bitmap, State};

/// Accept connections forever, one task per connection.
pub async fn accept_loop(endpoint: Endpoint, shared: Shared) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            match incoming.establish().await {
                Ok(conn) => {
                    if let Err(e) = serve(conn, shared).await {
                        tracing::warn!(error = %format!("{e:#}"), "incoming migration failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "refused a connection"),
            }
        });
    }
}

fn policy(shared: &Shared, peer: &str) -> DestPolicy {
    let st = shared.lock().expect("state lock");
    let expected = st
        .expectations
        .iter()
        .filter(|e| e.from.as_deref().is_none_or(|f| f == peer))
        .map(|e| Expectation {
            disk: e.disk.clone(),
            // The TLS identity was checked above; the session compares it with Hello's host.
            from: Some(peer.to_string()),
            owned_epoch: st.disks.get(&e.disk).map(|t| t.meta.epoch),
            retired_at: st.retired_at(&e.disk),
            // Cannot tell which epochs are stale: every offer for the disk is refused, with
            // the real cause (an unreadable file, or e.g. "Too many open files").
            epoch_unknown: st.epoch_unknown(&e.disk).inspect(|why| {
                tracing::error!(disk = %e.disk, %why, "refusing offers for the disk");
            }),
        })
        .collect();
    DestPolicy {
        expected,
        allow_postcopy: true,
    }
}

async fn serve(conn: Connection, shared: Shared) -> Result<()> {
    let peer = conn.peer_name().to_string();
    let (mut w, r) = conn.accept_stream().await?.split();
    let silence = w.limits().switchover_silence;
    let mut net = spawn_reader(r);
    // Last time the source spoke (docs/protocol.md §5.6).
    let mut quiet_since = tokio::time::Instant::now();
    let mut session = DestSession::new(policy(&shared, &peer));
    let (tx, mut cmds) = mpsc::unbounded_channel::<Cmd>();
    let mut tx = Some(tx);
    let mut status: Option<Arc<Mutex<Status>>> = None;
    let end: Result<Outcome> = 'session: loop {
        while let Some(a) = session.poll_action() {
            match a {
                Action::Commit { meta, bitmap } => {
                    let state = meta.state;
                    let (disk, epoch) = (meta.disk.clone(), meta.epoch);
                    if let Err(e) = commit(&shared, meta, bitmap) {
                        tracing::error!(%disk, error = %format!("{e:#}"), "could not commit the migrated bitmap");
                        session.commit_failed(&format!("{e:#}"))?;
                        if !session.owns() {
                            // Pre-copy: the source keeps the disk; drop whatever we wrote.
                            shared
                                .lock()
                                .expect("state lock")
                                .forget_epoch(&disk, epoch);
                        }
                        // Otherwise this host owns the disk regardless (docs/protocol.md §6):
                        // the entry stays in memory, takes marks, and the flusher writes it
                        // once the store accepts writes again.
                        continue;
                    }
                    session.committed_durably()?;
                    if let Some(s) = &status {
                        s.lock().expect("status lock").state = Some(state);
                    }
                }
                Action::RebuildNeeded { disk, reason } => {
                    tracing::warn!(%disk, %reason, "post-copy cut short: the bitmap stays incomplete until rebuilt");
                    let mut st = shared.lock().expect("state lock");
                    st.rebuild_needed(&disk, &reason);
                }
                a @ (Action::Send(_) | Action::SendPayload(_)) => {
                    if let Err(e) = send(&mut w, a).await {
                        tracing::debug!(error = %e, "send to source failed");
                        session.peer_lost()?;
                    }
                }
                Action::Finished(o) => break 'session Ok(o),
                Action::Failed(f) => {
                    // Refusals happen before the offer is accepted, when no status exists
                    // yet: the log is the operator's only trace of them on this host.
                    let disk = session.disk().map(ToString::to_string).unwrap_or_default();
                    tracing::warn!(%peer, %disk, error = %f.error, "incoming migration refused or aborted");
                    if let Some(s) = &status {
                        s.lock().expect("status lock").error = Some(f.error.to_string());
                    }
                    break 'session Ok(f.outcome);
                }
                Action::Retire { .. } | Action::HandOver { .. } => {}
            }
        }
        // Register as soon as the offer names the disk, so marks and status reach us.
        if status.is_none()
            && let Some(disk) = session.disk().cloned()
            && let Some(geometry) = session.geometry()
            && let Some(tx) = tx.take()
        {
            let s = Arc::new(Mutex::new(Status::new(
                disk.clone(),
                Role::Destination,
                peer.clone(),
            )));
            s.lock().expect("status lock").phase = MigrationPhase::Receiving;
            let mut st = shared.lock().expect("state lock");
            st.arriving(&disk, geometry);
            st.migrations.insert(
                disk,
                Migration {
                    role: Role::Destination,
                    cmd: tx,
                    status: s.clone(),
                    switchover_requested: Default::default(),
                },
            );
            drop(st);
            status = Some(s);
        }
        let owns = session.owns();
        if let Some(s) = &status {
            let mut s = s.lock().expect("status lock");
            s.stats = session.stats();
            s.phase = match session.state() {
                State::Incomplete if owns => MigrationPhase::PostCopy,
                _ if owns => MigrationPhase::Owner,
                _ => MigrationPhase::Receiving,
            };
        }
        // A post-copy destination waits on the source for the rest of the bitmap.
        let waiting = owns && session.state() == State::Incomplete;
        tokio::select! {
            _ = tokio::time::sleep_until(quiet_since + silence), if waiting => {
                tracing::warn!(%peer, ?silence, "no word from the source during post-copy; treating it as lost");
                session.peer_lost()?;
            }
            ev = net.recv() => {
                quiet_since = tokio::time::Instant::now();
                match ev {
                    Some(NetEvent::Item(Incoming::Message(m))) => session.handle(m)?,
                    Some(NetEvent::Item(Incoming::Payload(p))) => session.on_payload(&p)?,
                    Some(NetEvent::Bad(e)) => session.on_frame_error(e)?,
                    Some(NetEvent::Lost(why)) => {
                        tracing::info!(%peer, %why, "migration stream ended");
                        session.peer_lost()?
                    }
                    None => session.peer_lost()?,
                }
            }
            Some(cmd) = cmds.recv() => match cmd {
                Cmd::Abort => session.abort()?,
                // Marks are the agent state's (see the module comment); switchovers are the
                // source's to start.
                Cmd::Mark(_) | Cmd::Switchover { .. } => {}
            },
        }
    };
    let outcome = end?;
    if let Some(disk) = session.disk() {
        shared.lock().expect("state lock").arrival_ended(disk);
    }
    let seconds = status.as_ref().map(|s| {
        s.lock()
            .expect("status lock")
            .started
            .elapsed()
            .as_secs_f64()
    });
    if let Some(s) = &status {
        let mut s = s.lock().expect("status lock");
        s.finished = true;
        s.seconds = seconds;
        s.stats = session.stats();
        s.outcome = Some(outcome_name(&outcome));
        s.phase = match outcome {
            Outcome::Migrated { epoch, root } => {
                s.epoch = Some(epoch);
                s.root = Some(root.to_hex());
                MigrationPhase::Completed
            }
            Outcome::DestOwnsIncomplete { epoch } => {
                s.epoch = Some(epoch);
                MigrationPhase::Incomplete
            }
            _ if s.error.is_some() => MigrationPhase::Failed,
            _ => MigrationPhase::Aborted,
        };
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), w.finish()).await;
    // The source closes once it has seen everything; give it a moment, then close ourselves.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(crate::transport::endpoint::CLOSE_OK, "done");
    Ok(())
}

/// Perform a session's `Commit`: merge into what this host tracks for the disk and write it.
fn commit(shared: &Shared, meta: wire::proto::CommitMeta, bitmap: Bitmap) -> Result<()> {
    let mut st = shared.lock().expect("state lock");
    st.adopt(meta, bitmap)?;
    Ok(())
}
