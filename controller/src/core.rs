//! The reconcile core: manifests + enrolments + state → signed configs to publish.
//!
//! [`Controller`] is free of I/O except through its [`Store`] (the embedded database) and the
//! [`Secrets`] it is given; MQTT, files and sockets belong to the adapters (`standalone`). Every
//! method takes the current time and returns the messages to publish, so it is tested without a
//! broker or a clock.
//!
//! Reconcile is level-triggered: for each node, compute the inputs' fingerprint; if it equals the
//! one last published, nothing is rendered. Otherwise render, hash the body, and publish a new
//! revision only if the body changed (or the signature is due for renewal).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sidenet_crds::{EnrollmentMode, HardwareProfile, Mesh, MeshNode, NodeRole, SecretKeyRef};
use sidenet_wire::codec::sha256_hex;
use sidenet_wire::envelope::{DEFAULT_MAX_ENVELOPE, Expect, seal, seal_hashed};
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{Announce, ApplyState, EnrollRequest, NodeConfig, StatusReport};
use sidenet_wire::topics::{self, Incoming};
use sidenet_wire::{Envelope, Header, Kind, PublicKey, Revision, WireError};

use crate::manifest::{ManifestSet, closest, network_name};
use crate::render::{self, NodeInputs, Renderer};
use crate::store::{Batch, NodeRecord, Published, Store, StoreError, TokenRecord};

/// Default config validity: 30 days.
pub const DEFAULT_VALIDITY: u64 = 30 * 24 * 3600;
/// Name of the sealed mesh passphrase in configs (`NodeConfig::sealed`).
pub const MESH_PASSPHRASE: &str = sidenet_wire::seal::MESH_PASSPHRASE;
/// Name of the sealed next mesh passphrase during a scheduled rotation's overlap.
pub const MESH_PASSPHRASE_NEXT: &str = "mesh-passphrase-next";
/// Name of the node's sealed broker password in configs (`NodeConfig::sealed`).
pub const MQTT_PASSWORD: &str = sidenet_wire::seal::MQTT_PASSWORD;
/// Failed revisions remembered per node (the newest).
pub const MAX_FAILED_REVISIONS: usize = 16;
/// Node messages older than this are refused.
const NODE_MESSAGE_MAX_AGE: u64 = 24 * 3600;

/// Secrets the core needs: mesh signing keys and passphrases. Standalone keeps them in the state
/// folder; Kubernetes mode in Secrets.
pub trait Secrets: Send {
    /// The signing key of a mesh, created if missing.
    fn mesh_key(&mut self, network: &str) -> Result<KeyPair, String>;
    /// A passphrase by reference, from the manifests' Secrets or created if missing.
    fn passphrase(&mut self, set: &ManifestSet, r: &SecretKeyRef) -> Result<String, String>;
    /// The secret the mesh's per-node broker passwords are derived from
    /// ([`crate::acl::node_password`]). It must not change when the signing key is rotated;
    /// the default derives it from the signing key, for stores that cannot rotate.
    fn mqtt_secret(&mut self, network: &str) -> Result<[u8; 32], String> {
        let key = self.mesh_key(network)?;
        let mut input = b"sidenet-mqtt-secret-v1\0".to_vec();
        input.extend_from_slice(key.to_file_text().as_bytes());
        Ok(sidenet_wire::codec::sha256(&input))
    }
    /// The key rotations of a mesh so far (empty chain when its key was never rotated).
    fn rotation(&mut self, _network: &str) -> Result<Rotation, String> {
        Ok(Rotation::default())
    }
    /// Makes `key` the mesh's signing key, with `rotation` (which ends with its endorsement).
    /// Must be durable before it returns: configs signed by the new key follow at once.
    fn rotate_mesh_key(
        &mut self,
        _network: &str,
        _key: &KeyPair,
        _rotation: &Rotation,
    ) -> Result<(), String> {
        Err("this secret store cannot rotate keys".into())
    }
}

/// A mesh's signing key history: the endorsement chain announced to agents and the end of the
/// overlap during which they still accept the previous key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// Endorsements, oldest first.
    pub chain: Vec<sidenet_wire::rotation::Endorsement>,
    /// End of the overlap of the last rotation (Unix seconds).
    #[serde(default)]
    pub previous_until: Option<u64>,
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained.
    pub retain: bool,
}

/// Counters for tests, benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Configs rendered.
    pub rendered: u64,
    /// Configs signed and published.
    pub published: u64,
    /// Enrolments accepted.
    pub enrolled: u64,
    /// Enrolments refused.
    pub refused: u64,
    /// Messages refused (bad signature, replay, ...).
    pub rejected_messages: u64,
}

/// Errors of the core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A request named something unknown or invalid.
    #[error("{0}")]
    Request(String),
}

/// One row of `sidenetctl status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRow {
    /// Node id.
    pub node: String,
    /// MeshNode name, if any.
    pub name: Option<String>,
    /// Mesh network name.
    pub mesh: String,
    /// Hostname.
    pub hostname: Option<String>,
    /// Phase.
    pub phase: String,
    /// Why the node is not configured, if it is not.
    pub reason: Option<String>,
    /// Online (from the presence topic).
    pub online: Option<bool>,
    /// Desired revision.
    pub desired: Option<Revision>,
    /// Applied revision.
    pub applied: Option<Revision>,
    /// Last seen, Unix seconds.
    pub last_seen: Option<u64>,
    /// Allocated address.
    pub address: Option<String>,
    /// Last failure.
    pub failure: Option<String>,
    /// Babel neighbours the node last reported (one per WireGuard link that is up).
    #[serde(default)]
    pub neighbours: Vec<sidenet_wire::messages::Neighbour>,
    /// The node's last pathfinder probe results (latency and loss per neighbour and gateway).
    #[serde(default)]
    pub probes: Vec<sidenet_wire::messages::Probe>,
    /// Agent version of the node's last status report.
    #[serde(default)]
    pub agent_version: Option<String>,
    /// Sequence epoch of the node's last message: it grows every time the agent starts.
    #[serde(default)]
    pub agent_epoch: Option<u64>,
    /// Packages the node says are missing (it applies nothing new until they are installed).
    #[serde(default)]
    pub missing: Vec<String>,
}

/// The controller core.
pub struct Controller {
    /// State.
    pub store: Store,
    /// Last good manifests.
    pub set: ManifestSet,
    /// Templates.
    pub renderer: Renderer,
    secrets: Box<dyn Secrets>,
    keys: BTreeMap<String, KeyPair>,
    /// Presence by node id.
    pub online: BTreeMap<String, bool>,
    /// Why nodes are not configured.
    pub blocked: BTreeMap<String, String>,
    /// Counters.
    pub counters: Counters,
    /// Controller version, announced.
    pub version: String,
    batch: Batch,
    outbox: Vec<Publish>,
    /// Mesh of the message being handled (for [`Rejection`]).
    current_mesh: String,
    /// Links → nodes, for WireGuard neighbours.
    pub peers: crate::peers::Index,
    /// Node id → (SHA-256 of the secrets and node key, the secrets sealed to the node, by
    /// name): sealing costs two X25519 multiplications, so it is done once per node and secret.
    sealed: BTreeMap<String, (String, BTreeMap<String, String>)>,
    /// Node id → the broker password the broker was last told (see [`Self::take_credentials`]).
    issued: BTreeMap<String, String>,
    /// Credential changes for the broker since the driver last took them.
    credentials: Vec<crate::acl::Credential>,
    /// Key rotations by mesh network name (loaded with the keys).
    rotations: BTreeMap<String, Rotation>,
    /// Messages refused since the adapter last drained this: (what, node id, why). The
    /// Kubernetes adapter turns them into Events; standalone only logs them.
    pub rejections: Vec<Rejection>,
    /// Nodes reconciled per chunk ([`Controller::set_chunk`]).
    chunk: Option<usize>,
    /// Nodes waiting for [`Controller::reconcile_deferred`].
    deferred: std::collections::VecDeque<String>,
}

