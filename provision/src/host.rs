//! One host, start to end (blocking): connect and check the host key, log in, detect the board,
//! match a profile, compare what is installed with what should be, install the missing packages
//! ([`crate::packages`]), stage and verify what differs, switch it into place, start the service
//! (restart it when anything changed) and wait until the controller sees the node online,
//! running the installed agent version, with a report from this start and nothing missing.
//!
//! Every file is staged next to its destination as `.NAME.sidenet-new.RUN` and checked on the
//! device (SHA-256) by the same remote script that received it: if the upload is cut (the
//! provisioning process killed, the network gone) that script sees a short file and deletes it.
//! Only when every changed file is staged and verified are they renamed into place (each rename
//! atomic; the service definition last), so a host never runs a half-written agent. Leftovers of
//! an interrupted run are removed by the next one.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sidenet_crds::HardwareProfile;
use sidenet_wire::codec::sha256_hex;

use crate::detect::{self, DetectError, Facts};
use crate::install::{Bootstrap, InstallError, InstallSpec, Installers, Layout, shell_quote};
use crate::knownhosts::{HostKey, KnownHosts, KnownHostsError};
use crate::packages::{self, PackagesSpec};
use crate::plan::{Settings, Target};
use crate::ssh::{self, Conn, Endpoint, KeyOutcome, SshError};

/// File name of the agent binary in the agents folder.
pub const AGENT_FILE: &str = "sidenet-agent";

/// How the controller sees a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSeen {
    /// Its phase (`Pending`, `Configuring`, `Ready`, `Offline`, ...).
    pub phase: String,
    /// Whether it is connected (its presence topic), if known.
    pub online: Option<bool>,
    /// The agent version of its last status report.
    pub agent_version: Option<String>,
    /// The sequence epoch of its last message: it grows every time the agent starts, so a
    /// larger one than before a restart comes from the restarted agent.
    pub agent_epoch: Option<u64>,
    /// Packages its last status report says are missing.
    pub missing: Vec<String>,
}

/// What the provisioner asks of the controller.
pub trait ControlPlane: Send + Sync {
    /// How the controller sees a node of `mesh`, or `None` until it enrolled.
    fn node(&self, mesh: &str, node: &str) -> Result<Option<NodeSeen>, String>;
    /// A single-use enrolment token for one new node, or `None` when the mesh needs none.
    fn enrolment_token(&self, mesh: &str) -> Result<Option<String>, String>;
    /// Forgets a node whose agent was removed (`sidenetctl provision --remove`).
    fn remove_node(&self, _mesh: &str, _node: &str) -> Result<(), String> {
        Ok(())
    }
}

/// A step of a host's run, shown in the progress lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Waiting for a free slot.
    Queued,
    /// TCP, SSH handshake, host key.
    Connect,
    /// Authentication.
    Login,
    /// Board detection and profile matching.
    Detect,
    /// Comparing what is installed.
    Inspect,
    /// Checking and installing the packages the configs need.
    Packages,
    /// Staging and verifying files.
    Upload,
    /// Switching files into place, enabling the service.
    Install,
    /// Starting the service.
    Start,
    /// Waiting until the controller sees the node online with the installed agent.
    Enrol,
    /// Stopping the service and deleting the agent's files (`--remove`).
    Uninstall,
    /// Finished.
    Done,
}

impl Step {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Queued => "queued",
            Step::Connect => "connect",
            Step::Login => "login",
            Step::Detect => "detect",
            Step::Inspect => "inspect",
            Step::Packages => "packages",
            Step::Upload => "upload",
            Step::Install => "install",
            Step::Start => "start",
            Step::Enrol => "enrol",
            Step::Uninstall => "uninstall",
            Step::Done => "done",
        }
    }
}

/// How a host ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Something was installed, changed or started.
    Provisioned,
    /// Everything was in place already; nothing on the host changed.
    AlreadyProvisioned,
    /// The agent was taken off the host (`--remove`).
    Removed,
    /// `--remove` found no agent on the host.
    NotInstalled,
    /// The host failed; see the error.
    Failed,
}

impl Outcome {
    /// As shown in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Provisioned => "provisioned",
            Outcome::AlreadyProvisioned => "already provisioned",
            Outcome::Removed => "removed",
            Outcome::NotInstalled => "not installed",
            Outcome::Failed => "failed",
        }
    }
}

