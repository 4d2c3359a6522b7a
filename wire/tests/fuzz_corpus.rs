//! Replays the seeds, the minimised fuzz corpora and the regression inputs of the wire targets
//! (`fuzz/{seeds,corpus,regressions}/<target>/`) through the same functions the fuzz targets
//! call, so CI checks every input without needing cargo-fuzz or a nightly compiler.
//!
//! `cargo test -p sidenet-wire --test fuzz_corpus -- --ignored write_seeds` writes the seed
//! inputs (envelopes produced by this crate) into `fuzz/seeds/`; see `docs/fuzzing.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use sidenet_wire::envelope::seal;
use sidenet_wire::fuzzing::{self, MESH, NOW, flags, other_key, signed_input, trusted_key};
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{
    Ack, Announce, ApplyState, EnrollRequest, Failure, FileSpec, Neighbour, NodeConfig, Probe,
    Requirement, StatusReport, Trial, WireguardInfo,
};
use sidenet_wire::{Header, Kind, Revision};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["seeds", "corpus", "regressions"] {
        let dir = fuzz_dir().join(sub).join(target);
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

fn replay(target: &str, run: impl Fn(&[u8])) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no corpus for {target} under {}",
        fuzz_dir().display()
    );
    eprintln!("{target}: replaying {} inputs", files.len());
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
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
fn envelope_raw_corpus() {
    replay("envelope_raw", fuzzing::envelope_raw);
}

#[test]
fn envelope_signed_corpus() {
    replay("envelope_signed", fuzzing::envelope_signed);
}

// ---- seeds ---------------------------------------------------------------------------------

const NODE: &str = "qi4chuluc3u2giv7";

fn header(node: Option<&str>, rev: u64) -> Header {
    Header {
        mesh: MESH.into(),
        node: node.map(str::to_string),
        epoch: NOW - 1000,
        rev,
        iat: NOW - 10,
        exp: NOW + 300,
        len: 0,
        sha256: String::new(),
    }
}

fn wireguard() -> WireguardInfo {
    WireguardInfo {
        public_key: other_key().public().to_base64(),
        endpoints: vec!["10.0.1.7/24".into(), "2001:db8:5::7/64".into()],
        heard: Vec::new(),
    }
}

/// Realistic bodies of every kind, as the controller and the agent write them.
fn bodies() -> Vec<(Kind, Vec<u8>)> {
    let announce = Announce {
        mesh: MESH.into(),
        key: trusted_key().public().to_base64(),
        enrollment: "auto".into(),
        prefix: "fdfc:b395:f348::/48".into(),
        controller: "0.1.0".into(),
        acks: true,
        chain: vec![sidenet_wire::rotation::endorse(
            &sidenet_wire::keys::KeyPair::from_seed(&[1; 32]),
            MESH,
            &trusted_key().public(),
            1_800_000_000,
        )],
        previous_until: Some(1_800_086_400),
    };
    let config = NodeConfig {
        mesh: MESH.into(),
        node: NODE.into(),
        hostname: "riverside-kitchen".into(),
        role: "router".into(),
        profile: "tplink-archer-c7-v2".into(),
        family: "openwrt".into(),
        subnet: "fdfc:b395:f348:1::/64".into(),
        addresses: vec!["fdfc:b395:f348:1::1/64".into()],
        files: vec![
            FileSpec {
                path: "etc/config/wireless".into(),
                mode: 0o644,
                content: "config wifi-iface 'mesh0'\n\toption mode 'mesh'\n".into(),
            },
            FileSpec {
                path: "../etc/shadow".into(),
                mode: 0o600,
                content: String::new(),
            },
        ],
        actions: vec!["reload:network".into()],
        sealed: [(
            "mesh-passphrase".to_string(),
            sidenet_wire::seal::seal(
                trusted_key(),
                &trusted_key().public(),
                sidenet_wire::seal::Context {
                    mesh: MESH,
                    node: NODE,
                    name: "mesh-passphrase",
                },
                b"seed passphrase",
            ),
        )]
        .into(),
        requires: vec![Requirement {
            package: "wpad-mesh-mbedtls".into(),
            program: "wpa_supplicant".into(),
            args: vec!["-vmesh".into()],
        }],
    };
    let enroll = EnrollRequest {
        hostname: "kitchen".into(),
        board: Some("tplink,archer-c7-v2".into()),
        profile: Some("tplink-archer-c7-v2".into()),
        token: Some("tok-123".into()),
        backend: "openwrt".into(),
        agent_version: "0.1.0".into(),
        wireguard: Some(wireguard()),
    };
    let status = StatusReport {
        state: ApplyState::Failed,
        applied: Some(Revision { epoch: 5, rev: 3 }),
        applied_sha256: Some("ab".repeat(32)),
        failure: Some(Failure {
            revision: Some(Revision { epoch: 5, rev: 4 }),
            error: "apply failed".into(),
        }),
        uptime_s: 3600,
        agent_version: "0.1.0".into(),
        neighbours: vec![Neighbour {
            address: "fe80::1".into(),
            interface: "sn-abc".into(),
            node: Some(NODE.into()),
            cost: Some(96),
        }],
        probes: vec![Probe {
            target: "fdfc:b395:f348:2::1".into(),
            rtt_ms: Some(1.5),
            loss: 0.25,
            node: None,
            kind: Some("neighbour".into()),
            sent: 4,
        }],
        wireguard: Some(wireguard()),
        trial: Some(Trial {
            revision: Revision { epoch: 5, rev: 5 },
            sha256: "cd".repeat(32),
        }),
        mqtt_auth: true,
        missing: vec!["wpad-mesh-mbedtls".into()],
        shaping: None,
        services: Vec::new(),
    };
    let ack = Ack {
        revision: Revision { epoch: 5, rev: 5 },
        sha256: "cd".repeat(32),
    };
    let json = |v: serde_json::Result<Vec<u8>>| v.unwrap_or_default();
    vec![
        (Kind::Announce, json(serde_json::to_vec(&announce))),
        (Kind::Config, json(serde_json::to_vec(&config))),
        (Kind::Enroll, json(serde_json::to_vec(&enroll))),
        (Kind::Status, json(serde_json::to_vec(&status))),
        (Kind::Ack, json(serde_json::to_vec(&ack))),
    ]
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
}

