//! Fuzz target bodies, shared by the `cargo fuzz` targets in `fuzz/` and the corpus replay test
//! (`wire/tests/fuzz_corpus.rs`), so CI runs exactly the code the fuzzer ran.
//!
//! Not part of the wire format's API: nothing here is used by the controller or the agent.
//!
//! - [`envelope_raw`]: untrusted bytes straight off the broker: framing, signature against a
//!   fixed trusted key (and self-signed), header, body hash, expectations, body decoding.
//! - [`envelope_signed`]: structure-aware. The input is split into a kind, a header and a body;
//!   the frame is built and signed here with a fixed test key, so the fuzzer reaches the header
//!   and body parsers behind the signature check (which random bytes never pass).
//!
//! Every function must return normally for every input: a panic is a bug.

use std::sync::LazyLock;

use crate::codec::{hex, sha256};
use crate::envelope::{
    DEFAULT_MAX_ENVELOPE, Envelope, Expect, FIXED, Kind, MAGIC, PREFIX, VERSION, Verified,
};
use crate::keys::{KeyPair, PublicKey};
use crate::messages::{Ack, Announce, EnrollRequest, NodeConfig, StatusReport};
use crate::names;

/// Seed of the key the fuzz targets trust (a test key, published here on purpose).
pub const TRUSTED_SEED: [u8; 32] = [0x5a; 32];
/// Seed of a second key, not trusted.
pub const OTHER_SEED: [u8; 32] = [0xa5; 32];
/// The mesh the fuzz targets expect.
pub const MESH: &str = "riverside";
/// The time the fuzz targets run at.
pub const NOW: u64 = 1_900_000_000;

static TRUSTED: LazyLock<KeyPair> = LazyLock::new(|| KeyPair::from_seed(&TRUSTED_SEED));
static OTHER: LazyLock<KeyPair> = LazyLock::new(|| KeyPair::from_seed(&OTHER_SEED));

/// The trusted test key pair.
pub fn trusted_key() -> &'static KeyPair {
    &TRUSTED
}

/// The untrusted test key pair.
pub fn other_key() -> &'static KeyPair {
    &OTHER
}

/// Target `envelope_raw`: decodes and verifies arbitrary bytes as a receiver would.
pub fn envelope_raw(data: &[u8]) {
    let trusted = TRUSTED.public();
    decode(data, &trusted);
}

