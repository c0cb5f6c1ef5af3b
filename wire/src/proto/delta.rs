//! Compact encoding of the blocks newly set in a pre-copy round (docs/protocol.md §5.3).
//!
//! A few scattered new bits must not cost a whole chunk each, so a round's new bits travel as
//! a set of block indices, in the smaller of two forms: roaring (dense or clustered bits) or
//! LEB128 gaps (few scattered bits, where roaring pays ~8 bytes per 2^16-block container).
//! Indices are relative to a window `base`; a window spans at most 2^32 blocks (roaring's
//! range) and is halved until its payload fits [`MAX_DELTA_PAYLOAD`].

use super::msg::DeltaEncoding;
use crate::bitmap::Bitmap;
use roaring::RoaringBitmap;

/// Largest payload of one Delta message.
pub const MAX_DELTA_PAYLOAD: usize = 1 << 20;

/// Largest window a Delta may cover, in blocks (roaring positions are u32).
pub const MAX_WINDOW: u64 = 1 << 32;

/// One encoded window of new bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedDelta {
    /// Block the positions are relative to.
    pub base: u64,
    /// Encoding of the payload.
    pub encoding: DeltaEncoding,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Encode every set bit of `newly` as deltas of at most [`MAX_DELTA_PAYLOAD`] bytes each, in
/// block order. A clean bitmap gives no deltas.
pub fn encode_bits(newly: &Bitmap) -> Vec<EncodedDelta> {
    let blocks = newly.geometry().blocks();
    let mut out = Vec::new();
    let mut lo = 0;
    while lo < blocks {
        let hi = (lo + MAX_WINDOW).min(blocks);
        encode_range(newly, lo, hi, &mut out);
        lo = hi;
    }
    out
}

fn encode_range(b: &Bitmap, lo: u64, hi: u64, out: &mut Vec<EncodedDelta>) {
    let Some((encoding, payload)) = encode_window(b, lo, hi) else {
        return;
    };
    if payload.len() <= MAX_DELTA_PAYLOAD || hi - lo < 2 {
        out.push(EncodedDelta {
            base: lo,
            encoding,
            payload,
        });
        return;
    }
    let mid = lo + (hi - lo) / 2;
    encode_range(b, lo, mid, out);
    encode_range(b, mid, hi, out);
}

