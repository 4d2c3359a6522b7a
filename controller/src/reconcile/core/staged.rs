//! Staged rollouts in the core (docs/rollouts.md): which nodes are held back on the last good
//! Mesh spec, the health that gates each wave, and pause, resume and abort. The decisions are
//! the pure functions of [`crate::reconcile::rollout`]; this file applies them to the state and
//! keeps the progress in the state database ([`crate::reconcile::store`], table `rollouts`).
//!
//! Held-back nodes are reconciled with the last good Mesh swapped in for the current one, so
//! their inputs (and content) stay what they were; every other part of reconcile is unchanged.

use std::collections::{BTreeMap, BTreeSet};

use sidenet_wire::messages::ApplyState;

use super::state::{Controller, CoreError};
use crate::reconcile::rollout::{self, Gate, Health, Phase, Record};
use crate::reconcile::store::Batch;

/// Default seconds a node has to become healthy on the rollout's revision.
const DEFAULT_DEADLINE: u64 = 600;
/// Default highest probe loss of a healthy node, percent.
const DEFAULT_MAX_LOSS: u8 = 50;

/// An admin's request about a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    /// No new wave starts (the current one still bakes).
    Pause,
    /// A paused rollout goes on.
    Resume,
    /// Stop: nodes that got the new revision get the last good content again.
    Abort,
}

impl Controller {
    /// Lets `Mesh.spec.rollout` stage Mesh changes (standalone mode, which steps rollouts with
    /// [`Controller::rollout_tick`] and keeps them in its state database). Off, the default,
    /// every node gets a change at once, as in Kubernetes mode for now.
    pub fn enable_rollouts(&mut self) {
        self.staging = true;
    }

    /// Reconciles `ids`: nodes of a mesh whose rollout holds them back are rendered from the
    /// mesh's last good spec, the others from the current one.
    pub(super) fn reconcile_staged(&mut self, ids: &[String], now: u64) -> Result<(), CoreError> {
        if !self.staging {
            return self.reconcile_plain(ids, now);
        }
        self.rollout_sync(now);
        if !self.store.rollouts.values().any(Record::in_flight) {
            return self.reconcile_plain(ids, now);
        }
        let mut current = Vec::new();
        let mut reached: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for id in ids {
            let mesh = self.mesh_name_for(id);
            match mesh.and_then(|m| self.store.rollouts.get(&m).map(|r| (m, r))) {
                Some((m, r)) if r.in_flight() => {
                    if r.may_receive(id) {
                        current.push(id.clone());
                        reached.entry(m).or_default().push(id.clone());
                    } else {
                        held.entry(m).or_default().push(id.clone());
                    }
                }
                _ => current.push(id.clone()),
            }
        }
        self.reconcile_plain(&current, now)?;
        let mut batch = Batch::default();
        for (m, nodes) in reached {
            if let Some(mut r) = self.store.rollouts.get(&m).cloned() {
                let before = r.reached.len();
                r.reached.extend(nodes);
                if r.reached.len() != before {
                    self.store.put_rollout(&mut batch, &m, Some(r));
                }
            }
        }
        self.batch.merge(batch);
        for (m, nodes) in held {
            let Some(good) = self.store.rollouts.get(&m).map(|r| r.good.clone()) else {
                continue;
            };
            let Some(now_in_force) = self.set.meshes.insert(m.clone(), good) else {
                continue;
            };
            let result = self.reconcile_plain(&nodes, now);
            self.set.meshes.insert(m, now_in_force);
            result?;
        }
        Ok(())
    }

