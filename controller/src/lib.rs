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
//! - [`admin`]: the admin protocol `sidenetctl` speaks to a running controller.
//! - `fuzzing` (hidden): the fuzz targets' bodies, shared with the corpus replay tests.

pub mod admin;
pub mod broker;
pub mod core;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod ipam;
pub mod manifest;
pub mod peers;
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
