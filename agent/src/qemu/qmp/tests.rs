//! The QMP client against fake servers that misbehave in every way we could think of.

use super::*;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::broadcast::Receiver;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

/// The server side of a fake QMP connection.
struct Fake<S> {
    r: BufReader<tokio::io::ReadHalf<S>>,
    w: tokio::io::WriteHalf<S>,
}

impl<S: AsyncRead + AsyncWrite> Fake<S> {
    fn new(s: S) -> Self {
        let (r, w) = tokio::io::split(s);
        Fake {
            r: BufReader::new(r),
            w,
        }
    }

    async fn send(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).await.unwrap();
        self.w.write_all(b"\r\n").await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.unwrap();
    }

    /// Next command: (name, id, arguments).
    async fn recv(&mut self) -> (String, Value, Value) {
        let mut l = String::new();
        assert!(self.r.read_line(&mut l).await.unwrap() > 0, "client closed");
        let v: Value = serde_json::from_str(&l).unwrap();
        (
            v["execute"].as_str().unwrap().to_string(),
            v["id"].clone(),
            v.get("arguments").cloned().unwrap_or(Value::Null),
        )
    }

    /// Greeting, `qmp_capabilities` and `query-commands` (listing `commands`).
    async fn handshake(&mut self, commands: &[&str]) {
        self.send(GREETING).await;
        let (c, id, _) = self.recv().await;
        assert_eq!(c, "qmp_capabilities");
        self.send(&json!({"return": {}, "id": id}).to_string())
            .await;
        let (c, id, _) = self.recv().await;
        assert_eq!(c, "query-commands");
        let list: Vec<Value> = commands.iter().map(|n| json!({"name": n})).collect();
        self.send(&json!({"return": list, "id": id}).to_string())
            .await;
    }
}

fn opts() -> QmpOptions {
    QmpOptions {
        handshake_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        ..QmpOptions::default()
    }
}

fn pipe() -> (DuplexStream, DuplexStream) {
    tokio::io::duplex(1 << 16)
}

/// Connect a client to a fake whose handshake has run.
async fn connected(o: QmpOptions) -> (Qmp, Fake<DuplexStream>) {
    let (a, b) = pipe();
    let mut f = Fake::new(b);
    let (q, ()) = tokio::join!(
        Qmp::from_stream(a, "fake", o),
        f.handshake(&["query-status", "stop"])
    );
    (q.unwrap(), f)
}

async fn next_disconnect(rx: &mut Receiver<Notification>) -> DisconnectReason {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a notification")
            .expect("channel open")
        {
            Notification::Disconnected(r) => return r,
            _ => continue,
        }
    }
}

