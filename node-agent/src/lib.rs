//! sidenet node agent: verifies and applies signed configs on routers and dongle hosts.
//!
//! # Layout
//!
//! - [`core`]: the sans-IO decision core (events in, effects out), with the health-check trial.
//! - [`files`]: the crash-safe apply journal (stage, back up, install, confirm or roll back),
//!   shared by every backend.
//! - [`backend`]: what applying means per system (`files`, `linux`, `openwrt`), behind a trait,
//!   with system commands behind a [`backend::Runner`] (real, or a recorder for tests).
//! - [`linux`], [`openwrt`]: the two data-plane backends.
//! - [`babel`]: babeld's local interface (neighbours, routes).
//! - [`probe`]: the pathfinder probes (UDP echo over the side-net).
//! - [`requires`]: the packages a config needs, checked before each apply (`missing: ...`).
//! - [`wgkey`]: the node's WireGuard key, generated on the node.
//! - [`shell`]: the thin tokio/MQTT shell that carries out effects.
//! - `tls` (cargo feature `tls`): TLS to the broker, pinned to the CA bundle the agent was given.
//! - [`uci`]: sidenet's own `sidenet_*` sections in OpenWrt's UCI config, through the `uci`
//!   command (the `openwrt` backend's guest rules).
//! - [`state`]: the node key, the pinned mesh key, the message sequence epoch and the failed
//!   revisions on disk.
//!
//! The agent never depends on kube, jsonschema or minijinja: rendering happens in the controller.

pub mod babel;
pub mod backend;
pub mod core;
pub mod files;
pub mod linux;
pub mod openwrt;
pub mod probe;
pub mod requires;
pub mod shell;
pub mod state;
#[cfg(feature = "tls")]
pub mod tls;
pub mod uci;
pub mod wgkey;
