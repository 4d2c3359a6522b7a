//! The discovery beacon: how agents find their neighbours on a radio link where only link-local
//! addresses exist (802.11s, or any layer-2 segment without a shared subnet).
//!
//! Every agent sends one beacon every few seconds, as one UDP datagram from its link-local
//! address to `ff02::1` port [`PORT`] on each of its underlay interfaces. A beacon names the
//! mesh, carries the sender's node key (its node id is derived from it) and WireGuard public
//! key, a send time and a sequence number, and is signed by the node key. A receiver accepts a
//! beacon only when it verifies, names its own mesh, comes from another node, was sent within
//! [`MAX_SKEW_S`] of the receiver's clock, and is newer (time, then sequence) than the last one
//! it accepted from that node. The receiver reports the beacon's *source address* and the
//! interface it arrived on: that is where the sender's WireGuard listens for it.
//!
//! # Frame (all integers big-endian)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `SNB1` (ASCII) |
//! | 4 | 1 | `L`: length of the mesh name, 1–32 |
//! | 5 | `L` | the mesh name (as [`crate::names::check_mesh_name`] allows) |
//! | 5+L | 32 | the sender's node public key (ed25519) |
//! | 37+L | 32 | the sender's WireGuard public key (X25519) |
//! | 69+L | 8 | send time, Unix seconds |
//! | 77+L | 8 | sequence number (counts up from 0 in each run of the agent) |
//! | 85+L | 64 | ed25519 signature (RFC 8032, checked strictly) over [`CONTEXT`] followed by bytes 0 to 85+L |
//!
//! A frame is exactly 149+L bytes; anything else is refused.

use crate::keys::{KeyPair, PublicKey};
use crate::names::{MESH_NAME_MAX, check_mesh_name, check_node_id};

/// UDP port beacons are sent to (on `ff02::1`, from the sender's link-local address).
pub const PORT: u16 = 6697;
/// The frame's first four bytes.
pub const MAGIC: &[u8; 4] = b"SNB1";
/// Signed before the frame's bytes (domain separation from every other signature of a node).
pub const CONTEXT: &[u8] = b"sidenet-beacon-v1\0";
/// A beacon whose send time is further than this from the receiver's clock is refused.
pub const MAX_SKEW_S: u64 = 120;
/// Length of the fixed part of a frame (everything but the mesh name).
pub const FIXED_LEN: usize = 4 + 1 + 32 + 32 + 8 + 8 + 64;

/// A beacon's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beacon {
    /// Mesh name.
    pub mesh: String,
    /// The sender's node key.
    pub node_key: PublicKey,
    /// The sender's WireGuard public key (raw).
    pub wireguard: [u8; 32],
    /// Send time, Unix seconds.
    pub time: u64,
    /// Sequence number.
    pub seq: u64,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("beacon refused: {0}")]
pub struct BeaconError(pub String);

impl Beacon {
    /// The sender's node id.
    pub fn node(&self) -> String {
        self.node_key.node_id()
    }

