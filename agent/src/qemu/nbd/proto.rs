//! NBD wire formats, encoded and decoded without I/O (all integers big-endian).
//!
//! The subset bitferry speaks: fixed newstyle handshake, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO`; requests `NBD_CMD_READ`,
//! `NBD_CMD_BLOCK_STATUS`, `NBD_CMD_DISC`; simple replies and structured reply chunks
//! `NONE`, `OFFSET_DATA`, `OFFSET_HOLE`, `BLOCK_STATUS`, `ERROR`, `ERROR_OFFSET` (compact
//! headers; extended headers are never negotiated). Source: the NBD protocol
//! (`doc/proto.md` of NetworkBlockDevice/nbd) and QEMU's `include/block/nbd.h`.
//!
//! Every length that arrives is checked here against the protocol and against this client's
//! bounds before the client reads (let alone allocates) the bytes it announces. All
//! functions are total: errors, never panics, so fuzz targets can call them.

use super::error::ProtoError;

/// `NBDMAGIC`, first 8 bytes from a server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic from the server, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle servers send this instead of `IHAVEOPT`.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended-header reply chunk (only after `NBD_OPT_EXTENDED_HEADERS`, which
/// this client never sends).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;

/// Option: choose an export and enter transmission (with error replies).
pub const OPT_GO: u32 = 7;
/// Option: structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: abort the handshake.
pub const OPT_ABORT: u32 = 2;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: export information (`NBD_OPT_GO`).
pub const REP_INFO: u32 = 3;
/// Option reply: a selected metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option replies with this bit are errors.
pub const REP_ERR_BIT: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;

/// Info type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Reply chunk flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (final chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a hole (reads as zeros) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors of one context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk type: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` status bit: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status bit: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` status bit: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest option reply payload accepted (a context id or info type plus one string, with room).
pub const MAX_OPTION_REPLY: u32 = 2 * MAX_STRING as u32;
/// Largest read this client sends (QEMU's `NBD_MAX_BUFFER_SIZE`); longer reads are split.
pub const MAX_READ: u32 = 32 << 20;
/// Largest block status chunk payload accepted: 2 Mi descriptors (16 MiB). QEMU sends at
/// most 128 Ki descriptors (1 MiB) per chunk.
pub const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * (2 << 20);
/// Largest error chunk payload: errno, message length, message, offset.
pub const MAX_ERROR_PAYLOAD: u32 = 4 + 2 + MAX_STRING as u32 + 8;
/// Size of the server's first message (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const SERVER_HELLO_LEN: usize = 18;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a request.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtoError> {
    if b.len() < n {
        Err(ProtoError::Truncated {
            what,
            len: b.len(),
            need: n,
        })
    } else {
        Ok(())
    }
}

fn length(what: &'static str, len: u64, min: u64, max: u64) -> Result<(), ProtoError> {
    if len < min || len > max {
        Err(ProtoError::Length {
            what,
            len,
            min,
            max,
        })
    } else {
        Ok(())
    }
}

/// Parse the server's first 18 bytes; returns the handshake flags.
pub fn parse_server_hello(b: &[u8]) -> Result<u16, ProtoError> {
    need("server hello", b, SERVER_HELLO_LEN)?;
    let m = be64(b, 0);
    if m != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            what: "NBDMAGIC",
            got: m,
        });
    }
    match be64(b, 8) {
        IHAVEOPT => Ok(be16(b, 16)),
        CLISERV_MAGIC => Err(ProtoError::Oldstyle),
        got => Err(ProtoError::BadMagic {
            what: "IHAVEOPT",
            got,
        }),
    }
}

/// One option request: `IHAVEOPT`, option, length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn check_string(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_STRING {
        return Err(format!(
            "{what} is {} bytes, NBD allows {MAX_STRING}",
            s.len()
        ));
    }
    if s.contains('\0') {
        return Err(format!("{what} contains NUL"));
    }
    Ok(())
}

/// Data of `NBD_OPT_SET_META_CONTEXT`: export name, then each query. Fails (misuse) on
/// strings the protocol cannot carry.
pub fn encode_meta_context_query(export: &str, queries: &[String]) -> Result<Vec<u8>, String> {
    check_string("export name", export)?;
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        check_string("metadata context", q)?;
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    Ok(v)
}

/// Data of `NBD_OPT_GO`: export name and the info types requested.
pub fn encode_go(export: &str, info: &[u16]) -> Result<Vec<u8>, String> {
    check_string("export name", export)?;
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(info.len() as u16).to_be_bytes());
    for i in info {
        v.extend_from_slice(&i.to_be_bytes());
    }
    Ok(v)
}

