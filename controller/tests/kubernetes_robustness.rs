//! Kubernetes mode when one object is bad: an object the controller's types cannot read (a
//! `txPower` beyond `u32`, as an API server without the CRD's `maximum` would admit) is
//! reported on itself and stalls nothing; the rest of the cluster is served.
//!
//! Against the in-memory API server (`kubefake`; the object is injected past admission, through
//! its unchecked client) and a real MQTT broker, with the harness of `kubernetes.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;

use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use sidenet_crds::MeshNode;
use sidenet_wire::topics;

use kubecluster::*;

/// MeshNodes through the client that skips admission (the fake's CRD schema would refuse
/// the out-of-range objects this test injects).
fn meshnodes(c: &Cluster) -> Api<DynamicObject> {
    Api::namespaced_with(
        c.unchecked_client.clone(),
        "default",
        &ApiResource::erase::<MeshNode>(&()),
    )
}

/// A Warning Event about `name` with `reason`, its note.
fn event_on(c: &Cluster, name: &str, reason: &str) -> Option<String> {
    c.api
        .list("events.k8s.io/v1/events")
        .into_iter()
        .find(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .map(|e| e["note"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_meshnode_stalls_nothing() {
    let c = Cluster::new();
    let (mut kitchen, mut attic) = test_keys();
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    // Past admission: 5000000000 does not fit the u32 of `overrides.txPower`.
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": "porch"},
        "spec": {"mesh": "riverside", "nodeId": "aaaaaaaaaaaaaaaa", "approved": true,
                 "overrides": {"txPower": 5000000000u64}}
    }))
    .unwrap();
    meshnodes(&c)
        .create(&PostParams::default(), &bad)
        .await
        .unwrap();
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;

    // The cache became ready and the mesh is served: key, enrolment, configs.
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    let (rev, sha, _) = eventually(
        "kitchen's config",
        || config_of(&obs, &key, &kitchen.id()),
        || c.dump(),
    )
    .await;
    eventually(
        "attic's config",
        || config_of(&obs, &key, &attic.id()),
        || c.dump(),
    )
    .await;
    // The bad object is reported on itself, with what is wrong.
    let note = eventually(
        "an Undecodable Event on porch",
        || event_on(&c, "porch", "Undecodable"),
        || c.dump(),
    )
    .await;
    assert!(
        note.contains("txPower") || note.contains("5000000000"),
        "{note}"
    );
    assert!(note.len() <= 1024, "{note}");
    assert!(
        obs.on(&topics::config("riverside", "aaaaaaaaaaaaaaaa"))
            .is_empty()
    );

    // A running node whose object turns undecodable keeps its last readable spec: its config
    // stays, and it is still served (its report reaches its status).
    let mark = obs.mark();
    meshnodes(&c)
        .patch(
            "kitchen",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"overrides": {"txPower": 5000000000u64}}})),
        )
        .await
        .unwrap();
    eventually(
        "an Undecodable Event on kitchen",
        || event_on(&c, "kitchen", "Undecodable"),
        || c.dump(),
    )
    .await;
    kitchen.report(&mqtt, rev, &sha).await;
    eventually(
        "kitchen reported as applied",
        || {
            c.condition("kitchen", "ConfigApplied")
                .filter(|a| a.0 == "True")
        },
        || c.dump(),
    )
    .await;
    let topic = topics::config("riverside", &kitchen.id());
    assert!(
        !obs.seen.lock().unwrap()[mark..]
            .iter()
            .any(|(t, p)| *t == topic && p.is_empty()),
        "kitchen's config was cleared"
    );
    assert_eq!(obs.revisions_since(&kitchen.id(), mark), Vec::<u64>::new());

    // Fixed, it is read again: a real change republishes.
    meshnodes(&c)
        .patch(
            "kitchen",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"overrides": {"txPower": null, "hostname": "kitchen-2"}}}),
            ),
        )
        .await
        .unwrap();
    eventually(
        "kitchen's next revision",
        || config_of(&obs, &key, &kitchen.id()).filter(|c| c.0.rev > rev.rev),
        || c.dump(),
    )
    .await;
    ctl.stop().await;
}

