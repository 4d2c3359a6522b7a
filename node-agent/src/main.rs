//! `sidenet-agent`: joins a mesh by name, verifies and applies its signed config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    /// Write the rendered files under --root and nothing else.
    Files,
}

#[derive(Debug, Parser)]
#[command(name = "sidenet-agent", version, about = "sidenet node agent")]
struct Args {
    /// The mesh to join (its network name).
    #[arg(long, env = "SIDENET_MESH")]
    mesh: String,
    /// MQTT broker URL.
    #[arg(long, env = "SIDENET_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// The mesh public key (base64) to pin; without it the first signed announcement is trusted.
    #[arg(long, env = "SIDENET_MESH_KEY")]
    mesh_key: Option<String>,
    /// How configs are applied.
    #[arg(long, value_enum, default_value = "files", env = "SIDENET_BACKEND")]
    backend: Backend,
    /// Root folder the backend writes under.
    #[arg(long, env = "SIDENET_ROOT", default_value = "/")]
    root: PathBuf,
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
    /// Largest config accepted, in bytes.
    #[arg(long, default_value_t = sidenet_agent::shell::DEFAULT_MAX)]
    max_config_bytes: usize,
    /// Seconds between status reports.
    #[arg(long, default_value_t = 60)]
    status_interval: u64,
    /// Log as JSON lines.
    #[arg(long, env = "SIDENET_LOG_JSON")]
    log_json: bool,
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
    let args = Args::parse();
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
    let Backend::Files = args.backend;
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| args.root.join("etc/sidenet-agent"));
    let opts = sidenet_agent::shell::Options {
        mesh: args.mesh,
        broker: args.broker,
        mesh_key: args.mesh_key,
        root: args.root,
        state,
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
