//! Staged rollouts in standalone mode: the admin requests of `sidenetctl rollout` and the
//! periodic step (docs/rollouts.md).

use crate::admin::Response;
use crate::reconcile::core::{Controller, RolloutAction};

/// Moves running rollouts on (after every turn of the event loop, and once a second).
pub(super) fn tick(ctl: &mut Controller) {
    if let Err(e) = ctl.rollout_tick(crate::now()) {
        tracing::error!("rollout: {e}");
    }
}

/// `{"op":"rollout","action":...,"mesh":...}`.
pub(super) fn admin(ctl: &mut Controller, action: &str, mesh: Option<&str>, now: u64) -> Response {
    let act = match action {
        "status" => {
            let mut rollouts = ctl.rollout_status(now);
            if let Some(m) = mesh {
                let net = ctl
                    .set
                    .mesh_by_network(m)
                    .and_then(|x| x.metadata.name.clone());
                rollouts.retain(|r| r.mesh == m || Some(&r.mesh) == net.as_ref());
            }
            return Response::Rollouts { rollouts };
        }
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "abort" => RolloutAction::Abort,
        other => {
            return Response::Error {
                message: format!(
                    "unknown rollout action {other:?}; expected status, pause, resume or abort"
                ),
            };
        }
    };
    let Some(mesh) = mesh else {
        return Response::Error {
            message: format!("rollout {action} needs a mesh (--mesh MESH)"),
        };
    };
    match ctl.rollout_action(mesh, act, now) {
        Ok(s) => Response::Rollouts { rollouts: vec![s] },
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}
