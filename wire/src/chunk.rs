//! Per-chunk encodings for transfer and storage: all-zero (no payload), roaring (portable
//! format) or raw, whichever is smallest. Hashes are always over the *raw* bytes, so the encoding
//! is a size optimisation that can never change what is verified.

use crate::error::DecodeError;
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

/// How a chunk's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum ChunkKind {
    /// All bits clear; no payload.
    Zero = 0,
    /// Roaring portable serialization of the set bit positions within the chunk.
    Roaring = 1,
    /// The raw bytes.
    Raw = 2,
}

impl ChunkKind {
    /// Parse a stored or received tag.
    pub fn from_tag(tag: u8) -> Result<Self, DecodeError> {
        match tag {
            0 => Ok(ChunkKind::Zero),
            1 => Ok(ChunkKind::Roaring),
            2 => Ok(ChunkKind::Raw),
            t => Err(DecodeError::UnknownKind(t)),
        }
    }
}

/// An encoded chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkEncoding {
    /// The encoding.
    pub kind: ChunkKind,
    /// The payload (empty for [`ChunkKind::Zero`]).
    pub payload: Vec<u8>,
}

/// Encode raw chunk bytes in the smallest of the three forms.
pub fn encode_chunk(raw: &[u8]) -> ChunkEncoding {
    match smallest_form(raw) {
        Form::Raw => ChunkEncoding {
            kind: ChunkKind::Raw,
            payload: raw.to_vec(),
        },
        other => other.into_encoding(Vec::new()),
    }
}

/// [`encode_chunk`] taking the bytes by value: a chunk that travels raw becomes its own payload
/// without a copy (the migration bulk's hot path, `bitferry bench migrate`).
pub fn encode_chunk_owned(raw: Vec<u8>) -> ChunkEncoding {
    smallest_form(&raw).into_encoding(raw)
}

/// Which encoding is smallest; the roaring one is built while deciding.
enum Form {
    Zero,
    Roaring(Vec<u8>),
    Raw,
}

impl Form {
    /// The encoding, with `raw` (the chunk's bytes, or empty when not needed) as the payload of
    /// the raw form.
    fn into_encoding(self, raw: Vec<u8>) -> ChunkEncoding {
        match self {
            Form::Zero => ChunkEncoding {
                kind: ChunkKind::Zero,
                payload: Vec::new(),
            },
            Form::Roaring(payload) => ChunkEncoding {
                kind: ChunkKind::Roaring,
                payload,
            },
            Form::Raw => ChunkEncoding {
                kind: ChunkKind::Raw,
                payload: raw,
            },
        }
    }
}

fn smallest_form(raw: &[u8]) -> Form {
    if raw.iter().all(|b| *b == 0) {
        return Form::Zero;
    }
    if raw_certainly_smallest(raw) {
        return Form::Raw;
    }
    let mut rb = RoaringBitmap::from_lsb0_bytes(0, raw);
    rb.optimize();
    if rb.serialized_size() < raw.len() {
        let mut payload = Vec::with_capacity(rb.serialized_size());
        rb.serialize_into(&mut payload)
            .expect("writing into a Vec cannot fail");
        return Form::Roaring(payload);
    }
    Form::Raw
}

/// Bytes of one roaring container's worth of bits (65,536 positions).
const CONTAINER_BYTES: usize = 8192;

