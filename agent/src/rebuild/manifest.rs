//! Block manifests: the BLAKE3 of every block of a backup image, written at backup time, so a
//! later rebuild only has to read the live disk.
//!
//! ```text
//! 0        8         12       16     24            32       40     72
//! | magic  | version | hlen   | size | granularity | blocks | root | [identity] | entries |
//! ```
//! Integers are little-endian; entries are `blocks × 32` bytes and `root = blake3(entries)` (the
//! concatenated entry hashes). On open, the size/granularity/blocks triple must be consistent
//! with itself and with the file length, and the root must match the entries — a manifest that
//! does not check out is refused before any scan starts. Entries are streamed from the file,
//! never loaded whole (a 64 TiB disk at 4 KiB has 512 GiB of entries).
//!
//! **Version 2** (written by [`create`]) records which file the manifest was made from, so a
//! rebuild can refuse a manifest made from the very live image it is asked to scan (it would
//! find only the writes since the manifest was made, not since the backup). Bytes 12–16 hold
//! the header length `hlen`; the identity sits between byte 72 and `hlen`:
//! ```text
//! 72                               hlen-32                 hlen
//! | identity: JSON, space-padded   | blake3 of the identity | entries …
//! ```
//! The identity is `{"path", "size", "dev", "ino", "rdev", "kind", "mtime_sec", "mtime_nsec"}`
//! ([`ImageIdentity`]). **Version 1** manifests (bytes 12–16 zero, entries at 72, no identity)
//! are still read; they carry no identity, so the same-image check cannot apply to them.

use super::RebuildError;
use super::scan::{Reference, Scan, ScanOptions};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use wire::Geometry;

/// File magic.
pub const MAGIC: &[u8; 8] = b"BFMANIF\0";
/// Format version written by [`create`]: the header carries the image's identity.
pub const VERSION: u32 = 2;
/// The first format version: no identity. Still read; [`write_entries`] writes it.
pub const VERSION_1: u32 = 1;
/// Length in bytes of the fixed header (all of a version 1 header).
pub const HEADER: u64 = 72;
/// Longest header a version 2 manifest may declare (fixed part, identity and its hash).
pub const MAX_HEADER: u64 = HEADER + 8192;
/// Bytes per entry.
pub const ENTRY: usize = 32;

/// An open, verified manifest.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    file: File,
    header: Header,
}

/// What a manifest's header says, checked against itself and the file length (the entries are
/// not hashed yet: [`Manifest::open`] does that).
#[derive(Debug, Clone)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Size and granularity of the described image.
    pub geometry: Geometry,
    /// The root the header claims (BLAKE3 of the entries).
    pub root: [u8; 32],
    /// Byte offset of the first entry.
    pub entries_at: u64,
    /// The image the manifest was made from (version 2).
    pub identity: Option<ImageIdentity>,
}

/// Which file a manifest was made from, as `stat` saw it when [`create`] opened it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageIdentity {
    /// Absolute path it was opened by.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Device of the file system holding it (`st_dev`).
    pub dev: u64,
    /// Its inode number (`st_ino`).
    pub ino: u64,
    /// For a block device, the device it is (`st_rdev`); 0 otherwise.
    pub rdev: u64,
    /// `file` or `block device`.
    pub kind: String,
    /// Modification time: seconds since the epoch…
    pub mtime_sec: i64,
    /// …and nanoseconds.
    pub mtime_nsec: u32,
}

impl ImageIdentity {
    /// The identity of an open image file.
    pub fn of(path: &Path, file: &File) -> std::io::Result<ImageIdentity> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = file.metadata()?;
        let block = m.file_type().is_block_device();
        Ok(ImageIdentity {
            path: std::path::absolute(path)?,
            size: super::file_size(file)?,
            dev: m.dev(),
            ino: m.ino(),
            rdev: if block { m.rdev() } else { 0 },
            kind: if block { "block device" } else { "file" }.into(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec().clamp(0, 999_999_999) as u32,
        })
    }

    /// Whether `other` is the same file (same inode on the same file system) or, for block
    /// devices, the same device — whatever the paths say.
    pub fn same_file(&self, other: &ImageIdentity) -> bool {
        (self.dev == other.dev && self.ino == other.ino)
            || (self.rdev != 0 && self.rdev == other.rdev)
    }

