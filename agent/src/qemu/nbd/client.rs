//! A small NBD client: handshake, block status, reads, over a unix or TCP socket.
//!
//! One request is in flight at a time (`&mut self`), which keeps the reply parser simple and
//! every reply's handle checkable. Every exchange has a deadline. An error that leaves the
//! byte stream out of step (a protocol violation, a timeout, a socket error) makes the
//! connection unusable ([`NbdError::Broken`] afterwards); errors the server reports in step
//! ([`NbdError::Server`]) and refused requests ([`NbdError::InvalidRequest`]) do not.

use super::error::{NbdError, ProtoError};
use super::proto::{self, Chunk, ChunkHeader, Coverage, Info, ReplyHeader, Request};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use wire::Extent;

/// The `base:allocation` metadata context (holes and zeros).
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The metadata context of QEMU dirty bitmap `name` on the export.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// Longest block status request: 4 GiB − 64 MiB, a multiple of every bitmap granularity, so
/// pages that start aligned stay aligned.
const MAX_BLOCK_STATUS_REQUEST: u32 = 0xfc00_0000;

/// What to ask the server for.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Export name (`""` is the default export, e.g. of `qemu-nbd` without `-x`).
    pub export: String,
    /// Metadata contexts to select; each must be offered or connecting fails
    /// ([`NbdError::NoSuchContext`]).
    pub meta_contexts: Vec<String>,
    /// Deadline of the handshake and of each request's whole exchange.
    pub timeout: Duration,
}

impl NbdOptions {
    /// Options for `export` with no metadata context and a 30 s deadline.
    pub fn new(export: &str) -> NbdOptions {
        NbdOptions {
            export: export.to_string(),
            meta_contexts: Vec::new(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Also select metadata context `name`.
    pub fn context(mut self, name: impl Into<String>) -> NbdOptions {
        self.meta_contexts.push(name.into());
        self
    }
}

/// What the server said about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::TFLAG_*`).
    pub flags: u16,
    /// Minimum block size (1 if the server sent none).
    pub min_block: u32,
    /// Preferred block size (4096 if the server sent none).
    pub preferred_block: u32,
    /// Maximum request payload (32 MiB if the server sent none).
    pub max_block: u32,
}

impl ExportInfo {
    /// True if the server says the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & proto::TFLAG_READ_ONLY != 0
    }
}

/// A run of bytes with one `base:allocation` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// Not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// A connected NBD client in the transmission phase.
pub struct NbdClient<S> {
    io: BufReader<S>,
    export: ExportInfo,
    contexts: Vec<(u32, String)>,
    timeout: Duration,
    next_handle: u64,
    broken: Option<String>,
}

impl<S> std::fmt::Debug for NbdClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.export)
            .field("contexts", &self.contexts)
            .field("broken", &self.broken)
            .finish()
    }
}

fn io_err(during: &'static str) -> impl Fn(io::Error) -> NbdError {
    move |e| {
        if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
        ) {
            NbdError::Disconnected { during }
        } else {
            NbdError::Io {
                during,
                source: Arc::new(e),
            }
        }
    }
}

fn opt_name(option: u32) -> &'static str {
    match option {
        proto::OPT_GO => "NBD_OPT_GO",
        proto::OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        proto::OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "NBD option",
    }
}

impl NbdClient<UnixStream> {
    /// Connect to a unix socket (e.g. `qemu-nbd -k PATH`) and run the handshake.
    pub async fn connect_unix(path: impl AsRef<Path>, opts: &NbdOptions) -> Result<Self, NbdError> {
        let path = path.as_ref();
        let s = tokio::time::timeout(opts.timeout, UnixStream::connect(path))
            .await
            .map_err(|_| NbdError::Timeout {
                during: "connect",
                after: opts.timeout,
            })?
            .map_err(|e| NbdError::Connect {
                target: path.display().to_string(),
                source: Arc::new(e),
            })?;
        NbdClient::handshake(s, opts).await
    }
}

