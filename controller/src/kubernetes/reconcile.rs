//! The reconcilers: one kube-runtime `Controller` per kind, all feeding the one core.
//!
//! The core ([`Controller`]) works on a validated [`ManifestSet`]; here that set is rebuilt
//! from the watch caches whenever an object's spec changed (a signature over uid, generation
//! and deletion of every object), validated with the standalone loader (JSON Schema + semantic
//! checks), and handed to the core, which re-renders only the nodes whose inputs changed.
//! Unlike standalone mode, one bad object does not freeze everything: it is replaced by its
//! last good version (or left out when it never had one), gets a `Warning` Event and an
//! `InvalidSpec` condition, and the rest of the set goes ahead.
//!
//! Durable facts are written to the cluster *before* a config is published: the node's
//! revision, body hash and subnet in its MeshNode status, the mesh's highest revision in its
//! Mesh status. A node whose status write fails keeps its new config held back and retried.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};
use sidenet_crds::{API_VERSION, HardwareProfile, Mesh, MeshNode, MeshNodeSpec, NodeOverrides};
use sidenet_wire::Revision;
use sidenet_wire::topics::{self, Incoming};
use tokio::sync::{Mutex, OnceCell};

use super::http::Metrics;
use super::options::{KubeError, Options};
use super::state::{KubeSecrets, SecretCache};
use super::status::{self, MeshFacts, NodeFacts};
use crate::reconcile::core::Controller;
use crate::reconcile::model::Publish;
use crate::reconcile::render::Renderer;
use crate::reconcile::store::{NodeRecord, Published, Store as StateStore};
use crate::spec::manifest::{self, ManifestSet, network_name};

/// Finalizer on Mesh and MeshNode objects.
pub const FINALIZER: &str = "sidenet.io/cleanup";

/// Where node broker credentials go: the embedded broker's [`crate::transport::acl::CredentialBook`], or
/// nowhere when an external broker is used without a user store the controller drives.
pub trait BrokerCredentials: Send + Sync {
    /// Applies credential changes from the core ([`Controller::take_credentials`]).
    fn apply(&self, changes: &[crate::reconcile::credentials::Credential]) -> Result<(), String>;

    /// The controller (re)connected to the broker: bring the broker's user store up to date.
    fn on_connected(&self, _ctl: &mut Controller) -> Result<(), String> {
        Ok(())
    }

    /// An answer of the broker's user store.
    fn on_response(&self, _payload: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// Revokes the credentials of node `node` of mesh `mesh` (network name). Idempotent.
    fn revoke(&self, mesh: &str, node: &str) -> Result<(), String> {
        self.apply(&[crate::reconcile::credentials::Credential::Revoke {
            mesh: mesh.to_string(),
            node: node.to_string(),
        }])
    }
}

/// An external broker whose users the controller does not manage: nothing to do.
#[derive(Debug, Default)]
pub struct NoBrokerCredentials;

impl BrokerCredentials for NoBrokerCredentials {
    fn apply(&self, _changes: &[crate::reconcile::credentials::Credential]) -> Result<(), String> {
        Ok(())
    }
}

/// Node credentials on an external Mosquitto, through its dynamic security plugin
/// ([`crate::transport::dynsec`]), over the controller's own MQTT connection.
pub struct DynsecCredentials {
    /// The controller's connection.
    pub mqtt: AsyncClient,
    /// The controller's broker user (given the controller role at setup).
    pub user: String,
}

impl DynsecCredentials {
    fn send(&self, commands: Vec<Value>) -> Result<(), String> {
        for payload in crate::transport::dynsec::messages(commands, 200) {
            self.mqtt
                .try_publish(
                    crate::transport::dynsec::CONTROL_TOPIC,
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .map_err(|e| format!("dynamic security command: {e}"))?;
        }
        Ok(())
    }
}

impl BrokerCredentials for DynsecCredentials {
    fn apply(&self, changes: &[crate::reconcile::credentials::Credential]) -> Result<(), String> {
        self.send(crate::transport::dynsec::commands(changes))
    }

    fn on_connected(&self, ctl: &mut Controller) -> Result<(), String> {
        let meshes: Vec<String> = ctl
            .set
            .meshes
            .values()
            .map(|m| network_name(m).to_string())
            .collect();
        self.mqtt
            .try_subscribe(crate::transport::dynsec::RESPONSE_TOPIC, QoS::AtLeastOnce)
            .map_err(|e| format!("subscribe: {e}"))?;
        let mut cmds = crate::transport::dynsec::setup(&self.user, &meshes);
        cmds.extend(crate::transport::dynsec::commands(
            &ctl.credential_snapshot(),
        ));
        self.send(cmds)
    }