    /// The identity bytes as stored after the fixed header: JSON, space-padded so the entries
    /// start 8-aligned, then its BLAKE3.
    fn encode(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec(self).expect("an identity serializes");
        let total = (HEADER as usize + b.len() + 32).next_multiple_of(8);
        b.resize(total - HEADER as usize - 32, b' ');
        let hash = *blake3::hash(&b).as_bytes();
        b.extend_from_slice(&hash);
        b
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> RebuildError {
    RebuildError::BadManifest {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn u64_at(h: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The header: the fixed 72 bytes, then (version 2) the identity and its hash.
fn header_bytes(g: Geometry, root: &[u8; 32], identity: Option<&ImageIdentity>) -> Vec<u8> {
    let tail = identity.map(ImageIdentity::encode).unwrap_or_default();
    let mut h = vec![0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    if identity.is_none() {
        h[8..12].copy_from_slice(&VERSION_1.to_le_bytes());
    } else {
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let len = (HEADER as usize + tail.len()) as u32;
        h[12..16].copy_from_slice(&len.to_le_bytes());
    }
    h[16..24].copy_from_slice(&g.size().to_le_bytes());
    h[24..32].copy_from_slice(&g.granularity().to_le_bytes());
    h[32..40].copy_from_slice(&g.blocks().to_le_bytes());
    h[40..72].copy_from_slice(root);
    h.extend_from_slice(&tail);
    h
}

/// Check a manifest's header against itself and the file's length `len`: magic, version,
/// (version 2) the identity and its hash, geometry, block count, and `len` = header + one entry
/// per block. `prefix` is the start of the file: at least `min(len, MAX_HEADER)` bytes (more
/// are ignored). Pure (fuzzed: docs/fuzzing.md).
pub fn parse_header(prefix: &[u8], len: u64) -> Result<Header, String> {
    if len < HEADER || prefix.len() < HEADER as usize {
        return Err(format!(
            "{len} bytes is shorter than the {HEADER}-byte header"
        ));
    }
    let h = &prefix[..HEADER as usize];
    if &h[..8] != MAGIC {
        return Err("bad magic: not a bitferry block manifest".into());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let declared = u64::from(u32::from_le_bytes([h[12], h[13], h[14], h[15]]));
    let (entries_at, identity) = match version {
        VERSION_1 => (HEADER, None),
        VERSION => {
            if !(HEADER + 32 + 2..=MAX_HEADER).contains(&declared)
                || declared > len
                || declared > prefix.len() as u64
            {
                return Err(format!(
                    "header length {declared} is out of range (file has {len} bytes)"
                ));
            }
            let tail = &prefix[HEADER as usize..declared as usize];
            let (json, hash) = tail.split_at(tail.len() - 32);
            if blake3::hash(json).as_bytes() != hash {
                return Err(
                    "the image identity in the header does not match its hash (corrupt manifest)"
                        .into(),
                );
            }
            let identity: ImageIdentity = serde_json::from_slice(json)
                .map_err(|e| format!("unreadable image identity: {e}"))?;
            (declared, Some(identity))
        }
        _ => {
            return Err(format!(
                "unknown version {version} (this build reads {VERSION_1} and {VERSION}; a newer \
                 bitferry wrote it)"
            ));
        }
    };
    let (size, granularity, blocks) = (u64_at(h, 16), u64_at(h, 24), u64_at(h, 32));
    let geometry = Geometry::new(size, granularity)
        .map_err(|e| format!("size {size} / granularity {granularity}: {e}"))?;
    if blocks != geometry.blocks() {
        return Err(format!(
            "header says {blocks} blocks but size {size} at granularity {granularity} has {}",
            geometry.blocks()
        ));
    }
    let expected = blocks
        .checked_mul(ENTRY as u64)
        .and_then(|e| e.checked_add(entries_at))
        .ok_or("block count overflows")?;
    if len != expected {
        return Err(format!(
            "file has {len} bytes, but {blocks} entries need {expected} (truncated or padded)"
        ));
    }
    let mut root = [0u8; 32];
    root.copy_from_slice(&h[40..72]);
    Ok(Header {
        version,
        geometry,
        root,
        entries_at,
        identity,
    })
}

/// Read and check a manifest's header (geometry, length, identity) without hashing its
/// entries: what `bitferry agent --check` and the same-image check need.
pub fn read_header(path: &Path) -> Result<Header, RebuildError> {
    let mut file = File::open(path).map_err(|e| RebuildError::io(path, e))?;
    read_header_of(path, &mut file)
}

/// Read the header from the start of `file`; leaves the file positioned after the header.
fn read_header_of(path: &Path, file: &mut File) -> Result<Header, RebuildError> {
    let meta = file.metadata().map_err(|e| RebuildError::io(path, e))?;
    if meta.is_dir() {
        return Err(bad(path, "is a directory, not a manifest file"));
    }
    let len = meta.len();
    let mut prefix = vec![0u8; len.min(MAX_HEADER) as usize];
    file.read_exact(&mut prefix)
        .map_err(|e| RebuildError::io(path, e))?;
    let header = parse_header(&prefix, len).map_err(|reason| bad(path, reason))?;
    file.seek(SeekFrom::Start(header.entries_at))
        .map_err(|e| RebuildError::io(path, e))?;
    Ok(header)
}

/// Refuse to compare `live` with a manifest made from `live` itself: its entries describe the
/// image when the manifest was made, not the backup, so the rebuild would miss every write
/// before that (the typical slip: `manifest create --image LIVE` instead of the backup). The
/// same file is the same device and inode, whatever the paths say. A version 1 manifest has no
/// identity and passes.
pub fn refuse_same_image(
    manifest: &Path,
    made_from: Option<&ImageIdentity>,
    live: &Path,
    live_file: &File,
) -> Result<(), RebuildError> {
    let Some(made_from) = made_from else {
        return Ok(());
    };
    let now = ImageIdentity::of(live, live_file).map_err(|e| RebuildError::io(live, e))?;
    if !made_from.same_file(&now) {
        return Ok(());
    }
    Err(RebuildError::SameImage {
        manifest: manifest.display().to_string(),
        live: live.display().to_string(),
        made_from: made_from.path.display().to_string(),
        dev: made_from.dev,
        ino: made_from.ino,
    })
}

impl Manifest {
    /// Open and verify a manifest: header, geometry, length, and the root over all entries.
    pub fn open(path: &Path) -> Result<Manifest, RebuildError> {
        let mut file = File::open(path).map_err(|e| RebuildError::io(path, e))?;
        let header = read_header_of(path, &mut file)?;
        // Stream the entries through the hasher in bounded pieces.
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = header.geometry.blocks() * ENTRY as u64;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])
                .map_err(|e| RebuildError::io(path, e))?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        if hasher.finalize().as_bytes() != &header.root {
            return Err(bad(
                path,
                "root does not match the entries (corrupt manifest)",
            ));
        }
        Ok(Manifest {
            path: path.to_path_buf(),
            file,
            header,
        })
    }

    /// Size of the described image.
    pub fn size(&self) -> u64 {
        self.header.geometry.size()
    }

    /// Block size of the entries.
    pub fn granularity(&self) -> u64 {
        self.header.geometry.granularity()
    }

    /// Number of entries.
    pub fn blocks(&self) -> u64 {
        self.header.geometry.blocks()
    }

    /// The verified root: BLAKE3 of the concatenated entries.
    pub fn root(&self) -> [u8; 32] {
        self.header.root
    }

    /// The image the manifest was made from, when it says (version 2).
    pub fn identity(&self) -> Option<&ImageIdentity> {
        self.header.identity.as_ref()
    }

    /// The manifest's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read entries starting at block `first` into `out` (whose length, a multiple of 32, says
    /// how many).
    pub fn read_entries(&self, first: u64, out: &mut [u8]) -> Result<(), RebuildError> {
        self.file
            .read_exact_at(out, self.header.entries_at + first * ENTRY as u64)
            .map_err(|e| RebuildError::io(&self.path, e))
    }
}

/// What [`create`] wrote.
#[derive(Debug, Clone)]
pub struct Created {
    /// Image size.
    pub size: u64,
    /// Entries written.
    pub blocks: u64,
    /// Root over the entries.
    pub root: [u8; 32],
    /// Bytes actually read from the image (holes are not read).
    pub bytes_read: u64,
}

/// Write the manifest of `image` at `granularity` to `out`, atomically (temp file in the same
/// directory, fsync, rename, fsync the directory), replacing `out` if it exists.
pub fn create(image: &Path, granularity: u64, out: &Path) -> Result<Created, RebuildError> {
    create_to(image, granularity, out, true)
}

/// Like [`create`], but without `replace` an existing `out` is refused
/// ([`RebuildError::OutputExists`]) before anything is read, and again atomically when the
/// result is put in place (no rename over a file that appeared meanwhile). `out` is never
/// `image` itself, even with `replace`.
pub fn create_to(
    image: &Path,
    granularity: u64,
    out: &Path,
    replace: bool,
) -> Result<Created, RebuildError> {
    let file = File::open(image).map_err(|e| RebuildError::io(image, e))?;
    let identity = ImageIdentity::of(image, &file).map_err(|e| RebuildError::io(image, e))?;
    let size = identity.size;
    let geometry = Geometry::new(size, granularity)?;
    match std::fs::metadata(out) {
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            if m.is_dir() {
                return Err(bad_out(
                    out,
                    "is a directory: give the manifest's file name",
                ));
            }
            if (m.dev(), m.ino()) == (identity.dev, identity.ino) {
                return Err(bad_out(
                    out,
                    "is the image itself: the manifest would replace it",
                ));
            }
            if !replace {
                return Err(RebuildError::OutputExists(out.display().to_string()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RebuildError::io(out, e)),
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".manifest.")
        .tempfile_in(&dir)
        .map_err(|e| RebuildError::io(&dir, e))?;
    let header_len = header_bytes(geometry, &[0; 32], Some(&identity)).len();
    let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
    let werr = |e| RebuildError::io(out, e);
    w.write_all(&vec![0u8; header_len]).map_err(werr)?;
    let mut hasher = blake3::Hasher::new();
    let mut bytes_read = 0u64;
    let mut options = ScanOptions::new(granularity);
    options.want_hashes = true;
    let cancel = AtomicBool::new(false);
    let reference = Reference::None;
    let scan = Scan {
        live: &file,
        live_size: size,
        reference: &reference,
        options,
        cancel: &cancel,
    };
    scan.run(|seg| {
        for h in seg.hashes {
            hasher.update(h);
            w.write_all(h).map_err(werr)?;
        }
        bytes_read += seg.bytes_read;
        Ok(())
    })?;
    let root = *hasher.finalize().as_bytes();
    w.flush().map_err(werr)?;
    drop(w);
    let mut f = tmp.as_file();
    f.seek(SeekFrom::Start(0)).map_err(werr)?;
    f.write_all(&header_bytes(geometry, &root, Some(&identity)))
        .map_err(werr)?;
    f.sync_all().map_err(werr)?;
    let placed = if replace {
        tmp.persist(out).map(drop)
    } else {
        tmp.persist_noclobber(out).map(drop)
    };
    placed.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            RebuildError::OutputExists(out.display().to_string())
        } else {
            RebuildError::io(out, e.error)
        }
    })?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RebuildError::io(&dir, e))?;
    Ok(Created {
        size,
        blocks: geometry.blocks(),
        root,
        bytes_read,
    })
}

fn bad_out(out: &Path, why: &str) -> RebuildError {
    RebuildError::io(
        out,
        std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
    )
}

/// Write a manifest from already computed entries (tests, and the backup-mode resume path).
pub fn write_entries(
    out: &Path,
    geometry: Geometry,
    entries: &[[u8; 32]],
) -> Result<[u8; 32], RebuildError> {
    let mut hasher = blake3::Hasher::new();
    let mut bytes = Vec::with_capacity(HEADER as usize + entries.len() * ENTRY);
    bytes.extend_from_slice(&[0u8; HEADER as usize]);
    for e in entries {
        hasher.update(e);
        bytes.extend_from_slice(e);
    }
    let root = *hasher.finalize().as_bytes();
    bytes[..HEADER as usize].copy_from_slice(&header_bytes(geometry, &root, None));
    std::fs::write(out, &bytes).map_err(|e| RebuildError::io(out, e))?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn create_open_and_refuse_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let img = write(dir.path(), "img", &data);
        let out = dir.path().join("m");
        let c = create(&img, 4096, &out).unwrap();
        assert_eq!((c.size, c.blocks), (10_000, 3));
        let m = Manifest::open(&out).unwrap();
        assert_eq!(m.root(), c.root);
        let mut e = vec![0u8; 3 * ENTRY];
        m.read_entries(0, &mut e).unwrap();
        assert_eq!(&e[..32], blake3::hash(&data[..4096]).as_bytes());
        // The partial last block is hashed over its real length.
        assert_eq!(&e[64..], blake3::hash(&data[8192..]).as_bytes());
        let mut expect = blake3::Hasher::new();
        expect.update(&e);
        assert_eq!(expect.finalize().as_bytes(), &c.root);

        let good = std::fs::read(&out).unwrap();
        let refuse = |bytes: Vec<u8>, what: &str| {
            let p = write(dir.path(), "bad", &bytes);
            let err = Manifest::open(&p).unwrap_err().to_string();
            assert!(err.contains(what), "{err} lacks {what}");
        };
        let mut b = good.clone();
        let last = b.len() - 5;
        b[last] ^= 1;
        refuse(b, "root does not match");
        refuse(good[..good.len() - 1].to_vec(), "truncated");
        let mut b = good.clone();
        b[32] = 4; // blocks
        refuse(b, "blocks");
        let mut b = good.clone();
        b[24..32].copy_from_slice(&1000u64.to_le_bytes());
        refuse(b, "granularity");
        let mut b = good.clone();
        b[16..24].copy_from_slice(&20_000u64.to_le_bytes());
        refuse(b, "blocks");
        let mut b = good.clone();
        b[0] = b'X';
        refuse(b, "magic");
        refuse(good[..10].to_vec(), "header");
    }

    #[test]
    fn version_2_records_the_image_and_version_1_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![5u8; 9000];
        let img = write(dir.path(), "img", &data);
        let out = dir.path().join("m");
        let c = create_to(&img, 4096, &out, false).unwrap();
        let m = Manifest::open(&out).unwrap();
        let id = m.identity().expect("version 2 has an identity").clone();
        assert_eq!(id.path, std::path::absolute(&img).unwrap());
        assert_eq!((id.size, id.kind.as_str()), (9000, "file"));
        assert_eq!(m.root(), c.root);
        let h = read_header(&out).unwrap();
        assert_eq!((h.version, h.entries_at % 8), (VERSION, 0));
        // The same image is refused (also through a hard link), another file is not.
        let live = File::open(&img).unwrap();
        let e = refuse_same_image(&out, Some(&id), &img, &live)
            .unwrap_err()
            .to_string();
        assert!(e.contains("was made from") && e.contains("--backup"), "{e}");
        let link = dir.path().join("link");
        std::fs::hard_link(&img, &link).unwrap();
        let e = refuse_same_image(&out, Some(&id), &link, &File::open(&link).unwrap());
        assert!(matches!(e, Err(RebuildError::SameImage { .. })), "{e:?}");
        let other = write(dir.path(), "other", &data);
        refuse_same_image(&out, Some(&id), &other, &File::open(&other).unwrap()).unwrap();
        // An existing output is refused without replace, and the image is never replaced.
        let e = create_to(&img, 4096, &out, false).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        let e = create_to(&img, 4096, &img, true).unwrap_err().to_string();
        assert!(e.contains("is the image itself"), "{e}");
        assert_eq!(std::fs::read(&img).unwrap(), data);
        create_to(&img, 4096, &out, true).unwrap();
        // A damaged identity is refused like damaged entries.
        let mut b = std::fs::read(&out).unwrap();
        b[HEADER as usize + 3] ^= 1;
        let bad = write(dir.path(), "bad", &b);
        let e = Manifest::open(&bad).unwrap_err().to_string();
        assert!(e.contains("identity"), "{e}");
        // Version 1 (no identity) reads as before and has nothing to refuse with.
        let g = Geometry::new(9000, 4096).unwrap();
        let mut e = vec![[0u8; 32]; 3];
        m.read_entries(0, e.as_flattened_mut()).unwrap();
        let v1 = dir.path().join("v1");
        write_entries(&v1, g, &e).unwrap();
        let m1 = Manifest::open(&v1).unwrap();
        assert_eq!((m1.root(), m1.identity()), (c.root, None));
        assert_eq!(read_header(&v1).unwrap().version, VERSION_1);
        refuse_same_image(&v1, m1.identity(), &img, &live).unwrap();
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..300 {
            let mut b = vec![0u8; rng.random_range(0..300)];
            rng.fill(&mut b[..]);
            if rng.random_bool(0.7) && b.len() >= 12 {
                b[..8].copy_from_slice(MAGIC);
                b[8..12].copy_from_slice(&VERSION.to_le_bytes());
            }
            if rng.random_bool(0.5) && b.len() >= 40 {
                // A huge claimed block count must be refused, not allocated.
                b[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
            }
            let p = write(dir.path(), "r", &b);
            assert!(
                Manifest::open(&p).is_err(),
                "seed {seed}: random bytes accepted"
            );
        }
    }
}
