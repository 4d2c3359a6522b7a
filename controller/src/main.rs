//! `sidenet-controller`: the sidenet control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use sidenet_controller::cli::relative_hint;

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
        /// Use this MQTT broker (mqtt://host:port, or mqtts://host:port for TLS) instead of the
        /// embedded one.
        #[arg(long, env = "SIDENET_BROKER")]
        broker: Option<String>,
        /// User name for the external broker.
        #[arg(long, env = "SIDENET_BROKER_USERNAME")]
        broker_username: Option<String>,
        /// Password for the external broker.
        #[arg(long, env = "SIDENET_BROKER_PASSWORD", hide_env_values = true)]
        broker_password: Option<String>,
        /// The external broker is Mosquitto with its dynamic security plugin and the user above
        /// administers it: the controller gives each node its own credentials and ACLs there
        /// (docs/security.md, "Broker access control").
        #[arg(long, env = "SIDENET_BROKER_DYNSEC")]
        broker_dynsec: bool,
        /// CA bundle (PEM) for an mqtts:// --broker; without it, the system roots.
        #[arg(long, env = "SIDENET_BROKER_CA", value_name = "FILE")]
        broker_ca: Option<PathBuf>,
        /// Listen address of the HTTP service: the mesh map, /api/nodes, /api/netjson, /metrics
        /// (docs/web.md). Default 127.0.0.1:8480 (if that port is taken, the controller runs
        /// without it and says so); `off` disables it. A non-loopback address needs a bearer
        /// token for the data routes.
        #[arg(long, env = "SIDENET_HTTP_LISTEN", value_name = "ADDR|off")]
        http_listen: Option<String>,
        /// File holding the bearer token for a non-loopback --http-listen (first line, at least
        /// 16 characters); default STATE/http-token, created if missing.
        #[arg(long, env = "SIDENET_HTTP_TOKEN_FILE", value_name = "FILE")]
        http_token_file: Option<PathBuf>,
        /// Listen address of the embedded broker. Use 0.0.0.0:1883 to let routers on the LAN in.
        #[arg(long, env = "SIDENET_LISTEN", default_value = "127.0.0.1:1883")]
        listen: SocketAddr,
        /// TLS listener of the embedded broker (MQTT over TLS, e.g. 0.0.0.0:8883), next to
        /// --listen; needs --tls-cert and --tls-key. Agents connect with
        /// --broker mqtts://HOST:PORT --ca CA.pem.
        #[arg(long, env = "SIDENET_TLS_LISTEN")]
        tls_listen: Option<SocketAddr>,
        /// Certificate chain (PEM, server certificate first) of the TLS listener. It must name
        /// the host or IP address agents use in their --broker URL.
        #[arg(long, env = "SIDENET_TLS_CERT", value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, env = "SIDENET_TLS_KEY", value_name = "FILE")]
        tls_key: Option<PathBuf>,
        /// How often to check the manifest folder, in milliseconds.
        #[arg(long, env = "SIDENET_POLL_MS", default_value_t = 1000)]
        poll_ms: u64,
        /// How long one load of the manifests (reading and validating the files) may take, in
        /// milliseconds; a load that overruns is a manifest error and the last good manifests
        /// stay in force.
        #[arg(long, env = "SIDENET_LOAD_DEADLINE_MS", default_value_t = 30_000)]
        load_deadline_ms: u64,
        /// Connection limit of the embedded broker; lowered at start to the open-file limit
        /// minus the files open minus 256 if that is less (logged; docs/security.md).
        #[arg(long, env = "SIDENET_MAX_CONNECTIONS", default_value_t = 20_000)]
        max_connections: usize,
        /// Agent binaries for `NodeProvision` manifests, one folder per architecture:
        /// AGENTS/<arch>/sidenet-agent.
        #[arg(long, env = "SIDENET_AGENTS", default_value = "dist")]
        agents: PathBuf,
    },
    /// Kubernetes mode (what the Helm chart runs): watch Mesh, MeshNode and HardwareProfile
    /// objects, write their status, keep keys in Secrets. See docs/helm.md for the contract.
    Kubernetes {
        /// Namespace whose Mesh and MeshNode objects are watched; empty = all namespaces.
        #[arg(long, env = "SIDENET_NAMESPACE", default_value = "")]
        namespace: String,
        /// External MQTT broker (mqtt://host:port); unset runs the embedded broker.
        #[arg(long, env = "SIDENET_BROKER")]
        broker: Option<String>,
        /// Listen address of the embedded broker.
        #[arg(long, env = "SIDENET_LISTEN", default_value = "0.0.0.0:1883")]
        listen: SocketAddr,
        /// TLS listener of the embedded broker (MQTT over TLS, e.g. 0.0.0.0:8883), next to
        /// --listen; needs --tls-cert and --tls-key. Agents connect with
        /// --broker mqtts://HOST:PORT --ca CA.pem.
        #[arg(long, env = "SIDENET_TLS_LISTEN")]
        tls_listen: Option<SocketAddr>,
        /// Certificate chain (PEM, server certificate first) of the TLS listener. It must name
        /// the host or IP address agents use in their --broker URL.
        #[arg(long, env = "SIDENET_TLS_CERT", value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, env = "SIDENET_TLS_KEY", value_name = "FILE")]
        tls_key: Option<PathBuf>,
        /// User name for the external broker.
        #[arg(long, env = "SIDENET_BROKER_USERNAME")]
        broker_username: Option<String>,
        /// Password for the external broker.
        #[arg(long, env = "SIDENET_BROKER_PASSWORD", hide_env_values = true)]
        broker_password: Option<String>,
        /// CA bundle (PEM) for an mqtts:// broker.
        #[arg(long, env = "SIDENET_BROKER_CA")]
        broker_ca: Option<PathBuf>,
        /// The external broker is Mosquitto with its dynamic security plugin and the user above
        /// administers it: the controller gives each node its own credentials and ACLs there.
        #[arg(long, env = "SIDENET_BROKER_DYNSEC")]
        broker_dynsec: bool,
        /// Address of /metrics, /healthz, /readyz and the mesh map (docs/web.md).
        #[arg(long, env = "SIDENET_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
        metrics_listen: SocketAddr,
        /// File holding the bearer token of the map's data routes (e.g. a mounted Secret's key);
        /// without it they answer 401 on a non-loopback address.
        #[arg(long, env = "SIDENET_HTTP_TOKEN_FILE", value_name = "FILE")]
        http_token_file: Option<PathBuf>,
        /// Take the Lease `sidenet-controller` before reconciling.
        #[arg(long, env = "SIDENET_LEADER_ELECTION", default_value = "false", action = clap::ArgAction::Set)]
        leader_election: bool,
        /// Lease holder identity.
        #[arg(long, env = "POD_NAME", default_value = "sidenet-controller")]
        pod_name: String,
        /// Namespace of the Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        pod_namespace: String,
        /// Template folder (one subfolder per firmware family).
        #[arg(
            long,
            env = "SIDENET_TEMPLATES",
            default_value = "/usr/share/sidenet/templates"
        )]
        templates: PathBuf,
        /// Folder for the state cache (rebuilt from the cluster at every start).
        #[arg(long, env = "SIDENET_CACHE_DIR", default_value = "/tmp/sidenet-cache")]
        cache_dir: PathBuf,
        /// Agent binaries for `NodeProvision` objects, one folder per architecture:
        /// AGENTS/<arch>/sidenet-agent.
        #[arg(
            long,
            env = "SIDENET_AGENTS",
            default_value = "/usr/share/sidenet/agents"
        )]
        agents: PathBuf,
        /// Connection limit of the embedded broker; lowered at start to the open-file limit
        /// minus the files open minus 256 if that is less (logged; docs/security.md).
        #[arg(long, env = "SIDENET_MAX_CONNECTIONS", default_value_t = 20_000)]
        max_connections: usize,
    },
    /// Check a running controller and exit 0 if every check passes (what the chart's `helm test`
    /// Pod runs): `--http` URLs answer 200, `--mqtt` addresses answer an MQTT CONNECT with a
    /// CONNACK, `--tcp` addresses accept a connection.
    Check {
        /// http://HOST:PORT/PATH that must answer 200 (e.g. the /readyz of the metrics Service).
        #[arg(long)]
        http: Vec<String>,
        /// HOST:PORT of an MQTT broker (plain MQTT).
        #[arg(long)]
        mqtt: Vec<String>,
        /// HOST:PORT that must accept a TCP connection (e.g. the TLS listener).
        #[arg(long)]
        tcp: Vec<String>,
        /// Timeout of each check, in seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Print a shell completion script, e.g. `sidenet-controller completions bash >
    /// /etc/bash_completion.d/sidenet-controller`.
    Completions {
        /// The shell.
        shell: sidenet_controller::cli::Shell,
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

/// `--http-listen`: an address, `off`, or the default.
fn http_options(
    listen: Option<&str>,
    token_file: Option<PathBuf>,
) -> Result<Option<sidenet_controller::standalone::web::HttpOptions>, String> {
    use sidenet_controller::standalone::web::{DEFAULT_LISTEN, HttpOptions};
    let (text, explicit) = match listen.map(str::trim) {
        Some("off") => return Ok(None),
        Some(a) if !a.is_empty() => (a, true),
        _ => (DEFAULT_LISTEN, false),
    };
    let listen = text.parse().map_err(|e| {
        format!("--http-listen {text}: {e} (expected IP:PORT, e.g. {DEFAULT_LISTEN}, or off)")
    })?;
    Ok(Some(HttpOptions {
        listen,
        explicit,
        token_file: token_file.filter(|p| !p.as_os_str().is_empty()),
    }))
}

/// `sidenet-controller check`: one line per check, exit 1 if any failed.
fn check(
    http: &[String],
    mqtt: &[String],
    tcp: &[String],
    timeout: std::time::Duration,
) -> ExitCode {
    use sidenet_controller::selfcheck;
    let mut failed = false;
    let mut report = |what: String, r: Result<String, String>| match r {
        Ok(m) => println!("ok   {what}: {m}"),
        Err(e) => {
            failed = true;
            println!("FAIL {what}: {e}");
        }
    };
    for u in http {
        report(
            format!("GET {u}"),
            selfcheck::http_ok(u, timeout).map(|()| "200".into()),
        );
    }
    for a in mqtt {
        report(
            format!("MQTT {a}"),
            selfcheck::mqtt_connack(a, timeout).map(|rc| format!("CONNACK, return code {rc}")),
        );
    }
    for a in tcp {
        report(
            format!("TCP {a}"),
            selfcheck::tcp_open(a, timeout).map(|()| "accepted".into()),
        );
    }
    if http.is_empty() && mqtt.is_empty() && tcp.is_empty() {
        eprintln!("sidenet-controller check: nothing to check (give --http, --mqtt or --tcp)");
        return ExitCode::from(2);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
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
    if let Mode::Completions { shell } = args.mode {
        sidenet_controller::cli::completions(shell, Args::command());
        return ExitCode::SUCCESS;
    }
    if let Mode::Check {
        http,
        mqtt,
        tcp,
        timeout,
    } = &args.mode
    {
        return check(http, mqtt, tcp, std::time::Duration::from_secs(*timeout));
    }
    init_logs(args.log_json);
    match args.mode {
        Mode::Completions { .. } | Mode::Check { .. } => ExitCode::SUCCESS,
        Mode::Standalone {
            mut manifests,
            profiles,
            templates,
            state,
            broker,
            broker_username,
            broker_password,
            broker_dynsec,
            broker_ca,
            listen,
            tls_listen,
            tls_cert,
            tls_key,
            poll_ms,
            load_deadline_ms,
            max_connections,
            agents,
            http_listen,
            http_token_file,
        } => {
            // Every path is relative to the working directory: say which one is missing and
            // where it was looked for, before anything starts.
            let paths = manifests
                .iter()
                .map(|p| ("--manifests", p))
                .chain(profiles.iter().map(|p| ("--profiles", p)))
                .chain([("--templates", &templates)]);
            for (flag, p) in paths {
                if !p.exists() {
                    eprintln!(
                        "sidenet-controller: {flag} {}: no such file or folder{} (run from the repository root, or pass {flag})",
                        p.display(),
                        relative_hint(p)
                    );
                    return ExitCode::from(2);
                }
            }
            manifests.extend(profiles);
            let tls = match embedded_tls(tls_listen, tls_cert, tls_key, broker.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("sidenet-controller: {e}");
                    return ExitCode::from(2);
                }
            };
            let http = match http_options(http_listen.as_deref(), http_token_file) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("sidenet-controller: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = sidenet_controller::standalone::Options {
                manifests,
                templates,
                state,
                broker,
                broker_ca,
                listen,
                tls,
                poll: Duration::from_millis(poll_ms.max(50)),
                load_deadline: Duration::from_millis(load_deadline_ms.max(100)),
                refresh: Duration::from_secs(60),
                max_connections,
                agents,
                broker_login: broker_username.zip(broker_password),
                broker_dynsec,
                http,
            };
            match sidenet_controller::standalone::run(opts, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sidenet-controller: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Mode::Kubernetes {
            namespace,
            broker,
            listen,
            tls_listen,
            tls_cert,
            tls_key,
            broker_username,
            broker_password,
            broker_ca,
            broker_dynsec,
            metrics_listen,
            http_token_file,
            leader_election,
            pod_name,
            pod_namespace,
            templates,
            cache_dir,
            agents,
            max_connections,
        } => {
            let tls = match embedded_tls(
                tls_listen,
                tls_cert.filter(|p| !p.as_os_str().is_empty()),
                tls_key.filter(|p| !p.as_os_str().is_empty()),
                broker.as_deref(),
            ) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("sidenet-controller: {e}");
                    return ExitCode::from(2);
                }
            };
            let http_token = match http_token_file.filter(|p| !p.as_os_str().is_empty()) {
                Some(p) => match sidenet_controller::web::read_token(&p) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        eprintln!("sidenet-controller: --http-token-file {e}");
                        return ExitCode::from(2);
                    }
                },
                None => None,
            };
            let opts = sidenet_controller::kubernetes::Options {
                namespace: Some(namespace).filter(|n| !n.is_empty()),
                broker: broker.filter(|b| !b.is_empty()),
                listen,
                tls,
                broker_username: broker_username.filter(|u| !u.is_empty()),
                broker_password: broker_password.filter(|p| !p.is_empty()),
                broker_ca: broker_ca.filter(|p| !p.as_os_str().is_empty()),
                broker_dynsec,
                metrics_listen: Some(metrics_listen),
                http_token,
                leader_election,
                pod_name,
                pod_namespace,
                templates,
                cache_dir,
                agents,
                lease: Default::default(),
                refresh: Duration::from_secs(300),
                max_connections,
            };
            let client = match kube::Client::try_default().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sidenet-controller: cannot reach the Kubernetes API: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match sidenet_controller::kubernetes::run(opts, client, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sidenet-controller: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The embedded broker's TLS listener from `--tls-listen/--tls-cert/--tls-key` (all or none),
/// refused with an external `--broker`, which runs no embedded broker.
fn embedded_tls(
    addr: Option<std::net::SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    broker: Option<&str>,
) -> Result<Option<sidenet_controller::transport::broker::TlsListen>, String> {
    let tls = sidenet_controller::transport::broker::tls_listen(addr, cert, key)?;
    if tls.is_some() && broker.is_some_and(|b| !b.is_empty()) {
        return Err("--tls-listen is a listener of the embedded broker, which does not run with --broker; configure TLS on that broker".into());
    }
    Ok(tls)
}
