//! WireGuard neighbours: which nodes build encrypted links to which, as a pure function of what
//! the nodes reported (their WireGuard public key and underlay endpoints).
//!
//! # The neighbour rule
//!
//! Each agent reports the addresses (CIDR) of the interfaces that carry the side-net: the mesh
//! radio, or wired links. The subnet of such an address is a *link*. Two nodes of the same mesh,
//! both admitted (approved), are neighbours when they are on a common link. A node's WireGuard
//! peer on that link is reached at the address the peer reported in that subnet.
//!
//! A link with more than [`MAX_LINK_PEERS`] + 1 members does not make everyone everyone's
//! neighbour (a 10,000-node mesh on one layer-2 segment would otherwise give each node 10,000
//! peers): members are ordered by node id and each keeps its two ring neighbours (so the link's
//! peer graph stays connected) plus the members whose pair hash falls under a threshold, which
//! gives between 5 and [`MAX_LINK_PEERS`] peers on average. Both tests are symmetric, so the two
//! ends of a pair always agree without seeing each other's choice. The threshold only moves when
//! the link's size crosses a power of two, so a node joining or leaving changes the peers of its
//! own neighbourhood only. Computing one node's peers costs O(members of its links); the
//! [`Index`] keeps links → members, updated when a node's report changes. When two nodes share
//! several links, the first (in address order) carries their WireGuard link.
//!
//! Each node gets one WireGuard interface per peer (`sn-` + the peer's node id, cut to 15
//! characters), a listen port per interface (from the pair, probing past collisions), and one
//! link-local address derived from its own node id, used on all of its WireGuard interfaces
//! (babel speaks link-local). Only public keys and endpoints travel: private keys never leave
//! the nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use serde::Serialize;
use sidenet_crds::{Mesh, NodeRole};
use sidenet_wire::codec::sha256;

use crate::reconcile::store::{NodeRecord, Store};
use crate::spec::manifest::{ManifestSet, network_name};
use crate::spec::openwrt::{IFNAMSIZ, PREFIX};

/// Expected number of WireGuard peers a node gets on one large link.
pub const MAX_LINK_PEERS: usize = crate::reconcile::air::MAX_LINK_PEERS;
/// Listen ports are `WG_PORT_MIN..=WG_PORT_MAX`.
pub const WG_PORT_MIN: u16 = 51821;
/// See [`WG_PORT_MIN`].
pub const WG_PORT_MAX: u16 = 52820;
/// UDP port of the agents' pathfinder probe responder (on the side-net only).
pub const PROBE_PORT: u16 = 6699;

/// What a node's templates see of its data plane.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Dataplane {
    /// This node's link-local address on every WireGuard interface (no prefix length; /64).
    pub link_local: String,
    /// Lowest WireGuard listen port.
    pub wg_port_min: u16,
    /// Highest WireGuard listen port.
    pub wg_port_max: u16,
    /// UDP port of the probe responder.
    pub probe_port: u16,
    /// UDP port of the discovery beacons (on the underlay, from link-local addresses).
    pub beacon_port: u16,
    /// WireGuard neighbours, by node id.
    pub peers: Vec<PeerCtx>,
    /// Mesh gateways (MeshNodes with role `gateway`) to probe across the side-net.
    pub gateways: Vec<GatewayCtx>,
    /// What the node enforces of the mesh's policies ([`crate::spec::policy::compile`]).
    pub policy: crate::spec::policy::compile::NodePolicy,
    /// The node's web cache and its siblings among the peers ([`crate::reconcile::cache`]),
    /// when it runs one. Left out of the fingerprint's document when absent, so a node without
    /// the cache keeps its fingerprint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::reconcile::cache::CacheCtx>,
    /// The services other nodes of the mesh publish, each with its owner's side-net address
    /// (`docs/dataplane.md`, "Handover").
    pub services: Vec<ServiceCtx>,
    /// The services this node publishes (its babeld announces them, its firewall admits them
    /// from the side-net).
    pub own_services: Vec<ServiceCtx>,
    /// The Mesh's handover thresholds, when the node routes to any service of another node.
    pub handover: Option<HandoverCtx>,
    /// The mesh's names in DNS, by name (`docs/dataplane.md`, "Names"): every MeshNode's side-net
    /// address and its services' addresses.
    pub names: Vec<HostName>,
}

/// One name of the mesh and its address.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostName {
    /// Fully qualified, without the final dot: `a.riverside.sidenet.arpa`.
    pub name: String,
    /// The IPv6 address it stands for.
    pub address: String,
}

/// A published service (`spec.services[]` of a MeshNode).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServiceCtx {
    /// The service's name.
    pub name: String,
    /// The owner's node id.
    pub node: String,
    /// The owner's MeshNode name.
    pub owner: String,
    /// The owner's side-net address (what the agents probe).
    pub address: String,
    /// The service's prefixes.
    pub prefixes: Vec<ServicePrefix>,
    /// Its prefixes, space-separated (for one-line formats).
    pub prefix_list: String,
    /// Its ports (empty: all).
    pub ports: Vec<u16>,
    /// `tcp`, `udp` or `any`.
    pub protocol: String,
}

/// One prefix of a service.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServicePrefix {
    /// Canonical, with its length: `2001:db8:5::80/128`.
    pub prefix: String,
    /// Its length.
    pub len: u8,
}

