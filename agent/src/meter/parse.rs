//! Integer parsers for cgroup counter files, on byte slices: no allocation, no UTF-8 checks, no
//! panics on any input (the files are the kernel's, but a fixture or a bug must give an error,
//! not a wrong number).

/// Parses a file that holds one unsigned decimal integer, optionally followed by whitespace
/// (the kernel ends it with `\n`). `None` for anything else, including overflow.
pub(crate) fn parse_u64(bytes: &[u8]) -> Option<u64> {
    let digits = trim_end(bytes);
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// Finds the line `<key> <value>` in a flat-keyed file (`cpu.stat`, `memory.stat`,
/// `memory.events`, `memory.oom_control`) and parses its value. The key must match the whole
/// first field: `inactive_file` does not match `total_inactive_file`.
///
/// `Ok(None)` when no line has the key, `Err(())` when the line exists but its value is not an
/// unsigned integer.
pub(crate) fn keyed_u64(bytes: &[u8], key: &[u8]) -> Result<Option<u64>, ()> {
    for line in bytes.split(|&b| b == b'\n') {
        let Some(rest) = line.strip_prefix(key) else {
            continue;
        };
        let Some(value) = rest.strip_prefix(b" ") else {
            continue;
        };
        return parse_u64(value).map(Some).ok_or(());
    }
    Ok(None)
}

fn trim_end(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn single_values() {
        assert_eq!(parse_u64(b"0\n"), Some(0));
        assert_eq!(parse_u64(b"123456789"), Some(123_456_789));
        assert_eq!(parse_u64(b"18446744073709551615\n"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616\n"), None);
        for bad in [
            &b""[..],
            b"\n",
            b"-1\n",
            b"max\n",
            b"1 2\n",
            b" 1\n",
            b"1.5",
            b"+1",
        ] {
            assert_eq!(parse_u64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn keyed_values() {
        let stat = b"anon 1\ninactive_anon 2\ninactive_file 30\ntotal_inactive_file 40\n";
        assert_eq!(keyed_u64(stat, b"inactive_file"), Ok(Some(30)));
        assert_eq!(keyed_u64(stat, b"total_inactive_file"), Ok(Some(40)));
        assert_eq!(keyed_u64(stat, b"anon"), Ok(Some(1)));
        assert_eq!(keyed_u64(stat, b"file"), Ok(None));
        assert_eq!(keyed_u64(b"oom_kill x\n", b"oom_kill"), Err(()));
        // A prefix of a longer key is not the key.
        assert_eq!(keyed_u64(b"oom_kill_disable 0\n", b"oom_kill"), Ok(None));
        assert_eq!(keyed_u64(b"", b"oom_kill"), Ok(None));
    }

    /// Property checks without a property-test crate: seeded random inputs, so a failure
    /// reproduces.
    #[test]
    fn round_trips_and_never_panics() {
        let mut rng = StdRng::seed_from_u64(0x006d_6574_6572);
        for _ in 0..20_000 {
            let v: u64 = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => rng.random_range(0..1000),
                _ => u64::MAX - rng.random_range(0..1000),
            };
            assert_eq!(parse_u64(format!("{v}\n").as_bytes()), Some(v));
            let file = format!("a 1\nkey {v}\nb 2\n");
            assert_eq!(keyed_u64(file.as_bytes(), b"key"), Ok(Some(v)));

            let len = rng.random_range(0..40);
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    *b"0123456789 \nkey-x\xff"
                        .get(rng.random_range(0..18))
                        .unwrap_or(&0)
                })
                .collect();
            let _ = parse_u64(&junk);
            let _ = keyed_u64(&junk, b"key");
            if let Some(v) = parse_u64(&junk) {
                assert_eq!(parse_u64(v.to_string().as_bytes()), Some(v));
            }
        }
    }
}
