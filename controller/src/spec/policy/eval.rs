//! What the policies of one mesh say about traffic from one node to another: which allow/deny
//! policy decides, and which rate limits hold it at a minute of the week. The precedence rules
//! are in `docs/policies.md`; [`crate::spec::policy::tests`] and `sidenetctl explain` use this.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use sidenet_crds::{
    Direction, Mesh, MeshNode, NodeSelector, Policy, PolicyType, PortSpec, Protocol, Scope,
};

use crate::spec::policy::schedule::{WEEK, inside, time_zone, window_minutes};

/// A node as policies see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: String,
    /// MeshNode name (the node id when there is no MeshNode).
    pub name: String,
    /// MeshNode labels.
    pub labels: BTreeMap<String, String>,
}

impl Member {
    /// The member of a MeshNode.
    pub fn of(n: &MeshNode) -> Self {
        Member {
            id: n.spec.node_id.clone(),
            name: n
                .metadata
                .name
                .clone()
                .unwrap_or_else(|| n.spec.node_id.clone()),
            labels: n.metadata.labels.clone().unwrap_or_default(),
        }
    }

    /// Whether `n` (a MeshNode name or node id) names this node.
    pub fn is(&self, n: &str) -> bool {
        self.id == n || self.name == n
    }
}

/// One limit that holds some traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Index in `spec.policies`.
    pub policy: usize,
    /// The node that carries it.
    pub node: String,
    /// Its direction there.
    pub direction: Direction,
    /// Its rate, kbit/s.
    pub rate_kbit: u64,
}

/// A rate policy that applies to the traffic but is not in force at that minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idle {
    /// Index in `spec.policies`.
    pub policy: usize,
    /// The node that carries it.
    pub node: String,
    /// Why it does not count: outside its windows, or a window of the same slot overrides it.
    pub why: &'static str,
}

/// The answer about one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the connection is allowed.
    pub allowed: bool,
    /// The allow/deny policy that decided (index in `spec.policies`); none: the default (denied:
    /// a node refuses what no allow rule lets in).
    pub decided_by: Option<usize>,
    /// The limits in force; the traffic is held to the smallest.
    pub limits: Vec<Limit>,
    /// Rate policies that apply to the traffic but are not in force at that minute.
    pub idle: Vec<Idle>,
}

impl Verdict {
    /// The rate the traffic is held to, kbit/s (none: unlimited).
    pub fn rate_kbit(&self) -> Option<u64> {
        self.limits.iter().map(|l| l.rate_kbit).min()
    }
}

/// The policies of one mesh, resolved against its nodes.
#[derive(Debug, Clone)]
pub struct MeshPolicies<'a> {
    /// The mesh.
    pub mesh: &'a Mesh,
    /// Its nodes.
    pub members: Vec<Member>,
    /// Its time zone (UTC when none is set).
    pub tz: TimeZone,
    /// Per policy: the minute-of-week intervals of its windows (empty: no schedule).
    pub weekly: Vec<Vec<(u32, u32)>>,
}

impl<'a> MeshPolicies<'a> {
    /// Resolves `mesh`'s policies for `members`. Windows that do not parse count as none (the
    /// checks report them).
    pub fn new(mesh: &'a Mesh, members: Vec<Member>) -> Self {
        let tz = mesh
            .spec
            .time_zone
            .as_deref()
            .and_then(|z| time_zone(z).ok())
            .unwrap_or(TimeZone::UTC);
        let weekly = mesh
            .spec
            .policies
            .iter()
            .map(|p| {
                p.schedule
                    .iter()
                    .filter_map(|w| window_minutes(w).ok())
                    .flatten()
                    .collect()
            })
            .collect();
        MeshPolicies {
            mesh,
            members,
            tz,
            weekly,
        }
    }

