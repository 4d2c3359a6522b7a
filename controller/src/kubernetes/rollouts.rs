//! Staged rollouts in Kubernetes mode (docs/rollouts.md, "Kubernetes mode"): the core stages
//! Mesh changes as in standalone mode; here the rollouts are stepped once a second, and
//! `kubectl annotate mesh NAME sidenet.io/rollout=pause|resume|abort` is acted on (an Event
//! tells the outcome, the annotation is removed). Their records live in the Mesh status
//! ([`super::rollstate`], written by [`super::publish`]); conditions and Events on every change
//! of phase or wave come with the Mesh status ([`super::meshes::write_mesh_status`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use sidenet_crds::Mesh;

use super::engine::{Ctx, Engine, key_of, ns_of};
use super::options::KubeError;
use super::rollstate::{ANNOTATION, short};
use crate::reconcile::core::RolloutAction;

/// Steps the rollouts once a second, for as long as this pod leads.
pub(crate) async fn ticker(ctx: Arc<Ctx>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Ok(engine) = ctx.engine().await else {
            continue;
        };
        let mut eng = engine.lock().await;
        if let Err(e) = tick(&ctx, &mut eng).await {
            tracing::warn!("rollouts: {e}");
        }
    }
}

/// Acts on the annotations, steps every rollout, persists and publishes, and writes the
/// status (conditions) and Events of every Mesh with a rollout.
pub(crate) async fn tick(ctx: &Ctx, eng: &mut Engine) -> Result<(), KubeError> {
    if !eng.synced {
        return Ok(());
    }
    let now = crate::now();
    annotations(ctx, eng, now).await;
    eng.ctl.rollout_tick(now)?;
    super::publish::persist_and_publish(ctx, eng, Instant::now()).await?;
    let meshes: Vec<(String, String)> = eng
        .ctl
        .store
        .rollouts
        .iter()
        .filter(|(_, r)| r.progress.is_some())
        .filter_map(|(m, _)| {
            eng.claims
                .mesh_names
                .get(m)
                .map(|ns| (ns.clone(), m.clone()))
        })
        .collect();
    for (ns, name) in meshes {
        let Some(problems) = eng
            .rollouts
            .problems
            .get(&key_of("Mesh", &ns, &name))
            .cloned()
        else {
            continue;
        };
        let Some(m) = ctx.mesh_obj(&ns, &name) else {
            continue;
        };
        super::meshes::write_mesh_status(ctx, eng, &m, problems).await?;
    }
    Ok(())
}

/// Acts on `sidenet.io/rollout` annotations (once per resourceVersion), tells the outcome by
/// an Event, and removes the annotation.
async fn annotations(ctx: &Ctx, eng: &mut Engine, now: u64) {
    for m in ctx.meshes.state() {
        let Some(value) = m.annotations().get(ANNOTATION).cloned() else {
            continue;
        };
        let (ns, name) = (ns_of(&*m), m.name_any());
        if !eng.claims.owns_mesh(&ns, &name) {
            continue;
        }
        let key = key_of("Mesh", &ns, &name);
        let rv = m.resource_version().unwrap_or_default();
        if eng.rollouts.acted.get(&key) == Some(&rv) {
            continue;
        }
        eng.rollouts.acted.insert(key, rv);
        let action = match value.trim() {
            "pause" => Ok(RolloutAction::Pause),
            "resume" => Ok(RolloutAction::Resume),
            "abort" => Ok(RolloutAction::Abort),
            other => Err(format!(
                "unknown value {other:?}; expected pause, resume or abort"
            )),
        };
        let result = action.and_then(|a| {
            eng.ctl
                .rollout_action(&name, a, now)
                .map_err(|e| e.to_string())
        });
        let reference = m.object_ref(&());
        match result {
            Ok(s) => {
                tracing::info!(mesh = %name, "{ANNOTATION}={value}: rollout {} is {:?}", short(&s.id), s.phase);
                ctx.event(
                    &reference,
                    EventType::Normal,
                    "RolloutAnnotation",
                    format!(
                        "{ANNOTATION}={value}: the rollout {} is {:?} now",
                        short(&s.id),
                        s.phase
                    ),
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(mesh = %name, "{ANNOTATION}={value}: {e}");
                ctx.event(
                    &reference,
                    EventType::Warning,
                    "RolloutAnnotationRefused",
                    format!("{ANNOTATION}={value}: {e}"),
                )
                .await;
            }
        }
        // Acted on: the annotation goes (a JSON merge patch of the Mesh's metadata).
        let api: Api<Mesh> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"metadata": {"annotations": {ANNOTATION: null}}});
        if let Err(e) = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(mesh = %name, "cannot remove the annotation {ANNOTATION} of Mesh {ns}/{name}: {e}");
        }
    }
}
