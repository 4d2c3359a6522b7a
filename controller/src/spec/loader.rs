//! Reading a manifest folder without trusting it.
//!
//! The paths given (`--manifests`, `--profiles`, `sidenetctl validate -f`) are files, taken as
//! they are, or folders, walked for `*.yaml` and `*.yml` files (names starting with `.` are
//! skipped). Whatever the folder holds, reading it ends, in bounded time and memory, with the
//! texts or with one error per problem, each naming the path it is about:
//!
//! - Only regular files are read. A FIFO, socket or device named `*.yaml` (or a symlink to one,
//!   such as `/dev/zero`) is an error; it is never opened, so a FIFO cannot block the reader.
//!   Files are opened non-blocking and checked again after opening, so a file swapped for a
//!   FIFO in between is refused too.
//! - A file may hold at most [`MAX_FILE_BYTES`] (16 MiB), and all files together at most
//!   [`MAX_TOTAL_BYTES`] (64 MiB); a larger file is an error, and never more than the limit plus
//!   one byte is read from it, whatever its size claims to be.
//! - At most [`MAX_FILES`] manifest files and [`MAX_ENTRIES`] folder entries are looked at: a
//!   `--manifests /` by mistake ends with an error, not a walk of the whole disk.
//! - Symlinks are followed, but a folder is read once: a symlink back to a folder above it is
//!   one error naming the symlink and where it points, and a folder or file reached a second
//!   time by another path is not read again. A symlink that leads to itself (`a -> b -> a`) is
//!   one error per loop, naming its members.
//! - A folder that cannot be read (permissions) is an error naming that folder; the rest of the
//!   tree is still read, so every such problem is reported at once.
//! - Files are read as UTF-8 text.
//!
//! Files come out sorted by path, so the load order and the order of errors are stable.

use std::collections::BTreeSet;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::spec::set::{ManifestError, ManifestErrors};

/// Largest manifest file read, in bytes (16 MiB: a /48's 65,535 `MeshNode`s in one file take
/// about 11 MiB).
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Largest total of all manifest files, in bytes (64 MiB).
pub const MAX_TOTAL_BYTES: u64 = 64 << 20;
/// Most manifest files read.
pub const MAX_FILES: usize = 10_000;
/// Most folder entries looked at while walking the folders.
pub const MAX_ENTRIES: usize = 100_000;

/// Where the reading is, for a caller that watches a read in progress (see
/// [`read_texts_with`]).
pub trait Progress: Sync {
    /// About to open and read `path`.
    fn reading(&self, path: &Path);
}

impl<F: Fn(&Path) + Sync> Progress for F {
    fn reading(&self, path: &Path) {
        self(path)
    }
}

/// The manifest files under `paths`: regular files only, each once, sorted. Every problem
/// (a FIFO, a device, a symlink loop, an unreadable folder, too many files) is an error naming
/// its path.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ManifestErrors> {
    let mut w = Walk::default();
    for p in paths {
        w.top(p);
    }
    if w.errors.is_empty() {
        let mut files: Vec<PathBuf> = w.files.into_iter().map(|(p, _)| p).collect();
        files.sort();
        Ok(files)
    } else {
        Err(ManifestErrors(w.errors))
    }
}

