//! `bitferry bitmap create | mark | show | verify | export | list`: the offline bitmap commands,
//! working on `--store DIR` directly.

use super::output::print;
use super::units::{parse_range, parse_size};
use super::{Ctx, Failure};
use crate::store::{Access, Loaded, Meta, Store};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use wire::{Bitmap, Checkpoint, DiskId, Geometry, State};

/// Bitmap commands.
#[derive(Debug, Subcommand)]
pub enum BitmapCmd {
    /// Create a new, empty (all clean) bitmap counting from a checkpoint.
    Create(CreateArgs),
    /// Mark the blocks a write touched (the manual tracker). The bitmap is committed durably
    /// before the command returns success.
    Mark(MarkArgs),
    /// Show a bitmap: state, epoch, checkpoint, dirty blocks, root and dirty extents.
    Show(DiskArgs),
    /// Verify a stored bitmap: exit 0 only if every hash checks out and it is `consistent`;
    /// otherwise exit 3 with the reason.
    Verify(DiskArgs),
    /// Write the raw bitmap bytes (QEMU's layout), so `b3sum FILE` prints the bitmap's root.
    Export(ExportArgs),
    /// List the bitmaps in the store with their states.
    List,
}

/// `bitmap create` arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Disk id, e.g. vm42/vda.
    #[arg(long)]
    pub disk: DiskId,
    /// Virtual disk size (bytes, or K/M/G/T).
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Bytes per bit: a power of two from 512 to 64M.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub granularity: u64,
    /// Id of the checkpoint (usually the last good backup) the bitmap counts from.
    #[arg(long)]
    pub checkpoint: Option<String>,
}

/// `bitmap mark` arguments.
#[derive(Debug, Args)]
pub struct MarkArgs {
    /// Disk id.
    #[arg(long)]
    pub disk: DiskId,
    /// A written byte range OFFSET:LENGTH (sizes accept K/M/G/T); repeat for several.
    #[arg(long = "range", value_parser = parse_range, required = true)]
    pub ranges: Vec<(u64, u64)>,
}

/// Arguments naming one disk.
#[derive(Debug, Args)]
pub struct DiskArgs {
    /// Disk id.
    #[arg(long)]
    pub disk: DiskId,
}

/// `bitmap export` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Disk id.
    #[arg(long)]
    pub disk: DiskId,
    /// Output file for the raw bytes.
    #[arg(long)]
    pub raw: PathBuf,
    /// Export even if the bitmap is not `consistent` (its bits are then not a promise).
    #[arg(long)]
    pub allow_untrusted: bool,
}

/// Run a bitmap command.
pub fn run(ctx: &Ctx, cmd: BitmapCmd) -> Result<()> {
    match cmd {
        BitmapCmd::Create(a) => create(ctx, a),
        BitmapCmd::Mark(a) => mark(ctx, a),
        BitmapCmd::Show(a) => show(ctx, a),
        BitmapCmd::Verify(a) => verify(ctx, a),
        BitmapCmd::Export(a) => export(ctx, a),
        BitmapCmd::List => list(ctx),
    }
}

fn create(ctx: &Ctx, a: CreateArgs) -> Result<()> {
    let geometry = Geometry::new(a.size, a.granularity)?;
    let mut store = Store::open(&ctx.store, Access::ReadWrite)?;
    let meta = Meta {
        disk: a.disk,
        geometry,
        checkpoint: a.checkpoint.map(|id| Checkpoint {
            id,
            manifest_root: None,
        }),
        epoch: 1,
        state: State::Consistent,
        reason: None,
        generation: 1,
    };
    let mut bitmap = Bitmap::new(geometry);
    store.create(&meta, &mut bitmap)?;
    print(ctx.json, &report(&meta, Some(&mut bitmap), None, false));
    Ok(())
}

fn mark(ctx: &Ctx, a: MarkArgs) -> Result<()> {
    let mut store = Store::open(&ctx.store, Access::ReadWrite)?;
    let (mut meta, mut bitmap) = store.load(&a.disk)?.into_entry(&a.disk)?;
    // Check every range before applying any, so a bad one changes nothing.
    let mut probe = Bitmap::new(meta.geometry);
    for (o, l) in &a.ranges {
        probe.mark(*o, *l)?;
    }
    let before = bitmap.count();
    bitmap.merge(&probe)?;
    store.commit(&mut meta, &mut bitmap)?;
    let v = json!({
        "disk": meta.disk,
        "newly_dirty_blocks": bitmap.count() - before,
        "dirty_blocks": bitmap.count(),
        "generation": meta.generation,
        "state": meta.state,
    });
    print(ctx.json, &v);
    Ok(())
}

