//! Executing control requests directly on a store directory, without an agent. This is what the
//! CLI does when no `--control` socket is given; the agent executes the same requests on its
//! in-memory state (`daemon::state`).

use crate::control::Request;
use crate::exit::Failure;
use crate::report;
use crate::store::{Access, Meta, Store};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use wire::{Bitmap, Checkpoint, Geometry, State};

/// Execute `req` against the store in `dir`.
pub fn execute(dir: &Path, req: Request) -> Result<Value> {
    match req {
        Request::Create {
            disk,
            size,
            granularity,
            checkpoint,
        } => {
            let geometry = Geometry::new(size, granularity)?;
            let mut store = Store::open(dir, Access::ReadWrite)?;
            let (meta, mut bitmap) =
                create_entry(&mut store, disk, geometry, checkpoint, State::Consistent)?;
            Ok(report::bitmap(&meta, Some(&mut bitmap), None))
        }
        Request::Mark { disk, ranges } => {
            let mut store = Store::open(dir, Access::ReadWrite)?;
            let (mut meta, mut bitmap) = store.load(&disk)?.into_entry(&disk)?;
            let newly = mark_all(&mut bitmap, &ranges)?;
            store.commit(&mut meta, &mut bitmap)?;
            Ok(mark_report(&meta, &bitmap, newly))
        }
        Request::Show {
            disk,
            offset,
            limit,
        } => {
            let store = Store::open(dir, Access::ReadOnly)?;
            let mut l = store.load(&disk)?;
            let (Some(meta), Some(bits)) = (l.meta.as_ref(), l.bitmap.as_mut()) else {
                return Ok(report::loaded(&disk, &mut l));
            };
            let reason = l.reason.clone();
            report::bitmap_page(
                meta,
                Some(bits),
                reason.as_deref(),
                offset.unwrap_or(0),
                limit,
            )
        }
        Request::Verify { disk } => {
            let store = Store::open(dir, Access::ReadOnly)?;
            let mut l = store.load(&disk)?;
            let state = l.state();
            let root = l.bitmap.as_mut().map(|b| b.root().to_hex());
            verify_report(&disk, state, root, l.reason)
        }
        Request::Export {
            disk,
            raw,
            allow_untrusted,
            force,
        } => {
            let store = Store::open(dir, Access::ReadOnly)?;
            let l = store.load(&disk)?;
            let state = l.state();
            let (_, mut bitmap) = l.into_entry(&disk)?;
            export_raw(&disk, state, &mut bitmap, &raw, allow_untrusted, force)
        }
        Request::List => {
            let store = Store::open(dir, Access::ReadOnly)?;
            let mut rows = Vec::new();
            for disk in store.list()? {
                rows.push(report::list_row(&disk, &store.load(&disk)?));
            }
            Ok(json!({ "bitmaps": rows }))
        }
        Request::Expect { .. }
        | Request::Status
        | Request::Shutdown
        | Request::MigrateStart { .. }
        | Request::MigrateSwitchover { .. }
        | Request::MigrateStatus { .. }
        | Request::MigrateAbort { .. }
        | Request::RebuildStart { .. }
        | Request::RebuildStatus { .. }
        | Request::RebuildCancel { .. } => {
            bail!("this command talks to a running agent: pass --control SOCKET")
        }
    }
}

/// Metadata of a newly created bitmap: epoch 1, in `state` (consistent offline: an empty
/// bitmap is trivially a superset of the changes since a checkpoint taken now).
fn new_meta(
    disk: wire::DiskId,
    geometry: Geometry,
    checkpoint: Option<String>,
    state: State,
) -> Meta {
    Meta {
        disk,
        geometry,
        checkpoint: checkpoint.map(|id| Checkpoint {
            id,
            manifest_root: None,
        }),
        epoch: 1,
        state,
        reason: None,
        generation: 1,
    }
}

/// Store a new, clean entry for `disk` at epoch 1 in `state` (the `Create` request, offline
/// and in the agent) and return it.
pub fn create_entry(
    store: &mut Store,
    disk: wire::DiskId,
    geometry: Geometry,
    checkpoint: Option<String>,
    state: State,
) -> Result<(Meta, Bitmap)> {
    if let Some(id) = &checkpoint {
        // The id travels with every migration (docs/protocol.md §3): one the wire cannot carry
        // would make the disk unmigratable.
        let max = wire::proto::msg::MAX_CHECKPOINT_ID;
        if id.is_empty() || id.len() > max {
            return Err(Failure::usage(format!(
                "checkpoint id must be 1 to {max} bytes, not {}",
                id.len()
            )));
        }
    }
    let meta = new_meta(disk, geometry, checkpoint, state);
    let mut bitmap = Bitmap::new(geometry);
    store.create(&meta, &mut bitmap)?;
    Ok((meta, bitmap))
}

/// Apply every range, or none if any is out of bounds. Returns blocks newly set. Costs the
/// ranges' blocks, whatever the bitmap's size (finding F5).
pub fn mark_all(bitmap: &mut Bitmap, ranges: &[(u64, u64)]) -> Result<u64> {
    let size = bitmap.geometry().size();
    if let Some(&(offset, length)) = ranges
        .iter()
        .find(|(o, l)| o.checked_add(*l).is_none_or(|end| end > size))
    {
        return Err(wire::RangeError {
            offset,
            length,
            size,
        }
        .into());
    }
    let mut newly = 0;
    for (o, l) in ranges {
        newly += bitmap.mark(*o, *l)?;
    }
    Ok(newly)
}

/// The `bitmap mark` report.
pub fn mark_report(meta: &Meta, bitmap: &Bitmap, newly: u64) -> Value {
    json!({
        "disk": meta.disk,
        "newly_dirty_blocks": newly,
        "dirty_blocks": bitmap.count(),
        "generation": meta.generation,
        "state": meta.state,
    })
}

/// The `bitmap verify` outcome: a report when `state` is trustworthy and the bits verified,
/// otherwise an exit-3 failure with the reason.
pub fn verify_report(
    disk: &wire::DiskId,
    state: State,
    root: Option<String>,
    reason: Option<String>,
) -> Result<Value> {
    let trusted = matches!(state, State::Consistent | State::Recording);
    match (&root, trusted) {
        (Some(_), true) => Ok(json!({"disk": disk, "ok": true, "state": state, "root": root})),
        _ => Err(Failure::untrusted(format!(
            "bitmap for {disk} does not verify ({state}): {}",
            reason.unwrap_or_else(|| format!("state is {state}"))
        ))),
    }
}

/// Write the raw bytes of `bitmap` to `path` (and fsync), refusing untrusted bitmaps unless told.
pub fn export_raw(
    disk: &wire::DiskId,
    state: State,
    bitmap: &mut Bitmap,
    path: &Path,
    allow_untrusted: bool,
    force: bool,
) -> Result<Value> {
    if !matches!(state, State::Consistent | State::Recording) && !allow_untrusted {
        return Err(Failure::untrusted(format!(
            "bitmap for {disk} is {state}, not consistent; pass --allow-untrusted to export it anyway"
        )));
    }
    let raw = bitmap.to_raw();
    // Without `force` an existing file is refused atomically (O_EXCL): it may be another
    // disk's export, or the image itself.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(force)
        .create_new(!force)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!(
                    "{} already exists; pass --force to replace it",
                    path.display()
                )
            } else {
                anyhow::Error::new(e).context(format!("creating {}", path.display()))
            }
        })?;
    f.write_all(&raw)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(json!({
        "disk": disk,
        "raw": path,
        "bytes": raw.len(),
        "state": state,
        "root": bitmap.root().to_hex(),
    }))
}
