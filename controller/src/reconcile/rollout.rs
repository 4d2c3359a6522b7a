//! Staged rollouts, the decision part (docs/rollouts.md): which wave each node is in, and when a
//! rollout moves on, bakes, completes or halts. Pure functions of the spec, the rollout's
//! progress and each node's health, so the adapters can share them and tests need no clock or
//! broker. [`Record`] is what the state database keeps per mesh; the core applies it
//! (`reconcile::core::staged`).
//!
//! Waves are stable under membership changes: a node's place is a hash of the rollout id and
//! its node id, a number in 0..10000 (basis points), and wave `i` holds the nodes whose place is
//! below the wave's cumulative percentage. A node that comes online mid-rollout therefore lands
//! in the wave it would have been in from the start, whatever other nodes joined or left.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Which nodes go first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Canary {
    /// These node ids (or MeshNode names, resolved by the caller).
    Nodes(Vec<String>),
    /// This many nodes, the lowest places first.
    Count(usize),
    /// This percentage of the nodes (rounded up, at least one), the lowest places first.
    Percent(u8),
}

/// How a new revision spreads over a mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The canary wave.
    pub canary: Canary,
    /// Cumulative percentages of the remaining nodes after the canary, increasing, the last
    /// 100 (e.g. `[25, 50, 100]`).
    pub waves: Vec<u8>,
    /// Seconds a wave must stay healthy before the next one starts.
    pub bake_seconds: u64,
    /// Failed nodes tolerated; one more halts the rollout.
    pub failure_budget: usize,
}

/// What a node reports about the rollout's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not applied and confirmed yet (or offline).
    Waiting,
    /// Applied, confirmed, neighbours back, probes within thresholds.
    Healthy,
    /// Rolled back, refused, or unhealthy: why.
    Failed(String),
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Waves are being handed out.
    Progressing,
    /// An admin paused it: no new wave starts.
    Paused,
    /// Failures beyond the budget: stopped, reached nodes go back to the last good content.
    Halted,
    /// An admin aborted it: as halted.
    Aborted,
    /// Every wave healthy.
    Complete,
}

/// A rollout's progress, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Identifies the rollout (e.g. the SHA-256 of the mesh spec it rolls out): it seeds the
    /// node places, so each rollout orders nodes differently.
    pub id: String,
    /// Where it is.
    pub phase: Phase,
    /// The wave being handed out (0: the canary).
    pub wave: usize,
    /// When every node of `wave` was first seen healthy (baking since), if it is.
    pub healthy_since: Option<u64>,
    /// When each wave started, Unix seconds.
    pub started: Vec<u64>,
    /// Failed nodes and why.
    pub failed: BTreeMap<String, String>,
    /// When the last wave was done and baked, Unix seconds.
    #[serde(default)]
    pub completed: Option<u64>,
}

impl Progress {
    /// A new rollout at the canary wave.
    pub fn new(id: &str, now: u64) -> Self {
        Self {
            id: id.to_string(),
            phase: Phase::Progressing,
            wave: 0,
            healthy_since: None,
            started: vec![now],
            failed: BTreeMap::new(),
            completed: None,
        }
    }
}

/// A node's place in rollout `id`, 0..10000.
pub fn place(id: &str, node: &str) -> u32 {
    let h = sidenet_wire::codec::sha256(format!("{id}\0{node}").as_bytes());
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 10_000
}

/// The waves of `nodes` (node ids) under `plan` for rollout `id`: wave 0 the canary, then one
/// per entry of `plan.waves`. Every node is in exactly one wave; within a wave, by node id.
pub fn waves(plan: &Plan, id: &str, nodes: &[String]) -> Vec<Vec<String>> {
    let mut ranked: Vec<(u32, &String)> = nodes.iter().map(|n| (place(id, n), n)).collect();
    ranked.sort();
    let canary: BTreeSet<&String> = match &plan.canary {
        Canary::Nodes(names) => nodes.iter().filter(|n| names.contains(n)).collect(),
        Canary::Count(c) => ranked.iter().take(*c).map(|(_, n)| *n).collect(),
        Canary::Percent(p) => {
            let c = (nodes.len() * usize::from(*p)).div_ceil(100).max(1);
            ranked.iter().take(c).map(|(_, n)| *n).collect()
        }
    };
    let mut out = vec![canary.iter().map(|n| (*n).clone()).collect::<Vec<_>>()];
    let mut bounds: Vec<u32> = plan.waves.iter().map(|p| u32::from(*p) * 100).collect();
    if bounds.last() != Some(&10_000) {
        bounds.push(10_000);
    }
    out.extend(bounds.iter().map(|_| Vec::new()));
    for (p, n) in ranked {
        if canary.contains(n) {
            continue;
        }
        let w = bounds
            .iter()
            .position(|b| p < *b)
            .unwrap_or(bounds.len() - 1);
        out[w + 1].push(n.clone());
    }
    for w in &mut out {
        w.sort();
    }
    out
}

