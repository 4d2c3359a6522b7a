//! `sidenet-agent`: joins a mesh by name, verifies and applies its signed config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use sidenet_agent::backend::Kind as Backend;
use sidenet_agent::logs::Logger;
use sidenet_agent::shell::BrokerCa;

/// `--version`: the version and whether this build speaks mqtts:// (provisioning and the tests
/// read it).
#[cfg(feature = "tls")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (tls)");
#[cfg(not(feature = "tls"))]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (no tls)");
#[cfg(feature = "tls")]
const ABOUT: &str = "sidenet node agent (this build speaks mqtt:// and mqtts://)";
#[cfg(not(feature = "tls"))]
const ABOUT: &str =
    "sidenet node agent (this build speaks mqtt:// only: mqtts:// needs the cargo feature `tls`)";

use sidenet_agent::backend::{DataplaneArgs, WgMode};
use sidenet_agent::cli::{Opt, Parsed, UsageError};

/// The agent's options, in the order `--help` lists them (`sidenet_agent::cli`).
static OPTS: &[Opt] = &[
    Opt::value("mesh", "MESH", "The mesh to join (its network name). Required, here, in --config or as part of --join.")
        .env("SIDENET_MESH"),
    Opt::value("join", "CODE", "The mesh's join code, MESH~FINGERPRINT (`sidenetctl join-code --mesh MESH` prints it): only the mesh key with this fingerprint is trusted. Or joinCode in --config.")
        .env("SIDENET_JOIN"),
    Opt::flag("trust-first-key", "Without a join code or a pinned key, trust whichever mesh key announces itself first. Unsafe on a broker others can publish to: anyone can announce first.")
        .env("SIDENET_TRUST_FIRST_KEY"),
    Opt::value("broker", "BROKER", "MQTT broker URL [default: mqtt://127.0.0.1:1883]. mqtts://HOST[:PORT] (default port 8883) is MQTT over TLS and needs --ca, and an agent built with the cargo feature `tls`.")
        .env("SIDENET_BROKER"),
    Opt::value("ca", "FILE", "CA bundle (PEM) for an mqtts:// broker. The agent trusts only these certificates (no system roots): the broker's certificate must be signed by one of them and name the broker's host or IP address as written in --broker. Or brokerCa in --config.")
        .env("SIDENET_BROKER_CA"),
    Opt::value("mesh-key", "MESH_KEY", "The mesh public key (base64) to pin.").env("SIDENET_MESH_KEY"),
    Opt::value("backend", "BACKEND", "How configs are applied: files (write the rendered files under --root and nothing else), linux (a Debian-like host: addresses, WireGuard, babeld and nftables; needs root), openwrt (sidenet's own sidenet_* sections of the router's UCI config, through `uci`).")
        .choices(&["files", "linux", "openwrt"])
        .default("files")
        .env("SIDENET_BACKEND"),
    Opt::value("root", "ROOT", "Root folder the backend writes under [default: /].").env("SIDENET_ROOT"),
    Opt::value("state", "STATE", "State folder (node key, pinned mesh key, journal). Default: ROOT/etc/sidenet-agent.")
        .env("SIDENET_AGENT_STATE"),
    Opt::value("hostname", "HOSTNAME", "Hostname to report at enrolment (default: this machine's).")
        .env("SIDENET_HOSTNAME"),
    Opt::value("board", "BOARD", "Board name to report (OpenWrt board_name), used to pick the hardware profile.")
        .env("SIDENET_BOARD"),
    Opt::value("profile", "PROFILE", "Hardware profile to ask for.").env("SIDENET_PROFILE"),
    Opt::value("token", "TOKEN", "Single-use enrolment token (meshes in token mode).").env("SIDENET_TOKEN"),
    Opt::value("config", "CONFIG", "Bootstrap config (JSON, as `sidenetctl provision` writes it): mesh, broker, brokerCa (PEM text), meshKey, joinCode, root, state, hostname, board, profile, token. Options given on the command line or in the environment take precedence.")
        .env("SIDENET_CONFIG"),
    Opt::flag("show-id", "Print the node id and public key as JSON and exit (creates the node key if there is none yet)."),
    Opt::flag("uninstall", "Remove sidenet from this device and exit: finish or roll back an interrupted apply, undo everything the backend set up (openwrt: delete every sidenet_* uci section and put each /etc/config file sidenet changed back byte for byte, then reload what changed), delete the files of the applied config and the agent's state folder (node key included). Stop the agent's service first. The agent binary, its service and its --config file are left to whoever installed them (`sidenetctl provision`).")
        .conflicts(&["show-id"]),
    Opt::value("shape", "FILE", "Apply the shaping table FILE (the format of etc/sidenet/shaping, docs/policies.md) to this host's sn-* links and keep switching its windows from the clock until killed; nothing else (no broker, no config). What the linux backend does with the table, for measuring it (tests/netns/shaping). The environment variable SIDENET_TEST_CLOCK_OFFSET (seconds, tests only) shifts the clock the table reads, in this mode and in the linux backend.")
        .conflicts(&["show-id", "uninstall"]),
    Opt::value("max-config-bytes", "MAX_CONFIG_BYTES", "Largest config accepted, in bytes.")
        .default(DEFAULT_MAX),
    Opt::value("status-interval", "STATUS_INTERVAL", "Seconds between status reports.").default("60"),
    Opt::flag("log-json", "Log as JSON lines.").env("SIDENET_LOG_JSON"),
    Opt::value("underlay", "UNDERLAY", "Interfaces that carry the side-net underneath WireGuard (the mesh radio, wired links). Their addresses are reported as WireGuard endpoints. Repeat for several.")
        .list()
        .default("mesh0")
        .env("SIDENET_UNDERLAY"),
    Opt::value("wg-mode", "WG_MODE", "How WireGuard interfaces are created: auto (kernel WireGuard if the module is there, else the userspace implementation), kernel (kernel WireGuard only), userspace (the userspace implementation only, --wg-userspace).")
        .choices(&["auto", "kernel", "userspace"])
        .default("auto")
        .env("SIDENET_WG_MODE"),
    Opt::value("wg-userspace", "WG_USERSPACE", "Userspace WireGuard implementation (used where the kernel has no WireGuard).")
        .default("boringtun-cli")
        .env("SIDENET_WG_USERSPACE"),
    Opt::value("health-deadline", "HEALTH_DEADLINE", "Seconds a new config has to pass its health check (the controller acknowledges it, babel neighbours are back) before it is rolled back.")
        .default("60")
        .env("SIDENET_HEALTH_DEADLINE"),
    Opt::value("probe-interval", "PROBE_INTERVAL", "Seconds between pathfinder probes to each neighbour and gateway.")
        .default("5")
        .env("SIDENET_PROBE_INTERVAL"),
    Opt::value("uci", "UCI", "OpenWrt's `uci` command (the `openwrt` backend changes the router's config only through it, with `-c ROOT/etc/config`).")
        .default("uci")
        .env("SIDENET_UCI"),
    Opt::value("beacon-interval", "BEACON_INTERVAL", "Seconds between discovery beacons on each underlay interface (neighbours over the air).")
        .default("2")
        .env("SIDENET_BEACON_INTERVAL"),
    Opt::value("beacon-hold", "BEACON_HOLD", "Seconds after its last beacon a neighbour heard over the air is no longer reported.")
        .default("8")
        .env("SIDENET_BEACON_HOLD"),
];

