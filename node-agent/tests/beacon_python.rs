//! The discovery beacon as docs/dataplane.md describes it, spoken by an independent
//! implementation: a Python script (PyNaCl, from the test peers' virtualenv) written from the
//! documented frame builds and signs a beacon that the agent's table accepts, and verifies and
//! parses one the agent seals (including the node id, derived as documented).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::Instant;

use sidenet_agent::discovery::{Receiver, Table};
use sidenet_wire::NodeKey;
use sidenet_wire::beacon::Beacon;

const SCRIPT: &str = r#"
import base64, hashlib, struct, sys
from nacl.signing import SigningKey, VerifyKey

CONTEXT = b"sidenet-beacon-v1\0"

def node_id(pub):
    return base64.b32encode(hashlib.sha256(pub).digest()[:10]).decode().lower().rstrip("=")

if sys.argv[1] == "make":
    key = SigningKey(bytes([9]) * 32)
    mesh = b"riverside"
    body = b"SNB1" + bytes([len(mesh)]) + mesh + bytes(key.verify_key) + bytes([5]) * 32
    body += struct.pack(">QQ", int(sys.argv[2]), 7)
    sig = key.sign(CONTEXT + body).signature
    print((body + sig).hex())
    print(node_id(bytes(key.verify_key)))
else:
    frame = bytes.fromhex(sys.argv[2])
    assert frame[:4] == b"SNB1", frame[:4]
    l = frame[4]
    assert len(frame) == 149 + l, len(frame)
    mesh = frame[5:5 + l].decode()
    pub = frame[5 + l:37 + l]
    wg = frame[37 + l:69 + l]
    t, seq = struct.unpack(">QQ", frame[69 + l:85 + l])
    VerifyKey(pub).verify(CONTEXT + frame[:85 + l], frame[85 + l:])
    print(mesh, node_id(pub), base64.b64encode(wg).decode(), t, seq)
"#;

fn python(args: &[&str]) -> String {
    let py = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-peers/bin/python");
    assert!(
        py.exists(),
        "{} missing: scripts/install-peers installs the Python test peers",
        py.display()
    );
    let out = Command::new(py)
        .arg("-c")
        .arg(SCRIPT)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn an_independent_implementation_speaks_the_documented_beacon() {
    let now = 1_800_000_000u64;
    // Python → agent.
    let out = python(&["make", &now.to_string()]);
    let mut lines = out.lines();
    let hex = lines.next().unwrap();
    let frame: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let id = lines.next().unwrap().to_string();
    let b = Beacon::open(&frame).unwrap();
    assert_eq!(b.node(), id);
    assert_eq!((b.time, b.seq, b.wireguard), (now, 7, [5u8; 32]));
    let mut t = Table::default();
    let who = Receiver {
        mesh: "riverside",
        node: "me",
    };
    t.receive(
        &frame,
        "fe80::9".parse().unwrap(),
        "mesh0",
        &who,
        now + 1,
        Instant::now(),
    )
    .unwrap();
    let heard = t.heard(Instant::now(), std::time::Duration::from_secs(8));
    assert_eq!(heard.len(), 1);
    assert_eq!(heard[0].node, id);

    // Agent → Python.
    let key = NodeKey::from_seed(&[4u8; 32]);
    let sealed = Beacon {
        mesh: "oak-street".into(),
        node_key: key.public(),
        wireguard: [6u8; 32],
        time: now,
        seq: 42,
    }
    .seal(&key);
    let hex: String = sealed.iter().map(|b| format!("{b:02x}")).collect();
    let out = python(&["read", &hex]);
    let wg = "BgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgY=";
    assert_eq!(
        out.trim(),
        format!("oak-street {} {wg} {now} 42", key.public().node_id())
    );
}
