//! Draining a live QEMU dirty bitmap: bitferry's tracker for one block node.
//!
//! [`Tracker::attach`] adds a bitferry-owned, **non-persistent** bitmap to the node, named
//! `PREFIX<seq>` ([`names`]) with a sequence number above every name the node already has, so
//! it never collides with a bitmap of the image, libvirt or an earlier agent (those with the
//! prefix are listed in [`Tracker::found`]; draining them is the caller's call).
//!
//! [`Tracker::drain`], in order:
//!
//! 1. merges any bitmap an earlier failed drain had to leave in QEMU back into the live one;
//! 2. **swaps**: one QMP `transaction` adds `N+1` (enabled) and disables `N`, so every write is
//!    in `N` (before) or in `N+1` (after);
//! 3. **reads** `N` over a [`Route`]: the carrier ([`carrier`]) or NBD ([`nbd_route`]);
//! 4. where QEMU has `x-debug-block-dirty-bitmap-sha256`, **checks** the bits read against it
//!    ([`sha`]);
//! 5. hands them to the caller's [`Sink`], which returns only once they are durable;
//! 6. only then **removes** `N`.
//!
//! If 3, 4 or 5 fails, `N` is merged back into `N+1` and removed (one `transaction`), so the
//! next drain has the bits; the error says what failed and [`BitsFate`] where the bits are.
//! This module knows nothing of the store. See `docs/qemu.md`, "Draining a live bitmap".

pub mod carrier;
pub mod error;
pub mod names;
pub mod nbd_route;
pub mod node;
pub mod sha;

pub use error::{BitsFate, DrainError, DrainFailed, SinkError};
pub use names::DEFAULT_PREFIX;
pub use node::{BitmapInfo, NodeInfo};

use crate::qemu::qmp::{Action, Qmp};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use wire::{Bitmap, Extent, Geometry};

/// QEMU's command for the SHA-256 of a bitmap.
pub const SHA256_COMMAND: &str = "x-debug-block-dirty-bitmap-sha256";

/// How many names a swap or attach tries when another client takes the one it picked.
const NAME_ATTEMPTS: usize = 16;

/// How a drained bitmap's bits are read out of QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through a throw-away qcow2 carrier created in `dir` (the default: needs no NBD server).
    Carrier {
        /// Where carriers are written (a directory the agent owns; QEMU must be able to open
        /// files there).
        dir: PathBuf,
    },
    /// Over NBD block status on an agent-owned unix socket at `socket` (only for a QEMU whose
    /// single NBD server bitferry owns, and never while it migrates).
    Nbd {
        /// The socket path (absolute: QEMU resolves it in its own working directory).
        socket: PathBuf,
    },
}

impl Route {
    /// `carrier` or `nbd`.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Carrier { .. } => "carrier",
            Route::Nbd { .. } => "nbd",
        }
    }
}

/// The bits of one drained bitmap, as handed to a [`Sink`].
#[derive(Debug, Clone)]
pub struct Drained {
    /// The drained QEMU bitmap (`PREFIX<seq>`).
    pub name: String,
    /// Its sequence number.
    pub seq: u64,
    /// Its bits.
    pub bitmap: Bitmap,
    /// True if they were checked against QEMU's SHA-256.
    pub sha256_checked: bool,
}

impl Drained {
    /// The dirty extents (adjacent blocks merged, clipped to the disk size).
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.bitmap.extents()
    }
}

