//! The harness of the Kubernetes-mode tests: an in-memory API server ([`crate::kubefake`]) with
//! the controller's and the test's clients, a real MQTT broker, an observer of everything
//! published, and fake agents that sign what a real agent signs.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{self, free_port, repo};
use crate::kubefake::{FakeApi, Rule};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use sidenet_controller::kubernetes::{self, Options, leader::LeaseTiming};
use sidenet_crds::{HardwareProfile, Mesh, MeshNode};
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{ApplyState, EnrollRequest, NodeConfig, StatusReport};
use sidenet_wire::{Envelope, Header, Kind, PublicKey, Revision, topics};
use tokio::sync::oneshot;

pub const WAIT: Duration = Duration::from_secs(20);
pub const MESHES: &str = "sidenet.io/v1alpha1/meshes";
pub const NODES: &str = "sidenet.io/v1alpha1/meshnodes";
/// A peer the fake agents report in their status (the example attic's node id).
pub const ATTIC: &str = "bhctvmiyz6ovk27g";

/// Polls `f` until it returns `Some`, failing after `WAIT` with `what` and `context()`.
pub async fn eventually<T>(
    what: &str,
    f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    eventually_within(what, WAIT, f, context).await
}

/// Polls `f` until it returns `Some`, failing after `timeout` with `what` and `context()`.
pub async fn eventually_within<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub type Messages = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Everything published on the broker, in order.
#[derive(Clone, Default)]
pub struct Observer {
    pub seen: Messages,
}

impl Observer {
    pub async fn start(port: u16) -> (Observer, AsyncClient) {
        Observer::start_as(port, None).await
    }

    pub async fn start_as(port: u16, login: Option<(&str, &str)>) -> (Observer, AsyncClient) {
        let obs = Observer::default();
        let mut o = MqttOptions::new(format!("observer-{}", free_port()), "127.0.0.1", port);
        o.set_max_packet_size(1 << 20, 1 << 20);
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (client, mut el) = AsyncClient::new(o, 100);
        client
            .subscribe("sidenet/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        let seen = obs.seen.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        seen.lock()
                            .unwrap()
                            .push((p.topic.to_string(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        (obs, client)
    }

    pub fn on(&self, topic: &str) -> Vec<Vec<u8>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Revisions of the configs seen for a node.
    pub fn revisions(&self, node: &str) -> Vec<u64> {
        self.revisions_since(node, 0)
    }

    /// How many messages were seen so far.
    pub fn mark(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Revisions of the configs seen for a node after `mark`.
    pub fn revisions_since(&self, node: &str, mark: usize) -> Vec<u64> {
        let topic = topics::config("riverside", node);
        self.seen.lock().unwrap()[mark..]
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, p)| p)
            .filter(|p| !p.is_empty())
            .map(|p| Envelope::parse(p, 1 << 20).unwrap().header().unwrap().rev)
            .collect()
    }
}

pub trait HeaderOf {
    fn header(&self) -> Result<Header, sidenet_wire::WireError>;
}

impl HeaderOf for Envelope<'_> {
    fn header(&self) -> Result<Header, sidenet_wire::WireError> {
        let key = self.claimed_signer()?;
        Ok(self.verify(Kind::Config, &key)?.header)
    }
}

pub struct Cluster {
    pub api: FakeApi,
    /// The test's own client (its requests are tagged `test-client`).
    pub client: Client,
    /// The controllers' client (RBAC-checked once a controller starts: [`chart_rbac`]).
    pub ctl_client: Client,
    /// A client whose writes skip admission: objects injected past the CRD schemas.
    pub unchecked_client: Client,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub _mosquitto: common::Proc,
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster::with_broker(common::mosquitto)
    }

    pub fn with_broker(broker: fn(&Path) -> (common::Proc, u16)) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let (mosq, port) = broker(dir.path());
        let api = FakeApi::new();
        let client = Client::new(api.tagged("test-client"), "default");
        let ctl_client = Client::new(api.clone(), "default");
        let unchecked_client = Client::new(api.unchecked("unchecked-client"), "default");
        Cluster {
            api,
            client,
            ctl_client,
            unchecked_client,
            dir,
            port,
            _mosquitto: mosq,
        }
    }

