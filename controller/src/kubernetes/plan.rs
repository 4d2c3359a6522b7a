//! `sidenetctl plan --kubeconfig`: what putting a manifest folder in force in one namespace of
//! a cluster that runs Kubernetes mode would publish (docs/rollouts.md, "Kubernetes mode").
//!
//! The running controller's state is rebuilt the way a starting controller rebuilds it, by the
//! same code (`sync::validate`, `sync::seed`, the core's [`Controller`]):
//! the namespace's Meshes and MeshNodes and every HardwareProfile validated into the set in
//! force, each node's published revision, digest, envelope (`status.configEnvelope`), subnet
//! and enrolment from its MeshNode status, the state epoch and each mesh's highest revision from
//! the status. Then the core plans the folder's set against it
//! ([`Controller::plan_changes`]). Everything happens in a throwaway engine over a temporary
//! database: nothing in the cluster is written, no Secret is created.
//!
//! The folder replaces the namespace's sidenet objects, as `kubectl apply --prune` of the
//! folder would:
//! - its Meshes and MeshNodes are the namespace's; a Mesh or MeshNode of the namespace that is
//!   not in the folder is deleted: its nodes are planned as removed. A MeshNode the controller
//!   made for a node that enrolled (label `app.kubernetes.io/managed-by: sidenet-controller`)
//!   stays, unless the folder holds a MeshNode of that name or node id, or its Mesh is not in
//!   the folder;
//! - HardwareProfiles are cluster-scoped: the cluster's stay, and one in the folder (or in
//!   `--profiles`) replaces the cluster's of the same name;
//! - a `Secret` in the folder replaces the namespace's Secret of that name (the passphrases).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use sidenet_crds::{HardwareProfile, Mesh, MeshNode, SecretKeyRef};
use sidenet_wire::keys::KeyPair;

use super::engine::{Engine, key_of};
use super::state::{KubeSecrets, Loaded, SecretCache, passphrase_in, signing_key_secret};
use super::sync::{kept_envelope, manifest_text, restored, seed, validate};
use crate::reconcile::core::{Controller, pending_reason};
use crate::reconcile::diff::{PlanReport, RemovedNode};
use crate::reconcile::render::Renderer;
use crate::reconcile::store::{Batch, Store};
use crate::spec::manifest::{self, ManifestSet, network_name};

/// The label of the MeshNodes the controller makes for nodes that enrolled.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// The reason given to a node whose published content could not be rebuilt.
pub const UNKNOWN_CONTENT: &str = "the published config is not known here (its digest, MeshNode status.configSha256, is not that of the config the cluster's objects give now, and the status keeps no usable configEnvelope): the whole new config is shown";

/// What the folder declares, by kind: names, and the node ids of its MeshNodes.
#[derive(Debug, Default)]
struct Declared {
    meshes: BTreeSet<String>,
    node_names: BTreeSet<String>,
    node_ids: BTreeSet<String>,
    profiles: BTreeSet<String>,
}

impl Declared {
    fn of(texts: &[(PathBuf, String)]) -> Self {
        let mut d = Declared::default();
        for (_, text) in texts {
            for doc in sidenet_crds::yaml::documents(text).into_iter().flatten() {
                let name = doc["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match doc["kind"].as_str() {
                    Some("Mesh") => {
                        d.meshes.insert(name);
                    }
                    Some("MeshNode") => {
                        if let Some(id) = doc["spec"]["nodeId"].as_str() {
                            d.node_ids.insert(id.to_string());
                        }
                        d.node_names.insert(name);
                    }
                    Some("HardwareProfile") => {
                        d.profiles.insert(name);
                    }
                    _ => {}
                }
            }
        }
        d
    }
}

fn live<K: kube::Resource>(o: &K) -> bool {
    o.meta().deletion_timestamp.is_none()
}

