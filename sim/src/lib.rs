//! Deterministic simulation of bitferry migrations with fault injection (docs/simulation.md).
//!
//! One seed = one run: a single-threaded discrete-event world with virtual time and one seeded
//! RNG, two hosts whose agents drive the real `wire::proto` sessions and the real
//! `agent::store::Store`, a VM writing to its disk (ground truth), a lossy network under a
//! reliable-stream model, crashes, torn writes, partitions and corruption. The checker verifies
//! the safety rule and the ownership rules after every step.

pub mod agent;
pub mod check;
pub mod faultstore;
pub mod net;
pub mod run;
pub mod scenario;
pub mod storage;
pub mod truth;
pub mod world;

pub use run::{RunResult, Summary, run_seed, run_seeds};
pub use scenario::{Bug, Scenario};
