//! The NodeProvision reconciler: runs each `NodeProvision` with the same implementation as
//! standalone mode and `sidenetctl provision` ([`sidenet_provision::resource::run`]), and
//! writes the per-host results into the object's status.
//!
//! A job runs when its spec or annotations change (an admin retries one by setting or changing
//! an annotation, e.g. `sidenet.io/retry: "2"`). The fingerprint of both (SHA-256) is written
//! into `status.fingerprint` when the run ends: a restarted controller or a new leader runs no
//! finished job again. A job changed while it runs is stopped and started again; a run cut
//! short by a restart runs again (provisioning is idempotent: a provisioned host reports
//! `AlreadyProvisioned`). While a job runs, its condition `Complete` is `False` with the
//! reason `Running`.
//!
//! `spec.mesh` is the network name of a Mesh in the NodeProvision's own namespace. SSH
//! credentials are read from the Secrets of that namespace by name. Known SSH host keys
//! (`hostKeyPolicy: trustOnFirstUse`) are kept in the cache folder, which a restart wipes:
//! pin `targets[].hostKey` for hosts that must not be trusted again on a later run.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use sidenet_crds::{Condition, EnrollmentMode, NodeProvision, NodeProvisionStatus, SecretKeyRef};
use sidenet_provision::{ControlPlane, NodeSeen, Settings};

use super::engine::{Ctx, RunningJob, key_of, ns_of, succeeded};
use super::options::KubeError;
use super::status::merge_patch;
use crate::spec::manifest::network_name;

/// SHA-256 of the spec and the annotations.
pub fn fingerprint(np: &NodeProvision) -> String {
    let text = serde_json::to_string(&(&np.spec, &np.metadata.annotations)).unwrap_or_default();
    sidenet_wire::codec::sha256_hex(text.as_bytes())
}

/// The trigger's predicate: a change of spec (generation), annotations or deletion.
pub(crate) fn provision_changes(np: &NodeProvision) -> Option<u64> {
    let m = np.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        m.generation,
        &m.annotations,
        m.deletion_timestamp.is_some(),
        &m.uid,
    )
        .hash(&mut h);
    Some(h.finish())
}

fn condition(np: &NodeProvision, reason: &str, message: String) -> Condition {
    Condition {
        type_: "Complete".into(),
        status: "False".into(),
        reason: reason.into(),
        message,
        last_transition_time: Some(crate::rfc3339(crate::now())),
        observed_generation: np.metadata.generation,
    }
}

/// Writes `new` as the object's status (only what changed, with explicit nulls).
async fn write(
    ctx: &Ctx,
    np: &NodeProvision,
    new: &NodeProvisionStatus,
) -> Result<(), kube::Error> {
    let old = serde_json::to_value(np.status.clone().unwrap_or_default()).unwrap_or_default();
    let new = serde_json::to_value(new).unwrap_or_default();
    if old == new {
        return Ok(());
    }
    let api: Api<NodeProvision> = Api::namespaced(ctx.client.clone(), &ns_of(np));
    api.patch_status(
        &np.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": merge_patch(&old, &new)})),
    )
    .await
    .map(|_| ())
}

/// The values of the Secret keys the job's credentials name, read by name in its namespace.
async fn credentials(
    ctx: &Ctx,
    np: &NodeProvision,
) -> Result<BTreeMap<(String, String), String>, KubeError> {
    let spec = &np.spec;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns_of(np));
    let mut names: Vec<String> = std::iter::once(&spec.defaults.credentials)
        .chain(spec.targets.iter().map(|t| &t.credentials))
        .flatten()
        .flat_map(|c| [&c.private_key_secret_ref, &c.password_secret_ref])
        .flatten()
        .map(|r| r.name.clone())
        .collect();
    names.sort();
    names.dedup();
    let mut out = BTreeMap::new();
    for name in names {
        let Some(s) = api.get_opt(&name).await? else {
            continue; // resource::run names the missing reference
        };
        for (k, v) in s.data.unwrap_or_default() {
            if let Ok(text) = String::from_utf8(v.0) {
                out.insert((name.clone(), k), text);
            }
        }
        for (k, v) in s.string_data.unwrap_or_default() {
            out.insert((name.clone(), k), v);
        }
    }
    Ok(out)
}

