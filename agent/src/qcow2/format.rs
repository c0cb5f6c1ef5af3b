//! The qcow2 on-disk structures bitferry needs for persistent bitmaps, parsed from and encoded to
//! byte slices (pure: no I/O). All integers are big-endian.
//!
//! The checks mirror QEMU 10's `block/qcow2.c` (header, extensions) and `block/qcow2-bitmap.c`
//! (`check_dir_entry`, `bitmap_list_load`, `check_table_entry`, `load_bitmap_data`): an image
//! that QEMU would refuse to load bitmaps from is refused here too, with the reason.

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Header extension type of the bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type that ends the list.
pub const EXT_END: u32 = 0;
/// Autoclear feature bit 0: the bitmaps extension is valid.
pub const AUTOCLEAR_BITMAPS: u64 = 1;
/// Size of a v3 header up to and including `header_length`.
pub const V3_HEADER_MIN: usize = 104;
/// Header length QEMU writes (104 plus the compression type byte, padded to 8).
pub const V3_HEADER_LEN: usize = 112;
/// Cluster size limits QEMU accepts (`MIN_CLUSTER_BITS`, `MAX_CLUSTER_BITS`).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Incompatible feature bits QEMU 10 knows: dirty, corrupt, external data file, compression
/// type, extended L2.
pub const KNOWN_INCOMPATIBLE: u64 = 0b1_1111;
/// Incompatible bit 2: guest data lives in an external file (bitmaps still live here).
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;

/// Most bitmaps in one image (`QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Most entries in one bitmap table (`BME_MAX_TABLE_SIZE`).
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Largest bitmap data in bytes, `table size × cluster size` (`BME_MAX_PHYS_SIZE`).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Granularity bits QEMU accepts.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// See [`MIN_GRANULARITY_BITS`].
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name in bytes.
pub const MAX_NAME_SIZE: usize = 1023;
/// Directory entry flag: the bitmap was loaded read-write and not stored back (crash).
pub const FLAG_IN_USE: u32 = 1;
/// Directory entry flag: the bitmap records writes when the image is opened (`auto`).
pub const FLAG_AUTO: u32 = 2;
/// Every flag bit QEMU does not accept (bit 2 `extra_data_compatible` included).
pub const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// Bitmap type 1: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Fixed part of a directory entry.
pub const DIR_ENTRY_FIXED: usize = 24;
/// Bytes of the bitmaps extension payload.
pub const BITMAPS_EXT_LEN: usize = 24;
/// Bits 1–8 and 56–63 of a bitmap table entry are reserved.
pub const ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bits 9–55: host offset of the data cluster.
pub const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of an entry with offset 0: the cluster reads as all ones.
pub const ENTRY_ALL_ONES: u64 = 1;

/// Why bytes are not a qcow2 image whose bitmaps bitferry can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not a qcow2 image at all.
    #[error("not a qcow2 image (bad magic)")]
    NotQcow2,
    /// qcow2 version 2 has no autoclear bits and so cannot hold valid persistent bitmaps.
    #[error(
        "qcow2 version {0} image: persistent bitmaps need qcow2 v3 (convert with `qemu-img amend -o compat=1.1`)"
    )]
    Version(u32),
    /// Shorter than a structure needs.
    #[error("truncated: {0}")]
    Truncated(String),
    /// A field QEMU would reject.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which structure or field.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// An incompatible feature this reader does not understand.
    #[error("unsupported incompatible feature bits {0:#x}")]
    UnsupportedFeatures(u64),
}

fn invalid(what: &'static str, detail: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        what,
        detail: detail.into(),
    }
}

/// Big-endian field access that fails instead of panicking on short input.
fn be_u64(b: &[u8], at: usize, what: &str) -> Result<u64, FormatError> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| FormatError::Truncated(what.to_string()))
}
fn be_u32(b: &[u8], at: usize, what: &str) -> Result<u32, FormatError> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| FormatError::Truncated(what.to_string()))
}
fn be_u16(b: &[u8], at: usize, what: &str) -> Result<u16, FormatError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes(s.try_into().expect("2 bytes")))
        .ok_or_else(|| FormatError::Truncated(what.to_string()))
}

