//! Compact encoding of the blocks newly set in a pre-copy round (docs/protocol.md §5.3).
//!
//! A few scattered new bits must not cost a whole chunk each, so a round's new bits travel as
//! a set of block indices, in the smaller of two forms: roaring (dense or clustered bits) or
//! LEB128 gaps (few scattered bits, where roaring pays ~8 bytes per 2^16-block container).
//! Indices are relative to a window `base` (a chunk boundary); a window spans at most 2^32
//! blocks (roaring's range) and ends early where its payload would pass [`MAX_DELTA_PAYLOAD`].

use super::msg::DeltaEncoding;
use crate::CHUNK_BYTES;
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

/// Blocks per chunk of the raw form: windows start on chunk boundaries, so every window's
/// roaring containers line up with the bitmap's 2^16-block containers.
const CHUNK_BLOCKS: u64 = CHUNK_BYTES as u64 * 8;

/// Encode every set bit of `newly` as deltas of at most [`MAX_DELTA_PAYLOAD`] bytes each, in
/// block order. A clean bitmap gives no deltas.
///
/// Chunks are converted to roaring straight from their bytes (no per-bit work) and gathered
/// into a window until the window would span 2^32 blocks or its roaring form would pass the
/// payload limit; then the window is emitted in the smaller of its two encodings. Cost is
/// linear in the bitmap's dirty chunks.
pub fn encode_bits(newly: &Bitmap) -> Vec<EncodedDelta> {
    encode_windows(newly, MAX_WINDOW)
}

/// [`encode_bits`] with windows of at most `max_window` blocks (a multiple of a chunk's
/// blocks, at most [`MAX_WINDOW`]); smaller windows let tests cover window boundaries.
fn encode_windows(newly: &Bitmap, max_window: u64) -> Vec<EncodedDelta> {
    let mut out = Vec::new();
    let mut win: Option<Window> = None;
    let mut buf = Vec::new();
    for c in 0..newly.chunks() {
        if newly.chunk_is_clean(c) {
            continue;
        }
        newly.chunk_raw(c, &mut buf);
        let fits_span = |w: &Window| ((c - w.first + 1) as u64) * CHUNK_BLOCKS <= max_window;
        let mut w = match win.take() {
            Some(w) if fits_span(&w) => w,
            Some(w) => {
                w.emit(newly, &mut out);
                Window::new(c)
            }
            None => Window::new(c),
        };
        let mut rb =
            RoaringBitmap::from_lsb0_bytes(((c - w.first) as u64 * CHUNK_BLOCKS) as u32, &buf);
        rb.optimize();
        let size = rb.serialized_size();
        if w.size + size > MAX_DELTA_PAYLOAD && !w.rb.is_empty() {
            w.emit(newly, &mut out);
            w = Window::new(c);
            rb = RoaringBitmap::from_lsb0_bytes(0, &buf);
            rb.optimize();
        }
        w.size += size;
        w.rb |= rb;
        win = Some(w);
    }
    if let Some(w) = win {
        w.emit(newly, &mut out);
    }
    out
}

/// Set bits of consecutive chunks, relative to the first chunk's first block.
struct Window {
    first: usize,
    rb: RoaringBitmap,
    /// Upper bound of `rb`'s serialized size (sum of its chunks' sizes).
    size: usize,
}

impl Window {
    fn new(first: usize) -> Self {
        Window {
            first,
            rb: RoaringBitmap::new(),
            size: 0,
        }
    }

