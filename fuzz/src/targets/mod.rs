//! The fuzz targets: one file per decoder of untrusted bytes, each a plain function of the input
//! bytes, so the same bodies run under libFuzzer (`fuzz/fuzz_targets/*.rs`, coverage-guided)
//! and without instrumentation in the CI smoke (`agent/tests/fuzz_smoke.rs`, which includes
//! this module by path). See docs/fuzzing.md.
//!
//! A body returns normally for every input: a rejected input is fine, a panic (including an
//! arithmetic overflow, checked in both builds) or one allocation above the target's
//! [`Target::max_alloc`] is a finding. Bodies also check the decoder's own promises where it
//! makes them (round trips, "a rejected delta leaves the bitmap untouched", the safety rule).
//!
//! Adding a target: a file here with `pub const TARGET`, its name in the `targets!` list below,
//! a three-line `fuzz/fuzz_targets/NAME.rs`, a `[[bin]]` in `fuzz/Cargo.toml`, and seeds in
//! `fuzz/corpus/NAME/` (`cargo fuzz run seeds` writes them, see [`seeds`]).

pub mod input;
pub mod peer;

/// A fuzz target.
pub struct Target {
    /// Its name: the cargo-fuzz binary and the corpus folder `fuzz/corpus/NAME`.
    pub name: &'static str,
    /// What it decodes, for docs and reports.
    pub decoder: &'static str,
    /// The body.
    pub run: fn(&[u8]),
    /// Largest single allocation the decoder may make for an input of `max_len` bytes.
    pub max_alloc: usize,
    /// Inputs longer than this are cut (libFuzzer's `-max_len` for this target too).
    pub max_len: usize,
    /// Generated inputs the CI smoke runs after the corpus (dev profile, ~1 s per target).
    pub smoke_runs: u32,
    /// Seed inputs written by the `seeds` generator (`cargo fuzz run seeds`), when the
    /// corpus is regenerated.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// The default allocation limit: decoders of small inputs have no business asking for more.
pub const MIB64: usize = 64 << 20;

impl Target {
    /// Run the body on `data` under the allocation guard.
    pub fn fuzz(&self, data: &[u8]) {
        let data = &data[..data.len().min(self.max_len)];
        crate::guard::limited(self.max_alloc, || (self.run)(data));
    }
}

macro_rules! targets {
    ($($m:ident),* $(,)?) => {
        $(pub mod $m;)*
        /// Every target, in the order docs/fuzzing.md lists them.
        pub const ALL: &[&Target] = &[$(&$m::TARGET),*];

        /// One CI smoke test per target (`cargo nextest run -E 'test(fuzz_smoke)'`).
        #[cfg(test)]
        mod fuzz_smoke {
            $(
                #[test]
                fn $m() {
                    crate::smoke::run(&super::$m::TARGET);
                }
            )*
        }
    };
}

targets!(
    frame,
    chunk,
    delta,
    dest_stream,
    source_stream,
    migration,
    store_file,
    retired_record,
    rebuild_state,
    manifest,
    qcow2,
    control,
    config,
    qmp,
    nbd,
    peer_cert,
);

/// Look a target up by name.
pub fn by_name(name: &str) -> Option<&'static Target> {
    ALL.iter().copied().find(|t| t.name == name)
}
