//! Read route A, the carrier: QEMU writes the drained bitmap into a throw-away qcow2 image,
//! which bitferry's qcow2 reader then reads. Needs no NBD server, so it works on any QEMU,
//! migrating or not.
//!
//! 1. bitferry writes an empty carrier of the node's virtual size holding one disabled
//!    persistent bitmap of the same granularity ([`crate::qcow2::write_carrier`]);
//! 2. `blockdev-add` it (`qcow2` over `file`);
//! 3. `block-dirty-bitmap-merge` the drained bitmap into it across nodes;
//! 4. `blockdev-del`: QEMU stores the bitmap into the file as it closes the node;
//! 5. read it back (an `in_use` or malformed result is refused) and delete the file.
//!
//! Steps 2–4 are undone on failure (`blockdev-del`), and the file is always deleted.

use super::error::DrainError;
use super::names;
use crate::qcow2::{Image, write_carrier};
use crate::qemu::qmp::Qmp;
use serde_json::json;
use std::path::{Path, PathBuf};
use wire::{Bitmap, Geometry};

/// The bitmap's name inside every carrier.
pub const CARRIER_BITMAP: &str = "bitferry-carrier";

/// The carrier file of drain `seq` in `dir`.
pub fn carrier_path(dir: &Path, prefix: &str, seq: u64) -> PathBuf {
    dir.join(format!("{}.qcow2", names::carrier_node(prefix, seq)))
}

/// Read bitmap `name` of `node` (geometry `geom`) through a carrier in `dir`.
pub async fn read(
    qmp: &Qmp,
    node: &str,
    geom: Geometry,
    name: &str,
    dir: &Path,
    prefix: &str,
    seq: u64,
) -> Result<Bitmap, DrainError> {
    let path = carrier_path(dir, prefix, seq);
    let car = names::carrier_node(prefix, seq);
    let result = through_carrier(qmp, node, geom, name, &path, &car).await;
    // Whatever happened, the file goes: it only ever held a copy.
    let removed = std::fs::remove_file(&path);
    let bitmap = result?;
    match removed {
        Ok(()) => Ok(bitmap),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(bitmap),
        Err(source) => Err(DrainError::Io {
            during: "removing the carrier",
            path,
            source,
        }),
    }
}

async fn through_carrier(
    qmp: &Qmp,
    node: &str,
    geom: Geometry,
    name: &str,
    path: &Path,
    car: &str,
) -> Result<Bitmap, DrainError> {
    // A carrier of the same name can only be a leftover of an agent that died mid-drain.
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a leftover carrier"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DrainError::Io {
                during: "removing a leftover carrier",
                path: path.to_path_buf(),
                source,
            });
        }
    }
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        write_carrier(&p, CARRIER_BITMAP, &Bitmap::new(geom), false).map(|_| ())
    })
    .await
    .map_err(|e| DrainError::Misuse(format!("carrier writer task failed: {e}")))?
    .map_err(|e| match e {
        crate::qcow2::WriteError::Io { source, .. } => DrainError::Io {
            during: "writing the carrier",
            path: path.to_path_buf(),
            source,
        },
        other => DrainError::Misuse(other.to_string()),
    })?;

    qmp.execute(
        "blockdev-add",
        json!({
            "driver": "qcow2",
            "node-name": car,
            "file": {"driver": "file", "filename": path},
        }),
    )
    .await
    .map_err(|e| DrainError::qmp("carrier blockdev-add", e))?;

    let merged = qmp
        .execute(
            "block-dirty-bitmap-merge",
            json!({
                "node": car,
                "target": CARRIER_BITMAP,
                "bitmaps": [{"node": node, "name": name}],
            }),
        )
        .await
        .map_err(|e| DrainError::qmp("carrier merge", e));
    // The node goes either way; on success this is what stores the bitmap into the file.
    let deleted = qmp
        .execute("blockdev-del", json!({"node-name": car}))
        .await
        .map_err(|e| DrainError::qmp("carrier blockdev-del", e));
    merged?;
    deleted?;

    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        let img = Image::open_path(&p)?;
        let e = img.find(CARRIER_BITMAP).cloned().ok_or_else(|| {
            crate::qcow2::ReadError::Untrusted {
                name: CARRIER_BITMAP.into(),
                reason: "QEMU stored no bitmap of that name".into(),
            }
        })?;
        img.read_bitmap(&e)
    })
    .await
    .map_err(|e| DrainError::Misuse(format!("carrier reader task failed: {e}")))?;
    let bitmap = read.map_err(|source| DrainError::Carrier {
        path: path.to_path_buf(),
        source,
    })?;
    if bitmap.geometry() != geom {
        return Err(DrainError::QemuMisbehaved {
            during: "carrier read",
            detail: format!(
                "the carrier holds a {:?} bitmap, the node is {geom:?}",
                bitmap.geometry()
            ),
        });
    }
    Ok(bitmap)
}
