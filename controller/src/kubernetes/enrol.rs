//! Enrolment → MeshNode: a node that enrolled without one gets one.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::PostParams;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use sidenet_crds::{API_VERSION, MeshNode, MeshNodeSpec, NodeOverrides};

use super::engine::{Ctx, Engine, FINALIZER};
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

/// The most MeshNode creations in flight at once ([`create_meshnodes`]).
const CREATES: usize = 32;

/// Nodes that enrolled without a MeshNode: create one each, owned by its Mesh (pending in
/// approval mode until `spec.approved` is set). The creations of a batch of enrolments are
/// sent together, at most [`CREATES`] at a time, each followed by its `Enrolled` Event.
/// Returns the nodes whose MeshNode is on its way: made now, or already there (409 for a
/// name the watch cache does not hold yet, or holds for the same node id: made by an earlier
/// enrolment message of the node). A name the cache shows another node's MeshNode holding is
/// given up for the node id itself.
pub(crate) async fn create_meshnodes(
    ctx: &Ctx,
    eng: &mut Engine,
    ids: &[String],
) -> BTreeSet<String> {
    use futures::StreamExt;
    let mut chosen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut made = Vec::new();
    let mut there = BTreeSet::new();
    for id in ids {
        if made.iter().any(|m: &Made| m.id == *id) {
            continue;
        }
        match meshnode_for(ctx, eng, id, &chosen) {
            Some(Found::New(m)) => {
                chosen.insert((m.ns.clone(), m.node.name_any()));
                made.push(*m);
            }
            Some(Found::There(ns, name)) => {
                // Made for an earlier enrolment message of the node, and in the watch cache
                // already (a sync since may have left it out of the claims: its snapshot of
                // the cache was older).
                eng.claims.nodes.insert(id.clone(), (ns, name));
                there.insert(id.clone());
            }
            None => {}
        }
    }
    let results: Vec<(Made, Result<String, KubeError>)> = futures::stream::iter(made)
        .map(|m| async move {
            let r = create(ctx, &m).await;
            (m, r)
        })
        .buffer_unordered(CREATES)
        .collect()
        .await;
    let mut coming = there;
    for (m, r) in results {
        match r {
            Ok(name) => {
                eng.claims.nodes.insert(m.id.clone(), (m.ns, name));
                coming.insert(m.id);
            }
            Err(e) => {
                tracing::error!(node = %m.id, "cannot create a MeshNode in namespace {} for the enrolled node: {e}", m.ns);
            }
        }
    }
    coming
}

/// A MeshNode to create for an enrolled node.
struct Made {
    id: String,
    ns: String,
    node: MeshNode,
    /// Its record's hostname, and whether it waits for approval (for the Event).
    hostname: String,
    pending: bool,
}

/// Creates `m.node` (under its node id when its name is another node's), then its Event.
/// Returns the name it has.
async fn create(ctx: &Ctx, m: &Made) -> Result<String, KubeError> {
    let api: Api<MeshNode> = Api::namespaced(ctx.client.clone(), &m.ns);
    let mut node = m.node.clone();
    loop {
        let name = node.name_any();
        match api.create(&PostParams::default(), &node).await {
            Ok(created) => {
                tracing::info!(node = %m.id, "created MeshNode {}/{name} for the enrolled node", m.ns);
                let note = if m.pending {
                    format!(
                        "node {} ({}) enrolled and waits for approval: kubectl patch meshnode {name} -n {} --type merge -p '{{\"spec\":{{\"approved\":true}}}}'",
                        m.id, m.hostname, m.ns
                    )
                } else {
                    format!("node {} ({}) enrolled", m.id, m.hostname)
                };
                ctx.event_once(
                    &created.object_ref(&()),
                    EventType::Normal,
                    "Enrolled",
                    note,
                )
                .await;
                return Ok(name);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Whose it is, as far as the watch cache knows (the RBAC has no `get`): one
                // not there yet is taken for ours, made by an earlier enrolment message.
                let theirs = ctx.node_obj(&m.ns, &name);
                if theirs.as_ref().is_none_or(|t| t.spec.node_id == m.id) {
                    return Ok(name);
                }
                if name == m.id {
                    return Err(KubeError::Other(format!(
                        "MeshNode {}/{name} exists for node {}",
                        m.ns,
                        theirs.map(|t| t.spec.node_id.clone()).unwrap_or_default()
                    )));
                }
                node.metadata.name = Some(m.id.clone());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// What [`meshnode_for`] found to do for a node.
enum Found {
    /// Create this MeshNode.
    New(Box<Made>),
    /// The node's MeshNode is in the watch cache already, under one of the names it would be
    /// given: its namespace and name.
    There(String, String),
}

/// The MeshNode for node `id`, named after its hostname when that name is free in the watch
/// cache and in `chosen` (names given to this batch's other nodes), else hostname and id, else
/// the id; or the one of those the cache shows already made for the node.
fn meshnode_for(
    ctx: &Ctx,
    eng: &Engine,
    id: &str,
    chosen: &BTreeSet<(String, String)>,
) -> Option<Found> {
    // A node waiting for approval has no record: its MeshNode is made from its request.
    let waiting = eng.ctl.pending.get(id).map(|p| NodeRecord {
        approved: false,
        ..p.approved_record()
    });
    let rec = eng.ctl.store.nodes.get(id).cloned().or(waiting)?;
    let (ns, mesh_name) = eng.claims.networks.get(&rec.mesh).cloned()?;
    let mesh = ctx.mesh_obj(&ns, &mesh_name)?;
    let host = rec.hostname.to_ascii_lowercase();
    let taken =
        |n: &str| ctx.node_obj(&ns, n).is_some() || chosen.contains(&(ns.clone(), n.to_string()));
    let short = &id[..id.len().min(6)];
    let names = [host.clone(), format!("{host}-{short}"), id.to_string()];
    if let Some(name) = names.iter().find(|n| {
        ctx.node_obj(&ns, n)
            .is_some_and(|o| o.spec.node_id == id && o.metadata.deletion_timestamp.is_none())
    }) {
        return Some(Found::There(ns, name.clone()));
    }
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
    // With the controller's finalizer from the start: no second write to add it at the first
    // reconcile.
    node.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    node.metadata.owner_references = Some(vec![OwnerReference {
        api_version: API_VERSION.into(),
        kind: "Mesh".into(),
        name: mesh_name.clone(),
        uid: mesh.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    Some(Found::New(Box::new(Made {
        id: id.to_string(),
        ns,
        node,
        pending: !crate::reconcile::admission::approved(&mesh, None, Some(&rec)),
        hostname: rec.hostname,
    })))
}
