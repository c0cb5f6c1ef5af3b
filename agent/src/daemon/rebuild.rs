//! Background rebuild jobs in the agent: `rebuild --disk` through the control socket, automatic
//! rebuilds of lost bitmaps that have a configured `[[reference]]`, and resume after a restart.
//!
//! Safety (docs/rebuild.md §In the agent): while a job runs, the disk is `rebuilding` and every
//! mark for it goes both into the job's `marks` (from before the scan starts, since the job is
//! registered under the same lock that `Mark` takes) and into the tracked bitmap, which is
//! committed before the mark is acknowledged. At the end, scan result ∪ marks is committed as
//! `recording`, bound to the reference. A resumed job starts its marks from that committed
//! entry, which holds every acknowledged mark since the first run began, so the part decided by
//! the earlier run cannot miss a write either.

use super::config::Reference;
use super::state::{AgentState, Tracked};
use crate::local::mark_all;
use crate::migrate::Role;
use crate::rebuild::RebuildError;
use crate::rebuild::job::{
    JobConfig, JobHandle, Progress, ProgressSnapshot, RebuildJob, ReferenceSpec,
};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wire::{Bitmap, Checkpoint, DiskId, State};

/// Subdirectory of the store with the jobs' state files (a dot-directory: the store lists only
/// `*.bfb` files).
pub const STATE_DIR: &str = ".rebuild";

/// The agent's rebuild jobs and their configuration.
#[derive(Default)]
pub struct Rebuilds {
    /// The last job per disk, running or finished.
    pub jobs: BTreeMap<DiskId, RebuildRun>,
    /// `[[reference]]` entries of the config.
    pub references: Vec<Reference>,
    /// Where state files live (`STORE/.rebuild`); rebuilds are refused until set.
    pub dir: Option<PathBuf>,
}

/// What a job compares. Recorded in the job's state file (as its tag) so a restarted agent can
/// resume it even without a configured reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Disk id.
    pub disk: DiskId,
    /// The live image.
    pub image: PathBuf,
    /// Block manifest of the reference.
    pub manifest: Option<PathBuf>,
    /// Raw backup image as the reference.
    pub backup: Option<PathBuf>,
    /// Block size; the disk's (or the manifest's) when absent.
    pub granularity: Option<u64>,
    /// Read limit, bytes per second.
    pub rate: Option<u64>,
}

impl JobSpec {
    fn reference_path(&self) -> &Path {
        self.manifest
            .as_deref()
            .or(self.backup.as_deref())
            .unwrap_or(Path::new(""))
    }
}

impl From<&Reference> for JobSpec {
    fn from(r: &Reference) -> Self {
        JobSpec {
            disk: r.disk.clone(),
            image: r.image.clone(),
            manifest: r.manifest.clone(),
            backup: r.backup.clone(),
            granularity: r.granularity,
            rate: r.rate,
        }
    }
}

/// The state file's tag: the run's id (also in the store entry's reason) and its spec.
#[derive(Debug, Serialize, Deserialize)]
struct Tag {
    id: String,
    spec: JobSpec,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Scanning.
    Running,
    /// Committed: the disk is live again.
    Completed,
    /// Cancelled on request: the disk is `inconsistent`.
    Cancelled,
    /// Failed: the disk is `inconsistent`.
    Failed,
}

/// One job.
pub struct RebuildRun {
    handle: Option<JobHandle>,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    marks: Arc<Mutex<Bitmap>>,
    state: RunState,
    spec: JobSpec,
    id: String,
    auto: bool,
    resumed_from: Option<u64>,
    state_file: PathBuf,
    result: Option<Value>,
    error: Option<String>,
    last: Option<ProgressSnapshot>,
}

fn reason_for(id: &str, reference: &Path) -> String {
    format!("rebuild {id} in progress against {}", reference.display())
}

fn state_file(dir: &Path, disk: &DiskId) -> PathBuf {
    let name = crate::store::file_name(disk);
    let stem = name.strip_suffix(crate::store::SUFFIX).unwrap_or(&name);
    dir.join(format!("{stem}.state"))
}

fn remove_quietly(p: &Path) {
    if let Err(e) = std::fs::remove_file(p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %p.display(), error = %e, "could not remove a rebuild state file");
    }
}

