//! Staged, health-gated rollouts in Kubernetes mode (docs/rollouts.md, "Kubernetes mode"), with
//! 30 real agent processes, against the in-memory API server (`kubefake`, with the chart's
//! RBAC) and mosquitto:
//!
//! - a Mesh change that fails on the nodes reaches the canary only: the condition
//!   `RolloutHalted` names the failing nodes, an Event tells it, the canary runs its last good
//!   content again (a new revision), no other node gets a new revision;
//! - a good change, paused at the canary with `sidenet.io/rollout=pause` (the annotation is
//!   removed once acted on) and resumed with `=resume`, reaches every node wave by wave
//!   (per-wave timings printed);
//! - a third change survives a controller crash and restart (its record is in the Mesh status)
//!   and is aborted by `sidenet.io/rollout=abort` on the new controller: the canary runs the
//!   last good content again. The first controller is the real `sidenet-controller kubernetes`
//!   binary, a process of its own that reaches the in-memory API server over HTTP through a
//!   kubeconfig (`kubefake::serve`, watches streamed), and the crash is a SIGKILL of it.
//!
//! The failing config, as in `rollout.rs`: a passphrase rotation adds the file
//! `etc/sidenet/wpa_supplicant-mesh-next.conf`, and every agent's root has a folder there.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use sidenet_controller::reconcile::rollout::Record;
use sidenet_crds::Mesh;
use sidenet_wire::keys::KeyPair;

use common::{Proc, bin};
use kubecluster::*;

const AGENTS: usize = 30;
const LONG: Duration = Duration::from_secs(120);
const LINUX: &str = "raspberrypi-4b-awus036acm";
const NEXT_FILE: &str = "etc/sidenet/wpa_supplicant-mesh-next.conf";
const MESH_CONF: &str = "etc/sidenet/wpa_supplicant-mesh.conf";

struct Fleet {
    c: Cluster,
    roots: Vec<PathBuf>,
    ids: Vec<String>,
    _agents: Vec<Proc>,
}

impl Fleet {
    fn root(&self, i: usize) -> &PathBuf {
        &self.roots[i]
    }

    fn index(&self, id: &str) -> usize {
        self.ids.iter().position(|n| n == id).unwrap()
    }

    fn mesh_status(&self) -> Value {
        self.c
            .mesh()
            .map(|m| m["status"].clone())
            .unwrap_or_default()
    }

    /// The rollout record of the Mesh status.
    fn record(&self) -> Option<Record> {
        let st = self.mesh_status();
        serde_json::from_str(st["rollout"]["state"].as_str()?).ok()
    }

