//! Kubernetes mode against an in-memory API server (`kubefake`) and a real MQTT broker
//! (Mosquitto): enrolment → MeshNode → approval → signed config → status; level-triggered
//! republishing; finalizers; Events for bad input; revisions across restarts; leader election;
//! the riverside example in both modes.
//!
//! The controller publishes no config to a node before it enrolled (the config carries the mesh
//! passphrase sealed to the node's own key, docs/security.md). The example's MeshNodes name
//! devices whose keys the tests do not hold, so the tests that use them replace `spec.nodeId`
//! and `spec.publicKey` with those of test keys ([`test_keys`]) and enrol those keys.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{free_port, repo};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use sidenet_controller::kubernetes::{self, Options};
use sidenet_crds::{HardwareProfile, Mesh, MeshNode};
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::NodeConfig;
use sidenet_wire::{Envelope, Kind, PublicKey, topics};

use kubecluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_creates_a_pending_meshnode_that_is_approved_published_and_reported() {
    let c = Cluster::new();
    c.riverside(false, set_mode("approval")).await;
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;

    // The mesh gets its key (in a Secret), status and a retained announcement.
    let key = eventually(
        "the Mesh public key in its status",
        || c.mesh_key(),
        || c.dump(),
    )
    .await;
    let secret = eventually(
        "the signing key Secret",
        || c.api.get("v1/secrets", "default", "riverside-signing-key"),
        || c.dump(),
    )
    .await;
    assert!(secret["data"]["signing.key"].is_string());
    eventually(
        "the passphrase Secret",
        || c.api.get("v1/secrets", "default", "riverside-mesh"),
        || c.dump(),
    )
    .await;
    eventually(
        "the announcement",
        || (!obs.on(&topics::announce("riverside")).is_empty()).then_some(()),
        || c.dump(),
    )
    .await;
    // No secret material in any custom resource.
    let seed = String::from_utf8(base64_decode(
        secret["data"]["signing.key"].as_str().unwrap(),
    ))
    .unwrap();
    assert!(!c.mesh().unwrap().to_string().contains(seed.trim()));

    // Enrolment in approval mode: a pending MeshNode, owned by the Mesh, no config.
    let mut agent = Agent::new(7);
    agent
        .enroll(&mqtt, "node1", "raspberrypi-4b-awus036acm")
        .await;
    let n = eventually(
        "a MeshNode for the enrolled node",
        || c.node("node1"),
        || c.dump(),
    )
    .await;
    assert_eq!(n["spec"]["nodeId"], json!(agent.id()));
    assert_eq!(n["spec"]["approved"], json!(false));
    assert_eq!(n["metadata"]["ownerReferences"][0]["kind"], json!("Mesh"));
    let pending = eventually(
        "the node pending approval",
        || {
            c.condition("node1", "Approved")
                .filter(|a| a.1 == "WaitingForApproval")
        },
        || c.dump(),
    )
    .await;
    assert!(
        pending.2.contains("kubectl patch meshnode node1"),
        "{pending:?}"
    );
    // The conditions and the phase may reach the server in separate status patches.
    eventually(
        "node1 enrolled and in phase Pending",
        || {
            (c.condition("node1", "Enrolled")
                .is_some_and(|e| e.0 == "True")
                && c.node("node1")
                    .is_some_and(|n| n["status"]["phase"] == json!("Pending")))
            .then_some(())
        },
        || c.dump(),
    )
    .await;
    assert!(
        c.events()
            .iter()
            .any(|e| e.0 == "node1" && e.1 == "Enrolled"),
        "{:?}",
        c.events()
    );
    assert!(obs.revisions(&agent.id()).is_empty());

    // An enrolment signed by another node's key: refused, with an Event on the Mesh.
    let mut rogue = Agent::new(8);
    rogue.enroll_as(&mqtt, "rogue", &agent.id()).await;
    let ev = eventually(
        "a NodeRejected Event",
        || {
            c.events()
                .into_iter()
                .find(|e| e.0 == "riverside" && e.1 == "NodeRejected")
        },
        || c.dump(),
    )
    .await;
    assert!(
        ev.2.contains(&format!("refused enrolment of node {}", agent.id())),
        "{ev:?}"
    );
    assert!(ev.2.contains(&rogue.id()), "{ev:?}");

    // Approval is a patch of spec.approved: rendered, signed, published as revision 1.
    Api::<MeshNode>::namespaced(c.client.clone(), "default")
        .patch(
            "node1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"approved": true}})),
        )
        .await
        .unwrap();
    let (rev, sha, config) = eventually(
        "the config of the approved node",
        || config_of(&obs, &key, &agent.id()),
        || c.dump(),
    )
    .await;
    assert_eq!(rev.rev, 1);
    assert_eq!(config.node, agent.id());
    assert_eq!(config.hostname, "node1");
    eventually(
        "desired revision 1 in the status",
        || {
            c.node("node1")
                .filter(|n| n["status"]["desiredRevision"] == json!(1))
        },
        || c.dump(),
    )
    .await;
    assert_eq!(
        c.condition("node1", "ConfigApplied").unwrap().1,
        "NotApplied"
    );

    // The agent reports it applied: Ready, ConfigApplied, last seen.
    agent.report(&mqtt, rev, &sha).await;
    eventually(
        "the node Ready",
        || c.node("node1").filter(|n| n["status"]["phase"] == "Ready"),
        || c.dump(),
    )
    .await;
    let n = c.node("node1").unwrap();
    assert_eq!(n["status"]["appliedRevision"], json!(1));
    assert!(n["status"]["lastSeen"].is_string());
    assert_eq!(
        n["status"]["links"],
        json!([{"peer": ATTIC, "interface": "wg-attic", "up": true, "cost": 96, "rttMs": 3.5, "loss": 0.0}])
    );
    assert!(
        n["status"]["addresses"][0]
            .as_str()
            .unwrap()
            .starts_with("fdfc:b395:f348:")
    );
    for (t, want) in [
        ("Ready", "True"),
        ("ConfigApplied", "True"),
        ("Drifted", "False"),
        ("Degraded", "False"),
    ] {
        assert_eq!(
            c.condition("node1", t).unwrap().0,
            want,
            "{t}: {}",
            c.dump()
        );
    }
    assert_eq!(
        n["status"]["observedGeneration"],
        n["metadata"]["generation"]
    );
    assert_rbac(&c);
    ctl.stop().await;
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_change_republishes_only_the_nodes_using_it() {
    let c = Cluster::new();
    let (mut kitchen, mut attic) = test_keys();
    let (kitchen_id, attic_id) = (kitchen.id(), attic.id());
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    // Declared but not enrolled: no config, and the MeshNodes say why.
    c.waits_for_enrolment(&obs, 0, "kitchen", &kitchen_id).await;
    c.waits_for_enrolment(&obs, 0, "attic-pi", &attic_id).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    for id in [&kitchen_id, &attic_id] {
        eventually("both configs", || config_of(&obs, &key, id), || c.dump()).await;
    }
    assert_eq!(obs.revisions(&kitchen_id), vec![1]);
    assert_eq!(obs.revisions(&attic_id), vec![1]);

    // Rename the mesh radio of the kitchen's profile: only the kitchen changes.
    let profiles = Api::<HardwareProfile>::all(c.client.clone());
    let mut p = profiles.get("tplink-archer-c7-v2").await.unwrap();
    p.spec.radios[0].name = "radio9".into();
    profiles
        .replace("tplink-archer-c7-v2", &PostParams::default(), &p)
        .await
        .unwrap();
    let (rev, _, config) = eventually(
        "the kitchen's revision 2",
        || config_of(&obs, &key, &kitchen_id).filter(|c| c.0.rev == 2),
        || c.dump(),
    )
    .await;
    assert!(
        config
            .files
            .iter()
            .any(|f| f.content.contains("wireless.radio9.channel"))
    );
    eventually(
        "desired revision 2 in the kitchen's status",
        || {
            c.node("kitchen")
                .filter(|n| n["status"]["desiredRevision"] == json!(2))
        },
        || c.dump(),
    )
    .await;
    // A later change that touches both proves the attic was not republished in between.
    let meshes = Api::<Mesh>::namespaced(c.client.clone(), "default");
    meshes
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"radio": {"channels": {"5g": {"channel": 44}}}}})),
        )
        .await
        .unwrap();
    eventually(
        "the attic's revision 2",
        || config_of(&obs, &key, &attic_id).filter(|c| c.0.rev == 2),
        || c.dump(),
    )
    .await;
    eventually(
        "the kitchen's revision 3",
        || config_of(&obs, &key, &kitchen_id).filter(|c| c.0.rev == 3),
        || c.dump(),
    )
    .await;
    assert_eq!(
        obs.revisions(&attic_id),
        vec![1, 2],
        "the attic was republished by the profile change"
    );
    assert_eq!(rev.rev, 2);
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_nodes_and_meshes_clears_their_retained_topics() {
    let c = Cluster::new();
    let (mut kitchen, mut attic) = test_keys();
    let (kitchen_id, attic_id) = (kitchen.id(), attic.id());
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    for id in [&kitchen_id, &attic_id] {
        eventually("both configs", || config_of(&obs, &key, id), || c.dump()).await;
    }
    eventually(
        "the finalizer on the MeshNode",
        || {
            c.node("kitchen")
                .filter(|n| n["metadata"]["finalizers"] == json!(["sidenet.io/cleanup"]))
        },
        || c.dump(),
    )
    .await;

    let nodes = Api::<MeshNode>::namespaced(c.client.clone(), "default");
    nodes
        .delete("kitchen", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the MeshNode gone",
        || c.node("kitchen").is_none().then_some(()),
        || c.dump(),
    )
    .await;
    assert!(
        obs.on(&topics::config("riverside", &kitchen_id))
            .last()
            .unwrap()
            .is_empty()
    );
    assert!(!retained(c.port, &topics::config("riverside", &kitchen_id)).await);
    assert!(retained(c.port, &topics::config("riverside", &attic_id)).await);

    Api::<Mesh>::namespaced(c.client.clone(), "default")
        .delete("riverside", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the Mesh gone",
        || c.mesh().is_none().then_some(()),
        || c.dump(),
    )
    .await;
    assert!(!retained(c.port, &topics::config("riverside", &attic_id)).await);
    assert!(!retained(c.port, &topics::announce("riverside")).await);
    drop(mqtt);
    assert!(ctl.alive());
    assert_rbac(&c);
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manifests_and_a_broken_signing_key_give_events_and_conditions_not_a_crash() {
    let c = Cluster::new();
    // A signing key Secret without the key: the controller must not replace it.
    c.create(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "riverside-signing-key"},
                    "data": {"wrong": "eA=="}}),
    )
    .await;
    let (mut kitchen, _) = test_keys();
    let kitchen_id = kitchen.id();
    c.riverside(true, with_keys(&kitchen, &test_keys().1)).await;
    let mut opts = c.opts("ctl-a");
    opts.refresh = Duration::from_secs(1);
    let ctl = c.start(opts);
    let (obs, mqtt) = Observer::start(c.port).await;

    eventually(
        "a SigningKeyMissing Event",
        || {
            c.events()
                .into_iter()
                .find(|e| e.0 == "riverside" && e.1 == "SigningKeyMissing")
        },
        || c.dump(),
    )
    .await;
    let m = eventually(
        "the Mesh Degraded",
        || {
            c.mesh().filter(|m| {
                m["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Degraded" && c["status"] == "True")
                })
            })
        },
        || c.dump(),
    )
    .await;
    assert!(
        m["status"]["conditions"]
            .to_string()
            .contains("has no key \\\"signing.key\\\""),
        "{m:#}"
    );
    let blocked = eventually(
        "the kitchen blocked",
        || {
            // Until the Mesh's Secrets are read, the reason is that they were not read yet.
            c.condition("kitchen", "Degraded")
                .filter(|d| d.1 == "Blocked" && d.2.contains("riverside-signing-key"))
        },
        || c.dump(),
    )
    .await;
    assert!(blocked.2.contains("has no key"), "{blocked:?}");
    // Enrolled, the kitchen is still blocked by the key.
    c.enrol(
        &mqtt,
        &mut kitchen,
        ("default", "kitchen"),
        "kitchen",
        "tplink-archer-c7-v2",
    )
    .await;
    let blocked = eventually(
        "the kitchen blocked by the key once enrolled",
        || {
            c.condition("kitchen", "Degraded").filter(|d| {
                d.1 == "Blocked"
                    && d.2.contains("riverside-signing-key")
                    && c.condition("kitchen", "Enrolled").unwrap().0 == "True"
            })
        },
        || c.dump(),
    )
    .await;
    assert!(blocked.2.contains("riverside-signing-key"), "{blocked:?}");
    assert!(obs.revisions(&kitchen_id).is_empty());
    assert_eq!(
        c.api
            .get("v1/secrets", "default", "riverside-signing-key")
            .unwrap()["data"],
        json!({"wrong": "eA=="}),
        "the broken key Secret was overwritten"
    );
    assert!(ctl.alive());

    // The admin fixes the Secret: configs go out.
    let good = KeyPair::from_seed(&[9; 32]);
    Api::<Secret>::namespaced(c.client.clone(), "default")
        .patch(
            "riverside-signing-key",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"data": {"signing.key": base64_encode(good.to_file_text().as_bytes())}}),
            ),
        )
        .await
        .unwrap();
    let (rev, _, _) = eventually(
        "the kitchen's config",
        || config_of(&obs, &good.public(), &kitchen_id),
        || c.dump(),
    )
    .await;
    assert_eq!(rev.rev, 1);

    // A MeshNode with a channel its radio cannot do: an Event and a condition on it.
    c.create(json!({"apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode", "metadata": {"name": "porch"},
                    "spec": {"mesh": "riverside", "nodeId": "aaaaaaaaaaaaaaaa", "hardwareProfile": "tplink-archer-c7-v2",
                             "approved": true, "overrides": {"channel": 999}}}))
        .await;
    let ev = eventually(
        "an InvalidManifest Event on porch",
        || {
            c.events()
                .into_iter()
                .find(|e| e.0 == "porch" && e.1 == "InvalidManifest")
        },
        || c.dump(),
    )
    .await;
    assert!(ev.2.contains("spec.overrides.channel"), "{ev:?}");
    let d = eventually(
        "porch Degraded",
        || {
            c.condition("porch", "Degraded")
                .filter(|d| d.1 == "InvalidSpec")
        },
        || c.dump(),
    )
    .await;
    assert!(d.2.contains("channel 999"), "{d:?}");

    // Breaking a node that worked keeps its last good config.
    Api::<MeshNode>::namespaced(c.client.clone(), "default")
        .patch(
            "kitchen",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"overrides": {"txPower": 99}}})),
        )
        .await
        .unwrap();
    let ev = eventually(
        "an InvalidManifest Event on kitchen",
        || {
            c.events()
                .into_iter()
                .find(|e| e.0 == "kitchen" && e.1 == "InvalidManifest")
        },
        || c.dump(),
    )
    .await;
    assert!(
        ev.2.contains("spec.overrides.txPower") && ev.2.contains("previous valid spec stays"),
        "{ev:?}"
    );
    eventually(
        "kitchen Degraded",
        || {
            c.condition("kitchen", "Degraded")
                .filter(|d| d.1 == "InvalidSpec")
        },
        || c.dump(),
    )
    .await;
    assert_eq!(obs.revisions(&kitchen_id), vec![1]);
    assert!(ctl.alive());
    assert_rbac(&c);
    ctl.stop().await;
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_continues_the_revisions_from_the_cluster() {
    let c = Cluster::new();
    let (mut kitchen, mut attic) = test_keys();
    let kitchen_id = kitchen.id();
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    // A node declared with its id only: its key is learnt at enrolment.
    let mut porch = Agent::new(23);
    let porch_id = porch.id();
    c.create(json!({"apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode", "metadata": {"name": "porch"},
                    "spec": {"mesh": "riverside", "nodeId": porch_id, "hardwareProfile": "tplink-archer-c7-v2",
                             "approved": true}}))
        .await;
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    c.enrol(
        &mqtt,
        &mut porch,
        ("default", "porch"),
        "porch",
        "tplink-archer-c7-v2",
    )
    .await;
    for id in [&kitchen_id, &porch_id] {
        eventually("revision 1", || config_of(&obs, &key, id), || c.dump()).await;
    }
    Api::<Mesh>::namespaced(c.client.clone(), "default")
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"radio": {"channels": {"5g": {"channel": 44}}}}})),
        )
        .await
        .unwrap();
    let (r2, _, c2) = eventually(
        "kitchen revision 2",
        || config_of(&obs, &key, &kitchen_id).filter(|c| c.0.rev == 2),
        || c.dump(),
    )
    .await;
    let before = eventually(
        "revision 2 recorded",
        || {
            c.node("kitchen")
                .filter(|n| n["status"]["desiredRevision"] == json!(2))
        },
        || c.dump(),
    )
    .await;
    eventually(
        "porch's revision 2",
        || config_of(&obs, &key, &porch_id).filter(|c| c.0.rev == 2),
        || c.dump(),
    )
    .await;
    eventually(
        "porch's revision 2 recorded",
        || {
            c.node("porch")
                .filter(|n| n["status"]["desiredRevision"] == json!(2))
        },
        || c.dump(),
    )
    .await;
    assert_eq!(
        c.node("porch").unwrap()["status"]["enrolledKey"],
        json!(porch.key.public().to_base64())
    );
    ctl.stop().await;

    // A new pod: empty cache folder, same cluster. The enrolments are known from the cluster
    // (the agents do not enrol again once they run a config): from `spec.publicKey`, or for
    // the porch from the key its status recorded. The configs it renders are those of
    // revision 2 (same digest, recorded in the status with their validity): it publishes
    // nothing (docs/helm.md, "Restarts").
    let ctl = c.start(c.opts("ctl-b"));
    let sha2 = c.node("kitchen").unwrap()["status"]["configSha256"]
        .as_str()
        .unwrap()
        .to_string();
    c.report_until_applied(&mqtt, &mut kitchen, "kitchen", r2, &sha2)
        .await;
    assert_eq!(obs.revisions(&kitchen_id), vec![1, 2], "{}", c.dump());
    assert_eq!(obs.revisions(&porch_id), vec![1, 2], "{}", c.dump());
    let after = c.node("kitchen").unwrap();
    assert_eq!(after["status"]["desiredRevision"], json!(2));
    assert_eq!(after["status"]["subnetId"], before["status"]["subnetId"]);
    // A change continues the sequence from the cluster, with the same subnet, key and
    // passphrase.
    Api::<Mesh>::namespaced(c.client.clone(), "default")
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"radio": {"channels": {"5g": {"channel": 48}}}}})),
        )
        .await
        .unwrap();
    let (r3, _, c3) = eventually(
        "kitchen revision 3",
        || config_of(&obs, &key, &kitchen_id).filter(|c| c.0.rev == 3),
        || c.dump(),
    )
    .await;
    assert_eq!(r3.epoch, r2.epoch, "the epoch changed across the restart");
    assert_eq!(
        c3.subnet, c2.subnet,
        "the subnet changed across the restart"
    );
    assert_eq!(c3.sealed, c2.sealed, "same key, node key and passphrase");
    eventually(
        "revision 3 recorded",
        || {
            c.node("kitchen")
                .filter(|n| n["status"]["desiredRevision"] == json!(3))
        },
        || c.dump(),
    )
    .await;
    assert_eq!(obs.revisions(&kitchen_id), vec![1, 2, 3]);
    eventually(
        "porch's revision 3 from the new pod",
        || config_of(&obs, &key, &porch_id).filter(|c| c.0.rev == 3),
        || c.dump(),
    )
    .await;
    assert_eq!(obs.revisions(&porch_id), vec![1, 2, 3], "{}", c.dump());
    // Same signing key (from the Secret).
    assert_eq!(c.mesh_key().unwrap(), key);

    // A node whose MeshNode is recreated starts above the mesh's highest revision.
    let nodes = Api::<MeshNode>::namespaced(c.client.clone(), "default");
    let kitchen_obj = nodes.get("kitchen").await.unwrap();
    nodes
        .delete("kitchen", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the MeshNode gone",
        || c.node("kitchen").is_none().then_some(()),
        || c.dump(),
    )
    .await;
    let mark = obs.mark();
    let mut again = MeshNode::new("kitchen", kitchen_obj.spec.clone());
    again.metadata.namespace = Some("default".into());
    nodes.create(&PostParams::default(), &again).await.unwrap();
    // Deleting the MeshNode forgot the node's enrolment: nothing until it enrols again.
    c.waits_for_enrolment(&obs, mark, "kitchen", &kitchen_id)
        .await;
    c.enrol(
        &mqtt,
        &mut kitchen,
        ("default", "kitchen"),
        "kitchen",
        "tplink-archer-c7-v2",
    )
    .await;
    let (r, _, _) = eventually(
        "kitchen's config again",
        || config_of(&obs, &key, &kitchen_id).filter(|c| c.0 > r3),
        || c.dump(),
    )
    .await;
    assert!(r > r3, "{r:?} is not above {r3:?}");
    ctl.stop().await;
}

