//! Standalone mode: manifests from a folder, state in an embedded database, an embedded MQTT
//! broker unless an external one is named, and an admin socket for `sidenetctl`.
//!
//! One task owns the [`Controller`]; the MQTT event loop, the admin socket and the folder watch
//! talk to it over channels. Whenever the MQTT connection is (re)established, every announcement
//! and every stored config is republished (retained), so a restarted broker converges again.

pub mod loading;
mod rollout;
pub mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sidenet_crds::SecretKeyRef;
use sidenet_wire::keys::KeyPair;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::admin::{self, Request, Response};
use crate::provisioning::{Runner, RunnerOptions};
use crate::random::random32;
use crate::reconcile::core::Controller;
use crate::reconcile::model::{Publish, Secrets};
use crate::reconcile::render::Renderer;
use crate::reconcile::store::Store;
use crate::spec::manifest::ManifestSet;
use loading::Loader;
use web::AdminCall;

/// Options of the standalone controller.
#[derive(Debug, Clone)]
pub struct Options {
    /// Manifest files and folders (watched).
    pub manifests: Vec<PathBuf>,
    /// Template folder.
    pub templates: PathBuf,
    /// State folder.
    pub state: PathBuf,
    /// External broker URL; `None` runs the embedded broker.
    pub broker: Option<String>,
    /// CA bundle (PEM) for an `mqtts://` external broker; `None` trusts the system roots.
    pub broker_ca: Option<PathBuf>,
    /// Listen address of the embedded broker.
    pub listen: SocketAddr,
    /// TLS listener of the embedded broker, next to `listen`.
    pub tls: Option<crate::transport::broker::TlsListen>,
    /// How often the manifest folder is checked.
    pub poll: Duration,
    /// How long one load of the manifests may take ([`loading`]).
    pub load_deadline: Duration,
    /// How often configs are checked for renewal.
    pub refresh: Duration,
    /// Connection limit of the embedded broker.
    pub max_connections: usize,
    /// Agent binaries for `NodeProvision` jobs, one folder per architecture.
    pub agents: PathBuf,
    /// User name and password for the external broker.
    pub broker_login: Option<(String, String)>,
    /// The external broker is Mosquitto with the dynamic security plugin, and the controller's
    /// user may administer it: the controller manages node credentials and ACLs there
    /// ([`crate::transport::dynsec`]).
    pub broker_dynsec: bool,
    /// The HTTP service (map, `/metrics`); `None`: off ([`web`]).
    pub http: Option<web::HttpOptions>,
}

