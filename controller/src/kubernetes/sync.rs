//! From the watch caches to the core: the validated set, and what the cluster remembers.
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

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use sidenet_crds::{API_VERSION, MeshNode};
use sidenet_wire::Revision;
use sidenet_wire::topics::{self};

use super::engine::{Ctx, Engine, deleting, key_of, ns_of};
use super::options::KubeError;
use crate::reconcile::store::{NodeRecord, Published};
use crate::spec::manifest::{self, ManifestSet, network_name};

/// The manifest form of an object: what the standalone loader validates.
pub(crate) fn manifest_value(kind: &str, meta: &ObjectMeta, spec: Value) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": meta.name.clone().unwrap_or_default()},
        "spec": spec,
    })
}

pub(crate) fn spec_value<T: serde::Serialize>(spec: &T) -> Value {
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
pub(crate) fn seed(eng: &mut Engine, set: &ManifestSet, node: &MeshNode, now: u64) {
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
