//! `bitferry rebuild`: rebuild a lost bitmap by comparing the live image with a reference
//! (a raw backup or a block manifest), optionally committing it to the store.
//!
//! With `--disk`, the store is *not* held during the scan, so `bitferry bitmap mark` keeps
//! working for the writers of the live disk:
//! 1. under the lock, the disk's entry is committed as `rebuilding` with an empty bitmap (or, on
//!    resume, left as it is: it already holds every mark since the first run started);
//! 2. the scan runs without the lock; writers' marks land in that stored entry (`bitmap mark`
//!    keeps the `rebuilding` state);
//! 3. under the lock, the stored entry (the marks recorded since step 1) is OR-ed with the scan
//!    result and committed `consistent`, bound to the reference.
//!
//! A write during the scan cannot be lost: if it landed before the scan read its block, the scan
//! saw the new content; otherwise it landed after step 1, so its mark is in the stored entry by
//! the time the writer's `bitmap mark` returned — before step 3 merges it, or after, in which
//! case it is a normal mark on the committed bitmap.

use super::manifest::hex;
use super::output::print;
use super::units::{human, parse_size};
use super::{Ctx, Failure};
use crate::rebuild::job::{JobConfig, Outcome, RebuildJob, ReferenceSpec};
use crate::store::{Access, Meta, Store, StoreError};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wire::{Bitmap, Checkpoint, DiskId, State};

/// `rebuild` arguments: a rebuild (offline on the store, or started in the agent with
/// `--control`), or `rebuild status` / `rebuild cancel` of an agent's job.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RebuildArgs {
    /// A job in a running agent.
    #[command(subcommand)]
    pub action: Option<super::rebuild_agent::JobCmd>,
    /// The rebuild itself.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Arguments of a rebuild.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("reference").required(true).args(["backup", "manifest"])))]
pub struct RunArgs {
    /// The live disk image (raw file or block device).
    #[arg(long, required = true)]
    pub image: Option<PathBuf>,
    /// A raw backup image to compare with (reads both images).
    #[arg(long)]
    pub backup: Option<PathBuf>,
    /// A block manifest of the backup (`bitferry manifest create`): only the live image is read.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Block size of the rebuilt bitmap (must equal the manifest's). Default 64K; through an
    /// agent, the disk's.
    #[arg(long, value_parser = parse_size)]
    pub granularity: Option<u64>,
    /// Commit the result to the store for this disk, `consistent` and bound to the reference.
    #[arg(long)]
    pub disk: Option<DiskId>,
    /// Read at most this many bytes per second (K/M/G accepted).
    #[arg(long, value_parser = parse_size)]
    pub rate: Option<u64>,
    /// Persist progress to this file and resume from it when run again.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// How long to wait for the store lock at the start and the end.
    #[arg(long, default_value_t = 60)]
    pub lock_timeout_secs: u64,
    /// With --control: wait for the agent's job to end, drawing a progress bar.
    #[arg(long)]
    pub wait: bool,
}

/// Open the store for writing, waiting while other commands (e.g. `bitmap mark`) hold it.
fn open_rw_waiting(dir: &Path, timeout: Duration) -> Result<Store> {
    let t = Instant::now();
    loop {
        match Store::open(dir, Access::ReadWrite) {
            Err(StoreError::Locked(_)) if t.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return Ok(r?),
        }
    }
}

fn rebuilding_reason(tag: &str, reference: &Path) -> String {
    format!("rebuild {tag} in progress against {}", reference.display())
}

/// Run `rebuild`: a job command, a rebuild through the agent, or one on the store.
pub fn run(ctx: &Ctx, a: RebuildArgs) -> Result<()> {
    match a.action {
        Some(c) => super::rebuild_agent::job(ctx, c),
        None if ctx.control.is_some() => super::rebuild_agent::start(ctx, a.run),
        None if a.run.wait => bail!("--wait needs --control (an agent's job)"),
        None => run_offline(ctx, a.run),
    }
}

