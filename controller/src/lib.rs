//! sidenet controller: turns manifests into one signed config per node and publishes them.
//!
//! # Layout
//!
//! - [`manifest`]: loading and validating `Mesh`, `MeshNode`, `HardwareProfile` and `Secret`
//!   manifests (JSON Schema from the CRD types, then semantic checks).
//! - [`regdb`]: regulatory checks of channels, widths, DFS and tx power (wireless-regdb).
//! - [`ipam`]: one /64 per node out of the mesh /48.
//! - [`render`]: minijinja templates × hardware profiles → files.
//! - [`core`]: the reconcile core (no I/O but its state store): enrolment, approval, revisions,
//!   signing, status.
//! - [`peers`]: WireGuard neighbours (who links to whom), ports and link-local addresses.
//! - [`health`]: acknowledging configs on trial, withholding failed revisions, link metrics.
//! - [`store`]: the embedded database of the standalone controller.
//! - [`standalone`]: the standalone adapter: folder watch, embedded broker, MQTT, admin socket.
//! - [`acl`]: who may publish and subscribe to what on the broker.
//! - [`admin`]: the admin protocol `sidenetctl` speaks to a running controller.
//! - [`provisioning`]: running `NodeProvision` manifests in standalone mode.
//! - [`kubernetes`]: the Kubernetes adapter: kube-runtime controllers, status, Secrets, Lease,
//!   metrics.
//! - `fuzzing` (hidden): the fuzz targets' bodies, shared with the corpus replay tests.

pub mod acl;
pub mod admin;
pub mod broker;
pub mod core;
pub mod dynsec;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod inbox;
pub mod ipam;
pub mod kubernetes;
pub mod manifest;
pub mod peers;
pub mod provisioning;
pub mod regdb;
pub mod render;
pub mod standalone;
pub mod store;

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
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Parses an RFC 3339 UTC timestamp of the form `2026-11-22T03:04:05Z` into Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, m, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in[(month - 1) as usize]
        || h > 23
        || m > 59
        || sec > 59
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()
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