/// An owner of services, to probe.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OwnerCtx {
    /// Node id.
    pub node: String,
    /// Its side-net address.
    pub address: String,
}

/// The thresholds and kernel numbers of handover.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HandoverCtx {
    /// Highest loss of a good round, percent.
    pub loss_percent: u32,
    /// Highest median round-trip time of a good round, ms.
    pub latency_ms: u32,
    /// Good rounds in a row before a service moves to the side-net.
    pub good_rounds: u32,
    /// Bad rounds in a row before it moves back to the internet.
    pub bad_rounds: u32,
    /// The routing table babeld installs service routes in.
    pub table: u32,
    /// The priority of the agent's rules into that table.
    pub priority: u32,
    /// The owners of [`Dataplane::services`], each once, in node-id order.
    pub owners: Vec<OwnerCtx>,
}

/// One WireGuard neighbour.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerCtx {
    /// The peer's node id.
    pub node: String,
    /// MeshNode name, else the hostname it reported.
    pub name: String,
    /// Local interface name for the link (at most 15 characters).
    pub iface: String,
    /// Local listen port of that interface.
    pub listen_port: u16,
    /// The peer's WireGuard public key.
    pub public_key: String,
    /// Where the peer listens for this link: `ADDR:PORT` or `[ADDR]:PORT`.
    pub endpoint: String,
    /// The address part of `endpoint`.
    pub endpoint_host: String,
    /// The port part of `endpoint`.
    pub endpoint_port: u16,
    /// The peer's link-local address on its end of the link.
    pub link_local: String,
    /// The shared underlay subnet.
    pub link: String,
}

/// A gateway to probe.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GatewayCtx {
    /// Node id.
    pub node: String,
    /// MeshNode name.
    pub name: String,
    /// Its side-net address.
    pub address: String,
}

impl Dataplane {
    /// The parts that depend on the node alone (no peers, no gateways).
    pub fn for_node(id: &str) -> Self {
        Self {
            link_local: link_local(id).to_string(),
            wg_port_min: WG_PORT_MIN,
            wg_port_max: WG_PORT_MAX,
            probe_port: PROBE_PORT,
            beacon_port: sidenet_wire::beacon::PORT,
            peers: Vec::new(),
            gateways: Vec::new(),
            policy: Default::default(),
            cache: None,
            services: Vec::new(),
            own_services: Vec::new(),
            handover: None,
            names: Vec::new(),
        }
    }
}

/// The link-local address a node uses on its WireGuard interfaces: `fe80::` and 64 bits of
/// SHA-256 over its node id.
pub fn link_local(id: &str) -> Ipv6Addr {
    let h = sha256(format!("sidenet-link-local\0{id}").as_bytes());
    let mut b = [0u8; 16];
    b[0] = 0xfe;
    b[1] = 0x80;
    b[8..].copy_from_slice(&h[..8]);
    if b[8..].iter().all(|x| *x == 0) {
        b[15] = 1;
    }
    Ipv6Addr::from(b)
}

/// The interface a node uses for its link to `peer`.
pub fn iface_for(peer: &str) -> String {
    format!("sn-{}", &peer[..peer.len().min(12)])
}

/// The subnet of a CIDR address (`10.0.1.7/24` → `10.0.1.0/24`) and the address itself.
/// Link-local, loopback, unspecified and multicast addresses are not endpoints.
pub fn link_of(cidr: &str) -> Option<(String, IpAddr)> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    match addr {
        IpAddr::V4(a) => {
            if len > 32 || a.is_loopback() || a.is_unspecified() || a.is_multicast() {
                return None;
            }
            if a.is_link_local() {
                return None;
            }
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            let net = std::net::Ipv4Addr::from(u32::from(a) & mask);
            Some((format!("{net}/{len}"), addr))
        }
        IpAddr::V6(a) => {
            if len > 128 || a.is_loopback() || a.is_unspecified() || a.is_multicast() {
                return None;
            }
            if a.segments()[0] & 0xffc0 == 0xfe80 {
                return None;
            }
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            let net = Ipv6Addr::from(u128::from(a) & mask);
            Some((format!("{net}/{len}"), addr))
        }
    }
}

/// `ADDR:PORT`, with an IPv6 address (and its `%scope`) in brackets.
fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn hash64(parts: &[&str]) -> u64 {
    let h = sha256(parts.join("\0").as_bytes());
    u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

/// Symmetric pair hash: the same for (a, b) and (b, a).
fn pair_hash(a: &str, b: &str) -> u64 {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    hash64(&["sidenet-pair", x, y])
}

/// A subnet link: (mesh, subnet).
pub type LinkKey = (String, String);

/// Links → members, kept up to date as nodes report.
#[derive(Debug, Clone, Default)]
pub struct Index {
    /// (mesh, subnet) → node → its address on that link.
    links: BTreeMap<LinkKey, BTreeMap<String, IpAddr>>,
    /// node → the links it is on.
    of: BTreeMap<String, Vec<LinkKey>>,
    /// node → what it hears over the air (see [`crate::reconcile::air`]).
    air: BTreeMap<String, crate::reconcile::air::Air>,
    /// node → the nodes it picks over the air ([`crate::reconcile::air::picks_of`]).
    air_picks: BTreeMap<String, BTreeSet<String>>,
}

/// How a node reaches one of its neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A shared subnet (mesh, subnet).
    Subnet(LinkKey),
    /// Over the air: the two hear each other's beacons; this node heard the peer on `iface`.
    Air {
        /// The local interface.
        iface: String,
    },
}

