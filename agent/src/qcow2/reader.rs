//! Reading persistent bitmaps from a qcow2 image: positioned reads through [`Source`], parsing and
//! validation in [`super::format`].
//!
//! Every read is bounded before it is made: the directory by QEMU's 64 MiB limit and the file's
//! length, a bitmap table by QEMU's table limit and the file's length, and bitmap data by
//! `table_size × cluster_size ≤ 512 MiB` (QEMU's limit), read one cluster at a time.

use super::format::{self, BitmapsExt, DirEntry, FormatError, Header, TableEntry};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use wire::{Bitmap, DecodeError, Geometry};

/// Bytes of a bitmap table read per positioned read.
const TABLE_PIECE: usize = 64 << 10;

/// Random-access bytes of known length: a file, or a slice in tests.
pub trait Source {
    /// Total length in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the caller has checked the range lies within [`Source::size`].
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl<T: Source + ?Sized> Source for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// A file with its length taken once at open.
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Open `path` read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
}

/// Why an image's bitmaps could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading the file failed.
    #[error("reading the image: {0}")]
    Io(#[from] io::Error),
    /// The image is malformed or not something QEMU would load bitmaps from.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Valid for QEMU, but outside what bitferry represents (e.g. granularity above 64 MiB).
    #[error("bitmap {name:?} is not supported by bitferry: {reason}")]
    Unsupported {
        /// The bitmap.
        name: String,
        /// Why.
        reason: String,
    },
    /// The bitmap's data cannot be trusted (`in_use`, or the extension is not vouched for).
    #[error("bitmap {name:?} is inconsistent: {reason}")]
    Untrusted {
        /// The bitmap.
        name: String,
        /// Why.
        reason: String,
    },
}

/// How far a bitmap in an image can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Stored cleanly by QEMU: its bits are what QEMU would load.
    Consistent,
    /// Not trustworthy, with the reason (`in_use`, or autoclear bit 0 clear).
    Inconsistent(String),
}

/// An opened qcow2 image with its bitmap directory parsed and validated.
pub struct Image<S> {
    /// The validated header.
    pub header: Header,
    /// The bitmaps, in directory order.
    pub bitmaps: Vec<DirEntry>,
    /// Set when the bitmaps extension exists but autoclear bit 0 is clear: a program without
    /// bitmap support wrote the image, so QEMU considers every bitmap inconsistent. Holds the
    /// reason (and, if the stale directory did not even parse, why).
    pub stale: Option<String>,
    src: S,
}

fn truncated(what: impl Into<String>) -> ReadError {
    ReadError::Format(FormatError::Truncated(what.into()))
}

/// Read `len` bytes at `offset`, after checking they lie in the source. `len` is bounded by the
/// caller.
fn read_range<S: Source + ?Sized>(
    src: &S,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, ReadError> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| truncated(format!("{what} at {offset:#x} overflows")))?;
    if end > src.size() {
        return Err(truncated(format!(
            "{what} ({len} bytes at {offset:#x}) ends past the end of the file ({} bytes)",
            src.size()
        )));
    }
    let mut buf = vec![0u8; len as usize];
    src.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

impl Image<FileSource> {
    /// Open the image file at `path`.
    pub fn open_path(path: &Path) -> Result<Self, ReadError> {
        Image::open(FileSource::open(path)?)
    }
}

