//! From the watch caches to the core: the validated set, and what the cluster remembers.
//!
//! The core ([`Controller`](crate::reconcile::core::Controller)) works on a validated [`ManifestSet`]; here that set is rebuilt
//! from the watch caches whenever an object's spec changed (a signature over uid, generation
//! and deletion of every object, per namespace), each changed namespace validated on its own
//! with the standalone loader (JSON Schema + semantic checks), the namespaces merged
//! ([`super::tenancy`]), and handed to the core, which re-renders only the nodes whose inputs
//! changed.
//! Unlike standalone mode, one bad object does not freeze everything: it is replaced by its
//! last good version (or left out when it never had one), gets a `Warning` Event and an
//! `InvalidSpec` condition, and the rest of the set goes ahead.
//!
//! Durable facts are written to the cluster *before* a config is published: the node's
//! revision, body hash and subnet in its MeshNode status, the mesh's highest revision in its
//! Mesh status. A node whose status write fails keeps its new config held back and retried.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use sidenet_crds::{API_VERSION, MeshNode};
use sidenet_wire::topics::{self};
use sidenet_wire::{Envelope, Kind, Revision};

use super::engine::{Ctx, Engine, deleting, key_of, ns_of};
use super::options::KubeError;
use super::sigbook::{self, Signatures};
use super::tenancy::{self, Claims, Validated};
use crate::reconcile::store::{Batch, NodeRecord, Published};
use crate::spec::manifest::{self, ManifestSet, network_name};

/// The manifest form of an object: what the standalone loader validates. Its labels come
/// along: policies select nodes by them, and a MeshNode the controller created for an enrolled
/// node is told apart by `app.kubernetes.io/managed-by` (it gets no DNS name of its own,
/// `crate::spec::names::node_label`).
pub(crate) fn manifest_text<S: serde::Serialize>(
    kind: &str,
    meta: &ObjectMeta,
    spec: &S,
) -> String {
    /// Written straight to text, without a `serde_json::Value` in between: at 10,000
    /// MeshNodes the values of one sync took more memory than the objects themselves.
    #[derive(serde::Serialize)]
    struct Doc<'a, S> {
        #[serde(rename = "apiVersion")]
        api_version: &'a str,
        kind: &'a str,
        metadata: Meta<'a>,
        spec: &'a S,
    }
    #[derive(serde::Serialize)]
    struct Meta<'a> {
        name: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        labels: Option<&'a BTreeMap<String, String>>,
    }
    let doc = Doc {
        api_version: API_VERSION,
        kind,
        metadata: Meta {
            name: meta.name.as_deref().unwrap_or_default(),
            labels: meta.labels.as_ref().filter(|l| !l.is_empty()),
        },
        spec,
    };
    serde_json::to_string(&doc).unwrap_or_default()
}

