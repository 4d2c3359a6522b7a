//! What Kubernetes mode keeps of the staged rollouts (docs/rollouts.md, "Kubernetes mode"):
//! the core's record of each Mesh, in the Mesh status (`status.rollout`), read back by a
//! restarted controller or a new leader; the annotation an admin sets; what the adapter
//! remembers between steps ([`Persisted`]). Written by [`super::publish`], stepped by
//! [`super::rollouts`], shown by [`super::meshes`] and [`super::status`].

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::ResourceExt;
use sidenet_crds::{Mesh, MeshRolloutStatus};

use super::tenancy::Claims;
use crate::reconcile::core::Controller;
use crate::reconcile::rollout::{Phase, Progress, Record, Status};

fn ns_of(m: &Mesh) -> String {
    m.metadata.namespace.clone().unwrap_or_default()
}

/// The annotation an admin sets on a Mesh to pause, resume or abort its rollout.
pub const ANNOTATION: &str = "sidenet.io/rollout";

/// What identifies a version of a record without serialising it: reached and gating nodes are
/// only added to within a rollout (a new rollout changes the fingerprints and the progress).
pub(crate) type Version = (String, String, Option<Progress>, usize, usize);

pub(crate) fn version(r: &Record) -> Version {
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
    pub(crate) written: BTreeMap<String, Version>,
    /// Mesh name → (rollout id, phase, wave) last told by an Event.
    pub(crate) reported: BTreeMap<String, (String, Phase, usize)>,
    /// `Mesh/NS/NAME` → the problems its last reconcile found (the tick writes the whole
    /// status, and only of Meshes reconciled once).
    pub(crate) problems: BTreeMap<String, Vec<(String, String)>>,
    /// `Mesh/NS/NAME` → the resourceVersion whose annotation was acted on.
    pub(crate) acted: BTreeMap<String, String>,
}

/// Puts the records the Mesh status holds into the core (at the engine's start, before the
/// first sync). Of same-named Meshes, the oldest one's (the one that holds the name).
pub(crate) fn load(ctl: &mut Controller, meshes: &[Arc<Mesh>]) -> Persisted {
    let mut out = Persisted::default();
    let mut sorted: Vec<&Arc<Mesh>> = meshes.iter().collect();
    sorted.sort_by_key(|m| {
        (
            m.metadata.creation_timestamp.as_ref().map(|t| t.0),
            ns_of(m),
        )
    });
    for m in sorted {
        let (ns, name) = (ns_of(m), m.name_any());
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

pub(crate) fn short(id: &str) -> &str {
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
pub(crate) fn kept(ctl: &Controller, name: &str, r: &Record) -> bool {
    r.progress.is_some()
        || ctl
            .set
            .meshes
            .get(name)
            .is_some_and(|m| m.spec.rollout.is_some())
}

/// The status field of Mesh `name`, when the core has a record of it worth keeping.
pub(crate) fn field_of(ctl: &Controller, name: &str) -> Option<MeshRolloutStatus> {
    ctl.store
        .rollouts
        .get(name)
        .filter(|r| kept(ctl, name, r))
        .map(field)
}

/// MeshNode names by node id (for messages).
pub(crate) fn node_names(claims: &Claims) -> BTreeMap<String, String> {
    claims
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