    fn mesh_condition(&self, t: &str) -> Option<(String, String, String)> {
        self.mesh_status()["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == t)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or("").to_string(),
                    c["reason"].as_str().unwrap_or("").to_string(),
                    c["message"].as_str().unwrap_or("").to_string(),
                )
            })
    }

    /// Node id → (desiredRevision, appliedRevision) of every MeshNode.
    fn revisions(&self) -> BTreeMap<String, (Option<u64>, Option<u64>)> {
        self.c
            .api
            .list(NODES)
            .iter()
            .map(|n| {
                (
                    n["spec"]["nodeId"].as_str().unwrap_or("").to_string(),
                    (
                        n["status"]["desiredRevision"].as_u64(),
                        n["status"]["appliedRevision"].as_u64(),
                    ),
                )
            })
            .collect()
    }

    /// The revision the agent runs (its own record).
    fn applied_rev(&self, i: usize) -> Option<u64> {
        let text = std::fs::read(self.root(i).join("etc/sidenet-agent/current.json")).ok()?;
        let v: Value = serde_json::from_slice(&text).ok()?;
        v["revision"]["rev"].as_u64()
    }

    /// The config files the agent wrote (not its own state), by path.
    fn files(&self, i: usize) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let root = self.root(i);
        let mut stack = vec![root.join("etc")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                if rel.starts_with("etc/sidenet-agent") || rel.starts_with(NEXT_FILE) {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(b) = std::fs::read(&p) {
                    out.insert(rel, b);
                }
            }
        }
        out
    }

    fn runs(&self, i: usize, frequency: &str) -> bool {
        std::fs::read_to_string(self.root(i).join(MESH_CONF))
            .is_ok_and(|t| t.contains(&format!("frequency={frequency}\n")))
    }

    /// Every node runs its desired revision, unchanged for 5 s: the desired revisions.
    async fn settle(&self) -> BTreeMap<String, u64> {
        let mut stable: Option<(BTreeMap<String, u64>, Instant)> = None;
        eventually_within(
            "every node to run its desired revision for 5 s",
            LONG,
            || {
                let revs = self.revisions();
                let ready = revs.len() == AGENTS
                    && (0..AGENTS).all(|i| {
                        let desired = revs.get(&self.ids[i]).and_then(|r| r.0);
                        desired.is_some() && self.applied_rev(i) == desired
                    });
                let now: BTreeMap<String, u64> = revs
                    .iter()
                    .map(|(id, r)| (id.clone(), r.0.unwrap_or(0)))
                    .collect();
                match (ready, &stable) {
                    (true, Some((s, since))) if *s == now => {
                        (since.elapsed() >= Duration::from_secs(5)).then(|| now.clone())
                    }
                    (true, _) => {
                        stable = Some((now, Instant::now()));
                        None
                    }
                    (false, _) => {
                        stable = None;
                        None
                    }
                }
            },
            || self.c.dump(),
        )
        .await
    }

    async fn patch_mesh(&self, patch: Value) {
        Api::<Mesh>::namespaced(self.c.client.clone(), "default")
            .patch("riverside", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    async fn annotate(&self, value: &str) {
        self.patch_mesh(json!({"metadata": {"annotations": {"sidenet.io/rollout": value}}}))
            .await;
    }

    fn annotated(&self) -> bool {
        self.c
            .mesh()
            .is_some_and(|m| !m["metadata"]["annotations"]["sidenet.io/rollout"].is_null())
    }

    fn events(&self, reason: &str) -> Vec<String> {
        self.c
            .events()
            .into_iter()
            .filter(|(obj, r, _)| obj == "riverside" && r == reason)
            .map(|(_, _, note)| note)
            .collect()
    }

    fn context(&self) -> String {
        format!(
            "mesh status: {:#}\nevents: {:?}",
            self.mesh_status(),
            self.c.events()
        )
    }
}

/// Records when the test first sees each agent run `frequency`.
fn observe(fleet: &Fleet, frequency: &str, t0: Instant, at: &mut BTreeMap<usize, Duration>) {
    for i in 0..AGENTS {
        if !at.contains_key(&i) && fleet.runs(i, frequency) {
            at.insert(i, t0.elapsed());
        }
    }
}

fn with_rollout(v: &mut Value) {
    if v["kind"] == "Mesh" {
        v["spec"]["rollout"] = json!({
            "canary": {"count": 2},
            "waves": [25, 50, 100],
            "bakeSeconds": 2,
            "failureBudget": 0,
            "progressDeadlineSeconds": 60,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_halt_pause_resume_survive_a_restart_and_abort() {
    let t_all = Instant::now();
    let c = Cluster::new();
    c.riverside(false, with_rollout).await;
    c.create(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "riverside-next", "namespace": "default"},
        "stringData": {"passphrase": "the next passphrase of riverside"},
    }))
    .await;
    let mut ctl_a = controller_process(&c, "ctl-a").await;
    let key = eventually(
        "the Mesh public key",
        || c.mesh_key(),
        || format!("{}\n--- ctl-a\n{}", c.dump(), ctl_a.log_text()),
    )
    .await;
    let join = sidenet_wire::join::JoinCode::new("riverside", &key).to_string();
    let mut roots = Vec::new();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let name = format!("n{i:02}");
        let root = c.dir.path().join(&name);
        // A folder where the rotation's extra file would go: that config cannot apply.
        std::fs::create_dir_all(root.join(NEXT_FILE).join("blocker")).unwrap();
        std::fs::write(root.join(NEXT_FILE).join("blocker/x"), "x").unwrap();
        agents.push(Proc::spawn(
            &name,
            Command::new(bin("sidenet-agent")).args([
                "--mesh",
                "riverside",
                "--broker",
                &format!("mqtt://127.0.0.1:{}", c.port),
                "--root",
                &root.display().to_string(),
                "--profile",
                LINUX,
                "--hostname",
                &name,
                "--status-interval",
                "2",
                "--join",
                &join,
            ]),
            &c.dir.path().join(format!("{name}.log")),
        ));
        roots.push(root);
    }
    let mut ids = Vec::new();
    for root in &roots {
        ids.push(
            eventually_within(
                "the agent's node key",
                LONG,
                || {
                    let t =
                        std::fs::read_to_string(root.join("etc/sidenet-agent/node.key")).ok()?;
                    Some(KeyPair::from_file_text(&t).ok()?.public().node_id())
                },
                String::new,
            )
            .await,
        );
    }
    let mut fleet = Fleet {
        c,
        roots,
        ids,
        _agents: agents,
    };
    let before = fleet.settle().await;
    println!(
        "{AGENTS} agents enrolled and running at {:.1} s",
        t_all.elapsed().as_secs_f64()
    );
    assert!(
        fleet.mesh_condition("RolloutProgressing").is_none(),
        "no rollout yet: {}",
        fleet.context()
    );
    let files_before: Vec<_> = (0..AGENTS).map(|i| fleet.files(i)).collect();

    // 1. A change that fails on the nodes: halted at the canary.
    let t0 = Instant::now();
    fleet
        .patch_mesh(json!({"spec": {"encryption": {"rotation": {
            "nextPassphraseSecretRef": {"name": "riverside-next", "key": "passphrase"},
            "switchAt": "2036-01-01T00:00:00Z",
        }}}}))
        .await;
    let (_, _, halted_msg) = eventually_within(
        "RolloutHalted True",
        LONG,
        || {
            fleet
                .mesh_condition("RolloutHalted")
                .filter(|(s, r, _)| s == "True" && r == "FailureBudgetExceeded")
        },
        || fleet.context(),
    )
    .await;
    println!(
        "halted {:.1} s after the change: {halted_msg}",
        t0.elapsed().as_secs_f64()
    );
    let rec = fleet.record().unwrap();
    let progress = rec.progress.clone().unwrap();
    let canary: BTreeSet<String> = fleet
        .ids
        .iter()
        .filter(|n| rec.wave_of(n) == 0)
        .cloned()
        .collect();
    assert_eq!(canary.len(), 2, "{}", fleet.context());
    assert_eq!(progress.wave, 0);
    assert!(!progress.failed.is_empty());
    let st = fleet.mesh_status();
    assert_eq!(st["rollout"]["phase"], json!("Halted"), "{st:#}");
    for n in progress.failed.keys() {
        assert!(canary.contains(n), "{n} failed but is not a canary");
        assert!(halted_msg.contains(n.as_str()), "{halted_msg}");
    }
    let (s, r, _) = fleet.mesh_condition("RolloutProgressing").unwrap();
    assert_eq!((s.as_str(), r.as_str()), ("False", "Halted"));
    let ev = eventually_within(
        "the RolloutHalted Event",
        LONG,
        || fleet.events("RolloutHalted").pop(),
        || fleet.context(),
    )
    .await;
    assert!(
        progress.failed.keys().any(|n| ev.contains(n.as_str())),
        "{ev}"
    );
    // The canary runs its last good content again, as a new revision.
    eventually_within(
        "the canary to run its last good content again",
        LONG,
        || {
            let revs = fleet.revisions();
            canary
                .iter()
                .all(|n| {
                    let i = fleet.index(n);
                    let desired = revs.get(n).and_then(|r| r.0);
                    desired > before.get(n).map(|b| b + 1)
                        && fleet.applied_rev(i) == desired
                        && fleet.files(i) == files_before[i]
                })
                .then_some(())
        },
        || fleet.context(),
    )
    .await;
    // Three status rounds later, nobody else got anything.
    let hold = Instant::now();
    eventually_within(
        "6 s with the rollout halted",
        LONG,
        || (hold.elapsed() > Duration::from_secs(6)).then_some(()),
        String::new,
    )
    .await;
    let revs = fleet.revisions();
    for (i, n) in fleet.ids.iter().enumerate() {
        if canary.contains(n) {
            continue;
        }
        assert_eq!(revs[n].0, before.get(n).copied(), "{n} got a new revision");
        assert_eq!(fleet.applied_rev(i), before.get(n).copied());
        assert!(fleet.files(i) == files_before[i], "{n} changed");
    }
    assert_eq!(fleet.mesh_status()["rollout"]["phase"], json!("Halted"));
    println!(
        "canary {canary:?} back on its last good content; {} other nodes untouched",
        AGENTS - canary.len()
    );

    // 2. A good change (channel 44, the rotation dropped): paused at the canary by annotation,
    // resumed, wave by wave to the end.
    let halted_id = progress.id.clone();
    let t0 = Instant::now();
    let mut applied_at: BTreeMap<usize, Duration> = BTreeMap::new();
    fleet
        .patch_mesh(json!({"spec": {
            "encryption": {"rotation": null},
            "radio": {"channels": {"5g": {"channel": 44}}},
        }}))
        .await;
    let rec = eventually_within(
        "the new rollout to start",
        LONG,
        || {
            observe(&fleet, "5220", t0, &mut applied_at);
            fleet
                .record()
                .filter(|r| r.progress.as_ref().is_some_and(|p| p.id != halted_id))
        },
        || fleet.context(),
    )
    .await;
    fleet.annotate("pause").await;
    eventually_within(
        "RolloutProgressing False/Paused and the annotation removed",
        LONG,
        || {
            observe(&fleet, "5220", t0, &mut applied_at);
            (fleet
                .mesh_condition("RolloutProgressing")
                .is_some_and(|(s, r, _)| s == "False" && r == "Paused")
                && !fleet.annotated())
            .then_some(())
        },
        || fleet.context(),
    )
    .await;
    eventually_within(
        "the RolloutAnnotation Event",
        LONG,
        || fleet.events("RolloutAnnotation").pop(),
        || fleet.context(),
    )
    .await;
    // Paused at wave W (the canary, unless a wave went by before the annotation was seen):
    // the nodes of waves 0..=W get the change, and no later wave starts.
    let paused_wave = fleet.record().unwrap().progress.unwrap().wave;
    let waves_of = |rec: &Record, fleet: &Fleet| -> Vec<usize> {
        fleet.ids.iter().map(|n| rec.wave_of(n)).collect()
    };
    let wave = waves_of(&rec, &fleet);
    assert_eq!((0..AGENTS).filter(|i| wave[*i] == 0).count(), 2);
    let reached: Vec<usize> = (0..AGENTS).filter(|i| wave[*i] <= paused_wave).collect();
    eventually_within(
        "the handed-out waves to run channel 44",
        LONG,
        || {
            observe(&fleet, "5220", t0, &mut applied_at);
            reached.iter().all(|i| fleet.runs(*i, "5220")).then_some(())
        },
        || fleet.context(),
    )
    .await;
    let paused_at = Instant::now();
    eventually_within(
        "5 s paused (more than twice the bake time)",
        LONG,
        || {
            observe(&fleet, "5220", t0, &mut applied_at);
            (paused_at.elapsed() > Duration::from_secs(5)).then_some(())
        },
        String::new,
    )
    .await;
    let p = fleet.record().unwrap().progress.unwrap();
    assert_eq!(
        (format!("{:?}", p.phase).as_str(), p.wave),
        ("Paused", paused_wave),
        "{}",
        fleet.context()
    );
    assert_eq!(
        (0..AGENTS).filter(|i| fleet.runs(*i, "5220")).count(),
        reached.len(),
        "only waves 0..={paused_wave} run the change while paused"
    );
    println!(
        "paused at wave {paused_wave}: {} nodes run the change, the others wait",
        reached.len()
    );
    fleet.annotate("resume").await;
    let (_, _, done_msg) = eventually_within(
        "RolloutProgressing False/Complete and every node on channel 44",
        LONG,
        || {
            observe(&fleet, "5220", t0, &mut applied_at);
            fleet
                .mesh_condition("RolloutProgressing")
                .filter(|(s, r, _)| s == "False" && r == "Complete")
                .filter(|_| applied_at.len() == AGENTS)
        },
        || fleet.context(),
    )
    .await;
    assert!(!fleet.annotated());
    let (s, r, _) = fleet.mesh_condition("RolloutHalted").unwrap();
    assert_eq!((s.as_str(), r.as_str()), ("False", "Complete"));
    println!("{done_msg}");
    let nwaves = wave.iter().max().unwrap() + 1;
    for w in 1..nwaves {
        let prev_last = (0..AGENTS)
            .filter(|i| wave[*i] == w - 1)
            .map(|i| applied_at[&i])
            .max()
            .unwrap();
        if let Some(first) = (0..AGENTS)
            .filter(|i| wave[*i] == w)
            .map(|i| applied_at[&i])
            .min()
        {
            assert!(
                first > prev_last,
                "wave {w} ran the change at {first:?}, before wave {} was done at {prev_last:?}",
                w - 1
            );
        }
    }
    println!("per-wave timings (seconds from the change, as the test saw the agents apply it):");
    for w in 0..nwaves {
        let times: Vec<f64> = (0..AGENTS)
            .filter(|i| wave[*i] == w)
            .map(|i| applied_at[&i].as_secs_f64())
            .collect();
        println!(
            "  wave {w}: {} nodes, first applied at {:.1} s, last at {:.1} s",
            times.len(),
            times.iter().cloned().fold(f64::MAX, f64::min),
            times.iter().cloned().fold(0.0, f64::max)
        );
    }
    // The Event follows the status write.
    eventually_within(
        "the RolloutComplete Event",
        LONG,
        || fleet.events("RolloutComplete").pop(),
        || fleet.context(),
    )
    .await;
    fleet.settle().await;

    // 3. Another change (channel 48, a long bake): the canary gets it; the controller restarts
    // (a new cache: the record comes back from the Mesh status); an abort on the new one sends
    // the canary back to channel 44.
    let done_id = fleet.record().unwrap().progress.unwrap().id;
    fleet
        .patch_mesh(json!({"spec": {
            "radio": {"channels": {"5g": {"channel": 48}}},
            "rollout": {"bakeSeconds": 600},
        }}))
        .await;
    let rec = eventually_within(
        "the third rollout to start",
        LONG,
        || {
            fleet
                .record()
                .filter(|r| r.progress.as_ref().is_some_and(|p| p.id != done_id))
        },
        || fleet.context(),
    )
    .await;
    let wave = waves_of(&rec, &fleet);
    let canary: Vec<usize> = (0..AGENTS).filter(|i| wave[*i] == 0).collect();
    eventually_within(
        "the canary to run channel 48",
        LONG,
        || canary.iter().all(|i| fleet.runs(*i, "5240")).then_some(()),
        || fleet.context(),
    )
    .await;
    let before_restart = fleet.record().unwrap().progress.unwrap();
    // A crash: kill -9 of the controller process, nothing is released or flushed.
    assert!(
        ctl_a.alive(),
        "ctl-a died before the crash:\n{}",
        ctl_a.log_text()
    );
    ctl_a.kill();
    let ctl = fleet.c.start(fleet.c.opts("ctl-b"));
    // The new controller knows the rollout: it acts on the abort (without the record it would
    // take the current spec as the last good one and refuse).
    fleet.annotate("abort").await;
    eventually_within(
        "RolloutHalted True/Aborted",
        LONG,
        || {
            fleet
                .mesh_condition("RolloutHalted")
                .filter(|(s, r, _)| s == "True" && r == "Aborted")
                .filter(|_| !fleet.annotated())
        },
        || fleet.context(),
    )
    .await;
    let p = fleet.record().unwrap().progress.unwrap();
    assert_eq!(p.id, before_restart.id);
    assert_eq!(p.wave, 0);
    assert_eq!(p.started, before_restart.started);
    eventually_within(
        "every node on channel 44, running its desired revision",
        LONG,
        || {
            let revs = fleet.revisions();
            (0..AGENTS)
                .all(|i| {
                    fleet.runs(i, "5220")
                        && fleet.applied_rev(i) == revs.get(&fleet.ids[i]).and_then(|r| r.0)
                })
                .then_some(())
        },
        || fleet.context(),
    )
    .await;
    // The Event follows the status write.
    eventually_within(
        "the RolloutAborted Event",
        LONG,
        || fleet.events("RolloutAborted").pop(),
        || fleet.context(),
    )
    .await;
    // Event notes stay within the API's limit.
    for (_, _, note) in fleet.c.events() {
        assert!(note.len() <= 1024, "{note}");
    }
    assert_rbac(&fleet.c);
    ctl.stop().await;
    fleet._agents.clear();
    println!("whole test: {:.1} s", t_all.elapsed().as_secs_f64());
}
