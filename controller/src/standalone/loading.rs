//! Reading and validating the manifest folder off the control loop, with a deadline.
//!
//! Each poll starts one load on its own thread, unless one is still running: the files are read
//! within the limits of [`crate::spec::loader`] and, if their content changed since the last
//! load, validated ([`manifest::load_texts`]). The control loop only takes the outcome, so MQTT
//! messages, `sidenetctl` and SIGTERM are served while a large folder is validated.
//!
//! A load that has not finished within the deadline is given up: its outcome, whenever it
//! comes, is dropped, and a manifest error naming the file it was reading stays in force until a
//! later load finishes in time. No second load starts while the first one's thread still runs,
//! so a read that hangs (a stuck network file system) holds one thread, not one per poll.
//!
//! The errors in force are those of the last load: read errors (a FIFO, an unreadable folder),
//! validation errors, or the deadline. While any is in force, the controller keeps its last good
//! manifests, and the configs published from them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::spec::loader::{self, Progress};
use crate::spec::manifest::{self, ManifestErrors, ManifestSet};

/// The files read: (path, text) pairs, or what kept them from being read.
pub type Texts = Result<Vec<(PathBuf, String)>, ManifestErrors>;
/// How manifests are read: [`loader::read_texts_with`] (replaced in tests).
pub type Reader = Arc<dyn Fn(&[PathBuf], &dyn Progress) -> Texts + Send + Sync>;

/// What one load found.
#[derive(Debug)]
pub enum Outcome {
    /// The files are those last validated (hash of their paths and texts).
    Same(String),
    /// The files could not be read.
    Unreadable(ManifestErrors),
    /// The files changed and were validated.
    Checked(String, Result<ManifestSet, ManifestErrors>),
}

struct Job {
    started: Instant,
    /// The file the load is reading, for the deadline's message.
    at: Arc<Mutex<Option<PathBuf>>>,
    rx: oneshot::Receiver<Outcome>,
    /// The deadline passed: the outcome is dropped.
    overdue: bool,
}

/// Loads the manifests in the background (see the module docs).
pub struct Loader {
    paths: Vec<PathBuf>,
    deadline: Duration,
    read: Reader,
    job: Option<Job>,
    /// Hash of the files the errors in force are about: validated last, whatever the result
    /// ("" when the errors are not about their content: a read error, the deadline).
    checked: String,
    /// Hash of the files of the manifests in force.
    applied: String,
    errors: Vec<String>,
}

impl Loader {
    /// Loads from `paths`, giving up a load after `deadline`.
    pub fn new(paths: Vec<PathBuf>, deadline: Duration) -> Self {
        Self::with_reader(
            paths,
            deadline,
            Arc::new(|paths: &[PathBuf], p: &dyn Progress| loader::read_texts_with(paths, p)),
        )
    }

    /// [`Loader::new`] with another way to read the files.
    pub fn with_reader(paths: Vec<PathBuf>, deadline: Duration, read: Reader) -> Self {
        Self {
            paths,
            deadline,
            read,
            job: None,
            checked: String::new(),
            applied: String::new(),
            errors: Vec::new(),
        }
    }

    /// The manifest errors in force, one line each.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Whether a load is running (its thread has not finished).
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// On each poll: starts a load if none is running, or checks the running one's deadline.
    pub fn poll(&mut self) {
        match &mut self.job {
            None => self.start(),
            Some(job) if !job.overdue && job.started.elapsed() >= self.deadline => {
                job.overdue = true;
                let at = job
                    .at
                    .lock()
                    .ok()
                    .and_then(|a| a.clone())
                    .map(|p| format!(" (it is reading {})", p.display()))
                    .unwrap_or_default();
                let e = format!(
                    "loading the manifests did not finish within {} s{at}; the last good manifests stay in force, and no other load starts until this one ends",
                    self.deadline.as_secs_f64()
                );
                tracing::error!("{e}");
                self.errors = vec![e];
                self.checked.clear();
            }
            Some(_) => {}
        }
    }

