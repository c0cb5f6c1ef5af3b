//! The NBD client against a fake server that follows a script — including nonsense: bad
//! magic, oversized lengths, wrong handles, disconnects in the middle of a reply, silence.

use super::proto::*;
use super::*;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const CTX: &str = "qemu:dirty-bitmap:b";

/// What the fake server does during the handshake.
#[derive(Clone)]
struct Cfg {
    size: u64,
    /// Contexts it offers: (id, name).
    contexts: Vec<(u32, &'static str)>,
    /// `NBD_INFO_BLOCK_SIZE` (min, preferred, max), if sent.
    block: Option<(u32, u32, u32)>,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            size: 3 << 20,
            contexts: vec![(7, CTX), (9, BASE_ALLOCATION)],
            block: Some((1, 4096, 32 << 20)),
        }
    }
}

async fn opt_reply(s: &mut DuplexStream, option: u32, reply: u32, data: &[u8]) {
    let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

async fn hello(s: &mut DuplexStream, flags: u16) {
    let mut b = NBDMAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    s.write_all(&b).await.unwrap();
}

/// Read one option: (option, data).
async fn read_opt(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), IHAVEOPT);
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, d)
}

/// A well-behaved handshake.
async fn handshake(s: &mut DuplexStream, cfg: &Cfg) {
    hello(s, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await;
    let mut f = [0u8; 4];
    s.read_exact(&mut f).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(f),
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    );
    loop {
        let (opt, data) = read_opt(s).await;
        match opt {
            OPT_STRUCTURED_REPLY => opt_reply(s, opt, REP_ACK, &[]).await,
            OPT_SET_META_CONTEXT => {
                let text = String::from_utf8_lossy(&data).into_owned();
                for (id, name) in &cfg.contexts {
                    if text.contains(name) {
                        let mut p = id.to_be_bytes().to_vec();
                        p.extend_from_slice(name.as_bytes());
                        opt_reply(s, opt, REP_META_CONTEXT, &p).await;
                    }
                }
                opt_reply(s, opt, REP_ACK, &[]).await;
            }
            OPT_GO => {
                let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&cfg.size.to_be_bytes());
                p.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
                opt_reply(s, opt, REP_INFO, &p).await;
                if let Some((a, b, c)) = cfg.block {
                    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [a, b, c] {
                        p.extend_from_slice(&v.to_be_bytes());
                    }
                    opt_reply(s, opt, REP_INFO, &p).await;
                }
                opt_reply(s, opt, REP_ACK, &[]).await;
                return;
            }
            other => panic!("unexpected option {other}"),
        }
    }
}

async fn read_req(s: &mut DuplexStream) -> Request {
    let mut b = [0u8; REQUEST_LEN];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(b[..4].try_into().unwrap()),
        REQUEST_MAGIC
    );
    Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        command: u16::from_be_bytes([b[6], b[7]]),
        handle: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    }
}

fn chunk_bytes(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

async fn chunk(s: &mut DuplexStream, flags: u16, kind: u16, handle: u64, payload: &[u8]) {
    s.write_all(&chunk_bytes(flags, kind, handle, payload))
        .await
        .unwrap();
}

fn bs(ctx: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = ctx.to_be_bytes().to_vec();
    for (l, f) in extents {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    p
}

fn data(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(bytes);
    p
}

fn hole(offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    p
}

fn err(errno: u32, msg: &str) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p
}

fn opts() -> NbdOptions {
    NbdOptions {
        timeout: Duration::from_secs(5),
        ..NbdOptions::new("e")
    }
    .context(CTX)
    .context(BASE_ALLOCATION)
}

/// Connect to a fake server that runs the handshake of `cfg`, then `script`.
async fn connect<F, Fut>(
    cfg: Cfg,
    o: NbdOptions,
    script: F,
) -> (
    Result<NbdClient<DuplexStream>, NbdError>,
    tokio::task::JoinHandle<()>,
)
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        handshake(&mut b, &cfg).await;
        script(b).await;
    });
    (NbdClient::handshake(a, &o).await, server)
}

