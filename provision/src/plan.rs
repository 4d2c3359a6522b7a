//! What to provision: hosts ([`Target`]) from a CLI inventory file ([`Inventory`]) or from a
//! `NodeProvision` resource ([`targets_from_resource`]), and the settings shared by a run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sidenet_crds::{NodeProvisionSpec, SecretKeyRef, SshCredentials};

use crate::ssh::Credential;

/// One host to provision.
#[derive(Debug, Clone)]
pub struct Target {
    /// Address or DNS name.
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// SSH user.
    pub user: String,
    /// Hostname the node reports (default: the host).
    pub name: Option<String>,
    /// How to log in; `None` fails the host with a clear message.
    pub credential: Option<Credential>,
    /// Hardware profile to use instead of detecting one.
    pub profile: Option<String>,
    /// Root the install paths are relative to.
    pub root: String,
    /// Pinned host key (`ssh-ed25519 AAAA...`).
    pub host_key: Option<String>,
}

impl Target {
    /// `user@host:port`, how the host is named in every message.
    pub fn label(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }

    /// The hostname the node reports.
    pub fn hostname(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.host.clone())
    }
}

/// Settings shared by every host of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Mesh network name.
    pub mesh: String,
    /// Broker URL as the hosts reach it.
    pub broker: String,
    /// Mesh public key (base64) the agents pin.
    pub mesh_key: String,
    /// CA bundle (PEM text) the agents pin for an `mqtts://` broker (`brokerCa` in their
    /// bootstrap config).
    pub broker_ca: Option<String>,
    /// Folder of agent binaries: `AGENTS/<packageArch or cpuArch>/sidenet-agent` (TLS builds
    /// under `AGENTS/tls/`; [`crate::context::agent_candidates`]).
    pub agents: PathBuf,
    /// Templates folder with `FAMILY/install.yaml`.
    pub templates: PathBuf,
    /// known_hosts file of pinned host keys.
    pub known_hosts: PathBuf,
    /// Pin unknown host keys on first contact.
    pub trust_on_first_use: bool,
    /// Hosts worked on at once.
    pub parallelism: usize,
    /// SSH connect and per-operation timeout.
    pub ssh_timeout: Duration,
    /// How long to wait for each node to enrol.
    pub enrol_timeout: Duration,
    /// Whether to wait for enrolment at all.
    pub wait_for_enrolment: bool,
    /// Install the policy shaping's packages too (`packages.shaping` of the install
    /// descriptor): the mesh has `rateLimit` policies, so its nodes' configs may carry a
    /// shaping table that needs them.
    pub shaping: bool,
}

/// A problem with an inventory file.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid inventory.
    #[error("{path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong, with the line when known.
        message: String,
    },
}

/// The CLI's inventory file: the mesh to join and one row per host.
///
/// ```yaml
/// mesh: riverside
/// broker: mqtt://192.168.1.10:1883
/// defaults:
///   user: root
///   privateKeyFile: ~/.ssh/sidenet_ed25519
/// hosts:
///   - { host: 192.168.1.21, name: kitchen }
///   - { host: 192.168.1.22, name: attic, passwordFile: attic.password }
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inventory {
    /// Mesh network name (the `--mesh` flag overrides it).
    #[serde(default)]
    pub mesh: Option<String>,
    /// Broker URL as the hosts reach it (the `--broker` flag overrides it).
    #[serde(default)]
    pub broker: Option<String>,
    /// Hosts worked on at once (the `--parallel` flag overrides it).
    #[serde(default)]
    pub parallelism: Option<usize>,
    /// Values for rows that leave them out.
    #[serde(default)]
    pub defaults: Row,
    /// One row per host.
    pub hosts: Vec<Row>,
}

/// One inventory row (also the shape of `defaults`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Row {
    /// Address or DNS name (required in a host row).
    #[serde(default)]
    pub host: Option<String>,
    /// SSH port (default 22).
    #[serde(default)]
    pub port: Option<u16>,
    /// SSH user (default root).
    #[serde(default)]
    pub user: Option<String>,
    /// Hostname the node reports.
    #[serde(default)]
    pub name: Option<String>,
    /// OpenSSH private key file (relative paths are relative to the inventory file).
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// File holding the password on its first line.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Hardware profile (default: detect).
    #[serde(default)]
    pub hardware_profile: Option<String>,
    /// Root the install paths are relative to (default /).
    #[serde(default)]
    pub root: Option<String>,
    /// Pinned host key (`ssh-ed25519 AAAA...`).
    #[serde(default)]
    pub host_key: Option<String>,
}

