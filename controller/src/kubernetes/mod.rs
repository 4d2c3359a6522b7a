//! Kubernetes mode: the same core as standalone mode, driven by the API server.
//!
//! `sidenet-controller kubernetes` watches `Mesh`, `MeshNode` and `HardwareProfile` objects
//! (one kube-runtime controller each; the MeshNode controller also watches Meshes and profiles,
//! so a change there re-reconciles the nodes it affects), writes status with conditions and
//! Events, keeps signing keys and passphrases in Secrets and everything else that must outlive
//! the pod in object status, and publishes over MQTT (an embedded broker or an external one).
//! The contract with the Helm chart (environment, endpoints, Lease, RBAC) is docs/helm.md.
//!
//! # Layout
//!
//! - [`engine`]: the context the reconcilers share, the engine around the core, Events, the
//!   error policy; [`credentials`]: node broker credentials (embedded broker, dynsec, none).
//! - [`watch`]: watch streams decoded one object at a time (an undecodable object stalls
//!   nothing) and the predicates of the triggers (status writes do not re-reconcile).
//! - [`sync`]: from the watch caches to the core's validated set (each namespace validated on
//!   its own), and what the cluster remembers; [`tenancy`]: which namespace owns each mesh
//!   name, network name and node id.
//! - [`publish`]: durable facts (status) first, then configs; clearing a node.
//! - [`nodes`], [`meshes`]: the MeshNode, Mesh and HardwareProfile reconcilers and finalizers.
//! - [`mqtt`]: broker (re)connections, enrolments and status reports; [`enrol`]: the MeshNode
//!   of a node that enrolled without one; [`tokens`]: enrolment tokens, hashed in a Secret per
//!   Mesh.
//! - [`provisions`]: the NodeProvision reconciler (the provisioning code of standalone mode).
//! - [`status`]: conditions and status (pure functions).
//! - [`rollouts`]: staged rollouts: the once-a-second step and the `sidenet.io/rollout`
//!   annotation; [`rollstate`]: their records in the Mesh status.
//! - [`sigbook`]: the signatures of the watched objects, kept from the watch events.
//! - [`state`]: Secrets (signing key, passphrase).
//! - [`options`]: the options of Kubernetes mode and its error type.
//! - [`leader`]: Lease-based leader election (get/create/update only).
//! - [`http`]: `/healthz`, `/readyz`, `/metrics` (the shared [`crate::web`] service).
//! - [`web`]: the node table of the pod that reconciles, for the map's data routes.
//! - [`plan`]: `sidenetctl plan --kubeconfig`: a manifest folder planned against a namespace's
//!   objects and the revisions their status records, by the core of a throwaway engine.

pub mod credentials;
pub mod engine;
pub mod enrol;
pub mod http;
pub mod leader;
pub mod meshes;
pub mod mqtt;
pub mod nodes;
pub mod options;
pub mod plan;
pub mod provisions;
pub mod publish;
pub mod rollouts;
pub mod rollstate;
pub mod sigbook;
pub mod state;
pub mod status;
pub mod sync;
pub mod tenancy;
pub mod tokens;
pub mod watch;
pub mod web;

pub use options::{KubeError, Options};

