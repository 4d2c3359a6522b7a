//! The embedded MQTT broker ([`sidenet_broker`]) for standalone mode.
//!
//! It runs as one task on the controller's tokio runtime and stops with it. Every client may
//! connect, publish and subscribe ([`AllowAll`]); per-node credentials and topic ACLs arrive with
//! issue 7's broker auth mode, as an [`sidenet_broker::Authorizer`] passed here instead.

use std::net::SocketAddr;

use sidenet_broker::{AllowAll, Broker, BrokerHandle, Config};

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

/// Binds `listen` and starts the broker on the current tokio runtime.
pub async fn start(
    listen: SocketAddr,
    max_connections: usize,
) -> Result<BrokerHandle, BrokerError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| BrokerError {
            addr: listen,
            message: format!("cannot listen: {e}"),
        })?;
    let broker = Broker::with_authorizer(config(max_connections), AllowAll);
    let handle = broker.handle();
    tokio::spawn(broker.run(listener, std::future::pending()));
    Ok(handle)
}