/// `--max-config-bytes`'s default, as text for the table (checked against the shell's
/// constant by a test).
const DEFAULT_MAX: &str = "262144";

#[derive(Debug)]
struct Args {
    mesh: Option<String>,
    join: Option<String>,
    trust_first_key: bool,
    broker: Option<String>,
    ca: Option<PathBuf>,
    mesh_key: Option<String>,
    backend: Backend,
    root: Option<PathBuf>,
    state: Option<PathBuf>,
    hostname: Option<String>,
    board: Option<String>,
    profile: Option<String>,
    token: Option<String>,
    config: Option<PathBuf>,
    show_id: bool,
    uninstall: bool,
    shape: Option<PathBuf>,
    max_config_bytes: usize,
    status_interval: u64,
    log_json: bool,
    dataplane: DataplaneArgs,
}

/// What the command line asks for: run with these arguments, or exit with this code.
fn parse_args() -> Result<Args, ExitCode> {
    let parsed =
        sidenet_agent::cli::parse(OPTS, std::env::args_os().skip(1), |k| std::env::var_os(k));
    let m = match parsed {
        Ok(Parsed::Run(m)) => m,
        Ok(Parsed::Help) => {
            print!("{}", sidenet_agent::cli::help("sidenet-agent", ABOUT, OPTS));
            return Err(ExitCode::SUCCESS);
        }
        Ok(Parsed::Version) => {
            println!("sidenet-agent {VERSION}");
            return Err(ExitCode::SUCCESS);
        }
        Err(e) => return Err(usage(&e)),
    };
    from_matches(&m).map_err(|e| usage(&e))
}

