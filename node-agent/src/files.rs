//! The `files` backend and the apply journal shared by every backend.
//!
//! Applying a config is a journalled, roll-forward operation that survives `kill -9` and power
//! loss:
//!
//! 1. every file is written into `STATE/staging/` and synced;
//! 2. `STATE/journal.json` (revision, new and old file lists) is written atomically — from here on
//!    the config *will* be applied, even across a crash;
//! 3. each file is copied next to its destination and renamed over it (atomic per file);
//! 4. files of the previous config that the new one no longer has are removed;
//! 5. `STATE/current.env` (the verified envelope) and `STATE/current.json` are replaced
//!    atomically, then the journal and staging are removed.
//!
//! On start, a journal left behind is rolled forward (steps 3–5), so the node ends on exactly one
//! signed revision: the old one if the crash came before step 2, the new one otherwise.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sidenet_wire::Revision;
use sidenet_wire::messages::{FileSpec, NodeConfig};

/// What is applied now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    /// Revision.
    pub revision: Revision,
    /// Body hash.
    pub sha256: String,
    /// Files written (relative paths).
    pub files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Journal {
    revision: Revision,
    sha256: String,
    files: Vec<FileEntry>,
    old_files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileEntry {
    path: String,
    mode: u32,
}

/// Apply failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct ApplyError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn ctx<T>(r: std::io::Result<T>, what: &'static str, path: &Path) -> Result<T, ApplyError> {
    r.map_err(|source| ApplyError {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `data` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".sidenet-tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The journal machinery over a device root and a state folder.
#[derive(Debug, Clone)]
pub struct Applier {
    root: PathBuf,
    state: PathBuf,
}

impl Applier {
    /// An applier writing under `root`, journalling in `state`.
    pub fn new(root: &Path, state: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            state: state.to_path_buf(),
        }
    }

    fn staging(&self) -> PathBuf {
        self.state.join("staging")
    }

    /// What is applied now, if anything.
    pub fn current(&self) -> Option<Current> {
        let text = std::fs::read(self.state.join("current.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The last good envelope, if any.
    pub fn current_envelope(&self) -> Option<Vec<u8>> {
        std::fs::read(self.state.join("current.env")).ok()
    }

    /// Rolls a journal left by an interrupted apply forward. Returns the revision it finished.
    pub fn recover(&self) -> Result<Option<Revision>, ApplyError> {
        let jpath = self.state.join("journal.json");
        let Ok(text) = std::fs::read(&jpath) else {
            // No journal: an apply that died before step 2 leaves only staging behind.
            let _ = std::fs::remove_dir_all(self.staging());
            return Ok(None);
        };
        let Ok(journal) = serde_json::from_slice::<Journal>(&text) else {
            // A torn journal cannot exist (it is renamed into place), but be safe: drop it.
            let _ = std::fs::remove_file(&jpath);
            let _ = std::fs::remove_dir_all(self.staging());
            return Ok(None);
        };
        self.finish(&journal)?;
        Ok(Some(journal.revision))
    }

    /// Applies `config` (already verified) as `revision`, keeping `envelope` as the last good.
    pub fn apply(
        &self,
        revision: Revision,
        sha256: &str,
        envelope: &[u8],
        config: &NodeConfig,
    ) -> Result<(), ApplyError> {
        let staging = self.staging();
        let _ = std::fs::remove_dir_all(&staging);
        ctx(std::fs::create_dir_all(&staging), "create", &staging)?;
        for f in &config.files {
            let p = staging.join(&f.path);
            ctx(write_atomic(&p, f.content.as_bytes(), f.mode), "stage", &p)?;
        }
        let env_path = staging.join(".envelope");
        ctx(write_atomic(&env_path, envelope, 0o600), "stage", &env_path)?;
        let old_files = self.current().map(|c| c.files).unwrap_or_default();
        let journal = Journal {
            revision,
            sha256: sha256.to_string(),
            files: config
                .files
                .iter()
                .map(|f: &FileSpec| FileEntry {
                    path: f.path.clone(),
                    mode: f.mode,
                })
                .collect(),
            old_files,
        };
        let jpath = self.state.join("journal.json");
        ctx(
            write_atomic(
                &jpath,
                &serde_json::to_vec(&journal).unwrap_or_default(),
                0o600,
            ),
            "write",
            &jpath,
        )?;
        self.finish(&journal)
    }

    fn finish(&self, journal: &Journal) -> Result<(), ApplyError> {
        let staging = self.staging();
        for f in &journal.files {
            let src = staging.join(&f.path);
            let dst = self.root.join(&f.path);
            let data = ctx(std::fs::read(&src), "read staged", &src)?;
            ctx(write_atomic(&dst, &data, f.mode), "write", &dst)?;
        }
        for old in &journal.old_files {
            if !journal.files.iter().any(|f| &f.path == old) {
                let p = self.root.join(old);
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return ctx(Err(e), "remove", &p),
                }
            }
        }
        let env_src = staging.join(".envelope");
        let env = ctx(std::fs::read(&env_src), "read staged", &env_src)?;
        let env_dst = self.state.join("current.env");
        ctx(write_atomic(&env_dst, &env, 0o600), "write", &env_dst)?;
        let current = Current {
            revision: journal.revision,
            sha256: journal.sha256.clone(),
            files: journal.files.iter().map(|f| f.path.clone()).collect(),
        };
        let cpath = self.state.join("current.json");
        ctx(
            write_atomic(
                &cpath,
                &serde_json::to_vec(&current).unwrap_or_default(),
                0o600,
            ),
            "write",
            &cpath,
        )?;
        let jpath = self.state.join("journal.json");
        ctx(std::fs::remove_file(&jpath), "remove", &jpath)?;
        let _ = std::fs::remove_dir_all(&staging);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(files: &[(&str, &str)]) -> NodeConfig {
        NodeConfig {
            mesh: "m".into(),
            node: "n".into(),
            hostname: "h".into(),
            role: "router".into(),
            profile: "p".into(),
            family: "linux".into(),
            subnet: "fd00::/64".into(),
            addresses: vec![],
            files: files
                .iter()
                .map(|(p, c)| FileSpec {
                    path: p.to_string(),
                    mode: 0o644,
                    content: c.to_string(),
                })
                .collect(),
            actions: vec![],
        }
    }

    #[test]
    fn applies_replaces_and_removes() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        let a = Applier::new(root.path(), state.path());
        let r1 = Revision { epoch: 1, rev: 1 };
        a.apply(
            r1,
            "s1",
            b"env1",
            &config(&[("etc/a", "one"), ("etc/b", "bee")]),
        )?;
        assert_eq!(std::fs::read_to_string(root.path().join("etc/a"))?, "one");
        let r2 = Revision { epoch: 1, rev: 2 };
        a.apply(r2, "s2", b"env2", &config(&[("etc/a", "two")]))?;
        assert_eq!(std::fs::read_to_string(root.path().join("etc/a"))?, "two");
        assert!(!root.path().join("etc/b").exists());
        assert_eq!(a.current().map(|c| c.revision), Some(r2));
        assert_eq!(a.current_envelope(), Some(b"env2".to_vec()));
        assert!(!state.path().join("journal.json").exists());
        Ok(())
    }

    #[test]
    fn interrupted_apply_rolls_forward() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        let a = Applier::new(root.path(), state.path());
        a.apply(
            Revision { epoch: 1, rev: 1 },
            "s1",
            b"env1",
            &config(&[("x", "old")]),
        )?;
        // Simulate a crash right after the journal was written: stage + journal by hand.
        let staging = state.path().join("staging");
        write_atomic(&staging.join("x"), b"new", 0o644)?;
        write_atomic(&staging.join(".envelope"), b"env2", 0o600)?;
        let j = Journal {
            revision: Revision { epoch: 1, rev: 2 },
            sha256: "s2".into(),
            files: vec![FileEntry {
                path: "x".into(),
                mode: 0o644,
            }],
            old_files: vec!["x".into()],
        };
        write_atomic(
            &state.path().join("journal.json"),
            &serde_json::to_vec(&j)?,
            0o600,
        )?;
        assert_eq!(a.recover()?, Some(Revision { epoch: 1, rev: 2 }));
        assert_eq!(std::fs::read_to_string(root.path().join("x"))?, "new");
        assert_eq!(a.current().map(|c| c.revision.rev), Some(2));
        // Staging without a journal (crash before step 2) is discarded; old config stays.
        write_atomic(&staging.join("x"), b"newer", 0o644)?;
        assert_eq!(a.recover()?, None);
        assert_eq!(std::fs::read_to_string(root.path().join("x"))?, "new");
        Ok(())
    }
}
