//! `bitferry agent`, `bitferry expect`, `bitferry status`: running and steering the daemon.

use super::{Ctx, Reported, dispatch, output::print};
use crate::control::Request;
use crate::daemon::config::Config;
use anyhow::Result;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use wire::DiskId;

/// `agent` arguments.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML configuration file (see docs/operations.md §Configuration).
    #[arg(long)]
    pub config: PathBuf,
    /// Only validate the configuration, without starting: TLS material, store and control
    /// directories, listen and metrics addresses, every [[reference]] file. One line per
    /// problem; exit 1 if there is any.
    #[arg(long)]
    pub check: bool,
}

/// `expect` arguments.
#[derive(Debug, Args)]
pub struct ExpectArgs {
    /// Disk id to accept as a migration destination.
    #[arg(long)]
    pub disk: DiskId,
    /// Accept it only from the peer whose certificate has this name.
    #[arg(long)]
    pub from: Option<String>,
}

/// Run the daemon in the foreground (or, with `--check`, only check its config).
pub fn agent(ctx: &Ctx, a: AgentArgs) -> Result<()> {
    if a.check {
        return check(ctx, &a.config);
    }
    let config = Config::load(&a.config)?;
    crate::daemon::run(config, a.config)
}

/// `agent --check`: every problem on a line of its own (stdout), then the verdict.
fn check(ctx: &Ctx, path: &std::path::Path) -> Result<()> {
    let r = crate::daemon::check::check(path);
    let doc = json!({
        "config": path,
        "problems": r.problems,
        "notes": r.notes,
    });
    if !ctx.json {
        for p in &r.problems {
            println!("problem: {p}");
        }
        for n in &r.notes {
            println!("note: {n}");
        }
    }
    match r.problems.len() {
        0 => {
            if ctx.json {
                print(true, &doc);
            } else {
                println!("config {}: ok", path.display());
            }
            Ok(())
        }
        n => Err(Reported::error(
            1,
            format!(
                "config {}: {n} problem{} found",
                path.display(),
                if n == 1 { "" } else { "s" }
            ),
            doc,
        )),
    }
}

/// Tell a destination agent to accept a disk.
pub fn expect(ctx: &Ctx, a: ExpectArgs) -> Result<()> {
    let v = dispatch(
        ctx,
        Request::Expect {
            disk: a.disk,
            from: a.from,
        },
    )?;
    print(ctx.json, &v);
    Ok(())
}

/// Report the agent's state.
pub fn status(ctx: &Ctx) -> Result<()> {
    let v = dispatch(ctx, Request::Status)?;
    print(ctx.json, &v);
    Ok(())
}

/// Ask the agent to commit everything and stop.
pub fn shutdown(ctx: &Ctx) -> Result<()> {
    let v = dispatch(ctx, Request::Shutdown)?;
    print(ctx.json, &v);
    Ok(())
}
