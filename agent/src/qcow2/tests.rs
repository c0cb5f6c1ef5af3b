//! Parser tests over a real image made by QEMU 10 (`testdata/small.qcow2`, 512-byte clusters,
//! 1 MiB + 512 B virtual), targeted corruptions, and a proptest of random damage.
//!
//! The fixture was made with:
//! ```text
//! qemu-img create -f qcow2 -o cluster_size=512 small.qcow2 1049088
//! qemu-img bitmap --add -g 512 small.qcow2 fine
//! qemu-img bitmap --add -g 4096 small.qcow2 coarse
//! qemu-io -f qcow2 -c 'write -P 0xab 1000 3000' small.qcow2
//! qemu-img bitmap --add -g 65536 --disable small.qcow2 frozen
//! qemu-io -f qcow2 -c 'write -P 0xab 1048576 512' -c 'write 65536 1' small.qcow2
//! ```

use super::format::{self, FormatError};
use super::reader::{Image, ReadError, Trust};
use proptest::prelude::*;
use wire::Extent;

const SMALL: &[u8] = include_bytes!("testdata/small.qcow2");

fn extents(img: &Image<&[u8]>, name: &str) -> Vec<(u64, u64)> {
    let e = img.find(name).unwrap();
    img.read_bitmap(e)
        .unwrap()
        .extents()
        .map(|Extent { offset, length }| (offset, length))
        .collect()
}

/// Offsets of interesting structures in the fixture, found through the parser itself.
struct Layout {
    ext_at: usize,
    dir_at: usize,
    dir_len: usize,
}

