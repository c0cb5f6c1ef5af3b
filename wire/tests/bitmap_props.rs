//! Property tests of the bitmap core against a trivially correct model (a list of block ranges).
//! proptest prints the failing case and persists its seed under `proptest-regressions/`.

use proptest::prelude::*;
use wire::tree::chunk_cv;
use wire::{Bitmap, Geometry, chunk};

/// Geometries: tiny to large, sizes not a multiple of the granularity, and disks over 4 GiB.
fn geometry() -> impl Strategy<Value = Geometry> {
    let small = (9u32..=26, 1u64..=4096, 0u64..=1).prop_flat_map(|(gbits, blocks, partial)| {
        let g = 1u64 << gbits;
        let rem = if partial == 1 { 1..=g } else { g..=g };
        rem.prop_map(move |r| Geometry::new((blocks - 1) * g + r, g).unwrap())
    });
    let large = (12u32..=26, (4u64 << 30)..(64u64 << 30))
        .prop_filter("at most 2^22 blocks", |(gbits, size)| {
            size >> gbits < (1 << 22)
        })
        .prop_map(|(gbits, size)| Geometry::new(size, 1 << gbits).unwrap());
    let one_block =
        (9u32..=26, 1u64..=512).prop_map(|(gbits, size)| Geometry::new(size, 1 << gbits).unwrap());
    prop_oneof![3 => small, 2 => large, 1 => one_block]
}

/// A mark as fractions of the disk, so it always fits whatever geometry is drawn.
fn marks() -> impl Strategy<Value = Vec<(f64, f64)>> {
    prop::collection::vec(
        (
            0.0f64..1.0,
            prop_oneof![Just(0.0), 0.0f64..0.0001, 0.0f64..0.05, 0.0f64..1.0],
        ),
        0..24,
    )
}

fn to_range(g: &Geometry, (a, l): (f64, f64)) -> (u64, u64) {
    let off = ((g.size() as f64) * a) as u64 % g.size();
    let len = (((g.size() - off) as f64) * l) as u64;
    (off, len.min(g.size() - off))
}

/// Model: merge the touched block ranges.
fn model(g: &Geometry, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|(_, l)| *l > 0)
        .map(|(o, l)| (o / g.granularity(), (o + l - 1) / g.granularity() + 1))
        .collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn extents_are_exactly_the_touched_blocks(g in geometry(), ms in marks()) {
        let mut b = Bitmap::new(g);
        let ranges: Vec<_> = ms.iter().map(|m| to_range(&g, *m)).collect();
        for (o, l) in &ranges {
            b.mark(*o, *l).unwrap();
        }
        let want = model(&g, &ranges);
        prop_assert_eq!(b.runs().collect::<Vec<_>>(), want.clone());
        let count: u64 = want.iter().map(|(a, e)| e - a).sum();
        prop_assert_eq!(b.count(), count);
        let ext: Vec<_> = b.extents().collect();
        prop_assert_eq!(ext.len(), want.len());
        for (e, (a, z)) in ext.iter().zip(&want) {
            prop_assert_eq!(e.offset, a * g.granularity());
            prop_assert_eq!(e.offset + e.length, (z * g.granularity()).min(g.size()));
        }
        // A range past the end is refused and changes nothing.
        let before = b.clone();
        prop_assert!(b.mark(g.size(), 1).is_err());
        prop_assert!(b.mark(u64::MAX, 2).is_err());
        prop_assert_eq!(&b, &before);
    }

    #[test]
    fn raw_and_chunks_round_trip(g in geometry(), ms in marks()) {
        let mut b = Bitmap::new(g);
        for m in &ms {
            let (o, l) = to_range(&g, *m);
            b.mark(o, l).unwrap();
        }
        let raw = b.to_raw();
        prop_assert_eq!(raw.len(), g.raw_len());
        // QEMU's layout: byte k holds blocks 8k..8k+7, LSB first.
        for (a, z) in b.runs().take(50) {
            for blk in [a, z - 1] {
                prop_assert_eq!(raw[(blk / 8) as usize] >> (blk % 8) & 1, 1);
            }
            if a > 0 { prop_assert_eq!(raw[((a - 1) / 8) as usize] >> ((a - 1) % 8) & 1, 0); }
        }
        let back = Bitmap::from_raw(g, &raw).unwrap();
        prop_assert_eq!(&back, &b);
        let mut rebuilt = Bitmap::new(g);
        // The migration destination's path: lazily zeroed, every chunk installed with the hash
        // the source computed (or reused from its cache).
        let mut installed = Bitmap::new(g);
        let mut buf = Vec::new();
        let root = b.root();
        for i in 0..b.chunks() {
            b.chunk_raw(i, &mut buf);
            let enc = chunk::encode_chunk(&buf);
            prop_assert_eq!(&chunk::encode_chunk_owned(buf.clone()), &enc);
            let dec = chunk::decode_chunk(enc.kind, &enc.payload, buf.len()).unwrap();
            prop_assert_eq!(&dec, &buf);
            rebuilt.apply_chunk_raw(i, &dec, false).unwrap();
            // After `root()` every cached chunk hash is current and equals a fresh one.
            let cv = b.chunk_cv_of(i, &buf);
            prop_assert_eq!(cv, chunk_cv(i, &buf));
            installed.install_chunk_raw(i, &dec, cv).unwrap();
        }
        prop_assert_eq!(&rebuilt, &b);
        prop_assert_eq!(&installed, &b);
        prop_assert_eq!(installed.root(), root);
        prop_assert_eq!(installed.root().0, *blake3::hash(&raw).as_bytes());
    }

    #[test]
    fn root_is_blake3_of_raw_after_marks_and_merges(g in geometry(), ms in marks(), ms2 in marks()) {
        let mut a = Bitmap::new(g);
        let mut other = Bitmap::new(g);
        prop_assert_eq!(a.root().0, *blake3::hash(&a.to_raw()).as_bytes());
        for (i, m) in ms.iter().enumerate() {
            let (o, l) = to_range(&g, *m);
            a.mark(o, l).unwrap();
            if i % 3 == 0 {
                prop_assert_eq!(a.root().0, *blake3::hash(&a.to_raw()).as_bytes());
            }
        }
        for m in &ms2 {
            let (o, l) = to_range(&g, *m);
            other.mark(o, l).unwrap();
        }
        a.merge(&other).unwrap();
        prop_assert_eq!(a.root().0, *blake3::hash(&a.to_raw()).as_bytes());
        // Merging is a superset: every block of either side is set.
        for (x, y) in other.runs() {
            prop_assert!(a.is_set(x) && a.is_set(y - 1));
        }
    }
}

