//! The agent's TOML configuration (`agent::daemon::config::Config::parse`).

use super::{MIB64, Target};
use agent::daemon::config::Config;
use std::path::Path;

pub const TARGET: Target = Target {
    name: "config",
    decoder: "agent::daemon::config::Config::parse (TOML)",
    run,
    max_alloc: MIB64,
    max_len: 1 << 14,
    smoke_runs: 8000,
    seeds,
};

fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::parse(text, Path::new("/etc/bitferry/agent.toml"));
}

fn seeds() -> Vec<Vec<u8>> {
    let minimal = r#"listen  = "127.0.0.1:7400"
store   = "/var/lib/bitferry"
control = "/run/bitferry/control.sock"

[tls]
ca   = "ca.pem"
cert = "host.pem"
key  = "host.key"
"#;
    let full = format!(
        r#"{minimal}
metrics = "127.0.0.1:9400"
flush_interval_ms = 500

[[expect]]
disk = "vm42/vda"
from = "host-a"

[transport]
idle_timeout_ms = 30000
disable_gso = true

[[reference]]
disk = "vm42/vda"
image = "/var/lib/vm/vda.img"
manifest = "vda.manifest"
granularity = 65536
"#
    );
    vec![minimal.as_bytes().to_vec(), full.into_bytes()]
}