/// Reconciles one NodeProvision.
pub(crate) async fn reconcile_provision(
    np: Arc<NodeProvision>,
    ctx: Arc<Ctx>,
) -> Result<Action, KubeError> {
    ctx.metrics.reconciled("NodeProvision");
    let ns = ns_of(&*np);
    let name = np.name_any();
    let key = key_of("NodeProvision", &ns, &name);
    sweep(&ctx);
    let fp = fingerprint(&np);
    let done = np.status.as_ref().and_then(|s| s.fingerprint.as_deref()) == Some(fp.as_str());
    {
        let mut jobs = ctx.provisions.lock().unwrap_or_else(|e| e.into_inner());
        match jobs.get(&key) {
            Some(j) if j.fingerprint == fp => return Ok(Action::await_change()),
            Some(j) => {
                // Changed while running: this run's results would be stale.
                j.task.abort();
                jobs.remove(&key);
                tracing::info!(provision = %key, "NodeProvision changed while running; starting again");
            }
            None => {}
        }
    }
    if done || np.metadata.deletion_timestamp.is_some() {
        succeeded(&ctx, &key);
        return Ok(Action::await_change());
    }
    let engine = ctx.engine().await?;
    let (mesh_key, tokens, shaping) = {
        let eng = engine.lock().await;
        let mesh = ctx.meshes.state().into_iter().find(|m| {
            ns_of(&**m) == ns
                && network_name(m) == np.spec.mesh
                && eng.claims.owns_mesh(&ns, &m.name_any())
        });
        let pk = mesh.as_ref().and_then(|_| {
            ctx.secrets
                .lock()
                .ok()
                .and_then(|s| s.public_key(&np.spec.mesh))
        });
        match (mesh, pk) {
            (Some(m), Some(pk)) => (
                pk,
                m.spec.enrollment.mode == EnrollmentMode::Token,
                crate::spec::policy::shapes(&m.spec),
            ),
            (m, _) => {
                let message = match m {
                    None => format!(
                        "spec.mesh: no Mesh with network name {:?} in namespace {ns}",
                        np.spec.mesh
                    ),
                    Some(_) => format!("no signing key for mesh {:?} yet", np.spec.mesh),
                };
                let st = NodeProvisionStatus {
                    conditions: vec![condition(&np, "InvalidSpec", message.clone())],
                    observed_generation: np.metadata.generation,
                    ..np.status.clone().unwrap_or_default()
                };
                if np.status.as_ref().map(|s| &s.conditions) != Some(&st.conditions) {
                    ctx.event(
                        &np.object_ref(&()),
                        EventType::Warning,
                        "InvalidSpec",
                        message,
                    )
                    .await;
                }
                write_unless_same_reason(&ctx, &np, st).await?;
                // A Mesh (or its key) that appears later does not trigger this object.
                return Ok(Action::requeue(Duration::from_secs(10)));
            }
        }
    };
    let secrets = credentials(&ctx, &np).await?;
    let running = NodeProvisionStatus {
        conditions: vec![condition(
            &np,
            "Running",
            format!("provisioning {} hosts", np.spec.targets.len()),
        )],
        observed_generation: np.metadata.generation,
        ..np.status.clone().unwrap_or_default()
    };
    write_unless_same_reason(&ctx, &np, running).await?;
    let base = Settings {
        mesh: String::new(),
        broker: String::new(),
        broker_ca: None,
        mesh_key,
        agents: ctx.opts.agents.clone(),
        templates: ctx.opts.templates.clone(),
        known_hosts: ctx.opts.cache_dir.join("known_hosts"),
        trust_on_first_use: false,
        parallelism: 1,
        ssh_timeout: Duration::from_secs(10),
        enrol_timeout: Duration::from_secs(sidenet_provision::resource::DEFAULT_ENROL_TIMEOUT_S),
        wait_for_enrolment: true,
        shaping,
    };
    let profiles: Vec<_> = ctx.profiles.state().iter().map(|p| (**p).clone()).collect();
    let control = Arc::new(KubeControlPlane {
        ctx: ctx.clone(),
        handle: tokio::runtime::Handle::current(),
        tokens,
    });
    tracing::info!(provision = %key, mesh = %np.spec.mesh, hosts = np.spec.targets.len(), "provisioning");
    let task_ctx = ctx.clone();
    let (task_key, task_fp) = (key.clone(), fp.clone());
    let task = tokio::spawn(async move {
        let lookup = move |r: &SecretKeyRef| secrets.get(&(r.name.clone(), r.key.clone())).cloned();
        let started = crate::rfc3339(crate::now());
        let run = sidenet_provision::resource::run(
            &np,
            &lookup,
            base,
            profiles,
            control,
            Arc::new(sidenet_provision::Silent),
            &started,
        );
        // Deleting the object (or replacing it under the same name) stops the run.
        let uid = np.metadata.uid.clone();
        let gone = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = task_ctx.provision_obj(&ns_of(&*np), &np.name_any());
                if now.is_none_or(|o| o.metadata.uid != uid) {
                    return;
                }
            }
        };
        let mut status = tokio::select! {
            st = run => st,
            _ = gone => {
                tracing::info!(provision = %task_key, "NodeProvision deleted; its run stopped");
                task_ctx.provisions.lock().unwrap_or_else(|e| e.into_inner()).remove(&task_key);
                return;
            }
        };
        status.fingerprint = Some(task_fp.clone());
        finish(&task_ctx, &np, &task_key, &task_fp, status).await;
    });
    ctx.provisions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            key.clone(),
            RunningJob {
                fingerprint: fp,
                task: task.abort_handle(),
            },
        );
    succeeded(&ctx, &key);
    Ok(Action::await_change())
}

