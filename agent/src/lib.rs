//! The bitferry agent library: persistent store, control API, agent daemon, QUIC transport,
//! migration drivers, rebuild jobs, qcow2/QMP interop and the CLI. The `bitferry` binary is a
//! thin wrapper over [`cli::main`].

pub mod cert;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod exit;
pub mod local;
pub mod logging;
pub mod migrate;
pub mod qcow2;
pub mod qemu;
pub mod rebuild;
pub mod report;
pub mod store;
pub mod transport;
pub mod units;