    /// The frame, signed with `key` (whose public half must be [`Beacon::node_key`]).
    pub fn seal(&self, key: &KeyPair) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_LEN + self.mesh.len());
        b.extend_from_slice(MAGIC);
        b.push(self.mesh.len() as u8);
        b.extend_from_slice(self.mesh.as_bytes());
        b.extend_from_slice(self.node_key.as_bytes());
        b.extend_from_slice(&self.wireguard);
        b.extend_from_slice(&self.time.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&b);
        b.extend_from_slice(&key.sign(&msg));
        b
    }

    /// Parses and verifies a frame (signature, sizes, names). Mesh, sender, time and replay
    /// are the receiver's checks ([`Beacon::accept`]).
    pub fn open(frame: &[u8]) -> Result<Self, BeaconError> {
        let bad = |m: &str| BeaconError(m.to_string());
        if frame.len() < FIXED_LEN + 1 || frame[..4] != MAGIC[..] {
            return Err(bad("not a sidenet beacon"));
        }
        let l = usize::from(frame[4]);
        if l == 0 || l > MESH_NAME_MAX || frame.len() != FIXED_LEN + l {
            return Err(bad("wrong length"));
        }
        let mesh = std::str::from_utf8(&frame[5..5 + l]).map_err(|_| bad("mesh name"))?;
        check_mesh_name(mesh).map_err(|e| BeaconError(e.to_string()))?;
        let at = |o: usize| 5 + l + o;
        let arr32 = |o: usize| -> [u8; 32] {
            let mut a = [0u8; 32];
            a.copy_from_slice(&frame[at(o)..at(o) + 32]);
            a
        };
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&frame[at(o)..at(o) + 8]);
            u64::from_be_bytes(a)
        };
        let node_key = PublicKey::from_bytes(&arr32(0)).map_err(|e| BeaconError(e.0))?;
        let signed = at(80);
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&frame[signed..]);
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&frame[..signed]);
        node_key
            .verify_strict(&msg, &sig)
            .map_err(|e| BeaconError(e.0))?;
        let b = Self {
            mesh: mesh.to_string(),
            node_key,
            wireguard: arr32(32),
            time: u64_at(64),
            seq: u64_at(72),
        };
        check_node_id(&b.node()).map_err(|e| BeaconError(e.to_string()))?;
        Ok(b)
    }

    /// The receiver's checks: `mesh` is the receiver's mesh, `me` its node id, `now` its clock
    /// (Unix seconds), `last` the (time, seq) of the last beacon accepted from this sender.
    pub fn accept(
        &self,
        mesh: &str,
        me: &str,
        now: u64,
        last: Option<(u64, u64)>,
    ) -> Result<(), BeaconError> {
        if self.mesh != mesh {
            return Err(BeaconError(format!("for mesh {:?}", self.mesh)));
        }
        if self.node() == me {
            return Err(BeaconError("our own".into()));
        }
        if self.time.abs_diff(now) > MAX_SKEW_S {
            return Err(BeaconError(format!(
                "sent at {} but the time here is {now} (more than {MAX_SKEW_S} s apart)",
                self.time
            )));
        }
        if last.is_some_and(|l| (self.time, self.seq) <= l) {
            return Err(BeaconError("replayed (not newer than the last one)".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn beacon(key: &KeyPair) -> Beacon {
        Beacon {
            mesh: "riverside".into(),
            node_key: key.public(),
            wireguard: [7u8; 32],
            time: 1_800_000_000,
            seq: 3,
        }
    }

    #[test]
    fn frame_layout_is_as_documented() {
        let key = KeyPair::from_seed(&[1u8; 32]);
        let b = beacon(&key);
        let f = b.seal(&key);
        assert_eq!(f.len(), 149 + 9);
        assert_eq!(&f[..5], b"SNB1\x09");
        assert_eq!(&f[5..14], b"riverside");
        assert_eq!(&f[14..46], key.public().as_bytes());
        assert_eq!(&f[46..78], &[7u8; 32]);
        assert_eq!(&f[78..86], &1_800_000_000u64.to_be_bytes());
        assert_eq!(&f[86..94], &3u64.to_be_bytes());
        // The signature covers the context and everything before it.
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&f[..94]);
        let sig: [u8; 64] = f[94..].try_into().unwrap();
        assert!(key.public().verify_strict(&msg, &sig).is_ok());
        assert_eq!(Beacon::open(&f).unwrap(), b);
    }

    #[test]
    fn tampered_truncated_and_foreign_frames_are_refused() {
        let key = KeyPair::from_seed(&[1u8; 32]);
        let f = beacon(&key).seal(&key);
        for i in [0, 4, 10, 20, 50, 80, 90, 100, 157] {
            let mut t = f.clone();
            t[i] ^= 1;
            assert!(Beacon::open(&t).is_err(), "byte {i} flipped but accepted");
        }
        assert!(Beacon::open(&f[..f.len() - 1]).is_err());
        let mut long = f.clone();
        long.push(0);
        assert!(Beacon::open(&long).is_err());
        // Someone else's key cannot sign for this node.
        let other = KeyPair::from_seed(&[2u8; 32]);
        let forged = beacon(&key).seal(&other);
        assert!(Beacon::open(&forged).is_err());
    }

    #[test]
    fn receivers_refuse_other_meshes_themselves_stale_and_replayed_beacons() {
        let key = KeyPair::from_seed(&[1u8; 32]);
        let b = Beacon::open(&beacon(&key).seal(&key)).unwrap();
        let now = 1_800_000_050;
        assert!(b.accept("riverside", "me", now, None).is_ok());
        assert!(
            b.accept("riverside", "me", now, Some((1_800_000_000, 2)))
                .is_ok()
        );
        assert!(b.accept("oak", "me", now, None).is_err());
        assert!(b.accept("riverside", &b.node(), now, None).is_err());
        assert!(b.accept("riverside", "me", now + MAX_SKEW_S, None).is_err());
        assert!(b.accept("riverside", "me", 1_700_000_000, None).is_err());
        assert!(
            b.accept("riverside", "me", now, Some((1_800_000_000, 3)))
                .is_err()
        );
        assert!(
            b.accept("riverside", "me", now, Some((1_800_000_001, 0)))
                .is_err()
        );
    }
}
