//! The `bitferry` command line. Each command area lives in its own file; this one holds the
//! top-level parser, the flags shared by several commands, and the one way a run ends: exit
//! code, and with `--json` exactly one JSON document on stdout, success or failure (usage
//! errors included).
//!
//! Exit codes: 0 success; 1 error; 2 usage; 3 the bitmap is not trustworthy (verify failed, or
//! the command refused an untrusted bitmap); 4 the store is locked by another process.

pub mod agent;
pub mod bench;
pub mod bitmap;
pub mod cert;
pub mod check;
pub mod demo;
pub mod examples;
pub mod logging;
pub mod manifest;
pub mod migrate;
pub mod output;
pub mod qcow2;
pub mod rebuild;
pub mod rebuild_agent;
pub mod units;

use crate::control::Request;
pub use crate::exit::Failure;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::{Value, json};
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// The store directory when neither `--store` nor `BITFERRY_STORE` names one.
pub const DEFAULT_STORE: &str = "/var/lib/bitferry";

/// bitferry keeps changed-block tracking (dirty bitmaps) of VM disks alive and trustworthy
/// across migrations and host failures.
///
/// A bitmap reported `consistent` is always a superset of the blocks changed since its
/// checkpoint; anything bitferry cannot prove is reported `inconsistent` or `incomplete`.
#[derive(Debug, Parser)]
#[command(
    name = "bitferry",
    version,
    propagate_version = true,
    after_help = examples::TOP,
    max_term_width = 100
)]
pub struct Cli {
    /// Store directory, for the commands that use one (also accepted after them).
    #[arg(long, env = "BITFERRY_STORE", default_value = DEFAULT_STORE, value_name = "DIR")]
    pub store: PathBuf,

    /// Control socket of a running agent, for the commands that talk to one (also accepted
    /// after them).
    #[arg(long, env = "BITFERRY_CONTROL", value_name = "SOCKET")]
    pub control: Option<PathBuf>,

    /// Print exactly one JSON document on stdout (also accepted after the command).
    #[arg(long)]
    pub json: bool,

    /// Logging (any command).
    #[command(flatten)]
    pub log: LogArgs,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Logging flags: meaningful for every command, so accepted everywhere.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format on stderr. Under systemd (stderr is the journal) human lines carry the
    /// journal's priority and no timestamp of their own.
    #[arg(long, global = true, value_enum, default_value = "human", help_heading = "Logging")]
    pub log_format: LogFormat,

    /// More log output: -v info, -vv debug, -vvv trace (bitferry's own events; other crates
    /// stay at warn). Overrides BITFERRY_LOG, whose default is `warn`, e.g.
    /// BITFERRY_LOG=bitferry=debug.
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "quiet", help_heading = "Logging")]
    pub verbose: u8,

    /// Less log output: -q errors only, -qq nothing. Overrides BITFERRY_LOG.
    #[arg(short, long, global = true, action = ArgAction::Count, help_heading = "Logging")]
    pub quiet: u8,
}

/// `--json`, on every command that reports.
#[derive(Debug, Clone, Args)]
pub struct JsonOpt {
    /// Print exactly one JSON document on stdout; on failure it has `error` and `exit_code`.
    #[arg(long)]
    pub json: bool,
}

/// `--store`, on the commands that open a store.
#[derive(Debug, Clone, Args)]
pub struct StoreOpt {
    /// Store directory (one file per disk). A store that a running agent holds is refused
    /// (exit 4): go through the agent with --control instead.
    #[arg(long, env = "BITFERRY_STORE", default_value = DEFAULT_STORE, value_name = "DIR")]
    pub store: PathBuf,
}

/// `--control`, on the commands that can (or must) go through a running agent.
#[derive(Debug, Clone, Args)]
pub struct ControlOpt {
    /// Control socket of a running agent: the command then goes through the agent.
    #[arg(long, env = "BITFERRY_CONTROL", value_name = "SOCKET")]
    pub control: Option<PathBuf>,
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
    #[command(subcommand, after_help = examples::BITMAP)]
    Bitmap(bitmap::BitmapCmd),
    /// Reproducible measurements, each figure beside a baseline from the same run.
    #[command(subcommand, after_help = examples::BENCH)]
    Bench(bench::BenchCmd),
    /// A narrated tour on this machine, in a temporary directory.
    #[command(after_help = examples::DEMO)]
    Demo(demo::DemoArgs),
    /// Run the agent daemon: QUIC listener, control socket, metrics, live store. With
    /// --check, only validate its configuration.
    #[command(after_help = examples::AGENT)]
    Agent(agent::AgentArgs),
    /// Tell a running (destination) agent to accept a disk's migration.
    #[command(after_help = examples::EXPECT)]
    Expect(agent::ExpectArgs),
    /// Show a running agent's state.
    #[command(after_help = examples::STATUS)]
    Status(agent::AgentOnly),
    /// Ask a running agent to commit everything and stop.
    #[command(after_help = examples::SHUTDOWN)]
    Shutdown(agent::AgentOnly),
    /// Cluster CA and host certificates for mutual TLS between agents.
    #[command(subcommand, after_help = examples::CERT)]
    Cert(cert::CertCmd),
    /// Migrate a disk's tracking to another agent (one-shot, or phase by phase).
    #[command(after_help = examples::MIGRATE)]
    Migrate(migrate::MigrateArgs),
    /// Read and write QEMU qcow2 persistent bitmaps.
    #[command(subcommand, after_help = examples::QCOW2)]
    Qcow2(qcow2::Qcow2Cmd),
    /// Per-block BLAKE3 manifests of backup images (the cheap reference for `rebuild`).
    #[command(subcommand, after_help = examples::MANIFEST)]
    Manifest(manifest::ManifestCmd),
    /// Rebuild a lost bitmap by comparing the live image with a backup or a manifest.
    #[command(after_help = examples::REBUILD)]
    Rebuild(rebuild::RebuildArgs),
    /// Print a shell completion script on stdout.
    #[command(after_help = examples::COMPLETIONS)]
    Completions(CompletionsArgs),
    /// Write man pages (bitferry.1 and one per command) into a directory.
    #[command(hide = true)]
    Man(ManArgs),
}