/// The agent's arguments from what the command line and the environment gave.
fn from_matches(m: &sidenet_agent::cli::Matches) -> Result<Args, UsageError> {
    let text = |k: &str| m.get(k).map(str::to_string);
    let path = |k: &str| m.get(k).map(PathBuf::from);
    let num = |k: &str| -> Result<u64, UsageError> { Ok(m.number(k)?.unwrap_or_default()) };
    Ok(Args {
        mesh: text("mesh"),
        join: text("join"),
        trust_first_key: m.flag("trust-first-key"),
        broker: text("broker"),
        ca: path("ca"),
        mesh_key: text("mesh-key"),
        backend: match m.get("backend") {
            Some("linux") => Backend::Linux,
            Some("openwrt") => Backend::Openwrt,
            _ => Backend::Files,
        },
        root: path("root"),
        state: path("state"),
        hostname: text("hostname"),
        board: text("board"),
        profile: text("profile"),
        token: text("token"),
        config: path("config"),
        show_id: m.flag("show-id"),
        uninstall: m.flag("uninstall"),
        shape: path("shape"),
        max_config_bytes: m.number("max-config-bytes")?.unwrap_or_default(),
        status_interval: num("status-interval")?,
        log_json: m.flag("log-json"),
        dataplane: DataplaneArgs {
            underlay: m.list("underlay"),
            wg_mode: match m.get("wg-mode") {
                Some("kernel") => WgMode::Kernel,
                Some("userspace") => WgMode::Userspace,
                _ => WgMode::Auto,
            },
            wg_userspace: text("wg-userspace").unwrap_or_default(),
            health_deadline: num("health-deadline")?,
            probe_interval: num("probe-interval")?,
            uci: text("uci").unwrap_or_default(),
            beacon_interval: num("beacon-interval")?,
            beacon_hold: num("beacon-hold")?,
        },
    })
}

/// Prints a usage error; exit code 2.
fn usage(e: &UsageError) -> ExitCode {
    eprintln!("sidenet-agent: {e}\nFor more information, try '--help'.");
    ExitCode::from(2)
}

/// The bootstrap config file (`--config`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Bootstrap {
    mesh: Option<String>,
    broker: Option<String>,
    /// PEM text of the CA bundle for an mqtts:// broker.
    broker_ca: Option<String>,
    mesh_key: Option<String>,
    join_code: Option<String>,
    root: Option<PathBuf>,
    state: Option<PathBuf>,
    hostname: Option<String>,
    board: Option<String>,
    profile: Option<String>,
    token: Option<String>,
}

impl Args {
    /// Fills the options not given from the bootstrap config (read from `path`); returns the
    /// CA bundle of the config, unless `--ca` was given.
    fn merge(&mut self, b: Bootstrap, path: &std::path::Path) -> Option<BrokerCa> {
        fn fill<T>(slot: &mut Option<T>, v: Option<T>) {
            if slot.is_none() {
                *slot = v;
            }
        }
        fill(&mut self.mesh, b.mesh);
        fill(&mut self.broker, b.broker);
        fill(&mut self.mesh_key, b.mesh_key);
        fill(&mut self.join, b.join_code);
        fill(&mut self.root, b.root);
        fill(&mut self.state, b.state);
        fill(&mut self.hostname, b.hostname);
        fill(&mut self.board, b.board);
        fill(&mut self.profile, b.profile);
        fill(&mut self.token, b.token);
        b.broker_ca
            .filter(|_| self.ca.is_none())
            .map(|pem| BrokerCa {
                origin: format!("brokerCa in --config {}", path.display()),
                pem: pem.into_bytes(),
            })
    }
}