/// A node message the core refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What was refused (`enrolment`, `status`).
    pub what: String,
    /// Mesh network name from the topic.
    pub mesh: String,
    /// Node id from the topic.
    pub node: String,
    /// Why.
    pub why: String,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("epoch", &self.store.epoch)
            .field("meshes", &self.set.meshes.len())
            .field("nodes", &self.store.nodes.len())
            .finish()
    }
}

enum Desired<'a> {
    Config { inputs: Box<NodeInputs<'a>> },
    Pending(String),
    Blocked(String),
}

impl Controller {
    /// A controller over `store`, with no manifests yet.
    pub fn new(store: Store, renderer: Renderer, secrets: Box<dyn Secrets>) -> Self {
        let peers = crate::peers::Index::build(&store.nodes);
        Self {
            store,
            set: ManifestSet::default(),
            renderer,
            secrets,
            keys: BTreeMap::new(),
            online: BTreeMap::new(),
            blocked: BTreeMap::new(),
            counters: Counters::default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            batch: Batch::default(),
            outbox: Vec::new(),
            current_mesh: String::new(),
            peers,
            sealed: BTreeMap::new(),
            issued: BTreeMap::new(),
            credentials: Vec::new(),
            rotations: BTreeMap::new(),
            rejections: Vec::new(),
            chunk: None,
            deferred: std::collections::VecDeque::new(),
        }
    }

    /// The passphrases a mesh's configs carry at `now`: the one its mesh point uses, and during
    /// a scheduled rotation's overlap (before `switchAt`) the next one, for a second mesh point.
    fn passphrases(
        &mut self,
        mesh_name: &str,
        now: u64,
    ) -> Result<(String, Option<String>), String> {
        let mesh = self
            .set
            .meshes
            .get(mesh_name)
            .ok_or_else(|| format!("mesh {mesh_name} is not in the manifests"))?;
        let current_ref = mesh.spec.encryption.passphrase_secret_ref.clone();
        let rotation = mesh.spec.encryption.rotation.clone();
        let current = self.secrets.passphrase(&self.set, &current_ref)?;
        let Some(rot) = rotation else {
            return Ok((current, None));
        };
        let switch_at = crate::parse_rfc3339(&rot.switch_at).ok_or_else(|| {
            format!(
                "spec.encryption.rotation.switchAt {:?} is not an RFC 3339 UTC time",
                rot.switch_at
            )
        })?;
        let next = self
            .secrets
            .passphrase(&self.set, &rot.next_passphrase_secret_ref)
            .map_err(|e| format!("next passphrase: {e}"))?;
        if next == current {
            return Ok((current, None));
        }
        Ok(if now >= switch_at {
            (next, None)
        } else {
            (current, Some(next))
        })
    }

    /// The earliest passphrase switch still to come, if any (the driver reconciles then).
    pub fn next_switch(&self, now: u64) -> Option<u64> {
        self.set
            .meshes
            .values()
            .filter_map(|m| m.spec.encryption.rotation.as_ref())
            .filter_map(|r| crate::parse_rfc3339(&r.switch_at))
            .filter(|t| *t > now)
            .min()
    }

    /// Broker credential changes since the last call: passwords issued with configs, nodes that
    /// now log in with theirs, nodes removed. Take them after [`Self::flush`] (they describe
    /// committed state) and hand them to the broker ([`crate::acl::CredentialBook`] or an
    /// external broker's user store).
    pub fn take_credentials(&mut self) -> Vec<crate::acl::Credential> {
        std::mem::take(&mut self.credentials)
    }

    /// Every enrolled node's credentials as changes (for a broker starting empty): its
    /// password, and `Arm` for nodes that log in with it. Nodes of meshes whose secret cannot
    /// be had are left out (their nodes connect as enrolling nodes until it can).
    pub fn credential_snapshot(&mut self) -> Vec<crate::acl::Credential> {
        use crate::acl::Credential;
        let mut secrets: BTreeMap<String, Option<[u8; 32]>> = BTreeMap::new();
        let mut out = Vec::new();
        let nodes: Vec<(String, String, bool)> = self
            .store
            .nodes
            .iter()
            .filter(|(id, _)| self.store.published.contains_key(*id))
            .map(|(id, r)| (id.clone(), r.mesh.clone(), r.mqtt_armed))
            .collect();
        for (id, mesh, armed) in nodes {
            let secret = *secrets.entry(mesh.clone()).or_insert_with(|| {
                self.secrets
                    .mqtt_secret(&mesh)
                    .map_err(|e| tracing::warn!(mesh = %mesh, "broker secret: {e}"))
                    .ok()
            });
            let Some(secret) = secret else { continue };
            let password = crate::acl::node_password(&secret, &mesh, &id);
            self.issued.insert(id.clone(), password.clone());
            out.push(Credential::Issue {
                mesh: mesh.clone(),
                node: id.clone(),
                password,
            });
            if armed {
                out.push(Credential::Arm { mesh, node: id });
            }
        }
        out
    }

    /// Commits every pending state change in one durable transaction and hands out what may now
    /// be published. Nothing is published before the revision it carries is on disk, so a crash
    /// can never make the controller reuse a revision. If the commit fails, the in-memory state
    /// is ahead of the disk: the caller must stop (the state is reloaded on restart).
    pub fn flush(&mut self) -> Result<Vec<Publish>, CoreError> {
        let batch = std::mem::take(&mut self.batch);
        self.store.commit(batch)?;
        Ok(std::mem::take(&mut self.outbox))
    }

    /// Drops pending state changes, messages and cached keys without committing anything. Only
    /// the fuzz targets use it: they restore the in-memory state after every input instead.
    pub(crate) fn discard_pending(&mut self) {
        self.batch = Batch::default();
        self.outbox.clear();
        self.keys.clear();
    }

    /// The signing key of a mesh (network name).
    pub fn mesh_key(&mut self, network: &str) -> Result<KeyPair, CoreError> {
        if let Some(k) = self.keys.get(network) {
            return Ok(k.clone());
        }
        let k = self
            .secrets
            .mesh_key(network)
            .map_err(|e| CoreError::Request(format!("signing key of mesh {network}: {e}")))?;
        let r = self
            .secrets
            .rotation(network)
            .map_err(|e| CoreError::Request(format!("key rotations of mesh {network}: {e}")))?;
        self.keys.insert(network.to_string(), k.clone());
        self.rotations.insert(network.to_string(), r);
        Ok(k)
    }

    /// Rotates the signing key of mesh `network` to the key of `seed`: the old key endorses the
    /// new one, agents learn it from the next announcement (which carries every endorsement
    /// since the first key) and accept configs of the old key for `overlap` more seconds. Every
    /// node gets its config again, signed by the new key, under a new revision. Returns the new
    /// public key.
    pub fn rotate_key(
        &mut self,
        network: &str,
        seed: &[u8; 32],
        overlap: u64,
        now: u64,
    ) -> Result<PublicKey, CoreError> {
        if self.set.mesh_by_network(network).is_none() {
            return Err(CoreError::Request(format!("no mesh named {network}")));
        }
        let old = self.mesh_key(network)?;
        let new = KeyPair::from_seed(seed);
        let mut rotation = self.rotations.get(network).cloned().unwrap_or_default();
        rotation.chain.push(sidenet_wire::rotation::endorse(
            &old,
            network,
            &new.public(),
            now,
        ));
        rotation.previous_until = Some(now.saturating_add(overlap));
        self.secrets
            .rotate_mesh_key(network, &new, &rotation)
            .map_err(|e| CoreError::Request(format!("rotating the key of mesh {network}: {e}")))?;
        tracing::info!(
            mesh = %network,
            old = %old.public().fingerprint(),
            new = %new.public().fingerprint(),
            overlap_s = overlap,
            "mesh signing key rotated"
        );
        self.keys.insert(network.to_string(), new.clone());
        self.rotations.insert(network.to_string(), rotation);
        // The announcement first, so agents pin the new key before its configs arrive.
        let ann = self.announcements(now)?;
        self.outbox.extend(ann);
        let ids: Vec<String> = self
            .store
            .nodes
            .iter()
            .filter(|(_, r)| r.mesh == network)
            .map(|(id, _)| id.clone())
            .chain(
                self.set
                    .nodes
                    .iter()
                    .filter(|(_, n)| {
                        self.set
                            .mesh_of(n)
                            .is_some_and(|m| network_name(m) == network)
                    })
                    .map(|(id, _)| id.clone()),
            )
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        self.reconcile(&ids, now)?;
        Ok(new.public())
    }

