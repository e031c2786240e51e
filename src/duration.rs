//! Durations in the Kubernetes/Go form (`250ms`, `5s`, `1m30s`, `1.5h`).

use std::time::Duration;

/// Parses a Go-style duration. Negative and sign-prefixed values are refused: every duration
/// Philotes takes is an interval that must be positive.
pub fn parse(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("is empty; use a duration such as 250ms, 5s or 1m30s".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("`{input}` is not a duration; use a form such as 250ms, 5s or 1m30s");
    let mut total_nanos: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_nanos = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total_nanos += value * unit_nanos;
    }
    // Anything beyond ~292 years does not fit Go's int64 nanoseconds either.
    if !total_nanos.is_finite() || total_nanos > i64::MAX as f64 {
        return Err(format!("`{input}` is too long a duration"));
    }
    Ok(Duration::from_nanos(total_nanos.round() as u64))
}

/// Formats a duration compactly in the same notation, for messages.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        format!("{}ns", d.as_nanos())
    } else if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_forms() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("2h45m").unwrap(), Duration::from_secs(9900));
        assert_eq!(parse("10us").unwrap(), Duration::from_micros(10));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn refuses_garbage_with_a_hint() {
        for bad in ["", "5", "s", "5 s", "-5s", "5sec", "1m30", "abc", "1..5s"] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("5s"), "{bad}: {err}");
        }
        assert!(parse("9999999999h").unwrap_err().contains("too long"));
    }
}
