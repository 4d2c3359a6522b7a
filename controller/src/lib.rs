//! sidenet controller: turns manifests into one signed config per node and publishes them.
//!
//! # Layout
//!
//! - [`manifest`]: loading and validating `Mesh`, `MeshNode`, `HardwareProfile` and `Secret`
//!   manifests (JSON Schema from the CRD types, then semantic checks).
//! - [`regdb`]: channels allowed per country and band.
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

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_316_645), "2026-11-22T03:04:05Z");
    }
}
