//! The apply journal shared by every backend (and all the `files` backend does).
//!
//! A config is applied in phases, recorded in `STATE/journal.json` (written atomically), so that
//! a crash, `kill -9` or power loss at any point leaves the node on exactly one signed revision:
//!
//! 1. **stage**: the new config's files (as prepared for this node) and the verified envelope
//!    are written as one file, `STATE/staging/stage.json`, and every file the apply will touch
//!    (new ones and the old config's) is hard-linked into `STATE/backup/` under a numbered name
//!    (copied if linking is not possible), or noted as absent. Installing replaces files by
//!    renaming new ones over them, so a linked backup keeps the old content. No journal yet: a
//!    crash here leaves the old config untouched.
//! 2. **installing** (journal written): the journal is written to a temporary file, then one
//!    *barrier* ([`barrier`]: `syncfs(2)` of each file system involved) makes the staging, the
//!    backups and that file durable together, and the journal is renamed into place (one folder
//!    fsync). Each file is then written next to its destination and renamed into place, and
//!    files the new config dropped are removed, without syncing: until the commit a crash rolls
//!    back from the durable backups, and during it rolls forward from the durable staging.
//! 3. **applying**: the backend converges the system (addresses, WireGuard, babeld, firewall).
//! 4. **trial**: the health check runs.
//! 5. **committing** (journal rewritten, durable): `STATE/current.env` (the verified envelope)
//!    and `STATE/current.json` are replaced, a second barrier makes them and the installed files
//!    durable, and then the journal, staging and backup are removed.
//!
//! [`Applier::rollback`] restores every backed-up file and removes the ones that did not exist
//! (and any half-written file of the install). On start, [`Applier::recover`] finishes a
//! journal left behind: *committing* rolls forward (the new revision was confirmed), any
//! earlier phase rolls back (it never was), and the caller then converges the system to
//! whichever revision the files now hold. Journals and staging folders of older agents (one
//! staged file per config file, backups under their own paths) are still recovered.
//!
//! Durability therefore costs a fixed number of flushes, whatever the number of files: two
//! barriers, three fsyncs of the journal and two of the state folder — seven for an apply of
//! the 6-file OpenWrt config, where syncing every file and folder on its own took 26 (and 48
//! before that). A barrier flushes everything written to that file system, not only ours: on a
//! router that is the same work, and a dongle host busy writing elsewhere on its root file
//! system waits for that writeback too (applies are rare; correctness does not depend on it).
//! Phases between *installing* and *committing* roll back alike, so moving from one to another
//! rewrites the journal with its content synced but not its name: a crash keeps either.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sidenet_wire::Revision;
use sidenet_wire::messages::{FileSpec, NodeConfig};

/// The staged config in `STATE/staging`.
const STAGE: &str = "stage.json";

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

/// Where an apply stands (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Files are being renamed into place.
    Installing,
    /// The backend converges the system.
    Applying,
    /// The health check runs.
    Trial,
    /// Confirmed: the last good config is being replaced. Journals of older agents, which
    /// always rolled forward, read as this phase.
    #[default]
    Committing,
}

