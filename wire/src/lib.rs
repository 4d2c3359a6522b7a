//! sidenet wire format, shared by the controller and the node agent.
//!
//! Everything that crosses the broker is a signed [`envelope`]: a small binary frame whose
//! signature covers a compact JSON header, and whose header pins the body by length and SHA-256.
//! Receivers check the size cap, then the signature (`verify_strict`), then the header fields,
//! then the body hash — and only then parse the body.
//!
//! This crate depends on serde and ed25519 only: no async runtime, no MQTT, no Kubernetes, so the
//! agent that links it stays small enough for routers with 16 MB of flash.
//!
//! # Layout
//!
//! - [`names`]: validation of mesh names and node ids (safe in MQTT topics and 802.11s mesh ids).
//! - [`topics`]: the MQTT topic tree under `sidenet/v1/`.
//! - [`keys`]: ed25519 key handling, node ids derived from public keys, key file encoding.
//! - [`join`]: join codes (a mesh name and the fingerprint of its signing key).
//! - [`envelope`]: framing, signing and verification.
//! - [`messages`]: the bodies (announcement, config, enrolment, status).
//! - [`rotation`]: mesh signing key rotation (endorsement chains).
//! - [`seal`]: secrets sealed to one node (the mesh passphrase in configs).
//! - [`beacon`]: the signed discovery beacon of radio links (neighbours by link-local address).
//! - [`codec`]: hex and base32 helpers.

pub mod beacon;
pub mod codec;
pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
pub mod join;
pub mod keys;
pub mod messages;
pub mod names;
pub mod rotation;
pub mod seal;
pub mod topics;

pub use envelope::{Envelope, Header, Kind, Revision, WireError};
pub use keys::{MeshKey, NodeKey, PublicKey};