    /// The member named `n` (MeshNode name or node id).
    pub fn find(&self, n: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.is(n))
    }

    /// Whether `m` is in node group `group`.
    pub fn in_group(&self, group: &str, m: &Member) -> bool {
        self.mesh
            .spec
            .node_groups
            .iter()
            .filter(|g| g.name == group)
            .any(|g| {
                g.nodes.iter().any(|n| m.is(n))
                    || (!g.match_labels.is_empty() && labels_match(&g.match_labels, &m.labels))
            })
    }

    /// Whether `sel` selects `m` (an empty selector selects every node).
    pub fn selects(&self, sel: Option<&NodeSelector>, m: &Member) -> bool {
        let Some(sel) = sel else { return true };
        sel.is_empty()
            || sel.nodes.iter().any(|n| m.is(n))
            || sel.groups.iter().any(|g| self.in_group(g, m))
            || (!sel.match_labels.is_empty() && labels_match(&sel.match_labels, &m.labels))
    }

    /// Whether a rate or internet policy applies to node `m` (its `nodes` and `groups`).
    pub fn applies(&self, p: &Policy, m: &Member) -> bool {
        (p.nodes.is_empty() && p.groups.is_empty())
            || p.nodes.iter().any(|n| m.is(n))
            || p.groups.iter().any(|g| self.in_group(g, m))
    }

    /// Whether policy `i` is in force at minute-of-week `minute` (always, without a schedule).
    pub fn active(&self, i: usize, minute: u32) -> bool {
        let p = &self.mesh.spec.policies[i];
        p.schedule.is_empty() || self.weekly.get(i).is_some_and(|w| inside(w, minute))
    }

    /// The allow/deny decision for a connection from `from` to `to`: the first allow or deny
    /// policy in list order that matches decides; when none matches, the connection is refused
    /// (the destination node's default, on every backend: `docs/policies.md`, "Precedence").
    pub fn access(
        &self,
        from: &Member,
        to: &Member,
        protocol: Protocol,
        port: Option<u32>,
    ) -> (bool, Option<usize>) {
        for (i, p) in self.mesh.spec.policies.iter().enumerate() {
            let allow = match p.type_ {
                PolicyType::Allow => true,
                PolicyType::Deny => false,
                _ => continue,
            };
            if self.selects(p.from.as_ref(), from)
                && self.selects(p.to.as_ref(), to)
                && protocol_matches(p.protocol, protocol)
                && ports_match(&p.ports, port)
            {
                return (allow, Some(i));
            }
        }
        (false, None)
    }

    /// The rate policies on `node` for traffic of `direction` between it and `peer` (own
    /// traffic: scope `own` or `all`), and which are in force at `minute`. Policies fall into
    /// slots (same scope and same `toward`); in a slot, a policy whose window is open overrides
    /// the slot's policies without a schedule; the slot holds the traffic to the smallest rate
    /// left, and the traffic is held by every slot it falls in.
    pub fn node_limits(
        &self,
        node: &Member,
        peer: &Member,
        direction: Direction,
        minute: u32,
        limits: &mut Vec<Limit>,
        idle: &mut Vec<Idle>,
    ) {
        let own = |p: &Policy| {
            p.scope.unwrap_or(Scope::Own) != Scope::Relayed && self.selects(p.toward.as_ref(), peer)
        };
        self.slot_limits(node, direction, minute, own, limits, idle);
    }

    /// The rate policies on `node` for traffic it only relays between two other nodes, in
    /// `direction` (relayed traffic both comes in and goes out, so both directions hold it),
    /// and which are in force at `minute`: scope `relayed`, and scope `all` without `toward`
    /// (the classes relayed traffic passes through on the node: `docs/policies.md`, "Linux:
    /// the classes"), in slots as in [`Self::node_limits`].
    pub fn relay_limits(
        &self,
        node: &Member,
        direction: Direction,
        minute: u32,
        limits: &mut Vec<Limit>,
        idle: &mut Vec<Idle>,
    ) {
        let relayed = |p: &Policy| match p.scope.unwrap_or(Scope::Own) {
            Scope::Relayed => true,
            Scope::All => p.toward.is_none(),
            Scope::Own => false,
        };
        self.slot_limits(node, direction, minute, relayed, limits, idle);
    }

    /// The rate policies of `direction` that apply to `node` and that `counts` takes, by slot,
    /// sorted into those in force at `minute` and those not.
    fn slot_limits(
        &self,
        node: &Member,
        direction: Direction,
        minute: u32,
        counts: impl Fn(&Policy) -> bool,
        limits: &mut Vec<Limit>,
        idle: &mut Vec<Idle>,
    ) {
        let mut slots: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, p) in self.mesh.spec.policies.iter().enumerate() {
            if p.type_ != PolicyType::RateLimit
                || p.direction.unwrap_or(Direction::Egress) != direction
                || !self.applies(p, node)
                || !counts(p)
            {
                continue;
            }
            slots.entry(slot_key(p)).or_default().push(i);
        }
        for members in slots.values() {
            let windowed = members.iter().any(|&i| {
                !self.mesh.spec.policies[i].schedule.is_empty() && self.active(i, minute)
            });
            for &i in members {
                let p = &self.mesh.spec.policies[i];
                let why = if !self.active(i, minute) {
                    Some("outside its windows")
                } else if windowed && p.schedule.is_empty() {
                    Some("overridden by an open window of the same slot")
                } else {
                    None
                };
                match why {
                    Some(why) => idle.push(Idle {
                        policy: i,
                        node: node.name.clone(),
                        why,
                    }),
                    None => limits.push(Limit {
                        policy: i,
                        node: node.name.clone(),
                        direction,
                        rate_kbit: p.rate_kbit.unwrap_or(u64::MAX),
                    }),
                }
            }
        }
    }

    /// Everything the policies say about a connection from `from` to `to` at minute-of-week
    /// `minute` (local).
    pub fn verdict(
        &self,
        from: &Member,
        to: &Member,
        protocol: Protocol,
        port: Option<u32>,
        minute: u32,
    ) -> Verdict {
        let (allowed, decided_by) = self.access(from, to, protocol, port);
        let mut limits = Vec::new();
        let mut idle = Vec::new();
        self.node_limits(from, to, Direction::Egress, minute, &mut limits, &mut idle);
        self.node_limits(to, from, Direction::Ingress, minute, &mut limits, &mut idle);
        Verdict {
            allowed,
            decided_by,
            limits,
            idle,
        }
    }

    /// The minutes of the week at which some window opens or closes, with 0, sorted: between
    /// two of them every policy's state is the same.
    pub fn boundaries(&self) -> Vec<u32> {
        let mut b: Vec<u32> = self
            .weekly
            .iter()
            .flatten()
            .flat_map(|&(a, b)| [a, b % WEEK])
            .chain([0])
            .collect();
        b.sort_unstable();
        b.dedup();
        b
    }
}

