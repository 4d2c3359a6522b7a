//! Enrolment requests waiting for an admin, in memory only and bounded.
//!
//! In `approval` mode anyone who can reach the broker can send valid enrolment requests: a key
//! is free to make. An unapproved node therefore gets no durable record and no subnet. Its
//! request waits here until an admin approves it (`sidenetctl approve`, a `MeshNode` with
//! `approved: true`), and only then becomes a [`NodeRecord`]. Per mesh:
//!
//! - at most [`Limits::per_mesh`] nodes wait; a new one beyond that pushes out the one that has
//!   not asked for the longest time (a real agent asks again every 15 s, so it stays while
//!   fewer than `per_mesh` new nodes arrive in 15 s);
//! - new nodes are let in at most [`Limits::per_second`] a second, after a burst of
//!   [`Limits::burst`] (asking again costs nothing): whoever floods the mesh cannot churn the
//!   list faster than that, so a listed node stays listed long enough to be approved;
//! - what was left out or pushed out is counted ([`Counts`]) and logged at most once a minute.
//!
//! Every text a request carries is cut to a few dozen bytes, so a waiting node costs a few
//! hundred bytes of memory, whatever its request held.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use sidenet_wire::Revision;
use sidenet_wire::messages::{EnrollRequest, WireguardInfo};

use crate::reconcile::store::NodeRecord;

/// Bounds of the waiting list of one mesh (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Nodes waiting per mesh.
    pub per_mesh: usize,
    /// New waiting nodes per second and mesh, once the burst is used.
    pub per_second: u64,
    /// New waiting nodes let in at once.
    pub burst: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_mesh: 1000,
            per_second: 10,
            burst: 100,
        }
    }
}

/// What the list did with enrolment requests that did not fit, since the controller started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// New nodes not listed because of the rate limit.
    pub rate_limited: u64,
    /// Listed nodes pushed out by newer ones (the list was full).
    pub evicted: u64,
}

/// Longest hostname, board, profile or backend kept from a request.
const MAX_TEXT: usize = 64;
/// Most WireGuard endpoints kept from a request.
const MAX_ENDPOINTS: usize = 8;
/// Evictions kept for an adapter that deletes what it made for them (Kubernetes mode).
const MAX_EVICTIONS: usize = 4096;
/// Seconds between log lines about requests that did not fit, per mesh.
const LOG_EVERY: u64 = 60;
/// New waiting nodes logged per minute and mesh (the rest at debug level).
pub const ADDED_LOGS: u64 = 20;

fn cut(s: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).collect();
    if s.len() <= MAX_TEXT {
        return s;
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// A node waiting for approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingNode {
    /// Mesh network name.
    pub mesh: String,
    /// Node public key (base64).
    pub public_key: String,
    /// Hostname it reported (cut).
    pub hostname: String,
    /// Board it reported (cut).
    pub board: Option<String>,
    /// Profile it asked for (cut).
    pub profile: Option<String>,
    /// Agent backend (cut).
    pub backend: String,
    /// Agent version (cut).
    pub agent_version: String,
    /// Its WireGuard identity, when the request's was small.
    pub wireguard: Option<WireguardInfo>,
    /// First request, Unix seconds.
    pub first_seen: u64,
    /// Last request, Unix seconds.
    pub last_seen: u64,
    /// Sequence of the last request (replay protection).
    pub last_seq: Revision,
    /// Requests so far.
    pub requests: u64,
    /// Position in the eviction order.
    stamp: u64,
}

