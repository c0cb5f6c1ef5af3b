//! QUIC endpoints with mutual TLS, tuned for bulk transfer, and the transport greeting that
//! makes a refused client certificate visible at connect time.
//!
//! Why the greeting: a QUIC client finishes its side of the handshake before the server has
//! verified the client's certificate, so `quinn`'s connect succeeds even when the server is
//! about to refuse it. Here the server opens one unidirectional stream right after it accepted
//! the handshake and writes [`GREETING`]; [`Endpoint::connect`] waits for it, so a refusal
//! (the server's TLS alert) or a peer that is not a bitferry transport becomes an error of
//! `connect` itself. The protocol's own Hello/Welcome still negotiates versions on top.

use super::error::TransportError;
use super::stream::{FrameReader, FrameWriter, FramedStream, Limits};
use super::tls::{TlsIdentity, peer_name};
use quinn::{IdleTimeout, VarInt};
use rustls_pki_types::CertificateDer;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::timeout;

/// What the server writes on its first unidirectional stream once it accepted a client:
/// magic and transport version 1 (u32 LE).
pub const GREETING: [u8; 8] = *b"BFRY\x01\x00\x00\x00";

/// Application close code for a normal close.
pub const CLOSE_OK: u32 = 0;
/// Application close code: the peer failed the transport greeting.
pub const CLOSE_BAD_GREETING: u32 = 1;

/// Tuning of endpoints and their connections.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// A connection with no traffic for this long is dead. QUIC uses the minimum of both
    /// peers' values, so both sides should agree.
    pub idle_timeout: Duration,
    /// Keep-alive interval; below `idle_timeout` so quiet phases (a VM in a long pre-copy)
    /// do not kill the connection.
    pub keep_alive: Duration,
    /// Limit for the QUIC handshake and, on the client, the server's greeting.
    pub handshake_timeout: Duration,
    /// Per-stream receive window (flow control). Should cover the bandwidth-delay product of
    /// the link: 32 MiB covers 10 Gbit/s × 25 ms.
    pub stream_window: u64,
    /// Connection-wide receive window, over all streams.
    pub conn_window: u64,
    /// How much unacknowledged data a connection may have in flight.
    pub send_window: u64,
    /// Turn off UDP generic segmentation offload (some virtual NICs mishandle it). Costs
    /// about two thirds of loopback throughput.
    pub disable_gso: bool,
    /// Requested UDP socket send and receive buffer sizes. The kernel caps them at
    /// `net.core.rmem_max`/`wmem_max` (a warning is logged when it does).
    pub socket_buffer: usize,
    /// Largest frame body and single payload read accepted on a stream, checked before
    /// allocating (see [`Limits`]).
    pub limits: Limits,
    /// Concurrent bidirectional streams the peer may open.
    pub max_bidi_streams: u32,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            stream_window: 32 << 20,
            conn_window: 64 << 20,
            send_window: 32 << 20,
            disable_gso: false,
            socket_buffer: 2 << 20,
            limits: Limits::default(),
            max_bidi_streams: 64,
        }
    }
}

impl TransportOptions {
    fn transport_config(&self) -> Result<quinn::TransportConfig, TransportError> {
        let bad = |what: &str| TransportError::TlsConfig(format!("transport option {what}"));
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(
            IdleTimeout::try_from(self.idle_timeout).map_err(|_| bad("idle_timeout too large"))?,
        ));
        t.keep_alive_interval(Some(self.keep_alive));
        t.stream_receive_window(
            VarInt::from_u64(self.stream_window).map_err(|_| bad("stream_window too large"))?,
        );
        t.receive_window(
            VarInt::from_u64(self.conn_window).map_err(|_| bad("conn_window too large"))?,
        );
        t.send_window(self.send_window);
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_bidi_streams));
        // Uni streams: the greeting plus whatever the application opens.
        t.max_concurrent_uni_streams(VarInt::from_u32(self.max_bidi_streams + 1));
        t.enable_segmentation_offload(!self.disable_gso);
        Ok(t)
    }
}

/// A QUIC endpoint: a UDP socket that accepts connections (server) and/or opens them.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    opts: Arc<TransportOptions>,
}

impl Endpoint {
    /// Listen on `addr` for mutually authenticated connections. The same endpoint can also
    /// [`connect`](Self::connect) to other agents with the same identity. Must be called
    /// inside a tokio runtime.
    pub fn server(
        addr: SocketAddr,
        tls: &TlsIdentity,
        opts: TransportOptions,
    ) -> Result<Self, TransportError> {
        let socket = bind(addr, opts.socket_buffer)?;
        Self::over_udp(socket, tls, opts, true)
    }