/// The plan of the manifests in `files` (the folder, and hardware profile folders) for
/// namespace `ns`, rendered with the templates of `templates` (those of the controller's
/// version).
pub async fn plan(
    client: &Client,
    ns: &str,
    files: &[PathBuf],
    templates: &Path,
) -> Result<PlanReport, String> {
    let now = crate::now();
    let folder = manifest::read_texts(files).map_err(|e| e.to_string())?;
    let declared = Declared::of(&folder);
    let renderer = Renderer::load(templates).map_err(|e| e.to_string())?;
    let lp = ListParams::default();
    let meshes: Vec<Mesh> = Api::<Mesh>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .map_err(|e| format!("listing Meshes in {ns}: {e}"))?
        .items
        .into_iter()
        .filter(live)
        .collect();
    let nodes: Vec<MeshNode> = Api::<MeshNode>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .map_err(|e| format!("listing MeshNodes in {ns}: {e}"))?
        .items
        .into_iter()
        .filter(live)
        .collect();
    let profiles: Vec<HardwareProfile> = Api::<HardwareProfile>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| format!("listing HardwareProfiles: {e}"))?
        .items
        .into_iter()
        .filter(live)
        .collect();

    // The set in force: what the controller validated from the same objects (an object with
    // an error is left out: its last good version is the running controller's alone).
    let mut objs = BTreeMap::new();
    for m in &meshes {
        objs.insert(
            key_of("Mesh", ns, &m.name_any()),
            manifest_text("Mesh", &m.metadata, &m.spec),
        );
    }
    for n in &nodes {
        objs.insert(
            key_of("MeshNode", ns, &n.name_any()),
            manifest_text("MeshNode", &n.metadata, &n.spec),
        );
    }
    let mut profile_objs = BTreeMap::new();
    for p in &profiles {
        profile_objs.insert(
            p.name_any(),
            manifest_text("HardwareProfile", &p.metadata, &p.spec),
        );
    }
    for (name, v) in &profile_objs {
        objs.insert(key_of("HardwareProfile", "", name), v.clone());
    }
    let current = validate(&objs, &mut BTreeMap::new(), &mut Default::default())
        .map(|v| v.set)
        .ok_or_else(|| format!("the objects of namespace {ns} do not validate into a set"))?;

    // The set of the folder, with what stays of the cluster's.
    let mut texts = folder;
    for (name, v) in &profile_objs {
        if !declared.profiles.contains(name) {
            texts.push((
                PathBuf::from(key_of("HardwareProfile", "", name)),
                v.clone(),
            ));
        }
    }
    for n in &nodes {
        let ours = n
            .labels()
            .get(MANAGED_BY)
            .is_some_and(|v| v == "sidenet-controller");
        if ours
            && declared.meshes.contains(&n.spec.mesh)
            && !declared.node_names.contains(&n.name_any())
            && !declared.node_ids.contains(&n.spec.node_id)
        {
            texts.push((
                PathBuf::from(key_of("MeshNode", ns, &n.name_any())),
                manifest_text("MeshNode", &n.metadata, &n.spec),
            ));
        }
    }
    let next = manifest::load_texts(&texts).map_err(|e| e.to_string())?;

    // Secrets: the cluster's for the set in force, the folder's over them for the new set.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut throwaway = BTreeMap::new();
    let mut now_cache = SecretCache::default();
    for m in current.meshes.values() {
        let loaded = load(&secrets, ns, m, None, &mut throwaway).await?;
        now_cache.put(&in_ns(m, ns), loaded);
    }
    let mut next_cache = SecretCache::default();
    for m in next.meshes.values() {
        let loaded = load(&secrets, ns, m, Some(&next), &mut throwaway).await?;
        next_cache.put(&in_ns(m, ns), loaded);
    }
    let cache = Arc::new(Mutex::new(now_cache));

    // The engine as a controller starting now would build it.
    let epoch = meshes
        .iter()
        .filter_map(|m| m.status.as_ref()?.state_epoch)
        .chain(
            nodes
                .iter()
                .filter_map(|n| n.status.as_ref()?.desired_epoch),
        )
        .max()
        .unwrap_or(now);
    let mut high_water: BTreeMap<String, u64> = BTreeMap::new();
    for m in &meshes {
        if let Some(s) = &m.status
            && s.state_epoch == Some(epoch)
        {
            let h = high_water.entry(network_name(m).to_string()).or_insert(0);
            *h = (*h).max(s.highest_revision.unwrap_or(0));
        }
    }
    let dir = tempfile::tempdir().map_err(|e| format!("a temporary folder: {e}"))?;
    let store = Store::open(&dir.path().join("plan.redb"), epoch).map_err(|e| e.to_string())?;
    let ctl = Controller::new(store, renderer, Box::new(KubeSecrets(cache.clone())));
    let mut eng = Engine::new(ctl, high_water, Default::default());
    let mut batch = Batch::default();
    for n in &nodes {
        if current.nodes.contains_key(&n.spec.node_id) {
            // With the envelope when the status keeps a usable one (the embedded broker), else
            // with the digest alone (an external broker; an envelope that is not the recorded
            // revision's).
            let net = current
                .meshes
                .get(&n.spec.mesh)
                .map(|m| network_name(m).to_string())
                .unwrap_or_default();
            let kept = n.status.as_ref().is_some_and(|st| {
                restored(st, epoch)
                    .is_some_and(|mut p| kept_envelope(st, &mut p, &net, &n.spec.node_id).is_some())
            });
            seed(&mut eng, &mut batch, &current, n, now, !kept);
        }
    }
    // A node new in the folder starts above its mesh's highest revision, as when its MeshNode
    // appears.
    for n in next.nodes.values() {
        seed(&mut eng, &mut batch, &next, n, now, true);
    }
    eng.ctl.store.commit(batch).map_err(|e| e.to_string())?;
    // Why the controller blocks nodes now (their status), for "(as now)".
    for n in &nodes {
        let Some(st) = &n.status else {
            continue;
        };
        let id = n.spec.node_id.clone();
        if st.phase.as_deref() == Some("Pending") {
            eng.ctl.blocked.insert(id.clone(), pending_reason(&id));
        } else if let Some(c) = st
            .conditions
            .iter()
            .find(|c| c.type_ == "ConfigApplied" && c.reason == "Blocked")
        {
            eng.ctl.blocked.insert(id, c.message.clone());
        }
    }
    // The published content of nodes whose status keeps only its digest.
    eng.ctl.set = current.clone();
    let unknown = eng.ctl.adopt_published(now).map_err(|e| e.to_string())?;

    // Nodes whose MeshNode goes: forgotten, as their finalizer does.
    let mut removed = Vec::new();
    for n in &nodes {
        let id = &n.spec.node_id;
        if !current.nodes.contains_key(id) || next.nodes.contains_key(id) {
            continue;
        }
        removed.push(RemovedNode {
            node: id.clone(),
            name: n.name_any(),
            mesh: current
                .meshes
                .get(&n.spec.mesh)
                .map(|m| network_name(m).to_string())
                .unwrap_or_default(),
            published: eng
                .ctl
                .store
                .published
                .get(id)
                .filter(|p| !p.sha256.is_empty())
                .map(|p| p.revision),
        });
        eng.ctl.drop_node(id);
    }
    removed.sort_by(|a, b| a.node.cmp(&b.node));

    if let Ok(mut c) = cache.lock() {
        *c = next_cache;
    }
    let mut report = eng.ctl.plan_changes(next, now).map_err(|e| e.to_string())?;
    for c in &mut report.changes {
        if c.previous.is_some() && unknown.contains(&c.node) {
            c.reason = Some(UNKNOWN_CONTENT.to_string());
        }
    }
    report.summary.remove = Some(removed.len());
    report.removed = removed;
    Ok(report)
}