/// An option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    /// The option it answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Payload length, already checked against [`MAX_OPTION_REPLY`].
    pub length: u32,
}

/// Parse a 20-byte option reply header and bound its length.
pub fn parse_option_reply(b: &[u8]) -> Result<OptionReply, ProtoError> {
    need("option reply", b, OPTION_REPLY_HEADER_LEN)?;
    let m = be64(b, 0);
    if m != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            got: m,
        });
    }
    let r = OptionReply {
        option: be32(b, 8),
        reply: be32(b, 12),
        length: be32(b, 16),
    };
    length("option reply", r.length.into(), 0, MAX_OPTION_REPLY.into())?;
    Ok(r)
}

/// An `NBD_REP_INFO` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// Export size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// `NBD_FLAG_*` transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum (alignment), a power of two ≤ 64 KiB.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum request payload.
        max: u32,
    },
    /// An info type this client does not use (name, description, …).
    Other(u16),
}

/// Parse an `NBD_REP_INFO` payload.
pub fn parse_info(b: &[u8]) -> Result<Info, ProtoError> {
    need("info reply", b, 2)?;
    match be16(b, 0) {
        INFO_EXPORT => {
            length("NBD_INFO_EXPORT", b.len() as u64, 12, 12)?;
            let flags = be16(b, 10);
            if flags & TFLAG_HAS_FLAGS == 0 {
                return Err(ProtoError::malformed(
                    "NBD_INFO_EXPORT",
                    "transmission flags without NBD_FLAG_HAS_FLAGS",
                ));
            }
            Ok(Info::Export {
                size: be64(b, 2),
                flags,
            })
        }
        INFO_BLOCK_SIZE => {
            length("NBD_INFO_BLOCK_SIZE", b.len() as u64, 14, 14)?;
            let (min, preferred, max) = (be32(b, 2), be32(b, 6), be32(b, 10));
            if !min.is_power_of_two() || min > 65536 || max < min {
                return Err(ProtoError::malformed(
                    "NBD_INFO_BLOCK_SIZE",
                    format!("min {min}, preferred {preferred}, max {max}"),
                ));
            }
            Ok(Info::BlockSize {
                min,
                preferred,
                max,
            })
        }
        other => Ok(Info::Other(other)),
    }
}

/// Parse an `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn parse_meta_context(b: &[u8]) -> Result<(u32, String), ProtoError> {
    need("meta context reply", b, 5)?;
    let name = std::str::from_utf8(&b[4..])
        .map_err(|_| ProtoError::malformed("meta context reply", "name is not UTF-8"))?;
    Ok((be32(b, 0), name.to_string()))
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// The cookie the reply echoes.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// Encode a request (28 bytes; no payload, this client never writes).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// How many header bytes follow the 4-byte magic of a reply.
pub fn reply_header_rest(magic: u32) -> Result<usize, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN - 4),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_HEADER_LEN - 4),
        EXTENDED_REPLY_MAGIC => Err(ProtoError::malformed(
            "reply",
            "extended header reply, which was never negotiated",
        )),
        got => Err(ProtoError::BadMagic {
            what: "reply",
            got: got.into(),
        }),
    }
}

/// A reply header: simple, or one structured chunk's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (no payload follows for the commands this client sends, except a
    /// successful read, which structured replies forbid).
    Simple {
        /// Error number (0 = success).
        errno: u32,
        /// Request handle.
        handle: u64,
    },
    /// A structured reply chunk header; `length` payload bytes follow.
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// The handle it answers.
    pub fn handle(&self) -> u64 {
        match self {
            ReplyHeader::Simple { handle, .. } => *handle,
            ReplyHeader::Chunk(c) => c.handle,
        }
    }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// Request handle.
    pub handle: u64,
    /// Payload length (not yet bounded: see [`check_chunk_length`]).
    pub length: u32,
}

