//! The JSON reports of bitmaps, shared by the offline CLI and the agent.

use crate::store::{Loaded, Meta};
use serde_json::{Value, json};
use wire::{Bitmap, DiskId, State};

/// The `bitmap show` report: `disk, size, granularity, state, epoch, checkpoint, dirty_blocks,
/// root, generation, reason, extents`. `dirty_blocks`, `root` and `extents` are `null` when the
/// bits did not verify.
pub fn bitmap(meta: &Meta, bits: Option<&mut Bitmap>, reason: Option<&str>) -> Value {
    let (dirty, root, extents) = match bits {
        Some(b) => (
            json!(b.count()),
            json!(b.root().to_hex()),
            json!(b.extents().collect::<Vec<_>>()),
        ),
        None => (Value::Null, Value::Null, Value::Null),
    };
    json!({
        "disk": meta.disk,
        "size": meta.geometry.size(),
        "granularity": meta.geometry.granularity(),
        "state": meta.state,
        "epoch": meta.epoch,
        "checkpoint": meta.checkpoint.as_ref().map(|c| c.id.clone()),
        "dirty_blocks": dirty,
        "root": root,
        "generation": meta.generation,
        "reason": reason.or(meta.reason.as_deref()),
        "extents": extents,
    })
}

/// The report of a bitmap as loaded from the store, including files whose header is unreadable.
pub fn loaded(disk: &DiskId, l: &mut Loaded) -> Value {
    let reason = l.reason.clone();
    match l.meta.as_ref() {
        Some(m) => bitmap(m, l.bitmap.as_mut(), reason.as_deref()),
        None => unreadable(disk, reason.as_deref().unwrap_or("unreadable")),
    }
}

/// The `bitmap show` report of a store file whose header cannot be read: nothing is known but
/// the disk (from the file name) and why.
pub fn unreadable(disk: &DiskId, why: &str) -> Value {
    json!({
        "disk": disk,
        "size": null, "granularity": null,
        "state": State::Inconsistent,
        "epoch": null, "checkpoint": null, "dirty_blocks": null, "root": null,
        "generation": null,
        "reason": why,
        "extents": null,
    })
}

/// One row of `bitmap list`.
pub fn list_row(disk: &DiskId, l: &Loaded) -> Value {
    let m = l.meta.as_ref();
    json!({
        "disk": disk,
        "state": l.state(),
        "size": m.map(|m| m.geometry.size()),
        "granularity": m.map(|m| m.geometry.granularity()),
        "epoch": m.map(|m| m.epoch),
        "dirty_blocks": l.bitmap.as_ref().map(Bitmap::count),
    })
}