impl Index {
    /// An index over every node record.
    pub fn build(nodes: &BTreeMap<String, NodeRecord>) -> Self {
        let mut idx = Self::default();
        for (id, rec) in nodes {
            idx.insert(id, rec);
        }
        let ids: Vec<String> = idx.air.keys().cloned().collect();
        idx.refresh_picks(&ids);
        idx
    }

    /// Recomputes what `ids` pick over the air.
    fn refresh_picks(&mut self, ids: &[String]) {
        for id in ids {
            let p = crate::reconcile::air::picks_of(&self.air, id, |a, b| self.share_a_link(a, b));
            if p.is_empty() {
                self.air_picks.remove(id);
            } else {
                self.air_picks.insert(id.clone(), p);
            }
        }
    }

    fn insert(&mut self, id: &str, rec: &NodeRecord) {
        let Some(wg) = &rec.wireguard else { return };
        if wg.public_key.is_empty() {
            return;
        }
        self.air.insert(
            id.to_string(),
            crate::reconcile::air::Air::of(&rec.mesh, wg),
        );
        let mut keys = Vec::new();
        for e in &wg.endpoints {
            if let Some((subnet, addr)) = link_of(e) {
                let key = (rec.mesh.clone(), subnet);
                let members = self.links.entry(key.clone()).or_default();
                // One address per node and link: the first one reported.
                if members.contains_key(id) {
                    continue;
                }
                members.insert(id.to_string(), addr);
                keys.push(key);
            }
        }
        if !keys.is_empty() {
            keys.sort();
            self.of.insert(id.to_string(), keys);
        }
    }

    fn remove(&mut self, id: &str) {
        self.air.remove(id);
        for key in self.of.remove(id).unwrap_or_default() {
            if let Some(m) = self.links.get_mut(&key) {
                m.remove(id);
                if m.is_empty() {
                    self.links.remove(&key);
                }
            }
        }
    }

    /// Replaces what the index knows of `id` with `rec` (or forgets it). Returns every node
    /// whose neighbours, ports or endpoints may have changed, to reconcile.
    pub fn replace(&mut self, id: &str, rec: Option<&NodeRecord>) -> BTreeSet<String> {
        let size = |idx: &Self, key: &LinkKey| idx.links.get(key).map_or(0, BTreeMap::len);
        let old_keys = self.of.get(id).cloned().unwrap_or_default();
        let before: Vec<(LinkKey, usize)> = old_keys
            .iter()
            .map(|k| (k.clone(), size(self, k)))
            .collect();
        let mut affected = self.around(id);
        // Over the air, a change of id's reports changes the candidates of the nodes it hears
        // (or heard), and with them their own picks.
        let heard_before = self.air_candidates(id);
        for b in &heard_before {
            affected.extend(self.around(b));
        }
        self.remove(id);
        if let Some(rec) = rec {
            self.insert(id, rec);
        }
        // Only id's candidates, and the candidates of those it gained or lost, change.
        let heard_after = self.air_candidates(id);
        let mut changed: Vec<String> = heard_before.clone();
        changed.extend(heard_after.iter().cloned());
        changed.push(id.to_string());
        changed.sort();
        changed.dedup();
        self.refresh_picks(&changed);
        affected.extend(self.around(id));
        for b in heard_before.iter().chain(heard_after.iter()) {
            affected.extend(self.around(b));
        }
        let new_keys = self.of.get(id).cloned().unwrap_or_default();
        let mut keys: Vec<LinkKey> = old_keys;
        keys.extend(new_keys);
        keys.sort();
        keys.dedup();
        for key in keys {
            let was = before
                .iter()
                .find(|(k, _)| *k == key)
                .map_or_else(|| size(self, &key).saturating_sub(1), |(_, n)| *n);
            if bucket(was) != bucket(size(self, &key)) {
                // The selection threshold of this link moved: anyone on it may see changes.
                let members: Vec<String> = self
                    .links
                    .get(&key)
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                for m in members {
                    affected.extend(self.around(&m));
                }
            }
        }
        affected
    }

    /// `id`, its neighbours, and theirs: a change of `id`'s neighbours changes its neighbours'
    /// peer sets, and with them the listen ports their own neighbours connect to.
    fn around(&self, id: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        out.insert(id.to_string());
        for (peer, _) in self.neighbours(id) {
            if out.insert(peer.clone()) {
                out.extend(self.neighbours(&peer).into_iter().map(|(p, _)| p));
            }
        }
        out
    }

    /// The neighbours of `id` with the link each is reached over: a shared subnet first, else
    /// over the air. Admission (approval) is not checked here.
    pub fn neighbours(&self, id: &str) -> Vec<(String, Via)> {
        let mut out: BTreeMap<String, Via> = BTreeMap::new();
        for key in self.of.get(id).into_iter().flatten() {
            let Some(members) = self.links.get(key) else {
                continue;
            };
            for peer in select(id, members.keys()) {
                out.entry(peer).or_insert_with(|| Via::Subnet(key.clone()));
            }
        }
        for (peer, iface) in
            crate::reconcile::air::neighbours(&self.air, &self.air_picks, id, |a, b| {
                self.share_a_link(a, b)
            })
        {
            out.entry(peer).or_insert(Via::Air { iface });
        }
        out.into_iter().collect()
    }