    fn start(&mut self) {
        let (tx, rx) = oneshot::channel();
        let at = Arc::new(Mutex::new(None));
        let job = Job {
            started: Instant::now(),
            at: at.clone(),
            rx,
            overdue: false,
        };
        let paths = self.paths.clone();
        let read = self.read.clone();
        let known = [self.checked.clone(), self.applied.clone()];
        let spawned = std::thread::Builder::new()
            .name("manifests".into())
            .spawn(move || {
                let progress = |p: &Path| {
                    if let Ok(mut a) = at.lock() {
                        *a = Some(p.to_path_buf());
                    }
                };
                let _ = tx.send(load(&paths, &*read, &progress, &known));
            });
        match spawned {
            Ok(_) => self.job = Some(job),
            Err(e) => tracing::error!("cannot start a thread to load the manifests: {e}"),
        }
    }

    /// The outcome of the running load (pending while none runs).
    pub async fn done(&mut self) -> Option<Outcome> {
        let Some(job) = &mut self.job else {
            return std::future::pending().await;
        };
        let outcome = (&mut job.rx).await.ok();
        let job = self.job.take();
        if job.is_some_and(|j| j.overdue) {
            tracing::warn!(
                "the manifest load that overran its deadline ended; its result is dropped and the next poll loads again"
            );
            return None;
        }
        if outcome.is_none() {
            // The thread ended without an answer: it panicked.
            let e = "loading the manifests failed (the loader stopped); the last good manifests stay in force".to_string();
            tracing::error!("{e}");
            self.errors = vec![e];
            self.checked.clear();
        }
        outcome
    }

    /// Takes an outcome of [`Loader::done`]: the manifests to put in force, if they changed
    /// and are valid. Logs what happened and updates the errors in force.
    pub fn take(&mut self, outcome: Outcome) -> Option<ManifestSet> {
        match outcome {
            Outcome::Same(hash) => {
                if hash != self.checked {
                    // Back to the files in force, after errors.
                    tracing::info!("the manifest files are back to those in force");
                    self.errors.clear();
                    self.checked = hash;
                }
                None
            }
            Outcome::Unreadable(errs) => {
                let lines: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
                if lines != self.errors {
                    for e in &lines {
                        tracing::error!("{e}");
                    }
                    tracing::error!(
                        "{} manifest error(s); nothing changed, the last good configs stay published",
                        lines.len()
                    );
                }
                self.errors = lines;
                self.checked.clear();
                None
            }
            Outcome::Checked(hash, Ok(set)) => {
                tracing::info!(
                    meshes = set.meshes.len(),
                    nodes = set.nodes.len(),
                    profiles = set.profiles.len(),
                    "manifests loaded"
                );
                self.errors.clear();
                self.checked = hash.clone();
                self.applied = hash;
                Some(set)
            }
            Outcome::Checked(hash, Err(errs)) => {
                for e in &errs.0 {
                    tracing::error!("{e}");
                }
                tracing::error!(
                    "{} manifest error(s); nothing changed, the last good configs stay published",
                    errs.0.len()
                );
                self.errors = errs.0.iter().map(|e| e.to_string()).collect();
                self.checked = hash;
                None
            }
        }
    }
}

/// One load: read, compare with the hashes `known`, validate if new.
fn load(
    paths: &[PathBuf],
    read: &dyn Fn(&[PathBuf], &dyn Progress) -> Texts,
    progress: &dyn Progress,
    known: &[String; 2],
) -> Outcome {
    let texts = match read(paths, progress) {
        Ok(t) => t,
        Err(e) => return Outcome::Unreadable(e),
    };
    let hash = texts_hash(&texts);
    if known.contains(&hash) {
        return Outcome::Same(hash);
    }
    let result = manifest::load_texts(&texts);
    Outcome::Checked(hash, result)
}