/// Where drained bits go. `commit` must return `Ok` only once the bits are durable (merged into
/// the store and synced): the drained bitmap is removed from QEMU right after.
pub trait Sink {
    /// Make `drained` durable.
    fn commit(&mut self, drained: &Drained) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// A plain closure is a sink (for synchronous stores and tests).
impl<F> Sink for F
where
    F: FnMut(&Drained) -> Result<(), SinkError> + Send,
{
    fn commit(&mut self, drained: &Drained) -> impl Future<Output = Result<(), SinkError>> + Send {
        std::future::ready(self(drained))
    }
}

/// What one successful drain did.
#[derive(Debug, Clone)]
pub struct DrainReport {
    /// The bitmap drained.
    pub name: String,
    /// Its sequence number.
    pub seq: u64,
    /// The bitmap recording now.
    pub next: String,
    /// Dirty blocks handed to the sink.
    pub blocks: u64,
    /// The route used.
    pub route: &'static str,
    /// True if the bits were checked against QEMU's SHA-256.
    pub sha256_checked: bool,
    /// How long the swap `transaction` took.
    pub swap: Duration,
    /// From the start of the drain to the sink's return.
    pub to_durable: Duration,
    /// The whole drain, removal included.
    pub total: Duration,
    /// Set if removing the drained bitmap failed while QEMU still runs: the bits are durable,
    /// the bitmap stays (disabled) and the next drain removes it.
    pub remove_error: Option<String>,
}

/// Counters over a tracker's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Drains that handed bits to the sink and succeeded.
    pub drains: u64,
    /// Drains that failed.
    pub failed: u64,
    /// Dirty blocks handed to the sink.
    pub blocks: u64,
    /// Reads checked against QEMU's SHA-256.
    pub sha256_checked: u64,
    /// Reads whose SHA-256 did not match (each also a failed drain, merged back).
    pub sha256_mismatches: u64,
    /// Failed drains whose bits were merged back into the live bitmap.
    pub merged_back: u64,
}

/// bitferry's tracking of one block node of one QEMU.
#[derive(Debug)]
pub struct Tracker {
    qmp: Qmp,
    node: String,
    prefix: String,
    geom: Geometry,
    seq: u64,
    current: String,
    /// Old bitmaps whose merge-back failed while QEMU lived: they still hold bits.
    kept: Vec<String>,
    /// Old bitmaps whose bits are durable but whose removal failed.
    unremoved: Vec<String>,
    found: Vec<String>,
    sha256: bool,
    stats: DrainStats,
}

fn gran_ok(g: u64) -> bool {
    g.is_power_of_two() && (512..=64 << 20).contains(&g)
}

impl Tracker {
    /// Start tracking `node`: add a non-persistent bitmap `PREFIX<seq>` with `granularity`
    /// (QEMU's default for the node if `None`), recording from now on.
    pub async fn attach(
        qmp: Qmp,
        node: &str,
        granularity: Option<u64>,
        prefix: &str,
    ) -> Result<Tracker, DrainError> {
        names::check_prefix(prefix)?;
        if let Some(g) = granularity
            && !gran_ok(g)
        {
            return Err(DrainError::Misuse(format!(
                "granularity {g} must be a power of two from 512 B to 64 MiB"
            )));
        }
        let info = node::query(&qmp, node).await?;
        let mut taken: HashSet<String> = info.bitmaps.iter().map(|b| b.name.clone()).collect();
        let mut found: Vec<(u64, String)> = info
            .bitmaps
            .iter()
            .filter_map(|b| names::seq_of(prefix, &b.name).map(|s| (s, b.name.clone())))
            .collect();
        found.sort();
        let mut after = found.last().map_or(0, |(s, _)| *s);
        let mut attempt = 0;
        let (seq, name) = loop {
            attempt += 1;
            let seq = names::next_free(prefix, after, &taken).ok_or_else(|| {
                DrainError::Misuse(format!("no free bitmap name under prefix {prefix:?}"))
            })?;
            let name = names::bitmap_name(prefix, seq);
            let mut args = json!({"node": node, "name": name, "persistent": false});
            if let Some(g) = granularity {
                args["granularity"] = json!(g);
            }
            match qmp.execute("block-dirty-bitmap-add", args).await {
                Ok(_) => break (seq, name),
                Err(e) if e.is_disconnect() || attempt >= NAME_ATTEMPTS => {
                    return Err(DrainError::qmp("block-dirty-bitmap-add", e));
                }
                Err(e) => {
                    // Taken meanwhile by another client? Then try the next name.
                    let now = node::query(&qmp, node).await?;
                    if now.bitmap(&name).is_none() {
                        return Err(DrainError::qmp("block-dirty-bitmap-add", e));
                    }
                    taken.extend(now.bitmaps.into_iter().map(|b| b.name));
                    after = seq;
                }
            }
        };
        let info = node::query(&qmp, node).await?;
        let b = info
            .bitmap(&name)
            .ok_or_else(|| DrainError::QemuMisbehaved {
                during: "attach",
                detail: format!("bitmap {name:?} is not on {node} right after it was added"),
            })?;
        if !b.recording || b.persistent || granularity.is_some_and(|g| g != b.granularity) {
            return Err(DrainError::QemuMisbehaved {
                during: "attach",
                detail: format!("bitmap {name:?} was added as asked but QEMU lists {b:?}"),
            });
        }
        let geom = match Geometry::new(info.size, b.granularity) {
            Ok(g) => g,
            Err(e) => {
                let _ = qmp
                    .execute(
                        "block-dirty-bitmap-remove",
                        json!({"node": node, "name": name}),
                    )
                    .await;
                return Err(DrainError::Misuse(format!(
                    "node {node} ({} bytes, granularity {}): {e}",
                    info.size, b.granularity
                )));
            }
        };
        let sha256 = qmp.has_command(SHA256_COMMAND);
        tracing::info!(node, bitmap = %name, size = info.size, granularity = b.granularity,
            sha256, "attached");
        Ok(Tracker {
            qmp,
            node: node.to_string(),
            prefix: prefix.to_string(),
            geom,
            seq,
            current: name,
            kept: Vec::new(),
            unremoved: Vec::new(),
            found: found.into_iter().map(|(_, n)| n).collect(),
            sha256,
            stats: DrainStats::default(),
        })
    }