use std::future::Future;
use std::net::SocketAddr;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::controller::Controller as KubeController;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{PredicateConfig, WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use sidenet_crds::{HardwareProfile, Mesh, MeshNode, NodeProvision};

use crate::reconcile::render::Renderer;
use credentials::{BrokerCredentials, NoBrokerCredentials};
use engine::Ctx;
use leader::Elector;
use mqtt::MqttEvent;

/// Aborts a task when dropped.
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the embedded MQTT broker. One function, so replacing the broker touches one place.
/// The broker applies the topic ACLs of [`crate::transport::acl`]; the controller connects with
/// `controller_password`. It stops (its retained messages with it) when the returned guard is
/// dropped: when this pod stops reconciling.
pub fn start_embedded_broker(
    listen: SocketAddr,
    tls: Option<&crate::transport::broker::TlsListen>,
    max_connections: usize,
    controller_password: String,
    book: crate::transport::acl::CredentialBook,
) -> Result<crate::transport::broker::Running, KubeError> {
    let (_, running) = crate::transport::broker::start_stoppable(
        listen,
        tls,
        max_connections,
        Some(controller_password),
        book,
    )?;
    tracing::info!("embedded MQTT broker listening on {listen}");
    if let Some(t) = tls {
        tracing::info!("embedded MQTT broker listening for TLS on {}", t.addr);
    }
    Ok(running)
}

/// Runs Kubernetes mode until `shutdown` completes (or the Lease is lost).
pub async fn run(
    opts: Options,
    client: Client,
    shutdown: impl Future<Output = ()>,
) -> Result<(), KubeError> {
    let metrics = Arc::new(http::Metrics::default());
    let slot = web::Slot::default();
    let _http = match opts.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| KubeError::Other(format!("SIDENET_METRICS_LISTEN {addr}: {e}")))?;
            tracing::info!("serving /metrics, /healthz and /readyz on {addr}");
            let mut svc = crate::web::Service::new(addr, opts.http_token.clone());
            svc.metrics = Some(metrics.clone());
            svc.open_metrics = true;
            svc.source = Some(Arc::new(web::EngineSource(slot.clone())));
            Some(TaskGuard(tokio::spawn(crate::web::serve(
                listener,
                Arc::new(svc),
            ))))
        }
        None => None,
    };
    // Fail fast on broken templates, before taking the Lease.
    let renderer = Renderer::load(&opts.templates)?;
    tokio::pin!(shutdown);
    if !opts.leader_election {
        metrics.leader.store(true, Ordering::SeqCst);
        return lead(&opts, client, metrics, &slot, renderer, shutdown).await;
    }
    let api = Api::namespaced(client.clone(), &opts.pod_namespace);
    let mut elector = Elector::new(api, opts.pod_name.clone(), opts.lease);
    // A standby is ready: see docs/helm.md.
    metrics.ready.store(true, Ordering::SeqCst);
    tracing::info!(identity = %opts.pod_name, "waiting for the Lease {}", leader::LEASE_NAME);
    tokio::select! {
        _ = &mut shutdown => return Ok(()),
        _ = elector.acquire() => {}
    }
    metrics.ready.store(false, Ordering::SeqCst);
    metrics.leader.store(true, Ordering::SeqCst);
    let result = tokio::select! {
        r = lead(&opts, client, metrics.clone(), &slot, renderer, &mut shutdown) => r,
        _ = elector.hold() => Err(KubeError::LeaseLost),
    };
    // Reconcilers and the MQTT client are stopped by now (their futures were dropped).
    metrics.leader.store(false, Ordering::SeqCst);
    if result.is_ok() {
        elector.release().await;
    }
    result
}

/// Host, port and whether to use TLS, from `SIDENET_BROKER` (`mqtt://` or `mqtts://`, default
/// ports 1883 and 8883).
pub fn broker_address(url: &str) -> Result<(String, u16, bool), KubeError> {
    let bad = |e: String| KubeError::Other(format!("SIDENET_BROKER: {e}"));
    match url.strip_prefix("mqtts://") {
        Some(rest) => {
            let (host, port) =
                sidenet_wire::topics::parse_broker_url(&format!("mqtt://{rest}")).map_err(bad)?;
            let rest = rest.trim_end_matches('/');
            let explicit = match rest.strip_prefix('[') {
                Some(v6) => v6
                    .split_once(']')
                    .is_some_and(|(_, after)| after.starts_with(':')),
                None => rest.contains(':'),
            };
            Ok((host, if explicit { port } else { 8883 }, true))
        }
        None => {
            let (host, port) = sidenet_wire::topics::parse_broker_url(url).map_err(bad)?;
            Ok((host, port, false))
        }
    }
}

/// The TLS settings for an `mqtts://` broker: the CAs of `SIDENET_BROKER_CA` if set, else the
/// system roots. Read again at every reconnect (the CA file is a Secret volume that changes).
pub fn tls_config(ca: Option<&std::path::Path>) -> Result<rumqttc::TlsConfiguration, KubeError> {
    crate::transport::tls::client_config(ca, "SIDENET_BROKER_CA").map_err(KubeError::Other)
}

