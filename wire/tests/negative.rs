//! Negative vectors: every way an envelope can be wrong must be refused, with the right reason.

use sidenet_wire::envelope::{DEFAULT_MAX_ENVELOPE, Expect, seal};
use sidenet_wire::keys::KeyPair;
use sidenet_wire::{Envelope, Header, Kind, Revision, WireError};

const NOW: u64 = 1_800_000_000;

fn mesh_key() -> KeyPair {
    KeyPair::from_seed(&[1u8; 32])
}

fn header(mesh: &str, node: &str, rev: u64) -> Header {
    Header {
        mesh: mesh.into(),
        node: Some(node.into()),
        epoch: 100,
        rev,
        iat: NOW - 10,
        exp: NOW + 3600,
        len: 0,
        sha256: String::new(),
    }
}

fn good() -> Vec<u8> {
    seal(
        Kind::Config,
        header("riverside", "node1", 5),
        br#"{"hello":"world"}"#,
        &mesh_key(),
    )
}

fn expect() -> Expect<'static> {
    Expect {
        mesh: "riverside",
        node: Some("node1"),
        after: Some(Revision { epoch: 100, rev: 4 }),
        now: NOW,
    }
}

/// Runs the full receiver pipeline.
fn receive(bytes: &[u8]) -> Result<(), WireError> {
    let env = Envelope::parse(bytes, DEFAULT_MAX_ENVELOPE)?;
    let v = env.verify(Kind::Config, &mesh_key().public())?;
    v.check(&expect())
}

fn err(bytes: &[u8]) -> WireError {
    match receive(bytes) {
        Ok(()) => WireError::BadBody("unexpectedly accepted".into()),
        Err(e) => e,
    }
}

#[test]
fn good_envelope_is_accepted() {
    assert_eq!(receive(&good()), Ok(()));
}

#[test]
fn v01_empty_input() {
    assert_eq!(err(b""), WireError::Truncated);
}

#[test]
fn v02_truncated_in_fixed_part() {
    assert_eq!(err(&good()[..50]), WireError::Truncated);
}

#[test]
fn v03_truncated_in_header() {
    assert_eq!(err(&good()[..110]), WireError::Truncated);
}

#[test]
fn v04_truncated_body() {
    let g = good();
    assert!(matches!(
        err(&g[..g.len() - 3]),
        WireError::BodyLength { .. }
    ));
}

#[test]
fn v05_extra_trailing_bytes() {
    let mut g = good();
    g.extend_from_slice(b"xx");
    assert!(matches!(err(&g), WireError::BodyLength { .. }));
}

#[test]
fn v06_bad_magic() {
    let mut g = good();
    g[0] = b'X';
    assert_eq!(err(&g), WireError::BadMagic);
}

#[test]
fn v07_unknown_version() {
    let mut g = good();
    g[4] = 2;
    assert_eq!(err(&g), WireError::UnsupportedVersion(2));
}

#[test]
fn v08_unknown_kind() {
    let mut g = good();
    g[5] = 9;
    assert_eq!(err(&g), WireError::UnknownKind(9));
}

#[test]
fn v09_kind_flipped_breaks_signature_or_kind_check() {
    // Re-label a config as a status: the kind check refuses it before the signature.
    let mut g = good();
    g[5] = Kind::Status as u8;
    assert!(matches!(err(&g), WireError::WrongKind { .. }));
}

#[test]
fn v10_envelope_of_wrong_kind_signed_by_mesh_key() {
    let ann = seal(
        Kind::Announce,
        header("riverside", "node1", 5),
        b"{}",
        &mesh_key(),
    );
    assert!(matches!(err(&ann), WireError::WrongKind { .. }));
}

#[test]
fn v11_forged_by_other_key() {
    let forged = seal(
        Kind::Config,
        header("riverside", "node1", 5),
        b"{}",
        &KeyPair::from_seed(&[66u8; 32]),
    );
    assert!(matches!(err(&forged), WireError::UnknownSigner { .. }));
}

