//! The Mesh and HardwareProfile reconcilers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use sidenet_crds::{HardwareProfile, Mesh};
use sidenet_wire::topics::{self};

use super::engine::{Ctx, Engine, FINALIZER, finalizer_err, key_of, ns_of, succeeded};
use super::options::KubeError;
use super::publish::{clear_node, persist_and_publish, update_phases};
use super::rollstate::{self, ANNOTATION};
use super::status::{self, MeshFacts};
use super::sync::sync;
use crate::reconcile::model::Publish;
use crate::reconcile::rollout::{Phase, Status};
use crate::spec::manifest::network_name;

/// Reconciles one Mesh: its Secrets, status and, on deletion, every node's retained config.
pub(crate) async fn reconcile_mesh(mesh: Arc<Mesh>, ctx: Arc<Ctx>) -> Result<Action, KubeError> {
    ctx.metrics.reconciled("Mesh");
    let ns = ns_of(&*mesh);
    let api: Api<Mesh> = Api::namespaced(ctx.client.clone(), &ns);
    let key = key_of("Mesh", &ns, &mesh.name_any());
    let action = finalizer(&api, FINALIZER, mesh, |ev| async {
        match ev {
            finalizer::Event::Apply(m) => apply_mesh(&ctx, &m).await,
            finalizer::Event::Cleanup(m) => cleanup_mesh(&ctx, &m).await,
        }
    })
    .await
    .map_err(finalizer_err)?;
    succeeded(&ctx, &key);
    Ok(action)
}

pub(crate) async fn apply_mesh(ctx: &Ctx, mesh: &Mesh) -> Result<Action, KubeError> {
    let started = Instant::now();
    let loaded = super::state::load_mesh_secrets(&ctx.client, mesh).await;
    let mut problems = Vec::new();
    if let Err(e) = &loaded.key {
        problems.push(("SigningKeyMissing".to_string(), e.clone()));
    }
    if let Err(e) = &loaded.passphrase {
        problems.push(("PassphraseMissing".to_string(), e.clone()));
    }
    let engine = ctx.engine().await?;
    let ns = ns_of(mesh);
    let name = mesh.name_any();
    let net = network_name(mesh).to_string();
    // Only the Mesh that owns its name and network name hands its keys to the core: a
    // same-named Mesh in another namespace must never replace the running one's signing key
    // or passphrase. Without a rival (the usual case) the keys go in before the set is
    // synced, so the nodes never see a mesh without keys.
    let rival = ctx.meshes.state().iter().any(|m| {
        (ns_of(&**m), m.name_any()) != (ns.clone(), name.clone())
            && (m.name_any() == name || network_name(m) == net)
    });
    let mut loaded = Some(loaded);
    let put = |loaded: &mut Option<super::state::Loaded>| {
        loaded.take().is_some_and(|l| {
            ctx.secrets
                .lock()
                .map(|mut c| c.put(mesh, l))
                .unwrap_or(false)
        })
    };
    let mut changed = !rival && put(&mut loaded);
    let mut eng = engine.lock().await;
    if changed {
        eng.force = true;
    }
    sync(ctx, &mut eng).await?;
    let owner = eng.claims.owns_mesh(&ns, &name);
    if rival && owner {
        changed = put(&mut loaded);
        if changed {
            eng.force = true;
            sync(ctx, &mut eng).await?;
        }
    }
    persist_and_publish(ctx, &mut eng, started).await?;
    if let Some(e) = eng.invalid.get(&key_of("Mesh", &ns, &name)) {
        problems.push(("InvalidSpec".to_string(), e.clone()));
    }
    let reference = mesh.object_ref(&());
    for (reason, msg) in &problems {
        if reason != "InvalidSpec" {
            ctx.warn_once(&mut eng, &reference, reason, msg.clone())
                .await;
        }
    }
    eng.rollouts
        .problems
        .insert(key_of("Mesh", &ns, &name), problems.clone());
    let again = if problems.is_empty() {
        ctx.opts.refresh
    } else {
        ctx.opts.refresh.min(Duration::from_secs(10))
    };
    write_mesh_status(ctx, &mut eng, mesh, problems).await?;
    update_phases(ctx, &mut eng);
    // A broken Secret is re-read soon (Secrets are not watched: the RBAC grants no watch).
    Ok(Action::requeue(again))
}

