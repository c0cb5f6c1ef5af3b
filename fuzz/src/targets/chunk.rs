//! `wire::chunk::decode_chunk`: a chunk payload of any kind for any chunk length. A payload
//! that decodes gives exactly the chunk's bytes, and the smallest re-encoding decodes to them.

use super::input::Input;
use super::{MIB64, Target};
use wire::{CHUNK_BYTES, ChunkKind, decode_chunk, encode_chunk};

pub const TARGET: Target = Target {
    name: "chunk",
    decoder: "wire::chunk::{ChunkKind::from_tag, decode_chunk} (zero / roaring / raw)",
    run,
    max_alloc: MIB64,
    max_len: CHUNK_BYTES + 3,
    smoke_runs: 16000,
    seeds,
};

fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let tag = inp.u8();
    // 1 ..= CHUNK_BYTES: every length a chunk can have, the last one of a bitmap included.
    let raw_len = usize::from(inp.u16()) % CHUNK_BYTES + 1;
    let payload = inp.rest();
    let Ok(kind) = ChunkKind::from_tag(tag) else {
        return;
    };
    if let Ok(raw) = decode_chunk(kind, payload, raw_len) {
        assert_eq!(raw.len(), raw_len);
        let enc = encode_chunk(&raw);
        assert_eq!(
            decode_chunk(enc.kind, &enc.payload, raw_len).as_ref(),
            Ok(&raw),
            "re-encoded chunk differs"
        );
        assert!(enc.payload.len() <= raw_len);
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut sparse = vec![0u8; 4096];
    sparse[7] = 0x81;
    sparse[4000] = 0xff;
    let mut runs = vec![0u8; 4096];
    runs[100..900].fill(0xff);
    let noisy: Vec<u8> = (0..512u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for raw in [sparse, runs, noisy, vec![0; 10]] {
        let enc = encode_chunk(&raw);
        let len = (raw.len() - 1) as u16;
        let mut s = vec![enc.kind as u8];
        s.extend_from_slice(&len.to_le_bytes());
        s.extend_from_slice(&enc.payload);
        out.push(s);
    }
    out
}
