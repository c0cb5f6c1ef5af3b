//! `agent::rebuild::state::decode`: a rebuild job's persisted state. With the first byte odd,
//! the harness repairs the length field and the checksum first so the fuzzer reaches the
//! postcard body. A state that decodes round-trips through `save`'s encoding.

use super::{MIB64, Target};
use agent::rebuild::state::{self, Identity, JobState, RefIdentity};

pub const TARGET: Target = Target {
    name: "rebuild_state",
    decoder: "agent::rebuild::state::decode",
    run,
    max_alloc: MIB64,
    max_len: 1 << 14,
    smoke_runs: 12000,
    seeds,
};

fn fix(f: &mut [u8]) {
    if f.len() >= 52 {
        let body = (f.len() - 52) as u64;
        f[12..20].copy_from_slice(&body.to_le_bytes());
        let n = f.len() - 32;
        let h = blake3::hash(&f[..n]);
        f[n..].copy_from_slice(h.as_bytes());
    }
}

/// The bytes `state::save` writes (magic, version, length, postcard body, BLAKE3).
pub fn encode(s: &JobState) -> Vec<u8> {
    let body = postcard::to_allocvec(s).expect("serializes");
    let mut b = b"BFRBSTAT".to_vec();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(&body);
    let h = blake3::hash(&b);
    b.extend_from_slice(h.as_bytes());
    b
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut f = rest.to_vec();
    if mode & 1 == 1 {
        fix(&mut f);
    }
    if let Ok(s) = state::decode(&f) {
        assert_eq!(state::decode(&encode(&s)).as_ref(), Ok(&s));
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let manifest = JobState {
        identity: Identity {
            live: "/var/lib/vm/disk.img".into(),
            live_size: 1 << 20,
            granularity: 65536,
            reference: RefIdentity::Manifest {
                root: [3; 32],
                size: 1 << 20,
            },
        },
        tag: r#"{"spec":{}}"#.into(),
        cursor_block: 7,
        partial: vec![0x81, 0, 0],
        hashes: 0,
    };
    let backup = JobState {
        identity: Identity {
            reference: RefIdentity::Backup {
                path: "/backups/disk.raw".into(),
                size: 1 << 20,
                mtime_ns: -5,
            },
            ..manifest.identity.clone()
        },
        hashes: 4,
        ..manifest.clone()
    };
    [manifest, backup]
        .iter()
        .flat_map(|s| {
            let b = encode(s);
            [[&[0u8][..], &b].concat(), [&[1u8][..], &b].concat()]
        })
        .collect()
}
