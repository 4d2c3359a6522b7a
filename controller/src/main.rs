//! `sidenet-controller`: the sidenet control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sidenet-controller",
    version,
    about = "sidenet control plane: manifests in, signed node configs out"
)]
struct Args {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "SIDENET_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Manifests from a folder, state in a local database, an embedded MQTT broker.
    Standalone {
        /// Manifest files or folders (watched for changes). Repeat for several.
        #[arg(
            long,
            short = 'm',
            env = "SIDENET_MANIFESTS",
            default_value = "examples/riverside",
            value_delimiter = ','
        )]
        manifests: Vec<PathBuf>,
        /// Hardware profile folder(s), loaded with the manifests.
        #[arg(
            long,
            env = "SIDENET_PROFILES",
            default_value = "hardware-profiles",
            value_delimiter = ','
        )]
        profiles: Vec<PathBuf>,
        /// Template folder (one subfolder per firmware family).
        #[arg(long, env = "SIDENET_TEMPLATES", default_value = "templates")]
        templates: PathBuf,
        /// State folder: database, mesh keys, generated passphrases, admin socket.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
        /// Use this MQTT broker (mqtt://host:port) instead of the embedded one.
        #[arg(long, env = "SIDENET_BROKER")]
        broker: Option<String>,
        /// Listen address of the embedded broker. Use 0.0.0.0:1883 to let routers on the LAN in.
        #[arg(long, env = "SIDENET_LISTEN", default_value = "127.0.0.1:1883")]
        listen: SocketAddr,
        /// How often to check the manifest folder, in milliseconds.
        #[arg(long, env = "SIDENET_POLL_MS", default_value_t = 1000)]
        poll_ms: u64,
        /// Connection limit of the embedded broker.
        #[arg(long, env = "SIDENET_MAX_CONNECTIONS", default_value_t = 20_000)]
        max_connections: usize,
        /// Agent binaries for `NodeProvision` manifests, one folder per architecture:
        /// AGENTS/<arch>/sidenet-agent.
        #[arg(long, env = "SIDENET_AGENTS", default_value = "dist")]
        agents: PathBuf,
    },
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
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

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logs(args.log_json);
    match args.mode {
        Mode::Standalone {
            mut manifests,
            profiles,
            templates,
            state,
            broker,
            listen,
            poll_ms,
            max_connections,
            agents,
        } => {
            manifests.extend(profiles.into_iter().filter(|p| p.exists()));
            let opts = sidenet_controller::standalone::Options {
                manifests,
                templates,
                state,
                broker,
                listen,
                poll: Duration::from_millis(poll_ms.max(50)),
                refresh: Duration::from_secs(60),
                max_connections,
                agents,
            };
            match sidenet_controller::standalone::run(opts, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sidenet-controller: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