/// The manifest files under `paths` with their text, within the limits of this module.
pub fn read_texts(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, ManifestErrors> {
    read_texts_with(paths, &|_: &Path| {})
}

/// [`read_texts`], telling `progress` which file it is about to read.
pub fn read_texts_with(
    paths: &[PathBuf],
    progress: &dyn Progress,
) -> Result<Vec<(PathBuf, String)>, ManifestErrors> {
    let mut w = Walk::default();
    for p in paths {
        w.top(p);
    }
    let mut files = std::mem::take(&mut w.files);
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut errors = w.errors;
    let mut texts = Vec::with_capacity(files.len());
    let mut total: u64 = 0;
    for (path, size) in files {
        if total.saturating_add(size.min(MAX_FILE_BYTES)) > MAX_TOTAL_BYTES {
            errors.push(file_error(
                &path,
                format!(
                    "the manifest files add up to more than {} MiB (the limit of one load) from this file on; split the manifests over several controllers or remove files that are not manifests",
                    MAX_TOTAL_BYTES >> 20
                ),
            ));
            break;
        }
        progress.reading(&path);
        match read_one(&path) {
            Ok(text) => {
                total += text.len() as u64;
                texts.push((path, text));
            }
            Err(message) => errors.push(file_error(&path, message)),
        }
    }
    if errors.is_empty() {
        Ok(texts)
    } else {
        Err(ManifestErrors(errors))
    }
}

fn file_error(path: &Path, message: String) -> ManifestError {
    ManifestError {
        file: path.to_path_buf(),
        doc: 0,
        line: None,
        object: None,
        field: None,
        message,
    }
}

/// What a file that is not a regular file is, in words.
fn kind_of(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

fn not_regular(path: &Path, m: &Metadata) -> String {
    let target = std::fs::canonicalize(path)
        .ok()
        .filter(|t| t != path)
        .map(|t| format!(" (it leads to {})", t.display()))
        .unwrap_or_default();
    format!(
        "is {}{target}, not a regular file; only regular files are read as manifests",
        kind_of(m)
    )
}

fn too_large(size: Option<u64>) -> String {
    let size = size.map_or_else(
        || format!("more than {} MiB", MAX_FILE_BYTES >> 20),
        |s| format!("{} bytes", s),
    );
    format!(
        "is {size}; a manifest file may be at most {} MiB ({MAX_FILE_BYTES} bytes): split it into several files",
        MAX_FILE_BYTES >> 20
    )
}

/// Reads one file: opened without blocking (a FIFO swapped in after the walk does not block
/// the open), checked to be a regular file, and read up to the limit plus one byte.
fn read_one(path: &Path) -> Result<String, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let m = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !m.is_file() {
        return Err(not_regular(path, &m));
    }
    if m.len() > MAX_FILE_BYTES {
        return Err(too_large(Some(m.len())));
    }
    let mut bytes = Vec::with_capacity(m.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        // A file that grew, or one whose size is not its length (procfs).
        return Err(too_large(None));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "is not UTF-8 text (invalid byte at offset {}); manifests are YAML in UTF-8",
            e.utf8_error().valid_up_to()
        )
    })
}

/// A walk over the given paths.
#[derive(Default)]
struct Walk {
    /// Manifest files found, with their size.
    files: Vec<(PathBuf, u64)>,
    /// (device, inode) of every folder and file taken, so each is read once.
    seen: BTreeSet<(u64, u64)>,
    /// Symlink loops reported, by their smallest member.
    loops: BTreeSet<PathBuf>,
    errors: Vec<ManifestError>,
    entries: usize,
    /// The entry limit was reported.
    too_many: bool,
    /// The file limit was reported.
    too_many_files: bool,
}

