//! Per-node broker credentials, as the core decides them: each node's password (derived from
//! the mesh's broker secret) and the changes the broker must learn ([`Credential`]). The
//! embedded broker ([`crate::transport::acl`]) and Mosquitto ([`crate::transport::dynsec`]) carry
//! them out.

use sha2::{Digest, Sha256};

/// A node's broker password: `base64url(SHA-256("sidenet-mqtt-password-v1" 0 secret mesh 0
/// node))`, from the mesh's broker secret ([`crate::reconcile::core::Secrets::mqtt_secret`]). Derived, not
/// stored: the controller can give it again after losing its database, and an external broker
/// can be told it again.
pub fn node_password(secret: &[u8; 32], mesh: &str, node: &str) -> String {
    use base64::Engine;
    let mut h = Sha256::new();
    h.update(b"sidenet-mqtt-password-v1\0");
    h.update(secret);
    h.update(mesh.as_bytes());
    h.update([0]);
    h.update(node.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

/// A change to the broker's view of node credentials, made by the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// The node's password (sent to it in its config); a connection giving it is let in.
    Issue {
        /// Mesh network name.
        mesh: String,
        /// Node id.
        node: String,
        /// The password.
        password: String,
    },
    /// The node logs in with its password: refuse its id without it from now on.
    Arm {
        /// Mesh network name.
        mesh: String,
        /// Node id.
        node: String,
    },
    /// The node was removed: forget its credentials (its id may enrol again).
    Revoke {
        /// Mesh network name.
        mesh: String,
        /// Node id.
        node: String,
    },
}
