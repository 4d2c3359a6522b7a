//! The agent's sans-IO core: events in, effects out.
//!
//! The core decides; the shell (`shell.rs`) does: it connects to the broker, feeds messages and
//! timer ticks in as [`Event`]s and carries out the returned [`Effect`]s (subscribe, publish,
//! pin a key, apply a config). Nothing here touches the network, the disk or the clock.
//!
//! # Safe apply
//!
//! With a trial deadline set ([`Agent::enable_trial`]), an applied config is *on trial* until its
//! health check passes: the controller acknowledged a status report naming it (a signed
//! [`Ack`] bound to that report's sequence number: the round trip proves the node still reaches
//! the controller), and, if the node had babel neighbours before and the new config has links,
//! babel neighbours are back. Then the core asks for [`Effect::Confirm`]; past the deadline it
//! asks for [`Effect::RollBack`], remembers the revision as failed (it is never tried again) and
//! reports the failure. Configs that arrive meanwhile wait for the trial to end.

pub mod join;
pub mod throttle;

use self::join::Trust;
use self::throttle::{Throttle, bounded, held_back_note};
use sidenet_wire::envelope::Expect;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{
    Ack, Announce, ApplyState, EnrollRequest, Failure, NodeConfig, StatusReport, Trial,
};

use sidenet_wire::messages::{Neighbour, Probe, WireguardInfo};
use sidenet_wire::{Envelope, Header, Kind, PublicKey, Revision, WireError, seal, topics};

/// How long node messages stay valid (the controller refuses older ones).
const MESSAGE_VALIDITY: u64 = 600;
/// Seconds between checks of missing packages.
pub const RECHECK_S: u64 = 10;
/// At most one log line per kind of refused message, and one status report for refused
/// configs, per this many seconds (anyone who can publish on the broker can send them).
pub const REFUSALS_EVERY_S: u64 = 60;
/// Longest failure text a status report carries, in bytes.
pub const MAX_FAILURE_TEXT: usize = 300;

/// What a backend sees of the running data plane.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// The node's WireGuard key and underlay endpoints.
    pub wireguard: Option<WireguardInfo>,
    /// Babel neighbours.
    pub neighbours: Vec<Neighbour>,
    /// WireGuard links configured now.
    pub links: usize,
    /// Pathfinder probe results (filled in by the shell from the prober).
    pub probes: Vec<Probe>,
    /// The policy shaping running now.
    pub shaping: Option<sidenet_wire::messages::ShapingStatus>,
    /// The handover state of each published service (filled in by the shell).
    pub services: Vec<sidenet_wire::messages::ServiceRoute>,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The MQTT session is up (again).
    Connected,
    /// A message arrived.
    Message {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A config was applied (or failed to apply).
    Applied {
        /// The revision.
        revision: Revision,
        /// Body hash.
        sha256: String,
        /// `Err(reason)` if it failed and the last good config was kept.
        result: Result<(), String>,
    },
    /// Periodic timer.
    Tick,
    /// The MQTT session is down.
    Disconnected,
    /// What the backend and the prober see now.
    Observed(Box<Observation>),
    /// The journal confirmed a config on trial (or failed to).
    Confirmed {
        /// The revision.
        revision: Revision,
        /// `Err(reason)` if the confirmation could not be written.
        result: Result<(), String>,
    },
    /// The packages the config asked for in [`Effect::Apply`] are not all there: it was not
    /// applied and waits (the core asks for it again every [`RECHECK_S`] seconds).
    Unmet {
        /// Revision.
        revision: Revision,
        /// Body hash.
        sha256: String,
        /// The verified envelope.
        envelope: Vec<u8>,
        /// The parsed config.
        config: Box<NodeConfig>,
        /// Missing packages.
        missing: Vec<String>,
    },
    /// What [`Effect::CheckRequirements`] (or the check at start) found missing for the config
    /// the node runs.
    Requirements(Vec<String>),
    /// A config on trial was rolled back to the last good one.
    RolledBack {
        /// The revision undone.
        revision: Revision,
        /// Why it was rolled back.
        reason: String,
        /// `Err(reason)` if the rollback itself failed.
        result: Result<(), String>,
    },
}

