//! The agent's in-memory view of its store: every disk it tracks, live.
//!
//! A `consistent` bitmap the agent takes over is committed as `recording` first, so if the agent
//! dies the next load reports it `inconsistent` (marks acknowledged since the last flush may be
//! missing). Marks go to memory and are committed every `flush_interval_ms`; a clean shutdown
//! commits everything back as `consistent`.

use super::config::Expectation;
use crate::control::Request;
use crate::exit::Failure;
use crate::local::{export_raw, mark_all, mark_report, new_meta, verify_report};
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
    store: Store,
    /// Tracked disks.
    pub disks: BTreeMap<DiskId, Tracked>,
    /// Disks this agent will accept as a migration destination.
    pub expectations: Vec<Expectation>,
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
                let mut meta = new_meta(disk.clone(), geometry, checkpoint);
                meta.state = State::Recording;
                let mut bits = Bitmap::new(geometry);
                self.store.create(&meta, &mut bits)?;
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
                let t = self.tracked(&disk)?;
                let Some(bits) = t.bits.as_mut() else {
                    return Err(Failure::untrusted(format!(
                        "bitmap for {disk} is unreadable; rebuild it before marking"
                    )));
                };
                let newly = mark_all(bits, &ranges)?;
                t.unflushed |= newly > 0;
                metrics::counter!("bitferry_marks_total").increment(ranges.len() as u64);
                Ok(mark_report(&t.meta, bits, newly))
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
            })),
            Request::Shutdown => Ok(json!({"shutting_down": true})),
        }
    }
}
