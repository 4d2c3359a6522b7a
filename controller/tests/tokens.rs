//! The enrolment-token battery: 1,000 enrolment attempts with forged, expired, reused and
//! stolen-then-misdirected tokens against the controller core (real signatures, a real state
//! database), in a mesh in token mode. None enrols, no config is published to any of them, the
//! two legitimate nodes get in, and the database holds token hashes only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use sidenet_controller::now;
use sidenet_controller::reconcile::core::Controller;
use sidenet_controller::reconcile::render::Renderer;
use sidenet_controller::reconcile::store::Store;
use sidenet_controller::spec::manifest;
use sidenet_controller::standalone::FsSecrets;
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::EnrollRequest;
use sidenet_wire::{Header, Kind, topics};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A signed enrolment request of `key` (on the topic of `topic_node`, normally its own id).
fn enrol(key: &KeyPair, topic_node: &str, token: Option<&str>, at: u64) -> (String, Vec<u8>) {
    let id = key.public().node_id();
    let req = EnrollRequest {
        hostname: format!("host-{}", &id[..6]),
        profile: Some("raspberrypi-4b-awus036acm".into()),
        token: token.map(str::to_string),
        backend: "files".into(),
        agent_version: "test".into(),
        ..EnrollRequest::default()
    };
    let header = Header {
        mesh: "riverside".into(),
        node: Some(topic_node.to_string()),
        epoch: 1,
        rev: 1,
        iat: at,
        exp: at + 3600,
        len: 0,
        sha256: String::new(),
    };
    let body = serde_json::to_vec(&req).unwrap();
    (
        topics::enroll("riverside", topic_node),
        seal(Kind::Enroll, header, &body, key),
    )
}

fn key(i: u32) -> KeyPair {
    let mut seed = [0u8; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    seed[31] = 0x5e;
    KeyPair::from_seed(&seed)
}

#[test]
fn a_thousand_bad_tokens_enrol_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let store = Store::open(&dir.path().join("sidenet.redb"), t0).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(dir.path())));
    let mesh_text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml"))
        .unwrap()
        .replace("mode: auto", "mode: token");
    let mut texts = vec![(PathBuf::from("mesh.yaml"), mesh_text)];
    for f in manifest::collect_files(&[repo().join("hardware-profiles")]).unwrap() {
        let t = std::fs::read_to_string(&f).unwrap();
        texts.push((f, t));
    }
    let set = manifest::load_texts(&texts).unwrap();
    ctl.set_manifests(set, t0).unwrap();
    ctl.flush().unwrap();

    // Issued tokens: one that a legitimate node uses first (then 300 others try it again),
    // one that expires, and one that a thief uses on someone else's topic before its owner.
    let (reused, expiring, stolen) = (
        "reused-token-3f9a1c",
        "expiring-token-77b2",
        "stolen-token-c4d1",
    );
    ctl.create_token("riverside", reused, 3600, t0).unwrap();
    ctl.create_token("riverside", expiring, 60, t0).unwrap();
    ctl.create_token("riverside", stolen, 3600, t0).unwrap();
    ctl.flush().unwrap();

    let mut published: Vec<String> = Vec::new();
    let mut deliver = |ctl: &mut Controller, (topic, payload): (String, Vec<u8>), at: u64| {
        ctl.on_message(&topic, &payload, at).unwrap();
        published.extend(ctl.flush().unwrap().into_iter().map(|p| p.topic));
    };

    let legit = key(0);
    deliver(
        &mut ctl,
        enrol(&legit, &legit.public().node_id(), Some(reused), t0),
        t0,
    );

    let later = t0 + 120; // past the expiring token's 60 s
    let mut bad = BTreeSet::new();
    for i in 1..=1000u32 {
        let k = key(i);
        let id = k.public().node_id();
        let msg = match i {
            // Forged: tokens nobody issued (random-looking, right shape).
            1..=400 => enrol(
                &k,
                &id,
                Some(&format!(
                    "forged-{:016x}",
                    u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                )),
                later,
            ),
            // Expired.
            401..=600 => enrol(&k, &id, Some(expiring), later),
            // Reused after the legitimate node consumed it.
            601..=900 => enrol(&k, &id, Some(reused), later),
            // No token at all.
            901..=950 => enrol(&k, &id, None, later),
            // A valid, unused token, sent by a thief on another node's topic: refused before
            // the token is looked at, so it is not consumed.
            _ => {
                let victim = key(10_000 + i).public().node_id();
                bad.insert(victim.clone());
                enrol(&k, &victim, Some(stolen), later)
            }
        };
        bad.insert(id);
        deliver(&mut ctl, msg, later);
    }

    // The stolen token was never consumed: its owner still gets in with it.
    let owner = key(5000);
    deliver(
        &mut ctl,
        enrol(&owner, &owner.public().node_id(), Some(stolen), later),
        later,
    );

    let rows = ctl.status();
    let enrolled: BTreeSet<String> = rows.iter().map(|r| r.node.clone()).collect();
    let expected: BTreeSet<String> = [legit.public().node_id(), owner.public().node_id()].into();
    assert_eq!(
        enrolled, expected,
        "only the two legitimate nodes are known"
    );
    assert_eq!(ctl.counters.enrolled, 2);
    assert_eq!(ctl.counters.refused, 950, "{:?}", ctl.counters);
    // Configs went to the two legitimate nodes and to nobody else.
    let config_targets: BTreeSet<String> = published
        .iter()
        .filter(|t| t.ends_with("/config"))
        .map(|t| t.split('/').nth(4).unwrap().to_string())
        .collect();
    assert_eq!(config_targets, expected);
    assert!(bad.iter().all(|b| !config_targets.contains(b)));

    // Only hashes are stored.
    drop(ctl);
    let db = std::fs::read(dir.path().join("sidenet.redb")).unwrap();
    for token in [reused, expiring, stolen] {
        assert!(
            !db.windows(token.len()).any(|w| w == token.as_bytes()),
            "token {token} is stored in clear"
        );
    }
}