/// The `show` report of a bitmap. `extents` are included only when the bits verified.
pub fn report(meta: &Meta, bitmap: Option<&mut Bitmap>, reason: Option<&str>, all: bool) -> Value {
    let (dirty, root, extents) = match bitmap {
        Some(b) => (
            json!(b.count()),
            json!(b.root().to_hex()),
            json!(b.extents().collect::<Vec<_>>()),
        ),
        None => (Value::Null, Value::Null, Value::Null),
    };
    let mut v = json!({
        "disk": meta.disk,
        "size": meta.geometry.size(),
        "granularity": meta.geometry.granularity(),
        "state": meta.state,
        "epoch": meta.epoch,
        "checkpoint": meta.checkpoint.as_ref().map(|c| c.id.clone()),
        "dirty_blocks": dirty,
        "root": root,
        "generation": meta.generation,
        "reason": reason.or(meta.reason.as_deref()),
        "extents": extents,
    });
    if !all {
        v.as_object_mut().expect("object").remove("generation");
    }
    v
}

fn loaded_report(disk: &DiskId, l: &mut Loaded) -> Value {
    let reason = l.reason.clone();
    match l.meta.as_ref() {
        Some(m) => report(m, l.bitmap.as_mut(), reason.as_deref(), true),
        None => json!({
            "disk": disk,
            "size": null, "granularity": null,
            "state": State::Inconsistent,
            "epoch": null, "checkpoint": null, "dirty_blocks": null, "root": null,
            "reason": reason,
            "extents": null,
        }),
    }
}

fn show(ctx: &Ctx, a: DiskArgs) -> Result<()> {
    let store = Store::open(&ctx.store, Access::ReadOnly)?;
    let mut l = store.load(&a.disk)?;
    print(ctx.json, &loaded_report(&a.disk, &mut l));
    Ok(())
}

fn verify(ctx: &Ctx, a: DiskArgs) -> Result<()> {
    let store = Store::open(&ctx.store, Access::ReadOnly)?;
    let mut l = store.load(&a.disk)?;
    let state = l.state();
    let root = l.bitmap.as_mut().map(|b| b.root().to_hex());
    let ok = state == State::Consistent && root.is_some();
    let reason = if ok {
        None
    } else {
        Some(
            l.reason
                .clone()
                .unwrap_or_else(|| format!("state is {state}")),
        )
    };
    if ctx.json {
        print(
            true,
            &json!({"disk": a.disk, "ok": ok, "state": state, "root": root, "reason": reason}),
        );
    }
    match reason {
        None => {
            if !ctx.json {
                println!(
                    "ok: {} is consistent, root {}",
                    a.disk,
                    root.unwrap_or_default()
                );
            }
            Ok(())
        }
        Some(r) => Err(Failure::untrusted(format!(
            "bitmap for {} does not verify ({state}): {r}",
            a.disk
        ))),
    }
}

fn export(ctx: &Ctx, a: ExportArgs) -> Result<()> {
    let store = Store::open(&ctx.store, Access::ReadOnly)?;
    let l = store.load(&a.disk)?;
    let state = l.state();
    let (meta, mut bitmap) = l.into_entry(&a.disk)?;
    if state != State::Consistent && !a.allow_untrusted {
        return Err(Failure::untrusted(format!(
            "bitmap for {} is {state}, not consistent; pass --allow-untrusted to export it anyway",
            a.disk
        )));
    }
    let raw = bitmap.to_raw();
    let mut f =
        std::fs::File::create(&a.raw).with_context(|| format!("creating {}", a.raw.display()))?;
    f.write_all(&raw)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", a.raw.display()))?;
    print(
        ctx.json,
        &json!({
            "disk": meta.disk,
            "raw": a.raw,
            "bytes": raw.len(),
            "state": state,
            "root": bitmap.root().to_hex(),
        }),
    );
    Ok(())
}

fn list(ctx: &Ctx) -> Result<()> {
    let store = Store::open(&ctx.store, Access::ReadOnly)?;
    let mut rows = Vec::new();
    for disk in store.list()? {
        let l = store.load(&disk)?;
        let m = l.meta.as_ref();
        rows.push(json!({
            "disk": disk,
            "state": l.state(),
            "size": m.map(|m| m.geometry.size()),
            "granularity": m.map(|m| m.geometry.granularity()),
            "epoch": m.map(|m| m.epoch),
            "dirty_blocks": l.bitmap.as_ref().map(Bitmap::count),
        }));
    }
    if ctx.json {
        print(true, &json!({ "bitmaps": rows }));
    } else {
        for r in &rows {
            println!(
                "{}  {}  dirty_blocks={}",
                r["disk"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["dirty_blocks"]
            );
        }
    }
    Ok(())
}