    pub fn opts(&self, name: &str) -> Options {
        Options {
            namespace: Some("default".into()),
            broker: Some(format!("mqtt://127.0.0.1:{}", self.port)),
            listen: "127.0.0.1:0".parse().unwrap(),
            broker_username: None,
            broker_password: None,
            broker_ca: None,
            broker_dynsec: false,
            metrics_listen: None,
            http_token: None,
            leader_election: false,
            pod_name: name.into(),
            pod_namespace: "default".into(),
            templates: repo().join("templates"),
            cache_dir: self.dir.path().join(format!("cache-{name}")),
            agents: self.dir.path().join("agents"),
            lease: LeaseTiming {
                duration: Duration::from_secs(2),
                renew_deadline: Duration::from_millis(1500),
                retry: Duration::from_millis(300),
            },
            refresh: Duration::from_secs(300),
            max_connections: 100,
            tls: None,
        }
    }

    pub fn start(&self, opts: Options) -> Running {
        self.api
            .set_policy("system:serviceaccount:default:sidenet", chart_rbac(&opts));
        let (tx, rx) = oneshot::channel::<()>();
        let client = self.ctl_client.clone();
        let task = tokio::spawn(kubernetes::run(opts, client, async {
            let _ = rx.await;
        }));
        Running {
            stop: Some(tx),
            task,
        }
    }

