//! Replays the seeds, the minimised fuzz corpora and the regression inputs of the controller
//! targets (`fuzz/{seeds,corpus,regressions}/<target>/`) through the same functions the fuzz
//! targets call, so CI checks every input without cargo-fuzz or nightly.
//!
//! `cargo test -p sidenet-controller --test fuzz_corpus -- --ignored write_seeds` writes the
//! seed inputs (the example manifests, the broken fixtures, messages as agents send them) into
//! `fuzz/seeds/`; see `docs/fuzzing.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use sidenet_controller::fuzzing::{
    self, FRESH_SEED, Fixture, NODE_SEED, TOKEN, TOKEN_MESH, enroll_request, flags, message_input,
    node_header,
};
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{
    ApplyState, Failure, Neighbour, Probe, StatusReport, Trial, WireguardInfo,
};
use sidenet_wire::{Kind, Revision, topics};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["seeds", "corpus", "regressions"] {
        let dir = repo().join("fuzz").join(sub).join(target);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            out.extend(
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file()),
            );
        }
    }
    out.sort();
    out
}

fn replay(target: &str, mut run: impl FnMut(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    eprintln!("{target}: replaying {} inputs", files.len());
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs of {target} panic:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn manifest_load_corpus() {
    let mut fixture = Fixture::new(&repo()).unwrap();
    replay("manifest_load", |d| {
        let _ = fixture.manifest_load(d);
    });
}

/// The example manifests load and reach the controller (announcements signed, nodes rendered).
#[test]
fn manifest_seed_reaches_the_controller() {
    let mut fixture = Fixture::new(&repo()).unwrap();
    let seed = std::fs::read(repo().join("fuzz/seeds/manifest_load/seed-riverside"))
        .unwrap_or_else(|e| panic!("{e} (run write_seeds)"));
    let start = fixture.initial_counters();
    // The example's own MeshNodes wait for their nodes to enrol (their configs carry secrets
    // sealed to the node's key); the fixture's enrolled node is rendered again when the example
    // changes something it depends on: the channel.
    let text = String::from_utf8(seed).unwrap();
    assert!(text.contains("channel: 36"));
    let seed = text.replacen("channel: 36", "channel: 40", 1).into_bytes();
    let c = fixture.manifest_load(&seed).expect("the example loads");
    assert!(c.rendered > start.rendered, "{c:?}");
    assert!(fuzzing::load_manifests(b"kind: [").is_none());
}

#[test]
fn node_messages_corpus() {
    let mut fixture = Fixture::new(&repo()).unwrap();
    replay("node_messages", |d| {
        let _ = fixture.node_message(d);
    });
}

/// The seeds reach past the signature checks into enrolment and status handling (otherwise the
/// fuzzer would only ever exercise the refusal paths).
#[test]
fn node_message_seeds_reach_the_handlers() {
    let mut fixture = Fixture::new(&repo()).unwrap();
    let start = fixture.initial_counters();
    let seed = |name: &str| {
        std::fs::read(repo().join("fuzz/seeds/node_messages").join(name))
            .unwrap_or_else(|e| panic!("{name}: {e} (run write_seeds)"))
    };
    for name in [
        "seed-enroll-fresh",
        "seed-enroll-token",
        "seed-raw-topic-enroll",
    ] {
        let c = fixture.node_message(&seed(name));
        assert_eq!(c.enrolled, start.enrolled + 1, "{name}: {c:?}");
        assert_eq!(c.rejected_messages, start.rejected_messages, "{name}");
    }
    for name in ["seed-status", "seed-raw-status", "seed-raw-topic-status"] {
        let c = fixture.node_message(&seed(name));
        assert_eq!(
            c.rejected_messages, start.rejected_messages,
            "{name}: {c:?}"
        );
    }
    for name in ["seed-status-wrong-key", "seed-status-unfixed"] {
        let c = fixture.node_message(&seed(name));
        assert_eq!(c.rejected_messages, start.rejected_messages + 1, "{name}");
    }
    // Every input starts from the same state.
    let c = fixture.node_message(&seed("seed-enroll-fresh"));
    assert_eq!(c.enrolled, start.enrolled + 1);
}

// ---- seeds ---------------------------------------------------------------------------------

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

fn status_report() -> StatusReport {
    StatusReport {
        state: ApplyState::Applied,
        applied: Some(Revision {
            epoch: fuzzing_epoch(),
            rev: 1,
        }),
        applied_sha256: Some("ab".repeat(32)),
        failure: Some(Failure {
            revision: Some(Revision { epoch: 1, rev: 9 }),
            error: "apply failed".into(),
        }),
        uptime_s: 60,
        agent_version: "0.1.0".into(),
        neighbours: vec![Neighbour {
            address: "fe80::1".into(),
            interface: "sn-abc".into(),
            node: None,
            cost: Some(96),
        }],
        probes: vec![Probe {
            target: "fdfc:b395:f348:2::1".into(),
            rtt_ms: Some(2.0),
            loss: 0.0,
            node: None,
            kind: Some("gateway".into()),
            sent: 4,
        }],
        wireguard: Some(WireguardInfo {
            public_key: KeyPair::from_seed(&[3; 32]).public().to_base64(),
            endpoints: vec!["10.0.1.7/24".into(), "2001:db8:5::7/64".into()],
            heard: Vec::new(),
        }),
        trial: Some(Trial {
            revision: Revision {
                epoch: fuzzing_epoch(),
                rev: 1,
            },
            sha256: "ab".repeat(32),
        }),
        mqtt_auth: false,
        missing: Vec::new(),
        shaping: None,
        services: Vec::new(),
    }
}

/// The fixture's store epoch (see `Fixture::new`).
fn fuzzing_epoch() -> u64 {
    sidenet_wire::fuzzing::NOW - 100_000
}

/// Writes seed inputs for both controller targets into `fuzz/seeds/<target>/`.
#[test]
#[ignore = "writes seed files; run by hand, see docs/fuzzing.md"]
fn write_seeds() {
    let repo = repo();
    // manifest_load: the example mesh (with its nodes and the profiles they use), every
    // hardware profile, every broken fixture.
    let out = repo.join("fuzz/seeds/manifest_load");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let example = [
        read(&repo.join("examples/riverside/mesh.yaml")),
        read(&repo.join("examples/riverside/nodes.yaml")),
        read(&repo.join("hardware-profiles/tplink-archer-c7-v2.yaml")),
        read(&repo.join("hardware-profiles/raspberrypi-4b-awus036acm.yaml")),
    ];
    write(&out, "seed-riverside", example.join("\0").as_bytes());
    for p in yaml_files(&repo.join("hardware-profiles")) {
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        write(&out, &format!("seed-profile-{name}"), read(&p).as_bytes());
    }
    for p in yaml_files(&repo.join("controller/tests/fixtures/broken")) {
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        write(&out, &format!("seed-broken-{name}"), read(&p).as_bytes());
    }

    // node_messages: as agents send them.
    let out = repo.join("fuzz/seeds/node_messages");
    let node = KeyPair::from_seed(&NODE_SEED).public().node_id();
    let fresh = KeyPair::from_seed(&FRESH_SEED).public().node_id();
    let header = |mesh: &str, id: &str, rev: u64| {
        let mut h = serde_json::to_value(node_header(mesh, id, rev)).unwrap();
        let o = h.as_object_mut().unwrap();
        o.insert("len".into(), 0.into());
        o.insert("sha256".into(), "".into());
        serde_json::to_vec(&h).unwrap()
    };
    let enroll = serde_json::to_vec(&enroll_request()).unwrap();
    let mut with_token = enroll_request();
    with_token.token = Some(TOKEN.into());
    with_token.wireguard = status_report().wireguard;
    let with_token = serde_json::to_vec(&with_token).unwrap();
    let status = serde_json::to_vec(&status_report()).unwrap();
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "enroll-fresh",
            message_input(
                flags::ENROLL | flags::FRESH_NODE | flags::FIX_BODY,
                &header("riverside", &fresh, 1),
                &enroll,
            ),
        ),
        (
            "enroll-again",
            message_input(
                flags::ENROLL | flags::FIX_BODY,
                &header("riverside", &node, 5),
                &enroll,
            ),
        ),
        (
            "enroll-token",
            message_input(
                flags::ENROLL | flags::FRESH_NODE | flags::TOKEN_MESH | flags::FIX_BODY,
                &header(TOKEN_MESH, &fresh, 1),
                &with_token,
            ),
        ),
        (
            "status",
            message_input(
                flags::STATUS | flags::FIX_BODY,
                &header("riverside", &node, 6),
                &status,
            ),
        ),
        (
            "status-wrong-key",
            message_input(
                flags::STATUS | flags::FIX_BODY | flags::WRONG_KEY,
                &header("riverside", &node, 6),
                &status,
            ),
        ),
        (
            "status-unfixed",
            message_input(flags::STATUS, &header("riverside", &node, 6), &status),
        ),
        ("online", [&[flags::ONLINE][..], b"online"].concat()),
        ("offline", [&[flags::ONLINE][..], b"offline"].concat()),
    ];
    for (name, data) in seeds {
        write(&out, &format!("seed-{name}"), &data);
    }
    // Raw payloads: envelopes sealed as the agent does, on their topics.
    let key = KeyPair::from_seed(&NODE_SEED);
    let env = seal(
        Kind::Status,
        node_header("riverside", &node, 7),
        &status,
        &key,
    );
    write(
        &out,
        "seed-raw-status",
        &[&[flags::STATUS | flags::RAW_PAYLOAD][..], &env].concat(),
    );
    let topic = topics::status("riverside", &node);
    write(
        &out,
        "seed-raw-topic-status",
        &[&[flags::RAW_TOPIC][..], topic.as_bytes(), b"\n", &env].concat(),
    );
    let env = seal(
        Kind::Enroll,
        node_header("riverside", &fresh, 1),
        &enroll,
        &KeyPair::from_seed(&FRESH_SEED),
    );
    let topic = topics::enroll("riverside", &fresh);
    write(
        &out,
        "seed-raw-topic-enroll",
        &[&[flags::RAW_TOPIC][..], topic.as_bytes(), b"\n", &env].concat(),
    );
}