impl<S: Source> Image<S> {
    /// Parse the header, find the bitmaps extension and load its directory.
    pub fn open(src: S) -> Result<Self, ReadError> {
        let len = src.size();
        let first = read_range(&src, 0, len.min(format::V3_HEADER_MIN as u64), "header")?;
        let header = format::parse_header(&first)?;
        // The extension area lies inside the first cluster (≤ 2 MiB).
        let area = read_range(
            &src,
            0,
            len.min(header.extensions_end()),
            "header extensions",
        )?;
        let ext = format::find_bitmaps_ext(&header, &area)?;
        let mut img = Image {
            header,
            bitmaps: Vec::new(),
            stale: None,
            src,
        };
        let Some(ext) = ext else {
            return Ok(img);
        };
        if !img.header.bitmaps_vouched() {
            // QEMU ignores the whole extension; list what it named, if it still parses.
            let why = "autoclear bit 0 is clear: a program without bitmap support modified the \
                       image, so every bitmap is inconsistent";
            match img.load_directory(&ext) {
                Ok(b) => {
                    img.bitmaps = b;
                    img.stale = Some(why.into());
                }
                Err(e) => img.stale = Some(format!("{why} (its directory does not parse: {e})")),
            }
            return Ok(img);
        }
        img.bitmaps = img.load_directory(&ext)?;
        Ok(img)
    }

    fn load_directory(&self, ext: &BitmapsExt) -> Result<Vec<DirEntry>, ReadError> {
        format::validate_bitmaps_ext(&self.header, ext)?;
        // directory_size ≤ 64 MiB (checked above) and must lie within the file.
        let dir = read_range(
            &self.src,
            ext.directory_offset,
            ext.directory_size,
            "bitmap directory",
        )?;
        Ok(format::parse_directory(&self.header, ext, &dir)?)
    }

    /// The bitmap called `name`.
    pub fn find(&self, name: &str) -> Option<&DirEntry> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    /// Whether `e`'s data can be trusted.
    pub fn trust(&self, e: &DirEntry) -> Trust {
        if let Some(why) = &self.stale {
            return Trust::Inconsistent(why.clone());
        }
        if e.in_use() {
            return Trust::Inconsistent(
                "in_use is set: QEMU opened the image read-write and did not store the bitmap \
                 back (crash or still running)"
                    .into(),
            );
        }
        Trust::Consistent
    }

    /// The bitmap's geometry in bitferry's terms, or why bitferry cannot represent it.
    pub fn geometry(&self, e: &DirEntry) -> Result<Geometry, ReadError> {
        Geometry::new(self.header.size, e.granularity()).map_err(|err| ReadError::Unsupported {
            name: e.name.clone(),
            reason: err.to_string(),
        })
    }

    /// Read and validate `e`'s bits. Refuses untrusted bitmaps.
    pub fn read_bitmap(&self, e: &DirEntry) -> Result<Bitmap, ReadError> {
        if let Trust::Inconsistent(reason) = self.trust(e) {
            return Err(ReadError::Untrusted {
                name: e.name.clone(),
                reason,
            });
        }
        let geom = self.geometry(e)?;
        let cs = self.header.cluster_size();
        let want = format::expected_table_size(self.header.size, e.granularity_bits, cs);
        if u64::from(e.table_size) != want {
            return Err(FormatError::Invalid {
                what: "bitmap table size",
                detail: format!(
                    "bitmap {:?} has {} entries, a {}-byte disk at granularity {} needs {want}",
                    e.name,
                    e.table_size,
                    self.header.size,
                    e.granularity()
                ),
            }
            .into());
        }
        // table_size × cs ≤ 512 MiB was checked on the directory, so raw_len is bounded too.
        let raw_len = geom.raw_len();
        let blocks = geom.blocks();
        let table_bytes = u64::from(e.table_size) * 8;
        let table_end = e
            .table_offset
            .checked_add(table_bytes)
            .filter(|end| *end <= self.src.size());
        if table_end.is_none() {
            return Err(truncated(format!(
                "bitmap table of {:?} ends past the end of the file",
                e.name
            )));
        }
        let bad_data = |err: DecodeError| -> ReadError {
            FormatError::Invalid {
                what: "bitmap data",
                detail: format!("bitmap {:?}: {err}", e.name),
            }
            .into()
        };
        let mut fill = Filler::new(geom);
        let mut piece = Vec::new();
        let mut cluster = Vec::new();
        let mut done = 0u64;
        let mut index = 0u64;
        while done < table_bytes {
            let n = (table_bytes - done).min(TABLE_PIECE as u64);
            piece.resize(n as usize, 0);
            self.src.read_exact_at(&mut piece, e.table_offset + done)?;
            for word in piece.chunks_exact(8) {
                let entry = format::parse_table_entry(
                    u64::from_be_bytes(word.try_into().expect("8 bytes")),
                    cs,
                )?;
                // The table has exactly enough entries, so only the last cluster is short.
                let start = (index * cs).min(raw_len as u64);
                let len = ((index + 1) * cs).min(raw_len as u64) - start;
                let is_last = start + len == raw_len as u64;
                match entry {
                    TableEntry::Zeros => fill.push_repeat(0, len).map_err(bad_data)?,
                    TableEntry::Ones if is_last && blocks % 8 != 0 => {
                        // Clip to the disk: bits past the last block stay zero.
                        fill.push_repeat(0xff, len - 1).map_err(bad_data)?;
                        fill.push(&[(1u8 << (blocks % 8)) - 1]).map_err(bad_data)?;
                    }
                    TableEntry::Ones => fill.push_repeat(0xff, len).map_err(bad_data)?,
                    TableEntry::Data(off) => {
                        let fits = off.checked_add(len).is_some_and(|e| e <= self.src.size());
                        if !fits {
                            return Err(truncated(format!(
                                "data cluster {index} of bitmap {:?} at {off:#x} ends past the \
                                 end of the file",
                                e.name
                            )));
                        }
                        cluster.resize(len as usize, 0);
                        self.src.read_exact_at(&mut cluster, off)?;
                        fill.push(&cluster).map_err(bad_data)?;
                    }
                }
                index += 1;
            }
            done += n;
        }
        Ok(fill.finish())
    }
}

