//! The `openwrt` backend: the config's files are UCI files under `/etc/config` (and a few under
//! `/etc/sidenet`); applying them means running the reload commands OpenWrt itself uses. It shares
//! the journal (stage, back up, install, health check, confirm or roll back) with every backend,
//! so a rollback restores the previous UCI files byte for byte and reloads them.
//!
//! | action | command |
//! | --- | --- |
//! | `reload:network` | `/etc/init.d/network reload` (netifd: addresses, WireGuard interfaces) |
//! | `reload:wireless` | `wifi reload` |
//! | `reload:firewall` | `/etc/init.d/firewall reload` (fw4) |
//! | `restart:babeld` | `/etc/init.d/babeld restart` |
//! | `apply:probes` | hands `etc/sidenet/probes` to the prober |
//!
//! OpenWrt's WireGuard protocol handler wants the private key inside `/etc/config/network`; the
//! controller renders the placeholder [`KEY_PLACEHOLDER`] there and the agent fills in the node's
//! own key while staging ([`Backend::prepare`]), writing that file with mode 0600. The key never
//! leaves the node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sidenet_wire::messages::{Neighbour, NodeConfig, WireguardInfo};

use crate::backend::{
    Backend, BackendError, DataplaneArgs, Kind, Observation, Runner, underlay_endpoints,
};
use crate::probe::ProbePlan;
use crate::wgkey::WgKey;

/// What the controller writes where the node's WireGuard private key goes.
pub const KEY_PLACEHOLDER: &str = "@sidenet-wireguard-private-key@";
/// babeld's local (read-only) port, as the rendered `/etc/config/babeld` sets it.
pub const BABEL_PORT: u16 = 33123;
/// Actions in the order they run, with their commands.
pub const ACTIONS: [(&str, &[&str]); 5] = [
    ("reload:network", &["/etc/init.d/network", "reload"]),
    ("reload:wireless", &["wifi", "reload"]),
    ("reload:firewall", &["/etc/init.d/firewall", "reload"]),
    ("restart:babeld", &["/etc/init.d/babeld", "restart"]),
    ("apply:probes", &[]),
];

/// The `openwrt` backend.
pub struct Openwrt {
    root: PathBuf,
    key: WgKey,
    underlay: Vec<String>,
    runner: Box<dyn Runner>,
    plan: Option<ProbePlan>,
}

impl std::fmt::Debug for Openwrt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Openwrt").field("root", &self.root).finish()
    }
}

impl Openwrt {
    /// A backend for the device rooted at `root`.
    pub fn new(
        root: &Path,
        _run: &Path,
        key: WgKey,
        args: &DataplaneArgs,
        runner: Box<dyn Runner>,
    ) -> Self {
        Self {
            root: root.to_path_buf(),
            key,
            underlay: args.underlay.clone(),
            runner,
            plan: None,
        }
    }
}

impl Backend for Openwrt {
    fn kind(&self) -> Kind {
        Kind::Openwrt
    }

    fn needs_trial(&self) -> bool {
        true
    }

    fn prepare(&self, config: &mut NodeConfig) -> Result<(), BackendError> {
        if !config
            .files
            .iter()
            .any(|f| f.content.contains(KEY_PLACEHOLDER))
        {
            return Ok(());
        }
        let private = self.key.private_base64().map_err(BackendError)?;
        for f in &mut config.files {
            if f.content.contains(KEY_PLACEHOLDER) {
                f.content = f.content.replace(KEY_PLACEHOLDER, &private);
                f.mode = 0o600;
            }
        }
        Ok(())
    }

    fn converge(&mut self, config: Option<&NodeConfig>) -> Result<(), BackendError> {
        let Some(config) = config else {
            // The journal restored the files that were there before: reload all of them.
            for (name, cmd) in ACTIONS {
                if !cmd.is_empty()
                    && let Err(e) = self.runner.run(cmd)
                {
                    tracing::warn!("{name}: {e}");
                }
            }
            self.plan = None;
            return Ok(());
        };
        if let Some(a) = config
            .actions
            .iter()
            .find(|a| !ACTIONS.iter().any(|(n, _)| n == a))
        {
            return Err(BackendError(format!(
                "unknown action {a:?}: this agent is older than the config"
            )));
        }
        for (name, cmd) in ACTIONS {
            if !config.actions.iter().any(|a| a == name) {
                continue;
            }
            if name == "apply:probes" {
                let p = self.root.join("etc/sidenet/probes");
                let text = std::fs::read_to_string(&p)
                    .map_err(|e| BackendError(format!("cannot read {}: {e}", p.display())))?;
                self.plan = Some(ProbePlan::parse(&text).map_err(BackendError)?);
            } else {
                self.runner.run(cmd).map_err(BackendError)?;
            }
        }
        Ok(())
    }