impl ChunkHeader {
    /// True for the last chunk of a reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Parse a complete reply header (16 bytes simple, 20 structured).
pub fn parse_reply_header(b: &[u8]) -> Result<ReplyHeader, ProtoError> {
    need("reply header", b, 4)?;
    let rest = reply_header_rest(be32(b, 0))?;
    need("reply header", b, 4 + rest)?;
    if rest == SIMPLE_REPLY_LEN - 4 {
        Ok(ReplyHeader::Simple {
            errno: be32(b, 4),
            handle: be64(b, 8),
        })
    } else {
        Ok(ReplyHeader::Chunk(ChunkHeader {
            flags: be16(b, 4),
            kind: be16(b, 6),
            handle: be64(b, 8),
            length: be32(b, 16),
        }))
    }
}

/// True for error chunk types (bit 15), known or not.
pub fn is_error_type(kind: u16) -> bool {
    kind & (1 << 15) != 0
}

/// Check a chunk's payload length for its type, for a request of `request_len` bytes, before
/// anything is read. Unknown non-error types are refused (this client cannot know their
/// meaning); unknown error types are accepted with an error's bound.
pub fn check_chunk_length(h: &ChunkHeader, request_len: u32) -> Result<(), ProtoError> {
    let len = u64::from(h.length);
    match h.kind {
        REPLY_TYPE_NONE => {
            length("NBD_REPLY_TYPE_NONE", len, 0, 0)?;
            if !h.done() {
                return Err(ProtoError::malformed(
                    "NBD_REPLY_TYPE_NONE",
                    "chunk without NBD_REPLY_FLAG_DONE",
                ));
            }
            Ok(())
        }
        REPLY_TYPE_OFFSET_DATA => length(
            "NBD_REPLY_TYPE_OFFSET_DATA",
            len,
            9,
            8 + u64::from(request_len),
        ),
        REPLY_TYPE_OFFSET_HOLE => length("NBD_REPLY_TYPE_OFFSET_HOLE", len, 12, 12),
        REPLY_TYPE_BLOCK_STATUS => {
            length(
                "NBD_REPLY_TYPE_BLOCK_STATUS",
                len,
                12,
                MAX_BLOCK_STATUS_PAYLOAD.into(),
            )?;
            if !(len - 4).is_multiple_of(8) {
                return Err(ProtoError::malformed(
                    "NBD_REPLY_TYPE_BLOCK_STATUS",
                    format!("payload of {len} bytes is not a context id plus descriptors"),
                ));
            }
            Ok(())
        }
        k if is_error_type(k) => length("error chunk", len, 6, MAX_ERROR_PAYLOAD.into()),
        k => Err(ProtoError::malformed(
            "reply chunk",
            format!("unknown chunk type {k}"),
        )),
    }
}

/// A decoded chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// Data at `offset`.
    OffsetData {
        /// Absolute export offset.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// A hole of `length` bytes at `offset` (reads as zeros).
    OffsetHole {
        /// Absolute export offset.
        offset: u64,
        /// Bytes.
        length: u32,
    },
    /// Descriptors of one metadata context.
    BlockStatus {
        /// The context id from the handshake.
        context: u32,
        /// `(length, status flags)` descriptors, in order from the request's offset.
        extents: Vec<(u32, u32)>,
    },
    /// An error (`ERROR`, `ERROR_OFFSET`, or an unknown error type).
    Error {
        /// The chunk type.
        kind: u16,
        /// NBD error number.
        errno: u32,
        /// Human-readable message (lossy UTF-8).
        message: String,
        /// For `ERROR_OFFSET`, where the error happened.
        offset: Option<u64>,
    },
}

/// Decode a chunk's payload (its length already checked with [`check_chunk_length`]).
pub fn parse_chunk_payload<'a>(h: &ChunkHeader, p: &'a [u8]) -> Result<Chunk<'a>, ProtoError> {
    if p.len() != h.length as usize {
        return Err(ProtoError::Truncated {
            what: "chunk payload",
            len: p.len(),
            need: h.length as usize,
        });
    }
    match h.kind {
        REPLY_TYPE_NONE => Ok(Chunk::None),
        REPLY_TYPE_OFFSET_DATA => {
            need("NBD_REPLY_TYPE_OFFSET_DATA", p, 9)?;
            Ok(Chunk::OffsetData {
                offset: be64(p, 0),
                data: &p[8..],
            })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            need("NBD_REPLY_TYPE_OFFSET_HOLE", p, 12)?;
            let length = be32(p, 8);
            if length == 0 {
                return Err(ProtoError::malformed(
                    "NBD_REPLY_TYPE_OFFSET_HOLE",
                    "zero-length hole",
                ));
            }
            Ok(Chunk::OffsetHole {
                offset: be64(p, 0),
                length,
            })
        }
        REPLY_TYPE_BLOCK_STATUS => parse_block_status(p),
        k if is_error_type(k) => parse_error(k, p),
        k => Err(ProtoError::malformed(
            "reply chunk",
            format!("unknown chunk type {k}"),
        )),
    }
}