fn layout(bytes: &[u8]) -> Layout {
    let h = format::parse_header(bytes).unwrap();
    let mut off = h.header_length as usize;
    loop {
        let ty = u32::from_be_bytes(bytes[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[off + 4..off + 8].try_into().unwrap()) as usize;
        if ty == format::EXT_BITMAPS {
            let ext = format::find_bitmaps_ext(&h, bytes).unwrap().unwrap();
            return Layout {
                ext_at: off + 8,
                dir_at: ext.directory_offset as usize,
                dir_len: ext.directory_size as usize,
            };
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

fn open(bytes: &[u8]) -> Result<Image<&[u8]>, ReadError> {
    Image::open(bytes)
}

/// Open and read every trusted bitmap; the result only matters as "error or not".
fn read_all(bytes: &[u8]) -> Result<usize, ReadError> {
    let img = open(bytes)?;
    let mut n = 0;
    for e in &img.bitmaps {
        if img.trust(e) == Trust::Consistent {
            img.read_bitmap(e)?;
            n += 1;
        }
    }
    Ok(n)
}

#[test]
fn reads_qemu_fixture_exactly() {
    let img = open(SMALL).unwrap();
    assert_eq!(img.header.size, 1049088);
    assert_eq!(img.header.cluster_size(), 512);
    assert!(img.stale.is_none());
    let names: Vec<_> = img.bitmaps.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["fine", "coarse", "frozen"]);
    assert_eq!(img.find("fine").unwrap().flag_names(), ["auto"]);
    assert!(img.find("frozen").unwrap().flag_names().is_empty());
    assert_eq!(
        extents(&img, "fine"),
        [(512, 3584), (65536, 512), (1048576, 512)]
    );
    assert_eq!(
        extents(&img, "coarse"),
        [(0, 4096), (65536, 4096), (1048576, 512)]
    );
    assert_eq!(extents(&img, "frozen"), []);
}

#[test]
fn in_use_and_stale_autoclear_are_inconsistent() {
    let l = layout(SMALL);
    // Set in_use on the first entry (flags at +12..16 of the entry).
    let mut b = SMALL.to_vec();
    b[l.dir_at + 15] |= 1;
    let img = open(&b).unwrap();
    let fine = img.find("fine").unwrap();
    assert_eq!(fine.flag_names(), ["in_use", "auto"]);
    assert!(matches!(img.trust(fine), Trust::Inconsistent(_)));
    assert!(matches!(
        img.read_bitmap(fine),
        Err(ReadError::Untrusted { .. })
    ));
    assert_eq!(img.trust(img.find("coarse").unwrap()), Trust::Consistent);
    // Clear autoclear bit 0 (byte 95): every bitmap becomes inconsistent.
    let mut b = SMALL.to_vec();
    b[95] &= !1;
    let img = open(&b).unwrap();
    assert!(img.stale.is_some());
    assert_eq!(img.bitmaps.len(), 3);
    for e in &img.bitmaps {
        assert!(matches!(img.trust(e), Trust::Inconsistent(_)));
    }
}

/// A named way to damage the fixture.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn targeted_corruptions_are_errors() {
    let l = layout(SMALL);
    let set32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let set64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    let cases: Vec<(&str, &str, Damage)> = vec![
        ("magic", "bad magic", Box::new(|b| b[0] = b'X')),
        (
            "version 2",
            "need qcow2 v3",
            Box::new(move |b| set32(b, 4, 2)),
        ),
        (
            "cluster bits",
            "cluster_bits",
            Box::new(move |b| set32(b, 20, 30)),
        ),
        (
            "unknown incompatible bit",
            "incompatible feature",
            Box::new(move |b| set64(b, 72, 1 << 40)),
        ),
        (
            "nb_bitmaps absurd",
            "exceed QEMU's maximum",
            Box::new(move |b| set32(b, l.ext_at, u32::MAX)),
        ),
        (
            "nb_bitmaps too many",
            "3 bitmaps found",
            Box::new(move |b| set32(b, l.ext_at, 4)),
        ),
        (
            "nb_bitmaps zero",
            "zero bitmaps",
            Box::new(move |b| set32(b, l.ext_at, 0)),
        ),
        (
            "ext reserved",
            "reserved field",
            Box::new(move |b| set32(b, l.ext_at + 4, 1)),
        ),
        (
            "dir size absurd",
            "directory size",
            Box::new(move |b| set64(b, l.ext_at + 8, u64::MAX)),
        ),
        (
            "dir size 1 GiB",
            "directory size",
            Box::new(move |b| set64(b, l.ext_at + 8, 1 << 30)),
        ),
        (
            "dir past end",
            "bitmap directory (96 bytes",
            Box::new(move |b| set64(b, l.ext_at + 16, 1 << 40)),
        ),
        (
            "dir unaligned",
            "cluster boundary",
            Box::new(move |b| set64(b, l.ext_at + 16, l.dir_at as u64 + 8)),
        ),
        (
            "table size absurd",
            "table size 4294967295",
            Box::new(move |b| set32(b, l.dir_at + 8, u32::MAX)),
        ),
        (
            "table size off by one",
            "needs 1",
            Box::new(move |b| set32(b, l.dir_at + 8, 2048 / 512 + 2)),
        ),
        (
            "table size zero",
            "table size 0",
            Box::new(move |b| set32(b, l.dir_at + 8, 0)),
        ),
        (
            "table past end",
            "bitmap table of \"fine\" ends past",
            Box::new(move |b| set64(b, l.dir_at, 1 << 40)),
        ),
        (
            "flag bit 2",
            "reserved flag bits 0x4",
            Box::new(move |b| b[l.dir_at + 15] |= 4),
        ),
        ("type 2", "type 2", Box::new(move |b| b[l.dir_at + 16] = 2)),
        (
            "granularity 8",
            "granularity bits 8",
            Box::new(move |b| b[l.dir_at + 17] = 8),
        ),
        (
            "granularity 32",
            "granularity bits 32",
            Box::new(move |b| b[l.dir_at + 17] = 32),
        ),
        (
            "extra data",
            "extra data",
            Box::new(move |b| set32(b, l.dir_at + 20, 8)),
        ),
        (
            "empty name",
            "name of 0 bytes",
            Box::new(move |b| b[l.dir_at + 18..l.dir_at + 20].copy_from_slice(&[0, 0])),
        ),
        (
            "duplicate name",
            "used twice",
            Box::new(move |b| {
                // Rename the second entry "coarse" to "fine": its name size shrinks from 6 to 4,
                // and its padded length stays 32, so the directory stays well formed.
                let second = l.dir_at + 32;
                b[second + 18..second + 20].copy_from_slice(&4u16.to_be_bytes());
                b[second + 24..second + 28].copy_from_slice(b"fine");
            }),
        ),
        (
            "directory truncated",
            "runs past the directory",
            Box::new(move |b| set64(b, l.ext_at + 8, l.dir_len as u64 - 8)),
        ),
        (
            "file truncated",
            "past the end of the file",
            Box::new(move |b| b.truncate(b.len() - 600)),
        ),
        (
            "file cut in header",
            "truncated: header",
            Box::new(|b| b.truncate(50)),
        ),
        ("empty file", "truncated", Box::new(|b| b.clear())),
    ];
    for (what, expect, f) in cases {
        let mut b = SMALL.to_vec();
        f(&mut b);
        let r = read_all(&b);
        let msg = match r {
            Err(e) => e.to_string(),
            Ok(n) => panic!("{what}: expected an error, read {n} bitmaps"),
        };
        assert!(msg.contains(expect), "{what}: {msg}");
    }
}

#[test]
fn bad_table_entries_are_errors() {
    let img = open(SMALL).unwrap();
    let e = img.find("fine").unwrap().clone();
    for (what, entry) in [
        ("reserved bit 1", 2u64),
        ("reserved high bit", 1 << 60),
        ("offset and all-ones", 0x10000 | 1),
    ] {
        let mut b = SMALL.to_vec();
        let at = e.table_offset as usize;
        b[at..at + 8].copy_from_slice(&entry.to_be_bytes());
        assert!(read_all(&b).is_err(), "{what}");
    }
    // Aligned to 512 B but not to a 64 KiB cluster.
    assert!(format::parse_table_entry(0x10200, 65536).is_err());
    assert_eq!(
        format::parse_table_entry(0, 512),
        Ok(format::TableEntry::Zeros)
    );
    assert_eq!(
        format::parse_table_entry(1, 512),
        Ok(format::TableEntry::Ones)
    );
}

#[test]
fn all_ones_entry_reads_as_full_clipped() {
    let img = open(SMALL).unwrap();
    let e = img.find("coarse").unwrap().clone();
    // 257 blocks of 4 KiB → 33 bytes, one table entry; make it all-ones.
    let mut b = SMALL.to_vec();
    let at = e.table_offset as usize;
    b[at..at + 8].copy_from_slice(&1u64.to_be_bytes());
    let img = open(&b).unwrap();
    let bm = img.read_bitmap(&e).unwrap();
    assert_eq!(bm.count(), 257);
    assert_eq!(
        bm.extents().collect::<Vec<_>>(),
        [Extent {
            offset: 0,
            length: 1049088
        }]
    );
}

#[test]
fn tail_bits_past_the_disk_are_errors() {
    let img = open(SMALL).unwrap();
    let e = img.find("coarse").unwrap().clone();
    let at = format::parse_table_entry(
        u64::from_be_bytes(
            SMALL[e.table_offset as usize..e.table_offset as usize + 8]
                .try_into()
                .unwrap(),
        ),
        512,
    )
    .unwrap();
    let format::TableEntry::Data(off) = at else {
        panic!("coarse has data")
    };
    let mut b = SMALL.to_vec();
    b[off as usize + 32] |= 0x80; // block 263 of 257
    assert!(matches!(
        read_all(&b),
        Err(ReadError::Format(FormatError::Invalid { .. }))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random byte damage and truncation never panic; the reader either errors or returns
    /// bitmaps of the image's geometry.
    #[test]
    fn damaged_images_never_panic(
        flips in proptest::collection::vec((0usize..SMALL.len(), any::<u8>()), 1..8),
        cut in proptest::option::of(0usize..SMALL.len()),
        // Bias some flips into the header cluster and the bitmap directory, where the
        // structures are.
        hot in proptest::collection::vec((0usize..512, any::<u8>()), 0..4),
        dir_hot in proptest::collection::vec((0usize..96, any::<u8>()), 0..4),
    ) {
        let l = layout(SMALL);
        let mut b = SMALL.to_vec();
        let dir_hot = dir_hot.into_iter().map(|(at, x)| (l.dir_at + at, x));
        for (at, x) in flips.into_iter().chain(hot).chain(dir_hot) {
            b[at] ^= x.max(1);
        }
        if let Some(c) = cut {
            b.truncate(c);
        }
        let _ = read_all(&b);
    }
}