/// Something to do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Effect {
    /// Subscribe to a topic.
    Subscribe(String),
    /// Publish a message.
    Publish {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
        /// Retained.
        retain: bool,
    },
    /// Persist this mesh key as the trust anchor.
    PinMeshKey(PublicKey),
    /// A verified config carried a new broker password for this node: persist it and log in
    /// with it (username: the node id) from the next connection on. Tell the core with
    /// [`Agent::set_mqtt_login`].
    MqttPassword(String),
    /// Apply a verified config. The shell answers with [`Event::Applied`].
    Apply {
        /// Revision.
        revision: Revision,
        /// Body hash.
        sha256: String,
        /// The exact verified envelope (kept as the last good config).
        envelope: Vec<u8>,
        /// The parsed config.
        config: Box<NodeConfig>,
    },
    /// Write a log line.
    Log(Level, String),
    /// Confirm the config on trial. The shell answers with [`Event::Confirmed`].
    Confirm {
        /// Its revision.
        revision: Revision,
    },
    /// Check again the packages of the config the node runs (some were missing); if they are
    /// all there now, converge to it again. The shell answers with [`Event::Requirements`].
    CheckRequirements,
    /// Roll the config on trial back to the last good one and remember it as failed. The shell
    /// answers with [`Event::RolledBack`].
    RollBack {
        /// Its revision.
        revision: Revision,
        /// Why.
        reason: String,
    },
}

/// Log level of [`Effect::Log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Information.
    Info,
    /// Something was refused or failed.
    Warn,
}

/// Fixed settings of the agent.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Mesh network name.
    pub mesh: String,
    /// Envelope size cap.
    pub max_envelope: usize,
    /// What to say at enrolment.
    pub enroll: EnrollRequest,
    /// Seconds between status heartbeats.
    pub status_every: u64,
    /// Seconds between enrolment retries while unconfigured.
    pub enroll_every: u64,
}

/// A config applied and being health-checked.
#[derive(Debug, Clone, PartialEq)]
struct TrialState {
    revision: Revision,
    sha256: String,
    deadline: u64,
    /// Status reports from this sequence number on may be acknowledged.
    first_seq: u64,
    acked: bool,
    /// The node had babel neighbours before the apply.
    had_neighbours: bool,
    /// Confirm or rollback asked for.
    decided: bool,
}

/// A verified config waiting for the current apply or trial to end.
#[derive(Debug, Clone)]
struct Queued {
    revision: Revision,
    sha256: String,
    envelope: Vec<u8>,
    config: Box<NodeConfig>,
}

/// The agent's decision state.
#[derive(Debug)]
pub struct Agent {
    settings: Settings,
    key: KeyPair,
    node: String,
    mesh_key: Option<PublicKey>,
    applied: Option<Revision>,
    applied_sha: Option<String>,
    applying: Option<Revision>,
    failure: Option<Failure>,
    failed: Vec<Revision>,
    seq_epoch: u64,
    seq: u64,
    started: u64,
    now: u64,
    last_status: u64,
    last_enroll: Option<u64>,
    connected: bool,
    trial_deadline: Option<u64>,
    trial: Option<TrialState>,
    queued: Option<Queued>,
    observed: Observation,
    controller_acks: bool,
    /// The key pinned before the last rotation, accepted for configs until the given time.
    previous_key: Option<(PublicKey, u64)>,
    /// The broker password the shell holds (persisted), if any.
    mqtt_password: Option<String>,
    /// This session logged in with it.
    mqtt_auth: bool,
    /// Secrets opened before: (name, sealed text, plaintext). The controller seals each secret
    /// once per node and value, so most configs carry the same sealed texts as the last one and
    /// are filled in without an X25519 multiplication (milliseconds on a router's CPU).
    unsealed: Vec<(String, String, String)>,
    /// SHA-256 of the last config envelope accepted for applying, and its revision: the same
    /// bytes again (the retained copy, delivered on every subscription) need no verification.
    accepted: Option<([u8; 32], Revision)>,
    /// The controller withdrew this node's config (an empty retained message): it was removed.
    withdrawn: bool,
    /// Packages the node lacks (reported in every status report).
    missing: Vec<String>,
    /// When the missing packages were last checked.
    missing_checked: u64,
    /// The revision last found waiting for packages (logged once).
    waiting: Option<Revision>,
    /// How a key may be trusted while none is pinned.
    trust: Trust,
    /// Log lines about refused announcements.
    announce_log: Throttle,
    /// Log lines about other refused messages (acknowledgements, configs before a key).
    noise_log: Throttle,
    /// Status reports sent because a config was refused.
    refusal_reports: Throttle,
}