/// A status field the controller no longer sets is cleared on the server (status is written
/// as a merge patch with explicit nulls): `brokerLogin` true → false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_field_going_back_to_its_default_is_cleared() {
    let c = Cluster::new();
    let (mut kitchen, mut attic) = test_keys();
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    let (rev, sha, _) = eventually(
        "kitchen's config",
        || config_of(&obs, &key, &kitchen.id()),
        || c.dump(),
    )
    .await;
    // A previous run recorded that the node logs in with its broker password; this one's
    // node does not (its reports say so).
    Api::<MeshNode>::namespaced(c.client.clone(), "default")
        .patch_status(
            "kitchen",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"brokerLogin": true}})),
        )
        .await
        .unwrap();
    assert_eq!(
        c.node("kitchen").unwrap()["status"]["brokerLogin"],
        json!(true)
    );
    kitchen.report(&mqtt, rev, &sha).await;
    eventually(
        "brokerLogin cleared on the server",
        || {
            c.node("kitchen")
                .filter(|n| n["status"]["brokerLogin"].is_null())
                .filter(|n| n["status"]["appliedRevision"] == json!(rev.rev))
        },
        || c.dump(),
    )
    .await;
    ctl.stop().await;
}

/// The in-memory API server refuses at admission what the CRD's schema refuses (the bound of
/// `txPower`, generated from the type): the object that the test above injects past admission
/// never reaches the store through an ordinary client, and the error names the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_range_object_is_refused_at_admission() {
    let c = Cluster::new();
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": "porch"},
        "spec": {"mesh": "riverside", "nodeId": "aaaaaaaaaaaaaaaa",
                 "overrides": {"txPower": 5000000000u64}}
    }))
    .unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        "default",
        &ApiResource::erase::<MeshNode>(&()),
    );
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("an out-of-range txPower was admitted");
    let kube::Error::Api(s) = err else {
        panic!("{err}")
    };
    assert_eq!(s.code, 422, "{s:?}");
    assert!(
        s.message.contains("spec.overrides.txPower"),
        "{}",
        s.message
    );
    assert!(c.node("porch").is_none());

    // In range, it is admitted, with the schema's defaults filled in and unknown fields pruned.
    let mut ok = bad.clone();
    ok.data["spec"]["overrides"]["txPower"] = json!(20);
    ok.data["spec"]["colour"] = json!("blue");
    api.create(&PostParams::default(), &ok).await.unwrap();
    let stored = c.node("porch").unwrap();
    assert_eq!(stored["spec"]["overrides"]["txPower"], json!(20));
    assert_eq!(stored["spec"]["approved"], json!(false), "{stored:#}");
    assert_eq!(stored["spec"]["role"], json!("router"), "{stored:#}");
    assert!(stored["spec"].get("colour").is_none(), "{stored:#}");

    // A patch that takes it out of range is refused too, and changes nothing.
    let rv = stored["metadata"]["resourceVersion"].clone();
    let err = api
        .patch(
            "porch",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"overrides": {"txPower": 5000000000u64}}})),
        )
        .await
        .expect_err("an out-of-range patch was admitted");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422),
        "{err}"
    );
    assert_eq!(c.node("porch").unwrap()["metadata"]["resourceVersion"], rv);
}

