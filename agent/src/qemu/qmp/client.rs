//! One asynchronous QMP connection.
//!
//! [`Qmp::connect`] reads the greeting, negotiates `qmp_capabilities` and lists the commands
//! this QEMU has (`query-commands`), all within one handshake deadline. Then a reader task
//! owns the socket's read half: it matches replies to waiting commands by `id` and fans
//! events out to every [`Qmp::subscribe`]r; a writer task owns the write half, so a caller
//! that gives up on a command (timeout, dropped future) never leaves half a line on the wire.
//! Commands may be issued concurrently from clones of one [`Qmp`]; QEMU runs them in order.
//!
//! When the connection ends (QEMU exits, closes the socket, or sends something that is not
//! QMP) every command in flight fails with [`QmpError::Disconnected`] and subscribers receive
//! [`Notification::Disconnected`] — a caller must treat that as "QEMU may be gone, and with it
//! every non-persistent bitmap".

use super::error::{DisconnectReason, ErrorClass, ProtocolError, QmpError};
use super::line::{self, Event, Greeting, LineError, MAX_LINE, Message};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf,
    WriteHalf,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Tunables of a connection.
#[derive(Debug, Clone)]
pub struct QmpOptions {
    /// Deadline for the whole handshake: greeting, `qmp_capabilities`, `query-commands`.
    pub handshake_timeout: Duration,
    /// How long [`Qmp::execute`] waits for a reply.
    pub command_timeout: Duration,
    /// Longest line accepted from QEMU ([`MAX_LINE`] by default).
    pub max_line: usize,
    /// Notifications buffered per subscriber; a subscriber that falls further behind gets
    /// `RecvError::Lagged` (it lost events and must re-query state).
    pub event_capacity: usize,
}

impl Default for QmpOptions {
    fn default() -> Self {
        QmpOptions {
            handshake_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(60),
            max_line: MAX_LINE,
            event_capacity: 1024,
        }
    }
}

/// What subscribers receive.
#[derive(Debug, Clone)]
pub enum Notification {
    /// An event from QEMU (any name; unknown ones included).
    Event(Event),
    /// The connection ended; nothing more comes from it. Writes to tracked disks since the
    /// last drain may be lost if QEMU died.
    Disconnected(DisconnectReason),
    /// A [`super::ReconnectingQmp`] (re)connected. Generation 1 is the first connection;
    /// a higher one means QEMU went away and a connection to a (possibly new) QEMU was made.
    /// Sent before any event of that connection.
    Connected {
        /// Counts successful connections, from 1.
        generation: u64,
    },
}

impl Notification {
    /// The event, if this is one.
    pub fn event(&self) -> Option<&Event> {
        match self {
            Notification::Event(e) => Some(e),
            _ => None,
        }
    }
}

/// One action of a QMP `transaction`.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// The action type, e.g. `block-dirty-bitmap-add`.
    pub kind: String,
    /// Its arguments (an object).
    pub data: Value,
}

impl Action {
    /// An action of `kind` with `data`.
    pub fn new(kind: &str, data: Value) -> Action {
        Action {
            kind: kind.to_string(),
            data,
        }
    }
}

/// A connected QMP session in command mode. Cheap to clone; clones share the connection,
/// which closes when the last clone is dropped (or on [`Qmp::close`]).
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("label", &self.inner.label)
            .field("version", &self.inner.greeting.version)
            .field("connected", &self.is_connected())
            .finish()
    }
}

