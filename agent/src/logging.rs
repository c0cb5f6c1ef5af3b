//! Logging: which events (`-v`/`-q`, `BITFERRY_LOG`, or the agent config's `log` key) and how
//! they look on stderr (human or JSON lines).
//!
//! The program is called `bitferry` but its code lives in the crates `agent` and `wire`, whose
//! names are the targets of its events. A filter directive naming `bitferry` therefore means
//! those crates: `bitferry=debug` is `agent=debug,wire=debug`, and `bitferry::daemon=info` is
//! `agent::daemon=info`.
//!
//! Precedence: `-v`/`-q` over `BITFERRY_LOG` over the config's `log` over [`DEFAULT_FILTER`].
//! The filter is installed behind a reload handle so an agent can change it on SIGHUP
//! ([`apply_config`]) — unless the command line or the environment chose it, which then stays.

use std::sync::{Mutex, OnceLock};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// The crates whose events are "bitferry's own".
pub const OWN_TARGETS: [&str; 2] = ["agent", "wire"];

/// The filter used when nothing else says otherwise.
pub const DEFAULT_FILTER: &str = "warn";

/// A log filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "{origin} {spec:?} is not a valid log filter ({source}); use a level (error, warn, info, \
     debug, trace) or TARGET=LEVEL pairs separated by commas, e.g. `info` or `bitferry=debug`"
)]
pub struct FilterError {
    /// Where the filter came from (`BITFERRY_LOG`, `log in the config`).
    pub origin: String,
    /// The filter as given.
    pub spec: String,
    /// The parser's complaint.
    #[source]
    pub source: tracing_subscriber::filter::ParseError,
}

/// Rewrite the directives of a filter that name `bitferry` into the crates' own targets.
pub fn translate(spec: &str) -> String {
    let mut out = Vec::new();
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match d.strip_prefix("bitferry") {
            Some(rest) if rest.is_empty() || rest.starts_with(['=', '[']) => {
                out.extend(OWN_TARGETS.iter().map(|t| format!("{t}{rest}")));
            }
            Some(rest) if rest.starts_with("::") => out.push(format!("agent{rest}")),
            _ => out.push(d.to_string()),
        }
    }
    out.join(",")
}

/// Parse a user's filter (with `bitferry` translated); `origin` names it in the error.
pub fn parse(spec: &str, origin: &str) -> Result<EnvFilter, FilterError> {
    EnvFilter::builder()
        .parse(translate(spec))
        .map_err(|source| FilterError {
            origin: origin.to_string(),
            spec: spec.to_string(),
            source,
        })
}

/// The filter that `-v` (repeated `verbose` times) or `-q` (`quiet` times) asks for, if any:
/// `-v` info, `-vv` debug, `-vvv` trace for bitferry's own events (other crates stay at
/// `warn`); `-q` errors only, `-qq` nothing.
pub fn from_flags(verbose: u8, quiet: u8) -> Option<String> {
    let own = |level: &str| {
        let mut d = vec![DEFAULT_FILTER.to_string()];
        d.extend(OWN_TARGETS.iter().map(|t| format!("{t}={level}")));
        d.join(",")
    };
    match (verbose, quiet) {
        (0, 0) => None,
        (_, 1) => Some("error".into()),
        (_, q) if q >= 2 => Some("off".into()),
        (1, _) => Some(own("info")),
        (2, _) => Some(own("debug")),
        _ => Some(own("trace")),
    }
}

/// The filter chosen on the command line or in the environment, if any, and where from.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The filter text (already translated for flags; as given for the environment).
    pub spec: String,
    /// `-v/-q` or `BITFERRY_LOG`; `None` when the default applies (a config may change it).
    pub pinned_by: Option<&'static str>,
}

/// Decide the filter from the flags and `BITFERRY_LOG` (`env`). An invalid `BITFERRY_LOG` is an
/// error, not silently ignored (flags win over it, valid or not).
pub fn choose(
    verbose: u8,
    quiet: u8,
    env: Option<&str>,
) -> Result<(Choice, EnvFilter), FilterError> {
    if let Some(spec) = from_flags(verbose, quiet) {
        let f = parse(&spec, "-v/-q")?;
        return Ok((
            Choice {
                spec,
                pinned_by: Some("-v/-q"),
            },
            f,
        ));
    }
    match env.map(str::trim) {
        Some(e) if !e.is_empty() => {
            let f = parse(e, "BITFERRY_LOG")?;
            Ok((
                Choice {
                    spec: e.to_string(),
                    pinned_by: Some("BITFERRY_LOG"),
                },
                f,
            ))
        }
        _ => Ok((
            Choice {
                spec: DEFAULT_FILTER.to_string(),
                pinned_by: None,
            },
            EnvFilter::new(DEFAULT_FILTER),
        )),
    }
}