/// The wave node `node` is in (for a node that comes online mid-rollout).
pub fn wave_of(waves: &[Vec<String>], node: &str) -> Option<usize> {
    waves.iter().position(|w| w.iter().any(|n| n == node))
}

/// One step: given each node's health, the progress after `now`. Handed-out waves are
/// `0..=progress.wave`; a failure beyond the budget halts; a wave whose nodes are all healthy
/// (failed nodes within the budget count as done) bakes for `bake_seconds`, then the next wave
/// starts; after the last one the rollout is complete.
pub fn step(
    plan: &Plan,
    progress: &Progress,
    waves: &[Vec<String>],
    health: &dyn Fn(&str) -> Health,
    now: u64,
) -> Progress {
    let mut p = progress.clone();
    if p.phase != Phase::Progressing && p.phase != Phase::Paused {
        return p;
    }
    for w in waves.iter().take(p.wave + 1) {
        for n in w {
            if let Health::Failed(why) = health(n) {
                p.failed.entry(n.clone()).or_insert(why);
            }
        }
    }
    if p.failed.len() > plan.failure_budget {
        p.phase = Phase::Halted;
        return p;
    }
    let current = waves.get(p.wave).map_or(&[][..], Vec::as_slice);
    let done = current
        .iter()
        .all(|n| p.failed.contains_key(n) || health(n) == Health::Healthy);
    if !done {
        p.healthy_since = None;
        return p;
    }
    let since = *p.healthy_since.get_or_insert(now);
    if p.phase == Phase::Paused || now < since.saturating_add(plan.bake_seconds) {
        return p;
    }
    if p.wave + 1 >= waves.len() {
        p.phase = Phase::Complete;
        p.completed = Some(now);
    } else {
        p.wave += 1;
        p.healthy_since = None;
        p.started.push(now);
    }
    p
}

/// Whether node `node` may get the rollout's revision now: it is in a handed-out wave and the
/// rollout is neither halted nor aborted.
pub fn may_receive(progress: &Progress, waves: &[Vec<String>], node: &str) -> bool {
    matches!(
        progress.phase,
        Phase::Progressing | Phase::Paused | Phase::Complete
    ) && wave_of(waves, node).is_some_and(|w| w <= progress.wave)
}

/// A node's rollout-relevant state when it entered the gate of its wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gate {
    /// Babel neighbours it reported then.
    pub neighbours: usize,
    /// When, Unix seconds.
    pub since: u64,
}

/// What the state database keeps per mesh (table `rollouts`, by Mesh name).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The last good Mesh: the spec every node may run (held-back nodes are rendered from it).
    pub good: sidenet_crds::Mesh,
    /// [`spec_fingerprint`] of `good`.
    pub good_fp: String,
    /// [`spec_fingerprint`] of the spec being rolled out (`good_fp` when none is).
    pub target_fp: String,
    /// The rollout of `target_fp`, if one started (kept after it completes, for status).
    pub progress: Option<Progress>,
    /// Its plan, the canary resolved to node ids when it started.
    pub plan: Option<Plan>,
    /// Nodes reconciled with the target spec (their published revision is the rollout's).
    #[serde(default)]
    pub reached: BTreeSet<String>,
    /// Nodes whose health gates their wave, with their state when they entered it.
    #[serde(default)]
    pub gated: BTreeMap<String, Gate>,
}

