//! Server side of the control socket (protocol in [`crate::control`]).

use super::Shared;
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
pub async fn serve(listener: UnixListener, shared: Shared, stop: Arc<Notify>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(connection(s, shared.clone(), stop.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "control accept failed"),
        }
    }
}

async fn connection(s: UnixStream, shared: Shared, stop: Arc<Notify>) {
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
            Ok(req) => {
                let shutdown = matches!(req, Request::Shutdown);
                let shared = shared.clone();
                // Requests may touch the disk (commits, exports): keep them off the reactor.
                let r = tokio::task::spawn_blocking(move || {
                    shared.lock().expect("state lock").execute(req)
                })
                .await;
                if shutdown {
                    stop.notify_one();
                }
                match r {
                    Ok(Ok(v)) => Response {
                        ok: true,
                        result: Some(v),
                        error: None,
                        exit_code: None,
                    },
                    Ok(Err(e)) => error(&format!("{e:#}"), crate::exit::exit_code(&e)),
                    Err(e) => error(&format!("request panicked: {e}"), 1),
                }
            }
        };
        if reply(&mut w, resp).await.is_err() {
            return;
        }
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
