//! Status of `MeshNode` and `Mesh` objects: pure functions from what the core knows to the
//! status subresource, so they are tested without an API server.
//!
//! Conditions of a MeshNode:
//!
//! | Type | True when | Reasons |
//! | --- | --- | --- |
//! | `Enrolled` | the node proved its key (enrolment request) | `Enrolled`, `NotEnrolled` |
//! | `Approved` | auto mode, `spec.approved`, or a valid token | `AutoEnrollment`, `Approved`, `Token`, `WaitingForApproval` |
//! | `ConfigApplied` | the node reports running the desired revision | `Applied`, `NotApplied`, `Blocked`, `ApplyFailed`, `NotEnrolled` |
//! | `Drifted` | the node runs another revision or other content than desired | `RevisionMismatch`, `ContentMismatch`, `InSync` |
//! | `Degraded` | invalid spec, blocked, missing packages, failed apply or offline | `InvalidSpec`, `MissingPackages`, `Blocked`, `ApplyFailed`, `Offline`, `AsExpected` |
//! | `Ready` | phase `Ready` | the phase |

use sidenet_crds::{
    Condition, EnrollmentMode, LinkStatus, Mesh, MeshNode, MeshNodeStatus, MeshStatus,
};

use crate::reconcile::model::StatusRow;
use crate::reconcile::store::Published;

pub use crate::time::rfc3339;
use jiff::Timestamp;

fn cond(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: None,
        observed_generation: generation,
    }
}

/// Keeps `lastTransitionTime` of conditions whose status did not change; stamps `now` on the
/// others.
pub fn carry_transitions(new: &mut [Condition], old: &[Condition], now: u64) {
    for c in new.iter_mut() {
        let prev = old.iter().find(|o| o.type_ == c.type_);
        c.last_transition_time = match prev {
            Some(p) if p.status == c.status && p.last_transition_time.is_some() => {
                p.last_transition_time.clone()
            }
            _ => Some(rfc3339(now)),
        };
    }
}

/// Inputs of a MeshNode's status besides the core's row.
#[derive(Debug, Default)]
pub struct NodeFacts<'a> {
    /// The node's mesh, if it is in the validated set.
    pub mesh: Option<&'a Mesh>,
    /// The published record (revision, body hash).
    pub published: Option<&'a Published>,
    /// Subnet id allocated to the node.
    pub subnet_id: Option<u16>,
    /// Whether the core holds an enrolment record.
    pub enrolled: bool,
    /// Whether that record says approved (token or `sidenetctl approve`).
    pub record_approved: bool,
    /// Hostname reported at enrolment.
    pub reported_hostname: Option<String>,
    /// Public key of the enrolment record.
    pub enrolled_key: Option<String>,
    /// The node logs in to the broker with its own password.
    pub broker_login: bool,
    /// Body hash the node reports running.
    pub applied_sha256: Option<String>,
    /// Why this object's current spec is not used (validation error), if so.
    pub invalid: Option<String>,
    /// The node's links as it last reported them (`None`: keep what the status has).
    pub links: Option<Vec<LinkStatus>>,
    /// The signed envelope of `published` (base64), kept in status with the embedded broker
    /// (`status.configEnvelope`, docs/helm.md "Restarts").
    pub envelope: Option<String>,
}

/// A node's WireGuard links from its last status report: babel's neighbours, with the
/// pathfinder probes' latency and loss towards the same peer.
pub fn links(rec: &crate::reconcile::store::NodeRecord) -> Vec<LinkStatus> {
    rec.neighbours
        .iter()
        .filter_map(|n| {
            let peer = n.node.clone()?;
            let probe = rec.probes.iter().find(|p| p.node.as_deref() == Some(&peer));
            Some(LinkStatus {
                up: n.cost.is_none_or(|c| c < 65535),
                interface: n.interface.clone(),
                cost: n.cost,
                rtt_ms: probe.and_then(|p| p.rtt_ms),
                loss: probe.map(|p| p.loss),
                peer,
            })
        })
        .collect()
}

