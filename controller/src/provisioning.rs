//! `NodeProvision` manifests in standalone mode: the controller runs each one with the same
//! implementation as `sidenetctl provision` ([`sidenet_provision::resource::run`]), shows live
//! progress and the final per-host results in `sidenetctl status`, and keeps the results in the
//! state folder (`provisions/NAME.json`) so a restart neither forgets them nor runs a finished
//! job again.
//!
//! A job runs when its manifest appears or changes (its spec, its annotations, or a Secret value
//! it uses); an
//! unchanged job that already finished does not run again (provisioning is idempotent anyway:
//! a second run reports "already provisioned"). A job changed while it runs runs again once the
//! current run ends. A removed manifest forgets its results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sidenet_crds::{EnrollmentMode, NodeProvision, NodeProvisionStatus, SecretKeyRef};
use sidenet_provision::{HostReport, Progress, Settings, Step, Target};
use tokio::sync::{mpsc, oneshot};

use crate::admin::{JobState, LiveHost, ProvisionRow, Request, Response};
use crate::spec::manifest::ManifestSet;

/// What is kept on disk per job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// Fingerprint of the spec and the Secret values it uses.
    fingerprint: String,
    mesh: String,
    status: NodeProvisionStatus,
}

/// Live progress of one run, shared with the provisioning tasks.
#[derive(Debug, Default)]
struct Live {
    hosts: Mutex<Vec<LiveHost>>,
}

impl Live {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<LiveHost>) -> R) -> R {
        match self.hosts.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

impl Progress for Live {
    fn begin(&self, targets: &[Target]) {
        self.with(|h| {
            *h = targets
                .iter()
                .map(|t| LiveHost {
                    host: t.label(),
                    step: Step::Queued.as_str().into(),
                    detail: String::new(),
                    result: None,
                })
                .collect();
        });
    }

    fn step(&self, index: usize, step: Step, detail: &str) {
        self.with(|h| {
            if let Some(row) = h.get_mut(index) {
                row.step = step.as_str().into();
                row.detail = detail.into();
            }
        });
    }

    fn done(&self, index: usize, report: &HostReport) {
        self.with(|h| {
            if let Some(row) = h.get_mut(index) {
                row.step = report.step.as_str().into();
                row.result = Some(report.result.as_str().into());
                row.detail = report.error.clone().unwrap_or_default();
            }
        });
    }
}

/// How provisioning asks the controller about nodes, through any way of sending an admin
/// [`Request`]: the admin socket (`sidenetctl provision`) or the controller's own admin channel
/// (`NodeProvision` jobs), so "enrolled" always means what `sidenetctl status` shows.
pub struct AdminControlPlane {
    call: Box<dyn Fn(Request) -> Result<Response, String> + Send + Sync>,
    /// Mint a single-use enrolment token for each new node.
    pub tokens: bool,
    /// Ask for node phases at all (`false`: never wait for enrolment).
    pub wait: bool,
}

impl AdminControlPlane {
    /// Over `call`, which sends one request and returns the answer (it may block: provisioning
    /// calls it from blocking threads only).
    pub fn new(
        call: impl Fn(Request) -> Result<Response, String> + Send + Sync + 'static,
        tokens: bool,
        wait: bool,
    ) -> Self {
        Self {
            call: Box::new(call),
            tokens,
            wait,
        }
    }

