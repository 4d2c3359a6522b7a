//! `sidenet-agent`: joins a mesh by name, verifies and applies its signed config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sidenet_agent::backend::Kind as Backend;
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

#[derive(Debug, Parser)]
#[command(name = "sidenet-agent", version = VERSION, about = ABOUT)]
struct Args {
    /// The mesh to join (its network name). Required, here, in --config or as part of --join.
    #[arg(long, env = "SIDENET_MESH")]
    mesh: Option<String>,
    /// The mesh's join code, MESH~FINGERPRINT (`sidenetctl join-code --mesh MESH` prints it):
    /// only the mesh key with this fingerprint is trusted. Or joinCode in --config.
    #[arg(long = "join", env = "SIDENET_JOIN", value_name = "CODE")]
    join: Option<String>,
    /// Without a join code or a pinned key, trust whichever mesh key announces itself first.
    /// Unsafe on a broker others can publish to: anyone can announce first.
    #[arg(long, env = "SIDENET_TRUST_FIRST_KEY")]
    trust_first_key: bool,
    /// MQTT broker URL [default: mqtt://127.0.0.1:1883]. mqtts://HOST[:PORT] (default port
    /// 8883) is MQTT over TLS and needs --ca, and an agent built with the cargo feature `tls`.
    #[arg(long, env = "SIDENET_BROKER")]
    broker: Option<String>,
    /// CA bundle (PEM) for an mqtts:// broker. The agent trusts only these certificates (no
    /// system roots): the broker's certificate must be signed by one of them and name the
    /// broker's host or IP address as written in --broker. Or brokerCa in --config.
    #[arg(long, env = "SIDENET_BROKER_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The mesh public key (base64) to pin.
    #[arg(long, env = "SIDENET_MESH_KEY")]
    mesh_key: Option<String>,
    /// How configs are applied.
    #[arg(long, value_enum, default_value = "files", env = "SIDENET_BACKEND")]
    backend: Backend,
    /// Root folder the backend writes under [default: /].
    #[arg(long, env = "SIDENET_ROOT")]
    root: Option<PathBuf>,
    /// State folder (node key, pinned mesh key, journal). Default: ROOT/etc/sidenet-agent.
    #[arg(long, env = "SIDENET_AGENT_STATE")]
    state: Option<PathBuf>,
    /// Hostname to report at enrolment (default: this machine's).
    #[arg(long, env = "SIDENET_HOSTNAME")]
    hostname: Option<String>,
    /// Board name to report (OpenWrt board_name), used to pick the hardware profile.
    #[arg(long, env = "SIDENET_BOARD")]
    board: Option<String>,
    /// Hardware profile to ask for.
    #[arg(long, env = "SIDENET_PROFILE")]
    profile: Option<String>,
    /// Single-use enrolment token (meshes in token mode).
    #[arg(long, env = "SIDENET_TOKEN")]
    token: Option<String>,
    /// Bootstrap config (JSON, as `sidenetctl provision` writes it): mesh, broker, brokerCa
    /// (PEM text), meshKey, joinCode, root, state, hostname, board, profile, token. Options
    /// given on the command line or in the environment take precedence.
    #[arg(long, env = "SIDENET_CONFIG")]
    config: Option<PathBuf>,
    /// Print the node id and public key as JSON and exit (creates the node key if there is
    /// none yet).
    #[arg(long)]
    show_id: bool,
    /// Remove sidenet from this device and exit: finish or roll back an interrupted apply,
    /// undo everything the backend set up (openwrt: delete every sidenet_* uci section and put
    /// each /etc/config file sidenet changed back byte for byte, then reload what changed),
    /// delete the files of the applied config and the agent's state folder (node key
    /// included). Stop the agent's service first. The agent binary, its service and its
    /// --config file are left to whoever installed them (`sidenetctl provision`).
    #[arg(long, conflicts_with = "show_id")]
    uninstall: bool,
    /// Largest config accepted, in bytes.
    #[arg(long, default_value_t = sidenet_agent::shell::DEFAULT_MAX)]
    max_config_bytes: usize,
    /// Seconds between status reports.
    #[arg(long, default_value_t = 60)]
    status_interval: u64,
    /// Log as JSON lines.
    #[arg(long, env = "SIDENET_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    dataplane: sidenet_agent::backend::DataplaneArgs,
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
    let mut args = Args::parse();
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
    // A level, not a filter expression: the regex engine behind filters would double the size of
    // a binary meant for 16 MB of flash.
    let level = match std::env::var("RUST_LOG").unwrap_or_default().as_str() {
        "trace" => tracing::Level::TRACE,
        "debug" => tracing::Level::DEBUG,
        "warn" => tracing::Level::WARN,
        "error" => tracing::Level::ERROR,
        _ => tracing::Level::INFO,
    };
    let b = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr);
    if args.log_json {
        b.json().init();
    } else {
        b.init();
    }
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
