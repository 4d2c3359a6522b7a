//! sidenet custom resources (group `sidenet.io`, version `v1alpha1`).
//!
//! The same types are read from YAML files by the standalone controller and watched through the
//! Kubernetes API in cluster mode. Every field's doc comment becomes its description in the
//! generated schema, which is what `kubectl explain` shows.
//!
//! # Layout
//!
//! - [`Mesh`]: one community mesh: name, prefix, radio, encryption, routing, enrolment, policies
//!   (the policy types are in `policy.rs`).
//! - [`MeshNode`]: one router or dongle host in a mesh.
//! - [`HardwareProfile`]: the facts of one device model (radios, channels, ports, flash).
//! - [`NodeProvision`]: hosts to install the agent on over SSH and enrol (`provision.rs`).
//! - [`crd_documents`] / [`strict_schema`]: the generated CRDs and the JSON Schema used to
//!   validate manifests (`cargo run -p sidenet-crds --bin crdgen` rewrites `crds/*.yaml`).

// kube-derive takes one `printcolumn(...)` per column, which this lint mistakes for repeats.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod cache;
mod policy;
mod provision;
mod rollout;
mod services;
pub mod yaml;
pub use cache::*;
pub use policy::*;
pub use provision::*;
pub use rollout::*;
pub use services::*;

/// API group of every sidenet kind.
pub const GROUP: &str = "sidenet.io";
/// API version of every sidenet kind.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` written in manifests.
pub const API_VERSION: &str = "sidenet.io/v1alpha1";

// ---------------------------------------------------------------------------------------------
// Mesh
// ---------------------------------------------------------------------------------------------

/// A community mesh: the side-net neighbours join by name.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sidenet.io",
    version = "v1alpha1",
    kind = "Mesh",
    plural = "meshes",
    namespaced,
    status = "MeshStatus",
    shortname = "mesh",
    doc = "A community wifi mesh: network name, IPv6 prefix, radio, encryption, routing, enrolment and policies.",
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.networkName"),
    printcolumn(name = "Prefix", type_ = "string", json_path = ".spec.prefix"),
    printcolumn(
        name = "Enrolment",
        type_ = "string",
        json_path = ".spec.enrollment.mode"
    ),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodes"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// The mesh name nodes join by. It is also the 802.11s mesh id and part of every MQTT topic:
    /// lowercase letters, digits and '-', at most 32 characters. Defaults to `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = patterns::LABEL), length(min = 1, max = 32))]
    pub network_name: Option<String>,
    /// The mesh's IPv6 unique local prefix, a /48 inside fc00::/7 (e.g. fd5e:1d0e:7a00::/48).
    /// Each node gets its own /64 from it.
    #[schemars(regex(pattern = patterns::ULA48), length(max = 45))]
    pub prefix: String,
    /// Radio settings shared by all nodes (nodes may override the channel and tx power).
    pub radio: RadioSpec,
    /// Link encryption of the mesh radio.
    pub encryption: EncryptionSpec,
    /// Routing protocol settings.
    #[serde(default)]
    pub routing: RoutingSpec,
    /// How new nodes are admitted.
    #[serde(default)]
    pub enrollment: EnrollmentSpec,
    /// Mesh policies. When no internet policy is listed, `noInternet` applies: traffic from the
    /// side-net is never forwarded to an internet uplink. Rate limits, time windows, per-path
    /// limits, allow/deny rules and how they combine: `docs/policies.md`.
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// The IANA time zone (e.g. `Europe/Berlin`) the `hh:mm` times of policy schedules and
    /// policy tests are in. Required when a policy has a schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Named groups of nodes, for policies and policy tests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_groups: Vec<NodeGroup>,
    /// Statements about the policies that must hold (checked by `sidenetctl validate` and at
    /// every load; a failing one refuses the manifest set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_tests: Vec<PolicyTest>,
    /// How long a signed config stays valid, in seconds (default 30 days). The controller
    /// re-signs configs before they expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_validity_seconds: Option<u64>,
    /// Staged, health-gated rollout of changes to this spec (docs/rollouts.md). Without it,
    /// every node gets a change at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// The neighbourhood web cache (`docs/content.md`). Off when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<MeshCache>,
    /// When the side-net path to a published service counts as good (`docs/dataplane.md`,
    /// "Handover"); defaults when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<HandoverSpec>,
}

