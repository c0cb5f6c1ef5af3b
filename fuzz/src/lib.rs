//! bitferry's fuzz targets (docs/fuzzing.md). The bodies live in [`targets`], one file per
//! decoder of untrusted bytes; `fuzz_targets/*.rs` hand them to libFuzzer, and the CI smoke
//! (`agent/tests/fuzz_smoke.rs`) runs the same files without instrumentation.

pub mod guard;
pub mod targets;

#[cfg(test)]
mod smoke;

/// Every allocation of a fuzz binary goes through the guard (see [`guard`]).
#[global_allocator]
static ALLOC: guard::Guard = guard::Guard;
