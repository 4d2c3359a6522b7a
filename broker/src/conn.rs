//! One client connection: the CONNECT handshake, then a single task that reads packets,
//! writes what is queued for the client and enforces the keepalive.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::auth::{Authorizer, QueueLimits};
use crate::codec::{self, Connect, Packet, Publish, Will};
use crate::router::{CloseReason, Core, Delivery, Message, Outbox};
use crate::topic::{valid_client_id, valid_filter, valid_topic};

/// Stop reading from a client while this much is waiting to be written to it.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Most QoS 2 publishes a client may have awaiting PUBREL.
const MAX_AWAITING_REL: usize = 1024;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT from the client: no will.
    Clean,
    /// Taken over by a new connection with the same client id: no will.
    TakenOver,
    /// Broker shutdown: no will.
    Shutdown,
    /// Anything else (socket closed or failed, keepalive expired, protocol error, kicked,
    /// queue overflow): the will is published.
    Abrupt(&'static str),
}

/// A client's byte stream (plain TCP or TLS over TCP), split into halves that are read and
/// written from the same task.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send;
    type Write: AsyncWrite + Unpin + Send;
    /// Whether written bytes may wait in the stream until a flush (TLS).
    const BUFFERED: bool;
    fn halves(self) -> (Self::Read, Self::Write);
}

impl Stream for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    const BUFFERED: bool = false;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Stream for tokio_rustls::server::TlsStream<TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    const BUFFERED: bool = true;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Serves one accepted socket to the end.
pub(crate) async fn serve<A: Authorizer, S: Stream>(
    core: Arc<Core>,
    auth: Arc<A>,
    mut stream: S,
    peer: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut rbuf = BytesMut::with_capacity(512);
    // Before CONNECT nobody is known: the first packet gets the small limit.
    let max_first = core
        .config
        .max_connect_packet_size
        .min(core.config.max_packet_size);
    let first = tokio::select! {
        r = tokio::time::timeout(core.config.connect_timeout, read_packet(&mut stream, &mut rbuf, max_first)) => r,
        _ = shutdown.changed() => return,
    };
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(Packet::UnsupportedProtocol(level)))) => {
            tracing::debug!(%peer, level, "refused: unsupported protocol level");
            refuse(&core, &mut stream, 1).await;
            return;
        }
        Ok(Ok(Some(_))) => {
            tracing::debug!(%peer, "first packet is not CONNECT");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "before CONNECT: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time");
            return;
        }
    };
    let conn = core.next_conn_id();
    let mut connect = connect;
    if connect.client_id.is_empty() && connect.clean_session && !core.config.strict_client_ids {
        connect.client_id = format!("auto-{conn}");
    }
    if connect.client_id.is_empty()
        || (core.config.strict_client_ids && !valid_client_id(&connect.client_id))
    {
        tracing::debug!(%peer, client_id = ?connect.client_id, "refused: client identifier");
        refuse(&core, &mut stream, 2).await;
        return;
    }
    if let Some(w) = &connect.will
        && !valid_topic(&w.topic)
    {
        tracing::debug!(%peer, "invalid will topic");
        return;
    }
    let principal = match auth.connect(
        &connect.client_id,
        connect.username.as_deref(),
        connect.password.as_deref(),
    ) {
        Ok(p) => p,
        Err(r) => {
            tracing::debug!(%peer, client_id = %connect.client_id, "refused: {r:?}");
            refuse(&core, &mut stream, r.connack_code()).await;
            return;
        }
    };
    let limits = auth.queue_limits(&principal).unwrap_or(QueueLimits {
        messages: core.config.max_queued_messages,
        bytes: core.config.max_queued_bytes,
    });
    let (outbox, rx) = Outbox::new(limits);
    let registered = Registered::new(&core, conn, &connect.client_id, outbox.clone());
    core.stats.connects_total.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, client_id = %connect.client_id, "connected");

    let mut session = Session {
        core: &core,
        auth: &*auth,
        principal,
        conn,
        outbox,
        rx,
        wbuf: BytesMut::with_capacity(256),
        pending: VecDeque::new(),
        inflight: HashSet::new(),
        next_pkid: 0,
        awaiting_rel: HashSet::new(),
    };
    codec::connack(&mut session.wbuf, false, 0);
    let end = session.run(stream, rbuf, &connect, &mut shutdown).await;
    drop(registered);
    tracing::debug!(%peer, client_id = %connect.client_id, "disconnected: {end:?}");
    if let (End::Abrupt(_), Some(will)) = (end, connect.will) {
        session.publish_will(will);
    }
}

/// A connected client in the session table and in [`crate::Stats::connections`]; dropping it
/// removes both, however the connection's task ends (returns, panics, or is aborted).
struct Registered<'a> {
    core: &'a Core,
    conn: u64,
}

