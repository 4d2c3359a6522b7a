//! The agent's sans-IO core: events in, effects out.
//!
//! The core decides; the shell (`shell.rs`) does: it connects to the broker, feeds messages and
//! timer ticks in as [`Event`]s and carries out the returned [`Effect`]s (subscribe, publish,
//! pin a key, apply a config). Nothing here touches the network, the disk or the clock.

use sidenet_wire::envelope::Expect;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{
    Announce, ApplyState, EnrollRequest, Failure, NodeConfig, StatusReport,
};
use sidenet_wire::{Envelope, Header, Kind, PublicKey, Revision, WireError, topics};

/// How long node messages stay valid (the controller refuses older ones).
const MESSAGE_VALIDITY: u64 = 600;

/// Something that happened.
#[derive(Debug, Clone, PartialEq)]
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
}

/// Something to do.
#[derive(Debug, Clone, PartialEq)]
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
        }
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
                out.push(Effect::Subscribe(topics::announce(&self.settings.mesh)));
                out.push(Effect::Subscribe(topics::config(
                    &self.settings.mesh,
                    &self.node,
                )));
                out.push(Effect::Publish {
                    topic: topics::online(&self.settings.mesh, &self.node),
                    payload: b"online".to_vec(),
                    retain: true,
                });
                if self.mesh_key.is_some() {
                    self.enroll_if_needed(&mut out, true);
                }
                self.status(&mut out);
            }
            Event::Message { topic, payload } => {
                if topic == topics::announce(&self.settings.mesh) {
                    self.on_announce(&payload, &mut out);
                } else if topic == topics::config(&self.settings.mesh, &self.node) {
                    self.on_config(&payload, &mut out);
                }
            }
            Event::Applied {
                revision,
                sha256,
                result,
            } => {
                self.applying = None;
                match result {
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
            }
            Event::Tick => {
                if self.connected {
                    if self.mesh_key.is_some() {
                        self.enroll_if_needed(&mut out, false);
                    }
                    if now >= self.last_status + self.settings.status_every {
                        self.status(&mut out);
                    }
                }
            }
        }
        out
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
            neighbours: Vec::new(),
            probes: Vec::new(),
        };
        let header = self.next_header();
        let body = serde_json::to_vec(&report).unwrap_or_default();
        out.push(Effect::Publish {
            topic: topics::status(&self.settings.mesh, &self.node),
            payload: sidenet_wire::envelope::seal(Kind::Status, header, &body, &self.key),
            retain: false,
        });
    }

    fn on_announce(&mut self, payload: &[u8], out: &mut Vec<Effect>) {
        let verified = match Envelope::parse(payload, self.settings.max_envelope)
            .and_then(|e| e.verify_self_signed(Kind::Announce))
        {
            Ok(v) => v,
            Err(e) => {
                out.push(Effect::Log(
                    Level::Warn,
                    format!("ignored announcement: {e}"),
                ));
                return;
            }
        };
        if verified.header.mesh != self.settings.mesh {
            out.push(Effect::Log(
                Level::Warn,
                "ignored announcement for another mesh".into(),
            ));
            return;
        }
        match self.mesh_key {
            Some(k) if k == verified.signer => {}
            Some(k) => {
                out.push(Effect::Log(
                    Level::Warn,
                    format!(
                        "ignored announcement signed by {} (pinned key is {}): possible impostor",
                        verified.signer.fingerprint(),
                        k.fingerprint()
                    ),
                ));
            }
            None => {
                let body: Result<Announce, _> = verified.body_json();
                let ok = body
                    .as_ref()
                    .is_ok_and(|a| a.key == verified.signer.to_base64());
                if !ok {
                    out.push(Effect::Log(
                        Level::Warn,
                        "ignored malformed announcement".into(),
                    ));
                    return;
                }
                self.mesh_key = Some(verified.signer);
                out.push(Effect::PinMeshKey(verified.signer));
                out.push(Effect::Log(
                    Level::Info,
                    format!(
                        "trusting mesh {} key {} on first use (fingerprint {})",
                        self.settings.mesh,
                        verified.signer,
                        verified.signer.fingerprint()
                    ),
                ));
                self.enroll_if_needed(out, true);
            }
        }
    }

    fn on_config(&mut self, payload: &[u8], out: &mut Vec<Effect>) {
        let Some(mesh_key) = self.mesh_key else {
            out.push(Effect::Log(
                Level::Warn,
                "config ignored: no mesh key pinned yet".into(),
            ));
            return;
        };
        let after = match (self.applied, self.applying) {
            (a, Some(b)) => Some(a.map_or(b, |a| a.max(b))),
            (a, None) => a,
        };
        let checked = Envelope::parse(payload, self.settings.max_envelope)
            .and_then(|e| e.verify(Kind::Config, &mesh_key))
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
            Err(WireError::Stale { got, .. })
                if Some(got) == self.applied || Some(got) == self.applying =>
            {
                // The retained copy of what we run: nothing to do.
                return;
            }
            Err(e) => {
                out.push(Effect::Log(Level::Warn, format!("config refused: {e}")));
                self.failure = Some(Failure {
                    revision: None,
                    error: format!("config refused: {e}"),
                });
                self.status(out);
                return;
            }
        };
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
            let e = format!("unsafe file path {:?}", bad.path);
            out.push(Effect::Log(Level::Warn, format!("config refused: {e}")));
            self.failed.push(revision);
            self.failure = Some(Failure {
                revision: Some(revision),
                error: e,
            });
            self.status(out);
            return;
        }
        self.applying = Some(revision);
        out.push(Effect::Apply {
            revision,
            sha256,
            envelope: payload.to_vec(),
            config: Box::new(config),
        });
    }
}
