//! Enrolment → MeshNode: a node that enrolled without one gets one.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::PostParams;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use sidenet_crds::{API_VERSION, MeshNode, MeshNodeSpec, NodeOverrides};

use super::engine::{Ctx, Engine};
use super::options::KubeError;
use crate::reconcile::store::NodeRecord;

pub(crate) fn valid_name(s: &str) -> bool {
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
pub(crate) async fn delete_evicted(ctx: &Ctx, eng: &mut Engine) {
    for (_, id) in eng.ctl.take_pending_evictions() {
        let Some((ns, name)) = eng.claims.nodes.get(&id).cloned() else {
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
                eng.claims.nodes.remove(&id);
            }
            Err(e) => {
                tracing::warn!(node = %id, "cannot delete MeshNode {ns}/{name} of a node pushed out of the waiting list: {e}")
            }
        }
    }
}

/// A node enrolled without a MeshNode: create one, owned by its Mesh (pending in approval
/// mode until `spec.approved` is set). Returns whether a MeshNode for it is on its way: made
/// now, or already there under the chosen name (409: made by an earlier enrolment message
/// of the node, not yet in the watch cache).
pub(crate) async fn create_meshnode(
    ctx: &Ctx,
    eng: &mut Engine,
    id: &str,
) -> Result<bool, KubeError> {
    // A node waiting for approval has no record: its MeshNode is made from its request.
    let waiting = eng.ctl.pending.get(id).map(|p| NodeRecord {
        approved: false,
        ..p.approved_record()
    });
    let Some(rec) = eng.ctl.store.nodes.get(id).cloned().or(waiting) else {
        return Ok(false);
    };
    let Some((ns, mesh_name)) = eng.claims.networks.get(&rec.mesh).cloned() else {
        return Ok(false);
    };
    let Some(mesh) = ctx.mesh_obj(&ns, &mesh_name) else {
        return Ok(false);
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
            cache: None,
            services: Vec::new(),
            dns_name: None,
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
            eng.claims.nodes.insert(id.to_string(), (ns, name));
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(true),
        Err(e) => Err(e.into()),
    }
}
