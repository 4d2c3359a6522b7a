//! Unix time, and the RFC 3339 form Kubernetes and the manifests use, through jiff.

use jiff::Timestamp;

/// Current Unix time in seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix seconds as an RFC 3339 UTC timestamp (`2026-11-22T03:04:05Z`), the form Kubernetes
/// uses in conditions.
pub fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Parses an RFC 3339 UTC timestamp of exactly the form `2026-11-22T03:04:05Z` (whole
/// seconds, `T`, `Z`; what [`rfc3339`] writes) into Unix seconds. Other offsets, fractions and
/// times before 1970 are refused, so that a manifest says one instant one way.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let t: Timestamp = s.parse().ok()?;
    if t.subsec_nanosecond() != 0 || t.to_string() != s {
        return None;
    }
    u64::try_from(t.as_second()).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_round_trips() {
        for t in [0, 951_782_400, 1_795_316_645, 4_102_444_799] {
            assert_eq!(super::parse_rfc3339(&super::rfc3339(t)), Some(t));
        }
        for bad in [
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-22 03:04:05Z",
            "2026-11-22T03:04:05+01:00",
            "2026-11-22T24:00:00Z",
            "2026-11-22T03:04:05.5Z",
            "1969-12-31T23:59:59Z",
            "",
        ] {
            assert_eq!(super::parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_316_645), "2026-11-22T03:04:05Z");
    }
}
