//! The bitferry agent library: persistent store, CLI, and (as they land) trackers, transport,
//! migration sessions, rebuild jobs and QEMU interop. The `bitferry` binary is a thin wrapper over
//! [`cli::main`].

pub mod cli;
pub mod rebuild;
pub mod store;