struct Inner {
    label: String,
    greeting: Greeting,
    commands: HashSet<String>,
    opts: QmpOptions,
    shared: Arc<Shared>,
    out: mpsc::Sender<Vec<u8>>,
    next_id: AtomicU64,
    tasks: [AbortHandle; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.close(DisconnectReason::Closed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// State shared by the handle and the two tasks.
struct Shared {
    state: Mutex<State>,
    closed: watch::Sender<Option<DisconnectReason>>,
    notices: broadcast::Sender<Notification>,
}

#[derive(Default)]
struct State {
    pending: BTreeMap<u64, Pending>,
    closed: Option<DisconnectReason>,
}

struct Pending {
    command: String,
    tx: oneshot::Sender<Result<Value, QmpError>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// End the connection once: fail every command in flight, tell subscribers, wake waiters.
    fn close(&self, reason: DisconnectReason) {
        let pending = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(reason.clone());
            std::mem::take(&mut st.pending)
        };
        for p in pending.into_values() {
            let _ = p.tx.send(Err(QmpError::Disconnected(reason.clone())));
        }
        let _ = self
            .notices
            .send(Notification::Disconnected(reason.clone()));
        self.closed.send_replace(Some(reason));
    }

    /// Hand a reply to the command it answers. A reply without an id goes to the oldest
    /// command in flight (QEMU answers in order and omits the id only for input it could not
    /// parse); a reply to an unknown id (a command that timed out) is dropped.
    fn deliver(&self, id: Option<Value>, reply: Result<Value, (String, String)>) {
        let p = {
            let mut st = self.lock();
            match &id {
                Some(v) => v.as_u64().and_then(|n| st.pending.remove(&n)),
                None => st.pending.pop_first().map(|(_, p)| p),
            }
        };
        let Some(p) = p else {
            tracing::debug!(
                ?id,
                "QMP reply for no command in flight (timed out?), dropped"
            );
            return;
        };
        let r = reply.map_err(|(class, desc)| QmpError::Command {
            command: p.command,
            class: ErrorClass::from_qmp(&class),
            desc,
        });
        let _ = p.tx.send(r);
    }
}

/// Removes a command's pending entry when its caller stops waiting.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// Why a bounded line read stopped.
enum ReadLineError {
    Io(std::io::Error),
    TooLong,
    Truncated,
}

/// Read one `\n`-terminated line into `line` (without the `\n`), never holding more than
/// `max` bytes. `Ok(false)` on a clean end of stream before any byte.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> Result<bool, ReadLineError> {
    line.clear();
    loop {
        let buf = r.fill_buf().await.map_err(ReadLineError::Io)?;
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(false)
            } else {
                Err(ReadLineError::Truncated)
            };
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Err(ReadLineError::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(true);
        }
    }
}

fn reason_of(e: ReadLineError, max: usize) -> DisconnectReason {
    match e {
        ReadLineError::Io(e) => DisconnectReason::Io(Arc::new(e)),
        ReadLineError::TooLong => {
            DisconnectReason::Protocol(ProtocolError::Line(LineError::TooLong { max }))
        }
        ReadLineError::Truncated => DisconnectReason::Protocol(ProtocolError::TruncatedLine),
    }
}

