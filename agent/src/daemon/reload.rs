//! SIGHUP: reload the agent's config without losing state, and say what changed.
//!
//! Reloaded: `[[expect]]` (config expectations added or removed; those added at run time with
//! `bitferry expect` stay), `[[reference]]` (used by the next rebuild; a running rebuild keeps
//! the reference it started with) and `log` (unless -v/-q or BITFERRY_LOG chose the filter).
//! Everything else (`listen`, `store`, `control`, `metrics`, `[tls]`, `[transport]`,
//! `[control_limits]`, `flush_interval_ms`) needs a restart: a change there is logged as not
//! applied and the running value stays. A config that does not load changes nothing.

use super::Shared;
use super::config::{Config, Expectation, Reference};
use std::path::Path;

/// What one reload did, for the log and for tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Human-readable changes that were applied.
    pub applied: Vec<String>,
    /// Keys that changed in the file but need a restart.
    pub not_applied: Vec<&'static str>,
}

/// The keys that only a restart applies, and whether each differs between `a` and `b`.
fn restart_only(a: &Config, b: &Config) -> Vec<&'static str> {
    [
        ("listen", a.listen == b.listen),
        ("store", a.store == b.store),
        ("control", a.control == b.control),
        ("metrics", a.metrics == b.metrics),
        ("tls", a.tls == b.tls),
        ("transport", a.transport == b.transport),
        ("control_limits", a.control_limits == b.control_limits),
        (
            "flush_interval_ms",
            a.flush_interval_ms == b.flush_interval_ms,
        ),
    ]
    .into_iter()
    .filter(|(_, same)| !same)
    .map(|(k, _)| k)
    .collect()
}

fn describe_expect(e: &Expectation) -> String {
    match &e.from {
        Some(p) => format!("{} from {p}", e.disk),
        None => e.disk.to_string(),
    }
}

/// Replace the config's expectations `old` by `new` in `live` (which also holds expectations
/// added at run time, kept). Returns the changes.
pub fn merge_expectations(
    live: &mut Vec<Expectation>,
    old: &[Expectation],
    new: &[Expectation],
) -> Vec<String> {
    let mut changes = Vec::new();
    live.retain(|e| {
        let keep = !old.contains(e) || new.contains(e);
        if !keep {
            changes.push(format!("expectation removed: {}", describe_expect(e)));
        }
        keep
    });
    for e in new {
        if !live.contains(e) {
            changes.push(format!("expectation added: {}", describe_expect(e)));
            live.push(e.clone());
        }
    }
    changes
}

/// The differences between two reference lists, by disk.
pub fn reference_changes(old: &[Reference], new: &[Reference]) -> Vec<String> {
    let mut changes = Vec::new();
    for r in new {
        match old.iter().find(|o| o.disk == r.disk) {
            None => changes.push(format!("reference added for {}", r.disk)),
            Some(o) if o != r => changes.push(format!("reference changed for {}", r.disk)),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|r| r.disk == o.disk) {
            changes.push(format!("reference removed for {}", o.disk));
        }
    }
    changes
}

/// Reload the config at `path` into the running agent; `running` is the config in force and
/// is updated with what was applied. Never fails: what cannot be done is logged.
pub fn reload(path: &Path, running: &mut Config, shared: &Shared) -> Option<Reloaded> {
    tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %crate::exit::describe(&anyhow::Error::new(e)), "config reload failed; the running config stays in force");
            return None;
        }
    };
    let mut done = Reloaded {
        not_applied: restart_only(running, &new),
        ..Default::default()
    };
    for key in &done.not_applied {
        tracing::warn!(
            key,
            "`{key}` changed in the config but cannot be reloaded: restart the agent to apply it; the running value stays"
        );
    }
    match crate::logging::apply_config(new.log.as_deref()) {
        Ok(crate::logging::Applied::Changed { from, to }) => {
            done.applied.push(format!("log filter: {from} -> {to}"));
        }
        Ok(crate::logging::Applied::Pinned { by, current }) if new.log != running.log => {
            tracing::warn!(set_by = by, filter = %current, "`log` changed in the config but {by} sets the log filter; it stays");
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "`log` not applied"),
    }
    {
        let mut st = shared.lock().expect("state lock");
        let changes = merge_expectations(&mut st.expectations, &running.expect, &new.expect);
        done.applied.extend(changes);
        done.applied
            .extend(reference_changes(&running.reference, &new.reference));
        st.rebuilds.references = new.reference.clone();
    }
    for p in super::check::reference_problems(&new.reference) {
        tracing::warn!(problem = %p, "a [[reference]] cannot be used as it is");
    }
    running.expect = new.expect;
    running.reference = new.reference;
    running.log = new.log;
    for c in &done.applied {
        tracing::info!(change = %c, "config reload");
    }
    tracing::info!(
        applied = done.applied.len(),
        not_applied = done.not_applied.len(),
        "config reloaded{}",
        if done.applied.is_empty() && done.not_applied.is_empty() {
            ": nothing changed"
        } else {
            ""
        }
    );
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(disk: &str, from: Option<&str>) -> Expectation {
        Expectation {
            disk: disk.parse().unwrap(),
            from: from.map(String::from),
        }
    }

    #[test]
    fn config_expectations_are_replaced_and_runtime_ones_kept() {
        let old = vec![e("a", None), e("b", Some("h1"))];
        let runtime = e("r", None);
        let mut live = vec![old[0].clone(), old[1].clone(), runtime.clone()];
        let new = vec![e("b", Some("h1")), e("c", None)];
        let changes = merge_expectations(&mut live, &old, &new);
        assert_eq!(live, vec![old[1].clone(), runtime, e("c", None)]);
        assert_eq!(
            changes,
            vec!["expectation removed: a", "expectation added: c"]
        );
        assert!(merge_expectations(&mut live, &new, &new).is_empty());
    }
}
