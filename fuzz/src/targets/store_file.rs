//! The store's file format (`agent::store::format::{decode, decode_meta}`).
//!
//! The first byte picks how much of the file's own checksums the harness repairs before
//! decoding, so the fuzzer gets past them to the parsers behind them: 0 none (raw bytes), 1 the
//! header hash and the trailer, 2 also every chunk's chaining value and the root in the header.
//! A file that decodes must round-trip: encode it again and it decodes to the same thing.

use super::{MIB64, Target};
use agent::store::format::{self, Meta};
use wire::{Bitmap, CHUNK_BYTES, ChunkKind, DiskId, Geometry, State, decode_chunk};

pub const TARGET: Target = Target {
    name: "store_file",
    decoder: "agent::store::format::{decode, decode_meta}",
    run,
    max_alloc: MIB64,
    max_len: 4096,
    smoke_runs: 12000,
    seeds,
};

const TABLE_ENTRY: usize = 1 + 4 + 32;

fn header_end(f: &[u8]) -> Option<usize> {
    let hlen = u32::from_le_bytes(f.get(12..16)?.try_into().ok()?) as usize;
    let end = 16usize.checked_add(hlen)?;
    (f.len() >= end + 32 && hlen <= format::MAX_HEADER).then_some(end)
}

fn fix_header_hash(f: &mut [u8]) {
    if let Some(end) = header_end(f) {
        let h = blake3::hash(&f[..end]);
        f[end..end + 32].copy_from_slice(h.as_bytes());
    }
}

fn fix_trailer(f: &mut [u8]) {
    if f.len() >= 32 {
        let n = f.len() - 32;
        let h = blake3::hash(&f[..n]);
        f[n..].copy_from_slice(h.as_bytes());
    }
}

/// Rewrite every chunk's chaining value and the header's root (its last 32 bytes) from the
/// payloads, where they decode.
fn fix_chunks(f: &mut [u8]) -> Option<()> {
    let end = header_end(f)?;
    let meta = format::decode_meta(f).ok()?;
    let geom = meta.geometry;
    let n = geom.chunks();
    let table = end + 32;
    let mut pos = table.checked_add(n.checked_mul(TABLE_ENTRY)?)?;
    let body_end = f.len().checked_sub(32)?;
    if pos > body_end {
        return None;
    }
    let mut raw_all = Vec::with_capacity(geom.raw_len());
    for i in 0..n {
        let e = table + i * TABLE_ENTRY;
        let kind = ChunkKind::from_tag(f[e]).ok()?;
        let plen = u32::from_le_bytes(f[e + 1..e + 5].try_into().ok()?) as usize;
        if plen > CHUNK_BYTES || body_end - pos < plen {
            return None;
        }
        let raw = decode_chunk(kind, &f[pos..pos + plen], geom.chunk_range(i).len()).ok()?;
        pos += plen;
        f[e + 5..e + 37].copy_from_slice(&wire::tree::chunk_cv(i, &raw));
        raw_all.extend_from_slice(&raw);
    }
    if end >= 16 + 32 {
        f[end - 32..end].copy_from_slice(blake3::hash(&raw_all).as_bytes());
    }
    Some(())
}

fn run(data: &[u8]) {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let mut f = file.to_vec();
    match mode % 3 {
        0 => {}
        1 => {
            fix_header_hash(&mut f);
            fix_trailer(&mut f);
        }
        _ => {
            fix_header_hash(&mut f);
            if fix_chunks(&mut f).is_some() {
                fix_header_hash(&mut f);
            }
            fix_trailer(&mut f);
        }
    }
    let meta = format::decode_meta(&f);
    if let Ok((m, mut b)) = format::decode(&f) {
        assert_eq!(meta.as_ref(), Ok(&m), "decode_meta disagrees with decode");
        let again = format::encode(&m, &mut b);
        let (m2, b2) = format::decode(&again).expect("a re-encoded file decodes");
        assert_eq!(m2, m);
        assert!(b2 == b, "re-encoded bitmap differs");
    }
}

/// A store file of a small bitmap with zero, roaring and raw chunks.
pub fn sample(blocks: u64, dirty: &[(u64, u64)]) -> Vec<u8> {
    let g = Geometry::new(blocks * 4096, 4096).expect("valid geometry");
    let mut b = Bitmap::new(g);
    for &(a, e) in dirty {
        b.set_blocks(a, e.min(blocks));
    }
    let meta = Meta {
        disk: DiskId::new("vm42/vda").expect("valid"),
        geometry: g,
        checkpoint: Some(wire::Checkpoint {
            id: "c1".into(),
            manifest_root: None,
        }),
        epoch: 3,
        state: State::Consistent,
        reason: None,
        generation: 9,
    };
    format::encode(&meta, &mut b)
}

fn seeds() -> Vec<Vec<u8>> {
    let small = sample(100, &[(3, 9), (50, 51)]);
    let noisy: Vec<(u64, u64)> = (0..100).step_by(3).map(|b| (b, b + 1)).collect();
    let raw = sample(100, &noisy);
    let chunks = sample(
        3 * CHUNK_BYTES as u64 * 8 / 2,
        &[(0, 1), (600_000, 600_100)],
    );
    let mut seeds = Vec::new();
    for f in [small, raw, chunks] {
        for mode in [0u8, 1, 2] {
            seeds.push([&[mode][..], &f].concat());
        }
    }
    seeds
}