    /// The node tracked.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Size and granularity of the tracked node.
    pub fn geometry(&self) -> Geometry {
        self.geom
    }

    /// The bitmap recording now.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// bitferry bitmaps (this prefix) the node already had at attach, by sequence number: left
    /// by an earlier agent, they may hold bits nobody drained.
    pub fn found(&self) -> &[String] {
        &self.found
    }

    /// Old bitmaps still in QEMU that hold bits (a merge-back failed); the next drain merges
    /// them first.
    pub fn kept(&self) -> &[String] {
        &self.kept
    }

    /// True if QEMU offers the SHA-256 check.
    pub fn checks_sha256(&self) -> bool {
        self.sha256
    }

    /// Counters.
    pub fn stats(&self) -> DrainStats {
        self.stats
    }

    /// Stop tracking: remove the live bitmap. Writes since the last drain are not drained;
    /// drain first.
    pub async fn detach(self) -> Result<(), DrainError> {
        self.qmp
            .execute(
                "block-dirty-bitmap-remove",
                json!({"node": self.node, "name": self.current}),
            )
            .await
            .map_err(|e| DrainError::qmp("detach", e))?;
        Ok(())
    }

    /// Drain: swap, read over `route`, check, hand to `sink`, remove (module docs).
    pub async fn drain<S: Sink>(
        &mut self,
        route: &Route,
        sink: &mut S,
    ) -> Result<DrainReport, DrainFailed> {
        let t0 = Instant::now();
        let r = self.drain_inner(route, sink, t0).await;
        match &r {
            Ok(rep) => {
                self.stats.drains += 1;
                self.stats.blocks += rep.blocks;
            }
            Err(f) => {
                self.stats.failed += 1;
                if f.bits == BitsFate::MergedBack {
                    self.stats.merged_back += 1;
                }
                if matches!(f.error, DrainError::ShaMismatch { .. }) {
                    self.stats.sha256_mismatches += 1;
                }
            }
        }
        r
    }

