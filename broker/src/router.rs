//! State shared by all connections: the session table, the subscription index, the retained
//! store, each connection's outbox, and the counters.
//!
//! One mutex guards the tables. It is held only to update them and to collect the outboxes a
//! publish goes to (a hash lookup plus a short trie walk); messages are queued after it is
//! released.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use crate::Config;
use crate::auth::QueueLimits;
use crate::topic::{RetainedIndex, SubIndex};

/// A published message, shared by every subscriber it goes to.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: u8,
}

/// One message queued for one connection.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub msg: Arc<Message>,
    /// QoS to deliver with (min of publish and subscription).
    pub qos: u8,
    /// Retain flag on the wire: set only for retained messages sent on subscribe.
    pub retain: bool,
}

impl Delivery {
    fn cost(&self) -> usize {
        self.msg.topic.len() + self.msg.payload.len()
    }
}

/// Why a connection was told to close by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CloseReason {
    /// Another CONNECT with the same client id (its will is not published).
    TakenOver = 1,
    /// [`crate::BrokerHandle::kick`].
    Kicked = 2,
    /// Its outgoing queue overflowed with a QoS 1 message.
    Overflow = 3,
}

/// The receiving end of a connection, as publishers see it.
#[derive(Debug)]
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Delivery>,
    queued: AtomicUsize,
    queued_bytes: AtomicUsize,
    limits: QueueLimits,
    close: Notify,
    close_reason: AtomicU8,
}

impl Outbox {
    pub fn new(limits: QueueLimits) -> (Arc<Self>, mpsc::UnboundedReceiver<Delivery>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let outbox = Arc::new(Self {
            tx,
            queued: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            limits,
            close: Notify::new(),
            close_reason: AtomicU8::new(0),
        });
        (outbox, rx)
    }

    /// Queues a message within the limits. Over them: a QoS 0 message is dropped (false), a
    /// QoS 1 message closes the connection.
    fn push(&self, d: Delivery, stats: &Counters) {
        let cost = d.cost();
        let n = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        let b = self.queued_bytes.fetch_add(cost, Ordering::Relaxed) + cost;
        if n > self.limits.messages || b > self.limits.bytes {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            if d.qos == 0 {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            } else if self.close(CloseReason::Overflow) {
                stats.overflows.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        if self.tx.send(d).is_err() {
            // The connection is gone; nothing to account for.
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
        }
    }

    /// Called by the connection for each message taken off its queue.
    pub fn taken(&self, d: &Delivery) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.queued_bytes.fetch_sub(d.cost(), Ordering::Relaxed);
    }

    /// Tells the connection to close; the first reason wins. True if this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self
            .close_reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.close.notify_one();
        }
        first
    }

    /// Resolves once [`Outbox::close`] was called.
    pub async fn closed(&self) -> CloseReason {
        loop {
            match self.close_reason.load(Ordering::Acquire) {
                1 => return CloseReason::TakenOver,
                2 => return CloseReason::Kicked,
                3 => return CloseReason::Overflow,
                _ => self.close.notified().await,
            }
        }
    }
}

/// Monotonic counters (and two gauges) of the broker.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub sockets: AtomicUsize,
    pub connections: AtomicUsize,
    pub connects_total: AtomicU64,
    pub refused_connects: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub denied_publishes: AtomicU64,
    pub denied_subscriptions: AtomicU64,
    pub dropped: AtomicU64,
    pub overflows: AtomicU64,
    pub takeovers: AtomicU64,
    pub kicks: AtomicU64,
    pub tls_failures: AtomicU64,
}

#[derive(Debug)]
struct Session {
    client_id: String,
    outbox: Arc<Outbox>,
    filters: HashMap<String, u8>,
}

#[derive(Debug, Default)]
pub(crate) struct Tables {
    by_client: HashMap<String, u64>,
    sessions: HashMap<u64, Session>,
    subs: SubIndex<u64>,
    retained: RetainedIndex<Arc<Message>>,
}

impl Tables {
    fn drop_session(&mut self, conn: u64) -> Option<Session> {
        let s = self.sessions.remove(&conn)?;
        for f in s.filters.keys() {
            self.subs.remove(f, conn);
        }
        if self.by_client.get(&s.client_id) == Some(&conn) {
            self.by_client.remove(&s.client_id);
        }
        Some(s)
    }
}

