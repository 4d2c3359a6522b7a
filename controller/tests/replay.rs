//! Node messages cannot be replayed (docs/security.md, "Replay"): the controller core keeps the
//! highest `(epoch, seq)` signed by each node and refuses the same or an older one, and refuses
//! messages older than 24 hours; each refusal is counted and named. Real signatures and a real
//! state database, no broker.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use sidenet_controller::now;
use sidenet_controller::reconcile::core::Controller;
use sidenet_controller::reconcile::render::Renderer;
use sidenet_controller::reconcile::store::Store;
use sidenet_controller::spec::manifest;
use sidenet_controller::standalone::FsSecrets;
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{ApplyState, EnrollRequest, StatusReport};
use sidenet_wire::{Header, Kind, topics};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn header(node: &str, epoch: u64, rev: u64, iat: u64) -> Header {
    Header {
        mesh: "riverside".into(),
        node: Some(node.into()),
        epoch,
        rev,
        iat,
        exp: iat + 600,
        len: 0,
        sha256: String::new(),
    }
}

fn status(key: &KeyPair, epoch: u64, seq: u64, iat: u64) -> Vec<u8> {
    let id = key.public().node_id();
    let report = StatusReport {
        state: ApplyState::Pending,
        applied: None,
        applied_sha256: None,
        failure: None,
        uptime_s: seq,
        agent_version: "test".into(),
        neighbours: Vec::new(),
        probes: Vec::new(),
        wireguard: None,
        trial: None,
        mqtt_auth: false,
        missing: Vec::new(),
        shaping: None,
        services: Vec::new(),
    };
    seal(
        Kind::Status,
        header(&id, epoch, seq, iat),
        &serde_json::to_vec(&report).unwrap(),
        key,
    )
}

#[test]
fn replayed_old_and_stale_node_messages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let store = Store::open(&dir.path().join("sidenet.redb"), t0).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(dir.path())));
    let files = manifest::collect_files(&[
        repo().join("examples/riverside/mesh.yaml"),
        repo().join("hardware-profiles"),
    ])
    .unwrap();
    let texts: Vec<(PathBuf, String)> = files
        .into_iter()
        .map(|f| {
            let t = std::fs::read_to_string(&f).unwrap();
            (f, t)
        })
        .collect();
    ctl.set_manifests(manifest::load_texts(&texts).unwrap(), t0)
        .unwrap();

    let key = KeyPair::from_seed(&[9; 32]);
    let id = key.public().node_id();
    let req = EnrollRequest {
        hostname: "replayed".into(),
        profile: Some("raspberrypi-4b-awus036acm".into()),
        backend: "files".into(),
        agent_version: "test".into(),
        ..EnrollRequest::default()
    };
    let enrol = seal(
        Kind::Enroll,
        header(&id, 5, 1, t0),
        &serde_json::to_vec(&req).unwrap(),
        &key,
    );
    ctl.on_message(&topics::enroll("riverside", &id), &enrol, t0)
        .unwrap();
    assert!(ctl.store.nodes.contains_key(&id), "the node enrolled");

    let topic = topics::status("riverside", &id);
    let fresh = status(&key, 5, 7, t0);
    ctl.on_message(&topic, &fresh, t0).unwrap();
    assert_eq!(ctl.counters.rejected_messages, 0);
    let seen = ctl.store.nodes[&id].last_seq;

    // The same report again is the retained copy after a restart: ignored without a fuss.
    ctl.on_message(&topic, &fresh, t0).unwrap();
    assert_eq!(ctl.counters.rejected_messages, 0);
    assert_eq!(ctl.store.nodes[&id].last_seq, seen);

    // An older sequence number, of this run or of an earlier agent start: refused.
    let refused = |ctl: &mut Controller, payload: Vec<u8>, why: &str| {
        let before = ctl.counters.rejected_messages;
        ctl.rejections.clear();
        ctl.on_message(&topic, &payload, t0).unwrap();
        assert_eq!(ctl.counters.rejected_messages, before + 1, "{why}");
        assert_eq!(ctl.rejections.len(), 1, "{why}");
        assert_eq!(ctl.rejections[0].node, id);
        assert_eq!(ctl.store.nodes[&id].last_seq, seen, "{why}");
    };
    refused(&mut ctl, status(&key, 5, 6, t0), "older seq");
    refused(&mut ctl, status(&key, 4, 99, t0), "older agent epoch");
    // Expired (a retained report from long ago, seen again after a restart): ignored, not
    // counted as an attack, and it changes nothing.
    ctl.on_message(&topic, &status(&key, 6, 1, t0 - 25 * 3600), t0)
        .unwrap();
    assert_eq!(ctl.counters.rejected_messages, 2);
    assert_eq!(ctl.store.nodes[&id].last_seq, seen);
    // Signed by another key on this node's topic: refused.
    refused(
        &mut ctl,
        status(&KeyPair::from_seed(&[10; 32]), 6, 1, t0),
        "another node's key",
    );
    // A newer one still goes through.
    ctl.on_message(&topic, &status(&key, 6, 1, t0), t0).unwrap();
    assert!(ctl.store.nodes[&id].last_seq > seen);

    // An enrolment signed more than 24 hours ago is refused however long it claims to be
    // valid (a captured request cannot be replayed later), and so is a replayed one.
    let other = KeyPair::from_seed(&[11; 32]);
    let oid = other.public().node_id();
    let mut h = header(&oid, 1, 1, t0 - 25 * 3600);
    h.exp = t0 + 3600;
    let old = seal(Kind::Enroll, h, &serde_json::to_vec(&req).unwrap(), &other);
    ctl.rejections.clear();
    ctl.on_message(&topics::enroll("riverside", &oid), &old, t0)
        .unwrap();
    assert!(!ctl.store.nodes.contains_key(&oid));
    assert_eq!(ctl.rejections.len(), 1);
    assert!(
        ctl.rejections[0].why.contains("too old"),
        "{:?}",
        ctl.rejections
    );
    ctl.rejections.clear();
    ctl.on_message(&topics::enroll("riverside", &id), &enrol, t0)
        .unwrap();
    assert_eq!(ctl.rejections.len(), 1, "a replayed enrolment");
}
