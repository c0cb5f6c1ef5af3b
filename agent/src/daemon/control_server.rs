//! Server side of the control socket (protocol in [`crate::control`]).
//!
//! What clients may hold is bounded (docs/security.md §Resource limits, docs/operations.md
//! §Limits): at most [`Limits::max_connections`] connections are served at once, and a client
//! past that gets a one-line refusal and is closed; a connection that says nothing for
//! [`Limits::idle_timeout`] is closed; a request must reach its newline within
//! [`Limits::request_timeout`]; a line holds at most [`Limits::max_line`] bytes; and the bytes
//! requests buffer beyond the first [`LINE_ALLOWANCE`] of each come from one budget shared by
//! every connection ([`Limits::max_buffered`]). When `accept` fails (the process is out of
//! descriptors), the loop backs off instead of spinning and logs at most every
//! [`LOG_EVERY`]; the spare descriptor it keeps lets it still tell the waiting client why.

use super::limits::{Backoff, Throttle};
use super::{Net, Shared};
use crate::control::{Request, Response};
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

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

/// Bounds on what control clients may hold (`[control_limits]`, with the connection cap fitted
/// to the descriptor limit).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Whether `max_connections` was lowered from the configured value to fit the descriptor
    /// limit (said in the refusal).
    pub lowered: bool,
    /// Silence allowed between requests.
    pub idle_timeout: Duration,
    /// Time from a request's first byte to its newline, and for the client to take its reply.
    pub request_timeout: Duration,
    /// Longest request line.
    pub max_line: usize,
    /// Bytes all connections together may buffer beyond their first [`LINE_ALLOWANCE`].
    pub max_buffered: usize,
}

/// The first bytes of every request line are its connection's own; only the bytes past them
/// are taken from the shared budget, so small requests are served even while big unfinished
/// ones hold all of it.
pub const LINE_ALLOWANCE: usize = 64 << 10;

/// Most one kind of resource warning is logged (with a count of the ones held back).
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// Why a request or connection was refused (also a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Connections,
    Descriptors,
    BufferedBytes,
    LineTooLong,
    RequestTimeout,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::Connections,
        Refusal::Descriptors,
        Refusal::BufferedBytes,
        Refusal::LineTooLong,
        Refusal::RequestTimeout,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Connections => "connections",
            Refusal::Descriptors => "descriptors",
            Refusal::BufferedBytes => "buffered_bytes",
            Refusal::LineTooLong => "line_too_long",
            Refusal::RequestTimeout => "request_timeout",
        }
    }
}

/// What every connection task shares.
struct Server {
    limits: Limits,
    /// One permit per connection being served.
    slots: Arc<Semaphore>,
    /// One permit per buffered request byte past [`LINE_ALLOWANCE`].
    budget: Arc<Semaphore>,
    /// One throttle per [`Refusal`], in [`Refusal::ALL`] order.
    logs: Mutex<Vec<Throttle>>,
}

impl Server {
    fn new(limits: Limits) -> Server {
        Server {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            budget: Arc::new(Semaphore::new(limits.max_buffered)),
            logs: Mutex::new(Refusal::ALL.map(|_| Throttle::new(LOG_EVERY)).into()),
            limits,
        }
    }

    /// Count a refusal and log it, at most once per [`LOG_EVERY`] for each kind.
    fn refused(&self, why: Refusal, message: &str) {
        metrics::counter!("bitferry_control_refused_total", "reason" => why.label()).increment(1);
        let i = Refusal::ALL.iter().position(|r| *r == why).expect("listed");
        let hit = self.logs.lock().expect("log throttle")[i].hit(Instant::now());
        if let Some(suppressed) = hit {
            tracing::warn!(
                reason = why.label(),
                suppressed,
                connections = self.connections(),
                "control request refused: {message}"
            );
        }
    }

    fn connections(&self) -> usize {
        self.limits.max_connections - self.slots.available_permits()
    }

    fn connections_message(&self) -> String {
        let l = &self.limits;
        format!(
            "too many control connections (limit {}, [control_limits] max_connections{}): this \
             connection is refused; retry later, or close the clients that keep theirs open",
            l.max_connections,
            if l.lowered {
                ", lowered to fit the agent's descriptor limit"
            } else {
                ""
            }
        )
    }

    /// Answer a client that will not be served with one error line and close it, without
    /// waiting: the line fits in an empty socket buffer, and a client that is gone is gone.
    fn refuse_now(&self, s: UnixStream, why: Refusal, message: String) {
        self.refused(why, &message);
        if let Ok(s) = s.into_std() {
            let mut line = serde_json::to_vec(&error(&message, 1)).expect("responses serialize");
            line.push(b'\n');
            let _ = (&s).write(&line);
        }
    }
}

