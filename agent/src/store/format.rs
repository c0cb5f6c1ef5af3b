//! The store's file format (pure: bytes in, bytes out). See docs/architecture.md §Store file.
//!
//! ```text
//! 0      8      12          16                 16+H        16+H+32
//! | magic | version | header_len H | header (postcard) | blake3(bytes 0..16+H) |
//! | chunk table: per chunk { kind u8, payload_len u32 LE, cv [32] } | payloads ... |
//! | blake3(every byte before this trailer) [32] |
//! ```
//! The header carries the root. Loading checks the header hash, every chunk's chaining value
//! against its decoded bytes, the root against the chunk values, and finally the file trailer.
//! The trailer catches flips in bytes that decode to the same bits (e.g. a roaring run
//! container's unused cardinality field), so *any* damaged byte makes the file untrusted.

use serde::{Deserialize, Serialize};
use wire::{
    Bitmap, CHUNK_BYTES, Checkpoint, ChunkKind, Cv, DiskId, Geometry, Root, State, decode_chunk,
    encode_chunk,
};

/// File magic.
pub const MAGIC: &[u8; 8] = b"BFBITMAP";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest header accepted (checked before allocating).
pub const MAX_HEADER: usize = 64 << 10;
const TABLE_ENTRY: usize = 1 + 4 + 32;

/// Everything about a stored bitmap except its bits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The disk.
    pub disk: DiskId,
    /// Disk size and granularity.
    pub geometry: Geometry,
    /// What the bitmap counts from.
    pub checkpoint: Option<Checkpoint>,
    /// Ownership epoch: bumped when tracking moves to another host.
    pub epoch: u64,
    /// Trust state as written.
    pub state: State,
    /// Why the state is not `consistent`, when it is not.
    pub reason: Option<String>,
    /// Bumped on every commit.
    pub generation: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    meta: Meta,
    chunks: u32,
    root: Root,
}

/// Why a file could not be decoded. Every variant means "do not trust this file".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not a bitferry store file.
    #[error("bad magic: not a bitferry bitmap file")]
    Magic,
    /// Written by another format version.
    #[error("unknown format version {0} (this build reads version {FORMAT_VERSION})")]
    Version(u32),
    /// Shorter than its structure says.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// Longer than its structure says.
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
    /// The header's own hash does not match.
    #[error("header checksum mismatch")]
    HeaderHash,
    /// The header does not parse.
    #[error("header does not decode: {0}")]
    Header(String),
    /// Chunk `n` does not decode or does not match its hash.
    #[error("chunk {0}: {1}")]
    Chunk(usize, String),
    /// The whole-file checksum does not match.
    #[error("file checksum mismatch")]
    FileHash,
    /// The root does not match the chunk hashes.
    #[error("root mismatch: stored {stored}, computed {computed}")]
    Root {
        /// Root in the header.
        stored: Root,
        /// Root of the data.
        computed: Root,
    },
}