    /// Creates every object of the YAML files (Mesh, MeshNode, HardwareProfile, Secret).
    pub async fn apply_files(&self, paths: &[PathBuf], edit: impl Fn(&mut Value)) {
        for path in paths {
            let files: Vec<PathBuf> = if path.is_dir() {
                let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                    .collect();
                v.sort();
                v
            } else {
                vec![path.clone()]
            };
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap();
                for doc in sidenet_crds::yaml::documents(&text) {
                    let v: Value = doc.unwrap();
                    if v.is_null() {
                        continue;
                    }
                    let mut v = v;
                    edit(&mut v);
                    self.create(v).await;
                }
            }
        }
    }

    pub async fn create(&self, v: Value) {
        let pp = PostParams::default();
        match v["kind"].as_str().unwrap() {
            "Mesh" => {
                Api::<Mesh>::namespaced(self.client.clone(), "default")
                    .create(&pp, &serde_json::from_value(v).unwrap())
                    .await
                    .unwrap();
            }
            "MeshNode" => {
                Api::<MeshNode>::namespaced(self.client.clone(), "default")
                    .create(&pp, &serde_json::from_value(v).unwrap())
                    .await
                    .unwrap();
            }
            "HardwareProfile" => {
                Api::<HardwareProfile>::all(self.client.clone())
                    .create(&pp, &serde_json::from_value(v).unwrap())
                    .await
                    .unwrap();
            }
            "Secret" => {
                Api::<Secret>::namespaced(self.client.clone(), "default")
                    .create(&pp, &serde_json::from_value(v).unwrap())
                    .await
                    .unwrap();
            }
            k => panic!("unexpected kind {k}"),
        }
    }

    pub async fn riverside(&self, with_nodes: bool, edit: impl Fn(&mut Value)) {
        let mut paths = vec![
            repo().join("hardware-profiles"),
            repo().join("examples/riverside/mesh.yaml"),
        ];
        if with_nodes {
            paths.push(repo().join("examples/riverside/nodes.yaml"));
        }
        self.apply_files(&paths, edit).await;
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.api.get(NODES, "default", name)
    }

    pub fn mesh(&self) -> Option<Value> {
        self.api.get(MESHES, "default", "riverside")
    }

    pub fn condition(&self, node: &str, type_: &str) -> Option<(String, String, String)> {
        self.condition_in("default", node, type_)
    }

    pub fn condition_in(
        &self,
        ns: &str,
        node: &str,
        type_: &str,
    ) -> Option<(String, String, String)> {
        let n = self.api.get(NODES, ns, node)?;
        n["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or("").to_string(),
                    c["reason"].as_str().unwrap_or("").to_string(),
                    c["message"].as_str().unwrap_or("").to_string(),
                )
            })
    }

    pub fn events(&self) -> Vec<(String, String, String)> {
        self.api
            .list("events.k8s.io/v1/events")
            .iter()
            .map(|e| {
                (
                    e["regarding"]["name"].as_str().unwrap_or("").to_string(),
                    e["reason"].as_str().unwrap_or("").to_string(),
                    e["note"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    pub fn dump(&self) -> String {
        format!(
            "meshes: {:#}\nnodes: {:#}\nevents: {:?}",
            json!(self.api.list(MESHES).iter().map(|m| m["status"].clone()).collect::<Vec<_>>()),
            json!(self.api.list(NODES).iter().map(|m| json!({"name": m["metadata"]["name"], "spec": m["spec"], "status": m["status"]})).collect::<Vec<_>>()),
            self.events()
        )
    }

    pub fn mesh_key(&self) -> Option<PublicKey> {
        let m = self.mesh()?;
        PublicKey::from_base64(m["status"]["publicKey"].as_str()?).ok()
    }

    /// Enrols `agent` and waits until MeshNode `ns/name` shows `Enrolled`. The request is sent
    /// again every second: the controller may not be subscribed yet (or not be the leader).
    pub async fn enrol(
        &self,
        mqtt: &AsyncClient,
        agent: &mut Agent,
        (ns, name): (&str, &str),
        hostname: &str,
        profile: &str,
    ) {
        let deadline = Instant::now() + WAIT;
        loop {
            agent.enroll(mqtt, hostname, profile).await;
            let retry = Instant::now() + Duration::from_secs(1);
            while Instant::now() < retry {
                if self
                    .condition_in(ns, name, "Enrolled")
                    .is_some_and(|e| e.0 == "True")
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {ns}/{name} to enrol\n{}",
                self.dump()
            );
        }
    }

    /// Sends `agent`'s report that it applied `rev` (body `sha`) every second until MeshNode
    /// `default/name` shows it in `status.appliedRevision`: proof that a (re)started
    /// controller has subscribed and loaded the cluster (it handles reports after that).
    pub async fn report_until_applied(
        &self,
        mqtt: &AsyncClient,
        agent: &mut Agent,
        name: &str,
        rev: Revision,
        sha: &str,
    ) {
        let deadline = Instant::now() + WAIT;
        loop {
            agent.report(mqtt, rev, sha).await;
            let retry = Instant::now() + Duration::from_secs(1);
            while Instant::now() < retry {
                if self
                    .node(name)
                    .is_some_and(|n| n["status"]["appliedRevision"] == json!(rev.rev))
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {name} to show applied revision {}\n{}",
                rev.rev,
                self.dump()
            );
        }
    }

    /// Enrols the test keys of the example's `kitchen` and `attic-pi` (see [`test_keys`]).
    pub async fn enrol_riverside(
        &self,
        mqtt: &AsyncClient,
        kitchen: &mut Agent,
        attic: &mut Agent,
    ) {
        self.enrol(
            mqtt,
            kitchen,
            ("default", "kitchen"),
            "kitchen",
            "tplink-archer-c7-v2",
        )
        .await;
        self.enrol(
            mqtt,
            attic,
            ("default", "attic-pi"),
            "attic",
            "raspberrypi-4b-awus036acm",
        )
        .await;
    }

    /// Waits until MeshNode `name` (declared, not enrolled) shows that it is blocked on its
    /// enrolment, and checks that no config was published for it.
    /// `since`: an [`Observer::mark`] before which configs do not count.
    pub async fn waits_for_enrolment(&self, obs: &Observer, since: usize, name: &str, id: &str) {
        const WHY: &str = "waiting for the node to enrol (its config carries the mesh passphrase sealed to the node's key)";
        let d = eventually(
            &format!("{name} blocked on its enrolment"),
            || {
                // Blocked for another reason first is right (e.g. "the signing key Secret
                // of mesh riverside has not been read yet" right after a start): wait for the
                // steady reason.
                self.condition(name, "Degraded")
                    .filter(|d| d.0 == "True" && d.1 == "Blocked" && d.2 == WHY)
            },
            || self.dump(),
        )
        .await;
        assert_eq!(d.2, WHY, "{}", self.dump());
        let applied = self.condition(name, "ConfigApplied").unwrap();
        assert_eq!((applied.1.as_str(), applied.2.as_str()), ("Blocked", WHY));
        let enrolled = self.condition(name, "Enrolled").unwrap();
        assert_eq!(
            (enrolled.0.as_str(), enrolled.1.as_str()),
            ("False", "NotEnrolled")
        );
        assert!(
            enrolled.2.contains("no config is published before it does"),
            "{enrolled:?}"
        );
        assert_eq!(
            self.node(name).unwrap()["status"]["phase"],
            json!("Blocked")
        );
        assert!(
            obs.revisions_since(id, since).is_empty(),
            "a config was published to {name} before it enrolled"
        );
    }
}

/// Test keys for the example's two MeshNodes: `(kitchen, attic-pi)`.
pub fn test_keys() -> (Agent, Agent) {
    (Agent::new(21), Agent::new(22))
}

/// Gives the example's MeshNodes `kitchen` and `attic-pi` the node id and public key of the
/// test keys; every other field of the example stays as it is.
pub fn with_keys(kitchen: &Agent, attic: &Agent) -> impl Fn(&mut Value) + use<> {
    let keys = [
        ("kitchen", kitchen.id(), kitchen.key.public().to_base64()),
        ("attic-pi", attic.id(), attic.key.public().to_base64()),
    ];
    move |v: &mut Value| {
        if v["kind"] != "MeshNode" {
            return;
        }
        for (name, id, pk) in &keys {
            if v["metadata"]["name"] == *name {
                v["spec"]["nodeId"] = json!(id);
                v["spec"]["publicKey"] = json!(pk);
            }
        }
    }
}

/// The rules the chart (charts/sidenet/templates/rbac.yaml; the table of docs/helm.md) binds
/// to the controller's service account for these options: a Role in the watched namespace, or
/// a ClusterRole when every namespace is watched; always a ClusterRole that reads
/// HardwareProfiles; a Role in `default` for the Events about HardwareProfiles when the watched
/// namespace is another one; with leader election, a Role in the pod's namespace for its Lease.
pub fn chart_rbac(opts: &Options) -> Vec<Rule> {
    let ns = opts.namespace.as_deref();
    let mut rules = Vec::new();
    for row in rbac_table() {
        let scope = match row.place.as_str() {
            "watched" => ns,
            "cluster" => None,
            "default, elsewhere" => match ns {
                Some(n) if n != "default" => Some("default"),
                _ => continue,
            },
            "release, leader" if opts.leader_election => Some(opts.pod_namespace.as_str()),
            "release, leader" => continue,
            other => panic!("docs/helm.md RBAC table: unknown Where {other:?}"),
        };
        let verbs: Vec<&str> = row.verbs.iter().map(String::as_str).collect();
        let mut rule = Rule::new(scope, &row.group, &[row.resource.as_str()], &verbs);
        // `rbac.secretNames` is not set by the tests: any name.
        if row.names.starts_with('`') && !row.names.contains("secretNames") {
            rule = rule.names(&[row.names.trim_matches('`')]);
        }
        rules.push(rule);
    }
    rules
}

/// One row of the RBAC table of docs/helm.md (between `<!-- rbac-table:begin -->` and
/// `<!-- rbac-table:end -->`), which `tests/helm/check.py` compares with the rendered chart.
pub struct RbacRow {
    pub place: String,
    /// API group: `""` for the core group.
    pub group: String,
    pub resource: String,
    pub verbs: Vec<String>,
    pub names: String,
}

/// The RBAC table of docs/helm.md.
pub fn rbac_table() -> Vec<RbacRow> {
    let doc = std::fs::read_to_string(repo().join("docs/helm.md")).unwrap();
    let (_, rest) = doc.split_once("<!-- rbac-table:begin -->").unwrap();
    let (table, _) = rest.split_once("<!-- rbac-table:end -->").unwrap();
    let rows: Vec<RbacRow> = table
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let c: Vec<&str> = l
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            assert_eq!(c.len(), 6, "docs/helm.md RBAC row: {l}");
            RbacRow {
                place: c[0].to_string(),
                group: match c[1] {
                    "core" => String::new(),
                    g => g.trim_matches('`').to_string(),
                },
                resource: c[2].trim_matches('`').to_string(),
                verbs: c[3].split(',').map(|v| v.trim().to_string()).collect(),
                names: c[4].to_string(),
            }
        })
        .collect();
    assert!(!rows.is_empty(), "docs/helm.md: empty RBAC table");
    rows
}

/// Checks every request the controllers made against the RBAC table of docs/helm.md.
pub fn assert_rbac(c: &Cluster) {
    let table = rbac_table();
    let mut used = std::collections::BTreeSet::new();
    for r in c.api.requests() {
        if r.ends_with(" test-client") {
            continue;
        }
        let mut parts = r.split(' ');
        let method = parts.next().unwrap();
        let (path, query) = parts.next().unwrap().split_once('?').unwrap();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segs[0] {
            "api" => (String::new(), &segs[2..]),
            _ => (segs[1].to_string(), &segs[3..]),
        };
        let rest = if rest.first() == Some(&"namespaces") {
            &rest[2..]
        } else {
            rest
        };
        let resource = match rest.get(2) {
            Some(sub) => format!("{}/{sub}", rest[0]),
            None => rest[0].to_string(),
        };
        let verb = match (method, rest.len()) {
            ("GET", 1) if query.contains("watch=true") || query.contains("watch=1") => "watch",
            ("GET", 1) => "list",
            ("GET", _) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            _ => "other",
        };
        used.insert((group, resource, verb));
    }
    for (group, res, verb) in &used {
        assert!(
            table.iter().any(|row| row.group == *group
                && row.resource == *res
                && row.verbs.iter().any(|v| v == verb)),
            "the controller used {verb} on {group}/{res}, which the chart's RBAC (docs/helm.md) does not grant"
        );
    }
}

pub struct Running {
    pub stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), kubernetes::KubeError>>,
}

impl Running {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        assert!(
            matches!(r, Ok(Ok(Ok(())))),
            "controller did not stop cleanly: {r:?}"
        );
    }

    pub fn alive(&self) -> bool {
        !self.task.is_finished()
    }
}

