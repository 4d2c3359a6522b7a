//! The controller's side of safe apply and of the pathfinder probes.
//!
//! - An agent that applied a config keeps it *on trial* until the controller has acknowledged a
//!   status report naming it ([`ack`]): the acknowledgement proves the round trip, so a config
//!   that cuts a node off from the controller is rolled back by the node itself.
//! - A revision that failed on a node is not re-signed with the same body ([`withhold`]); the
//!   node gets a new revision only when its config changes.
//! - A node that lacks packages its config needs is `Blocked` with the reason
//!   `missing: PACKAGE, ...` ([`missing_reason`]).
//! - [`prometheus`] turns the status table (with the links' babel costs and probe results) into
//!   Prometheus metrics (`sidenetctl metrics`).

use std::fmt::Write as _;

use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{Ack, Trial};
use sidenet_wire::{Header, Kind, Revision, topics};

use crate::reconcile::model::{Publish, StatusRow};
use crate::reconcile::store::{NodeRecord, Published};

/// Why a node is blocked on its own side: the packages its last status report says are missing
/// (it applies nothing new until they are installed).
pub fn missing_reason(rec: Option<&NodeRecord>) -> Option<String> {
    let missing = &rec?.missing;
    (!missing.is_empty()).then(|| {
        format!(
            "missing: {} (the node lacks these packages; `sidenetctl provision` installs them)",
            missing.join(", ")
        )
    })
}

/// How long an acknowledgement stays valid.
const ACK_VALIDITY: u64 = 300;

/// Whether to acknowledge a trial: only of a revision this controller published to the node.
pub fn should_ack(published: Option<&Published>, epoch: u64, trial: &Trial) -> bool {
    published.is_some_and(|p| {
        trial.revision.epoch == epoch
            && (trial.revision < p.revision
                || (trial.revision == p.revision && trial.sha256 == p.sha256))
    })
}

/// The signed acknowledgement of the status report `status_seq` of `node`, which carried
/// `trial`.
pub fn ack(
    key: &KeyPair,
    mesh: &str,
    node: &str,
    status_seq: Revision,
    trial: &Trial,
    now: u64,
) -> Publish {
    let body = Ack {
        revision: trial.revision,
        sha256: trial.sha256.clone(),
    };
    let header = Header {
        mesh: mesh.to_string(),
        node: Some(node.to_string()),
        epoch: status_seq.epoch,
        rev: status_seq.rev,
        iat: now,
        exp: now + ACK_VALIDITY,
        len: 0,
        sha256: String::new(),
    };
    Publish {
        topic: topics::ack(mesh, node),
        payload: seal(
            Kind::Ack,
            header,
            &serde_json::to_vec(&body).unwrap_or_default(),
            key,
        ),
        retain: false,
    }
}

