//! `sidenetctl --kubeconfig PATH`: the admin commands against a cluster that runs Kubernetes
//! mode. They read and write the custom resources (and the token Secret) through the API
//! server with the admin's own rights; the controller reacts to them like to any other change
//! (docs/helm.md, "sidenetctl against a cluster").
//!
//! - `status`: the MeshNodes of the namespace (phase, revisions, last seen) and the
//!   NodeProvision jobs.
//! - `approve NODE`: sets `spec.approved: true` on the node's MeshNode (the MeshNode the
//!   controller made for a node waiting for approval, found by name or `spec.nodeId`).
//! - `remove NODE`: deletes the node's MeshNode (its finalizer clears the node's config and
//!   revokes its broker login).
//! - `token --mesh NET`: adds a token's hash to the Mesh's token Secret; prints the token.
//! - `join-code --mesh NET`: the join code of the Mesh's public key (`status.publicKey`).
//! - `plan -f DIR`: what putting the folder in force in the namespace would publish
//!   ([`crate::kubernetes::plan`]; reads only).

use std::path::Path;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use sidenet_crds::{EnrollmentMode, Mesh, MeshNode, NodeProvision};

use crate::kubernetes::tokens::{self, TokenEntry};
use crate::spec::manifest::network_name;

/// A client of the cluster of `kubeconfig` (its current context) and the namespace to work
/// in: `namespace`, else the context's namespace, else `default`.
pub async fn connect(
    kubeconfig: &Path,
    namespace: Option<&str>,
) -> Result<(Client, String), String> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .map_err(|e| format!("--kubeconfig {}: {e}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("--kubeconfig {}: {e}", kubeconfig.display()))?;
    let ns = namespace
        .map(str::to_string)
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)
        .map_err(|e| format!("--kubeconfig {}: {e}", kubeconfig.display()))?;
    Ok((client, ns))
}

fn api_err(what: &str, e: kube::Error) -> String {
    format!("{what}: {e}")
}

/// One MeshNode as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub name: String,
    pub node: String,
    pub mesh: String,
    pub approved: bool,
    pub phase: String,
    pub desired: Option<u64>,
    pub applied: Option<u64>,
    pub last_seen: Option<String>,
    pub addresses: Vec<String>,
}

/// One NodeProvision as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionRow {
    pub name: String,
    pub mesh: String,
    /// `Running`, `Complete`, or the reason of a `Complete` `False` condition.
    pub state: String,
    pub succeeded: u32,
    pub failed: u32,
}

/// The MeshNodes and NodeProvisions of `ns`, sorted by name.
pub async fn status(
    client: &Client,
    ns: &str,
) -> Result<(Vec<NodeRow>, Vec<ProvisionRow>), String> {
    let nodes: Api<MeshNode> = Api::namespaced(client.clone(), ns);
    let mut rows: Vec<NodeRow> = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| api_err(&format!("listing MeshNodes in {ns}"), e))?
        .items
        .into_iter()
        .map(|n| {
            let st = n.status.clone().unwrap_or_default();
            NodeRow {
                name: n.name_any(),
                node: n.spec.node_id.clone(),
                mesh: n.spec.mesh.clone(),
                approved: n.spec.approved,
                phase: st.phase.unwrap_or_else(|| "-".into()),
                desired: st.desired_revision,
                applied: st.applied_revision,
                last_seen: st.last_seen,
                addresses: st.addresses,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let nps: Api<NodeProvision> = Api::namespaced(client.clone(), ns);
    let mut provisions: Vec<ProvisionRow> = nps
        .list(&ListParams::default())
        .await
        .map_err(|e| api_err(&format!("listing NodeProvisions in {ns}"), e))?
        .items
        .into_iter()
        .map(|p| {
            let st = p.status.clone().unwrap_or_default();
            let state = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Complete")
                .map(|c| {
                    if c.status == "True" {
                        "Complete".to_string()
                    } else {
                        c.reason.clone()
                    }
                })
                .unwrap_or_else(|| "-".into());
            ProvisionRow {
                name: p.name_any(),
                mesh: p.spec.mesh.clone(),
                state,
                succeeded: st.succeeded,
                failed: st.failed,
            }
        })
        .collect();
    provisions.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((rows, provisions))
}

/// The MeshNode of `who` (its name or `spec.nodeId`) in `ns`.
async fn find_node(client: &Client, ns: &str, who: &str) -> Result<MeshNode, String> {
    let api: Api<MeshNode> = Api::namespaced(client.clone(), ns);
    let all = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_err(&format!("listing MeshNodes in {ns}"), e))?
        .items;
    all.iter()
        .find(|n| n.name_any() == who)
        .or_else(|| all.iter().find(|n| n.spec.node_id == who))
        .cloned()
        .ok_or_else(|| {
            format!("no MeshNode named {who:?} or with spec.nodeId {who:?} in namespace {ns}")
        })
}

/// Sets `spec.approved: true` on the MeshNode of `who`; returns its name and node id.
pub async fn approve(client: &Client, ns: &str, who: &str) -> Result<(String, String), String> {
    let n = find_node(client, ns, who).await?;
    let name = n.name_any();
    let api: Api<MeshNode> = Api::namespaced(client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"approved": true}})),
    )
    .await
    .map_err(|e| api_err(&format!("MeshNode {ns}/{name}"), e))?;
    Ok((name, n.spec.node_id))
}