impl NbdClient<TcpStream> {
    /// Connect over TCP and run the handshake.
    pub async fn connect_tcp(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        opts: &NbdOptions,
    ) -> Result<Self, NbdError> {
        let target = format!("{addr:?}");
        let s = tokio::time::timeout(opts.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| NbdError::Timeout {
                during: "connect",
                after: opts.timeout,
            })?
            .map_err(|e| NbdError::Connect {
                target,
                source: Arc::new(e),
            })?;
        let _ = s.set_nodelay(true);
        NbdClient::handshake(s, opts).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> NbdClient<S> {
    /// Run the fixed newstyle handshake over a connected stream: structured replies, the
    /// metadata contexts, then `NBD_OPT_GO` for the export.
    pub async fn handshake(stream: S, opts: &NbdOptions) -> Result<Self, NbdError> {
        let mut c = NbdClient {
            io: BufReader::with_capacity(256 << 10, stream),
            export: ExportInfo {
                name: opts.export.clone(),
                size: 0,
                flags: 0,
                min_block: 1,
                preferred_block: 4096,
                max_block: proto::MAX_READ,
            },
            contexts: Vec::new(),
            timeout: opts.timeout,
            next_handle: 1,
            broken: None,
        };
        let r = tokio::time::timeout(opts.timeout, c.negotiate(opts))
            .await
            .unwrap_or(Err(NbdError::Timeout {
                during: "handshake",
                after: opts.timeout,
            }));
        if let Err(e) = r {
            // The server answered in step but we cannot go on: end the session the polite
            // way (a soft disconnect), without waiting for its acknowledgement.
            if matches!(
                e,
                NbdError::NoSuchContext { .. }
                    | NbdError::OptionRefused { .. }
                    | NbdError::InvalidRequest(_)
            ) {
                let abort = proto::encode_option(proto::OPT_ABORT, &[]);
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), c.write(&abort, "handshake"))
                        .await;
            }
            return Err(e);
        }
        Ok(c)
    }

