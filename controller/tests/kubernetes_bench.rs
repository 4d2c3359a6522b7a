//! Figures of Kubernetes mode against the in-memory API server (`kubefake`) and a real MQTT
//! broker: how long N declared MeshNodes take to get their first status, how many API calls
//! that costs per node, how many status writes an idle minute costs, what one spec change
//! costs, and an enrolment storm of N nodes (docs/benchmarks.md).
//!
//! Ignored by default (they print figures, they assert only that the work got done):
//!
//! ```text
//! SIDENET_BENCH_NODES=1000 cargo test -p sidenet-controller --test kubernetes_bench -- --ignored --nocapture --test-threads=1
//! ```
//!
//! `SIDENET_BENCH_LOG=FILE` keeps the controller's log; `SIDENET_BENCH_WRAP="heaptrack -o FILE"`
//! runs the controller under that command (its RSS is then the wrapper's).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use rumqttc::QoS;
use serde_json::json;
use sidenet_crds::MeshNode;
use sidenet_wire::keys::KeyPair;

use kubecluster::*;

fn nodes_wanted() -> usize {
    std::env::var("SIDENET_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn agent(i: usize) -> Agent {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Agent {
        key: KeyPair::from_seed(&seed),
        seq: 0,
    }
}

/// The controller's API calls so far (the test's own are tagged), by `METHOD resource`.
fn controller_calls(c: &Cluster) -> Vec<String> {
    c.api
        .requests()
        .into_iter()
        .filter(|r| !r.ends_with(" test-client"))
        .collect()
}

fn summary(calls: &[String]) -> BTreeMap<String, usize> {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for r in calls {
        let mut parts = r.split(' ');
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
        let segs: Vec<&str> = path.split('/').collect();
        // .../namespaces/NS/PLURAL[/NAME[/SUB]] or .../PLURAL[/NAME[/SUB]]
        let tail: Vec<&str> = match segs.iter().position(|s| *s == "namespaces") {
            Some(i) => segs[i + 2..].to_vec(),
            None => segs.iter().skip(3).copied().collect(),
        };
        let what = match tail.as_slice() {
            [plural] => plural.to_string(),
            [plural, _] => format!("{plural}/NAME"),
            [plural, _, sub, ..] => format!("{plural}/NAME/{sub}"),
            _ => path.to_string(),
        };
        *by.entry(format!("{method} {what}")).or_default() += 1;
    }
    by
}

fn rss_kib() -> (u64, u64) {
    status_kib("/proc/self/status")
}

/// `text` without its terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// VmRSS and VmHWM of process `pid`, in KiB.
fn rss_of(pid: u32) -> (u64, u64) {
    status_kib(&format!("/proc/{pid}/status"))
}

fn status_kib(path: &str) -> (u64, u64) {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Polls `done` every 200 ms until it holds, for at most `limit`.
async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t0.elapsed()
}

fn with_status(c: &Cluster, field: &str) -> usize {
    c.api
        .list(NODES)
        .iter()
        .filter(|n| !n["status"][field].is_null())
        .count()
}

/// The configs the agents received so far: each message is verified once, as an agent does.
#[derive(Default)]
struct Configs {
    /// Messages of the observer already read.
    cursor: usize,
    /// Node id → revision of the last config it received.
    rev: std::collections::HashMap<String, u64>,
    /// Configs received (every revision of every node).
    received: usize,
}

impl Configs {
    fn update(&mut self, obs: &Observer, key: &sidenet_wire::PublicKey) {
        let new: Vec<(String, Vec<u8>)> = {
            let seen = obs.seen.lock().unwrap();
            let new = seen[self.cursor..].to_vec();
            self.cursor = seen.len();
            new
        };
        for (t, p) in new {
            if !t.ends_with("/config") {
                continue;
            }
            let Some(id) = t.split('/').nth(4) else {
                continue;
            };
            if p.is_empty() {
                self.rev.remove(id);
                continue;
            }
            let Ok(env) = sidenet_wire::Envelope::parse(&p, 1 << 20) else {
                continue;
            };
            if let Ok(v) = env.verify(sidenet_wire::Kind::Config, key) {
                self.rev.insert(id.to_string(), v.header.rev);
                self.received += 1;
            }
        }
    }
}

