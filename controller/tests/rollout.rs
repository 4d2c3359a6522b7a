//! Staged, health-gated rollouts (`Mesh.spec.rollout`, docs/rollouts.md) with 30 real agent
//! processes on a standalone controller with its embedded broker:
//!
//! - a Mesh change whose config fails on the nodes reaches the canary only; the rollout halts,
//!   `sidenetctl rollout status` names the failing nodes, and the canary gets its last good
//!   content back as a new revision;
//! - a good change reaches every node wave by wave (per-wave timings printed), survives a
//!   `kill -9` of the controller mid-rollout (it resumes the same wave), and a node that comes
//!   back online mid-rollout gets the change with its wave.
//!
//! The failing config: a passphrase rotation adds the file
//! `etc/sidenet/wpa_supplicant-mesh-next.conf`, and every agent's root has a folder at that path,
//! so the agent cannot apply it and reports the revision as failed (the way a change that does
//! not suit the nodes' hardware fails on real routers).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Proc, bin, free_port, repo, wait_for};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::reconcile::model::StatusRow;
use sidenet_controller::reconcile::rollout::{Phase, Status};
use sidenet_wire::keys::KeyPair;

const AGENTS: usize = 30;
const WAIT: Duration = Duration::from_secs(180);
const LINUX: &str = "raspberrypi-4b-awus036acm";
const NEXT_FILE: &str = "etc/sidenet/wpa_supplicant-mesh-next.conf";
const MESH_CONF: &str = "etc/sidenet/wpa_supplicant-mesh.conf";

/// One fleet at a time: 30 agents each are enough for two cores.
static FLEET: Mutex<()> = Mutex::new(());

fn mesh_text(extra_rollout: &str) -> String {
    let base = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap();
    format!(
        "{base}  rollout:\n    canary:\n      count: 2\n    waves: [25, 50, 100]\n    bakeSeconds: 2\n    failureBudget: 0\n    progressDeadlineSeconds: 120\n{extra_rollout}"
    )
}

fn channel44(t: &str) -> String {
    t.replace("        channel: 36\n", "        channel: 44\n")
}

fn rotation(t: &str) -> String {
    t.replace(
        "      key: passphrase\n",
        "      key: passphrase\n    rotation:\n      nextPassphraseSecretRef:\n        name: riverside-next\n        key: passphrase\n      switchAt: \"2036-01-01T00:00:00Z\"\n",
    )
}

struct Fleet {
    _dir: tempfile::TempDir,
    base: PathBuf,
    manifests: PathBuf,
    state: PathBuf,
    port: u16,
    ctl: Option<Proc>,
    agents: Vec<Option<Proc>>,
    roots: Vec<PathBuf>,
    ids: Vec<String>,
    n: usize,
}

impl Fleet {
    fn new(mesh: &str) -> Fleet {
        Fleet::with(mesh, AGENTS)
    }

