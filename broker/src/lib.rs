//! `sidenet-broker`: an embeddable MQTT 3.1.1 broker on tokio.
//!
//! The standalone sidenet controller embeds it: one process publishes a signed, retained QoS 1
//! config per node and thousands of agents subscribe to their own topic. It is built for that
//! shape — many connections, one exact subscription each, many retained topics — and for
//! per-topic access control.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use sidenet_broker::{Broker, Config};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:1883").await?;
//! let broker = Broker::new(Config::default());
//! let handle = broker.handle();
//! tokio::spawn(broker.run(listener, std::future::pending()));
//! println!("{} clients", handle.stats().connections);
//! # Ok(()) }
//! ```
//!
//! # What it does
//!
//! - CONNECT/CONNACK of MQTT 3.1.1 (protocol level 4); other levels get CONNACK 1
//!   (unacceptable protocol version). User name and password go to the [`Authorizer`].
//! - Client ids: with [`Config::strict_client_ids`] (the default) an empty id or one containing
//!   `+`, `#`, `/` or a control character is refused with CONNACK 2. Without it an empty id with
//!   clean session gets a generated one. (Mosquitto's `mosquitto_pub`/`mosquitto_sub` send an
//!   empty id unless given `-i`, so they are refused in strict mode.)
//! - Sessions are not persisted: a CONNECT without clean session is accepted but served like a
//!   clean one (CONNACK "session present" is always 0; subscriptions and queued messages end with
//!   the connection).
//! - Session takeover: a second CONNECT with a connected client id closes the first connection
//!   (without publishing its will, since the client is still there).
//! - Last will: published when a connection ends without DISCONNECT — socket closed or failed,
//!   keepalive expired, protocol error, [`BrokerHandle::kick`], outgoing queue overflow — and
//!   only if [`Authorizer::may_publish`] allows its topic. Not on takeover or broker shutdown.
//! - Keepalive: a client that sends no complete packet for 1.5 × its keepalive is disconnected
//!   (0 = no keepalive). Only a complete packet restarts the timer (MQTT-3.1.2-24): a client
//!   trickling the bytes of one packet is disconnected like a silent one. A client must send
//!   CONNECT within [`Config::connect_timeout`].
//! - PUBLISH QoS 0 and 1 both ways (PUBACK). QoS 2 from a client is accepted (PUBREC, PUBREL,
//!   PUBCOMP; a resent packet id is routed once) and delivered onward at QoS 1; a QoS 2
//!   subscription is granted QoS 1. Delivery QoS is the lower of publish and subscription.
//! - Retained messages: stored per topic, replaced by the next retained publish, deleted by a
//!   retained publish with an empty payload; sent (retain flag set) on every matching SUBSCRIBE,
//!   exact or wildcard. Forwarded live messages carry retain = 0.
//! - SUBSCRIBE with `+` and `#`; topics starting with `$` are not matched by a wildcard in the
//!   first level. An invalid filter or one the authorizer refuses gets return code 0x80 (the
//!   other filters of the packet still count). A client with several filters matching a topic
//!   gets one copy, at the highest granted QoS.
//! - UNSUBSCRIBE, PINGREQ, DISCONNECT.
//! - Topic names with `+`, `#` or NUL, and strings that are not UTF-8, close the connection
//!   (protocol error). A packet over [`Config::max_packet_size`] closes the connection as soon as
//!   its fixed header is read, before its body is buffered. Before CONNECT the limit is
//!   [`Config::max_connect_packet_size`] (4 KiB by default): a socket announcing a larger first
//!   packet is closed at once, so an unauthenticated socket buffers at most that much.
//! - [`Config::max_connections`]: sockets (connected or not yet) beyond it are closed right after
//!   accept, logged as a warning at most once a minute with the count. The socket count and the
//!   connected-client count are released by guards when a connection's task ends, whether it
//!   returns, panics or is aborted. A host process sets the limit below its open-file limit with
//!   [`limits`].
//! - Bounded outgoing queue per client ([`Config::max_queued_messages`],
//!   [`Config::max_queued_bytes`], or [`Authorizer::queue_limits`]): while a client does not read,
//!   messages wait in its queue; when it is full a QoS 0 message for it is dropped (counted in
//!   [`Stats::dropped`]) and a QoS 1 message disconnects it (its will is published; counted in
//!   [`Stats::overflows`]). Unacknowledged QoS 1 messages per client are capped by
//!   [`Config::max_inflight`]; reading from a client pauses while 64 KiB wait to be written
//!   to it.
//! - Access control through [`Authorizer`]: connect (CONNACK 4 or 5), publish (a denied publish
//!   is acknowledged and dropped — MQTT 3.1.1 cannot say no — counted in
//!   [`Stats::denied_publishes`] and logged at debug), subscribe (0x80). [`AllowAll`] allows
//!   everything.
//! - TLS listeners ([`Listener::tls`], rustls with the ring provider, settings from PEM files
//!   with [`tls::server_config`]) next to plain ones; [`Broker::run_listeners`] serves several.
//!   The handshake runs in the connection's own task within [`Config::tls_handshake_timeout`]
//!   (a socket that never completes it holds nothing but its task); failed handshakes are
//!   counted in [`Stats::tls_failures`]. No client certificates.
//! - No persistence, no MQTT 5, no `$SYS` topics, no shared subscriptions.
//!
//! # Scale
//!
//! One tokio task per connection; no sleeps in the accept loop. Exact filters are in a hash map
//! and wildcard filters in a trie, so routing a publish costs one hash lookup plus a walk over
//! the wildcard trie's matching branches, independent of the number of exact subscribers.
//! Retained messages are keyed by topic (an exact subscription costs one lookup) with a trie of
//! topic names for wildcard subscriptions.
//!
//! # Layout
//!
//! - `lib.rs` — [`Config`], [`Broker`] (accept loop), [`BrokerHandle`], [`Stats`].
//! - `auth.rs` — [`Authorizer`], [`Refusal`], [`QueueLimits`], [`AllowAll`].
//! - `codec.rs` — MQTT 3.1.1 packet decoding (incremental) and encoding, server side.
//! - `topic.rs` — topic and filter validation, the subscription index and the retained index.
//! - `router.rs` — shared tables (sessions, subscriptions, retained) and each client's bounded
//!   outbox.
//! - `conn.rs` — one connection: handshake, read/write loop, keepalive, will.
//! - `tls.rs` — TLS server settings from PEM files.
//! - `limits.rs` — the process's open-file limit and the connection cap below it.
//! - `fuzzing.rs` (hidden) — the body of the codec's fuzz target, shared with the corpus replay
//!   test.