fn expand(path: &Path, base: &Path) -> PathBuf {
    if let Ok(rest) = path.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

impl Inventory {
    /// Reads an inventory file.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses an inventory (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, InventoryError> {
        let inv: Inventory =
            sidenet_crds::yaml::from_str(text).map_err(|e| InventoryError::Invalid {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        if inv.defaults.host.is_some() {
            return Err(InventoryError::Invalid {
                path: path.to_path_buf(),
                message: "defaults.host: a default host makes no sense; list hosts under hosts"
                    .into(),
            });
        }
        Ok(inv)
    }

    /// The targets, with relative credential paths resolved against `base` (the inventory's
    /// folder).
    pub fn targets(&self, path: &Path) -> Result<Vec<Target>, InventoryError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let d = &self.defaults;
        let mut out = Vec::with_capacity(self.hosts.len());
        for (i, row) in self.hosts.iter().enumerate() {
            let bad = |message: String| InventoryError::Invalid {
                path: path.to_path_buf(),
                message: format!("hosts[{i}]: {message}"),
            };
            let host =
                row.host.clone().filter(|h| !h.is_empty()).ok_or_else(|| {
                    bad("host: missing; every row needs the host's address".into())
                })?;
            if row.private_key_file.is_some() && row.password_file.is_some() {
                return Err(bad(
                    "give either privateKeyFile or passwordFile, not both".into()
                ));
            }
            let credential = match (&row.private_key_file, &row.password_file) {
                (Some(k), None) => Some(Credential::KeyFile(expand(k, base))),
                (None, Some(p)) => Some(Credential::PasswordFile(expand(p, base))),
                _ => match (&d.private_key_file, &d.password_file) {
                    (Some(k), _) => Some(Credential::KeyFile(expand(k, base))),
                    (None, Some(p)) => Some(Credential::PasswordFile(expand(p, base))),
                    (None, None) => None,
                },
            };
            out.push(Target {
                host,
                port: row.port.or(d.port).unwrap_or(22),
                user: row
                    .user
                    .clone()
                    .or_else(|| d.user.clone())
                    .unwrap_or_else(|| "root".into()),
                name: row.name.clone(),
                credential,
                profile: row
                    .hardware_profile
                    .clone()
                    .or_else(|| d.hardware_profile.clone()),
                root: row
                    .root
                    .clone()
                    .or_else(|| d.root.clone())
                    .unwrap_or_else(|| "/".into()),
                host_key: row.host_key.clone(),
            });
        }
        Ok(out)
    }
}

/// The targets of a `NodeProvision`, with credentials looked up by `secret` (Secret name and
/// key → value; in standalone mode the Secret manifests of the folder, in a cluster the API).
pub fn targets_from_resource(
    spec: &NodeProvisionSpec,
    secret: &dyn Fn(&SecretKeyRef) -> Option<String>,
) -> Result<Vec<Target>, String> {
    let d = &spec.defaults;
    let mut out = Vec::with_capacity(spec.targets.len());
    for (i, t) in spec.targets.iter().enumerate() {
        let creds = t.credentials.as_ref().or(d.credentials.as_ref());
        let credential = match creds {
            None => None,
            Some(c) => Some(
                credential_from(c, secret)
                    .map_err(|e| format!("spec.targets[{i}].credentials ({}): {e}", t.host))?,
            ),
        };
        out.push(Target {
            host: t.host.clone(),
            port: t.port.or(d.port).unwrap_or(22),
            user: t
                .user
                .clone()
                .or_else(|| d.user.clone())
                .unwrap_or_else(|| "root".into()),
            name: t.name.clone(),
            credential,
            profile: t
                .hardware_profile
                .clone()
                .or_else(|| d.hardware_profile.clone()),
            root: t.root.clone().unwrap_or_else(|| "/".into()),
            host_key: t.host_key.clone(),
        });
    }
    Ok(out)
}

fn credential_from(
    c: &SshCredentials,
    secret: &dyn Fn(&SecretKeyRef) -> Option<String>,
) -> Result<Credential, String> {
    let get = |r: &SecretKeyRef| {
        secret(r).ok_or_else(|| format!("Secret {:?} has no key {:?}", r.name, r.key))
    };
    let from = |r: &SecretKeyRef| format!("Secret/{} key {}", r.name, r.key);
    match (&c.private_key_secret_ref, &c.password_secret_ref) {
        (Some(k), None) => Ok(Credential::Key {
            pem: get(k)?,
            from: from(k),
        }),
        (None, Some(p)) => Ok(Credential::Password {
            password: get(p)?.lines().next().unwrap_or_default().to_string(),
            from: from(p),
        }),
        (Some(_), Some(_)) => {
            Err("give either privateKeySecretRef or passwordSecretRef, not both".into())
        }
        (None, None) => Err("give privateKeySecretRef or passwordSecretRef".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rows_take_defaults_and_resolve_paths() {
        let path = Path::new("/srv/fleet/inventory.yaml");
        let inv = Inventory::parse(
            path,
            "mesh: riverside\nbroker: mqtt://10.0.0.1:1883\ndefaults:\n  user: admin\n  port: 2222\n  privateKeyFile: keys/id_ed25519\nhosts:\n  - { host: 10.0.0.21, name: kitchen }\n  - { host: 10.0.0.22, port: 22, user: root, passwordFile: /etc/pw, root: /srv/x, hardwareProfile: netgear-r7800 }\n",
        )
        .unwrap();
        let t = inv.targets(path).unwrap();
        assert_eq!(t[0].label(), "admin@10.0.0.21:2222");
        assert_eq!(t[0].hostname(), "kitchen");
        assert_eq!(t[0].root, "/");
        assert!(
            matches!(&t[0].credential, Some(Credential::KeyFile(p)) if p == Path::new("/srv/fleet/keys/id_ed25519"))
        );
        assert_eq!(t[1].label(), "root@10.0.0.22:22");
        assert_eq!(t[1].hostname(), "10.0.0.22");
        assert_eq!(t[1].root, "/srv/x");
        assert_eq!(t[1].profile.as_deref(), Some("netgear-r7800"));
        assert!(
            matches!(&t[1].credential, Some(Credential::PasswordFile(p)) if p == Path::new("/etc/pw"))
        );
    }

    #[test]
    fn mistakes_are_named() {
        let path = Path::new("inv.yaml");
        let e = Inventory::parse(path, "hosts:\n  - { host: a, pasword: x }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("inv.yaml: hosts[0].pasword: unknown field `pasword`"),
            "{e}"
        );
        let inv = Inventory::parse(path, "hosts:\n  - { port: 22 }\n").unwrap();
        let e = inv.targets(path).unwrap_err().to_string();
        assert!(e.contains("hosts[0]: host: missing"), "{e}");
        let inv = Inventory::parse(
            path,
            "hosts:\n  - { host: a, passwordFile: p, privateKeyFile: k }\n",
        )
        .unwrap();
        assert!(
            inv.targets(path)
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
    }

    #[test]
    fn resources_take_credentials_from_secrets_only() {
        let spec: NodeProvisionSpec = sidenet_crds::yaml::from_str(
            "mesh: riverside\nbroker: mqtt://10.0.0.1:1883\ndefaults:\n  credentials:\n    privateKeySecretRef: { name: fleet-ssh, key: id_ed25519 }\ntargets:\n  - host: 10.0.0.21\n  - host: 10.0.0.22\n    credentials:\n      passwordSecretRef: { name: attic, key: password }\n",
        )
        .unwrap();
        let secret = |r: &SecretKeyRef| match (r.name.as_str(), r.key.as_str()) {
            ("fleet-ssh", "id_ed25519") => Some("-----BEGIN OPENSSH PRIVATE KEY-----\n".into()),
            ("attic", "password") => Some("hunter2\n".into()),
            _ => None,
        };
        let t = targets_from_resource(&spec, &secret).unwrap();
        assert!(
            matches!(&t[0].credential, Some(Credential::Key { from, .. }) if from == "Secret/fleet-ssh key id_ed25519")
        );
        assert!(
            matches!(&t[1].credential, Some(Credential::Password { password, .. }) if password == "hunter2")
        );
        assert!(!format!("{:?}", t[1].credential).contains("hunter2"));
        let none = |_: &SecretKeyRef| None;
        let e = targets_from_resource(&spec, &none).unwrap_err();
        assert!(e.contains("spec.targets[0].credentials (10.0.0.21): Secret \"fleet-ssh\" has no key \"id_ed25519\""), "{e}");
    }
}
