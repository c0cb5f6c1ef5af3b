//! The CI smoke of a fuzz target, without instrumentation: every committed corpus input, then
//! `smoke_runs` inputs mutated from them by a seeded generator. Any panic or over-limit
//! allocation fails the test with the input (hex) and the seed; `BITFERRY_TEST_SEED=N`
//! replays a run. Used by `agent/tests/fuzz_smoke.rs` (which includes this file by path).

use crate::targets::Target;
use std::path::{Path, PathBuf};

/// `fuzz/corpus/NAME`, found from the including crate's manifest directory.
pub fn corpus_dir(name: &str) -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for root in [here.join("corpus"), here.join("../fuzz/corpus")] {
        if root.is_dir() {
            return root.join(name);
        }
    }
    panic!("no fuzz/corpus beside {}", here.display());
}

/// The committed inputs of a target, in file-name order.
pub fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("corpus file");
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

/// xorshift64*: small, seeded, the same everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    u64::MAX,
];

/// libFuzzer-style mutations of `base` (with `other` for splicing), kept within `max_len`.
pub fn mutate(rng: &mut Rng, base: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(6) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                // An interesting integer, little- or big-endian, 1..8 bytes wide.
                let w = [1, 2, 4, 8][rng.below(4)];
                let i = rng.below(len);
                let x = INTERESTING[rng.below(INTERESTING.len())];
                let b = if rng.next() & 1 == 0 {
                    x.to_le_bytes()
                } else {
                    x.to_be_bytes()
                };
                let b = if rng.next() & 1 == 0 {
                    &b[..w]
                } else {
                    &b[8 - w..]
                };
                for (k, byte) in b.iter().enumerate() {
                    if let Some(t) = v.get_mut(i + k) {
                        *t = *byte;
                    }
                }
            }
            5 => v.truncate(rng.below(len + 1)),
            6 if !other.is_empty() => {
                // Splice a piece of another input in.
                let a = rng.below(other.len());
                let n = 1 + rng.below((other.len() - a).min(256));
                let i = rng.below(len + 1);
                v.splice(i..i, other[a..a + n].iter().copied());
            }
            7 if len > 1 => {
                // Copy a piece of the input over another place of it.
                let a = rng.below(len);
                let n = 1 + rng.below((len - a).min(64));
                let piece = v[a..a + n].to_vec();
                let i = rng.below(len);
                for (k, byte) in piece.into_iter().enumerate() {
                    if let Some(t) = v.get_mut(i + k) {
                        *t = byte;
                    }
                }
            }
            _ => {
                let i = rng.below(len + 1);
                let b = rng.next() as u8;
                v.insert(i, b);
            }
        }
    }
    v.truncate(max_len);
    v
}

/// The seed: `BITFERRY_TEST_SEED`, or a fresh one.
pub fn seed() -> u64 {
    std::env::var("BITFERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::time::SystemTime::now())
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Run `input` through the target; on failure, report it and fail.
fn one(t: &Target, seed: u64, what: &str, input: &[u8]) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.fuzz(input)));
    if let Err(e) = r {
        let msg = e
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| e.downcast_ref::<&str>().copied())
            .unwrap_or("(non-text panic)");
        panic!(
            "fuzz smoke {}: {what} failed: {msg}\n  seed {seed} (replay with \
             BITFERRY_TEST_SEED={seed})\n  input ({} bytes): {}\n  save it with `echo HEX | \
             xxd -r -p > fuzz/corpus/{}/crash-NAME` and reproduce with `cargo fuzz run {} \
             fuzz/corpus/{}/crash-NAME`",
            t.name,
            input.len(),
            hex(&input[..input.len().min(8192)]),
            t.name,
            t.name,
            t.name,
        );
    }
}

/// The smoke of target `t`.
pub fn run(t: &Target) {
    assert!(
        crate::guard::installed(),
        "the allocation guard is not the global allocator"
    );
    let seed = seed();
    eprintln!(
        "fuzz smoke {} ({}): seed {seed} (replay with BITFERRY_TEST_SEED={seed})",
        t.name, t.decoder
    );
    let start = std::time::Instant::now();
    let corpus = corpus(t.name);
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{} is empty: every target needs seeds",
        t.name
    );
    for (name, input) in &corpus {
        one(t, seed, &format!("corpus file {name}"), input);
    }
    let mut rng = Rng::new(seed);
    for i in 0..t.smoke_runs {
        let input = if i % 16 == 15 {
            // Now and then plain noise.
            let n = rng.below(t.max_len.min(512) + 1);
            (0..n).map(|_| rng.next() as u8).collect()
        } else {
            let base = &corpus[rng.below(corpus.len())].1;
            let other = &corpus[rng.below(corpus.len())].1;
            mutate(&mut rng, base, other, t.max_len)
        };
        one(t, seed, &format!("generated input {i}"), &input);
    }
    eprintln!(
        "fuzz smoke {}: {} corpus inputs and {} generated in {:.2?}",
        t.name,
        corpus.len(),
        t.smoke_runs,
        start.elapsed()
    );
}
