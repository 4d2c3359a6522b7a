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