impl Walk {
    /// A path given by the caller: a folder is walked, anything else is taken as a file
    /// whatever its name.
    fn top(&mut self, p: &Path) {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => self.folder(p, &m, &mut Vec::new()),
            Ok(m) => self.file(p, &m),
            Err(e) => self.stat_error(p, &e),
        }
    }

    fn stat_error(&mut self, p: &Path, e: &std::io::Error) {
        if e.raw_os_error() == Some(libc::ELOOP) {
            self.symlink_loop(p);
            return;
        }
        let broken = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
        let message = if broken && e.kind() == std::io::ErrorKind::NotFound {
            match std::fs::read_link(p) {
                Ok(t) => format!("is a broken symlink: {} does not exist", t.display()),
                Err(_) => "is a broken symlink".to_string(),
            }
        } else if e.kind() == std::io::ErrorKind::NotFound {
            "no such file or folder".to_string()
        } else {
            format!("cannot read: {e}")
        };
        self.errors.push(file_error(p, message));
    }

    /// A symlink that leads to itself: one error per loop, whichever member is met first.
    fn symlink_loop(&mut self, p: &Path) {
        let mut chain = vec![absolute(p)];
        let mut cur = chain[0].clone();
        while chain.len() <= 40 {
            let Ok(target) = std::fs::read_link(&cur) else {
                break;
            };
            let next = absolute(&cur.parent().unwrap_or(Path::new("/")).join(target));
            if let Some(at) = chain.iter().position(|c| *c == next) {
                // chain[at..] is the loop itself.
                let members = &chain[at..];
                let key = members
                    .iter()
                    .min()
                    .cloned()
                    .unwrap_or_else(|| next.clone());
                if !self.loops.insert(key) {
                    return;
                }
                let mut shown: Vec<String> =
                    members.iter().map(|m| m.display().to_string()).collect();
                shown.push(next.display().to_string());
                let lead = if at > 0 {
                    format!("leads into a symlink loop: {}", shown.join(" -> "))
                } else {
                    format!("is a symlink loop: {}", shown.join(" -> "))
                };
                self.errors
                    .push(file_error(p, format!("{lead}; it is not followed")));
                return;
            }
            chain.push(next.clone());
            cur = next;
        }
        self.errors.push(file_error(
            p,
            "cannot be followed: too many levels of symbolic links".into(),
        ));
    }

    fn file(&mut self, p: &Path, m: &Metadata) {
        if !m.is_file() {
            self.errors.push(file_error(p, not_regular(p, m)));
            return;
        }
        if !self.seen.insert((m.dev(), m.ino())) {
            // The same file by a second path (a symlink or a path given twice): read once.
            return;
        }
        if self.files.len() >= MAX_FILES {
            if !self.too_many_files {
                self.too_many_files = true;
                self.errors.push(file_error(
                    p,
                    format!("more than {MAX_FILES} manifest files; is this the right folder?"),
                ));
            }
            return;
        }
        if m.len() > MAX_FILE_BYTES {
            self.errors.push(file_error(p, too_large(Some(m.len()))));
            return;
        }
        self.files.push((p.to_path_buf(), m.len()));
    }

    /// Walks a folder. `up` holds the (device, inode) of the folders above it on this path.
    fn folder(&mut self, dir: &Path, m: &Metadata, up: &mut Vec<(u64, u64)>) {
        let id = (m.dev(), m.ino());
        if up.contains(&id) {
            let target = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            self.errors.push(file_error(
                dir,
                format!(
                    "is a symlink loop: it leads back to {}, a folder above it; it is not followed",
                    target.display()
                ),
            ));
            return;
        }
        if !self.seen.insert(id) {
            // The same folder by a second path: read once.
            return;
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) => {
                self.errors.push(file_error(
                    dir,
                    format!("cannot read this folder: {e}; its manifests are not loaded"),
                ));
                return;
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            match entry {
                Ok(e) => names.push(e.path()),
                Err(e) => {
                    self.errors.push(file_error(
                        dir,
                        format!("cannot read this folder: {e}; its manifests are not loaded"),
                    ));
                    return;
                }
            }
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                if !self.too_many {
                    self.too_many = true;
                    self.errors.push(file_error(
                        dir,
                        format!("more than {MAX_ENTRIES} entries in the manifest folders; is this the right folder?"),
                    ));
                }
                return;
            }
        }
        names.sort();
        up.push(id);
        for path in names {
            let hidden = path
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
            if hidden {
                continue;
            }
            let manifest = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("yml")
            );
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => self.folder(&path, &m, up),
                Ok(m) if manifest => self.file(&path, &m),
                Ok(_) => {}
                Err(e) if manifest || e.raw_os_error() == Some(libc::ELOOP) => {
                    self.stat_error(&path, &e)
                }
                // A broken symlink that is not named like a manifest: not ours to judge.
                Err(_) => {}
            }
        }
        up.pop();
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::symlink;

    fn messages(e: ManifestErrors) -> Vec<String> {
        e.0.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn a_fifo_is_refused_without_being_opened() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.yaml"), "a: 1\n").unwrap();
        let fifo = d.path().join("fifo.yaml");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(ok.success());
        let e = messages(read_texts(&[d.path().to_path_buf()]).unwrap_err());
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("fifo.yaml: is a FIFO (named pipe)"), "{e:?}");
    }

    #[test]
    fn a_symlink_to_a_device_is_refused() {
        let d = tempfile::tempdir().unwrap();
        symlink("/dev/zero", d.path().join("zero.yaml")).unwrap();
        let e = messages(read_texts(&[d.path().to_path_buf()]).unwrap_err());
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("zero.yaml: is a character device (it leads to /dev/zero)"),
            "{e:?}"
        );
    }

    #[test]
    fn reading_stops_at_the_size_limit() {
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big.yaml");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        let e = messages(read_texts(&[d.path().to_path_buf()]).unwrap_err());
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("a manifest file may be at most 16 MiB"),
            "{e:?}"
        );
        // A procfs file claims size 0 but has content: read only up to the limit.
        assert!(read_one(Path::new("/proc/self/status")).is_ok());
    }

    #[test]
    fn symlink_loops_are_reported_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a.yaml"), "a: 1\n").unwrap();
        symlink("..", d.path().join("sub/up")).unwrap();
        symlink("b.yaml", d.path().join("a.yaml")).unwrap();
        symlink("a.yaml", d.path().join("b.yaml")).unwrap();
        let e = messages(read_texts(&[d.path().to_path_buf()]).unwrap_err());
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("a.yaml: is a symlink loop: "), "{e:?}");
        assert!(
            e[1].contains("sub/up: is a symlink loop: it leads back to"),
            "{e:?}"
        );
    }

    #[test]
    fn a_folder_reached_twice_is_read_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a.yaml"), "a: 1\n").unwrap();
        symlink("sub", d.path().join("alias")).unwrap();
        symlink("sub/a.yaml", d.path().join("b.yaml")).unwrap();
        let t = read_texts(&[d.path().to_path_buf(), d.path().join("sub")]).unwrap();
        assert_eq!(t.len(), 1, "{t:?}");
    }
}