/// The status a MeshNode should have. Conditions come without transition times (see
/// [`carry_transitions`]).
pub fn node_status(node: &MeshNode, row: Option<&StatusRow>, f: &NodeFacts<'_>) -> MeshNodeStatus {
    let g = node.metadata.generation;
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut conditions = Vec::new();
    conditions.push(if f.enrolled {
        cond(
            "Enrolled",
            true,
            "Enrolled",
            "the node proved its key and enrolled".into(),
            g,
        )
    } else {
        cond(
            "Enrolled",
            false,
            "NotEnrolled",
            "the node has not enrolled yet: no config is published before it does (the config carries the mesh passphrase sealed to the node's key)".into(),
            g,
        )
    });
    let mode = f.mesh.map(|m| m.spec.enrollment.mode);
    conditions.push(match mode {
        Some(EnrollmentMode::Auto) => cond(
            "Approved",
            true,
            "AutoEnrollment",
            "the mesh admits every node that proves its key".into(),
            g,
        ),
        _ if node.spec.approved => {
            cond("Approved", true, "Approved", "spec.approved is true".into(), g)
        }
        Some(EnrollmentMode::Token) if f.record_approved => cond(
            "Approved",
            true,
            "Token",
            "the node presented a valid enrolment token".into(),
            g,
        ),
        _ if f.record_approved => cond("Approved", true, "Approved", "approved by an admin".into(), g),
        _ => cond(
            "Approved",
            false,
            "WaitingForApproval",
            format!(
                "approve with: kubectl patch meshnode {name} --type merge -p '{{\"spec\":{{\"approved\":true}}}}'"
            ),
            g,
        ),
    });
    let desired = row.and_then(|r| r.desired);
    let applied = row.and_then(|r| r.applied);
    let phase = match (&f.invalid, row) {
        (Some(_), _) => "Invalid".to_string(),
        (None, Some(r)) => r.phase.clone(),
        (None, None) => "Unknown".to_string(),
    };
    let blocked = row
        .and_then(|r| r.reason.clone())
        .filter(|_| phase == "Blocked");
    let failure = row.and_then(|r| r.failure.clone());
    conditions.push(if desired.is_some() && desired == applied {
        cond(
            "ConfigApplied",
            true,
            "Applied",
            format!("the node runs revision {}", desired.map_or(0, |d| d.rev)),
            g,
        )
    } else if let Some(b) = &blocked {
        cond("ConfigApplied", false, "Blocked", b.clone(), g)
    } else if phase == "Failed" {
        cond(
            "ConfigApplied",
            false,
            "ApplyFailed",
            failure
                .clone()
                .unwrap_or_else(|| "the node could not apply its config".into()),
            g,
        )
    } else if !f.enrolled {
        cond(
            "ConfigApplied",
            false,
            "NotEnrolled",
            "waiting for the node to enrol and apply its config".into(),
            g,
        )
    } else {
        cond(
            "ConfigApplied",
            false,
            "NotApplied",
            format!(
                "desired revision {}, the node reports {}",
                desired.map_or("none".to_string(), |d| d.rev.to_string()),
                applied.map_or("none".to_string(), |a| a.rev.to_string())
            ),
            g,
        )
    });
    let drift = match (applied, desired) {
        (Some(a), Some(d)) if a != d => Some((
            "RevisionMismatch",
            format!("the node runs revision {}, desired {}", a.rev, d.rev),
        )),
        (Some(_), Some(_))
            if f.applied_sha256.is_some()
                && f.published.map(|p| &p.sha256) != f.applied_sha256.as_ref() =>
        {
            Some((
                "ContentMismatch",
                "the node runs the desired revision with other content".to_string(),
            ))
        }
        _ => None,
    };
    conditions.push(match drift {
        Some((reason, msg)) => cond("Drifted", true, reason, msg, g),
        None => cond("Drifted", false, "InSync", "no drift observed".into(), g),
    });
    let degraded = if let Some(e) = &f.invalid {
        Some(("InvalidSpec", format!("this spec is not used: {e}")))
    } else if let Some(b) = blocked
        .as_ref()
        .filter(|_| row.is_some_and(|r| !r.missing.is_empty()))
    {
        Some(("MissingPackages", b.clone()))
    } else if let Some(b) = &blocked {
        Some(("Blocked", b.clone()))
    } else if phase == "Failed" {
        Some((
            "ApplyFailed",
            failure.unwrap_or_else(|| "the node could not apply its config".into()),
        ))
    } else if phase == "Offline" {
        Some(("Offline", "the node's agent is offline".to_string()))
    } else {
        None
    };
    conditions.push(match degraded {
        Some((reason, msg)) => cond("Degraded", true, reason, msg, g),
        None => cond(
            "Degraded",
            false,
            "AsExpected",
            "nothing wrong observed".into(),
            g,
        ),
    });
    conditions.push(cond(
        "Ready",
        phase == "Ready",
        &phase,
        if phase == "Ready" {
            "the node runs its desired config".to_string()
        } else {
            format!("phase {phase}")
        },
        g,
    ));
    MeshNodeStatus {
        phase: Some(phase),
        desired_revision: desired.map(|d| d.rev),
        applied_revision: applied.map(|a| a.rev),
        last_seen: row.and_then(|r| r.last_seen).map(rfc3339),
        addresses: row.and_then(|r| r.address.clone()).into_iter().collect(),
        conditions,
        links: f.links.clone().unwrap_or_else(|| {
            node.status
                .as_ref()
                .map(|s| s.links.clone())
                .unwrap_or_default()
        }),
        services: match row.filter(|r| r.last_seen.is_some()) {
            Some(r) => r
                .services
                .iter()
                .map(|s| sidenet_crds::ServicePathStatus {
                    name: s.name.clone(),
                    owner: s.node.clone(),
                    via: s.via.clone(),
                    since: rfc3339(s.since),
                    why: s.why.clone(),
                })
                .collect(),
            None => node
                .status
                .as_ref()
                .map(|s| s.services.clone())
                .unwrap_or_default(),
        },
        observed_generation: g,
        desired_epoch: f.published.map(|p| p.revision.epoch),
        config_sha256: f.published.map(|p| p.sha256.clone()),
        config_issued_at: f.published.map(|p| p.iat).filter(|t| *t > 0),
        config_expires_at: f.published.map(|p| p.exp).filter(|t| *t > 0),
        config_envelope: f.envelope.clone(),
        subnet_id: f.subnet_id,
        reported_hostname: f.reported_hostname.clone(),
        enrolled_key: f.enrolled_key.clone(),
        broker_login: f.broker_login,
    }
}

