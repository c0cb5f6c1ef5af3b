//! Parsing and printing of sizes (`64K`, `1T`: powers of 1024) and byte ranges (`OFFSET:LENGTH`).

/// Parse a size: plain bytes or a number with `K`, `M`, `G`, `T` (powers of 1024), optionally
/// followed by `iB` or `B`, case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (use bytes or K, M, G, T, e.g. 64K)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parse `OFFSET:LENGTH`, each a size.
pub fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (o, l) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not a range (use OFFSET:LENGTH, e.g. 1M:64K)"))?;
    Ok((parse_size(o)?, parse_size(l)?))
}

/// A size for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A size for people with its exact value: `1 GiB (1073741824 bytes)`, or `512 bytes` below
/// 1 KiB. Text output uses this; JSON always carries the exact number alone.
pub fn human_bytes(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes} bytes")
    } else {
        format!("{} ({bytes} bytes)", human(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_range("1M:64K").unwrap(), (1 << 20, 65536));
        assert!(parse_range("1M").is_err());
        assert_eq!(human(1536 << 20), "1.50 GiB");
        assert_eq!(human(512), "512 B");
        assert_eq!(human_bytes(1 << 30), "1 GiB (1073741824 bytes)");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }
}