fn run_offline(ctx: &Ctx, a: RunArgs) -> Result<()> {
    let image = a.image.clone().context("--image is required")?;
    let granularity = a.granularity.unwrap_or(64 << 10);
    let (spec, ref_path) = match (&a.backup, &a.manifest) {
        (Some(b), None) => (ReferenceSpec::Backup(b.clone()), b.clone()),
        (None, Some(m)) => (ReferenceSpec::Manifest(m.clone()), m.clone()),
        _ => bail!("give exactly one of --backup and --manifest"),
    };
    let mut config = JobConfig::new(image, spec, granularity);
    config.rate = a.rate;
    config.state_file = a.state.clone();
    config.want_reference_root = a.disk.is_some();
    // Validate everything (manifest hashes, sizes, granularity) before touching the store.
    let mut job = RebuildJob::open(config).context("cannot start the rebuild")?;
    let geometry = job.geometry();
    let timeout = Duration::from_secs(a.lock_timeout_secs);
    let ref_name = ref_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| ref_path.display().to_string());

    // Step 1: bind the store entry (see the module docs).
    let mut prior: Option<Meta> = None;
    let mut tag = String::new();
    if let Some(disk) = &a.disk {
        let mut store = open_rw_waiting(&ctx.store, timeout)?;
        let loaded = match store.load(disk) {
            Ok(l) => Some(l),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        prior = loaded.as_ref().and_then(|l| l.meta.clone());
        let resumable = match (job.resume_point(), &loaded) {
            (Some((_, t)), Some(l)) => {
                l.state() == State::Rebuilding
                    && l.meta.as_ref().is_some_and(|m| {
                        m.geometry == geometry
                            && m.reason.as_deref() == Some(&rebuilding_reason(t, &ref_path))
                    })
            }
            _ => false,
        };
        if resumable {
            tag = job
                .resume_point()
                .map(|(_, t)| t.to_string())
                .unwrap_or_default();
        } else {
            tag = format!("{:016x}", rand::random::<u64>());
            job.start_fresh(tag.clone());
            let mut meta = crate::rebuild::rebuilding_meta(
                disk.clone(),
                geometry,
                prior.as_ref(),
                rebuilding_reason(&tag, &ref_path),
            );
            store.commit(&mut meta, &mut Bitmap::new(geometry))?;
        }
    }

    // Step 2: scan, without the store lock.
    let outcome = run_job(ctx, job)?;

    // Step 3: merge the marks recorded meanwhile and commit `consistent`.
    let mut extra = json!({
        "bytes_read": outcome.bytes_read,
        "seconds": outcome.seconds,
        "resumed_from": outcome.resumed_from,
        "size_mismatch": outcome.size_mismatch,
        "scan_dirty_blocks": outcome.scan_dirty_blocks,
        "reference_root": outcome.reference_root.as_ref().map(hex),
    });
    let mut bitmap = outcome.bitmap;
    let mut v = match &a.disk {
        Some(disk) => {
            let mut store = open_rw_waiting(&ctx.store, timeout)?;
            let l = store.load(disk)?;
            let expected = rebuilding_reason(&tag, &ref_path);
            let ours = l.state() == State::Rebuilding
                && l.meta
                    .as_ref()
                    .is_some_and(|m| m.reason.as_deref() == Some(&expected));
            if !ours {
                return Err(Failure::untrusted(format!(
                    "the store entry for {disk} changed during the rebuild (now {}); the result \
                     was not committed — run the rebuild again",
                    l.state()
                )));
            }
            let (mut meta, marks) = l.into_entry(disk)?;
            let marked_during_scan = marks.count();
            bitmap.merge(&marks)?;
            meta.state = State::Consistent;
            meta.reason = None;
            // Keep the disk's checkpoint id only when nothing says the reference is another
            // backup; a known, different manifest root means the result counts from this
            // reference, so it is named after it.
            let id = match prior.as_ref().and_then(|m| m.checkpoint.as_ref()) {
                Some(c)
                    if c.manifest_root.is_none() || c.manifest_root == outcome.reference_root =>
                {
                    c.id.clone()
                }
                _ => ref_name.clone(),
            };
            meta.checkpoint = Some(Checkpoint {
                id,
                manifest_root: outcome.reference_root,
            });
            store.commit(&mut meta, &mut bitmap)?;
            extra["marked_during_scan"] = json!(marked_during_scan);
            crate::report::bitmap(&meta, Some(&mut bitmap), None)
        }
        None => json!({
            "disk": null,
            "size": geometry.size(),
            "granularity": geometry.granularity(),
            "state": null,
            "epoch": null,
            "checkpoint": ref_name,
            "dirty_blocks": bitmap.count(),
            "root": bitmap.root().to_hex(),
            "reason": "not stored (no --disk); exact only if the image was not written during the scan",
            "extents": bitmap.extents().collect::<Vec<_>>(),
        }),
    };
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    print(ctx.json, &v);
    Ok(())
}

/// Run the job on its own thread, drawing a progress bar when stderr is a terminal.
fn run_job(ctx: &Ctx, job: RebuildJob) -> Result<Outcome> {
    let resumed = job.resume_point().map(|(o, _)| o);
    let h = job.spawn();
    let bar = (!ctx.json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(h.progress.snapshot().total.max(1));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} rebuild [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        if let Some(o) = resumed {
            b.println(format!("resuming from {}", human(o)));
        }
        b
    });
    while !h.thread.is_finished() {
        if let Some(b) = &bar {
            let s = h.progress.snapshot();
            b.set_length(s.total.max(1));
            b.set_position(s.done);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(h.join()?)
}
