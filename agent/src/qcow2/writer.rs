//! Writing a *carrier*: a new qcow2 v3 image with no guest data that holds one persistent bitmap,
//! so QEMU can take the bits in (`qemu-img bitmap --merge -b CARRIER`, or `blockdev-add` plus a
//! cross-node `block-dirty-bitmap-merge`).
//!
//! Layout, in 64 KiB clusters (every cluster used exactly once, refcount 1, so `qemu-img check`
//! finds no errors and no leaks):
//!
//! ```text
//! 0        header (112 bytes), bitmaps extension, end-of-extensions
//! 1        refcount table (one cluster: 8192 refcount blocks, far more than needed)
//! 2..2+R   refcount blocks (16-bit refcounts, 32768 clusters each)
//! ..+L     L1 table, all zero: the carrier has no guest data
//! ..+1     bitmap directory (one entry)
//! ..+T     bitmap table
//! ..+D     one data cluster per bitmap cluster that is neither all zeros nor all ones
//! ```
//! All-zero bitmap clusters are table entries with offset 0; full all-ones clusters set bit 0
//! (never the partial last cluster: QEMU would fill whole words there, past the disk's end).

use super::format::{
    self, AUTOCLEAR_BITMAPS, BitmapsExt, DirEntry, FLAG_AUTO, Header, MAX_NAME_SIZE, MAX_PHYS_SIZE,
    TableEntry,
};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use wire::{Bitmap, CHUNK_BYTES};

/// Cluster size of carriers (QEMU's default).
pub const CLUSTER_BITS: u32 = 16;
const CS: u64 = 1 << CLUSTER_BITS;
/// Refcount width: 2^4 = 16 bits (QEMU's default).
const REFCOUNT_ORDER: u32 = 4;
const REFS_PER_BLOCK: u64 = CS / 2;
/// L1 entries per cluster and guest bytes per L1 entry (64 KiB clusters, 8-byte L2 entries).
const L1_COVERAGE: u64 = CS * (CS / 8);
/// QEMU's largest L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;

/// Why a carrier could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Creating or writing the file failed.
    #[error("writing carrier {path}: {source}")]
    Io {
        /// The carrier path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The bitmap or name cannot be stored in a qcow2 image QEMU would load.
    #[error("cannot store this bitmap in qcow2: {0}")]
    Unrepresentable(String),
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarrierInfo {
    /// Total clusters (the file is `clusters × 64 KiB` long, mostly sparse).
    pub clusters: u64,
    /// Bitmap clusters stored as data.
    pub data_clusters: u64,
    /// Bitmap clusters stored as all-zero entries.
    pub zero_clusters: u64,
    /// Bitmap clusters stored as all-ones entries.
    pub ones_clusters: u64,
}

/// Where everything goes, computed before writing anything.
struct Plan {
    entries: Vec<TableEntry>,
    refblocks: u64,
    l1_entries: u64,
    l1_offset: u64,
    dir_offset: u64,
    table_offset: u64,
    total: u64,
}

/// Copy the raw bytes `start .. start+len` of `b` into `out` (chunk by chunk: no full copy).
fn raw_slice(b: &Bitmap, start: usize, len: usize, out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
    out.clear();
    if len == 0 {
        return;
    }
    let end = start + len;
    for c in start / CHUNK_BYTES..=(end - 1) / CHUNK_BYTES {
        b.chunk_raw(c, scratch);
        let base = c * CHUNK_BYTES;
        let lo = start.max(base) - base;
        let hi = end.min(base + scratch.len()) - base;
        out.extend_from_slice(&scratch[lo..hi]);
    }
}

fn plan(b: &Bitmap) -> Result<Plan, WriteError> {
    let g = b.geometry();
    let raw_len = g.raw_len();
    let table_size =
        format::expected_table_size(g.size(), g.granularity().trailing_zeros() as u8, CS);
    if table_size * CS > MAX_PHYS_SIZE {
        return Err(WriteError::Unrepresentable(format!(
            "{raw_len} bytes of bitmap exceed QEMU's limit of {MAX_PHYS_SIZE}; use a larger \
             granularity"
        )));
    }
    let l1_entries = g.size().div_ceil(L1_COVERAGE);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(WriteError::Unrepresentable(format!(
            "a {}-byte disk needs an L1 table larger than QEMU allows",
            g.size()
        )));
    }
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let mut entries = Vec::with_capacity(table_size as usize);
    let mut data = 0u64;
    for i in 0..table_size as usize {
        let start = i * CS as usize;
        let len = (CS as usize).min(raw_len - start);
        raw_slice(b, start, len, &mut out, &mut scratch);
        entries.push(if out.iter().all(|v| *v == 0) {
            TableEntry::Zeros
        } else if len == CS as usize && out.iter().all(|v| *v == 0xff) {
            // Only full clusters: QEMU fills all-ones clusters a whole word at a time, so a
            // partial last cluster would gain bits past the disk's end in QEMU's memory.
            TableEntry::Ones
        } else {
            data += 1;
            TableEntry::Data(0) // offset assigned below
        });
    }
    let l1_clusters = (l1_entries * 8).div_ceil(CS).max(1);
    let table_clusters = (table_size * 8).div_ceil(CS);
    let fixed = 2 + l1_clusters + 1 + table_clusters + data;
    let mut refblocks = 1;
    while (fixed + refblocks).div_ceil(REFS_PER_BLOCK) > refblocks {
        refblocks += 1;
    }
    // One refcount-table cluster holds CS/8 = 8192 refcount blocks: 16 TiB of carrier.
    debug_assert!(refblocks <= CS / 8);
    let l1_offset = (2 + refblocks) * CS;
    let dir_offset = l1_offset + l1_clusters * CS;
    let table_offset = dir_offset + CS;
    let mut next = table_offset + table_clusters * CS;
    for e in &mut entries {
        if let TableEntry::Data(off) = e {
            *off = next;
            next += CS;
        }
    }
    Ok(Plan {
        entries,
        refblocks,
        l1_entries,
        l1_offset,
        dir_offset,
        table_offset,
        total: next / CS,
    })
}