async fn scrape(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_publishes_and_a_standby_takes_over() {
    let c = Cluster::new();
    let (mut kitchen, mut attic) = test_keys();
    let kitchen_id = kitchen.id();
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    let (obs, mqtt) = Observer::start(c.port).await;
    let ports = [free_port(), free_port()];
    let mut running = Vec::new();
    for (i, name) in ["pod-a", "pod-b"].iter().enumerate() {
        let mut o = c.opts(name);
        o.leader_election = true;
        o.metrics_listen = Some(format!("127.0.0.1:{}", ports[i]).parse().unwrap());
        running.push(Some(c.start(o)));
    }
    let leader = |text: &str| metric(text, "sidenet_leader") == Some(1.0);
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    eventually(
        "kitchen's config",
        || config_of(&obs, &key, &kitchen_id),
        || c.dump(),
    )
    .await;
    let holder = c
        .api
        .get(
            "coordination.k8s.io/v1/leases",
            "default",
            "sidenet-controller",
        )
        .unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    let (lead, standby) = if holder == "pod-a" { (0, 1) } else { (1, 0) };
    // The counter moves right after the broker got the configs: poll it.
    let deadline = Instant::now() + WAIT;
    let m_lead = loop {
        let text = scrape(ports[lead], "/metrics").await.unwrap().1;
        if metric(&text, "sidenet_configs_published_total").unwrap_or(0.0) >= 2.0
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let m_standby = scrape(ports[standby], "/metrics").await.unwrap().1;
    assert!(leader(&m_lead), "{m_lead}");
    assert!(!leader(&m_standby), "{m_standby}");
    assert!(
        metric(&m_lead, "sidenet_configs_published_total").unwrap() >= 2.0,
        "{m_lead}"
    );
    assert_eq!(
        metric(&m_standby, "sidenet_configs_published_total"),
        Some(0.0),
        "{m_standby}"
    );
    assert!(m_lead.contains("sidenet_reconciles_total{kind=\"MeshNode\"}"));
    assert!(m_lead.contains("sidenet_nodes{phase="), "{m_lead}");
    for p in ports {
        assert_eq!(scrape(p, "/healthz").await.unwrap().0, 200);
    }
    // The map's data (docs/web.md): the holder's node table; a standby has none.
    let (code, body) = scrape(ports[lead], "/api/nodes").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let snap: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        snap["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == kitchen_id.as_str() && n["desired"]["rev"] == 1),
        "{body}"
    );
    let (code, body) = scrape(ports[lead], "/api/netjson").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"type\":\"NetworkGraph\""), "{body}");
    let (code, body) = scrape(ports[standby], "/api/nodes").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("does not reconcile"), "{body}");
    // The ALTO service (docs/content.md) in this mode too: the holder's network map has the
    // node's /64 as its PID (or no PID while it has none); a standby has no topology.
    let (code, body) = scrape(ports[lead], "/alto/networkmap").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let map: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(map["meta"]["vtag"]["resource-id"], "networkmap", "{body}");
    let kitchen_prefix = snap["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == kitchen_id.as_str())
        .map(|n| n["prefix"].clone())
        .unwrap();
    match kitchen_prefix.as_str() {
        Some(p) => assert_eq!(map["network-map"][&kitchen_id]["ipv6"][0], p, "{body}"),
        None => assert!(map["network-map"].get(&kitchen_id).is_none(), "{body}"),
    }
    assert_eq!(scrape(ports[lead], "/alto/directory").await.unwrap().0, 200);
    // The rate cost reads the engine's policies: one node, so no pair and no entry.
    let (code, body) = scrape(ports[lead], "/alto/costmap/sidenet-rate")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let rates: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        rates["meta"]["cost-type"]["cost-metric"], "priv:sidenet-rate",
        "{body}"
    );
    assert_eq!(rates["cost-map"], serde_json::json!({}), "{body}");
    let (code, body) = scrape(ports[standby], "/alto/costmap/routingcost")
        .await
        .unwrap();
    assert_eq!(code, 503, "{body}");
    eventually("both ready", || Some(()), String::new).await;
    let ready = scrape(ports[standby], "/readyz").await.unwrap().0;
    assert_eq!(ready, 200, "a standby must report ready");
    assert_eq!(obs.revisions(&kitchen_id), vec![1]);

    // The holder stops (SIGTERM path: it releases the Lease); the standby takes over. The
    // configs are unchanged, so it publishes nothing (docs/helm.md, "Restarts") until the
    // mesh changes; then it signs the next revision.
    let started = Instant::now();
    running[lead].take().unwrap().stop().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape(ports[standby], "/metrics").await.unwrap().1;
        if leader(&text) {
            break;
        }
        assert!(Instant::now() < deadline, "no takeover\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "takeover took {:?}",
        started.elapsed()
    );
    Api::<Mesh>::namespaced(c.client.clone(), "default")
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"radio": {"channels": {"5g": {"channel": 44}}}}})),
        )
        .await
        .unwrap();
    eventually(
        "the standby publishing revision 2",
        || config_of(&obs, &key, &kitchen_id).filter(|c| c.0.rev == 2),
        || c.dump(),
    )
    .await;
    assert_eq!(obs.revisions(&kitchen_id), vec![1, 2], "{}", c.dump());

    // The Lease was only ever created, read and updated.
    for r in c.api.requests() {
        if r.contains("/leases") {
            assert!(
                r.starts_with("GET ") || r.starts_with("POST ") || r.starts_with("PUT "),
                "{r}"
            );
        }
    }
    assert_rbac(&c);
    running[standby].take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_is_replaced_after_the_lease_expires() {
    let c = Cluster::new();
    let (mut kitchen, mut attic) = test_keys();
    let kitchen_id = kitchen.id();
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    let (obs, mqtt) = Observer::start(c.port).await;
    let mut a = c.opts("pod-a");
    a.leader_election = true;
    let a = c.start(a);
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    eventually(
        "kitchen's config from pod-a",
        || config_of(&obs, &key, &kitchen_id),
        || c.dump(),
    )
    .await;
    let mut b = c.opts("pod-b");
    b.leader_election = true;
    let b = c.start(b);
    // pod-a dies without releasing the Lease.
    a.task.abort();
    let started = Instant::now();
    let holder = || {
        c.api
            .get(
                "coordination.k8s.io/v1/leases",
                "default",
                "sidenet-controller",
            )
            .map(|l| l["spec"]["holderIdentity"].clone())
    };
    eventually(
        "pod-b holding the Lease",
        || (holder() == Some(json!("pod-b"))).then_some(()),
        || c.dump(),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "took over before the Lease expired: {took:?}"
    );
    // pod-b serves: a change gets the next revision from it (the unchanged config was not
    // published again).
    Api::<Mesh>::namespaced(c.client.clone(), "default")
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"radio": {"channels": {"5g": {"channel": 44}}}}})),
        )
        .await
        .unwrap();
    eventually(
        "pod-b publishing revision 2",
        || config_of(&obs, &key, &kitchen_id).filter(|c| c.0.rev == 2),
        || c.dump(),
    )
    .await;
    assert_eq!(obs.revisions(&kitchen_id), vec![1, 2], "{}", c.dump());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_riverside_example_renders_the_same_configs_in_both_modes() {
    // Both modes load the example files with one change: the MeshNodes carry the node ids and
    // public keys of test keys (`with_keys`), so that the test can enrol them. Each mode then
    // gets the same two enrolments and must publish the same configs. The sealed passphrase
    // differs (each mode has its own mesh signing key, which seeds the sealing): it is compared
    // opened, with the node's key.
    let (mut kitchen, mut attic) = test_keys();
    let ids = [kitchen.id(), attic.id()];
    let keys = with_keys(&kitchen, &attic);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "riverside-mesh"},
                        "stringData": {"passphrase": "correct-horse-battery"}});

    // Cluster mode: the example files, plus the passphrase Secret both modes share.
    let c = Cluster::new();
    c.create(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "riverside-mesh"},
                    "data": {"passphrase": base64_encode(b"correct-horse-battery")}}),
    )
    .await;
    c.riverside(true, &keys).await;
    let ctl = c.start(c.opts("ctl-a"));
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    c.waits_for_enrolment(&obs, 0, "kitchen", &ids[0]).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    let mut cluster = Vec::new();
    for id in &ids {
        cluster.push(
            eventually("a config", || config_of(&obs, &key, id), || c.dump())
                .await
                .2,
        );
    }
    ctl.stop().await;

    // Standalone mode: the same files loaded from disk by the standalone loader and core.
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("riverside");
    std::fs::create_dir(&example).unwrap();
    for f in ["mesh.yaml", "nodes.yaml"] {
        let text = std::fs::read_to_string(repo().join("examples/riverside").join(f)).unwrap();
        let mut docs = Vec::new();
        for doc in sidenet_crds::yaml::documents(&text) {
            let mut v: Value = doc.unwrap();
            keys(&mut v);
            docs.push(sidenet_crds::yaml::to_string(&v).unwrap());
        }
        std::fs::write(example.join(f), docs.join("---\n")).unwrap();
    }
    std::fs::write(
        dir.path().join("secret.yaml"),
        sidenet_crds::yaml::to_string(&secret).unwrap(),
    )
    .unwrap();
    let set = sidenet_controller::spec::manifest::load(&[
        example,
        repo().join("hardware-profiles"),
        dir.path().join("secret.yaml"),
    ])
    .unwrap();
    let store =
        sidenet_controller::reconcile::store::Store::open(&dir.path().join("s.redb"), 1).unwrap();
    let renderer =
        sidenet_controller::reconcile::render::Renderer::load(&repo().join("templates")).unwrap();
    let state = dir.path().join("state");
    let mut ctl = sidenet_controller::reconcile::core::Controller::new(
        store,
        renderer,
        Box::new(sidenet_controller::standalone::FsSecrets::new(Path::new(
            &state,
        ))),
    );
    let config_topics = ids.clone().map(|id| topics::config("riverside", &id));
    ctl.set_manifests(set, sidenet_controller::now()).unwrap();
    let out = ctl.flush().unwrap();
    assert!(
        !out.iter().any(|p| config_topics.contains(&p.topic)),
        "standalone published a config before the node enrolled"
    );
    // The same enrolments, as the controller receives them from the broker.
    for (agent, (hostname, profile)) in [
        (&mut kitchen, ("kitchen", "tplink-archer-c7-v2")),
        (&mut attic, ("attic", "raspberrypi-4b-awus036acm")),
    ] {
        let (topic, payload) = agent.enroll_message(hostname, profile);
        ctl.on_message(&topic, &payload, sidenet_controller::now())
            .unwrap();
    }
    let out = ctl.flush().unwrap();
    for (i, agent) in [&kitchen, &attic].into_iter().enumerate() {
        let id = &ids[i];
        let p = out
            .iter()
            .rfind(|p| p.topic == config_topics[i])
            .unwrap_or_else(|| panic!("standalone published no config for {id}"));
        let env = Envelope::parse(&p.payload, 1 << 20).unwrap();
        let signer = env.claimed_signer().unwrap();
        let body: NodeConfig = env
            .verify(Kind::Config, &signer)
            .unwrap()
            .body_json()
            .unwrap();
        let opened = |config: &NodeConfig| -> Vec<(String, Vec<u8>)> {
            config
                .sealed
                .iter()
                .map(|(name, v)| {
                    let ctx = sidenet_wire::seal::Context {
                        mesh: "riverside",
                        node: id,
                        name,
                    };
                    (
                        name.clone(),
                        sidenet_wire::seal::open(&agent.key, ctx, v).unwrap(),
                    )
                })
                .collect()
        };
        // The broker password is per deployment (derived from a secret each mode keeps its own
        // way); every other secret must be the same.
        let mut plain = opened(&body);
        let mut theirs = opened(&cluster[i]);
        for secrets in [&mut plain, &mut theirs] {
            let before = secrets.len();
            secrets.retain(|(name, _)| name != sidenet_wire::seal::MQTT_PASSWORD);
            assert_eq!(before, secrets.len() + 1, "node {id}: no broker password");
        }
        assert!(!plain.is_empty(), "node {id}: no sealed secret");
        assert_eq!(
            plain, theirs,
            "node {id}: the sealed secrets differ between standalone and cluster mode"
        );
        let without_sealed = |config: &NodeConfig| {
            let mut v = serde_json::to_value(config).unwrap();
            v.as_object_mut().unwrap().remove("sealed");
            v
        };
        assert_eq!(
            without_sealed(&body),
            without_sealed(&cluster[i]),
            "node {id} differs between standalone and cluster mode"
        );
    }
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl command.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed for the TLS test");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=sidenet test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_broker_over_tls_with_a_ca_from_a_file() {
    let c = Cluster::new();
    // A second Mosquitto with a TLS listener and a plaintext one for the observer.
    let dir = c.dir.path().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir);
    let (tls_port, plain_port) = (free_port(), free_port());
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nper_listener_settings false\nallow_anonymous true\npersistence false\n\
             listener {plain_port} 127.0.0.1\n\
             listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let _mosq = common::Proc::spawn(
        "mosquitto-tls",
        std::process::Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf),
        &dir.join("mosquitto.log"),
    );
    eventually(
        "the TLS listener",
        || std::net::TcpStream::connect(("127.0.0.1", tls_port)).ok(),
        String::new,
    )
    .await;
    let (mut kitchen, mut attic) = test_keys();
    let kitchen_id = kitchen.id();
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    let mut o = c.opts("ctl-a");
    o.broker = Some(format!("mqtts://127.0.0.1:{tls_port}"));
    o.broker_ca = Some(dir.join("ca.pem"));
    let ctl = c.start(o);
    let (obs, mqtt) = Observer::start(plain_port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    // The enrolments reach the controller through the TLS broker (its plaintext listener).
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    eventually(
        "kitchen's config through the TLS connection",
        || config_of(&obs, &key, &kitchen_id),
        || c.dump(),
    )
    .await;
    ctl.stop().await;

    // A CA that did not sign the broker's certificate: no connection, so nothing published.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    make_certs(&other);
    let mut o = c.opts("ctl-b");
    o.broker = Some(format!("mqtts://127.0.0.1:{tls_port}"));
    o.broker_ca = Some(other.join("ca.pem"));
    o.metrics_listen = Some(format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let port = o.metrics_listen.unwrap().port();
    let ctl = c.start(o);
    // A change: the new process signs revision 2 (recorded before publishing) but cannot
    // connect: revision 2 never reaches the broker and the pod is not ready.
    Api::<Mesh>::namespaced(c.client.clone(), "default")
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"radio": {"channels": {"5g": {"channel": 44}}}}})),
        )
        .await
        .unwrap();
    eventually(
        "revision 2 recorded",
        || {
            c.node("kitchen")
                .filter(|n| n["status"]["desiredRevision"] == json!(2))
        },
        || c.dump(),
    )
    .await;
    let window = Instant::now() + Duration::from_secs(1);
    while Instant::now() < window {
        assert_eq!(scrape(port, "/readyz").await.map(|r| r.0), Some(503));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        obs.revisions(&kitchen_id),
        vec![1],
        "published over an unverified TLS connection"
    );
    assert!(ctl.alive());
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_namespaces_mode_keeps_secrets_and_status_in_the_mesh_namespace() {
    let c = Cluster::new();
    // The example applied to namespace "community" by the test client, unchanged but for the
    // test keys of its MeshNodes.
    let (mut kitchen, attic) = test_keys();
    let kitchen_id = kitchen.id();
    let keys = with_keys(&kitchen, &attic);
    for f in [
        "examples/riverside/mesh.yaml",
        "examples/riverside/nodes.yaml",
    ] {
        let text = std::fs::read_to_string(repo().join(f)).unwrap();
        for doc in sidenet_crds::yaml::documents(&text) {
            let mut v: Value = doc.unwrap();
            keys(&mut v);
            let pp = PostParams::default();
            match v["kind"].as_str().unwrap() {
                "Mesh" => {
                    Api::<Mesh>::namespaced(c.client.clone(), "community")
                        .create(&pp, &serde_json::from_value(v).unwrap())
                        .await
                        .unwrap();
                }
                _ => {
                    Api::<MeshNode>::namespaced(c.client.clone(), "community")
                        .create(&pp, &serde_json::from_value(v).unwrap())
                        .await
                        .unwrap();
                }
            }
        }
    }
    c.apply_files(&[repo().join("hardware-profiles")], |_| {})
        .await;
    let mut o = c.opts("ctl-a");
    o.namespace = None;
    let ctl = c.start(o);
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually(
        "the Mesh public key",
        || {
            let m = c.api.get(MESHES, "community", "riverside")?;
            PublicKey::from_base64(m["status"]["publicKey"].as_str()?).ok()
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
    eventually(
        "kitchen's config",
        || config_of(&obs, &key, &kitchen_id),
        || c.dump(),
    )
    .await;
    assert!(
        c.api
            .get("v1/secrets", "community", "riverside-signing-key")
            .is_some()
    );
    assert!(
        c.api
            .get("v1/secrets", "community", "riverside-mesh")
            .is_some()
    );
    assert!(
        c.api
            .get("v1/secrets", "default", "riverside-signing-key")
            .is_none()
    );
    eventually(
        "kitchen's status",
        || {
            c.api
                .get(NODES, "community", "kitchen")
                .filter(|n| n["status"]["desiredRevision"] == json!(1))
        },
        || c.dump(),
    )
    .await;
    ctl.stop().await;
}

/// Client usernames, and the anonymous role's ACL topics with their allow flags.
type DynsecState = (Vec<String>, Vec<(String, bool)>);

/// The ACL roles and clients in Mosquitto's dynamic security file (Mosquitto saves it after
/// every change): (client usernames, the anonymous role's ACL topics with allow flags).
fn dynsec_state(dir: &Path) -> Option<DynsecState> {
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("dynsec.json")).ok()?).ok()?;
    let clients = v["clients"]
        .as_array()?
        .iter()
        .filter_map(|c| c["username"].as_str().map(String::from))
        .collect();
    let anon = v["roles"]
        .as_array()?
        .iter()
        .find(|r| r["rolename"] == "sidenet-anonymous")?["acls"]
        .as_array()?
        .iter()
        .filter_map(|a| Some((a["topic"].as_str()?.to_string(), a["allow"].as_bool()?)))
        .collect();
    Some((clients, anon))
}