    /// Whether `a` and `b` are members of one subnet link (then they never pair over the air).
    fn share_a_link(&self, a: &str, b: &str) -> bool {
        let (Some(x), Some(y)) = (self.of.get(a), self.of.get(b)) else {
            return false;
        };
        x.iter().any(|k| y.contains(k))
    }

    /// The nodes `id` and that hear each other (and share no subnet).
    fn air_candidates(&self, id: &str) -> Vec<String> {
        crate::reconcile::air::candidates(&self.air, id, |a, b| self.share_a_link(a, b))
            .into_keys()
            .collect()
    }

    /// Where `id` reaches `peer` over `via`: (host, shown link).
    fn reach(&self, id: &str, peer: &str, via: &Via) -> Option<(String, String)> {
        match via {
            Via::Subnet(key) => {
                let addr = *self.links.get(key)?.get(peer)?;
                Some((addr.to_string(), key.1.clone()))
            }
            Via::Air { iface } => {
                let addr = self.air.get(id)?.address_of(peer)?;
                Some((format!("{addr}%{iface}"), format!("{iface} (heard)")))
            }
        }
    }

    /// Number of links known.
    pub fn links(&self) -> usize {
        self.links.len()
    }
}

/// Which selection regime a link of `n` members is in: everyone (0), or one threshold per power
/// of two.
fn bucket(n: usize) -> u32 {
    if n <= MAX_LINK_PEERS + 1 {
        0
    } else {
        (n - 3).next_power_of_two().trailing_zeros() + 1
    }
}

/// The members of one link that `id` peers with (see the module docs).
fn select<'a>(id: &str, members: impl Iterator<Item = &'a String> + Clone) -> Vec<String> {
    let n = members.clone().count();
    if n <= 1 || !members.clone().any(|m| m == id) {
        return Vec::new();
    }
    if n - 1 <= MAX_LINK_PEERS {
        return members.filter(|m| *m != id).cloned().collect();
    }
    let sorted: Vec<&String> = members.collect();
    let pos = sorted.iter().position(|m| *m == id).unwrap_or(0);
    let prev = sorted[(pos + n - 1) % n];
    let next = sorted[(pos + 1) % n];
    // Two ring neighbours plus, of the other n - 3, a share that yields between (MAX - 2) / 2
    // and MAX - 2 more; it changes only when n - 3 crosses a power of two.
    let share = (MAX_LINK_PEERS - 2) as f64 / (n - 3).next_power_of_two() as f64;
    let threshold = (share.min(1.0) * u64::MAX as f64) as u64;
    sorted
        .iter()
        .filter(|m| **m != id)
        .filter(|m| **m == prev || **m == next || pair_hash(id, m) < threshold)
        .map(|m| (*m).clone())
        .collect()
}

/// Listen ports of `id`'s interfaces, by peer: a slot from the ordered pair, probing upwards past
/// slots other peers (in node-id order) already took.
fn ports(id: &str, peers: &[String]) -> BTreeMap<String, u16> {
    let slots = u64::from(WG_PORT_MAX - WG_PORT_MIN) + 1;
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    for peer in peers {
        let mut slot = hash64(&["sidenet-port", id, peer]) % slots;
        while taken.contains(&slot) {
            slot = (slot + 1) % slots;
        }
        taken.insert(slot);
        out.insert(peer.clone(), WG_PORT_MIN + slot as u16);
    }
    out
}

fn name_of(store: &Store, set: &ManifestSet, node: &str) -> String {
    set.nodes
        .get(node)
        .and_then(|m| m.metadata.name.clone())
        .or_else(|| store.nodes.get(node).map(|r| r.hostname.clone()))
        .unwrap_or_else(|| node.to_string())
}

/// The gateways of `mesh`: MeshNodes with role `gateway` that have an address. Computed once per
/// mesh and reconcile, then handed to [`dataplane`].
pub fn gateways(store: &Store, set: &ManifestSet, mesh: &Mesh) -> Vec<GatewayCtx> {
    let net = network_name(mesh);
    let Ok(base) = crate::spec::manifest::parse_ula48(&mesh.spec.prefix) else {
        return Vec::new();
    };
    set.nodes
        .iter()
        .filter(|(_, m)| {
            m.spec.role == NodeRole::Gateway && set.mesh_of(m).map(network_name) == Some(net)
        })
        .filter_map(|(node, _)| {
            let sid = store.subnets.get(&(net.to_string(), node.clone()))?;
            Some(GatewayCtx {
                node: node.clone(),
                name: name_of(store, set, node),
                address: crate::spec::ipam::node_address(base, *sid).to_string(),
            })
        })
        .collect()
}

