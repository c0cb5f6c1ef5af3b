//! `bitferry migrate …`: drive a migration of one disk's tracking through the local agent.
//!
//! The phase-by-phase commands are what a hypervisor hook calls: `start` (bulk and pre-copy
//! rounds run until told), `switchover` (the VM is paused), `status`, `abort`. The one-shot
//! `migrate --disk ID --to HOST:PORT` runs them in sequence: it waits until the pre-copy rounds
//! converge, switches over, and waits for the end.

use super::units::parse_size;
use super::{Ctx, Reported, dispatch, output::print};
use crate::control::Request;
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::time::{Duration, Instant};
use wire::DiskId;

/// `migrate` arguments: a subcommand, or the one-shot flags.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MigrateArgs {
    /// A single phase.
    #[command(subcommand)]
    pub phase: Option<Phase>,
    /// The one-shot migration.
    #[command(flatten)]
    pub oneshot: OneShot,
}

/// One-shot migration flags.
#[derive(Debug, Args)]
pub struct OneShot {
    /// Disk id.
    #[arg(long, required = true)]
    pub disk: Option<DiskId>,
    /// Destination agent, HOST:PORT (its QUIC listen address).
    #[arg(long, required = true)]
    pub to: Option<String>,
    /// Switch over in post-copy mode: the destination owns the disk at once and the rest of the
    /// bitmap follows.
    #[arg(long)]
    pub postcopy: bool,
    /// Certificate name to expect from the destination (default: HOST of --to).
    #[arg(long)]
    pub server_name: Option<String>,
    /// Limit the migration stream to this many bytes per second (K/M/G accepted).
    #[arg(long, value_parser = parse_size)]
    pub rate: Option<u64>,
    /// Switch over after this many pre-copy rounds even if writes keep coming.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Give up (abort) if the whole migration takes longer than this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
}

/// The phases.
#[derive(Debug, Subcommand)]
pub enum Phase {
    /// Connect to the destination and run bulk and pre-copy rounds until told to switch over.
    Start(StartArgs),
    /// The VM is paused: send the last delta and hand ownership to the destination. Waits
    /// until the destination owns the disk (pre-copy: until it committed; post-copy: until
    /// the switchover has left).
    Switchover(SwitchoverArgs),
    /// Report a migration's progress.
    Status(DiskOnly),
    /// Abort. Before switchover the source keeps ownership; after, the destination does.
    Abort(DiskOnly),
}

/// `migrate start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Disk id.
    #[arg(long)]
    pub disk: DiskId,
    /// Destination agent, HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// Certificate name to expect from the destination (default: HOST of --to).
    #[arg(long)]
    pub server_name: Option<String>,
    /// Limit the migration stream to this many bytes per second.
    #[arg(long, value_parser = parse_size)]
    pub rate: Option<u64>,
}

/// `migrate switchover`.
#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    /// Disk id.
    #[arg(long)]
    pub disk: DiskId,
    /// Post-copy: resume the VM on the destination before the bitmap is complete there.
    #[arg(long)]
    pub postcopy: bool,
    /// Return at once instead of waiting for the handover.
    #[arg(long)]
    pub no_wait: bool,
}

/// A disk id alone.
#[derive(Debug, Args)]
pub struct DiskOnly {
    /// Disk id.
    #[arg(long)]
    pub disk: DiskId,
}