/// Radio settings of a mesh.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RadioSpec {
    /// ISO 3166-1 alpha-2 country code, which sets the regulatory domain (e.g. DE, US, GB): any
    /// country of the Linux wireless-regdb, whose rules the channels and widths must follow.
    #[schemars(regex(pattern = patterns::COUNTRY))]
    pub country: String,
    /// The band the mesh (802.11s) interface uses.
    pub mesh_band: Band,
    /// Channel and width per band. The entry for `meshBand` is required; other entries set the
    /// local access point's channel on routers with a second radio.
    pub channels: BandChannels,
}

/// A wifi band.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum Band {
    /// 2.4 GHz.
    #[serde(rename = "2g")]
    TwoG,
    /// 5 GHz.
    #[serde(rename = "5g")]
    FiveG,
    /// 6 GHz.
    #[serde(rename = "6g")]
    SixG,
}

impl Band {
    /// The band as written in manifests and UCI (`2g`, `5g`, `6g`).
    pub fn as_str(self) -> &'static str {
        match self {
            Band::TwoG => "2g",
            Band::FiveG => "5g",
            Band::SixG => "6g",
        }
    }
}

/// Channel settings per band.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct BandChannels {
    /// 2.4 GHz channel settings.
    #[serde(rename = "2g", default, skip_serializing_if = "Option::is_none")]
    pub two_g: Option<ChannelSpec>,
    /// 5 GHz channel settings.
    #[serde(rename = "5g", default, skip_serializing_if = "Option::is_none")]
    pub five_g: Option<ChannelSpec>,
    /// 6 GHz channel settings.
    #[serde(rename = "6g", default, skip_serializing_if = "Option::is_none")]
    pub six_g: Option<ChannelSpec>,
}

impl BandChannels {
    /// The settings of one band.
    pub fn get(&self, band: Band) -> Option<&ChannelSpec> {
        match band {
            Band::TwoG => self.two_g.as_ref(),
            Band::FiveG => self.five_g.as_ref(),
            Band::SixG => self.six_g.as_ref(),
        }
    }
}

/// A channel and its width.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelSpec {
    /// Primary channel number (e.g. 6 on 2.4 GHz, 36 on 5 GHz).
    #[schemars(range(min = 1, max = 233))]
    pub channel: u32,
    /// Channel width in MHz: 20, 40, 80 or 160.
    #[serde(default = "default_width")]
    pub width: u32,
}

fn default_width() -> u32 {
    20
}

/// Link encryption of the mesh radio.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSpec {
    /// The mesh passphrase (WPA3-SAE), by reference to a Secret. In standalone mode the Secret
    /// may be a manifest in the folder; if it does not exist, a random passphrase is generated
    /// and kept in the state folder.
    pub passphrase_secret_ref: SecretKeyRef,
    /// A scheduled passphrase change. Until `switchAt`, every node keeps its mesh point on the
    /// current passphrase and runs a second one with the next passphrase, so nodes that already
    /// switched and nodes that have not always share one; from `switchAt` on, configs carry only
    /// the next passphrase. Then point `passphraseSecretRef` at the next Secret and remove this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<PassphraseRotation>,
}

/// A scheduled change of the mesh passphrase.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PassphraseRotation {
    /// The next passphrase, by reference to a Secret.
    pub next_passphrase_secret_ref: SecretKeyRef,
    /// When nodes switch to it: RFC 3339 in UTC, e.g. `2026-12-01T03:00:00Z`. Leave the overlap
    /// long enough for every node to get its overlap config first (offline nodes that miss it
    /// rejoin the radio mesh once they get their new config over their uplink).
    pub switch_at: String,
}

/// A key in a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(regex(pattern = patterns::SUBDOMAIN), length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(regex(pattern = patterns::SECRET_KEY), length(min = 1, max = 253))]
    pub key: String,
}