/// The fields of a qcow2 v3 header that matter for bitmaps and carriers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 3 (version 2 is refused).
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// log2(cluster size).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS. Bitmaps are metadata and never encrypted, so any value reads.
    pub crypt_method: u32,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits; bit 0 vouches for the bitmaps extension.
    pub autoclear_features: u64,
    /// log2(refcount bits).
    pub refcount_order: u32,
    /// Length of the header; extensions follow it.
    pub header_length: u32,
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Where the header extension area ends (QEMU: the backing file name, or the first
    /// cluster's end).
    pub fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset.min(self.cluster_size())
        } else {
            self.cluster_size()
        }
    }

    /// Whether autoclear bit 0 (bitmaps extension valid) is set.
    pub fn bitmaps_vouched(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_BITMAPS != 0
    }
}

/// Parse and validate the header at the start of `b` (needs [`V3_HEADER_MIN`] bytes).
pub fn parse_header(b: &[u8]) -> Result<Header, FormatError> {
    if be_u32(b, 0, "header magic")? != MAGIC {
        return Err(FormatError::NotQcow2);
    }
    let version = be_u32(b, 4, "header version")?;
    if version != 3 {
        return Err(FormatError::Version(version));
    }
    let h = Header {
        version,
        backing_file_offset: be_u64(b, 8, "header")?,
        cluster_bits: be_u32(b, 20, "header")?,
        size: be_u64(b, 24, "header")?,
        crypt_method: be_u32(b, 32, "header")?,
        l1_size: be_u32(b, 36, "header")?,
        l1_table_offset: be_u64(b, 40, "header")?,
        refcount_table_offset: be_u64(b, 48, "header")?,
        refcount_table_clusters: be_u32(b, 56, "header")?,
        nb_snapshots: be_u32(b, 60, "header")?,
        snapshots_offset: be_u64(b, 64, "header")?,
        incompatible_features: be_u64(b, 72, "header")?,
        compatible_features: be_u64(b, 80, "header")?,
        autoclear_features: be_u64(b, 88, "header")?,
        refcount_order: be_u32(b, 96, "header")?,
        header_length: be_u32(b, 100, "header")?,
    };
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
        return Err(invalid(
            "cluster_bits",
            format!("{} (QEMU accepts 9..=21)", h.cluster_bits),
        ));
    }
    if (h.header_length as usize) < V3_HEADER_MIN {
        return Err(invalid(
            "header_length",
            format!("{} is shorter than 104", h.header_length),
        ));
    }
    if u64::from(h.header_length) > h.cluster_size() {
        return Err(invalid(
            "header_length",
            format!("{} exceeds the cluster size", h.header_length),
        ));
    }
    let unknown = h.incompatible_features & !KNOWN_INCOMPATIBLE;
    if unknown != 0 {
        return Err(FormatError::UnsupportedFeatures(unknown));
    }
    if h.refcount_order > 6 {
        return Err(invalid(
            "refcount_order",
            format!("{} (at most 6)", h.refcount_order),
        ));
    }
    Ok(h)
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of directory entries.
    pub nb_bitmaps: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Bytes of the directory.
    pub directory_size: u64,
    /// Cluster-aligned offset of the directory.
    pub directory_offset: u64,
}