/// The slot of a rate policy: policies with the same scope and the same `toward` replace one
/// another by their windows; different slots all hold the traffic.
pub fn slot_key(p: &Policy) -> String {
    format!(
        "{}|{}",
        p.scope.unwrap_or(Scope::Own).as_str(),
        p.toward
            .as_ref()
            .map(|t| format!("{:?}|{:?}|{:?}", t.nodes, t.groups, t.match_labels))
            .unwrap_or_default()
    )
}

fn labels_match(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

fn protocol_matches(rule: Option<Protocol>, asked: Protocol) -> bool {
    match rule.unwrap_or(Protocol::Any) {
        Protocol::Any => true,
        r => r == asked || asked == Protocol::Any,
    }
}

/// Parses a port entry: one port or an inclusive range, 1-65535.
pub fn port_range(p: &PortSpec) -> Result<(u32, u32), String> {
    let bad = |s: &str| {
        format!("{s:?} is not a port; expected a number 1-65535 or a range like \"8000-8080\"")
    };
    let one = |s: &str| -> Result<u32, String> {
        match s.trim().parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n),
            _ => Err(bad(s)),
        }
    };
    match p {
        PortSpec::Number(n) if (1..=65535).contains(n) => Ok((*n as u32, *n as u32)),
        PortSpec::Number(n) => Err(bad(&n.to_string())),
        PortSpec::Text(s) => match s.split_once('-') {
            None => one(s).map(|n| (n, n)),
            Some((a, b)) => {
                let (a, b) = (one(a).map_err(|_| bad(s))?, one(b).map_err(|_| bad(s))?);
                if a > b {
                    return Err(format!(
                        "{s:?} is an empty range; write the lower port first (\"{b}-{a}\")"
                    ));
                }
                Ok((a, b))
            }
        },
    }
}

fn ports_match(ports: &[PortSpec], port: Option<u32>) -> bool {
    if ports.is_empty() {
        return true;
    }
    let Some(port) = port else { return false };
    ports
        .iter()
        .filter_map(|p| port_range(p).ok())
        .any(|(a, b)| a <= port && port <= b)
}
