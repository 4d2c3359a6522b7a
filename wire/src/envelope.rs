//! Signed envelopes.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "SNET"
//!      4     1  format version (1)
//!      5     1  kind (1 announce, 2 config, 3 enroll, 4 status, 5 ack)
//!      6     2  header length, big endian (at most 4096)
//!      8    32  signer's ed25519 public key
//!     40    64  ed25519 signature over bytes 0..40 followed by the header
//!    104     n  header: compact JSON (mesh, node, epoch, rev, iat, exp, len, sha256)
//!  104+n     …  body: `len` bytes whose SHA-256 is `sha256`
//! ```
//!
//! Only the fixed prefix and the header are signed; the header pins the body by length and
//! SHA-256. Signing cost therefore does not grow with the body (ed25519 hashes its message
//! twice), and the receiver hashes the body once. The signature also covers the kind and the
//! signer key, so a status report can never be replayed as an enrolment, nor a config as an
//! announcement.
//!
//! A receiver calls [`Envelope::parse`] (size cap, framing), then [`Envelope::verify`]
//! (signature with `verify_strict`, header, body hash) and then [`Verified::check`] (mesh, node,
//! revision, expiry). The body is parsed only after all three succeeded.

use std::cmp::Ordering;
use std::fmt;

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};

use crate::codec::{hex, sha256};
use crate::keys::{KeyPair, PublicKey};

pub(crate) const MAGIC: &[u8; 4] = b"SNET";
pub(crate) const VERSION: u8 = 1;
pub(crate) const PREFIX: usize = 8 + 32;
pub(crate) const FIXED: usize = PREFIX + 64;
/// Largest header accepted.
pub const MAX_HEADER: usize = 4096;
/// Default cap on a whole envelope (configs are a few KiB).
pub const DEFAULT_MAX_ENVELOPE: usize = 256 * 1024;

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The controller's mesh announcement.
    Announce = 1,
    /// A node config.
    Config = 2,
    /// A node's enrolment request.
    Enroll = 3,
    /// A node's status report.
    Status = 4,
    /// The controller's acknowledgement of a status report (confirms a config on trial).
    Ack = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Announce),
            2 => Some(Self::Config),
            3 => Some(Self::Enroll),
            4 => Some(Self::Status),
            5 => Some(Self::Ack),
            _ => None,
        }
    }
}

/// A revision: compared by epoch first, then counter.
///
/// The epoch is fixed when a controller's state is created (Unix seconds); the counter increases
/// by one per new config of a node. A controller whose state was lost starts a new, later epoch,
/// so its first revision still compares greater than anything an agent applied before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Revision {
    /// State epoch (Unix seconds when the controller state was created).
    pub epoch: u64,
    /// Counter within the epoch, starting at 1.
    pub rev: u64,
}

impl PartialOrd for Revision {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Revision {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.epoch, self.rev).cmp(&(other.epoch, other.rev))
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.rev)
    }
}

/// The signed header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Mesh name.
    pub mesh: String,
    /// Target node (config) or sending node (enroll, status); absent for announcements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Revision epoch.
    pub epoch: u64,
    /// Revision counter (configs) or sequence number (node messages).
    pub rev: u64,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// Body length in bytes.
    pub len: u64,
    /// Body SHA-256, lowercase hex.
    pub sha256: String,
}

impl Header {
    /// The revision this header names.
    pub fn revision(&self) -> Revision {
        Revision {
            epoch: self.epoch,
            rev: self.rev,
        }
    }
}