impl Agent {
    /// A new core. `applied` is the revision of the last good config found on disk; `seq_epoch`
    /// must grow on every start (the shell persists it) so node messages are never replayable.
    pub fn new(
        settings: Settings,
        key: KeyPair,
        mesh_key: Option<PublicKey>,
        applied: Option<(Revision, String)>,
        seq_epoch: u64,
        now: u64,
    ) -> Self {
        let node = key.public().node_id();
        let (applied, applied_sha) = match applied {
            Some((r, s)) => (Some(r), Some(s)),
            None => (None, None),
        };
        Self {
            settings,
            key,
            node,
            mesh_key,
            applied,
            applied_sha,
            applying: None,
            failure: None,
            failed: Vec::new(),
            seq_epoch,
            seq: 0,
            started: now,
            now,
            last_status: 0,
            last_enroll: None,
            connected: false,
            trial_deadline: None,
            trial: None,
            queued: None,
            observed: Observation::default(),
            controller_acks: false,
            previous_key: None,
            mqtt_password: None,
            mqtt_auth: false,
            unsealed: Vec::new(),
            accepted: None,
            withdrawn: false,
            missing: Vec::new(),
            missing_checked: now,
            waiting: None,
            trust: Trust::Nothing,
            announce_log: Throttle::new(REFUSALS_EVERY_S),
            noise_log: Throttle::new(REFUSALS_EVERY_S),
            refusal_reports: Throttle::new(REFUSALS_EVERY_S),
        }
    }

    /// How the agent may come to trust a mesh key while none is pinned (default: not at all).
    pub fn set_trust(&mut self, trust: Trust) {
        self.trust = trust;
    }

    /// Whether the agent may ask to join now: it trusts a key, or a join code lets it learn the
    /// key from its first config.
    fn may_enrol(&self) -> bool {
        self.mesh_key.is_some() || self.trust.enrols_before_pinning()
    }

    /// A warning about a refused message, at most one a minute per `kind` (with a count of
    /// those left out).
    fn refused_log(&mut self, out: &mut Vec<Effect>, announce: bool, text: String) {
        let t = if announce {
            &mut self.announce_log
        } else {
            &mut self.noise_log
        };
        if let Some(n) = t.allow(self.now) {
            out.push(Effect::Log(
                Level::Warn,
                format!("{text}{}", held_back_note(n, REFUSALS_EVERY_S)),
            ));
        }
    }

    /// Packages missing for the last good config, as checked at start.
    pub fn set_missing(&mut self, missing: Vec<String>) {
        self.missing = missing;
    }

    /// Packages the node lacks.
    pub fn missing(&self) -> &[String] {
        &self.missing
    }

    /// The broker password the shell holds (from an earlier config), and whether the current
    /// session logged in with it. Call before [`Event::Connected`]; the status report says so,
    /// after which the controller has the broker insist on it.
    pub fn set_mqtt_login(&mut self, password: Option<String>, logged_in: bool) {
        self.mqtt_auth = logged_in && password.is_some();
        self.mqtt_password = password;
    }

    /// Puts every applied config on trial for `deadline_s` seconds (backends that change the
    /// data plane). Without it, an applied config counts as confirmed at once.
    pub fn enable_trial(&mut self, deadline_s: u64) {
        self.trial_deadline = Some(deadline_s.max(1));
    }

    /// Revisions that failed before (persisted by the shell): they are never applied again.
    pub fn set_failed(&mut self, failed: Vec<Revision>) {
        self.failed = failed;
    }

    /// The revision on trial, if any.
    pub fn on_trial(&self) -> Option<Revision> {
        self.trial.as_ref().map(|t| t.revision)
    }

