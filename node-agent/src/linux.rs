//! The `linux` backend: a Debian-like host (a dongle host or an x86 box) runs the side-net.
//!
//! It converges the system to the rendered files under the root, one action each, always in this
//! order and always all of them (each is idempotent), so the same code applies a new config,
//! restores the last good one after a rollback, and rebuilds everything after a reboot:
//!
//! | action | file | what it does |
//! | --- | --- | --- |
//! | `apply:firewall` | `etc/sidenet/firewall.nft` | `nft -f` (one atomic table) |
//! | `restart:mesh` | `etc/sidenet/radio`, `etc/sidenet/wpa_supplicant-mesh.conf` (and `-next.conf` during a passphrase rotation) | creates and tunes `mesh0` on the profile's phy when that radio is here ([`crate::radio`]), then runs wpa_supplicant on it (and a second one on `mesh1` with the next passphrase) |
//! | `apply:addresses` | `etc/sidenet/addresses` | creates `sidenet0` (dummy; ifb where the kernel has no dummy module), sets its addresses and the unreachable route for the mesh prefix, removes what it set before and no longer should |
//! | `apply:wireguard` | `etc/sidenet/wireguard` | one interface per neighbour (kernel WireGuard, or the userspace implementation), keys, endpoints, link-local address; removes links that went away |
//! | `apply:shaping` | `etc/sidenet/shaping` | the policy's HTB classes on ifb devices, the WireGuard links' traffic redirected through them, the rates of the stretch of the week in force; switched at each window boundary from the node's clock ([`crate::shaping`]); removed when the config has no table |
//! | `restart:babeld` | `etc/sidenet/babeld.conf` | (re)starts babeld when its config changed or it is not running; stops it when no interface is left |
//! | `restart:squid` | `etc/sidenet/squid.conf` | (re)starts the neighbourhood web cache when its config changed or it is not running; stops it when a config has none ([`crate::squid`]) |
//! | `apply:probes` | `etc/sidenet/probes` | hands the targets to the prober |
//! | `apply:hostname` | `etc/hostname` | sets the hostname |
//!
//! Daemons it starts (babeld, boringtun-cli, wpa_supplicant) run in their own process group and
//! survive the agent: a restarted agent finds them through pid files under `STATE/run` and keeps
//! them when nothing changed, so the data plane does not blink when the agent restarts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sidenet_wire::messages::{Neighbour, NodeConfig, WireguardInfo};

use crate::backend::{
    Backend, BackendError, DataplaneArgs, Kind, Observation, Runner, WgMode, poll_until, read_pid,
    underlay_endpoints,
};
use crate::files::write_atomic;
use crate::probe::ProbePlan;
use crate::wgkey::WgKey;

/// The interface that carries the node's own side-net address.
pub const DUMMY: &str = "sidenet0";
/// The 802.11s interface the templates name.
pub const MESH_IFACE: &str = "mesh0";
/// The second mesh point during a passphrase rotation's overlap (created by the admin on the
/// same radio, like `mesh0`).
pub const MESH_NEXT_IFACE: &str = "mesh1";
/// Prefix of WireGuard interfaces.
pub const WG_PREFIX: &str = "sn-";
/// MTU of WireGuard interfaces (fits IPv6 underlays).
pub const WG_MTU: &str = "1420";
/// Seconds between WireGuard keepalives (keeps NAT and babel's view of the link fresh).
pub const KEEPALIVE: &str = "15";
/// The actions this backend knows, in the order it runs them.
pub const ACTIONS: [&str; 9] = [
    "apply:firewall",
    "restart:mesh",
    "apply:addresses",
    "apply:wireguard",
    "apply:shaping",
    "restart:babeld",
    crate::squid::ACTION,
    "apply:probes",
    "apply:hostname",
];

/// One WireGuard neighbour from `etc/sidenet/wireguard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// Local interface.
    pub iface: String,
    /// Local listen port.
    pub port: u16,
    /// The neighbour's node id.
    pub node: String,
    /// Its public key.
    pub public_key: String,
    /// Its endpoint.
    pub endpoint: String,
    /// Its link-local address.
    pub link_local: String,
}

/// `etc/sidenet/wireguard`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WgFile {
    /// This node's link-local address on every WireGuard interface.
    pub link_local: Option<String>,
    /// Neighbours.
    pub peers: Vec<WgPeer>,
}

fn safe_word(w: &str) -> bool {
    !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:[]%/+=".contains(c))
}

/// Parses `etc/sidenet/wireguard`.
pub fn parse_wireguard(text: &str) -> Result<WgFile, String> {
    let mut f = WgFile::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let bad = |what: &str| format!("wireguard line {}: {what}: {line:?}", n + 1);
        if w.iter().any(|x| !safe_word(x) || x.starts_with('-')) {
            return Err(bad("unexpected characters"));
        }
        match w.as_slice() {
            ["link-local", a] => f.link_local = Some(a.to_string()),
            ["peer", iface, port, node, key, endpoint, ll] => {
                if !iface.starts_with(WG_PREFIX) || iface.len() > 15 {
                    return Err(bad("interface must be sn-… and at most 15 characters"));
                }
                f.peers.push(WgPeer {
                    iface: iface.to_string(),
                    port: port.parse().map_err(|_| bad("bad port"))?,
                    node: node.to_string(),
                    public_key: key.to_string(),
                    endpoint: endpoint.to_string(),
                    link_local: ll.to_string(),
                });
            }
            _ => return Err(bad("cannot read")),
        }
    }
    Ok(f)
}