/// Whether roaring cannot beat raw for `raw`, decided without building the roaring bitmap (a
/// dense chunk costs more to try than to send; bench migrate). Roaring serializes each
/// container of 65,536 positions in at least min(2·cardinality, 8192, 2 + 4·runs) bytes, plus a
/// header, so if every container has more than 4,096 bits set and at least 2,048 runs, the
/// serialization exceeds the raw bytes and [`encode_chunk`] would pick raw anyway. Only for
/// whole containers; anything else takes the exact path.
fn raw_certainly_smallest(raw: &[u8]) -> bool {
    if raw.is_empty() || !raw.len().is_multiple_of(CONTAINER_BYTES) {
        return false;
    }
    raw.chunks_exact(CONTAINER_BYTES).all(|c| {
        let (mut card, mut runs, mut carry) = (0u32, 0u32, 0u64);
        // Both counts only grow, so the container is decided as soon as both bounds are
        // passed: random bytes get there within the first eighth of the container.
        for block in c.chunks_exact(64) {
            for b in block.chunks_exact(8) {
                let w = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                card += w.count_ones();
                // A run starts at a set bit whose lower neighbour (LSB-first) is clear; the
                // first bit of a container has no neighbour, as in roaring's own run count.
                runs += (w & !((w << 1) | carry)).count_ones();
                carry = w >> 63;
            }
            if card > 4096 && runs >= 2048 {
                return true;
            }
        }
        false
    })
}

/// Decode a chunk that must be exactly `raw_len` raw bytes. Rejects payloads larger than the
/// chunk itself before parsing, positions outside the chunk, and trailing garbage.
pub fn decode_chunk(
    kind: ChunkKind,
    payload: &[u8],
    raw_len: usize,
) -> Result<Vec<u8>, DecodeError> {
    match kind {
        ChunkKind::Zero => {
            if !payload.is_empty() {
                return Err(DecodeError::ZeroWithPayload);
            }
            Ok(vec![0; raw_len])
        }
        ChunkKind::Raw => {
            if payload.len() != raw_len {
                return Err(DecodeError::RawLength {
                    got: payload.len(),
                    expected: raw_len,
                });
            }
            Ok(payload.to_vec())
        }
        ChunkKind::Roaring => {
            // The encoder only picks roaring when it is smaller than raw.
            if payload.len() >= raw_len.max(8) {
                return Err(DecodeError::Oversized {
                    got: payload.len(),
                    max: raw_len,
                });
            }
            let mut cursor = payload;
            let rb = RoaringBitmap::deserialize_from(&mut cursor)
                .map_err(|e| DecodeError::Roaring(e.to_string()))?;
            if !cursor.is_empty() {
                return Err(DecodeError::Roaring(format!(
                    "{} trailing bytes",
                    cursor.len()
                )));
            }
            let bits = raw_len as u64 * 8;
            if rb.max().is_some_and(|m| u64::from(m) >= bits) {
                return Err(DecodeError::Roaring(
                    "bit position outside the chunk".into(),
                ));
            }
            let mut raw = vec![0u8; raw_len];
            // Run by run, not bit by bit: a full chunk's single run container costs one fill,
            // not 2^19 iterations (seen while fuzzing, docs/fuzzing.md).
            let mut it = rb.iter();
            while let Some(r) = it.next_range() {
                set_bits(&mut raw, *r.start() as usize, *r.end() as usize + 1);
            }
            Ok(raw)
        }
    }
}

