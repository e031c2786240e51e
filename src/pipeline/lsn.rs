//! WAL positions in PostgreSQL's `X/Y` text form.

/// Formats an LSN as PostgreSQL does (`16/B374D848`).
pub fn format(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's `X/Y` form.
pub fn parse(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some(((hi as u64) << 32) | lo as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips() {
        for v in [0u64, 1, 0x16_B374_D848, u64::MAX] {
            assert_eq!(super::parse(&super::format(v)), Some(v));
        }
        assert_eq!(super::format(0x16_B374_D848), "16/B374D848");
        assert_eq!(super::parse("nope"), None);
    }
}
