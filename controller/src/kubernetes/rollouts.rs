//! Staged rollouts in Kubernetes mode (docs/rollouts.md, "Kubernetes mode"): the core stages
//! Mesh changes as in standalone mode; here its records are kept in the Mesh status (written
//! before the configs they cause are published, read back by a restarted controller or a new
//! leader), the rollouts are stepped once a second, `kubectl annotate mesh NAME
//! sidenet.io/rollout=pause|resume|abort` is acted on (and the annotation removed), and every
//! change of phase or wave is told by an Event on the Mesh. The conditions `RolloutProgressing`
//! and `RolloutHalted` are computed by [`super::status::rollout_conditions`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use sidenet_crds::{Mesh, MeshRolloutStatus};

use super::engine::{Ctx, Engine, key_of, ns_of};
use super::options::KubeError;
use crate::reconcile::core::{Controller, RolloutAction};
use crate::reconcile::rollout::{Phase, Progress, Record, Status};
use crate::spec::manifest::network_name;

/// The annotation an admin sets on a Mesh to pause, resume or abort its rollout.
pub const ANNOTATION: &str = "sidenet.io/rollout";

/// What identifies a version of a record without serialising it: reached and gating nodes are
/// only added to within a rollout (a new rollout changes the fingerprints and the progress).
type Version = (String, String, Option<Progress>, usize, usize);

fn version(r: &Record) -> Version {
    (
        r.good_fp.clone(),
        r.target_fp.clone(),
        r.progress.clone(),
        r.reached.len(),
        r.gated.len(),
    )
}

/// What the adapter remembers about the rollouts.
#[derive(Debug, Default)]
pub struct Persisted {
    /// Mesh name → the version of the record its Mesh status holds, as last written or read.
    written: BTreeMap<String, Version>,
    /// Mesh name → (rollout id, phase, wave) last told by an Event.
    reported: BTreeMap<String, (String, Phase, usize)>,
    /// `Mesh/NS/NAME` → the problems its last reconcile found (the tick writes the whole
    /// status, and only of Meshes reconciled once).
    pub(crate) problems: BTreeMap<String, Vec<(String, String)>>,
    /// `Mesh/NS/NAME` → the resourceVersion whose annotation was acted on.
    acted: BTreeMap<String, String>,
}

/// Puts the records the Mesh status holds into the core (at the engine's start, before the
/// first sync). Of same-named Meshes, the oldest one's (the one that holds the name).
pub(crate) fn load(ctl: &mut Controller, meshes: &[Arc<Mesh>]) -> Persisted {
    let mut out = Persisted::default();
    let mut sorted: Vec<&Arc<Mesh>> = meshes.iter().collect();
    sorted.sort_by_key(|m| {
        (
            m.metadata.creation_timestamp.as_ref().map(|t| t.0),
            ns_of(&***m),
        )
    });
    for m in sorted {
        let (ns, name) = (ns_of(&**m), m.name_any());
        if out.written.contains_key(&name) {
            continue;
        }
        let Some(st) = m.status.as_ref().and_then(|s| s.rollout.as_ref()) else {
            continue;
        };
        if st.state.is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(&st.state) {
            Ok(rec) => {
                if let Some(p) = &rec.progress {
                    tracing::info!(mesh = %name, "rollout {} read back from Mesh {ns}/{name} status: {:?}, wave {}",
                        short(&p.id), p.phase, p.wave);
                    out.reported
                        .insert(name.clone(), (p.id.clone(), p.phase, p.wave));
                }
                out.written.insert(name.clone(), version(&rec));
                ctl.store.rollouts.insert(name, rec);
            }
            Err(e) => tracing::error!(
                mesh = %name,
                "status.rollout.state of Mesh {ns}/{name} cannot be read ({e}); its current spec counts as the last good one"
            ),
        }
    }
    out
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The status field of a record.
pub(crate) fn field(rec: &Record) -> MeshRolloutStatus {
    let mut f = MeshRolloutStatus {
        state: serde_json::to_string(rec).unwrap_or_default(),
        ..Default::default()
    };
    if let Some(p) = &rec.progress {
        f.id = Some(p.id.clone());
        f.phase = Some(format!("{:?}", p.phase));
        f.wave = u32::try_from(p.wave).ok();
        f.failed = p.failed.iter().map(|(n, w)| format!("{n}: {w}")).collect();
    }
    if let Some(plan) = &rec.plan {
        let waves = plan.waves.len() + 1 + usize::from(plan.waves.last() != Some(&100));
        f.waves = u32::try_from(waves).ok();
    }
    f
}

/// Whether the record of Mesh `name` goes into its status: once the Mesh has `spec.rollout` or
/// had a rollout. (Without either, the current spec is the last good one anyway: a Mesh that
/// never stages has no `status.rollout`.)
fn kept(eng: &Engine, name: &str, r: &Record) -> bool {
    r.progress.is_some()
        || eng
            .ctl
            .set
            .meshes
            .get(name)
            .is_some_and(|m| m.spec.rollout.is_some())
}

/// The status field of Mesh `name`, when the core has a record of it worth keeping.
pub(crate) fn field_of(eng: &Engine, name: &str) -> Option<MeshRolloutStatus> {
    eng.ctl
        .store
        .rollouts
        .get(name)
        .filter(|r| kept(eng, name, r))
        .map(field)
}

/// Writes every record that changed to its Mesh status. Returns the network names whose
/// record could not be written: their configs are held (a rollout's progress is durable
/// before the configs it causes are published).
pub(crate) async fn persist(ctx: &Ctx, eng: &mut Engine) -> BTreeSet<String> {
    let store = &eng.ctl.store.rollouts;
    eng.rollouts.written.retain(|m, _| store.contains_key(m));
    let store = &eng.ctl.store.rollouts;
    let changed: Vec<(String, Version, MeshRolloutStatus)> = store
        .iter()
        .filter(|(m, r)| kept(eng, m, r) && eng.rollouts.written.get(*m) != Some(&version(r)))
        .map(|(m, r)| (m.clone(), version(r), field(r)))
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

/// MeshNode names by node id (for messages).
pub(crate) fn node_names(eng: &Engine) -> BTreeMap<String, String> {
    eng.claims
        .nodes
        .iter()
        .map(|(id, (_, name))| (id.clone(), name.clone()))
        .collect()
}

/// `NAME (NODE_ID): WHY` for each failed node.
pub(crate) fn failed_text(s: &Status, names: &BTreeMap<String, String>) -> String {
    s.failed
        .iter()
        .map(|(n, why)| match names.get(n) {
            Some(name) if name != n => format!("{name} ({n}): {why}"),
            _ => format!("{n}: {why}"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// An Event on the Mesh for every new rollout, wave and phase since the last one told.
pub(crate) async fn announce(ctx: &Ctx, eng: &mut Engine, mesh: &Mesh, status: Option<&Status>) {
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
    let names = node_names(eng);
    let id = short(&s.id);
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
                failed_text(s, &names)
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
