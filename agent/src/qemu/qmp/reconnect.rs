//! A QMP client that outlives QEMU: it reconnects with exponential backoff and renegotiates.
//!
//! Subscribers see one stream across connections: [`Notification::Connected`] (generation
//! 1, 2, …) before a connection's events, [`Notification::Disconnected`] when it ends.
//! Commands are never retried: [`ReconnectingQmp::execute`] fails fast with
//! [`QmpError::NotConnected`] while there is no connection, because QMP commands are not
//! idempotent and a reconnection may reach a *new* QEMU process that lacks every
//! non-persistent bitmap the old one had. Callers decide what a new generation means.

use super::client::{Notification, Qmp, QmpOptions};
use super::error::QmpError;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

/// Exponential backoff between connection attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First delay after a failed attempt or a lost connection.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

/// A reconnecting QMP client (see the module docs).
#[derive(Clone)]
pub struct ReconnectingQmp {
    inner: Arc<RInner>,
}

struct RInner {
    path: PathBuf,
    notices: broadcast::Sender<Notification>,
    current: watch::Receiver<Option<(u64, Qmp)>>,
    task: AbortHandle,
}

impl Drop for RInner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ReconnectingQmp {
    /// Start connecting to `path` in the background (must be called inside a tokio runtime).
    /// Returns at once; use [`ReconnectingQmp::connected`] to wait for the first connection.
    pub fn new(path: impl AsRef<Path>, opts: QmpOptions, backoff: Backoff) -> ReconnectingQmp {
        let path = path.as_ref().to_path_buf();
        let (notices, _) = broadcast::channel(opts.event_capacity.max(1));
        let (tx, current) = watch::channel(None);
        let task = tokio::spawn(supervise(path.clone(), opts, backoff, notices.clone(), tx));
        ReconnectingQmp {
            inner: Arc::new(RInner {
                path,
                notices,
                current,
                task: task.abort_handle(),
            }),
        }
    }

    /// Receive events of every connection, and `Connected`/`Disconnected` between them.
    pub fn subscribe(&self) -> broadcast::Receiver<Notification> {
        self.inner.notices.subscribe()
    }

    /// The current connection, if there is one.
    pub fn current(&self) -> Option<Qmp> {
        self.inner
            .current
            .borrow()
            .as_ref()
            .filter(|(_, q)| q.is_connected())
            .map(|(_, q)| q.clone())
    }

    /// The generation of the current connection (1 for the first); 0 before any.
    pub fn generation(&self) -> u64 {
        self.inner.current.borrow().as_ref().map_or(0, |(g, _)| *g)
    }

    /// Wait for a connection and return it with its generation.
    pub async fn connected(&self) -> (u64, Qmp) {
        let mut rx = self.inner.current.clone();
        loop {
            let live = rx
                .borrow_and_update()
                .as_ref()
                .filter(|(_, q)| q.is_connected())
                .map(|(g, q)| (*g, q.clone()));
            if let Some(c) = live {
                return c;
            }
            if rx.changed().await.is_err() {
                // The supervisor never stops while a handle exists.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Run a command on the current connection; [`QmpError::NotConnected`] if there is none.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        match self.current() {
            Some(q) => q.execute(command, arguments).await,
            None => Err(QmpError::NotConnected {
                path: self.inner.path.clone(),
            }),
        }
    }
}

async fn supervise(
    path: PathBuf,
    opts: QmpOptions,
    backoff: Backoff,
    notices: broadcast::Sender<Notification>,
    current: watch::Sender<Option<(u64, Qmp)>>,
) {
    let mut generation = 0u64;
    loop {
        let mut delay = backoff.initial;
        let q = loop {
            // Publish the connection before announcing it, so a subscriber that sees
            // `Connected` finds it in `current()`.
            let ready = |q: &Qmp| {
                current.send_replace(Some((generation + 1, q.clone())));
                Some(Notification::Connected {
                    generation: generation + 1,
                })
            };
            match Qmp::connect_inner(&path, opts.clone(), notices.clone(), ready).await {
                Ok(q) => break q,
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, ?delay, "QMP connect failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(backoff.max);
                }
            }
        };
        generation += 1;
        tracing::info!(path = %path.display(), generation, "QMP connected");
        let reason = q.closed().await;
        tracing::warn!(path = %path.display(), generation, %reason, "QMP connection lost");
        current.send_replace(None);
        drop(q);
        tokio::time::sleep(backoff.initial).await;
    }
}
