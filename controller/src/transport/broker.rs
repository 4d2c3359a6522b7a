//! The embedded MQTT broker ([`sidenet_broker`]) for standalone mode.
//!
//! It runs on its own two-thread tokio runtime and stops with the process. Who may connect,
//! publish and subscribe is [`crate::transport::acl`]: the controller by the password it generated at
//! start, nodes confined to their own topics by their client id (node id).

use std::net::SocketAddr;
use std::path::PathBuf;

use sidenet_broker::{AllowAll, Broker, BrokerHandle, Config, Listener};

use crate::transport::acl::MeshAuthorizer;

/// Largest MQTT packet accepted by the embedded broker (configs are a few KiB).
pub const MAX_PACKET: usize = 512 * 1024;

/// Broker start failed.
#[derive(Debug, thiserror::Error)]
#[error("embedded MQTT broker on {addr}: {message}")]
pub struct BrokerError {
    /// Listen address.
    pub addr: SocketAddr,
    /// What went wrong.
    pub message: String,
}

/// A TLS listener of the embedded broker: address, certificate chain and private key (PEM).
#[derive(Debug, Clone)]
pub struct TlsListen {
    /// Listen address (`--tls-listen`).
    pub addr: SocketAddr,
    /// Certificate chain, server certificate first (`--tls-cert`).
    pub cert: PathBuf,
    /// Private key of the certificate (`--tls-key`).
    pub key: PathBuf,
}

/// The TLS listener from the three options, which go together: all or none.
pub fn tls_listen(
    addr: Option<SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<TlsListen>, String> {
    match (addr, cert, key) {
        (None, None, None) => Ok(None),
        (Some(addr), Some(cert), Some(key)) => Ok(Some(TlsListen { addr, cert, key })),
        (addr, cert, key) => {
            let missing: Vec<&str> = [
                ("--tls-listen", addr.is_none()),
                ("--tls-cert", cert.is_none()),
                ("--tls-key", key.is_none()),
            ]
            .into_iter()
            .filter_map(|(n, m)| m.then_some(n))
            .collect();
            Err(format!(
                "the embedded broker's TLS listener needs --tls-listen, --tls-cert and --tls-key together; missing: {}",
                missing.join(", ")
            ))
        }
    }
}

/// Logs a SUBACK that refused one of the controller's subscriptions (an external broker whose
/// user lacks the rights).
pub fn log_refused_subscription(ack: &rumqttc::SubAck) {
    let refused = ack
        .return_codes
        .iter()
        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
    if refused {
        tracing::error!(
            "the MQTT broker refused a subscription of the controller (packet {}): check the controller's broker user's rights",
            ack.pkid
        );
    }
}

/// The broker configuration for `max_connections` clients.
pub fn config(max_connections: usize) -> Config {
    Config {
        max_connections,
        max_packet_size: MAX_PACKET,
        // The controller's own connection receives every node's enrolment, status and online
        // message; during a storm it may fall behind by several per node. Nodes themselves
        // receive one config at a time. (With issue 7's auth mode, `Authorizer::queue_limits`
        // gives nodes a small queue and the controller this one.)
        max_queued_messages: max_connections.saturating_mul(4).max(10_000),
        max_queued_bytes: 256 * 1024 * 1024,
        ..Config::default()
    }
}

/// Raises this process's open-file soft limit to the hard limit and returns the connections the
/// embedded broker may hold: `--max-connections`, or fewer if the open-file limit leaves less
/// room after the files open now and [`sidenet_broker::limits::RESERVED_FILES`] kept for the
/// controller (manifests, database, admin socket, its own MQTT client). Both are logged.
pub fn connection_limit(max_connections: usize, addr: SocketAddr) -> Result<usize, BrokerError> {
    use sidenet_broker::limits;
    let files = limits::raise_open_files().map_err(|e| BrokerError {
        addr,
        message: format!("cannot read the open-file limit: {e}"),
    })?;
    let hard = if files.hard == u64::MAX {
        "unlimited".to_string()
    } else {
        files.hard.to_string()
    };
    if files.raised() {
        tracing::info!(
            "open-file limit raised from {} to {} (hard limit {hard})",
            files.before,
            files.soft
        );
    } else if files.soft < files.hard {
        tracing::warn!(
            "open-file limit stays at {} (hard limit {hard}): raising it failed",
            files.soft
        );
    }
    let open = limits::open_files_now().unwrap_or(0);
    let room = |c: &limits::ConnectionCap| {
        format!(
            "open-file limit {}, {} files open, {} kept for the controller",
            c.soft_limit,
            c.open_now,
            limits::RESERVED_FILES
        )
    };
    match limits::connection_cap(max_connections, files.soft, open) {
        Ok(cap) if cap.clamped() => {
            tracing::warn!(
                "--max-connections {max_connections} is more than the open-file limit allows: the embedded broker accepts at most {} connections ({}); raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) for more",
                cap.allowed,
                room(&cap)
            );
            Ok(cap.allowed)
        }
        Ok(cap) => {
            tracing::info!(
                "embedded broker: at most {} connections ({})",
                cap.allowed,
                room(&cap)
            );
            Ok(cap.allowed)
        }
        Err(cap) if max_connections == 0 => Err(BrokerError {
            addr,
            message: format!("--max-connections 0 lets no client in ({})", room(&cap)),
        }),
        Err(cap) => Err(BrokerError {
            addr,
            message: format!(
                "the open-file limit leaves no room for connections ({}): raise it (ulimit -n, systemd LimitNOFILE=)",
                room(&cap)
            ),
        }),
    }
}

/// Binds `listen` and starts the broker on its own threads (a tokio runtime of its own), so the
/// controller's CPU-bound rendering and signing and its database commits, which run on the
/// controller's runtime, never hold up the broker's connections.
///
/// With `controller_password`, the topic ACLs of [`crate::transport::acl`] apply and the controller
/// connects as [`crate::transport::acl::CONTROLLER_USER`] with that password; without, every client may do
/// everything (the Kubernetes mode's embedded broker, until it passes a password too).
///
/// With `tls`, the broker also accepts MQTT over TLS there (same ACLs, same clients).
///
/// The connection limit is `max_connections` clamped by [`connection_limit`] (which raises the
/// open-file limit first).
pub fn start(
    listen: SocketAddr,
    tls: Option<&TlsListen>,
    max_connections: usize,
    controller_password: Option<String>,
    book: crate::transport::acl::CredentialBook,
) -> Result<BrokerHandle, BrokerError> {
    start_until(
        listen,
        tls,
        max_connections,
        controller_password,
        book,
        std::future::pending(),
    )
    .map(|(h, _)| h)
}

/// Stops a broker of [`start_stoppable`] when dropped: it closes its listeners and every
/// connection (no wills, and its retained messages are gone), and the drop returns once the
/// broker's thread ended, so its port is free again.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// [`start`], for a broker that lives as long as the returned [`Running`] (Kubernetes mode:
/// the broker of the pod that reconciles ends when it stops reconciling).
pub fn start_stoppable(
    listen: SocketAddr,
    tls: Option<&TlsListen>,
    max_connections: usize,
    controller_password: Option<String>,
    book: crate::transport::acl::CredentialBook,
) -> Result<(BrokerHandle, Running), BrokerError> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (handle, thread) = start_until(
        listen,
        tls,
        max_connections,
        controller_password,
        book,
        async move {
            let _ = rx.await;
        },
    )?;
    Ok((
        handle,
        Running {
            stop: Some(tx),
            thread: Some(thread),
        },
    ))
}

