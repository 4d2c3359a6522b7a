//! Fuzz target bodies, shared by the `cargo fuzz` targets in `fuzz/` and the corpus replay test
//! (`controller/tests/fuzz_corpus.rs`), so CI runs exactly the code the fuzzer ran.
//!
//! Not part of the controller's API.
//!
//! Both targets run over a [`Fixture`]: a controller with one enrolled node and a token-mode
//! mesh, restored after every input.
//!
//! - `manifest_load` ([`Fixture::manifest_load`]): manifest text (up to four files, separated by
//!   NUL bytes) through [`crate::spec::manifest::load_texts`] ([`load_manifests`]); every error must
//!   name one of the input files. A valid set is then handed to the controller as a reload
//!   would (announcements, reconcile, render, sign).
//! - `node_messages` ([`Fixture::node_message`]): what the controller does with a message on an
//!   enrolment, status or presence topic ([`Controller::on_message`]). Inputs are either raw
//!   (topic and payload as given) or structure-aware (header and body signed here with a node
//!   key, so the checks and the body handling behind the signature are reached).
//!
//! Every function must return normally for every input: a panic is a bug.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sidenet_crds::SecretKeyRef;
use sidenet_wire::codec::{hex, sha256};
use sidenet_wire::fuzzing::{NOW, seal_raw, trusted_key};
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::EnrollRequest;
use sidenet_wire::{Header, Kind, topics};

use crate::reconcile::core::Controller;
use crate::reconcile::model::{Counters, Secrets};
use crate::reconcile::peers::Index;
use crate::reconcile::render::Renderer;
use crate::reconcile::store::{NodeRecord, Published, Store, TokenRecord};
use crate::spec::manifest::{self, ManifestSet};

/// Target `manifest_load`, loading only: up to four manifest files, separated by NUL bytes,
/// through [`manifest::load_texts`]. Returns the set if it is valid. [`Fixture::manifest_load`]
/// also hands a valid set to a controller.
pub fn load_manifests(data: &[u8]) -> Option<ManifestSet> {
    let Ok(text) = std::str::from_utf8(data) else {
        // The loader reads files as UTF-8 text; other bytes never reach the parser.
        return None;
    };
    let texts: Vec<(PathBuf, String)> = text
        .splitn(4, '\0')
        .enumerate()
        .map(|(i, t)| (PathBuf::from(format!("fuzz/{i}.yaml")), t.to_string()))
        .collect();
    match manifest::load_texts(&texts) {
        Ok(set) => {
            for mesh in set.meshes.values() {
                let net = manifest::network_name(mesh);
                let _ = set.mesh_by_network(net);
                let _ = manifest::parse_ula48(&mesh.spec.prefix);
            }
            for node in set.nodes.values() {
                let _ = set.mesh_of(node);
            }
            Some(set)
        }
        Err(errors) => {
            let _ = errors.to_string();
            for e in &errors.0 {
                // Errors name the file they are about.
                if !texts.iter().any(|(p, _)| *p == e.file) {
                    manifest_error_without_file(e);
                }
            }
            None
        }
    }
}

#[allow(clippy::panic)]
fn manifest_error_without_file(e: &manifest::ManifestError) {
    // A property of the loader, checked by the fuzzer: this is the one intended panic.
    panic!("manifest error names no input file: {e}");
}

/// Seed of the node key the fixture enrols.
pub const NODE_SEED: [u8; 32] = [0x11; 32];
/// Seed of a node key the fixture has never seen.
pub const FRESH_SEED: [u8; 32] = [0x22; 32];
/// The token mesh's one valid token.
pub const TOKEN: &str = "fuzz-token-0123456789";
/// Network name of the fixture's token-mode mesh.
pub const TOKEN_MESH: &str = "tokentown";

const TOKEN_MESH_YAML: &str = "apiVersion: sidenet.io/v1alpha1
kind: Mesh
metadata:
  name: tokentown
spec:
  prefix: fd12:3456:789a::/48
  radio:
    country: US
    meshBand: 5g
    channels:
      5g:
        channel: 149
        width: 80
  encryption:
    passphraseSecretRef:
      name: tokentown-mesh
      key: passphrase
  enrollment:
    mode: token
";

/// Flags of a [`Fixture::node_message`] input (first byte).
pub mod flags {
    /// Low two bits: the topic (0 enrolment, 1 status, 2 presence, 3 raw topic line).
    pub const TOPIC_MASK: u8 = 0x03;
    /// Enrolment topic.
    pub const ENROLL: u8 = 0;
    /// Status topic.
    pub const STATUS: u8 = 1;
    /// Presence topic.
    pub const ONLINE: u8 = 2;
    /// The topic is the input's first line, the payload the rest (taken as given).
    pub const RAW_TOPIC: u8 = 3;
    /// From the node the fixture has never seen (instead of the enrolled one).
    pub const FRESH_NODE: u8 = 0x04;
    /// On the token-mode mesh (instead of riverside).
    pub const TOKEN_MESH: u8 = 0x08;
    /// The payload is taken as given (instead of signed here).
    pub const RAW_PAYLOAD: u8 = 0x10;
    /// Rewrite `len` and `sha256` of a JSON-object header to match the body.
    pub const FIX_BODY: u8 = 0x20;
    /// Sign with the other node's key than the topic names.
    pub const WRONG_KEY: u8 = 0x40;
}