/// Routing protocol settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingSpec {
    /// Routing protocol.
    #[serde(default)]
    pub protocol: RoutingProtocol,
    /// Babel hello interval in seconds (default 4).
    #[serde(default = "default_hello")]
    #[schemars(range(min = 1, max = 60))]
    pub hello_interval: u32,
}

impl Default for RoutingSpec {
    fn default() -> Self {
        Self {
            protocol: RoutingProtocol::default(),
            hello_interval: default_hello(),
        }
    }
}

fn default_hello() -> u32 {
    4
}

/// A routing protocol. Babel is the only one: batman-adv was removed because it validated but
/// could not work (no `bat0` on Linux nodes, no route for the mesh prefix on OpenWrt); manifests
/// that still ask for it get a validation error saying so.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingProtocol {
    /// Babel (RFC 8966), run by babeld over one WireGuard link per neighbour.
    #[default]
    Babel,
}

/// How new nodes are admitted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentSpec {
    /// `auto`: any node that proves its key joins. `approval`: nodes wait until an admin
    /// approves them. `token`: nodes must present a valid single-use token.
    #[serde(default)]
    pub mode: EnrollmentMode,
}

/// Enrolment mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EnrollmentMode {
    /// Any node that proves its key is enrolled.
    Auto,
    /// Nodes wait as pending until approved.
    #[default]
    Approval,
    /// Nodes must present a valid single-use token.
    Token,
}

impl EnrollmentMode {
    /// As written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Approval => "approval",
            Self::Token => "token",
        }
    }
}

/// Observed state of a mesh.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// Conditions (`Ready`, `Degraded`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The mesh public key (base64) agents pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Enrolled nodes.
    #[serde(default)]
    pub nodes: u32,
    /// Kubernetes mode: the controller's state epoch, the first part of every revision it
    /// publishes. Kept here so a restarted controller continues the same revision sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_epoch: Option<u64>,
    /// Kubernetes mode: the highest revision counter published to any node of this mesh in
    /// `stateEpoch`. A node without a recorded revision (new, or its MeshNode was recreated)
    /// starts above it, so an agent that kept an older config never sees a revision reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest_revision: Option<u64>,
    /// Kubernetes mode: the staged rollout of this Mesh's spec (`spec.rollout`,
    /// docs/rollouts.md). Written before the configs it causes are published, read back by a
    /// restarted controller or a new leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<MeshRolloutStatus>,
}

/// The staged rollout of a Mesh, in its status (Kubernetes mode).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshRolloutStatus {
    /// The rollout id: SHA-256 (hex) of the spec being rolled out; absent before the first
    /// rollout of this Mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `Progressing`, `Paused`, `Halted`, `Aborted` or `Complete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The wave being handed out (0: the canary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    /// Number of waves, the canary included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<u32>,
    /// Failed nodes, each as `NODE_ID: WHY`, by node id.
    #[serde(default)]
    pub failed: Vec<String>,
    /// The controller's record of the rollout as JSON text (last good spec, plan, progress,
    /// reached and gating nodes; docs/rollouts.md, "Surviving a restart"). Not for editing.
    #[serde(default)]
    pub state: String,
}

/// A status condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type (e.g. `Ready`).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason, CamelCase.
    #[serde(default)]
    pub reason: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// Generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// MeshNode
// ---------------------------------------------------------------------------------------------