/// `m` with namespace `ns` (the folder's objects have none).
fn in_ns(m: &Mesh, ns: &str) -> Mesh {
    let mut m = m.clone();
    m.metadata.namespace = Some(ns.to_string());
    m
}

/// A Secret of the namespace, or `None` when it does not exist.
async fn get(api: &Api<Secret>, ns: &str, name: &str) -> Result<Option<Secret>, String> {
    api.get_opt(name)
        .await
        .map_err(|e| format!("cannot read Secret {ns}/{name}: {e}"))
}

/// The Secret the folder holds under `name`, as the cluster would store it.
fn folder_secret(set: &ManifestSet, name: &str) -> Option<Secret> {
    set.secrets.get(name).map(|data| Secret {
        string_data: Some(data.clone()),
        ..Default::default()
    })
}

/// A random value for what the controller would create (a signing key, a passphrase): the
/// same one for a name within one plan.
fn throwaway_value(made: &mut BTreeMap<String, String>, name: &str) -> Result<String, String> {
    if let Some(v) = made.get(name) {
        return Ok(v.clone());
    }
    let v = sidenet_wire::codec::base32(&crate::random::random32()?[..20]);
    made.insert(name.to_string(), v.clone());
    Ok(v)
}

/// The signing key and passphrases of `mesh`, read only: a Secret the controller would create
/// is stood in for by a throwaway value (a new mesh's nodes are all created anyway, and
/// passphrases are masked). `folder`: the set whose Secrets replace the namespace's.
async fn load(
    api: &Api<Secret>,
    ns: &str,
    mesh: &Mesh,
    folder: Option<&ManifestSet>,
    made: &mut BTreeMap<String, String>,
) -> Result<Loaded, String> {
    let name = mesh.name_any();
    let key_name = signing_key_secret(&name);
    let key = match get(api, ns, &key_name).await? {
        Some(s) => super::state::signing_key_in(&s, ns, &key_name),
        None => {
            let seed = throwaway_value(made, &format!("key {key_name}"))?;
            Ok(KeyPair::from_seed(&sidenet_wire::codec::sha256(
                seed.as_bytes(),
            )))
        }
    };
    let r = &mesh.spec.encryption.passphrase_secret_ref;
    let field = "spec.encryption.passphraseSecretRef";
    let passphrase = passphrase_of(api, ns, r, field, &name, folder, made, true).await?;
    let next = match &mesh.spec.encryption.rotation {
        None => None,
        Some(rot) => {
            let r = &rot.next_passphrase_secret_ref;
            let field = "spec.encryption.rotation.nextPassphraseSecretRef";
            Some(passphrase_of(api, ns, r, field, &name, folder, made, false).await?)
        }
    };
    Ok(Loaded {
        key,
        passphrase,
        next,
    })
}

/// The passphrase `r` names (the Secret of the folder, else of the namespace), or the error
/// the controller would report. A missing Secret is what the controller creates (`create`,
/// with a random passphrase: a throwaway one here) or an error.
#[allow(clippy::too_many_arguments)]
async fn passphrase_of(
    api: &Api<Secret>,
    ns: &str,
    r: &SecretKeyRef,
    field: &str,
    mesh: &str,
    folder: Option<&ManifestSet>,
    made: &mut BTreeMap<String, String>,
    create: bool,
) -> Result<Result<String, String>, String> {
    let found = match folder.and_then(|f| folder_secret(f, &r.name)) {
        Some(s) => Some(s),
        None => get(api, ns, &r.name).await?,
    };
    Ok(match found {
        Some(s) => passphrase_in(&s, ns, r, field, mesh),
        None if create => Ok(throwaway_value(made, &format!("passphrase {}", r.name))?),
        None => Err(format!(
            "Secret {ns}/{} ({field} of Mesh {ns}/{mesh}) does not exist",
            r.name
        )),
    })
}
