//! `bitferry bitmap create | mark | show | verify | export | list`. Each builds a control
//! [`Request`]; `super::dispatch` runs it through the agent (`--control`) or on the store.

use super::units::{parse_range, parse_size};
use super::{Ctx, dispatch};
use crate::control::Request;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use wire::DiskId;

/// Bitmap commands.
#[derive(Debug, Subcommand)]
pub enum BitmapCmd {
    /// Create a new, empty (all clean) bitmap counting from a checkpoint.
    Create(CreateArgs),
    /// Mark the blocks a write touched (the manual tracker). Without an agent the bitmap is
    /// committed durably before success is returned; through an agent it is recorded live.
    Mark(MarkArgs),
    /// Show a bitmap: state, epoch, checkpoint, dirty blocks, root and dirty extents.
    Show(DiskArgs),
    /// Verify a stored bitmap: exit 0 only if every hash checks out and it is `consistent`
    /// (or being recorded by a live agent); otherwise exit 3 with the reason.
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
    /// A written byte range OFFSET:LENGTH (sizes accept K/M/G/T); repeat for several. All are
    /// checked before any is applied.
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
    let req = match cmd {
        BitmapCmd::Create(a) => Request::Create {
            disk: a.disk,
            size: a.size,
            granularity: a.granularity,
            checkpoint: a.checkpoint,
        },
        BitmapCmd::Mark(a) => Request::Mark {
            disk: a.disk,
            ranges: a.ranges,
        },
        BitmapCmd::Show(a) => Request::Show { disk: a.disk },
        BitmapCmd::Verify(a) => Request::Verify { disk: a.disk },
        BitmapCmd::Export(a) => Request::Export {
            disk: a.disk,
            // The agent may run elsewhere in the file system namespace: send an absolute path.
            raw: std::path::absolute(&a.raw)?,
            allow_untrusted: a.allow_untrusted,
        },
        BitmapCmd::List => Request::List,
    };
    let list = matches!(req, Request::List);
    let verify = matches!(req, Request::Verify { .. });
    let v = dispatch(ctx, req)?;
    if list && !ctx.json {
        for r in v["bitmaps"].as_array().into_iter().flatten() {
            println!(
                "{}  {}  dirty_blocks={}",
                r["disk"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["dirty_blocks"]
            );
        }
    } else if verify && !ctx.json {
        println!(
            "ok: {} is {}, root {}",
            v["disk"].as_str().unwrap_or(""),
            v["state"].as_str().unwrap_or(""),
            v["root"].as_str().unwrap_or("")
        );
    } else {
        super::output::print(ctx.json, &v);
    }
    Ok(())
}