/// One router or dongle host in a mesh.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sidenet.io",
    version = "v1alpha1",
    kind = "MeshNode",
    namespaced,
    status = "MeshNodeStatus",
    shortname = "mn",
    doc = "A node of a mesh: identity, hardware profile, role, approval and per-node overrides.",
    printcolumn(name = "Mesh", type_ = "string", json_path = ".spec.mesh"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeId"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Applied",
        type_ = "integer",
        json_path = ".status.appliedRevision"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredRevision"
    ),
    printcolumn(name = "Last Seen", type_ = "date", json_path = ".status.lastSeen"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeSpec {
    /// Name of the Mesh this node belongs to (its `metadata.name`).
    #[schemars(regex(pattern = patterns::SUBDOMAIN), length(min = 1, max = 253))]
    pub mesh: String,
    /// Node id: derived from the node's public key (16 base32 characters). Shown by the agent
    /// at start and in enrolment requests.
    #[schemars(regex(pattern = patterns::LABEL), length(min = 1, max = 63))]
    pub node_id: String,
    /// The node's ed25519 public key (base64). Learnt at enrolment when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Name of the HardwareProfile of this device. When omitted, the profile is matched from the
    /// board name the node reports at enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = patterns::SUBDOMAIN), length(min = 1, max = 253))]
    pub hardware_profile: Option<String>,
    /// Role of the node.
    #[serde(default)]
    pub role: NodeRole,
    /// Whether the node may receive configs (approval mode). Ignored in auto mode.
    #[serde(default)]
    pub approved: bool,
    /// Per-node overrides of mesh settings.
    #[serde(default)]
    pub overrides: NodeOverrides,
    /// This node's part in the neighbourhood web cache: turn it off, restrict it to public
    /// content, give its LAN addresses (`docs/content.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<NodeCache>,
    /// Services this node publishes: its own internet addresses that the other nodes reach over
    /// the side-net while the path is good, else over the internet (`docs/dataplane.md`,
    /// "Handover").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub services: Vec<PublishedService>,
    /// The node's name in DNS, one label: the node is `DNSNAME.MESH.sidenet.arpa` and its
    /// services `SERVICE.DNSNAME.MESH.sidenet.arpa` (`docs/dataplane.md`, "Names"). Default:
    /// `metadata.name`, when that is one DNS label (no dots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = patterns::LABEL), length(min = 1, max = 63))]
    pub dns_name: Option<String>,
}

/// Role of a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// A router with a mesh radio (and an access point where it has two radios).
    #[default]
    Router,
    /// A host with a USB wifi dongle.
    Dongle,
    /// A node with an uplink that may act as the mesh gateway.
    Gateway,
}

impl NodeRole {
    /// As written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Router => "router",
            Self::Dongle => "dongle",
            Self::Gateway => "gateway",
        }
    }
}

/// Per-node overrides. Precedence: profile defaults, then mesh, then these.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeOverrides {
    /// Mesh radio channel for this node (must be supported by its radio and allowed, at the
    /// mesh's width, in the mesh's country).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<u32>,
    /// Mesh radio transmit power in dBm (at most the radio's maximum and the country's EIRP limit
    /// for the channel; antenna gain is not added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_power: Option<u32>,
    /// Hostname (a DNS label). Defaults to the MeshNode name or the name the node reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = patterns::LABEL), length(min = 1, max = 63))]
    pub hostname: Option<String>,
    /// The node's internet uplink interfaces (Linux interface names, e.g. `eth0` or `wlan0`).
    /// Used only by the `linux` backend of a gateway (an `allowInternet` policy naming the
    /// node): side-net traffic is forwarded and masqueraded only out of these. Defaults to the
    /// HardwareProfile's ethernet ports with role `wan`. OpenWrt uses its `wan` zone instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        inner(regex(pattern = patterns::IFNAME), length(min = 1, max = 15))
    )]
    pub uplinks: Vec<String>,
}

