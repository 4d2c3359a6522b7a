//! What one node's data plane enforces of the mesh's policies, compiled by the controller so the
//! node needs no policy logic and no time zone database (`docs/policies.md`, "What the nodes
//! enforce"):
//!
//! - [`node_budget`]: the node's plain budget for its own egress (`mesh.rate_kbit` of the
//!   templates);
//! - [`node_policy`]: the node's shaping table (`etc/sidenet/shaping`, read by the agent on Linux
//!   and OpenWrt alike: HTB classes on two ifb devices, their rates for every stretch of the
//!   local week, the UTC offsets of the Mesh's time zone), the nftables rules that put its egress
//!   into those classes (`meta priority`; for Linux's own table and for an OpenWrt fw4 include),
//!   and the allow/deny rules it enforces as the destination.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use sidenet_crds::{Direction, Mesh, Policy, PolicyType, Protocol, Scope};

use crate::spec::policy::eval::{Member, MeshPolicies, port_range, slot_key};
use crate::spec::policy::schedule::{offsets, show_minute};

/// The rate the table writes for a class no limit holds: 10 Gbit/s.
pub const UNLIMITED_KBIT: u64 = 10_000_000;
/// The ifb device that carries the node's side-net egress, and its HTB handle.
pub const EGRESS_IFB: (&str, u32) = ("sneg0", 1);
/// The ifb device that carries the node's side-net ingress, and its HTB handle.
pub const INGRESS_IFB: (&str, u32) = ("snin0", 2);
/// The leaf qdisc a real router runs under each HTB class; the agent falls back to `pfifo`
/// when the kernel has no fq_codel (and says which one it runs in its status).
pub const LEAF: &str = "fq_codel";

/// A mesh node with its /64, as the compiler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The node.
    pub member: Member,
    /// Its /64 (`fd..::/64`).
    pub subnet: String,
}

/// What one node enforces, as the templates see it (`dataplane.policy`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NodePolicy {
    /// The text of `etc/sidenet/shaping` (empty: no class, the file is not rendered).
    pub shaping: String,
    /// nftables rules (in order) of the egress classification chain: each ends in a
    /// `meta priority set` of an HTB class of [`EGRESS_IFB`].
    pub marks: Vec<String>,
    /// The same classification for OpenWrt, where the side-net links are netifd's WireGuard
    /// devices `sidenet_*` (`etc/sidenet/shaping.nft`, included by fw4).
    pub marks_openwrt: Vec<String>,
    /// nftables rules (in order) of the chain `mesh_access`: the allow/deny policies whose `to`
    /// selects this node, first match decides (`accept` or `reject`).
    pub access: Vec<String>,
    /// The same rules, for OpenWrt's fw4 rule sections.
    pub access_rules: Vec<AccessRule>,
}

/// One allow/deny policy with this node as the destination.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AccessRule {
    /// The policy's name, else `policies[I]`.
    pub name: String,
    /// Source prefixes: the /64s of the nodes `from` selects, or the mesh prefix.
    pub from: Vec<String>,
    /// `tcp`, `udp`, or none (any).
    pub protocol: Option<String>,
    /// Destination ports and ranges (`22`, `8000-8080`); empty: every port.
    pub ports: Vec<String>,
    /// Allow (true) or deny.
    pub accept: bool,
}

/// The node's budget for its own side-net egress in kbit/s: the smallest rate of the rateLimit
/// policies that apply to `node` and have no schedule, no `toward`, direction egress (the
/// default) and scope own (the default). None: no such policy.
pub fn node_budget(mesh: &Mesh, node: &Member) -> Option<u64> {
    let mp = MeshPolicies::new(mesh, vec![node.clone()]);
    mesh.spec
        .policies
        .iter()
        .filter(|p| {
            p.type_ == PolicyType::RateLimit
                && p.schedule.is_empty()
                && p.toward.is_none()
                && p.direction.unwrap_or(Direction::Egress) == Direction::Egress
                && p.scope.unwrap_or(Scope::Own) == Scope::Own
                && mp.applies(p, node)
        })
        .filter_map(|p| p.rate_kbit)
        .min()
}

/// One HTB class of the table.
struct Class {
    id: String,
    parent: String,
    leaf: bool,
    name: String,
    /// The slots (policy indices) whose smallest in-force rate is this class's ceiling.
    slots: Vec<Vec<usize>>,
}