#[tokio::test]
async fn pages_block_status_and_reads_holes_as_zeros() {
    let (c, server) = connect(Cfg::default(), opts(), |mut s| async move {
        // dirty_extents: answer each request with only 1 MiB so the client must page; the
        // last answer reaches past the request (the client clips it).
        for (i, ext) in [
            vec![(65536u32, 1u32), ((1 << 20) - 65536, 0)],
            vec![(4096, 1), ((1 << 20) - 4096, 1)],
            vec![(1 << 20, 0), (1 << 20, 1)],
        ]
        .into_iter()
        .enumerate()
        {
            let r = read_req(&mut s).await;
            assert_eq!(r.command, CMD_BLOCK_STATUS);
            assert_eq!(r.offset, (i as u64) << 20);
            assert_eq!(u64::from(r.length), (3u64 << 20) - r.offset);
            chunk(&mut s, 0, REPLY_TYPE_BLOCK_STATUS, r.handle, &bs(7, &ext)).await;
            chunk(
                &mut s,
                0,
                REPLY_TYPE_BLOCK_STATUS,
                r.handle,
                &bs(9, &[(5, 3)]),
            )
            .await;
            chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.handle, &[]).await;
        }
        // A read answered out of order: a hole at the end, data at the start.
        let r = read_req(&mut s).await;
        assert_eq!((r.command, r.offset, r.length), (CMD_READ, 100, 10));
        chunk(&mut s, 0, REPLY_TYPE_OFFSET_HOLE, r.handle, &hole(104, 6)).await;
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            r.handle,
            &data(100, b"abcd"),
        )
        .await;
        // base:allocation over a small range.
        let r = read_req(&mut s).await;
        assert_eq!((r.offset, r.length), (0, 8192));
        chunk(
            &mut s,
            0,
            REPLY_TYPE_BLOCK_STATUS,
            r.handle,
            &bs(7, &[(8192, 0)]),
        )
        .await;
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            r.handle,
            &bs(
                9,
                &[
                    (4096, 0),
                    (2048, STATE_HOLE | STATE_ZERO),
                    (2048, STATE_HOLE | STATE_ZERO),
                ],
            ),
        )
        .await;
        let r = read_req(&mut s).await;
        assert_eq!(r.command, CMD_DISC);
    })
    .await;
    let mut c = c.unwrap();
    assert_eq!(c.export().size, 3 << 20);
    assert!(c.export().read_only());
    assert_eq!(c.context_id(CTX), Some(7));
    let d = c.dirty_extents(CTX).await.unwrap();
    let e = |offset, length| wire::Extent { offset, length };
    assert_eq!(d, vec![e(0, 65536), e(1 << 20, 1 << 20)]);
    let mut buf = [0xffu8; 10];
    c.read_into(100, &mut buf).await.unwrap();
    assert_eq!(&buf, b"abcd\0\0\0\0\0\0");
    let a = c.allocation(0, 8192).await.unwrap();
    assert_eq!(
        a,
        vec![
            Allocation {
                offset: 0,
                length: 4096,
                hole: false,
                zero: false
            },
            Allocation {
                offset: 4096,
                length: 4096,
                hole: true,
                zero: true
            }
        ]
    );
    c.disconnect().await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn reads_are_split_at_the_servers_maximum() {
    let cfg = Cfg {
        block: Some((512, 4096, 4096)),
        ..Cfg::default()
    };
    let (c, server) = connect(cfg, opts(), |mut s| async move {
        let mut at = 0u64;
        for want in [4096u32, 4096, 1808] {
            let r = read_req(&mut s).await;
            assert_eq!((r.offset, r.length), (at, want));
            let bytes: Vec<u8> = (0..want)
                .map(|i| ((at + u64::from(i)) % 251) as u8)
                .collect();
            chunk(
                &mut s,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                r.handle,
                &data(at, &bytes),
            )
            .await;
            at += u64::from(want);
        }
    })
    .await;
    let mut c = c.unwrap();
    let v = c.read(0, 10000).await.unwrap();
    assert!(v.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    // Past the end is refused locally and leaves the connection usable.
    let e = c.read(3 << 20, 1).await.unwrap_err();
    assert!(matches!(e, NbdError::InvalidRequest(_)) && e.is_recoverable());
    server.await.unwrap();
}

#[tokio::test]
async fn server_errors_keep_the_connection() {
    let (c, server) = connect(Cfg::default(), opts(), |mut s| async move {
        let r = read_req(&mut s).await;
        chunk(
            &mut s,
            0,
            REPLY_TYPE_ERROR,
            r.handle,
            &err(5, "disk on fire"),
        )
        .await;
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.handle, &[]).await;
        let r = read_req(&mut s).await;
        // A simple error reply is allowed for a read (no data follows).
        let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&22u32.to_be_bytes());
        b.extend_from_slice(&r.handle.to_be_bytes());
        s.write_all(&b).await.unwrap();
        let r = read_req(&mut s).await;
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            r.handle,
            &data(0, b"ok"),
        )
        .await;
    })
    .await;
    let mut c = c.unwrap();
    let e = c.read(0, 2).await.unwrap_err();
    assert!(
        matches!(&e, NbdError::Server { errno: 5, message, .. } if message == "disk on fire"),
        "{e:?}"
    );
    assert!(e.to_string().contains("EIO"));
    let e = c.read(0, 2).await.unwrap_err();
    assert!(matches!(e, NbdError::Server { errno: 22, .. }), "{e:?}");
    assert_eq!(c.read(0, 2).await.unwrap(), b"ok");
    server.await.unwrap();
}