/// Observed state of a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeStatus {
    /// `Pending` (awaiting approval), `Enrolled`, `Configuring`, `Ready`, `Failed`, `Offline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Revision the controller wants the node to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_revision: Option<u64>,
    /// Revision the node reports running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<u64>,
    /// When the node last reported (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Addresses allocated to the node.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Conditions (`Enrolled`, `Approved`, `ConfigApplied`, `Drifted`, `Degraded`, `Ready`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation of the MeshNode the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Epoch of `desiredRevision` (Kubernetes mode keeps the revision sequence here, written
    /// before each config is published).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_epoch: Option<u64>,
    /// SHA-256 of the body of the desired config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// Issued-at time (Unix seconds) in the header of the desired config's envelope.
    /// Kubernetes mode: with `desiredEpoch`, `desiredRevision`, `configSha256` and
    /// `configExpiresAt` it lets a restarted controller prove that a node's config is unchanged
    /// (and re-sign the same envelope byte for byte) instead of publishing a new revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_issued_at: Option<u64>,
    /// Expiry time (Unix seconds) in the header of the desired config's envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_expires_at: Option<u64>,
    /// Kubernetes mode with the embedded broker only: the exact signed envelope of the desired
    /// config (standard base64), written with `desiredRevision` before the config is published.
    /// The embedded broker's retained configs die with the controller's process; a restarted
    /// controller republishes these bytes unchanged (same revision, no new signature) when the
    /// node's config has not changed. Its secrets are sealed to the node's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_envelope: Option<String>,
    /// The node's /64 within the mesh prefix (its subnet id), kept so it survives controller
    /// restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<u16>,
    /// Hostname the node reported at enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_hostname: Option<String>,
    /// The public key (base64) the node enrolled with, kept so that a restarted controller
    /// can seal the node's secrets without a new enrolment when `spec.publicKey` is omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_key: Option<String>,
    /// The node logs in to the broker with its own password (it said so in a signed status
    /// report): the broker refuses its id without it. Kept so a restarted controller insists
    /// at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub broker_login: bool,
    /// The node's WireGuard links as it last reported them: babel's view and the pathfinder
    /// probes' latency and loss.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkStatus>,
    /// Handover: the path this node uses for each service another node publishes, as it last
    /// reported (`docs/dataplane.md`, "Handover").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServicePathStatus>,
}

/// The path a node uses for one published service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePathStatus {
    /// The service's name.
    pub name: String,
    /// Node id of its owner.
    pub owner: String,
    /// `side-net` or `internet`.
    pub via: String,
    /// When the path last changed (RFC 3339).
    pub since: String,
    /// The probe figures that decided it.
    pub why: String,
}

/// One WireGuard link of a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// Node id of the neighbour at the other end.
    pub peer: String,
    /// The local WireGuard interface.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface: String,
    /// Whether babel sees the neighbour on this link now.
    pub up: bool,
    /// Babel's cost of the link (65535: unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u32>,
    /// Median round-trip time of the recent probes over the link, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Fraction of the recent probes over the link that got no answer (0 to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// HardwareProfile
// ---------------------------------------------------------------------------------------------

/// The facts of one device model.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sidenet.io",
    version = "v1alpha1",
    kind = "HardwareProfile",
    shortname = "hwp",
    doc = "A device model: board names, firmware family, CPU, radios with their channels and power, ports, flash and RAM.",
    printcolumn(name = "Vendor", type_ = "string", json_path = ".spec.vendor"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Firmware", type_ = "string", json_path = ".spec.firmware"),
    printcolumn(name = "Arch", type_ = "string", json_path = ".spec.cpuArch")
)]
#[serde(rename_all = "camelCase")]
pub struct HardwareProfileSpec {
    /// Manufacturer (e.g. TP-Link).
    pub vendor: String,
    /// Model name including hardware revision (e.g. Archer C7 v2).
    pub model: String,
    /// OpenWrt board names (`ubus call system board` → `board_name`) that identify this device.
    #[serde(default)]
    pub board_names: Vec<String>,
    /// Firmware family, which selects the template set and the agent backend.
    pub firmware: FirmwareFamily,
    /// CPU architecture as `uname -m` prints it (mips, aarch64, armv7l, x86_64).
    pub cpu_arch: String,
    /// OpenWrt package architecture (e.g. mips_24kc), for OpenWrt devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_arch: Option<String>,
    /// Radios.
    #[serde(default)]
    pub radios: Vec<RadioProfile>,
    /// Ethernet ports.
    #[serde(default)]
    pub ethernet: Vec<EthernetPort>,
    /// Flash size in MiB.
    #[schemars(range(min = 1))]
    pub flash_mb: u32,
    /// RAM size in MiB.
    #[schemars(range(min = 1))]
    pub ram_mb: u32,
    /// The storage the device may give the neighbourhood web cache. Devices without it never
    /// run the cache (`docs/content.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStorage>,
}

/// Firmware family.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareFamily {
    /// OpenWrt (UCI configs, procd).
    Openwrt,
    /// Debian-like Linux (iproute2, babeld, systemd).
    Linux,
}