    /// Over the controller's own admin channel (for jobs running inside the controller).
    pub fn in_process(
        calls: mpsc::Sender<(Request, oneshot::Sender<Response>)>,
        tokens: bool,
    ) -> Self {
        Self::new(
            move |req| {
                let (tx, rx) = oneshot::channel();
                calls
                    .blocking_send((req, tx))
                    .map_err(|_| "the controller stopped".to_string())?;
                rx.blocking_recv()
                    .map_err(|_| "the controller stopped".to_string())
            },
            tokens,
            true,
        )
    }
}

impl sidenet_provision::ControlPlane for AdminControlPlane {
    fn node(&self, mesh: &str, node: &str) -> Result<Option<sidenet_provision::NodeSeen>, String> {
        if !self.wait {
            return Ok(None);
        }
        match (self.call)(Request::Status)? {
            Response::Status { nodes, .. } => Ok(nodes
                .into_iter()
                .find(|n| n.node == node && n.mesh == mesh)
                .map(|n| sidenet_provision::NodeSeen {
                    phase: n.phase,
                    online: n.online,
                    agent_version: n.agent_version,
                    agent_epoch: n.agent_epoch,
                    missing: n.missing,
                })),
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        }
    }

    fn remove_node(&self, _mesh: &str, node: &str) -> Result<(), String> {
        if !self.wait {
            return Ok(());
        }
        match (self.call)(Request::Remove {
            node: node.to_string(),
        })? {
            Response::Removed { .. } => Ok(()),
            // Never enrolled (or already forgotten): nothing to remove.
            Response::Error { message }
                if message.contains("is not enrolled") || message.starts_with("no node") =>
            {
                Ok(())
            }
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        }
    }

    fn enrolment_token(&self, mesh: &str) -> Result<Option<String>, String> {
        if !self.tokens {
            return Ok(None);
        }
        match (self.call)(Request::Token {
            mesh: mesh.to_string(),
            ttl_s: 24 * 3600,
        })? {
            Response::Token { token, .. } => Ok(Some(token)),
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        }
    }
}

struct Job {
    fingerprint: String,
    mesh: String,
    state: JobState,
    live: Option<Arc<Live>>,
    status: Option<NodeProvisionStatus>,
    /// The spec changed while running: run again when this run ends.
    again: bool,
}

/// A finished run, sent back to the owner of the [`Runner`].
#[derive(Debug)]
pub struct Finished {
    name: String,
    fingerprint: String,
    status: NodeProvisionStatus,
}

/// Settings of every run that do not come from the manifest.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// State folder (`provisions/`, `known_hosts`).
    pub state: PathBuf,
    /// Agent binaries, one folder per architecture.
    pub agents: PathBuf,
    /// Templates folder with the install descriptors (`FAMILY/install.yaml`).
    pub templates: PathBuf,
    /// SSH connect and per-operation timeout.
    pub ssh_timeout: Duration,
}

/// Runs and tracks the `NodeProvision` jobs of the current manifest set.
pub struct Runner {
    opts: RunnerOptions,
    jobs: BTreeMap<String, Job>,
    calls: mpsc::Sender<(Request, oneshot::Sender<Response>)>,
    done_tx: mpsc::Sender<Finished>,
}

impl Runner {
    /// A runner; finished runs arrive on the returned receiver and go to [`Runner::finished`].
    /// `calls` is the controller's admin channel.
    pub fn new(
        opts: RunnerOptions,
        calls: mpsc::Sender<(Request, oneshot::Sender<Response>)>,
    ) -> (Self, mpsc::Receiver<Finished>) {
        let (done_tx, done_rx) = mpsc::channel(16);
        let mut jobs = BTreeMap::new();
        for (name, rec) in load_records(&opts.state.join("provisions")) {
            let state = if rec.status.failed == 0 && complete(&rec.status) {
                JobState::Complete
            } else {
                JobState::Failed
            };
            jobs.insert(
                name,
                Job {
                    fingerprint: rec.fingerprint,
                    mesh: rec.mesh,
                    state,
                    live: None,
                    status: Some(rec.status),
                    again: false,
                },
            );
        }
        (
            Self {
                opts,
                jobs,
                calls,
                done_tx,
            },
            done_rx,
        )
    }

