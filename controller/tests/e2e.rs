//! End-to-end tests with real processes: the standalone controller (embedded broker or a real
//! Mosquitto), several `sidenet-agent` processes on the files backend, and a rogue MQTT client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Proc, bin, free_port, repo, wait_for};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_wire::keys::KeyPair;

const LINUX: &str = "raspberrypi-4b-awus036acm";
const OPENWRT: &str = "tplink-archer-c7-v2";
const WAIT: Duration = Duration::from_secs(30);

struct Agent {
    proc: Proc,
    root: PathBuf,
    args: Vec<String>,
}

struct Mesh {
    dir: tempfile::TempDir,
    port: u16,
    broker: Option<String>,
    ctl: Option<Proc>,
    agents: Vec<Agent>,
    _mosquitto: Option<Proc>,
    /// Extra controller arguments.
    ctl_args: Vec<String>,
}

impl Mesh {
    /// A mesh from the example manifest, with `edit` applied to its text.
    fn new(edit: impl Fn(String) -> String, mosquitto: bool) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        let text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap();
        std::fs::write(dir.path().join("manifests/mesh.yaml"), edit(text)).unwrap();
        let (mosq, broker, port) = if mosquitto {
            let (p, port) = common::mosquitto(dir.path());
            (Some(p), Some(format!("mqtt://127.0.0.1:{port}")), port)
        } else {
            (None, None, free_port())
        };
        let mut m = Mesh {
            dir,
            port,
            broker,
            ctl: None,
            agents: Vec::new(),
            _mosquitto: mosq,
            ctl_args: Vec::new(),
        };
        m.start_controller();
        m
    }

    /// The example mesh on Mosquitto with its dynamic security plugin, which the controller
    /// administers (`--broker-dynsec`).
    fn with_dynsec() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        std::fs::copy(
            repo().join("examples/riverside/mesh.yaml"),
            dir.path().join("manifests/mesh.yaml"),
        )
        .unwrap();
        let (p, port) = common::mosquitto_dynsec(dir.path());
        let (user, password) = common::DYNSEC_ADMIN;
        let mut m = Mesh {
            dir,
            port,
            broker: Some(format!("mqtt://127.0.0.1:{port}")),
            ctl: None,
            agents: Vec::new(),
            _mosquitto: Some(p),
            ctl_args: [
                "--broker-username",
                user,
                "--broker-password",
                password,
                "--broker-dynsec",
            ]
            .map(String::from)
            .to_vec(),
        };
        m.start_controller();
        m
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    fn start_controller(&mut self) {
        let mut cmd = Command::new(bin("sidenet-controller"));
        cmd.arg("standalone")
            .arg("--manifests")
            .arg(self.path("manifests"))
            .arg("--profiles")
            .arg(repo().join("hardware-profiles"))
            .arg("--templates")
            .arg(repo().join("templates"))
            .arg("--state")
            .arg(self.state())
            .arg("--poll-ms")
            .arg("100")
            .args(&self.ctl_args);
        match &self.broker {
            Some(b) => cmd.arg("--broker").arg(b),
            None => cmd.arg("--listen").arg(format!("127.0.0.1:{}", self.port)),
        };
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        self.ctl = Some(Proc::spawn(
            "controller",
            &mut cmd,
            &self.path(&format!("controller-{n}.log")),
        ));
        wait_for(
            "the controller's admin socket",
            WAIT,
            || admin::call(&self.state(), &Request::Status).ok(),
            || self.logs(),
        );
    }

    fn broker_url(&self) -> String {
        self.broker
            .clone()
            .unwrap_or_else(|| format!("mqtt://127.0.0.1:{}", self.port))
    }

    fn start_agent(&mut self, name: &str, profile: &str, extra: &[&str]) -> usize {
        let root = self.path(name);
        let mut args: Vec<String> = vec![
            "--mesh".into(),
            "riverside".into(),
            "--broker".into(),
            self.broker_url(),
            "--root".into(),
            root.display().to_string(),
            "--profile".into(),
            profile.into(),
            "--hostname".into(),
            name.into(),
            "--status-interval".into(),
            "2".into(),
            "--join".into(),
            common::join_code(&self.state()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(
            name,
            Command::new(bin("sidenet-agent")).args(&args),
            &self.path(&format!("{name}.log")),
        );
        self.agents.push(Agent { proc, root, args });
        self.agents.len() - 1
    }

    fn restart_agent(&mut self, i: usize) {
        let a = &mut self.agents[i];
        a.proc.kill();
        let name = a.proc.name.clone();
        a.proc = Proc::spawn(
            &name,
            Command::new(bin("sidenet-agent")).args(&a.args),
            &self.dir.path().join(format!("{name}-restarted.log")),
        );
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(c) = &self.ctl {
            s.push_str(&format!("--- controller\n{}\n", tail(&c.log_text())));
        }
        for a in &self.agents {
            s.push_str(&format!(
                "--- {}\n{}\n",
                a.proc.name,
                tail(&a.proc.log_text())
            ));
        }
        s
    }

    fn status(&self) -> Response {
        admin::call(&self.state(), &Request::Status).unwrap()
    }

    /// Edits the mesh manifest in one step (written beside it, then renamed over it): the
    /// controller polls the folder every 100 ms and would otherwise read it half-written (seen
    /// under load as a reload with no mesh, then one with the new text).
    fn set_mesh(&self, edit: impl Fn(String) -> String) {
        let p = self.path("manifests/mesh.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        let tmp = self.path("mesh.yaml.new");
        std::fs::write(&tmp, edit(text)).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    fn wait_rev(&self, i: usize, rev: u64) {
        let root = self.agents[i].root.clone();
        wait_for(
            &format!("{} to apply revision {rev}", self.agents[i].proc.name),
            WAIT,
            || (applied_rev(&root) == Some(rev)).then_some(()),
            || self.logs(),
        );
    }

    fn mesh_key(&self) -> KeyPair {
        let text = std::fs::read_to_string(self.state().join("keys/riverside.key")).unwrap();
        KeyPair::from_file_text(&text).unwrap()
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn applied_rev(root: &Path) -> Option<u64> {
    let text = std::fs::read(root.join("etc/sidenet-agent/current.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v["revision"]["rev"].as_u64()
}

fn node_id(root: &Path) -> String {
    let text = std::fs::read_to_string(root.join("etc/sidenet-agent/node.key")).unwrap();
    KeyPair::from_file_text(&text).unwrap().public().node_id()
}

fn read(root: &Path, p: &str) -> String {
    std::fs::read_to_string(root.join(p)).unwrap_or_default()
}

fn channel(c: u32) -> impl Fn(String) -> String {
    move |t| {
        let mut out = String::new();
        let mut in_5g = false;
        for line in t.lines() {
            if line.trim_start().starts_with("5g:") {
                in_5g = true;
            }
            if in_5g && line.trim_start().starts_with("channel:") {
                out.push_str(&format!("        channel: {c}\n"));
                in_5g = false;
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

fn mode(m: &'static str) -> impl Fn(String) -> String {
    move |t| t.replace("mode: auto", &format!("mode: {m}"))
}

/// The files for a 5 GHz channel: 802.11s frequency on Linux, the channel the OpenWrt wireless
/// batch requires of the owner's radio.
fn assert_channel(m: &Mesh, ch: u32) {
    let freq = 5000 + 5 * ch;
    for a in &m.agents {
        let linux = read(&a.root, "etc/sidenet/wpa_supplicant-mesh.conf");
        let uci = read(&a.root, "etc/sidenet/uci/wireless");
        assert!(
            linux.contains(&format!("frequency={freq}"))
                || uci.contains(&format!(".channel='{ch}'")),
            "{}: channel {ch} not in its files:\n{linux}{uci}",
            a.proc.name
        );
    }
}

fn run_loop(mosquitto: bool) {
    let mut m = Mesh::new(|t| t, mosquitto);
    m.start_agent("alpha", LINUX, &[]);
    m.start_agent("bravo", LINUX, &[]);
    m.start_agent("charlie", OPENWRT, &[]);
    for i in 0..3 {
        m.wait_rev(i, 1);
    }
    assert_channel(&m, 36);
    // The OpenWrt node got UCI files, the Linux nodes their own set.
    assert!(
        read(&m.agents[2].root, "etc/sidenet/uci/wireless")
            .contains("set wireless.sidenet_mesh.mesh_id='riverside'")
    );
    assert!(read(&m.agents[0].root, "etc/sidenet/babeld.conf").contains("fdfc:b395:f348::/48"));

    m.set_mesh(channel(44));
    for i in 0..3 {
        m.wait_rev(i, 2);
    }
    assert_channel(&m, 44);

    // The controller saw every acknowledgement.
    wait_for(
        "all three nodes Ready",
        WAIT,
        || match m.status() {
            Response::Status { nodes, .. } => (nodes.len() == 3
                && nodes
                    .iter()
                    .all(|n| n.phase == "Ready" && n.applied.map(|r| r.rev) == Some(2)))
            .then_some(()),
            _ => None,
        },
        || format!("{:?}\n{}", m.status(), m.logs()),
    );
}

#[test]
fn three_agents_embedded_broker() {
    run_loop(false);
}

#[test]
fn three_agents_mosquitto() {
    run_loop(true);
}

/// A bad manifest changes nothing: the last good configs stay, the error is reported.
#[test]
fn bad_manifest_keeps_last_good() {
    let mut m = Mesh::new(|t| t, false);
    m.start_agent("alpha", LINUX, &[]);
    m.wait_rev(0, 1);
    m.set_mesh(|t| t.replace("prefix: fdfc:b395:f348::/48", "prefix: 2001:db8::/48"));
    wait_for(
        "the manifest error to be reported",
        WAIT,
        || match m.status() {
            Response::Status {
                manifest_errors, ..
            } => manifest_errors
                .iter()
                .any(|e| e.contains("spec.prefix") && e.contains("mesh.yaml"))
                .then_some(()),
            _ => None,
        },
        || m.logs(),
    );
    // Fix it with a real change: exactly one new revision follows.
    m.set_mesh(|t| t.replace("prefix: 2001:db8::/48", "prefix: fdfc:b395:f348::/48"));
    m.set_mesh(channel(40));
    m.wait_rev(0, 2);
    assert_eq!(applied_rev(&m.agents[0].root), Some(2));
}

fn publish_raw(port: u16, topic: &str, payloads: Vec<Vec<u8>>) {
    use rumqttc::{Client, MqttOptions, QoS};
    let mut opts = MqttOptions::new(format!("rogue-{}", free_port()), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 100);
    let n = payloads.len();
    for p in payloads {
        client.publish(topic, QoS::AtLeastOnce, true, p).unwrap();
    }
    let mut acked = 0;
    for ev in conn.iter() {
        match ev {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                acked += 1;
                if acked == n {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("rogue client: {e}"),
        }
    }
    let _ = client.disconnect();
}

/// Forged, replayed, misdirected, expired, truncated and oversize configs are all refused; the
/// agent keeps its last good files and keeps working.
#[test]
fn tampered_configs_are_refused() {
    use sidenet_wire::envelope::seal;
    use sidenet_wire::{Header, Kind};
    // On Mosquitto without ACLs, so the rogue's messages reach the agent and the agent's own
    // checks are what refuses them (the embedded broker would drop them first; see
    // `the_embedded_broker_confines_clients_to_their_own_topics`).
    let mut m = Mesh::new(|t| t, true);
    let a = m.start_agent("alpha", LINUX, &[]);
    let b = m.start_agent("bravo", LINUX, &[]);
    m.wait_rev(a, 1);
    m.wait_rev(b, 1);
    let rev1 = std::fs::read(m.agents[a].root.join("etc/sidenet-agent/current.env")).unwrap();
    m.set_mesh(channel(44));
    m.wait_rev(a, 2);
    m.wait_rev(b, 2);
    let root = m.agents[a].root.clone();
    let good_files = read(&root, "etc/sidenet/wpa_supplicant-mesh.conf");
    let id = node_id(&root);
    let other = std::fs::read(m.agents[b].root.join("etc/sidenet-agent/current.env")).unwrap();
    let key = m.mesh_key();
    let now = sidenet_controller::now();
    let body = br#"{"mesh":"riverside","node":"x","hostname":"evil","role":"router","profile":"p","family":"linux","subnet":"fd00::/64","addresses":[],"files":[{"path":"etc/hostname","mode":420,"content":"pwned"}],"actions":[]}"#;
    let header = |mesh: &str, node: &str, rev: u64, exp: u64| Header {
        mesh: mesh.into(),
        node: Some(node.into()),
        epoch: u64::MAX / 2,
        rev,
        iat: now,
        exp,
        len: 0,
        sha256: String::new(),
    };
    let rogue = KeyPair::from_seed(&[0x42; 32]);
    let mut truncated = seal(
        Kind::Config,
        header("riverside", &id, 99, now + 60),
        body,
        &key,
    );
    truncated.truncate(truncated.len() - 10);
    let vectors: Vec<(&str, Vec<u8>)> = vec![
        (
            "forged by a rogue key",
            seal(
                Kind::Config,
                header("riverside", &id, 99, now + 60),
                body,
                &rogue,
            ),
        ),
        ("replayed older revision", rev1),
        ("another node's config", other),
        (
            "another mesh's config",
            seal(
                Kind::Config,
                header("hillside", &id, 99, now + 60),
                body,
                &key,
            ),
        ),
        (
            "expired config",
            seal(
                Kind::Config,
                header("riverside", &id, 99, now - 1),
                body,
                &key,
            ),
        ),
        ("truncated envelope", truncated),
        ("oversize payload", vec![b'S'; 300 * 1024]),
        ("not an envelope", b"{\"hello\":1}".to_vec()),
    ];
    let topic = sidenet_wire::topics::config("riverside", &id);
    let log_before = m.agents[a]
        .proc
        .log_text()
        .matches("config refused")
        .count();
    publish_raw(
        m.port,
        &topic,
        vectors.into_iter().map(|(_, v)| v).collect(),
    );
    // Refusals are logged (and reported) at most once a minute: the first one shows; the rest
    // are delivered before the controller's next config below, which the agent then applies.
    wait_for(
        "the agent to refuse the tampered configs",
        WAIT,
        || {
            let refused = m.agents[a]
                .proc
                .log_text()
                .matches("config refused")
                .count()
                - log_before;
            (refused >= 1).then_some(())
        },
        || m.logs(),
    );
    assert!(m.agents[a].proc.alive(), "agent died:\n{}", m.logs());
    assert_eq!(applied_rev(&root), Some(2));
    assert_eq!(
        read(&root, "etc/sidenet/wpa_supplicant-mesh.conf"),
        good_files
    );
    assert_ne!(read(&root, "etc/hostname"), "pwned");
    // Still working: the next real change applies.
    m.set_mesh(channel(48));
    m.wait_rev(a, 3);
    assert!(read(&root, "etc/sidenet/wpa_supplicant-mesh.conf").contains("frequency=5240"));
}

#[test]
fn approval_mode_waits_for_the_admin() {
    let mut m = Mesh::new(mode("approval"), false);
    let a = m.start_agent("alpha", LINUX, &[]);
    let root = m.agents[a].root.clone();
    wait_for(
        "the node to show as pending",
        WAIT,
        || match m.status() {
            Response::Status { nodes, .. } => nodes
                .iter()
                .find(|n| n.phase == "Pending")
                .map(|n| n.node.clone()),
            _ => None,
        },
        || m.logs(),
    );
    let id = node_id(&root);
    // Pending: nothing was published for it and nothing applied.
    match m.status() {
        Response::Status { nodes, .. } => {
            let n = nodes.iter().find(|n| n.node == id).unwrap();
            assert_eq!(n.desired, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(applied_rev(&root), None);
    let out = Command::new(bin("sidenetctl"))
        .args(["approve", &id, "--state"])
        .arg(m.state())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.wait_rev(a, 1);
}

#[test]
fn token_mode_refuses_wrong_and_reused_tokens() {
    let mut m = Mesh::new(mode("token"), false);
    let out = Command::new(bin("sidenetctl"))
        .args(["token", "--mesh", "riverside", "--state"])
        .arg(m.state())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(token.len(), 32);
    // Only the hash is stored.
    let db = std::fs::read(m.state().join("sidenet.redb")).unwrap();
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()));

    let wrong = m.start_agent(
        "wrong",
        LINUX,
        &["--token", "aaaabbbbccccddddeeeeffffgggghhhh"],
    );
    let good = m.start_agent("good", LINUX, &["--token", &token]);
    m.wait_rev(good, 1);
    let reuse = m.start_agent("reuse", LINUX, &["--token", &token]);
    wait_for(
        "two refused enrolments",
        WAIT,
        || match m.status() {
            Response::Status { counters, .. } => (counters.refused >= 2).then_some(()),
            _ => None,
        },
        || m.logs(),
    );
    assert_eq!(applied_rev(&m.agents[wrong].root), None);
    assert_eq!(applied_rev(&m.agents[reuse].root), None);
    match m.status() {
        Response::Status { nodes, .. } => {
            assert_eq!(nodes.len(), 1, "{nodes:?}");
            assert_eq!(nodes[0].node, node_id(&m.agents[good].root));
        }
        other => panic!("{other:?}"),
    }
}

/// `kill -9` of the controller mid-run: revisions continue, never repeat, agents converge.
#[test]
fn controller_restart_keeps_revisions() {
    let mut m = Mesh::new(|t| t, false);
    m.start_agent("alpha", LINUX, &[]);
    m.start_agent("charlie", OPENWRT, &[]);
    m.wait_rev(0, 1);
    m.wait_rev(1, 1);
    m.ctl.as_mut().unwrap().kill();
    // Change while the controller is down; the agents keep running on revision 1.
    m.set_mesh(channel(44));
    m.start_controller();
    m.wait_rev(0, 2);
    m.wait_rev(1, 2);
    assert_channel(&m, 44);
    // Kill again right after another change, before anyone could look. (Not 52: DE marks
    // 52-64 DFS, and the Linux node's USB radio cannot do radar detection.)
    m.set_mesh(channel(40));
    m.ctl.as_mut().unwrap().kill();
    m.start_controller();
    m.wait_rev(0, 3);
    m.wait_rev(1, 3);
    assert_channel(&m, 40);
    // An agent restarted from its disk state stays on the same revision.
    m.restart_agent(0);
    wait_for(
        "the restarted agent to report revision 3",
        WAIT,
        || match m.status() {
            Response::Status { nodes, .. } => nodes
                .iter()
                .all(|n| n.applied.map(|r| r.rev) == Some(3))
                .then_some(()),
            _ => None,
        },
        || m.logs(),
    );
    assert_eq!(applied_rev(&m.agents[0].root), Some(3));
}

/// Every message on the broker, as a client subscribed to `sidenet/#` receives it (retained
/// ones first), until `done` says enough or the deadline passes.
fn capture(broker: &str, done: impl Fn(&[(String, Vec<u8>)]) -> bool) -> Vec<(String, Vec<u8>)> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let (host, port) = sidenet_wire::topics::parse_broker_url(broker).unwrap();
    let mut opts = MqttOptions::new(format!("curious-{}", free_port()), host, port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 100);
    client.subscribe("sidenet/#", QoS::AtLeastOnce).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    while std::time::Instant::now() < deadline && !done(&got) {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got.push((p.topic.to_string(), p.payload.to_vec()))
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("curious client: {e}"),
        }
    }
    let _ = client.disconnect();
    got
}

/// The mesh passphrase never crosses the broker in clear: each config carries it sealed to its
/// node, which fills it into its files; another node's key cannot open it.
#[test]
fn the_passphrase_is_sealed_to_each_node() {
    // On Mosquitto without ACLs: even a client that may read every topic sees ciphertext only.
    let mut m = Mesh::new(|t| t, true);
    m.start_agent("alpha", LINUX, &[]);
    m.start_agent("bravo", OPENWRT, &[]);
    m.wait_rev(0, 1);
    m.wait_rev(1, 1);
    let secrets: Vec<_> = std::fs::read_dir(m.state().join("secrets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(secrets.len(), 1, "{secrets:?}");
    let pass = std::fs::read_to_string(&secrets[0])
        .unwrap()
        .trim()
        .to_string();
    assert!(pass.len() >= 16);
    // The nodes have it in their files.
    let alpha = &m.agents[0].root;
    let bravo = &m.agents[1].root;
    assert!(
        read(alpha, "etc/sidenet/wpa_supplicant-mesh.conf")
            .contains(&format!("sae_password=\"{pass}\""))
    );
    assert!(
        read(bravo, "etc/sidenet/uci/wireless")
            .contains(&format!("set wireless.sidenet_mesh.key='{pass}'"))
    );
    // A curious client on the broker sees both configs, but not the passphrase.
    let (a_id, b_id) = (node_id(alpha), node_id(bravo));
    let cfg_topic = |id: &str| format!("sidenet/v1/riverside/nodes/{id}/config");
    let seen = capture(&m.broker_url(), |got| {
        [&a_id, &b_id]
            .iter()
            .all(|id| got.iter().any(|(t, _)| *t == cfg_topic(id)))
    });
    let needle = pass.as_bytes();
    for (topic, payload) in &seen {
        assert!(
            !payload.windows(needle.len()).any(|w| w == needle),
            "the passphrase is readable on {topic}"
        );
    }
    let (_, env) = seen.iter().find(|(t, _)| *t == cfg_topic(&b_id)).unwrap();
    let env = sidenet_wire::Envelope::parse(env, 1 << 20).unwrap();
    let body: sidenet_wire::messages::NodeConfig = env
        .verify(sidenet_wire::Kind::Config, &m.mesh_key().public())
        .unwrap()
        .body_json()
        .unwrap();
    let sealed = &body.sealed["mesh-passphrase"];
    assert!(
        body.files
            .iter()
            .any(|f| f.content.contains("@sidenet-secret:mesh-passphrase@"))
    );
    let key =
        |root: &Path| KeyPair::from_file_text(&read(root, "etc/sidenet-agent/node.key")).unwrap();
    let ctx = |node| sidenet_wire::seal::Context {
        mesh: "riverside",
        node,
        name: "mesh-passphrase",
    };
    // Bravo's key opens it; alpha's does not, whatever node id it claims.
    assert_eq!(
        sidenet_wire::seal::open(&key(bravo), ctx(&b_id), sealed).unwrap(),
        pass.as_bytes()
    );
    assert!(sidenet_wire::seal::open(&key(alpha), ctx(&b_id), sealed).is_err());
    assert!(sidenet_wire::seal::open(&key(alpha), ctx(&a_id), sealed).is_err());
}

/// The embedded broker's ACLs (controller/src/acl.rs) with real clients: a client that is not
/// the controller may subscribe only to its own node's topics and the announcement; wildcard and
/// other nodes' filters are refused; client ids with `+`, `#` or `/` cannot connect; the agents
/// work as before.
#[test]
fn the_embedded_broker_confines_clients_to_their_own_topics() {
    use rumqttc::{
        Client, ConnectReturnCode, Event, MqttOptions, Packet, QoS, SubscribeReasonCode,
    };
    let mut m = Mesh::new(|t| t, false);
    m.start_agent("alpha", LINUX, &[]);
    m.wait_rev(0, 1);
    let alpha = node_id(&m.agents[0].root);
    let me = "curiousneighbour";
    let connect = |id: &str| {
        let mut opts = MqttOptions::new(id, "127.0.0.1", m.port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        Client::new(opts, 10)
    };
    // One SUBACK per filter, in order.
    let (client, mut conn) = connect(me);
    let filters = [
        ("sidenet/#".to_string(), false),
        ("sidenet/v1/+/nodes/+/config".to_string(), false),
        (format!("sidenet/v1/riverside/nodes/{alpha}/config"), false),
        (format!("sidenet/v1/riverside/nodes/{alpha}/status"), false),
        ("#".to_string(), false),
        ("sidenet/v1/riverside/announce".to_string(), true),
        (format!("sidenet/v1/riverside/nodes/{me}/config"), true),
    ];
    for (f, _) in &filters {
        client.subscribe(f.as_str(), QoS::AtLeastOnce).unwrap();
    }
    let mut answers = Vec::new();
    for ev in conn.iter() {
        match ev.unwrap() {
            Event::Incoming(Packet::SubAck(s)) => {
                answers.push(!matches!(s.return_codes[0], SubscribeReasonCode::Failure));
                if answers.len() == filters.len() {
                    break;
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                // Only what it may read: the retained announcement.
                assert_eq!(p.topic, "sidenet/v1/riverside/announce");
            }
            _ => {}
        }
    }
    let expected: Vec<bool> = filters.iter().map(|(_, ok)| *ok).collect();
    assert_eq!(answers, expected, "{filters:?}");
    let _ = client.disconnect();
    // Client ids that could be read as filters are refused at CONNECT.
    for bad in ["+", "#", "a/b"] {
        let (_c, mut conn) = connect(bad);
        let code = conn
            .iter()
            .find_map(|ev| match ev {
                Ok(Event::Incoming(Packet::ConnAck(a))) => Some(a.code),
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => Some(code),
                _ => None,
            })
            .unwrap();
        assert_ne!(code, ConnectReturnCode::Success, "{bad}");
    }
    // The agent still gets its configs: a channel change reaches it.
    m.set_mesh(channel(44));
    m.wait_rev(0, 2);
}

/// The CONNACK code a client with `client_id` (and optionally a username and password) gets.
fn connack(port: u16, client_id: &str, login: Option<(&str, &str)>) -> rumqttc::ConnectReturnCode {
    use rumqttc::{Client, Event, MqttOptions, Packet};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut conn) = Client::new(opts, 10);
    let code = conn
        .iter()
        .find_map(|ev| match ev {
            Ok(Event::Incoming(Packet::ConnAck(a))) => Some(a.code),
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => Some(code),
            Err(e) => panic!("connecting as {client_id}: {e}"),
            _ => None,
        })
        .unwrap();
    let _ = client.disconnect();
    code
}

/// Per-node broker credentials on the embedded broker with real agents: each config carries the
/// node's password sealed to it; the agent logs in with it and says so; from then on the broker
/// refuses the node's id without it (no session takeover), also right after a controller
/// restart; the agents keep getting configs; another node's password does not open it.
#[test]
fn nodes_log_in_with_their_own_broker_password() {
    use rumqttc::ConnectReturnCode;
    let mut m = Mesh::new(|t| t, false);
    m.start_agent("alpha", LINUX, &[]);
    m.start_agent("bravo", LINUX, &[]);
    m.wait_rev(0, 1);
    m.wait_rev(1, 1);
    let (alpha, bravo) = (node_id(&m.agents[0].root), node_id(&m.agents[1].root));
    let password = |root: &Path| {
        read(root, "etc/sidenet-agent/mqtt.password")
            .trim()
            .to_string()
    };
    let pa = wait_for(
        "alpha to keep its broker password",
        WAIT,
        || std::fs::read_to_string(m.agents[0].root.join("etc/sidenet-agent/mqtt.password")).ok(),
        || m.logs(),
    );
    assert!(pa.trim().len() >= 40, "a 256-bit password");
    let pb = wait_for(
        "bravo to keep its broker password",
        WAIT,
        || std::fs::read_to_string(m.agents[1].root.join("etc/sidenet-agent/mqtt.password")).ok(),
        || m.logs(),
    );
    assert_ne!(pa.trim(), pb.trim());
    // Once alpha logged in with it and said so, its id needs it.
    wait_for(
        "the broker to refuse alpha's id without its password",
        WAIT,
        || (connack(m.port, &alpha, None) == ConnectReturnCode::NotAuthorized).then_some(()),
        || m.logs(),
    );
    let takeovers = [
        connack(m.port, &alpha, None),
        connack(m.port, &alpha, Some((&alpha, "guess"))),
        connack(m.port, &alpha, Some((&alpha, pb.trim()))),
        connack(m.port, &alpha, Some((&bravo, pb.trim()))),
        connack(m.port, &alpha, Some((&alpha, ""))),
    ];
    assert!(
        takeovers.iter().all(|c| *c != ConnectReturnCode::Success),
        "{takeovers:?}"
    );
    // The agents still get their configs (logged in with their passwords).
    m.set_mesh(channel(44));
    m.wait_rev(0, 2);
    m.wait_rev(1, 2);
    assert!(
        m.agents[0]
            .proc
            .log_text()
            .contains("with this node's broker password")
    );
    // A restarted controller insists from its first moment (the credentials are loaded before
    // the broker listens), and the agents reconnect with the same passwords.
    m.ctl.as_mut().unwrap().kill();
    m.start_controller();
    wait_for(
        "the restarted broker to answer",
        WAIT,
        || {
            std::net::TcpStream::connect(("127.0.0.1", m.port))
                .ok()
                .map(|_| ())
        },
        || m.logs(),
    );
    assert_eq!(
        connack(m.port, &alpha, None),
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(password(&m.agents[0].root), pa.trim());
    m.set_mesh(channel(40));
    m.wait_rev(0, 3);
    m.wait_rev(1, 3);
    assert_channel(&m, 40);
    // Removing alpha revokes its credentials (durably) and clears its retained config. Alpha
    // is stopped first: nothing of it may publish or subscribe while its removal is checked.
    m.agents[0].proc.kill();
    match admin::call(
        &m.state(),
        &Request::Remove {
            node: alpha.clone(),
        },
    )
    .unwrap()
    {
        Response::Removed { node, .. } => assert_eq!(node, alpha),
        other => panic!("{other:?}"),
    }
    assert_eq!(connack(m.port, &alpha, None), ConnectReturnCode::Success);
    // Alpha's id (now without credentials) subscribes to its config, then to the announcement:
    // a retained config would arrive first. The controller publishes the empty retained
    // message that clears it right after answering `remove`, so this polls for it.
    let first_topic = || {
        use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
        let cfg = format!("sidenet/v1/riverside/nodes/{alpha}/config");
        let (client, mut conn) = Client::new(MqttOptions::new(&alpha, "127.0.0.1", m.port), 10);
        client.subscribe(cfg.as_str(), QoS::AtLeastOnce).unwrap();
        client
            .subscribe("sidenet/v1/riverside/announce", QoS::AtLeastOnce)
            .unwrap();
        let first = conn
            .iter()
            .find_map(|ev| match ev.unwrap() {
                Event::Incoming(Packet::Publish(p)) => Some(p.topic.to_string()),
                _ => None,
            })
            .unwrap();
        let _ = client.disconnect();
        (first != cfg).then_some(())
    };
    wait_for(
        "alpha's retained config to be cleared",
        WAIT,
        first_topic,
        || m.logs(),
    );
    m.ctl.as_mut().unwrap().kill();
    m.start_controller();
    assert_eq!(connack(m.port, &alpha, None), ConnectReturnCode::Success);
    assert_eq!(
        connack(m.port, &bravo, None),
        ConnectReturnCode::NotAuthorized
    );
}

/// Per-node credentials on Mosquitto, administered by the controller through the dynamic
/// security plugin, with real agents: they get their passwords, log in with them and are armed;
/// then a client claiming alpha's id without the password, or logged in as bravo, can read and
/// write none of alpha's topics; the agents keep getting configs.
#[test]
fn mosquitto_nodes_log_in_with_their_own_broker_password() {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
    let mut m = Mesh::with_dynsec();
    m.start_agent("alpha", LINUX, &[]);
    m.start_agent("bravo", LINUX, &[]);
    m.wait_rev(0, 1);
    m.wait_rev(1, 1);
    let (alpha, bravo) = (node_id(&m.agents[0].root), node_id(&m.agents[1].root));
    let pb = wait_for(
        "bravo to keep its broker password",
        WAIT,
        || std::fs::read_to_string(m.agents[1].root.join("etc/sidenet-agent/mqtt.password")).ok(),
        || m.logs(),
    );
    // Whether `id` (with `login`) may subscribe to alpha's config.
    let may_read_alpha = |id: &str, login: Option<(&str, &str)>| -> Option<bool> {
        let mut o = MqttOptions::new(id, "127.0.0.1", m.port);
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (client, mut conn) = Client::new(o, 10);
        client
            .subscribe(
                format!("sidenet/v1/riverside/nodes/{alpha}/config"),
                QoS::AtLeastOnce,
            )
            .unwrap();
        let answer = conn.iter().find_map(|ev| match ev {
            Ok(Event::Incoming(Packet::SubAck(s))) => Some(Some(!matches!(
                s.return_codes[0],
                SubscribeReasonCode::Failure
            ))),
            Err(_) => Some(None),
            _ => None,
        });
        let _ = client.disconnect();
        answer.flatten()
    };
    // Armed once alpha logged in with its password and said so: anonymous clients lose the
    // enrolment window on its topics.
    wait_for(
        "alpha's topics to be closed to clients without its password",
        WAIT,
        || (may_read_alpha("snoop", None) == Some(false)).then_some(()),
        || m.logs(),
    );
    assert_ne!(
        may_read_alpha(&alpha, None),
        Some(true),
        "a takeover without password"
    );
    assert_ne!(
        may_read_alpha(&bravo, Some((&bravo, pb.trim()))),
        Some(true),
        "bravo's credentials"
    );
    assert_ne!(
        may_read_alpha(&alpha, Some((&alpha, pb.trim()))),
        Some(true),
        "bravo's password"
    );
    // The takeover attempt kicked alpha (Mosquitto allows that); it comes back with its
    // password, and both keep getting configs.
    m.set_mesh(channel(44));
    m.wait_rev(0, 2);
    m.wait_rev(1, 2);
    assert_channel(&m, 44);
    let log = m.ctl.as_ref().unwrap().log_text();
    assert!(
        !log.contains("Mosquitto dynamic security:"),
        "plugin errors: {log}"
    );
}