/// What happened to one host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostReport {
    /// `user@host:port`.
    pub host: String,
    /// Hostname the node reports.
    pub name: String,
    /// Board name or OS as detected.
    pub board: Option<String>,
    /// Hardware profile used.
    pub profile: Option<String>,
    /// Node id of the agent.
    pub node_id: Option<String>,
    /// The node's phase at the controller when it was seen.
    pub phase: Option<String>,
    /// Result.
    pub result: Outcome,
    /// Last step reached (the one that failed, on failure).
    pub step: Step,
    /// What was changed on the host.
    pub changes: Vec<String>,
    /// Packages installed on the host by this run.
    #[serde(default)]
    pub packages: Vec<String>,
    /// The agent version the node runs (as its `--version` says).
    #[serde(default)]
    pub agent_version: Option<String>,
    /// How the run logged in: `none` (a router without a root password), `publickey` or
    /// `password`.
    #[serde(default)]
    pub login: Option<String>,
    /// Things the admin should know that did not fail the host.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The host key pinned by this run (trust on first use), if any.
    pub pinned_host_key: Option<String>,
    /// Why it failed, naming the host.
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
}

impl HostReport {
    /// A report for a host that has not run yet.
    pub fn new(t: &Target) -> Self {
        Self {
            host: t.label(),
            name: t.hostname(),
            board: None,
            profile: None,
            node_id: None,
            phase: None,
            result: Outcome::Failed,
            step: Step::Queued,
            changes: Vec::new(),
            packages: Vec::new(),
            agent_version: None,
            login: None,
            warnings: Vec::new(),
            pinned_host_key: None,
            error: None,
            duration_ms: 0,
        }
    }

    /// Whether the host ended well.
    pub fn ok(&self) -> bool {
        self.result != Outcome::Failed
    }
}

/// Why a host failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// SSH.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// Detection.
    #[error(transparent)]
    Detect(#[from] DetectError),
    /// Install descriptor.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// An agent binary on this machine.
#[derive(Debug, Clone)]
pub struct Binary {
    /// Path.
    pub path: PathBuf,
    /// SHA-256, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// What every host of a run shares.
pub struct Context {
    /// The settings.
    pub settings: Settings,
    /// Hardware profiles.
    pub profiles: Vec<HardwareProfile>,
    /// Install descriptors.
    pub installers: Installers,
    /// Pinned host keys.
    pub known_hosts: KnownHosts,
    /// The controller.
    pub control: Arc<dyn ControlPlane>,
    binaries: Mutex<BTreeMap<PathBuf, Binary>>,
    run_id: String,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("profiles", &self.profiles.len())
            .finish_non_exhaustive()
    }
}

impl Context {
    /// Loads the install descriptors and the known hosts named in `settings`.
    pub fn new(
        settings: Settings,
        profiles: Vec<HardwareProfile>,
        control: Arc<dyn ControlPlane>,
    ) -> Result<Self, KnownHostsError> {
        let installers = Installers::load(&settings.templates);
        let known_hosts = KnownHosts::open(&settings.known_hosts)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Ok(Self {
            settings,
            profiles,
            installers,
            known_hosts,
            control,
            binaries: Mutex::new(BTreeMap::new()),
            run_id: format!("{}-{nanos:x}", std::process::id()),
        })
    }

    /// The agent binary for a profile: `AGENTS/<packageArch>/sidenet-agent`, else
    /// `AGENTS/<cpuArch>/sidenet-agent`, hashed once per run.
    pub fn binary_for(&self, p: &HardwareProfile) -> Result<Binary, HostError> {
        let dirs: Vec<&str> = p
            .spec
            .package_arch
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(p.spec.cpu_arch.as_str()))
            .collect();
        let candidates: Vec<PathBuf> = dirs
            .iter()
            .map(|d| self.settings.agents.join(d).join(AGENT_FILE))
            .collect();
        let Some(path) = candidates.iter().find(|c| c.is_file()).cloned() else {
            return Err(HostError::Other(format!(
                "no agent binary for {} ({}): looked for {}",
                p.metadata.name.as_deref().unwrap_or("?"),
                p.spec.cpu_arch,
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )));
        };
        // One hash per file, however many architecture folders link to it.
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let mut cache = self.binaries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = cache.get(&key) {
            return Ok(Binary { path, ..b.clone() });
        }
        let read_err = |e: std::io::Error| {
            HostError::Other(format!("cannot read agent binary {}: {e}", path.display()))
        };
        let mut f = std::fs::File::open(&path).map_err(read_err)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            size += n as u64;
            h.update(&buf[..n]);
        }
        let b = Binary {
            path: path.clone(),
            sha256: sidenet_wire::codec::hex(&h.finalize()),
            size,
        };
        cache.insert(key, b.clone());
        Ok(b)
    }
}

