//! Kubernetes mode: NodeProvision objects run by the controller (the provisioning code of
//! standalone mode) against real sshd hosts, into a mesh in token mode, so every new node
//! enrols with a single-use token minted into the mesh's token Secret, kept hashed.
//!
//! Against the in-memory API server (`kubefake`, with the chart's RBAC) and mosquitto; the
//! real agent binary (`target/debug/sidenet-agent`, built by `cargo build -p sidenet-agent`)
//! runs on fake device roots behind OpenSSH servers on loopback (the helpers of
//! `provision/tests/common`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;
#[path = "../../provision/tests/common/mod.rs"]
mod pcommon;

use std::process::Command;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sidenet_crds::NodeProvision;

use kubecluster::*;
use pcommon::{Agents, Auth, Sshd};

const NPS: &str = "sidenet.io/v1alpha1/nodeprovisions";

fn provision(
    name: &str,
    gate: &Sshd,
    shed: &Sshd,
    dev: &dyn Fn(&str) -> String,
    port: u16,
) -> Value {
    json!({
        "apiVersion": "sidenet.io/v1alpha1",
        "kind": "NodeProvision",
        "metadata": {"name": name, "namespace": "default", "annotations": {"sidenet.io/retry": "1"}},
        "spec": {
            "mesh": "riverside",
            "broker": format!("mqtt://127.0.0.1:{port}"),
            "parallelism": 2,
            "hostKeyPolicy": "trustOnFirstUse",
            "enrollmentTimeoutSeconds": 60,
            "defaults": {"credentials": {"privateKeySecretRef": {"name": "fleet-ssh", "key": "id_ed25519"}}},
            "targets": [
                {"host": "127.0.0.1", "port": gate.port, "name": "gate", "root": dev("gate")},
                {"host": "127.0.0.1", "port": shed.port, "name": "shed", "root": dev("shed")},
            ],
        },
    })
}

/// The job's status once it carries a fingerprint other than `not`.
fn finished(c: &Cluster, name: &str, not: Option<&str>) -> Option<Value> {
    let st = c.api.get(NPS, "default", name)?["status"].clone();
    let fp = st["fingerprint"].as_str()?;
    (Some(fp) != not).then_some(st)
}

