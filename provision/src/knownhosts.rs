//! Pinned SSH host keys.
//!
//! The file uses OpenSSH's known_hosts format (`[host]:port key-type base64`, plain `host` for
//! port 22), so `ssh -o UserKnownHostsFile=STATE/known_hosts` reads the same pins. Hashed host
//! names and markers (`@cert-authority`, `@revoked`) are not written and are skipped when read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, STANDARD_NO_PAD as B64_NO_PAD};
use sha2::{Digest, Sha256};

/// A host key: its type (`ssh-ed25519`, `ssh-rsa`, `ecdsa-sha2-nistp256`, ...) and the SSH wire
/// blob.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    /// Key type as written in known_hosts.
    pub kind: String,
    /// The public key blob.
    pub blob: Vec<u8>,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostKey({} {})", self.kind, self.fingerprint())
    }
}

impl HostKey {
    /// From the blob a server sent; the type is read from the blob itself.
    pub fn from_blob(blob: &[u8]) -> Result<Self, String> {
        let len = blob
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("host key blob is too short")?;
        let kind = blob
            .get(4..4 + len)
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or("host key blob has no key type")?;
        Ok(Self {
            kind: kind.to_string(),
            blob: blob.to_vec(),
        })
    }

    /// From `key-type base64` (the known_hosts form, also what `*.pub` files hold; a trailing
    /// comment is ignored).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split_whitespace();
        let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "host key {text:?} must be \"TYPE BASE64\" (e.g. ssh-ed25519 AAAA...)"
            ));
        };
        let blob = B64
            .decode(b64)
            .map_err(|e| format!("host key {kind}: not valid base64: {e}"))?;
        let key = Self::from_blob(&blob)?;
        if key.kind != kind {
            return Err(format!(
                "host key says {kind} but its blob holds a {} key",
                key.kind
            ));
        }
        Ok(key)
    }

    /// `SHA256:...` as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        format!("SHA256:{}", B64_NO_PAD.encode(Sha256::digest(&self.blob)))
    }

    /// `key-type base64`.
    pub fn to_line(&self) -> String {
        format!("{} {}", self.kind, B64.encode(&self.blob))
    }
}

/// What the pins say about a key a host presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The key is pinned for this host.
    Match,
    /// Nothing is pinned for this host.
    Unknown,
    /// Other keys are pinned for this host: the key changed (or someone is in the middle).
    Changed {
        /// The pinned keys.
        pinned: Vec<HostKey>,
    },
}

/// The known_hosts file, shared by all hosts of a run.
#[derive(Debug)]
pub struct KnownHosts {
    path: PathBuf,
    inner: Mutex<BTreeMap<String, Vec<HostKey>>>,
}