impl HardwareProfileSpec {
    /// The radio that carries the mesh on `band`: the first 802.11s-capable radio on that band.
    pub fn mesh_radio(&self, band: Band) -> Option<&RadioProfile> {
        self.radios
            .iter()
            .find(|r| r.mesh_point && r.bands.contains(&band))
    }
}

impl FirmwareFamily {
    /// As written in manifests and template folder names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openwrt => "openwrt",
            Self::Linux => "linux",
        }
    }
}

/// One radio of a device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RadioProfile {
    /// Radio name (OpenWrt `wifi-device` section, e.g. radio0) or Linux interface (wlan0).
    pub name: String,
    /// Chipset (e.g. Qualcomm Atheros QCA9880).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chip: Option<String>,
    /// Bands the radio can use.
    pub bands: Vec<Band>,
    /// Channels the radio supports (before regulatory limits).
    pub channels: Vec<u32>,
    /// Maximum transmit power in dBm.
    pub max_tx_power: u32,
    /// Supported HT modes (HT20, HT40, VHT80, HE80, ...).
    pub htmodes: Vec<String>,
    /// OpenWrt device path (`option path`), for OpenWrt devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Linux phy name (phy0), for Linux hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phy: Option<String>,
    /// Whether the driver supports 802.11s mesh point mode.
    #[serde(default = "yes")]
    pub mesh_point: bool,
    /// Whether the radio can run radar detection (DFS) with the firmware and kernel the profile
    /// targets. Channels a country's rules mark DFS (in Europe 5250-5350 and 5470-5725 MHz) are
    /// refused on a radio without it. Default false.
    #[serde(default)]
    pub dfs: bool,
}

fn yes() -> bool {
    true
}

/// An ethernet port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EthernetPort {
    /// Interface or switch port name (lan1, wan, eth0).
    pub name: String,
    /// `wan` (uplink) or `lan`.
    pub role: PortRole,
    /// Speed in Mbit/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_mbps: Option<u32>,
}

/// Role of an ethernet port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PortRole {
    /// Uplink to the internet.
    Wan,
    /// Local network.
    Lan,
}

// ---------------------------------------------------------------------------------------------
// Generated artefacts
// ---------------------------------------------------------------------------------------------

/// The kinds this crate defines, with the file name of their generated CRD.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    let mut out = vec![
        ("mesh.yaml", Mesh::crd()),
        ("meshnode.yaml", MeshNode::crd()),
        ("hardwareprofile.yaml", HardwareProfile::crd()),
        ("nodeprovision.yaml", NodeProvision::crd()),
    ];
    for (_, crd) in &mut out {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
                && let Ok(mut v) = serde_json::to_value(&*schema)
            {
                bound_integers(&mut v);
                if let Ok(bounded) = serde_json::from_value(v) {
                    *schema = bounded;
                }
            }
        }
    }
    out
}

/// Patterns the CRD schemas carry for the API server (admission refuses a non-matching object;
/// standalone mode leaves them to the controller's own checks, which say more: see
/// [`strict_schema`]). They accept exactly what those checks accept, or more, never less.
pub mod patterns {
    /// A mesh name or node id (`sidenet_wire::names`): lowercase letters, digits and '-', not at
    /// either end.
    pub const LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
    /// A Kubernetes object name (DNS-1123 subdomain), at most 253 characters.
    pub const SUBDOMAIN: &str =
        "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
    /// A key of a Secret's data.
    pub const SECRET_KEY: &str = "^[-._a-zA-Z0-9]+$";
    /// An IPv6 unique local /48: the first group fc00-fdff written with four digits, then groups
    /// of hex digits and colons, then `/48` (the controller checks the rest: a valid address,
    /// no host bits).
    pub const ULA48: &str = "^[fF][cdCD][0-9a-fA-F]{2}(:[0-9a-fA-F]{0,4}){1,7}/48$";
    /// An ISO 3166-1 alpha-2 country code in capitals, or wireless-regdb's world domain `00`.
    pub const COUNTRY: &str = "^([A-Z]{2}|00)$";
    /// A Linux network interface name (at most 15 bytes; no '/', ':', whitespace or quotes).
    pub const IFNAME: &str = "^[A-Za-z0-9][-A-Za-z0-9_.]*$";
}

