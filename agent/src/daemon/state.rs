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

/// The part of `bitmap verify` that runs without the state lock: the stored file read and
/// compared with the live root taken under it.
pub struct VerifyProbe {
    reader: Option<Store>,
    disk: DiskId,
    live_root: Option<wire::Root>,
    generation: u64,
    state: State,
    reason: Option<String>,
}

/// How a [`VerifyProbe`] ended.
pub enum VerifyEnd {
    /// The report (or why the bitmap does not verify).
    Done(Result<Value>),
    /// The file is gone: the agent marks the disk inconsistent ([`AgentState::verify_missing`]).
    Missing,
    /// The disk was committed again meanwhile: take a new probe.
    Raced,
}

impl VerifyProbe {
    /// Read and check the stored file through the probe's own handle on the store.
    pub fn finish(mut self) -> VerifyEnd {
        match self.reader.take() {
            Some(reader) => self.finish_with(&reader),
            None => VerifyEnd::Done(Err(anyhow::anyhow!(
                "this agent's store cannot be read outside its lock"
            ))),
        }
    }

    /// Read and check the stored file through `reader`.
    pub fn finish_with(self, reader: &Store) -> VerifyEnd {
        let mut stored = match reader.load_own(&self.disk) {
            Err(StoreError::NotFound(_)) => return VerifyEnd::Missing,
            Err(e) => return VerifyEnd::Done(Err(e.into())),
            Ok(l) => l,
        };
        if stored
            .meta
            .as_ref()
            .is_some_and(|m| m.generation != self.generation)
        {
            return VerifyEnd::Raced;
        }
        let disk = &self.disk;
        let stored_root = stored.bitmap.as_mut().map(|b| b.root());
        if self.live_root.is_some() && self.live_root != stored_root {
            return VerifyEnd::Done(Err(anyhow::anyhow!(
                "stored file for {disk} does not match the live bitmap"
            )));
        }
        let reason = stored.reason.clone().or(self.reason);
        VerifyEnd::Done(verify_report(
            disk,
            self.state,
            stored_root.map(|r| r.to_hex()),
            reason,
        ))
    }
}

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
    /// Writes made on this host to a disk that is arriving by migration and not yet adopted
    /// (from the destination's Accept to its first commit). They are merged into the disk's
    /// entry by [`AgentState::adopt`] under the same lock that records them, so a write is
    /// either here or in the entry whatever order the migration task sees its events in
    /// (finding F1: they used to wait in the task's queue and were lost when the session
    /// committed first). Dropped if the migration ends without this host owning the disk.
    arriving: BTreeMap<DiskId, Bitmap>,
    /// Store files this agent found but cannot read even the header of (damaged, an unknown
    /// version, another disk's id), with why. Listed `inconsistent` with the reason and never
    /// forgotten silently (finding F8); offers for them are refused, since their epoch is
    /// unknown. A rebuild of the disk replaces the file.
    unreadable: BTreeMap<DiskId, String>,
    /// Rebuild jobs, running or finished (the last one per disk), and their configuration.
    pub rebuilds: super::rebuild::Rebuilds,
    started: Instant,
    flushes: u64,
    /// The store's directory, for reads that run outside the state lock (`verify`).
    store_dir: Option<std::path::PathBuf>,
    /// [`AgentState::close`] ran: every bitmap has been committed for the last time, so no
    /// request may be served any more (a mark applied now would be acknowledged and in no file:
    /// the kill campaign's clean-stop finding).
    closed: bool,
}

