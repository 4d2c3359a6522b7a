//! Unit tests of the sans-IO core (events in, effects out).

use super::*;
use sidenet_wire::messages::{Neighbour, StatusReport};

const MESH: &str = "m";
const T0: u64 = 1_900_000_000;

struct World {
    mesh: KeyPair,
    agent: Agent,
}

fn world(deadline: Option<u64>) -> World {
    let mesh = KeyPair::from_seed(&[1; 32]);
    let node = KeyPair::from_seed(&[2; 32]);
    let mut agent = Agent::new(
        Settings {
            mesh: MESH.into(),
            max_envelope: 1 << 20,
            enroll: EnrollRequest::default(),
            status_every: 60,
            enroll_every: 15,
        },
        node,
        Some(mesh.public()),
        None,
        7,
        T0,
    );
    if let Some(d) = deadline {
        agent.enable_trial(d);
    }
    let mut w = World { mesh, agent };
    w.announce(true);
    w.agent.handle(Event::Connected, T0);
    w
}

impl World {
    fn node(&self) -> String {
        self.agent.node_id().to_string()
    }

    fn announce(&mut self, acks: bool) {
        let key = self.mesh.clone();
        self.announce_by(&key, acks, Vec::new(), None, T0);
    }

    fn announce_by(
        &mut self,
        key: &KeyPair,
        acks: bool,
        chain: Vec<sidenet_wire::rotation::Endorsement>,
        previous_until: Option<u64>,
        now: u64,
    ) -> Vec<Effect> {
        let body = Announce {
            mesh: MESH.into(),
            key: key.public().to_base64(),
            enrollment: "auto".into(),
            prefix: "fd00::/48".into(),
            controller: "test".into(),
            acks,
            chain,
            previous_until,
        };
        let env = sidenet_wire::envelope::seal(
            Kind::Announce,
            header(None, 1, 0),
            &serde_json::to_vec(&body).unwrap_or_default(),
            key,
        );
        self.agent.handle(
            Event::Message {
                topic: topics::announce(MESH),
                payload: env,
            },
            now,
        )
    }

    fn config(&mut self, rev: u64, now: u64) -> Vec<Effect> {
        let key = self.mesh.clone();
        self.config_by(&key, rev, now)
    }

    fn config_by(&mut self, key: &KeyPair, rev: u64, now: u64) -> Vec<Effect> {
        let body = NodeConfig {
            hostname: format!("h{rev}"),
            ..node_config(&self.node())
        };
        let env = sidenet_wire::envelope::seal(
            Kind::Config,
            header(Some(self.node()), 1, rev),
            &serde_json::to_vec(&body).unwrap_or_default(),
            key,
        );
        self.agent.handle(
            Event::Message {
                topic: topics::config(MESH, &self.node()),
                payload: env,
            },
            now,
        )
    }

    /// The controller's answer to `status` (an Effect::Publish of a status report).
    fn ack_for(&self, status: &Effect, key: &KeyPair) -> Option<Vec<u8>> {
        let Effect::Publish { payload, .. } = status else {
            return None;
        };
        let v = Envelope::parse(payload, 1 << 20).ok()?;
        let v = v.verify_self_signed(Kind::Status).ok()?;
        let report: StatusReport = v.body_json().ok()?;
        let trial = report.trial?;
        let mut h = header(Some(self.node()), v.header.epoch, v.header.rev);
        h.exp = T0 + 600;
        Some(sidenet_wire::envelope::seal(
            Kind::Ack,
            h,
            &serde_json::to_vec(&Ack {
                revision: trial.revision,
                sha256: trial.sha256,
            })
            .unwrap_or_default(),
            key,
        ))
    }

    fn deliver_ack(&mut self, payload: Vec<u8>, now: u64) -> Vec<Effect> {
        self.agent.handle(
            Event::Message {
                topic: topics::ack(MESH, &self.node()),
                payload,
            },
            now,
        )
    }
}

/// A minimal config for `node` of the test mesh.
fn node_config(node: &str) -> NodeConfig {
    NodeConfig {
        mesh: MESH.into(),
        node: node.into(),
        hostname: "h".into(),
        role: "router".into(),
        profile: "p".into(),
        family: "linux".into(),
        subnet: "fd00:1::/64".into(),
        addresses: vec![],
        files: vec![],
        actions: vec![],
        sealed: Default::default(),
        requires: Vec::new(),
    }
}

