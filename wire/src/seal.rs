//! Secrets sealed to one node: the mesh passphrase (and any other secret a config carries) is
//! encrypted to the receiving node's own key, so the broker, other nodes and anyone reading the
//! retained config topics see only ciphertext.
//!
//! The controller renders a placeholder ([`placeholder`]) where a secret goes in a file and puts
//! the sealed value in [`crate::messages::NodeConfig::sealed`]; the agent opens it with its node
//! key after the envelope's signature checked out and fills the placeholders in before anything
//! is written.
//!
//! Construction (an ECIES over the node's ed25519 key, like libsodium's sealed boxes):
//!
//! - recipient X25519 key: the node's ed25519 public key in Montgomery form (RFC 7748 birational
//!   map; libsodium `crypto_sign_ed25519_pk_to_curve25519`), its secret the clamped first half of
//!   SHA-512(seed) (`crypto_sign_ed25519_sk_to_curve25519`). Using one key for signing and for
//!   X25519 is proven safe for this combination (Thormarker, "On using the same key pair for
//!   Ed25519 and an X25519 based KEM", 2021) and spares a second key exchange at enrolment.
//! - ephemeral X25519 key `e`, `shared = X25519(e, recipient)`;
//!   `key = SHA-256("sidenet-seal-v1" ‖ shared ‖ E ‖ recipient)`;
//!   ChaCha20-Poly1305 (RFC 8439) with a zero nonce (each key encrypts one message) and
//!   associated data `"sidenet-seal-v1" 0 mesh 0 node 0 name`, so a sealed value cannot be moved
//!   to another mesh, node or secret name.
//! - sealed value: base64 of `E (32) ‖ ciphertext ‖ tag (16)`.
//!
//! The ephemeral key is derived from the sealer's secret key, the recipient, the context and the
//! plaintext. Sealing the same secret for the same node twice gives the same bytes, so an
//! unchanged config renders to an unchanged body (no new revision) — and equal values are all a
//! reader could learn, which an unchanged body shows anyway. `tests/peers/open_sealed.py` opens
//! these values with libsodium's primitives from this description alone.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use curve25519_dalek::montgomery::MontgomeryPoint;
use sha2::{Digest, Sha256};

use crate::keys::{KeyPair, PublicKey};

const LABEL: &[u8] = b"sidenet-seal-v1";

/// Name of the sealed mesh passphrase in configs (`NodeConfig::sealed`).
pub const MESH_PASSPHRASE: &str = "mesh-passphrase";

/// Name of the node's own broker password in configs (`NodeConfig::sealed`): the agent logs in
/// to the broker with its node id as username and this password once it has it.
pub const MQTT_PASSWORD: &str = "mqtt-password";

/// Where a sealed secret goes in a rendered file.
pub fn placeholder(name: &str) -> String {
    format!("@sidenet-secret:{name}@")
}

/// Opening a sealed secret failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not base64, or too short.
    #[error("sealed secret {0:?} is malformed")]
    Malformed(String),
    /// Wrong key, wrong context, or tampered.
    #[error("sealed secret {0:?} does not open with this node's key")]
    Open(String),
    /// A file names a secret the config does not carry.
    #[error("the config uses secret {0:?} but carries no sealed value for it")]
    Missing(String),
}

/// What a sealed value is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Mesh network name.
    pub mesh: &'a str,
    /// Recipient node id.
    pub node: &'a str,
    /// Secret name (`mesh-passphrase`).
    pub name: &'a str,
}

impl Context<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(LABEL.len() + self.mesh.len() + self.node.len() + 40);
        v.extend_from_slice(LABEL);
        for part in [self.mesh, self.node, self.name] {
            v.push(0);
            v.extend_from_slice(part.as_bytes());
        }
        v
    }
}

fn cipher(
    shared: &MontgomeryPoint,
    eph: &MontgomeryPoint,
    to: &MontgomeryPoint,
) -> ChaCha20Poly1305 {
    let mut h = Sha256::new();
    h.update(LABEL);
    h.update(shared.as_bytes());
    h.update(eph.as_bytes());
    h.update(to.as_bytes());
    let k: [u8; 32] = h.finalize().into();
    ChaCha20Poly1305::new(&Key::from(k))
}

/// Seals `secret` for the node whose key is `to`; `sealer` is the mesh signing key (it only
/// seeds the ephemeral key).
pub fn seal(sealer: &KeyPair, to: &PublicKey, ctx: Context<'_>, secret: &[u8]) -> String {
    let aad = ctx.aad();
    let mut h = Sha256::new();
    h.update(b"sidenet-seal-v1 ephemeral");
    h.update(sealer.seed());
    h.update(to.as_bytes());
    h.update((aad.len() as u64).to_be_bytes());
    h.update(&aad);
    h.update(secret);
    let e: [u8; 32] = h.finalize().into();
    let eph = MontgomeryPoint::mul_base_clamped(e);
    let recipient = to.0.to_montgomery();
    let shared = recipient.mul_clamped(e);
    // Encryption with a fresh 32-byte key cannot fail for inputs of this size.
    let ct = cipher(&shared, &eph, &recipient)
        .encrypt(
            &Nonce::default(),
            Payload {
                msg: secret,
                aad: &aad,
            },
        )
        .unwrap_or_default();
    let mut out = Vec::with_capacity(32 + ct.len());
    out.extend_from_slice(eph.as_bytes());
    out.extend_from_slice(&ct);
    B64.encode(out)
}