impl RebuildRun {
    fn report(&self, disk: &DiskId) -> Value {
        let s = self.last.unwrap_or_else(|| self.progress.snapshot());
        let running = self.state == RunState::Running;
        json!({
            "disk": disk,
            "state": self.state,
            "done": s.done,
            "total": s.total,
            "rate": s.rate,
            "eta_seconds": if running { s.eta.map(|d| d.as_secs_f64()) } else { None },
            "bytes_read": s.bytes_read,
            "resumed_from": self.resumed_from,
            "image": self.spec.image,
            "reference": self.spec.reference_path(),
            "auto": self.auto,
            "id": self.id,
            "error": self.error,
            "result": self.result,
        })
    }
}

impl AgentState {
    /// Enable rebuild jobs: state files go under `store_dir/.rebuild`; `references` are the
    /// config's `[[reference]]` entries.
    pub fn configure_rebuilds(&mut self, store_dir: &Path, references: Vec<Reference>) {
        self.rebuilds.dir = Some(store_dir.join(STATE_DIR));
        self.rebuilds.references = references;
    }

    fn configured_reference(&self, disk: &DiskId) -> Option<JobSpec> {
        self.rebuilds
            .references
            .iter()
            .find(|r| &r.disk == disk)
            .map(JobSpec::from)
    }

    fn recorded_spec(&self, disk: &DiskId) -> Option<JobSpec> {
        let dir = self.rebuilds.dir.as_ref()?;
        let s = crate::rebuild::state::load(&state_file(dir, disk)).ok()??;
        serde_json::from_str::<Tag>(&s.tag).ok().map(|t| t.spec)
    }

    /// At agent start: resume interrupted jobs, and rebuild every untrusted bitmap that has a
    /// configured reference (a `recording` file left by a crash, an unreadable file, a cut
    /// post-copy).
    pub fn start_pending_rebuilds(&mut self) {
        let mut todo = Vec::new();
        let disks: Vec<DiskId> = self.disks.keys().cloned().collect();
        for disk in disks {
            let (state, reason) = {
                let t = &self.disks[&disk];
                (t.meta.state, t.meta.reason.clone().unwrap_or_default())
            };
            let configured = self.configured_reference(&disk);
            match state {
                State::Rebuilding => match configured.or_else(|| self.recorded_spec(&disk)) {
                    Some(spec) => todo.push(spec),
                    None => {
                        let why = "a rebuild was interrupted and no reference is configured to \
                                   resume it";
                        if let Err(e) = self.set_state(&disk, State::Inconsistent, Some(why.into()))
                        {
                            tracing::error!(%disk, error = %e.detailed(), "could not mark the disk inconsistent");
                        }
                    }
                },
                State::Inconsistent => todo.extend(configured),
                State::Incomplete if reason.contains("rebuild needed") => todo.extend(configured),
                _ => {}
            }
        }
        for r in &self.rebuilds.references {
            // A file that exists but did not load (unreadable header): its geometry is unknown,
            // so the reference's size and granularity define it.
            if self.is_unreadable(&r.disk) {
                todo.push(JobSpec::from(r));
            }
        }
        for spec in todo {
            let disk = spec.disk.clone();
            match self.start_rebuild(spec, true) {
                Ok(v) => {
                    tracing::info!(%disk, resumed_from = ?v["resumed_from"], "rebuild started by the agent")
                }
                Err(e) => {
                    tracing::error!(%disk, error = %format!("{e:#}"), "could not start the rebuild")
                }
            }
        }
    }

    /// A disk became `incomplete` and needs a rebuild: start it when a reference is configured.
    pub fn auto_rebuild(&mut self, disk: &DiskId) {
        if let Some(spec) = self.configured_reference(disk) {
            if let Err(e) = self.start_rebuild(spec, true) {
                tracing::error!(%disk, error = %format!("{e:#}"), "could not start the rebuild");
            } else {
                tracing::info!(%disk, "rebuild started by the agent");
            }
        }
    }

