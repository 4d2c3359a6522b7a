//! Address allocation: each node gets its own /64 out of the mesh's /48.
//!
//! The subnet id (16 bits) is derived from a hash of mesh and node id, so the same node gets the
//! same /64 on any controller, and moves only when that /64 is already taken (linear probing).
//! Subnet 0 is reserved for mesh-wide services, so a mesh holds at most [`SUBNETS`] nodes
//! (`validate` refuses a mesh with more `MeshNode`s). Allocations are stored, so a node keeps its
//! /64 even if another node that hashed to the same slot shows up later.
//!
//! The ids taken in a mesh are a bitmap ([`Taken`]): finding the next free id looks at 64 ids
//! per step, so even in a nearly full /48 one allocation costs at most 1,024 steps, and filling
//! a whole /48 takes milliseconds, not the quadratic time of probing one id at a time.

use std::net::Ipv6Addr;

use sidenet_wire::codec::sha256;

/// The preferred subnet id of a node.
pub fn preferred(mesh: &str, node: &str) -> u16 {
    let h = sha256(format!("{mesh}\0{node}").as_bytes());
    u16::from_be_bytes([h[0], h[1]])
}

/// How many nodes a mesh's /48 holds: one /64 each, subnet 0 reserved.
pub const SUBNETS: usize = 65_535;

/// The subnet ids taken in one mesh (a 65,536-bit bitmap, 8 KiB; subnet 0 is never handed out).
#[derive(Clone, PartialEq, Eq)]
pub struct Taken {
    words: Box<[u64; 1024]>,
    count: usize,
}

impl Default for Taken {
    fn default() -> Self {
        Self {
            words: Box::new([0; 1024]),
            count: 0,
        }
    }
}

impl std::fmt::Debug for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Taken {
    /// Whether `id` is taken.
    pub fn contains(&self, id: &u16) -> bool {
        self.words[usize::from(*id) / 64] & (1 << (id % 64)) != 0
    }

    /// Marks `id` taken; false if it already was.
    pub fn insert(&mut self, id: u16) -> bool {
        let (w, bit) = (usize::from(id) / 64, 1u64 << (id % 64));
        let new = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.count += usize::from(new);
        new
    }

    /// Frees `id`; false if it was not taken.
    pub fn remove(&mut self, id: &u16) -> bool {
        let (w, bit) = (usize::from(*id) / 64, 1u64 << (id % 64));
        let was = self.words[w] & bit != 0;
        self.words[w] &= !bit;
        self.count -= usize::from(was);
        was
    }

    /// How many ids are taken.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no id is taken.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The taken ids, in order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..=u16::MAX).filter(|id| self.contains(id))
    }

    /// The first id at or after `start` (wrapping around) that is neither taken nor 0.
    fn next_free(&self, start: u16) -> Option<u16> {
        let s = usize::from(start);
        // Word by word from start's word, once around, then start's word again for the ids
        // below start.
        for step in 0..=1024 {
            let w = (s / 64 + step) % 1024;
            let mut free = !self.words[w];
            if w == 0 {
                free &= !1; // subnet 0
            }
            if step == 0 {
                free &= u64::MAX << (s % 64);
            } else if step == 1024 {
                free &= !(u64::MAX << (s % 64));
            }
            if free != 0 {
                return u16::try_from(w * 64 + free.trailing_zeros() as usize).ok();
            }
        }
        None
    }
}

/// Allocates a subnet id for `node`: its preferred id, or the next one up (wrapping around) that
/// is not in `taken`. `None` when all [`SUBNETS`] subnets are in use.
pub fn allocate(mesh: &str, node: &str, taken: &Taken) -> Option<u16> {
    taken.next_free(preferred(mesh, node))
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn deterministic_and_collision_free() {
        let mut used = Taken::default();
        for i in 0..5000 {
            let node = format!("node{i}");
            let id = allocate("riverside", &node, &used);
            let id = id.unwrap_or(0);
            assert_ne!(id, 0);
            assert!(used.insert(id), "duplicate {id}");
        }
        assert_eq!(used.len(), 5000);
        assert_eq!(preferred("m", "n"), preferred("m", "n"));
    }

    /// The same answer as probing one id at a time, upwards from the preferred id.
    fn probe(start: u16, taken: &Taken) -> Option<u16> {
        (0..=u16::MAX)
            .map(|i| start.wrapping_add(i))
            .find(|&id| id != 0 && !taken.contains(&id))
    }

    #[test]
    fn the_bitmap_finds_what_probing_finds() {
        let mut t = Taken::default();
        for id in (0..=u16::MAX).filter(|i| i % 7 != 3 && *i != 64 && *i != 65_535) {
            t.insert(id);
        }
        for start in [0, 1, 3, 4, 63, 64, 65, 66, 127, 128, 65_534, 65_535, 40_000] {
            assert_eq!(t.next_free(start), probe(start, &t), "from {start}");
        }
        // Only ids below the start are free: the search wraps around.
        let mut t = Taken::default();
        for id in 100..=u16::MAX {
            t.insert(id);
        }
        assert_eq!(t.next_free(150), Some(1));
        t.remove(&1);
        assert_eq!(t.next_free(150), Some(1));
        for id in 1..100 {
            t.insert(id);
        }
        t.remove(&120);
        // The free id is in start's own word, below start.
        assert_eq!(t.next_free(125), Some(120));
        assert_eq!(t.next_free(120), Some(120));
    }

    #[test]
    fn a_whole_48_fills_quickly() {
        let started = std::time::Instant::now();
        let mut t = Taken::default();
        for i in 0..SUBNETS {
            let id = allocate("riverside", &format!("n{i}"), &t).unwrap();
            assert!(t.insert(id));
        }
        assert_eq!(t.len(), SUBNETS);
        assert!(!t.contains(&0));
        assert_eq!(allocate("riverside", "one-more", &t), None);
        // Probing one id at a time took minutes here (quadratic in the mesh size).
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
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
        let mut t = Taken::default();
        for id in 1..=u16::MAX {
            t.insert(id);
        }
        assert_eq!(allocate("m", "n", &t), None);
        t.remove(&77);
        assert_eq!(allocate("m", "n", &t), Some(77));
    }
}