/// Why an envelope was refused. Every variant is a reason to keep the last good state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Bigger than the receiver's cap; refused before anything else.
    TooLarge { len: usize, max: usize },
    /// Shorter than its framing says.
    Truncated,
    /// Not a sidenet envelope.
    BadMagic,
    /// A format version this build does not speak.
    UnsupportedVersion(u8),
    /// Unknown kind byte.
    UnknownKind(u8),
    /// A different kind than expected.
    WrongKind { expected: Kind, got: Kind },
    /// The header length is over [`MAX_HEADER`].
    HeaderTooLarge(usize),
    /// Signed by a key the receiver does not trust.
    UnknownSigner { signer: String },
    /// The signer key is not a valid, strong ed25519 point.
    BadSignerKey,
    /// The signature does not verify (strict RFC 8032 rules).
    BadSignature,
    /// The signed header is not the expected JSON.
    BadHeader(String),
    /// The body length differs from the signed length.
    BodyLength { declared: u64, actual: usize },
    /// The body hash differs from the signed hash.
    BodyHash,
    /// For another mesh.
    WrongMesh { expected: String, got: String },
    /// For another node (or from a node other than the topic says).
    WrongNode { expected: String, got: String },
    /// Not newer than what the receiver already has (replay or rollback).
    Stale { got: Revision, last: Revision },
    /// Past its expiry.
    Expired { exp: u64, now: u64 },
    /// The body is not the expected JSON.
    BadBody(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { len, max } => {
                write!(f, "envelope of {len} bytes exceeds cap of {max}")
            }
            Self::Truncated => f.write_str("envelope truncated"),
            Self::BadMagic => f.write_str("not a sidenet envelope (bad magic)"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported envelope version {v}"),
            Self::UnknownKind(k) => write!(f, "unknown envelope kind {k}"),
            Self::WrongKind { expected, got } => {
                write!(f, "expected a {expected:?} envelope, got {got:?}")
            }
            Self::HeaderTooLarge(n) => write!(f, "header of {n} bytes exceeds {MAX_HEADER}"),
            Self::UnknownSigner { signer } => write!(f, "signed by untrusted key {signer}"),
            Self::BadSignerKey => f.write_str("signer key is not a valid ed25519 public key"),
            Self::BadSignature => f.write_str("signature does not verify"),
            Self::BadHeader(e) => write!(f, "signed header is malformed: {e}"),
            Self::BodyLength { declared, actual } => {
                write!(f, "body is {actual} bytes but the header signs {declared}")
            }
            Self::BodyHash => f.write_str("body does not match the signed hash"),
            Self::WrongMesh { expected, got } => {
                write!(f, "for mesh {got:?}, expected {expected:?}")
            }
            Self::WrongNode { expected, got } => {
                write!(f, "for node {got:?}, expected {expected:?}")
            }
            Self::Stale { got, last } => write!(
                f,
                "revision {}.{} is not newer than {}.{}",
                got.epoch, got.rev, last.epoch, last.rev
            ),
            Self::Expired { exp, now } => write!(f, "expired at {exp} (now {now})"),
            Self::BadBody(e) => write!(f, "body is malformed: {e}"),
        }
    }
}

impl std::error::Error for WireError {}

/// Builds and signs an envelope. `header.len` and `header.sha256` are filled in from `body`.
pub fn seal(kind: Kind, header: Header, body: &[u8], key: &KeyPair) -> Vec<u8> {
    seal_hashed(kind, header, body, &sha256(body), key)
}

/// [`seal`] for a caller that already hashed `body`: `body_sha256` must be its SHA-256 (the
/// controller hashes every rendered body to decide whether it changed, and signs only the
/// changed ones, so the body is not hashed twice). A wrong digest yields an envelope that every
/// receiver refuses ([`WireError::BodyHash`]), never one that verifies with another body.
pub fn seal_hashed(
    kind: Kind,
    mut header: Header,
    body: &[u8],
    body_sha256: &[u8; 32],
    key: &KeyPair,
) -> Vec<u8> {
    header.len = body.len() as u64;
    header.sha256 = hex(body_sha256);
    let mut out = Vec::with_capacity(FIXED + 256 + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(key.public().as_bytes());
    // The header is serialised where it will stay (after the signature); the signed message
    // is the prefix followed by it. Serialising a struct of strings and integers cannot fail.
    out.resize(FIXED, 0);
    let _ = serde_json::to_writer(&mut out, &header);
    let hlen = out.len() - FIXED;
    out[6..8].copy_from_slice(&(hlen as u16).to_be_bytes());
    let mut msg = Vec::with_capacity(PREFIX + hlen);
    msg.extend_from_slice(&out[..PREFIX]);
    msg.extend_from_slice(&out[FIXED..]);
    let signature = key.sign(&msg);
    out[PREFIX..FIXED].copy_from_slice(&signature);
    out.extend_from_slice(body);
    out
}

/// A framed but not yet verified envelope.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// The kind byte.
    pub kind: Kind,
    signer: [u8; 32],
    prefix: &'a [u8],
    signature: [u8; 64],
    header: &'a [u8],
    body: &'a [u8],
}

