//! How a new agent comes to trust a mesh key (sans-IO).
//!
//! An agent with a key pinned (`--mesh-key`, provisioning, or an earlier start) trusts that key
//! and the keys it endorses ([`sidenet_wire::rotation`]). An agent without one trusts a key only
//! by its [`Trust`]:
//!
//! - a join code ([`sidenet_wire::join`]): the key whose fingerprint the code carries, found as
//!   the signer of an announcement or of the node's own config, or a key that such a key
//!   endorsed through the announcement's rotation chain;
//! - `--trust-first-key`: whichever key announces first (anyone who can publish on the broker
//!   can be first);
//! - nothing: no key at all (the shell refuses to start like that).

use sidenet_wire::PublicKey;
use sidenet_wire::join::{JoinCode, fingerprint};
use sidenet_wire::messages::Announce;

/// How an agent without a pinned key may come to trust one (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Trust {
    /// No key is trusted.
    #[default]
    Nothing,
    /// Only the key of this join code (or one it endorsed).
    Code(JoinCode),
    /// The first key announced (`--trust-first-key`).
    FirstKey,
}

impl Trust {
    /// Whether the announcement `ann` of mesh `mesh`, self-signed by `signer`, may be pinned as
    /// the mesh's key; `Err` says why not, naming the refused key's fingerprint.
    pub fn admits_announcement(
        &self,
        mesh: &str,
        signer: &PublicKey,
        ann: &Announce,
    ) -> Result<(), String> {
        match self {
            Trust::FirstKey => Ok(()),
            Trust::Nothing => Err(format!(
                "announcement signed by key {} refused: this agent has no join code, no pinned key and no --trust-first-key, so it trusts no key",
                fingerprint(mesh, signer)
            )),
            Trust::Code(code) => {
                if code.matches(signer) {
                    return Ok(());
                }
                // A key rotated since the join code was made: the chain must lead from the
                // code's key to the signer, each link signed by the key before it.
                let endorsed = ann.chain.iter().any(|e| {
                    PublicKey::from_base64(&e.previous).is_ok_and(|k| {
                        code.matches(&k)
                            && sidenet_wire::rotation::follow(mesh, &ann.chain, &k)
                                .is_ok_and(|to| to == *signer)
                    })
                });
                if endorsed {
                    Ok(())
                } else {
                    Err(format!(
                        "announcement signed by key {} refused: join code {code} names key {}; waiting for the mesh's real key",
                        fingerprint(mesh, signer),
                        code.fingerprint()
                    ))
                }
            }
        }
    }

    /// Whether a config signed by `signer` may pin it: only the join code's own key.
    pub fn admits_config_signer(&self, signer: &PublicKey) -> bool {
        matches!(self, Trust::Code(code) if code.matches(signer))
    }

    /// Whether the agent may ask to join before it trusts a key: with a join code the key can
    /// also come with the node's first config, so an announcement overwritten on the broker
    /// does not hold the node up.
    pub fn enrols_before_pinning(&self) -> bool {
        matches!(self, Trust::Code(_))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sidenet_wire::keys::KeyPair;

    fn ann(key: &KeyPair, chain: Vec<sidenet_wire::rotation::Endorsement>) -> Announce {
        Announce {
            mesh: "m".into(),
            key: key.public().to_base64(),
            enrollment: "auto".into(),
            prefix: "fd00::/48".into(),
            controller: "t".into(),
            acks: true,
            chain,
            previous_until: None,
        }
    }

    #[test]
    fn a_join_code_admits_its_key_and_keys_it_endorsed_only() {
        let (k0, k1, rogue) = (
            KeyPair::from_seed(&[1; 32]),
            KeyPair::from_seed(&[2; 32]),
            KeyPair::from_seed(&[3; 32]),
        );
        let trust = Trust::Code(JoinCode::new("m", &k0.public()));
        assert!(
            trust
                .admits_announcement("m", &k0.public(), &ann(&k0, vec![]))
                .is_ok()
        );
        let e = trust
            .admits_announcement("m", &rogue.public(), &ann(&rogue, vec![]))
            .unwrap_err();
        assert!(e.contains(&fingerprint("m", &rogue.public())), "{e}");
        // Rotated: k0 endorsed k1.
        let chain = vec![sidenet_wire::rotation::endorse(&k0, "m", &k1.public(), 5)];
        assert!(
            trust
                .admits_announcement("m", &k1.public(), &ann(&k1, chain))
                .is_ok()
        );
        // A rogue chain: the rogue key endorsing itself onwards does not start at k0.
        let forged = vec![sidenet_wire::rotation::endorse(
            &rogue,
            "m",
            &k1.public(),
            5,
        )];
        assert!(
            trust
                .admits_announcement("m", &k1.public(), &ann(&k1, forged))
                .is_err()
        );
        assert!(trust.admits_config_signer(&k0.public()));
        assert!(!trust.admits_config_signer(&k1.public()));
        assert!(
            Trust::Nothing
                .admits_announcement("m", &k0.public(), &ann(&k0, vec![]))
                .is_err()
        );
        assert!(
            Trust::FirstKey
                .admits_announcement("m", &rogue.public(), &ann(&rogue, vec![]))
                .is_ok()
        );
    }
}

/// The core with a [`Trust`]: what a new agent does with the announcements and configs anyone
/// can publish.
#[cfg(test)]
mod agent_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::core::{Agent, Effect, Event, Level, Settings};
    use sidenet_wire::keys::KeyPair;
    use sidenet_wire::messages::{EnrollRequest, NodeConfig, StatusReport};
    use sidenet_wire::{Envelope, Header, Kind, topics};