/// Run one request against a server that answers with `reply` (bytes, `{h}` patched with the
/// request's handle by the closure) and return the error; the connection must then be broken.
async fn nonsense<F>(reply: F, read: bool) -> NbdError
where
    F: FnOnce(u64) -> Vec<u8> + Send + 'static,
{
    let (c, server) = connect(Cfg::default(), opts(), move |mut s| async move {
        let r = read_req(&mut s).await;
        let _ = s.write_all(&reply(r.handle)).await;
        // Then hang up (the client must not wait for more than it was promised).
    })
    .await;
    let mut c = c.unwrap();
    let e = if read {
        c.read(0, 4096).await.unwrap_err()
    } else {
        c.dirty_extents(CTX).await.unwrap_err()
    };
    assert!(!e.is_recoverable(), "{e:?}");
    assert!(matches!(c.read(0, 1).await, Err(NbdError::Broken(_))));
    server.await.unwrap();
    e
}

#[tokio::test]
async fn nonsense_replies_are_typed_errors() {
    let proto_err = |e: &NbdError| matches!(e, NbdError::Protocol(_));
    // Bad magic.
    let e = nonsense(|_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0], false).await;
    assert!(
        matches!(e, NbdError::Protocol(ProtoError::BadMagic { .. })),
        "{e:?}"
    );
    // A block status chunk announcing 4 GiB of descriptors: refused before allocating.
    let e = nonsense(
        |h| {
            let mut c = chunk_bytes(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                h,
                &bs(7, &[(1, 1)]),
            );
            c[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
            c
        },
        false,
    )
    .await;
    assert!(
        matches!(e, NbdError::Protocol(ProtoError::Length { .. })),
        "{e:?}"
    );
    // Data longer than the read.
    let e = nonsense(
        |h| {
            chunk_bytes(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                h,
                &data(0, &[1u8; 5000]),
            )
        },
        true,
    )
    .await;
    assert!(
        matches!(e, NbdError::Protocol(ProtoError::Length { .. })),
        "{e:?}"
    );
    // Data outside the requested range.
    let e = nonsense(
        |h| {
            chunk_bytes(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                h,
                &data(1 << 20, &[1u8; 16]),
            )
        },
        true,
    )
    .await;
    assert!(proto_err(&e), "{e:?}");
    // Overlapping chunks; a reply that ends before the range is covered.
    let e = nonsense(
        |h| {
            let mut v = chunk_bytes(0, REPLY_TYPE_OFFSET_HOLE, h, &hole(0, 4096));
            v.extend(chunk_bytes(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                h,
                &data(10, b"x"),
            ));
            v
        },
        true,
    )
    .await;
    assert!(proto_err(&e), "{e:?}");
    let e = nonsense(
        |h| chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, h, &hole(0, 100)),
        true,
    )
    .await;
    assert!(proto_err(&e), "{e:?}");
    // A simple success reply to a read (data would follow with no length: unframeable).
    let e = nonsense(
        |h| {
            let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&0u32.to_be_bytes());
            b.extend_from_slice(&h.to_be_bytes());
            b
        },
        true,
    )
    .await;
    assert!(proto_err(&e), "{e:?}");
    // The wrong handle.
    let e = nonsense(
        |h| {
            chunk_bytes(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                h + 1,
                &bs(7, &[(1, 1)]),
            )
        },
        false,
    )
    .await;
    assert!(
        matches!(e, NbdError::Protocol(ProtoError::UnexpectedHandle { .. })),
        "{e:?}"
    );
    // A zero-length descriptor (would stall paging), an unknown context, a missing context.
    for ext in [bs(7, &[(0, 1)]), bs(8, &[(1, 1)])] {
        let e = nonsense(
            move |h| chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, h, &ext),
            false,
        )
        .await;
        assert!(proto_err(&e), "{e:?}");
    }
    let e = nonsense(
        |h| {
            chunk_bytes(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                h,
                &bs(7, &[(1, 1)]),
            )
        },
        false,
    )
    .await;
    assert!(proto_err(&e), "{e:?}");
    // An unknown chunk type; an error chunk whose message overruns it.
    let e = nonsense(|h| chunk_bytes(REPLY_FLAG_DONE, 77, h, &[0; 8]), false).await;
    assert!(proto_err(&e), "{e:?}");
    let e = nonsense(
        |h| {
            let mut p = err(5, "abc");
            p[4..6].copy_from_slice(&999u16.to_be_bytes());
            chunk_bytes(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, h, &p)
        },
        false,
    )
    .await;
    assert!(proto_err(&e), "{e:?}");
    // Disconnects: before any reply, inside a header, inside a payload, inside read data.
    let e = nonsense(|_| vec![], false).await;
    assert!(
        matches!(
            e,
            NbdError::Disconnected {
                during: "block status"
            }
        ),
        "{e:?}"
    );
    let e = nonsense(
        |h| {
            chunk_bytes(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                h,
                &bs(7, &[(1, 1)]),
            )[..10]
                .to_vec()
        },
        false,
    )
    .await;
    assert!(matches!(e, NbdError::Disconnected { .. }), "{e:?}");
    let e = nonsense(
        |h| {
            chunk_bytes(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                h,
                &bs(7, &[(1, 1), (2, 2)]),
            )[..30]
                .to_vec()
        },
        false,
    )
    .await;
    assert!(matches!(e, NbdError::Disconnected { .. }), "{e:?}");
    let e = nonsense(
        |h| {
            chunk_bytes(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                h,
                &data(0, &[7u8; 4096]),
            )[..2000]
                .to_vec()
        },
        true,
    )
    .await;
    assert!(
        matches!(e, NbdError::Disconnected { during: "read" }),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let o = NbdOptions {
        timeout: Duration::from_millis(100),
        ..opts()
    };
    let (c, server) = connect(Cfg::default(), o.clone(), |mut s| async move {
        let _ = read_req(&mut s).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    let mut c = c.unwrap();
    let e = c.dirty_extents(CTX).await.unwrap_err();
    assert!(matches!(e, NbdError::Timeout { .. }), "{e:?}");
    assert!(matches!(c.read(0, 1).await, Err(NbdError::Broken(_))));
    server.abort();

    // Silence during the handshake.
    let (a, _b) = tokio::io::duplex(1024);
    let e = NbdClient::handshake(a, &o).await.unwrap_err();
    assert!(
        matches!(
            e,
            NbdError::Timeout {
                during: "handshake",
                ..
            }
        ),
        "{e:?}"
    );
}

/// Run the client's handshake against a server that does `f` instead of a proper one.
async fn bad_handshake<F, Fut>(o: NbdOptions, f: F) -> NbdError
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(f(b));
    let e = NbdClient::handshake(a, &o).await.unwrap_err();
    let _ = server.await;
    e
}

#[tokio::test]
async fn handshake_refusals_and_nonsense() {
    // Not NBD at all.
    let e = bad_handshake(opts(), |mut s| async move {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    })
    .await;
    assert!(
        matches!(e, NbdError::Protocol(ProtoError::BadMagic { .. })),
        "{e:?}"
    );
    // Oldstyle.
    let e = bad_handshake(opts(), |mut s| async move {
        let mut b = NBDMAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
        b.extend_from_slice(&[0; 2]);
        let _ = s.write_all(&b).await;
    })
    .await;
    assert!(
        matches!(e, NbdError::Protocol(ProtoError::Oldstyle)),
        "{e:?}"
    );
    // Newstyle without the fixed flag.
    let e = bad_handshake(opts(), |mut s| async move { hello(&mut s, 0).await }).await;
    assert!(matches!(e, NbdError::Unsupported(_)), "{e:?}");
    // Closed right after the hello.
    let e = bad_handshake(opts(), |mut s| async move {
        hello(&mut s, FLAG_FIXED_NEWSTYLE).await;
    })
    .await;
    assert!(
        matches!(
            e,
            NbdError::Disconnected {
                during: "handshake"
            }
        ),
        "{e:?}"
    );
    // No structured replies.
    let e = bad_handshake(opts(), |mut s| async move {
        hello(&mut s, FLAG_FIXED_NEWSTYLE).await;
        let mut f = [0u8; 4];
        s.read_exact(&mut f).await.unwrap();
        let (o, _) = read_opt(&mut s).await;
        opt_reply(&mut s, o, REP_ERR_UNSUP, &[]).await;
    })
    .await;
    assert!(matches!(e, NbdError::Unsupported(_)), "{e:?}");
    // An option reply announcing 4 GiB.
    let e = bad_handshake(opts(), |mut s| async move {
        hello(&mut s, FLAG_FIXED_NEWSTYLE).await;
        let mut f = [0u8; 4];
        s.read_exact(&mut f).await.unwrap();
        let (o, _) = read_opt(&mut s).await;
        let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&REP_ACK.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        let _ = s.write_all(&b).await;
    })
    .await;
    assert!(
        matches!(e, NbdError::Protocol(ProtoError::Length { .. })),
        "{e:?}"
    );
    // The bitmap is not exported: its context is not granted.
    let cfg = Cfg {
        contexts: vec![(9, BASE_ALLOCATION)],
        ..Cfg::default()
    };
    let e = bad_handshake(opts(), move |mut s| async move {
        handshake(&mut s, &cfg).await;
    })
    .await;
    assert!(
        matches!(&e, NbdError::NoSuchContext { name } if name == CTX),
        "{e:?}"
    );
    // No such export.
    let e = bad_handshake(NbdOptions::new("nope"), |mut s| async move {
        hello(&mut s, FLAG_FIXED_NEWSTYLE).await;
        let mut f = [0u8; 4];
        s.read_exact(&mut f).await.unwrap();
        let (o, _) = read_opt(&mut s).await;
        opt_reply(&mut s, o, REP_ACK, &[]).await;
        let (o, _) = read_opt(&mut s).await;
        assert_eq!(o, OPT_GO);
        opt_reply(&mut s, o, REP_ERR_BIT | 6, b"export 'nope' not present").await;
    })
    .await;
    assert!(
        matches!(&e, NbdError::OptionRefused { option: "NBD_OPT_GO", message, .. } if message.contains("nope")),
        "{e:?}"
    );
    assert!(e.to_string().contains("no such export"), "{e}");
    // Misuse: an export name NBD cannot carry.
    let e = bad_handshake(NbdOptions::new(&"x".repeat(5000)), |mut s| async move {
        hello(&mut s, FLAG_FIXED_NEWSTYLE).await;
        let mut f = [0u8; 4];
        s.read_exact(&mut f).await.unwrap();
        let (o, _) = read_opt(&mut s).await;
        opt_reply(&mut s, o, REP_ACK, &[]).await;
    })
    .await;
    assert!(matches!(e, NbdError::InvalidRequest(_)), "{e:?}");
}

/// Random bytes after a proper handshake, and a proper handshake followed by random replies:
/// always a typed error, never a panic or a hang.
#[tokio::test]
async fn random_garbage_never_panics() {
    let seed: u64 = rand::random();
    eprintln!("nbd garbage seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..200 {
        let n = rng.random_range(0..200usize);
        let mut junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        // Sometimes start with a valid structured header so the payload checks run.
        if i % 2 == 0 && junk.len() >= 20 {
            junk[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            junk[4..6].copy_from_slice(&[0, (rng.random::<u8>() & 1)]);
            junk[6..8].copy_from_slice(&[0, [0, 1, 2, 5][rng.random_range(0..4)]]);
        }
        let read = i % 3 == 0;
        let o = NbdOptions {
            timeout: Duration::from_millis(500),
            ..opts()
        };
        let (c, server) = connect(Cfg::default(), o, move |mut s| async move {
            let r = read_req(&mut s).await;
            if junk.len() >= 20 && i % 2 == 0 {
                junk[8..16].copy_from_slice(&r.handle.to_be_bytes());
            }
            let _ = s.write_all(&junk).await;
        })
        .await;
        let mut c = c.unwrap();
        let r = if read {
            c.read(0, 64).await.map(|_| ())
        } else {
            c.dirty_extents(CTX).await.map(|_| ())
        };
        assert!(r.is_err(), "iteration {i}");
        server.await.unwrap();
    }
    for _ in 0..100 {
        let n = rng.random_range(0..64usize);
        let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        let o = NbdOptions {
            timeout: Duration::from_millis(500),
            ..opts()
        };
        let _ = bad_handshake(o, move |mut s| async move {
            hello(&mut s, FLAG_FIXED_NEWSTYLE).await;
            let _ = s.write_all(&junk).await;
        })
        .await;
    }
}