/// Content hash of the manifest files (so edits, additions and removals are all noticed).
fn texts_hash(texts: &[(PathBuf, String)]) -> String {
    let mut all = Vec::new();
    for (p, t) in texts {
        all.extend_from_slice(p.as_os_str().as_encoded_bytes());
        all.push(0);
        all.extend_from_slice(t.as_bytes());
        all.push(0);
    }
    sidenet_wire::codec::sha256_hex(&all)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::sync::mpsc;

    const MESH: &str = include_str!("../../../examples/riverside/mesh.yaml");

    /// A reader that answers only when the test hands it a text (or, for `None`, a read
    /// error), telling first which file it reads.
    fn gated() -> (Reader, mpsc::Sender<Option<String>>) {
        let (tx, rx) = mpsc::channel::<Option<String>>();
        let rx = Mutex::new(rx);
        let read: Reader = Arc::new(move |_: &[PathBuf], p: &dyn Progress| {
            let file = PathBuf::from("slow/mesh.yaml");
            p.reading(&file);
            match rx.lock().unwrap().recv().ok().flatten() {
                Some(text) => Ok(vec![(file, text)]),
                None => Err(ManifestErrors(vec![crate::spec::set::ManifestError {
                    file,
                    doc: 0,
                    line: None,
                    object: None,
                    field: None,
                    message: "is a FIFO (named pipe), not a regular file".into(),
                }])),
            }
        });
        (read, tx)
    }

    async fn next(l: &mut Loader) -> Option<Outcome> {
        tokio::time::timeout(Duration::from_secs(10), l.done())
            .await
            .unwrap_or_else(|_| panic!("no outcome within 10 s"))
    }

    #[tokio::test]
    async fn a_load_that_overruns_is_an_error_and_the_next_one_recovers() {
        let (read, answer) = gated();
        let mut l = Loader::with_reader(vec![], Duration::from_millis(200), read);

        // A good load.
        l.poll();
        answer.send(Some(MESH.into())).unwrap();
        let set = next(&mut l).await.and_then(|o| l.take(o)).unwrap();
        assert_eq!(set.meshes.len(), 1);
        assert!(l.errors().is_empty());

        // A load that hangs: past the deadline it is an error naming the file, and polling
        // again starts no second load.
        let started = Instant::now();
        l.poll();
        while l.errors().is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no deadline error"
            );
            tokio::task::yield_now().await;
            l.poll();
        }
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(l.busy());
        assert_eq!(l.errors().len(), 1, "{:?}", l.errors());
        assert!(
            l.errors()[0].starts_with(
                "loading the manifests did not finish within 0.2 s (it is reading slow/mesh.yaml)"
            ),
            "{:?}",
            l.errors()
        );
        l.poll();
        // Its result, when it comes, is dropped (even a new, valid set)...
        answer
            .send(Some(MESH.replace("channel: 36", "channel: 44")))
            .unwrap();
        assert!(next(&mut l).await.is_none());
        assert!(!l.busy());
        assert_eq!(l.errors().len(), 1);

        // ... and the next load in time clears the error; the files are those in force.
        l.poll();
        answer.send(Some(MESH.into())).unwrap();
        let o = next(&mut l).await.unwrap();
        assert!(matches!(o, Outcome::Same(_)), "{o:?}");
        assert!(l.take(o).is_none());
        assert!(l.errors().is_empty(), "{:?}", l.errors());
    }

    #[tokio::test]
    async fn errors_stay_in_force_until_the_files_are_fixed() {
        let (read, answer) = gated();
        let mut l = Loader::with_reader(vec![], Duration::from_secs(30), read);
        l.poll();
        answer.send(Some(MESH.into())).unwrap();
        assert!(next(&mut l).await.and_then(|o| l.take(o)).is_some());

        // A read error, twice: the same error stays in force.
        for _ in 0..2 {
            l.poll();
            answer.send(None).unwrap();
            assert!(next(&mut l).await.and_then(|o| l.take(o)).is_none());
            assert_eq!(
                l.errors(),
                ["slow/mesh.yaml: is a FIFO (named pipe), not a regular file"]
            );
        }
        // Back to the files in force: no error, nothing to apply.
        l.poll();
        answer.send(Some(MESH.into())).unwrap();
        assert!(next(&mut l).await.and_then(|o| l.take(o)).is_none());
        assert!(l.errors().is_empty());

        // An invalid edit: its errors, validated once and kept while the files stay so.
        let bad = MESH.replace("/48", "/64");
        for _ in 0..2 {
            l.poll();
            answer.send(Some(bad.clone())).unwrap();
            assert!(next(&mut l).await.and_then(|o| l.take(o)).is_none());
            assert_eq!(l.errors().len(), 1);
            assert!(l.errors()[0].contains("spec.prefix"), "{:?}", l.errors());
        }
        // A valid edit is put in force.
        l.poll();
        answer
            .send(Some(MESH.replace("channel: 36", "channel: 44")))
            .unwrap();
        assert!(next(&mut l).await.and_then(|o| l.take(o)).is_some());
        assert!(l.errors().is_empty());
    }
}
