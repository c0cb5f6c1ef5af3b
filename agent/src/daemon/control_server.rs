//! Server side of the control socket (protocol in [`crate::control`]).

use super::{Net, Shared};
use crate::control::{MAX_LINE, Request, Response};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

/// Bind the control socket, replacing a stale socket file but refusing a live one.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another agent is already listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // Only the owner may drive the agent.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Accept connections forever.
pub async fn serve(listener: UnixListener, shared: Shared, net: Arc<Net>, stop: Arc<Notify>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(connection(s, shared.clone(), net.clone(), stop.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "control accept failed"),
        }
    }
}

async fn connection(s: UnixStream, shared: Shared, net: Arc<Net>, stop: Arc<Notify>) {
    let (r, mut w) = s.into_split();
    let mut reader = BufReader::new(r);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) => return,
            Ok(_) if line.len() > MAX_LINE => {
                let _ = reply(&mut w, error("request line too long", 2)).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "control read failed");
                return;
            }
        }
        let resp = match serde_json::from_slice::<Request>(&line) {
            Err(e) => error(&format!("malformed request: {e}"), 2),
            Ok(Request::MigrateStart {
                disk,
                to,
                server_name,
                rate,
            }) => to_response(start_migration(&shared, &net, disk, &to, server_name, rate).await),
            Ok(Request::Mark { disk, ranges }) => to_response(mark(&shared, disk, ranges).await),
            Ok(req) => {
                let shutdown = matches!(req, Request::Shutdown);
                let r = locked(&shared, move |st| st.execute(req)).await;
                if shutdown {
                    stop.notify_one();
                }
                to_response(r)
            }
        };
        if reply(&mut w, resp).await.is_err() {
            return;
        }
    }
}

/// A mark, acknowledged once durable when it has to be (a rebuild is running): applied under
/// the state lock, then made durable under a second acquisition, so marks from concurrent
/// clients that land while one commit is written share the next one (group commit) instead of
/// each rewriting the whole bitmap.
async fn mark(
    shared: &Shared,
    disk: wire::DiskId,
    ranges: Vec<(u64, u64)>,
) -> anyhow::Result<serde_json::Value> {
    let d = disk.clone();
    let (report, durable_pending) = locked(shared, move |st| st.mark(&d, &ranges)).await?;
    if durable_pending {
        locked(shared, move |st| st.make_durable(&disk)).await?;
    }
    Ok(report)
}

/// Run `f` on the agent state under its lock, off the reactor: requests may touch the disk
/// (commits, exports). A panic in `f` is reported as the request's error.
async fn locked<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&mut super::state::AgentState) -> Result<T> + Send + 'static,
) -> Result<T> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || f(&mut shared.lock().expect("state lock")))
        .await
        .map_err(|e| anyhow::anyhow!("request panicked: {e}"))?
}

async fn start_migration(
    shared: &Shared,
    net: &Net,
    disk: wire::DiskId,
    to: &str,
    server_name: Option<String>,
    rate: Option<u64>,
) -> anyhow::Result<serde_json::Value> {
    let addr = tokio::net::lookup_host(to)
        .await
        .with_context(|| format!("resolving {to}"))?
        .next()
        .with_context(|| format!("{to} resolves to no address"))?;
    let host = to
        .rsplit_once(':')
        .map_or(to, |(h, _)| h)
        .trim_matches(|c| c == '[' || c == ']');
    let server_name = server_name.unwrap_or_else(|| host.to_string());
    crate::migrate::source::start(
        shared,
        &net.endpoint,
        &net.name,
        disk,
        addr,
        server_name,
        rate,
    )
}

fn to_response(r: anyhow::Result<serde_json::Value>) -> Response {
    match r {
        Ok(v) => Response {
            ok: true,
            result: Some(v),
            error: None,
            exit_code: None,
        },
        Err(e) => error(&format!("{e:#}"), crate::exit::exit_code(&e)),
    }
}

fn error(msg: &str, code: u8) -> Response {
    Response {
        ok: false,
        result: None,
        error: Some(msg.to_string()),
        exit_code: Some(code),
    }
}

async fn reply(w: &mut tokio::net::unix::OwnedWriteHalf, r: Response) -> std::io::Result<()> {
    let mut v = serde_json::to_vec(&r).expect("responses serialize");
    v.push(b'\n');
    w.write_all(&v).await
}