/// Standalone mode failed to start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    /// The state folder is unusable.
    #[error("state folder {path}: {message}")]
    State { path: PathBuf, message: String },
    /// Templates are broken.
    #[error(transparent)]
    Render(#[from] crate::reconcile::render::RenderError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] crate::reconcile::store::StoreError),
    /// The core failed.
    #[error(transparent)]
    Core(#[from] crate::reconcile::core::CoreError),
    /// The broker could not start.
    #[error(transparent)]
    Broker(#[from] crate::transport::broker::BrokerError),
    /// Bad broker URL.
    #[error("{0}")]
    Url(String),
    /// The HTTP service could not start.
    #[error("HTTP service: {0}")]
    Http(String),
}

/// Mesh keys and generated passphrases in the state folder, files of mode 0600.
#[derive(Debug)]
pub struct FsSecrets {
    dir: PathBuf,
}

impl FsSecrets {
    /// Secrets under `state`.
    pub fn new(state: &Path) -> Self {
        Self {
            dir: state.to_path_buf(),
        }
    }
}

/// Writes `text` to `path` with mode 0600, atomically, refusing to replace an existing file.
fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::hard_link(&tmp, path)?;
    std::fs::remove_file(&tmp)
}

impl FsSecrets {
    fn rotation_path(&self, network: &str) -> PathBuf {
        self.dir
            .join("keys")
            .join(format!("{network}.rotation.json"))
    }

    /// Finishes a rotation a crash interrupted: `NET.next.key` is the new key once the rotation
    /// record names it, else it was never announced and is dropped.
    fn settle_rotation(&mut self, network: &str) -> Result<(), String> {
        let next = self.dir.join("keys").join(format!("{network}.next.key"));
        let Ok(text) = std::fs::read_to_string(&next) else {
            return Ok(());
        };
        let key = KeyPair::from_file_text(&text).map_err(|e| format!("{}: {e}", next.display()))?;
        let committed = self
            .rotation(network)?
            .chain
            .last()
            .is_some_and(|e| e.key == key.public().to_base64());
        if committed {
            let path = self.dir.join("keys").join(format!("{network}.key"));
            std::fs::rename(&next, &path)
                .map_err(|e| format!("cannot move {} into place: {e}", next.display()))?;
        } else {
            std::fs::remove_file(&next).map_err(|e| format!("{}: {e}", next.display()))?;
        }
        Ok(())
    }
}

impl Secrets for FsSecrets {
    fn rotation(&mut self, network: &str) -> Result<crate::reconcile::model::Rotation, String> {
        let path = self.rotation_path(network);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn rotate_mesh_key(
        &mut self,
        network: &str,
        key: &KeyPair,
        rotation: &crate::reconcile::model::Rotation,
    ) -> Result<(), String> {
        // The new key next to the old one, then the record naming it, then the switch: a crash
        // in between is settled on the next start (see `settle_rotation`).
        let keys = self.dir.join("keys");
        let next = keys.join(format!("{network}.next.key"));
        let _ = std::fs::remove_file(&next);
        write_secret(&next, &key.to_file_text())
            .map_err(|e| format!("cannot write {}: {e}", next.display()))?;
        let path = self.rotation_path(network);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(rotation).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        self.settle_rotation(network)?;
        if let Ok(d) = std::fs::File::open(&keys) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn mesh_key(&mut self, network: &str) -> Result<KeyPair, String> {
        self.settle_rotation(network)?;
        let path = self.dir.join("keys").join(format!("{network}.key"));
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                KeyPair::from_file_text(&text).map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::from_seed(&random32()?);
                write_secret(&path, &key.to_file_text())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                tracing::info!(mesh = %network, key = %key.public(), "created mesh signing key");
                Ok(key)
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn mqtt_secret(&mut self, network: &str) -> Result<[u8; 32], String> {
        // Its own file (kept, and backed up, with the signing key): a key rotation must not
        // change every node's broker password.
        let path = self.dir.join("keys").join(format!("{network}.mqtt-secret"));
        match std::fs::read_to_string(&path) {
            Ok(text) => sidenet_wire::codec::unhex(text.trim())
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| format!("{}: not a 32-byte secret in hex", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = random32()?;
                write_secret(&path, &format!("{}\n", sidenet_wire::codec::hex(&secret)))
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                tracing::info!(mesh = %network, "created the mesh's broker password secret");
                Ok(secret)
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn passphrase(&mut self, set: &ManifestSet, r: &SecretKeyRef) -> Result<String, String> {
        if let Some(v) = set.secrets.get(&r.name).and_then(|s| s.get(&r.key)) {
            return Ok(v.clone());
        }
        if set.secrets.contains_key(&r.name) {
            return Err(format!("Secret/{} has no key {:?}", r.name, r.key));
        }
        let path = self
            .dir
            .join("secrets")
            .join(format!("{}.{}", r.name, r.key));
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim_end_matches('\n').to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pass = sidenet_wire::codec::base32(&random32()?[..20]);
                write_secret(&path, &format!("{pass}\n"))
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                tracing::info!(secret = %r.name, "generated mesh passphrase in {}", path.display());
                Ok(pass)
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

enum MqttEvent {
    Connected,
    Message(String, Vec<u8>),
}

/// Runs the standalone controller until `shutdown` completes.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> Result<(), StandaloneError> {
    let state_err = |message: String| StandaloneError::State {
        path: opts.state.clone(),
        message,
    };
    std::fs::create_dir_all(&opts.state).map_err(|e| state_err(e.to_string()))?;
    std::fs::set_permissions(&opts.state, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| state_err(e.to_string()))?;
    let store = Store::open(&opts.state.join("sidenet.redb"), crate::now())?;
    let renderer = Renderer::load(&opts.templates)?;
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(&opts.state)));
    ctl.enable_rollouts();
    tracing::info!(
        epoch = ctl.store.epoch,
        nodes = ctl.store.nodes.len(),
        "state loaded"
    );

    // Admin requests: from the socket, and from provisioning jobs asking about their nodes.
    let (adm_tx, mut adm_rx) = mpsc::channel::<AdminCall>(64);
    let (mut jobs, mut jobs_done) = Runner::new(
        RunnerOptions {
            state: opts.state.clone(),
            agents: opts.agents.clone(),
            templates: opts.templates.clone(),
            ssh_timeout: Duration::from_secs(30),
        },
        adm_tx.clone(),
    );

    // The first load before anything is published; later ones in the background.
    let mut loader = Loader::new(opts.manifests.clone(), opts.load_deadline);
    loader.poll();
    match tokio::time::timeout(opts.load_deadline, loader.done()).await {
        Ok(Some(outcome)) => {
            if let Some(set) = loader.take(outcome) {
                apply(&mut ctl, &mut jobs, set);
            }
        }
        Ok(None) => {}
        // Past the deadline: reported as a manifest error, the controller starts without.
        Err(_) => loader.poll(),
    }
    // A mesh-wide change is rendered, committed and published a chunk at a time.
    ctl.set_chunk(Some(RECONCILE_CHUNK));
    // Nothing is connected yet: commit, and let the first connection publish everything.
    ctl.flush()?;
    while ctl.has_deferred() {
        if let Err(e) = ctl.reconcile_deferred(crate::now()) {
            tracing::error!("reconcile: {e}");
        }
        ctl.flush()?;
    }
    // Node credentials for the embedded broker, complete before it accepts anyone: an armed
    // node's id is never open to a takeover, not even while the controller starts.
    let book = crate::transport::acl::CredentialBook::default();
    let _ = ctl.take_credentials();
    book.apply(&ctl.credential_snapshot());

    // The embedded broker lets the controller in by a password made for this run.
    let mut credentials = None;
    let mut tls = None;
    let (host, port) = match &opts.broker {
        Some(url) => {
            let u = sidenet_wire::topics::parse_broker(url)
                .map_err(|e| StandaloneError::Url(format!("--broker: {e}")))?;
            if u.tls {
                let t =
                    crate::transport::tls::client_config(opts.broker_ca.as_deref(), "--broker-ca")
                        .map_err(|e| StandaloneError::Url(e.to_string()))?;
                tls = Some(rumqttc::Transport::tls_with_config(t));
            } else if opts.broker_ca.is_some() {
                return Err(StandaloneError::Url(format!(
                    "--broker-ca is given, but --broker {url} is not an mqtts:// URL"
                )));
            }
            (u.host, u.port)
        }
        None => {
            let password = sidenet_wire::codec::base32(
                &random32().map_err(|e| state_err(format!("broker password: {e}")))?,
            );
            credentials = Some(password.clone());
            let _broker = crate::transport::broker::start(
                opts.listen,
                opts.tls.as_ref(),
                opts.max_connections,
                Some(password),
                book.clone(),
            )?;
            tracing::info!("embedded MQTT broker listening on {}", opts.listen);
            if let Some(t) = &opts.tls {
                tracing::info!("embedded MQTT broker listening for TLS on {}", t.addr);
            }
            let host = if opts.listen.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                opts.listen.ip().to_string()
            };
            (host, opts.listen.port())
        }
    };
    let mut mqtt = MqttOptions::new(
        format!("sidenet-controller-{}", std::process::id()),
        host,
        port,
    );
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_max_packet_size(
        crate::transport::broker::MAX_PACKET,
        crate::transport::broker::MAX_PACKET,
    );
    mqtt.set_clean_session(true);
    mqtt.set_inflight(1000);
    if let Some(p) = credentials {
        mqtt.set_credentials(crate::transport::acl::CONTROLLER_USER, p);
    } else if let Some((u, p)) = &opts.broker_login {
        mqtt.set_credentials(u.clone(), p.clone());
    }
    if let Some(t) = tls {
        mqtt.set_transport(t);
    }
    // Node credentials on an external Mosquitto: the controller's own user administers them.
    let dynsec_user = match (&opts.broker, opts.broker_dynsec, &opts.broker_login) {
        (Some(_), true, Some((u, _))) => Some(u.clone()),
        (Some(_), true, None) => {
            return Err(StandaloneError::Url(
                "--broker-dynsec needs --broker-username and --broker-password (a user of the dynamic security plugin with its admin role)".into(),
            ));
        }
        (None, true, _) => {
            return Err(StandaloneError::Url(
                "--broker-dynsec is for an external Mosquitto (--broker); the embedded broker checks node credentials itself".into(),
            ));
        }
        _ => None,
    };
    let mut dynsec_meshes: Vec<String> = Vec::new();
    // A short request queue: publishing 10,000 configs waits for the socket instead of holding
    // every payload in memory at once.
    let (client, mut eventloop) = AsyncClient::new(mqtt, 512);
    // Never bounded in count: the event loop must not wait for the engine (crate::transport::inbox).
    let (ev_tx, mut ev_rx) =
        crate::transport::inbox::channel::<MqttEvent>(crate::transport::inbox::LIMIT);
    let mqtt_task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(100);
                    if ev_tx.control(MqttEvent::Connected).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let size = p.topic.len() + p.payload.len();
                    let topic = p.topic.to_string();
                    let msg = MqttEvent::Message(topic.clone(), p.payload.to_vec());
                    if ev_tx.message(msg, size, &topic).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(a))) => {
                    crate::transport::broker::log_refused_subscription(&a);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("MQTT connection: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    });

    let http_task = web::start(opts.http.as_ref(), &opts.state, adm_tx.clone())
        .await
        .map_err(StandaloneError::Http)?;
    let sock_path = opts.state.join(admin::SOCKET);
    let _ = std::fs::remove_file(&sock_path);
    let listener =
        UnixListener::bind(&sock_path).map_err(|e| state_err(format!("admin socket: {e}")))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| state_err(e.to_string()))?;
    let admin_task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = adm_tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let (otx, orx) = oneshot::channel();
                        if tx.send((req, otx)).await.is_err() {
                            return;
                        }
                        orx.await.unwrap_or(Response::Error {
                            message: "controller stopped".into(),
                        })
                    }
                    Err(e) => Response::Error {
                        message: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_string(&resp).unwrap_or_default();
                out.push('\n');
                let _ = w.write_all(out.as_bytes()).await;
            });
        }
    });

    let mut connected = false;
    let mut poll = tokio::time::interval(opts.poll);
    let mut refresh = tokio::time::interval(opts.refresh);
    let mut rollout_timer = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    // Scheduled passphrase switches up to this time are handled (the start reconciles all).
    let mut switched_upto = crate::now();
    loop {
        let next_switch = ctl.next_switch(switched_upto);
        // Each turn handles one event (or a burst of MQTT messages), then commits every state
        // change in one transaction and only then publishes.
        tokio::select! {
            _ = &mut shutdown => break,
            _ = poll.tick() => loader.poll(),
            _ = rollout_timer.tick() => {}
            outcome = loader.done() => {
                if let Some(set) = outcome.and_then(|o| loader.take(o)) {
                    apply(&mut ctl, &mut jobs, set);
                }
            }
            Some(done) = jobs_done.recv() => {
                let keys = provision_keys(&mut ctl);
                jobs.finished(done, &ctl.set, &mut |mesh| keys.get(mesh).cloned());
            }
            _ = refresh.tick() => {
                let pruned = ctl.prune_tokens(crate::now());
                if !pruned.is_empty() {
                    tracing::info!("forgot {} expired enrolment tokens", pruned.len());
                }
                if let Err(e) = ctl.reconcile_all(crate::now()) {
                    tracing::error!("reconcile: {e}");
                }
            }
            // A scheduled passphrase switch: reconcile at that second, not at the next refresh.
            _ = tokio::time::sleep(Duration::from_secs(
                next_switch.map_or(0, |t| t.saturating_sub(crate::now()))
            )), if next_switch.is_some() => {
                switched_upto = next_switch.unwrap_or(switched_upto);
                tracing::info!("scheduled passphrase switch: reconciling every node");
                if let Err(e) = ctl.reconcile_all(crate::now()) {
                    tracing::error!("reconcile: {e}");
                }
            }
            Some(ev) = ev_rx.recv() => {
                let mut ev = Some(ev);
                let mut handled = 0;
                while let Some(e) = ev.take() {
                    match e {
                        MqttEvent::Connected => {
                            tracing::info!("connected to MQTT broker; publishing announcements and configs");
                            connected = true;
                            for f in sidenet_wire::topics::controller_filters("+") {
                                if let Err(e) = client.subscribe(f, QoS::AtLeastOnce).await {
                                    tracing::error!("subscribe: {e}");
                                }
                            }
                            if let Some(user) = &dynsec_user {
                                // Credentials before configs: a node that reads its password
                                // reconnects with it at once.
                                if let Err(e) = client.subscribe(crate::transport::dynsec::RESPONSE_TOPIC, QoS::AtLeastOnce).await {
                                    tracing::error!("subscribe: {e}");
                                }
                                dynsec_meshes = mesh_networks(&ctl);
                                let mut cmds = crate::transport::dynsec::setup(user, &dynsec_meshes);
                                let _ = ctl.take_credentials();
                                cmds.extend(crate::transport::dynsec::commands(&ctl.credential_snapshot()));
                                send_dynsec(&client, cmds).await;
                            }
                            send(&client, ctl.announcements(crate::now())?).await;
                            // Every stored config again, a chunk of envelopes in memory at a time.
                            for ids in ctl.stored_config_ids()?.chunks(RECONCILE_CHUNK) {
                                send(&client, ctl.stored_configs_of(ids)?).await;
                            }
                        }
                        MqttEvent::Message(topic, payload) if topic == crate::transport::dynsec::RESPONSE_TOPIC => {
                            for e in crate::transport::dynsec::response_errors(&payload) {
                                tracing::error!("Mosquitto dynamic security: {e}");
                            }
                            if let Some(user) = &dynsec_user
                                && let Some(cmd) = crate::transport::dynsec::controller_role_missing(&payload, user)
                            {
                                tracing::info!("giving broker user {user} the sidenet-controller role (Mosquitto reconnects it)");
                                send_dynsec(&client, vec![cmd]).await;
                            }
                        }
                        MqttEvent::Message(topic, payload) => {
                            if let Err(e) = ctl.on_message(&topic, &payload, crate::now()) {
                                tracing::error!("handling {topic}: {e}");
                            }
                        }
                    }
                    handled += 1;
                    if handled < 2000 {
                        ev = ev_rx.try_recv();
                    }
                }
            }
            Some((req, reply)) = adm_rx.recv() => {
                let resp = handle_admin(&mut ctl, &jobs, req, loader.errors());
                // Commit before answering, so "approved" means it is on disk.
                let out = ctl.flush()?;
                let changes = ctl.take_credentials();
                book.apply(&changes);
                if connected && dynsec_user.is_some() {
                    send_dynsec(&client, crate::transport::dynsec::commands(&changes)).await;
                }
                let mut out = out;
                if let Response::Removed { topic: Some(topic), .. } = &resp {
                    // An empty retained message deletes the retained config.
                    out.push(crate::reconcile::model::Publish { topic: topic.clone(), payload: Vec::new(), retain: true });
                }
                let mut sent = Sent::default();
                sent.count(&out);
                if connected { send(&client, out).await; }
                // A chunked reconcile (a key rotation of a large mesh) finishes before the answer.
                drain_deferred(&mut ctl, &client, connected, &mut sent, &book, dynsec_user.as_deref()).await?;
                let resp = match resp {
                    Response::Approved { node, ahead, .. } => Response::Approved { node, published: sent.all, ahead },
                    Response::Rotated { mesh, key, previous_until, .. } => Response::Rotated {
                        mesh,
                        key,
                        previous_until,
                        published: sent.configs,
                    },
                    other => other,
                };
                let _ = reply.send(resp);
                continue;
            }
        }
        rollout::tick(&mut ctl);
        // A failed commit leaves memory ahead of the disk: stop, the state reloads on restart.
        let out = ctl.flush()?;
        let changes = ctl.take_credentials();
        book.apply(&changes);
        if connected && let Some(user) = &dynsec_user {
            let mut cmds = Vec::new();
            let meshes = mesh_networks(&ctl);
            if meshes != dynsec_meshes {
                cmds = crate::transport::dynsec::setup(user, &meshes);
                dynsec_meshes = meshes;
            }
            cmds.extend(crate::transport::dynsec::commands(&changes));
            send_dynsec(&client, cmds).await;
        }
        if connected {
            send(&client, out).await;
        }
        drain_deferred(
            &mut ctl,
            &client,
            connected,
            &mut Sent::default(),
            &book,
            dynsec_user.as_deref(),
        )
        .await?;
    }
    mqtt_task.abort();
    admin_task.abort();
    if let Some(t) = http_task {
        t.abort();
    }
    let _ = client.disconnect().await;
    let _ = std::fs::remove_file(&sock_path);
    Ok(())
}

