//! The policy part of a [`crate::Mesh`]: rate limits with time windows, per-path limits,
//! allow/deny rules between node groups, node groups, and the policy tests that must hold.
//!
//! What each field means and how policies combine (the precedence) is described in
//! `docs/policies.md`; the controller's checks are in `controller/src/spec/policy/`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One mesh policy. Its `type` says which of the other fields it takes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.type == 'rateLimit' ? has(self.rateKbit) : !has(self.rateKbit)",
    "message": "rateKbit is required for type rateLimit and allowed only there"
}]))]
pub struct Policy {
    /// Policy type: `noInternet` (never forward side-net traffic to an internet uplink),
    /// `allowInternet` (nodes listed in `nodes` may forward it to their uplink), `rateLimit`
    /// (shape a node's side-net traffic to `rateKbit`), `allow` or `deny` (connections from the
    /// `from` nodes to the `to` nodes).
    #[serde(rename = "type")]
    pub type_: PolicyType,
    /// A name for explanations, the node's status and `sidenetctl explain` (letters, digits and
    /// '-'). Required for a policy with a `schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `allowInternet`, `noInternet`, `rateLimit`: the nodes (MeshNode names or node ids) the
    /// policy applies to. With `groups` also empty: every node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = crate::patterns::SUBDOMAIN), length(min = 1, max = 253)))]
    pub nodes: Vec<String>,
    /// `rateLimit`: node groups (`spec.nodeGroups`) whose nodes the policy applies to, besides
    /// `nodes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// `rateLimit`: the rate in kbit/s (1000 bit/s) the node's traffic is shaped to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64))]
    pub rate_kbit: Option<u64>,
    /// `rateLimit`: `egress` (what the node sends into the side-net, the default) or `ingress`
    /// (what it receives from the side-net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// `rateLimit`: whose traffic counts: `own` (the node's and its LAN's, the default),
    /// `relayed` (traffic the node only forwards between two neighbours) or `all` (both,
    /// sharing one budget). A node's budget never throttles relayed traffic unless a policy says
    /// `relayed` or `all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// `rateLimit`: a per-path limit: only the traffic between the node and these nodes (egress:
    /// sent toward them; ingress: received from them) counts, sharing `rateKbit`. Without it the
    /// policy is the node's budget for all its side-net traffic of that direction and scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toward: Option<NodeSelector>,
    /// `rateLimit`: the windows in which the policy applies, in the Mesh's `timeZone`. Without
    /// windows it always applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<Window>,
    /// `allow`, `deny`: the nodes that open the connections. Omitted: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<NodeSelector>,
    /// `allow`, `deny`: the nodes the connections go to. Omitted: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<NodeSelector>,
    /// `allow`, `deny`: `tcp`, `udp` or `any` (the default: both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// `allow`, `deny`: destination ports: numbers (`22`) or ranges (`"8000-8080"`). Omitted:
    /// every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "ports_schema")]
    pub ports: Vec<PortSpec>,
}

impl Policy {
    /// A policy of `type_` with every other field left out.
    pub fn new(type_: PolicyType) -> Self {
        Self {
            type_,
            name: None,
            nodes: Vec::new(),
            groups: Vec::new(),
            rate_kbit: None,
            direction: None,
            scope: None,
            toward: None,
            schedule: Vec::new(),
            from: None,
            to: None,
            protocol: None,
            ports: Vec::new(),
        }
    }
}

/// Policy types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PolicyType {
    /// Never forward side-net traffic to an internet uplink (the default).
    NoInternet,
    /// Let the listed gateway nodes forward side-net traffic to their uplink.
    AllowInternet,
    /// Shape a node's side-net traffic (a budget, or a per-path limit with `toward`), at all
    /// times or in the windows of its `schedule`.
    RateLimit,
    /// Let the `from` nodes open connections to the `to` nodes.
    Allow,
    /// Refuse connections from the `from` nodes to the `to` nodes.
    Deny,
}

