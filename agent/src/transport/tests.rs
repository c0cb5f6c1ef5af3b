//! Loopback tests of the transport: mutual TLS both ways, refusals surfaced at connect, frame
//! limits, truncation and loss-free shutdown.

use super::bench::ephemeral_cluster;
use super::endpoint::CLOSE_OK;
use super::stream::STOP_TOO_LARGE;
use super::*;
use crate::cert;
use bytes::Bytes;
use std::net::{Ipv4Addr, SocketAddr};

fn local() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// An identity whose certificate is signed by `signer` while it trusts `trusted` (PEMs
/// concatenated), for certificates that the loader accepts but the other side must refuse.
fn identity(name: &str, signer: &cert::Pair, trusted: &[&cert::Pair]) -> TlsIdentity {
    let p = cert::issue(
        &signer.cert_pem,
        &signer.key_pem,
        name,
        &cert::host_sans(name, &[]),
        1,
    )
    .unwrap();
    let roots: String = trusted.iter().map(|c| c.cert_pem.as_str()).collect();
    TlsIdentity::from_pem(
        roots.as_bytes(),
        p.cert_pem.as_bytes(),
        p.key_pem.as_bytes(),
    )
    .unwrap()
}

/// Server endpoint and a task that establishes the first incoming connection.
fn serve(
    id: &TlsIdentity,
    opts: TransportOptions,
) -> (
    Endpoint,
    tokio::task::JoinHandle<Result<Connection, TransportError>>,
) {
    let server = Endpoint::server(local(), id, opts).unwrap();
    let s = server.clone();
    let task = tokio::spawn(async move { s.accept().await.unwrap().establish().await });
    (server, task)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_frames_and_payloads_round_trip() {
    let ids = ephemeral_cluster(&["dst", "src"]).unwrap();
    let (server, accepted) = serve(&ids[0], TransportOptions::default());
    let addr = server.local_addr().unwrap();

    let frames: Vec<Vec<u8>> = vec![vec![], vec![7], pattern(1000, 1), pattern(200_000, 2)];
    let payload = Bytes::from(pattern(3 << 20, 3));
    let receiver = {
        let frames = frames.clone();
        let payload = payload.clone();
        tokio::spawn(async move {
            let conn = accepted.await.unwrap().unwrap();
            assert_eq!(conn.peer_name(), "src");
            let mut s = conn.accept_stream().await.unwrap();
            let mut buf = Vec::new();
            for f in &frames {
                assert!(s.recv_frame_into(&mut buf).await.unwrap());
                assert_eq!(&buf, f);
            }
            let header = s.recv_frame().await.unwrap().unwrap();
            let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
            let got = s.recv_payload(len).await.unwrap();
            assert_eq!(got, payload);
            // A small payload usually arrives as one chunk (the no-copy path).
            assert_eq!(&s.recv_payload(5).await.unwrap()[..], b"tail!");
            assert_eq!(s.recv_frame().await.unwrap(), None, "clean end of stream");
            s.send_frame(b"ack").await.unwrap();
            s.finish().await.unwrap();
            conn
        })
    };

    let client = Endpoint::client(&ids[1], TransportOptions::default()).unwrap();
    let conn = client.connect(addr, "localhost").await.unwrap();
    assert_eq!(conn.peer_name(), "dst");
    let mut s = conn.open_stream().await.unwrap();
    for f in &frames {
        s.send_frame(f).await.unwrap();
    }
    s.send_frame(&(payload.len() as u32).to_le_bytes())
        .await
        .unwrap();
    s.send_payload(payload.clone()).await.unwrap();
    s.send_payload(Bytes::from_static(b"tail!")).await.unwrap();
    s.finish().await.unwrap();
    assert_eq!(s.recv_frame().await.unwrap().as_deref(), Some(&b"ack"[..]));
    let server_conn = receiver.await.unwrap();
    conn.close(CLOSE_OK, "done");
    assert!(matches!(
        server_conn.closed().await,
        TransportError::Closed { by_peer: true, .. }
    ));
    client.wait_idle().await;
    server.close(CLOSE_OK, "done");
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused_at_connect() {
    let ca = cert::new_ca(1).unwrap();
    let rogue = cert::new_ca(1).unwrap();
    let server_id = identity("dst", &ca, &[&ca]);
    // Trusts the real CA (so it accepts the server) but holds a rogue certificate.
    let client_id = identity("src", &rogue, &[&ca, &rogue]);
    let (server, accepted) = serve(&server_id, TransportOptions::default());
    let client = Endpoint::client(&client_id, TransportOptions::default()).unwrap();

    let err = client
        .connect(server.local_addr().unwrap(), "localhost")
        .await
        .unwrap_err();
    eprintln!("client: {err}");
    assert!(
        matches!(err, TransportError::RefusedByPeer(_)),
        "client saw: {err}"
    );
    assert!(err.to_string().contains("refused our certificate"), "{err}");
    let server_err = accepted.await.unwrap().unwrap_err();
    eprintln!("server: {server_err}");
    assert!(
        matches!(server_err, TransportError::PeerCertificateRefused(_)),
        "server saw: {server_err}"
    );
    assert!(server_err.is_certificate_refusal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_from_another_ca_is_refused_by_the_client() {
    let ca = cert::new_ca(1).unwrap();
    let rogue = cert::new_ca(1).unwrap();
    let server_id = identity("dst", &rogue, &[&ca, &rogue]);
    let client_id = identity("src", &ca, &[&ca]);
    let (server, accepted) = serve(&server_id, TransportOptions::default());
    let client = Endpoint::client(&client_id, TransportOptions::default()).unwrap();

    let err = client
        .connect(server.local_addr().unwrap(), "localhost")
        .await
        .unwrap_err();
    eprintln!("client: {err}");
    assert!(
        matches!(err, TransportError::PeerCertificateRefused(_)),
        "client saw: {err}"
    );
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    let server_err = accepted.await.unwrap().unwrap_err();
    eprintln!("server: {server_err}");
    assert!(
        matches!(server_err, TransportError::RefusedByPeer(_)),
        "server saw: {server_err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_must_match_its_certificate() {
    let ids = ephemeral_cluster(&["dst", "src"]).unwrap();
    let (server, _accepted) = serve(&ids[0], TransportOptions::default());
    let client = Endpoint::client(&ids[1], TransportOptions::default()).unwrap();
    let err = client
        .connect(server.local_addr().unwrap(), "elsewhere.example")
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::PeerCertificateRefused(ref r) if r.contains("not valid for name")),
        "{err}"
    );
}

/// A connected pair with one stream open on each side; the client has sent `first` raw bytes
/// so the server sees the stream.
async fn stream_pair(
    opts: TransportOptions,
    first: &[u8],
) -> (Endpoint, Connection, FramedStream, Connection, FramedStream) {
    let ids = ephemeral_cluster(&["dst", "src"]).unwrap();
    let (server, accepted) = serve(&ids[0], opts.clone());
    let client = Endpoint::client(&ids[1], opts).unwrap();
    let conn = client
        .connect(server.local_addr().unwrap(), "127.0.0.1")
        .await
        .unwrap();
    let mut s = conn.open_stream().await.unwrap();
    s.writer.quinn().write_all(first).await.unwrap();
    let sconn = accepted.await.unwrap().unwrap();
    let ss = sconn.accept_stream().await.unwrap();
    (client, conn, s, sconn, ss)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_refused_before_allocating() {
    // A 4 GiB - 1 length prefix: reading it must fail at once, not try to allocate 4 GiB.
    let (_client, _c, mut cs, _sc, mut ss) =
        stream_pair(TransportOptions::default(), &[0xff; 4]).await;
    let err = ss.recv_frame().await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::TooLarge {
                what: "frame",
                len: 0xffff_ffff,
                max
            } if max == 16 << 20
        ),
        "{err}"
    );
    // The sender learns that the receiver stopped reading: its writes fail once the
    // STOP_SENDING arrives (whether `finish` fails depends on whether the bytes were already
    // acknowledged, so keep writing instead).
    let err = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Err(e) = cs.send_payload(Bytes::from_static(&[0; 1024])).await {
                return e;
            }
        }
    })
    .await
    .expect("the sender never saw the stop");
    assert!(
        matches!(err, TransportError::PeerStopped(c) if c == u64::from(STOP_TOO_LARGE)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_and_payload_limits_are_configurable() {
    let opts = TransportOptions {
        limits: Limits {
            max_frame: 1024,
            max_payload: 2048,
            ..Limits::default()
        },
        ..TransportOptions::default()
    };
    let (_client, _c, mut cs, _sc, mut ss) = stream_pair(opts, &1024u32.to_le_bytes()).await;
    // Exactly the maximum passes; one more is refused on both sides.
    cs.writer.quinn().write_all(&[1; 1024]).await.unwrap();
    assert_eq!(ss.recv_frame().await.unwrap().unwrap().len(), 1024);
    // Payloads have their own limit, here above the frame limit.
    cs.send_payload(Bytes::from(vec![2; 2048])).await.unwrap();
    assert_eq!(ss.recv_payload(2048).await.unwrap().len(), 2048);
    assert!(matches!(
        cs.send_frame(&[0; 1025]).await,
        Err(TransportError::TooLarge { len: 1025, .. })
    ));
    assert!(matches!(
        ss.recv_payload(2049).await,
        Err(TransportError::TooLarge {
            what: "payload",
            len: 2049,
            max: 2048
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_streams_are_errors() {
    // Finished after 10 of 100 announced bytes.
    let mut bytes = 100u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[9; 10]);
    let (_client, _c, mut cs, _sc, mut ss) = stream_pair(TransportOptions::default(), &bytes).await;
    cs.finish().await.unwrap();
    let err = ss.recv_frame().await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Truncated {
                what: "frame",
                expected: 100,
                got: 10
            }
        ),
        "{err}"
    );

    // Finished inside a header.
    let (_client, _c, mut cs, _sc, mut ss) =
        stream_pair(TransportOptions::default(), &[1, 0]).await;
    cs.finish().await.unwrap();
    let err = ss.recv_frame().await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Truncated {
                what: "frame header",
                got: 2,
                ..
            }
        ),
        "{err}"
    );

    // Finished inside a payload.
    let (_client, _c, mut cs, _sc, mut ss) =
        stream_pair(TransportOptions::default(), &[5; 7]).await;
    cs.finish().await.unwrap();
    let err = ss.recv_payload(4096).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Truncated {
                what: "payload",
                expected: 4096,
                got: 7
            }
        ),
        "{err}"
    );

    // Reset by the sender.
    let (_client, _c, mut cs, _sc, mut ss) =
        stream_pair(TransportOptions::default(), &[5; 7]).await;
    cs.writer.reset(42);
    let err = ss.recv_payload(4096).await.unwrap_err();
    assert!(matches!(err, TransportError::StreamReset(42)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_loses_nothing() {
    const TOTAL: usize = 64 << 20;
    let ids = ephemeral_cluster(&["dst", "src"]).unwrap();
    let (server, accepted) = serve(&ids[0], TransportOptions::default());
    let addr = server.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let conn = accepted.await.unwrap().unwrap();
        let mut s = conn.accept_stream().await.unwrap();
        let mut hasher = blake3::Hasher::new();
        let mut got = 0usize;
        let mut header = Vec::new();
        while s.recv_frame_into(&mut header).await.unwrap() {
            let len = u32::from_le_bytes(header[..].try_into().unwrap()) as usize;
            let p = s.recv_payload(len).await.unwrap();
            hasher.update(&p);
            got += len;
        }
        let mut ack = (got as u64).to_le_bytes().to_vec();
        ack.extend_from_slice(hasher.finalize().as_bytes());
        s.send_frame(&ack).await.unwrap();
        // No waiting for `stopped`: the sender closes the connection as soon as it has read
        // the acknowledgement, possibly before acknowledging it at the QUIC level.
        s.writer.quinn().finish().unwrap();
        // The sender closes once it has the acknowledgement.
        let why = conn.closed().await;
        assert!(
            matches!(
                why,
                TransportError::Closed {
                    by_peer: true,
                    code: 0,
                    ..
                }
            ),
            "{why}"
        );
        got
    });

    let client = Endpoint::client(&ids[1], TransportOptions::default()).unwrap();
    let conn = client.connect(addr, "localhost").await.unwrap();
    let mut s = conn.open_stream().await.unwrap();
    let mut expect = blake3::Hasher::new();
    let chunk = Bytes::from(pattern(1 << 20, 5));
    let mut sent = 0usize;
    let mut i = 0u8;
    while sent < TOTAL {
        // Vary the chunks so a lost or repeated one changes the hash.
        let mut c = chunk.to_vec();
        c[0] = i;
        let c = Bytes::from(c);
        expect.update(&c);
        s.send_frame(&(c.len() as u32).to_le_bytes()).await.unwrap();
        s.send_payload(c.clone()).await.unwrap();
        sent += c.len();
        i = i.wrapping_add(1);
    }
    s.finish().await.unwrap();
    let ack = s.recv_frame().await.unwrap().unwrap();
    conn.close(CLOSE_OK, "done");
    assert_eq!(
        u64::from_le_bytes(ack[..8].try_into().unwrap()),
        TOTAL as u64
    );
    assert_eq!(&ack[8..], expect.finalize().as_bytes());
    assert_eq!(receiver.await.unwrap(), TOTAL);
    client.wait_idle().await;
    server.close(CLOSE_OK, "done");
    server.wait_idle().await;
}

#[test]
fn loader_rejects_mismatched_material() {
    let ca = cert::new_ca(1).unwrap();
    let other = cert::new_ca(1).unwrap();
    let a = cert::issue(&ca.cert_pem, &ca.key_pem, "a", &[], 1).unwrap();
    let b = cert::issue(&ca.cert_pem, &ca.key_pem, "b", &[], 1).unwrap();
    let ok = TlsIdentity::from_pem(
        ca.cert_pem.as_bytes(),
        a.cert_pem.as_bytes(),
        a.key_pem.as_bytes(),
    )
    .unwrap();
    assert_eq!(ok.name(), "a");
    // Key of another certificate.
    let e = TlsIdentity::from_pem(
        ca.cert_pem.as_bytes(),
        a.cert_pem.as_bytes(),
        b.key_pem.as_bytes(),
    )
    .unwrap_err();
    assert!(matches!(e, TransportError::TlsConfig(_)), "{e}");
    // Certificate not from the trusted CA.
    let e = TlsIdentity::from_pem(
        other.cert_pem.as_bytes(),
        a.cert_pem.as_bytes(),
        a.key_pem.as_bytes(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("would be refused"), "{e}");
    // Garbage.
    let e =
        TlsIdentity::from_pem(b"nope", a.cert_pem.as_bytes(), a.key_pem.as_bytes()).unwrap_err();
    assert!(matches!(e, TransportError::Load { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_bench_moves_and_verifies_bytes() {
    let ids = ephemeral_cluster(&["dst", "src"]).unwrap();
    let opts = TransportOptions::default();
    for mode in [
        bench::Mode::Raw,
        bench::Mode::RawBlake3,
        bench::Mode::FramedBlake3,
    ] {
        for chunk in [bench::CHUNK, 64 << 10] {
            // Not a multiple of the chunk size, to exercise the partial last chunk.
            let data = bytes::Bytes::from(bench::pattern((4 << 20) + 12345));
            let run = bench::bulk(&ids[0], &ids[1], &opts, data, chunk, mode)
                .await
                .unwrap();
            assert_eq!(run.bytes, (4 << 20) + 12345);
            assert!(run.mib_per_s() > 0.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_over_an_abstract_socket_with_a_seed() {
    use quinn::Runtime;
    let ids = ephemeral_cluster(&["dst", "src"]).unwrap();
    let std_socket = std::net::UdpSocket::bind(local()).unwrap();
    let socket = quinn::TokioRuntime.wrap_udp_socket(std_socket).unwrap();
    let server = Endpoint::with_socket(
        socket,
        std::sync::Arc::new(quinn::TokioRuntime),
        &ids[0],
        TransportOptions::default(),
        true,
        Some([7; 32]),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let s = server.clone();
    let accepted = tokio::spawn(async move { s.accept().await.unwrap().establish().await });
    let client = Endpoint::client(&ids[1], TransportOptions::default()).unwrap();
    let conn = client.connect(addr, "127.0.0.1").await.unwrap();
    assert_eq!(conn.peer_name(), "dst");
    assert_eq!(accepted.await.unwrap().unwrap().peer_name(), "src");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_nobody_times_out_clearly() {
    let ids = ephemeral_cluster(&["src"]).unwrap();
    // A bound UDP socket that never answers.
    let silent = std::net::UdpSocket::bind(local()).unwrap();
    let opts = TransportOptions {
        handshake_timeout: std::time::Duration::from_millis(300),
        ..TransportOptions::default()
    };
    let client = Endpoint::client(&ids[0], opts).unwrap();
    let err = client
        .connect(silent.local_addr().unwrap(), "localhost")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Timeout {
                what: "the QUIC handshake",
                ..
            }
        ),
        "{err}"
    );
}