/// What the host has installed.
#[derive(Debug, Default)]
pub(crate) struct Installed {
    pub(crate) agent_sha: Option<String>,
    service_sha: Option<String>,
    keep_sha: Option<String>,
    /// `X.Y.Z` from the installed agent's `--version`.
    version: Option<String>,
    /// The installed agent's `--help` offers `--uninstall`.
    pub(crate) uninstall: bool,
    pub(crate) config: Option<String>,
    pub(crate) running: bool,
    pub(crate) node_id: Option<String>,
    stale: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ShowId {
    node: String,
}

fn sha_or_none(s: Option<&String>) -> Option<String> {
    s.map(|v| v.trim().to_string())
        .filter(|v| v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit()))
}

impl Installed {
    pub(crate) fn parse(out: &str) -> Self {
        let s = detect::sections(out);
        Self {
            agent_sha: sha_or_none(s.get("agent")),
            service_sha: sha_or_none(s.get("service")),
            keep_sha: sha_or_none(s.get("keep")),
            version: s.get("version").and_then(|v| parse_version(v)),
            uninstall: s.get("help").is_some_and(|h| h.contains("--uninstall")),
            config: s.get("config").filter(|c| !c.trim().is_empty()).cloned(),
            running: s.get("running").is_some_and(|r| r.trim() == "yes"),
            node_id: s.get("id").and_then(|t| parse_show_id(t)),
            stale: s
                .get("stale")
                .map(|t| t.lines().map(str::to_string).collect())
                .unwrap_or_default(),
        }
    }
}

/// `0.1.0` from `sidenet-agent 0.1.0 (no tls)`.
fn parse_version(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("sidenet-agent ")?;
        let v = rest.split_whitespace().next()?;
        (!v.is_empty()).then(|| v.to_string())
    })
}

fn parse_show_id(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| serde_json::from_str::<ShowId>(l.trim()).ok())
        .map(|s| s.node)
        .filter(|n| sidenet_wire::names::check_node_id(n).is_ok())
}

/// The staging name of a destination: `.NAME.sidenet-new.RUN` in the same folder, so the
/// rename is atomic and nothing scanning the folder (init.d, systemd) picks it up.
fn staging_path(dest: &str, run: &str) -> String {
    let (dir, base) = dest.rsplit_once('/').unwrap_or(("", dest));
    format!("{dir}/.{base}.sidenet-new.{run}")
}

fn parent(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some(("", _)) => "/",
        Some((d, _)) => d,
        None => ".",
    }
}

pub(crate) fn inspect_script(l: &Layout) -> String {
    let q = shell_quote;
    let keep = l.keep.as_ref().map(|k| k.0.clone());
    let stale: Vec<String> = [
        Some(&l.agent),
        Some(&l.config),
        Some(&l.service),
        keep.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|d| {
        let p = staging_path(d, "");
        // Quote everything but the trailing glob.
        format!("{}*", q(&p))
    })
    .collect();
    format!(
        "h() {{ if [ -f \"$1\" ]; then sha256sum \"$1\" 2>/dev/null | cut -d' ' -f1; fi; }}\n\
         echo @@agent; h {agent}\n\
         echo @@service; h {service}\n\
         echo @@keep; {keep}\n\
         echo @@config; cat {config} 2>/dev/null\n\
         echo\n\
         echo @@running; if ({running}) </dev/null >/dev/null 2>&1; then echo yes; else echo no; fi\n\
         echo @@id; if [ -x {agent} ] && [ -f {config} ]; then {agent} --config {config} --show-id 2>/dev/null </dev/null; fi\n\
         echo @@version; if [ -x {agent} ]; then {agent} --version 2>/dev/null </dev/null; fi\n\
         echo @@help; if [ -x {agent} ]; then {agent} --help 2>/dev/null </dev/null | grep -e --uninstall; fi\n\
         echo @@stale; for f in {stale}; do if [ -e \"$f\" ]; then rm -f \"$f\" && echo \"$f\"; fi; done\n\
         echo @@end\n",
        agent = q(&l.agent),
        service = q(&l.service),
        keep = keep
            .as_deref()
            .map(|k| format!("h {}", q(k)))
            .unwrap_or_else(|| ":".into()),
        config = q(&l.config),
        running = l.running,
        stale = stale.join(" "),
    )
}

fn stage_script(tmp: &str, sha: &str, mode: u32) -> String {
    let t = shell_quote(tmp);
    let d = shell_quote(parent(tmp));
    format!(
        "trap '' PIPE HUP\n\
         command -v sha256sum >/dev/null 2>&1 || {{ echo 'sha256sum is not installed on the host' >&2; exit 13; }}\n\
         mkdir -p {d} || exit 10\n\
         rm -f {t}\n\
         (umask 077; cat > {t}) || {{ rm -f {t}; echo 'cannot write {tmp}' >&2; exit 11; }}\n\
         s=$(sha256sum {t} 2>/dev/null | cut -d' ' -f1)\n\
         if [ \"$s\" != {sha} ]; then n=$(wc -c < {t} 2>/dev/null); rm -f {t}; echo \"checksum mismatch after upload: expected {sha}, got ${{s:-nothing}} (${{n:-0}} bytes)\" >&2; exit 12; fi\n\
         chmod {mode:o} {t}\n",
    )
}