#[test]
fn v12_signer_key_swapped_to_trusted_key() {
    // A rogue signs with its own key, then writes the trusted key into the signer field.
    let mut forged = seal(
        Kind::Config,
        header("riverside", "node1", 5),
        b"{}",
        &KeyPair::from_seed(&[66u8; 32]),
    );
    forged[8..40].copy_from_slice(mesh_key().public().as_bytes());
    assert_eq!(err(&forged), WireError::BadSignature);
}

#[test]
fn v13_signature_bit_flip() {
    let mut g = good();
    g[60] ^= 1;
    assert_eq!(err(&g), WireError::BadSignature);
}

#[test]
fn v14_header_bit_flip() {
    let mut g = good();
    g[110] ^= 0x20;
    assert_eq!(err(&g), WireError::BadSignature);
}

#[test]
fn v15_body_tampered() {
    let mut g = good();
    let n = g.len();
    g[n - 3] = b'W';
    assert_eq!(err(&g), WireError::BodyHash);
}

#[test]
fn v16_body_replaced_same_length() {
    let g = good();
    let other = seal(
        Kind::Config,
        header("riverside", "node1", 5),
        br#"{"hello":"evil!"}"#,
        &mesh_key(),
    );
    let body_start = g.len() - 17;
    let mut mixed = g[..body_start].to_vec();
    mixed.extend_from_slice(&other[other.len() - 17..]);
    assert_eq!(err(&mixed), WireError::BodyHash);
}

#[test]
fn v17_replayed_older_revision() {
    let old = seal(
        Kind::Config,
        header("riverside", "node1", 3),
        b"{}",
        &mesh_key(),
    );
    assert!(matches!(err(&old), WireError::Stale { .. }));
}

#[test]
fn v18_replayed_same_revision() {
    let same = seal(
        Kind::Config,
        header("riverside", "node1", 4),
        b"{}",
        &mesh_key(),
    );
    assert!(matches!(err(&same), WireError::Stale { .. }));
}

#[test]
fn v19_older_epoch_with_higher_counter() {
    let mut h = header("riverside", "node1", 999);
    h.epoch = 99;
    let old = seal(Kind::Config, h, b"{}", &mesh_key());
    assert!(matches!(err(&old), WireError::Stale { .. }));
}

#[test]
fn v20_newer_epoch_with_lower_counter_is_accepted() {
    let mut h = header("riverside", "node1", 1);
    h.epoch = 101;
    let newer = seal(Kind::Config, h, b"{}", &mesh_key());
    assert_eq!(receive(&newer), Ok(()));
}

#[test]
fn v21_other_nodes_config() {
    let other = seal(
        Kind::Config,
        header("riverside", "node2", 9),
        b"{}",
        &mesh_key(),
    );
    assert!(matches!(err(&other), WireError::WrongNode { .. }));
}

#[test]
fn v22_other_mesh() {
    let other = seal(
        Kind::Config,
        header("hillside", "node1", 9),
        b"{}",
        &mesh_key(),
    );
    assert!(matches!(err(&other), WireError::WrongMesh { .. }));
}

#[test]
fn v23_expired() {
    let mut h = header("riverside", "node1", 9);
    h.exp = NOW - 1;
    let expired = seal(Kind::Config, h, b"{}", &mesh_key());
    assert!(matches!(err(&expired), WireError::Expired { .. }));
}

#[test]
fn v24_expires_exactly_now() {
    let mut h = header("riverside", "node1", 9);
    h.exp = NOW;
    let expired = seal(Kind::Config, h, b"{}", &mesh_key());
    assert!(matches!(err(&expired), WireError::Expired { .. }));
}

#[test]
fn v25_missing_node_in_header() {
    let mut h = header("riverside", "node1", 9);
    h.node = None;
    let anon = seal(Kind::Config, h, b"{}", &mesh_key());
    assert!(matches!(err(&anon), WireError::WrongNode { .. }));
}

