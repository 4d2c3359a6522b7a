//! ed25519 keys: the mesh signing key, node keys, node ids and key file encoding.
//!
//! Public keys are written as standard base64 (44 characters, like WireGuard keys). A secret key
//! file holds the 32-byte seed as base64 on one line. Randomness comes from the caller (the
//! controller and agent use the operating system's generator), which keeps this crate free of I/O.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::codec::{base32, sha256};

/// Bytes of the public key digest that make up a node id (80 bits → 16 base32 characters).
const NODE_ID_BYTES: usize = 10;

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub(crate) VerifyingKey);

impl PublicKey {
    /// Parses a base64 public key, refusing weak (small-order) points.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let raw = B64
            .decode(s.trim())
            .map_err(|e| KeyError(format!("public key is not valid base64: {e}")))?;
        let arr: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KeyError(format!("public key must be 32 bytes, got {}", raw.len())))?;
        Self::from_bytes(&arr)
    }

    /// From raw bytes, refusing weak (small-order) points.
    pub fn from_bytes(b: &[u8; 32]) -> Result<Self, KeyError> {
        let vk = VerifyingKey::from_bytes(b)
            .map_err(|_| KeyError("public key is not a valid ed25519 point".into()))?;
        if vk.is_weak() {
            return Err(KeyError("public key is a weak (small-order) point".into()));
        }
        Ok(Self(vk))
    }

    /// Standard base64.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.as_bytes())
    }

    /// Checks an ed25519 signature strictly (no malleable signatures, no weak keys).
    pub fn verify_strict(&self, msg: &[u8], sig: &[u8; 64]) -> Result<(), KeyError> {
        self.0
            .verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig))
            .map_err(|e| KeyError(format!("signature does not verify: {e}")))
    }

    /// Raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// The node id this key proves: base32 of the first 80 bits of SHA-256(public key).
    /// Nobody can claim an id without holding the matching secret key.
    pub fn node_id(&self) -> String {
        base32(&sha256(self.0.as_bytes())[..NODE_ID_BYTES])
    }

    /// A short fingerprint for logs and prompts (first 16 hex digits of SHA-256).
    pub fn fingerprint(&self) -> String {
        crate::codec::hex(&sha256(self.0.as_bytes())[..8])
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// An ed25519 signing key. Debug output never shows the secret.
#[derive(Clone)]
pub struct KeyPair(SigningKey);

/// The mesh signing key (trust anchor of a mesh).
pub type MeshKey = KeyPair;
/// A node's own key, generated on the device.
pub type NodeKey = KeyPair;

impl KeyPair {
    /// From a 32-byte seed (use a cryptographic random source).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// Reads the contents of a secret key file (base64 seed).
    pub fn from_file_text(text: &str) -> Result<Self, KeyError> {
        let raw = B64
            .decode(text.trim())
            .map_err(|e| KeyError(format!("secret key is not valid base64: {e}")))?;
        let seed: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KeyError(format!("secret key must be 32 bytes, got {}", raw.len())))?;
        Ok(Self::from_seed(&seed))
    }

    /// The contents of a secret key file (base64 seed and a newline).
    pub fn to_file_text(&self) -> String {
        format!("{}\n", B64.encode(self.0.to_bytes()))
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `msg` (RFC 8032 ed25519).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    /// The 32-byte seed (the secret itself).
    pub(crate) fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The X25519 secret scalar of this key (first half of SHA-512(seed), clamped by the
    /// multiplication), for opening sealed secrets.
    pub(crate) fn x25519_scalar(&self) -> [u8; 32] {
        self.0.to_scalar_bytes()
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair(public: {})", self.public())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_derived_and_stable() {
        let k = KeyPair::from_seed(&[7u8; 32]);
        let id = k.public().node_id();
        assert_eq!(id.len(), 16);
        assert!(crate::names::check_node_id(&id).is_ok());
        assert_eq!(id, KeyPair::from_seed(&[7u8; 32]).public().node_id());
        assert_ne!(id, KeyPair::from_seed(&[8u8; 32]).public().node_id());
    }

    #[test]
    fn key_file_round_trip_and_debug_hides_secret() {
        let k = KeyPair::from_seed(&[9u8; 32]);
        let text = k.to_file_text();
        let k2 = KeyPair::from_file_text(&text).ok();
        assert_eq!(k2.map(|k| k.public()), Some(k.public()));
        assert!(!format!("{k:?}").contains(text.trim()));
    }

    #[test]
    fn public_key_parsing_refuses_garbage() {
        assert!(PublicKey::from_base64("not base64!").is_err());
        assert!(PublicKey::from_base64("AAAA").is_err());
        // The identity point is a small-order point.
        let mut id = [0u8; 32];
        id[0] = 1;
        assert!(PublicKey::from_bytes(&id).is_err());
        let k = KeyPair::from_seed(&[1u8; 32]).public();
        assert_eq!(PublicKey::from_base64(&k.to_base64()).ok(), Some(k));
    }
}
