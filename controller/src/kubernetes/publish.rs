//! Durable facts first, then configs: status writes, publishing, clearing a node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use sidenet_crds::{Mesh, MeshNode};

use super::engine::{Ctx, Engine, config_node, key_of, ns_of};
use super::options::KubeError;
use super::rollstate;
use super::status::{self, NodeFacts};
use crate::reconcile::model::Publish;
use crate::reconcile::store::Published;
use crate::spec::manifest::network_name;

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
        if let Some((ns, name)) = eng.claims.networks.get(&r.mesh).cloned()
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
    // The rollouts' progress first (kubernetes::rollouts): a mesh whose record could not be
    // written keeps its configs held.
    let mut blocked_meshes = persist_rollouts(ctx, eng).await;
    for (net, rev) in per_mesh {
        if eng.high_water.get(&net).is_some_and(|h| *h >= rev) {
            continue;
        }
        let Some((ns, name)) = eng.claims.networks.get(&net).cloned() else {
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
    // Each config's facts go into its MeshNode status first; the writes of a batch are sent
    // together (at most STATUS_WRITES at a time), and a config is published once its own
    // write succeeded.
    let mut ready = Vec::new();
    let mut writes = Vec::new();
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
        let Some((ns, name)) = eng.claims.nodes.get(&id).cloned() else {
            // Enrolled a moment ago: its MeshNode is being created.
            eng.held.insert(id);
            continue;
        };
        let Some(obj) = ctx.node_obj(&ns, &name) else {
            eng.held.insert(id);
            continue;
        };
        match status_patch(ctx, eng, &obj) {
            Ok(Some(patch)) => writes.push(StatusWrite {
                id: id.clone(),
                ns,
                name,
                patch,
            }),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(node = %id, "cannot record the revision in MeshNode {ns}/{name} status: {e}; holding its config");
                eng.held.insert(id);
                continue;
            }
        }
        ready.push((id, topic));
    }
    for (w, e) in send_statuses(ctx, writes).await {
        tracing::warn!(node = %w.id, "cannot record the revision in MeshNode {}/{} status: {e}; holding its config", w.ns, w.name);
        eng.held.insert(w.id);
    }
    let mut sent = 0;
    for (id, topic) in ready {
        if eng.held.contains(&id) {
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

/// The most MeshNode status writes in flight at once ([`send_statuses`]).
pub(crate) const STATUS_WRITES: usize = 32;

/// One MeshNode status write: the node, its object and the merge patch of its `status`.
pub(crate) struct StatusWrite {
    pub(crate) id: String,
    pub(crate) ns: String,
    pub(crate) name: String,
    pub(crate) patch: serde_json::Value,
}

/// Sends `writes` together, at most [`STATUS_WRITES`] at a time (one round trip each would
/// otherwise add up: 10,000 writes at 5 ms are 50 s). Returns the writes that failed.
pub(crate) async fn send_statuses(
    ctx: &Ctx,
    writes: Vec<StatusWrite>,
) -> Vec<(StatusWrite, KubeError)> {
    use futures::StreamExt;
    futures::stream::iter(writes)
        .map(|w| async move {
            let api: Api<MeshNode> = Api::namespaced(ctx.client.clone(), &w.ns);
            let r = api
                .patch_status(
                    &w.name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": &w.patch})),
                )
                .await;
            (w, r)
        })
        .buffer_unordered(STATUS_WRITES)
        .filter_map(|(w, r)| async move { r.err().map(|e| (w, e.into())) })
        .collect()
        .await
}

/// Writes a MeshNode's status when it changed.
pub(crate) async fn write_status(
    ctx: &Ctx,
    eng: &mut Engine,
    node: &MeshNode,
) -> Result<(), KubeError> {
    let Some(patch) = status_patch(ctx, eng, node)? else {
        return Ok(());
    };
    let api: Api<MeshNode> = Api::namespaced(ctx.client.clone(), &ns_of(node));
    api.patch_status(
        &node.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": patch})),
    )
    .await?;
    Ok(())
}

/// The merge patch of a MeshNode's `status` from what its object holds to what the engine
/// knows, or `None` when nothing worth a write changed.
pub(crate) fn status_patch(
    ctx: &Ctx,
    eng: &Engine,
    node: &MeshNode,
) -> Result<Option<serde_json::Value>, KubeError> {
    let id = &node.spec.node_id;
    let ns = ns_of(node);
    let name = node.name_any();
    let invalid = eng.invalid.get(&key_of("MeshNode", &ns, &name)).cloned();
    // Another namespace's mesh or node never shows here (docs/helm.md, namespaces).
    let owner = eng.claims.owns_node(id, &ns, &name);
    let set = &eng.ctl.set;
    let mesh = set
        .meshes
        .get(&node.spec.mesh)
        .filter(|_| eng.claims.owns_mesh(&ns, &node.spec.mesh));
    let rec = eng.ctl.store.nodes.get(id).filter(|_| owner);
    let net = mesh.map(|m| network_name(m).to_string());
    let published = eng
        .ctl
        .store
        .published
        .get(id)
        .filter(|p| owner && !p.sha256.is_empty());
    let envelope = match published.filter(|_| ctx.opts.broker.is_none()) {
        Some(p) => kept_envelope(node.status.as_ref(), p)
            .map(Ok)
            .or_else(|| {
                eng.ctl
                    .store
                    .envelope(id)
                    .map(|e| e.map(|b| base64::engine::general_purpose::STANDARD.encode(b)))
                    .transpose()
            })
            .transpose()?,
        None => None,
    };
    let facts = NodeFacts {
        mesh,
        published,
        subnet_id: net
            .filter(|_| owner)
            .and_then(|n| eng.ctl.store.subnets.get(&(n, id.clone())).copied()),
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
        envelope,
    };
    let row = if owner { eng.ctl.status_of(id) } else { None };
    let mut new = status::node_status(node, row.as_ref(), &facts);
    let old = node.status.as_ref();
    status::carry_transitions(
        &mut new.conditions,
        old.map(|o| o.conditions.as_slice()).unwrap_or(&[]),
        crate::now(),
    );
    // Seeded but not yet re-signed: keep the recorded revision.
    if owner
        && facts.published.is_none()
        && let Some(o) = old
    {
        new.desired_revision = new.desired_revision.or(o.desired_revision);
        new.desired_epoch = new.desired_epoch.or(o.desired_epoch);
        new.config_sha256 = new.config_sha256.or(o.config_sha256.clone());
        new.config_issued_at = new.config_issued_at.or(o.config_issued_at);
        new.config_expires_at = new.config_expires_at.or(o.config_expires_at);
        new.config_envelope = new.config_envelope.or(o.config_envelope.clone());
    }
    if !status::worth_writing(old, &new, status::LAST_SEEN_STEP) {
        return Ok(None);
    }
    // Only what changed, with explicit nulls: a field the new status leaves out is cleared.
    Ok(Some(status::merge_patch(
        &serde_json::to_value(old).unwrap_or_default(),
        &serde_json::to_value(&new).unwrap_or_default(),
    )))
}

/// The envelope the status already holds, when it is the one of `p` (same epoch, revision,
/// digest and issue time): not read from the cache again.
fn kept_envelope(old: Option<&sidenet_crds::MeshNodeStatus>, p: &Published) -> Option<String> {
    old.filter(|o| {
        o.desired_epoch == Some(p.revision.epoch)
            && o.desired_revision == Some(p.revision.rev)
            && o.config_sha256.as_deref() == Some(p.sha256.as_str())
            && o.config_issued_at == Some(p.iat)
    })
    .and_then(|o| o.config_envelope.clone())
}

/// Refreshes the nodes-by-phase gauge, at most every 2 s (it walks every node).
pub(crate) fn update_phases(ctx: &Ctx, eng: &mut Engine) {
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
pub(crate) async fn clear_node(
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

/// Writes every rollout record that changed to its Mesh status (`status.rollout`,
/// kubernetes::rollstate). Returns the network names whose
/// record could not be written: their configs are held (a rollout's progress is durable
/// before the configs it causes are published).
pub(crate) async fn persist_rollouts(ctx: &Ctx, eng: &mut Engine) -> BTreeSet<String> {
    let store = &eng.ctl.store.rollouts;
    eng.rollouts.written.retain(|m, _| store.contains_key(m));
    let store = &eng.ctl.store.rollouts;
    let changed: Vec<(String, rollstate::Version, sidenet_crds::MeshRolloutStatus)> = store
        .iter()
        .filter(|(m, r)| {
            rollstate::kept(&eng.ctl, m, r)
                && eng.rollouts.written.get(*m) != Some(&rollstate::version(r))
        })
        .map(|(m, r)| (m.clone(), rollstate::version(r), rollstate::field(r)))
        .collect();
    let mut blocked = BTreeSet::new();
    for (mesh, v, f) in changed {
        // A Mesh refused by the merge publishes nothing.
        let Some(ns) = eng.claims.mesh_names.get(&mesh).cloned() else {
            continue;
        };
        let api: Api<Mesh> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"status": {"rollout": f}});
        match api
            .patch_status(&mesh, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                eng.rollouts.written.insert(mesh, v);
            }
            Err(e) => {
                tracing::warn!(mesh = %mesh, "cannot record the rollout in Mesh {ns}/{mesh} status: {e}; holding its configs");
                if let Some(m) = eng.ctl.set.meshes.get(&mesh) {
                    blocked.insert(network_name(m).to_string());
                }
            }
        }
    }
    blocked
}
