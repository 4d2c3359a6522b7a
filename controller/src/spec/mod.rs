//! Layer 1, what the admin wrote: manifests and their validation, the regulatory rules, and the
//! address plan.

pub mod ipam;
pub mod manifest;
pub mod regdb;