/// The largest integer every JSON implementation reads exactly (2^53 - 1): the bound of the
/// `u64` fields.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Bounds every integer field by its Rust type, and drops the `uint*` formats.
///
/// API servers know only the `int32` and `int64` formats: they warn about `uint32` ("unrecognized
/// format") and do not enforce it, so without a `maximum` an object with `txPower: 5000000000`
/// is admitted and then cannot be decoded by any client, which stalls every list and watch of
/// the kind. Each unsigned field therefore gets `minimum: 0` and the `maximum` of its type
/// (`u64`: [`MAX_SAFE_INTEGER`]), or keeps a tighter bound its field declares.
fn bound_integers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let max = match map.get("format").and_then(|f| f.as_str()) {
                Some("uint8") => Some(u64::from(u8::MAX)),
                Some("uint16") => Some(u64::from(u16::MAX)),
                Some("uint32") => Some(u64::from(u32::MAX)),
                Some("uint64") => Some(MAX_SAFE_INTEGER),
                _ => None,
            };
            if let Some(max) = max {
                map.remove("format");
                let tighter = |k: &str, bound: f64, lower: bool| {
                    map.get(k)
                        .and_then(|b| b.as_f64())
                        .map_or(bound, |b| if lower { b.max(bound) } else { b.min(bound) })
                };
                #[allow(clippy::cast_precision_loss)]
                let (lo, hi) = (
                    tighter("minimum", 0.0, true),
                    tighter("maximum", max as f64, false),
                );
                map.insert("minimum".into(), serde_json::json!(lo));
                map.insert("maximum".into(), serde_json::json!(hi));
            }
            for child in map.values_mut() {
                bound_integers(child);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

/// The generated CRD YAML documents, file name → contents.
pub fn crd_documents() -> Result<BTreeMap<&'static str, String>, yaml::YamlError> {
    let mut out = BTreeMap::new();
    for (file, crd) in crds() {
        let yaml = yaml::to_string(&crd)?;
        out.insert(
            file,
            format!(
                "# Generated by `cargo run -p sidenet-crds --bin crdgen`. Do not edit.\n{yaml}"
            ),
        );
    }
    Ok(out)
}

/// The openAPIV3Schema of a kind, made strict for client-side validation: every object that
/// lists its properties refuses unknown ones (like `kubectl apply --validate=strict`), so a
/// misspelt field is an error instead of being silently dropped.
pub fn strict_schema(kind: &str) -> Option<serde_json::Value> {
    let crd = crds()
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c.spec.names.kind == kind)?;
    let version = crd.spec.versions.into_iter().next()?;
    let schema = version.schema?.open_api_v3_schema?;
    let mut value = serde_json::to_value(schema).ok()?;
    make_strict(&mut value, true);
    Some(value)
}

