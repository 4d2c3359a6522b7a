//! The embedded MQTT broker ([`sidenet_broker`]) for standalone mode.
//!
//! It runs on its own two-thread tokio runtime and stops with the process. Who may connect,
//! publish and subscribe is [`crate::acl`]: the controller by the password it generated at
//! start, nodes confined to their own topics by their client id (node id).

use std::net::SocketAddr;

use sidenet_broker::{AllowAll, Broker, BrokerHandle, Config};

use crate::acl::MeshAuthorizer;

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

/// Binds `listen` and starts the broker on its own threads (a tokio runtime of its own), so the
/// controller's CPU-bound rendering and signing and its database commits, which run on the
/// controller's runtime, never hold up the broker's connections.
///
/// With `controller_password`, the topic ACLs of [`crate::acl`] apply and the controller
/// connects as [`crate::acl::CONTROLLER_USER`] with that password; without, every client may do
/// everything (the Kubernetes mode's embedded broker, until it passes a password too).
pub fn start(
    listen: SocketAddr,
    max_connections: usize,
    controller_password: Option<String>,
    book: crate::acl::CredentialBook,
) -> Result<BrokerHandle, BrokerError> {
    let err = |message: String| BrokerError {
        addr: listen,
        message,
    };
    let listener =
        std::net::TcpListener::bind(listen).map_err(|e| err(format!("cannot listen: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| err(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mqtt-broker")
        .enable_all()
        .build()
        .map_err(|e| err(format!("runtime: {e}")))?;
    match controller_password {
        Some(p) => run_on(
            rt,
            listener,
            listen,
            Broker::with_authorizer(config(max_connections), MeshAuthorizer::new(p, book)),
        ),
        None => run_on(
            rt,
            listener,
            listen,
            Broker::with_authorizer(config(max_connections), AllowAll),
        ),
    }
    .map_err(err)
}

fn run_on<A: sidenet_broker::Authorizer>(
    rt: tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    listen: SocketAddr,
    broker: Broker<A>,
) -> Result<BrokerHandle, String> {
    let handle = broker.handle();
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => broker.run(l, std::future::pending()).await,
                    Err(e) => tracing::error!("embedded MQTT broker on {listen}: {e}"),
                }
            });
        })
        .map_err(|e| e.to_string())?;
    Ok(handle)
}