    /// Brings the rollout records in line with the manifests: a new spec of a mesh with
    /// `rollout` starts a rollout from the last good spec; without `rollout` a new spec is good
    /// at once; a spec back at the last good one ends the rollout.
    fn rollout_sync(&mut self, now: u64) {
        let mut batch = Batch::default();
        let gone: Vec<String> = self
            .store
            .rollouts
            .keys()
            .filter(|m| !self.set.meshes.contains_key(*m))
            .cloned()
            .collect();
        for m in gone {
            self.store.put_rollout(&mut batch, &m, None);
        }
        let meshes: Vec<(String, sidenet_crds::Mesh)> = self
            .set
            .meshes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, mesh) in meshes {
            let fp = rollout::spec_fingerprint(&mesh);
            let rec = self.store.rollouts.get(&name);
            if rec.is_some_and(|r| r.target_fp == fp) {
                continue;
            }
            let staged = mesh.spec.rollout.clone();
            let new = match (rec, staged) {
                (Some(r), Some(spec)) if r.good_fp != fp => {
                    let nodes = self.nodes_of(&name);
                    let names = self.meshnode_names(&name);
                    let canary = rollout::resolve_canary(&spec, &fp, &nodes, &names);
                    let plan = rollout::plan_of(&spec, canary);
                    tracing::info!(
                        mesh = %name,
                        "Mesh spec changed: staged rollout {} starts with the canary ({} nodes)",
                        &fp[..12],
                        match &plan.canary {
                            rollout::Canary::Nodes(n) => n.len(),
                            _ => 0,
                        }
                    );
                    let mut r = r.clone();
                    r.target_fp = fp.clone();
                    r.progress = Some(rollout::Progress::new(&fp, now));
                    r.plan = Some(plan);
                    r.reached = BTreeSet::new();
                    r.gated = BTreeMap::new();
                    r
                }
                (Some(r), Some(_)) => {
                    tracing::info!(mesh = %name, "Mesh spec is back at the last good one: rollout ended");
                    let mut r = r.clone();
                    r.target_fp = fp.clone();
                    r.good = mesh.clone();
                    r
                }
                _ => Record {
                    good: mesh.clone(),
                    good_fp: fp.clone(),
                    target_fp: fp.clone(),
                    progress: None,
                    plan: None,
                    reached: BTreeSet::new(),
                    gated: BTreeMap::new(),
                },
            };
            self.store.put_rollout(&mut batch, &name, Some(new));
        }
        self.batch.merge(batch);
    }

    /// Node ids of mesh `name` (MeshNodes and enrolled nodes).
    fn nodes_of(&self, name: &str) -> Vec<String> {
        self.candidates()
            .into_iter()
            .filter(|id| self.mesh_name_for(id).as_deref() == Some(name))
            .collect()
    }

    fn meshnode_names(&self, name: &str) -> BTreeMap<String, String> {
        self.set
            .nodes
            .iter()
            .filter(|(_, n)| n.spec.mesh == name)
            .filter_map(|(id, n)| Some((n.metadata.name.clone()?, id.clone())))
            .collect()
    }

    /// How node `id` does on the rollout of `rec`: waiting, healthy, or failed (and why).
    fn rollout_health(&self, rec: &Record, id: &str, now: u64) -> Health {
        if !rec.reached.contains(id) {
            return Health::Waiting;
        }
        let (Some(node), Some(publ)) = (self.store.nodes.get(id), self.store.published.get(id))
        else {
            return Health::Waiting;
        };
        let rev = publ.revision;
        if node.failed_revisions.contains(&rev)
            || node
                .failure
                .as_ref()
                .is_some_and(|f| f.revision == Some(rev))
        {
            let why = node
                .failure
                .as_ref()
                .filter(|f| f.revision == Some(rev))
                .map_or_else(|| "failed".to_string(), |f| f.error.clone());
            return Health::Failed(format!("revision {}: {why}", rev.rev));
        }
        let spec = self
            .set
            .meshes
            .get(&self.mesh_name_for(id).unwrap_or_default())
            .and_then(|m| m.spec.rollout.clone());
        let health = spec.as_ref().map(|s| s.health.clone()).unwrap_or_default();
        let deadline = spec
            .as_ref()
            .and_then(|s| s.progress_deadline_seconds)
            .unwrap_or(DEFAULT_DEADLINE);
        let gate = rec.gated.get(id);
        let why_not = if self.online.get(id) != Some(&true) {
            Some("offline".to_string())
        } else if node.applied != Some(rev)
            || node.applied_sha256.as_deref() != Some(publ.sha256.as_str())
            || node.state != Some(ApplyState::Applied)
        {
            Some(format!("revision {} not applied and confirmed", rev.rev))
        } else if gate.is_some_and(|g| g.neighbours > 0) && node.neighbours.is_empty() {
            Some("no babel neighbour back".to_string())
        } else {
            let max_loss = f64::from(health.max_probe_loss_percent.unwrap_or(DEFAULT_MAX_LOSS));
            node.probes.iter().find_map(|p| {
                if p.sent > 0 && p.loss * 100.0 > max_loss {
                    return Some(format!(
                        "probe loss to {} is {:.0} % (more than {max_loss:.0} %)",
                        p.target,
                        p.loss * 100.0
                    ));
                }
                match (p.rtt_ms, health.max_probe_rtt_ms) {
                    (Some(rtt), Some(max)) if rtt > f64::from(max) => Some(format!(
                        "probe round trip to {} is {rtt:.0} ms (more than {max} ms)",
                        p.target
                    )),
                    _ => None,
                }
            })
        };
        let Some(why) = why_not else {
            return Health::Healthy;
        };
        let wave_start = rec
            .progress
            .as_ref()
            .and_then(|p| p.started.get(rec.wave_of(id)).copied())
            .unwrap_or(now);
        let since = gate.map_or(wave_start, |g| g.since.max(wave_start));
        if now >= since.saturating_add(deadline) {
            Health::Failed(format!(
                "not healthy {deadline} s after its wave started: {why}"
            ))
        } else {
            Health::Waiting
        }
    }

    /// Moves every running rollout on: records the failed and healthy nodes of the handed-out
    /// waves, halts beyond the failure budget (reached nodes get the last good content again),
    /// bakes, hands out the next wave, completes. Call it after every batch of messages and
    /// once a second or so (bake times end without a message).
    pub fn rollout_tick(&mut self, now: u64) -> Result<(), CoreError> {
        let running: Vec<String> = self
            .store
            .rollouts
            .iter()
            .filter(|(_, r)| {
                r.in_flight()
                    && r.progress
                        .as_ref()
                        .is_some_and(|p| matches!(p.phase, Phase::Progressing | Phase::Paused))
            })
            .map(|(m, _)| m.clone())
            .collect();
        for mesh in running {
            self.rollout_step(&mesh, now)?;
        }
        Ok(())
    }

    fn rollout_step(&mut self, mesh: &str, now: u64) -> Result<(), CoreError> {
        let Some(mut rec) = self.store.rollouts.get(mesh).cloned() else {
            return Ok(());
        };
        let (Some(plan), Some(progress)) = (rec.plan.clone(), rec.progress.clone()) else {
            return Ok(());
        };
        let nodes = self.nodes_of(mesh);
        let mut waves: Vec<Vec<String>> = vec![Vec::new(); plan.waves.len() + 2];
        for n in &nodes {
            let w = rec.wave_of(n);
            if let Some(v) = waves.get_mut(w) {
                v.push(n.clone());
            }
        }
        if waves.last().is_some_and(Vec::is_empty) && plan.waves.last() == Some(&100) {
            waves.pop();
        }
        let gated_before = rec.gated.len();
        self.gate(&mut rec, &waves, progress.wave, now);
        // Only gated nodes (online when their wave was handed out, or since) hold a wave.
        let gates: Vec<Vec<String>> = waves
            .iter()
            .map(|w| {
                w.iter()
                    .filter(|n| rec.gated.contains_key(*n))
                    .cloned()
                    .collect()
            })
            .collect();
        let next = rollout::step(
            &plan,
            &progress,
            &gates,
            &|n| self.rollout_health(&rec, n, now),
            now,
        );
        if next == progress && rec.gated.len() == gated_before {
            return Ok(());
        }
        let advanced = next.wave != progress.wave && next.phase == Phase::Progressing;
        let halted = next.phase == Phase::Halted && progress.phase != Phase::Halted;
        let complete = next.phase == Phase::Complete;
        if advanced {
            let started = next.started.last().copied().unwrap_or(now);
            tracing::info!(mesh = %mesh, "rollout {}: wave {} healthy and baked; wave {} starts ({} nodes) at {started}",
                &next.id[..12], progress.wave, next.wave, waves.get(next.wave).map_or(0, Vec::len));
            self.gate(&mut rec, &waves, next.wave, now);
        }
        if halted {
            tracing::warn!(mesh = %mesh, "rollout {} halted: {} failed nodes (budget {}): {}; reached nodes get the last good content again",
                &next.id[..12], next.failed.len(), plan.failure_budget,
                next.failed.iter().map(|(n, w)| format!("{n} ({w})")).collect::<Vec<_>>().join(", "));
        }
        if complete {
            tracing::info!(mesh = %mesh, "rollout {} complete: every wave healthy", &next.id[..12]);
            if let Some(m) = self.set.meshes.get(mesh) {
                rec.good = m.clone();
                rec.good_fp = rec.target_fp.clone();
            }
        }
        rec.progress = Some(next.clone());
        let mut batch = Batch::default();
        self.store.put_rollout(&mut batch, mesh, Some(rec.clone()));
        self.batch.merge(batch);
        if advanced {
            let wave = waves.get(next.wave).cloned().unwrap_or_default();
            self.reconcile(&wave, now)?;
        }
        if halted {
            let reached: Vec<String> = rec.reached.iter().cloned().collect();
            self.reconcile(&reached, now)?;
        }
        Ok(())
    }

    /// Gates the online nodes of waves `0..=upto` that are not gated yet, with their neighbour
    /// count now (before they get the new revision).
    fn gate(&self, rec: &mut Record, waves: &[Vec<String>], upto: usize, now: u64) {
        for n in waves.iter().take(upto + 1).flatten() {
            if rec.gated.contains_key(n) || self.online.get(n) != Some(&true) {
                continue;
            }
            let neighbours = self.store.nodes.get(n).map_or(0, |r| r.neighbours.len());
            rec.gated.insert(
                n.clone(),
                Gate {
                    neighbours,
                    since: now,
                },
            );
        }
    }

    /// Pauses, resumes or aborts the rollout of mesh `mesh` (its Mesh name or network name).
    pub fn rollout_action(
        &mut self,
        mesh: &str,
        action: RolloutAction,
        now: u64,
    ) -> Result<rollout::Status, CoreError> {
        let name = self.rollout_mesh(mesh)?;
        let Some(mut rec) = self.store.rollouts.get(&name).cloned() else {
            return Err(CoreError::Request(format!("mesh {mesh} has no rollout")));
        };
        let Some(p) = rec
            .progress
            .as_mut()
            .filter(|_| rec.target_fp != rec.good_fp)
        else {
            return Err(CoreError::Request(format!(
                "mesh {mesh} has no rollout in progress"
            )));
        };
        let ok = match (action, p.phase) {
            (RolloutAction::Pause, Phase::Progressing) => {
                p.phase = Phase::Paused;
                true
            }
            (RolloutAction::Resume, Phase::Paused) => {
                p.phase = Phase::Progressing;
                true
            }
            (RolloutAction::Abort, Phase::Progressing | Phase::Paused) => {
                p.phase = Phase::Aborted;
                true
            }
            _ => false,
        };
        if !ok {
            return Err(CoreError::Request(format!(
                "the rollout of mesh {mesh} is {:?}: cannot {}",
                p.phase,
                match action {
                    RolloutAction::Pause => "pause it (only a progressing rollout pauses)",
                    RolloutAction::Resume => "resume it (only a paused rollout resumes)",
                    RolloutAction::Abort =>
                        "abort it (only a progressing or paused rollout aborts; edit the Mesh to start a new one)",
                }
            )));
        }
        tracing::info!(mesh = %name, "rollout {:?} by an admin", action);
        let mut batch = Batch::default();
        self.store.put_rollout(&mut batch, &name, Some(rec.clone()));
        self.batch.merge(batch);
        if action == RolloutAction::Abort {
            let reached: Vec<String> = rec.reached.iter().cloned().collect();
            self.reconcile(&reached, now)?;
        } else {
            self.rollout_tick(now)?;
        }
        self.rollout_status(now)
            .into_iter()
            .find(|s| s.mesh == name)
            .ok_or_else(|| CoreError::Request(format!("mesh {mesh} has no rollout")))
    }

    fn rollout_mesh(&self, mesh: &str) -> Result<String, CoreError> {
        if self.set.meshes.contains_key(mesh) {
            return Ok(mesh.to_string());
        }
        self.set
            .mesh_by_network(mesh)
            .and_then(|m| m.metadata.name.clone())
            .ok_or_else(|| CoreError::Request(format!("no mesh named {mesh}")))
    }

    /// Every mesh's rollout (started at least once), for `sidenetctl rollout status`.
    pub fn rollout_status(&self, now: u64) -> Vec<rollout::Status> {
        let mut out = Vec::new();
        for (mesh, rec) in &self.store.rollouts {
            let (Some(plan), Some(p)) = (&rec.plan, &rec.progress) else {
                continue;
            };
            let mut waves: Vec<rollout::WaveStatus> = (0..plan.waves.len() + 2)
                .map(|i| rollout::WaveStatus {
                    nodes: Vec::new(),
                    healthy: 0,
                    started: p.started.get(i).copied(),
                    seconds: p
                        .started
                        .get(i)
                        .and_then(|s| p.started.get(i + 1).copied().or(p.completed).map(|e| e - s)),
                })
                .collect();
            for n in self.nodes_of(mesh) {
                let w = rec.wave_of(&n);
                let healthy = self.rollout_health(rec, &n, now) == Health::Healthy;
                if let Some(ws) = waves.get_mut(w) {
                    ws.nodes.push(n);
                    ws.healthy += usize::from(healthy);
                }
            }
            if waves
                .last()
                .is_some_and(|w| w.nodes.is_empty() && w.started.is_none())
            {
                waves.pop();
            }
            let bake_remaining = p.healthy_since.and_then(|s| {
                (p.phase == Phase::Progressing || p.phase == Phase::Paused)
                    .then(|| (s + plan.bake_seconds).saturating_sub(now))
            });
            out.push(rollout::Status {
                mesh: mesh.clone(),
                id: p.id.clone(),
                phase: p.phase,
                wave: p.wave,
                waves,
                failed: p.failed.clone(),
                failure_budget: plan.failure_budget,
                bake_remaining,
                completed: p.completed,
            });
        }
        out
    }
}
