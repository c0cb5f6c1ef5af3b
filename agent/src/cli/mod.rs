//! The `bitferry` command line. Each command area lives in its own file; this one holds the
//! top-level parser, logging set-up, and the mapping from errors to exit codes.
//!
//! Exit codes: 0 success; 1 error; 2 usage; 3 the bitmap is not trustworthy (verify failed, or
//! the command refused an untrusted bitmap); 4 the store is locked by another process.

pub mod agent;
pub mod bench;
pub mod bench_mark;
pub mod bitmap;
pub mod cert;
pub mod demo;
pub mod migrate;
pub mod output;

pub mod manifest;
pub mod qcow2;

pub mod rebuild;
pub mod rebuild_agent;
pub mod units;

use crate::control::Request;
pub use crate::exit::Failure;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// bitferry keeps changed-block tracking (dirty bitmaps) of VM disks alive and trustworthy
/// across migrations and host failures.
///
/// A bitmap reported `consistent` is always a superset of the blocks changed since its
/// checkpoint; anything bitferry cannot prove is reported `inconsistent` or `incomplete`.
#[derive(Debug, Parser)]
#[command(name = "bitferry", version, propagate_version = true)]
pub struct Cli {
    /// Store directory (holds one file per disk). An agent holds its store locked; reach it
    /// through --control instead.
    #[arg(
        long,
        global = true,
        env = "BITFERRY_STORE",
        default_value = "/var/lib/bitferry"
    )]
    pub store: PathBuf,

    /// Control socket of a running agent; commands then go through the agent instead of
    /// opening the store themselves.
    #[arg(long, global = true, env = "BITFERRY_CONTROL")]
    pub control: Option<PathBuf>,

    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Log format on stderr. Verbosity comes from BITFERRY_LOG (e.g. `info`, `bitferry=debug`).
    #[arg(long, global = true, value_enum, default_value = "human")]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output style.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, mark, inspect, verify and export bitmaps in the store.
    #[command(subcommand)]
    Bitmap(bitmap::BitmapCmd),
    /// Reproducible measurements, each figure beside a baseline from the same run.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// A narrated tour on this machine, in a temporary directory.
    Demo(demo::DemoArgs),
    /// Run the agent daemon: QUIC listener, control socket, metrics, live store.
    Agent(agent::AgentArgs),
    /// Tell a running (destination) agent to accept a disk's migration (needs --control).
    Expect(agent::ExpectArgs),
    /// Show a running agent's state (needs --control).
    Status,
    /// Ask a running agent to commit everything and stop (needs --control).
    Shutdown,
    /// Cluster CA and host certificates for mutual TLS between agents.
    #[command(subcommand)]
    Cert(cert::CertCmd),
    /// Migrate a disk's tracking to another agent (one-shot, or phase by phase).
    Migrate(migrate::MigrateArgs),
    /// Read and write QEMU qcow2 persistent bitmaps.
    #[command(subcommand)]
    Qcow2(qcow2::Qcow2Cmd),
    /// Per-block BLAKE3 manifests of backup images (the cheap reference for `rebuild`).
    #[command(subcommand)]
    Manifest(manifest::ManifestCmd),
    /// Rebuild a lost bitmap by comparing the live image with a backup or a manifest.
    Rebuild(rebuild::RebuildArgs),
}

/// Shared context handed to every command.
pub struct Ctx {
    /// The store directory.
    pub store: PathBuf,
    /// The agent's control socket, when commands go through a running agent.
    pub control: Option<PathBuf>,
    /// Print JSON.
    pub json: bool,
}

/// Run a request through the agent when `--control` is given, else directly on the store.
pub fn dispatch(ctx: &Ctx, req: Request) -> anyhow::Result<serde_json::Value> {
    match &ctx.control {
        Some(sock) => Ok(crate::control::client::call(
            sock,
            &req,
            Some(std::time::Duration::from_secs(600)),
        )?),
        None => crate::local::execute(&ctx.store, req),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BITFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Run the CLI with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let ctx = Ctx {
        store: cli.store,
        control: cli.control,
        json: cli.json,
    };
    let result = match cli.command {
        Command::Bitmap(c) => bitmap::run(&ctx, c),
        Command::Bench(c) => bench::run(&ctx, c),
        Command::Demo(a) => demo::run(&ctx, a),
        Command::Agent(a) => agent::agent(a),
        Command::Expect(a) => agent::expect(&ctx, a),
        Command::Status => agent::status(&ctx),
        Command::Shutdown => agent::shutdown(&ctx),
        Command::Cert(c) => cert::run(&ctx, c),
        Command::Migrate(a) => migrate::run(&ctx, a),
        Command::Qcow2(c) => qcow2::run(&ctx, c),
        Command::Manifest(c) => manifest::run(&ctx, c),
        Command::Rebuild(a) => rebuild::run(&ctx, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = crate::exit::exit_code(&e);
            tracing::debug!(error = %format!("{e:#}"), "command failed");
            if ctx.json {
                println!(
                    "{}",
                    serde_json::json!({"error": format!("{e:#}"), "exit_code": code})
                );
            }
            eprintln!("bitferry: error: {e:#}");
            ExitCode::from(code)
        }
    }
}
