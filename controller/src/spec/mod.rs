//! Layer 1, what the admin wrote: manifests and their validation, the regulatory rules, and the
//! address plan.

pub mod cache;
pub mod checks;
pub mod hints;
pub mod ipam;
pub mod loader;
pub mod manifest;
pub mod names;
pub mod openwrt;
pub mod parse;
pub mod policy;
pub mod regdb;
pub mod rollout;
pub mod services;
pub mod set;
