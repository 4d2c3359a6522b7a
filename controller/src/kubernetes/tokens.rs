//! Enrolment tokens in Kubernetes mode, kept hashed in a Secret per Mesh.
//!
//! Secret `<mesh>-enrolment-tokens` in the Mesh's namespace (`<mesh>` is the Mesh's
//! `metadata.name`), labelled `app.kubernetes.io/managed-by: sidenet-controller` and
//! `sidenet.io/mesh: <mesh>`. One data key per token: the SHA-256 (lowercase hex) of the token,
//! whose value is JSON `{"created": UNIX, "expires": UNIX, "usedBy": NODE-ID|null}`. The token
//! itself is never stored, logged or written to any object (docs/helm.md, "Enrolment tokens").
//!
//! Writers add or change one key at a time with a JSON merge patch of `data`, so two writers
//! never overwrite each other's tokens: `sidenetctl --kubeconfig token` (the admin's own
//! rights), the controller when a `NodeProvision` job mints a token for a new node, and the
//! controller when a token is used (`usedBy`). A Secret that is missing is created.
//!
//! The controller reads the Secret (one `get`) when a node asks to enrol into a mesh in token
//! mode, before the core checks the token, and writes `usedBy` before the node's config is
//! published: a used token stays used across restarts and leader changes. Entries whose
//! `expires` has passed (used or not: an expired token admits no one) are removed then, with
//! one merge patch setting their keys to null.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sidenet_crds::EnrollmentMode;

use super::engine::{Ctx, Engine, ns_of};
use super::options::KubeError;
use crate::reconcile::store::TokenRecord;
use crate::spec::manifest::network_name;

/// Name of the token Secret of a Mesh (its `metadata.name`).
pub fn tokens_secret(mesh_name: &str) -> String {
    format!("{mesh_name}-enrolment-tokens")
}

/// One token, as stored under its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenEntry {
    /// Created, Unix seconds.
    pub created: u64,
    /// Expires, Unix seconds.
    pub expires: u64,
    /// The node that used it.
    #[serde(default)]
    pub used_by: Option<String>,
}

/// A new token (20 random bytes, base32) and its hash.
pub fn new_token() -> Result<(String, String), String> {
    let b = crate::random::random32()?;
    let token = sidenet_wire::codec::base32(&b[..20]);
    let hash = sidenet_wire::codec::sha256_hex(token.as_bytes());
    Ok((token, hash))
}

/// Adds or changes one token of the Secret of Mesh `mesh_name` in `ns` (created when missing).
pub async fn put(
    client: &Client,
    ns: &str,
    mesh_name: &str,
    hash: &str,
    entry: &TokenEntry,
) -> Result<(), kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = tokens_secret(mesh_name);
    let value = serde_json::to_vec(entry).unwrap_or_default();
    let patch = json!({"data": {hash: ByteString(value.clone())}});
    for _ in 0..3 {
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.to_string()),
                labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "sidenet-controller".to_string(),
                    ),
                    ("sidenet.io/mesh".to_string(), mesh_name.to_string()),
                ])),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                hash.to_string(),
                ByteString(value.clone()),
            )])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(()),
            // Created meanwhile by another writer: patch it.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Removes the entries `hashes` from the token Secret of Mesh `mesh_name` in `ns` (one JSON