/// Kubernetes mode with an external Mosquitto administered through its dynamic security
/// plugin: an approved node gets its own broker client and, until it logs in with its
/// password, an enrolment window on its own topics; once it says it logs in, the window closes
/// (and stays closed across a controller restart, from `status.brokerLogin`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_credentials_on_mosquitto_with_dynamic_security() {
    let c = Cluster::with_broker(common::mosquitto_dynsec);
    c.riverside(false, set_mode("auto")).await;
    let (user, password) = common::DYNSEC_ADMIN;
    let opts = |name: &str| Options {
        broker_username: Some(user.into()),
        broker_password: Some(password.into()),
        broker_dynsec: true,
        ..c.opts(name)
    };
    let ctl = c.start(opts("ctl-a"));
    let dir = c.dir.path().to_path_buf();
    eventually(
        "the plugin set up for the mesh, the admin user with the controller role",
        || {
            let v: Value =
                serde_json::from_slice(&std::fs::read(dir.join("dynsec.json")).ok()?).ok()?;
            let admin = v["clients"]
                .as_array()?
                .iter()
                .find(|c| c["username"] == user)?;
            let has_role = admin["roles"]
                .as_array()?
                .iter()
                .any(|r| r["rolename"] == "sidenet-controller");
            let (_, anon) = dynsec_state(&dir)?;
            (has_role
                && anon
                    .iter()
                    .any(|(t, _)| t == "sidenet/v1/riverside/enroll/+"))
            .then_some(())
        },
        || c.dump(),
    )
    .await;
    // The admin user now holds the controller role too (the plugin disconnected it once).
    let (obs, mqtt) = Observer::start_as(c.port, Some((user, password))).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    let mut agent = Agent::new(21);
    let id = agent.id();
    // Enrol as an agent does: again until answered (the controller reconnects once, when the
    // plugin gives its user the controller role, and enrolments are not retained).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (rev, sha, config) = loop {
        agent
            .enroll(&mqtt, "node21", "raspberrypi-4b-awus036acm")
            .await;
        let retry = std::time::Instant::now() + Duration::from_secs(2);
        let mut got = None;
        while got.is_none() && std::time::Instant::now() < retry {
            got = config_of(&obs, &key, &id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(g) = got {
            break g;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no config for the node\n{}",
            c.dump()
        );
    };
    assert!(
        config
            .sealed
            .contains_key(sidenet_wire::seal::MQTT_PASSWORD)
    );
    let window = format!("sidenet/v1/riverside/nodes/{id}/config");
    eventually(
        "the node's broker client and its enrolment window",
        || {
            dynsec_state(&dir).filter(|(clients, anon)| {
                clients.contains(&id) && anon.iter().any(|(t, a)| *t == window && *a)
            })
        },
        || c.dump(),
    )
    .await;
    agent.report_login(&mqtt, rev, &sha, true).await;
    let deny = format!("sidenet/v1/riverside/enroll/{id}");
    eventually(
        "the window closed once the node logs in",
        || {
            dynsec_state(&dir).filter(|(_, anon)| {
                !anon.iter().any(|(t, _)| *t == window)
                    && anon.iter().any(|(t, a)| *t == deny && !*a)
            })
        },
        || c.dump(),
    )
    .await;
    eventually(
        "status.brokerLogin",
        || {
            c.node("node21")
                .filter(|n| n["status"]["brokerLogin"] == json!(true))
        },
        || c.dump(),
    )
    .await;
    // A restarted controller keeps it closed.
    ctl.stop().await;
    let ctl = c.start(opts("ctl-b"));
    eventually(
        "the restarted controller to republish the node's config",
        || {
            (obs.revisions(&id).len() >= 2 || c.condition("node21", "Ready").is_some())
                .then_some(())
        },
        || c.dump(),
    )
    .await;
    let (_, anon) = dynsec_state(&dir).unwrap();
    assert!(!anon.iter().any(|(t, _)| *t == window), "{anon:?}");
    ctl.stop().await;
}