    fn on_response(&self, payload: &[u8]) -> Result<(), String> {
        match crate::transport::dynsec::controller_role_missing(payload, &self.user) {
            Some(cmd) => {
                tracing::info!(
                    "giving broker user {} the sidenet-controller role (Mosquitto reconnects it)",
                    self.user
                );
                self.send(vec![cmd])
            }
            None => Ok(()),
        }
    }
}

impl BrokerCredentials for crate::transport::acl::CredentialBook {
    fn apply(&self, changes: &[crate::reconcile::credentials::Credential]) -> Result<(), String> {
        crate::transport::acl::CredentialBook::apply(self, changes);
        Ok(())
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
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) failures: std::sync::Mutex<HashMap<String, u32>>,
    pub(crate) credentials: Box<dyn BrokerCredentials>,
}

/// The core and what the adapter remembers about it. Behind one async mutex: one reconcile
/// at a time touches the core.
pub struct Engine {
    pub(crate) ctl: Controller,
    signature: u64,
    force: bool,
    last_good: BTreeMap<String, Value>,
    invalid: BTreeMap<String, String>,
    held: BTreeSet<String>,
    high_water: BTreeMap<String, u64>,
    seeded: BTreeSet<String>,
    topics: BTreeMap<String, String>,
    node_objs: BTreeMap<String, (String, String)>,
    mesh_objs: BTreeMap<String, (String, String)>,
    warned: BTreeSet<String>,
    phases_at: Option<Instant>,
}

fn ns_of<K: Resource>(o: &K) -> String {
    o.meta().namespace.clone().unwrap_or_default()
}

fn key_of(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

fn deleting<K: Resource>(o: &K) -> bool {
    o.meta().deletion_timestamp.is_some()
}

/// Node id of a config topic (`sidenet/v1/MESH/nodes/NODE/config`).
fn config_node(topic: &str) -> Option<String> {
    let parts: Vec<&str> = topic.split('/').collect();
    (parts.len() == 6 && parts[3] == "nodes" && parts[5] == "config").then(|| parts[4].to_string())
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
                if let Err(e) = self.credentials.apply(&ctl.credential_snapshot()) {
                    tracing::error!("broker credentials: {e}");
                }
                let mut high_water = BTreeMap::new();
                for m in self.meshes.state() {
                    if let Some(s) = &m.status
                        && s.state_epoch == Some(epoch)
                    {
                        high_water.insert(
                            network_name(&m).to_string(),
                            s.highest_revision.unwrap_or(0),
                        );
                    }
                }
                tracing::info!(
                    epoch,
                    from_cluster = persisted.is_some(),
                    "state epoch; revisions continue from the MeshNode status"
                );
                Ok::<_, KubeError>(Mutex::new(Engine {
                    ctl,
                    signature: 0,
                    force: true,
                    last_good: BTreeMap::new(),
                    invalid: BTreeMap::new(),
                    held: BTreeSet::new(),
                    high_water,
                    seeded: BTreeSet::new(),
                    topics: BTreeMap::new(),
                    node_objs: BTreeMap::new(),
                    mesh_objs: BTreeMap::new(),
                    warned: BTreeSet::new(),
                    phases_at: None,
                }))
            })
            .await
    }

    /// Changes when any object's spec, identity or deletion changes (not on status writes).
    fn signature(&self) -> u64 {
        let mut rows: Vec<String> = Vec::new();
        let mut add = |kind: &str, m: &ObjectMeta| {
            rows.push(format!(
                "{kind}|{}|{}|{}|{:?}|{}",
                m.namespace.as_deref().unwrap_or(""),
                m.name.as_deref().unwrap_or(""),
                m.uid.as_deref().unwrap_or(""),
                m.generation,
                m.deletion_timestamp.is_some()
            ));
        };
        for o in self.meshes.state() {
            add("Mesh", &o.metadata);
        }
        for o in self.nodes.state() {
            add("MeshNode", &o.metadata);
        }
        for o in self.profiles.state() {
            add("HardwareProfile", &o.metadata);
        }
        rows.sort();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rows.hash(&mut h);
        h.finish()
    }

    async fn event(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        // Events about cluster-scoped objects (HardwareProfiles) go to the controller's own
        // namespace, where the chart lets it write them.
        let mut reference = reference.clone();
        if reference.namespace.is_none() {
            reference.namespace = Some(self.opts.pod_namespace.clone());
        }
        let reference = &reference;
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            tracing::warn!("cannot record Event {reason}: {e}");
        }
    }

    /// A Warning Event, once per object and message.
    async fn warn_once(
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

    fn mesh_obj(&self, ns: &str, name: &str) -> Option<Arc<Mesh>> {
        self.meshes.get(&ObjectRef::new(name).within(ns))
    }

    fn node_obj(&self, ns: &str, name: &str) -> Option<Arc<MeshNode>> {
        self.nodes.get(&ObjectRef::new(name).within(ns))
    }

    async fn send(&self, p: Publish) -> Result<(), KubeError> {
        self.mqtt
            .publish(p.topic.clone(), QoS::AtLeastOnce, p.retain, p.payload)
            .await
            .map_err(|e| KubeError::Other(format!("MQTT publish {}: {e}", p.topic)))
    }
}

/// The manifest form of an object: what the standalone loader validates.
fn manifest_value(kind: &str, meta: &ObjectMeta, spec: Value) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": meta.name.clone().unwrap_or_default()},
        "spec": spec,
    })
}

fn spec_value<T: serde::Serialize>(spec: &T) -> Value {
    serde_json::to_value(spec).unwrap_or(Value::Null)
}

