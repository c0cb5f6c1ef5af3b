//! The network: QUIC's reliable ordered stream modelled over an unreliable packet layer.
//!
//! Each connection carries one bidirectional byte stream. Senders cut their stream into
//! segments (stream offset = sequence number) inside a window, receivers reassemble in order,
//! buffer out-of-order segments, drop duplicates and answer with cumulative acks. Packets are
//! lost, duplicated, delayed with jitter (so they reorder) and corrupted (the transport's
//! integrity check drops them, so corruption looks like loss); partitions are decided by the
//! world at delivery time. Unacked data is resent after a timeout (go-back-N from the ack), a
//! keep-alive runs while the stream is idle, and an end that has heard nothing for
//! [`IDLE_TIMEOUT`] declares the peer lost — like QUIC's idle timeout.

use rand::Rng;
use rand::rngs::StdRng;
use std::collections::BTreeMap;

/// Maximum segment size.
pub const MSS: usize = 1200;
/// Bytes in flight per direction.
pub const WINDOW: u64 = 64 * 1024;
/// Retransmission timeout (µs).
pub const RTO: u64 = 8_000;
/// How often each end runs its timers (µs).
pub const TICK: u64 = 4_000;
/// Send a keep-alive when nothing was sent for this long (µs).
pub const KEEPALIVE: u64 = 20_000;
/// An end that heard nothing for this long closes with "peer lost" (µs).
pub const IDLE_TIMEOUT: u64 = 100_000;

/// Packet-layer fault rates and delays.
#[derive(Debug, Clone, Copy)]
pub struct NetParams {
    /// Probability a packet is lost.
    pub loss: f64,
    /// Probability a packet is delivered twice.
    pub dup: f64,
    /// Probability a packet is corrupted (dropped by the receiver's integrity check).
    pub corrupt: f64,
    /// Minimum one-way delay (µs).
    pub latency: u64,
    /// Extra random delay per packet, 0 ..= jitter (µs); packets reorder.
    pub jitter: u64,
}

impl NetParams {
    /// A perfect network (after the fault window).
    pub fn calm(latency: u64) -> Self {
        NetParams {
            loss: 0.0,
            dup: 0.0,
            corrupt: 0.0,
            latency,
            jitter: 0,
        }
    }
}

/// One packet in flight.
#[derive(Debug, Clone)]
pub struct Packet {
    /// Connection id.
    pub conn: u64,
    /// Receiving end (0 = the end that connected, 1 = the accepting end).
    pub to: usize,
    /// Stream data: (offset, bytes).
    pub seg: Option<(u64, Vec<u8>)>,
    /// Cumulative ack: the sender has received every byte before this offset.
    pub ack: u64,
    /// Corrupted on the way: the receiver's integrity check drops it.
    pub bad: bool,
}

/// One end of a connection.
#[derive(Debug)]
pub struct End {
    /// The host this end lives on.
    pub host: usize,
    /// False once the host crashed or the end closed.
    pub alive: bool,
    /// The session above has ended; the end only flushes what it still owes.
    pub session_done: bool,
    out: Vec<u8>,
    out_base: u64,
    acked: u64,
    next: u64,
    rto_at: Option<u64>,
    recv_next: u64,
    ooo: BTreeMap<u64, Vec<u8>>,
    last_heard: u64,
    last_sent: u64,
}

impl End {
    fn new(host: usize, alive: bool, now: u64) -> Self {
        End {
            host,
            alive,
            session_done: false,
            out: Vec::new(),
            out_base: 0,
            acked: 0,
            next: 0,
            rto_at: None,
            recv_next: 0,
            ooo: BTreeMap::new(),
            last_heard: now,
            last_sent: now,
        }
    }

    fn out_end(&self) -> u64 {
        self.out_base + self.out.len() as u64
    }

    /// Everything written was acknowledged by the peer.
    pub fn all_acked(&self) -> bool {
        self.acked >= self.out_end()
    }
}

/// What a timer tick decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickResult {
    /// Nothing to report.
    Ok,
    /// The idle timeout expired: the peer is lost.
    Lost,
}

/// A connection between two hosts.
#[derive(Debug)]
pub struct Conn {
    /// Its id.
    pub id: u64,
    /// End 0 connected; end 1 accepted.
    pub ends: [End; 2],
}

impl Conn {
    /// A new connection from host `a` to host `b`; `b_alive` is false if nobody listens there.
    pub fn new(id: u64, a: usize, b: usize, b_alive: bool, now: u64) -> Self {
        Conn {
            id,
            ends: [End::new(a, true, now), End::new(b, b_alive, now)],
        }
    }