impl AgentState {
    /// Take over every bitmap in `store`: consistent ones become `recording`.
    pub fn open(mut store: Store, expectations: Vec<Expectation>) -> Result<Self, StoreError> {
        let mut disks = BTreeMap::new();
        let mut unreadable = BTreeMap::new();
        for disk in store.list()? {
            let l = store.load(&disk)?;
            let state = l.state();
            let (meta, bits) = match (l.meta, l.bitmap) {
                (Some(m), b) => (m, b),
                (None, _) => {
                    let why = l.reason.unwrap_or_else(|| "unreadable".into());
                    tracing::warn!(%disk, reason = %why, "store file unreadable: listed inconsistent until rebuilt or removed");
                    unreadable.insert(disk, why);
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
            arriving: BTreeMap::new(),
            unreadable,
            rebuilds: Default::default(),
            started: Instant::now(),
            flushes: 0,
            store_dir: None,
            closed: false,
        })
    }

    /// A copy of a tracked disk's bits (benches and tests).
    pub fn bits_of(&self, disk: &DiskId) -> Result<Bitmap> {
        self.disks
            .get(disk)
            .and_then(|t| t.bits.clone())
            .ok_or_else(|| StoreError::NotFound(disk.clone()).into())
    }

    /// Stop tracking a disk in memory (its file stays; benches only).
    pub fn forget(&mut self, disk: &DiskId) {
        self.disks.remove(disk);
    }

    /// Where the store lives, so `verify` can read files without the state lock.
    pub fn set_store_dir(&mut self, dir: &std::path::Path) {
        self.store_dir = Some(dir.to_path_buf());
    }

    /// `bitmap verify`, under the lock: commit the disk's pending marks and take what the
    /// stored file must match. The file itself is read by [`VerifyProbe::finish`].
    pub fn verify_begin(&mut self, disk: &DiskId) -> Result<VerifyProbe> {
        self.tracked(disk)?;
        self.make_durable(disk)?;
        let dir = self.store_dir.clone();
        let t = self.tracked(disk)?;
        Ok(VerifyProbe {
            // A second handle on the same files: this process holds the store's lock.
            reader: dir.map(|d| {
                Store::with_storage(
                    Box::new(crate::store::FsStorage::new(&d)),
                    crate::store::Access::ReadOnly,
                    &d,
                )
            }),
            disk: disk.clone(),
            live_root: t.bits.as_mut().map(|b| b.root()),
            generation: t.meta.generation,
            state: t.meta.state,
            reason: t.meta.reason.clone(),
        })
    }

    /// `verify` found no file for a tracked disk: it was deleted behind the agent's back, so
    /// the durable copy (and the epoch it recorded) is gone and nothing proves the superset
    /// after a crash. The disk becomes `inconsistent` (finding F8).
    pub fn verify_missing(&mut self, disk: &DiskId) -> Result<Value> {
        let why = "its store file disappeared while the agent ran (deleted?); rebuild it";
        tracing::error!(%disk, "{why}");
        self.set_state(disk, State::Inconsistent, Some(why.into()))?;
        Err(Failure::untrusted(format!(
            "bitmap for {disk} is inconsistent: {why}"
        )))
    }

    /// `bitmap export`, under the lock: the state and a copy of the bits (touched chunks only).
    pub fn export_snapshot(&mut self, disk: &DiskId) -> Result<(State, Bitmap)> {
        let t = self.tracked(disk)?;
        let Some(bits) = t.bits.as_ref() else {
            return Err(Failure::untrusted(format!(
                "bitmap for {disk} is unreadable"
            )));
        };
        Ok((t.meta.state, bits.clone()))
    }

    /// Commit every disk with unflushed marks (state unchanged). A disk whose commit fails
    /// (a full store, say) keeps its marks in memory, still unflushed, and the next flush tries
    /// again: nothing acknowledged is dropped, and the other disks are still committed. Returns
    /// the first failure.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        let mut first = None;
        for t in self.disks.values_mut() {
            if t.unflushed
                && let Some(b) = t.bits.as_mut()
            {
                match self.store.commit(&mut t.meta, b) {
                    Ok(()) => {
                        t.unflushed = false;
                        self.flushes += 1;
                        metrics::gauge!("bitferry_dirty_blocks", "disk" => t.meta.disk.to_string())
                            .set(b.count() as f64);
                    }
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Clean shutdown: every `recording` bitmap is committed back as `consistent`.
    pub fn close(&mut self) -> Result<(), StoreError> {
        self.closed = true;
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

    /// Whether [`AgentState::close`] has run (the agent is stopping; requests are refused).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn tracked(&mut self, disk: &DiskId) -> Result<&mut Tracked> {
        if let Some(why) = self.unreadable.get(disk) {
            return Err(Failure::untrusted(format!(
                "bitmap for {disk} is inconsistent: its store file cannot be read ({why}); \
                 rebuild it (bitferry rebuild --disk) or remove the file"
            )));
        }
        match self.disks.get_mut(disk) {
            Some(t) => Ok(t),
            None => Err(StoreError::NotFound(disk.clone()).into()),
        }
    }

    /// Why this host cannot tell which epochs of `disk` are stale, if it cannot: its store
    /// file or its retirement record is unreadable (docs/protocol.md §6).
    pub fn epoch_unknown(&self, disk: &DiskId) -> Option<String> {
        if let Some(why) = self.unreadable.get(disk) {
            return Some(format!("its store file cannot be read ({why})"));
        }
        match self.store.retired_at(disk) {
            Ok(_) => None,
            Err(e) => Some(format!(
                "its retirement record cannot be read ({})",
                e.detailed()
            )),
        }
    }

    /// The epoch at which this host handed `disk` over, if it ever did (an unreadable record
    /// is reported by [`AgentState::epoch_unknown`]).
    pub fn retired_at(&self, disk: &DiskId) -> Option<u64> {
        self.store.retired_at(disk).ok().flatten()
    }

    /// The disk's store file is unreadable; a rebuild replacing it clears this.
    pub fn is_unreadable(&self, disk: &DiskId) -> bool {
        self.unreadable.contains_key(disk)
    }

    /// A new entry replaced an unreadable file (a rebuild's first commit).
    pub(crate) fn replaced_unreadable(&mut self, disk: &DiskId) {
        self.unreadable.remove(disk);
    }

    fn migration(&self, disk: &DiskId, role: Option<Role>) -> Result<&Migration> {
        match self.migrations.get(disk) {
            Some(m) if role.is_none_or(|r| r == m.role) => Ok(m),
            Some(_) => bail!("this agent is not the source of {disk}'s migration"),
            None => bail!("no migration of {disk} on this agent"),
        }
    }

    /// Set a tracked disk's state (and reason) and commit it durably. If the commit fails the
    /// entry keeps its previous state and reason, in memory as on disk (finding F7: a failed
    /// hand-over must not leave the disk `incomplete` in memory while the VM still runs here).
    pub fn set_state(
        &mut self,
        disk: &DiskId,
        state: State,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        let Some(t) = self.disks.get_mut(disk) else {
            return Err(StoreError::NotFound(disk.clone()));
        };
        let before = (t.meta.state, t.meta.reason.clone());
        t.meta.state = state;
        t.meta.reason = reason;
        if let Some(b) = t.bits.as_mut() {
            if let Err(e) = self.store.commit(&mut t.meta, b) {
                (t.meta.state, t.meta.reason) = before;
                return Err(e);
            }
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

    /// A destination is receiving `disk` (its session accepted the offer): from now on writes
    /// reported here for the disk are recorded, beside the session, until it is adopted.
    pub fn arriving(&mut self, disk: &DiskId, geometry: Geometry) {
        if !self.disks.contains_key(disk) {
            self.arriving
                .entry(disk.clone())
                .or_insert_with(|| Bitmap::new(geometry));
        }
    }

    /// An incoming migration of `disk` ended. If this host does not own the disk, the writes
    /// held for it are dropped: the source still owns it and tracked the VM's writes itself.
    pub fn arrival_ended(&mut self, disk: &DiskId) {
        self.arriving.remove(disk);
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
    /// merging with what this host already recorded for it (writes held while it arrived, and
    /// the entry at that epoch: local marks made after a post-copy switchover), and write it
    /// durably. A `consistent` result is kept live as `recording`, like every bitmap this agent
    /// tracks. If the write fails the entry stays in memory, unflushed, so the flusher retries
    /// and marks keep landing in it (finding F6: an owned disk must not vanish because its
    /// store is full); the caller decides whether to forget it ([`AgentState::forget_epoch`]).
    pub fn adopt(
        &mut self,
        m: wire::proto::CommitMeta,
        mut bitmap: Bitmap,
    ) -> Result<(), StoreError> {
        if let Some(held) = self.arriving.remove(&m.disk)
            && held.geometry() == m.geometry
        {
            bitmap.merge(&held).expect("same geometry checked above");
        }
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
        t.unflushed = true;
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
        // Arriving by migration, not adopted yet: held here, merged at adoption.
        if !self.disks.contains_key(disk)
            && let Some(held) = self.arriving.get_mut(disk)
        {
            let newly = mark_all(held, ranges)?;
            metrics::counter!("bitferry_marks_total").increment(ranges.len() as u64);
            return Ok((
                json!({
                    "disk": disk,
                    "newly_dirty_blocks": newly,
                    "held_for_incoming_migration": true,
                }),
                false,
            ));
        }
        // An outgoing migration gets every mark too: they travel in its next round
        // (docs/protocol.md §5.3). The mark is in the entry below either way.
        if let Some(m) = self.migrations.get(disk)
            && m.role == Role::Source
            && m.active()
        {
            let _ = m.cmd.send(Cmd::Mark(ranges.to_vec()));
        }
        let t = self.tracked(disk)?;
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
                if let Some(why) = self.unreadable.get(&disk) {
                    bail!(
                        "a store file for {disk} exists but cannot be read ({why}); rebuild it \
                         or remove the file before creating the disk again"
                    );
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
            Request::Show {
                disk,
                offset,
                limit,
            } => {
                if let Some(why) = self.unreadable.get(&disk) {
                    return Ok(report::unreadable(&disk, why));
                }
                let t = self.tracked(&disk)?;
                let reason = t.meta.reason.clone();
                report::bitmap_page(
                    &t.meta,
                    t.bits.as_mut(),
                    reason.as_deref(),
                    offset.unwrap_or(0),
                    limit,
                )
            }
            // The control server runs these two in parts, the file work outside the lock.
            Request::Verify { disk } => {
                let probe = self.verify_begin(&disk)?;
                match probe.finish_with(&self.store) {
                    VerifyEnd::Done(r) => r,
                    VerifyEnd::Missing => self.verify_missing(&disk),
                    VerifyEnd::Raced => bail!("{disk} was committed during verify; try again"),
                }
            }
            Request::Export {
                disk,
                raw,
                allow_untrusted,
                force,
            } => {
                let (state, mut bits) = self.export_snapshot(&disk)?;
                export_raw(&disk, state, &mut bits, &raw, allow_untrusted, force)
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
                    .chain(self.unreadable.iter().map(|(d, why)| {
                        json!({
                            "disk": d,
                            "state": State::Inconsistent,
                            "size": null,
                            "granularity": null,
                            "epoch": null,
                            "dirty_blocks": null,
                            "reason": why,
                        })
                    }))
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
                if !phase.before_switchover() {
                    bail!("{disk}'s migration is not ready for switchover (phase: {phase})");
                }
                m.status.lock().expect("status lock").switchover_error = None;
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
