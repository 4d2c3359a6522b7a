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