impl PendingNode {
    /// The waiting node of a verified request.
    pub fn new(mesh: &str, public_key: &str, req: &EnrollRequest, seq: Revision, now: u64) -> Self {
        let wireguard = req.wireguard.clone().filter(|w| {
            w.public_key.len() <= MAX_TEXT
                && w.endpoints.len() <= MAX_ENDPOINTS
                && w.endpoints.iter().all(|e| e.len() <= MAX_TEXT)
        });
        Self {
            mesh: mesh.to_string(),
            public_key: public_key.to_string(),
            hostname: cut(&req.hostname),
            board: req.board.as_deref().map(cut),
            profile: req.profile.as_deref().map(cut),
            backend: cut(&req.backend),
            agent_version: cut(&req.agent_version),
            wireguard,
            first_seen: now,
            last_seen: now,
            last_seq: seq,
            requests: 1,
            stamp: 0,
        }
    }

    /// The record of this node once it is approved.
    pub fn approved_record(&self) -> NodeRecord {
        NodeRecord {
            mesh: self.mesh.clone(),
            public_key: self.public_key.clone(),
            hostname: self.hostname.clone(),
            board: self.board.clone(),
            profile: self.profile.clone(),
            backend: self.backend.clone(),
            approved: true,
            enrolled_at: self.first_seen,
            last_seen: Some(self.last_seen),
            last_seq: Some(self.last_seq),
            wireguard: self.wireguard.clone(),
            agent_version: Some(self.agent_version.clone()),
            ..NodeRecord::default()
        }
    }
}

/// What [`Pending::offer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// The node was waiting already: its request is refreshed.
    Refreshed,
    /// The node is listed now; `evicted` names the node it pushed out, if the list was full.
    Added {
        /// The node pushed out.
        evicted: Option<String>,
    },
    /// The node is not listed: too many new nodes asked in too short a time.
    RateLimited,
}

#[derive(Debug, Default, Clone)]
struct MeshList {
    nodes: HashMap<String, PendingNode>,
    /// (stamp, node id), oldest request first.
    order: BTreeSet<(u64, String)>,
    tokens: u64,
    refilled_at: u64,
    /// Requests left out and nodes pushed out since the last log line, and when that was.
    unlogged: Counts,
    logged_at: Option<u64>,
    /// New nodes logged in the current minute, and that minute.
    added_logged: (u64, u64),
}

/// The waiting lists of every mesh (see the module docs).
#[derive(Debug, Default, Clone)]
pub struct Pending {
    limits: Limits,
    meshes: BTreeMap<String, MeshList>,
    /// Node id → mesh it waits in.
    mesh_of: HashMap<String, String>,
    stamp: u64,
    /// Totals since start.
    pub counts: Counts,
    /// (mesh, node) pushed out, for an adapter to tidy up after ([`Pending::take_evictions`]).
    evictions: VecDeque<(String, String)>,
}

impl Pending {
    /// Empty lists with these bounds.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// The bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Changes the bounds (already listed nodes beyond a smaller bound leave at their next
    /// eviction).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The waiting node `id`, if any.
    pub fn get(&self, id: &str) -> Option<&PendingNode> {
        let mesh = self.mesh_of.get(id)?;
        self.meshes.get(mesh)?.nodes.get(id)
    }

    /// Nodes waiting in `mesh`.
    pub fn len(&self, mesh: &str) -> usize {
        self.meshes.get(mesh).map_or(0, |m| m.nodes.len())
    }

    /// Nodes waiting in all meshes.
    pub fn total(&self) -> usize {
        self.mesh_of.len()
    }

    /// Whether no node waits.
    pub fn is_empty(&self) -> bool {
        self.mesh_of.is_empty()
    }

