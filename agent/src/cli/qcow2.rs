//! `bitferry qcow2 list | export-raw | import | export`: QEMU qcow2 persistent bitmaps, read
//! directly from image files and written back through carrier images and `qemu-img`.

use super::output::print;
use super::{Ctx, Failure};
use crate::qcow2::{DirEntry, FileSource, Image, ReadError, Trust, write_carrier};
use crate::store::{Access, Meta, Store};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use wire::{Bitmap, Checkpoint, DiskId, State};

/// qcow2 commands.
#[derive(Debug, Subcommand)]
pub enum Qcow2Cmd {
    /// List every persistent bitmap in a qcow2 image: name, granularity, flags, state, dirty
    /// blocks, root and dirty extents. A bitmap left `in_use` (QEMU crashed or still has the
    /// image open) is `inconsistent` and shows no extents.
    List(ListArgs),
    /// Write one bitmap's raw bytes (QEMU's layout, as `bitmap export --raw` writes them), so
    /// `b3sum FILE` prints its root.
    ExportRaw(ExportRawArgs),
    /// Import a bitmap from a qcow2 image into the store as a new `consistent` bitmap. Refuses
    /// (exit 3) a bitmap that is `in_use` or otherwise inconsistent.
    Import(ImportArgs),
    /// Write a stored bitmap into a new qcow2 "carrier" image QEMU accepts and, with --into,
    /// merge it into an existing image with `qemu-img bitmap`.
    Export(ExportArgs),
}

/// `qcow2 list` arguments.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The qcow2 image (not written to).
    pub image: PathBuf,
}

/// `qcow2 export-raw` arguments.
#[derive(Debug, Args)]
pub struct ExportRawArgs {
    /// The qcow2 image (not written to).
    pub image: PathBuf,
    /// Name of the persistent bitmap.
    #[arg(long)]
    pub bitmap: String,
    /// Output file for the raw bytes.
    #[arg(long)]
    pub raw: PathBuf,
}

/// `qcow2 import` arguments.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The qcow2 image (not written to; must not be open read-write by QEMU).
    pub image: PathBuf,
    /// Name of the persistent bitmap.
    #[arg(long)]
    pub bitmap: String,
    /// Disk id to store it under (must not exist yet).
    #[arg(long)]
    pub disk: DiskId,
    /// Id of the checkpoint the bitmap counts from.
    #[arg(long)]
    pub checkpoint: Option<String>,
}

/// `qcow2 export` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Disk id of the stored bitmap.
    #[arg(long)]
    pub disk: DiskId,
    /// Path of the carrier image to create (must not exist).
    pub carrier: PathBuf,
    /// Name of the bitmap in the carrier (and in --into IMAGE).
    #[arg(long)]
    pub bitmap: String,
    /// Set the bitmap's `auto` flag, so QEMU records writes into it when the image is opened.
    /// With --into and a new bitmap, it is added enabled; otherwise disabled.
    #[arg(long)]
    pub auto: bool,
    /// Then merge the carrier's bitmap into this existing qcow2 image (which QEMU must not have
    /// open), adding the bitmap first if it is absent.
    #[arg(long)]
    pub into: Option<PathBuf>,
    /// Export even if the stored bitmap is not `consistent`.
    #[arg(long)]
    pub allow_untrusted: bool,
}

/// Run a qcow2 command.
pub fn run(ctx: &Ctx, cmd: Qcow2Cmd) -> Result<()> {
    match cmd {
        Qcow2Cmd::List(a) => list(ctx, a),
        Qcow2Cmd::ExportRaw(a) => export_raw(ctx, a),
        Qcow2Cmd::Import(a) => import(ctx, a),
        Qcow2Cmd::Export(a) => export(ctx, a),
    }
}

fn open_image(path: &Path) -> Result<Image<FileSource>> {
    Image::open_path(path).with_context(|| format!("reading qcow2 image {}", path.display()))
}

/// Find `name`, or fail listing the names present.
fn find<'a>(img: &'a Image<FileSource>, path: &Path, name: &str) -> Result<&'a DirEntry> {
    if let (None, Some(why)) = (img.find(name), &img.stale) {
        // The stale directory did not even parse: whatever NAME was, it is not trustworthy.
        return Err(Failure::untrusted(format!(
            "{}: bitmap {name:?} cannot be trusted: {why}",
            path.display()
        )));
    }
    img.find(name).ok_or_else(|| {
        let names: Vec<_> = img.bitmaps.iter().map(|b| b.name.as_str()).collect();
        anyhow!(
            "{} has no bitmap {name:?} (bitmaps: {})",
            path.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )
    })
}