/// `completions` arguments.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `man` arguments.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory for the pages (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
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

/// A failure whose JSON document carries more than `error` and `exit_code`: the migration
/// status a failed `migrate` ended with, the problems `agent --check` found. Printed as that
/// one document, with `error` and `exit_code` set.
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
    /// A failure with exit code `code` reported as `fields` plus `error` and `exit_code`.
    pub fn new(code: u8, message: impl Into<String>, fields: Value) -> anyhow::Error {
        Reported {
            code,
            message: message.into(),
            fields,
        }
        .into()
    }
}

/// An error chain as one line: each cause once, even when a message already quotes its
/// source (an OS error is then not printed twice).
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// The exit code of an error chain (see [`crate::exit::exit_code`]).
fn code_of(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| c.downcast_ref::<Reported>().map(|r| r.code))
        .unwrap_or_else(|| crate::exit::exit_code(e))
}

/// Print a failure (stderr, and with `json` its one JSON document on stdout); its exit code.
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

/// A command-line the parser refused: clap's message on stderr as usual, and with `--json` the
/// one JSON document. Help and version requests print what was asked for and succeed.
fn usage_error(e: clap::Error, json: bool) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let message = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        "a command is missing here (see --help for the commands)".to_string()
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

/// The matches of each level of the command line: the program, its command, its subcommand….
fn levels(m: &ArgMatches) -> Vec<&ArgMatches> {
    let mut out = vec![m];
    while let Some((_, sub)) = out.last().expect("non-empty").subcommand() {
        out.push(sub);
    }
    out
}

fn has(m: &ArgMatches, id: &str) -> bool {
    m.ids().any(|i| i.as_str() == id)
}

/// A path flag given on several levels (`bitferry --store A bitmap show --store B`): the
/// deepest one given on the command line, else the deepest value from the environment or a
/// default. Also whether it was given on the command line at all.
fn path_flag(levels: &[&ArgMatches], id: &str) -> (Option<PathBuf>, bool) {
    let given = levels.iter().rev().find(|m| {
        has(m, id) && m.value_source(id) == Some(ValueSource::CommandLine)
    });
    let any = levels.iter().rev().find(|m| has(m, id));
    let value = given
        .or(any)
        .and_then(|m| m.get_one::<PathBuf>(id).cloned());
    (value, given.is_some())
}

/// The leaf command's name path, e.g. `["bitmap", "show"]`.
fn command_path(m: &ArgMatches) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = m;
    while let Some((name, sub)) = cur.subcommand() {
        out.push(name.to_string());
        cur = sub;
    }
    out
}

/// Run the CLI with the process's arguments.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let json_asked = wants_json(&args);
    let matches = match Cli::command().try_get_matches_from(&args) {
        Ok(m) => m,
        Err(e) => return usage_error(e, json_asked),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => return usage_error(e, json_asked),
    };
    let lv = levels(&matches);
    let json = lv
        .iter()
        .any(|m| has(m, "json") && m.get_flag("json"));
    let (store, store_given) = path_flag(&lv, "store");
    let (control, control_given) = path_flag(&lv, "control");
    let env_filter = std::env::var("BITFERRY_LOG").ok();
    match logging::filter(cli.log.verbose, cli.log.quiet, env_filter.as_deref()) {
        Ok(f) => logging::init(cli.log.log_format, f),
        Err(msg) => return fail(json, &Failure::usage(msg)),
    }
    let path = command_path(&matches);
    if path.first().map(String::as_str) == Some("agent") && (store_given || control_given) {
        let flag = if store_given { "--store" } else { "--control" };
        return fail(
            json,
            &Failure::usage(format!(
                "the agent takes its store and control socket from its config file (`store = …`, \
                 `control = …`); remove {flag} from the command line"
            )),
        );
    }
    let ctx = Ctx {
        store: store.unwrap_or_else(|| PathBuf::from(DEFAULT_STORE)),
        control,
        json,
    };
    let result = match cli.command {
        Command::Bitmap(c) => bitmap::run(&ctx, c),
        Command::Bench(c) => bench::run(&ctx, c),
        Command::Demo(a) => demo::run(&ctx, a),
        Command::Agent(a) => agent::agent(&ctx, a),
        Command::Expect(a) => agent::expect(&ctx, a),
        Command::Status(_) => agent::status(&ctx),
        Command::Shutdown(_) => agent::shutdown(&ctx),
        Command::Cert(c) => cert::run(&ctx, c),
        Command::Migrate(a) => migrate::run(&ctx, a),
        Command::Qcow2(c) => qcow2::run(&ctx, c),
        Command::Manifest(c) => manifest::run(&ctx, c),
        Command::Rebuild(a) => rebuild::run(&ctx, a),
        Command::Completions(a) => completions(a),
        Command::Man(a) => man(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(ctx.json, &e),
    }
}

fn completions(a: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(a.shell, &mut cmd, "bitferry", &mut out);
    out.flush()?;
    Ok(())
}

/// Write `bitferry.1` and `bitferry-CMD[-SUB].1` for every visible command.
fn man(a: ManArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, "bitferry", &a.out, &mut written)?;
    for w in &written {
        println!("{}", w.display());
    }
    Ok(())
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &std::path::Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let page = cmd.clone().name(name.to_string()).bin_name(name.replace('-', " "));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