    /// Replaces the manifests (already validated) and reconciles every node.
    pub fn set_manifests(&mut self, set: ManifestSet, now: u64) -> Result<(), CoreError> {
        self.set = set;
        let announcements = self.announcements(now)?;
        self.outbox.extend(announcements);
        self.reconcile_all(now)
    }

    /// Signed, retained announcements of every mesh.
    pub fn announcements(&mut self, now: u64) -> Result<Vec<Publish>, CoreError> {
        let meshes: Vec<Mesh> = self.set.meshes.values().cloned().collect();
        let mut out = Vec::new();
        for mesh in meshes {
            let net = network_name(&mesh).to_string();
            // A mesh without a usable key is not announced; its nodes show why they are
            // blocked. The other meshes carry on.
            let key = match self.mesh_key(&net) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!("{e}; mesh {net} is not announced");
                    continue;
                }
            };
            let body = Announce {
                mesh: net.clone(),
                key: key.public().to_base64(),
                enrollment: mesh.spec.enrollment.mode.as_str().into(),
                prefix: mesh.spec.prefix.clone(),
                controller: self.version.clone(),
                acks: true,
                chain: self
                    .rotations
                    .get(&net)
                    .map(|r| r.chain.clone())
                    .unwrap_or_default(),
                previous_until: self.rotations.get(&net).and_then(|r| r.previous_until),
            };
            let header = Header {
                mesh: net.clone(),
                node: None,
                epoch: self.store.epoch,
                rev: 0,
                iat: now,
                exp: now.saturating_add(validity(&mesh)),
                len: 0,
                sha256: String::new(),
            };
            let payload = seal(
                Kind::Announce,
                header,
                &serde_json::to_vec(&body).unwrap_or_default(),
                &key,
            );
            for topic in topics::announce_all(&net) {
                out.push(Publish {
                    topic,
                    payload: payload.clone(),
                    retain: true,
                });
            }
        }
        Ok(out)
    }

    /// Every stored envelope, for republishing after (re)connecting to the broker.
    pub fn stored_configs(&self) -> Result<Vec<Publish>, CoreError> {
        self.publishes_of(self.store.envelopes()?)
    }

    /// The ids of the nodes with a stored envelope, to republish a chunk at a time
    /// ([`Controller::stored_configs_of`]) instead of holding every envelope at once.
    pub fn stored_config_ids(&self) -> Result<Vec<String>, CoreError> {
        Ok(self.store.envelope_ids()?)
    }

    /// The stored envelopes of `ids` (see [`Controller::stored_config_ids`]).
    pub fn stored_configs_of(&self, ids: &[String]) -> Result<Vec<Publish>, CoreError> {
        let mut envs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(env) = self.store.envelope(id)? {
                envs.push((id.clone(), env));
            }
        }
        self.publishes_of(envs)
    }

    fn publishes_of(&self, envs: Vec<(String, Vec<u8>)>) -> Result<Vec<Publish>, CoreError> {
        Ok(envs
            .into_iter()
            .filter_map(|(node, env)| {
                let mesh = self
                    .store
                    .nodes
                    .get(&node)
                    .map(|n| n.mesh.clone())
                    .or_else(|| {
                        let m = self.set.nodes.get(&node)?;
                        self.set.mesh_of(m).map(|m| network_name(m).to_string())
                    })?;
                Some(Publish {
                    topic: topics::config(&mesh, &node),
                    payload: env,
                    retain: true,
                })
            })
            .collect())
    }

    /// Node ids to consider: every MeshNode manifest and every enrolled node.
    fn candidates(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.set.nodes.keys().cloned().collect();
        ids.extend(self.store.nodes.keys().cloned());
        ids.sort();
        ids.dedup();
        ids
    }

    /// Reconciles every node.
    pub fn reconcile_all(&mut self, now: u64) -> Result<(), CoreError> {
        // Every node is a candidate again: nothing stays deferred twice.
        self.deferred.clear();
        let ids = self.candidates();
        self.reconcile(&ids, now)
    }

    /// Reconciles at most `n` nodes per call from now on (`None`: every node at once, the
    /// default). The rest of a larger reconcile waits in [`Controller::has_deferred`] for
    /// [`Controller::reconcile_deferred`]: the adapter commits and publishes each chunk
    /// ([`Controller::flush`]) before rendering the next, so a mesh-wide change holds at most one
    /// chunk of signed envelopes in memory instead of one per node of the mesh.
    pub fn set_chunk(&mut self, n: Option<usize>) {
        self.chunk = n.map(|n| n.max(1));
    }

    /// Whether nodes of an earlier reconcile wait for [`Controller::reconcile_deferred`].
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Reconciles the next chunk of deferred nodes. Reconcile is level-triggered, so a node
    /// deferred while its inputs changed again is simply reconciled with the newer inputs.
    pub fn reconcile_deferred(&mut self, now: u64) -> Result<(), CoreError> {
        let n = self.chunk.unwrap_or(usize::MAX).min(self.deferred.len());
        let ids: Vec<String> = self.deferred.drain(..n).collect();
        self.reconcile_now(&ids, now)
    }

    /// Reconciles the given nodes; what to publish is handed out by [`Controller::flush`]. With
    /// a chunk size set ([`Controller::set_chunk`]), only the first chunk is reconciled now and
    /// the rest is deferred.
    pub fn reconcile(&mut self, ids: &[String], now: u64) -> Result<(), CoreError> {
        match self.chunk {
            Some(n) if ids.len() > n => {
                self.deferred.extend(ids[n..].iter().cloned());
                self.reconcile_now(&ids[..n], now)
            }
            _ => self.reconcile_now(ids, now),
        }
    }

    /// Three phases: plan each node (sequential: approval, profile, subnet, fingerprint), render
    /// and sign the ones whose inputs changed (in parallel, on every core), then record the new
    /// revisions (sequential).
    fn reconcile_now(&mut self, ids: &[String], now: u64) -> Result<(), CoreError> {
        let mut batch = Batch::default();
        let mut plans = Vec::new();
        let mut cache = PlanCache::default();
        for id in ids {
            match self.plan(id, now, &mut batch, &mut cache) {
                Ok(Some(p)) => plans.push(p),
                Ok(None) => {}
                Err(e) => {
                    self.batch.merge(batch);
                    return Err(e);
                }
            }
        }
        let results = self.render_plans(&plans, now);
        let before = self.counters.published;
        for (plan, result) in plans.into_iter().zip(results) {
            self.record(plan, result, now, &mut batch);
        }
        let published = self.counters.published - before;
        if published == 1 {
            if let Some(p) = self.outbox.last() {
                tracing::info!("publishing config {}", p.topic);
            }
        } else if published > 1 {
            tracing::info!("publishing {published} configs");
        }
        self.batch.merge(batch);
        Ok(())
    }

    fn mesh_name_for(&self, id: &str) -> Option<String> {
        if let Some(node) = self.set.nodes.get(id) {
            return self.set.mesh_of(node).and_then(|m| m.metadata.name.clone());
        }
        let rec = self.store.nodes.get(id)?;
        self.set
            .mesh_by_network(&rec.mesh)
            .and_then(|m| m.metadata.name.clone())
    }

    fn mesh_for(&self, id: &str) -> Option<Mesh> {
        let name = self.mesh_name_for(id)?;
        self.set.meshes.get(&name).cloned()
    }

    /// Decides whether a node needs rendering. `None`: nothing to do (unchanged, pending or
    /// blocked, with the reason kept in `self.blocked`).
    fn plan(
        &mut self,
        id: &str,
        now: u64,
        batch: &mut Batch,
        cache: &mut PlanCache,
    ) -> Result<Option<Plan>, CoreError> {
        let Some(mesh_name) = self.mesh_name_for(id) else {
            self.blocked
                .insert(id.to_string(), "its mesh is not in the manifests".into());
            return Ok(None);
        };
        let Some(mesh) = self.set.meshes.get(&mesh_name) else {
            return Ok(None);
        };
        let net = network_name(mesh).to_string();
        if !cache.meshes.contains_key(&mesh_name) {
            let pass = self.passphrases(&mesh_name, now);
            let key = self.mesh_key(&net);
            let mesh = self.set.meshes.get(&mesh_name).ok_or_else(|| {
                CoreError::Request(format!("mesh {mesh_name} vanished during reconcile"))
            })?;
            let fp = sha256_hex(
                &serde_json::to_vec(&(&mesh.metadata.name, &mesh.spec)).unwrap_or_default(),
            );
            let mqtt = self.secrets.mqtt_secret(&net);
            cache.meshes.insert(
                mesh_name.clone(),
                (pass, key.map_err(|e| e.to_string()), fp, mqtt),
            );
        }
        let Some((pass, key, mesh_fp, mqtt)) = cache.meshes.get(&mesh_name) else {
            return Ok(None);
        };
        let mqtt_secret = match mqtt {
            Ok(s) => *s,
            Err(e) => {
                self.blocked
                    .insert(id.to_string(), format!("broker secret: {e}"));
                return Ok(None);
            }
        };
        let (passphrase, passphrase_next) = match pass {
            Ok(p) => p.clone(),
            Err(e) => {
                self.blocked
                    .insert(id.to_string(), format!("mesh passphrase: {e}"));
                return Ok(None);
            }
        };
        let key = match key {
            Ok(k) => k.clone(),
            Err(e) => {
                self.blocked.insert(id.to_string(), e.clone());
                return Ok(None);
            }
        };
        let mesh_fp = mesh_fp.clone();
        let Some(subnet_id) = self.store.subnet(batch, &net, id) else {
            self.blocked.insert(
                id.to_string(),
                "the mesh prefix has no free /64 left".into(),
            );
            return Ok(None);
        };
        let set = &self.set;
        let Some(mesh) = set.meshes.get(&mesh_name) else {
            return Ok(None);
        };
        let manifest = set.nodes.get(id);
        let rec = self.store.nodes.get(id);
        // Secrets are sealed to the node's own key: no config before the node enrolled.
        let recipient = match rec.map(|r| PublicKey::from_base64(&r.public_key)) {
            Some(Ok(k)) => k,
            Some(Err(e)) => {
                self.blocked
                    .insert(id.to_string(), format!("stored node key is unusable: {e}"));
                return Ok(None);
            }
            None => {
                self.blocked.insert(
                    id.to_string(),
                    "waiting for the node to enrol (its config carries the mesh passphrase sealed to the node's key)".into(),
                );
                return Ok(None);
            }
        };
        let mqtt_password = crate::acl::node_password(&mqtt_secret, &net, id);
        let seal_id = sha256_hex(
            format!(
                "{passphrase}\0{}\0{mqtt_password}\0{}",
                passphrase_next.as_deref().unwrap_or(""),
                recipient.to_base64()
            )
            .as_bytes(),
        );
        let sealed = self
            .sealed
            .get(id)
            .filter(|(k, _)| *k == seal_id)
            .map(|(_, s)| s.clone());
        let mut inputs = match decide(set, mesh, id, manifest, rec, subnet_id, &passphrase) {
            Desired::Config { inputs, .. } => inputs,
            Desired::Pending(r) | Desired::Blocked(r) => {
                self.blocked.insert(id.to_string(), r);
                return Ok(None);
            }
        };
        inputs.passphrase_next = passphrase_next.as_deref();
        let profile_name = inputs.profile.metadata.name.clone().unwrap_or_default();
        let profile_fp = cache
            .profiles
            .entry(profile_name.clone())
            .or_insert_with(|| {
                sha256_hex(&serde_json::to_vec(&inputs.profile.spec).unwrap_or_default())
            })
            .clone();
        let gateways = cache
            .gateways
            .entry(mesh_name.clone())
            .or_insert_with(|| crate::peers::gateways(&self.store, set, mesh));
        let dataplane = crate::peers::dataplane(&self.peers, &self.store, set, mesh, id, gateways);
        let fingerprint = crate::peers::fingerprint(
            fingerprint(
                &self.renderer.fingerprint,
                &mesh_fp,
                &profile_fp,
                &inputs,
                manifest,
            ),
            &dataplane,
        );
        let owned = OwnedInputs::from(&inputs, &mesh_name, &profile_name);
        let validity = validity(mesh);
        let prev = self.store.published.get(id).cloned();
        let signer = key.public().to_base64();
        let rotated = self
            .rotations
            .get(&net)
            .is_some_and(|r| !r.chain.is_empty());
        // Due for re-signing: half its validity passed, or signed by a key that was rotated out.
        let refresh_due = prev.as_ref().is_some_and(|p| {
            now >= p.iat + (p.exp.saturating_sub(p.iat)) / 2
                || match &p.signer {
                    Some(s) => *s != signer,
                    None => rotated,
                }
        });
        if let Some(p) = &prev
            && p.input == fingerprint
            && !refresh_due
            && p.revision.epoch == self.store.epoch
        {
            self.blocked.remove(id);
            return Ok(None);
        }
        let revision = match &prev {
            Some(p) if p.revision.epoch == self.store.epoch => Revision {
                epoch: self.store.epoch,
                rev: p.revision.rev + 1,
            },
            _ => Revision {
                epoch: self.store.epoch,
                rev: 1,
            },
        };
        Ok(Some(Plan {
            id: id.to_string(),
            net,
            inputs: owned,
            fingerprint,
            prev,
            refresh_due,
            revision,
            key,
            recipient,
            sealed,
            seal_id,
            mqtt_password,
            validity,
            dataplane,
        }))
    }

    /// Renders and signs every plan, spread over the available cores.
    fn render_plans(&self, plans: &[Plan], now: u64) -> Vec<Result<Rendered, String>> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(plans.len().div_ceil(64))
            .max(1);
        let (renderer, set, epoch) = (&self.renderer, &self.set, self.store.epoch);
        let work = move |plans: &[Plan]| -> Vec<Result<Rendered, String>> {
            plans
                .iter()
                .map(|p| render_and_seal(renderer, set, p, epoch, now))
                .collect()
        };
        if threads == 1 {
            return work(plans);
        }
        let chunk = plans.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = plans
                .chunks(chunk)
                .map(|c| s.spawn(move || work(c)))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec![Err("render thread panicked".to_string())])
                })
                .collect()
        })
    }

    /// Records the outcome of one plan: blocked, unchanged, or a new revision to publish.
    fn record(
        &mut self,
        plan: Plan,
        result: Result<Rendered, String>,
        now: u64,
        batch: &mut Batch,
    ) {
        let r = match result {
            Ok(r) => r,
            Err(e) => {
                self.blocked.insert(plan.id, e);
                return;
            }
        };
        self.counters.rendered += 1;
        self.blocked.remove(&plan.id);
        self.sealed
            .insert(plan.id.clone(), (plan.seal_id.clone(), r.sealed.clone()));
        if self.issued.get(&plan.id) != Some(&plan.mqtt_password) {
            self.issued
                .insert(plan.id.clone(), plan.mqtt_password.clone());
            self.credentials.push(crate::acl::Credential::Issue {
                mesh: plan.net.clone(),
                node: plan.id.clone(),
                password: plan.mqtt_password.clone(),
            });
            // A node that logged in with it before (a record restored after a restart).
            if self.store.nodes.get(&plan.id).is_some_and(|r| r.mqtt_armed) {
                self.credentials.push(crate::acl::Credential::Arm {
                    mesh: plan.net.clone(),
                    node: plan.id.clone(),
                });
            }
        }
        if let Some(p) = &plan.prev
            && p.sha256 == r.sha256
            && !plan.refresh_due
            && p.revision.epoch == self.store.epoch
        {
            // Same content: remember the new fingerprint, publish nothing.
            let mut p = p.clone();
            p.input = plan.fingerprint;
            self.store.put_published_record(batch, &plan.id, p);
            return;
        }
        let Some(envelope) = r.envelope else {
            return;
        };
        if crate::health::withhold(
            plan.prev.as_ref(),
            self.store.nodes.get(&plan.id),
            &r.sha256,
        ) {
            // This body failed on the node: no new revision until the config changes.
            return;
        }
        self.store.put_published(
            batch,
            &plan.id,
            Published {
                revision: plan.revision,
                sha256: r.sha256,
                input: plan.fingerprint,
                iat: now,
                exp: now.saturating_add(plan.validity),
                signer: Some(plan.key.public().to_base64()),
            },
            envelope.clone(),
        );
        self.counters.published += 1;
        tracing::debug!(mesh = %plan.net, node = %plan.id, rev = plan.revision.rev, "publishing config");
        self.outbox.push(Publish {
            topic: topics::config(&plan.net, &plan.id),
            payload: envelope,
            retain: true,
        });
    }

    /// Handles a message from the broker.
    pub fn on_message(&mut self, topic: &str, payload: &[u8], now: u64) -> Result<(), CoreError> {
        self.current_mesh = topic.split('/').nth(2).unwrap_or_default().to_string();
        match topics::parse(topic) {
            Some(Incoming::Enroll { mesh, node }) => {
                let (mesh, node) = (mesh.to_string(), node.to_string());
                self.on_enroll(&mesh, &node, payload, now)
            }
            Some(Incoming::Status { mesh, node }) => {
                let (mesh, node) = (mesh.to_string(), node.to_string());
                self.on_status(&mesh, &node, payload, now)
            }
            Some(Incoming::Online { node, .. }) => {
                let online = payload == b"online";
                self.online.insert(node.to_string(), online);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn reject(&mut self, what: &str, node: &str, why: impl std::fmt::Display) {
        self.counters.rejected_messages += 1;
        tracing::warn!(node = %node, "refused {what}: {why}");
        // Bounded: an adapter that never drains this keeps only the latest refusals.
        if self.rejections.len() >= 256 {
            self.rejections.remove(0);
        }
        self.rejections.push(Rejection {
            what: what.to_string(),
            mesh: self.current_mesh.clone(),
            node: node.to_string(),
            why: why.to_string(),
        });
    }

    /// Forgets a node whose `MeshNode` was deleted (Kubernetes mode): its enrolment, published
    /// revision and subnet leave the in-memory state, so it is no longer reconciled, and its
    /// neighbours are reconciled without it. The state database is not changed (Kubernetes
    /// mode's database is a cache rebuilt from the cluster at every start).
    pub fn forget(&mut self, id: &str, now: u64) -> Result<(), CoreError> {
        if let Some(rec) = self.store.nodes.get(id) {
            self.credentials.push(crate::acl::Credential::Revoke {
                mesh: rec.mesh.clone(),
                node: id.to_string(),
            });
        }
        self.issued.remove(id);
        self.sealed.remove(id);
        self.store.nodes.remove(id);
        self.store.published.remove(id);
        let subnets: Vec<(String, String)> = self
            .store
            .subnets
            .keys()
            .filter(|(_, n)| n == id)
            .cloned()
            .collect();
        for key in subnets {
            if let Some(sid) = self.store.subnets.remove(&key)
                && let Some(t) = self.store.taken.get_mut(&key.0)
            {
                t.remove(&sid);
            }
        }
        self.blocked.remove(id);
        self.online.remove(id);
        let mut affected = self.peers.replace(id, None);
        affected.remove(id);
        self.reconcile(&affected.into_iter().collect::<Vec<_>>(), now)
    }

    /// Removes an enrolled node (standalone `sidenetctl remove`): its record is deleted, its
    /// broker credentials revoked, its retained config cleared; its revision counter stays, so
    /// if it enrols again (and is approved) its configs continue above what it runs. Returns
    /// the config topic to clear.
    pub fn remove_node(&mut self, id: &str, now: u64) -> Result<String, CoreError> {
        let Some(rec) = self.store.nodes.get(id).cloned() else {
            return Err(CoreError::Request(format!("node {id} is not enrolled")));
        };
        let mut batch = Batch::default();
        self.store.remove_node(&mut batch, id);
        self.batch.merge(batch);
        self.credentials.push(crate::acl::Credential::Revoke {
            mesh: rec.mesh.clone(),
            node: id.to_string(),
        });
        self.issued.remove(id);
        self.sealed.remove(id);
        self.blocked.remove(id);
        self.online.remove(id);
        tracing::info!(mesh = %rec.mesh, node = %id, "node removed");
        let mut affected = self.peers.replace(id, None);
        affected.remove(id);
        self.reconcile(&affected.into_iter().collect::<Vec<_>>(), now)?;
        Ok(topics::config(&rec.mesh, id))
    }

    fn on_enroll(
        &mut self,
        mesh: &str,
        node: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<(), CoreError> {
        let verified = match Envelope::parse(payload, 64 * 1024)
            .and_then(|e| e.verify_self_signed(Kind::Enroll))
        {
            Ok(v) => v,
            Err(e) => {
                self.reject("enrolment", node, e);
                return Ok(());
            }
        };
        if verified.signer.node_id() != node {
            self.reject(
                "enrolment",
                node,
                format!("signed by the key of node {}", verified.signer.node_id()),
            );
            return Ok(());
        }
        let last = self.store.nodes.get(node).and_then(|r| r.last_seq);
        if let Err(e) = verified.check(&Expect {
            mesh,
            node: Some(node),
            after: last,
            now,
        }) {
            self.reject("enrolment", node, e);
            return Ok(());
        }
        // `iat` is whatever the sender signed: near u64::MAX the sum must not overflow.
        if verified.header.iat.saturating_add(NODE_MESSAGE_MAX_AGE) < now {
            self.reject("enrolment", node, "too old");
            return Ok(());
        }
        let req: EnrollRequest = match verified.body_json() {
            Ok(r) => r,
            Err(e) => {
                self.reject("enrolment", node, e);
                return Ok(());
            }
        };
        let Some(m) = self.set.mesh_by_network(mesh).cloned() else {
            self.reject("enrolment", node, format!("no mesh named {mesh}"));
            return Ok(());
        };
        let mut batch = Batch::default();
        let existing = self.store.nodes.get(node).cloned();
        let mut approved = existing.as_ref().is_some_and(|r| r.approved);
        if m.spec.enrollment.mode == EnrollmentMode::Token && !approved {
            let manifest_ok = self.set.nodes.get(node).is_some_and(|n| n.spec.approved);
            if !manifest_ok {
                let Some(token) = req.token.as_deref() else {
                    self.counters.refused += 1;
                    self.reject("enrolment", node, "this mesh needs an enrolment token");
                    return Ok(());
                };
                let hash = sha256_hex(token.as_bytes());
                match self.store.tokens.get(&hash).cloned() {
                    Some(t) if t.mesh == mesh && t.used_by.is_none() && t.expires > now => {
                        let mut t = t;
                        t.used_by = Some(node.to_string());
                        self.store.put_token(&mut batch, &hash, t);
                        approved = true;
                    }
                    Some(t) if t.used_by.is_some() => {
                        self.counters.refused += 1;
                        self.reject("enrolment", node, "token already used");
                        return Ok(());
                    }
                    _ => {
                        self.counters.refused += 1;
                        self.reject("enrolment", node, "invalid or expired token");
                        return Ok(());
                    }
                }
            }
        }
        let rec = NodeRecord {
            mesh: mesh.to_string(),
            public_key: verified.signer.to_base64(),
            hostname: req.hostname.clone(),
            board: req.board.clone(),
            profile: req.profile.clone(),
            backend: req.backend.clone(),
            approved,
            enrolled_at: existing.as_ref().map_or(now, |r| r.enrolled_at),
            last_seen: Some(now),
            last_seq: Some(verified.header.revision()),
            wireguard: req
                .wireguard
                .clone()
                .or_else(|| existing.as_ref().and_then(|r| r.wireguard.clone())),
            ..existing.clone().unwrap_or_default()
        };
        if existing.is_none() {
            self.counters.enrolled += 1;
            tracing::info!(mesh = %mesh, node = %node, hostname = %req.hostname, "node enrolled");
        }
        self.store.put_node(&mut batch, node, rec);
        self.batch.merge(batch);
        let affected = self.peers.replace(node, self.store.nodes.get(node));
        self.reconcile(&affected.into_iter().collect::<Vec<_>>(), now)
    }

    fn on_status(
        &mut self,
        mesh: &str,
        node: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<(), CoreError> {
        let Some(rec) = self.store.nodes.get(node).cloned() else {
            // Not enrolled: nothing to verify against.
            return Ok(());
        };
        let Ok(key) = PublicKey::from_base64(&rec.public_key) else {
            return Ok(());
        };
        let verified =
            match Envelope::parse(payload, 64 * 1024).and_then(|e| e.verify(Kind::Status, &key)) {
                Ok(v) => v,
                Err(e) => {
                    self.reject("status", node, e);
                    return Ok(());
                }
            };
        match verified.check(&Expect {
            mesh,
            node: Some(node),
            after: rec.last_seq,
            now,
        }) {
            Ok(()) => {}
            // Status reports are retained: after a restart the controller receives the last
            // report of every node again. The one it already processed, or one too old to
            // count, is expected, not an attack.
            Err(WireError::Stale { got, .. }) if Some(got) == rec.last_seq => return Ok(()),
            Err(e @ WireError::Expired { .. }) => {
                tracing::debug!(node = %node, "ignored status report: {e}");
                return Ok(());
            }
            Err(e) => {
                self.reject("status", node, e);
                return Ok(());
            }
        }
        let report: StatusReport = match verified.body_json() {
            Ok(r) => r,
            Err(e) => {
                self.reject("status", node, e);
                return Ok(());
            }
        };
        let mut rec = rec;
        rec.last_seen = Some(now);
        rec.last_seq = Some(verified.header.revision());
        rec.applied = report.applied;
        rec.applied_sha256 = report.applied_sha256.clone();
        rec.state = Some(report.state);
        if let Some(f) = &report.failure
            && let Some(r) = f.revision
            && !rec.failed_revisions.contains(&r)
        {
            rec.failed_revisions.push(r);
            // Only the newest matter (a failed body is withheld while it is the node's latest
            // revision); a node must not be able to grow its own record without bound.
            let excess = rec
                .failed_revisions
                .len()
                .saturating_sub(MAX_FAILED_REVISIONS);
            rec.failed_revisions.drain(..excess);
        }
        rec.failure = report.failure.clone();
        rec.agent_version = Some(report.agent_version.clone());
        rec.missing = report.missing.clone();
        rec.probes = report.probes.clone();
        rec.neighbours = report.neighbours.clone();
        let moved = report.wireguard.is_some() && report.wireguard != rec.wireguard;
        if moved {
            rec.wireguard = report.wireguard.clone();
        }
        if report.mqtt_auth && !rec.mqtt_armed && self.issued.contains_key(node) {
            // The node logs in with its own password: from now on the broker insists on it.
            rec.mqtt_armed = true;
            tracing::info!(node = %node, "node logs in to the broker with its own password: its id now needs it");
            self.credentials.push(crate::acl::Credential::Arm {
                mesh: mesh.to_string(),
                node: node.to_string(),
            });
        }
        self.online.insert(node.to_string(), true);
        let mut batch = Batch::default();
        self.store.put_node(&mut batch, node, rec);
        self.batch.merge(batch);
        if let Some(trial) = &report.trial
            && crate::health::should_ack(self.store.published.get(node), self.store.epoch, trial)
        {
            let key = self.mesh_key(mesh)?;
            let seq = verified.header.revision();
            self.outbox
                .push(crate::health::ack(&key, mesh, node, seq, trial, now));
        }
        if moved {
            let affected = self.peers.replace(node, self.store.nodes.get(node));
            self.reconcile(&affected.into_iter().collect::<Vec<_>>(), now)?;
        }
        Ok(())
    }

    /// Approves a node (by id or MeshNode name) and reconciles it.
    pub fn approve(&mut self, who: &str, now: u64) -> Result<(), CoreError> {
        let id = self.resolve(who)?;
        let Some(mut rec) = self.store.nodes.get(&id).cloned() else {
            return Err(CoreError::Request(format!(
                "node {id} has not enrolled yet; approve it once it shows as pending, or write a MeshNode with approved: true"
            )));
        };
        rec.approved = true;
        let mut batch = Batch::default();
        self.store.put_node(&mut batch, &id, rec);
        self.batch.merge(batch);
        self.reconcile(&[id], now)
    }

    /// Creates a single-use enrolment token for a mesh, valid for `ttl` seconds. Only its hash
    /// is stored.
    pub fn create_token(
        &mut self,
        mesh: &str,
        token: &str,
        ttl: u64,
        now: u64,
    ) -> Result<(), CoreError> {
        if self.set.mesh_by_network(mesh).is_none() {
            return Err(CoreError::Request(format!("no mesh named {mesh}")));
        }
        let mut batch = Batch::default();
        self.store.put_token(
            &mut batch,
            &sha256_hex(token.as_bytes()),
            TokenRecord {
                mesh: mesh.to_string(),
                created: now,
                expires: now.saturating_add(ttl),
                used_by: None,
            },
        );
        self.batch.merge(batch);
        Ok(())
    }

    /// A node id from an id or a MeshNode name.
    pub fn resolve(&self, who: &str) -> Result<String, CoreError> {
        if self.store.nodes.contains_key(who) || self.set.nodes.contains_key(who) {
            return Ok(who.to_string());
        }
        if let Some((id, _)) = self
            .set
            .nodes
            .iter()
            .find(|(_, n)| n.metadata.name.as_deref() == Some(who))
        {
            return Ok(id.clone());
        }
        let ids: Vec<&String> = self
            .store
            .nodes
            .keys()
            .chain(self.set.nodes.keys())
            .collect();
        Err(CoreError::Request(format!(
            "no node {who:?}; closest: {}",
            closest(who, ids.into_iter())
        )))
    }

    /// The config a node would receive now, before signing.
    pub fn preview(&mut self, who: &str) -> Result<NodeConfig, CoreError> {
        let id = self.resolve(who)?;
        let mesh = self.mesh_for(&id).ok_or_else(|| {
            CoreError::Request(format!("node {id}: its mesh is not in the manifests"))
        })?;
        let net = network_name(&mesh).to_string();
        let mesh_name = mesh.metadata.name.clone().unwrap_or_default();
        let (pass, next) = self
            .passphrases(&mesh_name, crate::now())
            .map_err(CoreError::Request)?;
        let subnet = self
            .store
            .subnets
            .get(&(net.clone(), id.clone()))
            .copied()
            .unwrap_or_else(|| crate::ipam::preferred(&net, &id).max(1));
        let manifest = self.set.nodes.get(&id);
        let rec = self.store.nodes.get(&id);
        match decide(&self.set, &mesh, &id, manifest, rec, subnet, &pass) {
            Desired::Config { mut inputs, .. } => {
                inputs.passphrase_next = next.as_deref();
                let gw = crate::peers::gateways(&self.store, &self.set, &mesh);
                let dp =
                    crate::peers::dataplane(&self.peers, &self.store, &self.set, &mesh, &id, &gw);
                build_config_with(&self.renderer, &inputs, Some(dp)).map_err(CoreError::Request)
            }
            Desired::Pending(r) | Desired::Blocked(r) => Err(CoreError::Request(r)),
        }
    }

    /// Status of every known node.
    pub fn status(&self) -> Vec<StatusRow> {
        self.candidates()
            .into_iter()
            .map(|id| self.status_row(id))
            .collect()
    }

    /// Status of one node, if it is known (a MeshNode or an enrolled node).
    pub fn status_of(&self, id: &str) -> Option<StatusRow> {
        (self.set.nodes.contains_key(id) || self.store.nodes.contains_key(id))
            .then(|| self.status_row(id.to_string()))
    }

    fn status_row(&self, id: String) -> StatusRow {
        let rec = self.store.nodes.get(&id);
        let manifest = self.set.nodes.get(&id);
        let published = self.store.published.get(&id);
        let mesh = rec.map(|r| r.mesh.clone()).or_else(|| {
            manifest
                .and_then(|m| self.set.mesh_of(m))
                .map(|m| network_name(m).to_string())
        });
        let desired = published.map(|p| p.revision);
        let applied = rec.and_then(|r| r.applied);
        let reason = self.blocked.get(&id).cloned();
        let online = self.online.get(&id).copied();
        let reason = reason.or_else(|| crate::health::missing_reason(rec));
        let phase = if let Some(r) = &reason {
            if r.starts_with("waiting for approval") {
                "Pending"
            } else {
                "Blocked"
            }
        } else if rec.and_then(|r| r.state) == Some(ApplyState::Failed) {
            "Failed"
        } else if online == Some(false) {
            "Offline"
        } else if desired.is_some() && desired == applied {
            "Ready"
        } else if rec.is_none() {
            "Declared"
        } else {
            "Configuring"
        };
        let address = mesh.as_ref().and_then(|m| {
            let base = self
                .set
                .mesh_by_network(m)
                .and_then(|mm| crate::manifest::parse_ula48(&mm.spec.prefix).ok())?;
            let sid = self.store.subnets.get(&(m.clone(), id.clone()))?;
            Some(crate::ipam::node_address(base, *sid).to_string())
        });
        StatusRow {
            name: manifest.and_then(|m| m.metadata.name.clone()),
            mesh: mesh.unwrap_or_default(),
            hostname: rec.map(|r| r.hostname.clone()),
            phase: phase.to_string(),
            reason,
            online,
            desired,
            applied,
            last_seen: rec.and_then(|r| r.last_seen),
            address,
            failure: rec.and_then(|r| r.failure.as_ref().map(|f| f.error.clone())),
            neighbours: rec.map(|r| r.neighbours.clone()).unwrap_or_default(),
            probes: rec.map(|r| r.probes.clone()).unwrap_or_default(),
            agent_version: rec.and_then(|r| r.agent_version.clone()),
            agent_epoch: rec.and_then(|r| r.last_seq.map(|s| s.epoch)),
            missing: rec.map(|r| r.missing.clone()).unwrap_or_default(),
            node: id,
        }
    }
}

/// How long configs and announcements of `mesh` stay valid. Callers add it to the current time
/// with `saturating_add`: a huge `configValiditySeconds` means "never expires", not an expiry
/// that wraps around into the past (which would make every agent refuse every config).
fn validity(mesh: &Mesh) -> u64 {
    mesh.spec
        .config_validity_seconds
        .unwrap_or(DEFAULT_VALIDITY)
        .max(60)
}

pub(crate) fn approved(mesh: &Mesh, manifest: Option<&MeshNode>, rec: Option<&NodeRecord>) -> bool {
    match mesh.spec.enrollment.mode {
        EnrollmentMode::Auto => true,
        EnrollmentMode::Approval | EnrollmentMode::Token => {
            manifest.is_some_and(|m| m.spec.approved) || rec.is_some_and(|r| r.approved)
        }
    }
}

fn profile_for<'a>(
    set: &'a ManifestSet,
    id: &str,
    manifest: Option<&MeshNode>,
    rec: Option<&NodeRecord>,
) -> Result<&'a HardwareProfile, String> {
    let wanted = manifest
        .and_then(|m| m.spec.hardware_profile.clone())
        .or_else(|| rec.and_then(|r| r.profile.clone()));
    if let Some(p) = wanted {
        return set.profiles.get(&p).ok_or_else(|| {
            format!(
                "no HardwareProfile named {p:?}; closest: {}",
                closest(&p, set.profiles.keys())
            )
        });
    }
    match rec.and_then(|r| r.board.clone()) {
        Some(board) => set.profile_for_board(&board).ok_or_else(|| {
            format!(
                "board {board:?} has no profile; closest: {}",
                closest(&board, set.profiles.keys())
            )
        }),
        None => Err(format!(
            "node {id} has no hardware profile: set spec.hardwareProfile in its MeshNode or start the agent with --profile"
        )),
    }
}

fn decide<'a>(
    set: &'a ManifestSet,
    mesh: &'a Mesh,
    id: &'a str,
    manifest: Option<&'a MeshNode>,
    rec: Option<&'a NodeRecord>,
    subnet_id: u16,
    passphrase: &'a str,
) -> Desired<'a> {
    if !approved(mesh, manifest, rec) {
        return Desired::Pending(format!(
            "waiting for approval: `sidenetctl approve {id}` or a MeshNode with approved: true"
        ));
    }
    let profile = match profile_for(set, id, manifest, rec) {
        Ok(p) => p,
        Err(e) => return Desired::Blocked(e),
    };
    let spec = manifest.map(|m| &m.spec);
    Desired::Config {
        inputs: Box::new(NodeInputs {
            mesh,
            profile,
            id,
            name: manifest.and_then(|m| m.metadata.name.as_deref()),
            reported_hostname: rec.map(|r| r.hostname.as_str()),
            role: spec.map(|s| s.role).unwrap_or(NodeRole::Router),
            channel: spec.and_then(|s| s.overrides.channel),
            tx_power: spec.and_then(|s| s.overrides.tx_power),
            hostname: spec.and_then(|s| s.overrides.hostname.as_deref()),
            subnet_id,
            passphrase,
            passphrase_next: None,
        }),
    }
}