/// Writes the status of `mesh` when it changed: `problems` (from its last reconcile), its key,
/// nodes and revisions, and its rollout with the conditions `RolloutProgressing` and
/// `RolloutHalted`; tells rollout changes by Events (kubernetes::rollouts).
pub(crate) async fn write_mesh_status(
    ctx: &Ctx,
    eng: &mut Engine,
    mesh: &Mesh,
    problems: Vec<(String, String)>,
) -> Result<(), KubeError> {
    let ns = ns_of(mesh);
    let name = mesh.name_any();
    let net = network_name(mesh).to_string();
    let owner = eng.claims.owns_mesh(&ns, &name);
    let public_key = ctx
        .secrets
        .lock()
        .ok()
        .and_then(|c| c.public_key(&net))
        .filter(|_| owner);
    let rollout = if owner {
        eng.ctl
            .rollout_status(crate::now())
            .into_iter()
            .find(|r| r.mesh == name)
    } else {
        None
    };
    let names = rollstate::node_names(&eng.claims);
    let facts = MeshFacts {
        public_key,
        problems,
        nodes: if owner {
            u32::try_from(
                eng.ctl
                    .store
                    .nodes
                    .values()
                    .filter(|r| r.mesh == net)
                    .count(),
            )
            .unwrap_or(u32::MAX)
        } else {
            0
        },
        epoch: eng.ctl.store.epoch,
        highest_revision: if owner {
            eng.high_water.get(&net).copied().unwrap_or(0)
        } else {
            0
        },
        rollout: if owner {
            rollstate::field_of(&eng.ctl, &name)
        } else {
            None
        },
        rollout_conditions: rollout
            .as_ref()
            .map(|r| status::rollout_conditions(r, &names, mesh.metadata.generation))
            .unwrap_or_default(),
    };
    let mut new = status::mesh_status(mesh, &facts);
    let old = ctx.mesh_obj(&ns, &name).and_then(|m| m.status.clone());
    status::carry_transitions(
        &mut new.conditions,
        old.as_ref().map(|o| o.conditions.as_slice()).unwrap_or(&[]),
        crate::now(),
    );
    if old.as_ref() != Some(&new) {
        let api: Api<Mesh> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status::merge_patch(
                &serde_json::to_value(&old).unwrap_or_default(),
                &serde_json::to_value(&new).unwrap_or_default(),
            )})),
        )
        .await?;
    }
    announce_rollout(ctx, eng, mesh, rollout.as_ref()).await;
    Ok(())
}

pub(crate) async fn cleanup_mesh(ctx: &Ctx, mesh: &Mesh) -> Result<Action, KubeError> {
    let engine = ctx.engine().await?;
    let mut eng = engine.lock().await;
    let net = network_name(mesh).to_string();
    let name = mesh.name_any();
    if !eng.claims.owns_mesh(&ns_of(mesh), &name) {
        // A refused Mesh published nothing, and its network belongs to another one.
        return Ok(Action::await_change());
    }
    let mut ids: BTreeSet<String> = eng
        .topics
        .iter()
        .filter(|(_, t)| t.split('/').nth(2) == Some(net.as_str()))
        .map(|(id, _)| id.clone())
        .collect();
    ids.extend(
        eng.ctl
            .store
            .nodes
            .iter()
            .filter(|(_, r)| r.mesh == net)
            .map(|(id, _)| id.clone()),
    );
    ids.extend(
        ctx.nodes
            .state()
            .iter()
            .filter(|n| n.spec.mesh == name && ns_of(&***n) == ns_of(mesh))
            .map(|n| n.spec.node_id.clone()),
    );
    for id in ids {
        let topic = topics::config(&net, &id);
        clear_node(ctx, &mut eng, &id, Some(topic)).await?;
    }
    if ctx.connected.load(Ordering::SeqCst) {
        for topic in topics::announce_all(&net) {
            ctx.send(Publish {
                topic,
                payload: Vec::new(),
                retain: true,
            })
            .await?;
        }
    }
    eng.claims.mesh_names.remove(&name);
    eng.claims.networks.remove(&net);
    eng.force = true;
    persist_and_publish(ctx, &mut eng, Instant::now()).await?;
    Ok(Action::await_change())
}

