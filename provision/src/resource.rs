//! Controller mode: running a `NodeProvision` resource with the same implementation as the CLI
//! and turning the reports into its status.

use std::sync::Arc;
use std::time::Duration;

use sidenet_crds::{
    Condition, HardwareProfile, HostKeyPolicy, NodeProvision, NodeProvisionStatus, SecretKeyRef,
};

use crate::fleet::{Progress, provision};
use crate::host::{Context, ControlPlane};
use crate::plan::{Settings, targets_from_resource};
use crate::report::status;

/// Default seconds to wait for each node to enrol.
pub const DEFAULT_ENROL_TIMEOUT_S: u64 = 120;
/// Default hosts worked on at once.
pub const DEFAULT_PARALLELISM: u32 = 4;

/// Runs a `NodeProvision`: its targets, with credentials looked up by `secret`; the mesh,
/// broker, parallelism, host key policy and enrolment timeout from its spec; everything else
/// (the mesh key to pin, agent binaries, install descriptors, known hosts, SSH timeout) from the
/// controller's `base` settings. Returns the status to write; a spec that cannot run (a missing
/// Secret, an unreadable known_hosts) is a `Complete=False` status that names the problem.
pub async fn run(
    np: &NodeProvision,
    secret: &(dyn Fn(&SecretKeyRef) -> Option<String> + Sync),
    base: Settings,
    profiles: Vec<HardwareProfile>,
    control: Arc<dyn ControlPlane>,
    progress: Arc<dyn Progress>,
    now_rfc3339: &str,
) -> NodeProvisionStatus {
    let generation = np.metadata.generation;
    let invalid = |message: String| NodeProvisionStatus {
        conditions: vec![Condition {
            type_: "Complete".into(),
            status: "False".into(),
            reason: "InvalidSpec".into(),
            message,
            last_transition_time: Some(now_rfc3339.to_string()),
            observed_generation: generation,
        }],
        observed_generation: generation,
        ..NodeProvisionStatus::default()
    };
    let spec = &np.spec;
    let targets = match targets_from_resource(spec, secret) {
        Ok(t) => t,
        Err(e) => return invalid(e),
    };
    let settings = Settings {
        mesh: spec.mesh.clone(),
        broker: spec.broker.clone(),
        trust_on_first_use: spec.host_key_policy == HostKeyPolicy::TrustOnFirstUse,
        parallelism: spec.parallelism.unwrap_or(DEFAULT_PARALLELISM).max(1) as usize,
        enrol_timeout: Duration::from_secs(
            spec.enrollment_timeout_seconds
                .unwrap_or(DEFAULT_ENROL_TIMEOUT_S),
        ),
        wait_for_enrolment: true,
        ..base
    };
    let ctx = match Context::new(settings, profiles, control) {
        Ok(c) => Arc::new(c),
        Err(e) => return invalid(e.to_string()),
    };
    let reports = provision(targets, ctx, progress).await;
    status(&reports, generation, now_rfc3339)
}