/// A fake agent: a key and the messages a real agent signs.
pub struct Agent {
    pub key: KeyPair,
    pub seq: u64,
}

impl Agent {
    pub fn new(seed: u8) -> Agent {
        Agent {
            key: KeyPair::from_seed(&[seed; 32]),
            seq: 0,
        }
    }

    pub fn id(&self) -> String {
        self.key.public().node_id()
    }

    pub fn header(&mut self) -> Header {
        self.seq += 1;
        let now = sidenet_controller::now();
        Header {
            mesh: "riverside".into(),
            node: Some(self.id()),
            epoch: 1,
            rev: self.seq,
            iat: now,
            exp: now + 3600,
            len: 0,
            sha256: String::new(),
        }
    }

    pub async fn enroll(&mut self, mqtt: &AsyncClient, hostname: &str, profile: &str) {
        let (topic, payload) = self.enroll_message(hostname, profile);
        mqtt.publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// A signed enrolment request: its topic and payload.
    pub fn enroll_message(&mut self, hostname: &str, profile: &str) -> (String, Vec<u8>) {
        self.enroll_message_token(hostname, profile, None)
    }

    /// An enrolment request that presents `token`, published.
    pub async fn enroll_token(&mut self, mqtt: &AsyncClient, hostname: &str, token: &str) {
        let (topic, payload) =
            self.enroll_message_token(hostname, "pcengines-apu2-wle600vx", Some(token));
        mqtt.publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// A signed enrolment request with an enrolment token: its topic and payload.
    pub fn enroll_message_token(
        &mut self,
        hostname: &str,
        profile: &str,
        token: Option<&str>,
    ) -> (String, Vec<u8>) {
        let body = EnrollRequest {
            hostname: hostname.into(),
            board: None,
            profile: Some(profile.into()),
            token: token.map(str::to_string),
            backend: "files".into(),
            agent_version: "test".into(),
            wireguard: None,
        };
        let h = self.header();
        let payload = seal(
            Kind::Enroll,
            h,
            &serde_json::to_vec(&body).unwrap(),
            &self.key,
        );
        (topics::enroll("riverside", &self.id()), payload)
    }

    /// An enrolment signed with this key, published on `node`'s topic.
    pub async fn enroll_as(&mut self, mqtt: &AsyncClient, hostname: &str, node: &str) {
        let body = EnrollRequest {
            hostname: hostname.into(),
            board: None,
            profile: None,
            token: None,
            backend: "files".into(),
            agent_version: "test".into(),
            wireguard: None,
        };
        let mut h = self.header();
        h.node = Some(node.to_string());
        let payload = seal(
            Kind::Enroll,
            h,
            &serde_json::to_vec(&body).unwrap(),
            &self.key,
        );
        mqtt.publish(
            topics::enroll("riverside", node),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
    }

    pub async fn report(&mut self, mqtt: &AsyncClient, applied: Revision, sha: &str) {
        self.report_login(mqtt, applied, sha, false).await;
    }

    /// A status report that says (or not) that the node logs in with its broker password.
    pub async fn report_login(
        &mut self,
        mqtt: &AsyncClient,
        applied: Revision,
        sha: &str,
        mqtt_auth: bool,
    ) {
        let body = StatusReport {
            state: ApplyState::Applied,
            applied: Some(applied),
            applied_sha256: Some(sha.into()),
            failure: None,
            uptime_s: 5,
            agent_version: "test".into(),
            neighbours: vec![sidenet_wire::messages::Neighbour {
                address: "fe80::1".into(),
                interface: "wg-attic".into(),
                node: Some(ATTIC.into()),
                cost: Some(96),
            }],
            probes: vec![sidenet_wire::messages::Probe {
                target: "fe80::1".into(),
                rtt_ms: Some(3.5),
                loss: 0.0,
                node: Some(ATTIC.into()),
                kind: Some("neighbour".into()),
                sent: 10,
            }],
            wireguard: None,
            trial: None,
            mqtt_auth,
            missing: Vec::new(),
            shaping: None,
            services: Vec::new(),
        };
        let h = self.header();
        let payload = seal(
            Kind::Status,
            h,
            &serde_json::to_vec(&body).unwrap(),
            &self.key,
        );
        mqtt.publish(
            topics::status("riverside", &self.id()),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
    }
}

/// The last config published for `node`, verified against the mesh key.
pub fn config_of(
    obs: &Observer,
    key: &PublicKey,
    node: &str,
) -> Option<(Revision, String, NodeConfig)> {
    let all = obs.on(&topics::config("riverside", node));
    let last = all.last()?;
    if last.is_empty() {
        return None;
    }
    let env = Envelope::parse(last, 1 << 20).ok()?;
    let v = env.verify(Kind::Config, key).ok()?;
    let sha = v.header.sha256.clone();
    Some((v.header.revision(), sha, v.body_json().ok()?))
}

pub fn set_mode(mode: &'static str) -> impl Fn(&mut Value) {
    move |v: &mut Value| {
        if v["kind"] == "Mesh" {
            v["spec"]["enrollment"]["mode"] = json!(mode);
        }
    }
}

/// Whether the broker holds a retained message on `topic`. Subscribing to the topic and then
/// to a sentinel this function just retained: the broker answers subscriptions in order, so
/// once the sentinel arrives, a retained message on `topic` would have arrived before it.
pub async fn retained(port: u16, topic: &str) -> bool {
    let sentinel = format!("test/sentinel/{}", free_port());
    let mut o = MqttOptions::new(format!("probe-{}", free_port()), "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 10);
    client
        .publish(&sentinel, QoS::AtLeastOnce, true, b"x".to_vec())
        .await
        .unwrap();
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    client.subscribe(&sentinel, QoS::AtLeastOnce).await.unwrap();
    let mut found = false;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            tokio::time::timeout(Duration::from_secs(1), el.poll()).await
        {
            if p.topic == topic && !p.payload.is_empty() {
                found = true;
            }
            if p.topic == sentinel {
                let _ = client
                    .publish(&sentinel, QoS::AtLeastOnce, true, Vec::new())
                    .await;
                return found;
            }
        }
    }
    panic!("no answer from the broker for {topic}");
}

/// Starts `sidenet-controller kubernetes` as a process of its own, with the options of
/// [`Cluster::opts`] as the chart passes them (environment), the chart's RBAC, and a kubeconfig
/// that reaches the in-memory API server over HTTP as the controller's service account.
pub async fn controller_process(c: &Cluster, name: &str) -> common::Proc {
    let opts = c.opts(name);
    c.api
        .set_policy("system:serviceaccount:default:sidenet", chart_rbac(&opts));
    let port = crate::kubefake::serve::serve(c.api.clone()).await;
    let kc = c.dir.path().join(format!("kubeconfig-{name}"));
    crate::kubefake::serve::kubeconfig(&kc, port, "default");
    // SIDENET_BENCH_WRAP="heaptrack -o FILE" (any command and its arguments) runs the
    // controller under that command, to profile it (docs/benchmarks.md, "Controller memory").
    let mut cmd = match std::env::var("SIDENET_BENCH_WRAP") {
        Ok(w) if !w.is_empty() => {
            let mut words = w.split_whitespace();
            let mut cmd = std::process::Command::new(words.next().unwrap_or_default());
            cmd.args(words).arg(common::bin("sidenet-controller"));
            cmd
        }
        _ => std::process::Command::new(common::bin("sidenet-controller")),
    };
    cmd.arg("kubernetes")
        .env("KUBECONFIG", &kc)
        .env("SIDENET_NAMESPACE", opts.namespace.as_deref().unwrap_or(""))
        .env("SIDENET_BROKER", opts.broker.as_deref().unwrap_or(""))
        .env("SIDENET_LISTEN", "127.0.0.1:0")
        .env(
            "SIDENET_METRICS_LISTEN",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .env("SIDENET_LEADER_ELECTION", "false")
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", &opts.pod_namespace)
        .env("SIDENET_TEMPLATES", &opts.templates)
        .env("SIDENET_CACHE_DIR", &opts.cache_dir)
        .env("SIDENET_AGENTS", &opts.agents);
    common::Proc::spawn(name, &mut cmd, &c.dir.path().join(format!("{name}.log")))
}