    /// Start (or resume) a rebuild of `spec.disk` in the background.
    pub fn start_rebuild(&mut self, spec: JobSpec, auto: bool) -> Result<Value> {
        let disk = spec.disk.clone();
        if self
            .rebuilds
            .jobs
            .get(&disk)
            .is_some_and(|r| r.state == RunState::Running)
        {
            bail!("a rebuild of {disk} is already running");
        }
        if let Some(m) = self.migrations.get(&disk)
            && m.active()
            && m.role == Role::Source
        {
            bail!("{disk} is migrating away; rebuild it where it lands");
        }
        let dir = self
            .rebuilds
            .dir
            .clone()
            .context("rebuild jobs are not enabled on this agent")?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let state_path = state_file(&dir, &disk);
        let reference = match (&spec.manifest, &spec.backup) {
            (Some(m), None) => ReferenceSpec::Manifest(m.clone()),
            (None, Some(b)) => ReferenceSpec::Backup(b.clone()),
            _ => bail!("give exactly one of a manifest and a backup"),
        };
        let granularity = match spec
            .granularity
            .or_else(|| self.disks.get(&disk).map(|t| t.meta.geometry.granularity()))
        {
            Some(g) => g,
            None => match &spec.manifest {
                Some(m) => crate::rebuild::manifest::Manifest::open(m)?.granularity(),
                None => bail!("the granularity of {disk} is unknown: give it"),
            },
        };
        let mut config = JobConfig::new(spec.image.clone(), reference, granularity);
        config.rate = spec.rate;
        config.state_file = Some(state_path.clone());
        config.want_reference_root = true;
        // Small bitmaps persist cheaply (the job caps the cost at ~10% of its time anyway).
        config.persist_interval = Duration::from_millis(500);
        let mut job = RebuildJob::open(config)
            .with_context(|| format!("cannot start the rebuild of {disk}"))?;
        let geometry = job.geometry();
        let resume = job.resume_point().and_then(|(off, tag)| {
            let tag: Tag = serde_json::from_str(tag).ok()?;
            let t = self.disks.get(&disk)?;
            let ours = t.meta.state == State::Rebuilding
                && t.meta.geometry == geometry
                && t.bits.is_some()
                && t.meta.reason.as_deref()
                    == Some(&reason_for(&tag.id, tag.spec.reference_path()));
            ours.then_some((off, tag))
        });
        let (id, resumed_from, spec) = match resume {
            Some((off, tag)) => {
                // The committed entry holds every mark acknowledged since the first run began.
                let t = self.disks.get(&disk).expect("checked above");
                let bits = t.bits.as_ref().expect("checked above");
                job.marks()
                    .lock()
                    .map_err(|_| anyhow!("marks lock poisoned"))?
                    .merge(bits)?;
                (tag.id, Some(off), tag.spec)
            }
            None => {
                let id = format!("{:016x}", rand::random::<u64>());
                job.start_fresh(serde_json::to_string(&Tag {
                    id: id.clone(),
                    spec: spec.clone(),
                })?);
                let prior = self.disks.get(&disk).map(|t| t.meta.clone());
                let mut meta = crate::rebuild::rebuilding_meta(
                    disk.clone(),
                    geometry,
                    prior.as_ref(),
                    reason_for(&id, spec.reference_path()),
                );
                let mut bits = Bitmap::new(geometry);
                self.store.commit(&mut meta, &mut bits)?;
                self.replaced_unreadable(&disk);
                self.disks.insert(
                    disk.clone(),
                    Tracked {
                        meta,
                        bits: Some(bits),
                        unflushed: false,
                    },
                );
                (id, None, spec)
            }
        };
        let handle = job.spawn();
        let run = RebuildRun {
            progress: handle.progress.clone(),
            cancel: handle.cancel.clone(),
            marks: handle.marks.clone(),
            handle: Some(handle),
            state: RunState::Running,
            spec,
            id,
            auto,
            resumed_from,
            state_file: state_path,
            result: None,
            error: None,
            last: None,
        };
        let v = run.report(&disk);
        self.rebuilds.jobs.insert(disk, run);
        Ok(v)
    }

