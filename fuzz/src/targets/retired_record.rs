//! `agent::store::retired::decode`: a retirement record (`<disk>.retired`). With the first
//! byte odd, the harness repairs the checksum line first so the fuzzer reaches the fields
//! behind it. A record that decodes re-encodes to the same bytes.

use super::{MIB64, Target};
use agent::store::retired;
use wire::DiskId;

pub const TARGET: Target = Target {
    name: "retired_record",
    decoder: "agent::store::retired::decode",
    run,
    max_alloc: MIB64,
    max_len: 4096,
    smoke_runs: 12000,
    seeds,
};

fn disk() -> DiskId {
    DiskId::new("vm1/vda").expect("valid")
}

/// Replace the fourth line with the BLAKE3 of the first three, when there are four.
fn fix_sum(f: &[u8]) -> Vec<u8> {
    let mut lines: Vec<&[u8]> = f.split(|b| *b == b'\n').collect();
    if lines.len() < 4 {
        return f.to_vec();
    }
    let body_len = lines[0].len() + lines[1].len() + lines[2].len() + 3;
    let sum = blake3::hash(&f[..body_len]).to_hex();
    lines[3] = sum.as_bytes();
    lines.join(&b'\n')
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        fix_sum(rest)
    } else {
        rest.to_vec()
    };
    if let Ok(epoch) = retired::decode(&disk(), &bytes) {
        assert_eq!(retired::decode(&disk(), &retired::encode(&disk(), epoch)), Ok(epoch));
    }
}

fn seeds() -> Vec<Vec<u8>> {
    [0, 7, u64::MAX]
        .into_iter()
        .flat_map(|e| {
            let r = retired::encode(&disk(), e);
            [[&[0u8][..], &r].concat(), [&[1u8][..], &r].concat()]
        })
        .collect()
}
