//! Where Kubernetes mode writes its Events, against the in-memory API server (which validates
//! Events as `events.k8s.io/v1` does and enforces the chart's RBAC): in the object's own
//! namespace; about a cluster-scoped HardwareProfile, in `default`; notes cut to 1024 bytes.
//! The controller watches one namespace (`community`) and runs in another (`sidenet-system`),
//! where the chart grants it nothing but its Lease.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;

use kube::Api;
use kube::api::{ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};
use sidenet_crds::{HardwareProfile, MeshNode};

use kubecluster::*;

fn event(c: &Cluster, name: &str, reason: &str) -> Option<Value> {
    c.api
        .list("events.k8s.io/v1/events")
        .into_iter()
        .find(|e| e["regarding"]["name"] == name && e["reason"] == reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_to_the_objects_namespace_or_default_with_notes_cut_to_the_limit() {
    let c = Cluster::new();
    // A HardwareProfile the controller cannot read, injected past admission.
    let profile: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "sidenet.io/v1alpha1", "kind": "HardwareProfile",
        "metadata": {"name": "huge-flash"},
        "spec": {"model": "x", "flashMb": 5000000000u64, "ramMb": 128, "radios": []}
    }))
    .unwrap();
    Api::<DynamicObject>::all_with(
        c.unchecked_client.clone(),
        &ApiResource::erase::<HardwareProfile>(&()),
    )
    .create(&PostParams::default(), &profile)
    .await
    .unwrap();
    // A MeshNode naming a Mesh that does not exist, by a name long enough to push the note
    // past 1024 bytes (longer than the CRD allows: written past admission, as an object stored
    // before the bound existed would be).
    let long = "x".repeat(1500);
    let node: MeshNode = serde_json::from_value(json!({
        "apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": "porch"},
        "spec": {"mesh": long, "nodeId": "aaaaaaaaaaaaaaaa"}
    }))
    .unwrap();
    Api::<MeshNode>::namespaced(c.unchecked_client.clone(), "community")
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let mut o = c.opts("ctl-a");
    o.namespace = Some("community".into());
    o.pod_namespace = "sidenet-system".into();
    o.leader_election = true;
    let ctl = c.start(o);

    let ev = eventually(
        "an Undecodable Event on the HardwareProfile",
        || event(&c, "huge-flash", "Undecodable"),
        || format!("{}\nrefused: {:#?}", c.dump(), c.api.refused()),
    )
    .await;
    assert_eq!(ev["metadata"]["namespace"], json!("default"), "{ev:#}");
    assert!(ev["regarding"]["namespace"].is_null(), "{ev:#}");
    assert_eq!(ev["regarding"]["kind"], json!("HardwareProfile"), "{ev:#}");

    let ev = eventually(
        "an InvalidManifest Event on the MeshNode",
        || event(&c, "porch", "InvalidManifest"),
        || format!("{}\nrefused: {:#?}", c.dump(), c.api.refused()),
    )
    .await;
    assert_eq!(ev["metadata"]["namespace"], json!("community"), "{ev:#}");
    assert_eq!(ev["regarding"]["namespace"], json!("community"), "{ev:#}");
    let note = ev["note"].as_str().unwrap();
    assert_eq!(note.len(), 1024, "{note}");
    assert!(note.ends_with('…'), "{note}");
    assert!(note.contains("spec.mesh"), "{note}");

    // Nothing the controller asked for was refused (RBAC or Event validation).
    assert_eq!(c.api.refused(), Vec::<String>::new());
    ctl.stop().await;
}
