//! `bitferry agent`, `bitferry expect`, `bitferry status`: running and steering the daemon.

use super::{Ctx, dispatch, output::print};
use crate::control::Request;
use crate::daemon::config::Config;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use wire::DiskId;

/// `agent` arguments.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML configuration file (see docs/operations.md §Configuration).
    #[arg(long)]
    pub config: PathBuf,
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

/// Run the daemon in the foreground.
pub fn agent(a: AgentArgs) -> Result<()> {
    let config = Config::load(&a.config)?;
    crate::daemon::run(config)
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