/// Renders the config for `inputs` (used by previews and `sidenetctl render`).
pub fn build_config(renderer: &Renderer, inputs: &NodeInputs<'_>) -> Result<NodeConfig, String> {
    build_config_with(renderer, inputs, None)
}

/// [`build_config`] with the node's WireGuard peers and gateways (else none).
pub fn build_config_with(
    renderer: &Renderer,
    inputs: &NodeInputs<'_>,
    dataplane: Option<crate::peers::Dataplane>,
) -> Result<NodeConfig, String> {
    let mut ctx = render::context(inputs).map_err(|e| e.to_string())?;
    if let Some(dp) = dataplane {
        ctx.dataplane = dp;
    }
    let family = inputs.profile.spec.firmware.as_str();
    let files = renderer.render(family, &ctx).map_err(|e| e.to_string())?;
    let mut actions: Vec<String> = Vec::new();
    for f in &files {
        for a in &f.actions {
            if !actions.contains(a) {
                actions.push(a.clone());
            }
        }
    }
    Ok(NodeConfig {
        mesh: ctx.mesh.network_name.clone(),
        node: inputs.id.to_string(),
        hostname: ctx.node.hostname.clone(),
        role: ctx.node.role.clone(),
        profile: ctx.profile.name.clone(),
        family: family.to_string(),
        subnet: ctx.node.subnet.clone(),
        addresses: vec![format!("{}/{}", ctx.node.address, ctx.node.prefix_len)],
        files: files.into_iter().map(|f| f.file).collect(),
        actions,
        sealed: BTreeMap::new(),
        requires: renderer.requirements(family),
    })
}

