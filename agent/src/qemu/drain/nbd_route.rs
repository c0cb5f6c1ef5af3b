//! Read route B, NBD: export the drained (disabled) bitmap read-only over an agent-owned unix
//! socket and read `qemu:dirty-bitmap:NAME` with NBD block status.
//!
//! `nbd-server-start` on the socket, `block-export-add` (read-only, `bitmaps: [NAME]`), block
//! status over the whole export, then `block-export-del` (mode `hard`: only this client is
//! connected), waiting for `BLOCK_EXPORT_DELETED` (until then the bitmap stays `busy` and
//! cannot be removed or merged), and `nbd-server-stop`. QEMU has one NBD server per process,
//! and a busy bitmap breaks QEMU's own bitmap migration: this route is for a QEMU bitferry
//! owns, never one that migrates or whose NBD server libvirt uses. Teardown runs on every
//! path after the server started.

use super::error::DrainError;
use super::names;
use crate::qemu::nbd::{NbdClient, NbdOptions, dirty_bitmap_context};
use crate::qemu::qmp::{Notification, Qmp};
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use tokio::sync::broadcast;
use wire::{Bitmap, Extent, Geometry};

/// How long to wait for QEMU to finish deleting the export.
const EXPORT_DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// Read bitmap `name` of `node` (geometry `geom`) over NBD on `socket`.
pub async fn read(
    qmp: &Qmp,
    node: &str,
    geom: Geometry,
    name: &str,
    socket: &Path,
    prefix: &str,
    seq: u64,
) -> Result<Bitmap, DrainError> {
    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket}}}),
    )
    .await
    .map_err(|e| DrainError::qmp("nbd-server-start", e))?;
    let id = names::export_id(prefix, seq);
    let result = exported(qmp, node, geom, name, socket, &id).await;
    let stopped = qmp
        .execute("nbd-server-stop", json!({}))
        .await
        .map_err(|e| DrainError::qmp("nbd-server-stop", e));
    let bitmap = result?;
    stopped?;
    Ok(bitmap)
}

async fn exported(
    qmp: &Qmp,
    node: &str,
    geom: Geometry,
    name: &str,
    socket: &Path,
    id: &str,
) -> Result<Bitmap, DrainError> {
    qmp.execute(
        "block-export-add",
        json!({
            "type": "nbd",
            "id": id,
            "node-name": node,
            "name": id,
            "writable": false,
            "bitmaps": [name],
        }),
    )
    .await
    .map_err(|e| DrainError::qmp("block-export-add", e))?;
    let result = read_export(geom, name, socket, id).await;
    let events = qmp.subscribe();
    let deleted = match qmp
        .execute("block-export-del", json!({"id": id, "mode": "hard"}))
        .await
    {
        Ok(_) => wait_deleted(qmp, events, id).await,
        Err(e) => Err(DrainError::qmp("block-export-del", e)),
    };
    let bitmap = result?;
    deleted?;
    Ok(bitmap)
}

async fn read_export(
    geom: Geometry,
    name: &str,
    socket: &Path,
    id: &str,
) -> Result<Bitmap, DrainError> {
    let ctx = dirty_bitmap_context(name);
    let nbd = |source| DrainError::Nbd {
        name: name.to_string(),
        source,
    };
    let mut c = NbdClient::connect_unix(socket, &NbdOptions::new(id).context(ctx.clone()))
        .await
        .map_err(nbd)?;
    if c.export().size != geom.size() {
        return Err(DrainError::QemuMisbehaved {
            during: "NBD export",
            detail: format!(
                "the export is {} bytes, the node {}",
                c.export().size,
                geom.size()
            ),
        });
    }
    let extents = c.dirty_extents(&ctx).await.map_err(nbd)?;
    // Disconnect politely; a failure here does not make the bits read wrong.
    if let Err(e) = c.disconnect().await {
        tracing::debug!(error = %e, "NBD disconnect after the read");
    }
    to_bitmap(geom, &extents)
}

/// The bitmap holding every block the extents touch.
pub fn to_bitmap(geom: Geometry, extents: &[Extent]) -> Result<Bitmap, DrainError> {
    let mut b = Bitmap::new(geom);
    for e in extents {
        b.mark(e.offset, e.length)
            .map_err(|err| DrainError::QemuMisbehaved {
                during: "NBD block status",
                detail: format!("dirty extent {e:?}: {err}"),
            })?;
    }
    Ok(b)
}

/// Wait for `BLOCK_EXPORT_DELETED` of `id` (or, if events were lost, for `query-block-exports`
/// to stop listing it).
async fn wait_deleted(
    qmp: &Qmp,
    mut events: broadcast::Receiver<Notification>,
    id: &str,
) -> Result<(), DrainError> {
    let deadline = tokio::time::Instant::now() + EXPORT_DELETE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                return Err(DrainError::QemuMisbehaved {
                    during: "block-export-del",
                    detail: format!(
                        "no BLOCK_EXPORT_DELETED for {id} within {EXPORT_DELETE_TIMEOUT:?}"
                    ),
                });
            }
            Ok(Ok(Notification::Event(e)))
                if e.name == "BLOCK_EXPORT_DELETED"
                    && e.data.get("id").and_then(|v| v.as_str()) == Some(id) =>
            {
                return Ok(());
            }
            Ok(Ok(Notification::Disconnected(r))) => {
                return Err(DrainError::QemuGone {
                    during: "block-export-del",
                    source: crate::qemu::qmp::QmpError::Disconnected(r),
                });
            }
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                while tokio::time::Instant::now() < deadline {
                    let list = qmp
                        .execute("query-block-exports", json!({}))
                        .await
                        .map_err(|e| DrainError::qmp("query-block-exports", e))?;
                    let listed = list.as_array().ok_or_else(|| DrainError::QemuMisbehaved {
                        during: "query-block-exports",
                        detail: format!("the reply is not an array: {list}"),
                    })?;
                    if !listed
                        .iter()
                        .any(|x| x.get("id").and_then(|v| v.as_str()) == Some(id))
                    {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                return Err(DrainError::QemuGone {
                    during: "block-export-del",
                    source: crate::qemu::qmp::QmpError::Disconnected(
                        crate::qemu::qmp::DisconnectReason::Closed,
                    ),
                });
            }
        }
    }
}
