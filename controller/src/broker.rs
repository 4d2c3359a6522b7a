//! The embedded MQTT broker (rumqttd) for standalone mode.
//!
//! It runs on its own threads (rumqttd starts one runtime per listener). `next_connection_delay_ms`
//! is set to 0: rumqttd's default sleeps after every accept, which caps connection storms.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

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

/// The rumqttd configuration for one MQTT 3.1.1 listener.
pub fn config(listen: SocketAddr, max_connections: usize) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PACKET,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let mut v4 = HashMap::new();
    v4.insert("v4".to_string(), server);
    Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 1000,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        ..Default::default()
    }
}

/// Starts the broker on background threads. Fails early if the address cannot be bound.
pub fn start(listen: SocketAddr, max_connections: usize) -> Result<(), BrokerError> {
    // rumqttd logs bind failures on its thread and carries on; check the port first so the
    // admin gets a clear error.
    std::net::TcpListener::bind(listen)
        .map_err(|e| BrokerError {
            addr: listen,
            message: format!("cannot listen: {e}"),
        })
        .map(drop)?;
    let mut broker = Broker::new(config(listen, max_connections));
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError {
            addr: listen,
            message: e.to_string(),
        })?;
    Ok(())
}
