//! qcow2 persistent bitmaps (`agent::qcow2::reader::Image` over a byte slice, which runs
//! `agent::qcow2::format`'s header, extension, directory and table parsers): open the image,
//! then read every bitmap it lists.
//!
//! A bitmap's data may legitimately be as large as QEMU's limit (512 MiB from a 4 KiB image
//! whose table says "all ones"); the harness reads only bitmaps whose table covers at most
//! 16 MiB so that executions stay fast. Larger ones still go through every check up to the
//! read itself.

use super::{MIB64, Target};
use agent::qcow2::reader::{Image, Trust};

pub const TARGET: Target = Target {
    name: "qcow2",
    decoder: "agent::qcow2::{reader::Image::{open, read_bitmap}, format::*}",
    run,
    max_alloc: MIB64,
    max_len: 1 << 16,
    smoke_runs: 8000,
    seeds,
};

/// Largest bitmap table coverage read: `table_size × cluster_size`.
const READ_LIMIT: u64 = 16 << 20;

fn run(data: &[u8]) {
    let Ok(img) = Image::open(data) else {
        return;
    };
    let cs = img.header.cluster_size();
    for e in &img.bitmaps {
        let _ = (e.flag_names(), img.geometry(e));
        let trusted = img.trust(e) == Trust::Consistent;
        if u64::from(e.table_size) * cs > READ_LIMIT {
            continue;
        }
        if let Ok(b) = img.read_bitmap(e) {
            assert!(trusted, "read an untrusted bitmap");
            assert_eq!(b.geometry().size(), img.header.size);
            let _ = b.count();
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    vec![include_bytes!("../../../agent/src/qcow2/testdata/small.qcow2").to_vec()]
}
