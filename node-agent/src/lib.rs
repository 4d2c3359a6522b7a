//! sidenet node agent: verifies and applies signed configs on routers and dongle hosts.
//!
//! # Layout
//!
//! - [`core`]: the sans-IO decision core (events in, effects out).
//! - [`files`]: the `files` backend and the crash-safe apply journal.
//! - [`shell`]: the thin tokio/MQTT shell that carries out effects.
//! - [`state`]: the node key, the pinned mesh key and the message sequence epoch on disk.
//!
//! The agent never depends on kube, jsonschema or minijinja: rendering happens in the controller.

pub mod core;
pub mod files;
pub mod shell;
pub mod state;
