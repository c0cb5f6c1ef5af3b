//! The NBD client (`agent::qemu::nbd`): everything an NBD server sends it. The pure parsers of
//! `nbd::proto` get the input directly (the first byte picks which); then the whole input is
//! what "qemu-nbd" says to the real async client over a pipe ([`super::peer`]): the fixed
//! newstyle handshake (structured replies, two metadata contexts, `NBD_OPT_GO`), then a
//! dirty-bitmap walk, a `base:allocation` walk and a read. Nothing may panic, hang, or allocate
//! from a length the server chose without checking it.

use super::peer::with_peer;
use super::{MIB64, Target};
use agent::qemu::nbd::proto::{self, ChunkHeader};
use agent::qemu::nbd::{BASE_ALLOCATION, NbdClient, NbdOptions};
use std::time::Duration;

pub const TARGET: Target = Target {
    name: "nbd",
    decoder: "agent::qemu::nbd::{proto::parse_*, NbdClient::{handshake, dirty_extents, allocation, read}}",
    run,
    max_alloc: MIB64,
    max_len: 1 << 16,
    smoke_runs: 6000,
    seeds,
};

const CTX: &str = "qemu:dirty-bitmap:b";

fn run(data: &[u8]) {
    pure(data);
    let opts = NbdOptions {
        timeout: Duration::from_secs(2),
        ..NbdOptions::new("e")
    }
    .context(CTX)
    .context(BASE_ALLOCATION);
    with_peer(data, |pipe| async move {
        let Ok(mut c) = NbdClient::handshake(pipe, &opts).await else {
            return;
        };
        let size = c.export().size;
        let _ = c.context_id(CTX);
        let _ = c.dirty_extents(CTX).await;
        let _ = c.allocation(0, size.min(1 << 30)).await;
        let _ = c.read(0, size.min(8192) as usize).await;
    });
}

/// The parsers without the client: reply headers, option replies, infos, contexts, chunks.
fn pure(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    match pick % 6 {
        0 => {
            let _ = proto::parse_server_hello(rest);
        }
        1 => {
            let _ = proto::parse_option_reply(rest);
        }
        2 => {
            let _ = proto::parse_info(rest);
        }
        3 => {
            let _ = proto::parse_meta_context(rest);
        }
        4 => {
            let _ = proto::parse_block_status(rest);
        }
        _ => {
            if rest.len() < 4 {
                return;
            }
            let magic = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let Ok(n) = proto::reply_header_rest(magic) else {
                return;
            };
            let Some(head) = rest.get(..4 + n) else {
                return;
            };
            let Ok(h) = proto::parse_reply_header(head) else {
                return;
            };
            if let proto::ReplyHeader::Chunk(ch) = h {
                chunk(&ch, &rest[4 + n..]);
            }
        }
    }
}

fn chunk(h: &ChunkHeader, payload: &[u8]) {
    if proto::check_chunk_length(h, 1 << 20).is_ok()
        && let Some(p) = payload.get(..h.length as usize)
    {
        let _ = proto::parse_chunk_payload(h, p);
    }
}

/// An honest server's bytes: the handshake of `qemu-nbd` with two contexts (ids 7 and 9), an
/// export of `size` bytes, then `replies`.
fn server(size: u64, replies: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    let opt = |v: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]| {
        v.extend_from_slice(&proto::OPTION_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&reply.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    };
    opt(&mut v, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
    for (id, name) in [(7u32, CTX), (9, BASE_ALLOCATION)] {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        opt(&mut v, proto::OPT_SET_META_CONTEXT, proto::REP_META_CONTEXT, &p);
    }
    opt(&mut v, proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]);
    let mut p = proto::INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&(proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY).to_be_bytes());
    opt(&mut v, proto::OPT_GO, proto::REP_INFO, &p);
    let mut p = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [1u32, 4096, 32 << 20] {
        p.extend_from_slice(&x.to_be_bytes());
    }
    opt(&mut v, proto::OPT_GO, proto::REP_INFO, &p);
    opt(&mut v, proto::OPT_GO, proto::REP_ACK, &[]);
    for r in replies {
        v.extend_from_slice(r);
    }
    v
}

/// One structured reply chunk.
fn reply(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A block-status payload for context `ctx`.
fn status(ctx: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = ctx.to_be_bytes().to_vec();
    for (l, f) in extents {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    p
}

fn seeds() -> Vec<Vec<u8>> {
    let size = 1u64 << 20;
    let done = proto::REPLY_FLAG_DONE;
    let dirty = reply(
        done,
        proto::REPLY_TYPE_BLOCK_STATUS,
        1,
        &status(7, &[(65536, 1), (983_040, 0)]),
    );
    let alloc = reply(
        done,
        proto::REPLY_TYPE_BLOCK_STATUS,
        2,
        &status(9, &[(4096, 0), (1_044_480, proto::STATE_HOLE | proto::STATE_ZERO)]),
    );
    let mut data = 0u64.to_be_bytes().to_vec();
    data.extend_from_slice(&[0xab; 4096]);
    let mut hole = 4096u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&4096u32.to_be_bytes());
    let read = [
        reply(0, proto::REPLY_TYPE_OFFSET_DATA, 3, &data),
        reply(done, proto::REPLY_TYPE_OFFSET_HOLE, 3, &hole),
    ];
    let mut err = 5u32.to_be_bytes().to_vec();
    err.extend_from_slice(&2u16.to_be_bytes());
    err.extend_from_slice(b"no");
    let mut seeds = vec![
        server(size, &[dirty.clone(), alloc.clone(), read[0].clone(), read[1].clone()]),
        server(size, std::slice::from_ref(&dirty)),
        server(size, &[reply(done, proto::REPLY_TYPE_ERROR, 1, &err)]),
        server(size, &[]),
    ];
    // The pure parsers, one per pick.
    seeds.push([&[5u8][..], &dirty].concat());
    seeds.push([&[5u8][..], &read[0]].concat());
    seeds.push([&[4u8][..], &status(7, &[(512, 1)])].concat());
    seeds
}
