//! The MQTT task's side of the engine: broker (re)connections, enrolments and status reports.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rumqttc::QoS;
use sidenet_wire::topics::{self, Incoming};

use super::engine::{Ctx, Engine, config_node};
use super::enrol::{create_meshnodes, delete_evicted};
use super::options::KubeError;
use super::publish::{
    StatusWrite, persist_and_publish, send_statuses, status_patch, update_phases,
};
use super::sync::{seed_revision, sync};

/// What the MQTT task hands over.
#[derive(Debug)]
pub(crate) enum MqttEvent {
    Connected,
    Disconnected,
    Message(String, Vec<u8>),
}

/// The most node messages handled under one hold of the engine lock.
const BATCH: usize = 512;

/// Handles broker (re)connections, enrolments and status reports. The node messages queued
/// at a time are handled together (at most [`BATCH`]): one sync of the objects, one commit and
/// publish, one status write per node that changed, and one record of the mesh's highest
/// revision for the whole batch, instead of one of each per message.
pub(crate) async fn mqtt_loop(ctx: Arc<Ctx>, mut rx: crate::transport::inbox::Receiver<MqttEvent>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH
            && let Some(ev) = rx.try_recv()
        {
            batch.push(ev);
        }
        let engine = match ctx.engine().await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("{e}");
                continue;
            }
        };
        let mut eng = engine.lock().await;
        handle_batch(&ctx, &mut eng, batch).await;
    }
}

/// What a batch of node messages leaves for its [`flush`].
#[derive(Default)]
struct Pending {
    /// The nodes whose status to write.
    touched: BTreeSet<String>,
    /// Enrolled nodes without a MeshNode: one to create for each, and whether the node is held
    /// for it (rendered from its record after all when none is made).
    creates: Vec<(String, bool)>,
    /// Whether the objects were synced for this batch.
    synced: bool,
}

/// Handles `events` in order: node messages together, the others one by one.
pub(crate) async fn handle_batch(ctx: &Ctx, eng: &mut Engine, events: Vec<MqttEvent>) {
    let started = Instant::now();
    let mut pending = Pending::default();
    let mut dirty = false;
    for ev in events {
        match ev {
            MqttEvent::Message(topic, payload)
                if topic != crate::transport::dynsec::RESPONSE_TOPIC =>
            {
                match on_node_message(ctx, eng, &topic, &payload, &mut pending).await {
                    Ok(Some(node)) => {
                        pending.touched.insert(node);
                        dirty = true;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!("{e}"),
                }
            }
            other => {
                if std::mem::take(&mut dirty)
                    && let Err(e) = flush(ctx, eng, started, &mut pending).await
                {
                    tracing::error!("{e}");
                }
                if let Err(e) = handle_mqtt(ctx, eng, other).await {
                    tracing::error!("{e}");
                }
                pending.synced = false;
            }
        }
    }
    if dirty && let Err(e) = flush(ctx, eng, started, &mut pending).await {
        tracing::error!("{e}");
    }
}

/// After a batch of node messages: the MeshNodes of the nodes that enrolled without one,
/// waiting-list evictions, commit and publish, then the status of each node the batch
/// concerned (once per node).
async fn flush(
    ctx: &Ctx,
    eng: &mut Engine,
    started: Instant,
    pending: &mut Pending,
) -> Result<(), KubeError> {
    let creates = std::mem::take(&mut pending.creates);
    if !creates.is_empty() {
        let ids: Vec<String> = creates.iter().map(|(id, _)| id.clone()).collect();
        let coming = create_meshnodes(ctx, eng, &ids).await;
        for (id, hold) in creates {
            if hold && !coming.contains(&id) {
                // Refused, or no MeshNode made: the node is rendered from its enrolment record.
                release(eng, &id)?;
            }
        }
    }
    delete_evicted(ctx, eng).await;
    persist_and_publish(ctx, eng, started).await?;
    // The status of each node the batch concerned, sent together (publish::send_statuses).
    let mut writes = Vec::new();
    for node in std::mem::take(&mut pending.touched) {
        // A node whose MeshNode was just made: its status is written with its first config.
        if eng.ctl.awaits_manifest(&node) {
            continue;
        }
        let Some((ns, name)) = eng.claims.nodes.get(&node).cloned() else {
            continue;
        };
        let Some(obj) = ctx.node_obj(&ns, &name) else {
            continue;
        };
        match status_patch(ctx, eng, &obj) {
            Ok(Some(patch)) => writes.push(StatusWrite {
                id: node,
                ns,
                name,
                patch,
            }),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(node = %node, "cannot write the status of MeshNode {ns}/{name}: {e}")
            }
        }
    }
    for (w, e) in send_statuses(ctx, writes).await {
        tracing::warn!(node = %w.id, "cannot write the status of MeshNode {}/{}: {e}", w.ns, w.name);
    }
    update_phases(ctx, eng);
    Ok(())
}