fn encode_command(command: &str, arguments: Value, id: u64) -> Result<Vec<u8>, QmpError> {
    if command.is_empty() {
        return Err(QmpError::InvalidRequest("empty command name".into()));
    }
    let mut msg = Map::new();
    msg.insert("execute".into(), Value::String(command.to_string()));
    match arguments {
        Value::Null => {}
        Value::Object(a) if a.is_empty() => {}
        Value::Object(a) => {
            msg.insert("arguments".into(), Value::Object(a));
        }
        other => {
            return Err(QmpError::InvalidRequest(format!(
                "arguments of {command} must be an object, not {other}"
            )));
        }
    }
    msg.insert("id".into(), json!(id));
    let mut bytes = serde_json::to_vec(&Value::Object(msg))
        .map_err(|e| QmpError::InvalidRequest(format!("arguments do not serialize: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The handshake's view of the socket: sequential reads with one deadline.
struct Handshake<'a, R, W> {
    r: &'a mut BufReader<R>,
    w: &'a mut W,
    line: Vec<u8>,
    max_line: usize,
    deadline: Instant,
    after: Duration,
    events: Vec<Event>,
    event_capacity: usize,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Handshake<'_, R, W> {
    async fn message(&mut self, what: &str) -> Result<Message, QmpError> {
        loop {
            let read = tokio::time::timeout_at(
                self.deadline,
                read_line(self.r, &mut self.line, self.max_line),
            )
            .await
            .map_err(|_| QmpError::Timeout {
                what: what.to_string(),
                after: self.after,
            })?;
            match read {
                Ok(true) => {}
                Ok(false) => return Err(QmpError::Disconnected(DisconnectReason::Eof)),
                Err(e) => {
                    return Err(match reason_of(e, self.max_line) {
                        DisconnectReason::Protocol(p) => QmpError::Protocol(p),
                        r => QmpError::Disconnected(r),
                    });
                }
            }
            let l = self.line.trim_ascii();
            if l.is_empty() {
                continue;
            }
            return line::parse(l).map_err(|e| QmpError::Protocol(e.into()));
        }
    }

    async fn call(&mut self, command: &str, id: u64) -> Result<Value, QmpError> {
        let bytes = encode_command(command, Value::Null, id)?;
        let what = format!("command {command}");
        tokio::time::timeout_at(self.deadline, async {
            self.w.write_all(&bytes).await?;
            self.w.flush().await
        })
        .await
        .map_err(|_| QmpError::Timeout {
            what: what.clone(),
            after: self.after,
        })?
        .map_err(|e| QmpError::Disconnected(DisconnectReason::Io(Arc::new(e))))?;
        loop {
            match self.message(&what).await? {
                Message::Return { id: Some(i), value } if i == json!(id) => return Ok(value),
                Message::Error {
                    id: Some(i),
                    class,
                    desc,
                } if i == json!(id) => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class: ErrorClass::from_qmp(&class),
                        desc,
                    });
                }
                Message::Event(e) => {
                    if self.events.len() < self.event_capacity {
                        self.events.push(e);
                    }
                }
                other => tracing::debug!(?other, "QMP message during handshake ignored"),
            }
        }
    }
}