/// Rebuilds the set when an object changed, then reconciles every node (the core renders only
/// those whose inputs changed).
pub(crate) async fn sync(ctx: &Ctx, eng: &mut Engine) -> Result<(), KubeError> {
    let sig = ctx.signature();
    if sig == eng.signature && !eng.force {
        return Ok(());
    }
    eng.signature = sig;
    eng.force = false;
    let now = crate::now();

    let mut objs: BTreeMap<String, Value> = BTreeMap::new();
    let mut refs: BTreeMap<String, ObjectReference> = BTreeMap::new();
    let mut deleting_meshes = BTreeSet::new();
    for m in ctx.meshes.state() {
        let (ns, name) = (ns_of(&*m), m.name_any());
        if deleting(&*m) {
            deleting_meshes.insert((ns, name));
            continue;
        }
        let key = key_of("Mesh", &ns, &name);
        objs.insert(
            key.clone(),
            manifest_value("Mesh", &m.metadata, spec_value(&m.spec)),
        );
        refs.insert(key, m.object_ref(&()));
    }
    for p in ctx.profiles.state() {
        let key = key_of("HardwareProfile", "", &p.name_any());
        objs.insert(
            key.clone(),
            manifest_value("HardwareProfile", &p.metadata, spec_value(&p.spec)),
        );
        refs.insert(key, p.object_ref(&()));
    }
    let mut going = Vec::new();
    for n in ctx.nodes.state() {
        let ns = ns_of(&*n);
        if deleting(&*n) || deleting_meshes.contains(&(ns.clone(), n.spec.mesh.clone())) {
            going.push(n.spec.node_id.clone());
            continue;
        }
        let key = key_of("MeshNode", &ns, &n.name_any());
        objs.insert(
            key.clone(),
            manifest_value("MeshNode", &n.metadata, spec_value(&n.spec)),
        );
        refs.insert(key, n.object_ref(&()));
    }
    // Nodes on their way out are not reconciled again; their finalizer clears their topic.
    for id in going {
        if eng.ctl.store.nodes.contains_key(&id) || eng.ctl.store.published.contains_key(&id) {
            eng.ctl.forget(&id, now)?;
        }
    }

    let mut current = objs.clone();
    let mut fallback = BTreeSet::new();
    let mut invalid: BTreeMap<String, String> = BTreeMap::new();
    let mut set = None;
    for _ in 0..12 {
        let texts: Vec<(PathBuf, String)> = current
            .iter()
            .map(|(k, v)| (PathBuf::from(k), v.to_string()))
            .collect();
        match manifest::load_texts(&texts) {
            Ok(s) => {
                set = Some(s);
                break;
            }
            Err(errs) => {
                let mut progressed = false;
                for e in errs.0 {
                    let key = e.file.display().to_string();
                    let msg = match &e.field {
                        Some(f) => format!("{f}: {}", e.message),
                        None => e.message.clone(),
                    };
                    invalid
                        .entry(key.clone())
                        .and_modify(|m| {
                            if !m.contains(&msg) {
                                m.push_str("; ");
                                m.push_str(&msg);
                            }
                        })
                        .or_insert(msg);
                    if !current.contains_key(&key) {
                        continue;
                    }
                    progressed = true;
                    match eng.last_good.get(&key) {
                        Some(good)
                            if !fallback.contains(&key) && current.get(&key) != Some(good) =>
                        {
                            current.insert(key.clone(), good.clone());
                            fallback.insert(key);
                        }
                        _ => {
                            current.remove(&key);
                        }
                    }
                }
                if !progressed {
                    break;
                }
            }
        }
    }
    let Some(set) = set else {
        return Err(KubeError::Other(
            "the objects could not be validated into a usable set; keeping the last one".into(),
        ));
    };
    eng.last_good.retain(|k, _| objs.contains_key(k));
    for (k, v) in &current {
        if !fallback.contains(k) {
            eng.last_good.insert(k.clone(), v.clone());
        }
    }
    for (key, msg) in &invalid {
        if let Some(r) = refs.get(key) {
            let note = if fallback.contains(key) {
                format!("{msg} (the previous valid spec stays in use)")
            } else {
                format!("{msg} (this object is not used until it is fixed)")
            };
            ctx.warn_once(eng, r, "InvalidManifest", note).await;
        }
    }
    eng.invalid = invalid;

    eng.mesh_objs.clear();
    for m in ctx.meshes.state() {
        if set.meshes.contains_key(&m.name_any()) && !deleting(&*m) {
            eng.mesh_objs
                .insert(network_name(&m).to_string(), (ns_of(&*m), m.name_any()));
        }
    }
    eng.node_objs.clear();
    for n in ctx.nodes.state() {
        if !deleting(&*n) {
            eng.node_objs
                .insert(n.spec.node_id.clone(), (ns_of(&*n), n.name_any()));
        }
    }
    for n in ctx.nodes.state() {
        if set.nodes.contains_key(&n.spec.node_id) && !deleting(&*n) {
            seed(eng, &set, &n, now);
        }
    }
    tracing::info!(
        meshes = set.meshes.len(),
        nodes = set.nodes.len(),
        profiles = set.profiles.len(),
        invalid = eng.invalid.len(),
        "objects loaded"
    );
    if let Err(e) = eng.ctl.set_manifests(set, now) {
        // Try again at the next reconcile instead of waiting for another change.
        eng.force = true;
        return Err(e.into());
    }
    Ok(())
}

/// Puts what the cluster remembers about a node into the core, once per node and process:
/// its revision (so the next one continues the sequence), subnet and enrolment.
fn seed(eng: &mut Engine, set: &ManifestSet, node: &MeshNode, now: u64) {
    let id = node.spec.node_id.clone();
    if eng.seeded.contains(&id) {
        return;
    }
    let Some(mesh) = set.meshes.get(&node.spec.mesh) else {
        return;
    };
    let net = network_name(mesh).to_string();
    eng.seeded.insert(id.clone());
    let epoch = eng.ctl.store.epoch;
    let st = node.status.clone().unwrap_or_default();
    if !eng.ctl.store.published.contains_key(&id) {
        let counter = match (st.desired_epoch, st.desired_revision) {
            (Some(e), Some(r)) if e == epoch => r,
            _ => eng.high_water.get(&net).copied().unwrap_or(0),
        };
        seed_revision(eng, &id, &net, counter);
    }
    if let Some(sid) = st.subnet_id {
        let key = (net.clone(), id.clone());
        let taken = eng.ctl.store.taken.entry(net.clone()).or_default();
        if !eng.ctl.store.subnets.contains_key(&key) && !taken.contains(&sid) {
            taken.insert(sid);
            eng.ctl.store.subnets.insert(key, sid);
        }
    }
    let enrolled = st
        .conditions
        .iter()
        .any(|c| c.type_ == "Enrolled" && c.status == "True");
    // The key the node enrolled with: the declared one, else the one the status recorded (a
    // node declared without `spec.publicKey` does not enrol again once it runs a config, and
    // without its key the core publishes nothing to it).
    let enrolled_key = node
        .spec
        .public_key
        .as_ref()
        .or(st.enrolled_key.as_ref())
        .filter(|k| sidenet_wire::PublicKey::from_base64(k).is_ok_and(|k| k.node_id() == id));
    if enrolled
        && !eng.ctl.store.nodes.contains_key(&id)
        && let Some(pk) = enrolled_key
    {
        let rec = NodeRecord {
            mesh: net,
            public_key: pk.clone(),
            hostname: st
                .reported_hostname
                .clone()
                .unwrap_or_else(|| node.name_any()),
            profile: node.spec.hardware_profile.clone(),
            enrolled_at: now,
            mqtt_armed: st.broker_login,
            ..Default::default()
        };
        eng.ctl.store.nodes.insert(id.clone(), rec);
        let rec = eng.ctl.store.nodes.get(&id).cloned();
        let _ = eng.ctl.peers.replace(&id, rec.as_ref());
    }
}