impl<'a> Registered<'a> {
    fn new(core: &'a Core, conn: u64, client_id: &str, outbox: Arc<Outbox>) -> Self {
        core.register(conn, client_id, outbox);
        core.stats.connections.fetch_add(1, Ordering::Relaxed);
        Self { core, conn }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.core.unregister(self.conn);
        self.core.stats.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes some of `buf` (true), or flushes when it is empty (false).
async fn write_or_flush(
    wr: &mut (impl AsyncWrite + Unpin),
    buf: &mut BytesMut,
) -> std::io::Result<bool> {
    if buf.is_empty() {
        wr.flush().await?;
        return Ok(false);
    }
    match wr.write_buf(buf).await? {
        0 => Err(std::io::ErrorKind::WriteZero.into()),
        _ => Ok(true),
    }
}

/// Reads until one packet is decoded; `Ok(None)` on end of stream.
async fn read_packet(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<Packet>, Box<dyn std::error::Error + Send + Sync>> {
    loop {
        if let Some(p) = codec::decode(buf, max_packet)? {
            return Ok(Some(p));
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn refuse(core: &Core, stream: &mut (impl AsyncWrite + Unpin), code: u8) {
    core.stats.refused_connects.fetch_add(1, Ordering::Relaxed);
    let mut out = BytesMut::with_capacity(4);
    codec::connack(&mut out, false, code);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

struct Session<'a, A: Authorizer> {
    core: &'a Core,
    auth: &'a A,
    principal: A::Principal,
    conn: u64,
    outbox: Arc<Outbox>,
    rx: tokio::sync::mpsc::UnboundedReceiver<Delivery>,
    wbuf: BytesMut,
    /// Retained messages owed for new subscriptions, sent before newer queued messages.
    pending: VecDeque<Delivery>,
    /// Packet ids of QoS 1 messages sent and not yet acknowledged.
    inflight: HashSet<u16>,
    next_pkid: u16,
    /// Packet ids of QoS 2 publishes received (and routed) awaiting PUBREL.
    awaiting_rel: HashSet<u16>,
}

impl<A: Authorizer> Session<'_, A> {
    async fn run<S: Stream>(
        &mut self,
        stream: S,
        mut rbuf: BytesMut,
        connect: &Connect,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let (mut rd, mut wr) = stream.halves();
        // A TLS stream may keep encrypted bytes after a write returned (the socket was full):
        // they go out on a flush. (A flush of plain TCP returns at once.)
        let mut unflushed = false;
        let keepalive = (connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
        let far = Duration::from_secs(86_400 * 365);
        let expiry = tokio::time::sleep(keepalive.unwrap_or(far));
        tokio::pin!(expiry);
        let outbox = self.outbox.clone();
        // Packets that arrived together with CONNECT.
        if let Err(end) = self.handle_buffered(&mut rbuf) {
            return end;
        }
        loop {
            self.fill();
            let can_take = self.can_send() && self.pending.is_empty();
            tokio::select! {
                reason = outbox.closed() => {
                    return match reason {
                        CloseReason::TakenOver => End::TakenOver,
                        CloseReason::Kicked => End::Abrupt("kicked"),
                        CloseReason::Overflow => End::Abrupt("outgoing queue full"),
                    };
                }
                _ = shutdown.changed() => return End::Shutdown,
                r = write_or_flush(&mut wr, &mut self.wbuf), if !self.wbuf.is_empty() || unflushed => {
                    match r {
                        Ok(wrote) => unflushed = wrote && S::BUFFERED,
                        Err(_) => return End::Abrupt("write failed"),
                    }
                    if self.wbuf.is_empty() && self.wbuf.capacity() > 4096 {
                        // A config of a few KiB went out; do not keep its buffer per idle client.
                        self.wbuf = BytesMut::with_capacity(256);
                    }
                }
                r = rd.read_buf(&mut rbuf), if self.wbuf.len() < WRITE_HIGH_WATER => {
                    match r {
                        Ok(0) => return End::Abrupt("connection closed without DISCONNECT"),
                        Err(_) => return End::Abrupt("read failed"),
                        Ok(_) => {}
                    }
                    match self.handle_buffered(&mut rbuf) {
                        // Only a complete packet counts as the client being alive
                        // (MQTT-3.1.2-24): a client trickling bytes of one packet is not.
                        Ok(n) => {
                            if let (Some(k), true) = (keepalive, n > 0) {
                                expiry.as_mut().reset(Instant::now() + k);
                            }
                        }
                        Err(end) => {
                            if end == End::Clean {
                                // Flush what is owed (acks) before closing; best effort.
                                let _ = wr.write_all(&self.wbuf).await;
                                let _ = wr.flush().await;
                            }
                            return end;
                        }
                    }
                    if rbuf.is_empty() && rbuf.capacity() > 4096 {
                        // Do not keep a large buffer per idle connection after one big packet.
                        rbuf = BytesMut::with_capacity(512);
                    }
                }
                d = self.rx.recv(), if can_take => {
                    if let Some(d) = d {
                        self.outbox.taken(&d);
                        self.send(&d);
                    }
                }
                _ = &mut expiry => return End::Abrupt("keepalive expired"),
            }
        }
    }

    fn can_send(&self) -> bool {
        self.wbuf.len() < WRITE_HIGH_WATER && self.inflight.len() < self.core.config.max_inflight
    }

    /// Moves owed retained messages and queued messages into the write buffer while there is
    /// room.
    fn fill(&mut self) {
        while self.can_send() {
            if let Some(d) = self.pending.pop_front() {
                self.send(&d);
                continue;
            }
            match self.rx.try_recv() {
                Ok(d) => {
                    self.outbox.taken(&d);
                    self.send(&d);
                }
                Err(_) => break,
            }
        }
    }

    fn send(&mut self, d: &Delivery) {
        let pkid = if d.qos > 0 { self.alloc_pkid() } else { 0 };
        let qos = d.qos.min(1);
        match codec::publish(
            &mut self.wbuf,
            &d.msg.topic,
            &d.msg.payload,
            qos,
            d.retain,
            pkid,
        ) {
            Ok(()) => {
                if qos > 0 {
                    self.inflight.insert(pkid);
                }
                self.core.stats.messages_out.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!("not sent: {e}"),
        }
    }

    fn alloc_pkid(&mut self) -> u16 {
        // The inflight window is far below 65535, so a free id is always found quickly.
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.inflight.contains(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Handles every whole packet in the read buffer and returns how many there were. `Err`
    /// ends the connection.
    fn handle_buffered(&mut self, rbuf: &mut BytesMut) -> Result<usize, End> {
        let mut n = 0;
        loop {
            let packet = match codec::decode(rbuf, self.core.config.max_packet_size) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(n),
                Err(e) => {
                    tracing::debug!(conn = self.conn, "protocol error: {e}");
                    return Err(End::Abrupt("protocol error"));
                }
            };
            self.handle(packet)?;
            n += 1;
        }
    }

    fn handle(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Connect(_) | Packet::UnsupportedProtocol(_) => {
                return Err(End::Abrupt("second CONNECT"));
            }
            Packet::Publish(p) => self.on_publish(p)?,
            Packet::PubAck(id) => {
                self.inflight.remove(&id);
            }
            Packet::PubRec(_) | Packet::PubComp(_) => {
                // The broker never sends QoS 2; ignore stray acknowledgements.
            }
            Packet::PubRel(id) => {
                self.awaiting_rel.remove(&id);
                codec::pubcomp(&mut self.wbuf, id);
            }
            Packet::Subscribe(pkid, filters) => {
                let mut codes = Vec::with_capacity(filters.len());
                let mut retained = Vec::new();
                for (filter, qos) in filters {
                    if !valid_filter(&filter) {
                        codes.push(0x80);
                        continue;
                    }
                    if !self.auth.may_subscribe(&self.principal, &filter) {
                        self.core
                            .stats
                            .denied_subscriptions
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(conn = self.conn, %filter, "subscription denied");
                        codes.push(0x80);
                        continue;
                    }
                    // QoS 2 subscriptions are granted QoS 1.
                    let granted = qos.min(1);
                    self.core
                        .subscribe(self.conn, &filter, granted, &mut retained);
                    codes.push(granted);
                }
                codec::suback(&mut self.wbuf, pkid, &codes);
                self.pending.extend(retained);
            }
            Packet::Unsubscribe(pkid, filters) => {
                for f in filters {
                    self.core.unsubscribe(self.conn, &f);
                }
                codec::unsuback(&mut self.wbuf, pkid);
            }
            Packet::PingReq => codec::pingresp(&mut self.wbuf),
            Packet::Disconnect => return Err(End::Clean),
        }
        Ok(())
    }

    fn on_publish(&mut self, p: Publish) -> Result<(), End> {
        if !valid_topic(&p.topic) {
            tracing::debug!(conn = self.conn, topic = %p.topic, "invalid topic name");
            return Err(End::Abrupt("invalid topic name"));
        }
        self.core.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        let route = match p.qos {
            0 => true,
            1 => {
                codec::puback(&mut self.wbuf, p.pkid);
                true
            }
            _ => {
                codec::pubrec(&mut self.wbuf, p.pkid);
                if self.awaiting_rel.len() >= MAX_AWAITING_REL {
                    return Err(End::Abrupt("too many QoS 2 publishes awaiting PUBREL"));
                }
                // A resent QoS 2 publish (same id before PUBREL) is routed only once.
                self.awaiting_rel.insert(p.pkid)
            }
        };
        if route {
            self.route(p.topic, p.payload, p.qos, p.retain);
        }
        Ok(())
    }

    fn route(&self, topic: String, payload: Bytes, qos: u8, retain: bool) {
        if !self.auth.may_publish(&self.principal, &topic) {
            self.core
                .stats
                .denied_publishes
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conn = self.conn, %topic, "publish denied");
            return;
        }
        // The payload is a slice of the connection's read buffer. A retained copy may live for
        // days: give it its own allocation so it does not pin the rest of that buffer.
        let payload = if retain {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        let msg = Arc::new(Message {
            topic: topic.into(),
            payload,
            qos: qos.min(1),
        });
        self.core.publish(msg, retain);
    }

    fn publish_will(&self, will: Will) {
        self.route(will.topic, will.payload, will.qos, will.retain);
    }
}
