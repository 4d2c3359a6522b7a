//! The in-memory API server of the Kubernetes-mode tests (`kubefake`) is strict where a real
//! API server is, so that a controller bug that a real cluster would show fails there too:
//! no-op writes, Event validation and RBAC by namespace and resourceNames. (Schema admission:
//! `kubernetes_robustness.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod kubefake;

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event as RtEvent, EventType, Recorder, Reporter};
use kube::{Api, Client};
use serde_json::json;
use sidenet_crds::{HardwareProfile, Mesh};

use kubefake::{FakeApi, Rule};

const SA: &str = "system:serviceaccount:default:sidenet";

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        e => panic!("{e}"),
    }
}

/// The example's Mesh.
fn mesh() -> Mesh {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/riverside/mesh.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    sidenet_crds::yaml::documents(&text)
        .into_iter()
        .map(|d| d.unwrap())
        .find(|d| d["kind"] == "Mesh")
        .map(|d| serde_json::from_value(d).unwrap())
        .unwrap()
}

#[tokio::test]
async fn a_write_that_changes_nothing_bumps_no_resource_version() {
    let api = FakeApi::new();
    let client = Client::new(api.tagged("test"), "default");
    let meshes: Api<Mesh> = Api::namespaced(client, "default");
    meshes
        .create(&PostParams::default(), &mesh())
        .await
        .unwrap();
    let before = api
        .get("sidenet.io/v1alpha1/meshes", "default", "riverside")
        .unwrap();
    let patch = json!({"status": {"highestRevision": 3}});
    meshes
        .patch_status("riverside", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let once = api
        .get("sidenet.io/v1alpha1/meshes", "default", "riverside")
        .unwrap();
    assert_ne!(
        once["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    // The same patch again, and a spec patch to the value it has: nothing stored.
    meshes
        .patch_status("riverside", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    meshes
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"country": "DE"}})),
        )
        .await
        .unwrap();
    let after = api
        .get("sidenet.io/v1alpha1/meshes", "default", "riverside")
        .unwrap();
    assert_eq!(after, once);
    let watched = meshes
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version;
    assert_eq!(
        watched.as_deref(),
        once["metadata"]["resourceVersion"].as_str(),
        "the store's resourceVersion moved on a no-op write"
    );
}

fn recorder(client: Client) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: "sidenet-controller".into(),
            instance: Some("pod-a".into()),
        },
    )
}

#[tokio::test]
async fn events_are_validated_as_events_k8s_io_v1_does() {
    let api = FakeApi::new();
    let client = Client::new(api.tagged("test"), "default");
    let ev = |reason: &str, note: String| RtEvent {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    let node = ObjectReference {
        api_version: Some("sidenet.io/v1alpha1".into()),
        kind: Some("MeshNode".into()),
        name: Some("kitchen".into()),
        namespace: Some("community".into()),
        uid: Some("u1".into()),
        ..Default::default()
    };
    let rec = recorder(client.clone());
    rec.publish(&ev("InvalidManifest", "x".repeat(1024)), &node)
        .await
        .unwrap();
    let e = rec
        .publish(&ev("NodeRejected", "y".repeat(1025)), &node)
        .await
        .unwrap_err();
    assert_eq!(code(e), 422);
    // A cluster-scoped object: default (or kube-system), not another namespace.
    let profile = ObjectReference {
        api_version: Some("sidenet.io/v1alpha1".into()),
        kind: Some("HardwareProfile".into()),
        name: Some("tplink".into()),
        uid: Some("u2".into()),
        ..Default::default()
    };
    rec.publish(&ev("InvalidManifest", "bad profile".into()), &profile)
        .await
        .unwrap();
    let stored: Vec<_> = api.list("events.k8s.io/v1/events");
    assert_eq!(stored.len(), 2, "{stored:#?}");
    assert!(
        stored
            .iter()
            .any(|e| e["metadata"]["namespace"] == "default" && e["regarding"]["name"] == "tplink")
    );
    // An Event about a namespaced object in another namespace, or without eventTime.
    let events: Api<Event> = Api::namespaced(client, "default");
    let mut raw = Event {
        metadata: kube::api::ObjectMeta {
            name: Some("e1".into()),
            ..Default::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        type_: Some("Normal".into()),
        reason: Some("Enrolled".into()),
        action: Some("Reconcile".into()),
        reporting_controller: Some("sidenet-controller".into()),
        reporting_instance: Some("pod-a".into()),
        regarding: Some(node.clone()),
        ..Default::default()
    };
    assert_eq!(
        code(
            events
                .create(&PostParams::default(), &raw)
                .await
                .unwrap_err()
        ),
        422
    );
    raw.regarding = Some(ObjectReference {
        namespace: Some("default".into()),
        ..node
    });
    raw.event_time = None;
    assert_eq!(
        code(
            events
                .create(&PostParams::default(), &raw)
                .await
                .unwrap_err()
        ),
        422
    );
}

#[tokio::test]
async fn rbac_is_checked_by_namespace_and_resource_names() {
    let api = FakeApi::new();
    api.set_policy(
        SA,
        vec![
            Rule::new(Some("community"), "", &["secrets"], &["get", "create"]),
            Rule::new(
                Some("default"),
                "coordination.k8s.io",
                &["leases"],
                &["get"],
            )
            .names(&["sidenet-controller"]),
            Rule::new(None, "sidenet.io", &["hardwareprofiles"], &["list"]),
        ],
    );
    let admin = Client::new(api.tagged("test"), "default");
    let ctl = Client::new(api.clone(), "default");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "riverside-signing-key"}, "stringData": {"k": "v"}
    }))
    .unwrap();
    for ns in ["community", "other"] {
        Api::<Secret>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    // The Role's namespace only.
    Api::<Secret>::namespaced(ctl.clone(), "community")
        .get("riverside-signing-key")
        .await
        .unwrap();
    let e = Api::<Secret>::namespaced(ctl.clone(), "other")
        .get("riverside-signing-key")
        .await
        .unwrap_err();
    assert_eq!(code(e), 403);
    // Verbs the rule does not list; listing across all namespaces needs a ClusterRole.
    let e = Api::<Secret>::namespaced(ctl.clone(), "community")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(code(e), 403);
    let e = Api::<Secret>::all(ctl.clone())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(code(e), 403);
    // resourceNames: the named Lease only.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(ctl.clone(), "default");
    assert_eq!(
        code(leases.get("sidenet-controller").await.unwrap_err()),
        404
    );
    assert_eq!(code(leases.get("someone-else").await.unwrap_err()), 403);
    // A ClusterRole rule covers the cluster scope.
    Api::<HardwareProfile>::all(ctl)
        .list(&ListParams::default())
        .await
        .unwrap();
    let refused = api.refused();
    assert_eq!(refused.len(), 4, "{refused:#?}");
    assert!(
        refused[0].contains("in the namespace \"other\""),
        "{refused:#?}"
    );
}
