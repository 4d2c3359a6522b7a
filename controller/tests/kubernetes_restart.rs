//! Kubernetes mode across a controller restart: a new process republishes no node whose
//! config is unchanged (no fleet re-roll), and a later change is published to the nodes it
//! concerns only, continuing each node's revision sequence.
//!
//! Against the in-memory API server (`kubefake`) and a real MQTT broker (mosquitto, which
//! keeps the retained configs across the controller's restart), with the harness of
//! `kubernetes.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use sidenet_crds::MeshNode;

use kubecluster::*;

/// Config messages (retained configs and clears) seen since `mark`, as `(topic, bytes)`.
fn configs_since(obs: &Observer, mark: usize) -> Vec<(String, usize)> {
    obs.seen.lock().unwrap()[mark..]
        .iter()
        .filter(|(t, _)| t.contains("/nodes/") && t.ends_with("/config"))
        .map(|(t, p)| (t.clone(), p.len()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_republishes_no_unchanged_node() {
    let c = Cluster::new();
    let (mut kitchen, mut attic) = test_keys();
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    let mut first = Vec::new();
    for (name, agent) in [("kitchen", &kitchen), ("attic-pi", &attic)] {
        let (rev, sha, _) = eventually(
            &format!("{name}'s config"),
            || config_of(&obs, &key, &agent.id()),
            || c.dump(),
        )
        .await;
        // Recorded before publishing: revision, digest and validity.
        let st = c.node(name).unwrap()["status"].clone();
        assert_eq!(st["desiredRevision"], json!(rev.rev), "{st:#}");
        assert_eq!(st["configSha256"], json!(sha), "{st:#}");
        assert!(st["configIssuedAt"].as_u64().is_some(), "{st:#}");
        assert!(
            st["configExpiresAt"].as_u64() > st["configIssuedAt"].as_u64(),
            "{st:#}"
        );
        first.push((rev, sha));
    }
    let topics_before = configs_since(&obs, 0).len();
    assert_eq!(topics_before, 2, "{:?}", configs_since(&obs, 0));
    ctl.stop().await;

    // A new process, empty cache. Once it handles the nodes' reports it has loaded the cluster
    // and rendered every config: none was published again.
    let mark = obs.mark();
    let ctl = c.start(c.opts("ctl-b"));
    let (k, a) = (first[0].clone(), first[1].clone());
    c.report_until_applied(&mqtt, &mut kitchen, "kitchen", k.0, &k.1)
        .await;
    c.report_until_applied(&mqtt, &mut attic, "attic-pi", a.0, &a.1)
        .await;
    assert_eq!(
        configs_since(&obs, mark),
        Vec::<(String, usize)>::new(),
        "the restart republished configs\n{}",
        c.dump()
    );
    for name in ["kitchen", "attic-pi"] {
        let st = c.node(name).unwrap()["status"].clone();
        assert_eq!(st["desiredRevision"], json!(1), "{st:#}");
        assert_eq!(st["phase"], json!("Ready"), "{st:#}");
    }

    // A change to one node: that node alone gets the next revision.
    Api::<MeshNode>::namespaced(c.client.clone(), "default")
        .patch(
            "kitchen",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"overrides": {"hostname": "kitchen-2"}}})),
        )
        .await
        .unwrap();
    eventually(
        "kitchen's revision 2",
        || config_of(&obs, &key, &kitchen.id()).filter(|c| c.0.rev == 2),
        || c.dump(),
    )
    .await;
    assert_eq!(obs.revisions_since(&kitchen.id(), mark), vec![2]);
    assert_eq!(obs.revisions_since(&attic.id(), mark), Vec::<u64>::new());
    ctl.stop().await;

    // Restarted again after the change: still nothing republished.
    let mark = obs.mark();
    let ctl = c.start(c.opts("ctl-c"));
    let (rev, sha, _) = config_of(&obs, &key, &kitchen.id()).unwrap();
    c.report_until_applied(&mqtt, &mut kitchen, "kitchen", rev, &sha)
        .await;
    c.report_until_applied(&mqtt, &mut attic, "attic-pi", a.0, &a.1)
        .await;
    assert_eq!(
        configs_since(&obs, mark),
        Vec::<(String, usize)>::new(),
        "{}",
        c.dump()
    );
    assert_rbac(&c);
    ctl.stop().await;
}

/// Polls `f` every 100 ms for up to `secs` seconds (a real agent asks to enrol every 10 s).
async fn within<T>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// GET `path` on 127.0.0.1:`port`: the body of a 200.
async fn scrape(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// The revision and body digest in a real agent's `current.json`.
fn applied(root: &std::path::Path) -> Option<(u64, String)> {
    let text = std::fs::read(root.join("etc/sidenet-agent/current.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some((
        v["revision"]["rev"].as_u64()?,
        v["sha256"].as_str()?.to_string(),
    ))
}

/// The retained config of node `id` on the broker at `port`, read as the node (with its
/// broker password when it has one): its exact bytes.
async fn retained_config(port: u16, id: &str, password: Option<String>, topic: &str) -> Vec<u8> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(p) = password {
        o.set_credentials(id, p);
    }
    let (client, mut el) = AsyncClient::new(o, 10);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                    return p.payload.to_vec();
                }
                Ok(_) => {}
                Err(e) => panic!("node connection: {e}"),
            }
        }
    })
    .await
    .expect("the retained config")
}