/// Streams raw bitmap bytes into a [`Bitmap`] one wire chunk at a time, so reading holds the
/// bitmap once, not a second full raw copy beside it.
struct Filler {
    bitmap: Bitmap,
    chunk: usize,
    buf: Vec<u8>,
}

impl Filler {
    fn new(geom: Geometry) -> Self {
        Filler {
            bitmap: Bitmap::new(geom),
            chunk: 0,
            buf: Vec::new(),
        }
    }

    /// Append `bytes`; the caller never pushes past the raw length (the table has exactly
    /// enough entries).
    fn push(&mut self, mut bytes: &[u8]) -> Result<(), DecodeError> {
        while !bytes.is_empty() {
            let chunk_len = self.bitmap.geometry().chunk_range(self.chunk).len();
            if chunk_len == 0 {
                // More bytes than the geometry holds: refuse rather than loop.
                let raw_len = self.bitmap.geometry().raw_len();
                return Err(DecodeError::RawLength {
                    got: raw_len + bytes.len(),
                    expected: raw_len,
                });
            }
            let take = (chunk_len - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == chunk_len {
                // A new bitmap is all clean: only chunks with bits need applying.
                if self.buf.iter().any(|b| *b != 0) {
                    self.bitmap.apply_chunk_raw(self.chunk, &self.buf, false)?;
                }
                self.buf.clear();
                self.chunk += 1;
            }
        }
        Ok(())
    }

    /// Append `len` copies of `byte`.
    fn push_repeat(&mut self, byte: u8, len: u64) -> Result<(), DecodeError> {
        let block = [byte; 4096];
        let mut left = len;
        while left > 0 {
            // Whole zero chunks: nothing to copy, the bitmap is already clean there.
            let chunk_len = self.bitmap.geometry().chunk_range(self.chunk).len() as u64;
            if byte == 0 && self.buf.is_empty() && left >= chunk_len && chunk_len > 0 {
                self.chunk += 1;
                left -= chunk_len;
                continue;
            }
            let n = left.min(block.len() as u64) as usize;
            self.push(&block[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    fn finish(self) -> Bitmap {
        debug_assert!(self.buf.is_empty() && self.chunk == self.bitmap.chunks());
        self.bitmap
    }
}