impl Phase {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Installing => "installing",
            Self::Applying => "applying",
            Self::Trial => "trial",
            Self::Committing => "committing",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Journal {
    #[serde(default)]
    phase: Phase,
    revision: Revision,
    sha256: String,
    files: Vec<FileEntry>,
    old_files: Vec<String>,
    /// What was at each touched path before (`mode: None`: nothing).
    #[serde(default)]
    backup: Vec<Backup>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileEntry {
    path: String,
    mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Backup {
    path: String,
    mode: Option<u32>,
    /// `STATE/backup/<slot>` holds the old content; absent in journals of older agents, whose
    /// backups are at `STATE/backup/<path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slot: Option<usize>,
}

/// `STATE/staging/stage.json`: everything a roll-forward needs, in one file.
#[derive(Debug, Serialize, Deserialize)]
struct Stage {
    files: Vec<FileSpec>,
    /// The verified envelope, base64.
    envelope: String,
}

/// What [`Applier::recover`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// No interrupted apply.
    Clean,
    /// A confirmed revision was finished.
    RolledForward(Revision),
    /// An unconfirmed revision was undone (interrupted in this phase).
    RolledBack(Revision, Phase),
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

/// Writes `data` to `path` atomically (temp file, fsync, rename, fsync of the folder).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    replace_file(path, data, mode)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".sidenet-tmp");
    PathBuf::from(tmp)
}

/// [`write_atomic`] without the folder fsync: the content is durable, the rename is not until
/// the caller fsyncs the folder ([`sync_dir`]), once for all the files it replaced there.
fn replace_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    write_via_tmp(path, data, mode, true)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `path` through a temporary file renamed into place, syncing nothing: a barrier or a
/// roll-forward covers it.
fn write_unsynced(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    write_via_tmp(path, data, mode, false)
}

/// Writes `data` to a temporary file next to `path` (content fsynced if `sync`) and renames it
/// into place.
fn write_via_tmp(path: &Path, data: &[u8], mode: u32, sync: bool) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = tmp_path(path);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if sync {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)
}

/// Makes everything written so far under each of `dirs` durable: one `syncfs(2)` per file
/// system they are on (`sync(2)` where there is no `syncfs`). A folder that does not exist is
/// skipped (nothing was written there).
pub fn barrier<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut done: Vec<u64> = Vec::new();
    for dir in dirs {
        let Ok(f) = std::fs::File::open(dir) else {
            continue;
        };
        let dev = f.metadata()?.dev();
        if done.contains(&dev) {
            continue;
        }
        done.push(dev);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        rustix::fs::syncfs(&f)?;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            drop(f);
            rustix::fs::sync();
        }
    }
    Ok(())
}