/// How far `lastSeen` may lag before it alone is worth a status write, in seconds: a node
/// that only keeps reporting costs at most one write per 10 minutes (the phase, `Offline`
/// included, is written as soon as it changes).
pub const LAST_SEEN_STEP: i64 = 600;

/// Whether writing `new` over `old` is worth an API call: not when only `lastSeen` moved by
/// less than `min_seen_step` seconds (a node reports every few seconds) and the links changed
/// at most in their measurements (`rttMs`, `loss`), which move with every report.
pub fn worth_writing(
    old: Option<&MeshNodeStatus>,
    new: &MeshNodeStatus,
    min_seen_step: i64,
) -> bool {
    let Some(old) = old else { return true };
    if old == new {
        return false;
    }
    let mut a = old.clone();
    a.last_seen = new.last_seen.clone();
    let same_links = a.links.len() == new.links.len()
        && a.links.iter().zip(&new.links).all(|(x, y)| {
            (&x.peer, &x.interface, x.up, x.cost) == (&y.peer, &y.interface, y.up, y.cost)
        });
    if same_links {
        a.links = new.links.clone();
    }
    if a != *new {
        return true;
    }
    let parse = |s: &Option<String>| s.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
    match (parse(&old.last_seen), parse(&new.last_seen)) {
        (Some(o), Some(n)) => n.as_second() - o.as_second() >= min_seen_step,
        (None, None) => false,
        _ => true,
    }
}