/// With the embedded broker (whose retained configs die with the controller), a restarted
/// controller republishes the exact signed bytes its MeshNode status kept: a real agent finds
/// the revision it runs, and nothing is signed again or re-rolled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_gets_the_same_envelope_after_a_restart() {
    use base64::Engine as _;
    let c = Cluster::new();
    let (kitchen, attic) = test_keys();
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    let (port, mport) = (common::free_port(), common::free_port());
    let opts = |name: &str| {
        let mut o = c.opts(name);
        o.broker = None;
        o.listen = format!("127.0.0.1:{port}").parse().unwrap();
        o.metrics_listen = Some(format!("127.0.0.1:{mport}").parse().unwrap());
        o
    };
    let ctl = c.start(opts("ctl-a"));
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;

    // A real agent with kitchen's key.
    let root = c.dir.path().join("kitchen");
    let state = root.join("etc/sidenet-agent");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("node.key"), kitchen.key.to_file_text()).unwrap();
    let join = sidenet_wire::join::JoinCode::new("riverside", &key).to_string();
    let broker = format!("mqtt://127.0.0.1:{port}");
    let args = [
        "--mesh",
        "riverside",
        "--broker",
        &broker,
        "--root",
        root.to_str().unwrap(),
        "--profile",
        "tplink-archer-c7-v2",
        "--hostname",
        "kitchen",
        "--status-interval",
        "1",
        "--join",
        &join,
    ];
    let log = c.dir.path().join("kitchen.log");
    let mut agent = common::Proc::spawn(
        "kitchen",
        std::process::Command::new(common::bin("sidenet-agent")).args(args),
        &log,
    );
    let context = || format!("{}\n--- agent\n{}", c.dump(), agent_log(&log));
    let (rev, sha) = within(
        90,
        "the agent to apply its config",
        || applied(&root),
        context,
    )
    .await;
    let st = within(
        30,
        "kitchen Ready with its envelope in status",
        || {
            let st = c.node("kitchen")?["status"].clone();
            (st["phase"] == json!("Ready") && st["configEnvelope"].is_string()).then_some(st)
        },
        context,
    )
    .await;
    assert_eq!(st["desiredRevision"], json!(rev), "{st:#}");
    assert_eq!(st["configSha256"], json!(sha), "{st:#}");
    let kept = base64::engine::general_purpose::STANDARD
        .decode(st["configEnvelope"].as_str().unwrap())
        .unwrap();
    let v = sidenet_wire::Envelope::parse(&kept, 1 << 20)
        .unwrap()
        .verify(sidenet_wire::Kind::Config, &key)
        .unwrap();
    assert_eq!(v.header.rev, rev);
    // The attic has not enrolled: no config, so nothing kept.
    assert!(
        c.node("attic-pi").unwrap()["status"]["configEnvelope"].is_null(),
        "{}",
        c.dump()
    );
    ctl.stop().await;

    // A new process and a new, empty broker on the same port.
    let ctl = c.start(opts("ctl-b"));
    // Ready once connected to its broker, with the stored configs published again; then the
    // agent reconnects and reports that it runs its desired revision.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    // Ready: connected to its broker, every stored config published and the status of every
    // new one written. Only then the agent's next reports.
    while scrape(mport, "/readyz").await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new controller never got ready\n{}",
            context()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let text = loop {
        if let Some(t) = scrape(mport, "/metrics").await
            && metric(&t, "sidenet_nodes{phase=\"Ready\"}") == Some(1.0)
        {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new controller never saw the agent Ready\n{}",
            context()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // The kept bytes, published as they were (no new signature, no new revision).
    assert!(
        metric(&text, "sidenet_configs_published_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    let st = c.node("kitchen").unwrap()["status"].clone();
    assert_eq!(st["desiredRevision"], json!(rev), "{st:#}");
    assert_eq!(st["appliedRevision"], json!(rev), "{st:#}");
    assert_eq!(applied(&root), Some((rev, sha.clone())));
    agent.kill();
    let password = std::fs::read_to_string(state.join("mqtt.password"))
        .ok()
        .map(|p| p.trim().to_string());
    let topic = sidenet_wire::topics::config("riverside", &kitchen.id());
    let got = retained_config(port, &kitchen.id(), password, &topic).await;
    assert!(
        got == kept,
        "the broker retains other bytes than those kept in status"
    );
    assert!(
        !agent_log(&log).contains("config refused"),
        "{}",
        agent_log(&log)
    );
    assert_rbac(&c);
    ctl.stop().await;
}

fn agent_log(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