/// Wraps a reader to report upload progress.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    last_pct: u64,
    report: &'a dyn Fn(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        if pct != self.last_pct {
            self.last_pct = pct;
            (self.report)(pct);
        }
        Ok(n)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub(crate) struct Run<'a> {
    pub(crate) t: &'a Target,
    pub(crate) ctx: &'a Context,
    pub(crate) progress: &'a dyn Fn(Step, &str),
    pub(crate) rep: HostReport,
    pub(crate) conn: Option<Conn>,
    pub(crate) staged: Vec<String>,
}

/// A host logged in to, with its board detected and its family's descriptor resolved.
pub(crate) struct Opened<'a> {
    pub(crate) facts: Facts,
    pub(crate) profile: &'a HardwareProfile,
    pub(crate) desc_path: &'a Path,
    pub(crate) spec: &'a InstallSpec,
    pub(crate) layout: Layout,
}

/// Provisions one host; `progress` hears every step. Never panics and never returns early
/// without a report: a failure is a report with the step and the reason.
pub fn provision_host(t: &Target, ctx: &Context, progress: &dyn Fn(Step, &str)) -> HostReport {
    drive(t, ctx, progress, |run| run.go())
}

/// Runs `body` on one host and turns its result into the report.
pub(crate) fn drive<'a>(
    t: &'a Target,
    ctx: &'a Context,
    progress: &'a dyn Fn(Step, &str),
    body: impl FnOnce(&mut Run<'a>) -> Result<Outcome, HostError>,
) -> HostReport {
    let started = Instant::now();
    let mut run = Run {
        t,
        ctx,
        progress,
        rep: HostReport::new(t),
        conn: None,
        staged: Vec::new(),
    };
    let result = body(&mut run);
    match result {
        Ok(outcome) => {
            run.rep.result = outcome;
            run.rep.step = Step::Done;
        }
        Err(e) => {
            run.cleanup();
            run.rep.result = Outcome::Failed;
            run.rep.error = Some(format!("{}: {}: {e}", t.label(), run.rep.step.as_str()));
        }
    }
    run.rep.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    (run.progress)(
        Step::Done,
        run.rep.error.as_deref().unwrap_or(run.rep.result.as_str()),
    );
    run.rep
}

impl<'a> Run<'a> {
    pub(crate) fn at(&mut self, step: Step, detail: &str) {
        self.rep.step = step;
        (self.progress)(step, detail);
    }

    pub(crate) fn conn(&self) -> Result<&Conn, HostError> {
        self.conn
            .as_ref()
            .ok_or_else(|| HostError::Other("not connected".into()))
    }

    /// Connects, logs in, detects the board and resolves the family's descriptor.
    pub(crate) fn open(&mut self) -> Result<Opened<'a>, HostError> {
        let t = self.t;
        let ctx = self.ctx;
        let s = &ctx.settings;
        self.at(Step::Connect, &format!("{}:{}", t.host, t.port));
        let pinned = t
            .host_key
            .as_deref()
            .map(HostKey::parse)
            .transpose()
            .map_err(|e| HostError::Other(format!("hostKey: {e}")))?;
        let (conn, key) = ssh::connect(
            &Endpoint {
                host: &t.host,
                port: t.port,
                host_key: pinned.as_ref(),
                trust_on_first_use: s.trust_on_first_use,
                timeout: s.ssh_timeout,
            },
            &ctx.known_hosts,
        )?;
        if let KeyOutcome::Pinned(fp) = key {
            self.rep.pinned_host_key = Some(fp);
        }
        self.conn = Some(conn);

        self.at(Step::Login, &t.user);
        let method = self.conn()?.login(&t.user, t.credential.as_ref())?;
        self.rep.login = Some(method.to_string());
        if method == "none" {
            self.rep.warnings.push(format!(
                "logged in as {} without a password (the SSH `none` method): this router has no {} password; set one (`passwd`) or install a key",
                t.user, t.user
            ));
        }

