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
//! - [`cli`]: output, completions and default paths of the two command-line programs.
//! - [`admin`]: the admin protocol `sidenetctl` speaks to a running controller.
//! - [`provisioning`]: running `NodeProvision` manifests in standalone mode.
//! - [`kubernetes`]: the Kubernetes adapter: kube-runtime controllers, status, Secrets, Lease,
//!   metrics.
//! - `fuzzing` (hidden): the fuzz targets' bodies, shared with the corpus replay tests.

pub mod acl;
pub mod admin;
pub mod broker;
pub mod cli;
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
pub mod time;

pub use time::{now, parse_rfc3339, rfc3339};
