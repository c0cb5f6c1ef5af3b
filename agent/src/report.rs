//! The JSON reports of bitmaps, shared by the offline CLI and the agent.

use crate::store::{Loaded, Meta};
use serde_json::{Value, json};
use wire::{Bitmap, DiskId, Extent, State};

/// Extents per `show` page when the request names no limit.
pub const SHOW_PAGE: usize = 100_000;
/// Most extents one `show` page may carry (and the most a `show` without `limit` returns): ~40 bytes each keeps a reply well under the control
/// socket's line limit, whatever the bitmap (finding F4).
pub const SHOW_PAGE_MAX: usize = 250_000;

/// The `bitmap show` report: `disk, size, granularity, state, epoch, checkpoint, dirty_blocks,
/// root, generation, reason, extents`. `dirty_blocks`, `root` and `extents` are `null` when the
/// bits did not verify.
pub fn bitmap(meta: &Meta, bits: Option<&mut Bitmap>, reason: Option<&str>) -> Value {
    let extents = bits
        .as_ref()
        .map(|b| json!(b.extents().collect::<Vec<_>>()));
    let mut v = bitmap_header(meta, bits, reason);
    v["extents"] = extents.unwrap_or(Value::Null);
    v
}

/// One reply of `bitmap show`: the header fields and the extents starting at the first dirty
/// block at or after byte `offset`, with `next_offset`, the byte offset to ask for next (`null`
/// once the last extent was sent). With a `limit` (capped at [`SHOW_PAGE_MAX`]) that is one
/// page; without one it is every extent, and a bitmap with more than [`SHOW_PAGE_MAX`] is
/// refused rather than cut: a client that does not page must never take a partial list for
/// the whole bitmap (a missing extent is a missing bit to a backup). Costs the page, not the
/// bitmap.
pub fn bitmap_page(
    meta: &Meta,
    bits: Option<&mut Bitmap>,
    reason: Option<&str>,
    offset: u64,
    limit: Option<usize>,
) -> anyhow::Result<Value> {
    let page_limit = limit.map_or(SHOW_PAGE_MAX, |l| l.min(SHOW_PAGE_MAX));
    let page = bits.as_ref().map(|b| extents_page(b, offset, page_limit));
    if limit.is_none()
        && let Some((_, Some(_))) = &page
    {
        return Err(crate::exit::Failure::usage(format!(
            "{} has more than {SHOW_PAGE_MAX} extents, more than one reply carries: ask for \
             pages with \"limit\" (at most {SHOW_PAGE_MAX}) and \"offset\" = the previous \
             reply's \"next_offset\" (bitferry bitmap show does)",
            meta.disk
        )));
    }
    let mut v = bitmap_header(meta, bits, reason);
    match page {
        Some((extents, next)) => {
            v["extents"] = json!(extents);
            v["next_offset"] = json!(next);
        }
        None => {
            v["extents"] = Value::Null;
            v["next_offset"] = Value::Null;
        }
    }
    Ok(v)
}

/// At most `limit` extents of `bits` from the first dirty block at or after byte `offset`, and
/// where the next page starts (the start of the next extent), if there is one.
pub fn extents_page(bits: &Bitmap, offset: u64, limit: usize) -> (Vec<Extent>, Option<u64>) {
    let g = bits.geometry();
    let (gran, size) = (g.granularity(), g.size());
    let mut runs = bits.runs_in(offset / gran, g.blocks());
    let page: Vec<Extent> = runs
        .by_ref()
        .take(limit.max(1))
        .map(|(a, b)| Extent {
            offset: a * gran,
            length: (b * gran).min(size) - a * gran,
        })
        .collect();
    (page, runs.next().map(|(a, _)| a * gran))
}

/// Every field of the `bitmap show` report but `extents`.
pub fn bitmap_header(meta: &Meta, bits: Option<&mut Bitmap>, reason: Option<&str>) -> Value {
    let (dirty, root) = match bits {
        Some(b) => (json!(b.count()), json!(b.root().to_hex())),
        None => (Value::Null, Value::Null),
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