/// Whether a freshly rendered body `sha` must not be published: the node's latest revision
/// carried the same body and failed there. Re-signing it (say, for renewal) would make the node
/// try the same broken config again.
pub fn withhold(prev: Option<&Published>, rec: Option<&NodeRecord>, sha: &str) -> bool {
    match (prev, rec) {
        (Some(p), Some(r)) => p.sha256 == sha && r.failed_revisions.contains(&p.revision),
        _ => false,
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition of the node table: presence, revisions, babel neighbours and link
/// costs, probe round-trip times and loss.
pub fn prometheus(rows: &[StatusRow]) -> String {
    let mut out = String::new();
    let node_labels = |r: &StatusRow| {
        format!(
            "node=\"{}\",name=\"{}\",mesh=\"{}\"",
            label(&r.node),
            label(r.name.as_deref().or(r.hostname.as_deref()).unwrap_or("")),
            label(&r.mesh)
        )
    };
    let metric = |out: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    metric(
        &mut out,
        "sidenet_node_online",
        "1 if the node's presence topic says online.",
        "gauge",
    );
    for r in rows {
        let v = u8::from(r.online == Some(true));
        let _ = writeln!(out, "sidenet_node_online{{{}}} {v}", node_labels(r));
    }
    metric(
        &mut out,
        "sidenet_node_applied_revision",
        "Revision counter the node runs.",
        "gauge",
    );
    for r in rows {
        if let Some(a) = r.applied {
            let _ = writeln!(
                out,
                "sidenet_node_applied_revision{{{}}} {}",
                node_labels(r),
                a.rev
            );
        }
    }
    metric(
        &mut out,
        "sidenet_node_desired_revision",
        "Revision counter the controller published for the node.",
        "gauge",
    );
    for r in rows {
        if let Some(d) = r.desired {
            let _ = writeln!(
                out,
                "sidenet_node_desired_revision{{{}}} {}",
                node_labels(r),
                d.rev
            );
        }
    }
    metric(
        &mut out,
        "sidenet_node_missing_packages",
        "Packages the node lacks for its config (it applies nothing new until they are installed).",
        "gauge",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "sidenet_node_missing_packages{{{}}} {}",
            node_labels(r),
            r.missing.len()
        );
    }
    metric(
        &mut out,
        "sidenet_node_failed",
        "1 if the node's last config failed its health check and was rolled back.",
        "gauge",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "sidenet_node_failed{{{}}} {}",
            node_labels(r),
            u8::from(r.phase == "Failed")
        );
    }
    metric(
        &mut out,
        "sidenet_babel_neighbours",
        "Babel neighbours the node reports.",
        "gauge",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "sidenet_babel_neighbours{{{}}} {}",
            node_labels(r),
            r.neighbours.len()
        );
    }
    metric(
        &mut out,
        "sidenet_link_cost",
        "Babel cost of the link to a neighbour (65535: unreachable).",
        "gauge",
    );
    for r in rows {
        for n in &r.neighbours {
            if let Some(c) = n.cost {
                let _ = writeln!(
                    out,
                    "sidenet_link_cost{{{},peer=\"{}\",interface=\"{}\"}} {c}",
                    node_labels(r),
                    label(n.node.as_deref().unwrap_or("")),
                    label(&n.interface)
                );
            }
        }
    }
    metric(
        &mut out,
        "sidenet_probe_rtt_seconds",
        "Median round-trip time of the node's pathfinder probes to a target.",
        "gauge",
    );
    let probe_labels = |r: &StatusRow, p: &sidenet_wire::messages::Probe| {
        format!(
            "{},target=\"{}\",peer=\"{}\",kind=\"{}\"",
            node_labels(r),
            label(&p.target),
            label(p.node.as_deref().unwrap_or("")),
            label(p.kind.as_deref().unwrap_or(""))
        )
    };
    for r in rows {
        for p in &r.probes {
            if let Some(ms) = p.rtt_ms {
                let _ = writeln!(
                    out,
                    "sidenet_probe_rtt_seconds{{{}}} {}",
                    probe_labels(r, p),
                    ms / 1000.0
                );
            }
        }
    }
    metric(
        &mut out,
        "sidenet_probe_loss_ratio",
        "Fraction of the node's recent pathfinder probes to a target that got no answer.",
        "gauge",
    );
    for r in rows {
        for p in &r.probes {
            let _ = writeln!(
                out,
                "sidenet_probe_loss_ratio{{{}}} {}",
                probe_labels(r, p),
                p.loss
            );
        }
    }
    metric(
        &mut out,
        "sidenet_service_via_sidenet",
        "1 while the node sends a published service's traffic over the side-net, 0 while over the internet (handover).",
        "gauge",
    );
    let service_labels = |r: &StatusRow, s: &sidenet_wire::messages::ServiceRoute| {
        format!(
            "{},service=\"{}\",owner=\"{}\"",
            node_labels(r),
            label(&s.name),
            label(&s.node)
        )
    };
    for r in rows {
        for s in &r.services {
            let _ = writeln!(
                out,
                "sidenet_service_via_sidenet{{{}}} {}",
                service_labels(r, s),
                u8::from(s.via == "side-net")
            );
        }
    }
    metric(
        &mut out,
        "sidenet_service_path_since_seconds",
        "Unix time the node's path for a published service last changed (or handover started).",
        "gauge",
    );
    for r in rows {
        for s in &r.services {
            let _ = writeln!(
                out,
                "sidenet_service_path_since_seconds{{{}}} {}",
                service_labels(r, s),
                s.since
            );
        }
    }
    out
}

/// The lines `sidenetctl status` prints for a node's published-service paths (handover):
/// `service NAME of OWNER: via side-net since TIME (WHY)`.
pub fn service_lines(r: &StatusRow) -> Vec<String> {
    r.services
        .iter()
        .map(|s| {
            format!(
                "service {} of {} ({}): via {} since {} ({})",
                s.name,
                s.node,
                s.prefixes.join(" "),
                s.via,
                crate::time::rfc3339(s.since),
                s.why
            )
        })
        .collect()
}