/// N declared MeshNodes (not enrolled): time to the first status of every node, API calls per
/// node, status writes while idle, and the cost of one spec change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_declared_meshnodes() {
    let n = nodes_wanted();
    let c = Cluster::new();
    c.riverside(false, |_| {}).await;
    for i in 0..n {
        let a = agent(i);
        c.create(json!({
            "apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": format!("node-{i}")},
            "spec": {"mesh": "riverside", "nodeId": a.id(),
                     "publicKey": a.key.public().to_base64(),
                     "hardwareProfile": "tplink-archer-c7-v2", "approved": true}
        }))
        .await;
    }
    let limit = Duration::from_secs(600);
    let t0 = Instant::now();
    let ctl = c.start(c.opts("ctl-a"));
    until("every MeshNode has a status", limit, || {
        with_status(&c, "phase") == n
    })
    .await;
    let first = t0.elapsed();
    let calls = controller_calls(&c);
    let by = summary(&calls);

    // Idle: nothing changes for 10 s.
    let mark = calls.len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = controller_calls(&c)[mark..].to_vec();
    let idle_status = idle.iter().filter(|r| r.contains("/status")).count();

    // One spec change.
    let mark = controller_calls(&c).len();
    let api: Api<MeshNode> = Api::namespaced(c.client.clone(), "default");
    let t1 = Instant::now();
    api.patch(
        "node-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"overrides": {"hostname": "node-zero"}}})),
    )
    .await
    .unwrap();
    let generation = c.node("node-0").unwrap()["metadata"]["generation"].clone();
    until("node-0 observed its new generation", limit, || {
        c.node("node-0").unwrap()["status"]["observedGeneration"] == generation
    })
    .await;
    let change = t1.elapsed();
    let change_calls = controller_calls(&c)[mark..].len();
    let (rss, hwm) = rss_kib();
    println!("== Kubernetes mode, {n} declared MeshNodes (debug build unless --release)");
    println!(
        "first status of every node: {:.2} s; controller API calls: {} ({:.2} per node)",
        first.as_secs_f64(),
        calls.len(),
        calls.len() as f64 / n as f64
    );
    for (k, v) in &by {
        println!("  {k}: {v}");
    }
    println!(
        "idle 10 s: {} API calls, {idle_status} status writes",
        idle.len()
    );
    println!(
        "one spec change: {:.0} ms until its status shows it, {change_calls} API calls",
        change.as_secs_f64() * 1000.0
    );
    println!(
        "RSS of the test process (controller + in-memory API server + observer): {} MiB, peak {} MiB",
        rss / 1024,
        hwm / 1024
    );
    ctl.stop().await;
}

