//! [`NodeProvision`]: installing the agent on stock routers over SSH.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Condition, SecretKeyRef};

/// A provisioning job: hosts to reach over SSH, install the agent on and enrol in a mesh.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sidenet.io",
    version = "v1alpha1",
    kind = "NodeProvision",
    namespaced,
    status = "NodeProvisionStatus",
    shortname = "np",
    doc = "Installs the sidenet agent on stock routers and Linux hosts over SSH and waits until they enrol in a mesh.",
    printcolumn(name = "Mesh", type_ = "string", json_path = ".spec.mesh"),
    printcolumn(name = "Succeeded", type_ = "integer", json_path = ".status.succeeded"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeProvisionSpec {
    /// Network name of the Mesh the hosts join.
    pub mesh: String,
    /// MQTT broker URL as the hosts reach it (e.g. mqtt://192.168.1.10:1883).
    pub broker: String,
    /// The hosts, one entry per device.
    #[schemars(length(min = 1))]
    pub targets: Vec<ProvisionTarget>,
    /// Login settings for targets that do not set their own.
    #[serde(default)]
    pub defaults: ProvisionDefaults,
    /// How many hosts are worked on at the same time (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub parallelism: Option<u32>,
    /// `pinned` (default): only hosts whose SSH host key is already known (the target's
    /// `hostKey` or the controller's known hosts) are contacted. `trustOnFirstUse`: an unknown
    /// host's key is recorded on first contact. A changed key always aborts that host.
    #[serde(default)]
    pub host_key_policy: HostKeyPolicy,
    /// Seconds to wait for each node to enrol after its agent started (default 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub enrollment_timeout_seconds: Option<u64>,
}

/// One host to provision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionTarget {
    /// Address or DNS name of the host.
    pub host: String,
    /// SSH port (default: `defaults.port`, else 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// SSH user (default: `defaults.user`, else root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Hostname the node reports at enrolment (default: the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// HardwareProfile of the device. When omitted, the board is detected and matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_profile: Option<String>,
    /// Credentials (default: `defaults.credentials`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SshCredentials>,
    /// The host's SSH public host key as in known_hosts (`ssh-ed25519 AAAA...`), to pin it
    /// without trusting on first use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// Folder the install paths of the firmware family are relative to (default /).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

/// Login settings shared by the targets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionDefaults {
    /// SSH user (default root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// SSH port (default 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// Credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SshCredentials>,
    /// HardwareProfile for targets that name none (default: detect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_profile: Option<String>,
}

/// SSH credentials, by reference only: exactly one of the two keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshCredentials {
    /// A Secret key holding an OpenSSH private key (unencrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_secret_ref: Option<SecretKeyRef>,
    /// A Secret key holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

/// How unknown SSH host keys are treated.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum HostKeyPolicy {
    /// Only hosts with a known key are contacted.
    #[default]
    Pinned,
    /// An unknown host's key is recorded on first contact.
    TrustOnFirstUse,
}

/// Observed state of a provisioning job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeProvisionStatus {
    /// Conditions (`Complete`: every host provisioned; `Failed`: some host failed).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation last worked on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Hosts provisioned or already provisioned in the last run.
    #[serde(default)]
    pub succeeded: u32,
    /// Hosts that failed in the last run.
    #[serde(default)]
    pub failed: u32,
    /// One entry per target, in the order of `spec.targets`.
    #[serde(default)]
    pub hosts: Vec<ProvisionHostStatus>,
    /// Kubernetes mode: SHA-256 (hex) of the spec and annotations the last finished run
    /// worked on. The controller does not run a job again while they are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// What happened to one host in the last run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionHostStatus {
    /// The host (`user@host:port`).
    pub host: String,
    /// Board name (OpenWrt) or OS and architecture (Linux) as detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board: Option<String>,
    /// HardwareProfile used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Node id of the installed agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// `Provisioned`, `AlreadyProvisioned` or `Failed`.
    pub result: String,
    /// The step that failed and why, or what was changed.
    #[serde(default)]
    pub message: String,
    /// How long the host took, in milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
}