impl PolicyType {
    /// As written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoInternet => "noInternet",
            Self::AllowInternet => "allowInternet",
            Self::RateLimit => "rateLimit",
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// Direction of shaped traffic, seen from the node that carries the policy.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// What the node sends into the side-net.
    Egress,
    /// What the node receives from the side-net.
    Ingress,
}

impl Direction {
    /// As written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        }
    }
}

/// Whose traffic a rate policy counts.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The node's own traffic and its LAN's (the default).
    Own,
    /// Traffic the node forwards between two of its side-net links.
    Relayed,
    /// Both, in one shared budget.
    All,
}

impl Scope {
    /// As written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Own => "own",
            Self::Relayed => "relayed",
            Self::All => "all",
        }
    }
}

/// Transport protocol of an allow/deny rule or a policy test.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// TCP and UDP.
    Any,
}

impl Protocol {
    /// As written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Any => "any",
        }
    }
}

/// A destination port (`22`) or an inclusive range (`"8000-8080"`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortSpec {
    /// One port.
    Number(u64),
    /// A port or a range as text.
    Text(String),
}

fn ports_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {
            "x-kubernetes-int-or-string": true,
            "description": "A port number (22) or an inclusive range (\"8000-8080\")."
        }
    })
}

/// Which nodes: the union of the listed nodes, the members of the listed groups and the nodes
/// whose MeshNode carries all of `matchLabels`. An empty selector selects every node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelector {
    /// MeshNode names or node ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Names of node groups (`spec.nodeGroups`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// MeshNode labels (`metadata.labels`) a node must all carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl NodeSelector {
    /// Whether it names nothing (and so selects every node).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.groups.is_empty() && self.match_labels.is_empty()
    }
}

/// A named group of nodes, for policies and policy tests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeGroup {
    /// Group name (letters, digits and '-').
    pub name: String,
    /// MeshNode names or node ids in the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// MeshNodes carrying all of these labels are in the group.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// A weekly time window in the Mesh's time zone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Window {
    /// The days the window starts on (`mon` … `sun`). Omitted: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Day>,
    /// Local start time, `hh:mm` (24-hour clock).
    pub start: String,
    /// Local end time, `hh:mm`, or `24:00`. An end before the start runs past midnight into
    /// the next day.
    pub end: String,
}

/// A day of the week.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Day {
    /// Every day, Monday first.
    pub const ALL: [Day; 7] = [
        Day::Mon,
        Day::Tue,
        Day::Wed,
        Day::Thu,
        Day::Fri,
        Day::Sat,
        Day::Sun,
    ];

    /// Monday = 0 … Sunday = 6.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// As written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Day::Mon => "mon",
            Day::Tue => "tue",
            Day::Wed => "wed",
            Day::Thu => "thu",
            Day::Fri => "fri",
            Day::Sat => "sat",
            Day::Sun => "sun",
        }
    }
}

/// A statement about the policies that must hold, checked at every load (like the tests of a
/// Tailscale policy file): a failing test refuses the manifest set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTest {
    /// What the test is about, shown when it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The node that opens the connection (MeshNode name or node id).
    pub from: String,
    /// The node it connects to.
    pub to: String,
    /// `tcp` (the default) or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Destination port (1-65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
    /// When: a day and local time in the Mesh's time zone (`tue 23:30`), or an RFC 3339 UTC
    /// time (`2026-12-01T22:30:00Z`). Omitted: the test must hold at every time of the week.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// What must come out.
    pub expect: PolicyExpectation,
}

/// The expected outcome of a policy test.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyExpectation {
    /// Whether the connection is allowed.
    pub allowed: bool,
    /// The rate in kbit/s the traffic from `from` to `to` is held to (the smallest of the
    /// limits that apply on both nodes at that time). Omitted: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_kbit: Option<u64>,
    /// `true`: no rate limit applies to that traffic at that time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unlimited: bool,
}