fn mqtt_options(opts: &Options) -> Result<MqttOptions, KubeError> {
    let (host, port, tls) = match &opts.broker {
        Some(url) => broker_address(url)?,
        None => {
            let host = if opts.listen.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                opts.listen.ip().to_string()
            };
            (host, opts.listen.port(), false)
        }
    };
    let suffix = crate::random::random32()
        .map(|b| sidenet_wire::codec::base32(&b[..5]))
        .map_err(KubeError::Other)?;
    let mut mqtt = MqttOptions::new(
        format!("sidenet-controller-{}-{suffix}", opts.pod_name),
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
    if tls {
        mqtt.set_transport(rumqttc::Transport::tls_with_config(tls_config(
            opts.broker_ca.as_deref(),
        )?));
    } else if opts.broker_ca.is_some() {
        return Err(KubeError::Other(
            "SIDENET_BROKER_CA is set but SIDENET_BROKER is not an mqtts:// URL".into(),
        ));
    }
    match (&opts.broker_username, &opts.broker_password) {
        (Some(u), Some(p)) => {
            mqtt.set_credentials(u.clone(), p.clone());
        }
        (None, None) => {}
        _ => {
            return Err(KubeError::Other(
                "SIDENET_BROKER_USERNAME and SIDENET_BROKER_PASSWORD must be set together".into(),
            ));
        }
    }
    Ok(mqtt)
}

