//! The bulk-throughput baseline: how fast raw quinn moves bytes over loopback with mutual TLS
//! and this transport's tuning, with and without BLAKE3 per chunk (1 MiB by default), and how
//! close the framed header-plus-payload path (what the migration protocol uses) gets to it.
//! The migration benchmark compares itself against [`Mode::Raw`] from the same run.

use super::endpoint::{CLOSE_OK, Endpoint, TransportOptions};
use super::error::TransportError;
use super::tls::TlsIdentity;
use crate::cert;
use bytes::Bytes;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

/// Default bytes per chunk written and hashed.
pub const CHUNK: usize = 1 << 20;

/// What a bulk run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One bidirectional stream, `write_chunk` of one chunk of `Bytes`; the receiver counts bytes from
    /// `read_chunk` until the end of the stream.
    Raw,
    /// As `Raw`, and both sides BLAKE3-hash every chunk (the receiver gathers it into a reused
    /// buffer first).
    RawBlake3,
    /// Per chunk: a 44-byte header frame (index, length, BLAKE3) then the chunk as raw payload;
    /// the receiver reads each chunk with `recv_payload`, hashes it and compares.
    FramedBlake3,
}

/// The result of one run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Bytes moved.
    pub bytes: u64,
    /// From opening the stream to receiving the receiver's acknowledgement.
    pub seconds: f64,
    /// CPU time of the whole process (every thread, both endpoints) over the same interval.
    pub cpu_seconds: f64,
}

impl Run {
    /// Throughput in MiB/s.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.seconds
    }
}

/// A throw-away cluster: a fresh CA and one identity per name, all in memory. Every identity
/// trusts the CA; certificates are valid for `localhost` and `127.0.0.1`.
pub fn ephemeral_cluster(names: &[&str]) -> Result<Vec<TlsIdentity>, TransportError> {
    let err = |e: cert::CertError| TransportError::TlsConfig(e.to_string());
    let ca = cert::new_ca(1).map_err(err)?;
    names
        .iter()
        .map(|n| {
            let p = cert::issue(&ca.cert_pem, &ca.key_pem, n, &cert::host_sans(n, &[]), 1)
                .map_err(err)?;
            TlsIdentity::from_pem(
                ca.cert_pem.as_bytes(),
                p.cert_pem.as_bytes(),
                p.key_pem.as_bytes(),
            )
        })
        .collect()
}

