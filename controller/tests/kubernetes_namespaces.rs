//! Kubernetes mode with every namespace watched: a MeshNode belongs to a Mesh of its own
//! namespace, and one namespace can neither join, replace nor remove another namespace's mesh
//! or nodes (docs/helm.md, "Namespaces").
//!
//! Against the in-memory API server (`kubefake`) and a real MQTT broker (Mosquitto), with the
//! harness of `kubernetes.rs` (`kubecluster`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use sidenet_crds::{Mesh, MeshNode};
use sidenet_wire::topics;

use common::repo;
use kubecluster::*;

/// The documents of a file of the repository.
fn docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    sidenet_crds::yaml::documents(&text)
        .into_iter()
        .map(|d| d.unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Creates `v` in namespace `ns` as the test's client (an admin or a tenant of that namespace).
async fn create_in(c: &Cluster, ns: &str, v: Value) {
    let pp = PostParams::default();
    match v["kind"].as_str().unwrap() {
        "Mesh" => {
            Api::<Mesh>::namespaced(c.client.clone(), ns)
                .create(&pp, &serde_json::from_value(v).unwrap())
                .await
                .unwrap();
        }
        "MeshNode" => {
            Api::<MeshNode>::namespaced(c.client.clone(), ns)
                .create(&pp, &serde_json::from_value(v).unwrap())
                .await
                .unwrap();
        }
        "Secret" => {
            Api::<Secret>::namespaced(c.client.clone(), ns)
                .create(&pp, &serde_json::from_value(v).unwrap())
                .await
                .unwrap();
        }
        k => panic!("unexpected kind {k}"),
    }
}

/// The riverside example in namespace `community` (the example's MeshNodes with the test
/// keys), the hardware profiles, and a controller watching every namespace.
async fn community(c: &Cluster, mode: &'static str, kitchen: &Agent, attic: &Agent) -> Running {
    let keys = with_keys(kitchen, attic);
    let mode = set_mode(mode);
    for mut v in docs("examples/riverside/mesh.yaml")
        .into_iter()
        .chain(docs("examples/riverside/nodes.yaml"))
    {
        keys(&mut v);
        mode(&mut v);
        create_in(c, "community", v).await;
    }
    c.apply_files(&[repo().join("hardware-profiles")], |_| {})
        .await;
    let mut o = c.opts("ctl-a");
    o.namespace = None;
    c.start(o)
}

fn mesh_status(c: &Cluster, ns: &str) -> Value {
    c.api
        .get(MESHES, ns, "riverside")
        .map(|m| m["status"].clone())
        .unwrap_or(Value::Null)
}

/// A Warning Event about `ns/name` with `reason`, its note.
fn event_on(c: &Cluster, ns: &str, name: &str, reason: &str) -> Option<String> {
    c.api
        .list("events.k8s.io/v1/events")
        .into_iter()
        .find(|e| {
            e["regarding"]["namespace"] == ns
                && e["regarding"]["name"] == name
                && e["reason"] == reason
        })
        .map(|e| e["note"].as_str().unwrap_or("").to_string())
}

/// Whether an empty retained message (a cleared config) was seen on `topic` since `mark`.
fn cleared_since(obs: &Observer, topic: &str, mark: usize) -> bool {
    obs.seen.lock().unwrap()[mark..]
        .iter()
        .any(|(t, p)| t == topic && p.is_empty())
}

/// The attack of issue 18: with every namespace watched, a MeshNode in namespace `evil` names
/// `mesh: riverside` (a Mesh of namespace `community`, in approval mode), approves itself and
/// enrols with its own key. It gets no config (which would carry the mesh passphrase sealed to
/// the attacker's key) and nothing of the mesh in its status; a second MeshNode in `evil`
/// naming a real node's id, created and deleted, takes nothing of that node with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshnode_in_another_namespace_cannot_join_or_remove_anything() {
    let c = Cluster::new();
    let (mut kitchen, attic) = test_keys();
    let ctl = community(&c, "approval", &kitchen, &attic).await;
    let mut thief = Agent::new(66);
    let thief_id = thief.id();
    create_in(
        &c,
        "evil",
        json!({
            "apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": "grab"},
            "spec": {"mesh": "riverside", "nodeId": thief_id,
                     "publicKey": thief.key.public().to_base64(),
                     "hardwareProfile": "tplink-archer-c7-v2", "approved": true}
        }),
    )
    .await;
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually(
        "the Mesh public key",
        || {
            let m = c.api.get(MESHES, "community", "riverside")?;
            sidenet_wire::PublicKey::from_base64(m["status"]["publicKey"].as_str()?).ok()
        },
        || c.dump(),
    )
    .await;
    // The mesh works: its own (approved) node enrols and gets its config.
    c.enrol(
        &mqtt,
        &mut kitchen,
        ("community", "kitchen"),
        "kitchen",
        "tplink-archer-c7-v2",
    )
    .await;
    let (rev, _, _) = eventually(
        "kitchen's config",
        || config_of(&obs, &key, &kitchen.id()),
        || c.dump(),
    )
    .await;

    // The MeshNode in `evil` names no Mesh of its own namespace: refused, on that object.
    let degraded = eventually(
        "evil/grab refused",
        || {
            c.condition_in("evil", "grab", "Degraded")
                .filter(|d| d.0 == "True" && d.1 == "InvalidSpec")
        },
        || c.dump(),
    )
    .await;
    assert!(
        degraded.2.contains("spec.mesh") && degraded.2.contains("riverside"),
        "{degraded:?}"
    );
    let note = event_on(&c, "evil", "grab", "InvalidManifest").unwrap();
    assert!(note.contains("spec.mesh"), "{note}");

    // The thief enrols on the mesh's topic with its own key: the mesh (approval mode) records
    // it as pending, in its own namespace; the approval the thief wrote in `evil` counts for
    // nothing.
    let recorded = || {
        c.api
            .list(NODES)
            .into_iter()
            .find(|n| n["metadata"]["namespace"] == "community" && n["spec"]["nodeId"] == thief_id)
            .and_then(|n| n["metadata"]["name"].as_str().map(String::from))
            .filter(|name| {
                c.condition_in("community", name, "Enrolled")
                    .is_some_and(|e| e.0 == "True")
            })
    };
    let deadline = std::time::Instant::now() + WAIT;
    let pending = loop {
        // Sent again every second: the controller may not be subscribed yet.
        thief.enroll(&mqtt, "grab", "tplink-archer-c7-v2").await;
        let again = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut found = None;
        while found.is_none() && std::time::Instant::now() < again {
            found = recorded();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if let Some(name) = found {
            break name;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the thief's enrolment was not recorded in community\n{}",
            c.dump()
        );
    };
    let approved = c.condition_in("community", &pending, "Approved").unwrap();
    assert_eq!(approved.1, "WaitingForApproval", "{}", c.dump());
    // By now the enrolment went through the engine (the MeshNode above was created while it
    // was handled) and nothing was published to the thief.
    assert!(
        obs.on(&topics::config("riverside", &thief_id)).is_empty(),
        "a config of community/riverside was published to the node of namespace evil"
    );
    let grab = c.api.get(NODES, "evil", "grab").unwrap();
    for field in [
        "desiredRevision",
        "desiredEpoch",
        "configSha256",
        "subnetId",
        "enrolledKey",
        "reportedHostname",
    ] {
        assert!(
            grab["status"][field].is_null(),
            "evil/grab shows {field} of the community's node: {:#}",
            grab["status"]
        );
    }
    assert_eq!(
        c.condition_in("evil", "grab", "Enrolled").unwrap().0,
        "False"
    );
    assert!(c.api.get("v1/secrets", "evil", "riverside-mesh").is_none());
    assert!(
        c.api
            .get("v1/secrets", "evil", "riverside-signing-key")
            .is_none()
    );

    // A MeshNode in `evil` claiming kitchen's node id, then deleted: kitchen keeps its config.
    let mark = obs.mark();
    create_in(
        &c,
        "evil",
        json!({
            "apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": "twin"},
            "spec": {"mesh": "riverside", "nodeId": kitchen.id(), "approved": true}
        }),
    )
    .await;
    eventually(
        "evil/twin refused",
        || {
            c.condition_in("evil", "twin", "Degraded")
                .filter(|d| d.0 == "True" && d.1 == "InvalidSpec")
        },
        || c.dump(),
    )
    .await;
    Api::<MeshNode>::namespaced(c.client.clone(), "evil")
        .delete("twin", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "evil/twin gone (its finalizer ran)",
        || c.api.get(NODES, "evil", "twin").is_none().then_some(()),
        || c.dump(),
    )
    .await;
    // Kitchen still runs: a status report reaches its MeshNode, and its config stayed.
    kitchen
        .report(&mqtt, rev, &config_of(&obs, &key, &kitchen.id()).unwrap().1)
        .await;
    eventually(
        "kitchen reported as applied",
        || {
            c.condition_in("community", "kitchen", "ConfigApplied")
                .filter(|a| a.0 == "True")
        },
        || c.dump(),
    )
    .await;
    assert!(
        !cleared_since(&obs, &topics::config("riverside", &kitchen.id()), mark),
        "deleting a MeshNode of namespace evil cleared kitchen's config"
    );
    assert!(retained(c.port, &topics::config("riverside", &kitchen.id())).await);
    assert_eq!(
        c.condition_in("community", "kitchen", "Enrolled")
            .unwrap()
            .0,
        "True"
    );
    ctl.stop().await;
}

