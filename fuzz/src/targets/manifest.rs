//! `agent::rebuild::manifest::parse_header` and the root check `Manifest::open` makes over the
//! entries: a block manifest's bytes (version 1, and version 2 with the image identity). With the first byte odd, the harness writes the correct
//! root into the header first so the fuzzer reaches the accepting path.

use super::{MIB64, Target};
use agent::rebuild::manifest::{self, HEADER};

pub const TARGET: Target = Target {
    name: "manifest",
    decoder: "agent::rebuild::manifest::{parse_header, Manifest::open's root check}",
    run,
    max_alloc: MIB64,
    max_len: 1 << 14,
    smoke_runs: 12000,
    seeds,
};

const H: usize = HEADER as usize;

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut f = rest.to_vec();
    if f.len() < H {
        return;
    }
    if mode & 1 == 1 {
        // Entries start after the declared header (version 2) or at 72 (version 1).
        let declared = u32::from_le_bytes([f[12], f[13], f[14], f[15]]) as usize;
        let at = if f[8..12] == manifest::VERSION.to_le_bytes() && (H..=f.len()).contains(&declared)
        {
            declared
        } else {
            H
        };
        let root = blake3::hash(&f[at..]);
        f[40..72].copy_from_slice(root.as_bytes());
    }
    let Ok(h) = manifest::parse_header(&f, f.len() as u64) else {
        return;
    };
    let at = h.entries_at as usize;
    assert!(at >= H && at <= f.len(), "entries outside the file");
    assert_eq!(
        (f.len() - at) as u64,
        h.geometry.blocks() * manifest::ENTRY as u64,
        "accepted a manifest whose length does not match its blocks"
    );
    assert_eq!(
        h.identity.is_some(),
        h.version == manifest::VERSION,
        "an identity only in version 2"
    );
    let _ = blake3::hash(&f[at..]).as_bytes() == &h.root;
}

/// A version 1 manifest (no identity) of `blocks` entries for a disk of `size` bytes at
/// `granularity`.
pub fn sample(size: u64, granularity: u64) -> Vec<u8> {
    let blocks = size.div_ceil(granularity);
    let entries: Vec<u8> = (0..blocks)
        .flat_map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .collect();
    let mut f = manifest::MAGIC.to_vec();
    f.extend_from_slice(&manifest::VERSION_1.to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&size.to_le_bytes());
    f.extend_from_slice(&granularity.to_le_bytes());
    f.extend_from_slice(&blocks.to_le_bytes());
    f.extend_from_slice(blake3::hash(&entries).as_bytes());
    f.extend_from_slice(&entries);
    f
}

/// A version 2 manifest (with the image identity, laid out as `manifest create` writes it) of
/// 10,000 bytes at 4096, for a fixed made-up image (seeds must not depend on the machine).
pub fn sample_v2() -> Vec<u8> {
    let (size, granularity) = (10_000u64, 4096u64);
    let blocks = size.div_ceil(granularity);
    let entries: Vec<u8> = (0..blocks)
        .flat_map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .collect();
    let mut identity = br#"{"path":"/backups/vm42-vda.raw","size":10000,"dev":2049,"ino":131,"rdev":0,"kind":"file","mtime_sec":1700000000,"mtime_nsec":0}"#.to_vec();
    let total = (H + identity.len() + 32).next_multiple_of(8);
    identity.resize(total - H - 32, b' ');
    let hash = *blake3::hash(&identity).as_bytes();
    let mut f = manifest::MAGIC.to_vec();
    f.extend_from_slice(&manifest::VERSION.to_le_bytes());
    f.extend_from_slice(&(total as u32).to_le_bytes());
    f.extend_from_slice(&size.to_le_bytes());
    f.extend_from_slice(&granularity.to_le_bytes());
    f.extend_from_slice(&blocks.to_le_bytes());
    f.extend_from_slice(blake3::hash(&entries).as_bytes());
    f.extend_from_slice(&identity);
    f.extend_from_slice(&hash);
    f.extend_from_slice(&entries);
    f
}

fn seeds() -> Vec<Vec<u8>> {
    [
        sample(10_000, 4096),
        sample(512, 512),
        sample(1 << 20, 1 << 16),
        sample_v2(),
    ]
    .into_iter()
        .flat_map(|m| [[&[0u8][..], &m].concat(), [&[1u8][..], &m].concat()])
        .collect()
}
