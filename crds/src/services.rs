//! Published services and handover (issue 21, `docs/dataplane.md`, "Handover"): what a MeshNode
//! publishes and the thresholds of its Mesh.
//!
//! A node publishes its own internet-facing addresses (a home server, a game host). Every other
//! node of the mesh routes traffic for them over the side-net while its pathfinder probes to the
//! owner meet the Mesh's thresholds, and over its own internet uplink otherwise.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default: a window with more than this percentage of probes lost is bad.
pub const DEFAULT_LOSS_PERCENT: u32 = 25;
/// Default: a window whose median round-trip time is above this is bad, milliseconds.
pub const DEFAULT_LATENCY_MS: u32 = 150;
/// Default: consecutive good probe rounds before traffic moves to the side-net.
pub const DEFAULT_GOOD_ROUNDS: u32 = 5;
/// Default: consecutive bad probe rounds before traffic moves back to the internet.
pub const DEFAULT_BAD_ROUNDS: u32 = 3;

/// One service a node publishes (`spec.services[]` of a MeshNode).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishedService {
    /// The service's name, unique on the node: lowercase letters, digits and '-'.
    #[schemars(regex(pattern = crate::patterns::LABEL), length(min = 1, max = 63))]
    pub name: String,
    /// Its internet (global unicast) IPv6 addresses or prefixes, e.g. `2001:db8:5::80` (a
    /// /128) or `2001:db8:5::/64`. The owner must have a route for each exactly as written
    /// (an address on one of its interfaces with that prefix length, or a route): that is what
    /// its babeld announces. Not inside the mesh prefix, not IPv4 (the side-net is IPv6).
    #[schemars(length(min = 1, max = 16))]
    pub addresses: Vec<String>,
    /// The ports the side-net may reach (the owner's firewall accepts them from the side-net).
    /// Empty: every port of `protocol`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ports: Vec<u16>,
    /// `tcp`, `udp` or `any` (default `tcp`).
    #[serde(default)]
    pub protocol: ServiceProtocol,
}

/// The transport protocol of a published service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// TCP only.
    #[default]
    Tcp,
    /// UDP only.
    Udp,
    /// TCP and UDP (ports, when given, apply to both).
    Any,
}

impl ServiceProtocol {
    /// As written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Any => "any",
        }
    }
}

/// When a node counts the side-net path to a service's owner as good (`spec.handover` of a Mesh).
/// Every probe interval the agent looks at its last 10 probes to the owner (one round): a round
/// is good when at most `lossPercent` of them were lost and their median round-trip time is at
/// most `latencyMs`. Traffic moves to the side-net after `goodRounds` good rounds in a row and
/// back to the internet after `badRounds` bad rounds in a row.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandoverSpec {
    /// Highest loss of a good round, percent of the last 10 probes (default 25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub loss_percent: Option<u32>,
    /// Highest median round-trip time of a good round, milliseconds (default 150).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub latency_ms: Option<u32>,
    /// Good rounds in a row before a service moves to the side-net (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub good_rounds: Option<u32>,
    /// Bad rounds in a row before a service moves back to the internet (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub bad_rounds: Option<u32>,
}
