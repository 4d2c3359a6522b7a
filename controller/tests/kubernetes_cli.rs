//! `sidenetctl --kubeconfig` against Kubernetes mode: join-code, status, approve, token and
//! remove through a kubeconfig that reaches the in-memory API server over HTTP (`kubefake`,
//! served on loopback), with the controller running against the same server and mosquitto.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;

use std::path::{Path, PathBuf};
use std::process::Command;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use sidenet_crds::Mesh;

use kubecluster::*;

/// Runs `sidenetctl --kubeconfig KC ARGS`; returns (success, stdout, stderr).
async fn ctl(kc: &Path, args: &[&str]) -> (bool, String, String) {
    let kc: PathBuf = kc.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(common::bin("sidenetctl"))
            .arg("--kubeconfig")
            .arg(&kc)
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn node_by_id(c: &Cluster, id: &str) -> Option<Value> {
    c.api
        .list(NODES)
        .into_iter()
        .find(|n| n["spec"]["nodeId"] == id)
}

fn approved_by(c: &Cluster, id: &str) -> Option<String> {
    let n = node_by_id(c, id)?;
    n["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Approved" && c["status"] == "True")
        .map(|c| c["reason"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidenetctl_works_against_a_cluster_through_a_kubeconfig() {
    let c = Cluster::new();
    c.riverside(false, set_mode("approval")).await;
    let run = c.start(c.opts("ctl-a"));
    let port = kubefake::serve::serve(c.api.tagged("sidenetctl")).await;
    let kc = c.dir.path().join("kubeconfig");
    kubefake::serve::kubeconfig(&kc, port, "default");
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;

    // join-code: the code of the Mesh's public key.
    let (ok, out, err) = ctl(&kc, &["join-code", "--mesh", "riverside"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        sidenet_wire::join::JoinCode::new("riverside", &key).to_string()
    );
    let (ok, _, err) = ctl(&kc, &["join-code", "--mesh", "elsewhere"]).await;
    assert!(!ok);
    assert!(
        err.contains("--mesh elsewhere: no Mesh with that network name in namespace default"),
        "{err}"
    );

    // A node asks to join (approval mode): it waits, with a MeshNode the controller made.
    let mut porch = Agent::new(31);
    let id = porch.id();
    let deadline = std::time::Instant::now() + WAIT;
    let waiting = loop {
        // Again until the controller (subscribed once it is ready) made its MeshNode.
        porch
            .enroll(&mqtt, "porch", "pcengines-apu2-wle600vx")
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if let Some(n) = node_by_id(&c, &id) {
            break n;
        }
        assert!(std::time::Instant::now() < deadline, "{}", c.dump());
    };
    let name = waiting["metadata"]["name"].as_str().unwrap().to_string();
    let (ok, out, err) = ctl(&kc, &["status", "-o", "json"]).await;
    assert!(ok, "{err}");
    let st: Value = serde_json::from_str(&out).unwrap();
    let row = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["approved"], false, "{st:#}");
    assert_eq!(row["name"], name.as_str());
    let (ok, out, _) = ctl(&kc, &["status"]).await;
    assert!(
        ok && out.starts_with("MESHNODE") && out.contains(&id),
        "{out}"
    );

    // approve: spec.approved on its MeshNode; the controller admits it and publishes.
    let (ok, out, err) = ctl(&kc, &["approve", &id]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("approved {id} (MeshNode default/{name}")),
        "{out}"
    );
    assert_eq!(node_by_id(&c, &id).unwrap()["spec"]["approved"], true);
    eventually(
        "a config for the approved node",
        || config_of(&obs, &key, &id),
        || c.dump(),
    )
    .await;
    let (ok, _, err) = ctl(&kc, &["approve", "nobody"]).await;
    assert!(!ok);
    assert!(
        err.contains(
            "no MeshNode named \"nobody\" or with spec.nodeId \"nobody\" in namespace default"
        ),
        "{err}"
    );

    // token: the mesh switches to token mode; a token from sidenetctl admits a new node once.
    Api::<Mesh>::namespaced(c.client.clone(), "default")
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"enrollment": {"mode": "token"}}})),
        )
        .await
        .unwrap();
    let (ok, out, err) = ctl(&kc, &["token", "--mesh", "riverside", "--hours", "2"]).await;
    assert!(ok, "{err}");
    let token = out.trim().to_string();
    assert_eq!(token.len(), 32, "{out}");
    let secret = c
        .api
        .get("v1/secrets", "default", "riverside-enrolment-tokens")
        .unwrap();
    let hash = sidenet_wire::codec::sha256_hex(token.as_bytes());
    assert!(secret["data"].get(&hash).is_some(), "{secret:#}");
    assert!(
        !secret.to_string().contains(&token),
        "the token itself was stored"
    );
    // A wrong token is refused; the right one admits the node, approved by its token.
    let mut shed = Agent::new(32);
    let shed_id = shed.id();
    shed.enroll_token(&mqtt, "shed", "not-a-token").await;
    eventually(
        "the wrong token refused",
        || {
            c.events().into_iter().find(|(_, reason, note)| {
                reason == "NodeRejected" && note.contains("invalid or expired token")
            })
        },
        || c.dump(),
    )
    .await;
    assert!(node_by_id(&c, &shed_id).is_none());
    let deadline = std::time::Instant::now() + WAIT;
    while approved_by(&c, &shed_id).is_none() {
        assert!(std::time::Instant::now() < deadline, "{}", c.dump());
        shed.enroll_token(&mqtt, "shed", &token).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(approved_by(&c, &shed_id).as_deref(), Some("Token"));
    eventually(
        "the token marked used in its Secret",
        || {
            let s = c
                .api
                .get("v1/secrets", "default", "riverside-enrolment-tokens")?;
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(s["data"][&hash].as_str()?)
                .ok()?;
            let e: Value = serde_json::from_slice(&raw).ok()?;
            (e["usedBy"] == shed_id.as_str()).then_some(())
        },
        || c.dump(),
    )
    .await;
    // The same token again, for another node: refused. (The Event recorder counts a repeat
    // NodeRejected on the Mesh without changing its note, so the proof is ordering: a node
    // that enrols after it with a fresh token gets in, the first one does not.)
    let mut loft = Agent::new(33);
    loft.enroll_token(&mqtt, "loft", &token).await;
    let (ok, out, err) = ctl(&kc, &["token", "--mesh", "riverside"]).await;
    assert!(ok, "{err}");
    let fresh = out.trim().to_string();
    let mut attic = Agent::new(34);
    let attic_id = attic.id();
    let deadline = std::time::Instant::now() + WAIT;
    while approved_by(&c, &attic_id).is_none() {
        assert!(std::time::Instant::now() < deadline, "{}", c.dump());
        attic.enroll_token(&mqtt, "attic", &fresh).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(
        node_by_id(&c, &loft.id()).is_none(),
        "a used token admitted a second node"
    );

    // Expired entries, used or not, are removed at the next read of the Secret (a node asking
    // to enrol); the valid ones, used or not, stay.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(c.client.clone(), "default");
    let past = sidenet_controller::now() - 10;
    let (old_unused, old_used) = ("a".repeat(64), "b".repeat(64));
    let entry = |used: Option<&str>| {
        k8s_openapi::ByteString(
            serde_json::to_vec(&json!({"created": past - 100, "expires": past, "usedBy": used}))
                .unwrap(),
        )
    };
    secrets
        .patch(
            "riverside-enrolment-tokens",
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {
                &old_unused: entry(None),
                &old_used: entry(Some("zzzzzzzzzzzzzzzz")),
            }})),
        )
        .await
        .unwrap();
    let keys = || -> Option<std::collections::BTreeSet<String>> {
        let s = c
            .api
            .get("v1/secrets", "default", "riverside-enrolment-tokens")?;
        Some(s["data"].as_object()?.keys().cloned().collect())
    };
    assert!(keys().unwrap().contains(&old_used), "{:?}", keys());
    let valid: std::collections::BTreeSet<String> = [&token, &fresh]
        .iter()
        .map(|t| sidenet_wire::codec::sha256_hex(t.as_bytes()))
        .collect();
    let deadline = std::time::Instant::now() + WAIT;
    while keys().is_none_or(|k| k != valid) {
        assert!(
            std::time::Instant::now() < deadline,
            "expired tokens not pruned: {:?}\n{}",
            keys(),
            c.dump()
        );
        loft.enroll_token(&mqtt, "loft", "not-a-token").await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    // remove: the MeshNode goes, the controller clears the node's retained config.
    let (ok, out, err) = ctl(&kc, &["remove", &name]).await;
    assert!(ok, "{err}");
    assert!(out.contains(&format!("removed {id}")), "{out}");
    eventually(
        "the removed MeshNode gone",
        || node_by_id(&c, &id).is_none().then_some(()),
        || c.dump(),
    )
    .await;
    assert!(
        !retained(c.port, &sidenet_wire::topics::config("riverside", &id)).await,
        "the removed node's config is still retained"
    );
    // Commands without a cluster meaning are refused with --kubeconfig.
    let (ok, _, err) = ctl(&kc, &["metrics"]).await;
    assert!(!ok && err.contains("--kubeconfig works with"), "{err}");
    assert!(c.api.refused().is_empty(), "{:?}", c.api.refused());
    assert_rbac(&c);
    run.stop().await;
}
