//! Retirement records: the epoch at which this host handed a disk over to another host.
//!
//! A host that retires its copy after a migration forgets the bitmap, and with it the epoch.
//! Without a record, a stale copy of the disk's bitmap elsewhere (an old backup of a store, a
//! host that comes back from the dead) could later offer the disk at an epoch older than the
//! owner's, and this host would accept it: two hosts would each believe they own the disk.
//! The record keeps the epoch beside the store (`<disk>.retired`), written durably *before*
//! the bitmap is removed, and the destination refuses offers below it (docs/protocol.md §6,
//! docs/simulation.md rule 7). The simulator keeps the same memory in its model agent.

use super::{Store, StoreError, file_name};
use wire::DiskId;

/// File suffix of a retirement record (not [`super::SUFFIX`], so listings skip it).
pub const RETIRED_SUFFIX: &str = ".retired";

/// First line of a record, then the disk id, the epoch and the BLAKE3 of those three lines.
const MAGIC: &str = "bitferry retired v1";

fn record_name(disk: &DiskId) -> String {
    let name = file_name(disk);
    let stem = name.strip_suffix(super::SUFFIX).unwrap_or(&name);
    format!("{stem}{RETIRED_SUFFIX}")
}

/// The bytes of a record saying `disk` was handed over at `epoch`.
pub fn encode(disk: &DiskId, epoch: u64) -> Vec<u8> {
    let body = format!("{MAGIC}\n{}\n{epoch}\n", disk.as_str());
    let sum = blake3::hash(body.as_bytes()).to_hex();
    format!("{body}{sum}\n").into_bytes()
}

/// The epoch a record for `disk` holds, or why the bytes are not one. Never panics (fuzzed:
/// docs/fuzzing.md).
pub fn decode(disk: &DiskId, bytes: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?;
    let lines: Vec<&str> = text.split('\n').collect();
    let [magic, id, epoch, sum, ""] = lines[..] else {
        return Err(format!(
            "{} lines, expected 4",
            lines.len().saturating_sub(1)
        ));
    };
    if magic != MAGIC {
        return Err(format!("unknown header {magic:?}"));
    }
    let body_len = magic.len() + id.len() + epoch.len() + 3;
    if blake3::hash(&bytes[..body_len]).to_hex().as_str() != sum {
        return Err("checksum mismatch".into());
    }
    if id != disk.as_str() {
        return Err(format!("record is for disk {id:?}"));
    }
    epoch.parse().map_err(|_| format!("bad epoch {epoch:?}"))
}

impl Store {
    /// The epoch at which this host last handed `disk` over, if it ever did. An unreadable
    /// record is an error, never "no record": the caller must then refuse what it would have
    /// checked against it.
    pub fn retired_at(&self, disk: &DiskId) -> Result<Option<u64>, StoreError> {
        let Some(bytes) = self
            .storage
            .read(&record_name(disk))
            .map_err(|e| self.io(e))?
        else {
            return Ok(None);
        };
        decode(disk, &bytes)
            .map(Some)
            .map_err(|reason| StoreError::Untrusted {
                disk: disk.clone(),
                reason: format!("retirement record: {reason}"),
            })
    }

    /// `disk` belongs to another host at `epoch` now: record that durably (never lowering a
    /// record already there), then remove the local bitmap. A crash in between leaves both,
    /// and the bitmap file says "handed over" (the source committed that before switching).
    pub fn retire(&mut self, disk: &DiskId, epoch: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        // An unreadable old record is replaced: this epoch is the newest fact about the disk.
        let epoch = self.retired_at(disk).ok().flatten().unwrap_or(0).max(epoch);
        self.storage
            .write_atomic(&record_name(disk), &encode(disk, epoch))
            .map_err(|e| self.io(e))?;
        self.remove(disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::storage::Storage;

    fn disk() -> DiskId {
        DiskId::new("vm1/vda").unwrap()
    }

    #[test]
    fn a_record_round_trips_and_never_goes_down() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), crate::store::Access::ReadWrite).unwrap();
        assert_eq!(s.retired_at(&disk()).unwrap(), None);
        s.retire(&disk(), 7).unwrap();
        assert_eq!(s.retired_at(&disk()).unwrap(), Some(7));
        s.retire(&disk(), 3).unwrap();
        assert_eq!(s.retired_at(&disk()).unwrap(), Some(7));
        s.retire(&disk(), 9).unwrap();
        assert_eq!(s.retired_at(&disk()).unwrap(), Some(9));
        // Not a bitmap: listings skip it.
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn every_damaged_record_is_an_error_not_an_absence() {
        let good = encode(&disk(), 42);
        assert_eq!(decode(&disk(), &good), Ok(42));
        for i in 0..good.len() {
            for flip in [0x01u8, 0x20, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                assert!(
                    decode(&disk(), &bad).is_err(),
                    "byte {i} ^ {flip:#x} accepted"
                );
            }
        }
        for n in 0..good.len() {
            assert!(
                decode(&disk(), &good[..n]).is_err(),
                "truncated to {n} accepted"
            );
        }
        assert!(decode(&DiskId::new("vm2/vda").unwrap(), &good).is_err());
        // Through the store: the error names the disk.
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), crate::store::Access::ReadWrite).unwrap();
        let mut st = crate::store::storage::FsStorage::new(dir.path());
        st.write_atomic(&record_name(&disk()), b"garbage").unwrap();
        let e = s.retired_at(&disk()).unwrap_err().to_string();
        assert!(
            e.contains("vm1/vda") && e.contains("retirement record"),
            "{e}"
        );
    }
}
