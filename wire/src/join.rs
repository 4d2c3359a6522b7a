//! Join codes: the mesh name people share, joined to a short fingerprint of the mesh key.
//!
//! `riverside~kz4mtd7q2xw5nbhj3caf` is mesh `riverside` whose signing key has the fingerprint
//! `kz4mtd7q2xw5nbhj3caf`. An agent given a join code trusts only a mesh key with that
//! fingerprint, so whoever can publish on the broker cannot hand a new agent a key of their own.
//!
//! The fingerprint is the first 20 characters of the RFC 4648 base32 alphabet (lowercase, no
//! padding) of `SHA-256("sidenet-join-v1" 0x00 mesh 0x00 public_key)`, where `mesh` is the mesh's
//! network name in ASCII and `public_key` the 32 raw bytes of the ed25519 key: 100 bits. The
//! mesh name is inside the hash, so one key ground for one mesh's fingerprint is worth nothing
//! against another mesh's. `docs/security.md` ("Joining a mesh") says why 100 bits.
//!
//! Parsing is lenient where people copy or type: the fingerprint may be upper case and may be
//! broken up by `-` or spaces; the mesh name must be exact.

use std::fmt;

use crate::codec::{base32, sha256};
use crate::keys::PublicKey;
use crate::names::check_mesh_name;

/// Separates the mesh name from the fingerprint.
pub const SEPARATOR: char = '~';
/// Characters of the fingerprint (5 bits each: 100 bits).
pub const FINGERPRINT_CHARS: usize = 20;
/// Domain separation of the fingerprint's hash.
const DOMAIN: &[u8] = b"sidenet-join-v1\0";

/// The fingerprint of `key` as mesh `mesh`'s signing key (see the module docs).
pub fn fingerprint(mesh: &str, key: &PublicKey) -> String {
    let mut input = Vec::with_capacity(DOMAIN.len() + mesh.len() + 33);
    input.extend_from_slice(DOMAIN);
    input.extend_from_slice(mesh.as_bytes());
    input.push(0);
    input.extend_from_slice(key.as_bytes());
    let mut fp = base32(&sha256(&input));
    fp.truncate(FINGERPRINT_CHARS);
    fp
}

/// Why a join code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "join code {code:?}: {reason} (a join code is MESH~FINGERPRINT, as `sidenetctl join-code --mesh MESH` prints it, e.g. riverside~kz4mtd7q2xw5nbhj3caf)"
)]
pub struct JoinCodeError {
    /// What was given, escaped for display.
    pub code: String,
    /// What is wrong.
    pub reason: String,
}

/// A mesh name and the fingerprint of its signing key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JoinCode {
    mesh: String,
    fingerprint: String,
}

impl JoinCode {
    /// The join code of mesh `mesh` signed by `key`.
    pub fn new(mesh: &str, key: &PublicKey) -> Self {
        Self {
            mesh: mesh.to_string(),
            fingerprint: fingerprint(mesh, key),
        }
    }

    /// Parses `MESH~FINGERPRINT` (the fingerprint in any case, `-` and spaces ignored).
    pub fn parse(text: &str) -> Result<Self, JoinCodeError> {
        let err = |reason: String| JoinCodeError {
            code: text.escape_debug().to_string(),
            reason,
        };
        let text = text.trim();
        let Some((mesh, fp)) = text.split_once(SEPARATOR) else {
            return Err(err(format!(
                "no '{SEPARATOR}' between the mesh name and the fingerprint"
            )));
        };
        check_mesh_name(mesh).map_err(|e| err(e.to_string()))?;
        let fp: String = fp
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if let Some(c) = fp
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || ('2'..='7').contains(c)))
        {
            return Err(err(format!(
                "the fingerprint is base32: letters a-z and digits 2-7 only, found {c:?}"
            )));
        }
        if fp.len() != FINGERPRINT_CHARS {
            return Err(err(format!(
                "the fingerprint has {} characters, expected {FINGERPRINT_CHARS}",
                fp.len()
            )));
        }
        Ok(Self {
            mesh: mesh.to_string(),
            fingerprint: fp,
        })
    }

    /// The mesh's network name.
    pub fn mesh(&self) -> &str {
        &self.mesh
    }

    /// The key fingerprint (20 lowercase base32 characters).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether `key` is the key this code names.
    pub fn matches(&self, key: &PublicKey) -> bool {
        fingerprint(&self.mesh, key) == self.fingerprint
    }
}

impl fmt::Display for JoinCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{SEPARATOR}{}", self.mesh, self.fingerprint)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keys::KeyPair;

    #[test]
    fn fingerprint_is_the_documented_hash() {
        let key = KeyPair::from_seed(&[1; 32]).public();
        let mut input = b"sidenet-join-v1\0riverside\0".to_vec();
        input.extend_from_slice(key.as_bytes());
        let expected = &base32(&sha256(&input))[..20];
        let code = JoinCode::new("riverside", &key);
        assert_eq!(code.fingerprint(), expected);
        assert_eq!(code.to_string(), format!("riverside~{expected}"));
        assert!(code.matches(&key));
        assert!(!code.matches(&KeyPair::from_seed(&[2; 32]).public()));
        // The mesh name is inside the hash: the same key has another fingerprint elsewhere.
        assert_ne!(
            JoinCode::new("oak-street", &key).fingerprint(),
            code.fingerprint()
        );
    }

    #[test]
    fn parses_what_people_type() {
        let key = KeyPair::from_seed(&[3; 32]).public();
        let code = JoinCode::new("oak-street-2", &key);
        let fp = code.fingerprint().to_string();
        let grouped = format!(
            " oak-street-2~{}-{} {}-{} ",
            &fp[..5].to_uppercase(),
            &fp[5..10],
            &fp[10..15],
            &fp[15..]
        );
        assert_eq!(JoinCode::parse(&grouped).unwrap(), code);
        assert_eq!(JoinCode::parse(&code.to_string()).unwrap(), code);
    }

    #[test]
    fn refuses_malformed_codes_with_the_reason() {
        let cases = [
            ("riverside", "no '~'"),
            ("River~aaaaaaaaaaaaaaaaaaaa", "invalid mesh name"),
            (
                "riverside~aaaaaaaaaaaaaaaaaaa",
                "19 characters, expected 20",
            ),
            ("riverside~aaaaaaaaaaaaaaaaaaaaa", "21 characters"),
            ("riverside~aaaaaaaaaaaaaaaaaaa0", "found '0'"),
            ("riverside~", "0 characters"),
        ];
        for (text, want) in cases {
            let e = JoinCode::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("sidenetctl join-code"), "{text}: {e}");
        }
    }
}