/// Find the bitmaps extension in the header extension area. `area` holds the image bytes from
/// offset 0 up to at least [`Header::extensions_end`] (or the whole file if shorter).
///
/// Returns the raw extension without validating it: when autoclear bit 0 is clear QEMU ignores
/// the extension entirely, and so must its validation. Use [`validate_bitmaps_ext`] otherwise.
pub fn find_bitmaps_ext(h: &Header, area: &[u8]) -> Result<Option<BitmapsExt>, FormatError> {
    let end = h.extensions_end() as usize;
    let mut off = h.header_length as usize;
    let mut found = None;
    while off < end {
        let ty = be_u32(area, off, "header extension")?;
        let len = be_u32(area, off + 4, "header extension")? as usize;
        off += 8;
        if off > end || len > end - off {
            return Err(invalid(
                "header extension",
                format!("type {ty:#x} of {len} bytes runs past the extension area"),
            ));
        }
        match ty {
            EXT_END => return Ok(found),
            EXT_BITMAPS => {
                if found.is_some() {
                    return Err(invalid("bitmaps extension", "present twice"));
                }
                if len != BITMAPS_EXT_LEN {
                    return Err(invalid(
                        "bitmaps extension",
                        format!("length {len}, not 24"),
                    ));
                }
                let d = area
                    .get(off..off + len)
                    .ok_or_else(|| FormatError::Truncated("bitmaps extension".into()))?;
                found = Some(BitmapsExt {
                    nb_bitmaps: be_u32(d, 0, "bitmaps extension")?,
                    reserved: be_u32(d, 4, "bitmaps extension")?,
                    directory_size: be_u64(d, 8, "bitmaps extension")?,
                    directory_offset: be_u64(d, 16, "bitmaps extension")?,
                });
            }
            _ => {}
        }
        off += len.div_ceil(8) * 8;
    }
    // QEMU stops at the area's end without an end marker; so do we.
    Ok(found)
}

/// Validate a bitmaps extension QEMU would load (autoclear bit 0 set).
pub fn validate_bitmaps_ext(h: &Header, e: &BitmapsExt) -> Result<(), FormatError> {
    if e.reserved != 0 {
        return Err(invalid("bitmaps extension", "reserved field is not zero"));
    }
    if e.nb_bitmaps == 0 {
        return Err(invalid("bitmaps extension", "zero bitmaps"));
    }
    if e.nb_bitmaps > MAX_BITMAPS {
        return Err(invalid(
            "bitmaps extension",
            format!(
                "{} bitmaps exceed QEMU's maximum {MAX_BITMAPS}",
                e.nb_bitmaps
            ),
        ));
    }
    if e.directory_offset & (h.cluster_size() - 1) != 0 || e.directory_offset == 0 {
        return Err(invalid(
            "bitmap directory offset",
            format!(
                "{:#x} is not a non-zero cluster boundary",
                e.directory_offset
            ),
        ));
    }
    if e.directory_size == 0 || e.directory_size > MAX_DIRECTORY_SIZE {
        return Err(invalid(
            "bitmap directory size",
            format!("{} (must be 1..={MAX_DIRECTORY_SIZE})", e.directory_size),
        ));
    }
    Ok(())
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Cluster-aligned offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flag bits ([`FLAG_IN_USE`], [`FLAG_AUTO`]).
    pub flags: u32,
    /// log2(granularity), 9..=31.
    pub granularity_bits: u8,
    /// The name (1–1023 bytes of UTF-8).
    pub name: String,
}

impl DirEntry {
    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }
    /// Whether `in_use` is set: the data cannot be trusted.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    /// Whether `auto` is set: QEMU records writes into it while the image is open.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    /// The flags as QEMU's `qemu-img info` spells them, bitferry-style (`in_use`, `auto`).
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.in_use() {
            v.push("in_use");
        }
        if self.auto() {
            v.push("auto");
        }
        v
    }
}

/// Bytes of raw bitmap for a disk of `size` bytes at `granularity_bits`.
pub fn bitmap_bytes(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits).div_ceil(8)
}

/// The table size QEMU requires: `ceil(bitmap_bytes / cluster_size)` (at least 1).
pub fn expected_table_size(size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    bitmap_bytes(size, granularity_bits)
        .div_ceil(cluster_size)
        .max(1)
}

/// Size in bytes of a directory entry with a name of `name_len` bytes (padded to 8).
pub fn dir_entry_size(name_len: usize) -> usize {
    (DIR_ENTRY_FIXED + name_len).div_ceil(8) * 8
}

