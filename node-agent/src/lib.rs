//! sidenet node agent: verifies and applies signed configs on routers and dongle hosts.
//!
//! # Layout
//!
//! - [`core`]: the sans-IO decision core (events in, effects out), with the health-check trial;
//!   [`core::join`] decides how a new agent comes to trust a mesh key (join code,
//!   `--trust-first-key`), [`core::throttle`] bounds what the agent does for messages anyone
//!   can send (one log line or refusal report a minute).
//! - [`files`]: the crash-safe apply journal (stage, back up, install, confirm or roll back),
//!   shared by every backend.
//! - [`backend`]: what applying means per system (`files`, `linux`, `openwrt`), behind a trait,
//!   with system commands behind a [`backend::Runner`] (real, or a recorder for tests);
//!   [`backends`] constructs the backend of each kind.
//! - [`ca`]: the CA bundle pinned for an `mqtts://` broker.
//! - [`cli`]: the command line, a table of options read from the arguments and the environment.
//! - [`logs`]: the log lines on stderr (text or JSON), a small `tracing` subscriber.
//! - [`linux`], [`openwrt`]: the two data-plane backends.
//! - [`babel`]: babeld's local interface (neighbours, routes).
//! - [`probe`]: the pathfinder probes (UDP echo over the side-net).
//! - [`handover`]: published services over the side-net while the probes to their owner are
//!   good, else over the internet (one `ip -6 rule` per prefix).
//! - [`discovery`]: neighbours over the air (signed beacons on the underlay's link-local addresses).
//! - [`radio`]: radio bring-up on Linux (`iw`: the mesh point on the profile's phy).
//! - [`shaping`]: the policy shaping table (HTB classes, rates per stretch of the week, switched
//!   from the node's own clock).
//! - [`requires`]: the packages a config needs, checked before each apply (`missing: ...`).
//! - [`uapi`]: userspace WireGuard's control socket (scoped endpoints `wg` cannot pass on).
//! - [`wgkey`]: the node's WireGuard key, generated on the node.
//! - [`shell`]: the thin tokio/MQTT shell that carries out effects.
//! - `tls` (cargo feature `tls`): TLS to the broker, pinned to the CA bundle the agent was given.
//! - [`uci`]: sidenet's own `sidenet_*` sections in OpenWrt's UCI config, through the `uci`
//!   command (the `openwrt` backend's guest rules).
//! - [`state`]: the node key, the pinned mesh key, the message sequence epoch and the failed
//!   revisions on disk.
//!
//! The agent never depends on kube, jsonschema or minijinja: rendering happens in the controller.
//!
//! # The layer rule
//!
//! Modules use only modules of lower layers ([`LAYERS`]), so there are no import loops:
//! 0. [`core`] (sans-IO: it knows only the wire format), [`cli`], [`logs`], [`files`], [`babel`],
//!    [`probe`], [`ca`], [`discovery`], [`uapi`];
//! 1. [`wgkey`], `tls`, [`handover`] (reads the prober's results);
//! 2. [`state`], [`backend`] (the trait and the command runner, no implementation);
//! 3. [`uci`], [`requires`], [`radio`], [`shaping`], [`squid`] (the web cache's daemon, for both
//!    backends);
//! 4. [`linux`], [`openwrt`] (the implementations);
//! 5. [`backends`] (constructs them);
//! 6. [`shell`] (carries out the core's effects with all of the above).
//!
//! `node-agent/tests/layers.rs` checks this on the sources.

/// The layer of each module (see the crate docs); `node-agent/tests/layers.rs` reads it.
pub const LAYERS: &[(&str, u8)] = &[
    ("core", 0),
    ("cli", 0),
    ("logs", 0),
    ("files", 0),
    ("babel", 0),
    ("probe", 0),
    ("ca", 0),
    ("discovery", 0),
    ("uapi", 0),
    ("wgkey", 1),
    ("tls", 1),
    ("handover", 1),
    ("state", 2),
    ("backend", 2),
    ("uci", 3),
    ("requires", 3),
    ("radio", 3),
    ("shaping", 3),
    ("squid", 3),
    ("linux", 4),
    ("openwrt", 4),
    ("backends", 5),
    ("shell", 6),
];

pub mod babel;
pub mod backend;
pub mod backends;
pub mod ca;
pub mod cli;
pub mod core;
pub mod discovery;
pub mod files;
pub mod handover;
pub mod linux;
pub mod logs;
pub mod openwrt;
pub mod probe;
pub mod radio;
pub mod requires;
pub mod shaping;
pub mod shell;
pub mod squid;
pub mod state;
#[cfg(feature = "tls")]
pub mod tls;
pub mod uapi;
pub mod uci;
pub mod wgkey;
