//! Layer 2, the pure reconcile core: from typed specs and reported state to what each node
//! should run. No I/O but the state store; no Kubernetes, files or MQTT.

pub mod admission;
pub mod air;
pub mod alto;
pub mod cache;
pub mod core;
pub mod credentials;
pub mod diff;
pub mod health;
pub mod model;
pub mod peers;
pub mod pending;
pub mod render;
pub mod rollout;
pub mod store;
pub mod topology;
