//! One host, start to end (blocking): connect and check the host key, log in, detect the board,
//! match a profile, compare what is installed with what should be, stage and verify what
//! differs, switch it into place, start the service and wait until the controller sees the node.
//!
//! Every file is staged next to its destination as `.NAME.sidenet-new.RUN` and checked on the
//! device (SHA-256) by the same remote script that received it: if the upload is cut (the
//! provisioning process killed, the network gone) that script sees a short file and deletes it.
//! Only when every changed file is staged and verified are they renamed into place (each rename
//! atomic; the service definition last), so a host never runs a half-written agent. Leftovers of
//! an interrupted run are removed by the next one.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sidenet_crds::HardwareProfile;
use sidenet_wire::codec::sha256_hex;

use crate::detect::{self, DetectError, Facts};
use crate::install::{Bootstrap, InstallError, Installers, Layout, shell_quote};
use crate::knownhosts::{HostKey, KnownHosts, KnownHostsError};
use crate::plan::{Settings, Target};
use crate::ssh::{self, Conn, Endpoint, KeyOutcome, SshError};

/// File name of the agent binary in the agents folder.
pub const AGENT_FILE: &str = "sidenet-agent";

/// What the provisioner asks of the controller.
pub trait ControlPlane: Send + Sync {
    /// How the controller sees a node of `mesh`: its phase (`Enrolled`, `Pending`, `Ready`, ...),
    /// or `None` until it enrolled.
    fn node_phase(&self, mesh: &str, node: &str) -> Result<Option<String>, String>;
    /// A single-use enrolment token for one new node, or `None` when the mesh needs none.
    fn enrolment_token(&self, mesh: &str) -> Result<Option<String>, String>;
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
    /// Staging and verifying files.
    Upload,
    /// Switching files into place, enabling the service.
    Install,
    /// Starting the service.
    Start,
    /// Waiting until the controller sees the node.
    Enrol,
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
            Step::Upload => "upload",
            Step::Install => "install",
            Step::Start => "start",
            Step::Enrol => "enrol",
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
    /// The host failed; see the error.
    Failed,
}

impl Outcome {
    /// As shown in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Provisioned => "provisioned",
            Outcome::AlreadyProvisioned => "already provisioned",
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

