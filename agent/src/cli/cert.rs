//! `bitferry cert …`: the cluster CA and per-host certificates for mutual TLS between agents.

use super::Ctx;
use super::output::print;
use crate::cert;
use crate::transport::TlsIdentity;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use std::path::PathBuf;

/// Certificate commands.
#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Create the cluster CA: DIR/ca.pem (give to every host) and DIR/ca.key (keep offline;
    /// whoever has it can mint host certificates).
    Init(InitArgs),
    /// Issue a host certificate signed by the cluster CA: OUT/NAME.pem and OUT/NAME.key,
    /// valid for both client and server authentication. NAME is the peer name other agents
    /// authorize (`expect --from NAME`).
    Issue(IssueArgs),
}

/// `cert init` arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory for ca.pem and ca.key (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Replace existing files (invalidates every certificate the old CA issued).
    #[arg(long)]
    pub force: bool,
    /// Validity in days.
    #[arg(long, default_value_t = cert::CA_DAYS)]
    pub days: u32,
}

/// `cert issue` arguments.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Directory holding the CA (ca.pem, ca.key).
    #[arg(long)]
    pub ca: PathBuf,
    /// Host name: letters, digits, '-' and '.'. Becomes the certificate's common name and a
    /// DNS subject alternative name.
    #[arg(long)]
    pub name: String,
    /// Output directory for NAME.pem and NAME.key (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Additional DNS name or IP address peers dial this host by (repeatable). Without any,
    /// `localhost`, `127.0.0.1` and `::1` are added.
    #[arg(long = "san", value_name = "HOST_OR_IP")]
    pub sans: Vec<String>,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
    /// Validity in days.
    #[arg(long, default_value_t = cert::HOST_DAYS)]
    pub days: u32,
}

/// Run a certificate command.
pub fn run(ctx: &Ctx, cmd: CertCmd) -> Result<()> {
    match cmd {
        CertCmd::Init(a) => {
            let files = cert::init_dir(&a.dir, a.force, a.days)?;
            print(
                ctx.json,
                &json!({
                    "ca": a.dir.join("ca.pem"),
                    "days": a.days,
                    "files": files,
                }),
            );
        }
        CertCmd::Issue(a) => {
            let (files, sans) =
                cert::issue_to_dir(&a.ca, &a.name, &a.out, &a.sans, a.force, a.days)?;
            // Prove the result is usable as written: the transport's own loader must accept it.
            let (ca_pem, _) = cert::ca_paths(&a.ca);
            let id = TlsIdentity::load(
                &ca_pem,
                &a.out.join(format!("{}.pem", a.name)),
                &a.out.join(format!("{}.key", a.name)),
            )
            .context("the issued certificate does not load")?;
            print(
                ctx.json,
                &json!({
                    "name": id.name(),
                    "sans": sans,
                    "days": a.days,
                    "files": files,
                }),
            );
        }
    }
    Ok(())
}