    /// Every waiting node, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &PendingNode)> {
        self.meshes.values().flat_map(|m| m.nodes.iter())
    }

    /// Takes node `id` off its list (approved, removed, or its mesh is gone).
    pub fn remove(&mut self, id: &str) -> Option<PendingNode> {
        let mesh = self.mesh_of.remove(id)?;
        let list = self.meshes.get_mut(&mesh)?;
        let node = list.nodes.remove(id)?;
        list.order.remove(&(node.stamp, id.to_string()));
        Some(node)
    }

    /// Lists `node` (a verified request at `now`), subject to the bounds.
    pub fn offer(&mut self, id: &str, mut node: PendingNode, now: u64) -> Offer {
        if self.mesh_of.get(id).is_some_and(|m| *m != node.mesh) {
            // It asks to join another mesh now: it waits there instead.
            self.remove(id);
        }
        self.stamp += 1;
        let stamp = self.stamp;
        let limits = self.limits;
        let list = self
            .meshes
            .entry(node.mesh.clone())
            .or_insert_with(|| MeshList {
                tokens: limits.burst,
                refilled_at: now,
                ..MeshList::default()
            });
        if let Some(old) = list.nodes.get_mut(id) {
            list.order.remove(&(old.stamp, id.to_string()));
            node.first_seen = old.first_seen;
            node.requests = old.requests.saturating_add(1);
            node.stamp = stamp;
            *old = node;
            list.order.insert((stamp, id.to_string()));
            return Offer::Refreshed;
        }
        if now > list.refilled_at {
            let add = (now - list.refilled_at).saturating_mul(limits.per_second);
            list.tokens = list.tokens.saturating_add(add).min(limits.burst);
            list.refilled_at = now;
        }
        if list.tokens == 0 {
            list.unlogged.rate_limited += 1;
            self.counts.rate_limited += 1;
            return Offer::RateLimited;
        }
        list.tokens -= 1;
        let mut evicted = None;
        while list.nodes.len() >= limits.per_mesh.max(1) {
            let Some((_, old)) = list.order.pop_first() else {
                break;
            };
            list.nodes.remove(&old);
            self.mesh_of.remove(&old);
            list.unlogged.evicted += 1;
            self.counts.evicted += 1;
            if self.evictions.len() >= MAX_EVICTIONS {
                self.evictions.pop_front();
            }
            self.evictions.push_back((node.mesh.clone(), old.clone()));
            evicted = Some(old);
        }
        node.stamp = stamp;
        list.order.insert((stamp, id.to_string()));
        self.mesh_of.insert(id.to_string(), node.mesh.clone());
        list.nodes.insert(id.to_string(), node);
        Offer::Added { evicted }
    }

    /// Whether a new waiting node of `mesh` may be logged: at most [`ADDED_LOGS`] a minute.
    pub fn note_added(&mut self, mesh: &str, now: u64) -> bool {
        let Some(list) = self.meshes.get_mut(mesh) else {
            return false;
        };
        let minute = now / 60;
        if list.added_logged.0 != minute {
            list.added_logged = (minute, 0);
        }
        list.added_logged.1 += 1;
        list.added_logged.1 <= ADDED_LOGS
    }

    /// The nodes pushed out since the last call, as (mesh, node id).
    pub fn take_evictions(&mut self) -> Vec<(String, String)> {
        self.evictions.drain(..).collect()
    }

    /// A warning about the requests of `mesh` that did not fit, at most one a minute (with the
    /// counts since the last one); `None` when there is nothing to say yet.
    pub fn overflow_note(&mut self, mesh: &str, now: u64) -> Option<String> {
        let limits = self.limits;
        let list = self.meshes.get_mut(mesh)?;
        let c = list.unlogged;
        if c == Counts::default() || list.logged_at.is_some_and(|t| now < t + LOG_EVERY) {
            return None;
        }
        list.unlogged = Counts::default();
        list.logged_at = Some(now);
        Some(format!(
            "mesh {mesh}: too many unknown nodes ask to join: {} request(s) of new nodes were not listed as pending (at most {} new a second after a burst of {}) and {} pending node(s) were pushed out by newer ones (at most {} pending); {} wait now. An expected node that is not listed can be approved by its id (`sidenetctl approve NODE_ID`; the node's log and `sidenet-agent --show-id` show it)",
            c.rate_limited,
            limits.per_second,
            limits.burst,
            c.evicted,
            limits.per_mesh,
            list.nodes.len()
        ))
    }

    /// Forgets the lists of meshes not in `keep` (network names).
    pub fn retain_meshes(&mut self, keep: &BTreeSet<String>) {
        let gone: Vec<String> = self
            .meshes
            .keys()
            .filter(|m| !keep.contains(*m))
            .cloned()
            .collect();
        for m in gone {
            if let Some(list) = self.meshes.remove(&m) {
                for id in list.nodes.keys() {
                    self.mesh_of.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(mesh: &str, host: &str, now: u64) -> PendingNode {
        PendingNode::new(
            mesh,
            "key",
            &EnrollRequest {
                hostname: host.into(),
                backend: "files".into(),
                agent_version: "0.1.0".into(),
                ..EnrollRequest::default()
            },
            Revision { epoch: 1, rev: 1 },
            now,
        )
    }

    #[test]
    fn new_nodes_are_rate_limited_and_the_list_is_bounded() {
        let mut p = Pending::new(Limits {
            per_mesh: 5,
            per_second: 2,
            burst: 3,
        });
        let t = 1000;
        for i in 0..3 {
            assert_eq!(
                p.offer(&format!("n{i}"), node("m", "h", t), t),
                Offer::Added { evicted: None }
            );
        }
        assert_eq!(p.offer("n3", node("m", "h", t), t), Offer::RateLimited);
        // Asking again is free.
        assert_eq!(p.offer("n0", node("m", "h", t), t), Offer::Refreshed);
        // One second: two more; the list fills up, then pushes out the oldest (n1: n0 asked
        // again since).
        assert!(matches!(
            p.offer("n3", node("m", "h", t + 1), t + 1),
            Offer::Added { .. }
        ));
        assert!(matches!(
            p.offer("n4", node("m", "h", t + 1), t + 1),
            Offer::Added { .. }
        ));
        assert_eq!(p.len("m"), 5);
        assert_eq!(
            p.offer("n5", node("m", "h", t + 2), t + 2),
            Offer::Added {
                evicted: Some("n1".into())
            }
        );
        assert_eq!(p.len("m"), 5);
        assert!(p.get("n0").is_some() && p.get("n1").is_none());
        assert_eq!(
            p.counts,
            Counts {
                rate_limited: 1,
                evicted: 1
            }
        );
        assert_eq!(p.take_evictions(), vec![("m".into(), "n1".into())]);
        let note = p.overflow_note("m", t + 2).unwrap();
        assert!(
            note.contains("1 request(s)") && note.contains("1 pending node(s)"),
            "{note}"
        );
        // At most one line a minute.
        p.offer("n9", node("m", "h", t + 3), t + 3);
        assert!(p.overflow_note("m", t + 3).is_none());
        // Another mesh has its own list.
        assert!(matches!(
            p.offer("x", node("other", "h", t), t),
            Offer::Added { .. }
        ));
        assert_eq!(p.total(), 6);
        let taken = p.remove("n0").unwrap();
        assert_eq!(taken.requests, 2);
        assert!(taken.approved_record().approved);
    }

    #[test]
    fn what_a_request_carries_is_cut() {
        let big = "x".repeat(60_000);
        let mut req = EnrollRequest {
            hostname: big.clone(),
            board: Some(big.clone()),
            profile: Some(big.clone()),
            backend: big.clone(),
            agent_version: big.clone(),
            ..EnrollRequest::default()
        };
        req.wireguard = Some(WireguardInfo {
            public_key: "k".into(),
            endpoints: vec!["10.0.0.1/24".into(); 1000],
            heard: Vec::new(),
        });
        let n = PendingNode::new("m", "key", &req, Revision { epoch: 1, rev: 1 }, 0);
        assert_eq!(n.hostname.len(), MAX_TEXT);
        assert_eq!(n.board.as_deref().map(str::len), Some(MAX_TEXT));
        assert!(n.wireguard.is_none());
    }
}