/// Runs every receive path over one frame: framing, signature (against `trusted`, then
/// self-signed), expectations and body decoding for the frame's kind.
fn decode(data: &[u8], trusted: &PublicKey) {
    // A small cap as the controller and agent use, and the default one.
    let _ = Envelope::parse(data, 64 * 1024).map_err(|e| e.to_string());
    let env = match Envelope::parse(data, DEFAULT_MAX_ENVELOPE) {
        Ok(e) => e,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    if let Ok(k) = env.claimed_signer() {
        let _ = (k.node_id(), k.fingerprint(), k.to_base64());
    }
    // Each path below checks the signature at most once per input (signature checks dominate
    // the cost of an execution).
    // Another kind than the frame's: refused before the signature.
    if env.kind != Kind::Config {
        let _ = env.verify(Kind::Config, trusted).map_err(|e| e.to_string());
    }
    let result = if env.claimed_signer().is_ok_and(|k| k == *trusted) {
        // Signed by the trusted key: through a rotation set that holds it second.
        env.verify_any(env.kind, &[OTHER.public(), *trusted])
    } else {
        // Anyone else: refused as untrusted, then taken as self-signed (enrolment, status,
        // announcement before the mesh key is pinned).
        let _ = env.verify(env.kind, trusted).map_err(|e| e.to_string());
        env.verify_self_signed(env.kind)
    };
    match result {
        Ok(v) => after_verify(&v),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// What receivers do with a verified envelope: check it against fixed and matching
/// expectations, then decode the body as the kind says (and as every other kind).
fn after_verify(v: &Verified<'_>) {
    let h = &v.header;
    let _ = (h.revision(), h.revision().to_string());
    let fixed = Expect {
        mesh: MESH,
        node: Some("abcdefghij234567"),
        after: Some(crate::Revision { epoch: 1, rev: 1 }),
        now: NOW,
    };
    let _ = v.check(&fixed).map_err(|e| e.to_string());
    let own = Expect {
        mesh: &h.mesh,
        node: h.node.as_deref(),
        after: Some(crate::Revision {
            epoch: h.epoch,
            rev: h.rev.saturating_sub(1),
        }),
        now: h.iat,
    };
    let _ = v.check(&own).map_err(|e| e.to_string());
    let _ = names::check_mesh_name(&h.mesh).map_err(|e| e.to_string());
    if let Some(n) = &h.node {
        let _ = names::check_node_id(n).map_err(|e| e.to_string());
        let _ = crate::topics::parse(&crate::topics::status(&h.mesh, n));
    }
    let _ = v.signer.node_id();
    // The kind's own body first, then the others (a receiver must survive any body).
    match v.kind {
        Kind::Announce => announce(v),
        Kind::Config => config(v),
        Kind::Enroll => enroll(v),
        Kind::Status => status(v),
        Kind::Ack => ack(v),
    }
    let _ = v.body_json::<serde_json::Value>();
    let _ = v.body_json::<StatusReport>();
    let _ = v.body_json::<NodeConfig>();
}

fn announce(v: &Verified<'_>) {
    if let Ok(a) = v.body_json::<Announce>() {
        let _ = names::check_mesh_name(&a.mesh);
        if let Ok(k) = PublicKey::from_base64(&a.key) {
            let _ = k == v.signer;
        }
    }
}

fn config(v: &Verified<'_>) {
    if let Ok(c) = v.body_json::<NodeConfig>() {
        for f in &c.files {
            let _ = f.path_is_safe();
        }
        let _ = names::check_node_id(&c.node);
    }
}

fn enroll(v: &Verified<'_>) {
    if let Ok(r) = v.body_json::<EnrollRequest>() {
        if let Some(t) = &r.token {
            let _ = crate::codec::sha256_hex(t.as_bytes());
        }
        if let Some(wg) = &r.wireguard {
            let _ = PublicKey::from_base64(&wg.public_key);
        }
    }
}

fn status(v: &Verified<'_>) {
    if let Ok(s) = v.body_json::<StatusReport>() {
        let _ = serde_json::to_vec(&s);
        if let Some(t) = &s.trial {
            let _ = crate::codec::unhex(&t.sha256);
        }
        if let Some(sha) = &s.applied_sha256 {
            let _ = crate::codec::unhex(sha);
        }
    }
}

fn ack(v: &Verified<'_>) {
    if let Ok(a) = v.body_json::<Ack>() {
        let _ = crate::codec::unhex(&a.sha256);
    }
}

/// Builds a frame around raw header bytes and signs it with `key`, as [`crate::envelope::seal`]
/// does for a well-formed header. `kind` and the header are taken as given (any kind byte, any
/// header bytes, any header length up to `u16::MAX`).
pub fn seal_raw(kind: u8, header: &[u8], body: &[u8], key: &KeyPair) -> Vec<u8> {
    let hlen = u16::try_from(header.len()).unwrap_or(u16::MAX);
    let header = &header[..usize::from(hlen)];
    let mut out = Vec::with_capacity(FIXED + header.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&hlen.to_be_bytes());
    out.extend_from_slice(key.public().as_bytes());
    let mut msg = Vec::with_capacity(PREFIX + header.len());
    msg.extend_from_slice(&out[..PREFIX]);
    msg.extend_from_slice(header);
    out.extend_from_slice(&key.sign(&msg));
    out.extend_from_slice(header);
    out.extend_from_slice(body);
    out
}

/// Flags of an [`envelope_signed`] input (first byte).
pub mod flags {
    /// Low three bits: the kind byte (1–5 are kinds, 0, 6 and 7 are not).
    pub const KIND_MASK: u8 = 0x07;
    /// Rewrite `len` and `sha256` of a JSON-object header to match the body.
    pub const FIX_BODY: u8 = 0x08;
    /// Sign with the untrusted key instead of the trusted one.
    pub const OTHER_SIGNER: u8 = 0x10;
    /// Flip one bit of the signature after signing.
    pub const BAD_SIGNATURE: u8 = 0x20;
}

/// Encodes an [`envelope_signed`] input (for seed corpora and tests).
pub fn signed_input(flags: u8, header: &[u8], body: &[u8]) -> Vec<u8> {
    let hlen = u16::try_from(header.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(3 + header.len() + body.len());
    out.push(flags);
    out.extend_from_slice(&hlen.to_be_bytes());
    out.extend_from_slice(&header[..usize::from(hlen)]);
    out.extend_from_slice(body);
    out
}

/// Target `envelope_signed`: `flags (1) | header length (2, BE) | header | body`. The frame is
/// built and signed here, so mutations of the header and body reach the code behind the
/// signature check.
pub fn envelope_signed(data: &[u8]) {
    let Some((&fl, rest)) = data.split_first() else {
        return;
    };
    let Some((hl, rest)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let hlen = usize::from(u16::from_be_bytes(*hl)).min(rest.len());
    let (header, body) = rest.split_at(hlen);
    let mut header = header.to_vec();
    if fl & flags::FIX_BODY != 0
        && let Ok(serde_json::Value::Object(mut obj)) =
            serde_json::from_slice::<serde_json::Value>(&header)
    {
        obj.insert("len".into(), serde_json::Value::from(body.len() as u64));
        obj.insert("sha256".into(), serde_json::Value::from(hex(&sha256(body))));
        if let Ok(h) = serde_json::to_vec(&obj) {
            header = h;
        }
    }
    let key: &KeyPair = if fl & flags::OTHER_SIGNER != 0 {
        &OTHER
    } else {
        &TRUSTED
    };
    let mut frame = seal_raw(fl & flags::KIND_MASK, &header, body, key);
    if fl & flags::BAD_SIGNATURE != 0
        && let Some(b) = frame.get_mut(PREFIX + usize::from(fl >> 6))
    {
        *b ^= 0x01;
    }
    decode(&frame, &TRUSTED.public());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Header;
    use crate::envelope::seal;

    fn header() -> Header {
        Header {
            mesh: MESH.into(),
            node: Some("abcdefghij234567".into()),
            epoch: 1,
            rev: 2,
            iat: NOW,
            exp: NOW + 60,
            len: 0,
            sha256: String::new(),
        }
    }

    #[test]
    fn seal_raw_matches_seal_for_a_well_formed_header() {
        let body = br#"{"revision":{"epoch":1,"rev":2},"sha256":"00"}"#;
        let sealed = seal(Kind::Ack, header(), body, trusted_key());
        let v = Envelope::parse(&sealed, DEFAULT_MAX_ENVELOPE)
            .and_then(|e| e.verify(Kind::Ack, &trusted_key().public()));
        let h = v.map(|v| v.header).ok();
        let hb = h.as_ref().and_then(|h| serde_json::to_vec(h).ok());
        let raw = hb.map(|hb| seal_raw(Kind::Ack as u8, &hb, body, trusted_key()));
        assert_eq!(raw, Some(sealed));
    }

    #[test]
    fn signed_inputs_reach_the_body() {
        // A header without len/sha256 is fixed up, so the body is checked and decoded.
        let h = br#"{"mesh":"riverside","epoch":1,"rev":2,"iat":1,"exp":2,"len":0,"sha256":""}"#;
        let input = signed_input(Kind::Announce as u8 | flags::FIX_BODY, h, b"{}");
        envelope_signed(&input);
        envelope_raw(&input);
        envelope_signed(&[]);
        envelope_signed(&[0xff, 0xff, 0xff]);
    }
}