    async fn drain_inner<S: Sink>(
        &mut self,
        route: &Route,
        sink: &mut S,
        t0: Instant,
    ) -> Result<DrainReport, DrainFailed> {
        let untouched = |error: DrainError| {
            let bits = if error.is_qemu_gone() {
                BitsFate::Lost
            } else {
                BitsFate::Untouched
            };
            DrainFailed {
                error,
                bits,
                merge_back_error: None,
            }
        };
        self.settle_leftovers().await.map_err(untouched)?;
        let old_seq = self.seq;
        let old = self.swap().await.map_err(untouched)?;
        let swap = t0.elapsed();

        let read = async {
            let bitmap = self.read(route, &old, old_seq).await?;
            let sha256_checked = self.check_sha(route, &old, &bitmap).await?;
            Ok::<_, DrainError>(Drained {
                name: old.clone(),
                seq: old_seq,
                bitmap,
                sha256_checked,
            })
        }
        .await;
        let committed = match read {
            Ok(d) => {
                if d.sha256_checked {
                    self.stats.sha256_checked += 1;
                }
                sink.commit(&d).await.map(|()| d).map_err(DrainError::Sink)
            }
            Err(e) => Err(e),
        };
        let drained = match committed {
            Ok(d) => d,
            Err(error) => return Err(self.merge_back(error, old).await),
        };
        let to_durable = t0.elapsed();

        let remove_error = match self.remove(&old).await {
            Ok(()) => None,
            Err(e) if e.is_qemu_gone() => {
                return Err(DrainFailed {
                    error: e,
                    bits: BitsFate::Committed,
                    merge_back_error: None,
                });
            }
            Err(e) => {
                tracing::warn!(bitmap = %old, error = %e, "drained bitmap not removed; retried next drain");
                self.unremoved.push(old.clone());
                Some(e.to_string())
            }
        };
        Ok(DrainReport {
            name: old,
            seq: old_seq,
            next: self.current.clone(),
            blocks: drained.bitmap.count(),
            route: route.name(),
            sha256_checked: drained.sha256_checked,
            swap,
            to_durable,
            total: t0.elapsed(),
            remove_error,
        })
    }

    /// Remove bitmaps whose bits are durable, and merge kept ones into the live bitmap.
    async fn settle_leftovers(&mut self) -> Result<(), DrainError> {
        for name in std::mem::take(&mut self.unremoved) {
            if let Err(e) = self.remove(&name).await {
                if e.is_qemu_gone() {
                    return Err(e);
                }
                tracing::warn!(bitmap = %name, error = %e, "still cannot remove a drained bitmap");
                self.unremoved.push(name);
            }
        }
        for name in std::mem::take(&mut self.kept) {
            if let Err(e) = self.merge_into_current(&name).await {
                if e.is_qemu_gone() {
                    return Err(e);
                }
                tracing::warn!(bitmap = %name, error = %e, "still cannot merge a kept bitmap back");
                self.kept.push(name);
            }
        }
        Ok(())
    }

    /// One transaction: add `PREFIX<seq+1>`, disable the current bitmap. Returns the old name.
    async fn swap(&mut self) -> Result<String, DrainError> {
        let mut next = self.seq;
        for _ in 0..NAME_ATTEMPTS {
            next = next
                .checked_add(1)
                .ok_or_else(|| DrainError::Misuse("sequence numbers exhausted".into()))?;
            let name = names::bitmap_name(&self.prefix, next);
            let actions = [
                Action::new(
                    "block-dirty-bitmap-add",
                    json!({"node": self.node, "name": name,
                           "granularity": self.geom.granularity(), "persistent": false}),
                ),
                Action::new(
                    "block-dirty-bitmap-disable",
                    json!({"node": self.node, "name": self.current}),
                ),
            ];
            match self.qmp.transaction(actions).await {
                Ok(()) => {
                    self.seq = next;
                    return Ok(std::mem::replace(&mut self.current, name));
                }
                Err(e) if e.is_disconnect() => return Err(DrainError::qmp("swap", e)),
                Err(e) => {
                    // Nothing changed (a transaction is all or nothing). Why did it fail?
                    let info = node::query(&self.qmp, &self.node).await?;
                    if info.bitmap(&self.current).is_none() {
                        return Err(DrainError::BitmapGone {
                            node: self.node.clone(),
                            name: self.current.clone(),
                        });
                    }
                    if info.bitmap(&name).is_none() {
                        return Err(DrainError::qmp("swap", e));
                    }
                    tracing::info!(bitmap = %name, "name taken by another client, skipping it");
                }
            }
        }
        Err(DrainError::Misuse(format!(
            "{NAME_ATTEMPTS} bitmap names in a row were taken on {}",
            self.node
        )))
    }

