//! Joining a mesh from outside, end to end with real processes: join codes against a rogue
//! announcement on a broker anyone may publish to (Mosquitto without dynamic security), an
//! enrolment flood in approval mode, and a mesh switched from auto to approval.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, bin, repo, wait_for};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::reconcile::model::StatusRow;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{Announce, EnrollRequest};
use sidenet_wire::{Header, Kind, topics};

const PROFILE: &str = "raspberrypi-4b-awus036acm";
const WAIT: Duration = Duration::from_secs(30);

/// A standalone controller on a Mosquitto without ACLs (anyone may publish anything).
struct Mesh {
    dir: tempfile::TempDir,
    port: u16,
    _mosquitto: Proc,
    ctl: Option<Proc>,
    agents: Vec<(Proc, PathBuf)>,
}

impl Mesh {
    fn new(mode: &str) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        let text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap();
        std::fs::write(
            dir.path().join("manifests/mesh.yaml"),
            text.replace("mode: auto", &format!("mode: {mode}")),
        )
        .unwrap();
        // The controller must see every request of a flood: no queue limit for it.
        let (mosq, port) = common::mosquitto_with(dir.path(), "max_queued_messages 0\n");
        let mut m = Mesh {
            dir,
            port,
            _mosquitto: mosq,
            ctl: None,
            agents: Vec::new(),
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

    fn broker(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
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
            .arg("--broker")
            .arg(self.broker());
        self.ctl = Some(Proc::spawn(
            "controller",
            &mut cmd,
            &self.path("controller.log"),
        ));
        wait_for(
            "the controller's admin socket",
            WAIT,
            || admin::call(&self.state(), &Request::Status).ok(),
            || self.logs(),
        );
    }

    fn agent_cmd(&self, name: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin("sidenet-agent"));
        cmd.args(["--broker", &self.broker(), "--profile", PROFILE])
            .args(["--hostname", name, "--status-interval", "2", "--root"])
            .arg(self.path(name))
            .args(extra);
        cmd
    }

    fn start_agent(&mut self, name: &str, extra: &[&str]) -> usize {
        let proc = Proc::spawn(
            name,
            &mut self.agent_cmd(name, extra),
            &self.path(&format!("{name}.log")),
        );
        self.agents.push((proc, self.path(name)));
        self.agents.len() - 1
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(c) = &self.ctl {
            s.push_str(&format!("--- controller\n{}\n", tail(&c.log_text())));
        }
        for (p, _) in &self.agents {
            s.push_str(&format!("--- {}\n{}\n", p.name, tail(&p.log_text())));
        }
        s
    }

    fn status(
        &self,
    ) -> (
        Vec<StatusRow>,
        sidenet_controller::reconcile::model::Counters,
    ) {
        match admin::call(&self.state(), &Request::Status).unwrap() {
            Response::Status {
                nodes, counters, ..
            } => (nodes, counters),
            other => panic!("{other:?}"),
        }
    }

    fn wait_rev(&self, i: usize, rev: u64) {
        let root = self.agents[i].1.clone();
        wait_for(
            &format!("{} to apply revision {rev}", self.agents[i].0.name),
            WAIT,
            || (applied_rev(&root) == Some(rev)).then_some(()),
            || self.logs(),
        );
    }