/// Records revision `counter` as the node's last one, without its envelope: the core then
/// signs the node's next config as `counter + 1` (it has no bytes to republish under
/// `counter`, and one revision must never carry two payloads).
fn seed_revision(eng: &mut Engine, id: &str, net: &str, counter: u64) {
    if counter == 0 {
        return;
    }
    let epoch = eng.ctl.store.epoch;
    eng.ctl.store.published.insert(
        id.to_string(),
        Published {
            revision: Revision {
                epoch,
                rev: counter,
            },
            sha256: String::new(),
            input: String::new(),
            iat: 0,
            exp: 0,
            signer: None,
        },
    );
    eng.topics.insert(id.to_string(), topics::config(net, id));
}

/// Commits the core's state, writes the durable facts of every new config to the cluster, then
/// publishes. Configs whose facts could not be written are held and retried.
pub(crate) async fn persist_and_publish(
    ctx: &Ctx,
    eng: &mut Engine,
    started: Instant,
) -> Result<(), KubeError> {
    let out = eng.ctl.flush()?;
    let changes = eng.ctl.take_credentials();
    if let Err(e) = ctx.credentials.apply(&changes) {
        tracing::error!("broker credentials: {e}");
    }
    let rejections = std::mem::take(&mut eng.ctl.rejections);
    for r in rejections {
        if let Some((ns, name)) = eng.mesh_objs.get(&r.mesh).cloned()
            && let Some(m) = ctx.mesh_obj(&ns, &name)
        {
            let note = format!("refused {} of node {}: {}", r.what, r.node, r.why);
            ctx.warn_once(eng, &m.object_ref(&()), "NodeRejected", note)
                .await;
        }
    }
    let connected = ctx.connected.load(Ordering::SeqCst);
    let mut configs: BTreeSet<String> = std::mem::take(&mut eng.held);
    let mut others = Vec::new();
    for p in out {
        match config_node(&p.topic) {
            Some(id) => {
                eng.topics.insert(id.clone(), p.topic);
                configs.insert(id);
            }
            None => others.push(p),
        }
    }
    // The mesh's highest revision first: a node created later starts above it.
    let epoch = eng.ctl.store.epoch;
    let mut per_mesh: BTreeMap<String, u64> = BTreeMap::new();
    for id in &configs {
        if let (Some(p), Some(t)) = (eng.ctl.store.published.get(id), eng.topics.get(id)) {
            let net = t.split('/').nth(2).unwrap_or_default().to_string();
            let e = per_mesh.entry(net).or_default();
            *e = (*e).max(p.revision.rev);
        }
    }
    let mut blocked_meshes = BTreeSet::new();
    for (net, rev) in per_mesh {
        if eng.high_water.get(&net).is_some_and(|h| *h >= rev) {
            continue;
        }
        let Some((ns, name)) = eng.mesh_objs.get(&net).cloned() else {
            blocked_meshes.insert(net);
            continue;
        };
        let api: Api<Mesh> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"status": {"stateEpoch": epoch, "highestRevision": rev}});
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                eng.high_water.insert(net, rev);
            }
            Err(e) => {
                tracing::warn!(mesh = %net, "cannot record the highest revision in Mesh {ns}/{name} status: {e}; holding its configs");
                blocked_meshes.insert(net);
            }
        }
    }
    let mut sent = 0;
    for id in configs {
        if !eng.ctl.store.published.contains_key(&id) {
            continue;
        }
        let Some(topic) = eng.topics.get(&id).cloned() else {
            continue;
        };
        let net = topic.split('/').nth(2).unwrap_or_default().to_string();
        if blocked_meshes.contains(&net) {
            eng.held.insert(id);
            continue;
        }
        let Some((ns, name)) = eng.node_objs.get(&id).cloned() else {
            // Enrolled a moment ago: its MeshNode is being created.
            eng.held.insert(id);
            continue;
        };
        let Some(obj) = ctx.node_obj(&ns, &name) else {
            eng.held.insert(id);
            continue;
        };
        if let Err(e) = write_status(ctx, eng, &obj).await {
            tracing::warn!(node = %id, "cannot record the revision in MeshNode {ns}/{name} status: {e}; holding its config");
            eng.held.insert(id);
            continue;
        }
        let Some(payload) = eng.ctl.store.envelope(&id)? else {
            continue;
        };
        if connected {
            ctx.send(Publish {
                topic,
                payload,
                retain: true,
            })
            .await?;
            sent += 1;
        }
    }
    if sent > 0 {
        ctx.metrics
            .published
            .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
        ctx.metrics.observe_publish(started.elapsed());
    }
    if connected {
        for p in others {
            ctx.send(p).await?;
        }
    }
    Ok(())
}

