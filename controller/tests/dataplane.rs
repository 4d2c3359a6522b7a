//! The controller's side of the data plane, through the reconcile core with a real state store,
//! real templates and signed node messages (no broker): WireGuard neighbours from reported
//! endpoints, acknowledgements of configs on trial, and failed revisions not handed out again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::repo;
use sidenet_controller::reconcile::core::Controller;
use sidenet_controller::reconcile::model::Publish;
use sidenet_controller::reconcile::render::Renderer;
use sidenet_controller::reconcile::store::Store;
use sidenet_controller::spec::manifest;
use sidenet_controller::standalone::FsSecrets;
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{
    Ack, ApplyState, EnrollRequest, Failure, NodeConfig, StatusReport, Trial, WireguardInfo,
};
use sidenet_wire::{Envelope, Header, Kind, Revision, topics};

const MESH: &str = "riverside";
const T0: u64 = 1_900_000_000;

struct Node {
    key: KeyPair,
    seq: u64,
    wg: WireguardInfo,
}

impl Node {
    fn new(seed: u8, endpoints: &[&str]) -> Node {
        Node {
            key: KeyPair::from_seed(&[seed; 32]),
            seq: 0,
            wg: WireguardInfo {
                public_key: format!("wg-public-key-of-node-{seed:03}-padding-to-44="),
                endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
                heard: Vec::new(),
            },
        }
    }

    fn id(&self) -> String {
        self.key.public().node_id()
    }

    fn header(&mut self, now: u64) -> Header {
        self.seq += 1;
        Header {
            mesh: MESH.into(),
            node: Some(self.id()),
            epoch: 5,
            rev: self.seq,
            iat: now,
            exp: now + 600,
            len: 0,
            sha256: String::new(),
        }
    }

    fn enroll(&mut self, ctl: &mut Controller, now: u64) -> Vec<Publish> {
        let body = EnrollRequest {
            hostname: format!("n{}", &self.id()[..4]),
            profile: Some("raspberrypi-4b-awus036acm".into()),
            backend: "linux".into(),
            agent_version: "test".into(),
            wireguard: Some(self.wg.clone()),
            ..Default::default()
        };
        let h = self.header(now);
        let env = seal(
            Kind::Enroll,
            h,
            &serde_json::to_vec(&body).unwrap(),
            &self.key,
        );
        ctl.on_message(&topics::enroll(MESH, &self.id()), &env, now)
            .unwrap();
        ctl.flush().unwrap()
    }

    /// Sends a status report; returns what the controller publishes and the report's sequence.
    fn status(
        &mut self,
        ctl: &mut Controller,
        report: StatusReport,
        now: u64,
    ) -> (Vec<Publish>, Revision) {
        let h = self.header(now);
        let seq = h.revision();
        let env = seal(
            Kind::Status,
            h,
            &serde_json::to_vec(&report).unwrap(),
            &self.key,
        );
        ctl.on_message(&topics::status(MESH, &self.id()), &env, now)
            .unwrap();
        (ctl.flush().unwrap(), seq)
    }
}

fn report(
    applied: Option<Revision>,
    trial: Option<Trial>,
    failure: Option<Failure>,
    wg: &WireguardInfo,
) -> StatusReport {
    StatusReport {
        state: if failure.is_some() {
            ApplyState::Failed
        } else {
            ApplyState::Applied
        },
        applied,
        applied_sha256: None,
        failure,
        uptime_s: 1,
        agent_version: "test".into(),
        neighbours: vec![],
        probes: vec![],
        wireguard: Some(wg.clone()),
        trial,
        mqtt_auth: false,
        missing: Vec::new(),
        shaping: None,
        services: Vec::new(),
    }
}

fn controller(dir: &std::path::Path) -> Controller {
    let store = Store::open(&dir.join("state.redb"), 5).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(dir)));
    let set = manifest::load(&[
        repo().join("examples/riverside/mesh.yaml"),
        repo().join("hardware-profiles"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    ctl.set_manifests(set, T0).unwrap();
    ctl.flush().unwrap();
    ctl
}

/// The config in the last publish to `node` among `out`.
fn config_for(out: &[Publish], ctl: &mut Controller, node: &str) -> Option<(Revision, NodeConfig)> {
    let key = ctl.mesh_key(MESH).unwrap().public();
    out.iter()
        .rev()
        .find(|p| p.topic == topics::config(MESH, node))
        .map(|p| {
            let v = Envelope::parse(&p.payload, 1 << 20)
                .unwrap()
                .verify(Kind::Config, &key)
                .unwrap();
            (v.header.revision(), v.body_json().unwrap())
        })
}

fn file<'a>(c: &'a NodeConfig, path: &str) -> &'a str {
    &c.files.iter().find(|f| f.path == path).unwrap().content
}