    fn set_mesh(&self, edit: impl Fn(String) -> String) {
        let p = self.path("manifests/mesh.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        let tmp = self.path("mesh.yaml.new");
        std::fs::write(&tmp, edit(text)).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    fn sidenetctl(&self, args: &[&str]) -> String {
        let out = Command::new(bin("sidenetctl"))
            .args(args)
            .arg("--state")
            .arg(self.state())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sidenetctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
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

/// Publishes `msgs` (topic, payload, retain) with QoS 1 and waits for every PUBACK.
fn publish(port: u16, name: &str, msgs: Vec<(String, Vec<u8>, bool)>) {
    use rumqttc::{Client, MqttOptions, QoS};
    let mut opts = MqttOptions::new(name, "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_inflight(100);
    let (client, mut conn) = Client::new(opts, 200);
    let n = msgs.len();
    let sender = std::thread::spawn(move || {
        for (topic, payload, retain) in msgs {
            client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .unwrap();
        }
        client
    });
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
            Err(e) => panic!("{name}: {e}"),
        }
    }
    let _ = sender.join().unwrap().disconnect();
}

fn header(node: Option<String>, rev: u64) -> Header {
    let now = sidenet_controller::now();
    Header {
        mesh: "riverside".into(),
        node,
        epoch: now,
        rev,
        iat: now,
        exp: now + 600,
        len: 0,
        sha256: String::new(),
    }
}

/// A new agent given the join code refuses a retained announcement signed by an attacker's key
/// (and the attacker's config), keeps waiting for the real key, and applies the real config.
#[test]
fn a_new_agent_with_a_join_code_refuses_a_rogue_announcement() {
    let mut m = Mesh::new("auto");
    let code = m
        .sidenetctl(&["join-code", "--mesh", "riverside"])
        .trim()
        .to_string();
    assert_eq!(code, common::join_code(&m.state()));
    let json: serde_json::Value =
        serde_json::from_str(&m.sidenetctl(&["join-code", "--mesh", "riverside", "-o", "json"]))
            .unwrap();
    assert_eq!(json["joinCode"], code.as_str());
    let real = KeyPair::from_file_text(
        &std::fs::read_to_string(m.state().join("keys/riverside.key")).unwrap(),
    )
    .unwrap()
    .public();
    assert_eq!(json["key"], real.to_base64().as_str());

    // The node's id, known in advance (the attacker can read it from the broker anyway).
    let out = m
        .agent_cmd("alpha", &["--show-id", "--mesh", "riverside"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["node"]
        .as_str()
        .unwrap()
        .to_string();

    // The attacker: a retained announcement signed by its own key on every announcement topic,
    // and a retained config of its own for the node, writing a file of its choosing.
    let rogue = KeyPair::from_seed(&[0x66; 32]);
    let ann = Announce {
        mesh: "riverside".into(),
        key: rogue.public().to_base64(),
        enrollment: "auto".into(),
        prefix: "fd00::/48".into(),
        controller: "rogue".into(),
        acks: true,
        chain: vec![],
        previous_until: None,
    };
    let ann = sidenet_wire::envelope::seal(
        Kind::Announce,
        header(None, 0),
        &serde_json::to_vec(&ann).unwrap(),
        &rogue,
    );
    let config = serde_json::json!({
        "mesh": "riverside", "node": id, "hostname": "evil", "role": "router", "profile": PROFILE,
        "family": "linux", "subnet": "fd00::/64", "addresses": [],
        "files": [{"path": "etc/pwned", "mode": 420, "content": "pwned"}], "actions": [],
    });
    let config = sidenet_wire::envelope::seal(
        Kind::Config,
        header(Some(id.clone()), 1),
        &serde_json::to_vec(&config).unwrap(),
        &rogue,
    );
    let mut msgs: Vec<(String, Vec<u8>, bool)> = topics::announce_all("riverside")
        .into_iter()
        .map(|t| (t, ann.clone(), true))
        .collect();
    msgs.push((topics::config("riverside", &id), config, true));
    publish(m.port, "rogue", msgs);

    let a = m.start_agent("alpha", &["--join", &code]);
    m.wait_rev(a, 1);
    let root = m.agents[a].1.clone();
    let log = m.agents[a].0.log_text();
    let rogue_fp = sidenet_wire::join::fingerprint("riverside", &rogue.public());
    assert!(
        log.contains(&format!("announcement signed by key {rogue_fp} refused")),
        "{log}"
    );
    assert!(!root.join("etc/pwned").exists());
    // The real key is pinned, and the config applied is the controller's.
    let pinned = std::fs::read_to_string(root.join("etc/sidenet-agent/mesh.pub")).unwrap();
    assert_eq!(pinned.trim(), real.to_base64(), "{log}");
    // It keeps following the real controller: a change arrives.
    m.set_mesh(channel(44));
    m.wait_rev(a, 2);
}

/// A new agent with neither a join code, a mesh key nor `--trust-first-key` trusts no key and
/// says so; `--trust-first-key` trusts the first key with a warning.
#[test]
fn a_new_agent_without_a_join_code_trusts_no_key() {
    let mut m = Mesh::new("auto");
    let mut p = Proc::spawn(
        "bare",
        &mut m.agent_cmd("bare", &["--mesh", "riverside"]),
        &m.path("bare.log"),
    );
    let status = wait_for(
        "the agent without a way to check keys to exit",
        WAIT,
        || p.child.try_wait().ok().flatten(),
        String::new,
    );
    assert!(!status.success());
    let log = p.log_text();
    assert!(
        log.contains("no way to check the key of mesh riverside")
            && log.contains("sidenetctl join-code --mesh riverside")
            && log.contains("--trust-first-key"),
        "{log}"
    );
    assert!(!m.path("bare/etc/sidenet-agent/mesh.pub").exists());
    // A malformed join code is refused before anything else, naming the flag.
    let out = m
        .agent_cmd("typo", &["--join", "riverside~abc"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--join") && err.contains("3 characters, expected 20"),
        "{err}"
    );
    // The explicit opt-in: trusted, with a warning naming the key's join code.
    let a = m.start_agent("optin", &["--mesh", "riverside", "--trust-first-key"]);
    m.wait_rev(a, 1);
    let log = m.agents[a].0.log_text();
    assert!(
        log.contains("WARN") && log.contains(&common::join_code(&m.state())),
        "{log}"
    );
}

/// Admitted nodes stay admitted when the mesh switches from auto to approval; a new node waits.
#[test]
fn switching_auto_to_approval_keeps_admitted_nodes() {
    let mut m = Mesh::new("auto");
    let code = common::join_code(&m.state());
    let a = m.start_agent("alpha", &["--join", &code]);
    let b = m.start_agent("bravo", &["--join", &code]);
    m.wait_rev(a, 1);
    m.wait_rev(b, 1);
    let rev = |i: usize| applied_rev(&m.agents[i].1).unwrap();
    let (ra, rb) = (rev(a), rev(b));
    m.set_mesh(|t| t.replace("mode: auto", "mode: approval"));
    wait_for(
        "the controller to load approval mode",
        WAIT,
        || {
            m.ctl
                .as_ref()
                .unwrap()
                .log_text()
                .matches("manifests loaded")
                .nth(1)
                .map(|_| ())
        },
        || m.logs(),
    );
    m.set_mesh(channel(44));
    wait_for(
        "both admitted nodes to apply the change",
        WAIT,
        || {
            // Applied and confirmed (current.json is written last).
            let ok = |i: usize, before: u64| {
                applied_rev(&m.agents[i].1).is_some_and(|r| r > before)
                    && std::fs::read_to_string(
                        m.agents[i].1.join("etc/sidenet/wpa_supplicant-mesh.conf"),
                    )
                    .is_ok_and(|t| t.contains("frequency=5220"))
            };
            (ok(a, ra) && ok(b, rb)).then_some(())
        },
        || m.logs(),
    );
    // A restarted admitted agent asks to join again: still admitted.
    m.agents[a].0.kill();
    let restarted = m.start_agent("alpha", &["--join", &code]);
    m.set_mesh(channel(48));
    wait_for(
        "the restarted node to apply the next change",
        WAIT,
        || {
            std::fs::read_to_string(
                m.agents[restarted]
                    .1
                    .join("etc/sidenet/wpa_supplicant-mesh.conf"),
            )
            .is_ok_and(|t| t.contains("frequency=5240"))
            .then_some(())
        },
        || m.logs(),
    );
    // A node new to the mesh now waits for approval, with no address.
    let c = m.start_agent("charlie", &["--join", &code]);
    let (rows, _) = wait_for(
        "charlie to show as pending",
        WAIT,
        || {
            let (rows, c) = m.status();
            rows.iter()
                .any(|r| r.hostname.as_deref() == Some("charlie") && r.phase == "Pending")
                .then_some((rows, c))
        },
        || m.logs(),
    );
    let charlie = rows
        .iter()
        .find(|r| r.hostname.as_deref() == Some("charlie"))
        .unwrap();
    assert_eq!(charlie.address, None);
    for r in rows
        .iter()
        .filter(|r| r.hostname.as_deref() != Some("charlie") && r.name.is_none())
    {
        assert_ne!(r.phase, "Pending", "{r:?}");
    }
    assert_eq!(applied_rev(&m.agents[c].1), None);
}

/// Sizes of the files in the state folder's database.
fn db_size(state: &Path) -> u64 {
    std::fs::metadata(state.join("sidenet.redb"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// 10,000 valid enrolments from fresh keys in approval mode: no subnet and no record for any of
/// them, a bounded waiting list, the overflow counted and logged at a bounded rate; a real
/// node started during the flood is approved and applies its config.
#[test]
fn an_enrolment_flood_in_approval_mode_allocates_nothing() {
    const FLOOD: usize = 10_000;
    let mut m = Mesh::new("approval");
    let code = common::join_code(&m.state());
    let (rows, _) = m.status();
    let addressed_before = rows.iter().filter(|r| r.address.is_some()).count();
    let db_before = db_size(&m.state());

    // Every request valid: signed by a fresh key whose id is the topic's.
    let t = Instant::now();
    let msgs: Vec<(String, Vec<u8>, bool)> = (0..FLOOD)
        .map(|i| {
            let mut seed = [7u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let key = KeyPair::from_seed(&seed);
            let id = key.public().node_id();
            let req = EnrollRequest {
                hostname: format!("flood-{i}"),
                profile: Some(PROFILE.into()),
                backend: "files".into(),
                agent_version: "0.1.0".into(),
                ..EnrollRequest::default()
            };
            let env = sidenet_wire::envelope::seal(
                Kind::Enroll,
                header(Some(id.clone()), 1),
                &serde_json::to_vec(&req).unwrap(),
                &key,
            );
            (topics::enroll("riverside", &id), env, false)
        })
        .collect();
    let port = m.port;
    let flood = std::thread::spawn(move || publish(port, "flood", msgs));

    // A real node joins during the flood; the admin approves it by its id.
    let a = m.start_agent("alpha", &["--join", &code]);
    let key_file = m.agents[a].1.join("etc/sidenet-agent/node.key");
    let id = wait_for(
        "the real node's key",
        WAIT,
        || {
            let text = std::fs::read_to_string(&key_file).ok()?;
            Some(KeyPair::from_file_text(&text).ok()?.public().node_id())
        },
        || m.logs(),
    );
    let approved = m.sidenetctl(&["approve", &id]);
    println!("sidenetctl approve during the flood: {}", approved.trim());
    // Approved ahead (its request was left out by the rate limit), it is admitted when it asks
    // again, within 15 s.
    let root = m.agents[a].1.clone();
    wait_for(
        "the real node to apply its config",
        Duration::from_secs(60),
        || (applied_rev(&root) == Some(1)).then_some(()),
        || m.logs(),
    );
    let joined = t.elapsed();
    flood.join().unwrap();
    let sent = t.elapsed();

    // Every request reached the controller: listed, pushed out or left out.
    let (rows, counters) = wait_for(
        "the controller to handle the whole flood",
        Duration::from_secs(120),
        || {
            let (rows, c) = m.status();
            let waiting = rows.iter().filter(|r| r.phase == "Pending").count() as u64;
            (waiting + c.pending_evicted + c.pending_rate_limited >= FLOOD as u64)
                .then_some((rows, c))
        },
        || m.logs(),
    );
    let handled = t.elapsed();
    let waiting = rows.iter().filter(|r| r.phase == "Pending").count();
    let addressed = rows.iter().filter(|r| r.address.is_some()).count();
    let overflow_lines = m
        .ctl
        .as_ref()
        .unwrap()
        .log_text()
        .matches("too many unknown nodes ask to join")
        .count();
    let db_flood = db_size(&m.state());
    // The store itself, once the controller is gone.
    m.ctl.as_mut().unwrap().kill();
    let store = sidenet_controller::reconcile::store::Store::open(
        &m.state().join("sidenet.redb"),
        sidenet_controller::now(),
    )
    .unwrap();
    let records = store.nodes.len();
    let subnets = store.subnets.len();
    println!(
        "enrolment flood: {FLOOD} valid requests sent in {sent:?} (handled after {handled:?}); \
         real node approved and configured after {joined:?}; waiting list {waiting}, \
         rate-limited {}, pushed out {}; overflow log lines {overflow_lines}; \
         records {records}, subnets {subnets} (before the flood {addressed_before}, and the real node); \
         database {db_before} -> {db_flood} bytes (+{})",
        counters.pending_rate_limited,
        counters.pending_evicted,
        db_flood.saturating_sub(db_before)
    );
    assert_eq!(records, 1, "only the approved node has a record");
    assert_eq!(subnets, addressed_before + 1, "no subnet for a flood node");
    assert_eq!(addressed, addressed_before + 1);
    assert!(waiting <= 1000, "{waiting} waiting");
    assert!(counters.pending_rate_limited > 0);
    // One line at once, then at most one a minute.
    let minutes = handled.as_secs() / 60 + 1;
    assert!(
        (1..=minutes as usize + 1).contains(&overflow_lines),
        "{overflow_lines} lines"
    );
    // 10,000 records would be megabytes.
    assert!(
        db_flood.saturating_sub(db_before) < 1 << 20,
        "database grew from {db_before} to {db_flood} bytes"
    );
}
