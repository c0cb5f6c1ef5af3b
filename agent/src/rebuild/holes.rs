//! Finding holes with `SEEK_DATA` / `SEEK_HOLE`, so blocks that lie wholly in a hole are
//! compared as zero blocks without being read.
//!
//! Queries come in increasing order during a scan; the last data and hole extents found are
//! cached, so a file costs about two `lseek` calls per extent, not per block. Filesystems and
//! devices without hole support report everything as data, which is always correct.

use rustix::fs::{SeekFrom, seek};
use std::fs::File;
use std::ops::Range;

/// Hole finder over one open file of known size.
#[derive(Debug)]
pub struct Holes {
    size: u64,
    known_hole: Range<u64>,
    known_data: Range<u64>,
    enabled: bool,
}

impl Holes {
    /// A hole finder for a file of `size` bytes.
    pub fn new(size: u64) -> Self {
        Holes {
            size,
            known_hole: 0..0,
            known_data: 0..0,
            enabled: true,
        }
    }

    /// Whether `range` (within the file) lies wholly inside a hole, i.e. reads as zeros without
    /// holding data. Any error from the OS answers "no" (read it), which is always safe.
    pub fn is_hole(&mut self, file: &File, range: Range<u64>) -> bool {
        if !self.enabled || range.is_empty() {
            return false;
        }
        if self.known_hole.start <= range.start && range.end <= self.known_hole.end {
            return true;
        }
        if self.known_data.start < range.end && range.start < self.known_data.end {
            return false;
        }
        let data = match seek(file, SeekFrom::Data(range.start)) {
            Ok(d) => d,
            // ENXIO: no data at or after the offset — the rest of the file is a hole.
            Err(rustix::io::Errno::NXIO) => self.size,
            Err(_) => {
                self.enabled = false;
                return false;
            }
        };
        if data >= range.end {
            self.known_hole = range.start..data.max(range.end);
            return true;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h,
            Err(_) => {
                self.enabled = false;
                return false;
            }
        };
        self.known_data = data..hole.max(data + 1);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_holes_around_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = File::create(&p).unwrap();
        let size = 64u64 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(&[1u8; 1 << 20], 32 << 20).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&p).unwrap();
        let mut h = Holes::new(size);
        let g = 1u64 << 20;
        let data: Vec<u64> = (0..64)
            .filter(|b| !h.is_hole(&f, b * g..(b + 1) * g))
            .collect();
        // The data block is never reported as a hole; on filesystems with hole support the
        // others are.
        assert!(data.contains(&32));
        assert!(data.len() <= 3, "{data:?}");
    }
}