/// Run `migrate`.
pub fn run(ctx: &Ctx, a: MigrateArgs) -> Result<()> {
    if ctx.control.is_none() {
        bail!("migrate drives a running agent: pass --control SOCKET (or set BITFERRY_CONTROL)");
    }
    match a.phase {
        Some(Phase::Start(s)) => {
            let v = dispatch(
                ctx,
                Request::MigrateStart {
                    disk: s.disk,
                    to: s.to,
                    server_name: s.server_name,
                    rate: s.rate,
                },
            )?;
            print(ctx.json, &v);
        }
        Some(Phase::Switchover(s)) => {
            let v = dispatch(
                ctx,
                Request::MigrateSwitchover {
                    disk: s.disk.clone(),
                    postcopy: s.postcopy,
                },
            )?;
            if s.no_wait {
                print(ctx.json, &v);
            } else {
                let st = wait(ctx, &s.disk, None, |st| handed_over(st, s.postcopy))?;
                report(ctx, &st)?;
            }
        }
        Some(Phase::Status(d)) => print(ctx.json, &status(ctx, &d.disk)?),
        Some(Phase::Abort(d)) => {
            dispatch(
                ctx,
                Request::MigrateAbort {
                    disk: d.disk.clone(),
                },
            )?;
            let st = wait(ctx, &d.disk, None, |st| st["finished"] == true)?;
            print(ctx.json, &st);
        }
        None => oneshot(ctx, a.oneshot)?,
    }
    Ok(())
}

fn status(ctx: &Ctx, disk: &DiskId) -> Result<Value> {
    dispatch(ctx, Request::MigrateStatus { disk: disk.clone() })
}

fn handed_over(st: &Value, postcopy: bool) -> bool {
    st["finished"] == true
        || (postcopy && st["phase"] == "post-copy")
        || !st["switchover_error"].is_null()
}

/// Poll the status until `done` holds, drawing a progress bar on a terminal.
fn wait(
    ctx: &Ctx,
    disk: &DiskId,
    bar: Option<&indicatif::ProgressBar>,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    loop {
        let st = status(ctx, disk)?;
        if let Some(b) = bar {
            b.set_message(progress_line(&st));
            b.tick();
        }
        if done(&st) {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn progress_line(st: &Value) -> String {
    format!(
        "{} · round {} · {} sent",
        st["phase"].as_str().unwrap_or("?"),
        st["rounds"],
        super::units::human(st["bytes_total"].as_u64().unwrap_or(0))
    )
}

/// Print the final status, or fail with it: a failed migration's one JSON document is its
/// status with `error` and `exit_code` (never the status and then an error document).
fn report(ctx: &Ctx, st: &Value) -> Result<()> {
    let disk = st["disk"].as_str().unwrap_or("?");
    if let Some(e) = st["switchover_error"].as_str()
        && st["finished"] != true
    {
        return Err(Reported::error(1, format!("{disk}: {e}"), st.clone()));
    }
    if let Some(e) = st["error"].as_str()
        && st["phase"] != "completed"
    {
        return Err(Reported::error(
            1,
            format!("migration of {disk} failed: {e}"),
            st.clone(),
        ));
    }
    print(ctx.json, st);
    Ok(())
}

fn oneshot(ctx: &Ctx, o: OneShot) -> Result<()> {
    let (Some(disk), Some(to)) = (o.disk, o.to) else {
        bail!("migrate needs --disk and --to (or a subcommand: start, switchover, status, abort)");
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(o.timeout);
    dispatch(
        ctx,
        Request::MigrateStart {
            disk: disk.clone(),
            to,
            server_name: o.server_name,
            rate: o.rate,
        },
    )?;
    let bar = (!ctx.json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .expect("valid template"),
        );
        b
    });
    let max_rounds = o.max_rounds;
    let st = wait(ctx, &disk, bar.as_ref(), |st| {
        st["finished"] == true
            || st["converged"] == true
            || st["rounds"].as_u64().unwrap_or(0) >= u64::from(max_rounds)
            || Instant::now() > deadline
    })?;
    if st["finished"] == true {
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        return report(ctx, &st);
    }
    if Instant::now() > deadline {
        dispatch(ctx, Request::MigrateAbort { disk: disk.clone() })?;
        bail!(
            "migration of {disk} did not converge within {} s; aborted",
            o.timeout
        );
    }
    dispatch(
        ctx,
        Request::MigrateSwitchover {
            disk: disk.clone(),
            postcopy: o.postcopy,
        },
    )?;
    let st = wait(ctx, &disk, bar.as_ref(), |st| {
        st["finished"] == true || !st["switchover_error"].is_null()
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    report(ctx, &st)
}
