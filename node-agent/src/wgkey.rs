//! The node's WireGuard key: an X25519 key pair generated on the node on first start and kept in
//! the state folder (`wg.key`, mode 0600, base64 like `wg genkey` writes it). Only the public
//! key ever leaves the node (in enrolment requests and status reports).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use curve25519_dalek::MontgomeryPoint;

use crate::files::write_atomic;

/// A WireGuard key pair on disk.
#[derive(Clone)]
pub struct WgKey {
    path: PathBuf,
    public: String,
}

impl std::fmt::Debug for WgKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgKey")
            .field("path", &self.path)
            .field("public", &self.public)
            .finish()
    }
}

/// The public key of a private key (both as 32 raw bytes), as X25519 computes it.
pub fn public_of(private: [u8; 32]) -> [u8; 32] {
    MontgomeryPoint::mul_base_clamped(private).to_bytes()
}

fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

impl WgKey {
    /// Loads `path`, or generates a key there (mode 0600) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, String> {
        let private = match std::fs::read_to_string(path) {
            Ok(text) => {
                let raw = STANDARD
                    .decode(text.trim())
                    .map_err(|e| format!("{}: not a WireGuard key: {e}", path.display()))?;
                <[u8; 32]>::try_from(raw.as_slice())
                    .map_err(|_| format!("{}: a WireGuard key has 32 bytes", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                getrandom::fill(&mut k).map_err(|e| format!("no randomness: {e}"))?;
                let k = clamp(k);
                write_atomic(path, format!("{}\n", STANDARD.encode(k)).as_bytes(), 0o600)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                k
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Self {
            path: path.to_path_buf(),
            public: STANDARD.encode(public_of(private)),
        })
    }

    /// The public key, base64.
    pub fn public(&self) -> &str {
        &self.public
    }

    /// Where the private key is (for `wg set IF private-key PATH`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The private key, base64 (for backends that must write it into a config file, such as
    /// OpenWrt's /etc/config/network).
    pub fn private_base64(&self) -> Result<String, String> {
        std::fs::read_to_string(&self.path)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> [u8; 32] {
        let v = sidenet_wire::codec::unhex(s).unwrap_or_default();
        <[u8; 32]>::try_from(v.as_slice()).unwrap_or([0; 32])
    }

    #[test]
    fn rfc7748_test_vector() {
        // RFC 7748, section 6.1: Alice's key pair.
        let private = unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = unhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(public_of(private), public);
    }

    #[test]
    fn generated_once_and_kept_private() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("wg.key");
        let a = WgKey::load_or_create(&path)?;
        let b = WgKey::load_or_create(&path)?;
        assert_eq!(a.public(), b.public());
        assert_eq!(STANDARD.decode(a.public())?.len(), 32);
        assert_eq!(
            std::fs::metadata(&path)?.permissions().mode() & 0o777,
            0o600
        );
        let private = a.private_base64()?;
        assert_ne!(private, a.public());
        assert!(!format!("{a:?}").contains(&private));
        Ok(())
    }
}