/// Parse and validate the bitmap directory `dir` (exactly `directory_size` bytes).
pub fn parse_directory(
    h: &Header,
    e: &BitmapsExt,
    dir: &[u8],
) -> Result<Vec<DirEntry>, FormatError> {
    let cs = h.cluster_size();
    // nb_bitmaps ≤ 65535 and every entry is ≥ 24 bytes of `dir`, so this is bounded.
    let mut out: Vec<DirEntry> = Vec::with_capacity((e.nb_bitmaps as usize).min(dir.len() / 24));
    let mut off = 0usize;
    while off < dir.len() {
        if dir.len() - off < DIR_ENTRY_FIXED {
            return Err(invalid("bitmap directory", "entry cut short"));
        }
        if out.len() as u64 >= u64::from(e.nb_bitmaps) {
            return Err(invalid(
                "bitmap directory",
                "more bitmaps than the header extension says",
            ));
        }
        let d = &dir[off..];
        let table_offset = be_u64(d, 0, "directory entry")?;
        let table_size = be_u32(d, 8, "directory entry")?;
        let flags = be_u32(d, 12, "directory entry")?;
        let ty = d[16];
        let granularity_bits = d[17];
        let name_size = be_u16(d, 18, "directory entry")? as usize;
        let extra = be_u32(d, 20, "directory entry")? as usize;
        let entry_len = (DIR_ENTRY_FIXED as u64 + name_size as u64 + extra as u64).div_ceil(8) * 8;
        if entry_len > (dir.len() - off) as u64 {
            return Err(invalid("bitmap directory", "entry runs past the directory"));
        }
        if extra != 0 {
            return Err(invalid(
                "bitmap directory entry",
                "extra data is not supported (QEMU refuses it too)",
            ));
        }
        let name_bytes = &d[DIR_ENTRY_FIXED..DIR_ENTRY_FIXED + name_size];
        let shown = String::from_utf8_lossy(name_bytes).into_owned();
        let bad =
            |why: String| invalid("bitmap directory entry", format!("bitmap {shown:?}: {why}"));
        if table_size == 0 || table_size > MAX_TABLE_SIZE {
            return Err(bad(format!("table size {table_size}")));
        }
        if table_offset == 0 || table_offset & (cs - 1) != 0 {
            return Err(bad(format!(
                "table offset {table_offset:#x} is not a non-zero cluster boundary"
            )));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(bad(format!("granularity bits {granularity_bits} (9..=31)")));
        }
        if flags & RESERVED_FLAGS != 0 {
            return Err(bad(format!(
                "reserved flag bits {:#x}",
                flags & RESERVED_FLAGS
            )));
        }
        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(bad(format!("name of {name_size} bytes (1..=1023)")));
        }
        if ty != TYPE_DIRTY_TRACKING {
            return Err(bad(format!("type {ty} (only 1, dirty tracking)")));
        }
        let phys = u64::from(table_size) * cs;
        if phys > MAX_PHYS_SIZE {
            return Err(bad(format!(
                "{phys} bytes of bitmap data exceed {MAX_PHYS_SIZE}"
            )));
        }
        let in_use = flags & FLAG_IN_USE != 0;
        // phys ≤ 2^29, so phys·8 << 31 fits in u64.
        if !in_use && h.size > (phys * 8) << granularity_bits {
            return Err(bad(format!(
                "table of {table_size} clusters is too small for a {}-byte disk",
                h.size
            )));
        }
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| bad("name is not UTF-8".into()))?
            .to_string();
        if name.contains('\0') {
            return Err(bad("name contains a NUL byte".into()));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(bad("name is used twice".into()));
        }
        out.push(DirEntry {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name,
        });
        off += entry_len as usize;
    }
    if out.len() as u64 != u64::from(e.nb_bitmaps) {
        return Err(invalid(
            "bitmap directory",
            format!(
                "{} bitmaps found, the header extension says {}",
                out.len(),
                e.nb_bitmaps
            ),
        ));
    }
    Ok(out)
}

/// One decoded bitmap table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// The cluster reads as all zeros (no data cluster).
    Zeros,
    /// The cluster reads as all ones (no data cluster).
    Ones,
    /// The data cluster at this host offset.
    Data(u64),
}

