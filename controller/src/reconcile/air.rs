//! Neighbours over the air: which nodes pair because they hear each other's discovery beacons
//! (`sidenet_wire::beacon`) on a link where only link-local addresses exist (an 802.11s radio).
//!
//! # The rule
//!
//! Each node reports the nodes it hears ([`sidenet_wire::messages::Heard`]: node id, the local
//! interface, the sender's link-local address, the WireGuard key the beacon carried). Nodes `a`
//! and `b` of one mesh are *candidates* when `a` hears `b` and `b` hears `a`, each with the
//! WireGuard key the other reports itself, and they share no subnet link (a shared subnet
//! already pairs them, [`crate::reconcile::peers`]).
//!
//! A node with at most [`MAX_LINK_PEERS`] candidates keeps all of them. Otherwise it *picks*
//! the [`AIR_PICKS`] candidates with the lowest pair hash (SHA-256 of
//! `sidenet-air-pair\0<lower id>\0<higher id>`, first 8 bytes big-endian). `a` and `b` are
//! neighbours when either picks the other, so both ends agree without seeing each other's
//! choice. On a dense segment of `n` nodes every node picks 4: a random 4-out graph, connected
//! with overwhelming probability, mean degree just under 8 (`MAX_LINK_PEERS`), the maximum
//! near 20 for 600 nodes (`tests::dense_segments_have_bounded_symmetric_connected_degree`).
//!
//! The WireGuard endpoint is the peer's link-local address as heard, scoped to the interface
//! it was heard on: `[fe80::…%mesh0]:PORT`. A node that stops hearing a neighbour (its agent
//! drops a sender after `--beacon-hold` seconds without a beacon) reports that, the pair is
//! no longer mutual, and both are re-rendered without the link.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;

use sidenet_wire::codec::sha256;
use sidenet_wire::messages::WireguardInfo;

/// Expected number of WireGuard peers a node gets on one large link (the same bound as
/// subnet links: `crate::reconcile::peers::MAX_LINK_PEERS`).
pub const MAX_LINK_PEERS: usize = 8;
/// How many candidates a node with more than [`MAX_LINK_PEERS`] picks.
pub const AIR_PICKS: usize = MAX_LINK_PEERS / 2;

/// What one node reported over the air.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Air {
    mesh: String,
    key: String,
    /// peer → (local interface, its link-local address, the WireGuard key its beacon carried).
    heard: BTreeMap<String, (String, Ipv6Addr, String)>,
}

impl Air {
    /// From a node's report. Of a peer heard on several interfaces, the first (by name) counts;
    /// entries that are not link-local addresses or safe interface names are ignored.
    pub fn of(mesh: &str, wg: &WireguardInfo) -> Self {
        let mut heard = BTreeMap::new();
        for h in &wg.heard {
            let Ok(addr) = h.address.parse::<Ipv6Addr>() else {
                continue;
            };
            let iface_ok = !h.interface.is_empty()
                && h.interface.len() <= 15
                && h.interface
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if addr.segments()[0] & 0xffc0 != 0xfe80 || !iface_ok {
                continue;
            }
            heard.entry(h.node.clone()).or_insert((
                h.interface.clone(),
                addr,
                h.public_key.clone(),
            ));
        }
        Self {
            mesh: mesh.to_string(),
            key: wg.public_key.clone(),
            heard,
        }
    }

    /// The link-local address this node heard `peer` at.
    pub fn address_of(&self, peer: &str) -> Option<Ipv6Addr> {
        self.heard.get(peer).map(|h| h.1)
    }
}