/// Writes a MeshNode's status when it changed.
pub(crate) async fn write_status(
    ctx: &Ctx,
    eng: &mut Engine,
    node: &MeshNode,
) -> Result<(), KubeError> {
    let id = &node.spec.node_id;
    let ns = ns_of(node);
    let name = node.name_any();
    let invalid = eng.invalid.get(&key_of("MeshNode", &ns, &name)).cloned();
    let set = &eng.ctl.set;
    let mesh = set.meshes.get(&node.spec.mesh);
    let rec = eng.ctl.store.nodes.get(id);
    let net = mesh.map(|m| network_name(m).to_string());
    let facts = NodeFacts {
        mesh,
        published: eng
            .ctl
            .store
            .published
            .get(id)
            .filter(|p| !p.sha256.is_empty()),
        subnet_id: net.and_then(|n| eng.ctl.store.subnets.get(&(n, id.clone())).copied()),
        // A node waiting for approval proved its key too (it has no record yet).
        enrolled: rec.is_some() || eng.ctl.pending.get(id).is_some(),
        record_approved: rec.is_some_and(|r| r.approved),
        reported_hostname: rec.map(|r| r.hostname.clone()),
        enrolled_key: rec
            .map(|r| r.public_key.clone())
            .or_else(|| eng.ctl.pending.get(id).map(|p| p.public_key.clone())),
        broker_login: rec.is_some_and(|r| r.mqtt_armed),
        applied_sha256: rec.and_then(|r| r.applied_sha256.clone()),
        invalid,
        links: rec
            .filter(|r| r.last_seen.is_some() && !r.neighbours.is_empty())
            .map(status::links),
    };
    let row = eng.ctl.status_of(id);
    let mut new = status::node_status(node, row.as_ref(), &facts);
    let old = node.status.as_ref();
    status::carry_transitions(
        &mut new.conditions,
        old.map(|o| o.conditions.as_slice()).unwrap_or(&[]),
        crate::now(),
    );
    // Seeded but not yet re-signed: keep the recorded revision.
    if facts.published.is_none()
        && let Some(o) = old
    {
        new.desired_revision = new.desired_revision.or(o.desired_revision);
        new.desired_epoch = new.desired_epoch.or(o.desired_epoch);
        new.config_sha256 = new.config_sha256.or(o.config_sha256.clone());
    }
    if !status::worth_writing(old, &new, 60) {
        return Ok(());
    }
    let api: Api<MeshNode> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": new})),
    )
    .await?;
    Ok(())
}

/// Refreshes the nodes-by-phase gauge, at most every 2 s (it walks every node).
fn update_phases(ctx: &Ctx, eng: &mut Engine) {
    if eng
        .phases_at
        .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
    {
        return;
    }
    eng.phases_at = Some(Instant::now());
    let mut phases: BTreeMap<String, u64> = BTreeMap::new();
    for row in eng.ctl.status() {
        *phases.entry(row.phase).or_default() += 1;
    }
    if let Ok(mut p) = ctx.metrics.phases.lock() {
        *p = phases;
    }
}

/// Clears a node's retained config, revokes its broker credentials and forgets it.
async fn clear_node(
    ctx: &Ctx,
    eng: &mut Engine,
    id: &str,
    topic: Option<String>,
) -> Result<(), KubeError> {
    let topic = eng.topics.get(id).cloned().or(topic);
    if let Some(topic) = &topic {
        if !ctx.connected.load(Ordering::SeqCst) {
            return Err(KubeError::Other(format!(
                "cannot clear {topic}: not connected to the MQTT broker"
            )));
        }
        ctx.send(Publish {
            topic: topic.clone(),
            payload: Vec::new(),
            retain: true,
        })
        .await?;
        let net = topic.split('/').nth(2).unwrap_or_default();
        ctx.credentials.revoke(net, id).map_err(|e| {
            KubeError::Other(format!("revoking broker credentials of node {id}: {e}"))
        })?;
        tracing::info!(node = %id, "cleared retained config {topic}");
    }
    eng.ctl.forget(id, crate::now())?;
    eng.topics.remove(id);
    eng.held.remove(id);
    eng.seeded.remove(id);
    Ok(())
}