/// Writes `st` unless the status already has a condition with the same reason and message
/// (no write, and no new transition time, for a repeat).
async fn write_unless_same_reason(
    ctx: &Ctx,
    np: &NodeProvision,
    st: NodeProvisionStatus,
) -> Result<(), KubeError> {
    let same = np.status.as_ref().is_some_and(|o| {
        o.conditions.len() == 1
            && st.conditions.len() == 1
            && o.conditions[0].reason == st.conditions[0].reason
            && o.conditions[0].message == st.conditions[0].message
            && o.observed_generation == st.observed_generation
    });
    if !same {
        write(ctx, np, &st).await?;
    }
    Ok(())
}

/// A run ended: its status (with the fingerprint) goes onto the object, with an Event.
async fn finish(ctx: &Ctx, np: &NodeProvision, key: &str, fp: &str, status: NodeProvisionStatus) {
    {
        let mut jobs = ctx.provisions.lock().unwrap_or_else(|e| e.into_inner());
        match jobs.get(key) {
            Some(j) if j.fingerprint == fp => {
                jobs.remove(key);
            }
            _ => return, // superseded or removed
        }
    }
    let ok = status.failed == 0
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True");
    tracing::info!(provision = %key, succeeded = status.succeeded, failed = status.failed, "provisioning finished");
    // The latest version of the object: the status patch is computed against what is stored.
    let latest = ctx
        .provision_obj(&ns_of(np), &np.name_any())
        .unwrap_or_else(|| Arc::new(np.clone()));
    if let Err(e) = write(ctx, &latest, &status).await {
        tracing::warn!(provision = %key, "cannot write the results: {e}");
        return;
    }
    let failed: Vec<String> = status
        .hosts
        .iter()
        .filter(|h| h.result == "Failed")
        .map(|h| format!("{}: {}", h.host, h.message))
        .collect();
    let (type_, reason, note) = if ok {
        (
            EventType::Normal,
            "Provisioned",
            format!("{} hosts provisioned", status.succeeded),
        )
    } else {
        let why = status
            .conditions
            .first()
            .map(|c| c.message.clone())
            .unwrap_or_default();
        (
            EventType::Warning,
            "ProvisioningFailed",
            format!(
                "{} succeeded, {} failed: {}",
                status.succeeded,
                status.failed,
                if failed.is_empty() {
                    why
                } else {
                    failed.join("; ")
                }
            ),
        )
    };
    ctx.event(&latest.object_ref(&()), type_, reason, note)
        .await;
}

/// Stops the jobs whose object is gone.
fn sweep(ctx: &Ctx) {
    let mut jobs = ctx.provisions.lock().unwrap_or_else(|e| e.into_inner());
    jobs.retain(|key, j| {
        let mut parts = key.splitn(3, '/');
        let (_, ns, name) = (parts.next(), parts.next(), parts.next());
        let alive = match (ns, name) {
            (Some(ns), Some(name)) => ctx.provision_obj(ns, name).is_some(),
            _ => false,
        };
        if !alive {
            j.task.abort();
            tracing::info!(provision = %key, "NodeProvision deleted; its run stopped");
        }
        alive
    });
}

/// The controller as provisioning sees it, in Kubernetes mode: node phases from the engine,
/// tokens minted into the mesh's token Secret. Called from provisioning's blocking threads.
struct KubeControlPlane {
    ctx: Arc<Ctx>,
    handle: tokio::runtime::Handle,
    tokens: bool,
}

impl ControlPlane for KubeControlPlane {
    fn node(&self, mesh: &str, node: &str) -> Result<Option<NodeSeen>, String> {
        self.handle.block_on(async {
            let engine = self.ctx.engine().await.map_err(|e| e.to_string())?;
            let eng = engine.lock().await;
            let row = eng.ctl.status_of(node).or_else(|| {
                eng.ctl
                    .pending
                    .get(node)
                    .and_then(|_| eng.ctl.status().into_iter().find(|r| r.node == node))
            });
            Ok(row.filter(|r| r.mesh == mesh).map(|n| NodeSeen {
                phase: n.phase,
                online: n.online,
                agent_version: n.agent_version,
                agent_epoch: n.agent_epoch,
                missing: n.missing,
            }))
        })
    }

    fn enrolment_token(&self, mesh: &str) -> Result<Option<String>, String> {
        if !self.tokens {
            return Ok(None);
        }
        self.handle.block_on(async {
            let engine = self.ctx.engine().await.map_err(|e| e.to_string())?;
            let mut eng = engine.lock().await;
            super::tokens::mint(&self.ctx, &mut eng, mesh, 24 * 3600)
                .await
                .map(Some)
        })
    }
}