/// Decode an `NBD_REPLY_TYPE_BLOCK_STATUS` payload. Descriptors of length 0 are refused
/// (they would let a server stall a client that pages through an export).
pub fn parse_block_status(p: &[u8]) -> Result<Chunk<'_>, ProtoError> {
    need("NBD_REPLY_TYPE_BLOCK_STATUS", p, 12)?;
    if !(p.len() - 4).is_multiple_of(8) {
        return Err(ProtoError::malformed(
            "NBD_REPLY_TYPE_BLOCK_STATUS",
            "payload is not a context id plus descriptors",
        ));
    }
    let extents: Vec<(u32, u32)> = p[4..]
        .chunks_exact(8)
        .map(|d| (be32(d, 0), be32(d, 4)))
        .collect();
    if extents.iter().any(|e| e.0 == 0) {
        return Err(ProtoError::malformed(
            "NBD_REPLY_TYPE_BLOCK_STATUS",
            "descriptor of length 0",
        ));
    }
    Ok(Chunk::BlockStatus {
        context: be32(p, 0),
        extents,
    })
}

fn parse_error(kind: u16, p: &[u8]) -> Result<Chunk<'_>, ProtoError> {
    need("error chunk", p, 6)?;
    let errno = be32(p, 0);
    let mlen = be16(p, 4) as usize;
    let extra = if kind == REPLY_TYPE_ERROR_OFFSET {
        8
    } else {
        0
    };
    let known = kind == REPLY_TYPE_ERROR || kind == REPLY_TYPE_ERROR_OFFSET;
    if (known && 6 + mlen + extra != p.len()) || (!known && 6 + mlen > p.len()) {
        return Err(ProtoError::malformed(
            "error chunk",
            format!(
                "message length {mlen} does not fit a payload of {} bytes",
                p.len()
            ),
        ));
    }
    if errno == 0 {
        return Err(ProtoError::malformed("error chunk", "error number 0"));
    }
    let message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
    let offset = (kind == REPLY_TYPE_ERROR_OFFSET).then(|| be64(p, 6 + mlen));
    Ok(Chunk::Error {
        kind,
        errno,
        message,
        offset,
    })
}

/// Parse one whole structured chunk (header and payload) from the front of `b`; returns it
/// and how many bytes it took. For fuzzing and fake servers; the client reads the header and
/// the payload separately so it never buffers more than it checked.
pub fn parse_reply_chunk(
    b: &[u8],
    request_len: u32,
) -> Result<(ChunkHeader, Chunk<'_>, usize), ProtoError> {
    let ReplyHeader::Chunk(h) = parse_reply_header(b)? else {
        return Err(ProtoError::malformed("reply chunk", "a simple reply"));
    };
    check_chunk_length(&h, request_len)?;
    let end = STRUCTURED_HEADER_LEN + h.length as usize;
    need("reply chunk", b, end)?;
    let c = parse_chunk_payload(&h, &b[STRUCTURED_HEADER_LEN..end])?;
    Ok((h, c, end))
}

/// Which bytes of a read request the chunks so far covered. Chunks may come in any order but
/// must not overlap; a reply is complete when they cover the request exactly. At most
/// [`Coverage::MAX_RUNS`] disjoint runs are tracked (a server fragmenting a read into more
/// is refused), so tracking never costs more than a few KiB.
#[derive(Debug, Clone, Default)]
pub struct Coverage {
    /// Sorted, disjoint, non-adjacent `[start, end)` runs relative to the request offset.
    runs: Vec<(u64, u64)>,
}

impl Coverage {
    /// Most disjoint runs tracked.
    pub const MAX_RUNS: usize = 4096;

    /// An empty coverage.
    pub fn new() -> Coverage {
        Coverage::default()
    }