/// What `wg show IFACE dump` says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WgDump {
    /// Listen port.
    pub listen_port: Option<u16>,
    /// Peers.
    pub peers: Vec<DumpPeer>,
}

/// One peer of a [`WgDump`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpPeer {
    /// Public key.
    pub public_key: String,
    /// Endpoint (`(none)` if unknown).
    pub endpoint: String,
    /// Allowed IPs, sorted.
    pub allowed_ips: Vec<String>,
    /// Keepalive (`off` or seconds).
    pub keepalive: String,
}

impl DumpPeer {
    /// Whether this peer is configured as `want` asks.
    fn matches(&self, want: &WgPeer) -> bool {
        self.public_key == want.public_key
            && self.endpoint == want.endpoint
            && self.allowed_ips == ["0.0.0.0/0", "::/0"]
            && self.keepalive == KEEPALIVE
    }
}

/// Parses `wg show IFACE dump`: the interface line, then one line per peer (tab-separated).
pub fn parse_wg_dump(text: &str) -> WgDump {
    let mut lines = text.lines();
    let mut d = WgDump {
        listen_port: lines
            .next()
            .and_then(|l| l.split('\t').nth(2))
            .and_then(|p| p.parse().ok()),
        peers: Vec::new(),
    };
    for l in lines {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() < 8 {
            continue;
        }
        let mut allowed: Vec<String> = f[3].split(',').map(|s| s.trim().to_string()).collect();
        allowed.sort();
        d.peers.push(DumpPeer {
            public_key: f[0].to_string(),
            endpoint: f[2].to_string(),
            allowed_ips: allowed,
            keepalive: f[7].to_string(),
        });
    }
    d
}

/// `etc/sidenet/addresses`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Addresses {
    /// (CIDR, device).
    pub addrs: Vec<(String, String)>,
    /// Prefixes routed as unreachable.
    pub unreachable: Vec<String>,
}

/// Parses `etc/sidenet/addresses`.
pub fn parse_addresses(text: &str) -> Result<Addresses, String> {
    let mut a = Addresses::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("addresses line {}: cannot read {line:?}", n + 1);
        if w.iter().any(|x| !safe_word(x) || x.starts_with('-')) {
            return Err(bad());
        }
        match w.as_slice() {
            ["unreachable", p] if p.contains('/') => a.unreachable.push(p.to_string()),
            [cidr, dev] if cidr.contains('/') => a.addrs.push((cidr.to_string(), dev.to_string())),
            _ => return Err(bad()),
        }
    }
    Ok(a)
}

fn family(addr: &str) -> &'static str {
    if addr.contains(':') { "-6" } else { "-4" }
}

/// The `linux` backend.
pub struct Linux {
    root: PathBuf,
    run: PathBuf,
    key: WgKey,
    underlay: Vec<String>,
    wg_mode: WgMode,
    userspace: String,
    runner: Box<dyn Runner>,
    plan: Option<ProbePlan>,
    peers: Vec<WgPeer>,
    radio_noted: bool,
    shaper: Option<crate::shaping::Shaper>,
}

impl std::fmt::Debug for Linux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linux")
            .field("root", &self.root)
            .field("underlay", &self.underlay)
            .finish()
    }
}

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError(e.to_string())
}

impl Linux {
    /// A backend for the device rooted at `root`, keeping runtime files in `run`.
    pub fn new(
        root: &Path,
        run: &Path,
        key: WgKey,
        args: &DataplaneArgs,
        runner: Box<dyn Runner>,
    ) -> Self {
        Self {
            root: root.to_path_buf(),
            run: run.to_path_buf(),
            key,
            underlay: args.underlay.clone(),
            wg_mode: args.wg_mode,
            userspace: args.wg_userspace.clone(),
            runner,
            plan: None,
            peers: Vec::new(),
            radio_noted: false,
            shaper: None,
        }
    }

