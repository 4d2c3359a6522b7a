//! The engine around the core: the context every reconciler shares ([`Ctx`]), the core and
//! what the adapter remembers about it ([`Engine`]), Events, and the error policy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use rumqttc::{AsyncClient, QoS};
use sidenet_crds::{HardwareProfile, Mesh, MeshNode, NodeProvision};
use tokio::sync::{Mutex, OnceCell};

use super::credentials::BrokerCredentials;
use super::http::Metrics;
use super::options::{KubeError, Options};
use super::sigbook::{SigBook, Signatures};
use super::state::{KubeSecrets, SecretCache};
use super::tenancy::{Claims, Validated};
use crate::reconcile::core::Controller;
use crate::reconcile::model::Publish;
use crate::reconcile::render::Renderer;
use crate::reconcile::store::Store as StateStore;
use crate::spec::manifest::network_name;

/// The longest Event note `events.k8s.io/v1` accepts, in bytes.
pub const MAX_NOTE: usize = 1024;

/// `note` cut to [`MAX_NOTE`] bytes on a character boundary, ending in "…" when cut.
pub fn truncate_note(note: &str) -> String {
    if note.len() <= MAX_NOTE {
        return note.to_string();
    }
    let ellipsis = "…";
    let mut end = MAX_NOTE - ellipsis.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &note[..end])
}

/// Finalizer on Mesh and MeshNode objects.
pub const FINALIZER: &str = "sidenet.io/cleanup";

/// A running NodeProvision job (kubernetes::provisions): the fingerprint it works on and its
/// task.
pub(crate) struct RunningJob {
    pub(crate) fingerprint: String,
    pub(crate) task: tokio::task::AbortHandle,
}

impl RunningJob {
    /// Stops the run.
    pub(crate) fn abort(&self) {
        self.task.abort();
    }
}

/// Writes an Event of a reconcile with `recorder`, its note cut to the API's limit; a failure
/// is logged.
async fn publish_event(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(truncate_note(note)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, reference).await {
        tracing::warn!("cannot record Event {reason}: {e}");
    }
}

/// Shared by every reconciler and the MQTT task.
pub struct Ctx {
    pub(crate) client: Client,
    pub(crate) opts: Options,
    pub(crate) meshes: Store<Mesh>,
    pub(crate) nodes: Store<MeshNode>,
    pub(crate) profiles: Store<HardwareProfile>,
    pub(crate) engine: OnceCell<Mutex<Engine>>,
    pub(crate) renderer: std::sync::Mutex<Option<Renderer>>,
    pub(crate) secrets: Arc<std::sync::Mutex<SecretCache>>,
    pub(crate) mqtt: AsyncClient,
    pub(crate) connected: Arc<AtomicBool>,
    pub(crate) recorder: Recorder,
    /// Who writes the Events ([`Ctx::event_once`] makes a recorder of its own with it).
    pub(crate) reporter: Reporter,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) failures: std::sync::Mutex<HashMap<String, u32>>,
    pub(crate) credentials: Box<dyn BrokerCredentials>,
    pub(crate) nodeprovisions: Store<NodeProvision>,
    /// The running NodeProvision jobs, by `NodeProvision/NS/NAME`.
    pub(crate) provisions: std::sync::Mutex<BTreeMap<String, RunningJob>>,
    /// The signatures of the Mesh, MeshNode and HardwareProfile caches, fed by their watches.
    pub(crate) sigs: Arc<SigBook>,
}

/// The core and what the adapter remembers about it. Behind one async mutex: one reconcile
/// at a time touches the core.
pub struct Engine {
    pub(crate) ctl: Controller,
    pub(crate) signature: u64,
    pub(crate) force: bool,
    pub(crate) last_good: BTreeMap<String, String>,
    pub(crate) invalid: BTreeMap<String, String>,
    pub(crate) held: BTreeSet<String>,
    pub(crate) high_water: BTreeMap<String, u64>,
    pub(crate) seeded: BTreeSet<String>,
    pub(crate) topics: BTreeMap<String, String>,
    /// Which object owns each mesh name, network name and node id.
    pub(crate) claims: Claims,
    /// The validated set of each namespace.
    pub(crate) namespaces: BTreeMap<String, Validated>,
    /// Each namespace's objects as last parsed and schema-checked, one by one (only a changed
    /// object is parsed again).
    pub(crate) parse_cache: BTreeMap<String, crate::spec::manifest::ParseCache>,
    pub(crate) warned: BTreeSet<String>,
    pub(crate) phases_at: Option<Instant>,
    /// Whether the set was handed to the core at least once (rollouts step only then).
    pub(crate) synced: bool,
    /// Staged rollouts (kubernetes::rollouts): what the Mesh status holds, per Mesh name.
    pub(crate) rollouts: super::rollstate::Persisted,
    /// The row ([`super::sigbook::row`]) of each object as the last sync read it, by
    /// `KIND/NS/NAME`: a reconcile whose object is already in the set need not sync again.
    pub(crate) synced_rows: HashMap<String, u64>,
    /// When the last sync ran.
    pub(crate) synced_at: Option<Instant>,
}