    async fn negotiate(&mut self, opts: &NbdOptions) -> Result<(), NbdError> {
        let mut hello = [0u8; proto::SERVER_HELLO_LEN];
        self.io
            .read_exact(&mut hello)
            .await
            .map_err(io_err("handshake"))?;
        let flags = proto::parse_server_hello(&hello)?;
        if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Unsupported(
                "server does not speak the fixed newstyle handshake".into(),
            ));
        }
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if flags & proto::FLAG_NO_ZEROES != 0 {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        self.write(&cflags.to_be_bytes(), "handshake").await?;

        self.send_option(proto::OPT_STRUCTURED_REPLY, &[]).await?;
        let (rep, _) = self.option_reply(proto::OPT_STRUCTURED_REPLY).await?;
        match rep {
            proto::REP_ACK => {}
            proto::REP_ERR_UNSUP => {
                return Err(NbdError::Unsupported(
                    "server has no structured replies (needed for block status)".into(),
                ));
            }
            other => return Err(self.unexpected_reply(proto::OPT_STRUCTURED_REPLY, other)),
        }

        if !opts.meta_contexts.is_empty() {
            let data = proto::encode_meta_context_query(&opts.export, &opts.meta_contexts)
                .map_err(NbdError::InvalidRequest)?;
            self.send_option(proto::OPT_SET_META_CONTEXT, &data).await?;
            loop {
                let (rep, payload) = self.option_reply(proto::OPT_SET_META_CONTEXT).await?;
                match rep {
                    proto::REP_ACK => break,
                    proto::REP_META_CONTEXT => {
                        let (id, name) = proto::parse_meta_context(&payload)?;
                        if !opts.meta_contexts.contains(&name) {
                            return Err(ProtoError::malformed(
                                "meta context reply",
                                format!("context {name:?} was not asked for"),
                            )
                            .into());
                        }
                        if self.contexts.iter().any(|(i, n)| *i == id || *n == name) {
                            return Err(ProtoError::malformed(
                                "meta context reply",
                                format!("context {name:?} (id {id}) granted twice"),
                            )
                            .into());
                        }
                        self.contexts.push((id, name));
                    }
                    other => return Err(self.unexpected_reply(proto::OPT_SET_META_CONTEXT, other)),
                }
            }
            for want in &opts.meta_contexts {
                if !self.contexts.iter().any(|(_, n)| n == want) {
                    return Err(NbdError::NoSuchContext { name: want.clone() });
                }
            }
        }

        let data = proto::encode_go(&opts.export, &[]).map_err(NbdError::InvalidRequest)?;
        self.send_option(proto::OPT_GO, &data).await?;
        let mut export = None;
        loop {
            let (rep, payload) = self.option_reply(proto::OPT_GO).await?;
            match rep {
                proto::REP_ACK => break,
                proto::REP_INFO => match proto::parse_info(&payload)? {
                    Info::Export { size, flags } => export = Some((size, flags)),
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        self.export.min_block = min;
                        self.export.preferred_block = preferred;
                        self.export.max_block = max;
                    }
                    Info::Other(_) => {}
                },
                other => return Err(self.unexpected_reply(proto::OPT_GO, other)),
            }
        }
        let Some((size, flags)) = export else {
            return Err(ProtoError::malformed("NBD_OPT_GO", "ACK without NBD_INFO_EXPORT").into());
        };
        self.export.size = size;
        self.export.flags = flags;
        Ok(())
    }

    /// An error or unexpected option reply. The payload of an error is its message.
    fn unexpected_reply(&self, option: u32, reply: u32) -> NbdError {
        if reply & proto::REP_ERR_BIT != 0 {
            NbdError::OptionRefused {
                option: opt_name(option),
                reply,
                message: String::new(),
            }
        } else {
            ProtoError::malformed(
                "option reply",
                format!("reply type {reply} to {}", opt_name(option)),
            )
            .into()
        }
    }

    async fn write(&mut self, bytes: &[u8], during: &'static str) -> Result<(), NbdError> {
        let w = self.io.get_mut();
        w.write_all(bytes).await.map_err(io_err(during))?;
        w.flush().await.map_err(io_err(during))
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        self.write(&proto::encode_option(option, data), "handshake")
            .await
    }

    /// Read one option reply to `option`; errors with a message become `OptionRefused`.
    async fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        self.io
            .read_exact(&mut h)
            .await
            .map_err(io_err("handshake"))?;
        let r = proto::parse_option_reply(&h)?;
        if r.option != option {
            return Err(ProtoError::malformed(
                "option reply",
                format!("answers option {} while {} was sent", r.option, option),
            )
            .into());
        }
        let mut payload = vec![0u8; r.length as usize];
        self.io
            .read_exact(&mut payload)
            .await
            .map_err(io_err("handshake"))?;
        if r.reply & proto::REP_ERR_BIT != 0 && r.reply != proto::REP_ERR_UNSUP {
            return Err(NbdError::OptionRefused {
                option: opt_name(option),
                reply: r.reply,
                message: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        Ok((r.reply, payload))
    }

    /// The export's properties.
    pub fn export(&self) -> &ExportInfo {
        &self.export
    }

    /// The id the server gave metadata context `name`, if it was negotiated.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(i, _)| *i)
    }

    fn usable(&self) -> Result<(), NbdError> {
        match &self.broken {
            Some(why) => Err(NbdError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.export.size => Ok(()),
            _ => Err(NbdError::InvalidRequest(format!(
                "range {offset}+{len} is past the export's end ({} bytes)",
                self.export.size
            ))),
        }
    }

    /// Run one exchange under the deadline; an error that leaves the stream out of step
    /// breaks the connection.
    async fn exchange<T>(
        &mut self,
        during: &'static str,
        f: impl AsyncFnOnce(&mut Self) -> Result<T, NbdError>,
    ) -> Result<T, NbdError> {
        self.usable()?;
        let after = self.timeout;
        let r = match tokio::time::timeout(after, f(self)).await {
            Ok(r) => r,
            Err(_) => Err(NbdError::Timeout { during, after }),
        };
        if let Err(e) = &r
            && !e.is_recoverable()
        {
            self.broken = Some(e.to_string());
        }
        r
    }

    fn handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        h
    }

    async fn send_request(
        &mut self,
        command: u16,
        handle: u64,
        offset: u64,
        length: u32,
        during: &'static str,
    ) -> Result<(), NbdError> {
        let r = proto::encode_request(&Request {
            flags: 0,
            command,
            handle,
            offset,
            length,
        });
        self.write(&r, during).await
    }

    /// Read the next reply header and check it answers `handle`.
    async fn reply_header(
        &mut self,
        handle: u64,
        during: &'static str,
    ) -> Result<ReplyHeader, NbdError> {
        let mut b = [0u8; proto::STRUCTURED_HEADER_LEN];
        self.io
            .read_exact(&mut b[..4])
            .await
            .map_err(io_err(during))?;
        let rest = proto::reply_header_rest(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))?;
        self.io
            .read_exact(&mut b[4..4 + rest])
            .await
            .map_err(io_err(during))?;
        let h = proto::parse_reply_header(&b[..4 + rest])?;
        if h.handle() != handle {
            return Err(ProtoError::UnexpectedHandle {
                expected: handle,
                got: h.handle(),
            }
            .into());
        }
        Ok(h)
    }

    async fn payload(
        &mut self,
        h: &ChunkHeader,
        during: &'static str,
    ) -> Result<Vec<u8>, NbdError> {
        // The length was bounded by `check_chunk_length` before this allocation.
        let mut p = vec![0u8; h.length as usize];
        self.io.read_exact(&mut p).await.map_err(io_err(during))?;
        Ok(p)
    }

    /// One `NBD_CMD_BLOCK_STATUS` of `[offset, offset + length)`: for every negotiated
    /// context, its `(length, flags)` descriptors from `offset` on, as the server sent them
    /// (they may cover less than asked; the last may reach past the request).
    pub async fn block_status(
        &mut self,
        offset: u64,
        length: u32,
    ) -> Result<Vec<(u32, Vec<(u32, u32)>)>, NbdError> {
        if self.contexts.is_empty() {
            return Err(NbdError::InvalidRequest(
                "block status needs a metadata context (NbdOptions::context)".into(),
            ));
        }
        if length == 0 {
            return Err(NbdError::InvalidRequest("block status of 0 bytes".into()));
        }
        self.check_range(offset, length.into())?;
        self.exchange("block status", async move |c: &mut Self| {
            const DURING: &str = "block status";
            let handle = c.handle();
            c.send_request(proto::CMD_BLOCK_STATUS, handle, offset, length, DURING)
                .await?;
            let mut out: Vec<(u32, Vec<(u32, u32)>)> = Vec::new();
            let mut failed = None;
            loop {
                let h = match c.reply_header(handle, DURING).await? {
                    ReplyHeader::Simple { errno: 0, .. } => {
                        return Err(ProtoError::malformed(
                            "block status reply",
                            "simple reply without an error",
                        )
                        .into());
                    }
                    ReplyHeader::Simple { errno, .. } => {
                        return Err(NbdError::Server {
                            command: "NBD_CMD_BLOCK_STATUS",
                            errno,
                            message: String::new(),
                        });
                    }
                    ReplyHeader::Chunk(h) => h,
                };
                proto::check_chunk_length(&h, length)?;
                if matches!(
                    h.kind,
                    proto::REPLY_TYPE_OFFSET_DATA | proto::REPLY_TYPE_OFFSET_HOLE
                ) {
                    return Err(ProtoError::UnexpectedChunk {
                        command: "NBD_CMD_BLOCK_STATUS",
                        kind: h.kind,
                    }
                    .into());
                }
                let p = c.payload(&h, DURING).await?;
                match proto::parse_chunk_payload(&h, &p)? {
                    Chunk::BlockStatus { context, extents } => {
                        if !c.contexts.iter().any(|(i, _)| *i == context) {
                            return Err(ProtoError::malformed(
                                "block status reply",
                                format!("descriptors for context id {context}, never negotiated"),
                            )
                            .into());
                        }
                        if out.iter().any(|(i, _)| *i == context) {
                            return Err(ProtoError::malformed(
                                "block status reply",
                                format!("two chunks for context id {context}"),
                            )
                            .into());
                        }
                        out.push((context, extents));
                    }
                    Chunk::Error { errno, message, .. } => {
                        failed.get_or_insert((errno, message));
                    }
                    Chunk::None => {}
                    Chunk::OffsetData { .. } | Chunk::OffsetHole { .. } => {
                        return Err(ProtoError::UnexpectedChunk {
                            command: "NBD_CMD_BLOCK_STATUS",
                            kind: h.kind,
                        }
                        .into());
                    }
                }
                if h.done() {
                    break;
                }
            }
            if let Some((errno, message)) = failed {
                return Err(NbdError::Server {
                    command: "NBD_CMD_BLOCK_STATUS",
                    errno,
                    message,
                });
            }
            if let Some((_, n)) = c
                .contexts
                .iter()
                .find(|(i, _)| !out.iter().any(|(o, _)| o == i))
            {
                return Err(ProtoError::malformed(
                    "block status reply",
                    format!("no descriptors for context {n:?}"),
                )
                .into());
            }
            Ok(out)
        })
        .await
    }

    /// Walk `[offset, offset + length)` with block status of `context`, calling
    /// `f(offset, length, flags)` for consecutive runs (as the server reports them, clipped
    /// to the range). Pages with as many requests as needed; every reply advances.
    pub async fn walk(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
        mut f: impl FnMut(u64, u64, u32),
    ) -> Result<(), NbdError> {
        let Some(id) = self.context_id(context) else {
            return Err(NbdError::InvalidRequest(format!(
                "metadata context {context:?} was not negotiated"
            )));
        };
        self.check_range(offset, length)?;
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let req = (end - pos).min(MAX_BLOCK_STATUS_REQUEST.into()) as u32;
            let req_end = pos + u64::from(req);
            let reply = self.block_status(pos, req).await?;
            let extents = reply
                .into_iter()
                .find(|(i, _)| *i == id)
                .map(|(_, e)| e)
                .unwrap_or_default();
            for (len, flags) in extents {
                if pos >= req_end {
                    break;
                }
                let len = u64::from(len).min(req_end - pos);
                f(pos, len, flags);
                pos += len;
            }
        }
        Ok(())
    }

    /// Every dirty run of `context` (a `qemu:dirty-bitmap:NAME` context: status bit 0) over
    /// the whole export, adjacent runs merged, clipped to the export size — the same form as
    /// `bitferry qcow2 list` and `bitmap show` print.
    pub async fn dirty_extents(&mut self, context: &str) -> Result<Vec<Extent>, NbdError> {
        let mut out: Vec<Extent> = Vec::new();
        let size = self.export.size;
        self.walk(context, 0, size, |off, len, flags| {
            if flags & proto::STATE_DIRTY == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.offset + last.length == off => last.length += len,
                _ => out.push(Extent {
                    offset: off,
                    length: len,
                }),
            }
        })
        .await?;
        Ok(out)
    }

    /// `base:allocation` status of `[offset, offset + length)`: runs with their hole and zero
    /// bits, adjacent runs of equal status merged. Needs [`BASE_ALLOCATION`] negotiated.
    pub async fn allocation(
        &mut self,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Allocation>, NbdError> {
        let mut out: Vec<Allocation> = Vec::new();
        self.walk(BASE_ALLOCATION, offset, length, |off, len, flags| {
            let hole = flags & proto::STATE_HOLE != 0;
            let zero = flags & proto::STATE_ZERO != 0;
            match out.last_mut() {
                Some(last)
                    if last.hole == hole
                        && last.zero == zero
                        && last.offset + last.length == off =>
                {
                    last.length += len
                }
                _ => out.push(Allocation {
                    offset: off,
                    length: len,
                    hole,
                    zero,
                }),
            }
        })
        .await?;
        Ok(out)
    }

    /// Read `buf.len()` bytes at `offset`; holes the server reports read as zeros. Split into
    /// requests no larger than the server's maximum block size and 32 MiB.
    pub async fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_range(offset, buf.len() as u64)?;
        let mut piece = self.export.max_block.min(proto::MAX_READ);
        let min = self.export.min_block.max(1);
        if piece >= min {
            piece -= piece % min;
        }
        let piece = piece.max(1) as usize;
        let mut done = 0usize;
        for chunk in buf.chunks_mut(piece) {
            let at = offset + done as u64;
            done += chunk.len();
            self.read_one(at, chunk).await?;
        }
        Ok(())
    }

    async fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let length = buf.len() as u32;
        if length == 0 {
            return Ok(());
        }
        self.exchange("read", async move |c: &mut Self| {
            const DURING: &str = "read";
            let handle = c.handle();
            c.send_request(proto::CMD_READ, handle, offset, length, DURING)
                .await?;
            let mut cov = Coverage::new();
            let mut failed = None;
            loop {
                let h = match c.reply_header(handle, DURING).await? {
                    // Structured replies forbid a simple reply to a read; one with an error
                    // carries no data, so the stream is still in step.
                    ReplyHeader::Simple { errno, .. } if errno != 0 => {
                        return Err(NbdError::Server {
                            command: "NBD_CMD_READ",
                            errno,
                            message: String::new(),
                        });
                    }
                    ReplyHeader::Simple { .. } => {
                        return Err(ProtoError::malformed(
                            "read reply",
                            "simple reply to a read after structured replies were negotiated",
                        )
                        .into());
                    }
                    ReplyHeader::Chunk(h) => h,
                };
                proto::check_chunk_length(&h, length)?;
                let locate = |o: u64, n: u64| -> Result<usize, NbdError> {
                    match o.checked_sub(offset) {
                        Some(rel) if rel.checked_add(n).is_some_and(|e| e <= u64::from(length)) => {
                            Ok(rel as usize)
                        }
                        _ => Err(ProtoError::malformed(
                            "read reply",
                            format!("chunk [{o}, +{n}) outside the request [{offset}, +{length})"),
                        )
                        .into()),
                    }
                };
                match h.kind {
                    proto::REPLY_TYPE_OFFSET_DATA => {
                        let mut o = [0u8; 8];
                        c.io.read_exact(&mut o).await.map_err(io_err(DURING))?;
                        let o = u64::from_be_bytes(o);
                        let n = u64::from(h.length - 8);
                        let rel = locate(o, n)?;
                        cov.add(rel as u64, n)?;
                        c.io.read_exact(&mut buf[rel..rel + n as usize])
                            .await
                            .map_err(io_err(DURING))?;
                    }
                    proto::REPLY_TYPE_BLOCK_STATUS => {
                        return Err(ProtoError::UnexpectedChunk {
                            command: "NBD_CMD_READ",
                            kind: h.kind,
                        }
                        .into());
                    }
                    _ => {
                        let p = c.payload(&h, DURING).await?;
                        match proto::parse_chunk_payload(&h, &p)? {
                            Chunk::OffsetHole {
                                offset: o,
                                length: n,
                            } => {
                                let rel = locate(o, n.into())?;
                                cov.add(rel as u64, n.into())?;
                                buf[rel..rel + n as usize].fill(0);
                            }
                            Chunk::Error { errno, message, .. } => {
                                failed.get_or_insert((errno, message));
                            }
                            Chunk::None => {}
                            Chunk::OffsetData { .. } | Chunk::BlockStatus { .. } => {
                                return Err(ProtoError::UnexpectedChunk {
                                    command: "NBD_CMD_READ",
                                    kind: h.kind,
                                }
                                .into());
                            }
                        }
                    }
                }
                if h.done() {
                    break;
                }
            }
            if let Some((errno, message)) = failed {
                return Err(NbdError::Server {
                    command: "NBD_CMD_READ",
                    errno,
                    message,
                });
            }
            if !cov.is_complete(length.into()) {
                return Err(ProtoError::malformed(
                    "read reply",
                    "final chunk before the whole range was sent",
                )
                .into());
            }
            Ok(())
        })
        .await
    }

    /// Read `length` bytes at `offset` into a new buffer (see [`NbdClient::read_into`]).
    pub async fn read(&mut self, offset: u64, length: usize) -> Result<Vec<u8>, NbdError> {
        self.check_range(offset, length as u64)?;
        let mut v = vec![0u8; length];
        self.read_into(offset, &mut v).await?;
        Ok(v)
    }

    /// End the session cleanly (`NBD_CMD_DISC`, then close). A broken connection is just
    /// closed.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        if self.broken.is_none() {
            let h = self.handle();
            self.send_request(proto::CMD_DISC, h, 0, 0, "disconnect")
                .await?;
        }
        let _ = self.io.get_mut().shutdown().await;
        Ok(())
    }
}