fn pair_hash(a: &str, b: &str) -> u64 {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    let h = sha256(format!("sidenet-air-pair\0{x}\0{y}").as_bytes());
    u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

/// The candidates of `id` (see the module docs), each with the local interface it heard them
/// on. `share_link(a, b)`: whether the two share a subnet link.
pub fn candidates(
    air: &BTreeMap<String, Air>,
    id: &str,
    share_link: impl Fn(&str, &str) -> bool,
) -> BTreeMap<String, String> {
    let Some(me) = air.get(id) else {
        return BTreeMap::new();
    };
    me.heard
        .iter()
        .filter(|(peer, (_, _, key))| {
            peer.as_str() != id
                && air.get(peer.as_str()).is_some_and(|p| {
                    p.mesh == me.mesh
                        && p.key == *key
                        && p.heard.get(id).is_some_and(|(_, _, k)| *k == me.key)
                })
                && !share_link(id, peer)
        })
        .map(|(peer, (iface, _, _))| (peer.clone(), iface.clone()))
        .collect()
}

/// The candidates `id` picks (see the module docs): every candidate on a small link, else the
/// [`AIR_PICKS`] with the lowest pair hash. Kept per node by the index, refreshed for the nodes
/// whose candidates change.
pub fn picks_of(
    air: &BTreeMap<String, Air>,
    id: &str,
    share_link: impl Fn(&str, &str) -> bool,
) -> BTreeSet<String> {
    picks(&candidates(air, id, share_link), id)
}

fn picks(cands: &BTreeMap<String, String>, id: &str) -> BTreeSet<String> {
    if cands.len() <= MAX_LINK_PEERS {
        return cands.keys().cloned().collect();
    }
    let mut by_hash: Vec<(u64, &String)> = cands.keys().map(|p| (pair_hash(id, p), p)).collect();
    by_hash.sort();
    by_hash
        .into_iter()
        .take(AIR_PICKS)
        .map(|(_, p)| p.clone())
        .collect()
}

/// The neighbours of `id` over the air, each with the local interface to reach it on, given
/// every node's [`picks_of`].
pub fn neighbours(
    air: &BTreeMap<String, Air>,
    picks: &BTreeMap<String, BTreeSet<String>>,
    id: &str,
    share_link: impl Fn(&str, &str) -> bool,
) -> Vec<(String, String)> {
    let picked = |a: &str, b: &str| picks.get(a).is_some_and(|p| p.contains(b));
    candidates(air, id, &share_link)
        .into_iter()
        .filter(|(peer, _)| picked(id, peer) || picked(peer, id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidenet_wire::messages::Heard;

    fn ll(i: usize) -> String {
        format!("fe80::{:x}", i + 1)
    }

    fn key(n: &str) -> String {
        format!("wg-{n}")
    }

    /// Nodes 0..n, each hearing the listed others on mesh0.
    fn world(hears: &[(usize, Vec<usize>)]) -> BTreeMap<String, Air> {
        hears
            .iter()
            .map(|(i, others)| {
                let wg = WireguardInfo {
                    public_key: key(&format!("n{i:04}")),
                    endpoints: Vec::new(),
                    heard: others
                        .iter()
                        .map(|o| Heard {
                            node: format!("n{o:04}"),
                            interface: "mesh0".into(),
                            address: ll(*o),
                            public_key: key(&format!("n{o:04}")),
                        })
                        .collect(),
                };
                (format!("n{i:04}"), Air::of("m", &wg))
            })
            .collect()
    }

    fn all_picks(air: &BTreeMap<String, Air>) -> BTreeMap<String, BTreeSet<String>> {
        air.keys()
            .map(|id| (id.clone(), picks_of(air, id, |_, _| false)))
            .collect()
    }

    fn nbrs(air: &BTreeMap<String, Air>, id: &str) -> Vec<String> {
        neighbours(air, &all_picks(air), id, |_, _| false)
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    #[test]
    fn only_mutual_observation_pairs() {
        // 0 and 1 hear each other; 2 hears 0 but 0 does not hear 2; 3 hears nobody.
        let air = world(&[(0, vec![1]), (1, vec![0, 2]), (2, vec![0]), (3, vec![])]);
        assert_eq!(nbrs(&air, "n0000"), ["n0001"]);
        assert_eq!(nbrs(&air, "n0001"), ["n0000"]);
        assert!(nbrs(&air, "n0002").is_empty());
        assert!(nbrs(&air, "n0003").is_empty());
        assert_eq!(
            air["n0000"].address_of("n0001"),
            Some("fe80::2".parse().unwrap_or(Ipv6Addr::UNSPECIFIED))
        );
        // A shared subnet takes the pair off the air.
        let none = neighbours(&air, &all_picks(&air), "n0000", |_, _| true);
        assert!(none.is_empty());
    }

    #[test]
    fn a_wrong_key_another_mesh_or_a_global_address_does_not_pair() {
        let mut air = world(&[(0, vec![1]), (1, vec![0])]);
        // 0 heard a beacon with a key 1 does not report (an old or forged beacon).
        let mut wg = WireguardInfo {
            public_key: key("n0000"),
            endpoints: Vec::new(),
            heard: vec![Heard {
                node: "n0001".into(),
                interface: "mesh0".into(),
                address: ll(1),
                public_key: "wg-other".into(),
            }],
        };
        air.insert("n0000".into(), Air::of("m", &wg));
        assert!(nbrs(&air, "n0000").is_empty());
        wg.heard[0].public_key = key("n0001");
        air.insert("n0000".into(), Air::of("other", &wg));
        assert!(nbrs(&air, "n0000").is_empty());
        wg.heard[0].address = "2001:db8::2".into();
        air.insert("n0000".into(), Air::of("m", &wg));
        assert!(nbrs(&air, "n0000").is_empty());
        wg.heard[0].address = ll(1);
        wg.heard[0].interface = "mesh0;reboot".into();
        air.insert("n0000".into(), Air::of("m", &wg));
        assert!(nbrs(&air, "n0000").is_empty());
    }

    #[test]
    fn dense_segments_have_bounded_symmetric_connected_degree() {
        for n in [5, 9, 10, 40, 600] {
            let all: Vec<usize> = (0..n).collect();
            let hears: Vec<(usize, Vec<usize>)> = all
                .iter()
                .map(|i| (*i, all.iter().copied().filter(|j| j != i).collect()))
                .collect();
            let air = world(&hears);
            let picks = all_picks(&air);
            let graph: BTreeMap<String, Vec<String>> = air
                .keys()
                .map(|id| {
                    let n = neighbours(&air, &picks, id, |_, _| false);
                    (id.clone(), n.into_iter().map(|(p, _)| p).collect())
                })
                .collect();
            let mut total = 0;
            let mut max = 0;
            for (id, ps) in &graph {
                total += ps.len();
                max = max.max(ps.len());
                for p in ps {
                    assert!(graph[p].contains(id), "n={n}: {id}-{p} one-sided");
                }
            }
            let mean = total as f64 / n as f64;
            if n <= MAX_LINK_PEERS + 1 {
                assert_eq!(max, n - 1, "n={n}: a small segment pairs everyone");
            } else {
                assert!((4.0..=8.5).contains(&mean), "n={n}: mean degree {mean}");
                assert!(max <= 3 * MAX_LINK_PEERS, "n={n}: max degree {max}");
            }
            let mut seen = BTreeSet::new();
            let mut stack = vec!["n0000".to_string()];
            while let Some(x) = stack.pop() {
                if seen.insert(x.clone()) {
                    stack.extend(graph[&x].iter().cloned());
                }
            }
            assert_eq!(seen.len(), n, "n={n}: not connected");
        }
    }
}