    /// An endpoint that only connects, bound to an ephemeral port on all interfaces
    /// (dual-stack where IPv6 is available). Must be called inside a tokio runtime.
    pub fn client(tls: &TlsIdentity, opts: TransportOptions) -> Result<Self, TransportError> {
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
        let socket = bind(any6, opts.socket_buffer).or_else(|_| {
            bind(
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                opts.socket_buffer,
            )
        })?;
        Self::over_udp(socket, tls, opts, false)
    }

    /// An endpoint over a bound UDP socket, on the tokio runtime.
    fn over_udp(
        socket: std::net::UdpSocket,
        tls: &TlsIdentity,
        opts: TransportOptions,
        listen: bool,
    ) -> Result<Self, TransportError> {
        use quinn::Runtime;
        let runtime = Arc::new(quinn::TokioRuntime);
        let socket = runtime.wrap_udp_socket(socket)?;
        Self::with_socket(socket, runtime, tls, opts, listen, None)
    }

    /// An endpoint over any datagram socket (the simulator's lossy network, for one), optionally
    /// listening, with a fixed RNG seed for reproducible runs. The socket must drop packets it
    /// cannot send instead of failing (quinn treats send errors as fatal).
    pub fn with_socket(
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        runtime: Arc<dyn quinn::Runtime>,
        tls: &TlsIdentity,
        opts: TransportOptions,
        listen: bool,
        rng_seed: Option<[u8; 32]>,
    ) -> Result<Self, TransportError> {
        let transport = Arc::new(opts.transport_config()?);
        let server = if listen {
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls.server_config()?));
            server.transport_config(transport.clone());
            Some(server)
        } else {
            None
        };
        let mut config = quinn::EndpointConfig::default();
        config.rng_seed(rng_seed);
        let mut inner = quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)?;
        inner.set_default_client_config(client_config(tls, transport)?);
        Ok(Endpoint {
            inner,
            opts: Arc::new(opts),
        })
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.inner.local_addr()?)
    }

    /// The options this endpoint was made with.
    pub fn options(&self) -> &TransportOptions {
        &self.opts
    }

    /// Connect to `addr`, verifying that the server's certificate comes from the cluster CA
    /// and is valid for `server_name` (a DNS name or IP address in its SANs), and wait for the
    /// server's greeting, which proves it accepted our certificate.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Connection, TransportError> {
        let hs = self.opts.handshake_timeout;
        let connecting = self.inner.connect(addr, server_name)?;
        let conn = timeout(hs, connecting)
            .await
            .map_err(|_| TransportError::Timeout {
                what: "the QUIC handshake",
                after: hs,
            })??;
        let greeted = timeout(hs, async {
            let mut s = conn.accept_uni().await?;
            let got = s.read_to_end(GREETING.len()).await.map_err(|e| match e {
                quinn::ReadToEndError::TooLong => {
                    TransportError::NotBitferry("greeting too long".into())
                }
                quinn::ReadToEndError::Read(e) => e.into(),
            })?;
            if got != GREETING {
                return Err(TransportError::NotBitferry(format!(
                    "unexpected greeting {got:02x?}"
                )));
            }
            Ok::<_, TransportError>(())
        })
        .await;
        let result = match greeted {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout {
                what: "the server's greeting (did it refuse our certificate?)",
                after: hs,
            }),
        };
        if let Err(e) = result {
            conn.close(VarInt::from_u32(CLOSE_BAD_GREETING), b"no greeting");
            return Err(e);
        }
        Connection::new(conn, self.opts.limits)
    }

    /// The next incoming connection attempt, or `None` once the endpoint is closed. Call
    /// [`Incoming::establish`] on it (typically in a task of its own, so one slow peer does not
    /// hold up others).
    pub async fn accept(&self) -> Option<Incoming> {
        let inner = self.inner.accept().await?;
        Some(Incoming {
            inner,
            opts: self.opts.clone(),
        })
    }

    /// Close every connection at once (`Connection::close` semantics: undelivered data is
    /// lost). Finish streams and exchange acknowledgements first.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Wait until every connection is fully closed, so the peer has seen our close instead of
    /// waiting for an idle timeout.
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }
}

fn client_config(
    tls: &TlsIdentity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut c = quinn::ClientConfig::new(Arc::new(tls.client_config()?));
    c.transport_config(transport);
    Ok(c)
}