/// Write a new carrier at `path` (which must not exist) holding `bitmap` as `name`, with the
/// `auto` flag set only if `auto`. The file is synced before this returns.
pub fn write_carrier(
    path: &Path,
    name: &str,
    bitmap: &Bitmap,
    auto: bool,
) -> Result<CarrierInfo, WriteError> {
    if name.is_empty() || name.len() > MAX_NAME_SIZE || name.contains('\0') {
        return Err(WriteError::Unrepresentable(format!(
            "bitmap name must be 1..={MAX_NAME_SIZE} bytes without NUL"
        )));
    }
    let p = plan(bitmap)?;
    let io_err = |source| WriteError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err)?;
    let result = write_planned(&file, &p, name, bitmap, auto);
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(io_err(e));
    }
    let count = |f: fn(&TableEntry) -> bool| p.entries.iter().filter(|e| f(e)).count() as u64;
    Ok(CarrierInfo {
        clusters: p.total,
        data_clusters: count(|e| matches!(e, TableEntry::Data(_))),
        zero_clusters: count(|e| matches!(e, TableEntry::Zeros)),
        ones_clusters: count(|e| matches!(e, TableEntry::Ones)),
    })
}

fn write_planned(f: &File, p: &Plan, name: &str, b: &Bitmap, auto: bool) -> io::Result<()> {
    let g = b.geometry();
    let dir_entry = DirEntry {
        table_offset: p.table_offset,
        table_size: p.entries.len() as u32,
        flags: if auto { FLAG_AUTO } else { 0 },
        granularity_bits: g.granularity().trailing_zeros() as u8,
        name: name.to_string(),
    };
    let dir = format::encode_dir_entry(&dir_entry);
    let header = Header {
        version: 3,
        backing_file_offset: 0,
        cluster_bits: CLUSTER_BITS,
        size: g.size(),
        crypt_method: 0,
        l1_size: p.l1_entries as u32,
        l1_table_offset: p.l1_offset,
        refcount_table_offset: CS,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: AUTOCLEAR_BITMAPS,
        refcount_order: REFCOUNT_ORDER,
        header_length: format::V3_HEADER_LEN as u32,
    };
    let mut first = format::encode_header(&header);
    first.extend_from_slice(&format::encode_bitmaps_ext(&BitmapsExt {
        nb_bitmaps: 1,
        reserved: 0,
        directory_size: dir.len() as u64,
        directory_offset: p.dir_offset,
    }));
    first.extend_from_slice(&[0u8; 8]); // end of extensions
    f.write_all_at(&first, 0)?;

    // Refcount table: one cluster pointing at the refcount blocks.
    let mut reftable = Vec::with_capacity(p.refblocks as usize * 8);
    for r in 0..p.refblocks {
        reftable.extend_from_slice(&((2 + r) * CS).to_be_bytes());
    }
    f.write_all_at(&reftable, CS)?;
    // Refcount blocks: every cluster of the carrier is used once.
    let mut block = Vec::with_capacity(CS as usize);
    for r in 0..p.refblocks {
        let first_cluster = r * REFS_PER_BLOCK;
        let n = p.total.saturating_sub(first_cluster).min(REFS_PER_BLOCK);
        block.clear();
        for _ in 0..n {
            block.extend_from_slice(&1u16.to_be_bytes());
        }
        f.write_all_at(&block, (2 + r) * CS)?;
    }
    // The L1 table stays a hole: all zero, no guest data.
    f.write_all_at(&dir, p.dir_offset)?;
    let mut table = Vec::with_capacity(p.entries.len() * 8);
    for e in &p.entries {
        table.extend_from_slice(&format::encode_table_entry(*e).to_be_bytes());
    }
    f.write_all_at(&table, p.table_offset)?;
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let raw_len = g.raw_len();
    for (i, e) in p.entries.iter().enumerate() {
        if let TableEntry::Data(off) = e {
            let start = i * CS as usize;
            raw_slice(
                b,
                start,
                (CS as usize).min(raw_len - start),
                &mut out,
                &mut scratch,
            );
            f.write_all_at(&out, *off)?;
        }
    }
    f.set_len(p.total * CS)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::reader::Image;
    use wire::Geometry;

    fn round_trip(size: u64, gran: u64, marks: &[(u64, u64)]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.qcow2");
        let mut b = Bitmap::new(Geometry::new(size, gran).unwrap());
        for (o, l) in marks {
            b.mark(*o, *l).unwrap();
        }
        write_carrier(&path, "bm", &b, false).unwrap();
        let img = Image::open_path(&path).unwrap();
        assert_eq!(img.bitmaps.len(), 1);
        let e = img.find("bm").unwrap().clone();
        assert!(!e.auto() && !e.in_use());
        assert_eq!(img.read_bitmap(&e).unwrap(), b);
    }

    #[test]
    fn carriers_read_back() {
        round_trip(1 << 20, 512, &[]);
        round_trip(1 << 20, 512, &[(0, 1 << 20)]);
        round_trip((1 << 20) + 513, 512, &[(1000, 3), ((1 << 20) + 512, 1)]);
        // 512 B over 1 GiB: 256 KiB of bitmap, 4 clusters: zeros, ones, data, ones-with-tail.
        let gib = 1u64 << 30;
        round_trip(
            gib - 512 * 3,
            512,
            &[
                (256 << 20, 256 << 20),
                (600 << 20, 4096),
                (768 << 20, (256 << 20) - 1536),
            ],
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Any bitmap survives carrier → reader unchanged, whatever mix of zero, all-ones and
        /// data clusters it makes.
        #[test]
        fn any_bitmap_round_trips(
            size in 1u64..(8u64 << 30),
            gbits in 9u32..=26,
            marks in proptest::collection::vec((0.0f64..1.0, 0.0f64..0.3), 0..6),
        ) {
            let g = 1u64 << gbits;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.qcow2");
            let mut b = Bitmap::new(Geometry::new(size, g).unwrap());
            for (o, l) in marks {
                let off = (o * size as f64) as u64;
                let len = ((l * size as f64) as u64).min(size - off);
                b.mark(off, len).unwrap();
            }
            write_carrier(&path, "bm", &b, true).unwrap();
            let img = Image::open_path(&path).unwrap();
            let e = img.find("bm").unwrap().clone();
            proptest::prop_assert!(e.auto());
            proptest::prop_assert_eq!(img.read_bitmap(&e).unwrap(), b);
        }
    }

    #[test]
    fn refuses_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let b = Bitmap::new(Geometry::new(1 << 20, 65536).unwrap());
        let long = "x".repeat(1024);
        for name in ["", long.as_str(), "a\0b"] {
            assert!(matches!(
                write_carrier(&dir.path().join("c"), name, &b, false),
                Err(WriteError::Unrepresentable(_))
            ));
        }
    }
}