#[test]
fn nodes_on_a_shared_subnet_get_each_other_as_wireguard_peers() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = controller(dir.path());
    let mut a = Node::new(1, &["10.0.1.1/24", "fe80::1/64"]);
    let mut b = Node::new(2, &["10.0.1.2/24", "10.0.2.2/24"]);
    let mut far = Node::new(3, &["10.0.9.3/24"]);
    a.enroll(&mut ctl, T0);
    let out = b.enroll(&mut ctl, T0);
    far.enroll(&mut ctl, T0);
    // b's enrolment re-rendered a as well.
    let (_, ca) = config_for(&out, &mut ctl, &a.id()).expect("a got a new config");
    let (_, cb) = config_for(&out, &mut ctl, &b.id()).unwrap();
    let wa = file(&ca, "etc/sidenet/wireguard");
    let wb = file(&cb, "etc/sidenet/wireguard");
    assert!(
        wa.contains(&b.wg.public_key) && wa.contains(" 10.0.1.2:"),
        "{wa}"
    );
    assert!(
        wb.contains(&a.wg.public_key) && wb.contains(" 10.0.1.1:"),
        "{wb}"
    );
    assert!(!wa.contains(&far.wg.public_key) && !wb.contains(&far.wg.public_key));
    // Each side's endpoint port is the other side's listen port.
    let port_of = |w: &str, key: &str, field: usize| -> String {
        let line = w.lines().find(|l| l.contains(key)).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        match field {
            0 => f[2].to_string(),
            _ => f[5].rsplit(':').next().unwrap().to_string(),
        }
    };
    assert_eq!(
        port_of(wa, &b.wg.public_key, 0),
        port_of(wb, &a.wg.public_key, 1)
    );
    assert_eq!(
        port_of(wb, &a.wg.public_key, 0),
        port_of(wa, &b.wg.public_key, 1)
    );
    // babel runs on the link, the probes aim at it, private keys appear nowhere.
    let iface = format!("sn-{}", &b.id()[..12]);
    assert!(file(&ca, "etc/sidenet/babeld.conf").contains(&format!("interface {iface}")));
    assert!(file(&ca, "etc/sidenet/probes").contains(&format!("%{iface}")));
    // The far node moves next to a: both get new configs naming each other.
    far.wg.endpoints = vec!["10.0.1.3/24".into()];
    let (out, _) = far.status(&mut ctl, report(None, None, None, &far.wg.clone()), T0 + 1);
    let (_, ca) = config_for(&out, &mut ctl, &a.id()).expect("a re-rendered");
    assert!(file(&ca, "etc/sidenet/wireguard").contains(&far.wg.public_key));
    assert!(config_for(&out, &mut ctl, &far.id()).is_some());
}

