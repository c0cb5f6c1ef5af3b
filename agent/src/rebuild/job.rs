//! [`RebuildJob`]: the bitmap-diff as a self-contained, resumable background job.
//!
//! A daemon starts one with [`RebuildJob::open`] + [`RebuildJob::spawn`]; the CLI runs one in
//! the foreground with [`RebuildJob::run`]. Either way:
//! - progress (bytes done/total, rate, ETA) is readable from any thread ([`Progress`]);
//! - reads are rate-limited by a token bucket; a cancel flag stops the scan at the next segment;
//! - with a state file, the cursor and the partial result are persisted atomically every
//!   [`JobConfig::persist_bytes`] / [`JobConfig::persist_interval`], and a restarted job with the
//!   same identity resumes from the cursor;
//! - writes that happen during the scan are recorded by the caller into [`RebuildJob::marks`]
//!   from *before* the scan starts and OR-ed into the result at the end.
//!
//! Why nothing is lost: the scan reads block `b` at some instant `t_b`. A write to `b` that
//! landed before `t_b` is in what the scan read (so `b` is dirty if it differs from the
//! reference); a write after `t_b` happened after the job started, so it is in the marks. On
//! resume, the partial result was read in an earlier run, so the caller must guarantee the marks
//! cover every write since the *first* run started (the CLI does so with the store's
//! `rebuilding` entry; see [`JobState::tag`](super::state::JobState)).

use super::RebuildError;
use super::manifest::Manifest;
use super::scan::{Reference, Scan, ScanOptions, Segment};
use super::state::{self, Identity, JobState, RefIdentity};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wire::{Bitmap, Geometry};

/// Which reference to compare against.
#[derive(Debug, Clone)]
pub enum ReferenceSpec {
    /// A block manifest file.
    Manifest(PathBuf),
    /// A raw backup image.
    Backup(PathBuf),
}

/// Job parameters.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// The live image (raw file or block device).
    pub live: PathBuf,
    /// The reference.
    pub reference: ReferenceSpec,
    /// Block size of the result.
    pub granularity: u64,
    /// Read at most this many bytes per second.
    pub rate: Option<u64>,
    /// Persist progress here and resume from it.
    pub state_file: Option<PathBuf>,
    /// In backup mode, also compute the backup's manifest root (to bind the result to it).
    pub want_reference_root: bool,
    /// Persist at least every this many scanned bytes…
    pub persist_bytes: u64,
    /// …and at least this often.
    pub persist_interval: Duration,
    /// Bytes per read.
    pub segment_bytes: u64,
    /// Caller's tag stored in the state file (see [`RebuildJob::resume_tag`]).
    pub tag: String,
}

impl JobConfig {
    /// Defaults: no rate limit, no state file, persist every 256 MiB or 2 s, 8 MiB reads.
    pub fn new(live: PathBuf, reference: ReferenceSpec, granularity: u64) -> Self {
        JobConfig {
            live,
            reference,
            granularity,
            rate: None,
            state_file: None,
            want_reference_root: false,
            persist_bytes: 256 << 20,
            persist_interval: Duration::from_secs(2),
            segment_bytes: super::scan::SEGMENT_BYTES,
            tag: String::new(),
        }
    }
}

/// Live progress counters, shared with other threads.
#[derive(Debug)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    resumed: AtomicU64,
    bytes_read: AtomicU64,
    started: Mutex<Instant>,
}

