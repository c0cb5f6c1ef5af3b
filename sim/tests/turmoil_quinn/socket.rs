//! quinn's `AsyncUdpSocket` over turmoil's simulated UDP, with seeded packet loss.
//!
//! Why a pump task: turmoil's socket only offers `async` receives, while quinn polls
//! (`poll_recv`). A task per socket moves datagrams from turmoil into a channel that
//! `poll_recv` polls. Sends are synchronous in turmoil (`try_send_to` enqueues on the simulated
//! link), so `try_send` needs no poller; turmoil never applies back-pressure.
//!
//! Why every failure is swallowed: quinn treats any `try_send` error other than `WouldBlock` as
//! fatal for the connection, and most `poll_recv` errors as fatal for the endpoint. A real
//! network drops packets silently, so the adapter does too (and counts them).

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Faults shared by the two sockets of one run, and what they did.
#[derive(Debug, Default)]
pub struct Faults {
    /// Probability that a sent datagram is dropped.
    pub loss: f64,
    /// Set by the simulation loop while turmoil partitions the link (for counting only: turmoil
    /// itself drops the datagrams).
    pub partitioned: AtomicBool,
    /// Set by the destination driver when a Switchover message arrived (partitions can be
    /// timed from it).
    pub switch_seen: AtomicBool,
    /// Datagrams handed to the socket.
    pub sent: AtomicU64,
    /// Datagrams dropped by the random loss.
    pub lost: AtomicU64,
    /// Datagrams sent while the link was partitioned (dropped by turmoil).
    pub cut: AtomicU64,
    /// Datagrams turmoil refused to send (should stay 0).
    pub send_errors: AtomicU64,
}

impl Faults {
    /// Faults with this loss rate.
    pub fn new(loss: f64) -> Self {
        Faults {
            loss,
            ..Default::default()
        }
    }
}

/// A turmoil UDP socket seen by quinn.
#[derive(Debug)]
pub struct SimSocket {
    inner: Arc<turmoil::net::UdpSocket>,
    local: SocketAddr,
    rx: Mutex<mpsc::UnboundedReceiver<(Bytes, SocketAddr)>>,
    rng: Mutex<StdRng>,
    faults: Arc<Faults>,
}

impl SimSocket {
    /// Bind `addr` on the current turmoil host and start the receive pump. `seed` drives this
    /// socket's loss decisions.
    pub async fn bind(addr: SocketAddr, faults: Arc<Faults>, seed: u64) -> io::Result<Arc<Self>> {
        let inner = Arc::new(turmoil::net::UdpSocket::bind(addr).await?);
        let local = inner.local_addr()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let pump = inner.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            // Ends when the endpoint (and with it the receiver) is gone.
            while let Ok((n, from)) = pump.recv_from(&mut buf).await {
                if tx.send((Bytes::copy_from_slice(&buf[..n]), from)).is_err() {
                    break;
                }
            }
        });
        Ok(Arc::new(SimSocket {
            inner,
            local,
            rx: Mutex::new(rx),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            faults,
        }))
    }
}

/// turmoil sockets are always writable.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let f = &self.faults;
        f.sent.fetch_add(1, Ordering::Relaxed);
        if f.partitioned.load(Ordering::Relaxed) {
            f.cut.fetch_add(1, Ordering::Relaxed);
        }
        let drop = f.loss > 0.0 && self.rng.lock().expect("rng").random_bool(f.loss);
        if std::env::var_os("BITFERRY_TURMOIL_TRACE").is_some() {
            eprintln!(
                "{:?} {} -> {} {} bytes{}{}",
                turmoil::sim_elapsed(),
                self.local,
                t.destination,
                t.contents.len(),
                if drop { " LOST" } else { "" },
                if f.partitioned.load(Ordering::Relaxed) {
                    " CUT"
                } else {
                    ""
                },
            );
        }
        if drop {
            f.lost.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if self.inner.try_send_to(t.contents, t.destination).is_err() {
            f.send_errors.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.rx.lock().expect("rx");
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let (data, from) = match rx.poll_recv(cx) {
                Poll::Ready(Some(d)) => d,
                // The pump ended: nothing will ever arrive again; stay pending, like a quiet
                // network (an error here would kill the endpoint).
                Poll::Ready(None) | Poll::Pending => break,
            };
            let len = data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&data[..len]);
            meta[n] = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if n == 0 {
            Poll::Pending
        } else {
            Poll::Ready(Ok(n))
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
