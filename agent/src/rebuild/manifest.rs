//! Block manifests: the BLAKE3 of every block of a backup image, written at backup time, so a
//! later rebuild only has to read the live disk.
//!
//! ```text
//! 0        8        12       16       24             32       40      72
//! | magic  | version | zero  | size   | granularity  | blocks | root  | entries: blocks × 32 |
//! ```
//! Integers are little-endian. `root = blake3(entries)` (the concatenated entry hashes). On open,
//! the size/granularity/blocks triple must be consistent with itself and with the file length,
//! and the root must match the entries — a manifest that does not check out is refused before any
//! scan starts. Entries are streamed from the file, never loaded whole (a 64 TiB disk at 4 KiB has
//! 512 GiB of entries).

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
/// Format version written and read.
pub const VERSION: u32 = 1;
/// Header length in bytes.
pub const HEADER: u64 = 72;
/// Bytes per entry.
pub const ENTRY: usize = 32;

/// An open, verified manifest.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    file: File,
    geometry: Geometry,
    root: [u8; 32],
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

fn header_bytes(g: Geometry, root: &[u8; 32]) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&g.size().to_le_bytes());
    h[24..32].copy_from_slice(&g.granularity().to_le_bytes());
    h[32..40].copy_from_slice(&g.blocks().to_le_bytes());
    h[40..72].copy_from_slice(root);
    h
}

/// Check a manifest's header against itself and the file's length `len`: magic, version,
/// geometry, block count, and `len` = header + one entry per block. Returns the geometry and
/// the root the entries must hash to. Pure (fuzzed: docs/fuzzing.md).
pub fn parse_header(h: &[u8; HEADER as usize], len: u64) -> Result<(Geometry, [u8; 32]), String> {
    if &h[..8] != MAGIC {
        return Err("bad magic: not a bitferry block manifest".into());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != VERSION {
        return Err(format!(
            "unknown version {version} (this build reads {VERSION})"
        ));
    }
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
        .and_then(|e| e.checked_add(HEADER))
        .ok_or("block count overflows")?;
    if len != expected {
        return Err(format!(
            "file has {len} bytes, but {blocks} entries need {expected} (truncated or padded)"
        ));
    }
    let mut root = [0u8; 32];
    root.copy_from_slice(&h[40..72]);
    Ok((geometry, root))
}

impl Manifest {
    /// Open and verify a manifest: header, geometry, length, and the root over all entries.
    pub fn open(path: &Path) -> Result<Manifest, RebuildError> {
        let mut file = File::open(path).map_err(|e| RebuildError::io(path, e))?;
        let len = file
            .metadata()
            .map_err(|e| RebuildError::io(path, e))?
            .len();
        if len < HEADER {
            return Err(bad(
                path,
                format!("{len} bytes is shorter than the {HEADER}-byte header"),
            ));
        }
        let mut h = [0u8; HEADER as usize];
        file.read_exact(&mut h)
            .map_err(|e| RebuildError::io(path, e))?;
        let (geometry, root) = parse_header(&h, len).map_err(|reason| bad(path, reason))?;
        // Stream the entries through the hasher in bounded pieces.
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len - HEADER;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])
                .map_err(|e| RebuildError::io(path, e))?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        if hasher.finalize().as_bytes() != &root {
            return Err(bad(
                path,
                "root does not match the entries (corrupt manifest)",
            ));
        }
        Ok(Manifest {
            path: path.to_path_buf(),
            file,
            geometry,
            root,
        })
    }

    /// Size of the described image.
    pub fn size(&self) -> u64 {
        self.geometry.size()
    }

    /// Block size of the entries.
    pub fn granularity(&self) -> u64 {
        self.geometry.granularity()
    }

    /// Number of entries.
    pub fn blocks(&self) -> u64 {
        self.geometry.blocks()
    }

    /// The verified root: BLAKE3 of the concatenated entries.
    pub fn root(&self) -> [u8; 32] {
        self.root
    }

    /// The manifest's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read entries starting at block `first` into `out` (whose length, a multiple of 32, says
    /// how many).
    pub fn read_entries(&self, first: u64, out: &mut [u8]) -> Result<(), RebuildError> {
        self.file
            .read_exact_at(out, HEADER + first * ENTRY as u64)
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
/// directory, fsync, rename, fsync the directory).
pub fn create(image: &Path, granularity: u64, out: &Path) -> Result<Created, RebuildError> {
    let file = File::open(image).map_err(|e| RebuildError::io(image, e))?;
    let size = super::file_size(&file).map_err(|e| RebuildError::io(image, e))?;
    let geometry = Geometry::new(size, granularity)?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".manifest.")
        .tempfile_in(&dir)
        .map_err(|e| RebuildError::io(&dir, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
    let werr = |e| RebuildError::io(out, e);
    w.write_all(&[0u8; HEADER as usize]).map_err(werr)?;
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
    f.write_all(&header_bytes(geometry, &root)).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    tmp.persist(out)
        .map_err(|e| RebuildError::io(out, e.error))?;
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
    bytes[..HEADER as usize].copy_from_slice(&header_bytes(geometry, &root));
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
        b[HEADER as usize + 5] ^= 1;
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