    /// Emit the window as roaring or, if smaller, LEB128 gaps.
    fn emit(self, b: &Bitmap, out: &mut Vec<EncodedDelta>) {
        let base = self.first as u64 * CHUNK_BLOCKS;
        let rsize = self.rb.serialized_size();
        // Each block costs at least one varint byte: only try when that can win, and give up as
        // soon as it stops winning, so this loop runs at most `rsize` times.
        if self.rb.len() < rsize as u64 {
            let mut v = Vec::new();
            let mut prev: Option<u64> = None;
            'runs: for (a, e) in b.runs_in(base, base + MAX_WINDOW) {
                for blk in a..e {
                    put_varint(&mut v, blk - prev.unwrap_or(base));
                    prev = Some(blk);
                    if v.len() >= rsize || blk - base >= u64::from(self.rb.max().unwrap_or(0)) {
                        break 'runs;
                    }
                }
            }
            if v.len() < rsize {
                out.push(EncodedDelta {
                    base,
                    encoding: DeltaEncoding::VarintGaps,
                    payload: v,
                });
                return;
            }
        }
        let mut payload = Vec::with_capacity(rsize);
        // Writing into a Vec cannot fail.
        if self.rb.serialize_into(&mut payload).is_ok() {
            out.push(EncodedDelta {
                base,
                encoding: DeltaEncoding::Roaring,
                payload,
            });
        }
    }
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
/// once (its in-memory form is no larger than a small multiple of its serialized form) and
/// applied run by run, so the work is bounded by the payload too, not by the blocks it names.
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
            // Run by run: a run container naming 2^32 blocks in a few bytes costs one
            // `set_blocks`, not 2^32 iterations (seen while fuzzing, docs/fuzzing.md).
            let mut it = rb.iter();
            while let Some(r) = it.next_range() {
                target.set_blocks(base + u64::from(*r.start()), base + u64::from(*r.end()) + 1);
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
        // 2^25 blocks of noise (~4 MiB in any encoding): must split into ≤ 1 MiB deltas.
        let g = Geometry::new(1 << 34, 512).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let raw: Vec<u8> = (0..g.raw_len())
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let b = Bitmap::from_raw(g, &raw).unwrap();
        let d = roundtrip(&b);
        assert!(d.len() > 1, "{} deltas", d.len());
    }

    #[test]
    fn windows_split_at_their_span_and_keep_positions_relative() {
        let g = Geometry::new(1 << 34, 512).unwrap(); // 2^25 blocks = 64 chunks
        let mut b = Bitmap::new(g);
        b.set_blocks(3, 5);
        b.set_blocks((1 << 20) - 2, (1 << 20) + 2); // straddles a window boundary
        b.set_blocks(5 << 20, (5 << 20) + 300_000); // dense: roaring
        for i in 0..50u64 {
            let blk = (9 << 20) + i * 4099; // sparse: varints
            b.set_blocks(blk, blk + 1);
        }
        b.set_blocks(g.blocks() - 1, g.blocks());
        let d = encode_windows(&b, 1 << 20);
        let mut out = Bitmap::new(g);
        for e in &d {
            assert_eq!(
                e.base % CHUNK_BLOCKS,
                0,
                "windows start on chunk boundaries"
            );
            let mut one = Bitmap::new(g);
            apply(&mut one, e.base, e.encoding, &e.payload).unwrap();
            for (a, z) in one.runs() {
                assert!(
                    a >= e.base && z <= e.base + (1 << 20),
                    "{a}..{z} outside {e:?}"
                );
            }
            out.merge(&one).unwrap();
        }
        assert_eq!(out, b);
        let kinds: Vec<_> = d.iter().map(|e| e.encoding).collect();
        assert!(
            kinds.contains(&DeltaEncoding::Roaring) && kinds.contains(&DeltaEncoding::VarintGaps)
        );
        // Windows: chunks {0,1}, {2}, {10}, {18}, {63}.
        assert_eq!(d.len(), 5, "{d:?}");
    }

    #[test]
    fn roaring_runs_apply_as_ranges_across_containers() {
        let g = Geometry::new((1 << 22) * 512, 512).unwrap(); // 2^22 blocks
        let mut rb = RoaringBitmap::new();
        rb.insert_range(10..70_000); // spans two 2^16 containers
        rb.insert_range(65_536 * 3..65_536 * 3 + 1);
        rb.insert_range(200_000..(1 << 22) - 7);
        rb.optimize();
        let mut p = Vec::new();
        rb.serialize_into(&mut p).unwrap();
        // A few bytes per 2^16-block container, for 2^22 blocks named.
        assert!(p.len() < 1000, "run containers: {} bytes", p.len());
        let mut b = Bitmap::new(g);
        assert_eq!(apply(&mut b, 7, DeltaEncoding::Roaring, &p), Ok(rb.len()));
        let runs: Vec<_> = b.runs().collect();
        assert_eq!(
            runs,
            vec![
                (17, 70_007),
                (65_536 * 3 + 7, 65_536 * 3 + 8),
                (200_007, 1 << 22)
            ]
        );
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