/// A verified envelope: signature, header and body hash all checked.
#[derive(Debug, Clone)]
pub struct Verified<'a> {
    /// The kind.
    pub kind: Kind,
    /// Who signed it.
    pub signer: PublicKey,
    /// The signed header.
    pub header: Header,
    /// The body, matching the signed hash.
    pub body: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Checks the size cap and the framing. Nothing is parsed.
    pub fn parse(bytes: &'a [u8], max_len: usize) -> Result<Self, WireError> {
        if bytes.len() > max_len {
            return Err(WireError::TooLarge {
                len: bytes.len(),
                max: max_len,
            });
        }
        if bytes.len() < FIXED {
            if bytes.len() >= 4 && &bytes[..4] != MAGIC {
                return Err(WireError::BadMagic);
            }
            return Err(WireError::Truncated);
        }
        if &bytes[..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(WireError::UnsupportedVersion(bytes[4]));
        }
        let kind = Kind::from_u8(bytes[5]).ok_or(WireError::UnknownKind(bytes[5]))?;
        let hlen = u16::from_be_bytes([bytes[6], bytes[7]]) as usize;
        if hlen > MAX_HEADER {
            return Err(WireError::HeaderTooLarge(hlen));
        }
        if bytes.len() < FIXED + hlen {
            return Err(WireError::Truncated);
        }
        let mut signer = [0u8; 32];
        signer.copy_from_slice(&bytes[8..PREFIX]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[PREFIX..FIXED]);
        Ok(Self {
            kind,
            signer,
            prefix: &bytes[..PREFIX],
            signature,
            header: &bytes[FIXED..FIXED + hlen],
            body: &bytes[FIXED + hlen..],
        })
    }

    /// The signer key as claimed by the frame (not yet proven).
    pub fn claimed_signer(&self) -> Result<PublicKey, WireError> {
        PublicKey::from_bytes(&self.signer).map_err(|_| WireError::BadSignerKey)
    }

    /// Verifies against one trusted key.
    pub fn verify(&self, expected: Kind, trusted: &PublicKey) -> Result<Verified<'a>, WireError> {
        self.verify_any(expected, std::slice::from_ref(trusted))
    }

    /// Verifies against any of several trusted keys (key rotation overlap).
    pub fn verify_any(
        &self,
        expected: Kind,
        trusted: &[PublicKey],
    ) -> Result<Verified<'a>, WireError> {
        if self.kind != expected {
            return Err(WireError::WrongKind {
                expected,
                got: self.kind,
            });
        }
        let key = trusted
            .iter()
            .find(|k| k.as_bytes() == &self.signer)
            .ok_or_else(|| WireError::UnknownSigner {
                signer: PublicKey::from_bytes(&self.signer)
                    .map(|k| k.to_base64())
                    .unwrap_or_else(|_| hex(&self.signer)),
            })?;
        let mut msg = Vec::with_capacity(PREFIX + self.header.len());
        msg.extend_from_slice(self.prefix);
        msg.extend_from_slice(self.header);
        key.0
            .verify_strict(&msg, &Signature::from_bytes(&self.signature))
            .map_err(|_| WireError::BadSignature)?;
        let header: Header =
            serde_json::from_slice(self.header).map_err(|e| WireError::BadHeader(e.to_string()))?;
        if header.len != self.body.len() as u64 {
            return Err(WireError::BodyLength {
                declared: header.len,
                actual: self.body.len(),
            });
        }
        if hex(&sha256(self.body)) != header.sha256 {
            return Err(WireError::BodyHash);
        }
        Ok(Verified {
            kind: self.kind,
            signer: *key,
            header,
            body: self.body,
        })
    }

    /// Verifies a self-signed message (enrolment): the signer is whoever the frame names, and
    /// the caller then checks that the signer's node id is the one the message claims.
    pub fn verify_self_signed(&self, expected: Kind) -> Result<Verified<'a>, WireError> {
        let key = self.claimed_signer()?;
        self.verify(expected, &key)
    }
}

/// What a receiver expects of a verified envelope.
#[derive(Debug, Clone)]
pub struct Expect<'e> {
    /// The mesh it must be for.
    pub mesh: &'e str,
    /// The node it must be for (or from).
    pub node: Option<&'e str>,
    /// It must be strictly newer than this.
    pub after: Option<Revision>,
    /// Current Unix time in seconds.
    pub now: u64,
}

impl Verified<'_> {
    /// Checks mesh, node, revision and expiry.
    pub fn check(&self, expect: &Expect<'_>) -> Result<(), WireError> {
        if self.header.mesh != expect.mesh {
            return Err(WireError::WrongMesh {
                expected: expect.mesh.to_string(),
                got: self.header.mesh.clone(),
            });
        }
        if let Some(node) = expect.node
            && self.header.node.as_deref() != Some(node)
        {
            return Err(WireError::WrongNode {
                expected: node.to_string(),
                got: self.header.node.clone().unwrap_or_default(),
            });
        }
        if let Some(last) = expect.after
            && self.header.revision() <= last
        {
            return Err(WireError::Stale {
                got: self.header.revision(),
                last,
            });
        }
        if self.header.exp <= expect.now {
            return Err(WireError::Expired {
                exp: self.header.exp,
                now: expect.now,
            });
        }
        Ok(())
    }

    /// Parses the body as JSON.
    pub fn body_json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, WireError> {
        serde_json::from_slice(self.body).map_err(|e| WireError::BadBody(e.to_string()))
    }
}