#[test]
fn raw_with_tail_bits_or_wrong_length_is_refused() {
    let g = Geometry::new(10 * 512, 512).unwrap(); // 10 blocks, 2 bytes
    assert!(Bitmap::from_raw(g, &[0xff, 0x03]).is_ok());
    assert!(Bitmap::from_raw(g, &[0xff, 0x04]).is_err());
    assert!(Bitmap::from_raw(g, &[0xff]).is_err());
    assert!(Bitmap::from_raw(g, &[0xff, 0, 0]).is_err());
}

#[test]
fn installing_a_chunk_checks_like_applying_it() {
    let g = Geometry::new(10 * 512, 512).unwrap(); // 10 blocks: one chunk of 2 bytes
    let mut b = Bitmap::new(g);
    let cv = chunk_cv(0, &[0xff, 0x04]);
    // A bit past the last block, or the wrong length: refused, nothing changed.
    assert!(b.install_chunk_raw(0, &[0xff, 0x04], cv).is_err());
    assert!(b.install_chunk_raw(0, &[0xff], cv).is_err());
    assert!(b.install_chunk_raw(1, &[0xff, 0x03], cv).is_err());
    assert_eq!(b, Bitmap::new(g));
    b.install_chunk_raw(0, &[0xff, 0x03], chunk_cv(0, &[0xff, 0x03]))
        .unwrap();
    assert_eq!(b.to_raw(), vec![0xff, 0x03]);
    assert_eq!(b.root().0, *blake3::hash(&[0xff, 0x03]).as_bytes());
    // A cached hash is used only while it is current: after a mark it is recomputed.
    b.clear_chunk(0);
    b.mark(0, 512).unwrap();
    assert_eq!(b.chunk_cv_of(0, &[0x01, 0x00]), chunk_cv(0, &[0x01, 0x00]));
}

