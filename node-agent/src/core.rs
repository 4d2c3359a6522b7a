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
mod tests {
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
        let r = report(status_of(&out).unwrap_or_else(|| unreachable!()))
            .unwrap_or_else(|| unreachable!());
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
        let r = report(status_of(&out).unwrap_or_else(|| unreachable!()))
            .unwrap_or_else(|| unreachable!());
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
        let r = report(status_of(&out).unwrap_or_else(|| unreachable!()))
            .unwrap_or_else(|| unreachable!());
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
        let r = report(status_of(&out).unwrap_or_else(|| unreachable!()))
            .unwrap_or_else(|| unreachable!());
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
}
