//! Backends: what applying a config means on a given kind of system.
//!
//! Every backend shares the journal in [`crate::files`] (files are staged, backed up, installed,
//! and confirmed or rolled back). A backend then *converges* the running system to the installed
//! files: [`Backend::converge`] is idempotent and runs every action of the config, so the same
//! call brings the system in line after an apply, after a rollback (with the last good config)
//! and after a reboot or `kill -9` (at start).
//!
//! - `files`: writes the files and nothing else (demos, simulation, benchmarks). No trial.
//! - `linux` ([`crate::linux`]): addresses, WireGuard, babeld, nftables on a Debian-like host.
//! - `openwrt` ([`crate::openwrt`]): UCI files and OpenWrt's reload commands.
//!
//! System commands go through a [`Runner`], so the backends are tested against a command recorder
//! ([`Recorder`]) as well as for real (the network-namespace testbed).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sidenet_wire::messages::NodeConfig;

use crate::probe::ProbePlan;

/// Which backend applies configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Write the rendered files under --root and nothing else.
    Files,
    /// A Debian-like host: addresses, WireGuard, babeld and nftables (needs root).
    Linux,
    /// OpenWrt: sidenet's own sidenet_* sections of the router's UCI config (through `uci`).
    Openwrt,
}

impl Kind {
    /// As reported at enrolment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Files => "files",
            Self::Linux => "linux",
            Self::Openwrt => "openwrt",
        }
    }
}

/// How WireGuard interfaces are created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgMode {
    /// Kernel WireGuard if the module is there, else the userspace implementation.
    Auto,
    /// Kernel WireGuard only.
    Kernel,
    /// The userspace implementation only (--wg-userspace).
    Userspace,
}

/// Data-plane options of the `linux` and `openwrt` backends (flattened into the agent's flags).
#[derive(Debug, Clone)]
pub struct DataplaneArgs {
    /// Interfaces that carry the side-net underneath WireGuard (the mesh radio, wired links).
    /// Their addresses are reported as WireGuard endpoints. Repeat for several.
    pub underlay: Vec<String>,
    /// How WireGuard interfaces are created.
    pub wg_mode: WgMode,
    /// Userspace WireGuard implementation (used where the kernel has no WireGuard).
    pub wg_userspace: String,
    /// Seconds a new config has to pass its health check (the controller acknowledges it, babel
    /// neighbours are back) before it is rolled back.
    pub health_deadline: u64,
    /// Seconds between pathfinder probes to each neighbour and gateway.
    pub probe_interval: u64,
    /// OpenWrt's `uci` command (the `openwrt` backend changes the router's config only through
    /// it, with `-c ROOT/etc/config`).
    pub uci: String,
    /// Seconds between discovery beacons on each underlay interface (neighbours over the air,
    /// `crate::discovery`).
    pub beacon_interval: u64,
    /// Seconds after its last beacon a neighbour heard over the air is no longer reported.
    pub beacon_hold: u64,
}

impl Default for DataplaneArgs {
    fn default() -> Self {
        Self {
            underlay: vec!["mesh0".into()],
            wg_mode: WgMode::Auto,
            wg_userspace: "boringtun-cli".into(),
            health_deadline: 60,
            probe_interval: 5,
            uci: "uci".into(),
            beacon_interval: 2,
            beacon_hold: 8,
        }
    }
}

/// A backend failed to converge.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

pub use crate::core::Observation;

/// Applies configs to one kind of system.
pub trait Backend: Send {
    /// As reported at enrolment.
    fn kind(&self) -> Kind;
    /// Whether a new config must pass a health check before it is confirmed.
    fn needs_trial(&self) -> bool;
    /// Adjusts a verified config before it is staged: fills in what only the node knows (the
    /// OpenWrt backend writes its WireGuard private key into /etc/config/network).
    fn prepare(&self, _config: &mut NodeConfig) -> Result<(), BackendError> {
        Ok(())
    }
    /// Converges the running system to `config`, whose files are installed under the root;
    /// `None` removes everything the backend set up.
    fn converge(&mut self, config: Option<&NodeConfig>) -> Result<(), BackendError>;
    /// `--uninstall`: removes everything the backend set up and gives back what it changed;
    /// one line per thing done, for the operator.
    fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        self.converge(None).map(|()| Vec::new())
    }
    /// Looks at the running data plane.
    fn observe(&mut self) -> Observation;
    /// The probe targets of the converged config.
    fn probe_plan(&self) -> Option<ProbePlan> {
        None
    }
}