/// The rate a slot holds at minute `m` (a policy whose window is open overrides the slot's
/// policies without a schedule; the smallest rate left holds), or none when no policy of the
/// slot is in force.
fn slot_rate(mp: &MeshPolicies<'_>, slot: &[usize], m: u32) -> Option<u64> {
    let p = &mp.mesh.spec.policies;
    let windowed = slot
        .iter()
        .any(|&i| !p[i].schedule.is_empty() && mp.active(i, m));
    slot.iter()
        .filter(|&&i| mp.active(i, m) && !(windowed && p[i].schedule.is_empty()))
        .filter_map(|&i| p[i].rate_kbit)
        .min()
}

/// The classes of one direction on `node` (`major`: the HTB handle), and which other nodes'
/// /64s each per-path leaf holds.
fn classes(
    mp: &MeshPolicies<'_>,
    members: &[Located],
    node: &Member,
    direction: Direction,
    major: u32,
) -> (Vec<Class>, Vec<(String, Vec<String>)>) {
    let mut slots: BTreeMap<String, (Scope, Option<&Policy>, Vec<usize>)> = BTreeMap::new();
    for (i, p) in mp.mesh.spec.policies.iter().enumerate() {
        if p.type_ == PolicyType::RateLimit
            && p.direction.unwrap_or(Direction::Egress) == direction
            && mp.applies(p, node)
        {
            let e = slots.entry(slot_key(p)).or_insert((
                p.scope.unwrap_or(Scope::Own),
                Some(p),
                Vec::new(),
            ));
            e.2.push(i);
        }
    }
    if slots.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let c = |n: u32| format!("{major}:{n}");
    let plain = |scope: Scope| -> Vec<Vec<usize>> {
        slots
            .values()
            .filter(|(s, p, _)| *s == scope && p.is_some_and(|p| p.toward.is_none()))
            .map(|(_, _, v)| v.clone())
            .collect()
    };
    let toward: Vec<(&Policy, &Vec<usize>)> = slots
        .values()
        .filter(|(s, _, _)| *s != Scope::Relayed)
        .filter_map(|(_, p, v)| p.filter(|p| p.toward.is_some()).map(|p| (p, v)))
        .collect();
    let (all, own, relayed) = (plain(Scope::All), plain(Scope::Own), plain(Scope::Relayed));
    let mut out = vec![
        Class {
            id: c(1),
            parent: "root".into(),
            leaf: false,
            name: "all".into(),
            slots: Vec::new(),
        },
        Class {
            id: c(2),
            parent: c(1),
            leaf: false,
            name: "scope-all".into(),
            slots: all,
        },
        Class {
            id: c(3),
            parent: c(2),
            leaf: false,
            name: "own".into(),
            slots: own,
        },
        Class {
            id: c(4),
            parent: c(2),
            leaf: true,
            name: "relayed".into(),
            slots: relayed,
        },
        Class {
            id: c(9),
            parent: c(3),
            leaf: true,
            name: "own-other".into(),
            slots: Vec::new(),
        },
    ];
    // Other nodes grouped by the per-path slots that select them: one leaf per group. (Only
    // when there are per-path slots: the walk over every member, for every node of the mesh,
    // was most of a 10,000-node reconcile.)
    let mut groups: BTreeMap<Vec<usize>, Vec<String>> = BTreeMap::new();
    let others = if toward.is_empty() { &[][..] } else { members };
    for m in others.iter().filter(|m| m.member.id != node.id) {
        let sig: Vec<usize> = toward
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| mp.selects(p.toward.as_ref(), &m.member))
            .map(|(k, _)| k)
            .collect();
        if !sig.is_empty() {
            groups.entry(sig).or_default().push(m.subnet.clone());
        }
    }
    let mut paths = Vec::new();
    for (k, (sig, subnets)) in groups.into_iter().enumerate() {
        let id = c(10 + k as u32);
        let names: Vec<String> = sig
            .iter()
            .map(|&s| {
                let (p, v) = toward[s];
                p.name
                    .clone()
                    .unwrap_or_else(|| format!("policies[{}]", v[0]))
            })
            .collect();
        out.push(Class {
            id: id.clone(),
            parent: c(3),
            leaf: true,
            name: format!("toward:{}", names.join("+")),
            slots: sig.iter().map(|&s| toward[s].1.clone()).collect(),
        });
        paths.push((id, subnets));
    }
    (out, paths)
}

