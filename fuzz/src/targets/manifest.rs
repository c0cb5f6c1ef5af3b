//! `agent::rebuild::manifest::parse_header` and the root check `Manifest::open` makes over the
//! entries: a block manifest's bytes. With the first byte odd, the harness writes the correct
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
        let root = blake3::hash(&f[H..]);
        f[40..72].copy_from_slice(root.as_bytes());
    }
    let h: &[u8; H] = f[..H].try_into().expect("header length");
    let Ok((g, root)) = manifest::parse_header(h, f.len() as u64) else {
        return;
    };
    assert_eq!(
        (f.len() - H) as u64,
        g.blocks() * manifest::ENTRY as u64,
        "accepted a manifest whose length does not match its blocks"
    );
    let _ = blake3::hash(&f[H..]).as_bytes() == &root;
}

/// A manifest of `blocks` entries for a disk of `size` bytes at `granularity`.
pub fn sample(size: u64, granularity: u64) -> Vec<u8> {
    let blocks = size.div_ceil(granularity);
    let entries: Vec<u8> = (0..blocks)
        .flat_map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .collect();
    let mut f = manifest::MAGIC.to_vec();
    f.extend_from_slice(&manifest::VERSION.to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&size.to_le_bytes());
    f.extend_from_slice(&granularity.to_le_bytes());
    f.extend_from_slice(&blocks.to_le_bytes());
    f.extend_from_slice(blake3::hash(&entries).as_bytes());
    f.extend_from_slice(&entries);
    f
}

fn seeds() -> Vec<Vec<u8>> {
    [sample(10_000, 4096), sample(512, 512), sample(1 << 20, 1 << 16)]
        .into_iter()
        .flat_map(|m| [[&[0u8][..], &m].concat(), [&[1u8][..], &m].concat()])
        .collect()
}