/// A consistent reading of [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressSnapshot {
    /// Bytes of the image decided (including those decided by an earlier run).
    pub done: u64,
    /// Bytes to decide in all.
    pub total: u64,
    /// Bytes read from disk in this run.
    pub bytes_read: u64,
    /// Scan rate of this run, bytes per second.
    pub rate: f64,
    /// Estimated time left at that rate.
    pub eta: Option<Duration>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            started: Mutex::new(Instant::now()),
        }
    }

    /// Current figures.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let resumed = self.resumed.load(Ordering::Relaxed);
        let elapsed = self.started.lock().map(|s| s.elapsed()).unwrap_or_default();
        let rate = if elapsed.as_secs_f64() > 0.0 {
            done.saturating_sub(resumed) as f64 / elapsed.as_secs_f64()
        } else {
            0.0
        };
        let eta =
            (rate > 0.0).then(|| Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate));
        ProgressSnapshot {
            done,
            total,
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            rate,
            eta,
        }
    }
}

/// Live and reference sizes, when they differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SizeMismatch {
    /// Live image size (the result's disk size).
    pub live: u64,
    /// Reference size.
    pub reference: u64,
}

/// A finished job.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Blocks whose content differs from the reference, OR the concurrent marks.
    pub bitmap: Bitmap,
    /// Dirty blocks found by the scan alone.
    pub scan_dirty_blocks: u64,
    /// Bytes read from disk in this run (live and backup; holes and resumed ranges not read).
    pub bytes_read: u64,
    /// Wall time of this run.
    pub seconds: f64,
    /// Byte offset this run resumed from, if it resumed.
    pub resumed_from: Option<u64>,
    /// Set when the live and reference sizes differ (every block past the shorter is dirty).
    pub size_mismatch: Option<SizeMismatch>,
    /// Manifest root of the reference: the manifest's, or (backup mode with
    /// [`JobConfig::want_reference_root`]) computed from the backup during the scan.
    pub reference_root: Option<[u8; 32]>,
}

/// A rebuild job, opened and validated, not yet running.
pub struct RebuildJob {
    config: JobConfig,
    live: File,
    geometry: Geometry,
    reference: Reference,
    identity: Identity,
    resume: Option<JobState>,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    marks: Arc<Mutex<Bitmap>>,
}

/// Handle of a job running on its own thread.
pub struct JobHandle {
    /// Progress of the job.
    pub progress: Arc<Progress>,
    /// Set to cancel.
    pub cancel: Arc<AtomicBool>,
    /// Record writes here while the job runs.
    pub marks: Arc<Mutex<Bitmap>>,
    /// The job's thread.
    pub thread: std::thread::JoinHandle<Result<Outcome, RebuildError>>,
}

impl JobHandle {
    /// Wait for the job to end.
    pub fn join(self) -> Result<Outcome, RebuildError> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(RebuildError::Worker("rebuild thread panicked".into())))
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