/// Decode and validate one bitmap table entry (QEMU's `check_table_entry`). `cluster_size` is a
/// power of two.
pub fn parse_table_entry(raw: u64, cluster_size: u64) -> Result<TableEntry, FormatError> {
    if raw & ENTRY_RESERVED_MASK != 0 {
        return Err(invalid(
            "bitmap table entry",
            format!("{raw:#018x} has reserved bits set"),
        ));
    }
    let off = raw & ENTRY_OFFSET_MASK;
    if off == 0 {
        return Ok(if raw & ENTRY_ALL_ONES != 0 {
            TableEntry::Ones
        } else {
            TableEntry::Zeros
        });
    }
    if raw & ENTRY_ALL_ONES != 0 {
        return Err(invalid(
            "bitmap table entry",
            format!("{raw:#018x} has a data offset and the all-ones bit"),
        ));
    }
    if off & (cluster_size - 1) != 0 {
        return Err(invalid(
            "bitmap table entry",
            format!("data offset {off:#x} is not cluster aligned"),
        ));
    }
    Ok(TableEntry::Data(off))
}

/// Encode a table entry.
pub fn encode_table_entry(e: TableEntry) -> u64 {
    match e {
        TableEntry::Zeros => 0,
        TableEntry::Ones => ENTRY_ALL_ONES,
        TableEntry::Data(off) => off & ENTRY_OFFSET_MASK,
    }
}

/// Encode a v3 header of [`V3_HEADER_LEN`] bytes (compression type zlib).
pub fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = Vec::with_capacity(V3_HEADER_LEN);
    b.extend_from_slice(&MAGIC.to_be_bytes());
    b.extend_from_slice(&h.version.to_be_bytes());
    b.extend_from_slice(&h.backing_file_offset.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
    b.extend_from_slice(&h.cluster_bits.to_be_bytes());
    b.extend_from_slice(&h.size.to_be_bytes());
    b.extend_from_slice(&h.crypt_method.to_be_bytes());
    b.extend_from_slice(&h.l1_size.to_be_bytes());
    b.extend_from_slice(&h.l1_table_offset.to_be_bytes());
    b.extend_from_slice(&h.refcount_table_offset.to_be_bytes());
    b.extend_from_slice(&h.refcount_table_clusters.to_be_bytes());
    b.extend_from_slice(&h.nb_snapshots.to_be_bytes());
    b.extend_from_slice(&h.snapshots_offset.to_be_bytes());
    b.extend_from_slice(&h.incompatible_features.to_be_bytes());
    b.extend_from_slice(&h.compatible_features.to_be_bytes());
    b.extend_from_slice(&h.autoclear_features.to_be_bytes());
    b.extend_from_slice(&h.refcount_order.to_be_bytes());
    b.extend_from_slice(&h.header_length.to_be_bytes());
    b.resize(V3_HEADER_LEN, 0); // compression type 0 (zlib) and padding
    b
}

/// Encode the bitmaps extension with its type/length prefix.
pub fn encode_bitmaps_ext(e: &BitmapsExt) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + BITMAPS_EXT_LEN);
    b.extend_from_slice(&EXT_BITMAPS.to_be_bytes());
    b.extend_from_slice(&(BITMAPS_EXT_LEN as u32).to_be_bytes());
    b.extend_from_slice(&e.nb_bitmaps.to_be_bytes());
    b.extend_from_slice(&e.reserved.to_be_bytes());
    b.extend_from_slice(&e.directory_size.to_be_bytes());
    b.extend_from_slice(&e.directory_offset.to_be_bytes());
    b
}

/// Encode one directory entry (no extra data), padded to 8.
pub fn encode_dir_entry(e: &DirEntry) -> Vec<u8> {
    let mut b = Vec::with_capacity(dir_entry_size(e.name.len()));
    b.extend_from_slice(&e.table_offset.to_be_bytes());
    b.extend_from_slice(&e.table_size.to_be_bytes());
    b.extend_from_slice(&e.flags.to_be_bytes());
    b.push(TYPE_DIRTY_TRACKING);
    b.push(e.granularity_bits);
    b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(e.name.as_bytes());
    b.resize(dir_entry_size(e.name.len()), 0);
    b
}