fn fingerprint(
    templates: &str,
    mesh_fp: &str,
    profile_fp: &str,
    inputs: &NodeInputs<'_>,
    manifest: Option<&MeshNode>,
) -> String {
    let doc = serde_json::json!({
        "templates": templates,
        "mesh": mesh_fp,
        "profile": profile_fp,
        "profileName": inputs.profile.metadata.name,
        "node": manifest.map(|m| &m.spec),
        "name": inputs.name,
        "reported": inputs.reported_hostname,
        "subnet": inputs.subnet_id,
        "passphrase": sha256_hex(inputs.passphrase.as_bytes()),
        "passphraseNext": inputs.passphrase_next.map(|p| sha256_hex(p.as_bytes())),
    });
    sha256_hex(&serde_json::to_vec(&doc).unwrap_or_default())
}

type MeshMemo = (
    Result<(String, Option<String>), String>,
    Result<KeyPair, String>,
    String,
    Result<[u8; 32], String>,
);

/// Per-reconcile memo of what is the same for every node of a mesh or profile.
#[derive(Default)]
struct PlanCache {
    /// Mesh name → (passphrase, signing key, fingerprint of the Mesh spec).
    meshes: BTreeMap<String, MeshMemo>,
    profiles: BTreeMap<String, String>,
    /// Mesh name → its gateways.
    gateways: BTreeMap<String, Vec<crate::peers::GatewayCtx>>,
}