/// The per-link part of a node's `MeshNode` status: one entry per WireGuard neighbour it probes
/// or babel sees, with babel's cost and the probes' latency and loss.
pub fn links(r: &StatusRow) -> Vec<sidenet_crds::LinkStatus> {
    let mut out: Vec<sidenet_crds::LinkStatus> = Vec::new();
    for p in r
        .probes
        .iter()
        .filter(|p| p.kind.as_deref() == Some("neighbour"))
    {
        let Some(peer) = p.node.clone() else { continue };
        out.push(sidenet_crds::LinkStatus {
            interface: p
                .target
                .split_once('%')
                .map(|(_, i)| i.to_string())
                .unwrap_or_default(),
            peer,
            up: false,
            cost: None,
            rtt_ms: p.rtt_ms,
            loss: Some(p.loss),
        });
    }
    for n in &r.neighbours {
        let Some(peer) = n.node.clone() else { continue };
        match out.iter_mut().find(|l| l.peer == peer) {
            Some(l) => {
                l.up = true;
                l.cost = n.cost;
                l.interface = n.interface.clone();
            }
            None => out.push(sidenet_crds::LinkStatus {
                peer,
                interface: n.interface.clone(),
                up: true,
                cost: n.cost,
                rtt_ms: None,
                loss: None,
            }),
        }
    }
    out.sort_by(|a, b| a.peer.cmp(&b.peer));
    out
}

/// One line per WireGuard link and probe target of a node, for `sidenetctl status`: the babel
/// neighbour on the link (with its cost) and the probe's round-trip time and loss.
pub fn link_lines(r: &StatusRow) -> Vec<String> {
    let short = |id: Option<&str>| id.map_or("?".to_string(), |i| i.chars().take(8).collect());
    let mut out = Vec::new();
    for n in &r.neighbours {
        let probe = r
            .probes
            .iter()
            .find(|p| p.kind.as_deref() == Some("neighbour") && p.node == n.node);
        out.push(format!(
            "link {} to {} via {}: cost {}{}",
            n.interface,
            short(n.node.as_deref()),
            n.address,
            n.cost.map_or("?".into(), |c| c.to_string()),
            probe.map_or(String::new(), probe_text)
        ));
    }
    for p in &r.probes {
        let listed =
            p.kind.as_deref() == Some("neighbour") && r.neighbours.iter().any(|n| n.node == p.node);
        if !listed {
            out.push(format!(
                "probe {} {} ({}){}",
                p.kind.as_deref().unwrap_or("target"),
                short(p.node.as_deref()),
                p.target,
                probe_text(p)
            ));
        }
    }
    out
}

