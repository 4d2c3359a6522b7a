//! The `openwrt` backend: sidenet as a guest on a household router. It owns only its own named
//! `sidenet_*` sections in the `network`, `wireless`, `firewall`, `babeld` and `dhcp` UCI packages and
//! changes them only through OpenWrt's `uci` command ([`crate::uci`]); the owner's access points,
//! LAN, WAN, DHCP and firewall rules are never written. A config carries one sidenet batch per
//! package (`etc/sidenet/uci/<package>`) and sidenet's own files (`etc/sidenet/shaping.nft`,
//! `etc/sidenet/shaping`, `etc/sidenet/probes`, the hotplug script
//! `etc/hotplug.d/iface/50-sidenet-shaping`); a config that would write a file under
//! `etc/config/` is refused.
//!
//! The journal ([`crate::files`]) stages, backs up and rolls back only those own files;
//! [`Backend::converge`] then makes the `sidenet_*` sections of every package exactly what the
//! installed batches declare (none for a package without a batch, or with no config at all). So
//! an apply, a rollback, a restart after a crash (the journal restores the batches, converge
//! re-syncs uci) and the first start all come down to the same idempotent step, and none of
//! them touches a section sidenet does not own.
//!
//! A package whose `sidenet_*` sections changed is reloaded, in this order:
//!
//! | package | command |
//! | --- | --- |
//! | `network` | `/etc/init.d/network reload` (netifd: the node address, WireGuard interfaces) |
//! | `wireless` | `/sbin/wifi reload` (the mesh point on the owner's radio) |
//! | `firewall` | `/etc/init.d/firewall reload` (fw4; also when `etc/sidenet/shaping.nft` changed) |
//! | `babeld` | `/etc/init.d/babeld restart`, or `stop` when no babeld interface is left |
//! | `dhcp` | `/etc/init.d/dnsmasq reload` (the mesh's names: `domain` sections); skipped on a router without it |
//!
//! (Paths are under `--root`, `/` on a router.) `restart:squid` runs sidenet's own Squid with
//! `etc/sidenet/squid.conf` ([`crate::squid`]; the squid package's own service and config stay
//! the owner's). `apply:shaping` builds the policy's HTB classes from `etc/sidenet/shaping` after
//! the reloads, with the same code as the `linux` backend ([`crate::shaping`]): the WireGuard
//! links netifd has up (the network batch's `wireguard` interfaces) are redirected through them
//! at once, links it brings up later by the rendered hotplug script, and the rates follow the
//! windows from the node's clock (at each [`Backend::observe`]). `apply:probes` hands `etc/sidenet/probes` to
//! the prober. `--uninstall` ([`Backend::uninstall`])
//! removes every `sidenet_*` section and puts each file sidenet changed back byte for byte.
//!
//! OpenWrt's WireGuard protocol handler wants the private key in `/etc/config/network`: the
//! controller renders the placeholder [`KEY_PLACEHOLDER`] in the network batch and the agent fills
//! in the node's own key while staging ([`Backend::prepare`]; the batch file is then mode 0600).
//! The key never leaves the node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sidenet_wire::messages::{Neighbour, NodeConfig, WireguardInfo};

use crate::backend::{
    Backend, BackendError, DataplaneArgs, Kind, Observation, Runner, underlay_endpoints,
};
use crate::probe::ProbePlan;
use crate::uci::{Batch, PACKAGES, Restored, Uci, babeld_has_interface};
use crate::wgkey::WgKey;

/// What the controller writes where the node's WireGuard private key goes.
pub const KEY_PLACEHOLDER: &str = "@sidenet-wireguard-private-key@";
/// babeld's local (read-only) port, as the rendered babeld batch sets it.
pub const BABEL_PORT: u16 = 33123;
/// Where a config's batch for a UCI package is.
pub const BATCH_DIR: &str = "etc/sidenet/uci";
/// The shaping include fw4 reads (firewall `sidenet_shaping`).
pub const SHAPING_NFT: &str = "etc/sidenet/shaping.nft";
/// The shaping table (`apply:shaping`).
pub const SHAPING: &str = "etc/sidenet/shaping";
/// The actions an OpenWrt config may carry.
pub const ACTIONS: [&str; 8] = [
    "apply:shaping",
    "reload:network",
    "reload:wireless",
    "reload:firewall",
    "restart:babeld",
    "reload:dhcp",
    crate::squid::ACTION,
    "apply:probes",
];

/// The program (relative to the root, `/` on a router) and argument that reload `package`
/// (babeld: see [`Openwrt::reload`]). Tests root the backend in a folder whose `etc/init.d`
/// and `sbin` hold recording stand-ins.
fn reload_command(package: &str) -> (&'static str, &'static str) {
    match package {
        "network" => ("etc/init.d/network", "reload"),
        "wireless" => ("sbin/wifi", "reload"),
        "firewall" => ("etc/init.d/firewall", "reload"),
        "dhcp" => ("etc/init.d/dnsmasq", "reload"),
        _ => ("etc/init.d/babeld", "restart"),
    }
}

