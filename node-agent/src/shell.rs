//! The thin tokio/MQTT shell around [`crate::core::Agent`]: it feeds broker messages, ticks and
//! observations of the data plane to the core and carries out its effects with the journal
//! ([`crate::files`]), the backend ([`crate::backend`]) and the prober ([`crate::probe`]).

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, LastWill, MqttOptions, Packet, QoS};
use sidenet_wire::envelope::DEFAULT_MAX_ENVELOPE;
use sidenet_wire::messages::{EnrollRequest, NodeConfig};
use sidenet_wire::{Envelope, Kind as EnvelopeKind, PublicKey, topics};
use tokio::sync::watch;

use crate::backend::{self, Backend, BackendError, Kind, SystemRunner};
use crate::core::join::Trust;
use crate::core::{Agent, Effect, Event, Level, Settings};
use crate::files::{Applier, Phase, Recovery};
use crate::state::{State, StateError};

/// Options of the agent.
#[derive(Debug, Clone)]
pub struct Options {
    /// Mesh network name.
    pub mesh: String,
    /// Broker URL: `mqtt://host[:port]`, or `mqtts://host[:port]` with [`Options::broker_ca`].
    pub broker: String,
    /// The CA bundle an `mqtts://` broker's certificate must chain to (the only one trusted).
    pub broker_ca: Option<BrokerCa>,
    /// Mesh key to pin (base64), if known at install.
    pub mesh_key: Option<String>,
    /// Join code: trust only the mesh key with its fingerprint (`--join`).
    pub join: Option<sidenet_wire::join::JoinCode>,
    /// Trust whichever key announces itself first (`--trust-first-key`).
    pub trust_first_key: bool,
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
    /// How configs are applied.
    pub backend: Kind,
    /// Data-plane options of the `linux` and `openwrt` backends.
    pub dataplane: backend::DataplaneArgs,
}

pub use crate::ca::BrokerCa;

/// Whether this build speaks `mqtts://` (the cargo feature `tls`).
pub const TLS_SUPPORTED: bool = cfg!(feature = "tls");