#[tokio::test]
async fn handshake_commands_events_and_errors() {
    let (q, mut f) = connected(opts()).await;
    assert!(q.has_command("stop") && !q.has_command("cont"));
    assert_eq!(q.greeting().version.unwrap().major, 10);
    assert_eq!(q.greeting().capabilities, ["oob"]);
    let mut rx = q.subscribe();

    let server = async {
        let (c, id, args) = f.recv().await;
        assert_eq!(c, "block-dirty-bitmap-add");
        assert_eq!(args, json!({"node": "n", "name": "b"}));
        // An unknown event, a known one without data, a reply with unknown members.
        f.send(r#"{"event": "X_NEVER_HEARD_OF", "data": {"z": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#).await;
        f.send(r#"{"timestamp": {"seconds": 3, "microseconds": 4}, "event": "STOP"}"#)
            .await;
        f.send(r#"{"something": "new"}"#).await;
        f.send("").await;
        f.send(&json!({"return": {"ok": 1}, "id": id, "extra": [1, 2]}).to_string())
            .await;
        let (c, id, args) = f.recv().await;
        assert_eq!(c, "query-status");
        assert_eq!(args, Value::Null);
        f.send(
            &json!({"id": id, "error": {"class": "DeviceNotFound", "desc": "no node n"}})
                .to_string(),
        )
        .await;
        let (_, id, _) = f.recv().await;
        f.send(&json!({"id": id, "error": {"class": "SomeFutureClass", "desc": "?"}}).to_string())
            .await;
    };
    let client = async {
        let r = q
            .execute("block-dirty-bitmap-add", json!({"node": "n", "name": "b"}))
            .await
            .unwrap();
        assert_eq!(r, json!({"ok": 1}));
        let e = q.execute("query-status", json!({})).await.unwrap_err();
        match &e {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "query-status");
                assert_eq!(*class, ErrorClass::DeviceNotFound);
                assert_eq!(desc, "no node n");
            }
            other => panic!("{other:?}"),
        }
        assert!(!e.is_disconnect());
        let e = q.execute("x", Value::Null).await.unwrap_err();
        assert_eq!(
            e.class(),
            Some(&ErrorClass::Other("SomeFutureClass".into()))
        );
    };
    tokio::join!(server, client);

    let n = rx.recv().await.unwrap();
    let e = n.event().unwrap();
    assert_eq!(e.name, "X_NEVER_HEARD_OF");
    assert_eq!(e.data, json!({"z": 1}));
    assert_eq!(
        e.timestamp,
        Some(Timestamp {
            seconds: 1,
            microseconds: 2
        })
    );
    let n = rx.recv().await.unwrap();
    assert_eq!(n.event().unwrap().name, "STOP");
    assert_eq!(n.event().unwrap().data, Value::Null);
    assert!(q.is_connected());
}

#[tokio::test]
async fn concurrent_commands_matched_by_id() {
    let (q, mut f) = connected(opts()).await;
    let server = async {
        let (c1, id1, _) = f.recv().await;
        let (c2, id2, _) = f.recv().await;
        let (c3, id3, _) = f.recv().await;
        // Reverse order; each reply names its command so the client side can check.
        for (c, id) in [(c3, id3), (c2, id2), (c1, id1)] {
            f.send(&json!({"return": c, "id": id}).to_string()).await;
        }
    };
    let (a, b, c, ()) = tokio::join!(
        q.execute("a", Value::Null),
        q.execute("b", Value::Null),
        q.execute("c", Value::Null),
        server
    );
    assert_eq!(
        (a.unwrap(), b.unwrap(), c.unwrap()),
        (json!("a"), json!("b"), json!("c"))
    );
}

#[tokio::test]
async fn reply_without_id_answers_the_oldest_command() {
    let (q, mut f) = connected(opts()).await;
    let server = async {
        f.recv().await;
        f.send(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#)
            .await;
    };
    let (r, ()) = tokio::join!(q.execute("a", Value::Null), server);
    assert!(matches!(r, Err(QmpError::Command { .. })), "{r:?}");
}

#[tokio::test]
async fn timed_out_command_then_late_reply_is_dropped() {
    let o = QmpOptions {
        command_timeout: Duration::from_millis(100),
        ..opts()
    };
    let (q, mut f) = connected(o).await;
    let e = q.execute("slow", Value::Null).await.unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
    let (_, late, _) = f.recv().await;
    let server = async {
        let (_, id, _) = f.recv().await;
        f.send(&json!({"return": "late", "id": late}).to_string())
            .await;
        f.send(&json!({"return": "fresh", "id": id}).to_string())
            .await;
    };
    let (r, ()) = tokio::join!(
        q.execute_timeout("next", Value::Null, Duration::from_secs(5)),
        server
    );
    assert_eq!(r.unwrap(), json!("fresh"));
}

#[tokio::test]
async fn misuse_is_refused_locally() {
    let (q, _f) = connected(opts()).await;
    for (c, a) in [("x", json!([1])), ("x", json!("s")), ("", Value::Null)] {
        assert!(matches!(
            q.execute(c, a).await,
            Err(QmpError::InvalidRequest(_))
        ));
    }
}

/// A server that misbehaves after the handshake: the command in flight and every later one
/// fail with a typed disconnect, and subscribers hear of it.
async fn misbehave(o: QmpOptions, bad: &[u8], check: impl Fn(&DisconnectReason) -> bool) {
    let (q, mut f) = connected(o).await;
    let mut rx = q.subscribe();
    let server = async {
        f.recv().await;
        f.send_raw(bad).await;
        f
    };
    let (r, f) = tokio::join!(q.execute("query-status", Value::Null), server);
    match r {
        Err(QmpError::Disconnected(reason)) => assert!(check(&reason), "{reason:?}"),
        other => panic!("{other:?}"),
    }
    assert!(check(&next_disconnect(&mut rx).await));
    assert!(!q.is_connected());
    assert!(check(&q.closed().await));
    assert!(matches!(
        q.execute("query-status", Value::Null).await,
        Err(QmpError::Disconnected(_))
    ));
    drop(f);
}

#[tokio::test]
async fn over_long_line_is_an_error_not_an_allocation() {
    let o = QmpOptions {
        max_line: 1024,
        ..opts()
    };
    // 4 KiB without a newline: refused at 1 KiB.
    misbehave(o.clone(), &[b'{'; 4096], |r| {
        matches!(
            r,
            DisconnectReason::Protocol(ProtocolError::Line(line::LineError::TooLong { max: 1024 }))
        )
    })
    .await;
    // Exactly at the bound is fine.
    let (q, mut f) = connected(o).await;
    let server = async {
        let (_, id, _) = f.recv().await;
        let pad = "x".repeat(1024 - 40);
        let l = json!({"return": pad, "id": id}).to_string();
        assert!(l.len() <= 1024);
        f.send_raw(l.as_bytes()).await;
        f.send_raw(b"\n").await;
    };
    let (r, ()) = tokio::join!(q.execute("a", Value::Null), server);
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test]
async fn garbage_truncation_and_eof() {
    misbehave(opts(), b"this is not json\n", |r| {
        matches!(
            r,
            DisconnectReason::Protocol(ProtocolError::Line(line::LineError::NotJson { .. }))
        )
    })
    .await;
    misbehave(opts(), b"[1, 2, 3]\n", |r| {
        matches!(r, DisconnectReason::Protocol(_))
    })
    .await;
    // A reply cut in the middle, then the server is gone.
    let (q, mut f) = connected(opts()).await;
    let server = async move {
        f.recv().await;
        f.send_raw(br#"{"return": {"a""#).await;
        drop(f);
    };
    let (r, ()) = tokio::join!(q.execute("a", Value::Null), server);
    assert!(
        matches!(
            r,
            Err(QmpError::Disconnected(DisconnectReason::Protocol(
                ProtocolError::TruncatedLine
            )))
        ),
        "{r:?}"
    );
    // A clean close while a command is in flight.
    let (q, mut f) = connected(opts()).await;
    let server = async move {
        f.recv().await;
        drop(f);
    };
    let (r, ()) = tokio::join!(q.execute("quit", Value::Null), server);
    assert!(
        matches!(r, Err(QmpError::Disconnected(DisconnectReason::Eof))),
        "{r:?}"
    );
}

#[tokio::test]
async fn handshake_failures_are_typed() {
    // Silence: a monitor busy with another client looks like this.
    let (a, _b) = pipe();
    let o = QmpOptions {
        handshake_timeout: Duration::from_millis(100),
        ..opts()
    };
    let r = Qmp::from_stream(a, "silent", o).await;
    assert!(
        matches!(&r, Err(QmpError::Timeout { what, .. }) if what == "greeting"),
        "{r:?}"
    );

    // Something else first.
    let (a, b) = pipe();
    let mut f = Fake::new(b);
    let (r, ()) = tokio::join!(
        Qmp::from_stream(a, "x", opts()),
        f.send(r#"{"return": {}}"#)
    );
    assert!(
        matches!(r, Err(QmpError::Protocol(ProtocolError::NoGreeting(_)))),
        "{r:?}"
    );

    // Capabilities refused.
    let (a, b) = pipe();
    let mut f = Fake::new(b);
    let server = async {
        f.send(GREETING).await;
        let (_, id, _) = f.recv().await;
        f.send(&json!({"id": id, "error": {"class": "CommandNotFound", "desc": "no"}}).to_string())
            .await;
    };
    let (r, ()) = tokio::join!(Qmp::from_stream(a, "x", opts()), server);
    assert!(matches!(r, Err(QmpError::Command { .. })), "{r:?}");

    // query-commands answered with nonsense.
    let (a, b) = pipe();
    let mut f = Fake::new(b);
    let server = async {
        f.send(GREETING).await;
        let (_, id, _) = f.recv().await;
        f.send(&json!({"return": {}, "id": id}).to_string()).await;
        let (_, id, _) = f.recv().await;
        f.send(&json!({"return": {"not": "a list"}, "id": id}).to_string())
            .await;
    };
    let (r, ()) = tokio::join!(Qmp::from_stream(a, "x", opts()), server);
    assert!(
        matches!(r, Err(QmpError::Protocol(ProtocolError::BadReply { .. }))),
        "{r:?}"
    );

    // Closed before the greeting.
    let (a, b) = pipe();
    drop(b);
    let r = Qmp::from_stream(a, "x", opts()).await;
    assert!(
        matches!(r, Err(QmpError::Disconnected(DisconnectReason::Eof))),
        "{r:?}"
    );

    // No socket at all.
    let r = Qmp::connect("/nonexistent/bitferry-qmp.sock").await;
    assert!(matches!(&r, Err(e @ QmpError::Connect { .. }) if e.is_disconnect()));
}

#[tokio::test]
async fn events_during_the_handshake_reach_subscribers_after_connected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let mut gens = Vec::new();
        for generation in 1..=2u64 {
            let (s, _) = listener.accept().await.unwrap();
            let mut f = Fake::new(s);
            f.send(GREETING).await;
            let (_, id, _) = f.recv().await;
            f.send(&json!({"return": {}, "id": id}).to_string()).await;
            let (_, id, _) = f.recv().await;
            // An event between capabilities and query-commands' reply.
            f.send(&json!({"event": "EARLY", "data": {"g": generation}}).to_string())
                .await;
            f.send(&json!({"return": [{"name": "cont"}], "id": id}).to_string())
                .await;
            let (c, id, _) = f.recv().await;
            f.send(&json!({"return": c, "id": id}).to_string()).await;
            gens.push(f);
            if generation == 1 {
                // QEMU goes away.
                drop(gens.pop());
            }
        }
        gens
    });
    let rq = ReconnectingQmp::new(
        &path,
        opts(),
        Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
    );
    let mut rx = rq.subscribe();
    let (g, q) = rq.connected().await;
    assert_eq!(g, 1);
    assert!(q.has_command("cont"));
    assert_eq!(rq.execute("one", Value::Null).await.unwrap(), json!("one"));

    let mut seen = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        let done = matches!(n, Notification::Connected { generation: 2 });
        seen.push(match n {
            Notification::Connected { generation } => format!("connected {generation}"),
            Notification::Disconnected(_) => "disconnected".into(),
            Notification::Event(e) => format!("{} {}", e.name, e.data["g"]),
        });
        if done {
            break;
        }
    }
    assert_eq!(
        seen,
        ["connected 1", "EARLY 1", "disconnected", "connected 2"]
    );
    let n = rx.recv().await.unwrap();
    assert_eq!(n.event().unwrap().data["g"], 2);
    let (g, _) = rq.connected().await;
    assert_eq!(g, 2);
    assert_eq!(rq.generation(), 2);
    assert_eq!(rq.execute("two", Value::Null).await.unwrap(), json!("two"));
    let gens = server.await.unwrap();
    drop(gens);
    assert!(matches!(
        next_disconnect(&mut rx).await,
        DisconnectReason::Eof
    ));
    // Nobody listens any more: commands fail fast instead of waiting.
    drop(dir);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(matches!(
        rq.execute("three", Value::Null).await,
        Err(QmpError::NotConnected { .. })
    ));
}
