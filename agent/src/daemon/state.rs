//! The agent's in-memory view of its store: every disk it tracks, live.
//!
//! A `consistent` bitmap the agent takes over is committed as `recording` first, so if the agent
//! dies the next load reports it `inconsistent` (marks acknowledged since the last flush may be
//! missing). Marks go to memory and are committed every `flush_interval_ms`; a clean shutdown
//! commits everything back as `consistent`.

use super::config::Expectation;
use crate::control::Request;
use crate::exit::Failure;
use crate::local::{create_entry, export_raw, mark_all, mark_report, verify_report};
use crate::migrate::{Cmd, Migration, Role};
use crate::report;
use crate::store::{Meta, Store, StoreError};
use anyhow::{Result, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Instant;
use wire::{Bitmap, DiskId, Geometry, State};

/// One tracked disk.
pub struct Tracked {
    /// Metadata; `state` is the live state.
    pub meta: Meta,
    /// The bits, if they verified when loaded.
    pub bits: Option<Bitmap>,
    /// Marks applied in memory but not yet committed.
    pub unflushed: bool,
}

/// Everything the agent holds.
pub struct AgentState {
    pub(crate) store: Store,
    /// Tracked disks.
    pub disks: BTreeMap<DiskId, Tracked>,
    /// Disks this agent will accept as a migration destination.
    pub expectations: Vec<Expectation>,
    /// Migrations, running or finished (the last one per disk, for `migrate status`).
    pub migrations: BTreeMap<DiskId, Migration>,
    /// Rebuild jobs, running or finished (the last one per disk), and their configuration.
    pub rebuilds: super::rebuild::Rebuilds,
    started: Instant,
    flushes: u64,
}

impl AgentState {
    /// Take over every bitmap in `store`: consistent ones become `recording`.
    pub fn open(mut store: Store, expectations: Vec<Expectation>) -> Result<Self, StoreError> {
        let mut disks = BTreeMap::new();
        for disk in store.list()? {
            let l = store.load(&disk)?;
            let state = l.state();
            let (meta, bits) = match (l.meta, l.bitmap) {
                (Some(m), b) => (m, b),
                (None, _) => {
                    tracing::warn!(%disk, reason = ?l.reason, "store file unreadable; skipped until rebuilt or removed");
                    continue;
                }
            };
            let mut t = Tracked {
                meta,
                bits,
                unflushed: false,
            };
            if state == State::Consistent {
                t.meta.state = State::Recording;
                if let Some(b) = t.bits.as_mut() {
                    store.commit(&mut t.meta, b)?;
                }
            } else {
                tracing::warn!(%disk, %state, reason = ?t.meta.reason, "bitmap not trustworthy");
            }
            disks.insert(disk, t);
        }
        Ok(AgentState {
            store,
            disks,
            expectations,
            migrations: BTreeMap::new(),
            rebuilds: Default::default(),
            started: Instant::now(),
            flushes: 0,
        })
    }

    /// Commit every disk with unflushed marks (state unchanged).
    pub fn flush(&mut self) -> Result<(), StoreError> {
        for t in self.disks.values_mut() {
            if t.unflushed
                && let Some(b) = t.bits.as_mut()
            {
                self.store.commit(&mut t.meta, b)?;
                t.unflushed = false;
                self.flushes += 1;
                metrics::gauge!("bitferry_dirty_blocks", "disk" => t.meta.disk.to_string())
                    .set(b.count() as f64);
            }
        }
        Ok(())
    }

    /// Clean shutdown: every `recording` bitmap is committed back as `consistent`.
    pub fn close(&mut self) -> Result<(), StoreError> {
        self.stop_rebuilds();
        for t in self.disks.values_mut() {
            if let Some(b) = t.bits.as_mut()
                && (t.unflushed || t.meta.state == State::Recording)
            {
                if t.meta.state == State::Recording {
                    t.meta.state = State::Consistent;
                }
                self.store.commit(&mut t.meta, b)?;
                t.unflushed = false;
            }
        }
        Ok(())
    }

    fn tracked(&mut self, disk: &DiskId) -> Result<&mut Tracked> {
        match self.disks.get_mut(disk) {
            Some(t) => Ok(t),
            None => Err(StoreError::NotFound(disk.clone()).into()),
        }
    }

    fn migration(&self, disk: &DiskId, role: Option<Role>) -> Result<&Migration> {
        match self.migrations.get(disk) {
            Some(m) if role.is_none_or(|r| r == m.role) => Ok(m),
            Some(_) => bail!("this agent is not the source of {disk}'s migration"),
            None => bail!("no migration of {disk} on this agent"),
        }
    }

    /// Set a tracked disk's state (and reason) and commit it durably.
    pub fn set_state(
        &mut self,
        disk: &DiskId,
        state: State,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        let Some(t) = self.disks.get_mut(disk) else {
            return Err(StoreError::NotFound(disk.clone()));
        };
        t.meta.state = state;
        t.meta.reason = reason;
        if let Some(b) = t.bits.as_mut() {
            self.store.commit(&mut t.meta, b)?;
            t.unflushed = false;
        }
        Ok(())
    }

    /// The destination owns `disk` at `epoch` now: record that (offers below `epoch` are stale
    /// from then on, `agent/src/store/retired.rs`), then forget the local copy, in memory and
    /// in the store.
    pub fn retire(&mut self, disk: &DiskId, epoch: u64) -> Result<(), StoreError> {
        self.disks.remove(disk);
        self.store.retire(disk, epoch)
    }

    /// Undo a destination commit that could not be completed, if the disk is held at `epoch`
    /// (the failed commit's): the source keeps ownership.
    pub fn forget_epoch(&mut self, disk: &DiskId, epoch: u64) {
        if self.disks.get(disk).is_some_and(|t| t.meta.epoch == epoch) {
            self.disks.remove(disk);
            if let Err(e) = self.store.remove(disk) {
                tracing::error!(%disk, error = %e, "could not remove a partial commit");
            }
        }
    }

    /// A post-copy was cut short: the disk stays `incomplete` with its local marks until a
    /// rebuild against the checkpoint's reference completes; the agent starts that rebuild by
    /// itself when a `[[reference]]` is configured for the disk.
    pub fn rebuild_needed(&mut self, disk: &DiskId, reason: &str) {
        if let Some(t) = self.disks.get_mut(disk) {
            t.meta.reason = Some(format!("{reason}; rebuild needed"));
            // Durably, so an agent restarted before the rebuild still knows it is needed.
            if let Some(b) = t.bits.as_mut() {
                match self.store.commit(&mut t.meta, b) {
                    Ok(()) => t.unflushed = false,
                    Err(e) => {
                        tracing::error!(%disk, error = %e, "could not record that a rebuild is needed")
                    }
                }
            }
        }
        self.auto_rebuild(disk);
    }

    /// Perform a migration destination's commit: take the disk over at the session's epoch,
    /// merging with what this host already recorded for it at that epoch (local marks made
    /// after a post-copy switchover), and write it durably. A `consistent` result is kept live
    /// as `recording`, like every bitmap this agent tracks.
    pub fn adopt(&mut self, m: wire::proto::CommitMeta, bitmap: Bitmap) -> Result<(), StoreError> {
        let state = if m.state == State::Consistent {
            State::Recording
        } else {
            m.state
        };
        let t = match self.disks.get_mut(&m.disk) {
            Some(t) if t.meta.epoch == m.epoch && t.meta.geometry == m.geometry => {
                match t.bits.as_mut() {
                    Some(b) => {
                        b.merge(&bitmap).expect("same geometry checked above");
                    }
                    None => t.bits = Some(bitmap),
                }
                t
            }
            _ => {
                let generation = self.disks.get(&m.disk).map_or(0, |t| t.meta.generation);
                self.disks.insert(
                    m.disk.clone(),
                    Tracked {
                        meta: Meta {
                            disk: m.disk.clone(),
                            geometry: m.geometry,
                            checkpoint: None,
                            epoch: m.epoch,
                            state,
                            reason: None,
                            generation,
                        },
                        bits: Some(bitmap),
                        unflushed: false,
                    },
                );
                self.disks.get_mut(&m.disk).expect("just inserted")
            }
        };
        t.meta.state = state;
        t.meta.reason = m.reason;
        t.meta.checkpoint = m.checkpoint;
        let b = t.bits.as_mut().expect("set above");
        self.store.commit(&mut t.meta, b)?;
        t.unflushed = false;
        Ok(())
    }

    /// Record `ranges` as written on `disk` (the `Mark` request) and report. `true` in the
    /// result: the mark must be durable before it is acknowledged (a rebuild is running and
    /// trusts the stored entry) and [`AgentState::make_durable`] has not run yet. The control
    /// server calls it after releasing the lock once, so concurrent marks share one commit.
    pub fn mark(&mut self, disk: &DiskId, ranges: &[(u64, u64)]) -> Result<(Value, bool)> {
        // docs/operations.md §Migrations: once a switchover is requested this host can no
        // longer get a write to the destination. Saying so is the only safe answer: the
        // tracker must report the write to the destination instead.
        if self
            .migrations
            .get(disk)
            .is_some_and(Migration::source_handed_off)
        {
            bail!(
                "{disk} is being handed over to another host (switchover requested): \
                 this mark was NOT recorded here; report the write to the destination"
            );
        }
        // A running rebuild gets every mark (docs/rebuild.md §In the agent).
        let rebuilding = self.rebuild_mark(disk, ranges)?;
        // A running migration gets every mark too (docs/protocol.md §5).
        let forwarded = match self.migrations.get(disk) {
            Some(m) if m.active() => m.cmd.send(Cmd::Mark(ranges.to_vec())).is_ok(),
            _ => false,
        };
        if forwarded && !self.disks.contains_key(disk) {
            return Ok((json!({"disk": disk, "forwarded_to_migration": true}), false));
        }
        let t = self
            .disks
            .get_mut(disk)
            .ok_or(StoreError::NotFound(disk.clone()))?;
        let Some(bits) = t.bits.as_mut() else {
            return Err(Failure::untrusted(format!(
                "bitmap for {disk} is unreadable; rebuild it before marking"
            )));
        };
        let newly = mark_all(bits, ranges)?;
        t.unflushed |= newly > 0;
        // Write-through while rebuilding: a resumed rebuild trusts this entry to hold
        // every acknowledged mark since its first run began.
        let durable_pending = (rebuilding || t.meta.state == State::Rebuilding) && t.unflushed;
        metrics::counter!("bitferry_marks_total").increment(ranges.len() as u64);
        Ok((mark_report(&t.meta, bits, newly), durable_pending))
    }

    /// Commit `disk`'s entry if it holds marks not yet on disk. Every mark applied before this
    /// call is then durable: marks and commits both happen under the state lock, and a commit
    /// writes everything applied so far (group commit: one commit covers all marks that arrived
    /// while the previous one was being written).
    pub fn make_durable(&mut self, disk: &DiskId) -> Result<()> {
        let Some(t) = self.disks.get_mut(disk) else {
            return Ok(());
        };
        if let (true, Some(bits)) = (t.unflushed, t.bits.as_mut()) {
            self.store.commit(&mut t.meta, bits)?;
            t.unflushed = false;
            metrics::counter!("bitferry_mark_commits_total").increment(1);
        }
        Ok(())
    }

    /// Execute one control request.
    pub fn execute(&mut self, req: Request) -> Result<Value> {
        match req {
            Request::Create {
                disk,
                size,
                granularity,
                checkpoint,
            } => {
                let geometry = Geometry::new(size, granularity)?;
                if self.disks.contains_key(&disk) {
                    return Err(StoreError::Exists(disk).into());
                }
                let (meta, mut bits) = create_entry(
                    &mut self.store,
                    disk.clone(),
                    geometry,
                    checkpoint,
                    State::Recording,
                )?;
                let v = report::bitmap(&meta, Some(&mut bits), None);
                self.disks.insert(
                    disk,
                    Tracked {
                        meta,
                        bits: Some(bits),
                        unflushed: false,
                    },
                );
                Ok(v)
            }
            Request::Mark { disk, ranges } => {
                let (report, durable_pending) = self.mark(&disk, &ranges)?;
                if durable_pending {
                    self.make_durable(&disk)?;
                }
                Ok(report)
            }
            Request::Show { disk } => {
                let t = self.tracked(&disk)?;
                let reason = t.meta.reason.clone();
                Ok(report::bitmap(&t.meta, t.bits.as_mut(), reason.as_deref()))
            }
            Request::Verify { disk } => {
                self.flush()?;
                let t = self
                    .disks
                    .get_mut(&disk)
                    .ok_or(StoreError::NotFound(disk.clone()))?;
                let mut stored = self.store.load_own(&disk)?;
                let live_root = t.bits.as_mut().map(|b| b.root());
                let stored_root = stored.bitmap.as_mut().map(|b| b.root());
                if live_root.is_some() && live_root != stored_root {
                    bail!("stored file for {disk} does not match the live bitmap");
                }
                let reason = stored.reason.clone().or(t.meta.reason.clone());
                verify_report(&disk, t.meta.state, stored_root.map(|r| r.to_hex()), reason)
            }
            Request::Export {
                disk,
                raw,
                allow_untrusted,
            } => {
                let t = self.tracked(&disk)?;
                let state = t.meta.state;
                let Some(bits) = t.bits.as_mut() else {
                    return Err(Failure::untrusted(format!(
                        "bitmap for {disk} is unreadable"
                    )));
                };
                export_raw(&disk, state, bits, &raw, allow_untrusted)
            }
            Request::List => {
                let rows: Vec<Value> = self
                    .disks
                    .iter()
                    .map(|(d, t)| {
                        json!({
                            "disk": d,
                            "state": t.meta.state,
                            "size": t.meta.geometry.size(),
                            "granularity": t.meta.geometry.granularity(),
                            "epoch": t.meta.epoch,
                            "dirty_blocks": t.bits.as_ref().map(Bitmap::count),
                        })
                    })
                    .collect();
                Ok(json!({ "bitmaps": rows }))
            }
            Request::Expect { disk, from } => {
                let e = Expectation { disk, from };
                if !self.expectations.contains(&e) {
                    self.expectations.push(e.clone());
                }
                Ok(json!({"expecting": e}))
            }
            Request::Status => Ok(json!({
                "uptime_seconds": self.started.elapsed().as_secs_f64(),
                "disks": self.disks.len(),
                "expectations": self.expectations,
                "flushes": self.flushes,
                "rebuilds": self.rebuild_reports(),
            })),
            Request::Shutdown => Ok(json!({"shutting_down": true})),
            Request::MigrateStart { .. } => {
                bail!("migrate start is handled by the agent's network side")
            }
            Request::MigrateSwitchover { disk, postcopy } => {
                let m = self.migration(&disk, Some(Role::Source))?;
                let phase = m.status.lock().expect("status lock").phase;
                if !matches!(phase, "connecting" | "negotiating" | "bulk" | "pre-copy") {
                    bail!("{disk}'s migration is not ready for switchover (phase: {phase})");
                }
                m.switchover_requested
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                m.cmd
                    .send(Cmd::Switchover { postcopy })
                    .map_err(|_| anyhow::anyhow!("the migration of {disk} has already ended"))?;
                Ok(json!({"disk": disk, "switchover": true, "postcopy": postcopy}))
            }
            Request::MigrateStatus { disk } => {
                let m = self.migration(&disk, None)?;
                Ok(m.status.lock().expect("status lock").to_json())
            }
            Request::MigrateAbort { disk } => {
                let m = self.migration(&disk, None)?;
                let _ = m.cmd.send(Cmd::Abort);
                Ok(json!({"disk": disk, "abort": true}))
            }
            Request::RebuildStart {
                disk,
                image,
                manifest,
                backup,
                granularity,
                rate,
            } => self.start_rebuild(
                super::rebuild::JobSpec {
                    disk,
                    image,
                    manifest,
                    backup,
                    granularity,
                    rate,
                },
                false,
            ),
            Request::RebuildStatus { disk } => self.rebuild_status(disk.as_ref()),
            Request::RebuildCancel { disk } => self.cancel_rebuild(&disk),
        }
    }
}