/// The services the nodes of `mesh` publish (those with a /64), in node-id order. Computed once
/// per mesh and reconcile, then handed to [`with_services`].
pub fn services(store: &Store, set: &ManifestSet, mesh: &Mesh) -> Vec<ServiceCtx> {
    let net = network_name(mesh);
    let Ok(base) = crate::spec::manifest::parse_ula48(&mesh.spec.prefix) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (node, m) in &set.nodes {
        if m.spec.services.is_empty() || set.mesh_of(m).map(network_name) != Some(net) {
            continue;
        }
        let Some(sid) = store.subnets.get(&(net.to_string(), node.clone())) else {
            continue;
        };
        for s in &m.spec.services {
            let prefixes: Vec<ServicePrefix> = s
                .addresses
                .iter()
                .filter_map(|a| crate::spec::services::parse_service_prefix(a).ok())
                .map(|(a, l)| ServicePrefix {
                    prefix: format!("{a}/{l}"),
                    len: l,
                })
                .collect();
            if prefixes.is_empty() {
                continue;
            }
            out.push(ServiceCtx {
                prefix_list: prefixes
                    .iter()
                    .map(|p| p.prefix.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                name: s.name.clone(),
                node: node.clone(),
                owner: name_of(store, set, node),
                address: crate::spec::ipam::node_address(base, *sid).to_string(),
                prefixes,
                ports: s.ports.clone(),
                protocol: s.protocol.as_str().to_string(),
            });
        }
    }
    out
}

/// The names of `mesh` (`docs/dataplane.md`, "Names"), sorted: `NODE.MESH.sidenet.arpa` for
/// every MeshNode with a /64 and a DNS label ([`crate::spec::names::node_label`]), and
/// `SERVICE.NODE.MESH.sidenet.arpa` for each single address (/128) of its services. Computed
/// once per mesh and reconcile; every node of the mesh gets the same list.
pub fn names(store: &Store, set: &ManifestSet, mesh: &Mesh) -> Vec<HostName> {
    let net = network_name(mesh);
    let Ok(base) = crate::spec::manifest::parse_ula48(&mesh.spec.prefix) else {
        return Vec::new();
    };
    let zone = crate::spec::names::zone(mesh.metadata.name.as_deref().unwrap_or_default());
    let mut out = Vec::new();
    for (node, m) in &set.nodes {
        if set.mesh_of(m).map(network_name) != Some(net) {
            continue;
        }
        let Some(sid) = store.subnets.get(&(net.to_string(), node.clone())) else {
            continue;
        };
        let Some(label) = crate::spec::names::node_label(m) else {
            continue;
        };
        let fqdn = format!("{label}.{zone}");
        for s in &m.spec.services {
            for (a, l) in s
                .addresses
                .iter()
                .filter_map(|a| crate::spec::services::parse_service_prefix(a).ok())
            {
                if l == 128 {
                    out.push(HostName {
                        name: format!("{}.{fqdn}", s.name),
                        address: a.to_string(),
                    });
                }
            }
        }
        out.push(HostName {
            name: fqdn,
            address: crate::spec::ipam::node_address(base, *sid).to_string(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.address.cmp(&b.address)));
    out.dedup();
    out
}

/// Gives node `id` of `mesh` the services of the other nodes (to route to) and its own (to
/// announce), with the Mesh's thresholds.
pub fn with_services(dp: &mut Dataplane, all: &[ServiceCtx], mesh: &Mesh, id: &str) {
    dp.services = all.iter().filter(|s| s.node != id).cloned().collect();
    dp.own_services = all.iter().filter(|s| s.node == id).cloned().collect();
    dp.handover = (!dp.services.is_empty()).then(|| {
        let h = mesh.spec.handover.clone().unwrap_or_default();
        HandoverCtx {
            loss_percent: h.loss_percent.unwrap_or(sidenet_crds::DEFAULT_LOSS_PERCENT),
            latency_ms: h.latency_ms.unwrap_or(sidenet_crds::DEFAULT_LATENCY_MS),
            good_rounds: h.good_rounds.unwrap_or(sidenet_crds::DEFAULT_GOOD_ROUNDS),
            bad_rounds: h.bad_rounds.unwrap_or(sidenet_crds::DEFAULT_BAD_ROUNDS),
            table: crate::spec::services::SERVICE_TABLE,
            priority: crate::spec::services::SERVICE_RULE_PRIORITY,
            owners: {
                let mut o: Vec<OwnerCtx> = dp
                    .services
                    .iter()
                    .map(|s| OwnerCtx {
                        node: s.node.clone(),
                        address: s.address.clone(),
                    })
                    .collect();
                o.dedup();
                o
            },
        }
    });
}

/// The mesh's nodes that have a /64, as the policy compiler selects them (MeshNode name and
/// labels, else the node id).
pub fn located(
    store: &Store,
    set: &ManifestSet,
    mesh: &Mesh,
) -> Vec<crate::spec::policy::compile::Located> {
    let net = network_name(mesh);
    let Ok(base) = crate::spec::manifest::parse_ula48(&mesh.spec.prefix) else {
        return Vec::new();
    };
    store
        .subnets
        .iter()
        .filter(|((n, _), _)| n == net)
        .map(|((_, id), sid)| locate(set, base, id, *sid))
        .collect()
}

/// [`located`] for node `id` alone (empty when it has no /64 in `mesh`): what the policy
/// compiler needs when no policy of the mesh looks at other members
/// ([`crate::spec::policy::compile::needs_members`]).
pub fn located_node(
    store: &Store,
    set: &ManifestSet,
    mesh: &Mesh,
    id: &str,
) -> Vec<crate::spec::policy::compile::Located> {
    let Ok(base) = crate::spec::manifest::parse_ula48(&mesh.spec.prefix) else {
        return Vec::new();
    };
    store
        .subnets
        .get(&(network_name(mesh).to_string(), id.to_string()))
        .map(|sid| locate(set, base, id, *sid))
        .into_iter()
        .collect()
}

fn locate(
    set: &ManifestSet,
    base: std::net::Ipv6Addr,
    id: &str,
    sid: u16,
) -> crate::spec::policy::compile::Located {
    let m = set.nodes.get(id);
    crate::spec::policy::compile::Located {
        member: crate::spec::policy::eval::Member {
            id: id.to_string(),
            name: m
                .and_then(|m| m.metadata.name.clone())
                .unwrap_or_else(|| id.to_string()),
            labels: m
                .and_then(|m| m.metadata.labels.clone())
                .unwrap_or_default(),
        },
        subnet: format!("{}/64", crate::spec::ipam::subnet(base, sid)),
    }
}

/// The data plane of node `id` in `mesh`: its WireGuard peers among admitted nodes, and the
/// mesh's `gateways` (from [`gateways`]) other than itself, to probe.
pub fn dataplane(
    index: &Index,
    store: &Store,
    set: &ManifestSet,
    mesh: &Mesh,
    id: &str,
    gateways: &[GatewayCtx],
) -> Dataplane {
    let mut dp = Dataplane::for_node(id);
    let net = network_name(mesh);
    let admitted = |node: &str| {
        let rec = store.nodes.get(node);
        rec.is_some_and(|r| r.mesh == net)
            && crate::reconcile::admission::approved(mesh, set.node(node), rec)
    };
    if admitted(id) {
        let mine: Vec<(String, Via)> = index
            .neighbours(id)
            .into_iter()
            .filter(|(p, _)| admitted(p))
            .collect();
        let my_ports = ports(id, &mine.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>());
        for (peer, key) in &mine {
            let Some(rec) = store.nodes.get(peer) else {
                continue;
            };
            let Some(wg) = &rec.wireguard else { continue };
            let Some((host, link)) = index.reach(id, peer, key) else {
                continue;
            };
            let theirs: Vec<String> = index
                .neighbours(peer)
                .into_iter()
                .map(|(p, _)| p)
                .filter(|p| admitted(p))
                .collect();
            let Some(their_port) = ports(peer, &theirs).get(id).copied() else {
                continue;
            };
            dp.peers.push(PeerCtx {
                node: peer.clone(),
                name: name_of(store, set, peer),
                iface: iface_for(peer),
                listen_port: my_ports.get(peer).copied().unwrap_or(WG_PORT_MIN),
                public_key: wg.public_key.clone(),
                endpoint: endpoint(&host, their_port),
                endpoint_host: host,
                endpoint_port: their_port,
                link_local: link_local(peer).to_string(),
                link,
            });
        }
    }
    dp.gateways = gateways.iter().filter(|g| g.node != id).cloned().collect();
    dp.cache = crate::reconcile::cache::for_node(
        set,
        &store.nodes,
        &store.subnets,
        mesh,
        id,
        dp.peers.iter().map(|p| (p.node.as_str(), p.name.as_str())),
    );
    dp
}

/// Folds the data plane into a node's input fingerprint, so a change of peers re-renders.
pub fn fingerprint(inputs: String, dp: &Dataplane) -> String {
    let mut doc = inputs.into_bytes();
    doc.push(0);
    doc.extend_from_slice(&serde_json::to_vec(dp).unwrap_or_default());
    sidenet_wire::codec::sha256_hex(&doc)
}

/// On OpenWrt (see [`crate::spec::openwrt`]), names each peer's WireGuard interface (and its UCI sections) `sidenet_` + the first 7
/// characters of its node id. Should two peers of one node share those (a 35-bit prefix), the
/// later one in the list takes the first free `sidenet_` + 5 characters + 2 digits, so names
/// stay unique and at most [`IFNAMSIZ`](crate::spec::openwrt::IFNAMSIZ) long.
pub fn name_openwrt_ifaces(peers: &mut [PeerCtx]) {
    let mut taken: Vec<String> = Vec::new();
    for p in peers.iter_mut() {
        let id: String = p
            .node
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let short = |n: usize| id.chars().take(n).collect::<String>();
        let mut name = format!("{PREFIX}{}", short(IFNAMSIZ - PREFIX.len()));
        let mut k = 0u32;
        while taken.contains(&name) && k < 100 {
            name = format!("{PREFIX}{}{k:02}", short(IFNAMSIZ - PREFIX.len() - 2));
            k += 1;
        }
        taken.push(name.clone());
        p.iface = name;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(node: &str) -> PeerCtx {
        PeerCtx {
            node: node.into(),
            name: String::new(),
            iface: iface_for(node),
            listen_port: 0,
            public_key: String::new(),
            endpoint: String::new(),
            endpoint_host: String::new(),
            endpoint_port: 0,
            link_local: String::new(),
            link: String::new(),
        }
    }

    #[test]
    fn interface_names_are_sidenet_unique_and_short() {
        let mut peers = vec![
            peer("peerbbbbbbbbbbbb"),
            peer("abcdefgzzzzzzzzz"),
            peer("abcdefgyyyyyyyyy"),
            peer("abcdefgxxxxxxxxx"),
        ];
        name_openwrt_ifaces(&mut peers);
        let names: Vec<&str> = peers.iter().map(|p| p.iface.as_str()).collect();
        assert_eq!(
            names,
            [
                "sidenet_peerbbb",
                "sidenet_abcdefg",
                "sidenet_abcde00",
                "sidenet_abcde01"
            ]
        );
        assert!(names.iter().all(|n| n.len() <= IFNAMSIZ));
    }

    use sidenet_wire::messages::WireguardInfo;

    fn rec(mesh: &str, key: &str, endpoints: &[&str]) -> NodeRecord {
        NodeRecord {
            mesh: mesh.into(),
            approved: true,
            wireguard: Some(WireguardInfo {
                public_key: key.into(),
                endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
                heard: Vec::new(),
            }),
            ..Default::default()
        }
    }

    fn nbrs(idx: &Index, id: &str) -> Vec<String> {
        idx.neighbours(id).into_iter().map(|(p, _)| p).collect()
    }

    /// A node on mesh `m` with `endpoints`, hearing each of `heard` on mesh0 at fe80::<name>.
    fn air_rec(name: &str, endpoints: &[&str], heard: &[&str]) -> NodeRecord {
        let mut r = rec("m", &format!("k{name}"), endpoints);
        if let Some(wg) = r.wireguard.as_mut() {
            wg.heard = heard
                .iter()
                .map(|h| sidenet_wire::messages::Heard {
                    node: h.to_string(),
                    interface: "mesh0".into(),
                    // a, b, c and d are hex digits.
                    address: format!("fe80::{h}"),
                    public_key: format!("k{h}"),
                })
                .collect();
        }
        r
    }

    #[test]
    fn nodes_that_hear_each_other_pair_over_the_air_and_unpair_when_one_falls_silent() {
        let mut nodes = BTreeMap::new();
        // a and b also share a wire (that link wins); c and d are on the radio only.
        nodes.insert("a".into(), air_rec("a", &["10.0.1.1/24"], &["b", "c", "d"]));
        nodes.insert("b".into(), air_rec("b", &["10.0.1.2/24"], &["a", "c", "d"]));
        nodes.insert("c".into(), air_rec("c", &[], &["a", "b", "d"]));
        nodes.insert("d".into(), air_rec("d", &[], &["a", "b", "c"]));
        let mut idx = Index::build(&nodes);
        let a = idx.neighbours("a");
        assert_eq!(
            a,
            [
                ("b".into(), Via::Subnet(("m".into(), "10.0.1.0/24".into()))),
                (
                    "c".into(),
                    Via::Air {
                        iface: "mesh0".into()
                    }
                ),
                (
                    "d".into(),
                    Via::Air {
                        iface: "mesh0".into()
                    }
                ),
            ]
        );
        assert_eq!(
            idx.reach("a", "c", &a[1].1),
            Some(("fe80::c%mesh0".to_string(), "mesh0 (heard)".to_string()))
        );
        assert_eq!(endpoint("fe80::c%mesh0", 51900), "[fe80::c%mesh0]:51900");
        assert_eq!(nbrs(&idx, "c"), ["a", "b", "d"]);
        // d stops hearing c (c left the segment, or d did): the pair is no longer mutual.
        let silent = air_rec("d", &[], &["a", "b"]);
        let affected = idx.replace("d", Some(&silent));
        assert!(
            affected.contains("c") && affected.contains("d"),
            "{affected:?}"
        );
        assert_eq!(nbrs(&idx, "c"), ["a", "b"]);
        assert_eq!(nbrs(&idx, "d"), ["a", "b"]);
        // One-sided hearing never pairs; c's report alone does not bring d back.
        assert_eq!(nbrs(&idx, "a"), ["b", "c", "d"]);
        idx.replace("c", None);
        assert_eq!(nbrs(&idx, "a"), ["b", "d"]);
    }

    #[test]
    fn subnets_make_links() {
        assert_eq!(
            link_of("10.0.1.7/24").map(|l| l.0),
            Some("10.0.1.0/24".into())
        );
        assert_eq!(
            link_of("2001:db8:5::7/64").map(|l| l.0),
            Some("2001:db8:5::/64".into())
        );
        assert_eq!(link_of("fe80::1/64"), None);
        assert_eq!(link_of("127.0.0.1/8"), None);
        assert_eq!(link_of("169.254.3.4/16"), None);
        assert_eq!(link_of("10.0.0.1"), None);
        assert_eq!(link_of("10.0.0.1/33"), None);
    }

    #[test]
    fn shared_subnets_are_neighbours_and_meshes_stay_apart() {
        let mut nodes = BTreeMap::new();
        nodes.insert("a".into(), rec("m", "ka", &["10.0.1.1/24", "10.0.3.1/24"]));
        nodes.insert("b".into(), rec("m", "kb", &["10.0.1.2/24", "10.0.2.2/24"]));
        nodes.insert("c".into(), rec("m", "kc", &["10.0.2.3/24", "10.0.4.3/24"]));
        nodes.insert("d".into(), rec("m", "kd", &["10.0.3.4/24", "10.0.4.4/24"]));
        // Same subnet, other mesh: never a neighbour.
        nodes.insert("x".into(), rec("other", "kx", &["10.0.1.9/24"]));
        let idx = Index::build(&nodes);
        assert_eq!(nbrs(&idx, "a"), ["b", "d"]);
        assert_eq!(nbrs(&idx, "b"), ["a", "c"]);
        assert_eq!(nbrs(&idx, "c"), ["b", "d"]);
        assert_eq!(nbrs(&idx, "x"), Vec::<String>::new());
    }

    #[test]
    fn replace_reports_old_and_new_neighbourhoods() {
        let mut nodes = BTreeMap::new();
        nodes.insert("a".into(), rec("m", "ka", &["10.0.1.1/24"]));
        nodes.insert("b".into(), rec("m", "kb", &["10.0.1.2/24"]));
        nodes.insert("c".into(), rec("m", "kc", &["10.0.2.3/24"]));
        let mut idx = Index::build(&nodes);
        // b moves from a's link to c's.
        let moved = rec("m", "kb", &["10.0.2.2/24"]);
        let affected = idx.replace("b", Some(&moved));
        assert!(affected.contains("a") && affected.contains("b") && affected.contains("c"));
        assert_eq!(nbrs(&idx, "b"), ["c"]);
        assert!(nbrs(&idx, "a").is_empty());
        idx.replace("b", None);
        assert!(nbrs(&idx, "c").is_empty());
        assert_eq!(idx.links(), 2);
    }

    #[test]
    fn large_links_have_bounded_symmetric_connected_degree() {
        let n = 600;
        let idx = Index::build(&big_link(n));
        let all: BTreeMap<String, Vec<String>> = big_link(n)
            .keys()
            .map(|id| (id.clone(), nbrs(&idx, id)))
            .collect();
        let mut edges = BTreeSet::new();
        let mut max = 0;
        let mut total = 0;
        for (id, p) in &all {
            max = max.max(p.len());
            total += p.len();
            for q in p {
                edges.insert((id.clone(), q.clone()));
            }
        }
        // Symmetric: every edge is seen from both ends.
        for (a, b) in &edges {
            assert!(edges.contains(&(b.clone(), a.clone())), "{a}-{b} one-sided");
        }
        let mean = total as f64 / n as f64;
        assert!((4.5..=8.5).contains(&mean), "mean degree {mean}");
        assert!(max <= 3 * MAX_LINK_PEERS, "max degree {max}");
        // Connected: a walk from one node reaches all.
        let mut seen = BTreeSet::new();
        let mut stack = vec!["node00000".to_string()];
        while let Some(x) = stack.pop() {
            if seen.insert(x.clone()) {
                stack.extend(all[&x].iter().cloned());
            }
        }
        assert_eq!(seen.len(), n);
    }

    fn big_link(n: usize) -> BTreeMap<String, NodeRecord> {
        (0..n)
            .map(|i| {
                let addr = format!("10.0.{}.{}/16", i / 256, i % 256);
                (format!("node{i:05}"), rec("m", "k", &[&addr]))
            })
            .collect()
    }

    /// Everything a node's config depends on from the index: its peers and their ports.
    fn view(idx: &Index, id: &str) -> Vec<(String, u16, u16)> {
        let mine = nbrs(idx, id);
        let my_ports = ports(id, &mine);
        mine.iter()
            .map(|p| {
                let theirs = ports(p, &nbrs(idx, p));
                (p.clone(), my_ports[p], theirs.get(id).copied().unwrap_or(0))
            })
            .collect()
    }

    #[test]
    fn joins_and_leaves_report_every_node_whose_config_changes() {
        // 40 → 41 members stays in one threshold bucket; 35 → 36 crosses into the next one;
        // 9 → 10 leaves the everyone-peers-with-everyone regime.
        for n in [40, 35, 9] {
            let nodes = big_link(n);
            let mut idx = Index::build(&nodes);
            let before: BTreeMap<String, _> = nodes
                .keys()
                .map(|id| (id.clone(), view(&idx, id)))
                .collect();
            let newcomer = rec("m", "k", &["10.0.200.1/16"]);
            let affected = idx.replace("joiner", Some(&newcomer));
            let mut changed = BTreeSet::from(["joiner".to_string()]);
            for (id, v) in &before {
                if view(&idx, id) != *v {
                    changed.insert(id.clone());
                }
            }
            assert!(
                changed.is_subset(&affected),
                "n={n}: changed but not reported: {:?}",
                changed.difference(&affected).collect::<Vec<_>>()
            );
            // And back: leaving reports the same neighbourhood.
            let affected = idx.replace("joiner", None);
            for (id, v) in &before {
                assert_eq!(
                    view(&idx, id),
                    *v,
                    "n={n}: {id} did not return to its old view"
                );
            }
            assert!(affected.contains("joiner"));
        }
    }

    #[test]
    fn ports_are_unique_per_node_and_stable() {
        let peers: Vec<String> = (0..200).map(|i| format!("p{i}")).collect();
        let p = ports("me", &peers);
        let uniq: BTreeSet<u16> = p.values().copied().collect();
        assert_eq!(uniq.len(), peers.len());
        assert!(p.values().all(|x| (WG_PORT_MIN..=WG_PORT_MAX).contains(x)));
        assert_eq!(ports("me", &peers), p);
    }

    #[test]
    fn link_locals_and_ifaces() {
        let ll = link_local("bhctvmiyz6ovk27g");
        assert_eq!(ll.segments()[0], 0xfe80);
        assert_ne!(ll, link_local("qi4chuluc3u2giv7"));
        assert_eq!(iface_for("bhctvmiyz6ovk27g"), "sn-bhctvmiyz6ov");
        assert!(iface_for("bhctvmiyz6ovk27g").len() <= 15);
    }
}
