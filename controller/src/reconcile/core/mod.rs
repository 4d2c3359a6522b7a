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

mod keys;
mod messages;
mod plan;
mod status;

use plan::PlanCache;
pub use plan::{build_config, build_config_with, config_body};

use std::collections::BTreeMap;

use sidenet_crds::Mesh;
use sidenet_wire::envelope::DEFAULT_MAX_ENVELOPE;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::topics::{self};

use crate::reconcile::model::{Counters, Publish, Rejection, Rotation, Secrets};
use crate::reconcile::render::Renderer;
use crate::reconcile::store::{Batch, Store, StoreError};
use crate::spec::manifest::{ManifestSet, network_name};

/// Node messages older than this are refused.
const NODE_MESSAGE_MAX_AGE: u64 = 24 * 3600;

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
    pub peers: crate::reconcile::peers::Index,
    /// Node id → (SHA-256 of the secrets and node key, the secrets sealed to the node, by
    /// name): sealing costs two X25519 multiplications, so it is done once per node and secret.
    sealed: BTreeMap<String, (String, BTreeMap<String, String>)>,
    /// Node id → the broker password the broker was last told (see [`Self::take_credentials`]).
    issued: BTreeMap<String, String>,
    /// Credential changes for the broker since the driver last took them.
    credentials: Vec<crate::reconcile::credentials::Credential>,
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

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("epoch", &self.store.epoch)
            .field("meshes", &self.set.meshes.len())
            .field("nodes", &self.store.nodes.len())
            .finish()
    }
}

impl Controller {
    /// A controller over `store`, with no manifests yet.
    pub fn new(store: Store, renderer: Renderer, secrets: Box<dyn Secrets>) -> Self {
        let peers = crate::reconcile::peers::Index::build(&store.nodes);
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

    /// Replaces the manifests (already validated) and reconciles every node.
    pub fn set_manifests(&mut self, set: ManifestSet, now: u64) -> Result<(), CoreError> {
        self.set = set;
        let announcements = self.announcements(now)?;
        self.outbox.extend(announcements);
        self.reconcile_all(now)
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
}

/// Size cap used when the controller parses node messages.
pub const NODE_MESSAGE_CAP: usize = DEFAULT_MAX_ENVELOPE;
