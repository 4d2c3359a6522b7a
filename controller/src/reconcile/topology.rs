//! The mesh as a graph: one snapshot of every node (its /64, revision, phase and health) and
//! every link (babel's cost, the probes' round-trip time and loss), built from the status
//! table alone, so both adapters produce it the same way.
//!
//! The map page (`/api/nodes`), the NetJSON NetworkGraph (`/api/netjson`, [`netjson`]) and
//! the ALTO network and cost maps (RFC 7285, [`crate::reconcile::alto`]) are renderings of a
//! [`Snapshot`]:
//! - a node is named by its node id and carries its mesh and its /64 ([`TopoNode::prefix`]),
//!   the ALTO network map's PID contents;
//! - a link is *directed*: what `source` reports about its neighbour `target` (babel's cost is
//!   per direction, and each end probes the other). Both directions of a WireGuard link are two
//!   links. [`TopoLink::quality`] grades one direction against [`Thresholds`].
//!
//! docs/web.md describes every field.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use serde::{Deserialize, Serialize};
use sidenet_wire::Revision;

use crate::reconcile::model::StatusRow;

/// Babel's infinite cost: the neighbour is unreachable.
pub const BABEL_INFINITY: u32 = 0xFFFF;

/// Limits that grade a link: at or below the first pair it is `good`, at or above the second
/// `bad`, in between `degraded`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Loss up to this fraction is good.
    pub good_loss: f64,
    /// Round-trip time up to this many milliseconds is good.
    pub good_rtt_ms: f64,
    /// Loss from this fraction on is bad.
    pub bad_loss: f64,
    /// Round-trip time from this many milliseconds on is bad.
    pub bad_rtt_ms: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            good_loss: 0.05,
            good_rtt_ms: 50.0,
            bad_loss: 0.2,
            bad_rtt_ms: 200.0,
        }
    }
}

/// How one direction of a link fares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    /// Neither probes nor a babel cost yet.
    Unknown,
    /// Within the good limits.
    Good,
    /// Between the limits.
    Degraded,
    /// Beyond a bad limit, or babel does not see the neighbour, or its cost is infinite.
    Bad,
}

/// How a node fares, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Runs the revision published for it and is online.
    Healthy,
    /// Online, but a new revision is on its way or one of its links is bad.
    Degraded,
    /// Its last config failed and was rolled back, or it is blocked.
    Failed,
    /// Its presence topic says offline.
    Offline,
    /// Not enrolled, or waiting for approval.
    Pending,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopoNode {
    /// Node id.
    pub id: String,
    /// MeshNode name, else hostname, else the first 8 characters of the id.
    pub label: String,
    /// MeshNode name, if any.
    pub name: Option<String>,
    /// Hostname the node reported.
    pub hostname: Option<String>,
    /// Mesh network name.
    pub mesh: String,
    /// The node's side-net address (`::1` of its /64).
    pub address: Option<String>,
    /// The node's /64 out of the mesh /48, e.g. `fd12:3456:789a:1::/64`.
    pub prefix: Option<String>,
    /// Phase, as in `sidenetctl status`.
    pub phase: String,
    /// Why the node is not configured, if it is not.
    pub reason: Option<String>,
    /// One-word health.
    pub health: Health,
    /// Presence.
    pub online: Option<bool>,
    /// Revision published for the node.
    pub desired: Option<Revision>,
    /// Revision the node runs.
    pub applied: Option<Revision>,
    /// Last failure the node reported.
    pub failure: Option<String>,
    /// Last status report, Unix seconds.
    pub last_seen: Option<u64>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Packages the node lacks.
    pub missing: Vec<String>,
    /// Handover state of the node (a hook: no module reports one yet, so always absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<String>,
}

/// One direction of a link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopoLink {
    /// Mesh network name.
    pub mesh: String,
    /// Node id of the reporting end.
    pub source: String,
    /// Node id of the neighbour.
    pub target: String,
    /// The reporting end's WireGuard interface.
    pub interface: String,
    /// Babel sees the neighbour on this link now.
    pub up: bool,
    /// Babel's cost (65535: unreachable); absent when babel does not list the neighbour.
    pub cost: Option<u32>,
    /// Median probe round-trip time, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Lost fraction of the recent probes, 0 to 1.
    pub loss: Option<f64>,
    /// Grade of this direction.
    pub quality: Quality,
}