/// Network names of the meshes in the manifests.
fn mesh_networks(ctl: &Controller) -> Vec<String> {
    ctl.set
        .meshes
        .values()
        .map(|m| crate::spec::manifest::network_name(m).to_string())
        .collect()
}

/// Sends commands to Mosquitto's dynamic security plugin, in messages of up to 200.
async fn send_dynsec(client: &AsyncClient, commands: Vec<serde_json::Value>) {
    if commands.is_empty() {
        return;
    }
    for payload in crate::transport::dynsec::messages(commands, 200) {
        if let Err(e) = client
            .publish(
                crate::transport::dynsec::CONTROL_TOPIC,
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
        {
            tracing::error!("dynamic security command: {e}");
        }
    }
}

/// Public keys (base64) of the meshes `NodeProvision` jobs install agents for.
fn provision_keys(ctl: &mut Controller) -> std::collections::BTreeMap<String, String> {
    let meshes: Vec<String> = ctl
        .set
        .provisions
        .values()
        .map(|p| p.spec.mesh.clone())
        .collect();
    let mut out = std::collections::BTreeMap::new();
    for m in meshes {
        match ctl.mesh_key(&m) {
            Ok(k) => {
                out.insert(m, k.public().to_base64());
            }
            Err(e) => tracing::error!("{e}"),
        }
    }
    out
}

/// Puts a new manifest set in force.
fn apply(ctl: &mut Controller, jobs: &mut Runner, set: ManifestSet) {
    if let Err(e) = ctl.set_manifests(set, crate::now()) {
        tracing::error!("reconcile: {e}");
    }
    let keys = provision_keys(ctl);
    jobs.update(&ctl.set, &mut |mesh| keys.get(mesh).cloned());
}

fn handle_admin(ctl: &mut Controller, jobs: &Runner, req: Request, errors: &[String]) -> Response {
    let now = crate::now();
    let fail = |e: &dyn std::fmt::Display| Response::Error {
        message: e.to_string(),
    };
    match req {
        Request::Status => Response::Status {
            nodes: ctl.status(),
            manifest_errors: errors.to_vec(),
            counters: ctl.counters,
            epoch: ctl.store.epoch,
            provisions: jobs.rows(),
        },
        Request::Approve { node } => match ctl.approve(&node, now) {
            Ok(a) => Response::Approved {
                node: a.node().to_string(),
                published: 0,
                ahead: matches!(a, crate::reconcile::core::Approval::Ahead(_)),
            },
            Err(e) => fail(&e),
        },
        Request::Remove { node } => {
            match ctl.resolve(&node).and_then(|id| {
                let topic = ctl.remove_node(&id, now)?;
                Ok((id, topic))
            }) {
                Ok((node, topic)) => Response::Removed { node, topic },
                Err(e) => fail(&e),
            }
        }
        Request::Token { mesh, ttl_s } => {
            let token = match random32() {
                Ok(b) => sidenet_wire::codec::base32(&b[..20]),
                Err(message) => return Response::Error { message },
            };
            match ctl.create_token(&mesh, &token, ttl_s, now) {
                Ok(mode) => Response::Token {
                    token,
                    expires: now.saturating_add(ttl_s),
                    mode: Some(mode.as_str().to_string()),
                },
                Err(e) => fail(&e),
            }
        }
        Request::RotateKey { mesh, overlap_s } => {
            let seed = match random32() {
                Ok(b) => b,
                Err(message) => return Response::Error { message },
            };
            match ctl.rotate_key(&mesh, &seed, overlap_s, now) {
                Ok(key) => Response::Rotated {
                    mesh,
                    key: key.to_base64(),
                    previous_until: now.saturating_add(overlap_s),
                    published: 0,
                },
                Err(e) => fail(&e),
            }
        }
        Request::Plan { files } => match crate::spec::manifest::load(&files) {
            Ok(set) => match ctl.plan_changes(set, now) {
                Ok(report) => Response::Plan {
                    report: Box::new(report),
                },
                Err(e) => fail(&e),
            },
            Err(errs) => fail(&errs),
        },
        Request::Rollout { action, mesh } => rollout::admin(ctl, &action, mesh.as_deref(), now),
        Request::Policies => Response::Policies {
            policies: std::sync::Arc::new(crate::reconcile::alto::Policies::of(&ctl.set)),
        },
        Request::Render { node } => match ctl.preview(&node) {
            Ok(config) => Response::Render {
                config: Box::new(config),
            },
            Err(e) => fail(&e),
        },
    }
}

/// Nodes rendered, signed, committed and published per step of a large reconcile: at most this
/// many envelopes (~9 KB each) are in memory at once.
const RECONCILE_CHUNK: usize = 1000;

/// Messages handed out (for the admin answers).
#[derive(Default)]
struct Sent {
    all: usize,
    configs: usize,
}

impl Sent {
    fn count(&mut self, out: &[Publish]) {
        self.all += out.len();
        self.configs += out.iter().filter(|p| p.topic.ends_with("/config")).count();
    }
}

/// Finishes a chunked reconcile: each chunk is committed, then published, before the next one
/// is rendered.
async fn drain_deferred(
    ctl: &mut Controller,
    client: &AsyncClient,
    connected: bool,
    sent: &mut Sent,
    book: &crate::transport::acl::CredentialBook,
    dynsec_user: Option<&str>,
) -> Result<(), StandaloneError> {
    while ctl.has_deferred() {
        if let Err(e) = ctl.reconcile_deferred(crate::now()) {
            tracing::error!("reconcile: {e}");
        }
        // A failed commit leaves memory ahead of the disk: stop, the state reloads on restart.
        let out = ctl.flush()?;
        // Credentials before the configs that carry them.
        let changes = ctl.take_credentials();
        book.apply(&changes);
        if connected && dynsec_user.is_some() {
            send_dynsec(client, crate::transport::dynsec::commands(&changes)).await;
        }
        sent.count(&out);
        if connected {
            send(client, out).await;
        }
    }
    Ok(())
}

async fn send(client: &AsyncClient, out: Vec<Publish>) {
    for p in out {
        if let Err(e) = client
            .publish(p.topic.clone(), QoS::AtLeastOnce, p.retain, p.payload)
            .await
        {
            tracing::error!("publish {}: {e}", p.topic);
        }
    }
}