/// A key of its own for each node of a storm (seeds outside the test keys' `[21; 32]`, ...).
fn storm_agent(i: usize) -> Agent {
    let mut seed = [9u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Agent {
        key: sidenet_wire::keys::KeyPair::from_seed(&seed),
        seq: 0,
    }
}

/// Per MeshNode: name, finalizers, phase and the `Enrolled` condition (for failure messages).
fn storm_summary(c: &Cluster) -> String {
    c.api
        .list(NODES)
        .iter()
        .map(|n| {
            let enrolled = n["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Enrolled"))
                .map(|c| c["status"].clone());
            format!(
                "{} finalizers={} phase={} enrolled={:?} desired={}",
                n["metadata"]["name"],
                n["metadata"]["finalizers"],
                n["status"]["phase"],
                enrolled,
                n["status"]["desiredRevision"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Enrolments arriving at once (the MQTT task handles them as one batch, and each MeshNode it
/// creates reaches the watch cache only after that batch): every node gets its MeshNode, a
/// status that shows it `Enrolled` with the revision it was sent, and exactly one config,
/// named by its MeshNode. Each used to be signed twice (named by its node id at enrolment,
/// again by its MeshNode's name a moment later); the first was published when the MeshNode
/// was in the cache by the end of the batch, so an agent applied two configs and a status
/// could show an `Enrolled` node whose config was about to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolments_arriving_at_once_are_each_signed_once() {
    const N: usize = 30;
    let c = Cluster::new();
    c.riverside(false, |_| {}).await;
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    let mut agents: Vec<Agent> = (0..N).map(storm_agent).collect();
    // One node first (the controller is then subscribed), then the others at once.
    c.enrol(
        &mqtt,
        &mut agents[0],
        ("default", "host-0"),
        "host-0",
        "tplink-archer-c7-v2",
    )
    .await;
    for (i, a) in agents.iter_mut().enumerate().skip(1) {
        let (topic, payload) = a.enroll_message(&format!("host-{i}"), "tplink-archer-c7-v2");
        mqtt.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    // Done: Enrolled, and the config the node got is the one its status records.
    let done = |i: usize, a: &Agent| {
        let name = format!("host-{i}");
        let got = config_of(&obs, &key, &a.id())?;
        let node = c.node(&name)?;
        (c.condition(&name, "Enrolled")?.0 == "True"
            && node["status"]["desiredRevision"] == json!(got.0.rev))
        .then_some(())
    };
    eventually(
        "every node of the storm Enrolled, with the config its status records",
        || {
            agents
                .iter()
                .enumerate()
                .all(|(i, a)| done(i, a).is_some())
                .then_some(())
        },
        || storm_summary(&c),
    )
    .await;
    for (i, a) in agents.iter().enumerate() {
        let configs: Vec<Vec<u8>> = obs
            .on(&topics::config("riverside", &a.id()))
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        let revisions = obs.revisions(&a.id());
        assert_eq!(
            configs.len(),
            1,
            "host-{i} ({}) was sent {} configs (revisions {revisions:?}), not one",
            a.id(),
            configs.len()
        );
        let env = sidenet_wire::Envelope::parse(&configs[0], 1 << 20).unwrap();
        let body = env.verify(sidenet_wire::Kind::Config, &key).unwrap().body;
        let text = String::from_utf8_lossy(body);
        assert!(
            text.contains(&format!("for node 'host-{i}' ({})", a.id())),
            "host-{i}'s config is not named by its MeshNode"
        );
    }
    ctl.stop().await;
}

/// Two nodes with one hostname enrol in one batch: the MeshNodes of a batch are created
/// together, so the second cannot see the first's in the watch cache. Each still gets a
/// MeshNode of its own (the hostname, and the hostname with the start of its id) and a config
/// named by it; neither is left waiting for a MeshNode that was never made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_enrolling_at_once_with_one_hostname_each_get_a_meshnode() {
    let c = Cluster::new();
    c.riverside(false, |_| {}).await;
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    let mut first = storm_agent(100);
    // One node first (the controller is then subscribed), then the twins at once.
    c.enrol(
        &mqtt,
        &mut first,
        ("default", "porch"),
        "porch",
        "tplink-archer-c7-v2",
    )
    .await;
    let mut twins = [storm_agent(101), storm_agent(102)];
    for a in twins.iter_mut() {
        let (topic, payload) = a.enroll_message("twin", "tplink-archer-c7-v2");
        mqtt.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    for a in &twins {
        let id = a.id();
        let name = eventually(
            "a MeshNode for each twin",
            || {
                c.api
                    .list(NODES)
                    .iter()
                    .find(|n| n["spec"]["nodeId"] == json!(id))
                    .and_then(|n| n["metadata"]["name"].as_str().map(str::to_string))
            },
            || storm_summary(&c),
        )
        .await;
        names.push(name);
    }
    let short = |a: &Agent| a.id()[..6].to_string();
    assert!(
        names.contains(&"twin".to_string())
            && (names.contains(&format!("twin-{}", short(&twins[0])))
                || names.contains(&format!("twin-{}", short(&twins[1])))),
        "the twins' MeshNodes are {names:?}"
    );
    for (a, name) in twins.iter().zip(&names) {
        let topic = topics::config("riverside", &a.id());
        let text = eventually(
            "each twin's config",
            || {
                let last = obs.on(&topic).into_iter().rfind(|p| !p.is_empty())?;
                let env = sidenet_wire::Envelope::parse(&last, 1 << 20).ok()?;
                let v = env.verify(sidenet_wire::Kind::Config, &key).ok()?;
                Some(String::from_utf8_lossy(v.body).to_string())
            },
            || storm_summary(&c),
        )
        .await;
        assert!(
            text.contains(&format!("for node '{name}' ({})", a.id())),
            "{name}'s config is not named by its MeshNode"
        );
    }
    ctl.stop().await;
}
