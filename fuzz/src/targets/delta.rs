//! `wire::proto::delta::apply`: a Delta payload (varint gaps or roaring) applied to a small
//! bitmap at any base. A rejected delta leaves the bitmap untouched; an accepted one only adds
//! bits, no more than it says it named.

use super::input::Input;
use super::{MIB64, Target};
use wire::proto::delta;
use wire::proto::msg::DeltaEncoding;
use wire::{Bitmap, CHUNK_BYTES, Geometry};

pub const TARGET: Target = Target {
    name: "delta",
    decoder: "wire::proto::delta::apply (varint gaps / roaring)",
    run,
    max_alloc: MIB64,
    max_len: 1 << 16,
    smoke_runs: 16000,
    seeds,
};

fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    // Up to 2^22 blocks (8 chunks), mostly far fewer (cheaper runs): windows, chunk edges and
    // the last block all reachable.
    let bits = inp.u8() % 23;
    let blocks = u64::from(inp.u32() % (1 << bits)) + 1;
    let g = Geometry::new(blocks * 512, 512).expect("valid geometry");
    let base = match inp.u8() % 4 {
        0 => 0,
        1 => u64::from(inp.u32()) % blocks,
        2 => (u64::from(inp.u8()) * CHUNK_BYTES as u64 * 8) % blocks,
        _ => inp.u64(),
    };
    let encoding = if inp.u8() & 1 == 0 {
        DeltaEncoding::VarintGaps
    } else {
        DeltaEncoding::Roaring
    };
    let mut b = Bitmap::new(g);
    if inp.u8() & 1 == 1 {
        b.set_blocks(blocks / 3, blocks / 2 + 1);
    }
    let before = b.clone();
    match delta::apply(&mut b, base, encoding, inp.rest()) {
        // `apply` only ever sets bits, so an unchanged count means an unchanged bitmap (and
        // costs far less than comparing runs).
        Err(_) => assert_eq!(b.count(), before.count(), "a rejected delta changed the bitmap"),
        Ok(named) => {
            let mut removed = before.clone();
            let _ = removed.subtract(&b);
            assert!(removed.is_clean(), "a delta cleared bits");
            assert!(b.count() - before.count() <= named);
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let g = Geometry::new((3 << 20) * 512, 512).expect("valid"); // 2^22 > 3·2^20 blocks
    let mut b = Bitmap::new(g);
    b.set_blocks(5, 9);
    b.set_blocks(100_000, 100_001);
    b.set_blocks(1 << 20, (1 << 20) + 70_000);
    for i in 0..40u64 {
        b.set_blocks(2_000_000 + i * 977, 2_000_001 + i * 977);
    }
    delta::encode_bits(&b)
        .into_iter()
        .map(|d| {
            let mut s = vec![22];
            s.extend_from_slice(&((3u32 << 20) - 1).to_le_bytes());
            s.push(3);
            s.extend_from_slice(&d.base.to_le_bytes());
            s.push(u8::from(d.encoding == DeltaEncoding::Roaring));
            s.push(0);
            s.extend_from_slice(&d.payload);
            s
        })
        .collect()
}
