//! Rotating a mesh signing key without visiting any router.
//!
//! When the controller rotates a mesh key it signs an [`Endorsement`] of the new key with the
//! old one, and from then on every announcement (self-signed by the new key) carries the whole
//! chain of endorsements since the mesh's first key. An agent that pinned any key of the chain
//! follows it, checking each link with the key before it, to the key that signed the
//! announcement, and pins that ([`follow`]). An agent that was offline through several
//! rotations therefore catches up in one step, and nobody without a pinned key's endorsement can
//! take a mesh over.
//!
//! During the announced overlap (`Announce::previous_until`) agents still accept configs signed
//! by the key they had pinned before; after it, only the new key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::keys::{KeyPair, PublicKey};

/// "`previous` hands mesh `mesh` over to `key` from time `since`", signed by `previous`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsement {
    /// The old key (base64).
    pub previous: String,
    /// The new key (base64).
    pub key: String,
    /// When the rotation happened (Unix seconds).
    pub since: u64,
    /// ed25519 signature by `previous` over [`message`] (base64).
    pub signature: String,
}

/// A problem with an endorsement chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    /// A link's key or signature does not decode or does not verify.
    #[error("endorsement {index} of the key chain is invalid: {why}")]
    BadLink {
        /// Position in the chain.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The chain does not lead from the pinned key to the announcing key.
    #[error("the announcing key is not endorsed, directly or through a chain, by the pinned key")]
    NotEndorsed,
}

/// The signed bytes of an endorsement.
pub fn message(mesh: &str, previous: &PublicKey, key: &PublicKey, since: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + mesh.len() + 72);
    m.extend_from_slice(b"sidenet-endorse-v1\0");
    m.extend_from_slice(mesh.as_bytes());
    m.push(0);
    m.extend_from_slice(previous.as_bytes());
    m.extend_from_slice(key.as_bytes());
    m.extend_from_slice(&since.to_be_bytes());
    m
}

/// `previous` endorses `key` as the next signing key of `mesh`.
pub fn endorse(previous: &KeyPair, mesh: &str, key: &PublicKey, since: u64) -> Endorsement {
    let p = previous.public();
    Endorsement {
        previous: p.to_base64(),
        key: key.to_base64(),
        since,
        signature: B64.encode(previous.sign(&message(mesh, &p, key, since))),
    }
}

/// Follows `chain` from `pinned` and returns the key it leads to (the last key reachable). Links
/// before the pinned key are skipped; each link after it must be signed by the key before it.
pub fn follow(
    mesh: &str,
    chain: &[Endorsement],
    pinned: &PublicKey,
) -> Result<PublicKey, RotationError> {
    let mut cur = *pinned;
    let mut moved = false;
    for (index, e) in chain.iter().enumerate() {
        let bad = |why: String| RotationError::BadLink { index, why };
        let previous = PublicKey::from_base64(&e.previous).map_err(|e| bad(e.to_string()))?;
        if previous != cur {
            if moved {
                // A chain must be contiguous once it reached the pinned key.
                return Err(bad("it does not continue from the key before it".into()));
            }
            continue;
        }
        let key = PublicKey::from_base64(&e.key).map_err(|e| bad(e.to_string()))?;
        let sig: [u8; 64] = B64
            .decode(&e.signature)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| bad("the signature is not 64 bytes of base64".into()))?;
        previous
            .verify_strict(&message(mesh, &previous, &key, e.since), &sig)
            .map_err(|_| bad("the signature does not verify".into()))?;
        cur = key;
        moved = true;
    }
    if moved {
        Ok(cur)
    } else {
        Err(RotationError::NotEndorsed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn k(i: u8) -> KeyPair {
        KeyPair::from_seed(&[i; 32])
    }

    #[test]
    fn follows_chains_from_any_pinned_key() {
        let (k0, k1, k2) = (k(1), k(2), k(3));
        let chain = vec![
            endorse(&k0, "m", &k1.public(), 10),
            endorse(&k1, "m", &k2.public(), 20),
        ];
        assert_eq!(follow("m", &chain, &k0.public()).unwrap(), k2.public());
        assert_eq!(follow("m", &chain, &k1.public()).unwrap(), k2.public());
        // Already on the last key, or a key not in the chain: nothing to follow.
        assert_eq!(
            follow("m", &chain, &k2.public()),
            Err(RotationError::NotEndorsed)
        );
        assert_eq!(
            follow("m", &chain, &k(9).public()),
            Err(RotationError::NotEndorsed)
        );
        // Another mesh's endorsement does not verify here.
        assert!(matches!(
            follow("other", &chain, &k0.public()),
            Err(RotationError::BadLink { index: 0, .. })
        ));
    }

    #[test]
    fn refuses_forged_and_broken_links() {
        let (k0, k1, evil) = (k(1), k(2), k(7));
        // Signed by someone else, claiming to be k0.
        let mut forged = endorse(&evil, "m", &evil.public(), 10);
        forged.previous = k0.public().to_base64();
        assert!(matches!(
            follow("m", &[forged], &k0.public()),
            Err(RotationError::BadLink { .. })
        ));
        // A real link with its target swapped.
        let mut swapped = endorse(&k0, "m", &k1.public(), 10);
        swapped.key = evil.public().to_base64();
        assert!(follow("m", &[swapped], &k0.public()).is_err());
        // A gap after the pinned key.
        let chain = vec![
            endorse(&k0, "m", &k1.public(), 10),
            endorse(&evil, "m", &k(8).public(), 20),
        ];
        assert!(matches!(
            follow("m", &chain, &k0.public()),
            Err(RotationError::BadLink { index: 1, .. })
        ));
        // Garbage signature.
        let mut garbage = endorse(&k0, "m", &k1.public(), 10);
        garbage.signature = "AAAA".into();
        assert!(follow("m", &[garbage], &k0.public()).is_err());
    }
}
