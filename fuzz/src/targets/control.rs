//! The control socket's request line (`agent::control::Request`, newline-delimited JSON, what
//! any local process may send the agent) and the response line the CLI reads. A request that
//! decodes re-encodes to JSON that decodes again.

use super::{MIB64, Target};
use agent::control::{Request, Response};

pub const TARGET: Target = Target {
    name: "control",
    decoder: "agent::control::{Request, Response} (serde_json lines)",
    run,
    max_alloc: MIB64,
    max_len: 1 << 16,
    smoke_runs: 12000,
    seeds,
};

fn run(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<Request>(data) {
        let again = serde_json::to_vec(&r).expect("requests serialize");
        serde_json::from_slice::<Request>(&again).expect("a re-encoded request decodes");
    }
    let _ = serde_json::from_slice::<Response>(data);
}

fn seeds() -> Vec<Vec<u8>> {
    [
        r#"{"cmd":"create","disk":"vm1/vda","size":1073741824,"granularity":65536,"checkpoint":null}"#,
        r#"{"cmd":"mark","disk":"vm1/vda","ranges":[[0,4096],[65536,1]]}"#,
        r#"{"cmd":"show","disk":"vm1/vda"}"#,
        r#"{"cmd":"export","disk":"vm1/vda","raw":"/tmp/x","allow_untrusted":false}"#,
        r#"{"cmd":"expect","disk":"vm1/vda","from":"host-a"}"#,
        r#"{"cmd":"migrate_start","disk":"vm1/vda","to":"h:7400","server_name":null,"rate":1000}"#,
        r#"{"cmd":"rebuild_start","disk":"d","image":"/i","manifest":"/m","backup":null,"granularity":4096}"#,
        r#"{"cmd":"rebuild_status","disk":null}"#,
        r#"{"cmd":"status"}"#,
        r#"{"ok":false,"error":"no bitmap","exit_code":3}"#,
        r#"{"ok":true,"result":{"disk":"vm1/vda","extents":[{"offset":0,"length":65536}]}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