    /// Seeds the enrolment request's WireGuard identity (from the backend, at start).
    pub fn set_wireguard(&mut self, wg: Option<sidenet_wire::messages::WireguardInfo>) {
        self.settings.enroll.wireguard = wg.clone();
        self.observed.wireguard = wg;
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// The revision running now.
    pub fn applied(&self) -> Option<Revision> {
        self.applied
    }

    /// The pinned mesh key.
    pub fn mesh_key(&self) -> Option<PublicKey> {
        self.mesh_key
    }

    /// Handles one event at time `now` (Unix seconds).
    pub fn handle(&mut self, event: Event, now: u64) -> Vec<Effect> {
        self.now = now;
        let mut out = Vec::new();
        match event {
            Event::Connected => {
                self.connected = true;
                // Its shard of the announcement (see topics::announce_shard).
                out.push(Effect::Subscribe(topics::announce_shard(
                    &self.settings.mesh,
                    &self.node,
                )));
                out.push(Effect::Subscribe(topics::config(
                    &self.settings.mesh,
                    &self.node,
                )));
                out.push(Effect::Publish {
                    topic: topics::online(&self.settings.mesh, &self.node),
                    payload: b"online".to_vec(),
                    retain: true,
                });
                out.push(Effect::Subscribe(topics::ack(
                    &self.settings.mesh,
                    &self.node,
                )));
                if self.may_enrol() {
                    self.enroll_if_needed(&mut out, true);
                }
                self.status(&mut out);
            }
            Event::Disconnected => self.connected = false,
            Event::Message { topic, payload } => {
                if topics::is_announce(&self.settings.mesh, &topic) {
                    self.on_announce(&payload, &mut out);
                } else if topic == topics::config(&self.settings.mesh, &self.node) {
                    self.on_config(&payload, &mut out);
                } else if topic == topics::ack(&self.settings.mesh, &self.node) {
                    self.on_ack(&payload, &mut out);
                }
            }
            Event::Applied {
                revision,
                sha256,
                result,
            } => {
                self.applying = None;
                // An apply starts only when every package is there.
                if result.is_ok() {
                    self.missing.clear();
                }
                match result {
                    Ok(()) if self.trial_deadline.is_some() => {
                        let deadline = now + self.trial_deadline.unwrap_or(60);
                        self.trial = Some(TrialState {
                            revision,
                            sha256,
                            deadline,
                            first_seq: self.seq + 1,
                            acked: false,
                            had_neighbours: !self.observed.neighbours.is_empty(),
                            decided: false,
                        });
                        out.push(Effect::Log(
                            Level::Info,
                            format!(
                                "applied revision {}; health check until the controller confirms (deadline {}s)",
                                revision.rev,
                                self.trial_deadline.unwrap_or(60)
                            ),
                        ));
                        self.status(&mut out);
                        self.evaluate(&mut out);
                        return out;
                    }
                    Ok(()) => {
                        self.applied = Some(revision);
                        self.applied_sha = Some(sha256);
                        self.failure = None;
                        out.push(Effect::Log(
                            Level::Info,
                            format!("applied revision {}", revision.rev),
                        ));
                    }
                    Err(e) => {
                        self.failed.push(revision);
                        out.push(Effect::Log(
                            Level::Warn,
                            format!(
                                "revision {} failed to apply, kept the last good config: {e}",
                                revision.rev
                            ),
                        ));
                        self.failure = Some(Failure {
                            revision: Some(revision),
                            error: e,
                        });
                    }
                }
                self.status(&mut out);
                self.next(&mut out);
            }
            Event::Tick => {
                if self.connected {
                    if self.may_enrol() {
                        self.enroll_if_needed(&mut out, false);
                    }
                    // While on trial, report every second until the controller acknowledges.
                    let every = match &self.trial {
                        Some(t) if !t.acked => 1,
                        _ => self.settings.status_every,
                    };
                    if now >= self.last_status + every {
                        self.status(&mut out);
                    }
                }
                if !self.missing.is_empty() && now >= self.missing_checked + RECHECK_S {
                    self.missing_checked = now;
                    if self.queued.is_some() {
                        // The shell checks the packages again before applying.
                        self.next(&mut out);
                    } else if self.applying.is_none() && self.trial.is_none() {
                        out.push(Effect::CheckRequirements);
                    }
                }
                self.evaluate(&mut out);
            }
            Event::Unmet {
                revision,
                sha256,
                envelope,
                config,
                missing,
            } => {
                self.applying = None;
                self.accepted = None;
                if self.queued.as_ref().is_none_or(|q| q.revision <= revision) {
                    self.queued = Some(Queued {
                        revision,
                        sha256,
                        envelope,
                        config,
                    });
                }
                self.missing_checked = now;
                if missing != self.missing || self.waiting != Some(revision) {
                    out.push(Effect::Log(
                        Level::Warn,
                        format!(
                            "revision {} waits for packages: missing: {} (checked again every {RECHECK_S}s)",
                            revision.rev,
                            missing.join(", ")
                        ),
                    ));
                }
                self.waiting = Some(revision);
                if missing != self.missing {
                    self.missing = missing;
                    self.status(&mut out);
                }
            }
            Event::Requirements(missing) => {
                self.missing_checked = now;
                if missing != self.missing {
                    out.push(if missing.is_empty() {
                        Effect::Log(Level::Info, "the missing packages are installed now".into())
                    } else {
                        Effect::Log(
                            Level::Warn,
                            format!(
                                "missing: {} (checked again every {RECHECK_S}s)",
                                missing.join(", ")
                            ),
                        )
                    });
                    self.missing = missing;
                    self.status(&mut out);
                }
                if self.missing.is_empty() {
                    self.next(&mut out);
                }
            }
            Event::Observed(obs) => {
                let changed = obs.neighbours != self.observed.neighbours
                    || obs.shaping != self.observed.shaping
                    || obs.services != self.observed.services
                    || (obs.wireguard.is_some() && obs.wireguard != self.observed.wireguard);
                let obs = *obs;
                self.observed = Observation {
                    wireguard: obs.wireguard.or_else(|| self.observed.wireguard.take()),
                    ..obs
                };
                if changed {
                    self.status(&mut out);
                }
                self.evaluate(&mut out);
            }
            Event::Confirmed { revision, result } => {
                let Some(t) = self.trial.take_if(|t| t.revision == revision) else {
                    return out;
                };
                match result {
                    Ok(()) => {
                        self.applied = Some(revision);
                        self.applied_sha = Some(t.sha256);
                        self.failure = None;
                        out.push(Effect::Log(
                            Level::Info,
                            format!(
                                "revision {} passed its health check: confirmed",
                                revision.rev
                            ),
                        ));
                        self.status(&mut out);
                        self.next(&mut out);
                    }
                    Err(e) => {
                        // Could not record it as good: undo it rather than run unconfirmed.
                        let reason = format!("could not confirm: {e}");
                        self.trial = Some(TrialState { decided: true, ..t });
                        out.push(Effect::RollBack { revision, reason });
                    }
                }
            }
            Event::RolledBack {
                revision,
                reason,
                result,
            } => {
                self.trial = None;
                if !self.failed.contains(&revision) {
                    self.failed.push(revision);
                }
                let error = match result {
                    Ok(()) => format!("{reason}; rolled back to the last good config"),
                    Err(e) => format!("{reason}; rollback failed: {e}"),
                };
                out.push(Effect::Log(
                    Level::Warn,
                    format!("revision {}: {error}", revision.rev),
                ));
                self.failure = Some(Failure {
                    revision: Some(revision),
                    error,
                });
                self.status(&mut out);
                self.next(&mut out);
            }
        }
        out
    }

    /// Decides a trial: confirm once healthy, roll back past the deadline.
    fn evaluate(&mut self, out: &mut Vec<Effect>) {
        let Some(t) = self.trial.as_mut() else {
            return;
        };
        if t.decided {
            return;
        }
        let reached = if self.controller_acks {
            t.acked
        } else {
            // A controller that does not acknowledge: the broker connection has to do.
            self.connected
        };
        let neighbours_ok =
            !t.had_neighbours || self.observed.links == 0 || !self.observed.neighbours.is_empty();
        if reached && neighbours_ok {
            t.decided = true;
            out.push(Effect::Confirm {
                revision: t.revision,
            });
        } else if self.now >= t.deadline {
            t.decided = true;
            let reason = if !reached {
                "health check failed: the controller did not acknowledge the new config before the deadline (the node may be cut off from it)".to_string()
            } else {
                "health check failed: no babel neighbour came back before the deadline".to_string()
            };
            out.push(Effect::RollBack {
                revision: t.revision,
                reason,
            });
        }
    }

    /// Applies the config that arrived during an apply or trial, if it is still new.
    fn next(&mut self, out: &mut Vec<Effect>) {
        if self.applying.is_some() || self.trial.is_some() {
            return;
        }
        let Some(q) = self.queued.take() else { return };
        if self.applied.is_some_and(|a| q.revision <= a) || self.failed.contains(&q.revision) {
            return;
        }
        self.accepted = Some((sidenet_wire::codec::sha256(&q.envelope), q.revision));
        self.applying = Some(q.revision);
        out.push(Effect::Apply {
            revision: q.revision,
            sha256: q.sha256,
            envelope: q.envelope,
            config: q.config,
        });
    }

    fn on_ack(&mut self, payload: &[u8], out: &mut Vec<Effect>) {
        let (Some(mesh_key), Some(t)) = (self.mesh_key, self.trial.as_ref()) else {
            return;
        };
        let checked = Envelope::parse(payload, 64 * 1024)
            .and_then(|e| e.verify(Kind::Ack, &mesh_key))
            .and_then(|v| {
                v.check(&Expect {
                    mesh: &self.settings.mesh,
                    node: Some(&self.node),
                    after: None,
                    now: self.now,
                })?;
                let ack: Ack = v.body_json()?;
                Ok((v.header.revision(), ack))
            });
        let (seq, ack) = match checked {
            Ok(x) => x,
            Err(e) => {
                self.refused_log(out, false, format!("ignored acknowledgement: {e}"));
                return;
            }
        };
        // Only an answer to a report of this run, sent during this trial, naming this config.
        let fresh = seq.epoch == self.seq_epoch && seq.rev >= t.first_seq && seq.rev <= self.seq;
        if !fresh || ack.revision != t.revision || ack.sha256 != t.sha256 {
            return;
        }
        if let Some(t) = self.trial.as_mut() {
            t.acked = true;
        }
        self.evaluate(out);
    }

    fn next_header(&mut self) -> Header {
        self.seq += 1;
        Header {
            mesh: self.settings.mesh.clone(),
            node: Some(self.node.clone()),
            epoch: self.seq_epoch,
            rev: self.seq,
            iat: self.now,
            exp: self.now + MESSAGE_VALIDITY,
            len: 0,
            sha256: String::new(),
        }
    }

    fn enroll_if_needed(&mut self, out: &mut Vec<Effect>, force: bool) {
        if self.applied.is_some() {
            return;
        }
        let due = match self.last_enroll {
            None => true,
            Some(t) => force || self.now >= t + self.settings.enroll_every,
        };
        if !due {
            return;
        }
        self.last_enroll = Some(self.now);
        let header = self.next_header();
        let body = serde_json::to_vec(&self.settings.enroll).unwrap_or_default();
        out.push(Effect::Publish {
            topic: topics::enroll(&self.settings.mesh, &self.node),
            payload: sidenet_wire::envelope::seal(Kind::Enroll, header, &body, &self.key),
            retain: false,
        });
        out.push(Effect::Log(
            Level::Info,
            format!(
                "asked to join mesh {} as node {}",
                self.settings.mesh, self.node
            ),
        ));
    }

    fn status(&mut self, out: &mut Vec<Effect>) {
        if !self.connected {
            return;
        }
        self.last_status = self.now;
        let state = if self.failure.as_ref().is_some_and(|f| f.revision.is_some()) {
            ApplyState::Failed
        } else if self.applied.is_some() {
            ApplyState::Applied
        } else {
            ApplyState::Pending
        };
        let report = StatusReport {
            state,
            applied: self.applied,
            applied_sha256: self.applied_sha.clone(),
            failure: self.failure.clone(),
            uptime_s: self.now.saturating_sub(self.started),
            agent_version: self.settings.enroll.agent_version.clone(),
            neighbours: self.observed.neighbours.clone(),
            probes: self.observed.probes.clone(),
            wireguard: self.observed.wireguard.clone(),
            trial: self.trial.as_ref().map(|t| Trial {
                revision: t.revision,
                sha256: t.sha256.clone(),
            }),
            mqtt_auth: self.mqtt_auth,
            missing: self.missing.clone(),
            shaping: self.observed.shaping.clone(),
            services: self.observed.services.clone(),
        };
        let header = self.next_header();
        let body = serde_json::to_vec(&report).unwrap_or_default();
        out.push(Effect::Publish {
            topic: topics::status(&self.settings.mesh, &self.node),
            payload: sidenet_wire::envelope::seal(Kind::Status, header, &body, &self.key),
            // Retained: a controller that restarts (or a standby that takes over) learns every
            // node's last report at once instead of waiting for the next one.
            retain: true,
        });
    }

    fn on_announce(&mut self, payload: &[u8], out: &mut Vec<Effect>) {
        let verified = match Envelope::parse(payload, self.settings.max_envelope)
            .and_then(|e| e.verify_self_signed(Kind::Announce))
        {
            Ok(v) => v,
            Err(e) => {
                self.refused_log(out, true, format!("ignored announcement: {e}"));
                return;
            }
        };
        if verified.header.mesh != self.settings.mesh {
            self.refused_log(out, true, "ignored announcement for another mesh".into());
            return;
        }
        if self.mesh_key == Some(verified.signer) {
            self.controller_acks = verified.body_json::<Announce>().is_ok_and(|a| a.acks);
        }
        match self.mesh_key {
            Some(k) if k == verified.signer => {}
            Some(k) => {
                // A rotated key is endorsed, link by link, by the key we pinned.
                let body: Result<Announce, _> = verified.body_json();
                let followed = body.as_ref().map_err(|e| e.to_string()).and_then(|a| {
                    if a.key != verified.signer.to_base64() {
                        return Err("its key field names another key".into());
                    }
                    sidenet_wire::rotation::follow(&self.settings.mesh, &a.chain, &k)
                        .map_err(|e| e.to_string())
                });
                match followed {
                    Ok(to) if to == verified.signer => {
                        let until = body
                            .as_ref()
                            .ok()
                            .and_then(|a| a.previous_until)
                            .unwrap_or(0);
                        self.previous_key = Some((k, until));
                        self.mesh_key = Some(to);
                        self.controller_acks = body.is_ok_and(|a| a.acks);
                        out.push(Effect::PinMeshKey(to));
                        out.push(Effect::Log(
                            Level::Info,
                            format!(
                                "mesh {} key rotated from {} to {} (endorsed by the pinned key); the old key is accepted until {until}",
                                self.settings.mesh,
                                k.fingerprint(),
                                to.fingerprint()
                            ),
                        ));
                        // The retained config may have come before this announcement and been
                        // refused: subscribing again delivers it again.
                        out.push(Effect::Subscribe(topics::config(
                            &self.settings.mesh,
                            &self.node,
                        )));
                    }
                    Ok(_) | Err(_) => {
                        let why = match followed {
                            Err(e) => e,
                            Ok(_) => "the key chain leads elsewhere".into(),
                        };
                        let text = format!(
                            "ignored announcement signed by {} (pinned key is {}): {why}",
                            verified.signer.fingerprint(),
                            k.fingerprint()
                        );
                        self.refused_log(out, true, text);
                    }
                }
            }
            None => {
                let body: Result<Announce, _> = verified.body_json();
                let Some(announce) = body.ok().filter(|a| a.key == verified.signer.to_base64())
                else {
                    self.refused_log(out, true, "ignored malformed announcement".into());
                    return;
                };
                let mesh = self.settings.mesh.clone();
                if let Err(why) = self
                    .trust
                    .admits_announcement(&mesh, &verified.signer, &announce)
                {
                    self.refused_log(out, true, format!("mesh {mesh}: {why}"));
                    return;
                }
                self.controller_acks = announce.acks;
                self.mesh_key = Some(verified.signer);
                out.push(Effect::PinMeshKey(verified.signer));
                let code = sidenet_wire::join::JoinCode::new(&mesh, &verified.signer);
                out.push(match &self.trust {
                    Trust::FirstKey => Effect::Log(
                        Level::Warn,
                        format!(
                            "trusting mesh {mesh} key {} because it announced itself first (--trust-first-key): anyone who can publish on the broker could have been first; check its join code {code} against `sidenetctl join-code --mesh {mesh}`",
                            verified.signer
                        ),
                    ),
                    _ => Effect::Log(
                        Level::Info,
                        format!(
                            "trusting mesh {mesh} key {}: it matches join code {code}",
                            verified.signer
                        ),
                    ),
                });
                self.enroll_if_needed(out, true);
            }
        }
    }

    /// Opens the secrets sealed to this node and fills them in where the files use them.
    ///
    /// Also opens the node's broker password when the config carries one (returned second).
    fn unseal(
        &mut self,
        mut config: NodeConfig,
    ) -> Result<(NodeConfig, Option<String>), seal::SealError> {
        let sealed = std::mem::take(&mut config.sealed);
        // What this config opens becomes the cache (secrets it no longer carries are dropped).
        let mut opened: Vec<(String, String, String)> = Vec::new();
        let cache = std::mem::take(&mut self.unsealed);
        let (key, mesh, node) = (&self.key, &self.settings.mesh, &self.node);
        let mut open = |name: &str, s: &str| -> Result<String, seal::SealError> {
            if let Some((_, _, v)) = opened.iter().find(|(n, _, _)| n == name) {
                return Ok(v.clone());
            }
            let v = match cache.iter().find(|(n, t, _)| n == name && t == s) {
                Some((_, _, v)) => v.clone(),
                None => {
                    let ctx = seal::Context { mesh, node, name };
                    String::from_utf8(seal::open(key, ctx, s)?)
                        .map_err(|_| seal::SealError::Open(name.into()))?
                }
            };
            opened.push((name.to_string(), s.to_string(), v.clone()));
            Ok(v)
        };
        let mqtt_password = match sealed.get(seal::MQTT_PASSWORD) {
            Some(s) => Some(
                open(seal::MQTT_PASSWORD, s)
                    .ok()
                    .filter(|p| !p.is_empty() && p.len() <= 256 && !p.contains(char::is_control))
                    .ok_or_else(|| seal::SealError::Open(seal::MQTT_PASSWORD.into()))?,
            ),
            None => None,
        };
        for f in &mut config.files {
            f.content = seal::fill(&f.content, &mut |name| {
                let s = sealed
                    .get(name)
                    .ok_or_else(|| seal::SealError::Missing(name.into()))?;
                open(name, s)
            })?;
        }
        self.unsealed = opened;
        Ok((config, mqtt_password))
    }

    fn on_config(&mut self, payload: &[u8], out: &mut Vec<Effect>) {
        if payload.is_empty() {
            // The controller cleared the retained config: the node was removed
            // (`sidenetctl remove`, or its MeshNode deleted). Nothing to verify or report.
            if !self.withdrawn {
                self.withdrawn = true;
                let running = match self.applied {
                    Some(r) => format!("it keeps running revision {r}"),
                    None => "it has no config to run".into(),
                };
                out.push(Effect::Log(
                    Level::Warn,
                    format!(
                        "the controller withdrew this node's config: node {} was removed from mesh {} (sidenetctl remove, or its MeshNode was deleted) and its broker login revoked; {running} and does not ask to join again (see the README, \"Removing a node\")",
                        self.node, self.settings.mesh
                    ),
                ));
            }
            return;
        }
        self.withdrawn = false;
        // No key pinned yet: with a join code, the config's own signer may be the mesh's key.
        let Some(mesh_key) = self.mesh_key.or_else(|| {
            Envelope::parse(payload, self.settings.max_envelope)
                .and_then(|e| e.claimed_signer())
                .ok()
                .filter(|k| self.trust.admits_config_signer(k))
        }) else {
            self.refused_log(
                out,
                false,
                "config ignored: no mesh key pinned yet, and its signer is not the key of this agent's join code".into(),
            );
            return;
        };
        let busy = self.applying.or(self.trial.as_ref().map(|t| t.revision));
        let after = match (self.applied, busy) {
            (a, Some(b)) => Some(a.map_or(b, |a| a.max(b))),
            (a, None) => a,
        };
        let digest = sidenet_wire::codec::sha256(payload);
        if let Some((d, r)) = self.accepted
            && d == digest
            && (Some(r) == self.applied || Some(r) == busy)
        {
            // Exactly the envelope verified before, for what we run: nothing to do.
            return;
        }
        let now = self.now;
        let previous = self.previous_key.filter(|(_, until)| now < *until);
        let checked = Envelope::parse(payload, self.settings.max_envelope)
            .and_then(|e| match (e.verify(Kind::Config, &mesh_key), previous) {
                // Within the overlap of a key rotation the old key still counts.
                (Err(_), Some((old, _))) => e.verify(Kind::Config, &old),
                (r, _) => r,
            })
            .and_then(|v| {
                v.check(&Expect {
                    mesh: &self.settings.mesh,
                    node: Some(&self.node),
                    after,
                    now: self.now,
                })?;
                let config: NodeConfig = v.body_json()?;
                Ok((v.header.revision(), v.header.sha256.clone(), config))
            });
        let (revision, sha256, config) = match checked {
            Ok(x) => x,
            Err(WireError::Stale { got, .. }) if Some(got) == self.applied || Some(got) == busy => {
                // The retained copy of what we run: nothing to do.
                return;
            }
            Err(e) => {
                // Anyone who can publish on the broker can send these: the failure text is
                // bounded, and at most one report a minute says so (the next heartbeat carries
                // the latest one).
                let error = bounded(&format!("config refused: {e}"), MAX_FAILURE_TEXT);
                self.failure = Some(Failure {
                    revision: None,
                    error: error.clone(),
                });
                if let Some(n) = self.refusal_reports.allow(self.now) {
                    out.push(Effect::Log(
                        Level::Warn,
                        format!("{error}{}", held_back_note(n, REFUSALS_EVERY_S)),
                    ));
                    self.status(out);
                }
                return;
            }
        };
        if self.mesh_key.is_none() {
            // Verified with the key of the join code: the mesh's key.
            self.mesh_key = Some(mesh_key);
            out.push(Effect::PinMeshKey(mesh_key));
            out.push(Effect::Log(
                Level::Info,
                format!(
                    "trusting mesh {} key {mesh_key}: it signed this node's config and matches join code {}",
                    self.settings.mesh,
                    sidenet_wire::join::JoinCode::new(&self.settings.mesh, &mesh_key)
                ),
            ));
        }
        if self.failed.contains(&revision) {
            return;
        }
        if config.mesh != self.settings.mesh || config.node != self.node {
            out.push(Effect::Log(
                Level::Warn,
                "config body names another mesh or node".into(),
            ));
            return;
        }
        if let Some(bad) = config.files.iter().find(|f| !f.path_is_safe()) {
            let e = bounded(
                &format!("unsafe file path {:?}", bad.path),
                MAX_FAILURE_TEXT,
            );
            out.push(Effect::Log(Level::Warn, format!("config refused: {e}")));
            self.failed.push(revision);
            self.failure = Some(Failure {
                revision: Some(revision),
                error: e,
            });
            self.status(out);
            return;
        }
        let config = match self.unseal(config) {
            Ok((c, password)) => {
                if let Some(p) = password
                    && self.mqtt_password.as_deref() != Some(p.as_str())
                {
                    out.push(Effect::Log(
                        Level::Info,
                        "the config carries this node's broker password: logging in with it from now on".into(),
                    ));
                    self.mqtt_password = Some(p.clone());
                    self.mqtt_auth = false;
                    out.push(Effect::MqttPassword(p));
                }
                c
            }
            Err(e) => {
                out.push(Effect::Log(Level::Warn, format!("config refused: {e}")));
                self.failed.push(revision);
                self.failure = Some(Failure {
                    revision: Some(revision),
                    error: bounded(&e.to_string(), MAX_FAILURE_TEXT),
                });
                self.status(out);
                return;
            }
        };
        if let Some(b) = busy {
            // Applied when the current apply or trial ends (only the newest is kept).
            out.push(Effect::Log(
                Level::Info,
                format!(
                    "revision {} waits for revision {} to finish",
                    revision.rev, b.rev
                ),
            ));
            self.queued = Some(Queued {
                revision,
                sha256,
                envelope: payload.to_vec(),
                config: Box::new(config),
            });
            return;
        }
        self.accepted = Some((digest, revision));
        self.applying = Some(revision);
        out.push(Effect::Apply {
            revision,
            sha256,
            envelope: payload.to_vec(),
            config: Box::new(config),
        });
    }
}

#[cfg(test)]
mod tests;