pub mod auth;
pub mod codec;
mod conn;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
mod router;
pub mod tls;
pub mod topic;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use auth::{AllowAll, Authorizer, QueueLimits, Refusal};

/// Default of [`Config::max_connect_packet_size`]: 4 KiB. A CONNECT carries a client id, a
/// will, a user name and a password; sidenet's are under 500 bytes.
pub const DEFAULT_MAX_CONNECT_PACKET: usize = 4096;

/// Broker settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Open client sockets at most (connected or still in the handshake); more are closed right
    /// after accept. Keep it below the process's open-file limit ([`limits::connection_cap`]).
    pub max_connections: usize,
    /// Largest packet accepted from a client, fixed header included.
    pub max_packet_size: usize,
    /// Largest first packet (the CONNECT) accepted from a new socket, fixed header included: a
    /// larger one closes the socket as soon as its fixed header is read. Capped by
    /// `max_packet_size`.
    pub max_connect_packet_size: usize,
    /// Time a new socket has to send CONNECT.
    pub connect_timeout: Duration,
    /// Time a new socket on a TLS listener has to complete the TLS handshake (then
    /// `connect_timeout` for CONNECT).
    pub tls_handshake_timeout: Duration,
    /// Refuse (CONNACK 2) client ids that are empty or contain `+`, `#`, `/` or control
    /// characters.
    pub strict_client_ids: bool,
    /// Unacknowledged QoS 1 messages per client; more wait in its queue.
    pub max_inflight: usize,
    /// Messages queued for one client (see the crate docs for what happens beyond).
    pub max_queued_messages: usize,
    /// Topic + payload bytes queued for one client.
    pub max_queued_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            max_packet_size: 1024 * 1024,
            max_connect_packet_size: DEFAULT_MAX_CONNECT_PACKET,
            connect_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            strict_client_ids: true,
            max_inflight: 256,
            max_queued_messages: 1_000,
            max_queued_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A snapshot of the broker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Open sockets (connected or still in the handshake).
    pub sockets: usize,
    /// Connected clients (CONNACK 0 sent, not yet gone).
    pub connections: usize,
    /// Accepted CONNECTs since start.
    pub connects_total: u64,
    /// CONNECTs refused (protocol level, client id, authorizer) and sockets over the limit.
    pub refused_connects: u64,
    /// PUBLISH packets received from clients.
    pub messages_in: u64,
    /// PUBLISH packets sent.
    pub messages_out: u64,
    /// Publishes (and wills) the authorizer refused.
    pub denied_publishes: u64,
    /// Subscription filters the authorizer refused.
    pub denied_subscriptions: u64,
    /// QoS 0 messages dropped because the receiver's queue was full.
    pub dropped: u64,
    /// Clients disconnected because a QoS 1 message did not fit their queue.
    pub overflows: u64,
    /// Connections closed by a new CONNECT with the same client id.
    pub takeovers: u64,
    /// Connections closed by [`BrokerHandle::kick`].
    pub kicks: u64,
    /// TLS handshakes that failed or timed out.
    pub tls_failures: u64,
    /// Retained messages stored.
    pub retained: usize,
    /// (filter, client) subscriptions.
    pub subscriptions: usize,
}