/// One enrolment, status report or online message, into the core (the caller flushes): the
/// node it concerns.
async fn on_node_message(
    ctx: &Ctx,
    eng: &mut Engine,
    topic: &str,
    payload: &[u8],
    pending: &mut Pending,
) -> Result<Option<String>, KubeError> {
    let (mesh, node, enroll) = match topics::parse(topic) {
        Some(Incoming::Enroll { mesh, node }) => (mesh.to_string(), node.to_string(), true),
        Some(Incoming::Status { mesh, node }) | Some(Incoming::Online { mesh, node }) => {
            (mesh.to_string(), node.to_string(), false)
        }
        None => return Ok(None),
    };
    if enroll {
        // Once per batch: the MeshNodes created for the batch's earlier enrolments are not in
        // the watch cache yet anyway.
        if !pending.synced {
            sync(ctx, eng).await?;
            pending.synced = true;
        }
        if !eng.seeded.contains(&node) && !eng.ctl.store.published.contains_key(&node) {
            let hw = eng.high_water.get(&mesh).copied().unwrap_or(0);
            seed_revision(eng, &node, &mesh, hw);
            eng.seeded.insert(node.clone());
        }
    }
    // A node that enrols without a MeshNode gets one (at the flush); its config is rendered
    // once that MeshNode is in the set (named by it), not now by its id and again a moment
    // later.
    let creating = pending.creates.iter().any(|(id, _)| *id == node);
    let hold = enroll
        && !creating
        && !eng.claims.nodes.contains_key(&node)
        && !eng.ctl.set.nodes.contains_key(&node)
        && !eng.ctl.awaits_manifest(&node);
    if hold {
        eng.ctl.await_manifest(&node);
    }
    let unused = if enroll {
        super::tokens::before_enrol(ctx, eng, &mesh).await?
    } else {
        Default::default()
    };
    let before = eng.ctl.counters;
    eng.ctl.on_message(topic, payload, crate::now())?;
    if eng.synced {
        // A report may finish or fail a wave (kubernetes::rollouts).
        eng.ctl.rollout_tick(crate::now())?;
    }
    super::tokens::after_enrol(ctx, eng, &mesh, &unused).await?;
    let after = eng.ctl.counters;
    ctx.metrics
        .enrolled
        .fetch_add(after.enrolled - before.enrolled, Ordering::Relaxed);
    ctx.metrics.rejected.fetch_add(
        after.rejected_messages - before.rejected_messages,
        Ordering::Relaxed,
    );
    let create = enroll
        && !creating
        && (eng.ctl.store.nodes.contains_key(&node) || eng.ctl.pending.get(&node).is_some())
        && !eng.claims.nodes.contains_key(&node);
    if create {
        pending.creates.push((node.clone(), hold));
    } else if hold {
        // Refused: the node is rendered from its enrolment record.
        release(eng, &node)?;
    }
    Ok(Some(node))
}

/// Renders node `id` without a MeshNode after all (see [`on_node_message`]).
fn release(eng: &mut Engine, id: &str) -> Result<(), KubeError> {
    if eng.ctl.manifest_not_coming(id) && eng.ctl.store.nodes.contains_key(id) {
        eng.ctl.reconcile(&[id.to_string()], crate::now())?;
    }
    Ok(())
}

pub(crate) async fn handle_mqtt(
    ctx: &Ctx,
    eng: &mut Engine,
    ev: MqttEvent,
) -> Result<(), KubeError> {
    let started = Instant::now();
    match ev {
        MqttEvent::Disconnected => {
            ctx.connected.store(false, Ordering::SeqCst);
            ctx.metrics.ready.store(false, Ordering::SeqCst);
        }
        MqttEvent::Connected => {
            for f in topics::controller_filters("+") {
                ctx.mqtt
                    .subscribe(f, QoS::AtLeastOnce)
                    .await
                    .map_err(|e| KubeError::Other(format!("MQTT subscribe: {e}")))?;
            }
            ctx.connected.store(true, Ordering::SeqCst);
            if let Err(e) = sync(ctx, eng).await {
                tracing::error!("{e}");
            }
            if let Err(e) = ctx.credentials.on_connected(&mut eng.ctl) {
                tracing::error!("broker credentials: {e}");
            }
            let mut out = eng.ctl.announcements(crate::now())?;
            let held = eng.held.clone();
            out.extend(eng.ctl.stored_configs()?.into_iter().filter(|p| {
                config_node(&p.topic).is_some_and(|id| {
                    !held.contains(&id)
                        && eng
                            .ctl
                            .store
                            .published
                            .get(&id)
                            .is_some_and(|r| !r.sha256.is_empty())
                })
            }));
            tracing::info!(
                "connected to the MQTT broker; publishing announcements and {} configs",
                out.len()
            );
            ctx.connected.store(true, Ordering::SeqCst);
            let configs = out
                .iter()
                .filter(|p| config_node(&p.topic).is_some())
                .count();
            for p in out {
                ctx.send(p).await?;
            }
            ctx.metrics
                .published
                .fetch_add(configs as u64, Ordering::Relaxed);
            persist_and_publish(ctx, eng, started).await?;
            ctx.metrics.ready.store(true, Ordering::SeqCst);
        }
        MqttEvent::Message(topic, payload) if topic == crate::transport::dynsec::RESPONSE_TOPIC => {
            for e in crate::transport::dynsec::response_errors(&payload) {
                tracing::error!("Mosquitto dynamic security: {e}");
            }
            if let Err(e) = ctx.credentials.on_response(&payload) {
                tracing::error!("broker credentials: {e}");
            }
        }
        MqttEvent::Message(topic, payload) => {
            let mut pending = Pending::default();
            if let Some(node) = on_node_message(ctx, eng, &topic, &payload, &mut pending).await? {
                pending.touched.insert(node);
                flush(ctx, eng, started, &mut pending).await?;
            }
        }
    }
    Ok(())
}