    const MESH: &str = "m";
    const T0: u64 = 1_900_000_000;

    fn agent(trust: Trust) -> Agent {
        let mut a = Agent::new(
            Settings {
                mesh: MESH.into(),
                max_envelope: 1 << 20,
                enroll: EnrollRequest::default(),
                status_every: 60,
                enroll_every: 15,
            },
            KeyPair::from_seed(&[9; 32]),
            None,
            None,
            7,
            T0,
        );
        a.set_trust(trust);
        a
    }

    fn header(node: Option<String>, rev: u64) -> Header {
        Header {
            mesh: MESH.into(),
            node,
            epoch: 1,
            rev,
            iat: T0,
            exp: T0 + 3600,
            len: 0,
            sha256: String::new(),
        }
    }

    fn announcement(key: &KeyPair) -> Event {
        let body = Announce {
            mesh: MESH.into(),
            key: key.public().to_base64(),
            enrollment: "auto".into(),
            prefix: "fd00::/48".into(),
            controller: "t".into(),
            acks: true,
            chain: vec![],
            previous_until: None,
        };
        Event::Message {
            topic: topics::announce(MESH),
            payload: sidenet_wire::envelope::seal(
                Kind::Announce,
                header(None, 0),
                &serde_json::to_vec(&body).unwrap(),
                key,
            ),
        }
    }

    fn config(a: &Agent, key: &KeyPair, rev: u64) -> Event {
        let node = a.node_id().to_string();
        let body = NodeConfig {
            mesh: MESH.into(),
            node: node.clone(),
            hostname: "h".into(),
            role: "router".into(),
            profile: "p".into(),
            family: "linux".into(),
            subnet: "fd00:1::/64".into(),
            addresses: vec![],
            files: vec![],
            actions: vec![],
            sealed: Default::default(),
            requires: vec![],
        };
        Event::Message {
            topic: topics::config(MESH, &node),
            payload: sidenet_wire::envelope::seal(
                Kind::Config,
                header(Some(node), rev),
                &serde_json::to_vec(&body).unwrap(),
                key,
            ),
        }
    }

    fn pinned(out: &[Effect]) -> Option<PublicKey> {
        out.iter().find_map(|e| match e {
            Effect::PinMeshKey(k) => Some(*k),
            _ => None,
        })
    }

