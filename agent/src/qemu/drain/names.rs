//! bitferry's names inside QEMU: `PREFIX<seq>` for its tracking bitmaps, and node, export and
//! file names derived from the same prefix for the drain's throw-away objects. Pure.

use super::error::DrainError;
use std::collections::HashSet;

/// The default reserved prefix: bitmaps `bitferry-1`, `bitferry-2`, ...
pub const DEFAULT_PREFIX: &str = "bitferry-";

/// QEMU's node names and export ids are at most 31 bytes: `PREFIX` + `car` + a sequence
/// number below 10^12 (a drain a millisecond for 30 years) fits.
pub const MAX_PREFIX: usize = 16;

/// Check that `prefix` can start node names, export ids and bitmap names: a letter first,
/// then letters, digits, `-`, `.`, `_` (QEMU's `id_wellformed`), at most [`MAX_PREFIX`] bytes.
pub fn check_prefix(prefix: &str) -> Result<(), DrainError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX
        && prefix.as_bytes()[0].is_ascii_alphabetic()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(DrainError::Misuse(format!(
            "bitmap prefix {prefix:?} must be 1..={MAX_PREFIX} bytes: a letter, then letters, \
             digits, '-', '.', '_'"
        )))
    }
}

/// The tracking bitmap of sequence number `seq`.
pub fn bitmap_name(prefix: &str, seq: u64) -> String {
    format!("{prefix}{seq}")
}

/// The sequence number of `name` if it is one of bitferry's tracking bitmaps under `prefix`
/// (`PREFIX` followed by a decimal number without leading zeros).
pub fn seq_of(prefix: &str, name: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// The first sequence number above `after` whose bitmap name is not in `taken`.
pub fn next_free(prefix: &str, after: u64, taken: &HashSet<String>) -> Option<u64> {
    let mut seq = after.checked_add(1)?;
    while taken.contains(&bitmap_name(prefix, seq)) {
        seq = seq.checked_add(1)?;
    }
    Some(seq)
}

/// Node name of the carrier of drain `seq`.
pub fn carrier_node(prefix: &str, seq: u64) -> String {
    format!("{prefix}car{seq}")
}

/// NBD export id and name of drain `seq`.
pub fn export_id(prefix: &str, seq: u64) -> String {
    format!("{prefix}exp{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        check_prefix(DEFAULT_PREFIX).unwrap();
        check_prefix("bf_x.1").unwrap();
        for bad in ["", "1abc", "-x", "a b", "a/b", "abcdefghijklmnopq"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        // The longest derived name fits QEMU's 31 bytes.
        let p = "a".repeat(MAX_PREFIX);
        check_prefix(&p).unwrap();
        assert!(carrier_node(&p, 999_999_999_999).len() <= 31);
        assert!(export_id(&p, 999_999_999_999).len() <= 31);
    }

    #[test]
    fn sequence_numbers() {
        let p = DEFAULT_PREFIX;
        assert_eq!(seq_of(p, "bitferry-7"), Some(7));
        assert_eq!(seq_of(p, "bitferry-0"), Some(0));
        for other in [
            "bitferry-",
            "bitferry-07",
            "bitferry-x",
            "bitferry-1a",
            "c1",
            "BITFERRY-1",
        ] {
            assert_eq!(seq_of(p, other), None, "{other}");
        }
        assert_eq!(seq_of(p, "bitferry-99999999999999999999999"), None);
        let taken: HashSet<String> = ["bitferry-3", "bitferry-4", "bitferry-6"]
            .map(String::from)
            .into();
        assert_eq!(next_free(p, 2, &taken), Some(5));
        assert_eq!(next_free(p, 5, &taken), Some(7));
        assert_eq!(next_free(p, u64::MAX, &taken), None);
    }
}
