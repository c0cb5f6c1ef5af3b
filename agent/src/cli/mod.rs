//! The `bitferry` command line. Each command area lives in its own file; this one holds the
//! top-level parser, logging set-up, and the mapping from errors to exit codes.
//!
//! Exit codes: 0 success; 1 error; 2 usage; 3 the bitmap is not trustworthy (verify failed, or
//! the command refused an untrusted bitmap); 4 the store is locked by another process.

pub mod bench;
pub mod bitmap;
pub mod demo;
pub mod manifest;
pub mod output;
pub mod rebuild;
pub mod units;

use crate::store::StoreError;
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
    /// Per-block BLAKE3 manifests of backup images (the cheap reference for `rebuild`).
    #[command(subcommand)]
    Manifest(manifest::ManifestCmd),
    /// Rebuild a lost bitmap by comparing the live image with a backup or a manifest.
    Rebuild(rebuild::RebuildArgs),
}

/// A failure with a specific exit code and message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Process exit code.
    pub code: u8,
    /// What went wrong, for people.
    pub message: String,
}

impl Failure {
    /// The bitmap is not trustworthy (exit 3).
    pub fn untrusted(message: impl Into<String>) -> anyhow::Error {
        Failure {
            code: 3,
            message: message.into(),
        }
        .into()
    }
}

/// Shared context handed to every command.
pub struct Ctx {
    /// The store directory.
    pub store: PathBuf,
    /// Print JSON.
    pub json: bool,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BITFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        json: cli.json,
    };
    let result = match cli.command {
        Command::Bitmap(c) => bitmap::run(&ctx, c),
        Command::Bench(c) => bench::run(&ctx, c),
        Command::Demo(a) => demo::run(&ctx, a),
        Command::Manifest(c) => manifest::run(&ctx, c),
        Command::Rebuild(a) => rebuild::run(&ctx, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
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

fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.code;
        }
        match cause.downcast_ref::<StoreError>() {
            Some(StoreError::Locked(_)) => return 4,
            Some(StoreError::Untrusted { .. }) => return 3,
            _ => {}
        }
    }
    1
}