    fn with(mesh: &str, n: usize) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let manifests = base.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        std::fs::write(manifests.join("mesh.yaml"), mesh).unwrap();
        let mut f = Fleet {
            _dir: dir,
            state: base.join("state"),
            manifests,
            base,
            port: free_port(),
            ctl: None,
            agents: Vec::new(),
            roots: Vec::new(),
            ids: Vec::new(),
            n,
        };
        f.start_controller();
        for i in 0..n {
            let root = f.base.join(format!("n{i:02}"));
            // A folder where the rotation's extra file would go: that config cannot apply.
            std::fs::create_dir_all(root.join(NEXT_FILE).join("blocker")).unwrap();
            std::fs::write(root.join(NEXT_FILE).join("blocker/x"), "x").unwrap();
            f.roots.push(root);
            f.agents.push(None);
            f.start_agent(i);
        }
        f.ids = (0..n)
            .map(|i| {
                wait_for(
                    "the agent's node key",
                    WAIT,
                    || {
                        let t =
                            std::fs::read_to_string(f.roots[i].join("etc/sidenet-agent/node.key"))
                                .ok()?;
                        Some(KeyPair::from_file_text(&t).ok()?.public().node_id())
                    },
                    || f.logs(),
                )
            })
            .collect();
        f
    }

    fn start_controller(&mut self) {
        let mut cmd = Command::new(bin("sidenet-controller"));
        cmd.arg("standalone")
            .arg("--manifests")
            .arg(&self.manifests)
            .arg("--profiles")
            .arg(repo().join("hardware-profiles"))
            .arg("--templates")
            .arg(repo().join("templates"))
            .arg("--state")
            .arg(&self.state)
            .arg("--poll-ms")
            .arg("100")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port));
        let n = std::fs::read_dir(&self.base).map_or(0, |d| d.count());
        self.ctl = Some(Proc::spawn(
            "controller",
            &mut cmd,
            &self.base.join(format!("controller-{n}.log")),
        ));
        wait_for(
            "the admin socket",
            WAIT,
            || admin::call(&self.state, &Request::Status).ok(),
            || self.logs(),
        );
    }

    fn start_agent(&mut self, i: usize) {
        let name = format!("n{i:02}");
        let p = Proc::spawn(
            &name,
            Command::new(bin("sidenet-agent")).args([
                "--mesh",
                "riverside",
                "--broker",
                &format!("mqtt://127.0.0.1:{}", self.port),
                "--root",
                &self.roots[i].display().to_string(),
                "--profile",
                LINUX,
                "--hostname",
                &name,
                "--status-interval",
                "2",
                "--join",
                &common::join_code(&self.state),
            ]),
            &self.base.join(format!("{name}-{}.log", now_ms())),
        );
        self.agents[i] = Some(p);
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(c) = &self.ctl {
            let t = c.log_text();
            let tail: Vec<&str> = t.lines().rev().take(80).collect();
            s.push_str("--- controller (last lines)\n");
            for l in tail.iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        if let Some(r) = self.rollouts() {
            for r in r {
                s.push_str(&r.to_text());
            }
        }
        s
    }

    fn status(&self) -> Option<Vec<StatusRow>> {
        match admin::call(&self.state, &Request::Status).ok()? {
            Response::Status { nodes, .. } => Some(nodes),
            _ => None,
        }
    }

    fn rollouts(&self) -> Option<Vec<Status>> {
        let req = Request::Rollout {
            action: "status".into(),
            mesh: None,
        };
        match admin::call(&self.state, &req).ok()? {
            Response::Rollouts { rollouts } => Some(rollouts),
            _ => None,
        }
    }

    fn rollout(&self) -> Option<Status> {
        self.rollouts()?.into_iter().find(|r| r.mesh == "riverside")
    }

    fn set_mesh(&self, text: &str) {
        let tmp = self.base.join("mesh.yaml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.manifests.join("mesh.yaml")).unwrap();
    }

    /// Waits until every node runs its desired revision, nothing changed for 5 s (more than
    /// two status intervals): the revision each node runs.
    fn settle(&self) -> BTreeMap<String, u64> {
        let mut stable: Option<(BTreeMap<String, u64>, Instant)> = None;
        wait_for(
            "the mesh to settle",
            WAIT,
            || {
                let rows = self.status()?;
                let ready = rows.len() == self.n
                    && rows.iter().all(|n| {
                        n.online == Some(true) && n.applied.is_some() && n.applied == n.desired
                    });
                let now: BTreeMap<String, u64> = rows
                    .iter()
                    .map(|n| (n.node.clone(), n.desired.map_or(0, |r| r.rev)))
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
            || self.logs(),
        )
    }

    fn index(&self, id: &str) -> usize {
        self.ids.iter().position(|n| n == id).unwrap()
    }

    /// The revision the agent runs (its own record).
    fn applied_rev(&self, i: usize) -> Option<u64> {
        let text = std::fs::read(self.roots[i].join("etc/sidenet-agent/current.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        v["revision"]["rev"].as_u64()
    }

    /// The config files the agent wrote (not its own state), by path.
    fn files(&self, i: usize) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let root = &self.roots[i];
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
                } else {
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    fn has_channel44(&self, i: usize) -> bool {
        std::fs::read_to_string(self.roots[i].join(MESH_CONF))
            .is_ok_and(|t| t.contains("frequency=5220"))
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// A change that fails on the nodes reaches the canary only, halts the rollout (status names
/// the failing nodes), and the canary runs its last good content again, as a new revision.
#[test]
fn a_failing_change_stops_at_the_canary_which_gets_its_last_good_content_back() {
    let _one = FLEET.lock().unwrap_or_else(|e| e.into_inner());
    let good = mesh_text("");
    let fleet = Fleet::new(&good);
    let before = fleet.settle();
    let files_before: Vec<_> = (0..AGENTS).map(|i| fleet.files(i)).collect();
    let t0 = Instant::now();
    fleet.set_mesh(&rotation(&good));
    let halted = wait_for(
        "the rollout to halt",
        WAIT,
        || fleet.rollout().filter(|r| r.phase == Phase::Halted),
        || fleet.logs(),
    );
    println!(
        "halted {:.1} s after the change:\n{}",
        t0.elapsed().as_secs_f64(),
        halted.to_text()
    );
    let canary: BTreeSet<String> = halted.waves[0].nodes.iter().cloned().collect();
    assert_eq!(canary.len(), 2, "{}", halted.to_text());
    assert_eq!(halted.wave, 0, "{}", halted.to_text());
    assert!(!halted.failed.is_empty());
    for (n, why) in &halted.failed {
        assert!(canary.contains(n), "{n} failed but is not a canary");
        assert!(why.contains("revision"), "{why}");
    }
    // The CLI names the failing nodes.
    let out = Command::new(bin("sidenetctl"))
        .args(["rollout", "status", "--state"])
        .arg(&fleet.state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Halted"), "{text}");
    for n in halted.failed.keys() {
        assert!(text.contains(&format!("failed {n}: ")), "{text}");
    }
    // The canary gets the last good content back as a new revision, and runs it.
    let rows = wait_for(
        "the canary to run its last good content again",
        WAIT,
        || {
            let rows = fleet.status()?;
            let ok = rows.iter().filter(|r| canary.contains(&r.node)).all(|r| {
                let i = fleet.index(&r.node);
                r.applied == r.desired
                    && r.desired.map(|d| d.rev) > before.get(&r.node).map(|b| b + 1)
                    && fleet.files(i) == files_before[i]
            });
            ok.then_some(rows)
        },
        || fleet.logs(),
    );
    // Nobody beyond the canary ever got it: same desired revision, same files, as before.
    // (Give the controller a few status rounds to prove it holds: the rollout stays halted.)
    let hold = Instant::now();
    wait_for(
        "three status intervals with the rollout halted",
        WAIT,
        || (hold.elapsed() > Duration::from_secs(6)).then_some(()),
        String::new,
    );
    let rows_now = fleet.status().unwrap();
    for r in rows.iter().chain(rows_now.iter()) {
        if canary.contains(&r.node) {
            continue;
        }
        let i = fleet.index(&r.node);
        assert_eq!(
            r.desired.map(|d| d.rev),
            before.get(&r.node).copied(),
            "{} got a new revision",
            r.node
        );
        assert_eq!(fleet.applied_rev(i), before.get(&r.node).copied());
        assert!(fleet.files(i) == files_before[i], "{} changed", r.node);
    }
    assert_eq!(fleet.rollout().unwrap().phase, Phase::Halted);
    println!(
        "canary {:?} back on its last good content; {} other nodes untouched",
        canary,
        AGENTS - canary.len()
    );
}

/// A good change reaches every node wave by wave; the controller is killed (SIGKILL) in wave
/// 1 and resumes wave 1; a node offline when its wave started gets the change when it is back.
#[test]
fn a_good_change_reaches_every_node_wave_by_wave_across_a_kill_9() {
    let _one = FLEET.lock().unwrap_or_else(|e| e.into_inner());
    let good = mesh_text("");
    let mut fleet = Fleet::new(&good);
    fleet.settle();
    let t0 = Instant::now();
    fleet.set_mesh(&channel44(&good));
    // Apply times, as the test sees them.
    let mut applied_at: BTreeMap<usize, Duration> = BTreeMap::new();
    let observe = |fleet: &Fleet, applied_at: &mut BTreeMap<usize, Duration>| {
        for i in 0..AGENTS {
            if !applied_at.contains_key(&i) && fleet.has_channel44(i) {
                applied_at.insert(i, t0.elapsed());
            }
        }
    };
    let started = wait_for(
        "the rollout to start",
        WAIT,
        || fleet.rollout().filter(|r| r.phase == Phase::Progressing),
        || fleet.logs(),
    );
    let waves: Vec<Vec<String>> = started.waves.iter().map(|w| w.nodes.clone()).collect();
    assert_eq!(waves.len(), 4, "{}", started.to_text());
    assert_eq!(waves[0].len(), 2);
    assert_eq!(waves.iter().map(Vec::len).sum::<usize>(), AGENTS);
    let ids = fleet.ids.clone();
    let wave_of = |i: usize| waves.iter().position(|w| w.contains(&ids[i])).unwrap();
    // A node of the first non-empty wave after the canary goes offline before its wave starts.
    // (Places are hashes of the rollout id and random node ids, so with 28 nodes a wave may
    // be empty: wave 1 is, about one run in a hundred.)
    let late_wave = (1..waves.len()).find(|w| !waves[*w].is_empty()).unwrap();
    let late = fleet.index(&waves[late_wave][0]);
    fleet.agents[late].take().unwrap().kill();
    // Wave 1 starts; the controller is killed while it runs.
    let mut before_kill = None;
    wait_for(
        "wave 1 to start",
        WAIT,
        || {
            observe(&fleet, &mut applied_at);
            let r = fleet.rollout()?;
            assert!(r.phase == Phase::Progressing, "{}", r.to_text());
            before_kill = Some(r.clone());
            (r.wave >= 1).then_some(())
        },
        || fleet.logs(),
    );
    let before_kill = before_kill.unwrap();
    fleet.ctl.take().unwrap().kill();
    println!(
        "controller killed (SIGKILL) at {:.1} s, in wave {}",
        t0.elapsed().as_secs_f64(),
        before_kill.wave
    );
    fleet.start_controller();
    let resumed = fleet.rollout().unwrap();
    assert_eq!(resumed.id, before_kill.id);
    assert_eq!(resumed.wave, before_kill.wave, "{}", resumed.to_text());
    assert_eq!(
        resumed.waves.iter().map(|w| w.started).collect::<Vec<_>>(),
        before_kill
            .waves
            .iter()
            .map(|w| w.started)
            .collect::<Vec<_>>()
    );
    // The offline node comes back.
    fleet.start_agent(late);
    let done = wait_for(
        "the rollout to complete",
        WAIT,
        || {
            observe(&fleet, &mut applied_at);
            let r = fleet.rollout()?;
            assert!(
                matches!(r.phase, Phase::Progressing | Phase::Complete),
                "{}",
                r.to_text()
            );
            (r.phase == Phase::Complete && applied_at.len() == AGENTS).then_some(r)
        },
        || fleet.logs(),
    );
    // Wave by wave: no node of a later wave ran the change before every online node of the
    // earlier ones did (the late node joined its wave when it came back; an empty wave is
    // skipped over, so each wave is compared with every wave before it).
    for w in 1..waves.len() {
        let prev_last = (0..AGENTS)
            .filter(|i| wave_of(*i) < w && *i != late)
            .map(|i| applied_at[&i])
            .max()
            .unwrap();
        let first = (0..AGENTS)
            .filter(|i| wave_of(*i) == w && *i != late)
            .map(|i| applied_at[&i])
            .min();
        if let Some(first) = first {
            assert!(
                first > prev_last,
                "wave {w} ran the change at {first:?}, before the waves before it were done at {prev_last:?}"
            );
        }
    }
    assert!(
        applied_at.contains_key(&late),
        "the node that came back runs the change"
    );
    println!("{}", done.to_text());
    println!("per-wave timings (seconds from the change, as the test saw the agents apply it):");
    for (w, nodes) in waves.iter().enumerate() {
        let times: Vec<f64> = (0..AGENTS)
            .filter(|i| wave_of(*i) == w)
            .map(|i| applied_at[&i].as_secs_f64())
            .collect();
        let applied = if times.is_empty() {
            "none to apply".to_string()
        } else {
            let first = times.iter().cloned().fold(f64::MAX, f64::min);
            let last = times.iter().cloned().fold(0.0, f64::max);
            format!("first applied at {first:.1} s, last at {last:.1} s")
        };
        println!(
            "  wave {w}: {} nodes, {applied}; controller: started {:?}, took {:?} s",
            nodes.len(),
            done.waves[w].started,
            done.waves[w].seconds
        );
    }
    // Everyone runs what the controller published.
    let rows = fleet.status().unwrap();
    assert!(rows.iter().all(|r| r.applied == r.desired), "{rows:?}");
}

fn sidenetctl_rollout(fleet: &Fleet, action: &str) -> (bool, String) {
    let out = Command::new(bin("sidenetctl"))
        .args(["rollout", action, "--mesh", "riverside", "--state"])
        .arg(&fleet.state)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `sidenetctl rollout pause` holds a healthy, baked wave; `resume` lets the next one start;
/// `abort` stops the rollout and the reached nodes run the last good content again.
#[test]
fn pause_resume_and_abort_from_the_cli() {
    let _one = FLEET.lock().unwrap_or_else(|e| e.into_inner());
    let good = mesh_text("").replace("count: 2", "count: 1");
    let fleet = Fleet::with(&good, 6);
    fleet.settle();
    fleet.set_mesh(&channel44(&good));
    wait_for(
        "the rollout to start",
        WAIT,
        || {
            fleet
                .rollout()
                .filter(|r| r.phase == Phase::Progressing && r.wave == 0)
        },
        || fleet.logs(),
    );
    let (ok, out) = sidenetctl_rollout(&fleet, "pause");
    assert!(ok && out.contains("Paused"), "{out}");
    // Paused with a healthy canary: it bakes, but wave 1 does not start.
    let canary = fleet.rollout().unwrap().waves[0].nodes.clone();
    let ci = fleet.index(&canary[0]);
    wait_for(
        "the canary to run the change",
        WAIT,
        || fleet.has_channel44(ci).then_some(()),
        || fleet.logs(),
    );
    let paused_at = Instant::now();
    wait_for(
        "the bake time to pass twice while paused",
        WAIT,
        || {
            let r = fleet.rollout()?;
            assert_eq!((r.phase, r.wave), (Phase::Paused, 0), "{}", r.to_text());
            (paused_at.elapsed() > Duration::from_secs(5) && r.bake_remaining == Some(0))
                .then_some(())
        },
        || fleet.logs(),
    );
    assert_eq!(
        (0..fleet.n).filter(|i| fleet.has_channel44(*i)).count(),
        1,
        "only the canary runs the change while paused"
    );
    let (ok, out) = sidenetctl_rollout(&fleet, "resume");
    assert!(ok, "{out}");
    wait_for(
        "wave 1 to start after resume",
        WAIT,
        || fleet.rollout().filter(|r| r.wave >= 1),
        || fleet.logs(),
    );
    let (ok, out) = sidenetctl_rollout(&fleet, "abort");
    if !ok {
        // The whole rollout may have completed in between (6 nodes, 2 s bake): then abort is
        // refused, naming the phase.
        assert!(out.contains("Complete"), "{out}");
        println!("completed before the abort: {out}");
        return;
    }
    assert!(out.contains("Aborted"), "{out}");
    println!("aborted:\n{out}");
    wait_for(
        "every node back on channel 36",
        WAIT,
        || {
            let rows = fleet.status()?;
            ((0..fleet.n).all(|i| !fleet.has_channel44(i))
                && rows.iter().all(|r| r.applied == r.desired))
            .then_some(())
        },
        || fleet.logs(),
    );
    let (ok, out) = sidenetctl_rollout(&fleet, "resume");
    assert!(!ok && out.contains("Aborted"), "{out}");
}