impl Qmp {
    /// Connect to the QMP socket at `path` with default [`QmpOptions`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Qmp, QmpError> {
        Qmp::connect_with(path, QmpOptions::default()).await
    }

    /// Connect to the QMP socket at `path`.
    pub async fn connect_with(path: impl AsRef<Path>, opts: QmpOptions) -> Result<Qmp, QmpError> {
        let (notices, _) = broadcast::channel(opts.event_capacity.max(1));
        Qmp::connect_inner(path.as_ref(), opts, notices, |_| None).await
    }

    /// Connect, sharing `notices` with earlier connections (the reconnecting wrapper).
    /// `ready` runs once the connection is up, before its reader starts; the notification it
    /// returns goes out before any event of this connection.
    pub(super) async fn connect_inner(
        path: &Path,
        opts: QmpOptions,
        notices: broadcast::Sender<Notification>,
        ready: impl FnOnce(&Qmp) -> Option<Notification> + Send,
    ) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(
            opts.handshake_timeout,
            tokio::net::UnixStream::connect(path),
        )
        .await
        .map_err(|_| QmpError::Timeout {
            what: format!("connect to {}", path.display()),
            after: opts.handshake_timeout,
        })?
        .map_err(|e| QmpError::Connect {
            path: path.to_path_buf(),
            source: Arc::new(e),
        })?;
        Qmp::handshake(stream, path.display().to_string(), opts, notices, ready).await
    }

    /// Run the handshake over an already connected byte stream (a unix or TCP socket, or a
    /// test's in-memory pipe). `label` names the peer in logs.
    pub async fn from_stream<S>(stream: S, label: &str, opts: QmpOptions) -> Result<Qmp, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (notices, _) = broadcast::channel(opts.event_capacity.max(1));
        Qmp::handshake(stream, label.to_string(), opts, notices, |_| None).await
    }

    async fn handshake<S>(
        stream: S,
        label: String,
        opts: QmpOptions,
        notices: broadcast::Sender<Notification>,
        ready: impl FnOnce(&Qmp) -> Option<Notification> + Send,
    ) -> Result<Qmp, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, mut w) = tokio::io::split(stream);
        let mut r = BufReader::with_capacity(64 << 10, r);
        let mut hs = Handshake {
            r: &mut r,
            w: &mut w,
            line: Vec::new(),
            max_line: opts.max_line,
            deadline: Instant::now() + opts.handshake_timeout,
            after: opts.handshake_timeout,
            events: Vec::new(),
            event_capacity: opts.event_capacity,
        };
        let greeting = match hs.message("greeting").await? {
            Message::Greeting(g) => g,
            other => {
                return Err(QmpError::Protocol(ProtocolError::NoGreeting(format!(
                    "{other:?}"
                ))));
            }
        };
        hs.call("qmp_capabilities", 0).await?;
        let list = hs.call("query-commands", 1).await?;
        let commands = parse_commands(&list)?;
        let events = std::mem::take(&mut hs.events);
        drop(hs);

        let (closed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            closed,
            notices,
        });
        let (out, out_rx) = mpsc::channel(64);
        // The reader waits for `go`, so whatever `ready` announces precedes every event.
        let (go, go_rx) = oneshot::channel::<()>();
        let reader = tokio::spawn({
            let shared = shared.clone();
            let max_line = opts.max_line;
            async move {
                if go_rx.await.is_ok() {
                    read_loop(r, shared, max_line).await;
                }
            }
        });
        let writer = tokio::spawn(write_loop(w, out_rx, shared.clone()));
        tracing::debug!(
            peer = %label,
            version = ?greeting.version,
            commands = commands.len(),
            "QMP connected"
        );
        let q = Qmp {
            inner: Arc::new(Inner {
                label,
                greeting,
                commands,
                opts,
                shared,
                out,
                next_id: AtomicU64::new(2),
                tasks: [reader.abort_handle(), writer.abort_handle()],
            }),
        };
        if let Some(n) = ready(&q) {
            let _ = q.inner.shared.notices.send(n);
        }
        for e in events {
            let _ = q.inner.shared.notices.send(Notification::Event(e));
        }
        let _ = go.send(());
        Ok(q)
    }

    /// Run `command` with `arguments` (an object, or `Value::Null`/`{}` for none) and return
    /// its `return` value. Waits at most [`QmpOptions::command_timeout`].
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, self.inner.opts.command_timeout)
            .await
    }

    /// [`Qmp::execute`] with its own timeout (e.g. for a slow `blockdev-add` on NFS).
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_command(command, arguments, id)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.shared.lock();
            if let Some(r) = &st.closed {
                return Err(QmpError::Disconnected(r.clone()));
            }
            st.pending.insert(
                id,
                Pending {
                    command: command.to_string(),
                    tx,
                },
            );
        }
        let _guard = PendingGuard {
            shared: &inner.shared,
            id,
        };
        let timed_out = || QmpError::Timeout {
            what: format!("command {command}"),
            after: timeout,
        };
        let deadline = Instant::now() + timeout;
        tokio::time::timeout_at(deadline, inner.out.send(bytes))
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| QmpError::Disconnected(self.reason()))?;
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(timed_out()),
            Ok(Err(_)) => Err(QmpError::Disconnected(self.reason())),
            Ok(Ok(r)) => r,
        }
    }

    /// Run a QMP `transaction`: every action or none. Actions are `(type, data)` pairs.
    pub async fn transaction(
        &self,
        actions: impl IntoIterator<Item = Action>,
    ) -> Result<(), QmpError> {
        let actions: Vec<Value> = actions
            .into_iter()
            .map(|a| json!({"type": a.kind, "data": a.data}))
            .collect();
        self.execute("transaction", json!({ "actions": actions }))
            .await
            .map(|_| ())
    }

    /// Receive every later event and the disconnection notice.
    pub fn subscribe(&self) -> broadcast::Receiver<Notification> {
        self.inner.shared.notices.subscribe()
    }

    /// True if this QEMU has `command` (from `query-commands` at connect), e.g.
    /// `x-debug-block-dirty-bitmap-sha256` or `block-export-add`.
    pub fn has_command(&self, command: &str) -> bool {
        self.inner.commands.contains(command)
    }

    /// Every command this QEMU has.
    pub fn commands(&self) -> impl Iterator<Item = &str> {
        self.inner.commands.iter().map(String::as_str)
    }

    /// The greeting (QEMU's version and offered capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// False once the connection has ended.
    pub fn is_connected(&self) -> bool {
        self.inner.shared.lock().closed.is_none()
    }

    /// Wait until the connection ends and say why.
    pub async fn closed(&self) -> DisconnectReason {
        let mut rx = self.inner.shared.closed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or(DisconnectReason::Closed),
            Err(_) => DisconnectReason::Closed,
        }
    }

    /// Close the connection now (every clone sees it closed).
    pub fn close(&self) {
        self.inner.shared.close(DisconnectReason::Closed);
        for t in &self.inner.tasks {
            t.abort();
        }
    }

    fn reason(&self) -> DisconnectReason {
        self.inner
            .shared
            .lock()
            .closed
            .clone()
            .unwrap_or(DisconnectReason::Closed)
    }
}