    /// Starts the jobs of `set` that are new or changed; forgets removed ones. `mesh_key` gives
    /// the public key (base64) agents of a mesh pin.
    pub fn update(&mut self, set: &ManifestSet, mesh_key: &mut dyn FnMut(&str) -> Option<String>) {
        let removed: Vec<String> = self
            .jobs
            .keys()
            .filter(|k| !set.provisions.contains_key(*k))
            .cloned()
            .collect();
        for name in removed {
            self.jobs.remove(&name);
            let path = record_path(&self.opts.state, &name);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
            tracing::info!(provision = %name, "NodeProvision removed; its results are forgotten");
        }
        for (name, np) in &set.provisions {
            let fp = fingerprint(np, set);
            match self.jobs.get_mut(name) {
                Some(job) if job.fingerprint == fp => continue,
                Some(job) if job.state == JobState::Running => {
                    job.again = true;
                    continue;
                }
                _ => {}
            }
            self.start(name, np, set, fp, mesh_key);
        }
    }

    fn start(
        &mut self,
        name: &str,
        np: &NodeProvision,
        set: &ManifestSet,
        fp: String,
        mesh_key: &mut dyn FnMut(&str) -> Option<String>,
    ) {
        let mesh = np.spec.mesh.clone();
        let live = Arc::new(Live::default());
        self.jobs.insert(
            name.to_string(),
            Job {
                fingerprint: fp.clone(),
                mesh: mesh.clone(),
                state: JobState::Running,
                live: Some(live.clone()),
                status: self.jobs.get(name).and_then(|j| j.status.clone()),
                again: false,
            },
        );
        let Some(key) = mesh_key(&mesh) else {
            // The manifest check makes sure the mesh exists; its key is created on first use.
            let status = invalid(np, &format!("no signing key for mesh {mesh:?}"));
            let _ = self.done_tx.try_send(Finished {
                name: name.to_string(),
                fingerprint: fp,
                status,
            });
            return;
        };
        let tokens = set
            .mesh_by_network(&mesh)
            .is_some_and(|m| m.spec.enrollment.mode == EnrollmentMode::Token);
        let base = Settings {
            mesh: String::new(),
            broker: String::new(),
            broker_ca: None,
            mesh_key: key,
            agents: self.opts.agents.clone(),
            templates: self.opts.templates.clone(),
            known_hosts: self.opts.state.join("known_hosts"),
            trust_on_first_use: false,
            parallelism: 1,
            ssh_timeout: self.opts.ssh_timeout,
            enrol_timeout: Duration::from_secs(
                sidenet_provision::resource::DEFAULT_ENROL_TIMEOUT_S,
            ),
            wait_for_enrolment: true,
            shaping: set
                .mesh_by_network(&mesh)
                .is_some_and(|m| crate::spec::policy::shapes(&m.spec)),
        };
        let secrets = set.secrets.clone();
        let profiles: Vec<_> = set.profiles.values().cloned().collect();
        let control = Arc::new(AdminControlPlane::in_process(self.calls.clone(), tokens));
        let np = np.clone();
        let done = self.done_tx.clone();
        let name = name.to_string();
        tracing::info!(provision = %name, mesh = %mesh, hosts = np.spec.targets.len(), "provisioning");
        tokio::spawn(async move {
            let lookup = move |r: &SecretKeyRef| secrets.get(&r.name)?.get(&r.key).cloned();
            let status = sidenet_provision::resource::run(
                &np,
                &lookup,
                base,
                profiles,
                control,
                live,
                &crate::rfc3339(crate::now()),
            )
            .await;
            let _ = done
                .send(Finished {
                    name,
                    fingerprint: fp,
                    status,
                })
                .await;
        });
    }

