//! Message bodies. Each travels inside a signed [`crate::envelope`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::envelope::Revision;

/// The controller's retained mesh announcement, signed by the mesh key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Mesh name.
    pub mesh: String,
    /// The mesh public key (base64), the trust anchor agents pin.
    pub key: String,
    /// Enrolment mode: `auto`, `approval` or `token`.
    pub enrollment: String,
    /// The mesh's IPv6 ULA prefix.
    pub prefix: String,
    /// Controller software version.
    pub controller: String,
    /// Whether the controller answers status reports of a config on trial with an [`Ack`].
    /// Agents of a controller without it confirm a config on their local health check alone.
    #[serde(default)]
    pub acks: bool,
    /// Endorsements of every key rotation since the mesh's first key, oldest first: an agent
    /// that pinned an earlier key follows them to `key` ([`crate::rotation::follow`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<crate::rotation::Endorsement>,
    /// Until when (Unix seconds) agents still accept configs signed by the key they pinned
    /// before the last rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_until: Option<u64>,
}

/// One file of a node config, relative to the backend's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Relative path (no `..`, not absolute), e.g. `etc/config/wireless`.
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    /// File contents.
    pub content: String,
}

impl FileSpec {
    /// Whether the path is a safe relative path (no `..`, no absolute path, no empty parts,
    /// no control characters).
    pub fn path_is_safe(&self) -> bool {
        !self.path.is_empty()
            && !self.path.starts_with('/')
            && !self.path.chars().any(|c| c.is_control() || c == '\\')
            && self
                .path
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
    }
}

/// A complete node config: what the agent applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Mesh name.
    pub mesh: String,
    /// Node id.
    pub node: String,
    /// Hostname to set.
    pub hostname: String,
    /// Role: `router`, `dongle` or `gateway`.
    pub role: String,
    /// Hardware profile the config was rendered for.
    pub profile: String,
    /// Firmware family (`openwrt`, `linux`).
    pub family: String,
    /// The node's side-net prefix (a /64 of the mesh /48).
    pub subnet: String,
    /// Addresses to configure on the node (CIDR).
    pub addresses: Vec<String>,
    /// Rendered files.
    pub files: Vec<FileSpec>,
    /// Actions to run after the files are in place (e.g. `reload:network`).
    pub actions: Vec<String>,
    /// Secrets sealed to this node ([`crate::seal`]), by name; files hold
    /// [`crate::seal::placeholder`]s the agent fills in after opening them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sealed: BTreeMap<String, String>,
    /// Packages the config needs on the node, each with the program that shows it is there.
    /// Agents that run programs (`linux`, `openwrt`) check every one before applying and wait,
    /// reporting [`StatusReport::missing`], until all are present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Requirement>,
}

/// A package a config needs, and how the agent sees that it is installed: `program` is found
/// (an absolute path that is an executable file, or a name found as one in a folder of `PATH`)
/// and, when `args` are given, exits 0 when run with them (a capability check:
/// `wpa_supplicant -vmesh` exits 0 only when it was built with 802.11s mesh support).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// Package name as the node's package manager knows it (`babeld`, `wpad-mesh-mbedtls`).
    pub package: String,
    /// The program that package installs.
    pub program: String,
    /// Arguments the program must exit 0 with (none: being there is enough).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// A node's request to join, signed by its own key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EnrollRequest {
    /// The node's hostname.
    pub hostname: String,
    /// Board name as the device reports it (OpenWrt `board_name`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board: Option<String>,
    /// Hardware profile the owner asked for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Single-use enrolment token (token mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Agent backend (`files`, `linux`, `openwrt`).
    pub backend: String,
    /// Agent version.
    pub agent_version: String,
    /// WireGuard identity and underlay endpoints (backends that build WireGuard links).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardInfo>,
}

/// A node's WireGuard identity and underlay endpoints, reported at enrolment and in every status
/// report. The private key is generated on the node and never leaves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WireguardInfo {
    /// The node's WireGuard public key (base64 of 32 bytes).
    pub public_key: String,
    /// Underlay addresses in CIDR form (`10.0.1.1/24`, `2001:db8:5::7/64`) on the interfaces
    /// that carry the side-net. The controller makes two nodes WireGuard neighbours when they
    /// have addresses in the same subnet (see `docs/dataplane.md`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Nodes whose discovery beacons ([`crate::beacon`]) this node hears on its underlay
    /// interfaces, sorted by node id then interface. The controller pairs two nodes that hear
    /// each other (see `docs/dataplane.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heard: Vec<Heard>,
}

/// A neighbour heard over the air: a verified discovery beacon arrived recently.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Heard {
    /// The sender's node id.
    pub node: String,
    /// The local interface the beacon arrived on (`mesh0`).
    pub interface: String,
    /// The beacon's source address: the sender's link-local address on that link.
    pub address: String,
    /// The WireGuard public key the beacon carried (base64).
    pub public_key: String,
}

/// A config that is applied and being health-checked, not yet confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// Its revision.
    pub revision: Revision,
    /// SHA-256 (hex) of its body.
    pub sha256: String,
}

/// The controller's acknowledgement of one status report that carried a [`Trial`], signed by the
/// mesh key. The envelope header names the node and, as `epoch`/`rev`, the sequence number of
/// the status report it answers, so an acknowledgement cannot be replayed to confirm another
/// attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The revision on trial that the controller saw.
    pub revision: Revision,
    /// Its body hash.
    pub sha256: String,
}