/// The transport for `url`: `None` for plain TCP, TLS pinned to `ca` for `mqtts://`. Refuses
/// `mqtts://` without a CA (or in a build without TLS) and a CA without `mqtts://`.
pub fn transport(
    url: &topics::BrokerUrl,
    broker: &str,
    ca: Option<&BrokerCa>,
) -> Result<Option<rumqttc::Transport>, String> {
    match (url.tls, ca) {
        (false, None) => Ok(None),
        (false, Some(ca)) => Err(format!(
            "{} is given, but --broker {broker} is not an mqtts:// URL (the CA pins a TLS broker; use mqtts://HOST:8883, or drop the CA)",
            ca.origin
        )),
        (true, _) if !TLS_SUPPORTED => Err(format!(
            "--broker {broker}: this sidenet-agent was built without TLS (cargo feature `tls`), so it cannot speak mqtts://; build it with `cargo build --profile agent -p sidenet-agent --features tls`, or use an mqtt:// broker"
        )),
        (true, None) => Err(format!(
            "--broker {broker} is mqtts:// but no CA is given: pass --ca FILE (the PEM bundle of the CA that signed the broker's certificate; the agent trusts only it), or brokerCa in the --config file"
        )),
        #[cfg(feature = "tls")]
        (true, Some(ca)) => Ok(Some(rumqttc::Transport::tls_with_config(
            crate::tls::client_config(ca)?,
        ))),
        #[cfg(not(feature = "tls"))]
        (true, Some(_)) => Err("unreachable: TLS without the tls feature".into()),
    }
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
    /// The backend could not start.
    #[error(transparent)]
    Backend(#[from] BackendError),
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

type Shared = Arc<Mutex<Box<dyn Backend>>>;

fn lock(b: &Shared) -> std::sync::MutexGuard<'_, Box<dyn Backend>> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the blocking pool (commands, disk), returning its result.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
}

/// The packages of `reqs` missing on this system.
fn requires_missing(reqs: &[sidenet_wire::messages::Requirement]) -> Vec<String> {
    if reqs.is_empty() {
        return Vec::new();
    }
    crate::requires::missing(
        reqs,
        &crate::requires::search_path(),
        &mut SystemRunner::default(),
    )
}

/// The last good config, if it still verifies against the pinned key.
fn last_good(
    applier: &Applier,
    pinned: Option<PublicKey>,
    max: usize,
) -> Option<(sidenet_wire::Revision, String, NodeConfig)> {
    let (cur, env, k) = (applier.current()?, applier.current_envelope()?, pinned?);
    let verified = Envelope::parse(&env, max)
        .and_then(|e| e.verify(EnvelopeKind::Config, &k))
        .ok()
        .filter(|v| v.header.revision() == cur.revision);
    let Some(v) = verified else {
        tracing::warn!("last good config does not verify against the pinned key; ignoring it");
        return None;
    };
    let config: NodeConfig = v.body_json().ok()?;
    Some((cur.revision, cur.sha256, config))
}

/// How the agent may trust a mesh key while none is pinned; refuses to start when it could
/// trust none, and when the join code contradicts the mesh or `--mesh-key`.
fn trust_policy(opts: &Options, pinned: Option<PublicKey>) -> Result<Trust, AgentError> {
    if let Some(code) = &opts.join {
        if code.mesh() != opts.mesh {
            return Err(AgentError::Usage(format!(
                "--join {code} is a join code of mesh {}, but --mesh is {}",
                code.mesh(),
                opts.mesh
            )));
        }
        if let Some(given) = &opts.mesh_key
            && let Ok(k) = PublicKey::from_base64(given)
            && !code.matches(&k)
        {
            return Err(AgentError::Usage(format!(
                "--mesh-key {k} does not match --join {code}: that key's join code would be {}",
                sidenet_wire::join::JoinCode::new(&opts.mesh, &k)
            )));
        }
        if let Some(p) = pinned
            && !code.matches(&p)
        {
            tracing::warn!(
                "the mesh key pinned in {}/mesh.pub is not the key of join code {code}: expected after a key rotation (sidenetctl rotate-key), and the pinned key is kept; if the key was never rotated, delete mesh.pub and start again to pin the key through the join code",
                opts.state.display()
            );
        }
        return Ok(Trust::Code(code.clone()));
    }
    if opts.trust_first_key {
        if pinned.is_none() {
            tracing::warn!(
                "--trust-first-key: the first key announced for mesh {} will be trusted; anyone who can publish on the broker can announce first (use --join CODE from `sidenetctl join-code --mesh {}`)",
                opts.mesh,
                opts.mesh
            );
        }
        return Ok(Trust::FirstKey);
    }
    if pinned.is_none() {
        return Err(AgentError::Usage(format!(
            "no way to check the key of mesh {m}: this agent has no key pinned yet, so give it the mesh's join code (--join CODE, or joinCode in --config; the admin prints it with `sidenetctl join-code --mesh {m}`), or the mesh key (--mesh-key KEY). --trust-first-key trusts whichever key announces itself first, which anyone who can publish on the broker can do",
            m = opts.mesh
        )));
    }
    Ok(Trust::Nothing)
}

/// Runs the agent until `shutdown` completes.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    sidenet_wire::names::check_mesh_name(&opts.mesh)
        .map_err(|e| AgentError::Usage(e.to_string()))?;
    let url = topics::parse_broker(&opts.broker)
        .map_err(|e| AgentError::Usage(format!("--broker: {e}")))?;
    let tls = transport(&url, &opts.broker, opts.broker_ca.as_ref()).map_err(AgentError::Usage)?;
    let (host, port) = (url.host.clone(), url.port);
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
    let trust = trust_policy(&opts, pinned)?;
    let backend: Shared = Arc::new(Mutex::new(crate::backends::open(
        opts.backend,
        &opts.dataplane,
        &opts.root,
        &opts.state,
        Box::new(SystemRunner::default()),
    )?));
    let needs_trial = lock(&backend).needs_trial();
    let applier = Applier::new(&opts.root, &opts.state);
    match applier.recover()? {
        Recovery::Clean => {}
        Recovery::RolledForward(r) => {
            tracing::info!(rev = r.rev, "finished confirming an interrupted apply");
        }
        Recovery::RolledBack(r, phase) => tracing::warn!(
            rev = r.rev,
            "an apply was interrupted while {}: rolled back to the last good config",
            phase.as_str()
        ),
    }
    let good = last_good(&applier, pinned, opts.max_envelope);
    let mut last_config: Option<NodeConfig> = good.as_ref().map(|g| g.2.clone());
    let applied = good.map(|(r, s, _)| (r, s));
    // Converge to the last good config: after a reboot, a crash or a rollback on start.
    {
        let (b, cfg) = (backend.clone(), last_config.clone());
        if let Err(e) =
            blocking(move || lock(&b).converge(cfg.as_ref()).map_err(|e| e.to_string())).await
        {
            tracing::error!("bringing up the last good config: {e}");
        }
    }
    let seq_epoch = state.next_seq_epoch(now())?;
    tracing::info!(node = %node, mesh = %opts.mesh, public_key = %key.public(), backend = opts.backend.as_str(), "sidenet agent starting");
    let settings = Settings {
        mesh: opts.mesh.clone(),
        max_envelope: opts.max_envelope,
        enroll: EnrollRequest {
            hostname: opts.hostname.clone(),
            board: opts.board.clone(),
            profile: opts.profile.clone(),
            token: opts.token.clone(),
            backend: opts.backend.as_str().into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            wireguard: None,
        },
        status_every: opts.status_every,
        enroll_every: 15,
    };
    let beacon_key = key.clone();
    let mut agent = Agent::new(settings, key, pinned, applied, seq_epoch, now());
    agent.set_trust(trust);
    agent.set_failed(state.failed());
    // Backends that run programs check the packages a config needs (crate::requires).
    let checks = opts.backend != Kind::Files;
    if checks && let Some(cfg) = &last_config {
        let reqs = cfg.requires.clone();
        let missing = blocking(move || Ok(requires_missing(&reqs)))
            .await
            .unwrap_or_default();
        if !missing.is_empty() {
            tracing::warn!(
                "missing: {} (the running config needs these packages; checked again every {}s)",
                missing.join(", "),
                crate::core::RECHECK_S
            );
        }
        agent.set_missing(missing);
    }
    let mut wg_public = None;
    if needs_trial {
        agent.enable_trial(opts.dataplane.health_deadline);
        let b = backend.clone();
        let first = blocking(move || Ok(lock(&b).observe())).await;
        let wg = first.ok().and_then(|o| o.wireguard);
        wg_public = wg.as_ref().map(|w| w.public_key.clone());
        agent.set_wireguard(wg);
    }
    // Neighbours over the air (crate::discovery): beacons on the underlay interfaces.
    let heard: crate::discovery::Shared = Arc::default();
    let discovery = wg_public.map(|wg| {
        let settings = crate::discovery::Settings {
            mesh: opts.mesh.clone(),
            ifaces: opts.dataplane.underlay.clone(),
            wireguard: wg,
            interval: Duration::from_secs(opts.dataplane.beacon_interval.max(1)),
        };
        tokio::spawn(crate::discovery::run(settings, beacon_key, heard.clone()))
    });
    let hold = Duration::from_secs(opts.dataplane.beacon_hold);

    // The prober answers and sends pathfinder probes along the converged config's plan.
    let (plan_tx, plan_rx) = watch::channel(lock(&backend).probe_plan());
    let probes: crate::probe::Results = Arc::default();
    let services: crate::handover::States = Arc::default();
    let handover = needs_trial.then(|| {
        tokio::spawn(crate::handover::run(
            plan_rx.clone(),
            probes.clone(),
            services.clone(),
            Duration::from_secs(opts.dataplane.probe_interval.max(1)),
        ))
    });
    let prober = needs_trial.then(|| {
        tokio::spawn(crate::probe::run(
            plan_rx,
            probes.clone(),
            Duration::from_secs(opts.dataplane.probe_interval.max(1)),
        ))
    });

    let mut mqtt = MqttOptions::new(node.clone(), host, port);
    mqtt.set_keep_alive(Duration::from_secs(30));
    if let Some(t) = tls {
        mqtt.set_transport(t);
        if let Some(ca) = &opts.broker_ca {
            tracing::info!(
                "TLS to {}: trusting only the CA bundle from {}",
                opts.broker,
                ca.origin
            );
        }
    }
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
    // The node's own broker password (from a config): username = node id. Until a node has
    // one it connects without, which the broker allows only for ids it does not yet insist on.
    let mut mqtt_password = state.mqtt_password()?;
    let anonymous = mqtt.clone();
    if let Some(p) = &mqtt_password {
        mqtt.set_credentials(node.clone(), p.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(mqtt, 64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // After a long connect, carry on from now rather than firing the missed ticks at once.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(250);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut connected = false;
    // Set when this agent itself ends the session to log in again with a new broker password:
    // the session's end is then expected, not a broker problem.
    let mut relogin = false;
    // The config on trial, kept to become the last good one when confirmed.
    let mut trial_config: Option<NodeConfig> = None;
    tokio::pin!(shutdown);
    loop {
        let mut queue = Vec::new();
        tokio::select! {
            _ = &mut shutdown => break,
            // Not while a connection is being made: dropping rumqttc's poll in the middle of
            // its CONNECT would leave that half-made session to the broker and start another
            // with the same client id (the broker then takes the first over, and the agent
            // sees a broken pipe). Connecting ends within rumqttc's connection timeout.
            _ = tick.tick(), if connected || retry_at.is_some() => {
                queue.push(Event::Tick);
                if needs_trial {
                    let b = backend.clone();
                    if let Ok(mut obs) = blocking(move || Ok(lock(&b).observe())).await {
                        obs.probes = probes.lock().map(|p| p.clone()).unwrap_or_default();
                        obs.services = services.lock().map(|s| s.clone()).unwrap_or_default();
                        if let (Some(wg), Ok(mut t)) = (obs.wireguard.as_mut(), heard.lock()) {
                            wg.heard = t.heard(std::time::Instant::now(), hold);
                        }
                        queue.push(Event::Observed(Box::new(obs)));
                    }
                }
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if retry_at.is_some() => {
                retry_at = None;
            }
            ev = eventloop.poll(), if retry_at.is_none() => match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(250);
                    connected = true;
                    let logged_in = eventloop.mqtt_options.credentials().is_some();
                    tracing::info!(
                        "connected to {}{}",
                        opts.broker,
                        if logged_in { " with this node's broker password" } else { "" }
                    );
                    agent.set_mqtt_login(mqtt_password.clone(), logged_in);
                    queue.push(Event::Connected);
                }
                Err(rumqttc::ConnectionError::ConnectionRefused(
                    code @ (rumqttc::ConnectReturnCode::BadUserNamePassword
                    | rumqttc::ConnectReturnCode::NotAuthorized),
                )) => {
                    // Refused with the password (the broker does not know it: a broker or
                    // controller rebuilt from scratch) or without it (the broker insists on
                    // it): try the other way next time.
                    let with = eventloop.mqtt_options.credentials().is_some();
                    match (&mqtt_password, with) {
                        (Some(_), true) => {
                            tracing::warn!("broker {} refused this node's password ({code:?}); retrying without it", opts.broker);
                            eventloop.mqtt_options = anonymous.clone();
                        }
                        (Some(p), false) => {
                            tracing::warn!("broker {} refused a connection without password ({code:?}); retrying with this node's password", opts.broker);
                            eventloop.mqtt_options.set_credentials(node.clone(), p.clone());
                        }
                        (None, _) => tracing::warn!(
                            "broker {} refused this node ({code:?}): it expects this node's broker password, which this node does not hold (was its state folder {} restored without mqtt.password?); an admin can remove the node so it enrols again",
                            opts.broker,
                            state.dir().display()
                        ),
                    }
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(opts.max_backoff);
                    if connected {
                        connected = false;
                        queue.push(Event::Disconnected);
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => queue.push(Event::Message {
                    topic: p.topic.to_string(),
                    payload: p.payload.to_vec(),
                }),
                Ok(_) => {}
                Err(_) if relogin => {
                    relogin = false;
                    tracing::info!("logging in to {} again, with this node's broker password", opts.broker);
                    if connected {
                        connected = false;
                        queue.push(Event::Disconnected);
                    }
                }
                Err(e) => {
                    let hint = tls_hint(&e.to_string(), &url, opts.broker_ca.as_ref());
                    tracing::warn!("broker {}: {e}{hint}; retrying in {backoff:?} (running on the last good config)", opts.broker);
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    // While a config is on trial, keep trying often: its confirmation needs
                    // the round trip.
                    let cap = if agent.on_trial().is_some() {
                        Duration::from_secs(1)
                    } else {
                        opts.max_backoff
                    };
                    backoff = (backoff * 2).min(cap);
                    if connected {
                        connected = false;
                        queue.push(Event::Disconnected);
                    }
                }
            },
        }
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
                    Effect::MqttPassword(p) => {
                        if let Err(e) = state.set_mqtt_password(&p) {
                            tracing::error!("cannot keep the broker password: {e}");
                        } else {
                            // Log in again with it (a clean DISCONNECT: no will is published).
                            eventloop
                                .mqtt_options
                                .set_credentials(node.clone(), p.clone());
                            mqtt_password = Some(p);
                            if connected {
                                match client.disconnect().await {
                                    Ok(()) => relogin = true,
                                    Err(e) => tracing::warn!("disconnect: {e}"),
                                }
                            }
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
                        if checks {
                            let reqs = config.requires.clone();
                            let missing = blocking(move || Ok(requires_missing(&reqs)))
                                .await
                                .unwrap_or_default();
                            if !missing.is_empty() {
                                // Not applied, not failed: it waits for the packages.
                                queue.push(Event::Unmet {
                                    revision,
                                    sha256,
                                    envelope,
                                    config,
                                    missing,
                                });
                                continue;
                            }
                        }
                        let mut config = *config;
                        let (applier, b, good) =
                            (applier.clone(), backend.clone(), last_config.clone());
                        let sha = sha256.clone();
                        let result = blocking(move || {
                            let mut b = lock(&b);
                            b.prepare(&mut config).map_err(|e| e.to_string())?;
                            applier
                                .install(revision, &sha, &envelope, &config)
                                .map_err(|e| {
                                    let _ = applier.rollback();
                                    e.to_string()
                                })?;
                            if let Err(e) = b.converge(Some(&config)) {
                                // Undo at once: files back, system back to the last good.
                                let _ = applier.rollback();
                                if let Err(e2) = b.converge(good.as_ref()) {
                                    tracing::error!("restoring the last good config: {e2}");
                                }
                                return Err(e.to_string());
                            }
                            if b.needs_trial() {
                                applier.set_phase(Phase::Trial).map_err(|e| e.to_string())?;
                            } else {
                                applier.confirm().map_err(|e| e.to_string())?;
                            }
                            Ok(config)
                        })
                        .await;
                        let result = match result {
                            Ok(config) => {
                                if needs_trial {
                                    trial_config = Some(config);
                                } else {
                                    last_config = Some(config);
                                }
                                Ok(())
                            }
                            Err(e) => Err(e),
                        };
                        let _ = plan_tx.send(lock(&backend).probe_plan());
                        queue.push(Event::Applied {
                            revision,
                            sha256,
                            result,
                        });
                    }
                    Effect::CheckRequirements => {
                        let (b, good) = (backend.clone(), last_config.clone());
                        let missing = blocking(move || {
                            let reqs = good
                                .as_ref()
                                .map(|g| g.requires.clone())
                                .unwrap_or_default();
                            let missing = requires_missing(&reqs);
                            if missing.is_empty() && good.is_some() {
                                // Bring up what could not run without them.
                                if let Err(e) = lock(&b).converge(good.as_ref()) {
                                    tracing::error!("bringing up the last good config: {e}");
                                }
                            }
                            Ok(missing)
                        })
                        .await
                        .unwrap_or_default();
                        queue.push(Event::Requirements(missing));
                    }
                    Effect::Confirm { revision } => {
                        let a = applier.clone();
                        let result = blocking(move || a.confirm().map_err(|e| e.to_string()))
                            .await
                            .map(|_| ());
                        if result.is_ok() {
                            last_config = trial_config.take().or(last_config.take());
                        }
                        queue.push(Event::Confirmed { revision, result });
                    }
                    Effect::RollBack { revision, reason } => {
                        tracing::warn!(rev = revision.rev, "{reason}; rolling back");
                        let (a, b, good) = (applier.clone(), backend.clone(), last_config.clone());
                        let result = blocking(move || {
                            a.rollback().map_err(|e| e.to_string())?;
                            lock(&b).converge(good.as_ref()).map_err(|e| e.to_string())
                        })
                        .await;
                        trial_config = None;
                        if let Err(e) = state.add_failed(revision) {
                            tracing::error!("cannot record failed revision: {e}");
                        }
                        let _ = plan_tx.send(lock(&backend).probe_plan());
                        // The path to the broker may be back: reconnect now.
                        retry_at = None;
                        backoff = Duration::from_millis(250);
                        queue.push(Event::RolledBack {
                            revision,
                            reason,
                            result,
                        });
                    }
                    Effect::Log(Level::Info, m) => tracing::info!(node = %node, "{m}"),
                    Effect::Log(Level::Warn, m) => tracing::warn!(node = %node, "{m}"),
                }
            }
        }
    }
    if let Some(p) = prober {
        p.abort();
    }
    if let Some(h) = handover {
        h.abort();
    }
    if let Some(d) = discovery {
        d.abort();
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

/// What a TLS failure means for the operator: a certificate the pinned CA did not sign, or one
/// that does not name the host of the URL.
fn tls_hint(error: &str, url: &topics::BrokerUrl, ca: Option<&BrokerCa>) -> String {
    let Some(ca) = ca.filter(|_| url.tls) else {
        return String::new();
    };
    if error.contains("UnknownIssuer") || error.contains("BadSignature") {
        format!(
            " (the broker's certificate is not signed by the pinned CA from {}: refusing to connect)",
            ca.origin
        )
    } else if error.contains("NotValidForName") {
        format!(
            " (the broker's certificate does not name {}: refusing to connect)",
            url.host
        )
    } else if error.contains("certificate") {
        format!(
            " (the broker's certificate failed the check against the CA from {}: refusing to connect)",
            ca.origin
        )
    } else {
        String::new()
    }
}

/// The default envelope cap.
pub const DEFAULT_MAX: usize = DEFAULT_MAX_ENVELOPE;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ca() -> BrokerCa {
        BrokerCa {
            origin: "--ca /x/ca.pem".into(),
            pem: Vec::new(),
        }
    }

    fn pick(url: &str, ca: Option<&BrokerCa>) -> Result<bool, String> {
        let u = topics::parse_broker(url).unwrap();
        transport(&u, url, ca).map(|t| t.is_some())
    }

    #[test]
    fn plain_urls_stay_plain_and_refuse_a_ca() {
        assert_eq!(pick("mqtt://h:1883", None), Ok(false));
        let e = pick("mqtt://h:1883", Some(&ca())).unwrap_err();
        assert!(
            e.starts_with(
                "--ca /x/ca.pem is given, but --broker mqtt://h:1883 is not an mqtts:// URL"
            ),
            "{e}"
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn mqtts_needs_a_ca() {
        let e = pick("mqtts://h", None).unwrap_err();
        assert!(e.contains("no CA is given: pass --ca FILE"), "{e}");
        // The (empty) bundle is read at start: its error names where it came from.
        let e = pick("mqtts://h", Some(&ca())).unwrap_err();
        assert!(e.starts_with("--ca /x/ca.pem: no certificate"), "{e}");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn mqtts_needs_the_tls_feature() {
        for c in [None, Some(ca())] {
            let e = pick("mqtts://h:8883", c.as_ref()).unwrap_err();
            assert!(
                e.contains("built without TLS (cargo feature `tls`), so it cannot speak mqtts://"),
                "{e}"
            );
        }
    }
}