/// merge patch setting each key to null; a Secret that is gone has nothing to remove).
pub async fn prune(
    client: &Client,
    ns: &str,
    mesh_name: &str,
    hashes: &[String],
) -> Result<(), kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let data: serde_json::Map<String, serde_json::Value> = hashes
        .iter()
        .map(|h| (h.clone(), serde_json::Value::Null))
        .collect();
    let patch = json!({ "data": data });
    match api
        .patch(
            &tokens_secret(mesh_name),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The tokens of the Secret of Mesh `mesh_name` in `ns` (none when it is missing). Entries that
/// do not decode are skipped with a log line naming the Secret and key.
pub async fn load(
    client: &Client,
    ns: &str,
    mesh_name: &str,
) -> Result<BTreeMap<String, TokenEntry>, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = tokens_secret(mesh_name);
    let Some(secret) = api.get_opt(&name).await? else {
        return Ok(BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    for (k, v) in secret.data.unwrap_or_default() {
        match serde_json::from_slice::<TokenEntry>(&v.0) {
            Ok(e) if k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()) => {
                out.insert(k.to_ascii_lowercase(), e);
            }
            Ok(_) => {
                tracing::warn!("Secret {ns}/{name}: key {k:?} is not a SHA-256 in hex; ignored")
            }
            Err(e) => tracing::warn!(
                "Secret {ns}/{name}: key {k}: not a token entry ({{\"created\", \"expires\", \"usedBy\"}}): {e}; ignored"
            ),
        }
    }
    Ok(out)
}

/// Where the tokens of the mesh with network name `net` live: the namespace and name of its
/// Mesh, when the mesh is in token mode and owned by that namespace.
pub(crate) fn token_mesh(ctx: &Ctx, eng: &Engine, net: &str) -> Option<(String, String)> {
    let m = eng.ctl.set.mesh_by_network(net)?;
    if m.spec.enrollment.mode != EnrollmentMode::Token {
        return None;
    }
    ctx.meshes
        .state()
        .iter()
        .find(|o| network_name(o) == net && eng.claims.owns_mesh(&ns_of(&***o), &o.name_any()))
        .map(|o| (ns_of(&**o), o.name_any()))
}

/// Before the core sees an enrolment into a token mesh: the Secret's tokens go into the core's
/// store. Returns the hashes not yet used (to see afterwards which one the enrolment used).
pub(crate) async fn before_enrol(
    ctx: &Ctx,
    eng: &mut Engine,
    net: &str,
) -> Result<BTreeSet<String>, KubeError> {
    let Some((ns, mesh_name)) = token_mesh(ctx, eng, net) else {
        return Ok(BTreeSet::new());
    };
    let entries = load(&ctx.client, &ns, &mesh_name).await?;
    let now = crate::now();
    let expired: Vec<String> = entries
        .iter()
        .filter(|(_, e)| e.expires <= now)
        .map(|(h, _)| h.clone())
        .collect();
    if !expired.is_empty() {
        match prune(&ctx.client, &ns, &mesh_name, &expired).await {
            Ok(()) => tracing::info!(
                mesh = %net,
                "removed {} expired enrolment tokens from Secret {ns}/{}",
                expired.len(),
                tokens_secret(&mesh_name)
            ),
            Err(e) => tracing::warn!(
                "cannot remove expired enrolment tokens from Secret {ns}/{}: {e}",
                tokens_secret(&mesh_name)
            ),
        }
    }
    eng.ctl.prune_tokens(now);
    let mut unused = BTreeSet::new();
    for (hash, e) in entries.into_iter().filter(|(_, e)| e.expires > now) {
        let known = eng.ctl.store.tokens.get(&hash);
        // A token used here but not yet in the Secret stays used.
        if known.is_some_and(|t| t.used_by.is_some()) {
            continue;
        }
        if e.used_by.is_none() {
            unused.insert(hash.clone());
        }
        eng.ctl.store.tokens.insert(
            hash,
            TokenRecord {
                mesh: net.to_string(),
                created: e.created,
                expires: e.expires,
                used_by: e.used_by,
            },
        );
    }
    Ok(unused)
}

/// After the core saw an enrolment: the token it used, if any, is written back as used.
pub(crate) async fn after_enrol(
    ctx: &Ctx,
    eng: &mut Engine,
    net: &str,
    unused: &BTreeSet<String>,
) -> Result<(), KubeError> {
    if unused.is_empty() {
        return Ok(());
    }
    let Some((ns, mesh_name)) = token_mesh(ctx, eng, net) else {
        return Ok(());
    };
    let used: Vec<(String, TokenEntry)> = unused
        .iter()
        .filter_map(|hash| {
            let t = eng.ctl.store.tokens.get(hash)?;
            t.used_by.as_ref()?;
            Some((
                hash.clone(),
                TokenEntry {
                    created: t.created,
                    expires: t.expires,
                    used_by: t.used_by.clone(),
                },
            ))
        })
        .collect();
    for (hash, entry) in used {
        put(&ctx.client, &ns, &mesh_name, &hash, &entry).await?;
        tracing::info!(mesh = %net, node = ?entry.used_by, "enrolment token used");
    }
    Ok(())
}

/// Mints a token for mesh `net` valid `ttl` seconds: its hash goes into the Secret and the
/// core's store; the token is returned (for a `NodeProvision` job's new node).
pub(crate) async fn mint(
    ctx: &Ctx,
    eng: &mut Engine,
    net: &str,
    ttl: u64,
) -> Result<String, String> {
    let (ns, mesh_name) = token_mesh(ctx, eng, net)
        .ok_or_else(|| format!("no Mesh with network name {net:?} in token mode"))?;
    let (token, hash) = new_token()?;
    let now = crate::now();
    let entry = TokenEntry {
        created: now,
        expires: now.saturating_add(ttl),
        used_by: None,
    };
    put(&ctx.client, &ns, &mesh_name, &hash, &entry)
        .await
        .map_err(|e| format!("Secret {ns}/{}: {e}", tokens_secret(&mesh_name)))?;
    eng.ctl.store.tokens.insert(
        hash,
        TokenRecord {
            mesh: net.to_string(),
            created: entry.created,
            expires: entry.expires,
            used_by: None,
        },
    );
    Ok(token)
}
