//! What every host of a run shares and what a host's run reports: the controller as the
//! provisioner sees it ([`ControlPlane`]), the steps, outcomes and reports, and the run's
//! [`Context`] (settings, profiles, install descriptors, pinned host keys, agent binaries).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sidenet_crds::HardwareProfile;

use crate::detect::DetectError;
use crate::install::{InstallError, Installers};
use crate::knownhosts::{KnownHosts, KnownHostsError};
use crate::plan::{Settings, Target};
use crate::ssh::SshError;

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
    /// Names this run's staged files.
    pub(crate) run_id: String,
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
}