fn probe_text(p: &sidenet_wire::messages::Probe) -> String {
    format!(
        ", rtt {}, loss {:.0}% of {}",
        p.rtt_ms.map_or("-".into(), |ms| format!("{ms:.2} ms")),
        p.loss * 100.0,
        p.sent
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidenet_wire::Envelope;
    use sidenet_wire::messages::{Neighbour, Probe};

    fn published(rev: u64, sha: &str) -> Published {
        Published {
            revision: Revision { epoch: 7, rev },
            sha256: sha.into(),
            input: String::new(),
            iat: 0,
            exp: 0,
            signer: None,
        }
    }

    #[test]
    fn acks_only_what_was_published() {
        let p = published(5, "s5");
        let t = |rev, sha: &str| Trial {
            revision: Revision { epoch: 7, rev },
            sha256: sha.into(),
        };
        assert!(should_ack(Some(&p), 7, &t(5, "s5")));
        assert!(should_ack(Some(&p), 7, &t(4, "older")));
        assert!(!should_ack(Some(&p), 7, &t(5, "other body")));
        assert!(!should_ack(Some(&p), 7, &t(6, "s6")));
        assert!(!should_ack(Some(&p), 8, &t(5, "s5")));
        assert!(!should_ack(None, 7, &t(5, "s5")));
    }

    #[test]
    fn ack_is_signed_and_names_the_status() -> Result<(), Box<dyn std::error::Error>> {
        let key = KeyPair::from_seed(&[3; 32]);
        let trial = Trial {
            revision: Revision { epoch: 7, rev: 5 },
            sha256: "s5".into(),
        };
        let p = ack(
            &key,
            "m",
            "n",
            Revision { epoch: 99, rev: 12 },
            &trial,
            1000,
        );
        assert_eq!(p.topic, "sidenet/v1/m/nodes/n/ack");
        assert!(!p.retain);
        let env = Envelope::parse(&p.payload, 4096)?;
        let v = env.verify(Kind::Ack, &key.public())?;
        assert_eq!(v.header.revision(), Revision { epoch: 99, rev: 12 });
        assert_eq!(v.header.node.as_deref(), Some("n"));
        let body: Ack = v.body_json()?;
        assert_eq!(body.revision, trial.revision);
        // Not a config: a node checking for a config refuses it.
        assert!(env.verify(Kind::Config, &key.public()).is_err());
        Ok(())
    }

    #[test]
    fn failed_bodies_are_withheld() {
        let p = published(5, "bad");
        let mut rec = NodeRecord::default();
        assert!(!withhold(Some(&p), Some(&rec), "bad"));
        rec.failed_revisions.push(Revision { epoch: 7, rev: 5 });
        assert!(withhold(Some(&p), Some(&rec), "bad"));
        assert!(!withhold(Some(&p), Some(&rec), "fixed"));
        assert!(!withhold(None, Some(&rec), "bad"));
    }

    #[test]
    fn meshnode_links_join_babel_and_probes() {
        let row = StatusRow {
            node: "n1".into(),
            name: None,
            mesh: "m".into(),
            hostname: None,
            phase: "Ready".into(),
            reason: None,
            online: None,
            desired: None,
            applied: None,
            last_seen: None,
            address: None,
            failure: None,
            neighbours: vec![Neighbour {
                address: "fe80::1".into(),
                interface: "sn-x".into(),
                node: Some("n2".into()),
                cost: Some(96),
            }],
            probes: vec![
                Probe {
                    target: "fe80::1%sn-x".into(),
                    rtt_ms: Some(1.5),
                    loss: 0.25,
                    node: Some("n2".into()),
                    kind: Some("neighbour".into()),
                    sent: 8,
                },
                Probe {
                    target: "fe80::3%sn-y".into(),
                    rtt_ms: None,
                    loss: 1.0,
                    node: Some("n3".into()),
                    kind: Some("neighbour".into()),
                    sent: 10,
                },
                Probe {
                    target: "fd00::1".into(),
                    rtt_ms: Some(3.0),
                    loss: 0.0,
                    node: Some("gw".into()),
                    kind: Some("gateway".into()),
                    sent: 10,
                },
            ],
            agent_version: None,
            agent_epoch: None,
            missing: vec![],
            shaping: None,
            services: Vec::new(),
        };
        let l = links(&row);
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(l[0].up && l[0].cost == Some(96) && l[0].rtt_ms == Some(1.5));
        assert_eq!(
            (l[1].peer.as_str(), l[1].up, l[1].loss),
            ("n3", false, Some(1.0))
        );
        assert_eq!(l[1].interface, "sn-y");
    }

    #[test]
    fn metrics_name_links_and_probes() {
        let row = StatusRow {
            node: "n1".into(),
            name: Some("a\"b".into()),
            mesh: "m".into(),
            hostname: None,
            phase: "Ready".into(),
            reason: None,
            online: Some(true),
            desired: Some(Revision { epoch: 1, rev: 3 }),
            applied: Some(Revision { epoch: 1, rev: 3 }),
            last_seen: None,
            address: None,
            failure: None,
            neighbours: vec![Neighbour {
                address: "fe80::1".into(),
                interface: "sn-x".into(),
                node: Some("n2".into()),
                cost: Some(96),
            }],
            probes: vec![Probe {
                target: "fe80::1%sn-x".into(),
                rtt_ms: Some(1.5),
                loss: 0.25,
                node: Some("n2".into()),
                kind: Some("neighbour".into()),
                sent: 8,
            }],
            agent_version: Some("0.1.0".into()),
            agent_epoch: Some(7),
            shaping: None,
            services: Vec::new(),
            missing: vec!["babeld".into()],
        };
        let text = prometheus(&[row]);
        assert!(
            text.contains(
                "sidenet_node_missing_packages{node=\"n1\",name=\"a\\\"b\",mesh=\"m\"} 1"
            )
        );
        assert!(text.contains("sidenet_node_online{node=\"n1\",name=\"a\\\"b\",mesh=\"m\"} 1"));
        assert!(text.contains("sidenet_link_cost{node=\"n1\",name=\"a\\\"b\",mesh=\"m\",peer=\"n2\",interface=\"sn-x\"} 96"));
        assert!(text.contains("kind=\"neighbour\"} 0.0015"), "{text}");
        assert!(text.contains("sidenet_probe_loss_ratio{"));
        assert!(text.contains("} 0.25"));
        assert!(
            text.contains("sidenet_babel_neighbours{node=\"n1\",name=\"a\\\"b\",mesh=\"m\"} 1")
        );
    }
}