/// The smaller encoding of the set bits in `lo .. hi` (at most 2^32 blocks), or `None` if none
/// is set.
fn encode_window(b: &Bitmap, lo: u64, hi: u64) -> Option<(DeltaEncoding, Vec<u8>)> {
    let mut rb = RoaringBitmap::new();
    for (a, e) in b.runs_in(lo, hi) {
        rb.insert_range((a - lo) as u32..=(e - 1 - lo) as u32);
    }
    if rb.is_empty() {
        return None;
    }
    rb.optimize();
    let rsize = rb.serialized_size();
    // Varint gaps, abandoned as soon as they are no smaller than roaring: each block costs at
    // least one byte, so this loop runs at most `rsize` times.
    let mut v = Vec::new();
    let mut prev: Option<u64> = None;
    'runs: for (a, e) in b.runs_in(lo, hi) {
        for blk in a..e {
            let val = match prev {
                None => blk - lo,
                Some(p) => blk - p,
            };
            put_varint(&mut v, val);
            prev = Some(blk);
            if v.len() >= rsize {
                break 'runs;
            }
        }
    }
    if v.len() < rsize {
        return Some((DeltaEncoding::VarintGaps, v));
    }
    let mut payload = Vec::with_capacity(rsize);
    // Writing into a Vec cannot fail; an error here would only drop the window, never panic.
    if rb.serialize_into(&mut payload).is_err() {
        return None;
    }
    Some((DeltaEncoding::Roaring, payload))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(p: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some(byte) = p.get(*pos) else {
            return Err("truncated varint".into());
        };
        *pos += 1;
        let bits = u64::from(byte & 0x7f);
        if i == 9 && bits > 1 {
            return Err("varint overflows 64 bits".into());
        }
        v |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// Walk the runs of blocks a delta payload names, validating everything first: nothing is
/// applied unless the whole payload is valid. Returns the number of blocks named.
///
/// Allocation is bounded by the payload: varints are walked twice in place, roaring is parsed
/// once (its in-memory form is no larger than a small multiple of its serialized form).
pub fn apply(
    target: &mut Bitmap,
    base: u64,
    encoding: DeltaEncoding,
    payload: &[u8],
) -> Result<u64, String> {
    let blocks = target.geometry().blocks();
    if payload.is_empty() {
        return Err("empty delta".into());
    }
    if payload.len() > MAX_DELTA_PAYLOAD {
        return Err(format!("delta payload of {} bytes", payload.len()));
    }
    if base >= blocks {
        return Err(format!("base block {base} past the last block {blocks}"));
    }
    match encoding {
        DeltaEncoding::VarintGaps => {
            let count = walk_varints(payload, base, blocks, |_, _| {})?;
            walk_varints(payload, base, blocks, |a, e| {
                target.set_blocks(a, e);
            })?;
            Ok(count)
        }
        DeltaEncoding::Roaring => {
            let mut cursor = payload;
            let rb = RoaringBitmap::deserialize_from(&mut cursor).map_err(|e| e.to_string())?;
            if !cursor.is_empty() {
                return Err(format!("{} trailing bytes after roaring", cursor.len()));
            }
            let Some(max) = rb.max() else {
                return Err("empty roaring delta".into());
            };
            if base + u64::from(max) >= blocks {
                return Err(format!(
                    "block {} past the last block {blocks}",
                    base + u64::from(max)
                ));
            }
            let mut run: Option<(u64, u64)> = None;
            for v in rb.iter() {
                let blk = base + u64::from(v);
                run = match run {
                    Some((a, e)) if e == blk => Some((a, e + 1)),
                    Some((a, e)) => {
                        target.set_blocks(a, e);
                        Some((blk, blk + 1))
                    }
                    None => Some((blk, blk + 1)),
                };
            }
            if let Some((a, e)) = run {
                target.set_blocks(a, e);
            }
            Ok(rb.len())
        }
    }
}

/// Decode varint gaps into runs of blocks, calling `f(first, end)` per run; checks ordering and
/// range. Returns the number of blocks.
fn walk_varints(
    payload: &[u8],
    base: u64,
    blocks: u64,
    mut f: impl FnMut(u64, u64),
) -> Result<u64, String> {
    let mut pos = 0;
    let mut prev: Option<u64> = None;
    let mut run: Option<(u64, u64)> = None;
    let mut count = 0u64;
    while pos < payload.len() {
        let v = get_varint(payload, &mut pos)?;
        let blk = match prev {
            None => base.checked_add(v),
            Some(p) => {
                if v == 0 {
                    return Err("zero gap: blocks must be strictly increasing".into());
                }
                p.checked_add(v)
            }
        };
        let Some(blk) = blk.filter(|b| *b < blocks) else {
            return Err(format!("block past the last block {blocks}"));
        };
        if blk - base >= MAX_WINDOW {
            return Err("block outside the delta's window".into());
        }
        prev = Some(blk);
        count += 1;
        run = match run {
            Some((a, e)) if e == blk => Some((a, e + 1)),
            Some((a, e)) => {
                f(a, e);
                Some((blk, blk + 1))
            }
            None => Some((blk, blk + 1)),
        };
    }
    if let Some((a, e)) = run {
        f(a, e);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Geometry;

    fn roundtrip(b: &Bitmap) -> Vec<EncodedDelta> {
        let d = encode_bits(b);
        let mut out = Bitmap::new(b.geometry());
        for e in &d {
            assert!(e.payload.len() <= MAX_DELTA_PAYLOAD);
            apply(&mut out, e.base, e.encoding, &e.payload).unwrap();
        }
        assert_eq!(&out, b);
        d
    }

    #[test]
    fn scattered_bits_use_varints_dense_use_roaring() {
        let g = Geometry::new(1 << 40, 1 << 16).unwrap(); // 2^24 blocks
        let mut b = Bitmap::new(g);
        for i in 0..100u64 {
            b.set_blocks(i * 150_001, i * 150_001 + 1);
        }
        let d = roundtrip(&b);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].encoding, DeltaEncoding::VarintGaps);
        let mut dense = Bitmap::new(g);
        dense.set_blocks(1000, 3_000_000);
        let d = roundtrip(&dense);
        assert_eq!(d[0].encoding, DeltaEncoding::Roaring);
        assert!(d[0].payload.len() < 1000);
        assert!(encode_bits(&Bitmap::new(g)).is_empty());
    }

    #[test]
    fn big_random_deltas_are_split_under_the_limit() {
        // 2^25 blocks, every third block set in a noisy pattern: ~ 4 MiB raw, must split.
        let g = Geometry::new(1 << 34, 512).unwrap();
        let mut b = Bitmap::new(g);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for blk in 0..g.blocks() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) {
                b.set_blocks(blk, blk + 1);
            }
        }
        let d = roundtrip(&b);
        assert!(d.len() > 1, "{} deltas", d.len());
    }

    #[test]
    fn malformed_payloads_are_rejected_and_not_applied() {
        let g = Geometry::new(1 << 20, 512).unwrap(); // 2048 blocks
        let mut b = Bitmap::new(g);
        // Valid first block, then a zero gap.
        assert!(apply(&mut b, 0, DeltaEncoding::VarintGaps, &[5, 0]).is_err());
        // Past the end.
        assert!(apply(&mut b, 0, DeltaEncoding::VarintGaps, &[5, 0xff, 0x7f]).is_err());
        assert!(apply(&mut b, 2048, DeltaEncoding::VarintGaps, &[0]).is_err());
        // Truncated varint, overflowing varint.
        assert!(apply(&mut b, 0, DeltaEncoding::VarintGaps, &[0x80]).is_err());
        assert!(apply(&mut b, 0, DeltaEncoding::VarintGaps, &[0xff; 11]).is_err());
        assert!(apply(&mut b, 0, DeltaEncoding::Roaring, &[1, 2, 3]).is_err());
        assert!(apply(&mut b, 0, DeltaEncoding::VarintGaps, &[]).is_err());
        assert!(
            b.is_clean(),
            "a rejected delta must leave the bitmap untouched"
        );
        let mut rb = RoaringBitmap::new();
        rb.insert(2048);
        let mut p = Vec::new();
        rb.serialize_into(&mut p).unwrap();
        assert!(apply(&mut b, 0, DeltaEncoding::Roaring, &p).is_err());
        assert!(b.is_clean());
    }
}
