//! The kill campaign's ground-truth checker: pure logic over what the hosts report and what the
//! markers were told, no processes. The rules are stated in the campaign's module comment
//! (`campaign/mod.rs`); this file is their single implementation, with tests that it catches
//! each kind of violation.

use std::collections::BTreeMap;
use wire::{Bitmap, Geometry};

/// One acknowledged mark: a `bitmap mark` that exited 0.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The byte ranges of the request.
    pub ranges: Vec<(u64, u64)>,
    /// The host that answered 0.
    pub host: String,
    /// Milliseconds since the iteration started, when the answer came.
    pub at_ms: u64,
    /// The marker's routing at the time ("vm on host-a", "redirected after refusal", …).
    pub route: String,
    /// Whether the answer said `"forwarded_to_migration": true` (the host did not hold the
    /// disk yet and promised to carry the mark into the migration).
    pub forwarded: bool,
}

/// What one host reports for one disk (`bitmap show --json`), or that it holds none.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The host's name.
    pub host: String,
    /// `state`.
    pub state: String,
    /// `epoch`.
    pub epoch: u64,
    /// `extents`; `None` when the bits did not verify.
    pub extents: Option<Vec<(u64, u64)>>,
    /// `reason`.
    pub reason: Option<String>,
}

/// Everything known about one disk at a check.
#[derive(Debug, Clone)]
pub struct DiskView {
    /// Disk id.
    pub disk: String,
    /// Its geometry.
    pub geometry: Geometry,
    /// Entries, one per host that holds one.
    pub entries: Vec<Entry>,
    /// Retirement records (`<disk>.retired`): host → the epoch it handed the disk over at.
    pub retired: BTreeMap<String, u64>,
}

/// States in which a host acts as the disk's owner: it records the VM's writes and either
/// trusts its bitmap (`recording`, `consistent`) or is on its way to a trusted one
/// (`rebuilding`, and `inconsistent`, which a configured reference rebuilds into `recording`).
/// `incomplete` is not in the list: a post-copy destination owns its `incomplete` bitmap, but a
/// source keeps an `incomplete` copy after a switchover without owning it (docs/protocol.md §6).
pub const OWNER_STATES: [&str; 4] = ["recording", "consistent", "rebuilding", "inconsistent"];

/// States that claim the superset property.
pub const TRUSTED_STATES: [&str; 2] = ["recording", "consistent"];

/// Check one disk; returns the violations, each a self-contained sentence.
pub fn check(view: &DiskView, acks: &[Ack]) -> Vec<String> {
    let mut out = Vec::new();
    let d = &view.disk;
    // Rule 2: at most one host holds an entry at any epoch.
    let mut by_epoch: BTreeMap<u64, Vec<&Entry>> = BTreeMap::new();
    for e in &view.entries {
        by_epoch.entry(e.epoch).or_default().push(e);
    }
    for (epoch, es) in &by_epoch {
        if es.len() > 1 {
            out.push(format!(
                "{d}: {} hosts hold an entry at epoch {epoch}: {}",
                es.len(),
                describe(es.iter().copied())
            ));
        }
    }
    // Rule 3: an owner state only at the highest epoch known anywhere (entries and retirement
    // records), and never at or below an epoch the same host handed the disk over at.
    let top = view
        .entries
        .iter()
        .map(|e| e.epoch)
        .chain(view.retired.values().copied())
        .max()
        .unwrap_or(0);
    for e in &view.entries {
        if !OWNER_STATES.contains(&e.state.as_str()) {
            continue;
        }
        if e.epoch < top {
            out.push(format!(
                "{d}: stale owner: {} is {} at epoch {} but epoch {top} exists ({}; retired: {:?})",
                e.host,
                e.state,
                e.epoch,
                describe(view.entries.iter()),
                view.retired
            ));
        }
        if let Some(r) = view.retired.get(&e.host)
            && e.epoch <= *r
        {
            out.push(format!(
                "{d}: {} is {} at epoch {} although it handed the disk over at epoch {r}",
                e.host, e.state, e.epoch
            ));
        }
    }
    // Rule 1: a trusted bitmap holds every acknowledged mark.
    if !acks.is_empty() {
        let mut truth = Bitmap::new(view.geometry);
        for a in acks {
            for &(o, l) in &a.ranges {
                truth
                    .mark(o, l)
                    .expect("acknowledged ranges are inside the disk");
            }
        }
        for e in &view.entries {
            if !TRUSTED_STATES.contains(&e.state.as_str()) {
                continue;
            }
            let Some(extents) = &e.extents else {
                out.push(format!(
                    "{d}: {} reports {} at epoch {} without extents",
                    e.host, e.state, e.epoch
                ));
                continue;
            };
            let mut got = Bitmap::new(view.geometry);
            for &(o, l) in extents {
                if got.mark(o, l).is_err() {
                    out.push(format!(
                        "{d}: {} reports an extent {o}+{l} outside the disk",
                        e.host
                    ));
                }
            }
            let mut missing = truth.clone();
            missing.subtract(&got).expect("same geometry");
            let n = missing.count();
            if n > 0 {
                out.push(format!(
                    "{d}: {} is {} at epoch {} but lacks {n} acknowledged block(s); {}",
                    e.host,
                    e.state,
                    e.epoch,
                    explain_missing(&missing, acks, view.geometry.granularity())
                ));
            }
        }
    }
    out
}