    /// Records a finished run (on disk first), and starts it again if its spec changed meanwhile.
    pub fn finished(
        &mut self,
        f: Finished,
        set: &ManifestSet,
        mesh_key: &mut dyn FnMut(&str) -> Option<String>,
    ) {
        let Some(job) = self.jobs.get_mut(&f.name) else {
            return; // removed while running
        };
        if job.fingerprint != f.fingerprint {
            return; // superseded
        }
        let ok = f.status.failed == 0 && complete(&f.status);
        tracing::info!(
            provision = %f.name,
            succeeded = f.status.succeeded,
            failed = f.status.failed,
            "provisioning finished"
        );
        for h in f.status.hosts.iter().filter(|h| h.result == "Failed") {
            tracing::warn!(provision = %f.name, host = %h.host, "{}", h.message);
        }
        let rec = Record {
            fingerprint: f.fingerprint.clone(),
            mesh: job.mesh.clone(),
            status: f.status.clone(),
        };
        if let Err(e) = save_record(&self.opts.state, &f.name, &rec) {
            tracing::error!(provision = %f.name, "cannot keep the results: {e}");
        }
        job.state = if ok {
            JobState::Complete
        } else {
            JobState::Failed
        };
        job.status = Some(f.status);
        if job.again {
            job.again = false;
            if let Some(np) = set.provisions.get(&f.name) {
                let fp = fingerprint(np, set);
                let name = f.name.clone();
                self.start(&name, np, set, fp, mesh_key);
            }
        }
    }

    /// What `sidenetctl status` shows.
    pub fn rows(&self) -> Vec<ProvisionRow> {
        self.jobs
            .iter()
            .map(|(name, j)| ProvisionRow {
                name: name.clone(),
                mesh: j.mesh.clone(),
                state: j.state,
                live: match (&j.live, j.state) {
                    (Some(l), JobState::Running) => l.with(|h| h.clone()),
                    _ => Vec::new(),
                },
                status: j.status.clone(),
            })
            .collect()
    }
}

fn complete(st: &NodeProvisionStatus) -> bool {
    st.conditions
        .iter()
        .any(|c| c.type_ == "Complete" && c.status == "True")
}

fn invalid(np: &NodeProvision, message: &str) -> NodeProvisionStatus {
    NodeProvisionStatus {
        conditions: vec![sidenet_crds::Condition {
            type_: "Complete".into(),
            status: "False".into(),
            reason: "InvalidSpec".into(),
            message: message.into(),
            last_transition_time: Some(crate::rfc3339(crate::now())),
            observed_generation: np.metadata.generation,
        }],
        observed_generation: np.metadata.generation,
        ..NodeProvisionStatus::default()
    }
}

/// The spec, the annotations (an admin retries a job by setting or changing one, e.g.
/// `sidenet.io/retry: "2"`) and the values of the Secrets it names (a rotated SSH key runs the
/// job again).
fn fingerprint(np: &NodeProvision, set: &ManifestSet) -> String {
    let mut refs = Vec::new();
    let spec = &np.spec;
    let creds = std::iter::once(&spec.defaults.credentials)
        .chain(spec.targets.iter().map(|t| &t.credentials))
        .flatten();
    for c in creds {
        for r in [&c.private_key_secret_ref, &c.password_secret_ref]
            .into_iter()
            .flatten()
        {
            let v = set.secrets.get(&r.name).and_then(|s| s.get(&r.key));
            refs.push((r.name.clone(), r.key.clone(), v.cloned()));
        }
    }
    let text = serde_json::to_string(&(spec, &np.metadata.annotations, refs)).unwrap_or_default();
    sidenet_wire::codec::sha256_hex(text.as_bytes())
}

fn record_path(state: &Path, name: &str) -> PathBuf {
    state.join("provisions").join(format!("{name}.json"))
}

fn save_record(state: &Path, name: &str, rec: &Record) -> std::io::Result<()> {
    use std::io::Write;
    let path = record_path(state, name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

fn load_records(dir: &Path) -> Vec<(String, Record)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
        {
            Ok(rec) => out.push((name.to_string(), rec)),
            Err(e) => tracing::warn!(
                "{}: unreadable provisioning results, ignored: {e}",
                path.display()
            ),
        }
    }
    out
}