fn backoff(ctx: &Ctx, key: &str) -> Duration {
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

fn succeeded(ctx: &Ctx, key: &str) {
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

fn finalizer_err(e: finalizer::Error<KubeError>) -> KubeError {
    KubeError::Finalizer(Box::new(e))
}

/// Reconciles one MeshNode.
pub(crate) async fn reconcile_node(
    node: Arc<MeshNode>,
    ctx: Arc<Ctx>,
) -> Result<Action, KubeError> {
    ctx.metrics.reconciled("MeshNode");
    let ns = ns_of(&*node);
    let api: Api<MeshNode> = Api::namespaced(ctx.client.clone(), &ns);
    let key = key_of("MeshNode", &ns, &node.name_any());
    let action = finalizer(&api, FINALIZER, node, |ev| async {
        match ev {
            finalizer::Event::Apply(n) => apply_node(&ctx, &n).await,
            finalizer::Event::Cleanup(n) => cleanup_node(&ctx, &n).await,
        }
    })
    .await
    .map_err(finalizer_err)?;
    succeeded(&ctx, &key);
    Ok(action)
}

async fn apply_node(ctx: &Ctx, node: &MeshNode) -> Result<Action, KubeError> {
    let started = Instant::now();
    let engine = ctx.engine().await?;
    let mut eng = engine.lock().await;
    sync(ctx, &mut eng).await?;
    let id = node.spec.node_id.clone();
    if eng.ctl.set.nodes.contains_key(&id) || eng.ctl.store.nodes.contains_key(&id) {
        eng.ctl.reconcile(std::slice::from_ref(&id), crate::now())?;
    }
    persist_and_publish(ctx, &mut eng, started).await?;
    let latest = ctx.node_obj(&ns_of(node), &node.name_any());
    write_status(ctx, &mut eng, latest.as_deref().unwrap_or(node)).await?;
    update_phases(ctx, &mut eng);
    Ok(Action::requeue(ctx.opts.refresh))
}

async fn cleanup_node(ctx: &Ctx, node: &MeshNode) -> Result<Action, KubeError> {
    let engine = ctx.engine().await?;
    let mut eng = engine.lock().await;
    let id = node.spec.node_id.clone();
    let ns = ns_of(node);
    // Another live MeshNode claims the same node: leave its config alone.
    let other = ctx
        .nodes
        .state()
        .iter()
        .any(|n| n.spec.node_id == id && !deleting(&**n) && n.name_any() != node.name_any());
    if !other {
        let topic = ctx
            .mesh_obj(&ns, &node.spec.mesh)
            .map(|m| topics::config(network_name(&m), &id));
        clear_node(ctx, &mut eng, &id, topic).await?;
    }
    persist_and_publish(ctx, &mut eng, Instant::now()).await?;
    Ok(Action::await_change())
}

/// Reconciles one Mesh: its Secrets, status and, on deletion, every node's retained config.
pub(crate) async fn reconcile_mesh(mesh: Arc<Mesh>, ctx: Arc<Ctx>) -> Result<Action, KubeError> {
    ctx.metrics.reconciled("Mesh");
    let ns = ns_of(&*mesh);
    let api: Api<Mesh> = Api::namespaced(ctx.client.clone(), &ns);
    let key = key_of("Mesh", &ns, &mesh.name_any());
    let action = finalizer(&api, FINALIZER, mesh, |ev| async {
        match ev {
            finalizer::Event::Apply(m) => apply_mesh(&ctx, &m).await,
            finalizer::Event::Cleanup(m) => cleanup_mesh(&ctx, &m).await,
        }
    })
    .await
    .map_err(finalizer_err)?;
    succeeded(&ctx, &key);
    Ok(action)
}

async fn apply_mesh(ctx: &Ctx, mesh: &Mesh) -> Result<Action, KubeError> {
    let started = Instant::now();
    let loaded = super::state::load_mesh_secrets(&ctx.client, mesh).await;
    let mut problems = Vec::new();
    if let Err(e) = &loaded.key {
        problems.push(("SigningKeyMissing".to_string(), e.clone()));
    }
    if let Err(e) = &loaded.passphrase {
        problems.push(("PassphraseMissing".to_string(), e.clone()));
    }
    let changed = ctx
        .secrets
        .lock()
        .map(|mut c| c.put(mesh, loaded))
        .unwrap_or(false);
    let engine = ctx.engine().await?;
    let mut eng = engine.lock().await;
    if changed {
        eng.force = true;
    }
    sync(ctx, &mut eng).await?;
    persist_and_publish(ctx, &mut eng, started).await?;
    let ns = ns_of(mesh);
    let name = mesh.name_any();
    if let Some(e) = eng.invalid.get(&key_of("Mesh", &ns, &name)) {
        problems.push(("InvalidSpec".to_string(), e.clone()));
    }
    let reference = mesh.object_ref(&());
    for (reason, msg) in &problems {
        if reason != "InvalidSpec" {
            ctx.warn_once(&mut eng, &reference, reason, msg.clone())
                .await;
        }
    }
    let net = network_name(mesh).to_string();
    let public_key = ctx.secrets.lock().ok().and_then(|c| c.public_key(&net));
    let facts = MeshFacts {
        public_key,
        problems,
        nodes: u32::try_from(
            eng.ctl
                .store
                .nodes
                .values()
                .filter(|r| r.mesh == net)
                .count(),
        )
        .unwrap_or(u32::MAX),
        epoch: eng.ctl.store.epoch,
        highest_revision: eng.high_water.get(&net).copied().unwrap_or(0),
    };
    let mut new = status::mesh_status(mesh, &facts);
    let old = ctx.mesh_obj(&ns, &name).and_then(|m| m.status.clone());
    status::carry_transitions(
        &mut new.conditions,
        old.as_ref().map(|o| o.conditions.as_slice()).unwrap_or(&[]),
        crate::now(),
    );
    if old.as_ref() != Some(&new) {
        let api: Api<Mesh> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": new})),
        )
        .await?;
    }
    update_phases(ctx, &mut eng);
    // A broken Secret is re-read soon (Secrets are not watched: the RBAC grants no watch).
    let again = if facts.problems.is_empty() {
        ctx.opts.refresh
    } else {
        ctx.opts.refresh.min(Duration::from_secs(10))
    };
    Ok(Action::requeue(again))
}

async fn cleanup_mesh(ctx: &Ctx, mesh: &Mesh) -> Result<Action, KubeError> {
    let engine = ctx.engine().await?;
    let mut eng = engine.lock().await;
    let net = network_name(mesh).to_string();
    let name = mesh.name_any();
    let mut ids: BTreeSet<String> = eng
        .topics
        .iter()
        .filter(|(_, t)| t.split('/').nth(2) == Some(net.as_str()))
        .map(|(id, _)| id.clone())
        .collect();
    ids.extend(
        eng.ctl
            .store
            .nodes
            .iter()
            .filter(|(_, r)| r.mesh == net)
            .map(|(id, _)| id.clone()),
    );
    ids.extend(
        ctx.nodes
            .state()
            .iter()
            .filter(|n| n.spec.mesh == name && ns_of(&***n) == ns_of(mesh))
            .map(|n| n.spec.node_id.clone()),
    );
    for id in ids {
        let topic = topics::config(&net, &id);
        clear_node(ctx, &mut eng, &id, Some(topic)).await?;
    }
    if ctx.connected.load(Ordering::SeqCst) {
        for topic in topics::announce_all(&net) {
            ctx.send(Publish {
                topic,
                payload: Vec::new(),
                retain: true,
            })
            .await?;
        }
    }
    eng.force = true;
    persist_and_publish(ctx, &mut eng, Instant::now()).await?;
    Ok(Action::await_change())
}

/// HardwareProfiles have no status: a change re-reconciles the nodes (through the MeshNode
/// controller's watch) and the set here.
pub(crate) async fn reconcile_profile(
    _profile: Arc<HardwareProfile>,
    ctx: Arc<Ctx>,
) -> Result<Action, KubeError> {
    ctx.metrics.reconciled("HardwareProfile");
    let engine = ctx.engine().await?;
    let mut eng = engine.lock().await;
    sync(&ctx, &mut eng).await?;
    persist_and_publish(&ctx, &mut eng, Instant::now()).await?;
    Ok(Action::await_change())
}

/// MeshNodes to re-reconcile when a Mesh changes.
pub(crate) fn nodes_of_mesh(nodes: &Store<MeshNode>, mesh: &Mesh) -> Vec<ObjectRef<MeshNode>> {
    let ns = ns_of(mesh);
    let name = mesh.name_any();
    nodes
        .state()
        .iter()
        .filter(|n| n.spec.mesh == name && ns_of(&***n) == ns)
        .map(|n| ObjectRef::from_obj(&**n))
        .collect()
}

/// MeshNodes to re-reconcile when a HardwareProfile changes: those naming it and those that
/// name none (matched by board).
pub(crate) fn nodes_of_profile(
    nodes: &Store<MeshNode>,
    p: &HardwareProfile,
) -> Vec<ObjectRef<MeshNode>> {
    let name = p.name_any();
    nodes
        .state()
        .iter()
        .filter(|n| n.spec.hardware_profile.as_deref().is_none_or(|h| h == name))
        .map(|n| ObjectRef::from_obj(&**n))
        .collect()
}

/// What the MQTT task hands over.
#[derive(Debug)]
pub(crate) enum MqttEvent {
    Connected,
    Disconnected,
    Message(String, Vec<u8>),
}

/// Handles broker (re)connections, enrolments and status reports.
pub(crate) async fn mqtt_loop(ctx: Arc<Ctx>, mut rx: crate::transport::inbox::Receiver<MqttEvent>) {
    while let Some(ev) = rx.recv().await {
        let engine = match ctx.engine().await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("{e}");
                continue;
            }
        };
        let mut eng = engine.lock().await;
        if let Err(e) = handle_mqtt(&ctx, &mut eng, ev).await {
            tracing::error!("{e}");
        }
    }
}

