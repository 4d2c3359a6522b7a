//! Approval mode against the controller core (real signatures, a real state database): nodes
//! that ask to join wait in memory, bounded and rate-limited, with no record and no subnet; an
//! admin approves one that waits, or one by id before it asks; approvals ahead survive a
//! restart; a waiting node can be removed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use sidenet_controller::reconcile::core::{Approval, Controller};
use sidenet_controller::reconcile::render::Renderer;
use sidenet_controller::reconcile::store::Store;
use sidenet_controller::spec::manifest;
use sidenet_controller::standalone::FsSecrets;
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::EnrollRequest;
use sidenet_wire::{Header, Kind, topics};

const T0: u64 = 1_900_000_000;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn key(i: u32) -> KeyPair {
    let mut seed = [0u8; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    seed[31] = 0x77;
    KeyPair::from_seed(&seed)
}

fn enrol(key: &KeyPair, rev: u64, at: u64) -> (String, Vec<u8>) {
    let id = key.public().node_id();
    let req = EnrollRequest {
        hostname: format!("host-{}", &id[..8]),
        profile: Some("raspberrypi-4b-awus036acm".into()),
        backend: "files".into(),
        agent_version: "test".into(),
        ..EnrollRequest::default()
    };
    let header = Header {
        mesh: "riverside".into(),
        node: Some(id.clone()),
        epoch: 1,
        rev,
        iat: at,
        exp: at + 3600,
        len: 0,
        sha256: String::new(),
    };
    (
        topics::enroll("riverside", &id),
        seal(
            Kind::Enroll,
            header,
            &serde_json::to_vec(&req).unwrap(),
            key,
        ),
    )
}

fn controller(dir: &Path, mode: &str) -> Controller {
    let store = Store::open(&dir.join("sidenet.redb"), T0).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(dir)));
    let mesh_text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml"))
        .unwrap()
        .replace("mode: auto", &format!("mode: {mode}"));
    let mut texts = vec![(PathBuf::from("mesh.yaml"), mesh_text)];
    for f in manifest::collect_files(&[repo().join("hardware-profiles")]).unwrap() {
        let t = std::fs::read_to_string(&f).unwrap();
        texts.push((f, t));
    }
    ctl.set_manifests(manifest::load_texts(&texts).unwrap(), T0)
        .unwrap();
    ctl.flush().unwrap();
    ctl
}

/// Delivers `msg` and returns the config topics published as a result.
fn deliver(ctl: &mut Controller, (topic, payload): (String, Vec<u8>), at: u64) -> Vec<String> {
    ctl.on_message(&topic, &payload, at).unwrap();
    ctl.flush()
        .unwrap()
        .into_iter()
        .map(|p| p.topic)
        .filter(|t| t.ends_with("/config"))
        .collect()
}

#[test]
fn waiting_nodes_cost_no_record_and_no_subnet() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = controller(dir.path(), "approval");
    let subnets_before = ctl.store.subnets.len();
    let db = dir.path().join("sidenet.redb");
    let size_before = std::fs::metadata(&db).unwrap().len();

    // 2,000 new nodes in the same second: the burst (100) is listed, the rest left out.
    let mut published = Vec::new();
    for i in 0..2000 {
        published.extend(deliver(&mut ctl, enrol(&key(i), 1, T0), T0));
    }
    assert!(published.is_empty(), "{published:?}");
    assert_eq!(ctl.pending.len("riverside"), 100);
    assert_eq!(ctl.counters.pending_rate_limited, 1900);
    assert!(ctl.store.nodes.is_empty());
    assert_eq!(ctl.store.subnets.len(), subnets_before);
    let pending_rows = ctl
        .status()
        .into_iter()
        .filter(|r| r.phase == "Pending")
        .collect::<Vec<_>>();
    assert_eq!(pending_rows.len(), 100);
    assert!(pending_rows.iter().all(|r| {
        r.address.is_none()
            && r.reason
                .as_deref()
                .is_some_and(|t| t.contains("sidenetctl approve"))
    }));
    // Asking again is free; 10 s later 100 more may be listed (10 a second).
    for i in 0..100 {
        deliver(&mut ctl, enrol(&key(i), 2, T0 + 10), T0 + 10);
    }
    for i in 2000..2200 {
        deliver(&mut ctl, enrol(&key(i), 1, T0 + 10), T0 + 10);
    }
    assert_eq!(ctl.pending.len("riverside"), 200);
    assert_eq!(ctl.counters.pending_rate_limited, 2000);

    // The admin approves a waiting node by its hostname: record, subnet, config.
    let listed = key(5).public().node_id();
    let approved = ctl
        .approve(&format!("host-{}", &listed[..8]), T0 + 11)
        .unwrap();
    assert_eq!(approved, Approval::Admitted(listed.clone()));
    let out = ctl.flush().unwrap();
    assert!(
        out.iter()
            .any(|p| p.topic == topics::config("riverside", &listed))
    );
    assert!(ctl.store.nodes[&listed].approved);
    assert_eq!(ctl.store.subnets.len(), subnets_before + 1);

    // A node left out by the rate limit is approved by its id, ahead: admitted when it asks.
    let left_out = key(1999).public().node_id();
    assert!(ctl.pending.get(&left_out).is_none());
    assert_eq!(
        ctl.approve(&left_out, T0 + 12).unwrap(),
        Approval::Ahead(left_out.clone())
    );
    ctl.flush().unwrap();
    // Waiting nodes are in memory only: a restart forgets them, not the approval ahead.
    drop(ctl);
    let mut ctl = controller(dir.path(), "approval");
    assert!(ctl.pending.is_empty());
    assert_eq!(ctl.store.nodes.len(), 1);
    let out = deliver(&mut ctl, enrol(&key(1999), 2, T0 + 20), T0 + 20);
    assert_eq!(out, vec![topics::config("riverside", &left_out)]);
    assert!(ctl.store.approvals.is_empty(), "the approval is used up");

    // A waiting node can be removed (nothing to clear on the broker).
    let waiting = key(3000);
    deliver(&mut ctl, enrol(&waiting, 1, T0 + 21), T0 + 21);
    let id = waiting.public().node_id();
    assert!(ctl.pending.get(&id).is_some());
    assert_eq!(ctl.remove_node(&id, T0 + 22).unwrap(), None);
    assert!(ctl.pending.get(&id).is_none());
    ctl.flush().unwrap();
    drop(ctl);
    let size_after = std::fs::metadata(&db).unwrap().len();
    println!("2,200 unknown nodes asked, 2 approved: database {size_before} -> {size_after} bytes");
    assert!(size_after.saturating_sub(size_before) < 1 << 20);
}

#[test]
fn auto_mode_records_its_admissions() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = controller(dir.path(), "auto");
    let k = key(1);
    let id = k.public().node_id();
    let out = deliver(&mut ctl, enrol(&k, 1, T0), T0);
    assert_eq!(out, vec![topics::config("riverside", &id)]);
    assert!(ctl.store.nodes[&id].approved);
    // A record written before admissions were recorded in auto mode is admitted at load.
    let mut rec = ctl.store.nodes[&id].clone();
    rec.approved = false;
    let mut batch = Default::default();
    ctl.store.put_node(&mut batch, &id, rec);
    ctl.store.commit(batch).unwrap();
    drop(ctl);
    let ctl = controller(dir.path(), "auto");
    assert!(ctl.store.nodes[&id].approved);
}