/// Set bits `a .. e` (LSB first) of `raw`; the caller checked `e <= raw.len() * 8`.
fn set_bits(raw: &mut [u8], a: usize, e: usize) {
    let (first, last) = (a / 8, e / 8);
    if first == last {
        raw[first] |= ((1u16 << (e % 8)) - (1u16 << (a % 8))) as u8;
        return;
    }
    raw[first] |= 0xff << (a % 8);
    raw[first + 1..last].fill(0xff);
    if !e.is_multiple_of(8) {
        raw[last] |= (1u8 << (e % 8)) - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The shortcut never changes the result: whenever it says raw, roaring is no smaller.
        /// Chunks built from runs of random length with a random density, around the
        /// thresholds.
        #[test]
        fn dense_shortcut_agrees_with_roaring(
            density in 0.0f64..1.0,
            run_max in 1usize..40,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut x = seed | 1;
            let mut next = move || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
            let mut raw = vec![0u8; 65536];
            let mut bit = 0;
            while bit < raw.len() * 8 {
                let len = 1 + (next() as usize) % run_max;
                if (next() % 1_000_000) as f64 / 1e6 < density {
                    for b in bit..(bit + len).min(raw.len() * 8) {
                        raw[b / 8] |= 1 << (b % 8);
                    }
                }
                bit += len;
            }
            if raw_certainly_smallest(&raw) {
                let mut rb = RoaringBitmap::from_lsb0_bytes(0, &raw);
                rb.optimize();
                proptest::prop_assert!(rb.serialized_size() >= raw.len());
            }
        }
    }

    proptest::proptest! {
        /// Decoding a roaring chunk run by run gives the same bytes as setting every position
        /// one at a time, for runs of any length at any bit offset, in chunks of any length.
        #[test]
        fn roaring_decodes_like_bit_by_bit(
            raw_len in 1usize..3000,
            runs in proptest::collection::vec((0u32..24_000, 1u32..3000), 0..12),
        ) {
            let bits = raw_len as u32 * 8;
            let mut rb = RoaringBitmap::new();
            let mut expect = vec![0u8; raw_len];
            for (a, n) in runs {
                let a = a % bits;
                let e = (a + n).min(bits);
                rb.insert_range(a..e);
                for b in a..e {
                    expect[(b / 8) as usize] |= 1 << (b % 8);
                }
            }
            rb.optimize();
            let mut p = Vec::new();
            rb.serialize_into(&mut p).unwrap();
            let got = decode_chunk(ChunkKind::Roaring, &p, raw_len);
            if p.len() < raw_len.max(8) {
                proptest::prop_assert_eq!(got, Ok(expect));
            } else {
                proptest::prop_assert!(got.is_err());
            }
        }
    }

    #[test]
    fn set_bits_sets_exactly_the_range() {
        for len in 1..5usize {
            for a in 0..len * 8 {
                for e in a + 1..=len * 8 {
                    let mut raw = vec![0u8; len];
                    set_bits(&mut raw, a, e);
                    let got: Vec<usize> = (0..len * 8)
                        .filter(|b| raw[b / 8] >> (b % 8) & 1 == 1)
                        .collect();
                    assert_eq!(got, (a..e).collect::<Vec<_>>(), "{a}..{e} of {len}");
                }
            }
        }
    }

    #[test]
    fn dense_shortcut_takes_random_bytes_only() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(raw_certainly_smallest(&random));
        assert_eq!(encode_chunk(&random).kind, ChunkKind::Raw);
        assert!(!raw_certainly_smallest(&[0xff; 65536]));
        assert!(!raw_certainly_smallest(&random[..1000]));
    }

    #[test]
    fn picks_the_smallest_form() {
        assert_eq!(encode_chunk(&[0; 100]).kind, ChunkKind::Zero);
        let mut sparse = vec![0u8; 65536];
        sparse[100] = 1;
        sparse[40000] = 0x80;
        assert_eq!(encode_chunk(&sparse).kind, ChunkKind::Roaring);
        let full = vec![0xff; 65536];
        assert_eq!(encode_chunk(&full).kind, ChunkKind::Roaring);
        let noisy: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        assert_eq!(encode_chunk(&noisy).kind, ChunkKind::Raw);
    }

    #[test]
    fn rejects_malformed_payloads() {
        assert!(decode_chunk(ChunkKind::Zero, &[1], 10).is_err());
        assert!(decode_chunk(ChunkKind::Raw, &[1, 2], 10).is_err());
        assert!(decode_chunk(ChunkKind::Roaring, &[0; 3], 10).is_err());
        // A bit outside a 1-byte chunk.
        let mut rb = RoaringBitmap::new();
        rb.insert(9);
        let mut p = Vec::new();
        rb.serialize_into(&mut p).unwrap();
        assert!(decode_chunk(ChunkKind::Roaring, &p, 64).is_ok());
        assert!(decode_chunk(ChunkKind::Roaring, &p, 1).is_err());
        assert!(ChunkKind::from_tag(7).is_err());
    }
}