/// A rollout in progress, as the map shows it. A hook for the rollout engine: the adapters pass
/// them in `web::View::rollouts`; none does yet (`reconcile::rollout` has no running state to
/// read), so the list is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    /// Mesh name (`metadata.name`).
    pub mesh: String,
    /// One line: wave, state, failing nodes ([`crate::reconcile::rollout::Status::summary`]).
    pub summary: String,
}

/// The whole picture at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken, Unix seconds.
    pub generated: u64,
    /// State epoch of the controller (standalone) or 0.
    pub epoch: u64,
    /// Nodes, by node id.
    pub nodes: Vec<TopoNode>,
    /// Links, by source then target; only between nodes of [`Snapshot::nodes`].
    pub links: Vec<TopoLink>,
    /// Current manifest problems, one line each.
    pub manifest_errors: Vec<String>,
    /// Nodes per phase.
    pub phases: BTreeMap<String, u64>,
    /// Rollouts in progress (see [`RolloutView`]).
    pub rollouts: Vec<RolloutView>,
    /// The limits links were graded with.
    pub thresholds: Thresholds,
}

/// Grades one direction of a link.
pub fn grade(
    up: bool,
    cost: Option<u32>,
    rtt_ms: Option<f64>,
    loss: Option<f64>,
    t: &Thresholds,
) -> Quality {
    let probed = rtt_ms.is_some() || loss.is_some();
    if cost.is_none() && !probed {
        return Quality::Unknown;
    }
    let loss = loss.unwrap_or(0.0);
    let infinite = cost.is_some_and(|c| c >= BABEL_INFINITY);
    // A probed neighbour babel does not list is down; so is one that answers no probe.
    if infinite
        || (!up && cost.is_none())
        || loss >= t.bad_loss
        || rtt_ms.is_some_and(|r| r >= t.bad_rtt_ms)
    {
        return Quality::Bad;
    }
    if loss <= t.good_loss && rtt_ms.is_none_or(|r| r <= t.good_rtt_ms) {
        Quality::Good
    } else {
        Quality::Degraded
    }
}

/// The /64 holding `address`.
pub fn prefix64(address: &str) -> Option<String> {
    let a: Ipv6Addr = address.parse().ok()?;
    let net = Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1));
    Some(format!("{net}/64"))
}

fn health(r: &StatusRow, bad_link: bool) -> Health {
    match r.phase.as_str() {
        "Failed" | "Blocked" => Health::Failed,
        "Offline" => Health::Offline,
        "Pending" | "Declared" => Health::Pending,
        "Ready" if !bad_link => Health::Healthy,
        _ => Health::Degraded,
    }
}

/// Builds the snapshot of `rows` (the status table), graded with `t`.
pub fn snapshot(
    rows: &[StatusRow],
    manifest_errors: &[String],
    epoch: u64,
    now: u64,
    t: &Thresholds,
) -> Snapshot {
    let known: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.node.as_str()).collect();
    let mut links = Vec::new();
    let mut nodes = Vec::with_capacity(rows.len());
    let mut phases = BTreeMap::new();
    for r in rows {
        let mut bad_link = false;
        for l in crate::reconcile::health::links(r) {
            if !known.contains(l.peer.as_str()) || l.peer == r.node {
                continue;
            }
            let quality = grade(l.up, l.cost, l.rtt_ms, l.loss, t);
            bad_link |= quality == Quality::Bad;
            links.push(TopoLink {
                mesh: r.mesh.clone(),
                source: r.node.clone(),
                target: l.peer,
                interface: l.interface,
                up: l.up,
                cost: l.cost,
                rtt_ms: l.rtt_ms,
                loss: l.loss,
                quality,
            });
        }
        *phases.entry(r.phase.clone()).or_insert(0) += 1;
        nodes.push(TopoNode {
            id: r.node.clone(),
            label: r
                .name
                .clone()
                .or_else(|| r.hostname.clone())
                .unwrap_or_else(|| r.node.chars().take(8).collect()),
            name: r.name.clone(),
            hostname: r.hostname.clone(),
            mesh: r.mesh.clone(),
            prefix: r.address.as_deref().and_then(prefix64),
            address: r.address.clone(),
            phase: r.phase.clone(),
            reason: r.reason.clone(),
            health: health(r, bad_link),
            online: r.online,
            desired: r.desired,
            applied: r.applied,
            failure: r.failure.clone(),
            last_seen: r.last_seen,
            agent_version: r.agent_version.clone(),
            missing: r.missing.clone(),
            handover: None,
        });
    }
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    links.sort_by(|a, b| (&a.source, &a.target).cmp(&(&b.source, &b.target)));
    Snapshot {
        generated: now,
        epoch,
        nodes,
        links,
        manifest_errors: manifest_errors.to_vec(),
        phases,
        rollouts: Vec::new(),
        thresholds: *t,
    }
}