/// Deletes the MeshNode of `who`; returns its name and node id.
pub async fn remove(client: &Client, ns: &str, who: &str) -> Result<(String, String), String> {
    let n = find_node(client, ns, who).await?;
    let name = n.name_any();
    let api: Api<MeshNode> = Api::namespaced(client.clone(), ns);
    api.delete(&name, &DeleteParams::default())
        .await
        .map_err(|e| api_err(&format!("MeshNode {ns}/{name}"), e))?;
    Ok((name, n.spec.node_id))
}

/// The Mesh of `ns` whose network name is `net`.
async fn find_mesh(client: &Client, ns: &str, net: &str) -> Result<Mesh, String> {
    let api: Api<Mesh> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map_err(|e| api_err(&format!("listing Meshes in {ns}"), e))?
        .items
        .into_iter()
        .find(|m| network_name(m) == net)
        .ok_or_else(|| format!("--mesh {net}: no Mesh with that network name in namespace {ns}"))
}

/// A new single-use token for mesh `net`, valid `ttl` seconds: its hash goes into the
/// Mesh's token Secret. Returns the token, its expiry and the mesh's enrolment mode.
pub async fn token(
    client: &Client,
    ns: &str,
    net: &str,
    ttl: u64,
) -> Result<(String, u64, EnrollmentMode), String> {
    let mesh = find_mesh(client, ns, net).await?;
    let (token, hash) = tokens::new_token()?;
    let now = crate::now();
    let entry = TokenEntry {
        created: now,
        expires: now.saturating_add(ttl),
        used_by: None,
    };
    tokens::put(client, ns, &mesh.name_any(), &hash, &entry)
        .await
        .map_err(|e| {
            api_err(
                &format!("Secret {ns}/{}", tokens::tokens_secret(&mesh.name_any())),
                e,
            )
        })?;
    Ok((token, entry.expires, mesh.spec.enrollment.mode))
}

/// The public key and join code of mesh `net`, from its Mesh's `status.publicKey`.
pub async fn join_code(
    client: &Client,
    ns: &str,
    net: &str,
) -> Result<(sidenet_wire::PublicKey, sidenet_wire::join::JoinCode), String> {
    let mesh = find_mesh(client, ns, net).await?;
    let pk = mesh
        .status
        .as_ref()
        .and_then(|s| s.public_key.clone())
        .ok_or_else(|| {
            format!(
                "Mesh {ns}/{}: no status.publicKey yet (is the controller running?)",
                mesh.name_any()
            )
        })?;
    let key = sidenet_wire::PublicKey::from_base64(&pk)
        .map_err(|e| format!("Mesh {ns}/{}: status.publicKey: {e}", mesh.name_any()))?;
    Ok((key, sidenet_wire::join::JoinCode::new(net, &key)))
}

/// `plan -f FILES`: the plan of the manifests in `files` for namespace `ns`, rendered with the
/// templates of `templates` ([`crate::kubernetes::plan::plan`]).
pub async fn plan(
    client: &Client,
    ns: &str,
    files: &[std::path::PathBuf],
    templates: &Path,
) -> Result<crate::reconcile::diff::PlanReport, String> {
    crate::kubernetes::plan::plan(client, ns, files, templates).await
}