/// The broker, before it runs.
pub struct Broker<A: Authorizer = AllowAll> {
    core: Arc<router::Core>,
    auth: Arc<A>,
}

impl<A: Authorizer> std::fmt::Debug for Broker<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.core.config)
            .finish_non_exhaustive()
    }
}

impl Broker<AllowAll> {
    /// A broker that lets everyone in ([`AllowAll`]).
    pub fn new(config: Config) -> Self {
        Self::with_authorizer(config, AllowAll)
    }
}

impl<A: Authorizer> Broker<A> {
    /// A broker asking `auth` about every connect, publish and subscription.
    pub fn with_authorizer(config: Config, auth: A) -> Self {
        Self {
            core: Arc::new(router::Core::new(config)),
            auth: Arc::new(auth),
        }
    }

    /// A handle for counters and for closing clients, usable while the broker runs.
    pub fn handle(&self) -> BrokerHandle {
        BrokerHandle {
            core: self.core.clone(),
        }
    }

    /// Accepts clients on `listener` (plain TCP) until `shutdown` completes, then closes every
    /// connection (no wills) and returns once their tasks ended.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.run_listeners(vec![Listener::plain(listener)], shutdown)
            .await;
    }

    /// Accepts clients on every listener (plain or TLS) until `shutdown` completes, then closes
    /// every connection (no wills) and returns once their tasks ended.
    pub async fn run_listeners(self, listeners: Vec<Listener>, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        let core = &self.core;
        // The listener polled first takes turns, so a storm on one cannot starve the other.
        let mut first = 0usize;
        let mut limit_log = LimitLog::default();
        loop {
            let accept = std::future::poll_fn(|cx| {
                let n = listeners.len();
                for k in 0..n {
                    let i = (first + k) % n;
                    if let std::task::Poll::Ready(r) = listeners[i].tcp.poll_accept(cx) {
                        return std::task::Poll::Ready((i, r));
                    }
                }
                std::task::Poll::Pending
            });
            tokio::select! {
                _ = &mut shutdown => break,
                (i, accepted) = accept => match accepted {
                    Ok((stream, peer)) => {
                        first = first.wrapping_add(1);
                        let Some(slot) = SocketSlot::take(core) else {
                            core.stats.refused_connects.fetch_add(1, Ordering::Relaxed);
                            limit_log.hit(core.config.max_connections);
                            drop(stream);
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let (core, auth, stop) = (core.clone(), self.auth.clone(), stop_rx.clone());
                        let tls = listeners[i].tls.clone();
                        tasks.spawn(async move {
                            // Counted until this task ends, however it ends (returns, panics, or
                            // is aborted with the broker).
                            let _slot = slot;
                            let peer = peer.to_string();
                            match tls {
                                None => conn::serve(core.clone(), auth, stream, peer, stop).await,
                                Some(acceptor) => {
                                    if let Some(s) = handshake(&core, &acceptor, stream, &peer, stop.clone()).await {
                                        conn::serve(core.clone(), auth, s, peer, stop).await;
                                    }
                                }
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors or similar: wait for a connection to end (or a
                        // moment) instead of spinning on accept.
                        tracing::warn!("accept: {e}");
                        tokio::select! {
                            _ = tasks.join_next(), if !tasks.is_empty() => {}
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
    }
}

/// One open socket in [`Stats::sockets`], released when dropped.
struct SocketSlot(Arc<router::Core>);

impl SocketSlot {
    /// A slot if fewer than [`Config::max_connections`] sockets are open. (Only the accept loop
    /// takes slots, so the check and the increment cannot race.)
    fn take(core: &Arc<router::Core>) -> Option<Self> {
        if core.stats.sockets.load(Ordering::Relaxed) >= core.config.max_connections {
            return None;
        }
        core.stats.sockets.fetch_add(1, Ordering::Relaxed);
        Some(Self(core.clone()))
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.stats.sockets.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Logs sockets closed at the connection limit: the first one at once, then at most one line
/// a minute with the count since the last line.
#[derive(Default)]
struct LimitLog {
    last: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl LimitLog {
    fn hit(&mut self, max: usize) {
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(60))
        {
            return;
        }
        tracing::warn!(
            "connection limit of {max} sockets reached: closed {} new socket(s) right after accept",
            self.unlogged
        );
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// The TLS handshake of one socket, in its own task, within the configured time.
async fn handshake(
    core: &router::Core,
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: &str,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let r = tokio::select! {
        r = tokio::time::timeout(core.config.tls_handshake_timeout, acceptor.accept(stream)) => r,
        _ = stop.changed() => return None,
    };
    let why = match r {
        Ok(Ok(s)) => return Some(s),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no TLS handshake in time".to_string(),
    };
    core.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, "TLS handshake failed: {why}");
    None
}

/// A listening socket of the broker: plain MQTT or MQTT over TLS.
pub struct Listener {
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.tcp.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Listener {
    /// Plain MQTT on `tcp`.
    pub fn plain(tcp: TcpListener) -> Self {
        Self { tcp, tls: None }
    }

    /// MQTT over TLS on `tcp`, with these server settings (see [`tls::server_config`]).
    pub fn tls(tcp: TcpListener, config: Arc<tls::rustls::ServerConfig>) -> Self {
        Self {
            tcp,
            tls: Some(tokio_rustls::TlsAcceptor::from(config)),
        }
    }
}

/// Counters and control of a (running) broker. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BrokerHandle {
    core: Arc<router::Core>,
}

impl BrokerHandle {
    /// The current counters.
    pub fn stats(&self) -> Stats {
        let s = &self.core.stats;
        let (retained, subscriptions) = self.core.sizes();
        Stats {
            sockets: s.sockets.load(Ordering::Relaxed),
            connections: s.connections.load(Ordering::Relaxed),
            connects_total: s.connects_total.load(Ordering::Relaxed),
            refused_connects: s.refused_connects.load(Ordering::Relaxed),
            messages_in: s.messages_in.load(Ordering::Relaxed),
            messages_out: s.messages_out.load(Ordering::Relaxed),
            denied_publishes: s.denied_publishes.load(Ordering::Relaxed),
            denied_subscriptions: s.denied_subscriptions.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            overflows: s.overflows.load(Ordering::Relaxed),
            takeovers: s.takeovers.load(Ordering::Relaxed),
            kicks: s.kicks.load(Ordering::Relaxed),
            tls_failures: s.tls_failures.load(Ordering::Relaxed),
            retained,
            subscriptions,
        }
    }

    /// Closes the connection of `client_id` as if it had dropped (its will is published);
    /// false if no such client is connected. Revoking credentials must also make the
    /// authorizer refuse its next CONNECT.
    pub fn kick(&self, client_id: &str) -> bool {
        self.core.kick(client_id)
    }

    /// The payload of the retained message on `topic`, if any.
    pub fn retained(&self, topic: &str) -> Option<bytes::Bytes> {
        self.core.retained(topic)
    }
}