fn header(node: Option<String>, epoch: u64, rev: u64) -> Header {
    Header {
        mesh: MESH.into(),
        node,
        epoch,
        rev,
        iat: T0,
        exp: T0 + 3600,
        len: 0,
        sha256: String::new(),
    }
}

fn apply_of(effects: &[Effect]) -> Option<(Revision, String)> {
    effects.iter().find_map(|e| match e {
        Effect::Apply {
            revision, sha256, ..
        } => Some((*revision, sha256.clone())),
        _ => None,
    })
}

fn status_of(effects: &[Effect]) -> Option<&Effect> {
    effects
        .iter()
        .find(|e| matches!(e, Effect::Publish { topic, .. } if topic.ends_with("/status")))
}

fn report(e: &Effect) -> Option<StatusReport> {
    let Effect::Publish { payload, .. } = e else {
        return None;
    };
    Envelope::parse(payload, 1 << 20)
        .ok()?
        .verify_self_signed(Kind::Status)
        .ok()?
        .body_json()
        .ok()
}

#[test]
fn the_retained_copy_of_the_running_config_is_not_verified_again() {
    let mut w = world(None);
    let body = node_config(&w.node());
    let env = sidenet_wire::envelope::seal(
        Kind::Config,
        header(Some(w.node()), 1, 1),
        &serde_json::to_vec(&body).unwrap_or_default(),
        &w.mesh,
    );
    let topic = topics::config(MESH, &w.node());
    let msg = |payload: Vec<u8>| Event::Message {
        topic: topic.clone(),
        payload,
    };
    let (rev, sha) = apply_of(&w.agent.handle(msg(env.clone()), T0)).unwrap_or_default();
    assert_eq!(rev, Revision { epoch: 1, rev: 1 });
    // Delivered again while applying, and after: nothing to do, nothing reported.
    assert!(w.agent.handle(msg(env.clone()), T0).is_empty());
    w.agent.handle(
        Event::Applied {
            revision: rev,
            sha256: sha,
            result: Ok(()),
        },
        T0,
    );
    assert!(w.agent.handle(msg(env.clone()), T0).is_empty());
    assert_eq!(w.agent.accepted.map(|a| a.1), Some(rev));
    // The same revision with other bytes (not what was verified) is still checked: a
    // forged copy is refused and reported.
    let mut forged = env;
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let out = w.agent.handle(msg(forged), T0);
    assert!(status_of(&out).is_some(), "{out:?}");
}