/// Encodes a structure-aware [`Fixture::node_message`] input (for seed corpora and tests).
/// The layout is the one of [`sidenet_wire::fuzzing::signed_input`].
pub fn message_input(flags: u8, header: &[u8], body: &[u8]) -> Vec<u8> {
    sidenet_wire::fuzzing::signed_input(flags, header, body)
}

struct FixedSecrets;

impl Secrets for FixedSecrets {
    fn mesh_key(&mut self, _: &str) -> Result<KeyPair, String> {
        Ok(trusted_key().clone())
    }
    fn passphrase(&mut self, _: &ManifestSet, _: &SecretKeyRef) -> Result<String, String> {
        Ok("fuzzing-passphrase".into())
    }
}

/// The state [`Controller::on_message`] may change, restored after every input so that each
/// input runs against the same controller (a crash reproduces from its input alone).
struct Snapshot {
    nodes: BTreeMap<String, NodeRecord>,
    published: BTreeMap<String, Published>,
    subnets: BTreeMap<(String, String), u16>,
    taken: BTreeMap<String, crate::spec::ipam::Taken>,
    tokens: BTreeMap<String, TokenRecord>,
    online: BTreeMap<String, bool>,
    blocked: BTreeMap<String, String>,
    counters: Counters,
    peers: Index,
    set: ManifestSet,
    pending: crate::reconcile::pending::Pending,
    approvals: BTreeMap<String, u64>,
}

/// A controller fixture for the `node_messages` and `manifest_load` targets.
pub struct Fixture {
    ctl: Controller,
    snapshot: Snapshot,
    node: KeyPair,
    fresh: KeyPair,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture").finish_non_exhaustive()
    }
}

/// A header as agents send it, for seeds and the fixture's own enrolment.
pub fn node_header(mesh: &str, node: &str, rev: u64) -> Header {
    Header {
        mesh: mesh.into(),
        node: Some(node.into()),
        epoch: NOW - 1000,
        rev,
        iat: NOW - 10,
        exp: NOW + 300,
        len: 0,
        sha256: String::new(),
    }
}

impl Fixture {
    /// Builds the fixture from the repository (`examples/riverside/mesh.yaml`, the hardware
    /// profiles and the templates): the riverside mesh (automatic enrolment) with one node
    /// enrolled and configured, and a token-mode mesh with one unused token.
    pub fn new(repo: &Path) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let store =
            Store::open(&dir.path().join("fuzz.redb"), NOW - 100_000).map_err(|e| e.to_string())?;
        let renderer = Renderer::load(&repo.join("templates")).map_err(|e| e.to_string())?;
        let mut files = vec![repo.join("examples/riverside/mesh.yaml")];
        let profiles = manifest::collect_files(&[repo.join("hardware-profiles")])
            .map_err(|e| e.to_string())?;
        files.extend(profiles);
        let mut texts = Vec::new();
        for f in files {
            let t = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
            texts.push((f, t));
        }
        texts.push((PathBuf::from("tokentown.yaml"), TOKEN_MESH_YAML.to_string()));
        let set = manifest::load_texts(&texts).map_err(|e| e.to_string())?;
        let mut ctl = Controller::new(store, renderer, Box::new(FixedSecrets));
        ctl.set_manifests(set, NOW - 1000)
            .map_err(|e| e.to_string())?;
        ctl.create_token(TOKEN_MESH, TOKEN, 1_000_000, NOW - 1000)
            .map_err(|e| e.to_string())?;