/// Serialize a bitmap and its metadata.
pub fn encode(meta: &Meta, bitmap: &mut Bitmap) -> Vec<u8> {
    let root = bitmap.root();
    let header = postcard::to_allocvec(&Header {
        meta: meta.clone(),
        chunks: bitmap.chunks() as u32,
        root,
    })
    .expect("serializing into a Vec cannot fail");
    let mut out = Vec::with_capacity(16 + header.len() + 32 + bitmap.chunks() * TABLE_ENTRY);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    let hh = blake3::hash(&out);
    out.extend_from_slice(hh.as_bytes());
    let cvs: Vec<Cv> = bitmap.chunk_hashes().to_vec();
    let mut payloads = Vec::new();
    let mut buf = Vec::new();
    for (i, cv) in cvs.iter().enumerate() {
        bitmap.chunk_raw(i, &mut buf);
        let enc = encode_chunk(&buf);
        out.push(enc.kind as u8);
        out.extend_from_slice(&(enc.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(cv);
        payloads.extend_from_slice(&enc.payload);
    }
    out.extend_from_slice(&payloads);
    let trailer = blake3::hash(&out);
    out.extend_from_slice(trailer.as_bytes());
    out
}

/// Just the metadata, verified by the header hash; the bits are not checked. Used to report
/// *which* disk a corrupt file belonged to.
pub fn decode_meta(bytes: &[u8]) -> Result<Meta, FormatError> {
    Ok(decode_header(bytes)?.0.meta)
}

fn decode_header(bytes: &[u8]) -> Result<(Header, usize), FormatError> {
    if bytes.len() < 16 {
        return Err(FormatError::Truncated("file prefix"));
    }
    if &bytes[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    let hlen = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if hlen > MAX_HEADER {
        return Err(FormatError::Header(format!(
            "header length {hlen} exceeds {MAX_HEADER}"
        )));
    }
    let end = 16 + hlen;
    if bytes.len() < end + 32 {
        return Err(FormatError::Truncated("header"));
    }
    if blake3::hash(&bytes[..end]).as_bytes() != &bytes[end..end + 32] {
        return Err(FormatError::HeaderHash);
    }
    let (header, rest): (Header, _) = postcard::take_from_bytes(&bytes[16..end])
        .map_err(|e| FormatError::Header(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FormatError::Header("trailing bytes in header".into()));
    }
    if header.chunks as usize != header.meta.geometry.chunks() {
        return Err(FormatError::Header(format!(
            "{} chunks recorded, geometry needs {}",
            header.chunks,
            header.meta.geometry.chunks()
        )));
    }
    Ok((header, end + 32))
}

/// Decode and fully verify a file.
pub fn decode(file: &[u8]) -> Result<(Meta, Bitmap), FormatError> {
    let (header, mut pos) = decode_header(file)?;
    if file.len() < pos + 32 {
        return Err(FormatError::Truncated("file trailer"));
    }
    let (bytes, trailer) = file.split_at(file.len() - 32);
    let geom = header.meta.geometry;
    let n = header.chunks as usize;
    let table_len = n
        .checked_mul(TABLE_ENTRY)
        .ok_or(FormatError::Truncated("chunk table"))?;
    if bytes.len() - pos < table_len {
        return Err(FormatError::Truncated("chunk table"));
    }
    let table = &bytes[pos..pos + table_len];
    pos += table_len;
    let mut bitmap = Bitmap::new(geom);
    let mut cvs = Vec::with_capacity(n);
    for i in 0..n {
        let e = &table[i * TABLE_ENTRY..(i + 1) * TABLE_ENTRY];
        let kind =
            ChunkKind::from_tag(e[0]).map_err(|err| FormatError::Chunk(i, err.to_string()))?;
        let plen = u32::from_le_bytes(e[1..5].try_into().expect("4 bytes")) as usize;
        if plen > CHUNK_BYTES {
            return Err(FormatError::Chunk(
                i,
                format!("payload length {plen} too large"),
            ));
        }
        if bytes.len() - pos < plen {
            return Err(FormatError::Truncated("chunk payload"));
        }
        let raw_len = geom.chunk_range(i).len();
        let raw = decode_chunk(kind, &bytes[pos..pos + plen], raw_len)
            .map_err(|err| FormatError::Chunk(i, err.to_string()))?;
        pos += plen;
        let cv: Cv = e[5..].try_into().expect("32 bytes");
        if wire::tree::chunk_cv(i, &raw) != cv {
            return Err(FormatError::Chunk(i, "hash mismatch".into()));
        }
        bitmap
            .apply_chunk_raw(i, &raw, false)
            .map_err(|err| FormatError::Chunk(i, err.to_string()))?;
        cvs.push(cv);
    }
    if pos != bytes.len() {
        return Err(FormatError::Trailing(bytes.len() - pos));
    }
    bitmap.adopt_verified_hashes(&cvs);
    let computed = bitmap.root();
    if computed != header.root {
        return Err(FormatError::Root {
            stored: header.root,
            computed,
        });
    }
    if blake3::hash(bytes).as_bytes() != trailer {
        return Err(FormatError::FileHash);
    }
    Ok((header.meta, bitmap))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose checksums are right but whose header holds a geometry `Geometry::new`
    /// refuses. Found by the `store_file` fuzz target: granularity 0 divided by zero while
    /// loading (fuzz/corpus/store_file/crash-granularity-zero).
    #[test]
    fn a_header_with_an_invalid_geometry_is_refused_not_trusted() {
        for (size, granularity) in [(1u64 << 20, 0u64), (1 << 20, 1000), (u64::MAX, 512)] {
            // Postcard writes a struct as its fields in order: the same bytes as `Header`.
            let header = postcard::to_stdvec(&(
                DiskId::new("vm1/vda").unwrap(),
                (size, granularity),
                None::<Checkpoint>,
                1u64,
                State::Consistent,
                None::<String>,
                0u64,
                1u32,
                Root([0; 32]),
            ))
            .unwrap();
            let mut f = MAGIC.to_vec();
            f.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            f.extend_from_slice(&(header.len() as u32).to_le_bytes());
            f.extend_from_slice(&header);
            let h = blake3::hash(&f);
            f.extend_from_slice(h.as_bytes());
            f.extend_from_slice(&[0; TABLE_ENTRY]);
            let t = blake3::hash(&f);
            f.extend_from_slice(t.as_bytes());
            assert!(
                matches!(decode_meta(&f), Err(FormatError::Header(_))),
                "{size} / {granularity}"
            );
            assert!(matches!(decode(&f), Err(FormatError::Header(_))));
        }
    }

    #[test]
    fn a_file_round_trips() {
        let g = Geometry::new(3 << 30, 4096).unwrap();
        let mut b = Bitmap::new(g);
        b.set_blocks(5, 600_000);
        let meta = Meta {
            disk: DiskId::new("vm1/vda").unwrap(),
            geometry: g,
            checkpoint: None,
            epoch: 2,
            state: State::Consistent,
            reason: None,
            generation: 1,
        };
        let (m, got) = decode(&encode(&meta, &mut b)).unwrap();
        assert_eq!((m, got), (meta, b));
    }
}