/// A removed node (its retained config cleared: an empty message) is told so once, in
/// plain words; before, it logged "config refused: envelope truncated" and reported that as
/// its last failure.
#[test]
fn a_withdrawn_config_is_reported_as_removal_not_as_a_refusal() {
    let mut w = world(None);
    let (rev, sha) = apply_of(&w.config(1, T0)).unwrap_or_default();
    w.agent.handle(
        Event::Applied {
            revision: rev,
            sha256: sha,
            result: Ok(()),
        },
        T0,
    );
    let empty = Event::Message {
        topic: topics::config(MESH, &w.node()),
        payload: Vec::new(),
    };
    let out = w.agent.handle(empty.clone(), T0 + 1);
    let logs: Vec<&String> = out
        .iter()
        .filter_map(|e| match e {
            Effect::Log(Level::Warn, m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(logs.len(), 1, "{out:?}");
    assert!(logs[0].contains("was removed from mesh m"), "{}", logs[0]);
    assert!(logs[0].contains("keeps running revision 1"), "{}", logs[0]);
    assert!(status_of(&out).is_none(), "{out:?}");
    assert!(w.agent.failure.is_none());
    // Said once, not on every redelivery.
    assert!(w.agent.handle(empty, T0 + 2).is_empty());
}

#[test]
fn sealed_secrets_are_opened_once_per_sealed_text() {
    let mut w = world(None);
    let node = w.node();
    let node_key = KeyPair::from_seed(&[2; 32]);
    let seal_to = |secret: &[u8]| {
        seal::seal(
            &KeyPair::from_seed(&[1; 32]),
            &node_key.public(),
            seal::Context {
                mesh: MESH,
                node: &node,
                name: "mesh-passphrase",
            },
            secret,
        )
    };
    let first = seal_to(b"first secret");
    let deliver = |w: &mut World, rev: u64, sealed: &str| -> Option<String> {
        let mut body = NodeConfig {
            files: vec![sidenet_wire::messages::FileSpec {
                path: "etc/psk".into(),
                mode: 0o600,
                content: format!("psk={}", seal::placeholder("mesh-passphrase")),
            }],
            ..node_config(&w.node())
        };
        body.sealed
            .insert("mesh-passphrase".into(), sealed.to_string());
        let env = sidenet_wire::envelope::seal(
            Kind::Config,
            header(Some(w.node()), 1, rev),
            &serde_json::to_vec(&body).unwrap_or_default(),
            &w.mesh,
        );
        let out = w.agent.handle(
            Event::Message {
                topic: topics::config(MESH, &w.node()),
                payload: env,
            },
            T0,
        );
        let applied = out.iter().find_map(|e| match e {
            Effect::Apply {
                revision,
                sha256,
                config,
                ..
            } => Some((*revision, sha256.clone(), config.files[0].content.clone())),
            _ => None,
        });
        let (revision, sha256, content) = applied?;
        w.agent.handle(
            Event::Applied {
                revision,
                sha256,
                result: Ok(()),
            },
            T0,
        );
        Some(content)
    };
    assert_eq!(
        deliver(&mut w, 1, &first).as_deref(),
        Some("psk=first secret")
    );
    // The same sealed text again: filled in from what was opened (no X25519).
    assert_eq!(w.agent.unsealed.len(), 1);
    assert_eq!(
        deliver(&mut w, 2, &first).as_deref(),
        Some("psk=first secret")
    );
    // A changed sealed text is opened afresh: a tampered one is refused, not served from
    // what was opened before, and a new secret is filled in.
    let mut tampered = first.clone().into_bytes();
    let last = tampered.len() - 3;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap_or_default();
    assert_eq!(deliver(&mut w, 3, &tampered), None);
    let second = seal_to(b"second secret");
    assert_eq!(
        deliver(&mut w, 4, &second).as_deref(),
        Some("psk=second secret")
    );
    assert_eq!(w.agent.unsealed.len(), 1);
}

#[test]
fn a_config_is_confirmed_only_after_the_controller_acknowledges_it() {
    let mut w = world(Some(30));
    let (rev, sha) = apply_of(&w.config(1, T0)).unwrap_or_default();
    let out = w.agent.handle(
        Event::Applied {
            revision: rev,
            sha256: sha,
            result: Ok(()),
        },
        T0,
    );
    assert_eq!(w.agent.on_trial(), Some(rev));
    assert!(!out.iter().any(|e| matches!(e, Effect::Confirm { .. })));
    let status = status_of(&out)
        .cloned()
        .unwrap_or(Effect::Log(Level::Info, String::new()));
    let r = report(&status).map(|r| (r.applied, r.trial.map(|t| t.revision)));
    assert_eq!(r, Some((None, Some(rev))));
    // An acknowledgement signed by someone else does nothing.
    let forged = w.ack_for(&status, &KeyPair::from_seed(&[9; 32]));
    let out = w.deliver_ack(forged.unwrap_or_default(), T0 + 1);
    assert!(!out.iter().any(|e| matches!(e, Effect::Confirm { .. })));
    // The controller's does.
    let ack = w.ack_for(&status, &KeyPair::from_seed(&[1; 32]));
    let out = w.deliver_ack(ack.clone().unwrap_or_default(), T0 + 1);
    assert!(out.contains(&Effect::Confirm { revision: rev }), "{out:?}");
    let out = w.agent.handle(
        Event::Confirmed {
            revision: rev,
            result: Ok(()),
        },
        T0 + 1,
    );
    assert_eq!(w.agent.applied(), Some(rev));
    assert_eq!(w.agent.on_trial(), None);
    let r = status_of(&out).and_then(report);
    assert_eq!(r.map(|r| (r.applied, r.trial)), Some((Some(rev), None)));
    // Replaying that acknowledgement for the next trial confirms nothing.
    let (rev2, sha2) = apply_of(&w.config(2, T0 + 2)).unwrap_or_default();
    w.agent.handle(
        Event::Applied {
            revision: rev2,
            sha256: sha2,
            result: Ok(()),
        },
        T0 + 2,
    );
    let out = w.deliver_ack(ack.unwrap_or_default(), T0 + 3);
    assert!(!out.iter().any(|e| matches!(e, Effect::Confirm { .. })));
}

#[test]
fn no_acknowledgement_rolls_back_and_the_revision_is_never_retried() {
    let mut w = world(Some(30));
    let (rev, sha) = apply_of(&w.config(1, T0)).unwrap_or_default();
    w.agent.handle(
        Event::Applied {
            revision: rev,
            sha256: sha,
            result: Ok(()),
        },
        T0,
    );
    // Reports go out every second while unacknowledged.
    let out = w.agent.handle(Event::Tick, T0 + 1);
    assert!(status_of(&out).is_some());
    let out = w.agent.handle(Event::Tick, T0 + 29);
    assert!(!out.iter().any(|e| matches!(e, Effect::RollBack { .. })));
    let out = w.agent.handle(Event::Tick, T0 + 30);
    let reason = out.iter().find_map(|e| match e {
        Effect::RollBack { revision, reason } if *revision == rev => Some(reason.clone()),
        _ => None,
    });
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("did not acknowledge"))
    );
    let out = w.agent.handle(
        Event::RolledBack {
            revision: rev,
            reason: reason.unwrap_or_default(),
            result: Ok(()),
        },
        T0 + 30,
    );
    let r = status_of(&out).and_then(report);
    assert_eq!(r.as_ref().map(|r| r.state), Some(ApplyState::Failed));
    assert_eq!(
        r.and_then(|r| r.failure).and_then(|f| f.revision),
        Some(rev)
    );
    assert_eq!(w.agent.applied(), None);
    // The retained config comes again (reconnect): not applied again.
    assert_eq!(apply_of(&w.config(1, T0 + 31)), None);
    // A new revision is.
    assert!(apply_of(&w.config(2, T0 + 32)).is_some());
}

#[test]
fn lost_babel_neighbours_fail_the_health_check() {
    let mut w = world(Some(10));
    let neighbour = Neighbour {
        address: "fe80::1".into(),
        interface: "sn-x".into(),
        node: None,
        cost: Some(96),
    };
    let seen = |n: Vec<Neighbour>| {
        Event::Observed(Box::new(Observation {
            neighbours: n,
            links: 1,
            ..Default::default()
        }))
    };
    w.agent.handle(seen(vec![neighbour.clone()]), T0);
    let (rev, sha) = apply_of(&w.config(1, T0)).unwrap_or_default();
    let out = w.agent.handle(
        Event::Applied {
            revision: rev,
            sha256: sha,
            result: Ok(()),
        },
        T0,
    );
    let status = status_of(&out)
        .cloned()
        .unwrap_or(Effect::Log(Level::Info, String::new()));
    // babeld restarted: no neighbour yet; the acknowledgement alone is not enough.
    w.agent.handle(seen(vec![]), T0 + 1);
    let ack = w.ack_for(&status, &KeyPair::from_seed(&[1; 32]));
    let out = w.deliver_ack(ack.unwrap_or_default(), T0 + 1);
    assert!(!out.iter().any(|e| matches!(e, Effect::Confirm { .. })));
    // The neighbour comes back: confirmed.
    let out = w.agent.handle(seen(vec![neighbour]), T0 + 3);
    assert!(out.contains(&Effect::Confirm { revision: rev }));
}

/// The shell found packages missing for the config of `apply`: it says so with `Unmet`.
fn unmet(w: &mut World, apply: &[Effect], missing: &[&str], now: u64) -> Vec<Effect> {
    let Some(Effect::Apply {
        revision,
        sha256,
        envelope,
        config,
    }) = apply
        .iter()
        .find(|e| matches!(e, Effect::Apply { .. }))
        .cloned()
    else {
        return Vec::new();
    };
    w.agent.handle(
        Event::Unmet {
            revision,
            sha256,
            envelope,
            config,
            missing: missing.iter().map(|m| m.to_string()).collect(),
        },
        now,
    )
}

#[test]
fn a_config_waits_for_missing_packages_without_failing_or_rolling_back() {
    let mut w = world(Some(30));
    let out = w.config(1, T0);
    assert!(apply_of(&out).is_some());
    let out = unmet(&mut w, &out, &["babeld", "wpad-mesh-mbedtls"], T0);
    // Reported at once: pending, not failed, with what is missing.
    let r =
        report(status_of(&out).unwrap_or_else(|| unreachable!())).unwrap_or_else(|| unreachable!());
    assert_eq!(r.missing, ["babeld", "wpad-mesh-mbedtls"]);
    assert_eq!(r.state, ApplyState::Pending);
    assert!(r.failure.is_none() && r.trial.is_none());
    assert!(!out.iter().any(|e| matches!(e, Effect::RollBack { .. })));
    // The retained copy again, or a tick before the recheck is due: nothing is applied.
    assert!(apply_of(&w.agent.handle(Event::Tick, T0 + RECHECK_S - 1)).is_none());
    // Due: the config is handed to the shell again, which checks first.
    let out = w.agent.handle(Event::Tick, T0 + RECHECK_S);
    let (rev, _) = apply_of(&out).unwrap_or_else(|| unreachable!());
    assert_eq!(rev.rev, 1);
    let out = unmet(&mut w, &out, &["wpad-mesh-mbedtls"], T0 + RECHECK_S);
    let r =
        report(status_of(&out).unwrap_or_else(|| unreachable!())).unwrap_or_else(|| unreachable!());
    assert_eq!(r.missing, ["wpad-mesh-mbedtls"]);
    // Installed: the next check applies it, and the report no longer says missing.
    let out = w.agent.handle(Event::Tick, T0 + 2 * RECHECK_S);
    let (rev, sha) = apply_of(&out).unwrap_or_else(|| unreachable!());
    let out = w.agent.handle(
        Event::Applied {
            revision: rev,
            sha256: sha,
            result: Ok(()),
        },
        T0 + 2 * RECHECK_S,
    );
    let r =
        report(status_of(&out).unwrap_or_else(|| unreachable!())).unwrap_or_else(|| unreachable!());
    assert!(r.missing.is_empty());
    assert_eq!(r.trial.map(|t| t.revision.rev), Some(1));
    assert!(w.agent.missing().is_empty());
}

#[test]
fn packages_missing_for_the_running_config_are_checked_again_until_installed() {
    let mut w = world(Some(30));
    w.agent.set_missing(vec!["babeld".into()]);
    assert!(
        !w.agent
            .handle(Event::Tick, T0 + RECHECK_S - 1)
            .contains(&Effect::CheckRequirements)
    );
    let out = w.agent.handle(Event::Tick, T0 + RECHECK_S);
    assert!(out.contains(&Effect::CheckRequirements), "{out:?}");
    // Still missing: no new report (nothing changed).
    let out = w
        .agent
        .handle(Event::Requirements(vec!["babeld".into()]), T0 + RECHECK_S);
    assert!(status_of(&out).is_none());
    let out = w
        .agent
        .handle(Event::Requirements(vec![]), T0 + 2 * RECHECK_S);
    let r =
        report(status_of(&out).unwrap_or_else(|| unreachable!())).unwrap_or_else(|| unreachable!());
    assert!(r.missing.is_empty());
    assert!(
        !w.agent
            .handle(Event::Tick, T0 + 4 * RECHECK_S)
            .contains(&Effect::CheckRequirements)
    );
}

#[test]
fn configs_arriving_during_a_trial_wait_for_it() {
    let mut w = world(Some(30));
    let (rev1, sha1) = apply_of(&w.config(1, T0)).unwrap_or_default();
    w.agent.handle(
        Event::Applied {
            revision: rev1,
            sha256: sha1,
            result: Ok(()),
        },
        T0,
    );
    assert_eq!(apply_of(&w.config(2, T0 + 1)), None);
    assert_eq!(apply_of(&w.config(3, T0 + 1)), None);
    w.agent.handle(Event::Tick, T0 + 30);
    let out = w.agent.handle(
        Event::RolledBack {
            revision: rev1,
            reason: "test".into(),
            result: Ok(()),
        },
        T0 + 30,
    );
    // Only the newest waiting config is applied.
    assert_eq!(apply_of(&out).map(|(r, _)| r.rev), Some(3));
}

#[test]
fn a_config_queued_during_a_trial_is_applied_after_the_confirmation() {
    let mut w = world(Some(30));
    let (rev1, sha1) = apply_of(&w.config(1, T0)).unwrap_or_default();
    let out = w.agent.handle(
        Event::Applied {
            revision: rev1,
            sha256: sha1,
            result: Ok(()),
        },
        T0,
    );
    let status = status_of(&out)
        .cloned()
        .unwrap_or(Effect::Log(Level::Info, String::new()));
    assert_eq!(apply_of(&w.config(2, T0)), None);
    let ack = w.ack_for(&status, &KeyPair::from_seed(&[1; 32]));
    let out = w.deliver_ack(ack.unwrap_or_default(), T0 + 1);
    assert!(out.contains(&Effect::Confirm { revision: rev1 }));
    let out = w.agent.handle(
        Event::Confirmed {
            revision: rev1,
            result: Ok(()),
        },
        T0 + 1,
    );
    assert_eq!(apply_of(&out).map(|(r, _)| r.rev), Some(2), "{out:?}");
}

#[test]
fn without_trial_an_apply_is_final_and_controllers_without_acks_are_served() {
    let mut w = world(None);
    let (rev, sha) = apply_of(&w.config(1, T0)).unwrap_or_default();
    w.agent.handle(
        Event::Applied {
            revision: rev,
            sha256: sha,
            result: Ok(()),
        },
        T0,
    );
    assert_eq!(w.agent.applied(), Some(rev));
    // Trial with a controller that does not acknowledge: the broker connection suffices.
    let mut w = world(Some(30));
    w.announce(false);
    let (rev, sha) = apply_of(&w.config(1, T0)).unwrap_or_default();
    let out = w.agent.handle(
        Event::Applied {
            revision: rev,
            sha256: sha,
            result: Ok(()),
        },
        T0,
    );
    assert!(out.contains(&Effect::Confirm { revision: rev }));
}

#[test]
fn follows_an_endorsed_key_rotation_and_drops_the_old_key_after_the_overlap() {
    use sidenet_wire::rotation::endorse;
    let mut w = world(None);
    let old = w.mesh.clone();
    let new = KeyPair::from_seed(&[42; 32]);
    let evil = KeyPair::from_seed(&[66; 32]);
    assert!(apply_of(&w.config(1, T0)).is_some());
    w.agent.handle(
        Event::Applied {
            revision: Revision { epoch: 1, rev: 1 },
            sha256: String::new(),
            result: Ok(()),
        },
        T0,
    );
    // An impostor's announcement with a self-made chain is ignored.
    let fx = w.announce_by(
        &evil,
        true,
        vec![endorse(&evil, MESH, &evil.public(), T0)],
        None,
        T0,
    );
    assert!(!fx.iter().any(|e| matches!(e, Effect::PinMeshKey(_))));
    assert_eq!(w.agent.mesh_key(), Some(old.public()));
    // The real rotation: endorsed by the pinned key; pinned, config topic subscribed again.
    let until = T0 + 100;
    let chain = vec![endorse(&old, MESH, &new.public(), T0)];
    let fx = w.announce_by(&new, true, chain, Some(until), T0 + 1);
    assert!(fx.contains(&Effect::PinMeshKey(new.public())));
    assert!(fx.contains(&Effect::Subscribe(topics::config(MESH, &w.node()))));
    assert_eq!(w.agent.mesh_key(), Some(new.public()));
    // Within the overlap the old key still counts; the new one does anyway.
    assert!(apply_of(&w.config_by(&old, 2, T0 + 50)).is_some());
    w.agent.handle(
        Event::Applied {
            revision: Revision { epoch: 1, rev: 2 },
            sha256: String::new(),
            result: Ok(()),
        },
        T0 + 50,
    );
    assert!(apply_of(&w.config_by(&new, 3, T0 + 60)).is_some());
    w.agent.handle(
        Event::Applied {
            revision: Revision { epoch: 1, rev: 3 },
            sha256: String::new(),
            result: Ok(()),
        },
        T0 + 60,
    );
    // After it, the old key is refused.
    assert!(apply_of(&w.config_by(&old, 4, until + 1)).is_none());
    assert!(apply_of(&w.config_by(&new, 4, until + 1)).is_some());
}