impl Record {
    /// Whether nodes are held back from the current spec (a rollout runs, is paused, halted or
    /// aborted).
    pub fn in_flight(&self) -> bool {
        self.target_fp != self.good_fp && self.progress.is_some()
    }

    /// The wave of `node`, from its place alone (the canary was resolved at the start).
    pub fn wave_of(&self, node: &str) -> usize {
        let (Some(plan), Some(p)) = (&self.plan, &self.progress) else {
            return 0;
        };
        if let Canary::Nodes(c) = &plan.canary
            && c.iter().any(|n| n == node)
        {
            return 0;
        }
        let at = place(&p.id, node);
        let mut bounds: Vec<u32> = plan.waves.iter().map(|w| u32::from(*w) * 100).collect();
        if bounds.last() != Some(&10_000) {
            bounds.push(10_000);
        }
        bounds
            .iter()
            .position(|b| at < *b)
            .unwrap_or(bounds.len() - 1)
            + 1
    }

    /// Whether `node` may run the target spec now.
    pub fn may_receive(&self, node: &str) -> bool {
        if !self.in_flight() {
            return true;
        }
        self.progress.as_ref().is_some_and(|p| {
            matches!(
                p.phase,
                Phase::Progressing | Phase::Paused | Phase::Complete
            ) && self.wave_of(node) <= p.wave
        })
    }
}

/// The fingerprint a rollout follows: SHA-256 of the Mesh's name and spec, without `rollout`
/// (changing only how changes roll out starts no rollout).
pub fn spec_fingerprint(mesh: &sidenet_crds::Mesh) -> String {
    let mut spec = mesh.spec.clone();
    spec.rollout = None;
    sidenet_wire::codec::sha256_hex(
        &serde_json::to_vec(&(&mesh.metadata.name, &spec)).unwrap_or_default(),
    )
}

/// The plan of `spec`, the canary given as `canary` node ids (resolved by the caller).
pub fn plan_of(spec: &sidenet_crds::RolloutSpec, canary: Vec<String>) -> Plan {
    Plan {
        canary: Canary::Nodes(canary),
        waves: if spec.waves.is_empty() {
            vec![100]
        } else {
            spec.waves.clone()
        },
        bake_seconds: spec.bake_seconds.unwrap_or(300),
        failure_budget: spec.failure_budget as usize,
    }
}

/// The canary of `spec` among `nodes` (node ids; `names` maps MeshNode names to node ids).
pub fn resolve_canary(
    spec: &sidenet_crds::RolloutSpec,
    id: &str,
    nodes: &[String],
    names: &BTreeMap<String, String>,
) -> Vec<String> {
    let c = &spec.canary;
    let canary = if !c.nodes.is_empty() {
        Canary::Nodes(
            c.nodes
                .iter()
                .map(|n| names.get(n).cloned().unwrap_or_else(|| n.clone()))
                .collect(),
        )
    } else if let Some(n) = c.count {
        Canary::Count(n as usize)
    } else {
        Canary::Percent(c.percent.unwrap_or(1))
    };
    if let Canary::Nodes(v) = &canary {
        let mut v = v.clone();
        v.sort();
        v.dedup();
        return v;
    }
    let plan = Plan {
        canary,
        waves: vec![100],
        bake_seconds: 0,
        failure_budget: 0,
    };
    waves(&plan, id, nodes).swap_remove(0)
}

/// One wave in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaveStatus {
    /// Nodes of the wave (node ids).
    pub nodes: Vec<String>,
    /// Of them, healthy on the rollout's revision.
    pub healthy: usize,
    /// When the wave was handed out, Unix seconds (none yet: not handed out).
    pub started: Option<u64>,
    /// Seconds from its start to the start of the next wave (or to completion).
    pub seconds: Option<u64>,
}

/// A rollout as `sidenetctl rollout status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Mesh name.
    pub mesh: String,
    /// The rollout id (the target spec's fingerprint).
    pub id: String,
    /// Where it is.
    pub phase: Phase,
    /// The wave being handed out (0: the canary).
    pub wave: usize,
    /// The waves.
    pub waves: Vec<WaveStatus>,
    /// Failed nodes and why.
    pub failed: BTreeMap<String, String>,
    /// Failures tolerated.
    pub failure_budget: usize,
    /// Seconds the current wave still bakes, when it is baking.
    pub bake_remaining: Option<u64>,
    /// When it completed, Unix seconds.
    pub completed: Option<u64>,
}