/// A known_hosts problem.
#[derive(Debug, thiserror::Error)]
pub enum KnownHostsError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {message}")]
    Bad {
        /// File.
        path: PathBuf,
        /// Line number, 1-based.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// How a host appears in known_hosts: `host` for port 22, else `[host]:port`.
pub fn host_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

impl KnownHosts {
    /// Reads the file (a missing file is an empty set).
    pub fn open(path: &Path) -> Result<Self, KnownHostsError> {
        let mut map: BTreeMap<String, Vec<HostKey>> = BTreeMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
                        continue;
                    }
                    let Some((hosts, key)) = line.split_once(char::is_whitespace) else {
                        return Err(KnownHostsError::Bad {
                            path: path.to_path_buf(),
                            line: i + 1,
                            message: "expected HOSTS TYPE KEY".into(),
                        });
                    };
                    if hosts.starts_with('|') {
                        continue;
                    }
                    let key =
                        HostKey::parse(key.trim()).map_err(|message| KnownHostsError::Bad {
                            path: path.to_path_buf(),
                            line: i + 1,
                            message,
                        })?;
                    for h in hosts.split(',') {
                        map.entry(h.to_string()).or_default().push(key.clone());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KnownHostsError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            inner: Mutex::new(map),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Key types pinned for a host (to ask the server for one of those).
    pub fn kinds(&self, host: &str, port: u16) -> Vec<String> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut kinds: Vec<String> = map
            .get(&host_pattern(host, port))
            .map(|keys| keys.iter().map(|k| k.kind.clone()).collect())
            .unwrap_or_default();
        kinds.dedup();
        kinds
    }

    /// Checks a presented key against the pins.
    pub fn check(&self, host: &str, port: u16, key: &HostKey) -> Check {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&host_pattern(host, port)) {
            None => Check::Unknown,
            Some(keys) if keys.contains(key) => Check::Match,
            Some(keys) => Check::Changed {
                pinned: keys.clone(),
            },
        }
    }

    /// Pins a key for a host that had none and rewrites the file atomically.
    pub fn add(&self, host: &str, port: u16, key: &HostKey) -> Result<(), KnownHostsError> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let keys = map.entry(host_pattern(host, port)).or_default();
        if keys.contains(key) {
            return Ok(());
        }
        keys.push(key.clone());
        let mut text = String::from("# SSH host keys pinned by `sidenetctl provision`.\n");
        for (h, keys) in map.iter() {
            for k in keys {
                text.push_str(&format!("{h} {}\n", k.to_line()));
            }
        }
        let io = |source| KnownHostsError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // ssh-keygen -t ed25519 public keys.
    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEpEgv0/iijPKcjz6ABKl44bUcAfeeNUI8jq+yLUIG+a";
    const B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKfOJVi+sHB5f/sX5kPtwdF3+WEcT9dEJdF3E5vglR16";

    #[test]
    fn parse_and_fingerprint() {
        let k = HostKey::parse(&format!("{A} root@vm")).unwrap();
        assert_eq!(k.kind, "ssh-ed25519");
        assert!(k.fingerprint().starts_with("SHA256:"));
        assert_eq!(k.to_line(), A);
        assert!(HostKey::parse(&A.replace("ssh-ed25519", "ssh-rsa")).is_err());
        assert!(HostKey::parse("ssh-ed25519").is_err());
    }

    #[test]
    fn pins_survive_a_reopen_and_a_changed_key_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/known_hosts");
        let kh = KnownHosts::open(&path).unwrap();
        let a = HostKey::parse(A).unwrap();
        let b = HostKey::parse(B).unwrap();
        assert_eq!(kh.check("10.0.0.1", 2222, &a), Check::Unknown);
        kh.add("10.0.0.1", 2222, &a).unwrap();
        kh.add("router.lan", 22, &b).unwrap();
        let kh = KnownHosts::open(&path).unwrap();
        assert_eq!(kh.check("10.0.0.1", 2222, &a), Check::Match);
        assert_eq!(
            kh.check("10.0.0.1", 2222, &b),
            Check::Changed {
                pinned: vec![a.clone()]
            }
        );
        // Another port of the same address is another host.
        assert_eq!(kh.check("10.0.0.1", 22, &a), Check::Unknown);
        assert_eq!(kh.kinds("router.lan", 22), vec!["ssh-ed25519".to_string()]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("[10.0.0.1]:2222 {A}")), "{text}");
        assert!(text.contains(&format!("router.lan {B}")), "{text}");
    }

    #[test]
    fn openssh_files_are_read_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(
            &path,
            format!("# comment\n|1|abc=|def= {A}\n@revoked * {B}\nrouter,10.0.0.2 {B}\n"),
        )
        .unwrap();
        let kh = KnownHosts::open(&path).unwrap();
        let b = HostKey::parse(B).unwrap();
        assert_eq!(kh.check("10.0.0.2", 22, &b), Check::Match);
        assert_eq!(kh.check("router", 22, &b), Check::Match);
        std::fs::write(&path, "router ssh-ed25519 !!!\n").unwrap();
        let err = KnownHosts::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("known_hosts:1:") && err.contains("base64"),
            "{err}"
        );
    }
}