/// HardwareProfiles have no status: a change re-reconciles the nodes (through the MeshNode
/// controller's watch) and the set here.
pub(crate) async fn reconcile_profile(
    _profile: Arc<HardwareProfile>,
    ctx: Arc<Ctx>,
) -> Result<Action, KubeError> {
    ctx.metrics.reconciled("HardwareProfile");
    let engine = ctx.engine().await?;
    let mut eng = engine.lock().await;
    sync(&ctx, &mut eng).await?;
    persist_and_publish(&ctx, &mut eng, Instant::now()).await?;
    Ok(Action::await_change())
}

/// An Event on the Mesh for every new rollout, wave and phase since the last one told.
pub(crate) async fn announce_rollout(
    ctx: &Ctx,
    eng: &mut Engine,
    mesh: &Mesh,
    status: Option<&Status>,
) {
    let name = mesh.name_any();
    let Some(s) = status else {
        return;
    };
    let now = (s.id.clone(), s.phase, s.wave);
    let before = eng.rollouts.reported.get(&name).cloned();
    if before.as_ref() == Some(&now) {
        return;
    }
    eng.rollouts.reported.insert(name.clone(), now);
    let names = rollstate::node_names(&eng.claims);
    let id = rollstate::short(&s.id);
    let n = s.waves.len();
    let nodes_of = |w: usize| s.waves.get(w).map_or(0, |w| w.nodes.len());
    let same_rollout = before.as_ref().is_some_and(|b| b.0 == s.id);
    let (kind, reason, note) = match s.phase {
        Phase::Progressing if !same_rollout => (
            EventType::Normal,
            "RolloutStarted",
            format!(
                "rollout {id} of the Mesh spec started: the canary ({} nodes) gets it first; {n} waves, failure budget {}",
                nodes_of(0),
                s.failure_budget
            ),
        ),
        Phase::Progressing if before.as_ref().is_some_and(|b| b.1 == Phase::Paused) => (
            EventType::Normal,
            "RolloutResumed",
            format!("rollout {id} resumed at wave {} of {n}", s.wave),
        ),
        Phase::Progressing => (
            EventType::Normal,
            "RolloutWaveStarted",
            format!(
                "rollout {id}: wave {} of {n} started ({} nodes); the waves before it are healthy and baked",
                s.wave,
                nodes_of(s.wave)
            ),
        ),
        Phase::Paused => (
            EventType::Normal,
            "RolloutPaused",
            format!(
                "rollout {id} paused at wave {} of {n}: no new wave starts (annotate {ANNOTATION}=resume to go on)",
                s.wave
            ),
        ),
        Phase::Halted => (
            EventType::Warning,
            "RolloutHalted",
            format!(
                "rollout {id} halted at wave {} of {n}: {} failed nodes (budget {}): {}; the nodes that got it are sent the last good content again, the others never get it",
                s.wave,
                s.failed.len(),
                s.failure_budget,
                rollstate::failed_text(s, &names)
            ),
        ),
        Phase::Aborted => (
            EventType::Warning,
            "RolloutAborted",
            format!(
                "rollout {id} aborted at wave {} of {n}: the nodes that got it are sent the last good content again",
                s.wave
            ),
        ),
        Phase::Complete => (
            EventType::Normal,
            "RolloutComplete",
            format!(
                "rollout {id} complete: every wave healthy ({}); its spec is the last good one",
                s.waves
                    .iter()
                    .enumerate()
                    .map(|(i, w)| format!(
                        "wave {i}: {} nodes{}",
                        w.nodes.len(),
                        w.seconds.map(|t| format!(" in {t} s")).unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    };
    tracing::info!(mesh = %name, "{reason}: {note}");
    ctx.event(&mesh.object_ref(&()), kind, reason, note).await;
}