fn start_until(
    listen: SocketAddr,
    tls: Option<&TlsListen>,
    max_connections: usize,
    controller_password: Option<String>,
    book: crate::transport::acl::CredentialBook,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(BrokerHandle, std::thread::JoinHandle<()>), BrokerError> {
    let err = |message: String| BrokerError {
        addr: listen,
        message,
    };
    let bind = |addr: SocketAddr| {
        let e = |message: String| BrokerError { addr, message };
        let l = std::net::TcpListener::bind(addr).map_err(|x| e(format!("cannot listen: {x}")))?;
        l.set_nonblocking(true).map_err(|x| e(x.to_string()))?;
        Ok::<_, BrokerError>(l)
    };
    let mut listeners = vec![(bind(listen)?, None)];
    if let Some(t) = tls {
        let config =
            sidenet_broker::tls::server_config(&t.cert, &t.key).map_err(|message| BrokerError {
                addr: t.addr,
                message: format!("TLS: {message}"),
            })?;
        listeners.push((bind(t.addr)?, Some(config)));
    }
    let max_connections = connection_limit(max_connections, listen)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mqtt-broker")
        .enable_all()
        .build()
        .map_err(|e| err(format!("runtime: {e}")))?;
    match controller_password {
        Some(p) => run_on(
            rt,
            listeners,
            listen,
            Broker::with_authorizer(config(max_connections), MeshAuthorizer::new(p, book)),
            shutdown,
        ),
        None => run_on(
            rt,
            listeners,
            listen,
            Broker::with_authorizer(config(max_connections), AllowAll),
            shutdown,
        ),
    }
    .map_err(err)
}

type StdListeners = Vec<(
    std::net::TcpListener,
    Option<std::sync::Arc<sidenet_broker::tls::rustls::ServerConfig>>,
)>;

fn run_on<A: sidenet_broker::Authorizer>(
    rt: tokio::runtime::Runtime,
    listeners: StdListeners,
    listen: SocketAddr,
    broker: Broker<A>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(BrokerHandle, std::thread::JoinHandle<()>), String> {
    let handle = broker.handle();
    let thread = std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut ls = Vec::new();
                for (l, tls) in listeners {
                    match (tokio::net::TcpListener::from_std(l), tls) {
                        (Ok(l), None) => ls.push(Listener::plain(l)),
                        (Ok(l), Some(c)) => ls.push(Listener::tls(l, c)),
                        (Err(e), _) => {
                            tracing::error!("embedded MQTT broker on {listen}: {e}");
                            return;
                        }
                    }
                }
                broker.run_listeners(ls, shutdown).await;
            });
        })
        .map_err(|e| e.to_string())?;
    Ok((handle, thread))
}