    /// The agent binary for a profile, the first of [`agent_candidates`] that exists, hashed
    /// once per run.
    pub fn binary_for(&self, p: &HardwareProfile) -> Result<Binary, HostError> {
        let tls = self.settings.broker.starts_with("mqtts://");
        let candidates = agent_candidates(&self.settings.agents, p, tls);
        let Some(path) = candidates.iter().find(|c| c.is_file()).cloned() else {
            return Err(HostError::Other(no_agent_message(p, &candidates, tls)));
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

/// Where the agent binary for a profile is looked for, in order: `AGENTS/<packageArch>/sidenet-agent`,
/// then `AGENTS/<cpuArch>/sidenet-agent`; for an `mqtts://` broker the TLS builds under
/// `AGENTS/tls/` first (the layout `scripts/build-agents` writes; docs/agents.md).
pub fn agent_candidates(agents: &std::path::Path, p: &HardwareProfile, tls: bool) -> Vec<PathBuf> {
    let arches: Vec<&str> = p
        .spec
        .package_arch
        .iter()
        .map(String::as_str)
        .chain(std::iter::once(p.spec.cpu_arch.as_str()))
        .collect();
    let tls_dir = agents.join("tls");
    let tls_first = tls.then_some(tls_dir.as_path());
    tls_first
        .into_iter()
        .chain(std::iter::once(agents))
        .flat_map(|dir| arches.iter().map(move |a| dir.join(a).join(AGENT_FILE)))
        .collect()
}

/// Why provisioning refuses a host whose architecture has no agent binary, and how to get one.
fn no_agent_message(p: &HardwareProfile, candidates: &[PathBuf], tls: bool) -> String {
    let arch = p.spec.package_arch.as_deref().unwrap_or(&p.spec.cpu_arch);
    format!(
        "no agent binary for {} ({arch}): looked for {}; build it with `scripts/build-agents {}{arch}` (docs/agents.md)",
        p.metadata.name.as_deref().unwrap_or("?"),
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if tls { "--tls " } else { "" },
    )
}

/// What the host has installed.
#[derive(Debug, Default)]
struct Installed {
    agent_sha: Option<String>,
    service_sha: Option<String>,
    config: Option<String>,
    running: bool,
    node_id: Option<String>,
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
    fn parse(out: &str) -> Self {
        let s = detect::sections(out);
        Self {
            agent_sha: sha_or_none(s.get("agent")),
            service_sha: sha_or_none(s.get("service")),
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

fn inspect_script(l: &Layout) -> String {
    let q = shell_quote;
    let stale: Vec<String> = [&l.agent, &l.config, &l.service]
        .iter()
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
         echo @@config; cat {config} 2>/dev/null\n\
         echo\n\
         echo @@running; if ({running}) </dev/null >/dev/null 2>&1; then echo yes; else echo no; fi\n\
         echo @@id; if [ -x {agent} ] && [ -f {config} ]; then {agent} --config {config} --show-id 2>/dev/null </dev/null; fi\n\
         echo @@stale; for f in {stale}; do if [ -e \"$f\" ]; then rm -f \"$f\" && echo \"$f\"; fi; done\n\
         echo @@end\n",
        agent = q(&l.agent),
        service = q(&l.service),
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

struct Run<'a> {
    t: &'a Target,
    ctx: &'a Context,
    progress: &'a dyn Fn(Step, &str),
    rep: HostReport,
    conn: Option<Conn>,
    staged: Vec<String>,
}

/// Provisions one host; `progress` hears every step. Never panics and never returns early
/// without a report: a failure is a report with the step and the reason.
pub fn provision_host(t: &Target, ctx: &Context, progress: &dyn Fn(Step, &str)) -> HostReport {
    let started = Instant::now();
    let mut run = Run {
        t,
        ctx,
        progress,
        rep: HostReport::new(t),
        conn: None,
        staged: Vec::new(),
    };
    let result = run.go();
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

impl Run<'_> {
    fn at(&mut self, step: Step, detail: &str) {
        self.rep.step = step;
        (self.progress)(step, detail);
    }

    fn conn(&self) -> Result<&Conn, HostError> {
        self.conn
            .as_ref()
            .ok_or_else(|| HostError::Other("not connected".into()))
    }

    fn go(&mut self) -> Result<Outcome, HostError> {
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
        let cred = t.credential.as_ref().ok_or_else(|| {
            HostError::Other(
                "no credentials: give privateKeyFile or passwordFile (CLI) or a Secret reference"
                    .into(),
            )
        })?;
        self.conn()?.login(&t.user, cred)?;

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
        let binary = ctx.binary_for(profile)?;
        self.at(
            Step::Detect,
            &format!("{} → {profile_name}", facts.summary()),
        );

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
        let mut desired = Bootstrap {
            mesh: s.mesh.clone(),
            broker: s.broker.clone(),
            broker_ca: s.broker_ca.clone(),
            mesh_key: s.mesh_key.clone(),
            root: t.root.clone(),
            state: layout.state.clone(),
            hostname: t.hostname(),
            board: facts.board_name.clone(),
            profile: Some(profile_name),
            token: None,
        };
        let service_sha = sha256_hex(layout.service_content.as_bytes());
        let agent_ok = installed.agent_sha.as_deref() == Some(binary.sha256.as_str());
        let service_ok = installed.service_sha.as_deref() == Some(service_sha.as_str());
        let config_ok = installed
            .config
            .as_deref()
            .is_some_and(|c| desired.same_as_installed(c));

        if agent_ok && service_ok && config_ok && installed.running {
            let node = match installed.node_id.clone() {
                Some(n) => n,
                None => self.show_id(&layout)?,
            };
            self.rep.node_id = Some(node.clone());
            self.wait_enrolled(&node, &layout)?;
            return Ok(Outcome::AlreadyProvisioned);
        }

        if !config_ok {
            let known = match &installed.node_id {
                Some(id) => ctx
                    .control
                    .node_phase(&s.mesh, id)
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
            if out.status != 0 || !out.stdout.contains("sidenet-agent") {
                return Err(HostError::Other(format!(
                    "the agent for {} ({}) does not run on this host (exit status {}): {}",
                    profile.spec.cpu_arch,
                    binary.path.display(),
                    out.status,
                    out.stdout.trim().chars().take(300).collect::<String>()
                )));
            }
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

        self.at(Step::Start, "");
        let mut script = String::new();
        let restart = installed.running && !switch.is_empty();
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
        } else {
            "started".into()
        });
        self.wait_enrolled(&node, &layout)?;
        Ok(Outcome::Provisioned)
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

    fn show_id(&self, l: &Layout) -> Result<String, HostError> {
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

    fn wait_enrolled(&mut self, node: &str, l: &Layout) -> Result<(), HostError> {
        let s = &self.ctx.settings;
        if !s.wait_for_enrolment {
            return Ok(());
        }
        self.at(Step::Enrol, node);
        let deadline = Instant::now() + s.enrol_timeout;
        let mut last_err = None;
        loop {
            match self.ctx.control.node_phase(&s.mesh, node) {
                Ok(Some(phase)) => {
                    self.rep.phase = Some(phase);
                    return Ok(());
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
                return Err(HostError::Other(format!(
                    "node {node} did not enrol within {:?} (service running: {running}{})",
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

    #[allow(clippy::unwrap_used)]
    fn profile(name: &str) -> HardwareProfile {
        let path = format!(
            "{}/../hardware-profiles/{name}.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        sidenet_crds::yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn agent_binaries_are_looked_up_by_architecture() {
        let c7 = profile("tplink-archer-c7-v2");
        let pi = profile("raspberrypi-4b-awus036acm");
        let d = std::path::Path::new("dist");
        let names = |v: Vec<PathBuf>| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(agent_candidates(d, &c7, false)),
            ["dist/mips_24kc/sidenet-agent", "dist/mips/sidenet-agent"]
        );
        assert_eq!(
            names(agent_candidates(d, &c7, true)),
            [
                "dist/tls/mips_24kc/sidenet-agent",
                "dist/tls/mips/sidenet-agent",
                "dist/mips_24kc/sidenet-agent",
                "dist/mips/sidenet-agent"
            ]
        );
        assert_eq!(
            names(agent_candidates(d, &pi, false)),
            ["dist/aarch64/sidenet-agent"]
        );
        let m = no_agent_message(&c7, &agent_candidates(d, &c7, false), false);
        assert_eq!(
            m,
            "no agent binary for tplink-archer-c7-v2 (mips_24kc): looked for dist/mips_24kc/sidenet-agent, dist/mips/sidenet-agent; build it with `scripts/build-agents mips_24kc` (docs/agents.md)"
        );
        assert!(
            no_agent_message(&c7, &[], true).contains("`scripts/build-agents --tls mips_24kc`")
        );
    }

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