/// Kubernetes mode with the embedded broker and its TLS listener (`SIDENET_TLS_*`): a node
/// connects over TLS, pinned to the CA that signed the listener's certificate, and receives the
/// Mesh's retained announcement; pinned to another CA it gets no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_serves_nodes_over_tls() {
    let c = Cluster::new();
    let dir = c.dir.path().join("tls");
    std::fs::create_dir_all(dir.join("other")).unwrap();
    make_certs(&dir);
    make_certs(&dir.join("other"));
    let (kitchen, attic) = test_keys();
    c.riverside(true, with_keys(&kitchen, &attic)).await;
    let (plain, tls) = (free_port(), free_port());
    let mut o = c.opts("ctl-a");
    o.broker = None;
    o.listen = format!("127.0.0.1:{plain}").parse().unwrap();
    o.tls = Some(sidenet_controller::transport::broker::TlsListen {
        addr: format!("127.0.0.1:{tls}").parse().unwrap(),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    });
    let ctl = c.start(o);
    eventually(
        "the TLS listener",
        || std::net::TcpStream::connect(("127.0.0.1", tls)).ok(),
        || c.dump(),
    )
    .await;
    let announce = topics::announce("riverside");
    let node = |ca: PathBuf| {
        let mut o = MqttOptions::new(kitchen.id(), "127.0.0.1", tls);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let t = kubernetes::tls_config(Some(&ca)).unwrap();
        o.set_transport(rumqttc::Transport::tls_with_config(t));
        AsyncClient::new(o, 10)
    };
    let (client, mut el) = node(dir.join("ca.pem"));
    client.subscribe(&announce, QoS::AtLeastOnce).await.unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == announce => return p,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("node over TLS: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no announcement over TLS\n{}", c.dump()));
    // Retained, or live if the node subscribed before the controller published: either way
    // the signed announcement, through TLS.
    assert!(Envelope::parse(&got.payload, 1 << 20).is_ok(), "{got:?}");
    // Pinned to another CA (make_certs names every CA alike, so the issuer is found by name
    // and its signature fails): the handshake fails, every time.
    let (_client, mut el) = node(dir.join("other/ca.pem"));
    for _ in 0..3 {
        let e = tokio::time::timeout(WAIT, el.poll())
            .await
            .expect("a TLS connection attempt")
            .expect_err("connected with a certificate the pinned CA did not sign");
        assert!(e.to_string().contains("BadSignature"), "{e}");
    }
    ctl.stop().await;
}