fn make_strict(v: &mut serde_json::Value, top: bool) {
    match v {
        serde_json::Value::Object(map) => {
            // Admission-only rules ([`patterns`], CEL): the controller's own checks of the same
            // fields give better messages (file, document, field, what was expected). A field
            // named `pattern` is a property, not a keyword: only strip strings here.
            if map.get("pattern").is_some_and(serde_json::Value::is_string) {
                map.remove("pattern");
                map.remove("minLength");
                map.remove("maxLength");
            }
            map.remove("x-kubernetes-validations");
            let preserve = map
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(|b| b.as_bool())
                .unwrap_or(false);
            if map.contains_key("properties")
                && !map.contains_key("additionalProperties")
                && !preserve
            {
                if top {
                    // metadata is validated by the loader; allow it and apiVersion/kind.
                    if let Some(serde_json::Value::Object(props)) = map.get_mut("properties") {
                        for k in ["metadata", "apiVersion", "kind"] {
                            props.entry(k).or_insert_with(|| serde_json::json!({}));
                        }
                    }
                }
                map.insert(
                    "additionalProperties".into(),
                    serde_json::Value::Bool(false),
                );
            }
            for (k, child) in map.iter_mut() {
                if k == "metadata" {
                    continue;
                }
                make_strict(child, false);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|c| make_strict(c, false)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    /// Every integer field of every CRD, with its path.
    fn integers(v: &serde_json::Value, path: &str, out: &mut Vec<(String, serde_json::Value)>) {
        match v {
            serde_json::Value::Object(map) => {
                if map.get("type") == Some(&serde_json::json!("integer")) {
                    out.push((path.to_string(), v.clone()));
                }
                for (k, c) in map {
                    integers(c, &format!("{path}.{k}"), out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, c) in items.iter().enumerate() {
                    integers(c, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn every_integer_is_bounded_and_no_uint_format_is_left() {
        let mut found = Vec::new();
        for (file, crd) in crds() {
            integers(&serde_json::to_value(&crd).unwrap(), file, &mut found);
        }
        assert!(found.len() > 20, "{found:?}");
        for (path, schema) in &found {
            let format = schema["format"].as_str().unwrap_or("int64");
            assert!(
                format == "int64" || format == "int32",
                "{path}: format {format}"
            );
            if format == "int64" && schema.get("maximum").is_none() {
                // Signed 64-bit fields (observedGeneration) are Kubernetes' own int64, and
                // printer columns are not schemas.
                assert!(
                    path.contains("observedGeneration") || path.contains("PrinterColumns"),
                    "{path}: no maximum"
                );
            }
        }
        let tx = found
            .iter()
            .find(|(p, _)| p.contains("overrides.properties.txPower"))
            .unwrap();
        assert_eq!(tx.1["maximum"], serde_json::json!(4294967295.0));
        assert_eq!(tx.1["minimum"], serde_json::json!(0.0));
        // A field's own tighter bound stays.
        let channel = found
            .iter()
            .find(|(p, _)| p.contains("5g.properties.channel"))
            .unwrap();
        assert_eq!(channel.1["maximum"], serde_json::json!(233.0));
    }

    /// The admission rules are in the CRDs the API server gets, and only there: standalone mode
    /// checks the same fields itself, with messages that name the file and document.
    #[test]
    fn crds_carry_patterns_and_cel_rules_and_the_strict_schema_does_not() {
        let crd = |kind: &str| {
            let c = crds()
                .into_iter()
                .find(|(_, c)| c.spec.names.kind == kind)
                .unwrap()
                .1;
            serde_json::to_value(&c.spec.versions[0].schema).unwrap()["openAPIV3Schema"].clone()
        };
        let mesh = crd("Mesh");
        let spec = &mesh["properties"]["spec"]["properties"];
        assert_eq!(spec["prefix"]["pattern"], patterns::ULA48);
        assert_eq!(
            spec["radio"]["properties"]["country"]["pattern"],
            patterns::COUNTRY
        );
        assert_eq!(spec["networkName"]["pattern"], patterns::LABEL);
        assert_eq!(spec["networkName"]["maxLength"], 32);
        let policy = &spec["policies"]["items"];
        assert!(
            policy["x-kubernetes-validations"][0]["rule"]
                .as_str()
                .unwrap()
                .contains("rateLimit")
        );
        let node = crd("MeshNode");
        let spec = &node["properties"]["spec"]["properties"];
        assert_eq!(spec["nodeId"]["pattern"], patterns::LABEL);
        assert_eq!(
            spec["overrides"]["properties"]["hostname"]["pattern"],
            patterns::LABEL
        );

        let strict = serde_json::to_string(&strict_schema("Mesh").unwrap()).unwrap();
        assert!(!strict.contains("\"pattern\"") && !strict.contains("x-kubernetes-validations"));
        // A property that happens to be called `pattern` would stay (none exists today).
        let mut v =
            serde_json::json!({"properties": {"pattern": {"type": "string", "pattern": "^a$"}}});
        make_strict(&mut v, false);
        assert_eq!(
            v["properties"]["pattern"],
            serde_json::json!({"type": "string"})
        );
    }

    #[test]
    fn the_strict_schema_refuses_an_out_of_range_tx_power() {
        let schema = strict_schema("MeshNode").unwrap();
        let overrides = &schema["properties"]["spec"]["properties"]["overrides"]["properties"];
        assert_eq!(
            overrides["txPower"]["maximum"],
            serde_json::json!(4294967295.0)
        );
    }
}