    /// The application on end `side` writes `bytes` to the stream.
    pub fn write(&mut self, side: usize, bytes: &[u8], ctx: &mut NetCtx<'_>) {
        if !self.ends[side].alive {
            return;
        }
        self.ends[side].out.extend_from_slice(bytes);
        self.transmit(side, ctx);
    }

    fn transmit(&mut self, side: usize, ctx: &mut NetCtx<'_>) {
        loop {
            let e = &mut self.ends[side];
            let end = e.out_end();
            if e.next >= end || e.next - e.acked >= WINDOW {
                return;
            }
            let len = (end - e.next).min(MSS as u64);
            let at = (e.next - e.out_base) as usize;
            let data = e.out[at..at + len as usize].to_vec();
            let off = e.next;
            e.next += len;
            if e.rto_at.is_none() {
                e.rto_at = Some(ctx.now + RTO);
            }
            self.emit(side, Some((off, data)), ctx);
        }
    }

    fn emit(&mut self, side: usize, seg: Option<(u64, Vec<u8>)>, ctx: &mut NetCtx<'_>) {
        let e = &mut self.ends[side];
        e.last_sent = ctx.now;
        let pkt = Packet {
            conn: self.id,
            to: 1 - side,
            seg,
            ack: e.recv_next,
            bad: false,
        };
        let p = ctx.params;
        if ctx.rng.random_bool(p.loss) {
            return;
        }
        let copies = if ctx.rng.random_bool(p.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let mut pkt = pkt.clone();
            pkt.bad = ctx.rng.random_bool(p.corrupt);
            let delay = p.latency + ctx.rng.random_range(0..=p.jitter);
            ctx.out.push((ctx.now + delay, pkt));
        }
    }

    /// A packet arrives at end `pkt.to`. Returns the stream bytes that became deliverable, in
    /// order.
    pub fn receive(&mut self, pkt: Packet, ctx: &mut NetCtx<'_>) -> Vec<u8> {
        let side = pkt.to;
        let e = &mut self.ends[side];
        if !e.alive || pkt.bad {
            return Vec::new();
        }
        e.last_heard = ctx.now;
        if pkt.ack > e.acked && pkt.ack <= e.out_end() {
            let drop = (pkt.ack - e.out_base) as usize;
            e.out.drain(..drop);
            e.out_base = pkt.ack;
            e.acked = pkt.ack;
            if e.next < e.acked {
                e.next = e.acked;
            }
            e.rto_at = if e.all_acked() {
                None
            } else {
                Some(ctx.now + RTO)
            };
        }
        let mut delivered = Vec::new();
        let had_seg = pkt.seg.is_some();
        if let Some((off, data)) = pkt.seg {
            let end = off + data.len() as u64;
            if end > e.recv_next {
                let keep = e.ooo.get(&off).is_none_or(|d| d.len() < data.len());
                if keep {
                    e.ooo.insert(off, data);
                }
            }
            while let Some((&o, _)) = e.ooo.first_key_value() {
                if o > e.recv_next {
                    break;
                }
                let (o, d) = e.ooo.pop_first().expect("non-empty");
                let end = o + d.len() as u64;
                if end > e.recv_next {
                    delivered.extend_from_slice(&d[(e.recv_next - o) as usize..]);
                    e.recv_next = end;
                }
            }
        }
        if had_seg {
            self.emit(side, None, ctx);
        }
        self.transmit(side, ctx);
        delivered
    }

    /// Run end `side`'s timers.
    pub fn tick(&mut self, side: usize, ctx: &mut NetCtx<'_>) -> TickResult {
        let e = &mut self.ends[side];
        if !e.alive {
            return TickResult::Ok;
        }
        if ctx.now.saturating_sub(e.last_heard) >= IDLE_TIMEOUT {
            e.alive = false;
            return TickResult::Lost;
        }
        if e.rto_at.is_some_and(|t| t <= ctx.now) && !e.all_acked() {
            e.next = e.acked;
            e.rto_at = Some(ctx.now + RTO);
            self.transmit(side, ctx);
        }
        if ctx.now.saturating_sub(self.ends[side].last_sent) >= KEEPALIVE {
            self.emit(side, None, ctx);
        }
        TickResult::Ok
    }
}

/// What the network needs from the world for one operation.
pub struct NetCtx<'a> {
    /// Virtual time (µs).
    pub now: u64,
    /// The world's only RNG.
    pub rng: &'a mut StdRng,
    /// Current fault rates.
    pub params: NetParams,
    /// Packets to schedule: (delivery time, packet).
    pub out: &'a mut Vec<(u64, Packet)>,
}