fn parse_commands(list: &Value) -> Result<HashSet<String>, QmpError> {
    let bad = |detail: &str| {
        QmpError::Protocol(ProtocolError::BadReply {
            command: "query-commands".into(),
            detail: detail.to_string(),
        })
    };
    let Value::Array(items) = list else {
        return Err(bad("not an array"));
    };
    items
        .iter()
        .map(|c| {
            c.get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad("an entry without a name"))
        })
        .collect()
}

async fn read_loop<R: AsyncRead>(
    mut r: BufReader<ReadHalf<R>>,
    shared: Arc<Shared>,
    max_line: usize,
) {
    let mut closed = shared.closed.subscribe();
    let mut line = Vec::new();
    let reason = loop {
        let read = tokio::select! {
            read = read_line(&mut r, &mut line, max_line) => read,
            _ = closed.wait_for(Option::is_some) => return,
        };
        match read {
            Ok(true) => {}
            Ok(false) => break DisconnectReason::Eof,
            Err(e) => break reason_of(e, max_line),
        }
        let l = line.trim_ascii();
        if l.is_empty() {
            continue;
        }
        match line::parse(l) {
            Ok(Message::Event(e)) => {
                tracing::trace!(event = %e.name, "QMP event");
                let _ = shared.notices.send(Notification::Event(e));
            }
            Ok(Message::Return { id, value }) => shared.deliver(id, Ok(value)),
            Ok(Message::Error { id, class, desc }) => shared.deliver(id, Err((class, desc))),
            Ok(Message::Greeting(_)) => tracing::warn!("second QMP greeting ignored"),
            Ok(Message::Unknown(v)) => {
                tracing::debug!(message = %line::quote(l), "unknown QMP message ignored");
                drop(v);
            }
            Err(e) => break DisconnectReason::Protocol(e.into()),
        }
    };
    if let DisconnectReason::Protocol(p) = &reason {
        tracing::warn!(error = %p, "QEMU sent something that is not QMP; dropping the connection");
    }
    shared.close(reason);
}

async fn write_loop<W: AsyncWrite>(
    mut w: WriteHalf<W>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(bytes) = rx.recv().await {
        let r = async {
            w.write_all(&bytes).await?;
            w.flush().await
        }
        .await;
        if let Err(e) = r {
            shared.close(DisconnectReason::Io(Arc::new(e)));
            return;
        }
    }
    let _ = w.shutdown().await;
}