/// Opens a value sealed to `me`.
pub fn open(me: &KeyPair, ctx: Context<'_>, sealed: &str) -> Result<Vec<u8>, SealError> {
    let raw = B64
        .decode(sealed.trim())
        .map_err(|_| SealError::Malformed(ctx.name.into()))?;
    if raw.len() < 32 + 16 {
        return Err(SealError::Malformed(ctx.name.into()));
    }
    let (e, ct) = raw.split_at(32);
    let mut eb = [0u8; 32];
    eb.copy_from_slice(e);
    let eph = MontgomeryPoint(eb);
    let recipient = me.public().0.to_montgomery();
    let shared = eph.mul_clamped(me.x25519_scalar());
    if shared.as_bytes().iter().all(|b| *b == 0) {
        // A low-order ephemeral point: refuse rather than derive a key anyone knows.
        return Err(SealError::Open(ctx.name.into()));
    }
    cipher(&shared, &eph, &recipient)
        .decrypt(
            &Nonce::default(),
            Payload {
                msg: ct,
                aad: &ctx.aad(),
            },
        )
        .map_err(|_| SealError::Open(ctx.name.into()))
}

/// Replaces every [`placeholder`] in `text` with the opened secret of that name, looked up by
/// `secret`. Returns the text unchanged when it has no placeholder.
pub fn fill(
    text: &str,
    secret: &mut dyn FnMut(&str) -> Result<String, SealError>,
) -> Result<String, SealError> {
    const START: &str = "@sidenet-secret:";
    if !text.contains(START) {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(START) {
        out.push_str(&rest[..i]);
        let after = &rest[i + START.len()..];
        let Some(end) = after.find('@') else {
            out.push_str(&rest[i..]);
            return Ok(out);
        };
        let name = &after[..end];
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if valid {
            out.push_str(&secret(name)?);
        } else {
            out.push_str(&rest[i..i + START.len() + end + 1]);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ctx<'a>(node: &'a str) -> Context<'a> {
        Context {
            mesh: "riverside",
            node,
            name: "mesh-passphrase",
        }
    }

    #[test]
    fn seals_and_opens_only_for_the_recipient_and_context() {
        let mesh = KeyPair::from_seed(&[1; 32]);
        let y = KeyPair::from_seed(&[2; 32]);
        let x = KeyPair::from_seed(&[3; 32]);
        let yid = y.public().node_id();
        let s = seal(&mesh, &y.public(), ctx(&yid), b"correct horse");
        assert!(!s.contains("correct"));
        assert_eq!(open(&y, ctx(&yid), &s).unwrap(), b"correct horse");
        // Another node's key, another node id, another name: refused.
        assert!(matches!(open(&x, ctx(&yid), &s), Err(SealError::Open(_))));
        let xid = x.public().node_id();
        assert!(open(&y, ctx(&xid), &s).is_err());
        let other = Context {
            name: "other",
            ..ctx(&yid)
        };
        assert!(open(&y, other, &s).is_err());
        // Deterministic: same inputs, same bytes; another secret, other bytes.
        assert_eq!(s, seal(&mesh, &y.public(), ctx(&yid), b"correct horse"));
        assert_ne!(s, seal(&mesh, &y.public(), ctx(&yid), b"correct horsf"));
        // Tampering and garbage.
        let mut raw = B64.decode(&s).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1;
        assert!(open(&y, ctx(&yid), &B64.encode(&raw)).is_err());
        assert!(matches!(
            open(&y, ctx(&yid), "!!"),
            Err(SealError::Malformed(_))
        ));
        assert!(matches!(
            open(&y, ctx(&yid), "AAAA"),
            Err(SealError::Malformed(_))
        ));
        // A low-order point as the ephemeral key.
        let mut zero = vec![0u8; 32 + 16 + 3];
        zero[0] = 0;
        assert!(open(&y, ctx(&yid), &B64.encode(&zero)).is_err());
    }

    #[test]
    fn fills_placeholders() {
        let mut lookup = |n: &str| match n {
            "mesh-passphrase" => Ok("pw".to_string()),
            other => Err(SealError::Missing(other.into())),
        };
        assert_eq!(
            fill("key '@sidenet-secret:mesh-passphrase@' x", &mut lookup).unwrap(),
            "key 'pw' x"
        );
        assert_eq!(
            fill("no secrets @ here", &mut lookup).unwrap(),
            "no secrets @ here"
        );
        assert_eq!(
            fill(
                "@sidenet-secret:mesh-passphrase@@sidenet-secret:mesh-passphrase@",
                &mut lookup
            )
            .unwrap(),
            "pwpw"
        );
        assert!(matches!(
            fill("@sidenet-secret:psk@", &mut lookup),
            Err(SealError::Missing(_))
        ));
        // Not a placeholder (bad name, unterminated): left as it is.
        assert_eq!(
            fill("@sidenet-secret:A B@", &mut lookup).unwrap(),
            "@sidenet-secret:A B@"
        );
        assert_eq!(
            fill("@sidenet-secret:x", &mut lookup).unwrap(),
            "@sidenet-secret:x"
        );
    }
}