/// Move `data` from a client to a server endpoint over loopback in `mode`, written (and
/// hashed) in pieces of `chunk` bytes, each a slice of `data` (no copy). Must run inside a
/// multi-threaded tokio runtime (sender and receiver run concurrently).
pub async fn bulk(
    server_id: &TlsIdentity,
    client_id: &TlsIdentity,
    opts: &TransportOptions,
    data: Bytes,
    chunk: usize,
    mode: Mode,
) -> Result<Run, TransportError> {
    let bytes = data.len() as u64;
    let chunk = chunk.clamp(1, u32::MAX as usize);
    let server = Endpoint::server(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        server_id,
        opts.clone(),
    )?;
    let client = Endpoint::client(client_id, opts.clone())?;
    let addr = server.local_addr()?;
    let receiver = {
        let server = server.clone();
        tokio::spawn(async move {
            let incoming = server.accept().await.ok_or(TransportError::StreamClosed)?;
            let conn = incoming.establish().await?;
            let mut s = conn.accept_stream().await?;
            let (count, digest) = receive(&mut s, mode, chunk).await?;
            let mut ack = count.to_le_bytes().to_vec();
            ack.extend_from_slice(&digest);
            s.send_frame(&ack).await?;
            // Not `finish().await`: the client may close as soon as it has read this, before
            // acknowledging it at the QUIC level.
            s.writer.quinn().finish()?;
            // The client closes after reading the acknowledgement.
            let _ = conn.closed().await;
            Ok::<_, TransportError>(())
        })
    };

    let conn = client.connect(addr, "localhost").await?;
    let start = Instant::now();
    let cpu_start = process_cpu_seconds();
    let mut s = conn.open_stream().await?;
    let mut digest = [0u8; 32];
    let mut sent = 0u64;
    let mut index = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk as u64) as usize;
        let piece = data.slice(sent as usize..sent as usize + n);
        match mode {
            Mode::Raw => s.send_payload(piece).await?,
            Mode::RawBlake3 => {
                xor(&mut digest, blake3::hash(&piece).as_bytes());
                s.send_payload(piece).await?;
            }
            Mode::FramedBlake3 => {
                let h = blake3::hash(&piece);
                xor(&mut digest, h.as_bytes());
                let mut header = [0u8; 44];
                header[..8].copy_from_slice(&index.to_le_bytes());
                header[8..12].copy_from_slice(&(n as u32).to_le_bytes());
                header[12..].copy_from_slice(h.as_bytes());
                s.send_frame(&header).await?;
                s.send_payload(piece).await?;
            }
        }
        sent += n as u64;
        index += 1;
    }
    s.writer.quinn().finish()?;
    let ack = s.recv_frame().await?.ok_or(TransportError::Truncated {
        what: "acknowledgement",
        expected: 40,
        got: 0,
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds() - cpu_start;
    conn.close(CLOSE_OK, "done");
    let got = ack
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if got != Some(bytes) || (mode != Mode::Raw && ack.get(8..40) != Some(&digest[..])) {
        return Err(TransportError::NotBitferry(format!(
            "bench receiver acknowledged {got:?} bytes (or a different digest), sent {bytes}"
        )));
    }
    receiver
        .await
        .map_err(|e| TransportError::Io(std::io::Error::other(e)))??;
    client.wait_idle().await;
    server.close(CLOSE_OK, "done");
    server.wait_idle().await;
    Ok(Run {
        bytes,
        seconds,
        cpu_seconds,
    })
}

/// CPU seconds this process has used so far, all threads (`CLOCK_PROCESS_CPUTIME_ID`). On a
/// machine whose cores are all busy, throughput follows CPU time, and CPU time is far less
/// noisy than wall time on a shared machine: the benchmarks report both.
pub fn process_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// The receiving side: returns the byte count and the XOR of the chunk hashes.
async fn receive(
    s: &mut super::FramedStream,
    mode: Mode,
    chunk: usize,
) -> Result<(u64, [u8; 32]), TransportError> {
    let mut count = 0u64;
    let mut digest = [0u8; 32];
    match mode {
        Mode::Raw | Mode::RawBlake3 => {
            let hash = mode == Mode::RawBlake3;
            // Gather each chunk, then hash it in one call: BLAKE3's SIMD needs many KiB at once,
            // and packet-sized `update`s run at a fraction of its speed.
            let mut buf = Vec::with_capacity(if hash { chunk } else { 0 });
            while let Some(c) = s.reader.quinn().read_chunk(usize::MAX, true).await? {
                count += c.bytes.len() as u64;
                if !hash {
                    continue;
                }
                let mut b = &c.bytes[..];
                while !b.is_empty() {
                    let take = b.len().min(chunk - buf.len());
                    buf.extend_from_slice(&b[..take]);
                    b = &b[take..];
                    if buf.len() == chunk {
                        xor(&mut digest, blake3::hash(&buf).as_bytes());
                        buf.clear();
                    }
                }
            }
            if hash && !buf.is_empty() {
                xor(&mut digest, blake3::hash(&buf).as_bytes());
            }
        }
        Mode::FramedBlake3 => {
            let mut header = Vec::with_capacity(64);
            while s.recv_frame_into(&mut header).await? {
                if header.len() != 44 {
                    return Err(TransportError::NotBitferry("bad bench header".into()));
                }
                let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
                let payload = s.recv_payload(len).await?;
                let h = blake3::hash(&payload);
                if h.as_bytes()[..] != header[12..44] {
                    return Err(TransportError::NotBitferry(
                        "bench chunk hash mismatch".into(),
                    ));
                }
                xor(&mut digest, h.as_bytes());
                count += len as u64;
            }
        }
    }
    Ok((count, digest))
}

fn xor(acc: &mut [u8; 32], h: &[u8; 32]) {
    for (a, b) in acc.iter_mut().zip(h) {
        *a ^= b;
    }
}

/// `len` incompressible-looking bytes to send (QUIC does not compress, but hashing all-zero
/// pages could be unrealistically cache-friendly).
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