async fn handle_mqtt(ctx: &Ctx, eng: &mut Engine, ev: MqttEvent) -> Result<(), KubeError> {
    let started = Instant::now();
    match ev {
        MqttEvent::Disconnected => {
            ctx.connected.store(false, Ordering::SeqCst);
            ctx.metrics.ready.store(false, Ordering::SeqCst);
        }
        MqttEvent::Connected => {
            for f in topics::controller_filters("+") {
                ctx.mqtt
                    .subscribe(f, QoS::AtLeastOnce)
                    .await
                    .map_err(|e| KubeError::Other(format!("MQTT subscribe: {e}")))?;
            }
            ctx.connected.store(true, Ordering::SeqCst);
            if let Err(e) = sync(ctx, eng).await {
                tracing::error!("{e}");
            }
            if let Err(e) = ctx.credentials.on_connected(&mut eng.ctl) {
                tracing::error!("broker credentials: {e}");
            }
            let mut out = eng.ctl.announcements(crate::now())?;
            let held = eng.held.clone();
            out.extend(eng.ctl.stored_configs()?.into_iter().filter(|p| {
                config_node(&p.topic).is_some_and(|id| {
                    !held.contains(&id)
                        && eng
                            .ctl
                            .store
                            .published
                            .get(&id)
                            .is_some_and(|r| !r.sha256.is_empty())
                })
            }));
            tracing::info!(
                "connected to the MQTT broker; publishing announcements and {} configs",
                out.len()
            );
            ctx.connected.store(true, Ordering::SeqCst);
            let configs = out
                .iter()
                .filter(|p| config_node(&p.topic).is_some())
                .count();
            for p in out {
                ctx.send(p).await?;
            }
            ctx.metrics
                .published
                .fetch_add(configs as u64, Ordering::Relaxed);
            persist_and_publish(ctx, eng, started).await?;
            ctx.metrics.ready.store(true, Ordering::SeqCst);
        }
        MqttEvent::Message(topic, payload) if topic == crate::transport::dynsec::RESPONSE_TOPIC => {
            for e in crate::transport::dynsec::response_errors(&payload) {
                tracing::error!("Mosquitto dynamic security: {e}");
            }
            if let Err(e) = ctx.credentials.on_response(&payload) {
                tracing::error!("broker credentials: {e}");
            }
        }
        MqttEvent::Message(topic, payload) => {
            let parsed = topics::parse(&topic);
            let (mesh, node, enroll) = match parsed {
                Some(Incoming::Enroll { mesh, node }) => (mesh.to_string(), node.to_string(), true),
                Some(Incoming::Status { mesh, node }) | Some(Incoming::Online { mesh, node }) => {
                    (mesh.to_string(), node.to_string(), false)
                }
                None => return Ok(()),
            };
            if enroll {
                sync(ctx, eng).await?;
                if !eng.seeded.contains(&node) && !eng.ctl.store.published.contains_key(&node) {
                    let hw = eng.high_water.get(&mesh).copied().unwrap_or(0);
                    seed_revision(eng, &node, &mesh, hw);
                    eng.seeded.insert(node.clone());
                }
            }
            let before = eng.ctl.counters;
            eng.ctl.on_message(&topic, &payload, crate::now())?;
            let after = eng.ctl.counters;
            ctx.metrics
                .enrolled
                .fetch_add(after.enrolled - before.enrolled, Ordering::Relaxed);
            ctx.metrics.rejected.fetch_add(
                after.rejected_messages - before.rejected_messages,
                Ordering::Relaxed,
            );
            if enroll
                && (eng.ctl.store.nodes.contains_key(&node) || eng.ctl.pending.get(&node).is_some())
                && !eng.node_objs.contains_key(&node)
            {
                create_meshnode(ctx, eng, &node).await?;
            }
            delete_evicted(ctx, eng).await;
            persist_and_publish(ctx, eng, started).await?;
            if let Some((ns, name)) = eng.node_objs.get(&node).cloned()
                && let Some(obj) = ctx.node_obj(&ns, &name)
            {
                write_status(ctx, eng, &obj).await?;
            }
            update_phases(ctx, eng);
        }
    }
    Ok(())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The MeshNodes made for nodes pushed out of a full waiting list (crate::reconcile::pending),
/// while still unapproved, are deleted: an enrolment flood leaves at most the list's bound of
/// them.
async fn delete_evicted(ctx: &Ctx, eng: &mut Engine) {
    for (_, id) in eng.ctl.take_pending_evictions() {
        let Some((ns, name)) = eng.node_objs.get(&id).cloned() else {
            continue;
        };
        let Some(obj) = ctx.node_obj(&ns, &name) else {
            continue;
        };
        let ours = obj
            .labels()
            .get("app.kubernetes.io/managed-by")
            .is_some_and(|v| v == "sidenet-controller");
        if !ours || obj.spec.approved {
            continue;
        }
        let api: Api<MeshNode> = Api::namespaced(ctx.client.clone(), &ns);
        match api.delete(&name, &Default::default()).await {
            Ok(_) => {
                eng.node_objs.remove(&id);
            }
            Err(e) => {
                tracing::warn!(node = %id, "cannot delete MeshNode {ns}/{name} of a node pushed out of the waiting list: {e}")
            }
        }
    }
}

/// A node enrolled without a MeshNode: create one, owned by its Mesh (pending in approval
/// mode until `spec.approved` is set).
async fn create_meshnode(ctx: &Ctx, eng: &mut Engine, id: &str) -> Result<(), KubeError> {
    // A node waiting for approval has no record: its MeshNode is made from its request.
    let waiting = eng.ctl.pending.get(id).map(|p| NodeRecord {
        approved: false,
        ..p.approved_record()
    });
    let Some(rec) = eng.ctl.store.nodes.get(id).cloned().or(waiting) else {
        return Ok(());
    };
    let Some((ns, mesh_name)) = eng.mesh_objs.get(&rec.mesh).cloned() else {
        return Ok(());
    };
    let Some(mesh) = ctx.mesh_obj(&ns, &mesh_name) else {
        return Ok(());
    };
    let host = rec.hostname.to_ascii_lowercase();
    let taken = |n: &str| ctx.node_obj(&ns, n).is_some();
    let short = &id[..id.len().min(6)];
    let name = if valid_name(&host) && !taken(&host) {
        host
    } else if valid_name(&format!("{host}-{short}")) && !taken(&format!("{host}-{short}")) {
        format!("{host}-{short}")
    } else {
        id.to_string()
    };
    let profile = rec
        .profile
        .clone()
        .filter(|p| eng.ctl.set.profiles.contains_key(p));
    let mut node = MeshNode::new(
        &name,
        MeshNodeSpec {
            mesh: mesh_name.clone(),
            node_id: id.to_string(),
            public_key: Some(rec.public_key.clone()),
            hardware_profile: profile,
            role: Default::default(),
            approved: false,
            overrides: NodeOverrides::default(),
        },
    );
    node.metadata.namespace = Some(ns.clone());
    node.metadata.labels = Some(BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            "sidenet-controller".to_string(),
        ),
        ("sidenet.io/mesh".to_string(), mesh_name.clone()),
    ]));
    node.metadata.owner_references = Some(vec![OwnerReference {
        api_version: API_VERSION.into(),
        kind: "Mesh".into(),
        name: mesh_name.clone(),
        uid: mesh.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    let api: Api<MeshNode> = Api::namespaced(ctx.client.clone(), &ns);
    match api.create(&PostParams::default(), &node).await {
        Ok(created) => {
            tracing::info!(node = %id, "created MeshNode {ns}/{name} for the enrolled node");
            let pending = !crate::reconcile::admission::approved(&mesh, None, Some(&rec));
            let note = if pending {
                format!(
                    "node {id} ({}) enrolled and waits for approval: kubectl patch meshnode {name} -n {ns} --type merge -p '{{\"spec\":{{\"approved\":true}}}}'",
                    rec.hostname
                )
            } else {
                format!("node {id} ({}) enrolled", rec.hostname)
            };
            ctx.event(
                &created.object_ref(&()),
                EventType::Normal,
                "Enrolled",
                note,
            )
            .await;
            eng.node_objs.insert(id.to_string(), (ns, name));
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