/// Bind a UDP socket with enlarged buffers: bursts at 10 Gbit/s overflow the default ~200 KiB
/// receive buffer and every dropped packet costs a congestion-window cut.
fn bind(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, TransportError> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Dual-stack when the system allows it; not fatal otherwise.
        let _ = socket.set_only_v6(false);
    }
    if buffer > 0 {
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
        let (r, s) = (
            socket.recv_buffer_size().unwrap_or(0),
            socket.send_buffer_size().unwrap_or(0),
        );
        // Linux reports twice what it grants (bookkeeping overhead).
        if r < buffer || s < buffer {
            tracing::warn!(
                requested = buffer,
                recv = r,
                send = s,
                "UDP socket buffers capped by the kernel; raise net.core.rmem_max/wmem_max \
                 for full throughput"
            );
        }
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A connection attempt seen by a server endpoint, not yet authenticated.
#[derive(Debug)]
pub struct Incoming {
    inner: quinn::Incoming,
    opts: Arc<TransportOptions>,
}

impl Incoming {
    /// Where the attempt comes from (not authenticated).
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Complete the handshake (the client's certificate must come from the cluster CA), then
    /// greet the client so its `connect` returns. A refused certificate is reported here as
    /// [`TransportError::PeerCertificateRefused`].
    pub async fn establish(self) -> Result<Connection, TransportError> {
        let hs = self.opts.handshake_timeout;
        let remote = self.inner.remote_address();
        let result = timeout(hs, async {
            let conn = self.inner.accept()?.await?;
            let c = Connection::new(conn, self.opts.limits)?;
            let mut s = c.inner.open_uni().await?;
            s.write_all(&GREETING).await?;
            s.finish()?;
            Ok::<_, TransportError>(c)
        })
        .await
        .unwrap_or(Err(TransportError::Timeout {
            what: "the QUIC handshake",
            after: hs,
        }));
        match &result {
            Ok(c) => tracing::debug!(%remote, peer = c.peer_name(), "peer connected"),
            Err(e) => tracing::warn!(%remote, error = %e, "refused a connection"),
        }
        result
    }

    /// Turn the attempt away without a handshake.
    pub fn refuse(self) {
        self.inner.refuse();
    }
}

/// An authenticated connection to a peer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    peer_name: Arc<str>,
    limits: Limits,
}

impl Connection {
    fn new(inner: quinn::Connection, limits: Limits) -> Result<Self, TransportError> {
        let name = inner
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| peer_name(&chain));
        match name {
            Some(n) => Ok(Connection {
                inner,
                peer_name: n.into(),
                limits,
            }),
            None => {
                inner.close(
                    VarInt::from_u32(CLOSE_BAD_GREETING),
                    b"nameless certificate",
                );
                Err(TransportError::PeerCertificateRefused(
                    "the certificate carries no name".into(),
                ))
            }
        }
    }

    /// The authenticated peer's name: its certificate's common name.
    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Open a framed bidirectional stream. The peer only learns of it when we send the first
    /// byte, so the opener speaks first.
    pub async fn open_stream(&self) -> Result<FramedStream, TransportError> {
        let (send, recv) = self.inner.open_bi().await?;
        Ok(FramedStream::new(send, recv, self.limits))
    }

    /// Accept the next bidirectional stream the peer opened. Fails with
    /// [`TransportError::Closed`] once the connection is closed.
    pub async fn accept_stream(&self) -> Result<FramedStream, TransportError> {
        let (send, recv) = self.inner.accept_bi().await?;
        Ok(FramedStream::new(send, recv, self.limits))
    }

    /// Open a send-only stream.
    pub async fn open_uni(&self) -> Result<FrameWriter, TransportError> {
        Ok(FrameWriter::new(self.inner.open_uni().await?, self.limits))
    }

    /// Accept the next send-only stream the peer opened.
    pub async fn accept_uni(&self) -> Result<FrameReader, TransportError> {
        Ok(FrameReader::new(
            self.inner.accept_uni().await?,
            self.limits,
        ))
    }

    /// Close now. Data not yet delivered is lost: finish streams and wait for the peer's
    /// application-level acknowledgement first.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Wait until the connection is closed and say why.
    pub async fn closed(&self) -> TransportError {
        self.inner.closed().await.into()
    }

    /// The underlying quinn connection (statistics, raw streams for benchmarks).
    pub fn quinn(&self) -> &quinn::Connection {
        &self.inner
    }
}
