//! The MeshNode reconciler.

use std::sync::Arc;
use std::time::Instant;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use sidenet_crds::{HardwareProfile, Mesh, MeshNode};
use sidenet_wire::topics::{self};

use super::engine::{Ctx, FINALIZER, deleting, finalizer_err, key_of, ns_of, succeeded};
use super::options::KubeError;
use super::publish::{clear_node, persist_and_publish, update_phases, write_status};
use super::sync::sync_for;
use crate::spec::manifest::network_name;

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

pub(crate) async fn apply_node(ctx: &Ctx, node: &MeshNode) -> Result<Action, KubeError> {
    let started = Instant::now();
    let engine = ctx.engine().await?;
    let mut eng = engine.lock().await;
    let key = key_of("MeshNode", &ns_of(node), &node.name_any());
    sync_for(ctx, &mut eng, &key, &node.metadata).await?;
    let id = node.spec.node_id.clone();
    // A sync reconciles every node (the core's `set_manifests`), and any change of the
    // node's spec, labels or deletion makes one (sync_for). What is left for the node's own
    // reconcile is its periodic re-check (a config due for re-signing): after a sync within
    // the requeue interval it would only repeat that sync's, at a cost that grows with the
    // mesh (each plan works out mesh-wide names and policies; docs/benchmarks.md).
    let recent = eng
        .synced_at
        .is_some_and(|t| t.elapsed() < ctx.opts.refresh);
    if !recent && (eng.ctl.set.nodes.contains_key(&id) || eng.ctl.store.nodes.contains_key(&id)) {
        eng.ctl.reconcile(std::slice::from_ref(&id), crate::now())?;
    }
    persist_and_publish(ctx, &mut eng, started).await?;
    let latest = ctx.node_obj(&ns_of(node), &node.name_any());
    write_status(ctx, &mut eng, latest.as_deref().unwrap_or(node)).await?;
    update_phases(ctx, &mut eng);
    Ok(Action::requeue(ctx.opts.refresh))
}

pub(crate) async fn cleanup_node(ctx: &Ctx, node: &MeshNode) -> Result<Action, KubeError> {
    let engine = ctx.engine().await?;
    let mut eng = engine.lock().await;
    let id = node.spec.node_id.clone();
    let (ns, name) = (ns_of(node), node.name_any());
    // The set drops a node on its way out (sync): without this sync it would stay there until
    // another object's reconcile, and a render of the whole mesh meanwhile would publish its
    // config again onto the topic cleared below.
    sync_for(
        ctx,
        &mut eng,
        &key_of("MeshNode", &ns, &name),
        &node.metadata,
    )
    .await?;
    // The node's config is this object's to clear only when it owns the node id (another
    // namespace's MeshNode naming the same id takes nothing with it), and no other live
    // MeshNode claims the id.
    let owned = eng.claims.owns_node(&id, &ns, &name);
    let mine = owned || !eng.claims.nodes.contains_key(&id);
    let other = ctx.nodes.state().iter().any(|n| {
        n.spec.node_id == id
            && !deleting(&**n)
            && (ns_of(&**n), n.name_any()) != (ns.clone(), name.clone())
    });
    if mine && !other {
        let topic = ctx
            .mesh_obj(&ns, &node.spec.mesh)
            .filter(|m| eng.claims.owns_mesh(&ns, &m.name_any()))
            .map(|m| topics::config(network_name(&m), &id));
        clear_node(ctx, &mut eng, &id, topic).await?;
    }
    if owned {
        eng.claims.nodes.remove(&id);
    }
    persist_and_publish(ctx, &mut eng, Instant::now()).await?;
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