/// Everything shared, independent of the authorizer's type.
#[derive(Debug)]
pub(crate) struct Core {
    pub config: Config,
    pub stats: Counters,
    next_conn: AtomicU64,
    tables: Mutex<Tables>,
}

impl Core {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            stats: Counters::default(),
            next_conn: AtomicU64::new(1),
            tables: Mutex::new(Tables::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave the tables half-updated in a way that
        // matters more than stopping the broker would; keep serving.
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a connected session, taking over (closing) an existing one with the same id.
    pub fn register(&self, conn: u64, client_id: &str, outbox: Arc<Outbox>) {
        let mut t = self.lock();
        if let Some(old) = t.by_client.get(client_id).copied()
            && let Some(s) = t.drop_session(old)
        {
            s.outbox.close(CloseReason::TakenOver);
            self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
        }
        t.by_client.insert(client_id.to_string(), conn);
        t.sessions.insert(
            conn,
            Session {
                client_id: client_id.to_string(),
                outbox,
                filters: HashMap::new(),
            },
        );
    }

    /// Removes a connection's session and subscriptions (no-op after a takeover).
    pub fn unregister(&self, conn: u64) {
        self.lock().drop_session(conn);
    }

    /// Routes a message to every matching subscription, storing or deleting the retained copy
    /// first when `retain` is set.
    pub fn publish(&self, msg: Arc<Message>, retain: bool) {
        let mut targets: Vec<(u64, u8, Arc<Outbox>)> = Vec::new();
        {
            let mut t = self.lock();
            if retain {
                if msg.payload.is_empty() {
                    t.retained.remove(&msg.topic);
                } else {
                    t.retained.set(&msg.topic, msg.clone());
                }
            }
            let t = &*t;
            t.subs.for_each_match(&msg.topic, |conn, qos| {
                if let Some(s) = t.sessions.get(&conn) {
                    targets.push((conn, qos.min(msg.qos), s.outbox.clone()));
                }
            });
        }
        if targets.len() > 1 {
            // One copy per connection, at the highest QoS of its matching filters.
            targets.sort_unstable_by_key(|(c, q, _)| (*c, std::cmp::Reverse(*q)));
            targets.dedup_by_key(|(c, _, _)| *c);
        }
        for (_, qos, outbox) in targets {
            outbox.push(
                Delivery {
                    msg: msg.clone(),
                    qos,
                    retain: false,
                },
                &self.stats,
            );
        }
    }

    /// Adds (or replaces) a subscription and returns the retained messages it matches.
    pub fn subscribe(&self, conn: u64, filter: &str, qos: u8, out: &mut Vec<Delivery>) {
        let mut t = self.lock();
        let Some(s) = t.sessions.get_mut(&conn) else {
            return;
        };
        s.filters.insert(filter.to_string(), qos);
        t.subs.insert(filter, conn, qos);
        t.retained.for_each_match(filter, |m| {
            out.push(Delivery {
                msg: m.clone(),
                qos: qos.min(m.qos),
                retain: true,
            });
        });
    }

    /// Removes a subscription.
    pub fn unsubscribe(&self, conn: u64, filter: &str) {
        let mut t = self.lock();
        if let Some(s) = t.sessions.get_mut(&conn)
            && s.filters.remove(filter).is_some()
        {
            t.subs.remove(filter, conn);
        }
    }

    /// Closes the connection of a client id; false if it is not connected.
    pub fn kick(&self, client_id: &str) -> bool {
        let t = self.lock();
        let Some(s) = t.by_client.get(client_id).and_then(|c| t.sessions.get(c)) else {
            return false;
        };
        if s.outbox.close(CloseReason::Kicked) {
            self.stats.kicks.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// (retained messages, subscriptions).
    pub fn sizes(&self) -> (usize, usize) {
        let t = self.lock();
        (t.retained.len(), t.subs.len())
    }

    /// The retained message of one topic, if any (for tests and diagnostics).
    pub fn retained(&self, topic: &str) -> Option<Bytes> {
        self.lock().retained.get(topic).map(|m| m.payload.clone())
    }
}