fn describe<'a>(es: impl Iterator<Item = &'a Entry>) -> String {
    es.map(|e| match &e.reason {
        Some(r) => format!("{} {}@{} ({r})", e.host, e.state, e.epoch),
        None => format!("{} {}@{}", e.host, e.state, e.epoch),
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// Which acknowledgements the first missing blocks came from.
fn explain_missing(missing: &Bitmap, acks: &[Ack], g: u64) -> String {
    let mut lines = Vec::new();
    for (a, _) in missing.runs().take(4) {
        let (lo, hi) = (a * g, (a + 1) * g);
        let who: Vec<String> = acks
            .iter()
            .filter(|k| k.ranges.iter().any(|&(o, l)| o < hi && o + l > lo))
            .map(|k| {
                format!(
                    "acked by {} at {} ms ({}{})",
                    k.host,
                    k.at_ms,
                    k.route,
                    if k.forwarded {
                        ", \"forwarded_to_migration\": true"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        lines.push(format!("block {a} (byte {lo}): {}", who.join("; ")));
    }
    lines.join(" | ")
}

/// How a check turned out for one host's entry, for the summary: `role:state`.
pub fn outcome_key(role: &str, entry: Option<&Entry>) -> String {
    match entry {
        Some(e) => format!("{role}:{}", e.state),
        None => format!("{role}:none"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> Geometry {
        Geometry::new(1 << 30, 4096).unwrap()
    }

    fn entry(host: &str, state: &str, epoch: u64, extents: &[(u64, u64)]) -> Entry {
        Entry {
            host: host.into(),
            state: state.into(),
            epoch,
            extents: Some(extents.to_vec()),
            reason: None,
        }
    }

    fn ack(ranges: &[(u64, u64)], host: &str) -> Ack {
        Ack {
            ranges: ranges.to_vec(),
            host: host.into(),
            at_ms: 5,
            route: "vm on a".into(),
            forwarded: host == "b",
        }
    }

    fn view(entries: Vec<Entry>) -> DiskView {
        DiskView {
            disk: "vm/t".into(),
            geometry: g(),
            entries,
            retired: BTreeMap::new(),
        }
    }

    #[test]
    fn a_superset_passes_and_a_missing_block_is_named_with_its_acknowledgement() {
        let acks = [ack(&[(0, 1), (8192, 5000)], "a"), ack(&[(1 << 20, 1)], "b")];
        let ok = view(vec![entry(
            "b",
            "recording",
            2,
            &[(0, 4096), (8192, 8192), (1 << 20, 4096 * 3)],
        )]);
        assert_eq!(check(&ok, &acks), Vec::<String>::new());
        // The block at 1 MiB, acknowledged by b as forwarded, is missing.
        let bad = view(vec![entry("b", "recording", 2, &[(0, 16384)])]);
        let v = check(&bad, &acks);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("lacks 1 acknowledged block"), "{v:?}");
        assert!(v[0].contains("block 256"), "{v:?}");
        assert!(v[0].contains("forwarded_to_migration"), "{v:?}");
        // The second block of a range that spans two blocks counts too.
        let bad = view(vec![entry(
            "b",
            "consistent",
            2,
            &[(0, 12288), (1 << 20, 1)],
        )]);
        assert_eq!(check(&bad, &acks).len(), 1);
    }

    #[test]
    fn untrusted_states_need_no_superset() {
        let acks = [ack(&[(0, 1)], "a")];
        for s in ["inconsistent", "incomplete", "rebuilding"] {
            assert!(check(&view(vec![entry("a", s, 1, &[])]), &acks).is_empty());
        }
        let mut e = entry("a", "recording", 1, &[]);
        e.extents = None;
        assert_eq!(check(&view(vec![e]), &acks).len(), 1);
    }

    #[test]
    fn two_entries_at_one_epoch_or_a_stale_owner_are_violations() {
        // A handed-over source copy below the owner: fine.
        let ok = view(vec![
            entry("a", "incomplete", 1, &[]),
            entry("b", "recording", 2, &[]),
        ]);
        assert!(check(&ok, &[]).is_empty());
        // Only a source copy: no owner, allowed.
        assert!(check(&view(vec![entry("a", "incomplete", 1, &[])]), &[]).is_empty());
        let same = view(vec![
            entry("a", "incomplete", 2, &[]),
            entry("b", "incomplete", 2, &[]),
        ]);
        assert_eq!(check(&same, &[]).len(), 1);
        for s in OWNER_STATES {
            let stale = view(vec![
                entry("a", s, 1, &[]),
                entry("b", "incomplete", 2, &[]),
            ]);
            let v = check(&stale, &[]);
            assert!(v.len() == 1 && v[0].contains("stale owner"), "{s}: {v:?}");
        }
        // A retirement record counts as a newer epoch, on any host.
        let mut r = view(vec![entry("a", "recording", 1, &[])]);
        r.retired.insert("b".into(), 2);
        assert_eq!(check(&r, &[]).len(), 1);
        let mut r = view(vec![entry("a", "recording", 2, &[])]);
        r.retired.insert("a".into(), 2);
        assert_eq!(check(&r, &[]).len(), 1);
        let mut r = view(vec![entry("a", "recording", 3, &[])]);
        r.retired.insert("a".into(), 2);
        assert!(check(&r, &[]).is_empty());
    }
}
