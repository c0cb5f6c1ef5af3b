//! Deterministic simulation of bitferry migrations with fault injection (docs/simulation.md).

pub mod storage;