/// The NetJSON `NetworkGraph` of one mesh of `s` (`metric` is babel's; a link without a babel
/// cost gets 65535). Custom members live in each object's `properties`.
pub fn netjson(s: &Snapshot, mesh: &str) -> serde_json::Value {
    use serde_json::json;
    let nodes: Vec<serde_json::Value> = s
        .nodes
        .iter()
        .filter(|n| n.mesh == mesh)
        .map(|n| {
            let mut v = json!({
                "id": n.id,
                "label": n.label,
                "properties": {
                    "mesh": n.mesh,
                    "prefix": n.prefix,
                    "phase": n.phase,
                    "health": n.health,
                    "online": n.online,
                    "desired_revision": n.desired.map(|r| r.rev),
                    "applied_revision": n.applied.map(|r| r.rev),
                    "revision_epoch": n.applied.or(n.desired).map(|r| r.epoch),
                    "hostname": n.hostname,
                    "reason": n.reason,
                    "failure": n.failure,
                    "last_seen": n.last_seen,
                    "agent_version": n.agent_version,
                },
            });
            if let Some(a) = &n.address {
                v["local_addresses"] = json!([a]);
            }
            v
        })
        .collect();
    let links: Vec<serde_json::Value> = s
        .links
        .iter()
        .filter(|l| l.mesh == mesh)
        .map(|l| {
            let cost = l.cost.unwrap_or(BABEL_INFINITY);
            json!({
                "source": l.source,
                "target": l.target,
                "cost": cost,
                "cost_text": cost_text(l),
                "properties": {
                    "interface": l.interface,
                    "up": l.up,
                    "babel_cost": l.cost,
                    "rtt_ms": l.rtt_ms,
                    "loss": l.loss,
                    "quality": l.quality,
                },
            })
        })
        .collect();
    json!({
        "type": "NetworkGraph",
        "protocol": "babel",
        "version": "RFC 8966",
        "metric": "babel",
        "revision": env!("CARGO_PKG_VERSION"),
        "topology_id": mesh,
        "label": format!("sidenet mesh {mesh}"),
        "nodes": nodes,
        "links": links,
    })
}

/// Every mesh of `s`: one `NetworkGraph` when there is one mesh, else a `NetworkCollection`.
pub fn netjson_all(s: &Snapshot) -> serde_json::Value {
    let meshes: std::collections::BTreeSet<&str> =
        s.nodes.iter().map(|n| n.mesh.as_str()).collect();
    if meshes.len() == 1 {
        return meshes
            .iter()
            .next()
            .map_or(serde_json::Value::Null, |m| netjson(s, m));
    }
    serde_json::json!({
        "type": "NetworkCollection",
        "collection": meshes.iter().map(|m| netjson(s, m)).collect::<Vec<_>>(),
    })
}

fn cost_text(l: &TopoLink) -> String {
    let cost = l
        .cost
        .map_or("no babel cost".to_string(), |c| format!("cost {c}"));
    let rtt = l
        .rtt_ms
        .map_or("rtt -".to_string(), |r| format!("rtt {r:.1} ms"));
    let loss = l
        .loss
        .map_or("loss -".to_string(), |x| format!("loss {:.0}%", x * 100.0));
    format!("{cost}, {rtt}, {loss}")
}

#[cfg(test)]
#[path = "topology_tests.rs"]
mod tests;
