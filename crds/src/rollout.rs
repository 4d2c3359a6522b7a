//! `Mesh.spec.rollout`: how a change of the Mesh spec spreads over its nodes (docs/rollouts.md).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A staged, health-gated rollout of Mesh spec changes: the canary first, then waves of the
/// other nodes by cumulative percentage. A wave counts as done when its nodes run the new
/// revision and are healthy; it then bakes `bakeSeconds` before the next wave starts. More
/// failed nodes than `failureBudget` halt the rollout: nodes that got the new revision get the
/// last good content again (as a new revision), the others never get it. Without `rollout`,
/// every node gets a change at once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The first wave. Exactly one of `nodes`, `count` and `percent`.
    pub canary: CanarySpec,
    /// Cumulative percentages of the other nodes, strictly increasing, each 1 to 100 (e.g.
    /// `[25, 50, 100]`); a final 100 is implied. Default `[100]`: one wave after the canary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub waves: Vec<u8>,
    /// Seconds a wave must stay healthy before the next one starts (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 604800))]
    pub bake_seconds: Option<u64>,
    /// Failed nodes tolerated over the whole rollout (default 0): one more halts it.
    #[serde(default)]
    #[schemars(range(max = 100000))]
    pub failure_budget: u32,
    /// A node that is not healthy this many seconds after it got the new revision counts as
    /// failed (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub progress_deadline_seconds: Option<u64>,
    /// Probe thresholds a healthy node stays within.
    #[serde(default)]
    pub health: RolloutHealth,
}

/// The canary: by name, or a count or percentage of the nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    /// MeshNode names or node ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub nodes: Vec<String>,
    /// This many nodes (the lowest places of the rollout's order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub count: Option<u32>,
    /// This percentage of the nodes, rounded up, at least one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: Option<u8>,
}

/// Probe thresholds of a healthy node during a rollout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutHealth {
    /// Highest probe loss, in percent, of any probe target the node reports (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_probe_loss_percent: Option<u8>,
    /// Highest median probe round-trip time, in milliseconds (default: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_probe_rtt_ms: Option<u32>,
}