/// The `openwrt` backend.
pub struct Openwrt {
    root: PathBuf,
    key: WgKey,
    underlay: Vec<String>,
    runner: Box<dyn Runner>,
    plan: Option<ProbePlan>,
    uci: Uci,
    /// The shaping include as last converged (`None`: not known yet, as after a start).
    include: Option<Option<String>>,
    /// The applied shaping table.
    shaper: Option<crate::shaping::Shaper>,
    /// Pid files of the daemons the agent runs itself (Squid): `STATE/run`.
    run: PathBuf,
}

impl std::fmt::Debug for Openwrt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Openwrt")
            .field("root", &self.root)
            .field("uci", &self.uci)
            .finish()
    }
}

/// The batch path for `package`.
pub fn batch_path(package: &str) -> String {
    format!("{BATCH_DIR}/{package}")
}

/// The node id of a babel neighbour heard on `interface`: the probe target over that link
/// (`neighbour NODE fe80::..%IFACE`, where IFACE is the WireGuard device netifd created for the
/// network section of that name, and babeld's interface).
pub fn neighbour_node(plan: Option<&ProbePlan>, interface: &str) -> Option<String> {
    let suffix = format!("%{interface}");
    plan?
        .targets
        .iter()
        .find(|t| t.kind == "neighbour" && t.address.ends_with(&suffix))
        .map(|t| t.node.clone())
}