    fn observe(&mut self) -> Observation {
        let endpoints = underlay_endpoints(self.runner.as_mut(), &self.underlay);
        let neighbours = crate::babel::dump_port(BABEL_PORT, Duration::from_secs(1))
            .map(|d| {
                d.neighbours
                    .into_iter()
                    .map(|n| Neighbour {
                        node: self.plan.as_ref().and_then(|p| {
                            p.targets
                                .iter()
                                .find(|t| t.address.ends_with(&format!("%{}", n.interface)))
                                .map(|t| t.node.clone())
                        }),
                        address: n.address,
                        interface: n.interface,
                        cost: Some(n.cost),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let links = self.plan.as_ref().map_or(0, |p| {
            p.targets.iter().filter(|t| t.kind == "neighbour").count()
        });
        Observation {
            wireguard: Some(WireguardInfo {
                public_key: self.key.public().to_string(),
                endpoints,
            }),
            neighbours,
            links,
            probes: Vec::new(),
        }
    }

    fn probe_plan(&self) -> Option<ProbePlan> {
        self.plan.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Recorder;
    use crate::files::{Applier, write_atomic};
    use sidenet_wire::Revision;
    use sidenet_wire::messages::FileSpec;

    const GOLDEN: &str = "../controller/tests/golden/with-peers/tplink-archer-c7-v2";
    const FILES: [(&str, &str); 6] = [
        ("etc/config/network", "reload:network"),
        ("etc/config/wireless", "reload:wireless"),
        ("etc/sidenet/ratelimit.nft", "reload:firewall"),
        ("etc/config/firewall", "reload:firewall"),
        ("etc/config/babeld", "restart:babeld"),
        ("etc/sidenet/probes", "apply:probes"),
    ];

    fn golden_config() -> NodeConfig {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
        let mut actions: Vec<String> = Vec::new();
        for (_, a) in FILES {
            if !actions.iter().any(|x| x == a) {
                actions.push(a.to_string());
            }
        }
        NodeConfig {
            mesh: "riverside".into(),
            node: "goldennode234567".into(),
            hostname: "golden".into(),
            role: "router".into(),
            profile: "tplink-archer-c7-v2".into(),
            family: "openwrt".into(),
            subnet: "fdfc:b395:f348:1c2d::/64".into(),
            addresses: vec!["fdfc:b395:f348:1c2d::1/64".into()],
            files: FILES
                .iter()
                .map(|(p, _)| FileSpec {
                    path: p.to_string(),
                    mode: if p.ends_with("wireless") {
                        0o600
                    } else {
                        0o644
                    },
                    content: std::fs::read_to_string(base.join(p)).unwrap_or_default(),
                })
                .collect(),
            actions,
            sealed: Default::default(),
            requires: Vec::new(),
        }
    }

    #[test]
    fn applies_uci_files_with_the_nodes_key_and_rolls_back_to_stock()
    -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        // A stock OpenWrt before sidenet.
        write_atomic(
            &root.join("etc/config/network"),
            b"config interface 'lan'\n",
            0o644,
        )?;
        write_atomic(
            &root.join("etc/config/firewall"),
            b"config defaults\n",
            0o644,
        )?;
        let rec = Recorder::new();
        let key = WgKey::load_or_create(&state.join("wg.key"))?;
        let private = key.private_base64()?;
        let mut ow = Openwrt::new(
            &root,
            &state,
            key,
            &DataplaneArgs::default(),
            Box::new(rec.clone()),
        );
        let mut cfg = golden_config();
        assert!(cfg.files[0].content.contains(KEY_PLACEHOLDER));
        ow.prepare(&mut cfg)?;
        let applier = Applier::new(&root, &state);
        applier.install(Revision { epoch: 1, rev: 1 }, "s", b"env", &cfg)?;
        ow.converge(Some(&cfg))?;
        assert_eq!(
            rec.commands(),
            [
                "/etc/init.d/network reload",
                "wifi reload",
                "/etc/init.d/firewall reload",
                "/etc/init.d/babeld restart"
            ]
        );
        let network = std::fs::read_to_string(root.join("etc/config/network"))?;
        assert!(network.contains(&format!("option private_key '{private}'")));
        assert!(!network.contains(KEY_PLACEHOLDER));
        let mode = std::fs::metadata(root.join("etc/config/network"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ow.probe_plan().map(|p| p.targets.len()), Some(3));
        // The health check failed: back to stock, reloaded.
        rec.clear();
        applier.rollback()?;
        ow.converge(None)?;
        assert_eq!(
            std::fs::read_to_string(root.join("etc/config/network"))?,
            "config interface 'lan'\n"
        );
        assert!(!root.join("etc/config/wireless").exists());
        assert!(!root.join("etc/config/babeld").exists());
        assert_eq!(rec.commands().len(), 4);
        assert_eq!(ow.probe_plan(), None);
        Ok(())
    }

    #[test]
    fn a_failing_reload_fails_the_apply() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let rec = Recorder::new();
        rec.answer("/etc/init.d/firewall reload", Err("fw4: syntax error"));
        let key = WgKey::load_or_create(&dir.path().join("wg.key"))?;
        let mut ow = Openwrt::new(
            dir.path(),
            dir.path(),
            key,
            &DataplaneArgs::default(),
            Box::new(rec.clone()),
        );
        let cfg = golden_config();
        let e = ow.converge(Some(&cfg));
        assert!(e.is_err_and(|e| e.0.contains("fw4")));
        assert!(!rec.commands().iter().any(|c| c.contains("babeld")));
        Ok(())
    }
}