/// Validates `objs` (one namespace's Meshes and MeshNodes, and every HardwareProfile) with the
/// standalone loader. An object with an error is replaced by its last good version, or left
/// out when it has none, until what is left validates.
pub(crate) fn validate(
    objs: &BTreeMap<String, String>,
    last_good: &mut BTreeMap<String, String>,
    cache: &mut manifest::ParseCache,
) -> Option<Validated> {
    let mut current = objs.clone();
    let mut fallback = BTreeSet::new();
    let mut invalid: BTreeMap<String, String> = BTreeMap::new();
    let mut set = None;
    for _ in 0..12 {
        let texts: Vec<(PathBuf, String)> = current
            .iter()
            .map(|(k, v)| (PathBuf::from(k), v.clone()))
            .collect();
        match manifest::load_texts_cached(&texts, cache) {
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
                    match last_good.get(&key) {
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
    let set = set?;
    for (k, v) in &current {
        if !fallback.contains(k) {
            last_good.insert(k.clone(), v.clone());
        }
    }
    Some(Validated {
        signature: None,
        set,
        invalid,
        fallback,
    })
}

/// Rebuilds the set when an object changed, then reconciles every node (the core renders only
/// those whose inputs changed).
///
/// Each namespace is validated on its own (a MeshNode's `spec.mesh` names a Mesh of its own
/// namespace), and again only when one of its objects or a HardwareProfile changed; the
/// namespaces' sets are then merged ([`tenancy::merge`]: one owner per mesh name, network name
/// and node id).
pub(crate) async fn sync(ctx: &Ctx, eng: &mut Engine) -> Result<(), KubeError> {
    let sigs = ctx.signatures();
    if sigs.total == eng.signature && !eng.force {
        return Ok(());
    }
    resync(ctx, eng, sigs).await
}

/// How long a change whose own object's reconcile did not sync (a MeshNode deleted before it
/// had a finalizer, a label the predicates do not watch) may wait for the next sync.
pub(crate) const SYNC_LAG: std::time::Duration = std::time::Duration::from_secs(2);

/// [`sync`] for the reconcile of one object (`KIND/NS/NAME` and its metadata): when the set
/// already holds that object as it is now, the sync is skipped unless something must be
/// taken in anyway (`force`), or another object changed and the last sync is older than
/// [`SYNC_LAG`].
///
/// This is what keeps an enrolment storm O(n): the reconciles of the MeshNodes that arrived
/// while one sync ran find themselves in the set that sync built, so n arrivals cost as many
/// syncs as there are batches, not n (docs/benchmarks.md, Kubernetes mode).
pub(crate) async fn sync_for(
    ctx: &Ctx,
    eng: &mut Engine,
    key: &str,
    meta: &ObjectMeta,
) -> Result<(), KubeError> {
    let kind = key.split('/').next().unwrap_or_default();
    let reflected = eng.synced_rows.get(key) == Some(&sigbook::row(kind, meta));
    if reflected && !eng.force {
        let lagging = eng.synced_at.is_none_or(|t| t.elapsed() >= SYNC_LAG);
        let sigs = ctx.signatures();
        if sigs.total == eng.signature || !lagging {
            return Ok(());
        }
        return resync(ctx, eng, sigs).await;
    }
    sync(ctx, eng).await
}

async fn resync(ctx: &Ctx, eng: &mut Engine, sigs: Signatures) -> Result<(), KubeError> {
    eng.signature = sigs.total;
    eng.force = false;
    let started = std::time::Instant::now();
    eng.synced_at = Some(started);
    // Until this sync completes, no object counts as in the set.
    eng.synced_rows.clear();
    let now = crate::now();
    let mut rows: std::collections::HashMap<String, u64> = std::collections::HashMap::new();

    let mut profiles: BTreeMap<String, String> = BTreeMap::new();
    let mut by_ns: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut refs: BTreeMap<String, ObjectReference> = BTreeMap::new();
    let mut created: BTreeMap<String, Timestamp> = BTreeMap::new();
    let mut leaving = Claims::default();
    let mut deleting_meshes = BTreeSet::new();
    for m in ctx.meshes.state() {
        let (ns, name) = (ns_of(&*m), m.name_any());
        rows.insert(
            key_of("Mesh", &ns, &name),
            sigbook::row("Mesh", &m.metadata),
        );
        if deleting(&*m) {
            if eng.claims.owns_mesh(&ns, &name) {
                leaving.mesh_names.insert(name.clone(), ns.clone());
                leaving
                    .networks
                    .insert(network_name(&m).to_string(), (ns.clone(), name.clone()));
            }
            deleting_meshes.insert((ns, name));
            continue;
        }
        let key = key_of("Mesh", &ns, &name);
        if let Some(t) = &m.metadata.creation_timestamp {
            created.insert(key.clone(), t.0);
        }
        by_ns
            .entry(ns)
            .or_default()
            .insert(key.clone(), manifest_text("Mesh", &m.metadata, &m.spec));
        refs.insert(key, m.object_ref(&()));
    }
    for p in ctx.profiles.state() {
        let key = key_of("HardwareProfile", "", &p.name_any());
        rows.insert(key.clone(), sigbook::row("HardwareProfile", &p.metadata));
        profiles.insert(
            key.clone(),
            manifest_text("HardwareProfile", &p.metadata, &p.spec),
        );
        refs.insert(key, p.object_ref(&()));
    }
    let mut going = Vec::new();
    // One snapshot of the MeshNodes for the whole sync: the reflector goes on filling the
    // cache meanwhile, and a node that arrived after the set was built must not look refused
    // by the merge (below), nor be seeded from an object the set does not hold.
    let nodes = ctx.nodes.state();
    for n in nodes.iter().cloned() {
        let (ns, name) = (ns_of(&*n), n.name_any());
        rows.insert(
            key_of("MeshNode", &ns, &name),
            sigbook::row("MeshNode", &n.metadata),
        );
        let id = &n.spec.node_id;
        if deleting(&*n) || deleting_meshes.contains(&(ns.clone(), n.spec.mesh.clone())) {
            // Only the owner of a node id takes the node with it.
            if eng.claims.owns_node(id, &ns, &name) {
                leaving.nodes.insert(id.clone(), (ns, name));
                going.push(id.clone());
            }
            continue;
        }
        let key = key_of("MeshNode", &ns, &name);
        if let Some(t) = &n.metadata.creation_timestamp {
            created.insert(key.clone(), t.0);
        }
        by_ns
            .entry(ns)
            .or_default()
            .insert(key.clone(), manifest_text("MeshNode", &n.metadata, &n.spec));
        refs.insert(key, n.object_ref(&()));
    }
    // Nodes on their way out are not reconciled again; their finalizer clears their topic.
    for id in going {
        if eng.ctl.store.nodes.contains_key(&id) || eng.ctl.store.published.contains_key(&id) {
            eng.ctl.forget(&id, now)?;
        }
    }

    // Validate each namespace whose objects (or the profiles) changed.
    if by_ns.is_empty() {
        // Profiles alone: the core still learns them.
        by_ns.insert(String::new(), BTreeMap::new());
    }
    eng.namespaces.retain(|ns, _| by_ns.contains_key(ns));
    eng.parse_cache.retain(|ns, _| by_ns.contains_key(ns));
    let mut all_keys: BTreeSet<String> = profiles.keys().cloned().collect();
    for (ns, objs) in &by_ns {
        all_keys.extend(objs.keys().cloned());
        let sig = sigs.namespace(ns);
        if eng
            .namespaces
            .get(ns)
            .is_some_and(|v| v.signature == Some(sig))
        {
            continue;
        }
        let mut texts = objs.clone();
        texts.extend(profiles.iter().map(|(k, v)| (k.clone(), v.clone())));
        let cache = eng.parse_cache.entry(ns.clone()).or_default();
        match validate(&texts, &mut eng.last_good, cache) {
            Some(mut v) => {
                v.signature = Some(sig);
                eng.namespaces.insert(ns.clone(), v);
            }
            None => {
                // Keep the namespace's last set; validate again at the next sync.
                tracing::error!(
                    namespace = %ns,
                    "the objects of namespace {ns:?} could not be validated into a usable set; keeping its last one"
                );
                eng.force = true;
                if let Some(v) = eng.namespaces.get_mut(ns) {
                    v.signature = None;
                }
            }
        }
    }
    eng.last_good.retain(|k, _| all_keys.contains(k));

    // Borrowed, not cloned: a copy of every namespace's set was one more copy of every object.
    let sets: BTreeMap<String, &ManifestSet> = eng
        .namespaces
        .iter()
        .map(|(ns, v)| (ns.clone(), &v.set))
        .collect();
    let enrolled = eng
        .ctl
        .store
        .nodes
        .iter()
        .map(|(id, r)| (id.clone(), r.mesh.clone()))
        .collect();
    let merged = tenancy::merge(
        &sets,
        &tenancy::Context {
            held: Some(&eng.claims),
            leaving,
            created,
            enrolled,
        },
    );
    let mut invalid: BTreeMap<String, String> = BTreeMap::new();
    let mut fallback: BTreeSet<String> = BTreeSet::new();
    for v in eng.namespaces.values() {
        for (k, m) in &v.invalid {
            invalid.entry(k.clone()).or_insert_with(|| m.clone());
        }
        fallback.extend(v.fallback.iter().cloned());
    }
    for (k, why) in &merged.refused {
        invalid.insert(k.clone(), why.clone());
        fallback.remove(k);
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
    let set = merged.set;
    eng.claims = merged.claims;
    // A MeshNode the merge left out (an invalid spec) still shows its node's state when it is
    // in the namespace the node enrolled into.
    for n in nodes.iter().cloned() {
        let (ns, name) = (ns_of(&*n), n.name_any());
        let id = &n.spec.node_id;
        if deleting(&*n) || eng.claims.nodes.contains_key(id) {
            continue;
        }
        let home = eng
            .ctl
            .store
            .nodes
            .get(id)
            .and_then(|r| eng.claims.networks.get(&r.mesh))
            .is_some_and(|(owner_ns, _)| *owner_ns == ns);
        if home {
            eng.claims.nodes.insert(id.clone(), (ns, name));
        }
    }
    let mut batch = Batch::default();
    for n in nodes.iter().cloned() {
        let (ns, name) = (ns_of(&*n), n.name_any());
        if set.nodes.contains_key(&n.spec.node_id)
            && eng.claims.owns_node(&n.spec.node_id, &ns, &name)
            && !deleting(&*n)
        {
            seed(eng, &mut batch, &set, &n, now, ctx.opts.broker.is_some());
        }
    }
    eng.ctl.store.commit(batch)?;
    // A node held for the MeshNode made at its enrolment (kubernetes::mqtt) whose MeshNode is
    // here but left out of the set (refused by the merge): rendered from its record, as
    // before it had one.
    for n in nodes.iter().cloned() {
        let id = &n.spec.node_id;
        if eng.ctl.awaits_manifest(id) && !set.nodes.contains_key(id) {
            eng.ctl.manifest_not_coming(id);
        }
    }
    let (meshes, nodes, profiles) = (set.meshes.len(), set.nodes.len(), set.profiles.len());
    let loaded = started.elapsed();
    if let Err(e) = eng.ctl.set_manifests(set, now) {
        // Try again at the next reconcile instead of waiting for another change.
        eng.force = true;
        return Err(e.into());
    }
    tracing::info!(
        meshes,
        nodes,
        profiles,
        invalid = eng.invalid.len(),
        load_ms = loaded.as_millis() as u64,
        reconcile_ms = (started.elapsed() - loaded).as_millis() as u64,
        "objects loaded"
    );
    eng.synced = true;
    eng.synced_rows = rows;
    Ok(())
}

/// Puts what the cluster remembers about a node into the core, once per node and process:
/// its revision (so the next one continues the sequence), subnet and enrolment. With an
/// external broker (`external`), whose retained configs outlive this process, also the last
/// config's digest and validity ([`restored`]), so that an unchanged config is not published
/// again; the embedded broker starts empty with the process, so every config is signed anew.
pub(crate) fn seed(
    eng: &mut Engine,
    batch: &mut Batch,
    set: &ManifestSet,
    node: &MeshNode,
    now: u64,
    external: bool,
) {
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
        // With the embedded broker, only with the envelope's exact bytes (republished at once).
        let found = restored(&st, epoch).and_then(|p| match external {
            true => Some((p, None)),
            false => {
                let mut p = p;
                kept_envelope(&st, &mut p, &net, &id).map(|e| (p, Some(e)))
            }
        });
        match found {
            Some((p, None)) => {
                eng.ctl.store.published.insert(id.clone(), p);
                eng.topics.insert(id.clone(), topics::config(&net, &id));
            }
            Some((p, Some(envelope))) => {
                eng.ctl.store.put_published(batch, &id, p, envelope);
                eng.topics.insert(id.clone(), topics::config(&net, &id));
            }
            None => {
                let counter = match (st.desired_epoch, st.desired_revision) {
                    (Some(e), Some(r)) if e == epoch => r,
                    _ => eng.high_water.get(&net).copied().unwrap_or(0),
                };
                seed_revision(eng, &id, &net, counter);
            }
        }
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

/// The node's last published config as its status recorded it (docs/helm.md, "Restarts"):
/// revision, body digest and validity window, when all are there and of the current epoch.
/// The core then renders the node's config; when the body has the same digest and the config
/// is not due for re-signing, it publishes nothing: the broker still retains that revision.
/// The fingerprint of the inputs is left empty, so the config is always rendered once to
/// compare.
pub(crate) fn restored(st: &sidenet_crds::MeshNodeStatus, epoch: u64) -> Option<Published> {
    let (Some(e), Some(rev), Some(sha), Some(iat), Some(exp)) = (
        st.desired_epoch,
        st.desired_revision,
        st.config_sha256.as_ref(),
        st.config_issued_at,
        st.config_expires_at,
    ) else {
        return None;
    };
    if e != epoch || rev == 0 || sha.len() != 64 || exp <= iat {
        return None;
    }
    Some(Published {
        revision: Revision { epoch, rev },
        sha256: sha.clone(),
        input: String::new(),
        iat,
        exp,
        // Signed by the mesh's key as the Secret holds it; after a rotation the core re-signs.
        signer: None,
    })
}

/// The envelope `status.configEnvelope` holds, when it is the one of `p` for node `id` of
/// network `net`: a config, signed (by the key it names: `p.signer` is set to it, so a mesh
/// key rotated since is noticed and the config re-signed), with the recorded header and body.
pub(crate) fn kept_envelope(
    st: &sidenet_crds::MeshNodeStatus,
    p: &mut Published,
    net: &str,
    id: &str,
) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(st.config_envelope.as_deref()?)
        .ok()?;
    let env = Envelope::parse(&bytes, crate::transport::broker::MAX_PACKET).ok()?;
    let v = env.verify_self_signed(Kind::Config).ok()?;
    let h = &v.header;
    let matches = h.mesh == net
        && h.node.as_deref() == Some(id)
        && h.revision() == p.revision
        && h.iat == p.iat
        && h.exp == p.exp
        && h.sha256 == p.sha256;
    p.signer = Some(v.signer.to_base64());
    matches.then_some(bytes)
}

/// Records revision `counter` as the node's last one, without its envelope: the core then
/// signs the node's next config as `counter + 1` (it has no bytes to republish under
/// `counter`, and one revision must never carry two payloads).
pub(crate) fn seed_revision(eng: &mut Engine, id: &str, net: &str, counter: u64) {
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
