//! The types the reconcile layer shares with its users: what to publish, status rows, counters,
//! refused messages, the secrets the core needs, and the names of sealed secrets.

use serde::{Deserialize, Serialize};
use sidenet_crds::SecretKeyRef;
use sidenet_wire::Revision;
use sidenet_wire::keys::KeyPair;

use crate::spec::manifest::ManifestSet;

/// Default config validity: 30 days.
pub const DEFAULT_VALIDITY: u64 = 30 * 24 * 3600;
/// Name of the sealed mesh passphrase in configs (`NodeConfig::sealed`).
pub const MESH_PASSPHRASE: &str = sidenet_wire::seal::MESH_PASSPHRASE;
/// Name of the sealed next mesh passphrase during a scheduled rotation's overlap.
pub const MESH_PASSPHRASE_NEXT: &str = "mesh-passphrase-next";
/// Name of the node's sealed broker password in configs (`NodeConfig::sealed`).
pub const MQTT_PASSWORD: &str = sidenet_wire::seal::MQTT_PASSWORD;
/// Failed revisions remembered per node (the newest).
pub const MAX_FAILED_REVISIONS: usize = 16;

/// Secrets the core needs: mesh signing keys and passphrases. Standalone keeps them in the state
/// folder; Kubernetes mode in Secrets.
pub trait Secrets: Send {
    /// The signing key of a mesh, created if missing.
    fn mesh_key(&mut self, network: &str) -> Result<KeyPair, String>;
    /// A passphrase by reference, from the manifests' Secrets or created if missing.
    fn passphrase(&mut self, set: &ManifestSet, r: &SecretKeyRef) -> Result<String, String>;
    /// The secret the mesh's per-node broker passwords are derived from
    /// ([`crate::reconcile::credentials::node_password`]). It must not change when the signing key is rotated;
    /// the default derives it from the signing key, for stores that cannot rotate.
    fn mqtt_secret(&mut self, network: &str) -> Result<[u8; 32], String> {
        let key = self.mesh_key(network)?;
        let mut input = b"sidenet-mqtt-secret-v1\0".to_vec();
        input.extend_from_slice(key.to_file_text().as_bytes());
        Ok(sidenet_wire::codec::sha256(&input))
    }
    /// The key rotations of a mesh so far (empty chain when its key was never rotated).
    fn rotation(&mut self, _network: &str) -> Result<Rotation, String> {
        Ok(Rotation::default())
    }
    /// Makes `key` the mesh's signing key, with `rotation` (which ends with its endorsement).
    /// Must be durable before it returns: configs signed by the new key follow at once.
    fn rotate_mesh_key(
        &mut self,
        _network: &str,
        _key: &KeyPair,
        _rotation: &Rotation,
    ) -> Result<(), String> {
        Err("this secret store cannot rotate keys".into())
    }
}

/// A mesh's signing key history: the endorsement chain announced to agents and the end of the
/// overlap during which they still accept the previous key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// Endorsements, oldest first.
    pub chain: Vec<sidenet_wire::rotation::Endorsement>,
    /// End of the overlap of the last rotation (Unix seconds).
    #[serde(default)]
    pub previous_until: Option<u64>,
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained.
    pub retain: bool,
}

/// Counters for tests, benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Configs rendered.
    pub rendered: u64,
    /// Configs signed and published.
    pub published: u64,
    /// Enrolments accepted.
    pub enrolled: u64,
    /// Enrolments refused.
    pub refused: u64,
    /// Messages refused (bad signature, replay, ...).
    pub rejected_messages: u64,
    /// Enrolment requests of new nodes not listed as pending: too many new nodes asked at
    /// once ([`crate::reconcile::pending`]).
    #[serde(default)]
    pub pending_rate_limited: u64,
    /// Pending nodes pushed out of a full list by newer ones.
    #[serde(default)]
    pub pending_evicted: u64,
}

/// One row of `sidenetctl status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRow {
    /// Node id.
    pub node: String,
    /// MeshNode name, if any.
    pub name: Option<String>,
    /// Mesh network name.
    pub mesh: String,
    /// Hostname.
    pub hostname: Option<String>,
    /// Phase.
    pub phase: String,
    /// Why the node is not configured, if it is not.
    pub reason: Option<String>,
    /// Online (from the presence topic).
    pub online: Option<bool>,
    /// Desired revision.
    pub desired: Option<Revision>,
    /// Applied revision.
    pub applied: Option<Revision>,
    /// Last seen, Unix seconds.
    pub last_seen: Option<u64>,
    /// Allocated address.
    pub address: Option<String>,
    /// Last failure.
    pub failure: Option<String>,
    /// Babel neighbours the node last reported (one per WireGuard link that is up).
    #[serde(default)]
    pub neighbours: Vec<sidenet_wire::messages::Neighbour>,
    /// The node's last pathfinder probe results (latency and loss per neighbour and gateway).
    #[serde(default)]
    pub probes: Vec<sidenet_wire::messages::Probe>,
    /// Agent version of the node's last status report.
    #[serde(default)]
    pub agent_version: Option<String>,
    /// Sequence epoch of the node's last message: it grows every time the agent starts.
    #[serde(default)]
    pub agent_epoch: Option<u64>,
    /// Packages the node says are missing (it applies nothing new until they are installed).
    #[serde(default)]
    pub missing: Vec<String>,
    /// The policy shaping the node runs (leaf qdisc, windows open), as it last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<sidenet_wire::messages::ShapingStatus>,
    /// Handover: the path the node uses for each service another node publishes (`side-net` or
    /// `internet`, since when, why), as it last reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<sidenet_wire::messages::ServiceRoute>,
}

/// A node message the core refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What was refused (`enrolment`, `status`).
    pub what: String,
    /// Mesh network name from the topic.
    pub mesh: String,
    /// Node id from the topic.
    pub node: String,
    /// Why.
    pub why: String,
}
