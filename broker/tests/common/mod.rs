//! Test helpers: a broker on a free loopback port, rumqttc clients whose events arrive on a
//! channel, a raw MQTT socket for byte-exact checks, and Mosquitto's command-line clients.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use sidenet_broker::{Authorizer, Broker, BrokerHandle, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `f` or fails the test after `WAIT`.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Polls `cond` until it holds (deadline `WAIT`).
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

pub struct Running {
    pub addr: SocketAddr,
    pub handle: BrokerHandle,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Aborts the task running the broker (its future is dropped mid-flight, as when the
    /// runtime running it shuts down) and waits until it is gone.
    pub async fn abort(self) {
        self.task.abort();
        let r = within("broker task abort", self.task).await;
        assert!(
            r.is_err_and(|e| e.is_cancelled()),
            "the broker task was not cancelled"
        );
    }

    /// Stops the broker and waits until `run` returned.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        within("broker shutdown", &mut self.task).await.unwrap();
    }
}

pub async fn start(config: Config) -> Running {
    start_with(Broker::new(config)).await
}

pub async fn start_with<A: Authorizer>(broker: Broker<A>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = broker.handle();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(broker.run(listener, async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        handle,
        stop: Some(tx),
        task,
    }
}

/// A rumqttc client whose incoming packets (or the error that ended it) arrive on `events`.
pub struct Client {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<Result<Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    pub fn options(id: &str, port: u16) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o.set_max_packet_size(1 << 20, 1 << 20);
        o
    }

    pub async fn connect(id: &str, port: u16) -> Client {
        Self::connect_with(Self::options(id, port)).await
    }

    /// Connects and waits for CONNACK.
    pub async fn connect_with(opts: MqttOptions) -> Client {
        let mut c = Self::start(opts);
        match c.next().await {
            Ok(Packet::ConnAck(_)) => c,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Starts the event loop without waiting; it stops at the first error.
    pub fn start(opts: MqttOptions) -> Client {
        let (client, mut el) = AsyncClient::new(opts, 1000);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(describe(&e)));
                        return;
                    }
                }
            }
        });
        Client {
            client,
            events,
            task,
        }
    }

    /// The next incoming packet (PINGRESP skipped).
    pub async fn next(&mut self) -> Result<Packet, String> {
        within("next MQTT event", async {
            loop {
                match self.events.recv().await {
                    Some(Ok(Packet::PingResp)) => continue,
                    Some(ev) => return ev,
                    None => return Err("event loop ended".into()),
                }
            }
        })
        .await
    }

    /// The next PUBLISH, skipping acknowledgements.
    pub async fn publish_in(&mut self) -> rumqttc::Publish {
        loop {
            match self.next().await {
                Ok(Packet::Publish(p)) => return p,
                Ok(Packet::PubAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_)) => {}
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> rumqttc::SubAck {
        self.client.subscribe(filter, qos).await.unwrap();
        loop {
            match self.next().await {
                Ok(Packet::SubAck(a)) => return a,
                Ok(Packet::Publish(p)) => panic!("PUBLISH {} before SUBACK", p.topic),
                Ok(_) => {}
                Err(e) => panic!("subscribe {filter}: {e}"),
            }
        }
    }

    pub async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .unwrap_or_else(|e| panic!("publish {topic}: {e}"));
    }

    /// Drops the connection without DISCONNECT.
    pub fn kill(self) {
        self.task.abort();
    }
}

pub fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!("refused {code:?}"),
        other => other.to_string(),
    }
}

/// A hand-driven MQTT connection, for checks rumqttc would not let us make.
pub struct Raw {
    pub stream: TcpStream,
}

pub fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

#[derive(Default)]
pub struct RawConnect<'a> {
    pub level: u8,
    pub id: &'a [u8],
    pub keep_alive: u16,
    pub will: Option<(&'a str, &'a [u8], u8, bool)>,
    pub user: Option<(&'a str, &'a [u8])>,
    /// Clean session off.
    pub persistent: bool,
}

impl RawConnect<'_> {
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        string(&mut b, b"MQTT");
        b.push(if self.level == 0 { 4 } else { self.level });
        let mut flags = if self.persistent { 0 } else { 0x02 };
        if let Some((_, _, qos, retain)) = self.will {
            flags |= 0x04 | (qos << 3) | if retain { 0x20 } else { 0 };
        }
        if self.user.is_some() {
            flags |= 0xc0;
        }
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        string(&mut b, self.id);
        if let Some((t, p, _, _)) = self.will {
            string(&mut b, t.as_bytes());
            string(&mut b, p);
        }
        if let Some((u, p)) = self.user {
            string(&mut b, u.as_bytes());
            string(&mut b, p);
        }
        frame(0x10, &b)
    }
}

impl Raw {
    pub async fn open(port: u16) -> Raw {
        Raw {
            stream: TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
        }
    }

    /// Connects and returns the CONNACK return code.
    pub async fn connect(port: u16, c: &RawConnect<'_>) -> (Raw, u8) {
        let mut r = Raw::open(port).await;
        r.send(&c.bytes()).await;
        let (first, body) = r.read().await.expect("CONNACK");
        assert_eq!(first, 0x20, "expected CONNACK");
        assert_eq!(body[0], 0, "session present");
        (r, body[1])
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// One packet (first byte, body), or None when the broker closed the connection.
    pub async fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        within("raw read", async {
            let mut first = [0u8; 1];
            if self.stream.read_exact(&mut first).await.is_err() {
                return None;
            }
            let mut len = 0usize;
            let mut shift = 0;
            loop {
                let mut b = [0u8; 1];
                self.stream.read_exact(&mut b).await.ok()?;
                len |= usize::from(b[0] & 0x7f) << shift;
                shift += 7;
                if b[0] & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            self.stream.read_exact(&mut body).await.ok()?;
            Some((first[0], body))
        })
        .await
    }

    /// Reads until the broker closes the connection; panics on a deadline.
    pub async fn closed(&mut self) {
        while self.read().await.is_some() {}
    }

    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        let mut b = vec![0, 1];
        string(&mut b, filter.as_bytes());
        b.push(qos);
        self.send(&frame(0x82, &b)).await;
        let (first, body) = self.read().await.expect("SUBACK");
        assert_eq!(first, 0x90);
        body[2]
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8], retain: bool) {
        let mut b = Vec::new();
        string(&mut b, topic.as_bytes());
        b.extend_from_slice(payload);
        self.send(&frame(0x30 | u8::from(retain), &b)).await;
    }
}

/// Runs a Mosquitto command-line client to completion and returns (success, stdout).
pub async fn mosquitto(tool: &str, args: &[&str]) -> (bool, String) {
    let exe = format!("/usr/bin/{tool}");
    assert!(
        std::path::Path::new(&exe).exists(),
        "{tool} is not installed: run scripts/install-peers (Debian package mosquitto-clients)"
    );
    let out = within(
        tool,
        tokio::process::Command::new(&exe)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    if !out.status.success() {
        eprintln!(
            "{tool} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