    async fn read(&self, route: &Route, name: &str, seq: u64) -> Result<Bitmap, DrainError> {
        match route {
            Route::Carrier { dir } => {
                carrier::read(
                    &self.qmp,
                    &self.node,
                    self.geom,
                    name,
                    dir,
                    &self.prefix,
                    seq,
                )
                .await
            }
            Route::Nbd { socket } => {
                nbd_route::read(
                    &self.qmp,
                    &self.node,
                    self.geom,
                    name,
                    socket,
                    &self.prefix,
                    seq,
                )
                .await
            }
        }
    }

    /// Compare `bitmap` with QEMU's SHA-256 of `name`; `Ok(false)` if QEMU cannot tell.
    async fn check_sha(
        &self,
        route: &Route,
        name: &str,
        bitmap: &Bitmap,
    ) -> Result<bool, DrainError> {
        if !self.sha256 {
            return Ok(false);
        }
        let qemu = bitmap_sha256(&self.qmp, &self.node, name).await?;
        let ours = sha::qemu_sha256(bitmap);
        if !qemu.eq_ignore_ascii_case(&ours) {
            return Err(DrainError::ShaMismatch {
                name: name.to_string(),
                route: route.name(),
                ours,
                qemu,
            });
        }
        Ok(true)
    }

    async fn remove(&self, name: &str) -> Result<(), DrainError> {
        self.qmp
            .execute(
                "block-dirty-bitmap-remove",
                json!({"node": self.node, "name": name}),
            )
            .await
            .map(|_| ())
            .map_err(|e| DrainError::qmp("block-dirty-bitmap-remove", e))
    }

    /// One transaction: merge `name` into the live bitmap and remove it.
    async fn merge_into_current(&self, name: &str) -> Result<(), DrainError> {
        self.qmp
            .transaction([
                Action::new(
                    "block-dirty-bitmap-merge",
                    json!({"node": self.node, "target": self.current, "bitmaps": [name]}),
                ),
                Action::new(
                    "block-dirty-bitmap-remove",
                    json!({"node": self.node, "name": name}),
                ),
            ])
            .await
            .map_err(|e| DrainError::qmp("merge back", e))
    }

    async fn merge_back(&mut self, error: DrainError, old: String) -> DrainFailed {
        match self.merge_into_current(&old).await {
            Ok(()) => {
                tracing::warn!(bitmap = %old, error = %error, "drain failed, bits merged back");
                DrainFailed {
                    error,
                    bits: BitsFate::MergedBack,
                    merge_back_error: None,
                }
            }
            Err(e) if e.is_qemu_gone() => DrainFailed {
                error,
                bits: BitsFate::Lost,
                merge_back_error: Some(Box::new(e)),
            },
            Err(e) => {
                tracing::warn!(bitmap = %old, error = %error, merge_back = %e,
                    "drain failed and merging back failed; the bitmap stays for the next drain");
                self.kept.push(old.clone());
                DrainFailed {
                    error,
                    bits: BitsFate::KeptInQemu(old),
                    merge_back_error: Some(Box::new(e)),
                }
            }
        }
    }
}

/// QEMU's SHA-256 (lowercase hex) of bitmap `name` on `node`.
pub async fn bitmap_sha256(qmp: &Qmp, node: &str, name: &str) -> Result<String, DrainError> {
    let reply = qmp
        .execute(SHA256_COMMAND, json!({"node": node, "name": name}))
        .await
        .map_err(|e| DrainError::qmp(SHA256_COMMAND, e))?;
    match reply.get("sha256").and_then(Value::as_str) {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(h.to_ascii_lowercase())
        }
        _ => Err(DrainError::QemuMisbehaved {
            during: SHA256_COMMAND,
            detail: format!("no 64-digit hex `sha256` in {reply}"),
        }),
    }
}
