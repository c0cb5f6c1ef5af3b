//! The `bitferry` command line. Each command area lives in its own file; this one holds the
//! top-level parser, logging set-up, and the one way a run ends: an exit code, and with `--json`
//! exactly one JSON document on stdout, success or failure (usage errors included; a failure's
//! document has `error` and `exit_code`).
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
pub use crate::units;

use crate::control::Request;
pub use crate::exit::Failure;
pub use crate::logging::LogFormat;
use clap::{ArgAction, Parser, Subcommand};
use serde_json::{Value, json};
use std::ffi::OsString;
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

    /// Log format on stderr. Which events: -v/-q, else BITFERRY_LOG (a level, or TARGET=LEVEL
    /// pairs such as `bitferry=debug`), else the agent config's `log`, else `warn`.
    #[arg(long, global = true, value_enum, default_value = "human")]
    pub log_format: LogFormat,

    /// More log output: -v info, -vv debug, -vvv trace for bitferry's own events (other crates
    /// stay at warn). Wins over BITFERRY_LOG.
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less log output: -q errors only, -qq nothing. Wins over BITFERRY_LOG.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub quiet: u8,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
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
    /// Run the agent daemon: QUIC listener, control socket, metrics, live store. SIGTERM and
    /// SIGINT stop it cleanly (every bitmap committed); SIGHUP reloads its config. With
    /// --check, only validate the config.
    #[command(after_help = "EXAMPLES:\n  \
        bitferry agent --config /etc/bitferry/agent.toml\n  \
        bitferry agent --config /etc/bitferry/agent.toml --check   # validate, one line per problem\n  \
        kill -HUP $(pidof bitferry)                                 # reload the config")]
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

/// A failure whose JSON document carries more than `error` and `exit_code` (the migration
/// status a failed `migrate` ended with, the problems `agent --check` found): printed as that
/// one document, with `error` and `exit_code` added.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Reported {
    /// Exit code.
    pub code: u8,
    /// What went wrong, for people.
    pub message: String,
    /// The rest of the JSON document (an object).
    pub fields: Value,
}

impl Reported {
    /// A failure with exit code `code`, reported as `fields` plus `error` and `exit_code`.
    pub fn error(code: u8, message: impl Into<String>, fields: Value) -> anyhow::Error {
        Reported {
            code,
            message: message.into(),
            fields,
        }
        .into()
    }
}

pub use crate::exit::describe;

fn code_of(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| c.downcast_ref::<Reported>().map(|r| r.code))
        .unwrap_or_else(|| crate::exit::exit_code(e))
}

/// Print a failure on stderr, and with `json` its one JSON document on stdout; its exit code.
fn fail(json: bool, e: &anyhow::Error) -> ExitCode {
    let code = code_of(e);
    let message = describe(e);
    tracing::debug!(error = %message, "command failed");
    if json {
        let mut doc = e
            .chain()
            .find_map(|c| c.downcast_ref::<Reported>().map(|r| r.fields.clone()))
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        doc["error"] = json!(message);
        doc["exit_code"] = json!(code);
        output::print(true, &doc);
    }
    eprintln!("bitferry: error: {message}");
    ExitCode::from(code)
}

/// A command line the parser refused: clap's message on stderr as usual, and with `--json` the
/// one JSON document (exit 2). Help and version requests print what was asked and succeed.
fn usage_error(e: clap::Error, json: bool) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let message = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        "a subcommand is missing here (see --help)".to_string()
    } else {
        let rendered = e.render().to_string();
        rendered
            .lines()
            .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ")
            .trim_start_matches("error: ")
            .to_string()
    };
    if json {
        output::print(true, &json!({"error": message, "exit_code": 2}));
    }
    let _ = e.print();
    ExitCode::from(2)
}

/// Whether `--json` is on a command line the parser refused (before a `--`).
fn wants_json(args: &[OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// Run the CLI with the process's arguments.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => return usage_error(e, wants_json(&args)),
    };
    let env_filter = std::env::var("BITFERRY_LOG").ok();
    match crate::logging::choose(cli.verbose, cli.quiet, env_filter.as_deref()) {
        Ok((choice, filter)) => crate::logging::init(cli.log_format, choice, filter),
        Err(e) => return fail(cli.json, &Failure::usage(e.to_string())),
    }
    let ctx = Ctx {
        store: cli.store,
        control: cli.control,
        json: cli.json,
    };
    let result = match cli.command {
        Command::Bitmap(c) => bitmap::run(&ctx, c),
        Command::Bench(c) => bench::run(&ctx, c),
        Command::Demo(a) => demo::run(&ctx, a),
        Command::Agent(a) => agent::agent(&ctx, a),
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
        Err(e) => fail(ctx.json, &e),
    }
}