    /// Record `[start, start + len)`; fails if it overlaps what is covered.
    pub fn add(&mut self, start: u64, len: u64) -> Result<(), ProtoError> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| ProtoError::malformed("read reply", "chunk range overflows"))?;
        let i = self.runs.partition_point(|r| r.1 <= start);
        if self.runs.get(i).is_some_and(|r| r.0 < end) {
            return Err(ProtoError::malformed(
                "read reply",
                format!("chunk [{start}, {end}) overlaps data already received"),
            ));
        }
        let join_left = i > 0 && self.runs[i - 1].1 == start;
        let join_right = self.runs.get(i).is_some_and(|r| r.0 == end);
        match (join_left, join_right) {
            (true, true) => {
                self.runs[i - 1].1 = self.runs[i].1;
                self.runs.remove(i);
            }
            (true, false) => self.runs[i - 1].1 = end,
            (false, true) => self.runs[i].0 = start,
            (false, false) => {
                if self.runs.len() >= Self::MAX_RUNS {
                    return Err(ProtoError::malformed(
                        "read reply",
                        "data fragmented into too many chunks",
                    ));
                }
                self.runs.insert(i, (start, end));
            }
        }
        Ok(())
    }

    /// True if exactly `[0, len)` is covered.
    pub fn is_complete(&self, len: u64) -> bool {
        len == 0 || self.runs == [(0, len)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn hello_and_option_reply() {
        let mut h = Vec::new();
        h.extend_from_slice(&NBDMAGIC.to_be_bytes());
        h.extend_from_slice(&IHAVEOPT.to_be_bytes());
        h.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_server_hello(&h), Ok(3));
        h[8..16].copy_from_slice(&CLISERV_MAGIC.to_be_bytes());
        assert_eq!(parse_server_hello(&h), Err(ProtoError::Oldstyle));
        h[0] = b'X';
        assert!(matches!(
            parse_server_hello(&h),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(matches!(
            parse_server_hello(&h[..5]),
            Err(ProtoError::Truncated { .. })
        ));

        let mut r = Vec::new();
        r.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        r.extend_from_slice(&OPT_GO.to_be_bytes());
        r.extend_from_slice(&REP_ACK.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            parse_option_reply(&r),
            Ok(OptionReply {
                option: OPT_GO,
                reply: REP_ACK,
                length: 0
            })
        );
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_option_reply(&r),
            Err(ProtoError::Length { .. })
        ));
    }

    #[test]
    fn encodings() {
        let q = encode_meta_context_query("e", &["base:allocation".into()]).unwrap();
        assert_eq!(&q[..4], &1u32.to_be_bytes());
        assert_eq!(q[4], b'e');
        assert_eq!(&q[5..9], &1u32.to_be_bytes());
        assert_eq!(&q[9..13], &15u32.to_be_bytes());
        assert_eq!(&q[13..], b"base:allocation");
        assert!(encode_go(&"x".repeat(MAX_STRING + 1), &[]).is_err());
        assert!(encode_go("a\0b", &[]).is_err());
        let g = encode_go("ab", &[INFO_BLOCK_SIZE]).unwrap();
        assert_eq!(g, [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]);
        let r = encode_request(&Request {
            flags: 0,
            command: CMD_BLOCK_STATUS,
            handle: 9,
            offset: 1 << 40,
            length: 7,
        });
        assert_eq!(&r[..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(&r[6..8], &7u16.to_be_bytes());
        assert_eq!(&r[16..24], &(1u64 << 40).to_be_bytes());
    }

    #[test]
    fn info_payloads() {
        let mut e = vec![0, 0];
        e.extend_from_slice(&(1u64 << 40).to_be_bytes());
        e.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(
            parse_info(&e),
            Ok(Info::Export {
                size: 1 << 40,
                flags: 3
            })
        );
        assert!(parse_info(&e[..11]).is_err());
        e[11] = 2; // HAS_FLAGS missing
        assert!(parse_info(&e).is_err());
        let mut b = vec![0, 3];
        for v in [1u32, 4096, 32 << 20] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        assert!(matches!(parse_info(&b), Ok(Info::BlockSize { min: 1, .. })));
        b[2..6].copy_from_slice(&3u32.to_be_bytes());
        assert!(parse_info(&b).is_err());
        assert_eq!(parse_info(&[0, 1, b'n']), Ok(Info::Other(1)));
        assert!(parse_meta_context(&[0, 0, 0, 1]).is_err());
        assert_eq!(
            parse_meta_context(b"\0\0\0\x05base:allocation"),
            Ok((5, "base:allocation".into()))
        );
    }

    #[test]
    fn chunks() {
        let mut bs = 7u32.to_be_bytes().to_vec();
        for (l, f) in [(65536u32, 1u32), (1 << 20, 0)] {
            bs.extend_from_slice(&l.to_be_bytes());
            bs.extend_from_slice(&f.to_be_bytes());
        }
        let c = chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4, &bs);
        let (h, ch, n) = parse_reply_chunk(&c, 1 << 30).unwrap();
        assert_eq!(n, c.len());
        assert!(h.done());
        assert_eq!(
            ch,
            Chunk::BlockStatus {
                context: 7,
                extents: vec![(65536, 1), (1 << 20, 0)]
            }
        );
        // A zero-length descriptor, a ragged payload, a huge announced length.
        let mut z = bs.clone();
        z[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse_reply_chunk(&chunk(0, REPLY_TYPE_BLOCK_STATUS, 4, &z), 1).is_err());
        assert!(parse_reply_chunk(&chunk(0, REPLY_TYPE_BLOCK_STATUS, 4, &bs[..15]), 1).is_err());
        let mut huge = chunk(0, REPLY_TYPE_BLOCK_STATUS, 4, &bs);
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_reply_chunk(&huge, 1),
            Err(ProtoError::Length { .. })
        ));

        // Data no longer than the request; holes exactly 12 bytes.
        let mut d = 100u64.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        assert!(matches!(
            parse_reply_chunk(&chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &d), 3),
            Ok((
                _,
                Chunk::OffsetData {
                    offset: 100,
                    data: b"abc"
                },
                _
            ))
        ));
        assert!(parse_reply_chunk(&chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &d), 2).is_err());
        let mut hole = 5u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&9u32.to_be_bytes());
        assert!(matches!(
            parse_reply_chunk(&chunk(0, REPLY_TYPE_OFFSET_HOLE, 1, &hole), 9),
            Ok((
                _,
                Chunk::OffsetHole {
                    offset: 5,
                    length: 9
                },
                _
            ))
        ));

        // Errors: message length must fit; errno 0 is not an error.
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&2u16.to_be_bytes());
        e.extend_from_slice(b"no");
        assert!(matches!(
            parse_reply_chunk(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &e), 1),
            Ok((_, Chunk::Error { errno: 5, ref message, offset: None, .. }, _)) if message == "no"
        ));
        let mut bad = e.clone();
        bad[4..6].copy_from_slice(&200u16.to_be_bytes());
        assert!(parse_reply_chunk(&chunk(0, REPLY_TYPE_ERROR, 1, &bad), 1).is_err());
        let mut eo = e.clone();
        eo.extend_from_slice(&77u64.to_be_bytes());
        assert!(matches!(
            parse_reply_chunk(&chunk(0, REPLY_TYPE_ERROR_OFFSET, 1, &eo), 1),
            Ok((
                _,
                Chunk::Error {
                    offset: Some(77),
                    ..
                },
                _
            ))
        ));
        // Unknown types: errors are errors, anything else is refused.
        assert!(matches!(
            parse_reply_chunk(&chunk(0, 0x8009, 1, &e), 1),
            Ok((_, Chunk::Error { kind: 0x8009, .. }, _))
        ));
        assert!(parse_reply_chunk(&chunk(0, 42, 1, &e), 1).is_err());
        // NONE must be final and empty.
        assert!(parse_reply_chunk(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[]), 1).is_ok());
        assert!(parse_reply_chunk(&chunk(0, REPLY_TYPE_NONE, 1, &[]), 1).is_err());
        assert!(parse_reply_chunk(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[0]), 1).is_err());
        // Truncation anywhere is an error.
        let c = chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4, &bs);
        for cut in 0..c.len() {
            assert!(
                parse_reply_chunk(&c[..cut], 1 << 30).is_err(),
                "cut at {cut}"
            );
        }
        // Magic.
        let mut m = c.clone();
        m[0] ^= 1;
        assert!(matches!(
            parse_reply_header(&m),
            Err(ProtoError::BadMagic { .. })
        ));
        let mut x = c.clone();
        x[..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert!(parse_reply_header(&x).is_err());
    }

    #[test]
    fn coverage() {
        let mut c = Coverage::new();
        c.add(10, 5).unwrap();
        c.add(0, 5).unwrap();
        assert!(!c.is_complete(15));
        assert!(c.add(4, 2).is_err());
        assert!(c.add(14, 1).is_err());
        c.add(5, 5).unwrap();
        assert!(c.is_complete(15));
        assert!(!c.is_complete(16));
        assert!(c.add(u64::MAX, 2).is_err());
        let mut f = Coverage::new();
        for i in 0..Coverage::MAX_RUNS as u64 {
            f.add(i * 2, 1).unwrap();
        }
        assert!(f.add(1 << 40, 1).is_err());
        // Filling the gaps merges everything back into one run.
        for i in 0..Coverage::MAX_RUNS as u64 {
            f.add(i * 2 + 1, 1).unwrap();
        }
        assert!(f.is_complete(2 * Coverage::MAX_RUNS as u64));
    }
}