impl Status {
    /// Whether nodes are still held back or handed the change (every phase but `Complete`).
    pub fn in_progress(&self) -> bool {
        self.phase != Phase::Complete
    }

    /// One line for the map (docs/web.md): `rollout ID12 PHASE, wave W of N (T nodes, H
    /// healthy)[, baking S s more], F failed (budget B)[: NODE_ID: WHY; ...]`.
    pub fn summary(&self) -> String {
        let (t, h) = self
            .waves
            .get(self.wave)
            .map_or((0, 0), |w| (w.nodes.len(), w.healthy));
        let mut s = format!(
            "rollout {} {:?}, wave {} of {} ({t} nodes, {h} healthy)",
            &self.id[..self.id.len().min(12)],
            self.phase,
            self.wave,
            self.waves.len()
        );
        if let Some(b) = self.bake_remaining {
            s.push_str(&format!(", baking {b} s more"));
        }
        s.push_str(&format!(
            ", {} failed (budget {})",
            self.failed.len(),
            self.failure_budget
        ));
        if !self.failed.is_empty() {
            let failed: Vec<String> = self
                .failed
                .iter()
                .map(|(n, why)| format!("{n}: {why}"))
                .collect();
            s.push_str(&format!(": {}", failed.join("; ")));
        }
        s
    }