fn host(st: &Value, port: u16) -> &Value {
    st["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == format!("root@127.0.0.1:{port}"))
        .unwrap()
}

fn tokens(c: &Cluster) -> Vec<(String, Value)> {
    c.api
        .get("v1/secrets", "default", "riverside-enrolment-tokens")
        .map(|s| {
            s["data"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    use base64::Engine;
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .unwrap();
                    (k.clone(), serde_json::from_slice(&raw).unwrap())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn status_writes(c: &Cluster, name: &str) -> usize {
    c.api
        .requests()
        .iter()
        .filter(|r| {
            !r.ends_with(" test-client")
                && r.starts_with("PATCH ")
                && r.contains(&format!("/nodeprovisions/{name}/status"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_provision_objects_run_on_real_ssh_hosts_with_hashed_tokens() {
    let c = Cluster::new();
    let t = c.dir.path().to_path_buf();
    let templates = t.join("templates");
    pcommon::run(
        Command::new("cp")
            .arg("-r")
            .arg(common::repo().join("templates"))
            .arg(&templates),
    );
    pcommon::test_templates(&templates);
    pcommon::dist(&t.join("agents"), &["x86_64", "mips_24kc"]);
    pcommon::keygen(&t.join("fleet-key"));
    let key_pub = std::fs::read_to_string(t.join("fleet-key.pub")).unwrap();
    let pem = std::fs::read_to_string(t.join("fleet-key")).unwrap();
    let devices = t.join("devices");
    let dev = |n: &str| devices.join(n).display().to_string();
    pcommon::fake_device(&devices.join("gate"), None, &["phy0"]);
    pcommon::fake_device(&devices.join("shed"), None, &["phy0"]);
    let _agents = Agents(vec![devices.join("gate"), devices.join("shed")]);
    let gate = Sshd::start(&t.join("sshd"), "gate", Auth::Key, &key_pub);
    let mut shed = Sshd::start(&t.join("sshd"), "shed", Auth::Key, &key_pub);
    shed.stop();

    c.riverside(false, set_mode("token")).await;
    Api::<Secret>::namespaced(c.client.clone(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "fleet-ssh", "namespace": "default"},
                "stringData": {"id_ed25519": pem},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let mut opts = c.opts("ctl-a");
    opts.templates = templates.clone();
    opts.agents = t.join("agents");
    let ctl = c.start(opts.clone());
    eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    let nps: Api<NodeProvision> = Api::namespaced(c.client.clone(), "default");
    nps.create(
        &PostParams::default(),
        &serde_json::from_value(provision("street-1", &gate, &shed, &dev, c.port)).unwrap(),
    )
    .await
    .unwrap();

    // The job runs on its own: the gate is provisioned and enrols with a minted token, the
    // shed (its sshd down) fails.
    let long = |what: &str| format!("{what}\n{}", c.dump());
    let st = wait_long(
        "NodeProvision/street-1 to finish",
        || finished(&c, "street-1", None),
        || long(""),
    )
    .await;
    assert_eq!(
        (st["succeeded"].as_u64(), st["failed"].as_u64()),
        (Some(1), Some(1)),
        "{st:#}"
    );
    let g = host(&st, gate.port);
    assert_eq!(g["result"], "Provisioned", "{st:#}");
    let id = g["nodeId"].as_str().unwrap().to_string();
    let s = host(&st, shed.port);
    assert_eq!(s["result"], "Failed");
    assert!(s["message"].as_str().unwrap().contains("refused"), "{s}");
    assert!(
        st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Complete" && c["status"] == "False"),
        "{st:#}"
    );
    // Really enrolled: the MeshNode made for the node is approved by its token and enrolled.
    let node = eventually(
        "the gate's MeshNode to be Enrolled and Approved by a token",
        || {
            c.api.list(NODES).into_iter().find(|n| {
                n["spec"]["nodeId"] == id.as_str()
                    && n["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c["type"] == "Approved"
                                && c["status"] == "True"
                                && c["reason"] == "Token"
                        }) && cs
                            .iter()
                            .any(|c| c["type"] == "Enrolled" && c["status"] == "True")
                    })
            })
        },
        || c.dump(),
    )
    .await;
    assert_eq!(node["status"]["reportedHostname"], "gate", "{node:#}");
    // The token Secret holds hashes only: one token, used by the gate.
    let toks = tokens(&c);
    assert_eq!(toks.len(), 1, "{toks:?}");
    let (hash, entry) = &toks[0];
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hash}"
    );
    assert_eq!(entry["usedBy"], id.as_str(), "{entry}");
    // The token the agent got is in its config on the device, and is not in the Secret.
    let agent_conf = std::fs::read_to_string(devices.join("gate/etc/sidenet/agent.json")).unwrap();
    let conf: Value = serde_json::from_str(&agent_conf).unwrap();
    let token = conf["token"].as_str().unwrap();
    assert_eq!(sidenet_wire::codec::sha256_hex(token.as_bytes()), *hash);
    let secret = c
        .api
        .get("v1/secrets", "default", "riverside-enrolment-tokens")
        .unwrap();
    assert!(!secret.to_string().contains(token));
    assert!(
        c.events()
            .iter()
            .any(|(_, reason, note)| reason == "ProvisioningFailed" && note.contains("refused")),
        "{:?}",
        c.events()
    );

    // A restart runs no finished job again: a job created after the restart is reconciled,
    // street-1's status is not written.
    ctl.stop().await;
    let writes = status_writes(&c, "street-1");
    let ctl = c.start(opts.clone());
    let mut other = provision("elsewhere", &gate, &shed, &dev, c.port);
    other["spec"]["mesh"] = json!("nowhere");
    nps.create(
        &PostParams::default(),
        &serde_json::from_value(other).unwrap(),
    )
    .await
    .unwrap();
    eventually(
        "the job naming no mesh to be refused",
        || {
            let st = c.api.get(NPS, "default", "elsewhere")?["status"].clone();
            let cond = st["conditions"][0].clone();
            (cond["reason"] == "InvalidSpec").then_some(cond)
        },
        || c.dump(),
    )
    .await;
    assert_eq!(
        status_writes(&c, "street-1"),
        writes,
        "a finished job ran again after a restart"
    );

    // The shed is back; the admin bumps the retry annotation: the job runs again, the gate
    // is already provisioned, the shed enrols with a token of its own.
    shed.change_host_key();
    nps.patch(
        "street-1",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": {"sidenet.io/retry": "2"}}})),
    )
    .await
    .unwrap();
    let fp = st["fingerprint"].as_str().unwrap().to_string();
    let st = wait_long(
        "NodeProvision/street-1 to finish again",
        || finished(&c, "street-1", Some(&fp)),
        || long(""),
    )
    .await;
    assert_eq!(
        host(&st, gate.port)["result"],
        "AlreadyProvisioned",
        "{st:#}"
    );
    assert_eq!(host(&st, shed.port)["result"], "Provisioned", "{st:#}");
    assert_eq!(
        (st["succeeded"].as_u64(), st["failed"].as_u64()),
        (Some(2), Some(0))
    );
    let shed_id = host(&st, shed.port)["nodeId"].as_str().unwrap().to_string();
    let toks = tokens(&c);
    assert_eq!(toks.len(), 2, "{toks:?}");
    assert!(
        toks.iter().any(|(_, e)| e["usedBy"] == shed_id.as_str()),
        "{toks:?}"
    );
    assert!(
        c.events()
            .iter()
            .any(|(_, reason, _)| reason == "Provisioned"),
        "{:?}",
        c.events()
    );
    assert!(c.api.refused().is_empty(), "{:?}", c.api.refused());
    assert_rbac(&c);
    ctl.stop().await;
}

/// [`eventually`] with provisioning's longer deadline (SSH, install, enrolment).
async fn wait_long<T>(
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(150);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", context());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