        let node = KeyPair::from_seed(&NODE_SEED);
        let id = node.public().node_id();
        let body = serde_json::to_vec(&enroll_request()).map_err(|e| e.to_string())?;
        let env = sidenet_wire::envelope::seal(
            Kind::Enroll,
            node_header("riverside", &id, 1),
            &body,
            &node,
        );
        ctl.on_message(&topics::enroll("riverside", &id), &env, NOW - 900)
            .map_err(|e| e.to_string())?;
        // Automatic enrolment: the node is in the store and has its first config.
        if !ctl.store.nodes.contains_key(&id) || ctl.counters.published == 0 {
            return Err(format!(
                "the fixture node did not enrol: {:?} {:?}",
                ctl.counters,
                ctl.store.nodes.get(&id)
            ));
        }
        ctl.flush().map_err(|e| e.to_string())?;
        let snapshot = Snapshot {
            pending: ctl.pending.clone(),
            approvals: ctl.store.approvals.clone(),
            nodes: ctl.store.nodes.clone(),
            published: ctl.store.published.clone(),
            subnets: ctl.store.subnets.clone(),
            taken: ctl.store.taken.clone(),
            tokens: ctl.store.tokens.clone(),
            online: ctl.online.clone(),
            blocked: ctl.blocked.clone(),
            counters: ctl.counters,
            peers: ctl.peers.clone(),
            set: ctl.set.clone(),
        };
        Ok(Self {
            ctl,
            snapshot,
            node,
            fresh: KeyPair::from_seed(&FRESH_SEED),
            _dir: dir,
        })
    }

    /// Node id of the enrolled node.
    pub fn node_id(&self) -> String {
        self.node.public().node_id()
    }

    /// Target `node_messages`: `flags (1) | header length (2, BE) | header | body`, or with
    /// [`flags::RAW_PAYLOAD`] `flags (1) | payload`, or with [`flags::RAW_TOPIC`]
    /// `flags (1) | topic line | payload`. Returns the controller's counters after the message
    /// (before the reset), so tests can see how far an input got.
    pub fn node_message(&mut self, data: &[u8]) -> Counters {
        let Some((&fl, rest)) = data.split_first() else {
            return self.ctl.counters;
        };
        let (author, other) = if fl & flags::FRESH_NODE != 0 {
            (&self.fresh, &self.node)
        } else {
            (&self.node, &self.fresh)
        };
        let signer = if fl & flags::WRONG_KEY != 0 {
            other
        } else {
            author
        };
        let id = author.public().node_id();
        let mesh = if fl & flags::TOKEN_MESH != 0 {
            TOKEN_MESH
        } else {
            "riverside"
        };
        let sel = fl & flags::TOPIC_MASK;
        let (topic, payload) = if sel == flags::RAW_TOPIC {
            let (topic, payload) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            (
                String::from_utf8_lossy(topic).into_owned(),
                payload.to_vec(),
            )
        } else {
            let topic = match sel {
                flags::ENROLL => topics::enroll(mesh, &id),
                flags::STATUS => topics::status(mesh, &id),
                _ => topics::online(mesh, &id),
            };
            let payload = if fl & flags::RAW_PAYLOAD != 0 || sel == flags::ONLINE {
                rest.to_vec()
            } else {
                let kind = if sel == flags::ENROLL {
                    Kind::Enroll
                } else {
                    Kind::Status
                };
                signed(kind, rest, fl & flags::FIX_BODY != 0, signer)
            };
            (topic, payload)
        };
        let _ = self.ctl.on_message(&topic, &payload, NOW);
        // What an operator then looks at: the status table built from what the nodes sent.
        let _ = self.ctl.status();
        let counters = self.ctl.counters;
        self.reset();
        counters
    }

    /// The counters every input starts from.
    pub fn initial_counters(&self) -> Counters {
        self.snapshot.counters
    }

    fn reset(&mut self) {
        self.ctl.discard_pending();
        let s = &self.snapshot;
        self.ctl.store.nodes.clone_from(&s.nodes);
        self.ctl.store.published.clone_from(&s.published);
        self.ctl.store.subnets.clone_from(&s.subnets);
        self.ctl.store.taken.clone_from(&s.taken);
        self.ctl.store.tokens.clone_from(&s.tokens);
        self.ctl.online.clone_from(&s.online);
        self.ctl.blocked.clone_from(&s.blocked);
        self.ctl.counters = s.counters;
        self.ctl.peers.clone_from(&s.peers);
        self.ctl.set.clone_from(&s.set);
        self.ctl.pending.clone_from(&s.pending);
        self.ctl.store.approvals.clone_from(&s.approvals);
    }

    /// Target `manifest_load`: [`load_manifests`], then a valid set goes to the controller as a
    /// reload would (`set_manifests`: announcements, reconcile of every node: render, sign).
    /// Returns the counters after the reload, if the set was valid.
    pub fn manifest_load(&mut self, data: &[u8]) -> Option<Counters> {
        let set = load_manifests(data)?;
        let _ = self.ctl.set_manifests(set, NOW);
        let _ = self.ctl.status();
        let counters = self.ctl.counters;
        self.reset();
        Some(counters)
    }
}

/// The enrolment request of the fixture's node (and of seeds).
pub fn enroll_request() -> EnrollRequest {
    EnrollRequest {
        hostname: "fuzz-node".into(),
        board: Some("tplink,archer-c7-v2".into()),
        profile: None,
        token: None,
        backend: "files".into(),
        agent_version: "0.1.0".into(),
        wireguard: None,
    }
}

/// `header length (2, BE) | header | body`, signed with `key` as `kind`.
fn signed(kind: Kind, rest: &[u8], fix_body: bool, key: &KeyPair) -> Vec<u8> {
    let Some((hl, rest)) = rest.split_first_chunk::<2>() else {
        return rest.to_vec();
    };
    let hlen = usize::from(u16::from_be_bytes(*hl)).min(rest.len());
    let (header, body) = rest.split_at(hlen);
    let mut header = header.to_vec();
    if fix_body
        && let Ok(serde_json::Value::Object(mut obj)) =
            serde_json::from_slice::<serde_json::Value>(&header)
    {
        obj.insert("len".into(), serde_json::Value::from(body.len() as u64));
        obj.insert("sha256".into(), serde_json::Value::from(hex(&sha256(body))));
        if let Ok(h) = serde_json::to_vec(&obj) {
            header = h;
        }
    }
    seal_raw(kind as u8, &header, body, key)
}
