//! bitferry end-to-end tests: real `bitferry` processes, real files, QEMU tools as oracles.
//! One test binary with modules, so it links once.

mod campaign;
mod common;

mod agent_control;
mod bench_cli;
mod bitmap_cli;
mod cert;
mod clean_stop;
mod demo;
mod kill_campaign;
mod load;
mod migrate;
mod migrate_refusals;
mod qcow2;
mod rebuild;
mod rebuild_agent;
mod store_crash;