    fn file(&self, rel: &str) -> Result<String, BackendError> {
        let p = self.root.join(rel);
        std::fs::read_to_string(&p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))
    }

    fn run(&mut self, argv: &[&str]) -> Result<String, BackendError> {
        self.runner.run(argv).map_err(BackendError)
    }

    fn exists(&mut self, iface: &str) -> bool {
        self.runner
            .run(&["ip", "link", "show", "dev", iface])
            .is_ok()
    }

    fn daemon(&mut self, pidfile: &Path, name: &str) -> Option<u32> {
        read_pid(pidfile).filter(|p| self.runner.alive(*p, name))
    }

    fn stop_daemon(&mut self, pidfile: &Path, name: &str) {
        if let Some(pid) = self.daemon(pidfile, name)
            && let Err(e) = self.runner.stop(pid, Duration::from_secs(3))
        {
            tracing::warn!("stopping {name}: {e}");
        }
        let _ = std::fs::remove_file(pidfile);
    }

    fn firewall(&mut self) -> Result<(), BackendError> {
        let path = self.root.join("etc/sidenet/firewall.nft");
        self.run(&["nft", "-f", &path.to_string_lossy()])
            .map(|_| ())
    }

    fn firewall_down(&mut self) {
        let _ = self
            .runner
            .run(&["nft", "delete", "table", "inet", "sidenet"]);
    }

    fn mesh(&mut self) -> Result<(), BackendError> {
        // The mesh point on the profile's phy (crate::radio); else one made by the admin.
        let radio = crate::radio::converge(self.runner.as_mut(), &self.root, &self.run)?;
        if let crate::radio::Managed::No(why) = radio
            && !(self.exists(MESH_IFACE)
                && self.runner.run(&["iw", "dev", MESH_IFACE, "info"]).is_ok())
        {
            self.stop_daemon(&self.run.join("wpa_supplicant.pid"), "wpa_supplicant");
            self.stop_daemon(&self.run.join("wpa_supplicant-next.pid"), "wpa_supplicant");
            if !self.radio_noted {
                tracing::info!(
                    "{why} and no wireless {MESH_IFACE} interface: the mesh radio is not managed here; the side-net runs over the underlay interfaces"
                );
                self.radio_noted = true;
            }
            return Ok(());
        }
        self.mesh_point(MESH_IFACE, "wpa_supplicant-mesh.conf", "wpa_supplicant")?;
        // During a passphrase rotation's overlap: the second mesh point, with the next one.
        let next = "etc/sidenet/wpa_supplicant-mesh-next.conf";
        if self.root.join(next).exists() && self.exists(MESH_NEXT_IFACE) {
            self.mesh_point(
                MESH_NEXT_IFACE,
                "wpa_supplicant-mesh-next.conf",
                "wpa_supplicant-next",
            )
        } else {
            if self.root.join(next).exists() {
                tracing::warn!(
                    "a passphrase rotation is under way but there is no {MESH_NEXT_IFACE} interface for its second mesh point: this node peers only on the current passphrase until the switch"
                );
            }
            self.stop_daemon(&self.run.join("wpa_supplicant-next.pid"), "wpa_supplicant");
            Ok(())
        }
    }

    /// Runs wpa_supplicant on `iface` with `etc/sidenet/FILE` (restarting it when the file
    /// changed); `name` names its pid, snapshot and log files.
    fn mesh_point(&mut self, iface: &str, file: &str, name: &str) -> Result<(), BackendError> {
        let pidfile = self.run.join(format!("{name}.pid"));
        let rel = format!("etc/sidenet/{file}");
        let conf = self.root.join(&rel);
        let text = self.file(&rel)?;
        let snapshot = self.run.join(format!("{name}.conf.running"));
        let same = std::fs::read_to_string(&snapshot).ok().as_deref() == Some(text.as_str());
        if same && self.daemon(&pidfile, "wpa_supplicant").is_some() {
            return Ok(());
        }
        self.stop_daemon(&pidfile, "wpa_supplicant");
        let pid = self
            .runner
            .spawn(
                &[
                    "wpa_supplicant",
                    "-i",
                    iface,
                    "-D",
                    "nl80211",
                    "-c",
                    &conf.to_string_lossy(),
                ],
                &self.run.join(format!("{name}.log")),
            )
            .map_err(BackendError)?;
        write_atomic(&pidfile, pid.to_string().as_bytes(), 0o600).map_err(err)?;
        // Holds the passphrase: readable by root only.
        write_atomic(&snapshot, text.as_bytes(), 0o600).map_err(err)
    }

    fn addr_state(&self) -> PathBuf {
        self.run.join("addresses.json")
    }

    fn addresses(&mut self) -> Result<(), BackendError> {
        let want = parse_addresses(&self.file("etc/sidenet/addresses")?).map_err(BackendError)?;
        if want.addrs.iter().any(|(_, d)| d == DUMMY) && !self.exists(DUMMY) {
            // Debian kernels have the dummy module; some minimal kernels only have ifb, which
            // behaves the same for an interface that only holds addresses.
            if self
                .runner
                .run(&["ip", "link", "add", DUMMY, "type", "dummy"])
                .is_err()
            {
                self.run(&["ip", "link", "add", DUMMY, "type", "ifb"])?;
            }
        }
        if want.addrs.iter().any(|(_, d)| d == DUMMY) {
            self.run(&["ip", "link", "set", DUMMY, "up"])?;
        }
        let had: Addresses = std::fs::read(self.addr_state())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for (cidr, dev) in &had.addrs {
            if !want.addrs.contains(&(cidr.clone(), dev.clone())) {
                let _ = self
                    .runner
                    .run(&["ip", family(cidr), "addr", "del", cidr, "dev", dev]);
            }
        }
        for p in &had.unreachable {
            if !want.unreachable.contains(p) {
                let _ = self
                    .runner
                    .run(&["ip", family(p), "route", "del", "unreachable", p]);
            }
        }
        for (cidr, dev) in &want.addrs {
            if cidr.contains(':') {
                self.run(&["ip", "-6", "addr", "replace", cidr, "dev", dev, "nodad"])?;
            } else {
                self.run(&["ip", "-4", "addr", "replace", cidr, "dev", dev])?;
            }
        }
        for p in &want.unreachable {
            self.run(&["ip", family(p), "route", "replace", "unreachable", p])?;
        }
        write_atomic(
            &self.addr_state(),
            &serde_json::to_vec(&want).unwrap_or_default(),
            0o600,
        )
        .map_err(err)
    }

    fn addresses_down(&mut self) {
        let had: Addresses = std::fs::read(self.addr_state())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for (cidr, dev) in &had.addrs {
            let _ = self
                .runner
                .run(&["ip", family(cidr), "addr", "del", cidr, "dev", dev]);
        }
        for p in &had.unreachable {
            let _ = self
                .runner
                .run(&["ip", family(p), "route", "del", "unreachable", p]);
        }
        let _ = self.runner.run(&["ip", "link", "del", DUMMY]);
        let _ = std::fs::remove_file(self.addr_state());
    }

    fn wg_ifaces(&mut self) -> Vec<String> {
        let out = self
            .runner
            .run(&["ip", "-o", "link", "show"])
            .unwrap_or_default();
        out.lines()
            .filter_map(|l| {
                let name = l.split(':').nth(1)?.trim();
                let name = name.split('@').next()?;
                name.starts_with(WG_PREFIX).then(|| name.to_string())
            })
            .collect()
    }

    fn userspace_name(&self) -> String {
        Path::new(&self.userspace)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.userspace.clone())
    }

    fn wg_remove(&mut self, iface: &str) {
        let _ = self.runner.run(&["ip", "link", "del", "dev", iface]);
        let name = self.userspace_name();
        self.stop_daemon(&self.run.join(format!("wg-{iface}.pid")), &name);
    }

    fn wg_create(&mut self, iface: &str) -> Result<(), BackendError> {
        if self.wg_mode != WgMode::Userspace {
            match self
                .runner
                .run(&["ip", "link", "add", "dev", iface, "type", "wireguard"])
            {
                Ok(_) => return Ok(()),
                Err(e) if self.wg_mode == WgMode::Kernel => return Err(BackendError(e)),
                Err(_) => {}
            }
        }
        let userspace = self.userspace.clone();
        let name = self.userspace_name();
        let log_path = self.run.join(format!("wg-{iface}.log"));
        let pid_path = self.run.join(format!("wg-{iface}.pid"));
        // A userspace WireGuard that exits right after starting (seen on loaded machines, with
        // nothing in its log) is started again: a transient start failure must not fail the
        // whole revision, which the controller would then never re-push.
        let mut last_log = String::new();
        for attempt in 1..=3 {
            let pid = self
                .runner
                .spawn(
                    &[&userspace, "-f", "--disable-drop-privileges", iface],
                    &log_path,
                )
                .map_err(BackendError)?;
            write_atomic(&pid_path, pid.to_string().as_bytes(), 0o600).map_err(err)?;
            let up = poll_until(Duration::from_secs(5), || {
                self.runner.run(&["wg", "show", iface]).is_ok() || !self.runner.alive(pid, &name)
            });
            if up && self.runner.alive(pid, &name) {
                return Ok(());
            }
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            tracing::warn!(
                "{userspace} did not bring up {iface} (attempt {attempt} of 3): {}",
                last_log.trim()
            );
            self.stop_daemon(&pid_path, &name);
            let _ = self.runner.run(&["ip", "link", "del", "dev", iface]);
        }
        Err(err(format!(
            "{userspace} did not bring up {iface} after 3 attempts: {}",
            last_log.trim()
        )))
    }

    fn wireguard(&mut self) -> Result<(), BackendError> {
        let want = parse_wireguard(&self.file("etc/sidenet/wireguard")?).map_err(BackendError)?;
        for iface in self.wg_ifaces() {
            if !want.peers.iter().any(|p| p.iface == iface) {
                self.wg_remove(&iface);
            }
        }
        let key = self.key.path().to_string_lossy().into_owned();
        for p in &want.peers {
            let fresh = !self.exists(&p.iface);
            if fresh {
                self.wg_create(&p.iface)?;
            }
            // Change only what differs: boringtun cannot modify a peer in place (it must be
            // removed and added again), and re-setting what is set would reset the session.
            let have = if fresh {
                WgDump::default()
            } else {
                parse_wg_dump(&self.run(&["wg", "show", &p.iface, "dump"])?)
            };
            let port = p.port.to_string();
            if fresh {
                self.run(&[
                    "wg",
                    "set",
                    &p.iface,
                    "private-key",
                    &key,
                    "listen-port",
                    &port,
                ])?;
            } else if have.listen_port != Some(p.port) {
                self.run(&["wg", "set", &p.iface, "listen-port", &port])?;
            }
            for other in &have.peers {
                if other.public_key != p.public_key || !other.matches(p) {
                    self.run(&["wg", "set", &p.iface, "peer", &other.public_key, "remove"])?;
                }
            }
            if !have
                .peers
                .iter()
                .any(|o| o.public_key == p.public_key && o.matches(p))
            {
                let set = self.run(&[
                    "wg",
                    "set",
                    &p.iface,
                    "peer",
                    &p.public_key,
                    "endpoint",
                    &p.endpoint,
                    "allowed-ips",
                    "::/0,0.0.0.0/0",
                    "persistent-keepalive",
                    KEEPALIVE,
                ]);
                // A link-local endpoint on userspace WireGuard: through its socket (crate::uapi).
                let userspace = self.run.join(format!("wg-{}.pid", p.iface)).exists();
                match (set, crate::uapi::numeric_scope(&p.endpoint)) {
                    (Ok(_), _) => {}
                    (Err(_), Some(numeric)) if userspace => {
                        let req = crate::uapi::set_peer_request(&p.public_key, &numeric, KEEPALIVE)
                            .map_err(BackendError)?;
                        crate::uapi::send(&p.iface, &req).map_err(BackendError)?;
                    }
                    (Err(e), _) => return Err(e),
                }
            }
            self.run(&["ip", "link", "set", "dev", &p.iface, "mtu", WG_MTU, "up"])?;
            if let Some(ll) = &want.link_local {
                let cidr = format!("{ll}/64");
                self.run(&[
                    "ip", "-6", "addr", "replace", &cidr, "dev", &p.iface, "nodad",
                ])?;
            }
        }
        self.peers = want.peers;
        Ok(())
    }

    /// The config's shaping table (`apply:shaping`), or none (`text` false).
    fn shaping(&mut self, text: bool) -> Result<(), BackendError> {
        let text = if text {
            Some(self.file("etc/sidenet/shaping")?)
        } else {
            None
        };
        let ifaces: Vec<String> = self.peers.iter().map(|p| p.iface.clone()).collect();
        // Left by an earlier run of the agent (a restart onto a config without a table).
        let left = self.shaper.is_none() && crate::shaping::IFBS.iter().any(|d| self.exists(d));
        crate::shaping::converge(
            self.runner.as_mut(),
            &mut self.shaper,
            text.as_deref(),
            &ifaces,
            left,
        )
        .map_err(BackendError)
    }

    fn shaping_down(&mut self) {
        let _ = self.shaping(false);
    }

    fn wireguard_down(&mut self) {
        for iface in self.wg_ifaces() {
            self.wg_remove(&iface);
        }
        self.peers.clear();
    }

    fn babel_sock(&self) -> PathBuf {
        self.run.join("babeld.sock")
    }

    fn babeld(&mut self) -> Result<(), BackendError> {
        let conf = self.root.join("etc/sidenet/babeld.conf");
        let text = self.file("etc/sidenet/babeld.conf")?;
        if !text
            .lines()
            .any(|l| l.trim_start().starts_with("interface "))
        {
            self.babeld_down();
            return Ok(());
        }
        let pidfile = self.run.join("babeld.pid");
        let snapshot = self.run.join("babeld.conf.running");
        let same = std::fs::read_to_string(&snapshot).ok().as_deref() == Some(text.as_str());
        if same && self.daemon(&pidfile, "babeld").is_some() {
            return Ok(());
        }
        self.stop_daemon(&pidfile, "babeld");
        let sock = self.babel_sock();
        let _ = std::fs::remove_file(&sock);
        let local = format!("local-path {}", sock.display());
        let pid = self
            .runner
            .spawn(
                &[
                    "babeld",
                    "-I",
                    &pidfile.to_string_lossy(),
                    "-S",
                    &self.run.join("babeld.state").to_string_lossy(),
                    "-c",
                    &conf.to_string_lossy(),
                    "-C",
                    &local,
                ],
                &self.run.join("babeld.log"),
            )
            .map_err(BackendError)?;
        let started = poll_until(Duration::from_secs(5), || {
            sock.exists() || !self.runner.alive(pid, "babeld")
        });
        if !started || !self.runner.alive(pid, "babeld") {
            let log = std::fs::read_to_string(self.run.join("babeld.log")).unwrap_or_default();
            return Err(err(format!("babeld did not start: {}", log.trim())));
        }
        write_atomic(&snapshot, text.as_bytes(), 0o644).map_err(err)
    }

    fn babeld_down(&mut self) {
        self.stop_daemon(&self.run.join("babeld.pid"), "babeld");
        let _ = std::fs::remove_file(self.run.join("babeld.conf.running"));
        let _ = std::fs::remove_file(self.babel_sock());
    }

    fn probes(&mut self) -> Result<(), BackendError> {
        self.plan =
            Some(ProbePlan::parse(&self.file("etc/sidenet/probes")?).map_err(BackendError)?);
        Ok(())
    }

    fn hostname(&mut self) -> Result<(), BackendError> {
        let want = self.file("etc/hostname")?.trim().to_string();
        let now = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        if want.is_empty() || now.trim() == want {
            return Ok(());
        }
        self.run(&["hostname", &want]).map(|_| ())
    }

    fn teardown(&mut self) {
        crate::squid::stop(self.runner.as_mut(), &self.run);
        self.babeld_down();
        self.shaping_down();
        self.wireguard_down();
        self.addresses_down();
        self.firewall_down();
        self.stop_daemon(&self.run.join("wpa_supplicant.pid"), "wpa_supplicant");
        self.stop_daemon(&self.run.join("wpa_supplicant-next.pid"), "wpa_supplicant");
        crate::radio::down(self.runner.as_mut(), &self.run);
        self.plan = None;
    }
}