impl Openwrt {
    /// A backend for the router rooted at `root` (its config in `ROOT/etc/config`), keeping its
    /// working files under the agent's `state` folder.
    pub fn new(
        root: &Path,
        state: &Path,
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
            uci: Uci::new(&args.uci, root, state),
            include: None,
            shaper: None,
            run: state.join("run"),
        }
    }

    /// The installed batches of `config` (read from disk: the installed files hold what
    /// [`Backend::prepare`] filled in).
    fn installed_batches(&self, config: &NodeConfig) -> Result<Vec<Batch>, BackendError> {
        let mut out = Vec::new();
        for f in &config.files {
            let Some(package) = f.path.strip_prefix(&format!("{BATCH_DIR}/")) else {
                continue;
            };
            let p = self.root.join(&f.path);
            let text = std::fs::read_to_string(&p)
                .map_err(|e| BackendError(format!("cannot read {}: {e}", p.display())))?;
            out.push(
                Batch::parse(package, &text)
                    .map_err(|e| BackendError(format!("{}: {e}", f.path)))?,
            );
        }
        Ok(out)
    }

    /// Reloads the packages in `changed` (in [`PACKAGES`] order).
    fn reload(&mut self, changed: &[&str]) -> Result<(), BackendError> {
        for package in PACKAGES {
            if !changed.contains(&package) {
                continue;
            }
            let (program, mut action) = reload_command(package);
            if package == "babeld" {
                // babeld exits at once ("asked to run on no interfaces") without one: stop it
                // instead of letting procd respawn it until it gives up.
                let has = self
                    .uci
                    .export(self.runner.as_mut(), "babeld")
                    .map_err(BackendError)?
                    .is_some_and(|s| babeld_has_interface(&s));
                if !has {
                    action = "stop";
                }
            }
            let program = self.root.join(program);
            // A router whose owner replaced dnsmasq has no resolver to tell about the names.
            if package == "dhcp" && !program.exists() {
                continue;
            }
            self.runner
                .run(&[&program.to_string_lossy(), action])
                .map_err(BackendError)?;
        }
        Ok(())
    }

    /// Whether the shaping include changed since the last converge (unknown counts as
    /// changed when the file is there).
    fn include_changed(&mut self) -> bool {
        let now = std::fs::read_to_string(self.root.join(SHAPING_NFT)).ok();
        let changed = match &self.include {
            Some(before) => *before != now,
            None => now.is_some(),
        };
        self.include = Some(now);
        changed
    }

    /// Whether network device `dev` exists (`ROOT/sys/class/net/DEV`).
    fn has_dev(&self, dev: &str) -> bool {
        self.root.join("sys/class/net").join(dev).exists()
    }

    /// Applies the shaping table (`table`: its text) to the WireGuard links of `batches` that
    /// exist now, or removes the classes (`None`).
    fn shaping(&mut self, batches: &[Batch], table: Option<&str>) -> Result<(), BackendError> {
        let mut links = Vec::new();
        for s in batches.iter().flat_map(|b| b.sections.iter()) {
            if s.options.iter().any(|(k, v)| {
                k == "proto" && matches!(v, crate::uci::Value::One(p) if p == "wireguard")
            }) && self.has_dev(&s.name)
            {
                links.push(s.name.clone());
            }
        }
        let left = self.shaper.is_none() && crate::shaping::IFBS.iter().any(|d| self.has_dev(d));
        crate::shaping::converge(self.runner.as_mut(), &mut self.shaper, table, &links, left)
            .map_err(BackendError)
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
        if let Some(f) = config
            .files
            .iter()
            .find(|f| f.path.starts_with("etc/config/"))
        {
            return Err(BackendError(format!(
                "the config writes {} whole: sidenet only changes its own sidenet_* sections on OpenWrt, through uci (a controller older than this agent?); refusing it",
                f.path
            )));
        }
        if config
            .files
            .iter()
            .any(|f| f.content.contains(KEY_PLACEHOLDER))
        {
            let private = self.key.private_base64().map_err(BackendError)?;
            for f in &mut config.files {
                if f.content.contains(KEY_PLACEHOLDER) {
                    f.content = f.content.replace(KEY_PLACEHOLDER, &private);
                    f.mode = 0o600;
                }
            }
        }
        for f in &config.files {
            if let Some(package) = f.path.strip_prefix(&format!("{BATCH_DIR}/")) {
                Batch::parse(package, &f.content)
                    .map_err(|e| BackendError(format!("{}: {e}", f.path)))?;
            }
        }
        Ok(())
    }

    fn converge(&mut self, config: Option<&NodeConfig>) -> Result<(), BackendError> {
        if let Some(a) =
            config.and_then(|c| c.actions.iter().find(|a| !ACTIONS.contains(&a.as_str())))
        {
            return Err(BackendError(format!(
                "unknown action {a:?}: this agent is older than the config"
            )));
        }
        let batches = match config {
            Some(c) => self.installed_batches(c)?,
            None => Vec::new(),
        };
        // Everything that can refuse the config is checked before anything changes.
        self.uci
            .check(self.runner.as_mut(), &batches)
            .map_err(BackendError)?;
        let mut changed = Vec::new();
        for package in PACKAGES {
            let batch = batches.iter().find(|b| b.package == package);
            if self
                .uci
                .sync(self.runner.as_mut(), package, batch)
                .map_err(BackendError)?
            {
                changed.push(package);
            }
        }
        if self.include_changed() && !changed.contains(&"firewall") {
            changed.push("firewall");
        }
        self.reload(&changed)?;
        let table = match config {
            Some(c) if c.actions.iter().any(|a| a == "apply:shaping") => {
                let p = self.root.join(SHAPING);
                Some(
                    std::fs::read_to_string(&p)
                        .map_err(|e| BackendError(format!("cannot read {}: {e}", p.display())))?,
                )
            }
            _ => None,
        };
        self.shaping(&batches, table.as_deref())?;
        let squid = config.is_some_and(|c| c.actions.iter().any(|a| a == crate::squid::ACTION));
        if squid {
            std::fs::create_dir_all(&self.run)
                .map_err(|e| BackendError(format!("cannot create {}: {e}", self.run.display())))?;
        }
        crate::squid::converge(self.runner.as_mut(), &self.root, &self.run, squid)
            .map_err(BackendError)?;
        self.plan = None;
        if let Some(c) = config
            && c.actions.iter().any(|a| a == "apply:probes")
        {
            let p = self.root.join("etc/sidenet/probes");
            let text = std::fs::read_to_string(&p)
                .map_err(|e| BackendError(format!("cannot read {}: {e}", p.display())))?;
            self.plan = Some(ProbePlan::parse(&text).map_err(BackendError)?);
        }
        Ok(())
    }

    fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        self.uci
            .check(self.runner.as_mut(), &[])
            .map_err(BackendError)?;
        let mut notes = Vec::new();
        let mut changed = Vec::new();
        for package in PACKAGES {
            let path = self.uci.confdir.join(package);
            match self
                .uci
                .uninstall(self.runner.as_mut(), package)
                .map_err(BackendError)?
            {
                Restored::Untouched => {}
                Restored::Exactly => {
                    changed.push(package);
                    notes.push(format!(
                        "{}: back exactly as it was before sidenet",
                        path.display()
                    ));
                }
                Restored::OwnerChangesKept => {
                    changed.push(package);
                    notes.push(format!(
                        "{}: sidenet's sections removed; the owner changed the file since sidenet was installed, so their version is kept (in uci's layout)",
                        path.display()
                    ));
                }
            }
        }
        if self.include_changed() && !changed.contains(&"firewall") {
            changed.push("firewall");
        }
        // Removing the classes cannot fail.
        let _ = self.shaping(&[], None);
        if let Err(e) = self.reload(&changed) {
            notes.push(format!("reloading: {e}"));
        }
        self.plan = None;
        Ok(notes)
    }

    fn observe(&mut self) -> Observation {
        let shaping = crate::shaping::observe(self.runner.as_mut(), self.shaper.as_mut());
        let endpoints = underlay_endpoints(self.runner.as_mut(), &self.underlay);
        let neighbours = crate::babel::dump_port(BABEL_PORT, Duration::from_secs(1))
            .map(|d| {
                d.neighbours
                    .into_iter()
                    .map(|n| Neighbour {
                        node: neighbour_node(self.plan.as_ref(), &n.interface),
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
                heard: Vec::new(),
            }),
            neighbours,
            links,
            probes: Vec::new(),
            shaping,
            services: Vec::new(),
        }
    }

    fn probe_plan(&self) -> Option<ProbePlan> {
        self.plan.clone()
    }
}
