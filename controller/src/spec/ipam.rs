//! Address allocation: each node gets its own /64 out of the mesh's /48.
//!
//! The subnet id (16 bits) is derived from a hash of mesh and node id, so the same node gets the
//! same /64 on any controller, and moves only when that /64 is already taken (linear probing).
//! Subnet 0 is reserved for mesh-wide services. Allocations are stored, so a node keeps its /64
//! even if another node that hashed to the same slot shows up later.

use std::net::Ipv6Addr;

use sidenet_wire::codec::sha256;

/// The preferred subnet id of a node.
pub fn preferred(mesh: &str, node: &str) -> u16 {
    let h = sha256(format!("{mesh}\0{node}").as_bytes());
    u16::from_be_bytes([h[0], h[1]])
}

/// Allocates a subnet id for `node`, skipping ids for which `taken` is true. `None` when all
/// 65,535 subnets are in use.
pub fn allocate(mesh: &str, node: &str, taken: impl Fn(u16) -> bool) -> Option<u16> {
    let start = preferred(mesh, node);
    (0..=u16::MAX)
        .map(|i| start.wrapping_add(i))
        .find(|&id| id != 0 && !taken(id))
}

/// The /64 with subnet id `id` inside the /48 starting at `base`.
pub fn subnet(base: Ipv6Addr, id: u16) -> Ipv6Addr {
    let mut s = base.segments();
    s[3] = id;
    s[4..].fill(0);
    Ipv6Addr::from(s)
}

/// The node's own address in its /64 (`::1`).
pub fn node_address(base: Ipv6Addr, id: u16) -> Ipv6Addr {
    let mut s = subnet(base, id).segments();
    s[7] = 1;
    Ipv6Addr::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn deterministic_and_collision_free() {
        let mut used = BTreeSet::new();
        for i in 0..5000 {
            let node = format!("node{i}");
            let id = allocate("riverside", &node, |x| used.contains(&x));
            let id = id.unwrap_or(0);
            assert_ne!(id, 0);
            assert!(used.insert(id), "duplicate {id}");
        }
        assert_eq!(preferred("m", "n"), preferred("m", "n"));
    }

    #[test]
    fn formats_subnets() {
        let base: Ipv6Addr = "fd5e:1d0e:7a00::".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        assert_eq!(subnet(base, 0x1c2d).to_string(), "fd5e:1d0e:7a00:1c2d::");
        assert_eq!(
            node_address(base, 0x1c2d).to_string(),
            "fd5e:1d0e:7a00:1c2d::1"
        );
    }

    #[test]
    fn full_space_reports_none() {
        assert_eq!(allocate("m", "n", |_| true), None);
    }
}