/// N nodes enrol at once into an auto-mode mesh: each gets a MeshNode created by the
/// controller, a status, and a config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_enrolment_storm() {
    let n = nodes_wanted();
    // The broker queues as many messages per client as the standalone benchmark's does
    // (bench/src/main.rs): Mosquitto's default of 1,000 would drop most of a storm's
    // enrolment requests on their way to the controller, and the storm's time would be that
    // of the agents' 10 s retries.
    let c = Cluster::with_broker(|dir| common::mosquitto_with(dir, "max_queued_messages 10000\n"));
    c.riverside(false, |_| {}).await;
    // The controller runs as a process of its own, as in a pod: its RSS is its own, and it
    // reaches the API server over HTTP.
    let mut ctl = controller_process(&c, "ctl-a").await;
    let (obs, mqtt) = Observer::start(c.port).await;
    eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    let mut agents: Vec<Agent> = (0..n).map(agent).collect();
    let limit = Duration::from_secs(900);
    let t0 = Instant::now();
    let mark = controller_calls(&c).len();
    // Like real agents, a node sends its request again (every 10 s here) until it has a
    // config: a broker drops QoS 1 messages beyond a client's queue. A node is done when its
    // MeshNode shows it `Enrolled` and the config it was sent is the one its status records
    // (the status is written before the config is published, so `Enrolled` alone comes a
    // moment before the node has its config).
    let key = c.mesh_key().unwrap();
    let mut configs = Configs::default();
    let enrolled_ids = |configs: &Configs| -> std::collections::BTreeSet<String> {
        c.api
            .list(NODES)
            .iter()
            .filter(|m| {
                m["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Enrolled" && c["status"] == "True")
                })
            })
            .filter_map(|m| {
                let id = m["spec"]["nodeId"].as_str()?;
                let desired = m["status"]["desiredRevision"].as_u64()?;
                (configs.rev.get(id) == Some(&desired)).then(|| id.to_string())
            })
            .collect()
    };
    let mut sent = 0usize;
    let mut published = None;
    // Listing every MeshNode of the API server is O(n) in this process: only once every node
    // has a config.
    let all_done = |configs: &Configs| configs.rev.len() == n && enrolled_ids(configs).len() == n;
    loop {
        configs.update(&obs, &key);
        let done = if configs.rev.len() == n {
            enrolled_ids(&configs)
        } else {
            Default::default()
        };
        if done.len() == n {
            break;
        }
        assert!(
            t0.elapsed() < limit,
            "timed out: {} of {n} enrolled with the config their status records",
            done.len()
        );
        // An agent stops asking once it has a config.
        let configured: std::collections::BTreeSet<String> = configs.rev.keys().cloned().collect();
        for (i, a) in agents.iter_mut().enumerate() {
            if done.contains(&a.id()) || configured.contains(&a.id()) {
                continue;
            }
            let (topic, payload) = a.enroll_message(&format!("host-{i}"), "tplink-archer-c7-v2");
            mqtt.publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            sent += 1;
        }
        published.get_or_insert(t0.elapsed());
        let again = Instant::now() + Duration::from_secs(10);
        while Instant::now() < again {
            configs.update(&obs, &key);
            if all_done(&configs) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let published = published.unwrap_or_default();
    let enrolled = t0.elapsed();
    let signed = configs.received;
    let configs = configs.rev.len();
    let calls = controller_calls(&c)[mark..].to_vec();
    let by = summary(&calls);

    // Steady state: every node reports that it runs its config, twice, 10 s apart (a real
    // agent reports every minute). The first round moves each node to Ready (a write each);
    // the second changes nothing but `lastSeen`.
    let last: BTreeMap<String, Vec<u8>> = {
        let seen = obs.seen.lock().unwrap();
        seen.iter()
            .filter(|(t, p)| t.ends_with("/config") && !p.is_empty())
            .filter_map(|(t, p)| Some((t.split('/').nth(4)?.to_string(), p.clone())))
            .collect()
    };
    let applied: Vec<Option<(sidenet_wire::Revision, String)>> = agents
        .iter()
        .map(|a| {
            let env = sidenet_wire::Envelope::parse(last.get(&a.id())?, 1 << 20).ok()?;
            let v = env.verify(sidenet_wire::Kind::Config, &key).ok()?;
            Some((v.header.revision(), v.header.sha256.clone()))
        })
        .collect();
    let status_writes = |from: usize| {
        controller_calls(&c)[from..]
            .iter()
            .filter(|r| {
                r.starts_with("PATCH ") && r.contains("/meshnodes/") && r.contains("/status")
            })
            .count()
    };
    let mut rounds = Vec::new();
    for round in 0..2 {
        let from = controller_calls(&c).len();
        for (a, got) in agents.iter_mut().zip(&applied) {
            if let Some((rev, sha)) = got {
                a.report(&mqtt, *rev, sha).await;
            }
        }
        if round == 0 {
            until("every node Ready", limit, || {
                c.api
                    .list(NODES)
                    .iter()
                    .filter(|m| m["status"]["phase"] == "Ready")
                    .count()
                    == n
            })
            .await;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        rounds.push(status_writes(from));
    }
    let (rss, hwm) = rss_kib();
    let (ctl_rss, ctl_hwm) = rss_of(ctl.child.id());
    // Each rebuild of the object set logs "objects loaded" with its durations.
    let log = strip_ansi(&std::fs::read_to_string(&ctl.log).unwrap_or_default());
    // SIDENET_BENCH_LOG=FILE keeps the controller's log.
    if let Ok(keep) = std::env::var("SIDENET_BENCH_LOG") {
        std::fs::write(&keep, &log).unwrap();
        // And Mosquitto's, beside it (it notes the messages it drops for a slow client).
        let _ = std::fs::copy(
            c.dir.path().join("mosquitto.log"),
            format!("{keep}.mosquitto"),
        );
    }
    let syncs: Vec<(u64, u64)> = log
        .lines()
        .filter(|l| l.contains("objects loaded"))
        .map(|l| {
            let field = |k: &str| {
                l.split(k)
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            (field("load_ms="), field("reconcile_ms="))
        })
        .collect();
    println!("== Kubernetes mode, enrolment storm of {n} nodes (debug build unless --release)");
    println!(
        "{sent} requests sent (first round in {:.2} s); every node enrolled with a MeshNode, a status and the config it records after {:.2} s ({:.0} nodes/s); {signed} configs received by {configs} nodes",
        published.as_secs_f64(),
        enrolled.as_secs_f64(),
        n as f64 / enrolled.as_secs_f64()
    );
    println!(
        "controller API calls: {} ({:.2} per node)",
        calls.len(),
        calls.len() as f64 / n as f64
    );
    for (k, v) in &by {
        println!("  {k}: {v}");
    }
    println!(
        "steady state: MeshNode status writes for a round of {n} reports: {} (first: nodes become Ready), then {} (lastSeen only; it is written every {} s: {:.2} writes per node per 5 minutes at one report a minute)",
        rounds[0],
        rounds[1],
        sidenet_controller::kubernetes::status::LAST_SEEN_STEP,
        rounds[1] as f64 / n as f64 * 5.0
            + 300.0 / sidenet_controller::kubernetes::status::LAST_SEEN_STEP as f64
    );
    println!(
        "rebuilds of the object set: {} (load {} ms, reconcile of every node {} ms in all; the longest {} + {} ms)",
        syncs.len(),
        syncs.iter().map(|s| s.0).sum::<u64>(),
        syncs.iter().map(|s| s.1).sum::<u64>(),
        syncs.iter().map(|s| s.0).max().unwrap_or(0),
        syncs.iter().map(|s| s.1).max().unwrap_or(0),
    );
    println!(
        "RSS of the controller process: {} MiB, peak {} MiB (the chart's limit: 512 MiB)",
        ctl_rss / 1024,
        ctl_hwm / 1024
    );
    println!(
        "RSS of the test process (in-memory API server + observer): {} MiB, peak {} MiB",
        rss / 1024,
        hwm / 1024
    );
    ctl.kill();
}