/// Accept connections forever.
pub async fn serve(
    listener: UnixListener,
    shared: Shared,
    net: Arc<Net>,
    stop: Arc<Notify>,
    limits: Limits,
) {
    let server = Arc::new(Server::new(limits));
    // Kept open so that, out of descriptors, one can be freed to answer a waiting client.
    let spare = || std::fs::File::open("/dev/null").ok();
    let mut reserve = spare();
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    let mut accept_log = Throttle::new(LOG_EVERY);
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                backoff.reset();
                if reserve.is_none() {
                    reserve = spare();
                }
                match server.slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let conn = connection(
                            s,
                            shared.clone(),
                            net.clone(),
                            stop.clone(),
                            server.clone(),
                            slot,
                        );
                        tokio::spawn(conn);
                    }
                    Err(_) => {
                        let m = server.connections_message();
                        server.refuse_now(s, Refusal::Connections, m);
                    }
                }
            }
            Err(e) => {
                let out_of_descriptors = rustix::io::Errno::from_io_error(&e).is_some_and(|n| {
                    n == rustix::io::Errno::MFILE || n == rustix::io::Errno::NFILE
                });
                if let Some(suppressed) = accept_log.hit(Instant::now()) {
                    if out_of_descriptors {
                        tracing::warn!(
                            error = %e,
                            suppressed,
                            connections = server.connections(),
                            "control socket cannot accept: the agent is out of file descriptors; \
                             refusing control clients and backing off until some are free"
                        );
                    } else {
                        tracing::warn!(error = %e, suppressed, "control accept failed; backing off");
                    }
                }
                if out_of_descriptors && let Some(f) = reserve.take() {
                    drop(f);
                    // The descriptor just freed takes the waiting client, which is told why.
                    let next = tokio::time::timeout(Duration::from_millis(100), listener.accept());
                    let answered = if let Ok(Ok((s, _))) = next.await {
                        let m = format!(
                            "the agent is out of file descriptors ({e}): this control connection \
                             is refused; see the agent's log"
                        );
                        server.refuse_now(s, Refusal::Descriptors, m);
                        true
                    } else {
                        false
                    };
                    reserve = spare();
                    if answered {
                        // That pass took one waiting client off the queue: not a busy loop.
                        continue;
                    }
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// A request line whose bytes past [`LINE_ALLOWANCE`] are paid for from the shared budget;
/// the budget comes back when it is dropped.
struct Line {
    bytes: Vec<u8>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Line {
    /// Make room for `extra` more bytes, within `max_line`, taking budget for the capacity past
    /// the allowance; `Err` with the refusal when the budget is spent.
    fn reserve(&mut self, extra: usize, server: &Server) -> Result<(), String> {
        let need = self.bytes.len() + extra;
        if need <= self.bytes.capacity() {
            return Ok(());
        }
        let limits = &server.limits;
        // Double (amortized copies) when the budget allows, else grow to exactly what is needed.
        let doubled = need
            .max(self.bytes.capacity() * 2)
            .clamp(4096, limits.max_line.max(need));
        for cap in [doubled, need] {
            if self.charge(cap, server) {
                self.bytes.reserve_exact(cap - self.bytes.len());
                return Ok(());
            }
        }
        let used = limits.max_buffered - server.budget.available_permits();
        Err(format!(
            "the agent's buffer for control requests is full: unfinished requests hold {used} \
             of {} bytes ([control_limits] max_buffered_bytes); this request (more than {} \
             bytes) is refused, retry later",
            limits.max_buffered,
            self.bytes.len()
        ))
    }

    /// Hold budget for a capacity of `cap` bytes; false if the budget cannot cover it.
    fn charge(&mut self, cap: usize, server: &Server) -> bool {
        let charged = self.permit.as_ref().map_or(0, |p| p.num_permits());
        let charge = cap.saturating_sub(LINE_ALLOWANCE);
        if charge <= charged {
            return true;
        }
        let more = u32::try_from(charge - charged).expect("lines are at most 1 GiB");
        match server.budget.clone().try_acquire_many_owned(more) {
            Ok(p) => {
                match &mut self.permit {
                    Some(held) => held.merge(p),
                    None => self.permit = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }
}

/// The next request line: `Ok(None)` when the client is gone or was idle too long, `Err` with
/// the refusal to send before closing.
async fn read_request(
    reader: &mut BufReader<OwnedReadHalf>,
    server: &Server,
) -> Result<Option<Line>, (Refusal, String)> {
    let limits = &server.limits;
    match tokio::time::timeout(limits.idle_timeout, reader.fill_buf()).await {
        Err(_) => {
            tracing::debug!("closing an idle control connection");
            return Ok(None);
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "control read failed");
            return Ok(None);
        }
        Ok(Ok([])) => return Ok(None),
        Ok(Ok(_)) => {}
    }
    let deadline = tokio::time::Instant::now() + limits.request_timeout;
    let mut line = Line {
        bytes: Vec::new(),
        permit: None,
    };
    loop {
        let buf = match tokio::time::timeout_at(deadline, reader.fill_buf()).await {
            Err(_) => {
                let m = format!(
                    "request not complete after {} ms ({} bytes without a newline; \
                     [control_limits] request_timeout_ms): closing the connection",
                    limits.request_timeout.as_millis(),
                    line.bytes.len()
                );
                return Err((Refusal::RequestTimeout, m));
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "control read failed");
                return Ok(None);
            }
            // The client stopped sending: what it sent is its request, as before.
            Ok(Ok([])) => return Ok(Some(line)),
            Ok(Ok(b)) => b,
        };
        let (take, done) = match buf.iter().position(|&c| c == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.bytes.len() + take > limits.max_line {
            let m = format!(
                "request line too long (limit {} bytes, [control_limits] max_line_bytes)",
                limits.max_line
            );
            return Err((Refusal::LineTooLong, m));
        }
        if let Err(m) = line.reserve(take, server) {
            return Err((Refusal::BufferedBytes, m));
        }
        line.bytes.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            return Ok(Some(line));
        }
    }
}

async fn connection(
    s: UnixStream,
    shared: Shared,
    net: Arc<Net>,
    stop: Arc<Notify>,
    server: Arc<Server>,
    _slot: OwnedSemaphorePermit,
) {
    metrics::gauge!("bitferry_control_connections").increment(1.0);
    serve_connection(s, &shared, &net, &stop, &server).await;
    metrics::gauge!("bitferry_control_connections").decrement(1.0);
}

async fn serve_connection(
    s: UnixStream,
    shared: &Shared,
    net: &Net,
    stop: &Notify,
    server: &Server,
) {
    let (r, mut w) = s.into_split();
    let mut reader = BufReader::new(r);
    let reply_within = server.limits.request_timeout;
    loop {
        let line = match read_request(&mut reader, server).await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err((why, m)) => {
                let code = if why == Refusal::LineTooLong { 2 } else { 1 };
                server.refused(why, &m);
                let _ = tokio::time::timeout(reply_within, reply(&mut w, error(&m, code))).await;
                return;
            }
        };
        let resp = match serde_json::from_slice::<Request>(&line.bytes) {
            Err(e) => error(&format!("malformed request: {e}"), 2),
            Ok(Request::MigrateStart {
                disk,
                to,
                server_name,
                rate,
            }) => to_response(start_migration(shared, net, disk, &to, server_name, rate).await),
            Ok(Request::Mark { disk, ranges }) => to_response(mark(shared, disk, ranges).await),
            Ok(Request::Verify { disk }) => to_response(verify(shared, disk).await),
            Ok(Request::Export {
                disk,
                raw,
                allow_untrusted,
                force,
            }) => to_response(export(shared, disk, raw, allow_untrusted, force).await),
            Ok(req) => {
                let shutdown = matches!(req, Request::Shutdown);
                let r = locked(shared, move |st| st.execute(req)).await;
                if shutdown {
                    stop.notify_one();
                }
                to_response(r)
            }
        };
        // The request's budget is held until its reply is written; a client that does not
        // take its reply in time loses the connection.
        match tokio::time::timeout(reply_within, reply(&mut w, resp)).await {
            Ok(Ok(())) => drop(line),
            _ => return,
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

/// `bitmap verify`: the disk's pending marks are committed and its live root taken under the
/// state lock; the stored file is read and hashed without it, so verifying a large bitmap never
/// holds up another disk's marks (finding F5). A commit of the same disk that lands meanwhile
/// makes the comparison stale: it is taken again.
async fn verify(shared: &Shared, disk: wire::DiskId) -> anyhow::Result<serde_json::Value> {
    for _ in 0..5 {
        let d = disk.clone();
        let probe = locked(shared, move |st| st.verify_begin(&d)).await?;
        let done = tokio::task::spawn_blocking(move || probe.finish())
            .await
            .map_err(|e| anyhow::anyhow!("request panicked: {e}"))?;
        match done {
            super::state::VerifyEnd::Done(r) => return r,
            super::state::VerifyEnd::Missing => {
                let d = disk.clone();
                return locked(shared, move |st| st.verify_missing(&d)).await;
            }
            super::state::VerifyEnd::Raced => continue,
        }
    }
    anyhow::bail!("{disk} is committed too often to verify now; try again")
}

/// `bitmap export`: the bits are copied under the state lock (the touched chunks only); the file
/// is written without it.
async fn export(
    shared: &Shared,
    disk: wire::DiskId,
    raw: std::path::PathBuf,
    allow_untrusted: bool,
    force: bool,
) -> anyhow::Result<serde_json::Value> {
    let d = disk.clone();
    let (state, mut bits) = locked(shared, move |st| st.export_snapshot(&d)).await?;
    tokio::task::spawn_blocking(move || {
        crate::local::export_raw(&disk, state, &mut bits, &raw, allow_untrusted, force)
    })
    .await
    .map_err(|e| anyhow::anyhow!("request panicked: {e}"))?
}

/// Run `f` on the agent state under its lock, off the reactor: requests may touch the disk
/// (commits, exports). A panic in `f` is reported as the request's error.
async fn locked<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&mut super::state::AgentState) -> Result<T> + Send + 'static,
) -> Result<T> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let mut st = shared.lock().expect("state lock");
        // After the last commit nothing may be acknowledged: a mark applied now would be in
        // memory only, and the agent is about to exit.
        if st.is_closed() {
            anyhow::bail!(
                "the agent is stopping: this request was NOT executed (a mark was not \
                 recorded); send it again to the agent once it runs"
            );
        }
        f(&mut st)
    })
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