impl Backend for Linux {
    fn kind(&self) -> Kind {
        Kind::Linux
    }

    fn needs_trial(&self) -> bool {
        true
    }

    fn converge(&mut self, config: Option<&NodeConfig>) -> Result<(), BackendError> {
        let Some(config) = config else {
            self.teardown();
            return Ok(());
        };
        if let Some(a) = config
            .actions
            .iter()
            .find(|a| !ACTIONS.contains(&a.as_str()))
        {
            return Err(err(format!(
                "unknown action {a:?}: this agent is older than the config"
            )));
        }
        let has = |a: &str| config.actions.iter().any(|x| x == a);
        if has("apply:firewall") {
            self.firewall()?;
        } else {
            self.firewall_down();
        }
        if has("restart:mesh") {
            self.mesh()?;
        } else {
            crate::radio::down(self.runner.as_mut(), &self.run);
        }
        if has("apply:addresses") {
            self.addresses()?;
        } else {
            self.addresses_down();
        }
        if has("apply:wireguard") {
            self.wireguard()?;
        } else {
            self.wireguard_down();
        }
        self.shaping(has("apply:shaping"))?;
        if has("restart:babeld") {
            self.babeld()?;
        } else {
            self.babeld_down();
        }
        crate::squid::converge(
            self.runner.as_mut(),
            &self.root,
            &self.run,
            has(crate::squid::ACTION),
        )
        .map_err(BackendError)?;
        if has("apply:probes") {
            self.probes()?;
        } else {
            self.plan = None;
        }
        if has("apply:hostname") {
            self.hostname()?;
        }
        Ok(())
    }

