//! The neighbourhood web cache of a node (`docs/content.md`): whether it runs Squid, with what
//! storage and rules, and which of its WireGuard neighbours are its siblings.
//!
//! A node runs the cache when its Mesh enables it (`spec.cache.enabled`), its hardware profile
//! gives it storage (`spec.cache`) and its MeshNode does not turn it off. Its siblings are the
//! WireGuard neighbours (see [`crate::reconcile::peers`]) that run it too, each at its side-net
//! address: one hop over one encrypted link. The same test decides both ends, so a node lists a
//! neighbour as sibling exactly when that neighbour runs the cache.

use serde::Serialize;
use sidenet_crds::{
    CacheStorage, DEFAULT_CACHE_MEMORY_MB, DEFAULT_MAX_OBJECT_MB, HardwareProfile, Mesh, MeshNode,
};
use sidenet_wire::messages::Requirement;

use crate::reconcile::store::NodeRecord;
use crate::spec::set::{ManifestSet, network_name};

/// TCP port of the cache (HTTP proxy), on the node's side-net and LAN addresses.
pub const HTTP_PORT: u16 = 3128;
/// UDP port of the caches' ICP queries (RFC 2186), on the side-net address only.
pub const ICP_PORT: u16 = 3130;
/// The cache folder when the profile names none.
pub const DEFAULT_DIR: &str = "/var/spool/sidenet-squid";

/// A node's cache as its templates see it (`cache`, absent when the node runs none).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct CacheCtx {
    /// The node's side-net address (filled in with the node's context).
    pub address: String,
    /// HTTP port ([`HTTP_PORT`]).
    pub http_port: u16,
    /// ICP port ([`ICP_PORT`]).
    pub icp_port: u16,
    /// Cache folder.
    pub dir: String,
    /// Disk for objects, MiB (0: memory only).
    pub disk_mb: u32,
    /// Memory for hot objects, MiB.
    pub memory_mb: u32,
    /// Largest object kept, MiB.
    pub max_object_mb: u32,
    /// Only public content (no cookies, no credentials).
    pub public_only: bool,
    /// The node's LAN addresses and their subnets.
    pub lan: Vec<LanCtx>,
    /// Neighbours that run the cache too.
    pub siblings: Vec<SiblingCtx>,
}

/// One LAN address of a node.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LanCtx {
    /// The node's address (no prefix length); IPv6 without brackets.
    pub address: String,
    /// `true` for IPv6 (templates bracket it in `http_port`).
    pub ipv6: bool,
    /// The subnet devices are in (`192.168.1.0/24`).
    pub subnet: String,
}

/// A sibling cache.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SiblingCtx {
    /// Its node id.
    pub node: String,
    /// MeshNode name, else the hostname it reported.
    pub name: String,
    /// Its side-net address.
    pub address: String,
}

/// The package a node with the cache needs, on every family (Debian and OpenWrt both call it
/// `squid`).
pub fn requirement() -> Requirement {
    Requirement {
        package: "squid".into(),
        program: "squid".into(),
        args: Vec::new(),
    }
}

/// The hardware profile of a node, as the controller picks it: its MeshNode's, else the one the
/// agent asked for, else the one matching its board.
pub fn profile_of<'a>(
    set: &'a ManifestSet,
    manifest: Option<&MeshNode>,
    rec: Option<&NodeRecord>,
) -> Option<&'a HardwareProfile> {
    let wanted = manifest
        .and_then(|m| m.spec.hardware_profile.clone())
        .or_else(|| rec.and_then(|r| r.profile.clone()));
    match wanted {
        Some(p) => set.profiles.get(&p),
        None => rec
            .and_then(|r| r.board.as_deref())
            .and_then(|b| set.profile_for_board(b)),
    }
}

/// The storage the node gives the cache, when it runs it.
pub fn storage<'a>(
    mesh: &Mesh,
    manifest: Option<&MeshNode>,
    profile: Option<&'a HardwareProfile>,
) -> Option<&'a CacheStorage> {
    let on = mesh.spec.cache.as_ref().is_some_and(|c| c.enabled);
    let off_here = manifest
        .and_then(|m| m.spec.cache.as_ref())
        .and_then(|c| c.enabled)
        == Some(false);
    if !on || off_here {
        return None;
    }
    profile.and_then(|p| p.spec.cache.as_ref())
}

/// The cache of a node that runs it (without its address and siblings), else `None`.
pub fn node_cache(
    mesh: &Mesh,
    manifest: Option<&MeshNode>,
    profile: Option<&HardwareProfile>,
) -> Option<CacheCtx> {
    let store = storage(mesh, manifest, profile)?;
    let mesh_cache = mesh.spec.cache.clone().unwrap_or_default();
    let node = manifest
        .and_then(|m| m.spec.cache.clone())
        .unwrap_or_default();
    let lan = node
        .lan
        .iter()
        .filter_map(|cidr| crate::spec::cache::parse_lan(cidr).ok())
        .map(|(addr, len)| LanCtx {
            address: addr.to_string(),
            ipv6: addr.is_ipv6(),
            subnet: crate::spec::cache::lan_subnet(addr, len),
        })
        .collect();
    Some(CacheCtx {
        address: String::new(),
        http_port: HTTP_PORT,
        icp_port: ICP_PORT,
        dir: store.dir.clone().unwrap_or_else(|| DEFAULT_DIR.to_string()),
        disk_mb: store.disk_mb,
        memory_mb: store.memory_mb.unwrap_or(DEFAULT_CACHE_MEMORY_MB),
        max_object_mb: mesh_cache.max_object_mb.unwrap_or(DEFAULT_MAX_OBJECT_MB),
        public_only: node.public_only.unwrap_or(mesh_cache.public_only),
        lan,
        siblings: Vec::new(),
    })
}