/// Read a trusted bitmap, mapping "cannot be trusted" to exit code 3.
fn read_trusted(img: &Image<FileSource>, e: &DirEntry) -> Result<Bitmap> {
    match img.read_bitmap(e) {
        Ok(b) => Ok(b),
        Err(ReadError::Untrusted { name, reason }) => Err(Failure::untrusted(format!(
            "bitmap {name:?} is inconsistent: {reason}"
        ))),
        Err(err) => Err(err.into()),
    }
}

fn list(ctx: &Ctx, a: ListArgs) -> Result<()> {
    let img = open_image(&a.image)?;
    let mut rows = Vec::new();
    for e in &img.bitmaps {
        let (state, reason, bits) = match img.trust(e) {
            Trust::Inconsistent(why) => (State::Inconsistent, Some(why), None),
            Trust::Consistent => match img.read_bitmap(e) {
                Ok(b) => (State::Consistent, None, Some(b)),
                // Valid for QEMU but not representable here: say so, never guess.
                Err(ReadError::Unsupported { reason, .. }) => {
                    (State::Inconsistent, Some(reason), None)
                }
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!("reading bitmap {:?} of {}", e.name, a.image.display())
                    });
                }
            },
        };
        let (dirty, root, extents) = match bits {
            Some(mut b) => (
                json!(b.count()),
                json!(b.root().to_hex()),
                json!(b.extents().collect::<Vec<_>>()),
            ),
            None => (Value::Null, Value::Null, Value::Null),
        };
        rows.push(json!({
            "name": e.name,
            "granularity": e.granularity(),
            "flags": e.flag_names(),
            "state": state,
            "reason": reason,
            "dirty_blocks": dirty,
            "root": root,
            "extents": extents,
        }));
    }
    let v = json!({
        "image": a.image,
        "virtual_size": img.header.size,
        "cluster_size": img.header.cluster_size(),
        "warning": img.stale,
        "bitmaps": rows,
    });
    if ctx.json {
        print(true, &v);
        return Ok(());
    }
    println!(
        "{}  virtual_size={}  cluster_size={}  {} bitmap(s)",
        a.image.display(),
        img.header.size,
        img.header.cluster_size(),
        rows.len()
    );
    if let Some(w) = &img.stale {
        println!("warning: {w}");
    }
    for r in &rows {
        let flags: Vec<_> = r["flags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "  {}  granularity={}  flags=[{}]  {}  dirty_blocks={}  extents={}",
            r["name"].as_str().unwrap_or(""),
            r["granularity"],
            flags.join(","),
            r["state"].as_str().unwrap_or(""),
            r["dirty_blocks"],
            r["extents"].as_array().map_or(0, Vec::len),
        );
        if let Some(why) = r["reason"].as_str() {
            println!("    reason: {why}");
        }
    }
    Ok(())
}

fn export_raw(ctx: &Ctx, a: ExportRawArgs) -> Result<()> {
    let img = open_image(&a.image)?;
    let e = find(&img, &a.image, &a.bitmap)?;
    let mut bitmap = read_trusted(&img, e)?;
    let raw = bitmap.to_raw();
    let mut f =
        std::fs::File::create(&a.raw).with_context(|| format!("creating {}", a.raw.display()))?;
    f.write_all(&raw)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", a.raw.display()))?;
    print(
        ctx.json,
        &json!({
            "image": a.image,
            "bitmap": e.name,
            "raw": a.raw,
            "bytes": raw.len(),
            "granularity": e.granularity(),
            "dirty_blocks": bitmap.count(),
            "root": bitmap.root().to_hex(),
        }),
    );
    Ok(())
}

fn import(ctx: &Ctx, a: ImportArgs) -> Result<()> {
    let img = open_image(&a.image)?;
    let e = find(&img, &a.image, &a.bitmap)?;
    let mut bitmap = read_trusted(&img, e)?;
    let meta = Meta {
        disk: a.disk,
        geometry: bitmap.geometry(),
        checkpoint: a.checkpoint.map(|id| Checkpoint {
            id,
            manifest_root: None,
        }),
        epoch: 1,
        state: State::Consistent,
        reason: None,
        generation: 1,
    };
    let mut store = Store::open(&ctx.store, Access::ReadWrite)?;
    store.create(&meta, &mut bitmap)?;
    let mut v = crate::report::bitmap(&meta, Some(&mut bitmap), None);
    v["image"] = json!(a.image);
    v["bitmap"] = json!(e.name);
    print(ctx.json, &v);
    Ok(())
}

