//! The admin protocol between `sidenetctl` and a running standalone controller.
//!
//! One JSON request per line over the Unix socket `STATE/admin.sock` (mode 0600: whoever can
//! open it can administer the mesh, exactly like whoever can read the state folder), one JSON
//! response per line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sidenet_crds::NodeProvisionStatus;
use sidenet_wire::messages::NodeConfig;

use crate::reconcile::model::{Counters, StatusRow};

/// File name of the socket in the state folder.
pub const SOCKET: &str = "admin.sock";

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Node table.
    Status,
    /// Approve a node by id or MeshNode name.
    Approve {
        /// Node id or MeshNode name.
        node: String,
    },
    /// Remove an enrolled node (by id or MeshNode name): record deleted, broker credentials
    /// revoked, retained config cleared.
    Remove {
        /// Node id or MeshNode name.
        node: String,
    },
    /// Create a single-use enrolment token.
    Token {
        /// Mesh network name.
        mesh: String,
        /// Validity in seconds.
        ttl_s: u64,
    },
    /// Rotate a mesh's signing key.
    RotateKey {
        /// Mesh network name.
        mesh: String,
        /// Seconds agents still accept configs signed by the old key.
        overlap_s: u64,
    },
    /// What a node would receive, before signing.
    Render {
        /// Node id or MeshNode name.
        node: String,
    },
    /// What putting these manifests in force would publish (`sidenetctl plan`): the
    /// controller reads the files and folders itself (it runs on the same host), checks them,
    /// and compares against what it has published. Nothing is applied.
    Plan {
        /// Manifest files and folders (absolute paths), hardware profiles included.
        files: Vec<std::path::PathBuf>,
    },
    /// Staged rollouts (`sidenetctl rollout`): `action` is `status`, `pause`, `resume` or
    /// `abort`; `mesh` (Mesh name or network name) is required but for `status`.
    Rollout {
        /// What to do.
        action: String,
        /// Which mesh.
        #[serde(default)]
        mesh: Option<String>,
    },
    /// The meshes' policies, for the HTTP service's ALTO rate cost. In-process only (the
    /// engine task's channel): never read from or written to the socket.
    #[serde(skip)]
    Policies,
}

/// A response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    /// Node table, plus the current manifest problems (the controller keeps running on the
    /// last good manifests while there are any).
    Status {
        /// Rows.
        nodes: Vec<StatusRow>,
        /// Manifest errors, one line each.
        manifest_errors: Vec<String>,
        /// Counters.
        counters: Counters,
        /// State epoch.
        epoch: u64,
        /// `NodeProvision` jobs: live progress and results.
        #[serde(default)]
        provisions: Vec<ProvisionRow>,
    },
    /// Approved; `published` configs were sent.
    Approved {
        /// Node id.
        node: String,
        /// Configs published as a result.
        published: usize,
        /// The node has not asked to join yet: it is admitted when it does.
        #[serde(default)]
        ahead: bool,
    },
    /// Removed.
    Removed {
        /// Node id.
        node: String,
        /// Its config topic (cleared); none for a node that was only waiting for approval, or
        /// approved ahead.
        #[serde(default)]
        topic: Option<String>,
    },
    /// A new token (shown once; only its hash is stored).
    Token {
        /// The token.
        token: String,
        /// Expiry, Unix seconds.
        expires: u64,
        /// The mesh's enrolment mode (`auto`, `approval`, `token`): a token admits a node only
        /// in `token` mode; in the other modes it is accepted but changes nothing.
        #[serde(default)]
        mode: Option<String>,
    },
    /// The mesh key was rotated.
    Rotated {
        /// Mesh network name.
        mesh: String,
        /// The new public key (base64).
        key: String,
        /// Until when agents accept the old key (Unix seconds).
        previous_until: u64,
        /// Configs published under the new key.
        published: usize,
    },
    /// A rendered config.
    Render {
        /// The config.
        config: Box<NodeConfig>,
    },
    /// A plan.
    Plan {
        /// What would change.
        report: Box<crate::reconcile::diff::PlanReport>,
    },
    /// Rollouts: every mesh's for `status`, else the one acted on.
    Rollouts {
        /// The rollouts.
        rollouts: Vec<crate::reconcile::rollout::Status>,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
    /// The meshes' policies ([`Request::Policies`]; in-process only).
    #[serde(skip)]
    Policies {
        /// The policies.
        policies: std::sync::Arc<crate::reconcile::alto::Policies>,
    },
}

/// Sends one request to the controller whose state folder is `state`.
pub fn call(state: &Path, req: &Request) -> Result<Response, String> {
    let path = state.join(SOCKET);
    let stream = UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the controller at {}: {e} (is `sidenet-controller standalone --state {}` running?)",
            path.display(),
            state.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    w.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    BufReader::new(stream)
        .read_line(&mut resp)
        .map_err(|e| format!("no answer from the controller: {e}"))?;
    serde_json::from_str(&resp).map_err(|e| format!("unreadable answer from the controller: {e}"))
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Hosts are being worked on.
    Running,
    /// Every host succeeded.
    Complete,
    /// At least one host failed, or the spec could not run.
    Failed,
}

/// One host of a running job, as the progress reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveHost {
    /// `user@host:port`.
    pub host: String,
    /// The step it is at (or ended on).
    pub step: String,
    /// Detail of the step (what is being uploaded, what is awaited).
    #[serde(default)]
    pub detail: String,
    /// Set once the host is finished: `Provisioned`, `AlreadyProvisioned`, `Failed`...
    #[serde(default)]
    pub result: Option<String>,
}

/// A `NodeProvision` as `sidenetctl status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisionRow {
    /// `metadata.name`.
    pub name: String,
    /// Mesh network name.
    pub mesh: String,
    /// Where the job is.
    pub state: JobState,
    /// Live per-host progress while running.
    #[serde(default)]
    pub live: Vec<LiveHost>,
    /// The result of the last finished run (the same status the Kubernetes mode writes).
    #[serde(default)]
    pub status: Option<NodeProvisionStatus>,
}