/// Where the agent stands with its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyState {
    /// Waiting for enrolment approval or a first config.
    Pending,
    /// Running the revision in `applied`.
    Applied,
    /// The last config could not be applied; running `applied` (the last good one).
    Failed,
}

/// A refused or failed config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The revision that failed (if it could be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
    /// Why.
    pub error: String,
}

/// A babel (or link-layer) neighbour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Neighbour {
    /// Neighbour address.
    pub address: String,
    /// Interface.
    pub interface: String,
    /// Node id, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Babel's cost of the link to this neighbour (lower is better; 65535 is unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u32>,
}

/// A probe result towards one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Target address.
    pub target: String,
    /// Median round-trip time in milliseconds, if any reply came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Lost fraction, 0.0–1.0.
    pub loss: f64,
    /// Node id of the target, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `neighbour` (over one WireGuard link) or `gateway` (across the side-net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Probes the loss and RTT are computed over.
    #[serde(default)]
    pub sent: u32,
}

/// A node's status report, signed by its own key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Apply state.
    pub state: ApplyState,
    /// The revision running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<Revision>,
    /// SHA-256 (hex) of the applied config body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_sha256: Option<String>,
    /// The last refused or failed config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    /// Agent version.
    pub agent_version: String,
    /// Neighbours seen.
    #[serde(default)]
    pub neighbours: Vec<Neighbour>,
    /// Probe results.
    #[serde(default)]
    pub probes: Vec<Probe>,
    /// WireGuard identity and underlay endpoints (they may change after enrolment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardInfo>,
    /// A newer config applied and on trial (the node still counts `applied` as its last good
    /// one). The controller answers with an [`Ack`]; without one the node rolls back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial: Option<Trial>,
    /// The agent holds its own broker password (the config's sealed
    /// [`crate::seal::MQTT_PASSWORD`]) and this session logged in with it. From then on the
    /// controller has the broker refuse connections that claim this node's id without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mqtt_auth: bool,
    /// Packages of [`NodeConfig::requires`] the node lacks (for the config it runs or the one it
    /// waits to apply), in the config's order. Non-empty: the node applies nothing new until
    /// they are installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// What the node's policy shaping runs now (`docs/policies.md`); none: no shaping table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<ShapingStatus>,
    /// Handover: where the node sends the traffic for each service another node publishes
    /// (`docs/dataplane.md`, "Handover"), in the order of its config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceRoute>,
}

/// The path a node uses for one published service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRoute {
    /// The service's name.
    pub name: String,
    /// Node id of its owner.
    pub node: String,
    /// Its prefixes.
    pub prefixes: Vec<String>,
    /// `side-net` or `internet`.
    pub via: String,
    /// Since when, Unix seconds.
    pub since: u64,
    /// Why: the probe figures that decided it.
    pub why: String,
}

/// The shaping a node runs: its leaf qdisc and the windows open now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapingStatus {
    /// The leaf qdisc under the HTB classes: `fq_codel`, or `pfifo` where the kernel lacks it.
    pub leaf: String,
    /// The scheduled rate policies whose windows are open now, by name.
    #[serde(default)]
    pub windows: Vec<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn f(path: &str) -> FileSpec {
        FileSpec {
            path: path.into(),
            mode: 0o644,
            content: String::new(),
        }
    }

    #[test]
    fn requirements_and_missing_packages_are_optional_on_the_wire() {
        // What agents and controllers before these fields send: still read, as empty lists.
        let old_config = r#"{"mesh":"m","node":"n","hostname":"h","role":"router","profile":"p","family":"openwrt","subnet":"fd00::/64","addresses":[],"files":[],"actions":[]}"#;
        let c: NodeConfig = serde_json::from_str(old_config).unwrap();
        assert!(c.requires.is_empty());
        // Empty lists are left out, so a config without requirements has the old bytes.
        assert_eq!(serde_json::to_string(&c).unwrap(), old_config);
        let old_status = r#"{"state":"applied","uptime_s":3,"agent_version":"0.1.0"}"#;
        let st: StatusReport = serde_json::from_str(old_status).unwrap();
        assert!(st.missing.is_empty());
        assert!(!serde_json::to_string(&st).unwrap().contains("missing"));
        // The field names as docs/design.md gives them.
        let c = NodeConfig {
            requires: vec![Requirement {
                package: "wpad-mesh-mbedtls".into(),
                program: "wpa_supplicant".into(),
                args: vec!["-vmesh".into()],
            }],
            ..c
        };
        assert!(serde_json::to_string(&c).unwrap().ends_with(
            r#""requires":[{"package":"wpad-mesh-mbedtls","program":"wpa_supplicant","args":["-vmesh"]}]}"#
        ));
        let st = StatusReport {
            missing: vec!["babeld".into()],
            ..st
        };
        assert!(
            serde_json::to_string(&st)
                .unwrap()
                .ends_with(r#""missing":["babeld"]}"#)
        );
    }

    #[test]
    fn file_paths_must_stay_under_root() {
        assert!(f("etc/config/wireless").path_is_safe());
        for bad in [
            "",
            "/etc/passwd",
            "../etc",
            "etc/../../x",
            "etc//x",
            "./x",
            "etc/\nx",
            "a\\b",
        ] {
            assert!(!f(bad).path_is_safe(), "{bad:?} accepted");
        }
    }
}
