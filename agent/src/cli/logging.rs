//! Logging set-up: which events (`-v`/`-q`, or `BITFERRY_LOG`), and how they look on stderr
//! (human lines, JSON lines, or journald-friendly lines when stderr is the systemd journal).
//!
//! The program is called `bitferry` but its code lives in the crates `agent` and `wire`, whose
//! names are the targets of its events. A filter directive naming `bitferry` therefore means
//! those crates: `bitferry=debug` is `agent=debug,wire=debug`, and `bitferry::daemon=info` is
//! `agent::daemon=info`.

use super::LogFormat;
use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatFields as _};
use tracing_subscriber::registry::LookupSpan;

/// The crates whose events are "bitferry's own".
pub const OWN_TARGETS: [&str; 2] = ["agent", "wire"];

/// The filter used when neither `-v`/`-q` nor `BITFERRY_LOG` says otherwise.
pub const DEFAULT_FILTER: &str = "warn";

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

/// Build the filter: the flags when given, else `BITFERRY_LOG` (`env`) when set, else
/// [`DEFAULT_FILTER`]. An invalid `BITFERRY_LOG` is an error, not silently ignored.
pub fn filter(verbose: u8, quiet: u8, env: Option<&str>) -> Result<EnvFilter, String> {
    let spec = match (from_flags(verbose, quiet), env.map(str::trim)) {
        (Some(f), _) => f,
        (None, Some(e)) if !e.is_empty() => {
            let t = translate(e);
            return EnvFilter::builder().parse(&t).map_err(|err| {
                format!(
                    "BITFERRY_LOG={e:?} is not a valid log filter ({err}); use a level \
                     (error, warn, info, debug, trace) or TARGET=LEVEL pairs separated by \
                     commas, e.g. BITFERRY_LOG=info or BITFERRY_LOG=bitferry=debug"
                )
            });
        }
        _ => DEFAULT_FILTER.to_string(),
    };
    Ok(EnvFilter::builder()
        .parse(&spec)
        .expect("the built-in filters parse"))
}

/// Whether stderr is the systemd journal: systemd sets `JOURNAL_STREAM=DEV:INODE` for a
/// service whose output goes there, and it must name the very file stderr is (a child whose
/// stderr was redirected elsewhere inherits the variable but not the stream).
pub fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|v| v.trim().split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev as u64 == dev && st.st_ino as u64 == ino,
        Err(_) => false,
    }
}

/// Journald lines: the syslog priority as a `<N>` prefix (journald reads it as the entry's
/// priority), then the usual line without its timestamp (the journal stamps every entry).
struct Journald<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(w, "<{priority}>")?;
        self.0.format_event(ctx, w, event)
    }
}

/// Install the global subscriber.
pub fn init(format: LogFormat, filter: EnvFilter) {
    use std::io::IsTerminal;
    let journal = stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(!journal && std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match (format, journal) {
        (LogFormat::Json, _) => builder.json().try_init(),
        (LogFormat::Human, true) => builder
            .event_format(Journald(
                tracing_subscriber::fmt::format().without_time().with_ansi(false),
            ))
            .try_init(),
        (LogFormat::Human, false) => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitferry_means_the_programs_own_crates() {
        assert_eq!(translate("bitferry=debug"), "agent=debug,wire=debug");
        assert_eq!(translate("bitferry"), "agent,wire");
        assert_eq!(translate("info, bitferry::daemon=trace"), "info,agent::daemon=trace");
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
        assert!(filter(0, 0, Some("bitferry=debug")).is_ok());
        assert!(filter(0, 0, Some("")).is_ok());
        let e = filter(0, 0, Some("bitferry=loud")).unwrap_err();
        assert!(e.contains("not a valid log filter"), "{e}");
        // Flags win over the environment, even an invalid one.
        assert!(filter(1, 0, Some("bitferry=loud")).is_ok());
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("garbage")));
        assert!(!stderr_is_journal(Some("1:2")));
    }
}
