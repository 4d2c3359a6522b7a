//! Shared by the chaos and rotation tests. Chaos: 200 simulated agents (real MQTT sessions, keys and verification) behind a Mosquitto
//! broker, with the standalone controller as a separate process. The broker, then the
//! controller, is killed with SIGKILL and restarted 20 times while mesh-wide changes roll out.
//! Afterwards every agent runs the controller's latest revision, no agent applied a revision
//! twice or two bodies under one revision, and a witness subscribed to every config topic never
//! saw two different envelopes for one (node, revision).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sidenet_bench::fleet::{Fleet, FleetOptions};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::reconcile::model::StatusRow;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A workspace binary next to this test's folder (`target/debug/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} is missing: run the workspace tests (`cargo test --workspace`) so every binary is built",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, at most `timeout`.
pub async fn until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let err = out.try_clone().unwrap();
        Proc(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn()
                .unwrap(),
        )
    }

    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub agents: usize,
}

impl Setup {
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        let s = Setup {
            dir,
            port: free_port(),
            agents: 200,
        };
        s.set_channel(36);
        std::fs::write(
            s.path("mosquitto.conf"),
            format!(
                "per_listener_settings false\nlistener {} 127.0.0.1\nallow_anonymous true\npersistence false\nmessage_size_limit 1048576\nmax_queued_messages 10000\n",
                s.port
            ),
        )
        .unwrap();
        s
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn set_channel(&self, ch: u32) {
        let text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml"))
            .unwrap()
            .replace("channel: 36", &format!("channel: {ch}"));
        assert!(text.contains(&format!("channel: {ch}")));
        // Written whole and renamed, so the controller never reads half a file.
        let tmp = self.path("mesh.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path("manifests/mesh.yaml")).unwrap();
    }

    pub fn broker(&self) -> Proc {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("mosquitto is not installed: run `scripts/test` once, it installs the peers");
        Proc::spawn(
            Command::new(exe).arg("-c").arg(self.path("mosquitto.conf")),
            &self.path("mosquitto.log"),
        )
    }

    pub async fn wait_broker(&self) {
        let port = self.port;
        until("mosquitto to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .await;
    }

    pub fn controller(&self) -> Proc {
        Proc::spawn(
            Command::new(bin("sidenet-controller"))
                .arg("standalone")
                .arg("--manifests")
                .arg(self.path("manifests"))
                .arg("--profiles")
                .arg(repo().join("hardware-profiles"))
                .arg("--templates")
                .arg(repo().join("templates"))
                .arg("--state")
                .arg(self.path("state"))
                .arg("--poll-ms")
                .arg("50")
                .arg("--broker")
                .arg(format!("mqtt://127.0.0.1:{}", self.port)),
            &self.path("controller.log"),
        )
    }

    pub fn status(&self) -> Option<Vec<StatusRow>> {
        match admin::call(&self.path("state"), &Request::Status).ok()? {
            Response::Status { nodes, .. } => Some(nodes),
            _ => None,
        }
    }

    pub async fn wait_controller(&self) {
        until(
            "the controller's admin socket",
            Duration::from_secs(30),
            || self.status(),
        )
        .await;
    }

    pub fn fleet(&self) -> Fleet {
        self.fleet_with(self.agents, 7, None)
    }

    /// `nodes` agents whose keys come from `seed`, with `mesh_key` pinned (else trusted on
    /// first use).
    pub fn fleet_with(
        &self,
        nodes: usize,
        seed: u64,
        mesh_key: Option<sidenet_wire::PublicKey>,
    ) -> Fleet {
        Fleet::start(&FleetOptions {
            host: "127.0.0.1".into(),
            port: self.port,
            mesh: "riverside".into(),
            nodes,
            seed,
            profile: "raspberrypi-4b-awus036acm".into(),
            mesh_key,
        })
    }

    /// The mesh's current signing key, from the controller's state folder.
    pub fn mesh_key(&self) -> sidenet_wire::PublicKey {
        let text = std::fs::read_to_string(self.path("state/keys/riverside.key")).unwrap();
        sidenet_wire::keys::KeyPair::from_file_text(&text)
            .unwrap()
            .public()
    }

    /// Waits until the controller and every agent agree: each node's applied revision (as the
    /// agent itself records it) is the controller's desired revision, and the controller saw it.
    pub async fn converged(&self, fleet: &Fleet, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.status().unwrap_or_default();
            let desired: HashMap<String, u64> = rows
                .iter()
                .filter_map(|r| Some((r.node.clone(), r.desired?.rev)))
                .collect();
            let behind: Vec<String> = fleet
                .ids
                .iter()
                .enumerate()
                .filter(|(i, id)| desired.get(*id) != Some(&fleet.revision(*i)))
                .map(|(i, id)| {
                    format!(
                        "{id}: agent {} desired {:?}",
                        fleet.revision(i),
                        desired.get(id)
                    )
                })
                .collect();
            let acked = fleet.ids.iter().all(|id| {
                rows.iter()
                    .any(|r| r.node == *id && r.desired.is_some() && r.applied == r.desired)
            });
            if behind.is_empty() && acked {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not converged after {timeout:?}: {} agents behind ({:?}), {} connected\n{}",
                behind.len(),
                behind.iter().take(3).collect::<Vec<_>>(),
                fleet.connected(),
                tail(&std::fs::read_to_string(self.path("controller.log")).unwrap_or_default())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Every config envelope seen on the broker, per (node, epoch, revision): the SHA-256 of the
/// whole envelope. Two different envelopes for one key is a violation.
/// (node, epoch, revision).
type ConfigId = (String, u64, u64);

/// A node's newest config: ((epoch, revision), body).
type Newest = ((u64, u64), sidenet_wire::messages::NodeConfig);

pub struct Witness {
    /// (node, epoch, revision) → (SHA-256 of the envelope, signer).
    seen: Mutex<HashMap<ConfigId, (String, sidenet_wire::PublicKey)>>,
    violations: Mutex<Vec<String>>,
    /// Node → its newest config seen: ((epoch, revision), body).
    latest: Mutex<HashMap<String, Newest>>,
}

impl Witness {
    /// Subscribes to every config topic (reconnecting across broker restarts) until dropped.
    pub fn start(port: u16) -> Arc<Witness> {
        let w = Arc::new(Witness {
            seen: Mutex::default(),
            violations: Mutex::default(),
            latest: Mutex::default(),
        });
        let weak = Arc::downgrade(&w);
        std::thread::spawn(move || {
            use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
            let mut opts = MqttOptions::new(format!("witness-{port}"), "127.0.0.1", port);
            opts.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut conn) = Client::new(opts, 1000);
            for ev in conn.iter() {
                let Some(w) = weak.upgrade() else { break };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ =
                            client.try_subscribe("sidenet/v1/+/nodes/+/config", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => w.record(&p.topic, &p.payload),
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        w
    }

    pub fn record(&self, topic: &str, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let node = topic.split('/').nth(4).unwrap_or_default().to_string();
        let env = sidenet_wire::Envelope::parse(payload, 1 << 20).unwrap();
        // Valid for the key it names; whether that is the right key is for the test to say.
        let signer = env.claimed_signer().unwrap();
        let verified = env.verify(sidenet_wire::Kind::Config, &signer).unwrap();
        let h = &verified.header;
        if let Ok(body) = verified.body_json::<sidenet_wire::messages::NodeConfig>() {
            let mut latest = self.latest.lock().unwrap();
            let newer = latest.get(&node).is_none_or(|(r, _)| *r < (h.epoch, h.rev));
            if newer {
                latest.insert(node.clone(), ((h.epoch, h.rev), body));
            }
        }
        let key = (node, h.epoch, h.rev);
        let sha = sidenet_wire::codec::sha256_hex(payload);
        let mut seen = self.seen.lock().unwrap();
        if let Some((prev, _)) = seen.insert(key.clone(), (sha.clone(), signer))
            && prev != sha
        {
            self.violations
                .lock()
                .unwrap()
                .push(format!("{key:?}: two different envelopes"));
        }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The newest config body seen for `node`.
    #[allow(dead_code)]
    pub fn latest_config(&self, node: &str) -> Option<sidenet_wire::messages::NodeConfig> {
        self.latest
            .lock()
            .unwrap()
            .get(node)
            .map(|(_, c)| c.clone())
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// The signer of each node's newest config seen.
    pub fn latest_signers(&self) -> HashMap<String, sidenet_wire::PublicKey> {
        let seen = self.seen.lock().unwrap();
        let mut best: HashMap<String, ((u64, u64), sidenet_wire::PublicKey)> = HashMap::new();
        for ((node, epoch, rev), (_, signer)) in seen.iter() {
            let e = best
                .entry(node.clone())
                .or_insert(((*epoch, *rev), *signer));
            if (*epoch, *rev) > e.0 {
                *e = ((*epoch, *rev), *signer);
            }
        }
        best.into_iter().map(|(n, (_, s))| (n, s)).collect()
    }
}

pub fn assert_clean(fleet: &Fleet, witness: &Witness) {
    let l = &fleet.ledger;
    assert_eq!(
        l.conflicts.load(Ordering::Relaxed),
        0,
        "an agent applied two bodies under one revision"
    );
    assert_eq!(
        l.repeats.load(Ordering::Relaxed),
        0,
        "an agent applied a revision twice"
    );
    assert_eq!(witness.violations(), Vec::<String>::new());
}
