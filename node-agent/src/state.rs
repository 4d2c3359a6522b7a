//! What the agent keeps on disk in its state folder (mode 0700):
//!
//! - `node.key`: the node's ed25519 secret key (0600), generated on first start, never sent.
//! - `mesh.pub`: the pinned mesh public key (given with `--mesh-key` or trusted on first use).
//! - `seq-epoch`: grows on every start, so signed node messages can never be replayed.
//! - `failed.json`: revisions that failed their health check and were rolled back; they are
//!   never applied again, even after a restart.
//! - `wg.key`: the WireGuard private key (backends with a data plane; see [`crate::wgkey`]).
//! - `current.env`, `current.json`, `journal.json`, `staging/`, `backup/`: see [`crate::files`].
//! - `run/`: pid files, sockets and logs of the daemons the backend runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sidenet_wire::keys::KeyPair;
use sidenet_wire::{PublicKey, Revision};

use crate::files::write_atomic;

/// A state folder problem.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file holds something unreadable.
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The state folder.
#[derive(Debug, Clone)]
pub struct State {
    dir: PathBuf,
}

impl State {
    /// Opens (creating) the folder with mode 0700.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node key, generated on first use.
    pub fn node_key(&self) -> Result<KeyPair, StateError> {
        let path = self.dir.join("node.key");
        match std::fs::read_to_string(&path) {
            Ok(text) => KeyPair::from_file_text(&text).map_err(|e| StateError::Bad {
                path: path.clone(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| StateError::Bad {
                    path: path.clone(),
                    message: format!("no randomness: {e}"),
                })?;
                let key = KeyPair::from_seed(&seed);
                write_atomic(&path, key.to_file_text().as_bytes(), 0o600).map_err(io(&path))?;
                Ok(key)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The pinned mesh key, if any.
    pub fn pinned(&self) -> Result<Option<PublicKey>, StateError> {
        let path = self.dir.join("mesh.pub");
        match std::fs::read_to_string(&path) {
            Ok(text) => PublicKey::from_base64(&text)
                .map(Some)
                .map_err(|e| StateError::Bad {
                    path: path.clone(),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Pins a mesh key.
    pub fn pin(&self, key: &PublicKey) -> Result<(), StateError> {
        let path = self.dir.join("mesh.pub");
        write_atomic(&path, format!("{key}\n").as_bytes(), 0o644).map_err(io(&path))
    }

    /// This node's broker password (from a config), if it has one.
    pub fn mqtt_password(&self) -> Result<Option<String>, StateError> {
        let path = self.dir.join("mqtt.password");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim_end_matches('\n').to_string()).filter(|p| !p.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Keeps this node's broker password (mode 0600).
    pub fn set_mqtt_password(&self, password: &str) -> Result<(), StateError> {
        let path = self.dir.join("mqtt.password");
        write_atomic(&path, format!("{password}\n").as_bytes(), 0o600).map_err(io(&path))
    }

    /// Revisions that failed on this node.
    pub fn failed(&self) -> Vec<Revision> {
        std::fs::read(self.dir.join("failed.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Remembers a failed revision (the last 64 are kept).
    pub fn add_failed(&self, rev: Revision) -> Result<(), StateError> {
        let mut all = self.failed();
        if !all.contains(&rev) {
            all.push(rev);
        }
        let skip = all.len().saturating_sub(64);
        let all: Vec<Revision> = all.into_iter().skip(skip).collect();
        let path = self.dir.join("failed.json");
        write_atomic(&path, &serde_json::to_vec(&all).unwrap_or_default(), 0o600).map_err(io(&path))
    }

    /// The next message sequence epoch: one more than last time, and at least `now`.
    pub fn next_seq_epoch(&self, now: u64) -> Result<u64, StateError> {
        let path = self.dir.join("seq-epoch");
        let last: u64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        let next = (last + 1).max(now);
        write_atomic(&path, next.to_string().as_bytes(), 0o600).map_err(io(&path))?;
        Ok(next)
    }
}