/// Everything the pod that reconciles does, until `shutdown`.
async fn lead(
    opts: &Options,
    client: Client,
    metrics: Arc<http::Metrics>,
    slot: &web::Slot,
    renderer: Renderer,
    shutdown: impl Future<Output = ()>,
) -> Result<(), KubeError> {
    let mut mqtt_opts = mqtt_options(opts)?;
    let book = crate::transport::acl::CredentialBook::default();
    // Dropped last (declared first): the embedded broker stops once everything else did.
    let mut _broker = None;
    if opts.broker.is_none() {
        // A password for this run only: the embedded broker lives and dies with this run (its
        // retained configs too: a new run republishes them from MeshNode status).
        let password = crate::random::random32()
            .map(|b| sidenet_wire::codec::base32(&b))
            .map_err(|e| KubeError::Other(format!("broker password: {e}")))?;
        _broker = Some(start_embedded_broker(
            opts.listen,
            opts.tls.as_ref(),
            opts.max_connections,
            password.clone(),
            book.clone(),
        )?);
        mqtt_opts.set_credentials(crate::transport::acl::CONTROLLER_USER, password);
    }
    let (mqtt, mut eventloop) = AsyncClient::new(mqtt_opts, 512);
    // Never bounded in count: the MQTT event loop must not wait for the engine. A reconcile
    // holding the engine may be waiting for the event loop to take its publishes; a queue full
    // of incoming reports would then stall both (crate::transport::inbox).
    let (ev_tx, ev_rx) =
        crate::transport::inbox::channel::<MqttEvent>(crate::transport::inbox::LIMIT);
    let tls_ca = opts
        .broker
        .as_deref()
        .is_some_and(|b| b.starts_with("mqtts://"))
        .then(|| opts.broker_ca.clone());
    let _mqtt_task = TaskGuard(tokio::spawn(async move {
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
                    let _ = ev_tx.control(MqttEvent::Disconnected);
                    tracing::warn!("MQTT connection: {e}; retrying in {backoff:?}");
                    // The CA bundle may have been rotated: read it again for the next attempt.
                    if let Some(ca) = &tls_ca {
                        match tls_config(ca.as_deref()) {
                            Ok(t) => {
                                eventloop
                                    .mqtt_options
                                    .set_transport(rumqttc::Transport::tls_with_config(t));
                            }
                            Err(e) => tracing::error!("{e}"),
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }));

    // Each kind is watched as DynamicObjects and decoded one object at a time (watch.rs): one
    // object the types cannot read does not stall the kind.
    let wc = watcher::Config::default();
    let reporter = Reporter {
        controller: "sidenet-controller".into(),
        instance: Some(opts.pod_name.clone()),
    };
    let report = watch::Undecodable {
        recorder: Recorder::new(client.clone(), reporter.clone()),
        metrics: metrics.clone(),
        seen: Default::default(),
    };
    let dyn_api = |ar: &ApiResource, namespaced: bool| -> Api<DynamicObject> {
        match (&opts.namespace, namespaced) {
            (Some(ns), true) => Api::namespaced_with(client.clone(), ns, ar),
            _ => Api::all_with(client.clone(), ar),
        }
    };
    let (mesh_ar, node_ar, profile_ar) = (
        ApiResource::erase::<Mesh>(&()),
        ApiResource::erase::<MeshNode>(&()),
        ApiResource::erase::<HardwareProfile>(&()),
    );
    let mesh_writer = reflector::store::Writer::<Mesh>::default();
    let node_writer = reflector::store::Writer::<MeshNode>::default();
    let profile_writer = reflector::store::Writer::<HardwareProfile>::default();
    let (mesh_store, node_store, profile_store) = (
        mesh_writer.as_reader(),
        node_writer.as_reader(),
        profile_writer.as_reader(),
    );
    let np_ar = ApiResource::erase::<NodeProvision>(&());
    let np_writer = reflector::store::Writer::<NodeProvision>::default();
    let np_store = np_writer.as_reader();
    let cfg = PredicateConfig::default;
    let sigs = Arc::new(sigbook::SigBook::default());
    let mesh_stream = reflector::reflector(
        mesh_writer,
        watch::typed(
            watcher::watcher(dyn_api(&mesh_ar, true), wc.clone()),
            mesh_ar.clone(),
            mesh_store.clone(),
            report.clone(),
        ),
    )
    .inspect(sigbook::SigBook::feeder(&sigs))
    .applied_objects()
    .predicate_filter(watch::spec_changes::<Mesh>, cfg());
    let node_stream = reflector::reflector(
        node_writer,
        watch::typed(
            watcher::watcher(dyn_api(&node_ar, true), wc.clone()),
            node_ar,
            node_store.clone(),
            report.clone(),
        ),
    )
    .inspect(sigbook::SigBook::feeder(&sigs))
    .applied_objects()
    .predicate_filter(watch::spec_changes::<MeshNode>, cfg());
    let profile_stream = reflector::reflector(
        profile_writer,
        watch::typed(
            watcher::watcher(dyn_api(&profile_ar, false), wc.clone()),
            profile_ar.clone(),
            profile_store.clone(),
            report.clone(),
        ),
    )
    .inspect(sigbook::SigBook::feeder(&sigs))
    .applied_objects()
    .predicate_filter(watch::spec_changes::<HardwareProfile>, cfg());
    let np_stream = reflector::reflector(
        np_writer,
        watch::typed(
            watcher::watcher(dyn_api(&np_ar, true), wc.clone()),
            np_ar,
            np_store.clone(),
            report.clone(),
        ),
    )
    .applied_objects()
    .predicate_filter(provisions::provision_changes, cfg());
    // What re-reconciles MeshNodes: their Mesh's spec or key, a profile's spec (a second watch
    // of each kind, like kube-runtime's `watches`).
    let mesh_trigger = watch::typed(
        watcher::watcher(dyn_api(&mesh_ar, true), wc.clone()),
        mesh_ar,
        mesh_store.clone(),
        report.clone(),
    )
    .applied_objects()
    .predicate_filter(watch::mesh_changes, cfg());
    let profile_trigger = watch::typed(
        watcher::watcher(dyn_api(&profile_ar, false), wc),
        profile_ar,
        profile_store.clone(),
        report,
    )
    .applied_objects()
    .predicate_filter(watch::spec_changes::<HardwareProfile>, cfg());
    let mesh_ctl = KubeController::for_stream(mesh_stream, mesh_store.clone());
    let node_ctl = KubeController::for_stream(node_stream, node_store.clone());
    let profile_ctl = KubeController::for_stream(profile_stream, profile_store.clone());
    let np_ctl = KubeController::for_stream(np_stream, np_store.clone());
    let credentials: Box<dyn BrokerCredentials> = match (&opts.broker, opts.broker_dynsec) {
        (None, _) => Box::new(book),
        (Some(_), true) => Box::new(credentials::DynsecCredentials {
            mqtt: mqtt.clone(),
            user: opts.broker_username.clone().ok_or_else(|| {
                KubeError::Other(
                    "SIDENET_BROKER_DYNSEC needs SIDENET_BROKER_USERNAME and SIDENET_BROKER_PASSWORD (a user with the dynamic security plugin's admin role)".into(),
                )
            })?,
        }),
        (Some(_), false) => Box::new(NoBrokerCredentials),
    };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        opts: opts.clone(),
        meshes: mesh_store,
        nodes: node_store.clone(),
        profiles: profile_store,
        engine: Default::default(),
        renderer: std::sync::Mutex::new(Some(renderer)),
        secrets: Default::default(),
        mqtt: mqtt.clone(),
        connected: Arc::new(AtomicBool::new(false)),
        recorder: Recorder::new(client, reporter.clone()),
        reporter,
        metrics,
        failures: Default::default(),
        credentials,
        nodeprovisions: np_store,
        provisions: Default::default(),
        sigs,
    });
    if let Ok(mut w) = slot.lock() {
        *w = Arc::downgrade(&ctx);
    }
    let _events = TaskGuard(tokio::spawn(mqtt::mqtt_loop(ctx.clone(), ev_rx)));
    let _rollouts = TaskGuard(tokio::spawn(rollouts::ticker(ctx.clone())));

    let (s1, s2) = (node_store.clone(), node_store);
    let nodes = node_ctl
        .watches_stream(mesh_trigger, move |m: Mesh| nodes::nodes_of_mesh(&s1, &m))
        .watches_stream(profile_trigger, move |p: HardwareProfile| {
            nodes::nodes_of_profile(&s2, &p)
        })
        .run(
            nodes::reconcile_node,
            engine::error_policy::<MeshNode>,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let meshes = mesh_ctl
        .run(
            meshes::reconcile_mesh,
            engine::error_policy::<Mesh>,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let profiles = profile_ctl
        .run(
            meshes::reconcile_profile,
            engine::error_policy::<HardwareProfile>,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let provisions = np_ctl
        .run(
            provisions::reconcile_provision,
            engine::error_policy::<NodeProvision>,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let init = {
        let ctx = ctx.clone();
        async move {
            // The engine waits for every watch's first list; then nothing but the broker
            // connection (which sets readiness itself) stands between us and ready.
            if let Err(e) = ctx.engine().await {
                tracing::error!("{e}");
            }
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = futures::future::join5(nodes, meshes, profiles, provisions, init) => {}
    }
    // Provisioning runs are tasks of their own: they stop with the leadership.
    for (_, job) in std::mem::take(&mut *ctx.provisions.lock().unwrap_or_else(|e| e.into_inner())) {
        job.abort();
    }
    let _ = mqtt.disconnect().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let a = |u: &str| broker_address(u).map_err(|e| e.to_string());
        assert_eq!(a("mqtt://mq:1884"), Ok(("mq".into(), 1884, false)));
        assert_eq!(a("mqtt://mq"), Ok(("mq".into(), 1883, false)));
        assert_eq!(a("mqtts://mq"), Ok(("mq".into(), 8883, true)));
        assert_eq!(a("mqtts://mq:9000/"), Ok(("mq".into(), 9000, true)));
        assert_eq!(a("mqtts://[::1]"), Ok(("::1".into(), 8883, true)));
        assert_eq!(a("mqtts://[::1]:9001"), Ok(("::1".into(), 9001, true)));
        assert!(a("http://mq").is_err());
    }

    #[test]
    fn ca_bundle_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("sidenet-ca-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let f = dir.join("ca.crt");
        let _ = std::fs::write(&f, "not a certificate");
        let e = tls_config(Some(&f))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("SIDENET_BROKER_CA") && e.contains("ca.crt"),
            "{e}"
        );
        let e = tls_config(Some(&dir.join("missing.crt")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("missing.crt"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
