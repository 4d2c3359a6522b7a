//! The fleet simulator: N agents in one process, each with its own MQTT connection, its own key
//! and the real agent core (signature checks, revision and expiry rules, config parsing). Only
//! the final write to disk is replaced by an in-memory "applied" marker, so thousands of agents
//! fit on a 2-core machine.
//!
//! Keys are derived from a seed (`SHA-256("sidenet-sim/SEED/i")`), so a second run with the same
//! seed reuses the node identities of the first (re-connect instead of an enrolment storm).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use sidenet_agent::core::{Agent, Effect, Event, Settings};
use sidenet_wire::Revision;
use sidenet_wire::codec::sha256;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::EnrollRequest;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Mesh network name.
    pub mesh: String,
    /// Number of agents.
    pub nodes: usize,
    /// Key seed (same seed, same node ids).
    pub seed: u64,
    /// Hardware profile the agents ask for.
    pub profile: String,
    /// Mesh key pinned at start (as provisioning pins it); `None`: trust the first key
    /// announced (as `sidenet-agent --trust-first-key`).
    pub mesh_key: Option<sidenet_wire::PublicKey>,
}

/// Every apply of every agent: which body each (agent, revision) got, so a test can prove that
/// no revision was applied twice or with two different contents.
#[derive(Debug, Default)]
pub struct Ledger {
    bodies: Mutex<HashMap<(usize, Revision), String>>,
    /// Applies of a (agent, revision) that was applied before with the same body.
    pub repeats: AtomicU64,
    /// Applies of a (agent, revision) that was applied before with a different body.
    pub conflicts: AtomicU64,
    /// All applies.
    pub applies: AtomicU64,
}