    fn observe(&mut self) -> Observation {
        let shaping = crate::shaping::observe(self.runner.as_mut(), self.shaper.as_mut());
        let endpoints = underlay_endpoints(self.runner.as_mut(), &self.underlay);
        let mut neighbours = Vec::new();
        if self
            .daemon(&self.run.join("babeld.pid"), "babeld")
            .is_some()
            && let Ok(d) = crate::babel::dump_path(&self.babel_sock(), Duration::from_secs(1))
        {
            for n in d.neighbours {
                let node = self
                    .peers
                    .iter()
                    .find(|p| p.iface == n.interface)
                    .map(|p| p.node.clone());
                neighbours.push(Neighbour {
                    address: n.address,
                    interface: n.interface,
                    node,
                    cost: Some(n.cost),
                });
            }
        }
        Observation {
            wireguard: Some(WireguardInfo {
                public_key: self.key.public().to_string(),
                endpoints,
                heard: Vec::new(),
            }),
            neighbours,
            links: self.peers.len(),
            probes: Vec::new(),
            shaping,
            services: Vec::new(),
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
    use sidenet_wire::messages::FileSpec;

    const GOLDEN: &str = "../controller/tests/golden/with-peers/raspberrypi-4b-awus036acm";

    /// The config the controller renders for a Linux node with two neighbours (its golden files).
    fn golden_config(root: &Path) -> NodeConfig {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
        let files: Vec<FileSpec> = [
            "etc/hostname",
            "etc/sidenet/firewall.nft",
            "etc/sidenet/wpa_supplicant-mesh.conf",
            "etc/sidenet/addresses",
            "etc/sidenet/wireguard",
            "etc/sidenet/shaping",
            "etc/sidenet/babeld.conf",
            "etc/sidenet/probes",
        ]
        .iter()
        .map(|p| FileSpec {
            path: p.to_string(),
            mode: 0o644,
            content: std::fs::read_to_string(base.join(p)).unwrap_or_default(),
        })
        .collect();
        for f in &files {
            let _ = write_atomic(&root.join(&f.path), f.content.as_bytes(), 0o644);
        }
        NodeConfig {
            mesh: "riverside".into(),
            node: "goldennode234567".into(),
            hostname: "golden".into(),
            role: "router".into(),
            profile: "raspberrypi-4b-awus036acm".into(),
            family: "linux".into(),
            subnet: "fdfc:b395:f348:1c2d::/64".into(),
            addresses: vec!["fdfc:b395:f348:1c2d::1/64".into()],
            files,
            // These renders have no web cache (tests/netns/cache runs Squid for real).
            actions: ACTIONS
                .iter()
                .filter(|a| **a != crate::squid::ACTION)
                .map(|s| s.to_string())
                .collect(),
            sealed: Default::default(),
            requires: Vec::new(),
        }
    }

    fn backend(
        dir: &Path,
        mode: WgMode,
        rec: &Recorder,
    ) -> Result<Linux, Box<dyn std::error::Error>> {
        let run = dir.join("run");
        std::fs::create_dir_all(&run)?;
        let key = WgKey::load_or_create(&dir.join("wg.key"))?;
        let args = DataplaneArgs {
            underlay: vec!["ab".into()],
            wg_mode: mode,
            ..DataplaneArgs::default()
        };
        Ok(Linux::new(
            &dir.join("root"),
            &run,
            key,
            &args,
            Box::new(rec.clone()),
        ))
    }

    fn pos(cmds: &[String], prefix: &str) -> usize {
        cmds.iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or(usize::MAX)
    }

    #[test]
    fn parses_the_rendered_files() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
        let wg = std::fs::read_to_string(base.join("etc/sidenet/wireguard")).unwrap_or_default();
        let wg = parse_wireguard(&wg).unwrap_or_default();
        assert_eq!(wg.peers.len(), 2);
        assert_eq!(wg.peers[1].endpoint, "[2001:db8:5::2]:52011");
        assert!(wg.link_local.is_some());
        let a = std::fs::read_to_string(base.join("etc/sidenet/addresses")).unwrap_or_default();
        let a = parse_addresses(&a).unwrap_or_default();
        assert_eq!(
            a.addrs,
            [("fdfc:b395:f348:1c2d::1/64".to_string(), DUMMY.to_string())]
        );
        assert_eq!(a.unreachable, ["fdfc:b395:f348::/48"]);
        // Nothing that could smuggle options into a command line.
        assert!(parse_wireguard("peer sn-x 1 n --key k e l").is_err());
        assert!(parse_wireguard("peer eth0 1 n k e l").is_err());
        assert!(parse_addresses("fd00::1/64 eth0; reboot").is_err());
    }

    #[test]
    fn converges_in_order_with_kernel_wireguard() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let rec = Recorder::new();
        rec.answer("ip link show dev", Err("does not exist"));
        rec.answer("ip link add sidenet0 type dummy", Ok(""));
        let mut lx = backend(dir.path(), WgMode::Auto, &rec)?;
        let cfg = golden_config(&dir.path().join("root"));
        // babeld is recorded, not run: its socket never appears, so converge reports it.
        let e = lx.converge(Some(&cfg));
        assert!(e.is_err_and(|e| e.0.contains("babeld did not start")));
        let cmds = rec.commands();
        let fw = pos(&cmds, "nft -f");
        let addr = pos(
            &cmds,
            "ip -6 addr replace fdfc:b395:f348:1c2d::1/64 dev sidenet0 nodad",
        );
        let unreach = pos(&cmds, "ip -6 route replace unreachable fdfc:b395:f348::/48");
        let wg = pos(&cmds, "ip link add dev sn-peerbbbbbbbb type wireguard");
        let set = pos(&cmds, "wg set sn-peerbbbbbbbb private-key ");
        let babel = pos(&cmds, "spawn babeld -I");
        assert!(
            fw < addr && addr < unreach && unreach < wg && wg < set && set < babel,
            "{cmds:#?}"
        );
        assert!(cmds[set].ends_with("listen-port 51837"), "{}", cmds[set]);
        // The shaping table after the links exist, before babeld; each link's egress through
        // the ifb; fq_codel when the kernel takes it.
        let htb = pos(&cmds, "tc qdisc replace dev sneg0 root handle 1: htb");
        let redirect = pos(
            &cmds,
            "tc filter add dev sn-peercccccccc egress protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev sneg0",
        );
        assert!(set < htb && htb < redirect && redirect < babel, "{cmds:#?}");
        assert!(
            cmds.iter()
                .any(|c| c == "tc qdisc replace dev sneg0 parent 1:10 handle 1010: fq_codel")
        );
        assert_eq!(
            lx.observe().shaping.map(|s| s.leaf),
            Some("fq_codel".to_string())
        );
        assert!(cmds.iter().any(|c| c
            == "wg set sn-peerbbbbbbbb peer xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg= endpoint 10.0.1.2:51990 allowed-ips ::/0,0.0.0.0/0 persistent-keepalive 15"));
        assert!(
            cmds.iter()
                .any(|c| c.starts_with("ip -6 addr replace fe80::")
                    && c.contains("dev sn-peercccccccc nodad"))
        );
        assert!(
            cmds.iter()
                .any(|c| c == "ip link set dev sn-peercccccccc mtu 1420 up")
        );
        // The private key file is passed by path, never on the command line.
        let private = std::fs::read_to_string(dir.path().join("wg.key"))?;
        assert!(!cmds.iter().any(|c| c.contains(private.trim())));
        Ok(())
    }