/// The `files` backend: the journal writes the files; there is nothing else to do.
#[derive(Debug, Default)]
pub struct FilesBackend;

impl Backend for FilesBackend {
    fn kind(&self) -> Kind {
        Kind::Files
    }
    fn needs_trial(&self) -> bool {
        false
    }
    fn converge(&mut self, _config: Option<&NodeConfig>) -> Result<(), BackendError> {
        Ok(())
    }
    fn observe(&mut self) -> Observation {
        Observation::default()
    }
}

/// Runs system commands. The real one runs them; [`Recorder`] records them for tests.
pub trait Runner: Send {
    /// Runs `argv` to completion; its standard output, or why it failed (with its stderr).
    fn run(&mut self, argv: &[&str]) -> Result<String, String>;
    /// Starts `argv` in the background (its own process group, output to `log`); its pid.
    fn spawn(&mut self, argv: &[&str], log: &Path) -> Result<u32, String>;
    /// Whether process `pid` runs and its command line mentions `name`.
    fn alive(&mut self, pid: u32, name: &str) -> bool;
    /// Stops process `pid` (SIGTERM, then SIGKILL after `grace`) and waits for it.
    fn stop(&mut self, pid: u32, grace: Duration) -> Result<(), String>;
}

/// Longest a system command may run before it is killed and counted as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs commands for real.
#[derive(Debug, Default)]
pub struct SystemRunner {
    children: Vec<Child>,
}

impl SystemRunner {
    fn reap(&mut self) {
        self.children
            .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }
}

fn proc_alive(pid: u32, name: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 3, after the parenthesised command name: the state (Z = zombie).
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("");
    if state == "Z" || state == "X" {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(name))
        .unwrap_or(false)
}

impl Runner for SystemRunner {
    fn run(&mut self, argv: &[&str]) -> Result<String, String> {
        let (prog, args) = argv.split_first().ok_or("empty command")?;
        let mut child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
        // Read both pipes on their own threads so a chatty command cannot block on a full pipe.
        let mut so = child.stdout.take();
        let mut se = child.stderr.take();
        let out_t = std::thread::spawn(move || {
            let mut b = Vec::new();
            if let Some(s) = so.as_mut() {
                let _ = s.read_to_end(&mut b);
            }
            b
        });
        let err_t = std::thread::spawn(move || {
            let mut b = Vec::new();
            if let Some(s) = se.as_mut() {
                let _ = s.read_to_end(&mut b);
            }
            b
        });
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) | Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "`{}` did not finish within {COMMAND_TIMEOUT:?}",
                        argv.join(" ")
                    ));
                }
            }
        };
        let out = std::process::Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        };
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`{}` failed ({}): {}",
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn spawn(&mut self, argv: &[&str], log: &Path) -> Result<u32, String> {
        use std::os::unix::process::CommandExt as _;
        self.reap();
        let (prog, args) = argv.split_first().ok_or("empty command")?;
        let out = std::fs::File::create(log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", argv.join(" ")))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    fn alive(&mut self, pid: u32, name: &str) -> bool {
        self.reap();
        // A child of ours may not have exec'd its program yet (its command line is still
        // ours): it is alive until it exits.
        if self.children.iter().any(|c| c.id() == pid) {
            return true;
        }
        proc_alive(pid, name)
    }

    fn stop(&mut self, pid: u32, grace: Duration) -> Result<(), String> {
        let gone = |me: &mut Self| {
            me.reap();
            !Path::new(&format!("/proc/{pid}")).exists() || !proc_alive(pid, "")
        };
        if gone(self) {
            return Ok(());
        }
        let _ = self.run(&["kill", "-TERM", &pid.to_string()]);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if gone(self) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.run(&["kill", "-KILL", &pid.to_string()]);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if gone(self) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("process {pid} does not stop"))
    }
}

/// A command recorder for tests: remembers every command, answers from canned outputs.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderState>>,
}

#[derive(Debug, Default)]
struct RecorderState {
    commands: Vec<String>,
    outputs: BTreeMap<String, Result<String, String>>,
    next_pid: u32,
    alive: BTreeMap<u32, String>,
    /// Programs run for real (still recorded).
    real: Vec<String>,
}

impl Recorder {
    /// A recorder that answers every command with empty output.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers commands starting with `prefix` with `output`.
    pub fn answer(&self, prefix: &str, output: Result<&str, &str>) {
        self.lock().outputs.insert(
            prefix.to_string(),
            output.map(str::to_string).map_err(str::to_string),
        );
    }