/// A Mesh named like a running one, in another namespace that sorts first: the newcomer alone
/// is refused (an Event and a condition on it), the running mesh keeps its key, its nodes and
/// its configs, and deleting the newcomer clears nothing of the running mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_named_mesh_in_another_namespace_is_refused_and_evicts_nothing() {
    let c = Cluster::new();
    let (mut kitchen, attic) = test_keys();
    let ctl = community(&c, "auto", &kitchen, &attic).await;
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually(
        "the Mesh public key",
        || {
            let m = c.api.get(MESHES, "community", "riverside")?;
            sidenet_wire::PublicKey::from_base64(m["status"]["publicKey"].as_str()?).ok()
        },
        || c.dump(),
    )
    .await;
    c.enrol(
        &mqtt,
        &mut kitchen,
        ("community", "kitchen"),
        "kitchen",
        "tplink-archer-c7-v2",
    )
    .await;
    let (rev, sha, _) = eventually(
        "kitchen's config",
        || config_of(&obs, &key, &kitchen.id()),
        || c.dump(),
    )
    .await;

    // "aaa" sorts before "community".
    let mark = obs.mark();
    let newcomer = Agent::new(77);
    for v in docs("examples/riverside/mesh.yaml") {
        create_in(&c, "aaa", v).await;
    }
    create_in(
        &c,
        "aaa",
        json!({
            "apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": "intruder"},
            "spec": {"mesh": "riverside", "nodeId": newcomer.id(),
                     "publicKey": newcomer.key.public().to_base64(), "approved": true}
        }),
    )
    .await;
    let refused = eventually(
        "aaa/riverside refused",
        || {
            let s = mesh_status(&c, "aaa");
            s["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready" && c["status"] == "False")
                .filter(|c| c["reason"] == "InvalidSpec")
                .and_then(|c| c["message"].as_str().map(String::from))
        },
        || c.dump(),
    )
    .await;
    assert!(
        refused.contains("namespace \"community\""),
        "{refused}\n{}",
        c.dump()
    );
    assert!(
        event_on(&c, "aaa", "riverside", "InvalidManifest").is_some(),
        "{}",
        c.dump()
    );
    assert!(mesh_status(&c, "aaa")["publicKey"].is_null());
    eventually(
        "aaa/intruder refused with its mesh",
        || {
            c.condition_in("aaa", "intruder", "Degraded")
                .filter(|d| d.0 == "True" && d.1 == "InvalidSpec")
        },
        || c.dump(),
    )
    .await;

    // The running mesh is untouched: same key, Ready, its node reports and is applied.
    kitchen.report(&mqtt, rev, &sha).await;
    eventually(
        "kitchen reported as applied",
        || {
            c.condition_in("community", "kitchen", "ConfigApplied")
                .filter(|a| a.0 == "True")
        },
        || c.dump(),
    )
    .await;
    let s = mesh_status(&c, "community");
    assert_eq!(s["publicKey"], json!(key.to_base64()), "{}", c.dump());
    assert!(
        s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"),
        "{}",
        c.dump()
    );
    assert_eq!(config_of(&obs, &key, &kitchen.id()).unwrap().0, rev);

    // Deleting the refused newcomer clears nothing of the running mesh.
    Api::<Mesh>::namespaced(c.client.clone(), "aaa")
        .delete("riverside", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "aaa/riverside gone (its finalizer ran)",
        || {
            c.api
                .get(MESHES, "aaa", "riverside")
                .is_none()
                .then_some(())
        },
        || c.dump(),
    )
    .await;
    let topic = topics::config("riverside", &kitchen.id());
    assert!(
        !cleared_since(&obs, &topic, mark),
        "kitchen's config was cleared"
    );
    assert!(
        !obs.seen.lock().unwrap()[mark..]
            .iter()
            .any(|(t, p)| t.starts_with("sidenet/v1/riverside/announce") && p.is_empty()),
        "the running mesh's announcement was cleared"
    );
    assert!(retained(c.port, &topic).await);
    assert_eq!(
        mesh_status(&c, "community")["publicKey"],
        json!(key.to_base64())
    );
    ctl.stop().await;
}