    /// Record a mark in the running job of `disk`, if any (before the tracked bitmap, so a mark
    /// refused as out of range is refused everywhere). Returns whether a job took it.
    pub fn rebuild_mark(&mut self, disk: &DiskId, ranges: &[(u64, u64)]) -> Result<bool> {
        match self.rebuilds.jobs.get(disk) {
            Some(r) if r.state == RunState::Running => {
                let mut m = r.marks.lock().map_err(|_| anyhow!("marks lock poisoned"))?;
                mark_all(&mut m, ranges)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Commit every job that has ended (called periodically by the daemon).
    pub fn poll_rebuilds(&mut self) {
        let ended: Vec<DiskId> = self
            .rebuilds
            .jobs
            .iter()
            .filter(|(_, r)| r.handle.as_ref().is_some_and(|h| h.thread.is_finished()))
            .map(|(d, _)| d.clone())
            .collect();
        for disk in ended {
            self.finish_rebuild(&disk, false);
        }
    }

    /// Join `disk`'s job and act on its end. `pausing` (clean shutdown): a cancelled job keeps
    /// its `rebuilding` entry and its state file, to be resumed at the next start.
    fn finish_rebuild(&mut self, disk: &DiskId, pausing: bool) {
        let Some(run) = self.rebuilds.jobs.get_mut(disk) else {
            return;
        };
        let Some(h) = run.handle.take() else { return };
        let joined = h.join();
        run.last = Some(run.progress.snapshot());
        let (state, result) = match joined {
            Ok(outcome) => match self.commit_rebuild(disk, outcome) {
                Ok(v) => (RunState::Completed, Ok(v)),
                Err(e) => (RunState::Failed, Err(format!("{e:#}"))),
            },
            Err(RebuildError::Cancelled { cursor }) => (
                RunState::Cancelled,
                Err(format!("cancelled at byte {cursor}")),
            ),
            Err(e) => (RunState::Failed, Err(e.to_string())),
        };
        let Some(run) = self.rebuilds.jobs.get_mut(disk) else {
            return;
        };
        if pausing && state == RunState::Cancelled {
            tracing::info!(%disk, "rebuild paused for shutdown; it resumes at the next start");
            run.error = Some("paused for shutdown".into());
            return;
        }
        run.state = state;
        let (id, reference, state_path) = (
            run.id.clone(),
            run.spec.reference_path().to_path_buf(),
            run.state_file.clone(),
        );
        match result {
            Ok(v) => {
                tracing::info!(%disk, "rebuild committed");
                run.result = Some(v);
            }
            Err(why) => {
                tracing::warn!(%disk, %why, "rebuild did not complete; the bitmap stays untrusted");
                run.error = Some(why.clone());
                remove_quietly(&state_path);
                let ours = self.disks.get(disk).is_some_and(|t| {
                    t.meta.state == State::Rebuilding
                        && t.meta.reason.as_deref() == Some(&reason_for(&id, &reference))
                });
                if ours
                    && let Err(e) = self.set_state(
                        disk,
                        State::Inconsistent,
                        Some(format!("rebuild did not complete ({why}); rebuild again")),
                    )
                {
                    tracing::error!(%disk, error = %e.detailed(), "could not mark the disk inconsistent");
                }
            }
        }
    }

    /// Scan result ∪ marks, committed `recording` and bound to the reference.
    fn commit_rebuild(
        &mut self,
        disk: &DiskId,
        outcome: crate::rebuild::job::Outcome,
    ) -> Result<Value> {
        let run = self.rebuilds.jobs.get(disk).context("job vanished")?;
        let expected = reason_for(&run.id, run.spec.reference_path());
        let ref_path = run.spec.reference_path().to_path_buf();
        let marks = run.marks.clone();
        let t = self
            .disks
            .get_mut(disk)
            .with_context(|| format!("{disk} is no longer tracked"))?;
        if !(t.meta.state == State::Rebuilding && t.meta.reason.as_deref() == Some(&expected)) {
            bail!(
                "the entry for {disk} changed during the rebuild (now {}); the result was not \
                 committed",
                t.meta.state
            );
        }
        let mut bitmap = outcome.bitmap;
        // Under the agent lock: no mark can be acknowledged between this merge and the commit.
        let marked = {
            let m = marks.lock().map_err(|_| anyhow!("marks lock poisoned"))?;
            bitmap.merge(&m)?;
            m.count()
        };
        let ref_name = ref_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| ref_path.display().to_string());
        let id = match &t.meta.checkpoint {
            Some(c) if c.manifest_root.is_none() || c.manifest_root == outcome.reference_root => {
                c.id.clone()
            }
            _ => ref_name,
        };
        let checkpoint = Checkpoint {
            id,
            manifest_root: outcome.reference_root,
        };
        let mut meta = t.meta.clone();
        meta.checkpoint = Some(checkpoint.clone());
        meta.state = State::Recording;
        meta.reason = None;
        self.store.commit(&mut meta, &mut bitmap)?;
        let hex = |r: &[u8; 32]| r.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let v = json!({
            "dirty_blocks": bitmap.count(),
            "root": bitmap.root().to_hex(),
            "scan_dirty_blocks": outcome.scan_dirty_blocks,
            "marked_during_scan": marked,
            "bytes_read": outcome.bytes_read,
            "seconds": outcome.seconds,
            "resumed_from": outcome.resumed_from,
            "size_mismatch": outcome.size_mismatch,
            "checkpoint": checkpoint.id,
            "manifest_root": outcome.reference_root.as_ref().map(hex),
        });
        t.meta = meta;
        t.bits = Some(bitmap);
        t.unflushed = false;
        Ok(v)
    }

    /// Cancel `disk`'s running job and wait for it to stop; the disk stays untrusted.
    pub fn cancel_rebuild(&mut self, disk: &DiskId) -> Result<Value> {
        let r = self
            .rebuilds
            .jobs
            .get(disk)
            .with_context(|| format!("no rebuild of {disk} on this agent"))?;
        if r.state == RunState::Running {
            r.cancel.store(true, Ordering::Relaxed);
            self.finish_rebuild(disk, false);
        }
        self.rebuild_status(Some(disk))
    }

    /// Reports of one job, or of every job (`{"rebuilds": [...]}`).
    pub fn rebuild_status(&self, disk: Option<&DiskId>) -> Result<Value> {
        match disk {
            Some(d) => Ok(self
                .rebuilds
                .jobs
                .get(d)
                .with_context(|| format!("no rebuild of {d} on this agent"))?
                .report(d)),
            None => Ok(json!({ "rebuilds": self.rebuild_reports() })),
        }
    }

    /// Every job's report (for `status`).
    pub fn rebuild_reports(&self) -> Vec<Value> {
        self.rebuilds
            .jobs
            .iter()
            .map(|(d, r)| r.report(d))
            .collect()
    }

    /// Clean shutdown: stop running jobs where they are. Their entries stay `rebuilding` and
    /// their state files stay, so the next start resumes them.
    /// A job that completes meanwhile is committed as usual.
    pub fn stop_rebuilds(&mut self) {
        let running: Vec<DiskId> = self
            .rebuilds
            .jobs
            .iter()
            .filter(|(_, r)| r.handle.is_some())
            .map(|(d, _)| d.clone())
            .collect();
        for disk in running {
            self.rebuilds.jobs[&disk]
                .cancel
                .store(true, Ordering::Relaxed);
            self.finish_rebuild(&disk, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Request;
    use crate::store::{Access, Store};
    use std::os::unix::fs::FileExt;
    use std::time::Instant;

    const G: u64 = 64 << 10;
    const SIZE: u64 = 4 << 20;

    /// A backup and a live image in `dir`, both holding `data`, and where the backup's
    /// manifest goes.
    fn images(dir: &std::path::Path, data: &[u8]) -> (PathBuf, PathBuf, PathBuf) {
        let (backup, live) = (dir.join("b.img"), dir.join("l.img"));
        std::fs::write(&backup, data).unwrap();
        std::fs::write(&live, data).unwrap();
        (backup, live, dir.join("b.manifest"))
    }

    /// Track `disk` (SIZE bytes at G, checkpoint "c1").
    fn create(st: &mut AgentState, disk: &DiskId) {
        st.execute(Request::Create {
            disk: disk.clone(),
            size: SIZE,
            granularity: G,
            checkpoint: Some("c1".into()),
        })
        .unwrap();
    }

    /// During a rebuild a mark is acknowledged only once it is in the stored entry (a resumed
    /// rebuild trusts that entry). Marks applied before a commit share it: the second
    /// `make_durable` finds nothing left to write (group commit in the control server).
    #[test]
    fn marks_during_a_rebuild_are_made_durable_together() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (backup, live, manifest) = images(dir.path(), &vec![3u8; SIZE as usize]);
        crate::rebuild::manifest::create(&backup, G, &manifest).unwrap();
        let store_dir = dir.path().join("store");
        let store = Store::open(&store_dir, Access::ReadWrite).unwrap();
        let mut st = AgentState::open(store, vec![]).unwrap();
        let disk = DiskId::new("vm/g").unwrap();
        st.configure_rebuilds(&store_dir, vec![]);
        create(&mut st, &disk);
        // A slow job, so it is still running while we mark.
        let v = st
            .start_rebuild(
                JobSpec {
                    disk: disk.clone(),
                    image: live,
                    manifest: Some(manifest),
                    backup: None,
                    granularity: Some(G),
                    rate: Some(64 << 10),
                },
                false,
            )
            .unwrap();
        assert_eq!(v["state"], "running", "{v}");
        let stored = |st: &AgentState| {
            let b = st.store.load_own(&disk).unwrap().bitmap.unwrap();
            (0..SIZE / G).filter(|&i| b.is_set(i)).collect::<Vec<_>>()
        };
        let file = store_dir.join(crate::store::file_name(&disk));
        let (_, first) = st.mark(&disk, &[(0, 1)]).unwrap();
        let (_, second) = st.mark(&disk, &[(5 * G, 1)]).unwrap();
        assert!(first && second, "both must wait for a commit");
        assert_eq!(stored(&st), Vec::<u64>::new(), "not durable yet");
        st.make_durable(&disk).unwrap();
        assert_eq!(stored(&st), vec![0, 5]);
        let ino = std::fs::metadata(&file).unwrap().ino();
        st.make_durable(&disk).unwrap();
        assert_eq!(
            std::fs::metadata(&file).unwrap().ino(),
            ino,
            "the second mark was already covered: no second commit"
        );
        st.cancel_rebuild(&disk).unwrap();
    }

    /// A cut post-copy (`rebuild_needed`) on a disk with a configured reference starts the job;
    /// a mark behind the scan lands in the result; the disk ends `recording`, bound to the
    /// manifest's root, with the checkpoint id it had.
    #[test]
    fn rebuild_needed_starts_the_configured_job_and_keeps_marks() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let (backup, live, manifest) = images(dir.path(), &data);
        let f = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
        f.write_all_at(&[0xAA; 100], 3 * G + 5).unwrap();
        let created = crate::rebuild::manifest::create(&backup, G, &manifest).unwrap();
        let store_dir = dir.path().join("store");
        let store = Store::open(&store_dir, Access::ReadWrite).unwrap();
        let mut st = AgentState::open(store, vec![]).unwrap();
        let disk = DiskId::new("vm/x").unwrap();
        st.configure_rebuilds(
            &store_dir,
            vec![Reference {
                disk: disk.clone(),
                image: live.clone(),
                manifest: Some(manifest.clone()),
                backup: None,
                granularity: None,
                rate: Some(4 << 20),
            }],
        );
        create(&mut st, &disk);
        st.set_state(&disk, State::Incomplete, Some("post-copy cut".into()))
            .unwrap();
        st.rebuild_needed(&disk, "post-copy cut");
        assert_eq!(st.disks[&disk].meta.state, State::Rebuilding);
        let v = st.rebuild_status(Some(&disk)).unwrap();
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["auto"], true);

        // Wait until the scan is past block 1, then write there and mark it.
        let t = Instant::now();
        while st.rebuilds.jobs[&disk].progress.snapshot().done < 2 * G {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        f.write_all_at(&[0x55; 10], G).unwrap();
        st.execute(Request::Mark {
            disk: disk.clone(),
            ranges: vec![(G, 10)],
        })
        .unwrap();
        // Out of range: refused, and applied nowhere.
        assert!(
            st.execute(Request::Mark {
                disk: disk.clone(),
                ranges: vec![(0, 1), (SIZE, 1)],
            })
            .is_err()
        );
        while st.rebuilds.jobs[&disk].state == RunState::Running {
            assert!(t.elapsed() < Duration::from_secs(10));
            st.poll_rebuilds();
            std::thread::sleep(Duration::from_millis(20));
        }
        let v = st.rebuild_status(Some(&disk)).unwrap();
        assert_eq!(v["state"], "completed", "{v}");
        let tr = &st.disks[&disk];
        assert_eq!(tr.meta.state, State::Recording);
        let b = tr.bits.as_ref().unwrap();
        assert_eq!(
            (0..SIZE / G).filter(|&i| b.is_set(i)).collect::<Vec<_>>(),
            vec![1, 3]
        );
        let c = tr.meta.checkpoint.as_ref().unwrap();
        assert_eq!(c.id, "c1");
        assert_eq!(c.manifest_root, Some(created.root));
        assert!(!store_dir.join(".rebuild/vm%2Fx.state").exists());
    }
}