/// `--ca FILE`, read.
fn read_ca(path: &std::path::Path) -> Result<BrokerCa, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("--ca {}: cannot read: {e}", path.display()))?;
    Ok(BrokerCa {
        origin: format!("--ca {}", path.display()),
        pem,
    })
}

fn read_bootstrap(path: &std::path::Path) -> Result<Bootstrap, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))
}

/// `--show-id`: the node id and public key, as JSON on one line.
fn show_id(state: &std::path::Path) -> Result<(), String> {
    let st = sidenet_agent::state::State::open(state).map_err(|e| e.to_string())?;
    let key = st.node_key().map_err(|e| e.to_string())?;
    let line = serde_json::json!({
        "node": key.public().node_id(),
        "publicKey": key.public().to_base64(),
    });
    println!("{line}");
    Ok(())
}

/// `--shape` (see its option): applies the table, then checks the clock five times a second and
/// prints each switch (`windows open: ...` with the local minute) until killed.
fn shape(path: &std::path::Path) -> Result<(), String> {
    use sidenet_agent::backend::{Runner, SystemRunner};
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut r = SystemRunner::default();
    let links = r.run(&["ip", "-o", "link", "show"])?;
    let ifaces: Vec<String> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("sn-"))
        .collect();
    let now = sidenet_agent::shaping::now;
    let mut s = sidenet_agent::shaping::Shaper::apply(&mut r, &text, &ifaces, now())?;
    // With the real time (not the shifted one) at which the rates were in place, for measuring.
    let show = |s: &sidenet_agent::shaping::Shaper| {
        let w = s.windows();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        println!(
            "leaf {} links {} applied at {at:.3} windows open: {}",
            s.leaf(),
            ifaces.join(","),
            if w.is_empty() {
                "none".to_string()
            } else {
                w.join(",")
            }
        );
    };
    show(&s);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if s.tick(&mut r, now()) {
            show(&s);
        }
    }
}

/// `--uninstall` (see its flag).
fn uninstall(
    kind: Backend,
    dataplane: &sidenet_agent::backend::DataplaneArgs,
    root: &std::path::Path,
    state: &std::path::Path,
) -> Result<(), String> {
    use sidenet_agent::files::{Applier, Recovery};
    if state.exists() && !state.join("node.key").exists() {
        return Err(format!(
            "{} holds no node.key: not an agent state folder, nothing removed (check --state/--root)",
            state.display()
        ));
    }
    let applier = Applier::new(root, state);
    match applier.recover().map_err(|e| e.to_string())? {
        Recovery::Clean => {}
        Recovery::RolledForward(r) => {
            println!("finished the confirmed apply of revision {}", r.rev)
        }
        Recovery::RolledBack(r, _) => {
            println!("rolled back the unfinished apply of revision {}", r.rev)
        }
    }
    let mut backend = sidenet_agent::backends::open(
        kind,
        dataplane,
        root,
        state,
        Box::new(sidenet_agent::backend::SystemRunner::default()),
    )
    .map_err(|e| e.to_string())?;
    for note in backend.uninstall().map_err(|e| e.to_string())? {
        println!("{note}");
    }
    for p in applier.remove_installed().map_err(|e| e.to_string())? {
        println!("removed {}", p.display());
    }
    if state.exists() {
        std::fs::remove_dir_all(state)
            .map_err(|e| format!("cannot remove {}: {e}", state.display()))?;
        println!(
            "removed {} (node key, journal, pristine copies)",
            state.display()
        );
    }
    println!("sidenet removed ({} backend)", kind.as_str());
    Ok(())
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "node".into())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