/// The cache of node `id` with its siblings among `neighbours` (node id, name): those that run
/// the cache and have a side-net address.
pub fn for_node<'a>(
    set: &ManifestSet,
    nodes: &std::collections::BTreeMap<String, NodeRecord>,
    subnets: &std::collections::BTreeMap<(String, String), u16>,
    mesh: &Mesh,
    id: &str,
    neighbours: impl Iterator<Item = (&'a str, &'a str)>,
) -> Option<CacheCtx> {
    let manifest = set.node(id);
    let mut ctx = node_cache(mesh, manifest, profile_of(set, manifest, nodes.get(id)))?;
    let net = network_name(mesh);
    let base = mesh
        .spec
        .prefix
        .split_once('/')
        .and_then(|(a, _)| a.parse::<std::net::Ipv6Addr>().ok())?;
    for (peer, name) in neighbours {
        let m = set.node(peer);
        if storage(mesh, m, profile_of(set, m, nodes.get(peer))).is_none() {
            continue;
        }
        let Some(sid) = subnets.get(&(net.to_string(), peer.to_string())) else {
            continue;
        };
        ctx.siblings.push(SiblingCtx {
            node: peer.to_string(),
            name: name.to_string(),
            address: crate::spec::ipam::node_address(base, *sid).to_string(),
        });
    }
    Some(ctx)
}

/// `cache` with the node's side-net address filled in.
pub fn with_address(cache: Option<CacheCtx>, address: &str) -> Option<CacheCtx> {
    cache.map(|mut c| {
        c.address = address.to_string();
        c
    })
}

/// A family's requirements, plus Squid when the node runs the cache.
pub fn requires(mut family: Vec<Requirement>, cache: &Option<CacheCtx>) -> Vec<Requirement> {
    if cache.is_some() && !family.iter().any(|r| r.package == "squid") {
        family.push(requirement());
    }
    family
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;

    fn set(mesh_cache: bool) -> ManifestSet {
        let cache = if mesh_cache {
            "  cache:\n    enabled: true\n"
        } else {
            ""
        };
        let nodes = [
            ("a", "aaaaaaaaaaaaaaaa", "raspberrypi-4b-awus036acm", ""),
            ("b", "bbbbbbbbbbbbbbbb", "raspberrypi-4b-awus036acm", ""),
            (
                "c",
                "cccccccccccccccc",
                "raspberrypi-4b-awus036acm",
                "  cache:\n    enabled: false\n",
            ),
            ("d", "dddddddddddddddd", "tplink-archer-c7-v2", ""),
        ];
        let mut text = format!(
            "apiVersion: sidenet.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: m\nspec:\n  prefix: fd00:1:2::/48\n  radio:\n    country: DE\n    meshBand: 5g\n    channels:\n      5g:\n        channel: 36\n  encryption:\n    passphraseSecretRef:\n      name: m\n      key: p\n{cache}"
        );
        for (name, id, profile, extra) in nodes {
            text.push_str(&format!(
                "---\napiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata:\n  name: {name}\nspec:\n  mesh: m\n  nodeId: {id}\n  hardwareProfile: {profile}\n{extra}"
            ));
        }
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hardware-profiles");
        let mut texts = vec![(PathBuf::from("m.yaml"), text)];
        for p in ["raspberrypi-4b-awus036acm", "tplink-archer-c7-v2"] {
            let f = dir.join(format!("{p}.yaml"));
            texts.push((f.clone(), std::fs::read_to_string(f).unwrap()));
        }
        crate::spec::manifest::load_texts(&texts).unwrap()
    }

    use std::path::PathBuf;

    #[test]
    fn siblings_are_the_neighbours_that_run_the_cache() {
        let subnets: BTreeMap<(String, String), u16> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, n)| (("m".to_string(), n.repeat(16)), i as u16 + 1))
            .collect();
        let s = set(true);
        let mesh = &s.meshes["m"];
        let nbrs = [
            ("bbbbbbbbbbbbbbbb", "b"),
            ("cccccccccccccccc", "c"),
            ("dddddddddddddddd", "d"),
        ];
        let a = for_node(
            &s,
            &BTreeMap::new(),
            &subnets,
            mesh,
            "aaaaaaaaaaaaaaaa",
            nbrs.into_iter(),
        )
        .unwrap();
        // c turned it off, d's profile gives it no storage: b alone.
        assert_eq!(
            a.siblings,
            [SiblingCtx {
                node: "bbbbbbbbbbbbbbbb".into(),
                name: "b".into(),
                address: "fd00:1:2:2::1".into(),
            }]
        );
        assert_eq!((a.disk_mb, a.memory_mb), (2048, 64));
        // c and d run none themselves.
        for id in ["cccccccccccccccc", "dddddddddddddddd"] {
            assert!(for_node(&s, &BTreeMap::new(), &subnets, mesh, id, nbrs.into_iter()).is_none());
        }
        // Without the mesh's cache nobody runs it.
        let s = set(false);
        let mesh = &s.meshes["m"];
        assert!(
            for_node(
                &s,
                &BTreeMap::new(),
                &subnets,
                mesh,
                "aaaaaaaaaaaaaaaa",
                nbrs.into_iter()
            )
            .is_none()
        );
    }
}