    /// The text `sidenetctl rollout status` prints (docs/rollouts.md):
    ///
    /// ```text
    /// mesh MESH: rollout ID PHASE, wave W of N, F failed (budget B)[, baking S s more]
    ///   wave I (canary): T nodes, H healthy, started RFC3339, took S s
    ///   wave I: T nodes, not started
    ///   failed NODE_ID: WHY
    /// ```
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "mesh {}: rollout {} {:?}, wave {} of {}, {} failed (budget {})",
            self.mesh,
            &self.id[..self.id.len().min(12)],
            self.phase,
            self.wave,
            self.waves.len(),
            self.failed.len(),
            self.failure_budget
        );
        if let Some(b) = self.bake_remaining {
            s.push_str(&format!(", baking {b} s more"));
        }
        s.push('\n');
        for (i, w) in self.waves.iter().enumerate() {
            s.push_str(&format!(
                "  wave {i}{}: {} nodes, ",
                if i == 0 { " (canary)" } else { "" },
                w.nodes.len()
            ));
            match w.started {
                Some(t) => {
                    s.push_str(&format!(
                        "{} healthy, started {}",
                        w.healthy,
                        crate::rfc3339(t)
                    ));
                    if let Some(d) = w.seconds {
                        s.push_str(&format!(", took {d} s"));
                    }
                }
                None => s.push_str("not started"),
            }
            s.push('\n');
        }
        for (n, why) in &self.failed {
            s.push_str(&format!("  failed {n}: {why}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node{i:03}")).collect()
    }

    fn plan() -> Plan {
        Plan {
            canary: Canary::Count(2),
            waves: vec![25, 50, 100],
            bake_seconds: 30,
            failure_budget: 0,
        }
    }

    #[test]
    fn every_node_is_in_one_wave_and_waves_grow_by_percentage() {
        let nodes = ids(400);
        let w = waves(&plan(), "r1", &nodes);
        assert_eq!(w.len(), 4);
        assert_eq!(w[0].len(), 2);
        let all: BTreeSet<&String> = w.iter().flatten().collect();
        assert_eq!(all.len(), 400);
        assert_eq!(w.iter().map(Vec::len).sum::<usize>(), 400);
        // About 25 % of the rest each in waves 1 and 2, 50 % in wave 3 (hash places).
        assert!((60..140).contains(&w[1].len()), "{}", w[1].len());
        assert!((60..140).contains(&w[2].len()), "{}", w[2].len());
        assert!((150..250).contains(&w[3].len()), "{}", w[3].len());
        let pct = Plan {
            canary: Canary::Percent(10),
            ..plan()
        };
        assert_eq!(waves(&pct, "r1", &nodes)[0].len(), 40);
        let named = Plan {
            canary: Canary::Nodes(vec!["node007".into(), "nobody".into()]),
            ..plan()
        };
        assert_eq!(waves(&named, "r1", &nodes)[0], vec!["node007".to_string()]);
    }

    #[test]
    fn a_node_joining_later_lands_in_the_wave_it_had_from_the_start() {
        let nodes = ids(100);
        let with_late = {
            let mut n = nodes[..90].to_vec();
            n.extend(nodes[95..].iter().cloned());
            n
        };
        let p = Plan {
            canary: Canary::Nodes(vec!["node000".into()]),
            ..plan()
        };
        let full = waves(&p, "r1", &nodes);
        let partial = waves(&p, "r1", &with_late);
        for n in &with_late {
            assert_eq!(wave_of(&full, n), wave_of(&partial, n), "{n}");
        }
    }

    #[test]
    fn waves_advance_after_baking_and_halt_beyond_the_budget() {
        let nodes = ids(20);
        let p = plan();
        let w = waves(&p, "r1", &nodes);
        let mut pr = Progress::new("r1", 1000);
        let healthy_upto = |wave: usize| {
            let w = w.clone();
            move |n: &str| {
                if wave_of(&w, n).unwrap() <= wave {
                    Health::Healthy
                } else {
                    Health::Waiting
                }
            }
        };
        // The canary is not healthy yet: nothing moves.
        pr = step(&p, &pr, &w, &|_| Health::Waiting, 1001);
        assert_eq!((pr.wave, pr.healthy_since), (0, None));
        // Healthy: bakes 30 s, then wave 1 starts.
        pr = step(&p, &pr, &w, &healthy_upto(0), 1010);
        assert_eq!((pr.wave, pr.healthy_since), (0, Some(1010)));
        pr = step(&p, &pr, &w, &healthy_upto(0), 1039);
        assert_eq!(pr.wave, 0);
        pr = step(&p, &pr, &w, &healthy_upto(0), 1040);
        assert_eq!((pr.wave, pr.started.clone()), (1, vec![1000, 1040]));
        assert!(may_receive(&pr, &w, &w[1][0]) && !may_receive(&pr, &w, &w[2][0]));
        // Paused: healthy waves do not advance.
        pr.phase = Phase::Paused;
        pr = step(&p, &pr, &w, &healthy_upto(1), 2000);
        pr = step(&p, &pr, &w, &healthy_upto(1), 3000);
        assert_eq!(pr.wave, 1);
        pr.phase = Phase::Progressing;
        pr = step(&p, &pr, &w, &healthy_upto(1), 3001);
        assert_eq!(pr.wave, 2);
        // One failure with a budget of 0: halted, nothing more is handed out.
        let bad = w[2][0].clone();
        let h = |n: &str| {
            if n == bad {
                Health::Failed("rolled back: probes lost".into())
            } else {
                Health::Healthy
            }
        };
        pr = step(&p, &pr, &w, &h, 3002);
        assert_eq!(pr.phase, Phase::Halted);
        assert_eq!(pr.failed.keys().collect::<Vec<_>>(), vec![&bad]);
        assert!(!may_receive(&pr, &w, &w[3][0]));
        assert_eq!(step(&p, &pr, &w, &healthy_upto(9), 9999), pr);
    }

    #[test]
    fn failures_within_the_budget_count_as_done_and_the_rollout_completes() {
        let nodes = ids(10);
        let p = Plan {
            canary: Canary::Count(1),
            waves: vec![100],
            bake_seconds: 0,
            failure_budget: 1,
        };
        let w = waves(&p, "r2", &nodes);
        assert_eq!(w.len(), 2);
        let bad = w[1][0].clone();
        let h = |n: &str| {
            if n == bad {
                Health::Failed("refused".into())
            } else {
                Health::Healthy
            }
        };
        let mut pr = Progress::new("r2", 0);
        pr = step(&p, &pr, &w, &h, 1);
        assert_eq!(pr.wave, 1);
        pr = step(&p, &pr, &w, &h, 2);
        assert_eq!((pr.phase, pr.failed.len()), (Phase::Complete, 1));
    }
}
