//! bitferry end-to-end tests: real `bitferry` processes, real files, QEMU tools as oracles.
//! One test binary with modules, so it links once.

mod campaign;
mod common;

mod agent_control;
mod bench_cli;
mod bitmap_cli;
mod cert;
mod clean_stop;
mod control_limits;
mod demo;
mod full_store;
mod kill_campaign;
mod large_bitmaps;
mod load;
mod metrics_endpoint;
mod migrate;
mod migrate_refusals;
mod operator;
mod qcow2;
mod qemu_clients;
mod qemu_drain;
mod rebuild;
mod rebuild_agent;
mod store_crash;
mod switchover_marks;
mod untrusted_files;