#[test]
fn v26_oversize_refused_before_anything_else() {
    let big = vec![0u8; DEFAULT_MAX_ENVELOPE + 1];
    assert!(matches!(err(&big), WireError::TooLarge { .. }));
}

#[test]
fn v27_header_length_over_limit() {
    let mut g = good();
    g[6] = 0xff;
    g[7] = 0xff;
    assert_eq!(err(&g), WireError::HeaderTooLarge(0xffff));
}

#[test]
fn v28_header_length_points_past_end() {
    let mut g = good();
    let hl = u16::from_be_bytes([g[6], g[7]]) as usize;
    let len = g.len();
    g[6..8].copy_from_slice(&((hl + len) as u16).min(4096).to_be_bytes());
    assert!(matches!(
        err(&g),
        WireError::Truncated | WireError::BadSignature
    ));
}

#[test]
fn v29_weak_signer_key() {
    let mut g = good();
    let mut id = [0u8; 32];
    id[0] = 1;
    g[8..40].copy_from_slice(&id);
    let env = Envelope::parse(&g, DEFAULT_MAX_ENVELOPE).ok();
    assert!(env.as_ref().is_some_and(|e| e.claimed_signer().is_err()));
    assert!(matches!(err(&g), WireError::UnknownSigner { .. }));
}

#[test]
fn v30_non_canonical_signature_s_rejected() {
    // Add the group order L to the scalar half of the signature: a malleated signature that
    // lenient verifiers accept and verify_strict must refuse.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut g = good();
    let s = &mut g[40 + 32..40 + 64];
    let mut carry = 0u16;
    for i in 0..32 {
        let v = u16::from(s[i]) + u16::from(L[i]) + carry;
        s[i] = v as u8;
        carry = v >> 8;
    }
    assert_eq!(err(&g), WireError::BadSignature);
}

#[test]
fn v31_self_signed_enrolment_verifies_only_with_its_own_key() {
    let node = KeyPair::from_seed(&[5u8; 32]);
    let id = node.public().node_id();
    let mut h = header("riverside", &id, 1);
    h.epoch = 0;
    let e = seal(Kind::Enroll, h, b"{}", &node);
    let env = Envelope::parse(&e, DEFAULT_MAX_ENVELOPE);
    let v = env.and_then(|env| env.verify_self_signed(Kind::Enroll));
    assert_eq!(v.map(|v| v.signer.node_id()), Ok(id));
    // The same bytes are not a config.
    assert!(matches!(err(&e), WireError::WrongKind { .. }));
}

#[test]
fn v32_body_not_json() {
    let e = seal(
        Kind::Config,
        header("riverside", "node1", 9),
        b"\xff\xfe",
        &mesh_key(),
    );
    let env = Envelope::parse(&e, DEFAULT_MAX_ENVELOPE);
    let v = env.and_then(|env| env.verify(Kind::Config, &mesh_key().public()));
    let body = v.and_then(|v| v.body_json::<serde_json::Value>());
    assert!(matches!(body, Err(WireError::BadBody(_))));
}

#[test]
fn seal_hashed_is_seal_and_a_wrong_digest_is_refused() {
    use sidenet_wire::codec::sha256;
    use sidenet_wire::envelope::seal_hashed;
    let body = br#"{"hello":"world"}"#;
    let h = header("riverside", "node1", 5);
    let hashed = seal_hashed(Kind::Config, h.clone(), body, &sha256(body), &mesh_key());
    // Byte for byte what `seal` makes (the controller's configs keep their format).
    assert_eq!(hashed, good());
    assert_eq!(receive(&hashed), Ok(()));
    // A digest of another body signs a header no body matches.
    let wrong = seal_hashed(Kind::Config, h, body, &sha256(b"other"), &mesh_key());
    assert_eq!(err(&wrong), WireError::BodyHash);
}