        self.at(Step::Detect, "");
        let out = self
            .conn()?
            .run("detect the board", &detect::probe_script(&t.root))?
            .check("detect the board")?;
        let facts = Facts::from_probe(&out.stdout);
        self.rep.board = Some(facts.summary());
        let profile = detect::match_profile(&facts, &ctx.profiles, t.profile.as_deref(), &t.root)?;
        let profile_name = profile.metadata.name.clone().unwrap_or_default();
        self.rep.profile = Some(profile_name.clone());
        let (desc_path, spec) = ctx.installers.get(profile.spec.firmware)?;
        let layout = spec.layout(desc_path, &t.root, &s.mesh, &t.hostname())?;
        self.at(
            Step::Detect,
            &format!("{} → {profile_name}", facts.summary()),
        );
        Ok(Opened {
            facts,
            profile,
            desc_path,
            spec,
            layout,
        })
    }

    fn go(&mut self) -> Result<Outcome, HostError> {
        let ctx = self.ctx;
        let s = &ctx.settings;
        let Opened {
            facts,
            profile,
            desc_path,
            spec,
            layout,
        } = self.open()?;
        let profile_name = profile.metadata.name.clone().unwrap_or_default();
        let binary = ctx.binary_for(profile)?;

        self.at(Step::Inspect, "");
        let out = self
            .conn()?
            .run("inspect the installed agent", &inspect_script(&layout))?
            .check("inspect the installed agent")?;
        let installed = Installed::parse(&out.stdout);
        if !installed.stale.is_empty() {
            self.rep.changes.push(format!(
                "removed {} file(s) left staged by an interrupted run",
                installed.stale.len()
            ));
        }

        // Refuse before anything is uploaded when the configs' packages cannot be installed.
        let packages = match &spec.packages {
            Some(p) => self.packages(p, &facts, desc_path)?,
            None => Vec::new(),
        };

        let mut desired = Bootstrap {
            mesh: s.mesh.clone(),
            broker: s.broker.clone(),
            broker_ca: s.broker_ca.clone(),
            mesh_key: s.mesh_key.clone(),
            root: self.t.root.clone(),
            state: layout.state.clone(),
            hostname: self.t.hostname(),
            board: facts.board_name.clone(),
            profile: Some(profile_name),
            token: None,
        };
        let service_sha = sha256_hex(layout.service_content.as_bytes());
        let agent_ok = installed.agent_sha.as_deref() == Some(binary.sha256.as_str());
        let service_ok = installed.service_sha.as_deref() == Some(service_sha.as_str());
        let keep_ok = match &layout.keep {
            Some((_, _, content)) => {
                installed.keep_sha.as_deref() == Some(sha256_hex(content.as_bytes()).as_str())
            }
            None => true,
        };
        let config_ok = installed
            .config
            .as_deref()
            .is_some_and(|c| desired.same_as_installed(c));

        if agent_ok
            && service_ok
            && keep_ok
            && config_ok
            && installed.running
            && packages.is_empty()
        {
            let node = match installed.node_id.clone() {
                Some(n) => n,
                None => self.show_id(&layout)?,
            };
            self.rep.node_id = Some(node.clone());
            let version = match installed.version.clone() {
                Some(v) => v,
                None => self.agent_version(&layout.agent)?,
            };
            self.rep.agent_version = Some(version.clone());
            self.wait_online(&node, &version, None, &layout)?;
            return Ok(Outcome::AlreadyProvisioned);
        }

        if !config_ok {
            let known = match &installed.node_id {
                Some(id) => ctx
                    .control
                    .node(&s.mesh, id)
                    .map_err(|e| HostError::Other(format!("asking the controller: {e}")))?
                    .is_some(),
                None => false,
            };
            if !known {
                desired.token = ctx.control.enrolment_token(&s.mesh).map_err(|e| {
                    HostError::Other(format!(
                        "getting an enrolment token from the controller: {e}"
                    ))
                })?;
            }
        }

        // Stage and verify everything that differs before anything is switched.
        let mut switch: Vec<(String, String)> = Vec::new();
        let mut version = installed.version.clone();
        if !agent_ok {
            let tmp = staging_path(&layout.agent, &ctx.run_id);
            self.at(
                Step::Upload,
                &format!("agent {} ({})", profile.spec.cpu_arch, mib(binary.size)),
            );
            let file = std::fs::File::open(&binary.path).map_err(|e| {
                HostError::Other(format!(
                    "cannot read agent binary {}: {e}",
                    binary.path.display()
                ))
            })?;
            let progress = self.progress;
            let size = binary.size;
            let report = move |pct: u64| {
                progress(Step::Upload, &format!("agent {pct}% of {}", mib(size)));
            };
            let mut reader = Counting {
                inner: file,
                done: 0,
                total: binary.size,
                last_pct: 0,
                report: &report,
            };
            self.staged.push(tmp.clone());
            self.conn()?
                .run_with_input(
                    "upload the agent",
                    &stage_script(&tmp, &binary.sha256, 0o755),
                    Some(&mut reader),
                )?
                .check("upload the agent")?;
            let out = self.conn()?.run(
                "run the uploaded agent",
                &format!("{} --version 2>&1 </dev/null", shell_quote(&tmp)),
            )?;
            let parsed = parse_version(&out.stdout);
            if out.status != 0 || parsed.is_none() {
                return Err(HostError::Other(format!(
                    "the agent for {} ({}) does not run on this host (exit status {}): {}",
                    profile.spec.cpu_arch,
                    binary.path.display(),
                    out.status,
                    out.stdout.trim().chars().take(300).collect::<String>()
                )));
            }
            version = parsed;
            // `sidenet-agent X.Y.Z (tls)`: built with the cargo feature `tls`.
            if s.broker.starts_with("mqtts://") && !out.stdout.contains("(tls)") {
                return Err(HostError::Other(format!(
                    "the agent {} cannot speak mqtts:// (its --version says {:?}): build it with `--features tls`",
                    binary.path.display(),
                    out.stdout.trim()
                )));
            }
            switch.push((tmp, layout.agent.clone()));
            self.rep.changes.push("agent binary".into());
        }
        if !config_ok {
            self.at(Step::Upload, "bootstrap config");
            let bytes = desired.to_bytes();
            let tmp =
                self.stage_bytes(&layout.config, &bytes, 0o600, "upload the bootstrap config")?;
            switch.push((tmp, layout.config.clone()));
            self.rep.changes.push("bootstrap config".into());
        }
        if !keep_ok && let Some((path, mode, content)) = &layout.keep {
            self.at(Step::Upload, "keep list");
            let tmp = self.stage_bytes(
                path,
                content.as_bytes(),
                *mode,
                "upload the list of files a firmware upgrade keeps",
            )?;
            switch.push((tmp, path.clone()));
            self.rep.changes.push("keep list".into());
        }
        if !service_ok {
            self.at(Step::Upload, "service");
            let tmp = self.stage_bytes(
                &layout.service,
                layout.service_content.as_bytes(),
                layout.service_mode,
                "upload the service definition",
            )?;
            switch.push((tmp, layout.service.clone()));
            self.rep.changes.push("service".into());
        }

        // Switch (each rename atomic, the service definition last), then enable: also when
        // nothing was switched, in case an interrupted run switched but did not enable.
        self.at(Step::Install, "");
        let mut script = String::from("set -e\n");
        for (tmp, dest) in &switch {
            script.push_str(&format!(
                "mv -f {} {}\n",
                shell_quote(tmp),
                shell_quote(dest)
            ));
        }
        script.push_str(&layout.enable);
        script.push('\n');
        self.conn()?
            .run("switch the new files into place", &script)?
            .check("switch the new files into place")?;
        self.staged.clear();
        let node = self.show_id(&layout)?;
        self.rep.node_id = Some(node.clone());
        let version = match version {
            Some(v) => v,
            None => self.agent_version(&layout.agent)?,
        };
        self.rep.agent_version = Some(version.clone());

        // The agent checks the packages when it starts: a new package means a restart too.
        let restart = installed.running && (!switch.is_empty() || !packages.is_empty());
        // What the controller heard from the node before: only a report from a later start
        // counts as the (re)started agent's.
        let before = if s.wait_for_enrolment {
            ctx.control
                .node(&s.mesh, &node)
                .ok()
                .flatten()
                .and_then(|n| n.agent_epoch)
        } else {
            None
        };
        self.at(Step::Start, "");
        let mut script = String::new();
        if restart {
            script.push_str(&format!("{}\n", layout.stop));
        }
        script.push_str(&format!(
            "{start}\n\
             i=0\n\
             while ! ({running}) </dev/null >/dev/null 2>&1; do\n\
             \x20 i=$((i+1)); if [ $i -ge 10 ]; then echo 'the service does not run 10 s after it was started' >&2; exit 1; fi\n\
             \x20 sleep 1\n\
             done\n",
            start = layout.start,
            running = layout.running,
        ));
        self.conn()?
            .run("start the service", &script)?
            .check("start the service")?;
        self.rep.changes.push(if restart {
            "restarted".into()
        } else if installed.running {
            "running".into()
        } else {
            "started".into()
        });
        self.wait_online(&node, &version, Some(before), &layout)?;
        Ok(Outcome::Provisioned)
    }

    /// Checks the packages the configs need and installs the missing ones; the installed ones.
    fn packages(
        &mut self,
        spec: &PackagesSpec,
        facts: &Facts,
        desc_path: &Path,
    ) -> Result<Vec<String>, HostError> {
        self.at(Step::Packages, "");
        let desc = desc_path.display();
        let version = facts.os_version.as_deref();
        let manager = spec.manager_for(version).map_err(|e| {
            HostError::Other(format!(
                "{desc}: {e}; this host runs {}",
                facts.os_pretty.as_deref().unwrap_or("an unknown version")
            ))
        })?;
        let check = |run: &mut Self| -> Result<packages::Check, HostError> {
            let out = run
                .conn()?
                .run("check the packages", &packages::check_script(spec, manager))?
                .check("check the packages")?;
            Ok(packages::parse_check(&out.stdout))
        };
        let found = check(self)?;
        if found.missing.is_empty() {
            self.at(Step::Packages, "all there");
            return Ok(Vec::new());
        }
        let what = packages::describe(&found.missing, spec, &found.installed);
        if !found.manager {
            return Err(HostError::Other(format!(
                "missing packages: {}; `{}` (the package manager {desc} names for {}) is not on the host, so they cannot be installed",
                found.missing.join(", "),
                manager.command(),
                facts.os_pretty.as_deref().unwrap_or("this version"),
            )));
        }
        self.at(
            Step::Packages,
            &format!("{} install {what}", manager.as_str()),
        );
        let out = self.conn()?.run(
            "install packages",
            &packages::install_script(spec, manager, &found.missing, &found.installed),
        )?;
        let detail = |o: &ssh::Output| {
            let text = o
                .stdout
                .lines()
                .filter(|l| !l.starts_with("@@"))
                .collect::<Vec<_>>()
                .join("\n");
            let text = text.trim();
            if text.is_empty() {
                o.stderr.trim().chars().take(600).collect::<String>()
            } else {
                text.chars().take(1200).collect()
            }
        };
        let step = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("@@").filter(|x| *x != "done"))
            .unwrap_or("the install script failed")
            .to_string();
        match out.status {
            0 => {}
            packages::NO_SOURCE => {
                return Err(HostError::Other(format!(
                    "no package source: {step}, so nothing was installed. Missing: {}. Give the host a package source (internet access or a local feed) and run again, or install them by hand. {}:\n{}",
                    found.missing.join(", "),
                    manager.as_str(),
                    detail(&out)
                )));
            }
            code => {
                return Err(HostError::Other(format!(
                    "installing {what} failed ({step}, exit status {code}); still missing: {}. {}:\n{}",
                    found.missing.join(", "),
                    manager.as_str(),
                    detail(&out)
                )));
            }
        }
        let after = check(self)?;
        if !after.missing.is_empty() {
            let why: Vec<String> = spec
                .require
                .iter()
                .filter(|p| after.missing.contains(&p.package))
                .map(|p| {
                    let mut call = vec![p.program.clone()];
                    call.extend(p.args.iter().cloned());
                    format!("{} (`{}` fails)", p.package, call.join(" "))
                })
                .collect();
            return Err(HostError::Other(format!(
                "`{}` installed {what}, but these are still missing: {}",
                manager.command(),
                why.join(", ")
            )));
        }
        self.rep.packages = found.missing.clone();
        self.rep.changes.push(format!("packages: {what}"));
        Ok(found.missing)
    }

    fn agent_version(&self, agent: &str) -> Result<String, HostError> {
        let out = self.conn()?.run(
            "ask the agent its version",
            &format!("{} --version 2>&1 </dev/null", shell_quote(agent)),
        )?;
        parse_version(&out.stdout).ok_or_else(|| {
            HostError::Other(format!(
                "{agent} --version: unexpected answer (exit status {}): {}",
                out.status,
                out.stdout.trim().chars().take(300).collect::<String>()
            ))
        })
    }

    fn stage_bytes(
        &mut self,
        dest: &str,
        bytes: &[u8],
        mode: u32,
        what: &str,
    ) -> Result<String, HostError> {
        let tmp = staging_path(dest, &self.ctx.run_id);
        self.staged.push(tmp.clone());
        let mut input: &[u8] = bytes;
        self.conn()?
            .run_with_input(
                what,
                &stage_script(&tmp, &sha256_hex(bytes), mode),
                Some(&mut input),
            )?
            .check(what)?;
        Ok(tmp)
    }

    pub(crate) fn show_id(&self, l: &Layout) -> Result<String, HostError> {
        let out = self
            .conn()?
            .run(
                "read the node id",
                &format!(
                    "{} --config {} --show-id </dev/null",
                    shell_quote(&l.agent),
                    shell_quote(&l.config)
                ),
            )?
            .check("read the node id")?;
        parse_show_id(&out.stdout).ok_or_else(|| {
            HostError::Other(format!(
                "read the node id: unexpected answer from {} --show-id: {}",
                l.agent,
                out.stdout.trim()
            ))
        })
    }

    /// Waits until the controller sees `node` online, running agent `version`, with nothing
    /// missing, and (when `before` is given: the agent was just started) from a later start of
    /// the agent than the last report it had before (`Some(None)`: none before).
    fn wait_online(
        &mut self,
        node: &str,
        version: &str,
        before: Option<Option<u64>>,
        l: &Layout,
    ) -> Result<(), HostError> {
        let s = &self.ctx.settings;
        if !s.wait_for_enrolment {
            return Ok(());
        }
        self.at(
            Step::Enrol,
            &format!("{node}: waiting for it online with agent {version}"),
        );
        let deadline = Instant::now() + s.enrol_timeout;
        let mut last_err = None;
        let mut last: Option<NodeSeen> = None;
        loop {
            match self.ctx.control.node(&s.mesh, node) {
                Ok(Some(seen)) => {
                    self.rep.phase = Some(seen.phase.clone());
                    let fresh = match before {
                        Some(Some(b)) => seen.agent_epoch.is_some_and(|e| e > b),
                        _ => true,
                    };
                    if fresh
                        && seen.online == Some(true)
                        && seen.agent_version.as_deref() == Some(version)
                        && seen.missing.is_empty()
                    {
                        return Ok(());
                    }
                    last = Some(seen);
                }
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                let running = self
                    .conn()?
                    .run("check the service", &format!("{}\n", l.running))
                    .map(|o| if o.status == 0 { "yes" } else { "no" })
                    .unwrap_or("unknown");
                let seen = match &last {
                    None => "has not heard from it".to_string(),
                    Some(n) => {
                        let mut parts = vec![format!("phase {}", n.phase)];
                        parts.push(match n.online {
                            Some(true) => "online".into(),
                            Some(false) => "offline".into(),
                            None => "presence unknown".into(),
                        });
                        parts.push(match &n.agent_version {
                            Some(v) => format!("agent {v}"),
                            None => "no status report".into(),
                        });
                        if let (Some(Some(b)), Some(e)) = (before, n.agent_epoch)
                            && e <= b
                        {
                            parts.push(
                                "its last report is from before the agent was started".into(),
                            );
                        }
                        if !n.missing.is_empty() {
                            parts.push(format!("missing: {}", n.missing.join(", ")));
                        }
                        parts.join(", ")
                    }
                };
                return Err(HostError::Other(format!(
                    "node {node} did not come online with agent {version} within {:?}: the controller {seen} (service running: {running}{})",
                    s.enrol_timeout,
                    last_err
                        .map(|e| format!("; controller: {e}"))
                        .unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Removes what this run staged (best effort: the connection may be gone, and the remote
    /// staging script removes a short upload by itself).
    fn cleanup(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        if let Some(conn) = &self.conn {
            let files: Vec<String> = self.staged.iter().map(|f| shell_quote(f)).collect();
            let _ = conn.run("clean up", &format!("rm -f {}\n", files.join(" ")));
        }
        self.staged.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_hidden_siblings() {
        assert_eq!(
            staging_path("/etc/init.d/sidenet-agent", "42-a"),
            "/etc/init.d/.sidenet-agent.sidenet-new.42-a"
        );
        assert_eq!(parent("/etc/init.d/.x"), "/etc/init.d");
        assert_eq!(parent("/x"), "/");
    }

    #[test]
    fn inspect_output_is_read() {
        let sha = "a".repeat(64);
        let out = format!(
            "@@agent\n{sha}\n@@service\n@@config\n{{\"mesh\":\"m\"}}\n\n@@running\nyes\n@@id\n{{\"node\":\"bhctvmiyz6ovk27g\",\"publicKey\":\"x\"}}\n@@stale\n/usr/bin/.sidenet-agent.sidenet-new.1-2\n@@end\n"
        );
        let i = Installed::parse(&out);
        assert_eq!(i.agent_sha.as_deref(), Some(sha.as_str()));
        assert_eq!(i.service_sha, None);
        assert!(i.config.as_deref().is_some_and(|c| c.contains("\"mesh\"")));
        assert!(i.running);
        assert_eq!(i.node_id.as_deref(), Some("bhctvmiyz6ovk27g"));
        assert_eq!(i.stale.len(), 1);
        let i = Installed::parse("@@agent\n@@running\nno\n@@id\nerror: unknown flag\n@@end\n");
        assert_eq!(i.agent_sha, None);
        assert!(!i.running);
        assert_eq!(i.node_id, None);
    }
}
