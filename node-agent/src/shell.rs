//! The thin tokio/MQTT shell around [`crate::core::Agent`].

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, LastWill, MqttOptions, Packet, QoS};
use sidenet_wire::envelope::DEFAULT_MAX_ENVELOPE;
use sidenet_wire::messages::EnrollRequest;
use sidenet_wire::{Envelope, Kind, PublicKey, topics};

use crate::core::{Agent, Effect, Event, Level, Settings};
use crate::files::Applier;
use crate::state::{State, StateError};

/// Options of the agent.
#[derive(Debug, Clone)]
pub struct Options {
    /// Mesh network name.
    pub mesh: String,
    /// Broker URL.
    pub broker: String,
    /// Mesh key to pin (base64), if known at install.
    pub mesh_key: Option<String>,
    /// Root folder the backend writes under.
    pub root: PathBuf,
    /// State folder.
    pub state: PathBuf,
    /// Hostname to report.
    pub hostname: String,
    /// Board name to report.
    pub board: Option<String>,
    /// Hardware profile to ask for.
    pub profile: Option<String>,
    /// Enrolment token.
    pub token: Option<String>,
    /// Envelope size cap.
    pub max_envelope: usize,
    /// Seconds between status heartbeats.
    pub status_every: u64,
    /// Longest reconnect backoff.
    pub max_backoff: Duration,
}

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// State folder.
    #[error(transparent)]
    State(#[from] StateError),
    /// Journal recovery.
    #[error(transparent)]
    Apply(#[from] crate::files::ApplyError),
    /// Bad option.
    #[error("{0}")]
    Usage(String),
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the agent until `shutdown` completes.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    sidenet_wire::names::check_mesh_name(&opts.mesh)
        .map_err(|e| AgentError::Usage(e.to_string()))?;
    let (host, port) = topics::parse_broker_url(&opts.broker).map_err(AgentError::Usage)?;
    let state = State::open(&opts.state)?;
    let key = state.node_key()?;
    let node = key.public().node_id();
    let mut pinned = state.pinned()?;
    if let Some(given) = &opts.mesh_key {
        let given = PublicKey::from_base64(given)
            .map_err(|e| AgentError::Usage(format!("--mesh-key: {e}")))?;
        match pinned {
            Some(p) if p != given => {
                return Err(AgentError::Usage(format!(
                    "--mesh-key {given} differs from the key pinned in {}/mesh.pub ({p}); remove that file to re-pin deliberately",
                    opts.state.display()
                )));
            }
            _ => {
                state.pin(&given)?;
                pinned = Some(given);
            }
        }
    }
    let applier = Applier::new(&opts.root, &opts.state);
    if let Some(r) = applier.recover()? {
        tracing::info!(rev = r.rev, "finished an interrupted apply");
    }
    // The last good config counts only if it still verifies against the pinned key.
    let applied = match (applier.current(), applier.current_envelope(), pinned) {
        (Some(cur), Some(env), Some(k)) => {
            let ok = Envelope::parse(&env, opts.max_envelope)
                .and_then(|e| e.verify(Kind::Config, &k))
                .is_ok_and(|v| v.header.revision() == cur.revision);
            if ok {
                Some((cur.revision, cur.sha256))
            } else {
                tracing::warn!(
                    "last good config does not verify against the pinned key; ignoring it"
                );
                None
            }
        }
        _ => None,
    };
    let seq_epoch = state.next_seq_epoch(now())?;
    tracing::info!(node = %node, mesh = %opts.mesh, public_key = %key.public(), "sidenet agent starting");
    let settings = Settings {
        mesh: opts.mesh.clone(),
        max_envelope: opts.max_envelope,
        enroll: EnrollRequest {
            hostname: opts.hostname.clone(),
            board: opts.board.clone(),
            profile: opts.profile.clone(),
            token: opts.token.clone(),
            backend: "files".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        },
        status_every: opts.status_every,
        enroll_every: 15,
    };
    let mut agent = Agent::new(settings, key, pinned, applied, seq_epoch, now());

    let mut mqtt = MqttOptions::new(node.clone(), host, port);
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_clean_session(true);
    // Accept packets well above the envelope cap, so an oversize config is refused by the
    // verifier (and reported) instead of breaking the MQTT session in a reconnect loop.
    mqtt.set_max_packet_size((opts.max_envelope * 4).max(4 << 20), 64 * 1024);
    mqtt.set_last_will(LastWill::new(
        topics::online(&opts.mesh, &node),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = AsyncClient::new(mqtt, 64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut backoff = Duration::from_millis(250);
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => Event::Tick,
            ev = eventloop.poll() => match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(250);
                    tracing::info!("connected to {}", opts.broker);
                    Event::Connected
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => Event::Message {
                    topic: p.topic.to_string(),
                    payload: p.payload.to_vec(),
                },
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!("broker {}: {e}; retrying in {backoff:?} (running on the last good config)", opts.broker);
                    // Keep the timer going while waiting, so the agent stays responsive.
                    let wait = tokio::time::sleep(backoff);
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = wait => {}
                    }
                    backoff = (backoff * 2).min(opts.max_backoff);
                    continue;
                }
            },
        };
        let mut queue = vec![event];
        while let Some(ev) = queue.pop() {
            for effect in agent.handle(ev, now()) {
                match effect {
                    Effect::Subscribe(t) => {
                        if let Err(e) = client.subscribe(t, QoS::AtLeastOnce).await {
                            tracing::warn!("subscribe: {e}");
                        }
                    }
                    Effect::Publish {
                        topic,
                        payload,
                        retain,
                    } => {
                        if let Err(e) = client
                            .publish(topic, QoS::AtLeastOnce, retain, payload)
                            .await
                        {
                            tracing::warn!("publish: {e}");
                        }
                    }
                    Effect::PinMeshKey(k) => {
                        if let Err(e) = state.pin(&k) {
                            tracing::error!("cannot pin mesh key: {e}");
                        }
                    }
                    Effect::Apply {
                        revision,
                        sha256,
                        envelope,
                        config,
                    } => {
                        let applier = applier.clone();
                        let sha = sha256.clone();
                        let result = tokio::task::spawn_blocking(move || {
                            applier.apply(revision, &sha, &envelope, &config)
                        })
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                        queue.push(Event::Applied {
                            revision,
                            sha256,
                            result,
                        });
                    }
                    Effect::Log(Level::Info, m) => tracing::info!(node = %node, "{m}"),
                    Effect::Log(Level::Warn, m) => tracing::warn!(node = %node, "{m}"),
                }
            }
        }
    }
    let _ = client
        .publish(
            topics::online(&opts.mesh, &node),
            QoS::AtLeastOnce,
            true,
            "offline",
        )
        .await;
    let _ = client.disconnect().await;
    // Let the disconnect go out.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

/// The default envelope cap.
pub const DEFAULT_MAX: usize = DEFAULT_MAX_ENVELOPE;