/// A node cannot grow its own record without bound by reporting ever new failed revisions: only
/// the newest few are kept.
#[test]
fn reported_failures_are_bounded() {
    use sidenet_wire::messages::{ApplyState, Failure, StatusReport};
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let store = Store::open(&dir.path().join("sidenet.redb"), t0).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(dir.path())));
    let mut texts = vec![(
        PathBuf::from("mesh.yaml"),
        std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap(),
    )];
    for f in manifest::collect_files(&[repo().join("hardware-profiles")]).unwrap() {
        let t = std::fs::read_to_string(&f).unwrap();
        texts.push((f, t));
    }
    ctl.set_manifests(manifest::load_texts(&texts).unwrap(), t0)
        .unwrap();
    let node = key(77);
    let id = node.public().node_id();
    let (topic, env) = enrol(&node, &id, None, t0);
    ctl.on_message(&topic, &env, t0).unwrap();
    ctl.flush().unwrap();
    assert!(ctl.store.nodes.contains_key(&id));
    for seq in 2..=500u64 {
        let report = StatusReport {
            state: ApplyState::Failed,
            applied: None,
            applied_sha256: None,
            failure: Some(Failure {
                revision: Some(sidenet_wire::Revision { epoch: 1, rev: seq }),
                error: "no".into(),
            }),
            uptime_s: seq,
            agent_version: "test".into(),
            neighbours: vec![],
            probes: vec![],
            wireguard: None,
            trial: None,
            mqtt_auth: false,
            missing: Vec::new(),
            shaping: None,
            services: Vec::new(),
        };
        let header = Header {
            mesh: "riverside".into(),
            node: Some(id.clone()),
            epoch: 1,
            rev: seq,
            iat: t0,
            exp: t0 + 3600,
            len: 0,
            sha256: String::new(),
        };
        let env = seal(
            Kind::Status,
            header,
            &serde_json::to_vec(&report).unwrap(),
            &node,
        );
        ctl.on_message(&topics::status("riverside", &id), &env, t0)
            .unwrap();
    }
    ctl.flush().unwrap();
    let failed = &ctl.store.nodes[&id].failed_revisions;
    assert_eq!(
        failed.len(),
        sidenet_controller::reconcile::model::MAX_FAILED_REVISIONS
    );
    assert_eq!(failed.last().unwrap().rev, 500, "the newest is kept");
}

/// Expired token records go, used or not, from memory and from the state database (a reopened
/// store no longer holds them); tokens still valid, used or not, stay.
#[test]
fn expired_tokens_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let db = dir.path().join("sidenet.redb");
    let store = Store::open(&db, t0).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(dir.path())));
    let mesh_text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml"))
        .unwrap()
        .replace("mode: auto", "mode: token");
    let mut texts = vec![(PathBuf::from("mesh.yaml"), mesh_text)];
    for f in manifest::collect_files(&[repo().join("hardware-profiles")]).unwrap() {
        let t = std::fs::read_to_string(&f).unwrap();
        texts.push((f, t));
    }
    ctl.set_manifests(manifest::load_texts(&texts).unwrap(), t0)
        .unwrap();
    ctl.flush().unwrap();
    let hash = |t: &str| sidenet_wire::codec::sha256_hex(t.as_bytes());
    // Used and short-lived; unused and short-lived; used and long-lived; unused and long-lived.
    let tokens = [
        ("used-short", 60),
        ("unused-short", 60),
        ("used-long", 3600),
        ("unused-long", 3600),
    ];
    for (t, ttl) in tokens {
        ctl.create_token("riverside", t, ttl, t0).unwrap();
    }
    ctl.flush().unwrap();
    for (i, t) in [(0, "used-short"), (1, "used-long")] {
        let k = key(20_000 + i);
        let (topic, payload) = enrol(&k, &k.public().node_id(), Some(t), t0);
        ctl.on_message(&topic, &payload, t0).unwrap();
        ctl.flush().unwrap();
        assert!(
            ctl.store.tokens[&hash(t)].used_by.is_some(),
            "{t} was not used"
        );
    }
    // Nothing has expired yet.
    assert!(ctl.prune_tokens(t0 + 59).is_empty());
    let mut gone = ctl.prune_tokens(t0 + 60);
    gone.sort();
    let mut want = vec![hash("used-short"), hash("unused-short")];
    want.sort();
    assert_eq!(gone, want);
    ctl.flush().unwrap();
    let kept: BTreeSet<String> = ctl.store.tokens.keys().cloned().collect();
    let long: BTreeSet<String> = [hash("used-long"), hash("unused-long")].into();
    assert_eq!(kept, long);
    drop(ctl);
    let reopened = Store::open(&db, t0).unwrap();
    let on_disk: BTreeSet<String> = reopened.tokens.keys().cloned().collect();
    assert_eq!(on_disk, long, "the database still holds expired tokens");
    // Creating a token prunes too.
    drop(reopened);
    let store = Store::open(&db, t0).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(dir.path())));
    ctl.set_manifests(manifest::load_texts(&texts).unwrap(), t0)
        .unwrap();
    ctl.create_token("riverside", "fresh", 3600, t0 + 4000)
        .unwrap();
    ctl.flush().unwrap();
    let kept: BTreeSet<String> = ctl.store.tokens.keys().cloned().collect();
    assert_eq!(kept, [hash("fresh")].into());
}