/// [`NodeInputs`] without borrows, so plans outlive the borrow of the manifest set.
struct OwnedInputs {
    mesh: String,
    profile: String,
    id: String,
    name: Option<String>,
    reported_hostname: Option<String>,
    role: NodeRole,
    channel: Option<u32>,
    tx_power: Option<u32>,
    hostname: Option<String>,
    subnet_id: u16,
    passphrase: String,
    passphrase_next: Option<String>,
}

impl OwnedInputs {
    fn from(i: &NodeInputs<'_>, mesh: &str, profile: &str) -> Self {
        Self {
            mesh: mesh.to_string(),
            profile: profile.to_string(),
            id: i.id.to_string(),
            name: i.name.map(str::to_string),
            reported_hostname: i.reported_hostname.map(str::to_string),
            role: i.role,
            channel: i.channel,
            tx_power: i.tx_power,
            hostname: i.hostname.map(str::to_string),
            subnet_id: i.subnet_id,
            passphrase: i.passphrase.to_string(),
            passphrase_next: i.passphrase_next.map(str::to_string),
        }
    }

    fn borrow<'a>(&'a self, set: &'a ManifestSet) -> Option<NodeInputs<'a>> {
        Some(NodeInputs {
            mesh: set.meshes.get(&self.mesh)?,
            profile: set.profiles.get(&self.profile)?,
            id: &self.id,
            name: self.name.as_deref(),
            reported_hostname: self.reported_hostname.as_deref(),
            role: self.role,
            channel: self.channel,
            tx_power: self.tx_power,
            hostname: self.hostname.as_deref(),
            subnet_id: self.subnet_id,
            passphrase: &self.passphrase,
            passphrase_next: self.passphrase_next.as_deref(),
        })
    }
}