#[test]
fn configs_on_trial_are_acknowledged_and_failed_ones_are_not_reissued() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = controller(dir.path());
    let mut a = Node::new(1, &["10.0.1.1/24"]);
    let out = a.enroll(&mut ctl, T0);
    let (rev, config) = config_for(&out, &mut ctl, &a.id()).unwrap();
    let sha = sidenet_wire::codec::sha256_hex(&serde_json::to_vec(&config).unwrap());
    let trial = Trial {
        revision: rev,
        sha256: sha.clone(),
    };
    let wg = a.wg.clone();
    let (out, seq) = a.status(
        &mut ctl,
        report(None, Some(trial.clone()), None, &wg),
        T0 + 1,
    );
    let ack = out
        .iter()
        .find(|p| p.topic == topics::ack(MESH, &a.id()))
        .expect("an acknowledgement");
    assert!(!ack.retain);
    let key = ctl.mesh_key(MESH).unwrap().public();
    let v = Envelope::parse(&ack.payload, 4096)
        .unwrap()
        .verify(Kind::Ack, &key)
        .unwrap();
    assert_eq!(
        v.header.revision(),
        seq,
        "the ack names the status report it answers"
    );
    assert_eq!(v.body_json::<Ack>().unwrap().revision, rev);
    // A trial of something the controller never published is not acknowledged.
    let bogus = Trial {
        revision: Revision { epoch: 5, rev: 99 },
        sha256: "x".into(),
    };
    let (out, _) = a.status(&mut ctl, report(None, Some(bogus), None, &wg), T0 + 2);
    assert!(!out.iter().any(|p| p.topic == topics::ack(MESH, &a.id())));
    // The node rolls the revision back and reports it failed.
    let failure = Failure {
        revision: Some(rev),
        error: "health check failed".into(),
    };
    a.status(&mut ctl, report(None, None, Some(failure), &wg), T0 + 3);
    let row = ctl.status().into_iter().find(|r| r.node == a.id()).unwrap();
    assert_eq!(row.phase, "Failed");
    assert_eq!(ctl.store.nodes[&a.id()].failed_revisions, [rev]);
    // Half the validity later the config would be re-signed: not with the failed body.
    ctl.reconcile_all(T0 + 20 * 24 * 3600).unwrap();
    let out = ctl.flush().unwrap();
    assert!(
        config_for(&out, &mut ctl, &a.id()).is_none(),
        "the failed revision was re-issued"
    );
    assert_eq!(ctl.store.published[&a.id()].revision, rev);
}

#[test]
fn a_chunked_reconcile_commits_and_hands_out_one_chunk_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = controller(dir.path());
    let mut nodes: Vec<Node> = (1..=5)
        .map(|i| Node::new(10 + i, &[format!("10.0.{i}.1/24").as_str()]))
        .collect();
    for n in &mut nodes {
        n.enroll(&mut ctl, T0);
    }
    let before: Vec<Revision> = nodes
        .iter()
        .map(|n| ctl.store.published[&n.id()].revision)
        .collect();
    ctl.set_chunk(Some(2));
    // Half the validity later every config is re-signed: a change to every node of the mesh.
    let later = T0 + 20 * 24 * 3600;
    ctl.reconcile_all(later).unwrap();
    let mut chunks = Vec::new();
    loop {
        let out = ctl.flush().unwrap();
        let mut ids = Vec::new();
        for n in &nodes {
            if let Some((rev, _)) = config_for(&out, &mut ctl, &n.id()) {
                // Handed out with the revision the store now records for the node.
                let reopened = ctl.store.published[&n.id()].revision;
                assert_eq!(rev, reopened);
                ids.push(n.id());
            }
        }
        chunks.push(ids);
        if !ctl.has_deferred() {
            break;
        }
        ctl.reconcile_deferred(later).unwrap();
    }
    assert_eq!(
        chunks.iter().map(Vec::len).collect::<Vec<_>>(),
        [2, 2, 1],
        "{chunks:?}"
    );
    let mut all: Vec<String> = chunks.concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 5, "every node once");
    for (n, old) in nodes.iter().zip(before) {
        let now = ctl.store.published[&n.id()].revision;
        assert_eq!(
            now,
            Revision {
                rev: old.rev + 1,
                ..old
            }
        );
    }
    // Nothing left: another reconcile changes nothing.
    ctl.reconcile_all(later).unwrap();
    assert!(ctl.flush().unwrap().is_empty());
}

#[test]
fn stored_configs_republish_a_chunk_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = controller(dir.path());
    let mut nodes: Vec<Node> = (1..=5)
        .map(|i| Node::new(20 + i, &[format!("10.0.{i}.1/24").as_str()]))
        .collect();
    for n in &mut nodes {
        n.enroll(&mut ctl, T0);
    }
    let all = ctl.stored_configs().unwrap();
    assert_eq!(all.len(), 5);
    let ids = ctl.stored_config_ids().unwrap();
    let chunked: Vec<Publish> = ids
        .chunks(2)
        .flat_map(|c| ctl.stored_configs_of(c).unwrap())
        .collect();
    assert_eq!(chunked, all);
    // An id without a stored envelope is skipped.
    assert!(
        ctl.stored_configs_of(&["nosuchnode".into()])
            .unwrap()
            .is_empty()
    );
}