    fn warnings(out: &[Effect]) -> Vec<String> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Log(Level::Warn, t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    fn enrols(out: &[Effect]) -> bool {
        out.iter()
            .any(|e| matches!(e, Effect::Publish { topic, .. } if topic.contains("/enroll/")))
    }

    fn reports(out: &[Effect]) -> Vec<StatusReport> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Publish { topic, payload, .. } if topic.ends_with("/status") => {
                    let v = Envelope::parse(payload, 1 << 20).ok()?;
                    v.verify_self_signed(Kind::Status).ok()?.body_json().ok()
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_join_code_refuses_a_rogue_announcement_and_waits_for_the_real_key() {
        let (real, rogue) = (KeyPair::from_seed(&[1; 32]), KeyPair::from_seed(&[66; 32]));
        let mut a = agent(Trust::Code(JoinCode::new(MESH, &real.public())));
        let out = a.handle(Event::Connected, T0);
        // The key may come with the node's config: it asks to join at once.
        assert!(enrols(&out));
        // A flood of rogue announcements: nothing pinned, one warning naming the key.
        let mut logged = Vec::new();
        for i in 0..500 {
            let out = a.handle(announcement(&rogue), T0 + i / 100);
            assert_eq!(pinned(&out), None);
            logged.extend(warnings(&out));
        }
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert!(
            logged[0].contains(&fingerprint(MESH, &rogue.public())),
            "{}",
            logged[0]
        );
        // A config signed by the rogue key is not applied either.
        let out = a.handle(config(&a, &rogue, 1), T0 + 10);
        assert_eq!(pinned(&out), None);
        assert!(!out.iter().any(|e| matches!(e, Effect::Apply { .. })));
        // After a minute, one more line, counting what was left out.
        let out = a.handle(announcement(&rogue), T0 + 70);
        let w = warnings(&out);
        assert!(
            w.len() == 1 && w[0].contains("more like it not logged"),
            "{w:?}"
        );
        // The real announcement is trusted.
        let out = a.handle(announcement(&real), T0 + 71);
        assert_eq!(pinned(&out), Some(real.public()));
        assert_eq!(a.mesh_key(), Some(real.public()));
    }

    #[test]
    fn with_a_join_code_the_first_config_can_bring_the_key() {
        let real = KeyPair::from_seed(&[1; 32]);
        let mut a = agent(Trust::Code(JoinCode::new(MESH, &real.public())));
        a.handle(Event::Connected, T0);
        let out = a.handle(config(&a, &real, 1), T0 + 1);
        assert_eq!(pinned(&out), Some(real.public()));
        assert!(out.iter().any(|e| matches!(e, Effect::Apply { .. })));
    }

    #[test]
    fn without_a_way_to_check_keys_nothing_is_trusted() {
        let real = KeyPair::from_seed(&[1; 32]);
        let mut a = agent(Trust::Nothing);
        let out = a.handle(Event::Connected, T0);
        assert!(!enrols(&out));
        let out = a.handle(announcement(&real), T0);
        assert_eq!(pinned(&out), None);
        assert!(warnings(&out)[0].contains("trusts no key"));
        let out = a.handle(config(&a, &real, 1), T0 + 1);
        assert_eq!(pinned(&out), None);
    }

    #[test]
    fn trust_first_key_pins_whatever_comes_first_with_a_warning() {
        let rogue = KeyPair::from_seed(&[66; 32]);
        let mut a = agent(Trust::FirstKey);
        a.handle(Event::Connected, T0);
        let out = a.handle(announcement(&rogue), T0);
        assert_eq!(pinned(&out), Some(rogue.public()));
        assert!(warnings(&out)[0].contains("--trust-first-key"));
    }

    #[test]
    fn refused_configs_cost_one_bounded_report_a_minute() {
        let real = KeyPair::from_seed(&[1; 32]);
        let rogue = KeyPair::from_seed(&[66; 32]);
        let mut a = Agent::new(
            Settings {
                mesh: MESH.into(),
                max_envelope: 1 << 20,
                enroll: EnrollRequest::default(),
                status_every: 600,
                enroll_every: 15,
            },
            KeyPair::from_seed(&[9; 32]),
            Some(real.public()),
            None,
            7,
            T0,
        );
        a.handle(Event::Connected, T0);
        let mut sent = Vec::new();
        let mut logs = 0;
        for i in 0..1000 {
            let out = a.handle(config(&a, &rogue, 1 + i), T0 + 1 + i / 50);
            sent.extend(reports(&out));
            logs += warnings(&out).len();
        }
        // 1000 forged configs within 20 s: one report and one log line.
        assert_eq!(sent.len(), 1, "{} reports", sent.len());
        assert_eq!(logs, 1);
        let failure = sent[0].failure.clone().unwrap();
        assert!(failure.error.len() <= crate::core::MAX_FAILURE_TEXT);
        assert!(
            failure.error.starts_with("config refused"),
            "{}",
            failure.error
        );
        // The next minute, one more.
        let out = a.handle(config(&a, &rogue, 5000), T0 + 90);
        assert_eq!(reports(&out).len(), 1);
    }
}