/// A node whose inputs changed: to be rendered and, if its content changed, signed.
struct Plan {
    id: String,
    net: String,
    inputs: OwnedInputs,
    fingerprint: String,
    prev: Option<Published>,
    refresh_due: bool,
    revision: Revision,
    key: KeyPair,
    /// The node's key, to seal secrets to.
    recipient: PublicKey,
    /// The secrets sealed to the node, when they were sealed before.
    sealed: Option<BTreeMap<String, String>>,
    /// What `sealed` was sealed from (passphrase, broker password and node key hash).
    seal_id: String,
    /// The node's broker password.
    mqtt_password: String,
    validity: u64,
    dataplane: crate::peers::Dataplane,
}

/// The result of rendering a plan.
struct Rendered {
    sha256: String,
    /// The sealed secrets the config carries (kept for the next render).
    sealed: BTreeMap<String, String>,
    /// `None` when the content did not change (nothing to sign).
    envelope: Option<Vec<u8>>,
}

/// A config's JSON body, as signed. The buffer is sized for the files' contents up front (a
/// config is ~9 KB: growing from serde_json's default would reallocate about seven times).
pub fn config_body(config: &NodeConfig) -> serde_json::Result<Vec<u8>> {
    let estimate = 1024
        + config
            .files
            .iter()
            .map(|f| f.path.len() + f.content.len() + f.content.len() / 16 + 48)
            .sum::<usize>();
    let mut body = Vec::with_capacity(estimate);
    serde_json::to_writer(&mut body, config)?;
    Ok(body)
}

