//! The invariants, checked after every step and at the end (docs/simulation.md).

use crate::agent::{Role, Track};
use crate::truth::{Truth, checkpoint_index};
use crate::world::World;
use agent::store::{Meta, Store};
use std::path::Path;
use wire::{Bitmap, State};

/// What a host's stored file says, as far as the checker cares.
#[derive(Debug, Clone)]
pub enum FileVerdict {
    /// Missing, or not `consistent`: promises nothing.
    NoPromise,
    /// Loads `consistent`: must be a superset.
    Consistent(Box<(Meta, Bitmap)>),
}

/// Why a `consistent` bitmap breaks the safety rule, if it does.
pub fn superset_violation(
    truth: &Truth,
    geom: wire::Geometry,
    what: &str,
    meta: &Meta,
    bitmap: &Bitmap,
    only: Option<(u64, u64)>,
) -> Option<String> {
    if bitmap.geometry() != geom || meta.geometry != geom {
        return Some(format!(
            "{what}: geometry {:?} differs from the disk's {geom:?}",
            bitmap.geometry()
        ));
    }
    let Some(n) = meta
        .checkpoint
        .as_ref()
        .and_then(checkpoint_index)
        .filter(|&n| truth.has(n))
    else {
        return Some(format!(
            "{what}: counts from an unknown checkpoint {:?}",
            meta.checkpoint
        ));
    };
    let changed = truth.changed(n);
    let missing = match only {
        Some((lo, hi)) => (lo..hi).find(|b| changed.contains(b) && !bitmap.is_set(*b)),
        None => changed.iter().copied().find(|&b| !bitmap.is_set(b)),
    };
    missing.map(|b| {
        format!(
            "{what}: block {b} changed since ckpt-{n} but its bit is clear ({} blocks changed, {} bits set, epoch {})",
            changed.len(),
            bitmap.count(),
            meta.epoch
        )
    })
}

fn file_verdict(w: &mut World, h: usize) -> FileVerdict {
    let key = (w.hosts[h].disk.writes(), w.hosts[h].disk_gen);
    if let Some((k, v)) = &w.file_cache[h]
        && *k == key
    {
        return v.clone();
    }
    // A read-only look at the disk, as `bitferry bitmap show` would do after a restart.
    let store = Store::with_storage(
        Box::new(w.hosts[h].disk.clone()),
        agent::store::Access::ReadOnly,
        Path::new("check"),
    );
    let v = match store.load(&w.disk) {
        Ok(l) if l.state() == State::Consistent => match (l.meta, l.bitmap) {
            (Some(m), Some(b)) => FileVerdict::Consistent(Box::new((m, b))),
            _ => FileVerdict::NoPromise,
        },
        _ => FileVerdict::NoPromise,
    };
    w.file_cache[h] = Some((key, v.clone()));
    v
}

