//! The controller core's state: the [`Controller`] with its store, manifests, keys and
//! pending messages, and what reads it without deciding anything.

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
pub(super) const NODE_MESSAGE_MAX_AGE: u64 = 24 * 3600;

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
    pub(super) secrets: Box<dyn Secrets>,
    pub(super) keys: BTreeMap<String, KeyPair>,
    /// Presence by node id.
    pub online: BTreeMap<String, bool>,
    /// Why nodes are not configured.
    pub blocked: BTreeMap<String, String>,
    /// Counters.
    pub counters: Counters,
    /// Controller version, announced.
    pub version: String,
    pub(super) batch: Batch,
    pub(super) outbox: Vec<Publish>,
    /// Mesh of the message being handled (for [`Rejection`]).
    pub(super) current_mesh: String,
    /// Links → nodes, for WireGuard neighbours.
    pub peers: crate::reconcile::peers::Index,
    /// Node id → (SHA-256 of the secrets and node key, the secrets sealed to the node, by
    /// name): sealing costs two X25519 multiplications, so it is done once per node and secret.
    pub(super) sealed: BTreeMap<String, (String, BTreeMap<String, String>)>,
    /// Node id → the broker password the broker was last told (see [`Self::take_credentials`]).
    pub(super) issued: BTreeMap<String, String>,
    /// Credential changes for the broker since the driver last took them.
    pub(super) credentials: Vec<crate::reconcile::credentials::Credential>,
    /// Key rotations by mesh network name (loaded with the keys).
    pub(super) rotations: BTreeMap<String, Rotation>,
    /// Messages refused since the adapter last drained this: (what, node id, why). The
    /// Kubernetes adapter turns them into Events; standalone only logs them.
    pub rejections: Vec<Rejection>,
    /// Nodes reconciled per chunk ([`Controller::set_chunk`]).
    pub(super) chunk: Option<usize>,
    /// Nodes waiting for [`Controller::reconcile_deferred`].
    pub(super) deferred: std::collections::VecDeque<String>,
    /// Nodes waiting for approval (in memory only, bounded).
    pub pending: crate::reconcile::pending::Pending,
    /// Whether `Mesh.spec.rollout` stages changes ([`Controller::enable_rollouts`]).
    pub(super) staging: bool,
    /// Enrolled nodes whose manifest is on its way (Kubernetes mode creates a MeshNode for a
    /// node that enrols without one): no config is rendered for them until the manifest is in
    /// the set, or [`Controller::manifest_not_coming`]. Without this, each such node was
    /// signed twice: once named by its id, and again a moment later by its MeshNode's name.
    pub(super) awaiting_manifest: std::collections::BTreeSet<String>,
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
            pending: crate::reconcile::pending::Pending::new(Default::default()),
            staging: false,
            awaiting_manifest: Default::default(),
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

    /// Holds node `id` back from rendering until a manifest for it is in the set (see
    /// `awaiting_manifest`): the driver is about to create it.
    pub fn await_manifest(&mut self, id: &str) {
        if !self.set.nodes.contains_key(id) {
            self.awaiting_manifest.insert(id.to_string());
        }
    }

    /// Whether node `id` is held back for its manifest ([`Controller::await_manifest`]).
    pub fn awaits_manifest(&self, id: &str) -> bool {
        self.awaiting_manifest.contains(id)
    }

    /// No manifest is coming for node `id` after all (or it came but could not be used): it is
    /// rendered without one again, from its enrolment record. Returns whether it was held.
    pub fn manifest_not_coming(&mut self, id: &str) -> bool {
        self.awaiting_manifest.remove(id)
    }

    /// Replaces the manifests (already validated) and reconciles every node.
    pub fn set_manifests(&mut self, set: ManifestSet, now: u64) -> Result<(), CoreError> {
        self.awaiting_manifest
            .retain(|id| !set.nodes.contains_key(id));
        self.set = set;
        let announcements = self.announcements(now)?;
        self.outbox.extend(announcements);
        self.admit_approved_waiting(now)?;
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

    pub(super) fn publishes_of(
        &self,
        envs: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<Publish>, CoreError> {
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
    pub(super) fn candidates(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.set.nodes.keys().cloned().collect();
        ids.extend(self.store.nodes.keys().cloned());
        ids.sort();
        ids.dedup();
        ids
    }

    pub(super) fn mesh_name_for(&self, id: &str) -> Option<String> {
        if let Some(node) = self.set.nodes.get(id) {
            return self.set.mesh_of(node).and_then(|m| m.metadata.name.clone());
        }
        let rec = self.store.nodes.get(id)?;
        self.set
            .mesh_by_network(&rec.mesh)
            .and_then(|m| m.metadata.name.clone())
    }

    pub(super) fn mesh_for(&self, id: &str) -> Option<Mesh> {
        let name = self.mesh_name_for(id)?;
        self.set.meshes.get(&name).cloned()
    }
}

/// Size cap used when the controller parses node messages.
pub const NODE_MESSAGE_CAP: usize = DEFAULT_MAX_ENVELOPE;
