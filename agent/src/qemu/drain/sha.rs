//! SHA-256 of a bitmap as QEMU's `x-debug-block-dirty-bitmap-sha256` computes it. Pure.
//!
//! QEMU (`util/hbitmap.c`, `hbitmap_sha256`) hashes the bottom level of its `HBitmap`: an
//! array of `max(ceil(blocks / 64), 1)` host `unsigned long`s, one bit per block, block `i` in
//! bit `i % 64` of word `i / 64`, bits past the last block zero. On a little-endian 64-bit host
//! those bytes are bitferry's raw bytes (QEMU's qcow2 layout) zero-padded to a multiple of 8,
//! at least 8 bytes. The agent reaches QEMU over a unix socket, so QEMU runs on the agent's
//! host: the words are rendered in this host's byte order. The reply is lowercase hex.

use sha2::{Digest, Sha256};
use wire::Bitmap;

/// Lowercase hex SHA-256 of `bitmap` rendered as QEMU's bottom `HBitmap` level.
pub fn qemu_sha256(bitmap: &Bitmap) -> String {
    let raw = bitmap.to_raw();
    let words = raw.len().div_ceil(8).max(1);
    let mut h = Sha256::new();
    let mut word = [0u8; 8];
    for i in 0..words {
        let piece = raw.get(i * 8..raw.len().min(i * 8 + 8)).unwrap_or(&[]);
        word.fill(0);
        word[..piece.len()].copy_from_slice(piece);
        h.update(u64::from_le_bytes(word).to_ne_bytes());
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::Geometry;

    fn sha_of(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    #[test]
    fn padded_to_whole_words() {
        // 1537 blocks: 193 raw bytes, 25 words, 200 hashed bytes.
        let g = Geometry::new(1537 * 65536, 65536).unwrap();
        let mut b = Bitmap::new(g);
        b.mark(0, 1).unwrap();
        b.mark(1536 * 65536, 1).unwrap();
        let mut want = vec![0u8; 200];
        want[0] = 1;
        want[192] = 1;
        if cfg!(target_endian = "little") {
            assert_eq!(qemu_sha256(&b), sha_of(&want));
        }
        // Empty: the hash of all-zero words, never of an empty message.
        assert_eq!(qemu_sha256(&Bitmap::new(g)), sha_of(&[0u8; 200]));
        // One block still hashes one whole word.
        let one = Bitmap::new(Geometry::new(512, 512).unwrap());
        assert_eq!(qemu_sha256(&one), sha_of(&[0u8; 8]));
    }
}