fn main() -> ExitCode {
    let mut args = match parse_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let mut broker_ca = None;
    if let Some(path) = args.config.clone() {
        match read_bootstrap(&path) {
            Ok(b) => broker_ca = args.merge(b, &path),
            Err(e) => {
                eprintln!("sidenet-agent: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| root.join("etc/sidenet-agent"));
    if args.show_id {
        return match show_id(&state) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sidenet-agent: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.uninstall {
        return match uninstall(args.backend, &args.dataplane, &root, &state) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sidenet-agent: --uninstall: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(path) = &args.shape {
        return match shape(path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sidenet-agent: --shape: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(path) = &args.ca {
        match read_ca(path) {
            Ok(ca) => broker_ca = Some(ca),
            Err(e) => {
                eprintln!("sidenet-agent: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let join = match args
        .join
        .as_deref()
        .map(sidenet_wire::join::JoinCode::parse)
    {
        None => None,
        Some(Ok(code)) => Some(code),
        Some(Err(e)) => {
            eprintln!("sidenet-agent: --join (or joinCode in --config): {e}");
            return ExitCode::from(2);
        }
    };
    let Some(mesh) = args
        .mesh
        .clone()
        .or_else(|| join.as_ref().map(|c| c.mesh().to_string()))
    else {
        eprintln!(
            "sidenet-agent: no mesh given: pass --join CODE or --mesh NAME (or joinCode or mesh in --config)"
        );
        return ExitCode::from(2);
    };
    let level = Logger::level_from(&std::env::var("RUST_LOG").unwrap_or_default());
    // Only fails when a subscriber is already set, which nothing else in this program does.
    let _ = tracing::subscriber::set_global_default(Logger::new(level, args.log_json));
    let opts = sidenet_agent::shell::Options {
        mesh,
        broker: args
            .broker
            .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into()),
        broker_ca,
        mesh_key: args.mesh_key,
        join,
        trust_first_key: args.trust_first_key,
        root,
        state,
        backend: args.backend,
        dataplane: args.dataplane,
        hostname: args.hostname.unwrap_or_else(system_hostname),
        board: args.board,
        profile: args.profile,
        token: args.token,
        max_envelope: args.max_config_bytes,
        status_every: args.status_interval.max(1),
        max_backoff: Duration::from_secs(30),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidenet-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(sidenet_agent::shell::run(opts, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidenet-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        match sidenet_agent::cli::parse(OPTS, args.iter().map(Into::into), |_| None) {
            Ok(Parsed::Run(m)) => from_matches(&m).map_err(|e| e.0),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.0),
        }
    }

    #[test]
    fn the_tables_defaults_are_the_libraries() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.max_config_bytes, sidenet_agent::shell::DEFAULT_MAX);
        let d = DataplaneArgs::default();
        assert_eq!(a.dataplane.underlay, d.underlay);
        assert_eq!(a.dataplane.wg_userspace, d.wg_userspace);
        assert_eq!(a.dataplane.health_deadline, d.health_deadline);
        assert_eq!(a.dataplane.probe_interval, d.probe_interval);
        assert_eq!(a.dataplane.uci, d.uci);
        assert_eq!(a.dataplane.beacon_interval, d.beacon_interval);
        assert_eq!(a.dataplane.beacon_hold, d.beacon_hold);
    }

    #[test]
    fn options_reach_the_arguments() {
        let a = parse(&[
            "--join",
            "riverside~abc",
            "--backend",
            "openwrt",
            "--wg-mode=userspace",
            "--underlay",
            "wan,lan",
            "--status-interval",
            "7",
            "--trust-first-key",
        ])
        .unwrap();
        assert_eq!(a.join.as_deref(), Some("riverside~abc"));
        assert_eq!(a.backend, Backend::Openwrt);
        assert_eq!(a.dataplane.wg_mode, WgMode::Userspace);
        assert_eq!(a.dataplane.underlay, vec!["wan", "lan"]);
        assert_eq!(a.status_interval, 7);
        assert!(a.trust_first_key && !a.show_id && !a.uninstall);
        assert_eq!(
            parse(&["--beacon-hold", "-1"]).unwrap_err(),
            "invalid value '-1' for --beacon-hold: invalid digit found in string"
        );
    }

    #[test]
    fn every_option_is_unique_and_documented() {
        let mut seen = std::collections::BTreeSet::new();
        for o in OPTS {
            assert!(seen.insert(o.long), "--{} twice", o.long);
            assert!(!o.help.is_empty(), "--{} has no help", o.long);
            for c in o.conflicts {
                assert!(
                    OPTS.iter().any(|x| x.long == *c),
                    "--{} conflicts with unknown --{c}",
                    o.long
                );
            }
        }
        let help = sidenet_agent::cli::help("sidenet-agent", ABOUT, OPTS);
        assert!(
            help.contains("      --uninstall\n"),
            "provisioning greps --help for --uninstall"
        );
    }
}
