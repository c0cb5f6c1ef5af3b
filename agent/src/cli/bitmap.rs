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
    /// An existing FILE is refused unless --force is given.
    #[command(after_help = "EXAMPLES:\n  \
        bitferry bitmap export --disk vm42/vda --raw /tmp/vda.bitmap && b3sum /tmp/vda.bitmap\n  \
        bitferry bitmap export --disk vm42/vda --raw /tmp/vda.bitmap --force   # replace it")]
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
    /// Replace FILE if it exists (without it, an existing file is refused).
    #[arg(long)]
    pub force: bool,
}

/// `bitmap show`: the report with every extent, streamed page by page (through an agent) or
/// from the loaded bitmap (on a store), so a bitmap of millions of extents never has to fit in
/// one reply or one JSON value (finding F4).
fn show(ctx: &Ctx, disk: &DiskId) -> Result<()> {
    use std::io::Write;
    let (header, mut pages): (
        serde_json::Value,
        Box<dyn Iterator<Item = Result<Vec<wire::Extent>>>>,
    ) = match &ctx.control {
        Some(sock) => {
            let first = dispatch(
                ctx,
                Request::Show {
                    disk: disk.clone(),
                    offset: None,
                    limit: Some(crate::report::SHOW_PAGE),
                },
            )?;
            let pages = AgentPages {
                sock: sock.clone(),
                disk: disk.clone(),
                first: Some(first.clone()),
                next: None,
                done: false,
            };
            (first, Box::new(pages))
        }
        None => {
            let store = crate::store::Store::open(&ctx.store, crate::store::Access::ReadOnly)?;
            let mut l = store.load(disk)?;
            let reason = l.reason.clone();
            let header = match (l.meta.as_ref(), l.bitmap.as_mut()) {
                (Some(m), b) => {
                    let mut h = crate::report::bitmap_header(m, b, reason.as_deref());
                    h["extents"] = if l.bitmap.is_some() {
                        serde_json::json!([])
                    } else {
                        serde_json::Value::Null
                    };
                    h
                }
                (None, _) => crate::report::loaded(disk, &mut l),
            };
            let extents: Vec<wire::Extent> = l
                .bitmap
                .as_ref()
                .map(|b| b.extents().collect())
                .unwrap_or_default();
            (header, Box::new(std::iter::once(Ok(extents))))
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut h = header;
    let has_extents = !h["extents"].is_null();
    if let Some(m) = h.as_object_mut() {
        m.remove("extents");
        m.remove("next_offset");
    }
    if !ctx.json {
        super::output::print(false, &h);
        if !has_extents {
            return Ok(());
        }
        let mut shown = 0usize;
        let mut more = false;
        for page in pages.by_ref() {
            for e in page? {
                if shown < 20 {
                    let _ = writeln!(out, "extent  {}+{}", e.offset, e.length);
                    shown += 1;
                } else {
                    more = true;
                    break;
                }
            }
            if more {
                break;
            }
        }
        if more {
            let _ = writeln!(out, "…       more extents (use --json for all)");
        }
        return Ok(());
    }
    // One JSON document: the header's fields, then `extents` written as the pages arrive.
    let text = serde_json::to_string_pretty(&h)?;
    let body = text
        .trim_end()
        .strip_suffix('}')
        .unwrap_or(&text)
        .trim_end();
    let sep = if body.ends_with('{') { "" } else { "," };
    let _ = write!(out, "{body}{sep}\n  \"extents\": ");
    if !has_extents {
        let _ = writeln!(out, "null\n}}");
        return Ok(());
    }
    let _ = write!(out, "[");
    let mut first = true;
    for page in pages {
        for e in page? {
            let _ = write!(
                out,
                "{}\n    {{\"offset\": {}, \"length\": {}}}",
                if first { "" } else { "," },
                e.offset,
                e.length
            );
            first = false;
        }
    }
    let _ = writeln!(out, "{}]\n}}", if first { "" } else { "\n  " });
    Ok(())
}

/// The pages of a `show` through an agent, each asked for when the previous one is written.
struct AgentPages {
    sock: PathBuf,
    disk: DiskId,
    first: Option<serde_json::Value>,
    next: Option<u64>,
    done: bool,
}

impl Iterator for AgentPages {
    type Item = Result<Vec<wire::Extent>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let page = match self.first.take() {
            Some(p) => p,
            None => {
                let req = Request::Show {
                    disk: self.disk.clone(),
                    offset: self.next,
                    limit: Some(crate::report::SHOW_PAGE),
                };
                match crate::control::client::call(
                    &self.sock,
                    &req,
                    Some(std::time::Duration::from_secs(600)),
                ) {
                    Ok(p) => p,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e.into()));
                    }
                }
            }
        };
        let next = page["next_offset"].as_u64();
        if next.is_some_and(|n| self.next.is_some_and(|prev| n <= prev)) {
            self.done = true;
            return Some(Err(anyhow::anyhow!(
                "the agent's show pages do not advance"
            )));
        }
        self.next = next;
        self.done = next.is_none();
        let extents = serde_json::from_value(page["extents"].clone()).unwrap_or_default();
        Some(Ok(extents))
    }
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
        BitmapCmd::Show(a) => return show(ctx, &a.disk),
        BitmapCmd::Verify(a) => Request::Verify { disk: a.disk },
        BitmapCmd::Export(a) => Request::Export {
            disk: a.disk,
            // The agent may run elsewhere in the file system namespace: send an absolute path.
            raw: std::path::absolute(&a.raw)?,
            allow_untrusted: a.allow_untrusted,
            force: a.force,
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