fn ports(p: &Policy) -> Result<Vec<String>, String> {
    p.ports
        .iter()
        .map(|s| {
            port_range(s).map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
        })
        .collect()
}

/// The nftables rule of an allow/deny policy on its destination node.
fn nft_rule(r: &AccessRule) -> String {
    let mut t = format!("ip6 saddr {{ {} }}", r.from.join(", "));
    match (&r.protocol, r.ports.is_empty()) {
        (Some(p), true) => {
            let _ = write!(t, " meta l4proto {p}");
        }
        (Some(p), false) => {
            let _ = write!(t, " meta l4proto {p} th dport {{ {} }}", r.ports.join(", "));
        }
        (None, false) => {
            let _ = write!(
                t,
                " meta l4proto {{ tcp, udp }} th dport {{ {} }}",
                r.ports.join(", ")
            );
        }
        (None, true) => {}
    }
    let verdict = if r.accept {
        "accept"
    } else {
        "reject with icmpx admin-prohibited"
    };
    let name: String = r
        .name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-[]".contains(*c))
        .collect();
    let _ = write!(t, " {verdict} comment \"{name}\"");
    t
}

/// The side-net interfaces of a Linux node, as an nftables set: its address's dummy and the
/// WireGuard links.
pub const LINUX_LINKS: &str = "{ \"sidenet0\", \"sn-*\" }";
/// The side-net interfaces of an OpenWrt node: netifd's WireGuard devices, named after their
/// `sidenet_*` network sections.
pub const OPENWRT_LINKS: &str = "\"sidenet_*\"";

/// Own traffic is classified when some own, all or per-path slot exists.
fn own_shaped(cl: &[Class]) -> bool {
    cl.iter()
        .any(|c| !c.slots.is_empty() && c.name != "relayed")
}

/// Relayed traffic is classified when a relayed or all slot exists: other traffic bypasses the
/// classes (HTB's direct queue).
fn relayed_shaped(cl: &[Class]) -> bool {
    cl.iter()
        .any(|c| !c.slots.is_empty() && (c.name == "relayed" || c.name == "scope-all"))
}

/// The egress classification rules (`meta priority` of an HTB class of [`EGRESS_IFB`]) for a
/// node whose side-net interfaces are `links`: in from one of them is relayed, then the
/// per-path leaves by destination, then the rest of the node's own traffic.
fn marks(eg: &[Class], eg_paths: &[(String, Vec<String>)], links: &str) -> Vec<String> {
    let m = EGRESS_IFB.1;
    let mut out = Vec::new();
    if relayed_shaped(eg) {
        out.push(format!("iifname {links} meta priority set {m}:4 return"));
    } else {
        out.push(format!("iifname {links} return"));
    }
    for (id, subnets) in eg_paths {
        out.push(format!(
            "ip6 daddr {{ {} }} meta priority set {id} return",
            subnets.join(", ")
        ));
    }
    if own_shaped(eg) && eg.iter().any(|c| c.id == format!("{m}:9")) {
        out.push(format!("meta priority set {m}:9"));
    }
    out
}

/// Whether [`node_policy`] reads mesh members other than the node itself: only for an
/// allow/deny policy with `from` (its source addresses) or a rate limit with `toward` (its
/// per-path leaves). When it does not, the reconciler hands it the node alone instead of every
/// member of the mesh, which it would otherwise build for each reconcile: in a standalone
/// enrolment storm (one reconcile per enrolment) that was O(nodes) per enrolment.
pub fn needs_members(mesh: &Mesh) -> bool {
    mesh.spec.policies.iter().any(|p| match p.type_ {
        PolicyType::Allow | PolicyType::Deny => p.from.is_some(),
        PolicyType::RateLimit => p.toward.is_some(),
        _ => false,
    })
}