/// Writes seed inputs for both wire targets into `fuzz/seeds/<target>/`.
#[test]
#[ignore = "writes seed files; run by hand, see docs/fuzzing.md"]
fn write_seeds() {
    let raw = fuzz_dir().join("seeds/envelope_raw");
    let signed = fuzz_dir().join("seeds/envelope_signed");
    let node_key = KeyPair::from_seed(&[0x11; 32]);
    for (kind, body) in bodies() {
        let name = format!("{kind:?}").to_lowercase();
        let node = (kind != Kind::Announce).then_some(NODE);
        let h = header(node, 7);
        // Signed by the trusted key (controller messages) and self-signed (node messages).
        let by_trusted = seal(kind, h.clone(), &body, trusted_key());
        write(&raw, &format!("seed-{name}-trusted"), &by_trusted);
        let by_node = seal(kind, h.clone(), &body, &node_key);
        write(&raw, &format!("seed-{name}-self"), &by_node);
        let mut bad_sig = by_trusted.clone();
        if let Some(b) = bad_sig.get_mut(50) {
            *b ^= 1;
        }
        write(&raw, &format!("seed-{name}-badsig"), &bad_sig);
        write(
            &raw,
            &format!("seed-{name}-truncated"),
            &by_trusted[..by_trusted.len() / 2],
        );

        let mut hj = serde_json::to_value(&h).unwrap_or_default();
        if let Some(o) = hj.as_object_mut() {
            o.insert("len".into(), 0.into());
            o.insert("sha256".into(), "".into());
        }
        let hb = serde_json::to_vec(&hj).unwrap_or_default();
        write(
            &signed,
            &format!("seed-{name}-fixed"),
            &signed_input(kind as u8 | flags::FIX_BODY, &hb, &body),
        );
        write(
            &signed,
            &format!("seed-{name}-unfixed"),
            &signed_input(kind as u8, &hb, &body),
        );
        write(
            &signed,
            &format!("seed-{name}-other-signer"),
            &signed_input(
                kind as u8 | flags::FIX_BODY | flags::OTHER_SIGNER,
                &hb,
                &body,
            ),
        );
    }
    write(&raw, "seed-empty", b"");
    write(&raw, "seed-magic-only", b"SNET\x01\x02\x00\x10");
    write(&signed, "seed-empty", b"");
}