impl RebuildJob {
    /// Open the live image and the reference and check that they can be compared: a manifest
    /// must verify and have the requested granularity. Nothing is scanned yet. Loads the state
    /// file when it describes this same comparison.
    pub fn open(config: JobConfig) -> Result<RebuildJob, RebuildError> {
        let live = File::open(&config.live).map_err(|e| RebuildError::io(&config.live, e))?;
        let live_size = super::file_size(&live).map_err(|e| RebuildError::io(&config.live, e))?;
        if live_size == 0 {
            return Err(RebuildError::BadReference(format!(
                "live image {} is empty",
                config.live.display()
            )));
        }
        let geometry = Geometry::new(live_size, config.granularity)?;
        let (reference, ref_id) = match &config.reference {
            ReferenceSpec::Manifest(p) => {
                let m = Manifest::open(p)?;
                super::manifest::refuse_same_image(p, m.identity(), &config.live, &live)?;
                if m.granularity() != config.granularity {
                    return Err(RebuildError::BadReference(format!(
                        "manifest {} has granularity {}, but {} was asked for (rebuild at the \
                         manifest's granularity, or write a new manifest)",
                        p.display(),
                        m.granularity(),
                        config.granularity
                    )));
                }
                let id = RefIdentity::Manifest {
                    root: m.root(),
                    size: m.size(),
                };
                (Reference::Manifest(m), id)
            }
            ReferenceSpec::Backup(p) => {
                let file = File::open(p).map_err(|e| RebuildError::io(p, e))?;
                let size = super::file_size(&file).map_err(|e| RebuildError::io(p, e))?;
                if size == 0 {
                    return Err(RebuildError::BadReference(format!(
                        "backup {} is empty",
                        p.display()
                    )));
                }
                let meta = file.metadata().map_err(|e| RebuildError::io(p, e))?;
                let live_meta = live
                    .metadata()
                    .map_err(|e| RebuildError::io(&config.live, e))?;
                {
                    use std::os::unix::fs::MetadataExt;
                    if (meta.dev(), meta.ino()) == (live_meta.dev(), live_meta.ino()) {
                        return Err(RebuildError::BadReference(format!(
                            "backup {} is the live image {} itself (same device and inode): \
                             give the backup image",
                            p.display(),
                            config.live.display()
                        )));
                    }
                }
                let id = RefIdentity::Backup {
                    path: p.display().to_string(),
                    size,
                    mtime_ns: mtime_ns(&meta),
                };
                (
                    Reference::Backup {
                        path: p.clone(),
                        file,
                        size,
                    },
                    id,
                )
            }
        };
        let identity = Identity {
            live: config.live.display().to_string(),
            live_size,
            granularity: config.granularity,
            reference: ref_id,
        };
        let resume = match &config.state_file {
            Some(p) => state::load(p)?.filter(|s| {
                let same = s.identity == identity
                    && s.partial.len() == geometry.raw_len()
                    && Bitmap::from_raw(geometry, &s.partial).is_ok();
                if !same {
                    tracing::warn!(path = %p.display(), "rebuild state describes another comparison; starting over");
                }
                same
            }),
            None => None,
        };
        // A resumed job keeps persisting under the tag it was started with, so it can be
        // resumed again after another interruption.
        let mut config = config;
        if let Some(s) = &resume {
            config.tag = s.tag.clone();
        }
        Ok(RebuildJob {
            marks: Arc::new(Mutex::new(Bitmap::new(geometry))),
            config,
            live,
            geometry,
            reference,
            identity,
            resume,
            progress: Arc::new(Progress::new()),
            cancel: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Geometry of the result (the live image's size, the requested granularity).
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Size of the reference image.
    pub fn reference_size(&self) -> u64 {
        self.reference.size()
    }

    /// Manifest root of the reference when known before the scan (manifest mode).
    pub fn known_reference_root(&self) -> Option<[u8; 32]> {
        match &self.reference {
            Reference::Manifest(m) => Some(m.root()),
            _ => None,
        }
    }

    /// Progress counters (clone the `Arc` to read them from another thread).
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// The cancel flag.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Concurrent marks: every write to the live image from before [`RebuildJob::run`] starts
    /// until it returns must be recorded here; they are OR-ed into the result.
    pub fn marks(&self) -> Arc<Mutex<Bitmap>> {
        self.marks.clone()
    }

    /// When a usable state file was found: the byte offset it resumes from and its tag.
    pub fn resume_point(&self) -> Option<(u64, &str)> {
        self.resume.as_ref().map(|s| {
            (
                (s.cursor_block * self.config.granularity)
                    .min(self.identity.live_size.max(self.reference.size())),
                s.tag.as_str(),
            )
        })
    }

    /// Ignore any persisted state and start from the beginning under a new tag (the caller
    /// cannot vouch that its marks cover the earlier run).
    pub fn start_fresh(&mut self, tag: String) {
        self.resume = None;
        self.config.tag = tag;
    }

    /// Run on a new thread.
    pub fn spawn(self) -> JobHandle {
        JobHandle {
            progress: self.progress(),
            cancel: self.cancel_flag(),
            marks: self.marks(),
            thread: std::thread::spawn(move || self.run()),
        }
    }

    fn hashes_path(state: &Path) -> PathBuf {
        let mut s = state.as_os_str().to_owned();
        s.push(".hashes");
        PathBuf::from(s)
    }

    /// Run the scan to the end (or until cancelled) in this thread.
    pub fn run(mut self) -> Result<Outcome, RebuildError> {
        let t0 = Instant::now();
        *self.progress.started.lock().expect("progress lock") = t0;
        let g = self.config.granularity;
        let want_hashes =
            self.config.want_reference_root && matches!(self.reference, Reference::Backup { .. });
        let mut result = Bitmap::new(self.geometry);
        let mut start_block = 0;
        let mut resumed_from = None;
        let mut hasher = blake3::Hasher::new();
        let mut hashes_file = None;
        let resume = self.resume.take();
        if let Some(p) = &self.config.state_file {
            let hp = Self::hashes_path(p);
            let mut f = if want_hashes {
                Some(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&hp)
                        .map_err(|e| RebuildError::io(&hp, e))?,
                )
            } else {
                None
            };
            if let Some(s) = &resume {
                let usable = match &mut f {
                    Some(f) => Self::replay_hashes(
                        f,
                        s.hashes,
                        s.cursor_block.min(self.reference.size().div_ceil(g)),
                        &mut hasher,
                    )
                    .map_err(|e| RebuildError::io(&hp, e))?,
                    None => true,
                };
                if usable {
                    result = Bitmap::from_raw(self.geometry, &s.partial)
                        .map_err(|e| RebuildError::Worker(format!("state bitmap: {e}")))?;
                    start_block = s.cursor_block;
                    resumed_from = Some(start_block * g);
                } else {
                    hasher = blake3::Hasher::new();
                }
            }
            if let Some(f) = &mut f
                && resumed_from.is_none()
            {
                f.set_len(0).map_err(|e| RebuildError::io(&hp, e))?;
            }
            if let Some(f) = &mut f {
                f.seek(SeekFrom::End(0))
                    .map_err(|e| RebuildError::io(&hp, e))?;
            }
            hashes_file = f;
        }
        let mut options = ScanOptions::new(g);
        options.rate = self.config.rate;
        options.want_hashes = want_hashes;
        options.start_block = start_block;
        options.segment_bytes = match self.config.rate {
            // Smaller reads when throttled, so the limit is smooth and progress visible.
            Some(r) => (r / 8).clamp(g, self.config.segment_bytes.max(g)),
            None => self.config.segment_bytes,
        };
        let scan = Scan {
            live: &self.live,
            live_size: self.identity.live_size,
            reference: &self.reference,
            options,
            cancel: &self.cancel,
        };
        let total_blocks = scan.total_blocks();
        let total_bytes = self.identity.live_size.max(if want_hashes {
            self.reference.size()
        } else {
            0
        });
        let ref_blocks = self.reference.size().div_ceil(g);
        let byte_of = |block: u64| (block * g).min(total_bytes);
        self.progress.total.store(total_bytes, Ordering::Relaxed);
        self.progress
            .done
            .store(byte_of(start_block), Ordering::Relaxed);
        self.progress
            .resumed
            .store(byte_of(start_block), Ordering::Relaxed);
        let mut hashes_written = start_block.min(ref_blocks);
        let mut bytes_read = 0u64;
        let mut last_persist = (Instant::now(), start_block);
        let mut persist_cost = Duration::ZERO;
        let state_file = self.config.state_file.clone();
        let persist = |cursor: u64,
                       result: &Bitmap,
                       hashes_written: u64,
                       hashes_file: &mut Option<File>|
         -> Result<(), RebuildError> {
            let Some(p) = &state_file else { return Ok(()) };
            if let Some(f) = hashes_file {
                f.sync_data().map_err(|e| RebuildError::io(p, e))?;
            }
            state::save(
                p,
                &JobState {
                    identity: self.identity.clone(),
                    tag: self.config.tag.clone(),
                    cursor_block: cursor,
                    partial: result.to_raw(),
                    hashes: hashes_written,
                },
            )
        };
        let end = scan.run(|seg: &Segment<'_>| {
            let mut run_start = None;
            for (i, d) in seg.dirty.iter().enumerate() {
                let b = seg.first_block + i as u64;
                match (d, run_start) {
                    (true, None) => run_start = Some(b),
                    (false, Some(s)) => {
                        result.set_blocks(s, b);
                        run_start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = run_start {
                result.set_blocks(s, seg.end_block());
            }
            if want_hashes {
                let n = ref_blocks
                    .saturating_sub(seg.first_block)
                    .min(seg.hashes.len() as u64) as usize;
                for h in &seg.hashes[..n] {
                    hasher.update(h);
                }
                if let Some(f) = &mut hashes_file {
                    let bytes = seg.hashes[..n].as_flattened();
                    f.write_all(bytes)
                        .map_err(|e| RebuildError::io(Path::new("state hashes"), e))?;
                }
                hashes_written += n as u64;
            }
            bytes_read += seg.bytes_read;
            self.progress
                .bytes_read
                .store(bytes_read, Ordering::Relaxed);
            self.progress
                .done
                .store(byte_of(seg.end_block()), Ordering::Relaxed);
            let (at, from) = last_persist;
            let due_bytes = (seg.end_block() - from) * g >= self.config.persist_bytes;
            // Never spend more than ~10% of the time persisting (large bitmaps).
            let due_time = at.elapsed() >= self.config.persist_interval.max(persist_cost * 10);
            if state_file.is_some() && (due_bytes || due_time) {
                let t = Instant::now();
                persist(seg.end_block(), &result, hashes_written, &mut hashes_file)?;
                persist_cost = t.elapsed();
                last_persist = (Instant::now(), seg.end_block());
            }
            Ok(())
        })?;
        if end.cancelled {
            persist(end.cursor_block, &result, hashes_written, &mut hashes_file)?;
            return Err(RebuildError::Cancelled {
                cursor: byte_of(end.cursor_block),
            });
        }
        debug_assert_eq!(end.cursor_block, total_blocks);
        let scan_dirty_blocks = result.count();
        {
            let marks = self
                .marks
                .lock()
                .map_err(|_| RebuildError::Worker("marks lock poisoned".into()))?;
            result
                .merge(&marks)
                .map_err(|e| RebuildError::Worker(e.to_string()))?;
        }
        let reference_root = match &self.reference {
            Reference::Manifest(m) => Some(m.root()),
            Reference::Backup { .. } if want_hashes => Some(*hasher.finalize().as_bytes()),
            _ => None,
        };
        if let Some(p) = &self.config.state_file {
            for f in [p.clone(), Self::hashes_path(p)] {
                match std::fs::remove_file(&f) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(RebuildError::io(&f, e)),
                }
            }
        }
        let (live, reference) = (self.identity.live_size, self.reference.size());
        Ok(Outcome {
            bitmap: result,
            scan_dirty_blocks,
            bytes_read,
            seconds: t0.elapsed().as_secs_f64(),
            resumed_from,
            size_mismatch: (live != reference).then_some(SizeMismatch { live, reference }),
            reference_root,
        })
    }

    /// Re-feed the `expected` persisted reference hashes to `hasher`; false when the state and
    /// the side file disagree about them (then the job starts over).
    fn replay_hashes(
        f: &mut File,
        persisted: u64,
        expected: u64,
        hasher: &mut blake3::Hasher,
    ) -> std::io::Result<bool> {
        let len = f.metadata()?.len();
        if persisted != expected || persisted.checked_mul(32).is_none_or(|n| n > len) {
            return Ok(false);
        }
        f.set_len(persisted * 32)?;
        f.seek(SeekFrom::Start(0))?;
        let mut left = persisted * 32;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n])?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        Ok(true)
    }
}