    /// The commands run so far, one string each (arguments joined by spaces).
    pub fn commands(&self) -> Vec<String> {
        self.lock().commands.clone()
    }

    /// Forgets the commands recorded so far.
    pub fn clear(&self) {
        self.lock().commands.clear();
    }

    /// Runs commands of `program` (as given in argv\[0\]) for real from now on, recording them
    /// too, unless an [`Recorder::answer`] matches: tests run OpenWrt's real `uci` while
    /// recording the reloads.
    pub fn run_for_real(&self, program: &str) {
        self.lock().real.push(program.to_string());
    }
}

impl Runner for Recorder {
    fn run(&mut self, argv: &[&str]) -> Result<String, String> {
        let line = argv.join(" ");
        let mut st = self.lock();
        st.commands.push(line.clone());
        let best = st
            .outputs
            .iter()
            .filter(|(p, _)| line.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, o)| o.clone());
        if best.is_none() && argv.first().is_some_and(|p| st.real.iter().any(|r| r == p)) {
            drop(st);
            return SystemRunner::default().run(argv);
        }
        best.unwrap_or_else(|| Ok(String::new()))
    }

    fn spawn(&mut self, argv: &[&str], _log: &Path) -> Result<u32, String> {
        let line = argv.join(" ");
        let mut st = self.lock();
        st.commands.push(format!("spawn {line}"));
        st.next_pid += 1;
        let pid = 1_000_000 + st.next_pid;
        st.alive.insert(pid, line);
        Ok(pid)
    }

    fn alive(&mut self, pid: u32, name: &str) -> bool {
        self.lock()
            .alive
            .get(&pid)
            .is_some_and(|l| l.contains(name))
    }

    fn stop(&mut self, pid: u32, _grace: Duration) -> Result<(), String> {
        let mut st = self.lock();
        st.commands.push(format!("stop {pid}"));
        st.alive.remove(&pid);
        Ok(())
    }
}

/// Reads a pid file.
pub fn read_pid(path: &Path) -> Option<u32> {
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    s.trim().parse().ok()
}

/// Polls `f` every 20 ms until it holds or `timeout` passes.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The global addresses of `iface` in CIDR form, from `ip addr show dev IFACE` (the text format
/// both iproute2 and BusyBox print).
pub fn parse_ip_addr(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let fam = w.next()?;
            if fam != "inet" && fam != "inet6" {
                return None;
            }
            let cidr = w.next()?;
            let rest: Vec<&str> = w.collect();
            let scope = rest
                .windows(2)
                .find(|p| p[0] == "scope")
                .map(|p| p[1])
                .unwrap_or("global");
            (scope == "global" && cidr.contains('/')).then(|| cidr.to_string())
        })
        .collect()
}

/// The underlay endpoints of `ifaces`: their global addresses.
pub fn underlay_endpoints(runner: &mut dyn Runner, ifaces: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for i in ifaces {
        if let Ok(text) = runner.run(&["ip", "addr", "show", "dev", i]) {
            out.extend(parse_ip_addr(&text));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_addr_output() {
        let text = "3: ab@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP
    link/ether 2a:1b:3c:4d:5e:6f brd ff:ff:ff:ff:ff:ff link-netns x
    inet 10.0.1.1/24 scope global ab
       valid_lft forever preferred_lft forever
    inet6 2001:db8:5::1/64 scope global
       valid_lft forever preferred_lft forever
    inet6 fe80::281b:3cff:fe4d:5e6f/64 scope link
       valid_lft forever preferred_lft forever
    inet 127.0.0.1/8 scope host lo
";
        assert_eq!(parse_ip_addr(text), ["10.0.1.1/24", "2001:db8:5::1/64"]);
    }

    #[test]
    fn recorder_answers_by_longest_prefix() {
        let mut r = Recorder::new();
        r.answer("wg show", Ok("a"));
        r.answer("wg show sn-x peers", Ok("b"));
        assert_eq!(r.run(&["wg", "show", "sn-x", "peers"]), Ok("b".into()));
        assert_eq!(r.run(&["wg", "show", "all"]), Ok("a".into()));
        assert_eq!(r.run(&["ip", "link"]), Ok(String::new()));
        let pid = r.spawn(&["babeld", "-c", "x"], Path::new("/dev/null"));
        let pid = pid.unwrap_or(0);
        assert!(r.alive(pid, "babeld"));
        assert!(!r.alive(pid, "boringtun"));
        assert_eq!(r.stop(pid, Duration::ZERO), Ok(()));
        assert!(!r.alive(pid, "babeld"));
        assert_eq!(r.commands().len(), 5);
    }
}