/// Compiles what node `node_id` enforces: its shaping table and classification rules, and the
/// allow/deny rules for connections to it. `members` are the mesh's nodes with their /64s (the
/// node itself among them); nodes without one cannot be matched and are left out.
///
/// The reconciler compiles this for every node of a mesh, so the work that does not depend on
/// the policies is kept below O(members) per node: a mesh without policies costs nothing, and
/// `members` sorted by node id (as [`crate::reconcile::peers::located`] gives them) are searched
/// by bisection.
pub fn node_policy(mesh: &Mesh, members: &[Located], node_id: &str) -> NodePolicy {
    if mesh.spec.policies.is_empty() {
        return NodePolicy::default();
    }
    // The evaluator's member list serves only name lookups (`MeshPolicies::find`), which
    // nothing here does: it is left empty rather than copied once per node.
    let mp = MeshPolicies::new(mesh, Vec::new());
    let me = match members.binary_search_by(|m| m.member.id.as_str().cmp(node_id)) {
        Ok(i) => members.get(i),
        Err(_) => members.iter().find(|m| m.member.id == node_id),
    };
    let Some(me) = me else {
        return NodePolicy::default();
    };
    let node = &me.member;
    let mut out = NodePolicy::default();

    // Allow/deny: this node is the destination.
    for (i, p) in mesh.spec.policies.iter().enumerate() {
        let accept = match p.type_ {
            PolicyType::Allow => true,
            PolicyType::Deny => false,
            _ => continue,
        };
        if !mp.selects(p.to.as_ref(), node) {
            continue;
        }
        let from: Vec<String> = if p.from.is_none() {
            vec![mesh.spec.prefix.clone()]
        } else {
            members
                .iter()
                .filter(|m| mp.selects(p.from.as_ref(), &m.member))
                .map(|m| m.subnet.clone())
                .collect()
        };
        if from.is_empty() {
            continue;
        }
        let Ok(ports) = ports(p) else { continue };
        let protocol = match p.protocol.unwrap_or(Protocol::Any) {
            Protocol::Tcp => Some("tcp".to_string()),
            Protocol::Udp => Some("udp".to_string()),
            Protocol::Any => None,
        };
        let rule = AccessRule {
            name: p.name.clone().unwrap_or_else(|| format!("policies[{i}]")),
            from,
            protocol,
            ports,
            accept,
        };
        out.access.push(nft_rule(&rule));
        out.access_rules.push(rule);
    }

    let (eg, eg_paths) = classes(&mp, members, node, Direction::Egress, EGRESS_IFB.1);
    let (ing, ing_paths) = classes(&mp, members, node, Direction::Ingress, INGRESS_IFB.1);
    if eg.is_empty() && ing.is_empty() {
        return out;
    }
    if !eg.is_empty() {
        out.marks = marks(&eg, &eg_paths, LINUX_LINKS);
        out.marks_openwrt = marks(&eg, &eg_paths, OPENWRT_LINKS);
    }

    let mut t = String::new();
    let _ = writeln!(
        t,
        "# sidenet shaping for node '{}' ({}): read by the agent (docs/policies.md).",
        node.name, node.id
    );
    let _ = writeln!(t, "leaf {LEAF}");
    for (cl, (dev, major), dir) in [(&eg, EGRESS_IFB, "egress"), (&ing, INGRESS_IFB, "ingress")] {
        if cl.is_empty() {
            continue;
        }
        let _ = writeln!(t, "ifb {dir} {dev} {major}");
        for c in cl.iter() {
            let _ = writeln!(
                t,
                "class {} {} {} {}",
                c.id,
                c.parent,
                if c.leaf { "leaf" } else { "inner" },
                c.name
            );
        }
    }
    // Ingress: u32 filters on the ifb (tc ingress runs before nftables), by addresses.
    if !ing.is_empty() {
        let m = INGRESS_IFB.1;
        for (id, subnets) in &ing_paths {
            for s in subnets {
                let _ = writeln!(t, "filter {id} dst {} src {s}", me.subnet);
            }
        }
        if own_shaped(&ing) {
            let _ = writeln!(t, "filter {m}:9 dst {}", me.subnet);
        }
        if relayed_shaped(&ing) {
            let _ = writeln!(t, "filter {m}:4 dst {}", mesh.spec.prefix);
        }
    }
    for (from, secs) in offsets(&mp.tz) {
        let _ = writeln!(t, "offset {from} {secs}");
    }
    // The rates of every stretch of the local week between two window boundaries.
    let rate = |c: &Class, m: u32| {
        c.slots
            .iter()
            .filter_map(|s| slot_rate(&mp, s, m))
            .min()
            .unwrap_or(UNLIMITED_KBIT)
    };
    let mut last: Option<String> = None;
    for b in mp.boundaries() {
        let mut open: Vec<String> = mesh
            .spec
            .policies
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                p.type_ == PolicyType::RateLimit
                    && !p.schedule.is_empty()
                    && mp.applies(p, node)
                    && mp.active(*i, b)
            })
            .map(|(i, p)| p.name.clone().unwrap_or_else(|| format!("policies[{i}]")))
            .collect();
        open.dedup();
        let rates: Vec<String> = eg
            .iter()
            .chain(ing.iter())
            .filter(|c| c.parent != "root")
            .map(|c| format!("{}={}", c.id, rate(c, b)))
            .collect();
        let body = format!(
            "{} {}",
            if open.is_empty() {
                "-".to_string()
            } else {
                open.join(",")
            },
            rates.join(" ")
        );
        if last.as_deref() == Some(body.as_str()) {
            continue;
        }
        let _ = writeln!(t, "at {b} {body}  # {}", show_minute(b));
        last = Some(body);
    }
    out.shaping = t;
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sidenet_crds::{NodeGroup, NodeSelector, Policy, Window};

    fn mesh(policies: Vec<Policy>) -> Mesh {
        let mut m: Mesh = sidenet_crds::yaml::from_str(
            "apiVersion: sidenet.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  prefix: fd00:1:2::/48\n  radio: {country: DE, meshBand: 5g, channels: {5g: {channel: 36, width: 80}}}\n  encryption: {passphraseSecretRef: {name: s, key: k}}\n",
        )
        .unwrap();
        m.spec.policies = policies;
        m.spec.node_groups = vec![NodeGroup {
            name: "upstairs".into(),
            nodes: vec![],
            match_labels: [("floor".to_string(), "1".to_string())].into(),
        }];
        m
    }

    /// A rate limit of `r` kbit/s, with every other field at its default.
    fn rate(r: u64) -> Policy {
        Policy {
            rate_kbit: Some(r),
            ..Policy::new(PolicyType::RateLimit)
        }
    }

    /// `off-peak`: 50,000 kbit/s from 23:00 to 07:00 every day.
    fn off_peak() -> Policy {
        Policy {
            name: Some("off-peak".into()),
            schedule: vec![Window {
                days: vec![],
                start: "23:00".into(),
                end: "07:00".into(),
            }],
            ..rate(50000)
        }
    }

    fn member(name: &str, floor: &str) -> Member {
        Member {
            id: format!("{name}-id"),
            name: name.into(),
            labels: [("floor".to_string(), floor.to_string())].into(),
        }
    }

    #[test]
    fn budget_counts_only_plain_own_egress_policies_of_the_node() {
        let m = mesh(vec![
            rate(20000),
            Policy {
                groups: vec!["upstairs".into()],
                ..rate(8000)
            },
            Policy {
                name: Some("night".into()),
                schedule: vec![Window {
                    days: vec![],
                    start: "23:00".into(),
                    end: "07:00".into(),
                }],
                ..rate(1000)
            },
            Policy {
                toward: Some(NodeSelector {
                    nodes: vec!["b".into()],
                    ..Default::default()
                }),
                ..rate(1000)
            },
            Policy {
                scope: Some(Scope::Relayed),
                ..rate(1000)
            },
            Policy {
                direction: Some(Direction::Ingress),
                ..rate(1000)
            },
        ]);
        assert_eq!(node_budget(&m, &member("a", "1")), Some(8000));
        assert_eq!(node_budget(&m, &member("a", "0")), Some(20000));
        assert_eq!(node_budget(&mesh(vec![]), &member("a", "0")), None);
        // A policy naming only a group no longer applies to every node.
        let g = mesh(vec![Policy {
            groups: vec!["upstairs".into()],
            ..rate(8000)
        }]);
        assert_eq!(node_budget(&g, &member("a", "0")), None);
    }
    fn located(name: &str, floor: &str, n: u8) -> Located {
        Located {
            member: member(name, floor),
            subnet: format!("fd00:1:2:{n}::/64"),
        }
    }

    #[test]
    fn off_peak_budget_per_path_limit_and_access_rules() {
        let mut m = mesh(vec![
            rate(5000),
            off_peak(),
            Policy {
                name: Some("to-upstairs".into()),
                toward: Some(NodeSelector {
                    groups: vec!["upstairs".into()],
                    ..Default::default()
                }),
                ..rate(2000)
            },
            Policy {
                name: Some("no-ssh".into()),
                to: Some(NodeSelector {
                    nodes: vec!["b".into()],
                    ..Default::default()
                }),
                from: Some(NodeSelector {
                    nodes: vec!["a".into()],
                    ..Default::default()
                }),
                protocol: Some(Protocol::Tcp),
                ports: vec![sidenet_crds::PortSpec::Number(22)],
                ..Policy::new(PolicyType::Deny)
            },
        ]);
        m.spec.time_zone = Some("Europe/Berlin".into());
        let members = vec![
            located("a", "0", 1),
            located("b", "1", 2),
            located("c", "0", 3),
        ];
        let a = node_policy(&m, &members, "a-id");
        let lines: Vec<&str> = a.shaping.lines().collect();
        assert!(lines.contains(&"ifb egress sneg0 1"), "{}", a.shaping);
        assert!(lines.contains(&"class 1:10 1:3 leaf toward:to-upstairs"));
        assert!(lines.contains(&"offset 1704067200 3600"));
        assert!(lines.contains(&"offset 1711846800 7200"));
        // Monday 00:00 is inside the night window (23:00-07:00 every day), 07:00 is not.
        assert!(lines.contains(
            &"at 0 off-peak 1:2=10000000 1:3=50000 1:4=10000000 1:9=10000000 1:10=2000  # mon 00:00"
        ), "{}", a.shaping);
        assert!(lines.contains(
            &"at 420 - 1:2=10000000 1:3=5000 1:4=10000000 1:9=10000000 1:10=2000  # mon 07:00"
        ));
        assert!(!a.shaping.contains("snin0"));
        assert_eq!(
            a.marks,
            [
                "iifname { \"sidenet0\", \"sn-*\" } return",
                "ip6 daddr { fd00:1:2:2::/64 } meta priority set 1:10 return",
                "meta priority set 1:9",
            ]
        );
        assert_eq!(
            a.marks_openwrt,
            [
                "iifname \"sidenet_*\" return",
                "ip6 daddr { fd00:1:2:2::/64 } meta priority set 1:10 return",
                "meta priority set 1:9",
            ]
        );
        assert!(a.access.is_empty());
        let b = node_policy(&m, &members, "b-id");
        assert_eq!(
            b.access,
            [
                "ip6 saddr { fd00:1:2:1::/64 } meta l4proto tcp th dport { 22 } reject with icmpx admin-prohibited comment \"no-ssh\""
            ]
        );
        assert_eq!(
            node_policy(&mesh(vec![]), &members, "a-id"),
            NodePolicy::default()
        );
        assert!(needs_members(&m));
    }

    /// Without `from` or `toward`, a node's policy is the same whether the compiler sees every
    /// member or the node alone (what the reconciler then passes, [`needs_members`]).
    #[test]
    fn without_from_or_toward_the_node_alone_compiles_the_same() {
        let mut m = mesh(vec![
            Policy::new(PolicyType::NoInternet),
            rate(20000),
            off_peak(),
            Policy {
                scope: Some(Scope::Relayed),
                ..rate(1000)
            },
            Policy {
                direction: Some(Direction::Ingress),
                groups: vec!["upstairs".into()],
                ..rate(3000)
            },
            Policy {
                name: Some("no-ssh".into()),
                to: Some(NodeSelector {
                    groups: vec!["upstairs".into()],
                    ..Default::default()
                }),
                protocol: Some(Protocol::Tcp),
                ports: vec![sidenet_crds::PortSpec::Number(22)],
                ..Policy::new(PolicyType::Deny)
            },
        ]);
        m.spec.time_zone = Some("Europe/Berlin".into());
        assert!(!needs_members(&m));
        let members = vec![
            located("a", "0", 1),
            located("b", "1", 2),
            located("c", "0", 3),
        ];
        for (i, id) in ["a-id", "b-id", "c-id"].iter().enumerate() {
            let all = node_policy(&m, &members, id);
            let alone = node_policy(&m, &members[i..=i], id);
            assert_eq!(all, alone, "{id}");
            assert!(!all.shaping.is_empty(), "{id}");
        }
        assert!(!node_policy(&m, &members, "b-id").access.is_empty());
        // Either one makes the other members matter.
        let mut from = m.clone();
        from.spec.policies[5].from = Some(NodeSelector {
            nodes: vec!["a".into()],
            ..Default::default()
        });
        assert!(needs_members(&from));
        let mut toward = m.clone();
        toward.spec.policies[1].toward = Some(NodeSelector {
            nodes: vec!["b".into()],
            ..Default::default()
        });
        assert!(needs_members(&toward));
    }
}