    #[test]
    fn falls_back_to_userspace_wireguard_and_removes_stale_links()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let rec = Recorder::new();
        rec.answer("ip link show dev", Err("does not exist"));
        rec.answer("ip link add dev", Err("Unknown device type"));
        rec.answer(
            "ip -o link show",
            Ok("1: lo: <LOOPBACK>\n7: sn-gone: <POINTOPOINT>\n8: sn-peerbbbbbbbb: <POINTOPOINT>\n"),
        );
        let mut lx = backend(dir.path(), WgMode::Auto, &rec)?;
        let root = dir.path().join("root");
        let cfg = golden_config(&root);
        let _ = lx.converge(Some(&cfg));
        let cmds = rec.commands();
        assert!(
            cmds.iter().any(|c| c == "ip link del dev sn-gone"),
            "{cmds:#?}"
        );
        assert!(
            cmds.iter()
                .any(|c| c == "spawn boringtun-cli -f --disable-drop-privileges sn-peercccccccc"),
            "{cmds:#?}"
        );
        assert!(dir.path().join("run/wg-sn-peercccccccc.pid").exists());
        Ok(())
    }

    #[test]
    fn removes_what_it_set_when_the_config_changes_and_on_teardown()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let rec = Recorder::new();
        let mut lx = backend(dir.path(), WgMode::Kernel, &rec)?;
        let root = dir.path().join("root");
        let mut cfg = golden_config(&root);
        // Without babeld (no socket in a recorder) and with one extra address.
        cfg.actions.retain(|a| a != "restart:babeld");
        write_atomic(
            &root.join("etc/sidenet/addresses"),
            b"fd00:1::1/64 sidenet0\n10.200.3.1/32 sidenet0\nunreachable fd00::/48\n",
            0o644,
        )?;
        lx.converge(Some(&cfg))?;
        assert_eq!(lx.probe_plan().map(|p| p.targets.len()), Some(3));
        rec.clear();
        write_atomic(
            &root.join("etc/sidenet/addresses"),
            b"fd00:1::1/64 sidenet0\nunreachable fd00::/48\n",
            0o644,
        )?;
        lx.converge(Some(&cfg))?;
        let cmds = rec.commands();
        assert!(
            cmds.iter()
                .any(|c| c == "ip -4 addr del 10.200.3.1/32 dev sidenet0"),
            "{cmds:#?}"
        );
        assert!(!cmds.iter().any(|c| c.contains("addr del fd00:1::1/64")));
        rec.clear();
        lx.converge(None)?;
        let cmds = rec.commands();
        for want in [
            "ip -6 addr del fd00:1::1/64 dev sidenet0",
            "ip -6 route del unreachable fd00::/48",
            "ip link del sidenet0",
            "nft delete table inet sidenet",
        ] {
            assert!(cmds.iter().any(|c| c == want), "{want} missing: {cmds:#?}");
        }
        assert_eq!(lx.probe_plan(), None);
        Ok(())
    }

    #[test]
    fn changes_only_what_differs_on_existing_links() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let rec = Recorder::new();
        // Both links exist; b's is exactly as wanted, c's has a stale peer and port.
        rec.answer(
            "wg show sn-peerbbbbbbbb dump",
            Ok("(none)\t(none)\t51837\toff\nxTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\t(none)\t10.0.1.2:51990\t::/0,0.0.0.0/0\t0\t0\t0\t15\n"),
        );
        rec.answer(
            "wg show sn-peercccccccc dump",
            Ok("(none)\t(none)\t51000\toff\nOLDKEYOLDKEYOLDKEYOLDKEYOLDKEYOLDKEYOLDKEY0=\t(none)\t10.0.9.9:1\t::/0\t0\t0\t0\toff\n"),
        );
        let mut lx = backend(dir.path(), WgMode::Kernel, &rec)?;
        let mut cfg = golden_config(&dir.path().join("root"));
        cfg.actions
            .retain(|a| a != "restart:babeld" && a != "apply:shaping");
        lx.converge(Some(&cfg))?;
        let wg: Vec<String> = rec
            .commands()
            .into_iter()
            .filter(|c| c.starts_with("wg set") || c.starts_with("ip link add"))
            .collect();
        assert_eq!(
            wg,
            [
                "wg set sn-peercccccccc listen-port 52400",
                "wg set sn-peercccccccc peer OLDKEYOLDKEYOLDKEYOLDKEYOLDKEYOLDKEYOLDKEY0= remove",
                "wg set sn-peercccccccc peer TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0= endpoint [2001:db8:5::2]:52011 allowed-ips ::/0,0.0.0.0/0 persistent-keepalive 15",
            ]
        );
        Ok(())
    }

    #[test]
    fn refuses_unknown_actions() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let rec = Recorder::new();
        let mut lx = backend(dir.path(), WgMode::Kernel, &rec)?;
        let mut cfg = golden_config(&dir.path().join("root"));
        cfg.actions.push("reboot:now".into());
        assert!(lx.converge(Some(&cfg)).is_err());
        assert!(rec.commands().is_empty());
        Ok(())
    }
}