/// After every step.
pub fn after_step(w: &mut World) {
    let mut found = Vec::new();
    let full = w.recheck;
    let only = if full { None } else { w.last_write };
    if full || only.is_some() {
        w.recheck = false;
        for h in 0..w.hosts.len() {
            // Stored files, on every host (a crashed host's file is what it will report).
            if let FileVerdict::Consistent(b) = file_verdict(w, h) {
                let (meta, mut bitmap) = *b;
                let what = format!("{}'s stored consistent bitmap", w.hosts[h].name);
                if let Some(v) = superset_violation(&w.truth, w.geom, &what, &meta, &bitmap, only) {
                    found.push(v);
                }
                if full && bitmap.root().0 != *blake3::hash(&bitmap.to_raw()).as_bytes() {
                    found.push(format!("{what}: root is not blake3 of its raw bytes"));
                }
            }
            // Live trackers of living agents that report consistent/recording.
            if w.hosts[h].up
                && let Role::Owner(Track::Live { meta, bitmap }) = &w.hosts[h].role
                && matches!(meta.state, State::Recording | State::Consistent)
            {
                let what = format!("{}'s live bitmap ({})", w.hosts[h].name, meta.state);
                if let Some(v) = superset_violation(&w.truth, w.geom, &what, meta, bitmap, only) {
                    found.push(v);
                }
            }
        }
    }
    // One owner: no two living agents claim the disk at once.
    let owners: Vec<(usize, u64)> = (0..w.hosts.len())
        .filter(|&h| w.hosts[h].up)
        .filter_map(|h| w.hosts[h].role.owner_epoch().map(|e| (h, e)))
        .collect();
    // One owner per epoch: an epoch, once owned by a host, is never owned by another.
    for &(h, e) in &owners {
        match w.epoch_owner.get(&e) {
            Some(&first) if first != h => found.push(format!(
                "epoch {e} owned by {} after {} owned it",
                w.hosts[h].name, w.hosts[first].name
            )),
            Some(_) => {}
            None => {
                w.epoch_owner.insert(e, h);
            }
        }
    }
    if owners.len() > 1 {
        found.push(format!(
            "two owners: {}",
            owners
                .iter()
                .map(|(h, e)| format!("{} at epoch {e}", w.hosts[*h].name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // The VM runs only where the disk's tracking is owned.
    // (or on a destination whose session will take ownership: post-copy early resume).
    let pending_dest = |h: usize| {
        matches!(
            w.hosts[h].mig.as_ref().map(|m| &m.sess),
            Some(crate::agent::Sess::Dst(_))
        )
    };
    if let Some(h) = w.vm.on
        && (!w.hosts[h].up || !(matches!(w.hosts[h].role, Role::Owner(_)) || pending_dest(h)))
    {
        found.push(format!(
            "VM runs on {} whose agent is {}",
            w.hosts[h].name,
            w.hosts[h].role.name()
        ));
    }
    for v in found {
        w.log(|| format!("VIOLATION {v}"));
        w.violations.push(format!("t={}µs: {v}", w.now));
    }
}

/// Once faults stopped and the settle time passed: everything ended.
pub fn at_end(w: &mut World) {
    let mut found = Vec::new();
    for (i, m) in w.migs.iter().enumerate() {
        if !m.started {
            continue;
        }
        for h in [m.src, m.dst] {
            if w.hosts[h].mig.as_ref().is_some_and(|x| x.id == i) {
                found.push(format!(
                    "migration {i} still running on {} after the faults stopped",
                    w.hosts[h].name
                ));
            }
        }
    }
    for h in &w.hosts {
        if !h.up {
            found.push(format!("{} never came back", h.name));
        }
        match &h.role {
            Role::InDoubt { .. } | Role::Unknown { .. } | Role::Owner(Track::Rebuild(_)) => {
                found.push(format!("{} did not settle: {}", h.name, h.role.name()))
            }
            Role::Owner(Track::Live { meta, .. }) if meta.state != State::Recording => found.push(
                format!("{} owns a bitmap still {} at the end", h.name, meta.state),
            ),
            _ => {}
        }
    }
    let owners = w
        .hosts
        .iter()
        .filter(|h| matches!(h.role, Role::Owner(_)))
        .count();
    if owners != 1 {
        found.push(format!("{owners} owners at the end"));
    }
    if w.vm.on.is_none() {
        found.push("the VM is not running at the end".into());
    }
    for v in found {
        w.violations.push(format!("end: {v}"));
    }
}

/// Extra bits per true bit of the final owner's bitmap (None if nothing changed).
pub fn precision(w: &World) -> Option<f64> {
    w.hosts.iter().find_map(|h| match &h.role {
        Role::Owner(Track::Live { meta, bitmap }) => {
            let n = meta
                .checkpoint
                .as_ref()
                .and_then(checkpoint_index)
                .filter(|&n| w.truth.has(n))?;
            let truth = w.truth.changed(n).len() as f64;
            (truth > 0.0).then(|| (bitmap.count() as f64 - truth) / truth)
        }
        _ => None,
    })
}
