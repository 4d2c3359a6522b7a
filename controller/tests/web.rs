//! The controller's HTTP service in standalone mode (docs/web.md), with the real controller
//! binary and real agents:
//! - `/metrics` fetched with curl parses with the `prometheus_client` Python parser;
//! - exposed on a non-loopback address, the data routes answer 401 without the token;
//! - `/api/netjson` validates against the NetJSON NetworkGraph schema (docs/schemas/);
//! - the ALTO resources (web/alto.rs): schemas, errors, costs that follow the links;
//! - the map in headless Chromium with a fleet of 50 agents: node count, link count, a node's
//!   revision, a degraded link's colour, a screenshot kept in `target/web-map/`, and every
//!   request the browser made went to the controller.
//!
//! Links: agents on one host have no WireGuard links, so the test reports them the way a node
//! does: a status report signed with the node's own key, published on its status topic with
//! its own broker login (the agent is stopped meanwhile, so its session is not fought over).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Proc, bin, free_port, repo, wait_for};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::reconcile::model::StatusRow;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{ApplyState, Neighbour, Probe, StatusReport};
use sidenet_wire::{Header, Kind, topics};

const WAIT: Duration = Duration::from_secs(60);
const MESH: &str = "riverside";

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    http: u16,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        std::fs::copy(
            repo().join("examples/riverside/mesh.yaml"),
            dir.path().join("manifests/mesh.yaml"),
        )
        .unwrap();
        Setup {
            dir,
            port: free_port(),
            http: free_port(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    fn controller(&self, http_listen: &str, extra: &[&str]) -> Proc {
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
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--http-listen")
            .arg(http_listen)
            .args(extra);
        let p = Proc::spawn("controller", &mut cmd, &self.path("controller.log"));
        wait_for(
            "the controller's admin socket",
            WAIT,
            || admin::call(&self.state(), &Request::Status).ok(),
            || p.log_text(),
        );
        p
    }

    fn agent(&self, name: &str) -> Proc {
        Proc::spawn(
            name,
            Command::new(bin("sidenet-agent")).args([
                "--mesh",
                MESH,
                "--broker",
                &format!("mqtt://127.0.0.1:{}", self.port),
                "--root",
                &self.path(name).display().to_string(),
                "--profile",
                "raspberrypi-4b-awus036acm",
                "--hostname",
                name,
                "--status-interval",
                "3600",
                "--join",
                &common::join_code(&self.state()),
            ]),
            &self.path(&format!("{name}.log")),
        )
    }

    fn rows(&self) -> Vec<StatusRow> {
        match admin::call(&self.state(), &Request::Status).unwrap() {
            Response::Status { nodes, .. } => nodes,
            other => panic!("{other:?}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }
}

/// `curl -s -w '\n%{http_code}' [-H AUTH] URL`: (status, body).
fn curl(url: &str, auth: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "20", "-w", "\n%{http_code}"]);
    if let Some(a) = auth {
        cmd.args(["-H", &format!("Authorization: Bearer {a}")]);
    }
    let out = cmd.arg(url).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn wait_ready(s: &Setup, n: usize, logs: &dyn Fn() -> String) -> Vec<StatusRow> {
    wait_for(
        &format!("{n} nodes Ready and online"),
        WAIT * 3,
        || {
            let rows = s.rows();
            (rows.len() == n
                && rows
                    .iter()
                    .all(|r| r.phase == "Ready" && r.online == Some(true)))
            .then_some(rows)
        },
        logs,
    )
}

/// `/metrics` of a standalone controller with two agents, fetched with curl, parsed by
/// `prometheus_client.parser.text_string_to_metric_families` (tests/peers/requirements.txt).
#[test]
fn standalone_metrics_parse_with_prometheus_client() {
    let s = Setup::new();
    let ctl = s.controller(&format!("127.0.0.1:{}", s.http), &[]);
    let _agents: Vec<Proc> = ["alpha", "bravo"].iter().map(|n| s.agent(n)).collect();
    wait_ready(&s, 2, &|| ctl.log_text());
    let (code, text) = curl(&s.url("/metrics"), None);
    assert_eq!(code, 200, "{text}");
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    out[fam.name] = {"type": fam.type, "samples": [[s.name, s.labels, s.value] for s in fam.samples]}
print(json.dumps(out))
"#;
    let mut child = Command::new(common::peer_python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fams: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The parser strips `_total` from counter family names.
    for (name, kind) in [
        ("sidenet_configs_published", "counter"),
        ("sidenet_enrolments", "counter"),
        ("sidenet_rejected_messages", "counter"),
        ("sidenet_nodes", "gauge"),
        ("sidenet_manifest_errors", "gauge"),
        ("sidenet_node_online", "gauge"),
        ("sidenet_node_applied_revision", "gauge"),
    ] {
        assert_eq!(fams[name]["type"], kind, "{name} in {fams:#}");
    }
    let ready = fams["sidenet_nodes"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[1]["phase"] == "Ready")
        .unwrap_or_else(|| panic!("no Ready sample: {fams:#}"));
    assert_eq!(ready[2], 2.0);
    assert_eq!(fams["sidenet_enrolments"]["samples"][0][2], 2.0);
    let online = fams["sidenet_node_online"]["samples"].as_array().unwrap();
    assert_eq!(online.len(), 2);
    assert!(online.iter().all(|s| s[2] == 1.0));
    // Probes and the map answer too; NetJSON validates.
    assert_eq!(curl(&s.url("/healthz"), None).0, 200);
    assert_eq!(curl(&s.url("/readyz"), None).0, 200);
    let (code, graph) = curl(&s.url("/api/netjson"), None);
    assert_eq!(code, 200);
    let graph: serde_json::Value = serde_json::from_str(&graph).unwrap();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("docs/schemas/netjson-network-graph.json")).unwrap(),
    )
    .unwrap();
    let v = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = v.iter_errors(&graph).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}\n{graph:#}");
    assert_eq!(graph["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(curl(&s.url("/api/netjson?mesh=riverside"), None).0, 200);
    assert_eq!(curl(&s.url("/api/netjson?mesh=elsewhere"), None).0, 404);
}

/// Exposed (0.0.0.0): the data routes answer 401 without the token, with a wrong one, and
/// 200 with the one the controller wrote to STATE/http-token; the probes and the static page
/// stay open. With --http-token-file, that file's token.
#[test]
fn exposed_service_needs_the_bearer_token() {
    let s = Setup::new();
    let ctl = s.controller(&format!("0.0.0.0:{}", s.http), &[]);
    let _a = s.agent("alpha");
    wait_ready(&s, 1, &|| ctl.log_text());
    let file = s.state().join("http-token");
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(token.len() >= 40);
    for path in [
        "/api/nodes",
        "/api/netjson",
        "/metrics",
        "/alto/directory",
        "/alto/networkmap",
        "/alto/costmap/routingcost",
        "/alto/costmap/delay-rt",
        "/alto/costmap/sidenet-rate",
    ] {
        let (code, body) = curl(&s.url(path), None);
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body.contains("Authorization: Bearer"), "{body}");
        assert_eq!(curl(&s.url(path), Some("wrong-token-wrong-token")).0, 401);
        assert_eq!(curl(&s.url(path), Some(&token)).0, 200, "{path}");
    }
    // The filtered cost map (POST) too.
    let post = |auth: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .args([
                "-H",
                "Content-Type: application/alto-costmapfilter+json",
                "-H",
                auth,
            ])
            .args([
                "--data-binary",
                r#"{"cost-type": {"cost-mode": "numerical", "cost-metric": "routingcost"}}"#,
            ])
            .arg(s.url("/alto/costmap/filter"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(post("X-None: x"), "401");
    assert_eq!(post(&format!("Authorization: Bearer {token}")), "200");
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null", &s.url("/api/nodes")])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    for path in ["/healthz", "/readyz", "/", "/map.js", "/map.css"] {
        assert_eq!(curl(&s.url(path), None).0, 200, "{path}");
    }
    let (_, nodes) = curl(&s.url("/api/nodes"), Some(&token));
    let snap: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    assert_eq!(snap["nodes"].as_array().unwrap().len(), 1);
    drop(ctl);

    // A token file of one's own.
    let mine = s.path("my-token");
    std::fs::write(&mine, "0123456789abcdef-mine\n").unwrap();
    let ctl = s.controller(
        &format!("0.0.0.0:{}", s.http),
        &["--http-token-file", mine.to_str().unwrap()],
    );
    wait_for(
        "the HTTP service",
        WAIT,
        || (curl(&s.url("/healthz"), None).0 == 200).then_some(()),
        || ctl.log_text(),
    );
    assert_eq!(curl(&s.url("/api/nodes"), Some(&token)).0, 401);
    assert_eq!(
        curl(&s.url("/api/nodes"), Some("0123456789abcdef-mine")).0,
        200
    );
}

/// Publishes a status report for the agent at `root` as the node itself: signed with its key,
/// on its topic, with its broker login, sequence `(epoch, rev)`. The agent is stopped
/// meanwhile (SIGSTOP) and continued after.
fn report_as_node(
    s: &Setup,
    agent: &Proc,
    root: &Path,
    row: &StatusRow,
    rev: u64,
    neighbours: Vec<Neighbour>,
    probes: Vec<Probe>,
) {
    use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
    let key = KeyPair::from_file_text(
        &std::fs::read_to_string(root.join("etc/sidenet-agent/node.key")).unwrap(),
    )
    .unwrap();
    let node = row.node.clone();
    let body = StatusReport {
        state: ApplyState::Applied,
        applied: row.applied,
        applied_sha256: None,
        failure: None,
        uptime_s: 10,
        agent_version: row.agent_version.clone().unwrap_or_default(),
        neighbours,
        probes,
        wireguard: None,
        trial: None,
        mqtt_auth: true,
        missing: vec![],
        shaping: None,
        services: Vec::new(),
    };
    let now = sidenet_controller::now();
    let header = Header {
        mesh: MESH.into(),
        node: Some(node.clone()),
        epoch: row.agent_epoch.unwrap(),
        rev,
        iat: now,
        exp: now + 300,
        len: 0,
        sha256: String::new(),
    };
    let payload = sidenet_wire::envelope::seal(
        Kind::Status,
        header,
        &serde_json::to_vec(&body).unwrap(),
        &key,
    );
    let password = std::fs::read_to_string(root.join("etc/sidenet-agent/mqtt.password"))
        .ok()
        .map(|p| p.trim().to_string());
    let pid = agent.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let sent = (|| {
        for _ in 0..20 {
            let mut opts = MqttOptions::new(node.clone(), "127.0.0.1", s.port);
            opts.set_max_packet_size(1 << 20, 1 << 20);
            if let Some(p) = &password {
                opts.set_credentials(node.clone(), p.clone());
            }
            let (client, mut conn) = Client::new(opts, 10);
            client
                .publish(
                    topics::status(MESH, &node),
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                )
                .unwrap();
            for ev in conn.iter().take(20) {
                match ev {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        let _ = client.disconnect();
                        for ev in conn.iter().take(5) {
                            if matches!(ev, Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) {
                                break;
                            }
                        }
                        return true;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        false
    })();
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(sent, "no PUBACK for {node}'s status report");
}

fn neighbour(to: &StatusRow, cost: u32) -> Neighbour {
    Neighbour {
        address: "fe80::1".into(),
        interface: format!("sn-{}", &to.node[..8]),
        node: Some(to.node.clone()),
        cost: Some(cost),
    }
}

fn probe(to: &StatusRow, rtt: f64, loss: f64) -> Probe {
    Probe {
        target: format!("fe80::1%sn-{}", &to.node[..8]),
        rtt_ms: Some(rtt),
        loss,
        node: Some(to.node.clone()),
        kind: Some("neighbour".into()),
        sent: 10,
    }
}

#[path = "web/map.rs"]
mod map;

#[path = "web/alto.rs"]
mod alto;
