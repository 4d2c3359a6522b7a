//! Our signatures, checked by an independent ed25519 implementation (PyNaCl over libsodium),
//! installed by `scripts/test` into `.venv-peers`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use sidenet_wire::codec::hex;
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::{Header, Kind};

#[test]
fn pynacl_verifies_our_envelopes_and_refuses_tampered_ones() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var("SIDENET_PEER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo.join(".venv-peers/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run `scripts/test` once, it installs the test peers",
        python.display()
    );
    let key = KeyPair::from_seed(&[3u8; 32]);
    let mut envs = Vec::new();
    for (i, body) in [b"{}".to_vec(), vec![b'x'; 7000], Vec::new()]
        .iter()
        .enumerate()
    {
        let h = Header {
            mesh: "riverside".into(),
            node: Some("abcdefghij234567".into()),
            epoch: 1_800_000_000,
            rev: i as u64 + 1,
            iat: 1_800_000_000,
            exp: 1_800_003_600,
            len: 0,
            sha256: String::new(),
        };
        envs.push(seal(Kind::Config, h, body, &key));
    }
    let mut bad_sig = envs[0].clone();
    bad_sig[50] ^= 1;
    let mut bad_header = envs[1].clone();
    bad_header[110] ^= 0x20;
    let mut bad_body = envs[1].clone();
    let n = bad_body.len();
    bad_body[n - 1] ^= 1;
    envs.extend([bad_sig, bad_header, bad_body]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("vectors.json");
    let doc = serde_json::json!({
        "public_key": key.public().to_base64(),
        "envelopes": envs.iter().map(|e| hex(e)).collect::<Vec<_>>(),
    });
    std::fs::write(&input, doc.to_string()).unwrap();
    let out = std::process::Command::new(&python)
        .arg(repo.join("tests/peers/verify_nacl.py"))
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        verdicts,
        ["ok", "ok", "ok", "signature", "signature", "body"]
    );
}

#[test]
fn libsodium_opens_our_sealed_secrets_and_refuses_them_out_of_context() {
    use base64::Engine;
    use sidenet_wire::seal::{Context, seal};
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var("SIDENET_PEER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo.join(".venv-peers/bin/python"));
    let mesh = KeyPair::from_seed(&[7u8; 32]);
    let seed = [9u8; 32];
    let node = KeyPair::from_seed(&seed);
    let id = node.public().node_id();
    let ctx = |name| Context {
        mesh: "riverside",
        node: &id,
        name,
    };
    let a = seal(
        &mesh,
        &node.public(),
        ctx("mesh-passphrase"),
        "tr0ub4dor & 3".as_bytes(),
    );
    let other = KeyPair::from_seed(&[5u8; 32]).public();
    let b = seal(&mesh, &other, ctx("mesh-passphrase"), b"not yours");
    let case = |name: &str, sealed: &str| serde_json::json!({"mesh": "riverside", "node": id, "name": name, "sealed": sealed});
    let doc = serde_json::json!({
        "seed": base64::engine::general_purpose::STANDARD.encode(seed),
        "cases": [case("mesh-passphrase", &a), case("psk", &a), case("mesh-passphrase", &b)],
    });
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("sealed.json");
    std::fs::write(&input, doc.to_string()).unwrap();
    let out = std::process::Command::new(&python)
        .arg(repo.join("tests/peers/open_sealed.py"))
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got, ["tr0ub4dor & 3", "refused", "refused"]);
}