/// The JSON merge patch (RFC 7386) that turns `old` into `new`: changed and added fields,
/// and an explicit `null` for every field `new` leaves out (a writer skips empty optional
/// fields, and a merge patch without the field would leave the old value on the server).
/// Objects are merged field by field, anything else is replaced whole.
pub fn merge_patch(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = serde_json::Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) if ov == nv => {}
                    Some(ov) if ov.is_object() && nv.is_object() => {
                        out.insert(k.clone(), merge_patch(ov, nv));
                    }
                    _ => {
                        out.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in o.keys() {
                if !n.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

/// Inputs of a Mesh's status.
#[derive(Debug, Default)]
pub struct MeshFacts {
    /// Public key, when the signing key is loaded.
    pub public_key: Option<String>,
    /// Problems with the Mesh (invalid spec, signing key, passphrase).
    pub problems: Vec<(String, String)>,
    /// Enrolled nodes.
    pub nodes: u32,
    /// The controller's state epoch.
    pub epoch: u64,
    /// Highest revision counter published in this mesh (in `epoch`).
    pub highest_revision: u64,
    /// The staged rollout's record, when the core has one.
    pub rollout: Option<sidenet_crds::MeshRolloutStatus>,
    /// `RolloutProgressing` and `RolloutHalted` ([`rollout_conditions`]), once a rollout
    /// started.
    pub rollout_conditions: Vec<Condition>,
}

/// The conditions of a Mesh with a rollout (docs/rollouts.md, "Kubernetes mode"):
///
/// | Phase | `RolloutProgressing` | `RolloutHalted` |
/// | --- | --- | --- |
/// | Progressing | True, `Progressing` | False, `Progressing` |
/// | Paused | False, `Paused` | False, `Paused` |
/// | Halted | False, `Halted` | True, `FailureBudgetExceeded`, naming the failed nodes |
/// | Aborted | False, `Aborted` | True, `Aborted` |
/// | Complete | False, `Complete` | False, `Complete` |
///
/// `names` maps node ids to MeshNode names. Messages are cut to 1024 bytes.
pub fn rollout_conditions(
    s: &crate::reconcile::rollout::Status,
    names: &std::collections::BTreeMap<String, String>,
    generation: Option<i64>,
) -> Vec<Condition> {
    use crate::reconcile::rollout::Phase;
    let id = &s.id[..s.id.len().min(12)];
    let n = s.waves.len();
    let nodes = s.waves.get(s.wave).map_or(0, |w| w.nodes.len());
    let stopped = |what: &str| {
        format!(
            "rollout {id} {what} at wave {} of {n} (see RolloutHalted)",
            s.wave
        )
    };
    let (progressing, p_msg) = match s.phase {
        Phase::Progressing => (
            true,
            format!(
                "rollout {id}: wave {} of {n} ({nodes} nodes) handed out",
                s.wave
            ),
        ),
        Phase::Paused => (
            false,
            format!(
                "rollout {id} paused at wave {} of {n}: no new wave starts (annotate sidenet.io/rollout=resume)",
                s.wave
            ),
        ),
        Phase::Halted => (false, stopped("halted")),
        Phase::Aborted => (false, stopped("aborted")),
        Phase::Complete => (false, format!("rollout {id} complete: every wave healthy")),
    };
    let phase = format!("{:?}", s.phase);
    let (halted, h_reason, h_msg) = match s.phase {
        Phase::Halted => (
            true,
            "FailureBudgetExceeded".to_string(),
            format!(
                "rollout {id} halted at wave {}: {} failed nodes (budget {}): {}; the nodes that got it are sent the last good content again",
                s.wave,
                s.failed.len(),
                s.failure_budget,
                super::rollstate::failed_text(s, names)
            ),
        ),
        Phase::Aborted => (
            true,
            "Aborted".to_string(),
            format!(
                "rollout {id} aborted at wave {}: the nodes that got it are sent the last good content again",
                s.wave
            ),
        ),
        _ => (
            false,
            phase.clone(),
            format!("rollout {id} is {phase}: not halted"),
        ),
    };
    let cut = super::engine::truncate_note;
    vec![
        cond(
            "RolloutProgressing",
            progressing,
            &phase,
            cut(&p_msg),
            generation,
        ),
        cond("RolloutHalted", halted, &h_reason, cut(&h_msg), generation),
    ]
}

/// The status a Mesh should have.
pub fn mesh_status(mesh: &Mesh, f: &MeshFacts) -> MeshStatus {
    let g = mesh.metadata.generation;
    let mut conditions = Vec::new();
    match f.problems.first() {
        Some((reason, _)) => {
            let msg = f
                .problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            conditions.push(cond("Degraded", true, reason, msg.clone(), g));
            conditions.push(cond("Ready", false, reason, msg, g));
        }
        None => {
            conditions.push(cond(
                "Degraded",
                false,
                "AsExpected",
                "nothing wrong observed".into(),
                g,
            ));
            conditions.push(cond(
                "Ready",
                true,
                "Reconciled",
                "signing key loaded, configs published".into(),
                g,
            ));
        }
    }
    conditions.extend(f.rollout_conditions.iter().cloned());
    MeshStatus {
        conditions,
        observed_generation: g,
        public_key: f.public_key.clone(),
        nodes: f.nodes,
        state_epoch: Some(f.epoch),
        highest_revision: Some(f.highest_revision),
        rollout: f.rollout.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sidenet_wire::Revision;

    fn node(approved: bool) -> MeshNode {
        let mut n = MeshNode::new(
            "kitchen",
            serde_json::from_value(serde_json::json!({"mesh": "riverside", "nodeId": "qi4chuluc3u2giv7", "approved": approved}))
                .unwrap_or_else(|_| unreachable!()),
        );
        n.metadata.generation = Some(3);
        n
    }

    fn row(phase: &str, desired: u64, applied: Option<u64>) -> StatusRow {
        StatusRow {
            node: "qi4chuluc3u2giv7".into(),
            name: Some("kitchen".into()),
            mesh: "riverside".into(),
            hostname: None,
            phase: phase.into(),
            reason: None,
            online: Some(true),
            desired: Some(Revision {
                epoch: 1,
                rev: desired,
            }),
            applied: applied.map(|rev| Revision { epoch: 1, rev }),
            last_seen: Some(1_700_000_000),
            address: Some("fd00::1".into()),
            failure: None,
            neighbours: vec![],
            probes: vec![],
            agent_version: Some("0.1.0".into()),
            agent_epoch: Some(1_700_000_000),
            missing: vec![],
            shaping: None,
            services: Vec::new(),
        }
    }

    fn get<'a>(s: &'a MeshNodeStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| unreachable!())
    }

    fn rollout(
        phase: crate::reconcile::rollout::Phase,
        failed: &[&str],
    ) -> crate::reconcile::rollout::Status {
        use crate::reconcile::rollout::{Status, WaveStatus};
        let wave = |n: usize| WaveStatus {
            nodes: (0..n).map(|i| format!("node{i}")).collect(),
            healthy: 0,
            started: None,
            seconds: None,
        };
        Status {
            mesh: "riverside".into(),
            id: "0123456789abcdef".into(),
            phase,
            wave: 1,
            waves: vec![wave(2), wave(5), wave(10)],
            failed: failed
                .iter()
                .map(|n| (n.to_string(), "revision 7: rolled back".to_string()))
                .collect(),
            failure_budget: 0,
            bake_remaining: None,
            completed: None,
        }
    }

    #[test]
    fn rollout_conditions_follow_the_phase_and_name_the_failed_nodes() {
        use crate::reconcile::rollout::Phase;
        let names = std::collections::BTreeMap::from([(
            "qi4chuluc3u2giv7".to_string(),
            "kitchen".to_string(),
        )]);
        let get = |p: Phase, failed: &[&str]| {
            let c = rollout_conditions(&rollout(p, failed), &names, Some(4));
            assert_eq!(c.len(), 2);
            assert!(c.iter().all(|c| c.observed_generation == Some(4)));
            (
                (c[0].type_.clone(), c[0].status.clone(), c[0].reason.clone()),
                (
                    c[1].type_.clone(),
                    c[1].status.clone(),
                    c[1].reason.clone(),
                    c[1].message.clone(),
                ),
            )
        };
        let t = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        let (p, h) = get(Phase::Progressing, &[]);
        assert_eq!(p, t("RolloutProgressing", "True", "Progressing"));
        assert_eq!((h.0, h.1, h.2), t("RolloutHalted", "False", "Progressing"));
        let (p, h) = get(Phase::Paused, &[]);
        assert_eq!(p, t("RolloutProgressing", "False", "Paused"));
        assert_eq!((h.1, h.2), ("False".to_string(), "Paused".to_string()));
        let (p, h) = get(Phase::Halted, &["qi4chuluc3u2giv7", "bhctvmiyz6ovk27g"]);
        assert_eq!(p, t("RolloutProgressing", "False", "Halted"));
        assert_eq!(
            (h.1.as_str(), h.2.as_str()),
            ("True", "FailureBudgetExceeded")
        );
        assert!(
            h.3.contains("rollout 0123456789ab halted at wave 1: 2 failed nodes (budget 0)")
                && h.3
                    .contains("kitchen (qi4chuluc3u2giv7): revision 7: rolled back")
                && h.3.contains("bhctvmiyz6ovk27g: revision 7: rolled back"),
            "{}",
            h.3
        );
        let (p, h) = get(Phase::Aborted, &[]);
        assert_eq!(p, t("RolloutProgressing", "False", "Aborted"));
        assert_eq!((h.1.as_str(), h.2.as_str()), ("True", "Aborted"));
        let (p, h) = get(Phase::Complete, &[]);
        assert_eq!(p, t("RolloutProgressing", "False", "Complete"));
        assert_eq!((h.1.as_str(), h.2.as_str()), ("False", "Complete"));
        // Many failed nodes: the message is cut to the Event limit.
        let many: Vec<String> = (0..200).map(|i| format!("node{i:012}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let (_, h) = get(Phase::Halted, &many);
        assert!(h.3.len() <= 1024 && h.3.ends_with('…'), "{}", h.3.len());
    }

    #[test]
    fn ready_node_has_every_condition() {
        let n = node(true);
        let f = NodeFacts {
            enrolled: true,
            ..Default::default()
        };
        let s = node_status(&n, Some(&row("Ready", 2, Some(2))), &f);
        assert_eq!(s.phase.as_deref(), Some("Ready"));
        assert_eq!(get(&s, "Ready").status, "True");
        assert_eq!(get(&s, "ConfigApplied").status, "True");
        assert_eq!(get(&s, "Drifted").status, "False");
        assert_eq!(get(&s, "Degraded").status, "False");
        assert_eq!(get(&s, "Approved").reason, "Approved");
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.last_seen.as_deref(), Some("2023-11-14T22:13:20Z"));
    }

    #[test]
    fn missing_packages_degrade_the_node() {
        let n = node(true);
        let f = NodeFacts {
            enrolled: true,
            ..Default::default()
        };
        let mut r = row("Blocked", 3, Some(2));
        r.missing = vec!["babeld".into(), "wpad-mesh-mbedtls".into()];
        r.reason = Some("missing: babeld, wpad-mesh-mbedtls (the node lacks these packages; `sidenetctl provision` installs them)".into());
        let s = node_status(&n, Some(&r), &f);
        let d = get(&s, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "MissingPackages")
        );
        assert!(
            d.message.starts_with("missing: babeld, wpad-mesh-mbedtls"),
            "{}",
            d.message
        );
        assert_eq!(get(&s, "ConfigApplied").reason, "Blocked");
    }

    #[test]
    fn merge_patches_clear_what_the_new_status_leaves_out() {
        let old = json!({"brokerLogin": true, "phase": "Ready", "enrolledKey": "k",
                         "links": [{"peer": "a"}], "nested": {"a": 1, "b": 2}});
        let new = json!({"phase": "Ready", "links": [], "nested": {"a": 1}});
        assert_eq!(
            merge_patch(&old, &new),
            json!({"brokerLogin": null, "enrolledKey": null, "links": [], "nested": {"b": null}})
        );
        let mut applied = old.clone();
        json_merge(&mut applied, &merge_patch(&old, &new));
        assert_eq!(applied, new);
        assert_eq!(merge_patch(&new, &new), json!({}));
    }

    /// RFC 7386, to check the patches above.
    fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(t), Some(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }

    #[test]
    fn drift_and_pending_and_invalid() {
        let n = node(false);
        let f = NodeFacts {
            enrolled: true,
            ..Default::default()
        };
        let s = node_status(&n, Some(&row("Configuring", 3, Some(2))), &f);
        assert_eq!(get(&s, "Drifted").reason, "RevisionMismatch");
        assert_eq!(get(&s, "Approved").reason, "WaitingForApproval");
        assert!(
            get(&s, "Approved")
                .message
                .contains("kubectl patch meshnode kitchen")
        );
        let f = NodeFacts {
            invalid: Some("spec.mesh: no Mesh named \"x\"".into()),
            ..Default::default()
        };
        let s = node_status(&n, None, &f);
        assert_eq!(get(&s, "Degraded").reason, "InvalidSpec");
        assert_eq!(s.phase.as_deref(), Some("Invalid"));
    }

    #[test]
    fn transitions_are_kept_and_small_last_seen_moves_skipped() {
        let n = node(true);
        let f = NodeFacts {
            enrolled: true,
            ..Default::default()
        };
        let mut a = node_status(&n, Some(&row("Ready", 2, Some(2))), &f);
        carry_transitions(&mut a.conditions, &[], 100);
        let mut r = row("Ready", 2, Some(2));
        r.last_seen = Some(1_700_000_010);
        let mut b = node_status(&n, Some(&r), &f);
        carry_transitions(&mut b.conditions, &a.conditions, 200);
        assert_eq!(b.conditions, a.conditions);
        assert!(!worth_writing(Some(&a), &b, 60));
        r.last_seen = Some(1_700_000_100);
        let c = node_status(&n, Some(&r), &f);
        let mut c2 = c.clone();
        carry_transitions(&mut c2.conditions, &a.conditions, 300);
        assert!(worth_writing(Some(&a), &c2, 60));
        assert!(!worth_writing(Some(&a), &c2, LAST_SEEN_STEP));
        // New link measurements alone wait for lastSeen; a link going down does not.
        let link = |up: bool, rtt: f64| LinkStatus {
            peer: "bhctvmiyz6ovk27g".into(),
            interface: "wg0".into(),
            up,
            cost: Some(96),
            rtt_ms: Some(rtt),
            loss: Some(0.0),
        };
        let (mut d, mut e) = (b.clone(), b.clone());
        d.links = vec![link(true, 3.0)];
        e.links = vec![link(true, 9.5)];
        assert!(!worth_writing(Some(&d), &e, LAST_SEEN_STEP));
        e.links = vec![link(false, 9.5)];
        assert!(worth_writing(Some(&d), &e, LAST_SEEN_STEP));
    }
}