fn remove_if_exists(p: &Path) -> Result<(), ApplyError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => ctx(Err(e), "remove", p),
    }
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

    fn backup_dir(&self) -> PathBuf {
        self.state.join("backup")
    }

    fn journal_path(&self) -> PathBuf {
        self.state.join("journal.json")
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

    fn journal(&self) -> Option<Journal> {
        let text = std::fs::read(self.journal_path()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The phase and revision of an apply in progress.
    pub fn pending(&self) -> Option<(Phase, Revision)> {
        self.journal().map(|j| (j.phase, j.revision))
    }

    /// Replaces the journal durably (content and name).
    fn write_journal(&self, j: &Journal) -> Result<(), ApplyError> {
        let p = self.journal_path();
        ctx(
            write_atomic(&p, &serde_json::to_vec(j).unwrap_or_default(), 0o600),
            "write",
            &p,
        )
    }

    /// Replaces the journal with its content synced but not its name: for moves between phases
    /// that recover alike (a crash leaves the old journal or the new one, both whole).
    fn write_journal_phase(&self, j: &Journal) -> Result<(), ApplyError> {
        let p = self.journal_path();
        ctx(
            replace_file(&p, &serde_json::to_vec(j).unwrap_or_default(), 0o600),
            "write",
            &p,
        )
    }

    /// Every folder an apply of `journal` writes to, for [`barrier`].
    fn touched_dirs(&self, journal: &Journal) -> Vec<PathBuf> {
        let mut dirs = vec![self.state.clone()];
        let paths = journal
            .files
            .iter()
            .map(|f| f.path.as_str())
            .chain(journal.old_files.iter().map(String::as_str));
        for p in paths {
            if let Some(parent) = self.root.join(p).parent()
                && !dirs.iter().any(|d| d == parent)
            {
                dirs.push(parent.to_path_buf());
            }
        }
        dirs
    }

    fn barrier(&self, journal: &Journal) -> Result<(), ApplyError> {
        let dirs = self.touched_dirs(journal);
        ctx(
            barrier(dirs.iter().map(PathBuf::as_path)),
            "sync",
            &self.state,
        )
    }

    fn cleanup(&self) {
        let _ = std::fs::remove_file(tmp_path(&self.journal_path()));
        let _ = std::fs::remove_dir_all(self.staging());
        let _ = std::fs::remove_dir_all(self.backup_dir());
    }

    /// Applies and confirms `config` at once (backends without a health check).
    pub fn apply(
        &self,
        revision: Revision,
        sha256: &str,
        envelope: &[u8],
        config: &NodeConfig,
    ) -> Result<(), ApplyError> {
        self.install(revision, sha256, envelope, config)?;
        self.confirm().map(|_| ())
    }

    /// Stages `config` (already verified) with backups of what it replaces, then installs its
    /// files (phases *stage* and *installing*; ends in *applying*).
    pub fn install(
        &self,
        revision: Revision,
        sha256: &str,
        envelope: &[u8],
        config: &NodeConfig,
    ) -> Result<(), ApplyError> {
        if self.journal().is_some() {
            // Never stack applies: the caller finishes or rolls back the one in progress first.
            return ctx(
                Err(std::io::Error::other("an apply is already in progress")),
                "journal",
                &self.journal_path(),
            );
        }
        self.cleanup();
        let staging = self.staging();
        ctx(std::fs::create_dir_all(&staging), "create", &staging)?;
        let stage = Stage {
            files: config.files.clone(),
            envelope: base64::engine::general_purpose::STANDARD.encode(envelope),
        };
        let stage_path = staging.join(STAGE);
        ctx(
            write_unsynced(
                &stage_path,
                &serde_json::to_vec(&stage).unwrap_or_default(),
                0o600,
            ),
            "stage",
            &stage_path,
        )?;
        let old_files = self.current().map(|c| c.files).unwrap_or_default();
        let mut touched: Vec<&str> = config.files.iter().map(|f| f.path.as_str()).collect();
        touched.extend(old_files.iter().map(String::as_str));
        touched.sort_unstable();
        touched.dedup();
        let backup_dir = self.backup_dir();
        ctx(std::fs::create_dir_all(&backup_dir), "create", &backup_dir)?;
        let mut backup = Vec::new();
        for (slot, path) in touched.into_iter().enumerate() {
            let src = self.root.join(path);
            let meta = match std::fs::symlink_metadata(&src) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    backup.push(Backup {
                        path: path.to_string(),
                        mode: None,
                        slot: None,
                    });
                    continue;
                }
                Err(e) => return ctx(Err(e), "stat", &src),
            };
            let mode = meta.permissions().mode() & 0o7777;
            let dst = backup_dir.join(slot.to_string());
            // A hard link keeps the old inode, which installing never writes to (it renames a
            // new file over the path); the barrier below makes it durable before the journal.
            // Not a regular file, or another file system: copy it.
            let linked = meta.is_file() && std::fs::hard_link(&src, &dst).is_ok();
            if !linked {
                let _ = std::fs::remove_file(&dst);
                let data = ctx(std::fs::read(&src), "read", &src)?;
                ctx(write_unsynced(&dst, &data, mode), "back up", &dst)?;
            }
            backup.push(Backup {
                path: path.to_string(),
                mode: Some(mode),
                slot: Some(slot),
            });
        }
        let mut journal = Journal {
            phase: Phase::Installing,
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
            backup,
        };
        // The journal's content, the staging and the backups become durable together (one
        // barrier); then the journal's name (one folder fsync). Only then is anything replaced.
        let jpath = self.journal_path();
        let jtmp = tmp_path(&jpath);
        ctx(
            write_unsynced(
                &jtmp,
                &serde_json::to_vec(&journal).unwrap_or_default(),
                0o600,
            ),
            "write",
            &jtmp,
        )?;
        self.barrier(&journal)?;
        ctx(std::fs::rename(&jtmp, &jpath), "write", &jpath)?;
        sync_dir(&self.state);
        self.install_files(&journal)?;
        journal.phase = Phase::Applying;
        self.write_journal_phase(&journal)
    }

    /// The staged content of the journal's files: from `stage.json`, or from one staged file
    /// per config file (staging folders of older agents).
    fn staged_files(&self, journal: &Journal) -> Result<Vec<(PathBuf, Vec<u8>, u32)>, ApplyError> {
        let staging = self.staging();
        let stage_path = staging.join(STAGE);
        if stage_path.exists() {
            let stage = self.stage()?;
            return Ok(stage
                .files
                .into_iter()
                .map(|f| (self.root.join(&f.path), f.content.into_bytes(), f.mode))
                .collect());
        }
        journal
            .files
            .iter()
            .map(|f| {
                let src = staging.join(&f.path);
                let data = ctx(std::fs::read(&src), "read staged", &src)?;
                Ok((self.root.join(&f.path), data, f.mode))
            })
            .collect()
    }

    fn stage(&self) -> Result<Stage, ApplyError> {
        let p = self.staging().join(STAGE);
        let bytes = ctx(std::fs::read(&p), "read staged", &p)?;
        serde_json::from_slice(&bytes).map_err(|e| ApplyError {
            what: "parse staged",
            path: p,
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Writes the staged files into place and removes the ones the new config dropped, without
    /// syncing: the commit's barrier makes them durable.
    fn install_files(&self, journal: &Journal) -> Result<(), ApplyError> {
        for (dst, data, mode) in self.staged_files(journal)? {
            ctx(write_unsynced(&dst, &data, mode), "write", &dst)?;
        }
        for old in &journal.old_files {
            if !journal.files.iter().any(|f| &f.path == old) {
                remove_if_exists(&self.root.join(old))?;
            }
        }
        Ok(())
    }

    /// Records that the apply in progress reached `phase` (applying → trial).
    pub fn set_phase(&self, phase: Phase) -> Result<(), ApplyError> {
        match self.journal() {
            Some(mut j) if phase == Phase::Committing => {
                j.phase = phase;
                self.write_journal(&j)
            }
            Some(mut j) => {
                j.phase = phase;
                self.write_journal_phase(&j)
            }
            None => Ok(()),
        }
    }

    /// Confirms the apply in progress: its envelope becomes the last good one. Returns its
    /// revision (`None` if nothing was in progress).
    pub fn confirm(&self) -> Result<Option<Revision>, ApplyError> {
        let Some(mut journal) = self.journal() else {
            return Ok(None);
        };
        journal.phase = Phase::Committing;
        self.write_journal(&journal)?;
        self.commit(&journal)?;
        Ok(Some(journal.revision))
    }

    fn commit(&self, journal: &Journal) -> Result<(), ApplyError> {
        let env = if self.staging().join(STAGE).exists() {
            let stage = self.stage()?;
            let p = self.staging().join(STAGE);
            base64::engine::general_purpose::STANDARD
                .decode(stage.envelope)
                .map_err(|e| ApplyError {
                    what: "parse staged",
                    path: p,
                    source: std::io::Error::other(e.to_string()),
                })?
        } else {
            let env_src = self.staging().join(".envelope");
            ctx(std::fs::read(&env_src), "read staged", &env_src)?
        };
        let env_dst = self.state.join("current.env");
        ctx(write_unsynced(&env_dst, &env, 0o600), "write", &env_dst)?;
        let current = Current {
            revision: journal.revision,
            sha256: journal.sha256.clone(),
            files: journal.files.iter().map(|f| f.path.clone()).collect(),
        };
        let cpath = self.state.join("current.json");
        ctx(
            write_unsynced(
                &cpath,
                &serde_json::to_vec(&current).unwrap_or_default(),
                0o600,
            ),
            "write",
            &cpath,
        )?;
        // The installed files and the new last good config become durable before the journal
        // (which a crash would roll forward from the staging) goes.
        self.barrier(journal)?;
        let jpath = self.journal_path();
        ctx(std::fs::remove_file(&jpath), "remove", &jpath)?;
        self.cleanup();
        Ok(())
    }

    /// Undoes the apply in progress: every touched file gets back its old content and mode, or
    /// is removed if it did not exist. Returns the revision undone (`None` if nothing was in
    /// progress). Safe to repeat after a crash half-way.
    pub fn rollback(&self) -> Result<Option<Revision>, ApplyError> {
        let Some(journal) = self.journal() else {
            self.cleanup();
            return Ok(None);
        };
        for b in &journal.backup {
            let dst = self.root.join(&b.path);
            // A file the install was writing when it was interrupted.
            remove_if_exists(&tmp_path(&dst))?;
            match b.mode {
                Some(mode) => {
                    let src = match b.slot {
                        Some(slot) => self.backup_dir().join(slot.to_string()),
                        None => self.backup_dir().join(&b.path),
                    };
                    let data = ctx(std::fs::read(&src), "read backup", &src)?;
                    ctx(write_atomic(&dst, &data, mode), "restore", &dst)?;
                }
                None => remove_if_exists(&dst)?,
            }
        }
        let jpath = self.journal_path();
        ctx(std::fs::remove_file(&jpath), "remove", &jpath)?;
        self.cleanup();
        Ok(Some(journal.revision))
    }

    /// `--uninstall`: removes the files of the applied config, then the folders they leave empty
    /// (never the root itself). Call [`Applier::recover`] first. Returns the paths removed.
    pub fn remove_installed(&self) -> Result<Vec<PathBuf>, ApplyError> {
        let mut removed = Vec::new();
        let files = self.current().map(|c| c.files).unwrap_or_default();
        let mut dirs: Vec<PathBuf> = Vec::new();
        for f in &files {
            let p = self.root.join(f);
            if p.exists() {
                remove_if_exists(&p)?;
                removed.push(p.clone());
            }
            let mut parent = p.parent();
            while let Some(d) = parent {
                if d == self.root || !d.starts_with(&self.root) {
                    break;
                }
                if !dirs.iter().any(|x| x == d) {
                    dirs.push(d.to_path_buf());
                }
                parent = d.parent();
            }
        }
        // Deepest first; a folder that still holds something (someone else's files) stays.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            if std::fs::remove_dir(&d).is_ok() {
                removed.push(d);
            }
        }
        Ok(removed)
    }

    /// Finishes an apply interrupted by a crash: rolls a confirmed one forward, any other back.
    pub fn recover(&self) -> Result<Recovery, ApplyError> {
        let jpath = self.journal_path();
        if !jpath.exists() {
            // No journal: an apply that died while staging leaves only staging and backup.
            self.cleanup();
            return Ok(Recovery::Clean);
        }
        let Some(journal) = self.journal() else {
            // A torn journal cannot exist (it is renamed into place), but be safe: drop it.
            let _ = std::fs::remove_file(&jpath);
            self.cleanup();
            return Ok(Recovery::Clean);
        };
        if journal.phase == Phase::Committing {
            if !self.staging().exists()
                && self.current().map(|c| c.revision) == Some(journal.revision)
            {
                // The commit had finished and removed the staging; only the journal's removal
                // was lost.
                let _ = std::fs::remove_file(&jpath);
                self.cleanup();
                return Ok(Recovery::RolledForward(journal.revision));
            }
            self.install_files(&journal)?;
            self.commit(&journal)?;
            return Ok(Recovery::RolledForward(journal.revision));
        }
        self.rollback()?;
        Ok(Recovery::RolledBack(journal.revision, journal.phase))
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
            sealed: Default::default(),
            requires: Vec::new(),
        }
    }

    fn read(root: &Path, p: &str) -> Option<String> {
        std::fs::read_to_string(root.join(p)).ok()
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
        assert_eq!(read(root.path(), "etc/a").as_deref(), Some("one"));
        let r2 = Revision { epoch: 1, rev: 2 };
        a.apply(r2, "s2", b"env2", &config(&[("etc/a", "two")]))?;
        assert_eq!(read(root.path(), "etc/a").as_deref(), Some("two"));
        assert!(!root.path().join("etc/b").exists());
        assert_eq!(a.current().map(|c| c.revision), Some(r2));
        assert_eq!(a.current_envelope(), Some(b"env2".to_vec()));
        assert!(!state.path().join("journal.json").exists());
        assert!(!state.path().join("backup").exists());
        Ok(())
    }

    #[test]
    fn rollback_restores_content_modes_and_absence() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        // A file that was there before sidenet, with its own mode.
        write_atomic(&root.path().join("etc/config/network"), b"stock", 0o600)?;
        let a = Applier::new(root.path(), state.path());
        a.apply(
            Revision { epoch: 1, rev: 1 },
            "s1",
            b"env1",
            &config(&[("etc/a", "one"), ("etc/b", "bee")]),
        )?;
        let r2 = Revision { epoch: 1, rev: 2 };
        a.install(
            r2,
            "s2",
            b"env2",
            &config(&[
                ("etc/a", "two"),
                ("etc/config/network", "ours"),
                ("etc/c", "new"),
            ]),
        )?;
        assert_eq!(a.pending(), Some((Phase::Applying, r2)));
        assert_eq!(
            read(root.path(), "etc/config/network").as_deref(),
            Some("ours")
        );
        assert!(!root.path().join("etc/b").exists());
        assert_eq!(a.rollback()?, Some(r2));
        assert_eq!(read(root.path(), "etc/a").as_deref(), Some("one"));
        assert_eq!(read(root.path(), "etc/b").as_deref(), Some("bee"));
        assert!(!root.path().join("etc/c").exists());
        assert_eq!(
            read(root.path(), "etc/config/network").as_deref(),
            Some("stock")
        );
        let mode = std::fs::metadata(root.path().join("etc/config/network"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(a.current().map(|c| c.revision.rev), Some(1));
        assert_eq!(a.current_envelope(), Some(b"env1".to_vec()));
        assert_eq!(a.pending(), None);
        // Nothing in progress: a second rollback is a no-op.
        assert_eq!(a.rollback()?, None);
        Ok(())
    }

    #[test]
    fn recovery_rolls_back_unconfirmed_and_forward_confirmed()
    -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        let a = Applier::new(root.path(), state.path());
        a.apply(
            Revision { epoch: 1, rev: 1 },
            "s1",
            b"env1",
            &config(&[("x", "old")]),
        )?;
        for phase in [Phase::Installing, Phase::Applying, Phase::Trial] {
            let r2 = Revision { epoch: 1, rev: 2 };
            a.install(r2, "s2", b"env2", &config(&[("x", "new"), ("y", "why")]))?;
            a.set_phase(phase)?;
            assert_eq!(a.recover()?, Recovery::RolledBack(r2, phase));
            assert_eq!(read(root.path(), "x").as_deref(), Some("old"));
            assert!(!root.path().join("y").exists());
            assert_eq!(a.current().map(|c| c.revision.rev), Some(1));
        }
        // Confirmed but interrupted while committing: rolled forward.
        let r3 = Revision { epoch: 1, rev: 3 };
        a.install(r3, "s3", b"env3", &config(&[("x", "newer")]))?;
        a.set_phase(Phase::Committing)?;
        assert_eq!(a.recover()?, Recovery::RolledForward(r3));
        assert_eq!(read(root.path(), "x").as_deref(), Some("newer"));
        assert_eq!(a.current().map(|c| c.revision), Some(r3));
        assert_eq!(a.current_envelope(), Some(b"env3".to_vec()));
        // Staging without a journal (crash while staging) is discarded; old config stays.
        write_atomic(&state.path().join("staging/x"), b"newest", 0o644)?;
        assert_eq!(a.recover()?, Recovery::Clean);
        assert_eq!(read(root.path(), "x").as_deref(), Some("newer"));
        assert!(!state.path().join("staging").exists());
        Ok(())
    }

    #[test]
    fn crash_points_of_the_staged_install() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        let a = Applier::new(root.path(), state.path());
        let r1 = Revision { epoch: 1, rev: 1 };
        a.apply(
            r1,
            "s1",
            b"env1",
            &config(&[("etc/x", "old"), ("z", "zed")]),
        )?;
        let r2 = Revision { epoch: 1, rev: 2 };
        let new = config(&[("etc/x", "new"), ("etc/y", "why")]);

        // Killed while staging (stage.json and some backups written, no journal): the old
        // config stays, the staging is dropped.
        a.install(r2, "s2", b"env2", &new)?;
        assert_eq!(a.rollback()?, Some(r2));
        std::fs::create_dir_all(state.path().join("backup"))?;
        std::fs::hard_link(root.path().join("etc/x"), state.path().join("backup/0"))?;
        write_atomic(&state.path().join("staging").join(STAGE), b"{}", 0o600)?;
        assert_eq!(a.recover()?, Recovery::Clean);
        assert_eq!(read(root.path(), "etc/x").as_deref(), Some("old"));
        assert!(!state.path().join("staging").exists());
        assert!(!state.path().join("backup").exists());

        // Killed half-way through installing: one file renamed into place, the next one still
        // a temporary file next to its destination. Rolled back from the linked backups.
        a.install(r2, "s2", b"env2", &new)?;
        a.set_phase(Phase::Installing)?;
        std::fs::rename(
            root.path().join("etc/y"),
            root.path().join("etc/y.sidenet-tmp"),
        )?;
        assert_eq!(a.recover()?, Recovery::RolledBack(r2, Phase::Installing));
        assert_eq!(read(root.path(), "etc/x").as_deref(), Some("old"));
        assert_eq!(read(root.path(), "z").as_deref(), Some("zed"));
        assert!(!root.path().join("etc/y").exists());
        assert!(!root.path().join("etc/y.sidenet-tmp").exists());
        assert_eq!(a.current().map(|c| c.revision), Some(r1));
        assert_eq!(a.current_envelope(), Some(b"env1".to_vec()));

        // Killed while committing, after current.env was replaced but not current.json: rolled
        // forward from stage.json, whatever the installed files hold by then.
        a.install(r2, "s2", b"env2", &new)?;
        a.set_phase(Phase::Committing)?;
        write_atomic(&root.path().join("etc/x"), b"torn", 0o644)?;
        write_atomic(&state.path().join("current.env"), b"env2", 0o600)?;
        assert_eq!(a.recover()?, Recovery::RolledForward(r2));
        assert_eq!(read(root.path(), "etc/x").as_deref(), Some("new"));
        assert_eq!(read(root.path(), "etc/y").as_deref(), Some("why"));
        assert!(!root.path().join("z").exists());
        assert_eq!(a.current().map(|c| c.revision), Some(r2));
        assert_eq!(a.current_envelope(), Some(b"env2".to_vec()));
        assert!(!state.path().join("staging").exists());

        // Killed before the journal's name was durable: its synced temporary file is left,
        // no journal. The old config stays and the leftovers go.
        let r3 = Revision { epoch: 1, rev: 3 };
        a.install(r3, "s3", b"env3", &config(&[("etc/x", "third")]))?;
        assert_eq!(a.rollback()?, Some(r3));
        std::fs::write(state.path().join("journal.json.sidenet-tmp"), b"{}")?;
        std::fs::create_dir_all(state.path().join("staging"))?;
        assert_eq!(a.recover()?, Recovery::Clean);
        assert!(!state.path().join("journal.json.sidenet-tmp").exists());
        assert_eq!(read(root.path(), "etc/x").as_deref(), Some("new"));

        // Killed after the commit removed the staging but before the journal's removal was
        // durable: finished, nothing installed again.
        a.install(r3, "s3", b"env3", &config(&[("etc/x", "third")]))?;
        let journal = std::fs::read(state.path().join("journal.json"))?;
        a.confirm()?;
        let mut j: serde_json::Value = serde_json::from_slice(&journal)?;
        j["phase"] = "committing".into();
        std::fs::write(state.path().join("journal.json"), serde_json::to_vec(&j)?)?;
        write_atomic(&root.path().join("etc/x"), b"edited since", 0o644)?;
        assert_eq!(a.recover()?, Recovery::RolledForward(r3));
        assert_eq!(read(root.path(), "etc/x").as_deref(), Some("edited since"));
        assert_eq!(a.current().map(|c| c.revision), Some(r3));
        assert!(!state.path().join("journal.json").exists());
        Ok(())
    }

    #[test]
    fn backups_of_older_agents_roll_back() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        let a = Applier::new(root.path(), state.path());
        a.apply(
            Revision { epoch: 1, rev: 1 },
            "s1",
            b"env1",
            &config(&[("x", "old")]),
        )?;
        // What the previous agent version left: backups under their own paths, no slots.
        write_atomic(&root.path().join("x"), b"new", 0o644)?;
        write_atomic(&state.path().join("backup/x"), b"old", 0o644)?;
        let old = serde_json::json!({
            "phase": "applying",
            "revision": {"epoch": 1, "rev": 2},
            "sha256": "s2",
            "files": [{"path": "x", "mode": 420}, {"path": "w", "mode": 420}],
            "old_files": ["x"],
            "backup": [{"path": "w", "mode": null}, {"path": "x", "mode": 420}],
        });
        write_atomic(&root.path().join("w"), b"double-you", 0o644)?;
        write_atomic(
            &state.path().join("journal.json"),
            &serde_json::to_vec(&old)?,
            0o600,
        )?;
        assert_eq!(
            a.recover()?,
            Recovery::RolledBack(Revision { epoch: 1, rev: 2 }, Phase::Applying)
        );
        assert_eq!(read(root.path(), "x").as_deref(), Some("old"));
        assert!(!root.path().join("w").exists());
        Ok(())
    }

    #[test]
    fn journals_of_older_agents_roll_forward() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        let a = Applier::new(root.path(), state.path());
        a.apply(
            Revision { epoch: 1, rev: 1 },
            "s1",
            b"env1",
            &config(&[("x", "old")]),
        )?;
        // What the previous agent version wrote: no phase, no backup.
        let staging = state.path().join("staging");
        write_atomic(&staging.join("x"), b"new", 0o644)?;
        write_atomic(&staging.join(".envelope"), b"env2", 0o600)?;
        let old = serde_json::json!({
            "revision": {"epoch": 1, "rev": 2},
            "sha256": "s2",
            "files": [{"path": "x", "mode": 420}],
            "old_files": ["x"],
        });
        write_atomic(
            &state.path().join("journal.json"),
            &serde_json::to_vec(&old)?,
            0o600,
        )?;
        assert_eq!(
            a.recover()?,
            Recovery::RolledForward(Revision { epoch: 1, rev: 2 })
        );
        assert_eq!(read(root.path(), "x").as_deref(), Some("new"));
        Ok(())
    }

    #[test]
    fn refuses_to_stack_applies() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        let a = Applier::new(root.path(), state.path());
        a.install(
            Revision { epoch: 1, rev: 1 },
            "s1",
            b"env1",
            &config(&[("x", "one")]),
        )?;
        assert!(
            a.install(
                Revision { epoch: 1, rev: 2 },
                "s2",
                b"env2",
                &config(&[("x", "two")])
            )
            .is_err()
        );
        assert_eq!(read(root.path(), "x").as_deref(), Some("one"));
        Ok(())
    }
}