impl Ledger {
    fn record(&self, agent: usize, revision: Revision, sha256: &str) {
        self.applies.fetch_add(1, Ordering::Relaxed);
        let mut map = match self.bodies.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match map.insert((agent, revision), sha256.to_string()) {
            None => {}
            Some(prev) if prev == sha256 => {
                self.repeats.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                self.conflicts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    applied: Arc<Vec<AtomicU64>>,
    /// Every apply, for checking revisions after the fact.
    pub ledger: Arc<Ledger>,
    connected: Arc<AtomicUsize>,
    logged_in: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Node ids, by agent index.
    pub ids: Vec<String>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The key of simulated agent `i`.
pub fn key(seed: u64, i: usize) -> KeyPair {
    KeyPair::from_seed(&sha256(format!("sidenet-sim/{seed}/{i}").as_bytes()))
}

impl Fleet {
    /// The key of every agent of `opts` (what each agent would have generated on its first
    /// start, on its own CPU): made before [`Fleet::start_with`] so timings leave it out.
    pub fn keys(opts: &FleetOptions) -> Vec<KeyPair> {
        (0..opts.nodes).map(|i| key(opts.seed, i)).collect()
    }

    /// Starts every agent; they connect, pin the mesh key on first use and enrol.
    pub fn start(opts: &FleetOptions) -> Fleet {
        Self::start_with(opts, Self::keys(opts))
    }

    /// [`Fleet::start`] with the keys made by [`Fleet::keys`].
    pub fn start_with(opts: &FleetOptions, keys: Vec<KeyPair>) -> Fleet {
        let applied: Arc<Vec<AtomicU64>> =
            Arc::new((0..keys.len()).map(|_| AtomicU64::new(0)).collect());
        let connected = Arc::new(AtomicUsize::new(0));
        let logged_in = Arc::new(AtomicUsize::new(0));
        let ledger = Arc::new(Ledger::default());
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut ids = Vec::with_capacity(keys.len());
        for (i, k) in keys.into_iter().enumerate() {
            ids.push(k.public().node_id());
            tasks.spawn(run_agent(
                i,
                k,
                opts.clone(),
                Shared {
                    applied: applied.clone(),
                    ledger: ledger.clone(),
                    connected: connected.clone(),
                    logged_in: logged_in.clone(),
                },
                stop_rx.clone(),
            ));
        }
        Fleet {
            applied,
            ledger,
            connected,
            logged_in,
            stop,
            tasks,
            ids,
        }
    }

    /// Agents running revision `rev` or later.
    pub fn at_least(&self, rev: u64) -> usize {
        self.applied
            .iter()
            .filter(|a| a.load(Ordering::Relaxed) >= rev)
            .count()
    }

    /// Agents with an MQTT session.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Agents with an MQTT session logged in with their own broker password.
    pub fn logged_in(&self) -> usize {
        self.logged_in.load(Ordering::Relaxed)
    }

    /// Waits until every agent has logged in again with the broker password of its first
    /// config: the fleet has settled after a first rollout.
    pub async fn wait_logged_in(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.logged_in() < self.applied.len() {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "only {} of {} agents logged in with their password within {timeout:?}",
                    self.logged_in(),
                    self.applied.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// The revision agent `i` runs.
    pub fn revision(&self, i: usize) -> u64 {
        self.applied[i].load(Ordering::Relaxed)
    }

    /// The revision every agent runs now.
    pub fn snapshot(&self) -> Vec<u64> {
        self.applied
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// Agents running something newer than in `snapshot`.
    pub fn past(&self, snapshot: &[u64]) -> usize {
        self.applied
            .iter()
            .zip(snapshot)
            .filter(|(a, s)| a.load(Ordering::Relaxed) > **s)
            .count()
    }

    /// Waits until every agent runs revision `rev` or later; returns the time since `since`.
    pub async fn wait_all(
        &self,
        rev: u64,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let floor = vec![rev.saturating_sub(1); self.applied.len()];
        self.wait_past(&floor, since, timeout).await
    }

    /// Waits until every agent runs something newer than in `snapshot`.
    pub async fn wait_past(
        &self,
        snapshot: &[u64],
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let deadline = since + timeout;
        let mut last_report = Instant::now();
        let rev = "a newer revision";
        loop {
            let n = self.past(snapshot);
            if n == self.applied.len() {
                return Ok(since.elapsed());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "only {n} of {} agents reached revision {rev} within {timeout:?} ({} connected)",
                    self.applied.len(),
                    self.connected()
                );
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "  … {n}/{} agents at revision {rev}, {} connected",
                    self.applied.len(),
                    self.connected()
                );
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops every agent.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What every simulated agent updates.
struct Shared {
    applied: Arc<Vec<AtomicU64>>,
    ledger: Arc<Ledger>,
    connected: Arc<AtomicUsize>,
    logged_in: Arc<AtomicUsize>,
}

async fn run_agent(
    i: usize,
    key: KeyPair,
    opts: FleetOptions,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
) {
    let Shared {
        applied,
        ledger,
        connected,
        logged_in: logged_in_count,
    } = shared;
    let settings = Settings {
        mesh: opts.mesh.clone(),
        max_envelope: sidenet_wire::envelope::DEFAULT_MAX_ENVELOPE,
        enroll: EnrollRequest {
            hostname: format!("sim-{i}"),
            board: None,
            profile: Some(opts.profile.clone()),
            token: None,
            backend: "memory".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            wireguard: None,
        },
        status_every: 600,
        enroll_every: 10,
    };
    let node_id = key.public().node_id();
    let mut agent = Agent::new(settings, key, opts.mesh_key, None, now(), now());
    if opts.mesh_key.is_none() {
        // The simulated fleet trusts the first announced key (`--trust-first-key`).
        agent.set_trust(sidenet_agent::core::join::Trust::FirstKey);
    }
    let mut mo = MqttOptions::new(node_id.clone(), opts.host.clone(), opts.port);
    mo.set_keep_alive(Duration::from_secs(120));
    mo.set_clean_session(true);
    mo.set_max_packet_size(1 << 20, 64 * 1024);
    let anonymous = mo.clone();
    let (client, mut el) = AsyncClient::new(mo, 16);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut is_connected = false;
    let mut is_logged_in = false;
    // The node's broker password (from its config), as the real agent keeps it; `relogin`:
    // the next reconnection is the agent's own, to log in with it (no back-off).
    let mut password: Option<String> = None;
    let mut relogin = false;
    loop {
        let ev = tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => Event::Tick,
            r = el.poll() => match r {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    if !is_connected {
                        connected.fetch_add(1, Ordering::Relaxed);
                        is_connected = true;
                    }
                    let logged_in = el.mqtt_options.credentials().is_some();
                    if logged_in && !is_logged_in {
                        logged_in_count.fetch_add(1, Ordering::Relaxed);
                        is_logged_in = true;
                    }
                    agent.set_mqtt_login(password.clone(), logged_in);
                    Event::Connected
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => Event::Message {
                    topic: p.topic.to_string(),
                    payload: p.payload.to_vec(),
                },
                Ok(_) => continue,
                Err(e) => {
                    if is_connected {
                        connected.fetch_sub(1, Ordering::Relaxed);
                        is_connected = false;
                    }
                    if is_logged_in {
                        logged_in_count.fetch_sub(1, Ordering::Relaxed);
                        is_logged_in = false;
                    }
                    if std::mem::take(&mut relogin) {
                        continue;
                    }
                    // Refused with (or without) the password: try the other way, as the agent.
                    if let rumqttc::ConnectionError::ConnectionRefused(_) = e
                        && let Some(p) = &password
                    {
                        if el.mqtt_options.credentials().is_some() {
                            el.mqtt_options = anonymous.clone();
                        } else {
                            el.mqtt_options.set_credentials(node_id.clone(), p.clone());
                        }
                    }
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            },
        };
        let mut queue = vec![ev];
        while let Some(ev) = queue.pop() {
            for effect in agent.handle(ev, now()) {
                match effect {
                    Effect::Subscribe(t) => {
                        let _ = client.subscribe(t, QoS::AtLeastOnce).await;
                    }
                    Effect::Publish {
                        topic,
                        payload,
                        retain,
                    } => {
                        let _ = client
                            .publish(topic, QoS::AtLeastOnce, retain, payload)
                            .await;
                    }
                    Effect::PinMeshKey(_) | Effect::Log(..) => {}
                    Effect::MqttPassword(p) => {
                        el.mqtt_options.set_credentials(node_id.clone(), p.clone());
                        password = Some(p);
                        if is_connected {
                            relogin = true;
                            let _ = client.disconnect().await;
                        }
                    }
                    Effect::Apply {
                        revision, sha256, ..
                    } => {
                        applied[i].store(revision.rev, Ordering::Relaxed);
                        ledger.record(i, revision, &sha256);
                        queue.push(Event::Applied {
                            revision,
                            sha256,
                            result: Ok(()),
                        });
                    }
                    // Trial effects: this simulated agent has no trial (it confirms at once).
                    _ => {}
                }
            }
        }
    }
    let _ = client.disconnect().await;
}