/// Output style of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    pinned_by: Option<&'static str>,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Install the global subscriber with `filter` (from [`choose`]) behind a reload handle.
pub fn init(format: LogFormat, choice: Choice, filter: EnvFilter) {
    use std::io::IsTerminal;
    let (filter_layer, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Human => fmt.with_ansi(ansi).boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = CONTROL.set(Control {
            handle,
            pinned_by: choice.pinned_by,
            current: Mutex::new(choice.spec),
        });
    }
}

/// What [`apply_config`] did with the config's `log` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The filter in force is already this one.
    Unchanged(String),
    /// The filter changed.
    Changed {
        /// Before.
        from: String,
        /// Now.
        to: String,
    },
    /// The command line or environment chose the filter; the config's is not applied.
    Pinned {
        /// `-v/-q` or `BITFERRY_LOG`.
        by: &'static str,
        /// The filter in force.
        current: String,
    },
    /// No subscriber of ours is installed (tests, library use).
    NotInstalled,
}

/// Make the config's `log` key (absent: [`DEFAULT_FILTER`]) the filter in force, unless the
/// command line or the environment chose one. An invalid filter changes nothing.
pub fn apply_config(spec: Option<&str>) -> Result<Applied, FilterError> {
    let spec = spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_FILTER);
    let filter = parse(spec, "log in the config")?;
    let Some(c) = CONTROL.get() else {
        return Ok(Applied::NotInstalled);
    };
    let mut current = c.current.lock().expect("log filter lock");
    if let Some(by) = c.pinned_by {
        return Ok(Applied::Pinned {
            by,
            current: current.clone(),
        });
    }
    if *current == spec {
        return Ok(Applied::Unchanged(spec.to_string()));
    }
    // Only fails when the subscriber is gone.
    if c.handle.reload(filter).is_err() {
        return Ok(Applied::NotInstalled);
    }
    let from = std::mem::replace(&mut *current, spec.to_string());
    Ok(Applied::Changed {
        from,
        to: spec.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitferry_means_the_programs_own_crates() {
        assert_eq!(translate("bitferry=debug"), "agent=debug,wire=debug");
        assert_eq!(translate("bitferry"), "agent,wire");
        assert_eq!(
            translate("info, bitferry::daemon=trace"),
            "info,agent::daemon=trace"
        );
        assert_eq!(translate("quinn=info,agent=warn"), "quinn=info,agent=warn");
        assert_eq!(translate("bitferryx=info"), "bitferryx=info");
    }

    #[test]
    fn flags_env_and_errors() {
        assert_eq!(from_flags(0, 0), None);
        assert_eq!(from_flags(0, 1).as_deref(), Some("error"));
        assert_eq!(from_flags(0, 2).as_deref(), Some("off"));
        assert_eq!(
            from_flags(2, 0).as_deref(),
            Some("warn,agent=debug,wire=debug")
        );
        let (c, _) = choose(0, 0, Some("bitferry=debug")).unwrap();
        assert_eq!(c.pinned_by, Some("BITFERRY_LOG"));
        let (c, _) = choose(0, 0, Some("")).unwrap();
        assert_eq!((c.spec.as_str(), c.pinned_by), (DEFAULT_FILTER, None));
        let e = choose(0, 0, Some("bitferry=loud")).unwrap_err().to_string();
        assert!(
            e.contains("BITFERRY_LOG \"bitferry=loud\" is not a valid log filter"),
            "{e}"
        );
        // Flags win over the environment, even an invalid one.
        let (c, _) = choose(1, 0, Some("bitferry=loud")).unwrap();
        assert_eq!(c.pinned_by, Some("-v/-q"));
        assert!(apply_config(Some("nonsense=loud")).is_err());
    }
}