fn render_and_seal(
    renderer: &Renderer,
    set: &ManifestSet,
    plan: &Plan,
    epoch: u64,
    now: u64,
) -> Result<Rendered, String> {
    let inputs = plan
        .inputs
        .borrow(set)
        .ok_or_else(|| "its mesh or profile vanished".to_string())?;
    let mut config = build_config_with(renderer, &inputs, Some(plan.dataplane.clone()))?;
    let sealed = match &plan.sealed {
        Some(s) => s.clone(),
        None => {
            let seal = |name: &str, secret: &str| {
                sidenet_wire::seal::seal(
                    &plan.key,
                    &plan.recipient,
                    sidenet_wire::seal::Context {
                        mesh: &plan.net,
                        node: &plan.id,
                        name,
                    },
                    secret.as_bytes(),
                )
            };
            let mut m = BTreeMap::from([
                (
                    MESH_PASSPHRASE.to_string(),
                    seal(MESH_PASSPHRASE, &plan.inputs.passphrase),
                ),
                (
                    MQTT_PASSWORD.to_string(),
                    seal(MQTT_PASSWORD, &plan.mqtt_password),
                ),
            ]);
            if let Some(next) = &plan.inputs.passphrase_next {
                m.insert(
                    MESH_PASSPHRASE_NEXT.to_string(),
                    seal(MESH_PASSPHRASE_NEXT, next),
                );
            }
            m
        }
    };
    config.sealed.extend(sealed.clone());
    let body = config_body(&config).map_err(|e| e.to_string())?;
    let digest = sidenet_wire::codec::sha256(&body);
    let sha256 = sidenet_wire::codec::hex(&digest);
    let unchanged = plan
        .prev
        .as_ref()
        .is_some_and(|p| p.sha256 == sha256 && !plan.refresh_due && p.revision.epoch == epoch);
    if unchanged {
        return Ok(Rendered {
            sha256,
            sealed,
            envelope: None,
        });
    }
    let header = Header {
        mesh: plan.net.clone(),
        node: Some(plan.id.clone()),
        epoch: plan.revision.epoch,
        rev: plan.revision.rev,
        iat: now,
        exp: now.saturating_add(plan.validity),
        len: 0,
        sha256: String::new(),
    };
    Ok(Rendered {
        sha256,
        sealed,
        envelope: Some(seal_hashed(Kind::Config, header, &body, &digest, &plan.key)),
    })
}

/// Size cap used when the controller parses node messages.
pub const NODE_MESSAGE_CAP: usize = DEFAULT_MAX_ENVELOPE;