#[test]
fn geometry_limits() {
    assert!(Geometry::new(1, 512).is_ok());
    assert!(Geometry::new(1, 256).is_err());
    assert!(Geometry::new(1, 3 << 10).is_err());
    assert!(Geometry::new(1, 128 << 20).is_err());
    assert!(Geometry::new(0, 4096).is_err());
    assert!(Geometry::new(u64::MAX, 512).is_err());
    assert!(Geometry::new(1 << 40, 4096).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// `runs_in`, `subtract` and `clear_chunk` (used by the migration source) against the
    /// run model, with the root kept equal to blake3 of the raw bytes.
    #[test]
    fn windowed_runs_subtract_and_clear_chunk(g in geometry(), ms in marks(), ms2 in marks(),
                                               w in (0.0f64..1.0, 0.0f64..1.0)) {
        let mut a = Bitmap::new(g);
        let mut b = Bitmap::new(g);
        for m in &ms { let (o, l) = to_range(&g, *m); a.mark(o, l).unwrap(); }
        for m in &ms2 { let (o, l) = to_range(&g, *m); b.mark(o, l).unwrap(); }
        let blocks = g.blocks();
        let (x, y) = ((w.0 * blocks as f64) as u64, (w.1 * blocks as f64) as u64);
        let (lo, hi) = (x.min(y), x.max(y));
        // Clipped to the window; an empty window (lo == hi) has no runs.
        let want: Vec<_> = a.runs()
            .map(|(s, e)| (s.max(lo), e.min(hi)))
            .filter(|(s, e)| s < e)
            .collect();
        prop_assert_eq!(a.runs_in(lo, hi).collect::<Vec<_>>(), want);

        let mut d = a.clone();
        d.subtract(&b).unwrap();
        for blk in (0..blocks).step_by((blocks / 997).max(1) as usize) {
            prop_assert_eq!(d.is_set(blk), a.is_set(blk) && !b.is_set(blk));
        }
        prop_assert_eq!(d.count() + { let mut i = a.clone(); i.subtract(&d).unwrap(); i.count() }, a.count());
        prop_assert_eq!(d.root().0, *blake3::hash(&d.to_raw()).as_bytes());

        let c = (w.0 * d.chunks() as f64) as usize;
        d.clear_chunk(c);
        let mut raw = Vec::new();
        d.chunk_raw(c, &mut raw);
        prop_assert!(raw.iter().all(|x| *x == 0));
        prop_assert_eq!(d.root().0, *blake3::hash(&d.to_raw()).as_bytes());
    }
}

/// One operation on a bitmap, for the summary-of-touched-chunks property below. Positions are
/// fractions of the bitmap so every operation fits whatever geometry is drawn.
#[derive(Debug, Clone)]
enum Op {
    Mark(f64, f64),
    Merge(Vec<(f64, f64)>),
    Subtract(Vec<(f64, f64)>),
    ClearChunk(f64),
    /// Chunk, fill (0: zeros, 1: a few bits, 2: random bytes), OR (else overwrite), seed.
    Apply(f64, u8, bool, u64),
    Install(f64, u8, u64),
    RoundTrip,
    Clone,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let frac = 0.0f64..1.0;
    let len = prop_oneof![0.0f64..0.0001, 0.0f64..0.1, 0.0f64..1.0];
    let op = prop_oneof![
        3 => (frac.clone(), len.clone()).prop_map(|(a, l)| Op::Mark(a, l)),
        2 => marks().prop_map(Op::Merge),
        2 => marks().prop_map(Op::Subtract),
        2 => frac.clone().prop_map(Op::ClearChunk),
        2 => (frac.clone(), 0u8..3, any::<bool>(), any::<u64>())
            .prop_map(|(c, f, or, s)| Op::Apply(c, f, or, s)),
        2 => (frac, 0u8..3, any::<u64>()).prop_map(|(c, f, s)| Op::Install(c, f, s)),
        1 => Just(Op::RoundTrip),
        1 => Just(Op::Clone),
    ];
    prop::collection::vec(op, 1..24)
}

/// Chunk bytes of length `len`: zeros, a few set bits, or random bytes; tail bits past the last
/// block cleared by the caller's mask.
fn chunk_fill(len: usize, fill: u8, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = vec![0u8; len];
    match fill {
        0 => {}
        1 => {
            for _ in 0..8 {
                let i = (next() % len as u64) as usize;
                v[i] |= 1 << (next() % 8);
            }
        }
        _ => v.iter_mut().for_each(|b| *b = next() as u8),
    }
    v
}

fn bitmap_of(g: Geometry, ms: &[(f64, f64)]) -> Bitmap {
    let mut b = Bitmap::new(g);
    for m in ms {
        let (o, l) = to_range(&g, *m);
        b.mark(o, l).unwrap();
    }
    b
}

/// Runs of set bits in raw bytes (QEMU layout), as `(first, end)` blocks.
fn runs_of(raw: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (k, byte) in raw.iter().enumerate() {
        if *byte == 0 {
            continue;
        }
        for bit in 0..8 {
            if byte >> bit & 1 == 1 {
                let blk = k as u64 * 8 + bit;
                match out.last_mut() {
                    Some(r) if r.1 == blk => r.1 += 1,
                    _ => out.push((blk, blk + 1)),
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// The bitmap skips chunks it knows are clean without reading them. Whatever sequence of
    /// writes it goes through, every query must still agree with the raw bytes it holds, and
    /// those bytes with a plain byte-array model: a chunk wrongly believed clean would drop
    /// dirty blocks from runs, counts, deltas and the root (the one rule).
    #[test]
    fn every_query_agrees_with_a_byte_model_after_any_writes(
        blocks in 1u64..=(6 * (wire::CHUNK_BYTES as u64) * 8),
        ops in ops(),
    ) {
        let g = Geometry::new(blocks * 512, 512).unwrap();
        let mut b = Bitmap::new(g);
        let mut model = vec![0u8; g.raw_len()];
        let tail_mask = |v: &mut Vec<u8>, c: usize| {
            // Clear bits past the last block in the bitmap's last chunk.
            if c + 1 == g.chunks() && blocks % 8 != 0 {
                let last = v.len() - 1;
                v[last] &= (1u8 << (blocks % 8)) - 1;
            }
        };
        let chunk_of = |f: f64| ((g.chunks() as f64 * f) as usize).min(g.chunks() - 1);
        for op in &ops {
            match op {
                Op::Mark(a, l) => {
                    let (off, len) = to_range(&g, (*a, *l));
                    b.mark(off, len).unwrap();
                    let other = bitmap_of(g, &[(*a, *l)]).to_raw();
                    model.iter_mut().zip(other).for_each(|(m, o)| *m |= o);
                }
                Op::Merge(ms) => {
                    let other = bitmap_of(g, ms);
                    b.merge(&other).unwrap();
                    model.iter_mut().zip(other.to_raw()).for_each(|(m, o)| *m |= o);
                }
                Op::Subtract(ms) => {
                    let other = bitmap_of(g, ms);
                    b.subtract(&other).unwrap();
                    model.iter_mut().zip(other.to_raw()).for_each(|(m, o)| *m &= !o);
                }
                Op::ClearChunk(c) => {
                    let c = chunk_of(*c);
                    b.clear_chunk(c);
                    model[g.chunk_range(c)].fill(0);
                }
                Op::Apply(c, fill, or, seed) => {
                    let c = chunk_of(*c);
                    let mut raw = chunk_fill(g.chunk_range(c).len(), *fill, *seed);
                    tail_mask(&mut raw, c);
                    b.apply_chunk_raw(c, &raw, *or).unwrap();
                    for (m, r) in model[g.chunk_range(c)].iter_mut().zip(&raw) {
                        *m = if *or { *m | r } else { *r };
                    }
                }
                Op::Install(c, fill, seed) => {
                    let c = chunk_of(*c);
                    let mut raw = chunk_fill(g.chunk_range(c).len(), *fill, *seed);
                    tail_mask(&mut raw, c);
                    b.install_chunk_raw(c, &raw, chunk_cv(c, &raw)).unwrap();
                    model[g.chunk_range(c)].copy_from_slice(&raw);
                }
                Op::RoundTrip => b = Bitmap::from_raw(g, &b.to_raw()).unwrap(),
                Op::Clone => b = b.clone(),
            }
            prop_assert_eq!(&b.to_raw(), &model, "after {:?}", op);
            let count: u64 = model.iter().map(|x| u64::from(x.count_ones())).sum();
            prop_assert_eq!(b.count(), count);
            prop_assert_eq!(b.is_clean(), count == 0);
            let mut buf = Vec::new();
            for c in 0..g.chunks() {
                let bytes = &model[g.chunk_range(c)];
                prop_assert_eq!(b.chunk_is_clean(c), bytes.iter().all(|x| *x == 0), "chunk {}", c);
                b.chunk_raw(c, &mut buf);
                prop_assert_eq!(&buf[..], bytes);
            }
            let runs = runs_of(&model);
            prop_assert_eq!(b.runs().collect::<Vec<_>>(), runs.clone());
            for (a, z) in runs.iter().take(16) {
                prop_assert!(b.is_set(*a) && b.is_set(z - 1));
                prop_assert!(*a == 0 || !b.is_set(a - 1));
                // A window starting inside the run is clipped to it.
                prop_assert_eq!(b.runs_in(z - 1, blocks).next(), Some((z - 1, *z)));
            }
            prop_assert_eq!(b.root().0, *blake3::hash(&model).as_bytes());
            prop_assert_eq!(&b, &Bitmap::from_raw(g, &model).unwrap());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// The root of a union computed without building it (the post-copy final root) equals the
    /// root of the built union and BLAKE3 of its raw bytes, and leaves both bitmaps unchanged.
    #[test]
    fn union_root_is_the_root_of_the_union(g in geometry(), ms in marks(), ms2 in marks()) {
        let mut a = bitmap_of(g, &ms);
        let b = bitmap_of(g, &ms2);
        let (a0, b0) = (a.clone(), b.clone());
        let mut built = a.clone();
        built.merge(&b).unwrap();
        let got = a.union_root(&b).unwrap();
        prop_assert_eq!(got, built.root());
        prop_assert_eq!(got.0, *blake3::hash(&built.to_raw()).as_bytes());
        prop_assert_eq!(&a, &a0);
        prop_assert_eq!(&b, &b0);
        prop_assert_eq!(a.root().0, *blake3::hash(&a0.to_raw()).as_bytes());
        let other = Bitmap::new(Geometry::new(g.size() + g.granularity(), g.granularity()).unwrap());
        prop_assert!(a.union_root(&other).is_err());
    }
}