pub(crate) fn ns_of<K: Resource>(o: &K) -> String {
    o.meta().namespace.clone().unwrap_or_default()
}

pub(crate) fn key_of(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

pub(crate) fn deleting<K: Resource>(o: &K) -> bool {
    o.meta().deletion_timestamp.is_some()
}

/// Node id of a config topic (`sidenet/v1/MESH/nodes/NODE/config`).
pub(crate) fn config_node(topic: &str) -> Option<String> {
    let parts: Vec<&str> = topic.split('/').collect();
    (parts.len() == 6 && parts[3] == "nodes" && parts[5] == "config").then(|| parts[4].to_string())
}

impl Engine {
    /// An engine over `ctl` that has synced nothing yet.
    pub(crate) fn new(
        ctl: Controller,
        high_water: BTreeMap<String, u64>,
        rollouts: super::rollstate::Persisted,
    ) -> Self {
        Engine {
            ctl,
            signature: 0,
            force: false,
            last_good: BTreeMap::new(),
            invalid: BTreeMap::new(),
            held: BTreeSet::new(),
            high_water,
            seeded: BTreeSet::new(),
            topics: BTreeMap::new(),
            claims: Claims::default(),
            namespaces: BTreeMap::new(),
            parse_cache: BTreeMap::new(),
            warned: BTreeSet::new(),
            phases_at: None,
            synced: false,
            rollouts,
            synced_rows: HashMap::new(),
            synced_at: None,
        }
    }
}

impl Ctx {
    /// The engine, created on first use once every watch cache has its initial list: the
    /// state epoch and each node's revision, subnet and enrolment are read back from the
    /// objects' status, and the database (a cache in `SIDENET_CACHE_DIR`) starts empty.
    pub(crate) async fn engine(&self) -> Result<&Mutex<Engine>, KubeError> {
        self.engine
            .get_or_try_init(|| async {
                // kube-runtime's readiness signal wakes only its most recent waiter (the
                // controllers' runners also wait on it), so poll it instead of trusting a wakeup.
                let lost = |_| KubeError::Other("a watch stopped before its first list".into());
                loop {
                    let tick = Duration::from_millis(100);
                    let ready = async {
                        self.meshes.wait_until_ready().await?;
                        self.nodes.wait_until_ready().await?;
                        self.profiles.wait_until_ready().await
                    };
                    if let Ok(r) = tokio::time::timeout(tick, ready).await {
                        r.map_err(lost)?;
                        break;
                    }
                }
                let persisted = self
                    .meshes
                    .state()
                    .iter()
                    .filter_map(|m| m.status.as_ref().and_then(|s| s.state_epoch))
                    .chain(
                        self.nodes
                            .state()
                            .iter()
                            .filter_map(|n| n.status.as_ref().and_then(|s| s.desired_epoch)),
                    )
                    .max();
                let epoch = persisted.unwrap_or_else(crate::now);
                let dir = &self.opts.cache_dir;
                let _ = std::fs::remove_dir_all(dir);
                std::fs::create_dir_all(dir).map_err(|e| {
                    KubeError::Other(format!("cache folder {}: {e}", dir.display()))
                })?;
                let store = StateStore::open(&dir.join("cache.redb"), epoch)?;
                let renderer = self
                    .renderer
                    .lock()
                    .ok()
                    .and_then(|mut r| r.take())
                    .ok_or_else(|| KubeError::Other("templates already taken".into()))?;
                let mut ctl =
                    Controller::new(store, renderer, Box::new(KubeSecrets(self.secrets.clone())));
                // Staged rollouts: their records come back from the Mesh status.
                ctl.enable_rollouts();
                let rollouts = super::rollstate::load(&mut ctl, &self.meshes.state());
                if let Err(e) = self.credentials.apply(&ctl.credential_snapshot()) {
                    tracing::error!("broker credentials: {e}");
                }
                let mut high_water = BTreeMap::new();
                for m in self.meshes.state() {
                    if let Some(s) = &m.status
                        && s.state_epoch == Some(epoch)
                    {
                        // The highest of every Mesh with this network name (one of them may
                        // have been refused): a revision must never be reused.
                        let h = high_water
                            .entry(network_name(&m).to_string())
                            .or_insert(0u64);
                        *h = (*h).max(s.highest_revision.unwrap_or(0));
                    }
                }
                tracing::info!(
                    epoch,
                    from_cluster = persisted.is_some(),
                    "state epoch; revisions continue from the MeshNode status"
                );
                let mut eng = Engine::new(ctl, high_water, rollouts);
                eng.force = true;
                Ok::<_, KubeError>(Mutex::new(eng))
            })
            .await
    }

    /// Signatures of the objects' specs, identities, labels and deletions (not of status
    /// writes): one per namespace, one of the HardwareProfiles, and one of everything. Kept up
    /// to date from the watch events ([`super::sigbook`]), so asking costs nothing per object.
    pub(crate) fn signatures(&self) -> Signatures {
        self.sigs.snapshot()
    }

    pub(crate) async fn event(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        // An Event is written in its object's namespace; one about a cluster-scoped object
        // (a HardwareProfile: `regarding` without a namespace) in `default`, the only
        // namespace besides `kube-system` the API accepts for it (docs/helm.md, RBAC).
        publish_event(&self.recorder, reference, type_, reason, &note).await;
    }

    /// [`Ctx::event`] for an Event its object gets once (a node's `Enrolled`): written without
    /// the shared recorder, whose cache keeps every Event it wrote for 6 minutes (to count
    /// repeats into a series) and walks all of them at each write. In an enrolment storm of
    /// 10,000 nodes that cache held 24 MB, and the walks made each write O(n).
    pub(crate) async fn event_once(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        publish_event(&recorder, reference, type_, reason, &note).await;
    }

    /// A Warning Event, once per object and message.
    pub(crate) async fn warn_once(
        &self,
        eng: &mut Engine,
        reference: &ObjectReference,
        reason: &str,
        note: String,
    ) {
        let key = format!(
            "{}/{}/{}|{reason}|{note}",
            reference.kind.as_deref().unwrap_or(""),
            reference.namespace.as_deref().unwrap_or(""),
            reference.name.as_deref().unwrap_or("")
        );
        if eng.warned.insert(key) {
            tracing::warn!(
                object = %format!("{}/{}", reference.kind.as_deref().unwrap_or(""), reference.name.as_deref().unwrap_or("")),
                "{reason}: {note}"
            );
            self.event(reference, EventType::Warning, reason, note)
                .await;
        }
    }

    pub(crate) fn mesh_obj(&self, ns: &str, name: &str) -> Option<Arc<Mesh>> {
        self.meshes.get(&ObjectRef::new(name).within(ns))
    }

    pub(crate) fn node_obj(&self, ns: &str, name: &str) -> Option<Arc<MeshNode>> {
        self.nodes.get(&ObjectRef::new(name).within(ns))
    }

    pub(crate) fn provision_obj(&self, ns: &str, name: &str) -> Option<Arc<NodeProvision>> {
        self.nodeprovisions.get(&ObjectRef::new(name).within(ns))
    }

    pub(crate) async fn send(&self, p: Publish) -> Result<(), KubeError> {
        self.mqtt
            .publish(p.topic.clone(), QoS::AtLeastOnce, p.retain, p.payload)
            .await
            .map_err(|e| KubeError::Other(format!("MQTT publish {}: {e}", p.topic)))
    }
}

pub(crate) fn backoff(ctx: &Ctx, key: &str) -> Duration {
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key.to_string()).or_insert(0);
            *n += 1;
            *n
        })
        .unwrap_or(1);
    let ms = 500u64.saturating_mul(1u64 << (n.min(10) - 1));
    Duration::from_millis(ms.min(300_000))
}

pub(crate) fn succeeded(ctx: &Ctx, key: &str) {
    if let Ok(mut f) = ctx.failures.lock() {
        f.remove(key);
    }
}

/// Error policy of every kind: exponential backoff per object (0.5 s doubling, at most 5 min).
pub(crate) fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &KubeError,
    ctx: Arc<Ctx>,
) -> Action {
    let kind = K::kind(&()).to_string();
    let key = key_of(
        &kind,
        &ns_of(&*obj),
        &obj.meta().name.clone().unwrap_or_default(),
    );
    ctx.metrics.failed(&kind);
    let delay = backoff(&ctx, &key);
    tracing::warn!(object = %key, "reconcile failed: {err}; retrying in {delay:?}");
    Action::requeue(delay)
}

pub(crate) fn finalizer_err(e: finalizer::Error<KubeError>) -> KubeError {
    KubeError::Finalizer(Box::new(e))
}
