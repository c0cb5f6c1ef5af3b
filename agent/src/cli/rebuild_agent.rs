//! `bitferry --control SOCKET rebuild …`: rebuild jobs in a running agent. Starting one returns
//! at once (or, with `--wait`, follows it with a progress bar); `rebuild status` shows progress
//! (bytes done/total, rate, ETA); `rebuild cancel` stops it and leaves the disk untrusted.

use super::output::print;
use super::rebuild::RunArgs;
use super::{Ctx, dispatch};
use crate::control::Request;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::io::IsTerminal;
use std::time::Duration;
use wire::DiskId;

/// `rebuild status` / `rebuild cancel`.
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Progress of the agent's rebuild jobs: done, total, rate, eta_seconds, state (needs
    /// --control).
    Status(StatusArgs),
    /// Stop a disk's rebuild job; the disk stays `inconsistent` (needs --control).
    Cancel(CancelArgs),
}

/// `rebuild status` arguments.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this disk's job (every job otherwise).
    #[arg(long)]
    pub disk: Option<DiskId>,
}

/// `rebuild cancel` arguments.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The disk whose job to stop.
    #[arg(long)]
    pub disk: DiskId,
}

/// Run `rebuild status` or `rebuild cancel`.
pub fn job(ctx: &Ctx, c: JobCmd) -> Result<()> {
    if ctx.control.is_none() {
        bail!("rebuild jobs run in an agent: pass --control SOCKET");
    }
    let req = match c {
        JobCmd::Status(a) => Request::RebuildStatus { disk: a.disk },
        JobCmd::Cancel(a) => Request::RebuildCancel { disk: a.disk },
    };
    let v = dispatch(ctx, req)?;
    print(ctx.json, &v);
    Ok(())
}

/// Start a rebuild in the agent (`rebuild --disk ID … --control SOCKET`).
pub fn start(ctx: &Ctx, a: RunArgs) -> Result<()> {
    let disk = a
        .disk
        .clone()
        .context("--disk is required when the rebuild runs in an agent")?;
    if a.state.is_some() {
        bail!("--state is for rebuilds without an agent; the agent keeps its own state file");
    }
    // The agent resolves paths itself, from its own working directory.
    let abs = |p: &std::path::Path| {
        std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
    };
    let image = abs(a.image.as_deref().context("--image is required")?)?;
    let manifest = a.manifest.as_deref().map(abs).transpose()?;
    let backup = a.backup.as_deref().map(abs).transpose()?;
    let v = dispatch(
        ctx,
        Request::RebuildStart {
            disk: disk.clone(),
            image,
            manifest,
            backup,
            granularity: a.granularity,
            rate: a.rate,
        },
    )?;
    if !a.wait {
        print(ctx.json, &v);
        return Ok(());
    }
    let v = follow(ctx, &disk)?;
    match v["state"].as_str() {
        Some("completed") => {
            print(ctx.json, &v);
            Ok(())
        }
        // One JSON document: the job's last status with `error` and `exit_code`.
        s => Err(super::Reported::error(
            1,
            format!(
                "the rebuild of {disk} ended {}: {}",
                s.unwrap_or("?"),
                v["error"].as_str().unwrap_or("no reason given")
            ),
            v.clone(),
        )),
    }
}

/// Poll the job until it ends, drawing a progress bar when stderr is a terminal.
fn follow(ctx: &Ctx, disk: &DiskId) -> Result<Value> {
    let bar = (!ctx.json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} rebuild [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    });
    loop {
        let v = dispatch(
            ctx,
            Request::RebuildStatus {
                disk: Some(disk.clone()),
            },
        )?;
        if let Some(b) = &bar {
            b.set_length(v["total"].as_u64().unwrap_or(0).max(1));
            b.set_position(v["done"].as_u64().unwrap_or(0));
        }
        if v["state"] != "running" {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