/// The qemu-img to run: `BITFERRY_QEMU_IMG` or `qemu-img` on PATH.
fn qemu_img() -> String {
    std::env::var("BITFERRY_QEMU_IMG").unwrap_or_else(|_| "qemu-img".into())
}

/// Run `qemu-img ARGS`, recording the command line in `ran`.
fn run_qemu_img(args: &[String], ran: &mut Vec<String>) -> Result<()> {
    let exe = qemu_img();
    ran.push(
        std::iter::once(exe.as_str())
            .chain(args.iter().map(String::as_str))
            .map(shell_word)
            .collect::<Vec<_>>()
            .join(" "),
    );
    let out = Command::new(&exe)
        .args(args)
        .output()
        .with_context(|| format!("running {exe}"))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            ran.last().expect("just pushed"),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Quote a word for display when it is not plain.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn export(ctx: &Ctx, a: ExportArgs) -> Result<()> {
    let store = Store::open(&ctx.store, Access::ReadOnly)?;
    let l = store.load(&a.disk)?;
    let state = l.state();
    if state != State::Consistent && !a.allow_untrusted {
        return Err(Failure::untrusted(format!(
            "bitmap for {} is {state}, not consistent; pass --allow-untrusted to export it anyway",
            a.disk
        )));
    }
    let (meta, mut bitmap) = l.into_entry(&a.disk)?;
    drop(store);
    let g = meta.geometry;
    // Check the target before writing anything, so a mismatch leaves no carrier behind.
    let target_has = match &a.into {
        None => None,
        Some(into) => {
            let img = open_image(into)?;
            if img.header.size != g.size() {
                bail!(
                    "{} has virtual size {}, the stored bitmap covers {}",
                    into.display(),
                    img.header.size,
                    g.size()
                );
            }
            match img.find(&a.bitmap) {
                None => Some(false),
                Some(e) => {
                    if let Trust::Inconsistent(why) = img.trust(e) {
                        bail!(
                            "bitmap {:?} in {} is inconsistent ({why}); remove it first \
                             (qemu-img bitmap --remove)",
                            a.bitmap,
                            into.display()
                        );
                    }
                    if e.granularity() != g.granularity() {
                        bail!(
                            "bitmap {:?} in {} has granularity {}, the stored bitmap {}",
                            a.bitmap,
                            into.display(),
                            e.granularity(),
                            g.granularity()
                        );
                    }
                    Some(true)
                }
            }
        }
    };
    let info = write_carrier(&a.carrier, &a.bitmap, &bitmap, a.auto)?;
    let mut ran = Vec::new();
    if let (Some(into), Some(present)) = (&a.into, target_has) {
        let target = into.display().to_string();
        let carrier = a.carrier.display().to_string();
        if !present {
            let mut args: Vec<String> = vec!["bitmap".into(), "--add".into()];
            if !a.auto {
                args.push("--disable".into());
            }
            args.extend([
                "-g".into(),
                g.granularity().to_string(),
                "-f".into(),
                "qcow2".into(),
                target.clone(),
                a.bitmap.clone(),
            ]);
            run_qemu_img(&args, &mut ran)?;
        }
        run_qemu_img(
            &[
                "bitmap".into(),
                "--merge".into(),
                a.bitmap.clone(),
                "-b".into(),
                carrier,
                "-F".into(),
                "qcow2".into(),
                "-f".into(),
                "qcow2".into(),
                target,
                a.bitmap.clone(),
            ],
            &mut ran,
        )?;
        // Read the result back: the image's bitmap must now hold every bit we exported.
        let img = open_image(into)?;
        let merged = read_trusted(&img, find(&img, into, &a.bitmap)?)?;
        let mut check = merged.clone();
        check.merge(&bitmap)?;
        if check != merged {
            bail!(
                "after merging, bitmap {:?} in {} lacks bits of the stored bitmap",
                a.bitmap,
                into.display()
            );
        }
    }
    print(
        ctx.json,
        &json!({
            "disk": meta.disk,
            "carrier": a.carrier,
            "bitmap": a.bitmap,
            "virtual_size": g.size(),
            "granularity": g.granularity(),
            "auto": a.auto,
            "state": state,
            "dirty_blocks": bitmap.count(),
            "root": bitmap.root().to_hex(),
            "clusters": info.clusters,
            "data_clusters": info.data_clusters,
            "zero_clusters": info.zero_clusters,
            "ones_clusters": info.ones_clusters,
            "into": a.into,
            "ran": ran,
        }),
    );
    Ok(())
}
