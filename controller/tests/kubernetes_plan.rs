//! `sidenetctl --kubeconfig KC plan -f DIR` against Kubernetes mode: the controller runs
//! against the in-memory API server (`kubefake`, also served on loopback for `sidenetctl`) and
//! mosquitto; the plan of a folder is made from the namespace's objects and the revisions their
//! status records. Golden plans (text and JSON) for a channel change, a new node (approved by
//! the folder) and a removed node, in `controller/tests/golden-plan-kubernetes/`; exit codes 0,
//! 2 and 1; and a plan that matches exactly the revisions the controller then publishes.
//!
//! Regenerate the golden files with
//! `UPDATE_GOLDEN=1 cargo test -p sidenet-controller --test kubernetes_plan`, and review the
//! diff.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod kubecluster;
mod kubefake;

use std::path::{Path, PathBuf};
use std::process::Command;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use sidenet_controller::reconcile::diff::PlanReport;
use sidenet_crds::Mesh;

use common::repo;
use kubecluster::*;

/// Runs `sidenetctl --kubeconfig KC plan -f DIR --templates TEMPLATES ARGS`; returns (exit
/// status, stdout, stderr).
async fn plan(kc: &Path, dir: &Path, args: &[&str]) -> (i32, String, String) {
    let (kc, dir) = (kc.to_path_buf(), dir.to_path_buf());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(common::bin("sidenetctl"))
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["plan", "-f"])
            .arg(&dir)
            .arg("--templates")
            .arg(repo().join("templates"))
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn plan_json(kc: &Path, dir: &Path) -> (i32, PlanReport) {
    let (code, out, err) = plan(kc, dir, &["--json"]).await;
    let report = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, report)
}

/// The example's documents (mesh.yaml, nodes.yaml) with `edit` applied.
fn example_docs(edit: &dyn Fn(&mut Value)) -> Vec<Value> {
    let mut docs = Vec::new();
    for f in ["mesh.yaml", "nodes.yaml"] {
        let text = std::fs::read_to_string(repo().join("examples/riverside").join(f)).unwrap();
        for doc in sidenet_crds::yaml::documents(&text) {
            let mut v = doc.unwrap();
            if v.is_null() {
                continue;
            }
            edit(&mut v);
            docs.push(v);
        }
    }
    docs
}

/// Writes `docs` as one multi-document YAML file, `DIR/manifests.yaml`.
fn write_folder(dir: &Path, docs: &[Value]) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let text: Vec<String> = docs
        .iter()
        .map(|d| sidenet_crds::yaml::to_string(d).unwrap())
        .collect();
    std::fs::write(dir.join("manifests.yaml"), text.join("---\n")).unwrap();
    dir.to_path_buf()
}

fn channel44(docs: &mut [Value]) {
    for d in docs.iter_mut().filter(|d| d["kind"] == "Mesh") {
        assert_eq!(d["spec"]["radio"]["channels"]["5g"]["channel"], json!(36));
        d["spec"]["radio"]["channels"]["5g"]["channel"] = json!(44);
    }
}

/// What varies from run to run, named: node ids by MeshNode name, the state epoch, and each
/// node's revisions relative to the one its status records (`<R>`, `<R+1>`) or, for a node
/// without one, to the mesh's highest revision (`<H+1>`).
struct Names {
    ids: Vec<(String, String)>,
    epoch: u64,
    desired: Vec<(String, u64)>,
    highest: u64,
}

impl Names {
    fn read(c: &Cluster) -> Names {
        let mut ids = Vec::new();
        let mut desired = Vec::new();
        let mut epoch = 0;
        for n in c.api.list(NODES) {
            let id = n["spec"]["nodeId"].as_str().unwrap().to_string();
            ids.push((
                id.clone(),
                n["metadata"]["name"].as_str().unwrap().to_string(),
            ));
            if let Some(r) = n["status"]["desiredRevision"].as_u64() {
                desired.push((id, r));
            }
            epoch = epoch.max(n["status"]["desiredEpoch"].as_u64().unwrap_or(0));
        }
        desired.sort();
        let mesh = c.mesh().unwrap();
        Names {
            ids,
            epoch,
            desired,
            highest: mesh["status"]["highestRevision"].as_u64().unwrap_or(0),
        }
    }

    fn rev(&self, node: &str, rev: u64) -> String {
        match self.desired.iter().find(|(id, _)| id == node) {
            Some((_, d)) if rev == *d => "<R>".into(),
            Some((_, d)) if rev == d + 1 => "<R+1>".into(),
            None if rev == self.highest + 1 => "<H+1>".into(),
            _ => format!("{rev} (unexpected)"),
        }
    }

    fn ids(&self, text: &str) -> String {
        let mut t = text.replace(&self.epoch.to_string(), "<EPOCH>");
        for (id, name) in &self.ids {
            t = t.replace(id, &format!("<{name}>"));
        }
        t
    }

    fn text(&self, report: &PlanReport) -> String {
        let mut out = String::new();
        for line in report.to_text().lines() {
            let mut l = line.to_string();
            let node = [
                report
                    .changes
                    .iter()
                    .map(|c| c.node.clone())
                    .collect::<Vec<_>>(),
                report.blocked.iter().map(|b| b.node.clone()).collect(),
                report.removed.iter().map(|r| r.node.clone()).collect(),
            ]
            .concat()
            .into_iter()
            .find(|id| {
                ["~ update ", "+ create ", "! blocked ", "- remove "]
                    .iter()
                    .any(|p| line.starts_with(&format!("{p}{id}")))
            });
            if let Some(id) = node {
                let mut parts: Vec<String> = Vec::new();
                let mut words = l.split(' ').peekable();
                while let Some(w) = words.next() {
                    parts.push(w.to_string());
                    if w == "rev"
                        && let Some(n) = words.peek()
                    {
                        let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
                        if let Ok(r) = digits.parse::<u64>() {
                            let rest = &n[digits.len()..];
                            parts.push(format!("{}{rest}", self.rev(&id, r)));
                            words.next();
                        }
                    }
                }
                l = parts.join(" ");
            }
            out.push_str(&self.ids(&l));
            out.push('\n');
        }
        out
    }

    fn json(&self, report: &PlanReport) -> String {
        let mut v = serde_json::to_value(report).unwrap();
        let fix = |id: &str, r: &mut Value| {
            if let Some(n) = r["rev"].as_u64() {
                r["rev"] = json!(self.rev(id, n));
            }
        };
        for c in v["changes"].as_array_mut().unwrap() {
            let id = c["node"].as_str().unwrap().to_string();
            fix(&id, &mut c["previous"]);
            fix(&id, &mut c["revision"]);
        }
        for b in v["blocked"].as_array_mut().unwrap() {
            let id = b["node"].as_str().unwrap().to_string();
            fix(&id, &mut b["published"]);
        }
        if let Some(rs) = v["removed"].as_array_mut() {
            for r in rs {
                let id = r["node"].as_str().unwrap().to_string();
                fix(&id, &mut r["published"]);
            }
        }
        self.ids(&format!("{}\n", serde_json::to_string_pretty(&v).unwrap()))
    }
}

fn check_golden(name: &str, got: &str, mismatches: &mut Vec<String>) {
    let path = repo().join(format!("controller/tests/golden-plan-kubernetes/{name}"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if want != got {
        mismatches.push(format!("{name}:\n--- want\n{want}\n--- got\n{got}"));
    }
}

/// Each node's (node id, desired revision) in its MeshNode status, by node id.
fn desired(c: &Cluster) -> Vec<(String, u64)> {
    let mut d: Vec<(String, u64)> = c
        .api
        .list(NODES)
        .iter()
        .filter_map(|n| {
            Some((
                n["spec"]["nodeId"].as_str()?.to_string(),
                n["status"]["desiredRevision"].as_u64()?,
            ))
        })
        .collect();
    d.sort();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_against_the_cluster_match_what_the_controller_publishes() {
    let c = Cluster::new();
    let (mut kitchen, mut attic) = test_keys();
    let keys = with_keys(&kitchen, &attic);
    let edit = move |v: &mut Value| {
        keys(v);
        set_mode("approval")(v);
    };
    c.riverside(true, &edit).await;
    let run = c.start(c.opts("ctl-plan"));
    let port = kubefake::serve::serve(c.api.tagged("sidenetctl")).await;
    let kc = c.dir.path().join("kubeconfig");
    kubefake::serve::kubeconfig(&kc, port, "default");
    let (obs, mqtt) = Observer::start(c.port).await;
    let key = eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    c.enrol_riverside(&mqtt, &mut kitchen, &mut attic).await;
    for id in [kitchen.id(), attic.id()] {
        eventually("a config", || config_of(&obs, &key, &id), || c.dump()).await;
    }
    // A node asks to join (approval mode): it waits, with the MeshNode the controller made.
    let mut porch = Agent::new(31);
    let porch_id = porch.id();
    let deadline = std::time::Instant::now() + WAIT;
    let porch_node = loop {
        porch
            .enroll(&mqtt, "porch", "pcengines-apu2-wle600vx")
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if let Some(n) = c
            .api
            .list(NODES)
            .into_iter()
            .find(|n| n["spec"]["nodeId"] == porch_id.as_str())
            && n["status"]["phase"] == "Pending"
        {
            break n;
        }
        assert!(std::time::Instant::now() < deadline, "{}", c.dump());
    };

    // The folder that is what the cluster holds: nothing to do, once the controller has
    // published what the objects give (exit 0, unchanged for 3 s).
    let dir = c.dir.path();
    let base_docs = example_docs(&edit);
    let same = write_folder(&dir.join("same"), &base_docs);
    let mut stable: Option<(Vec<(String, u64)>, std::time::Instant)> = None;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (code, out, err) = plan(&kc, &same, &[]).await;
        let now = desired(&c);
        match (&stable, code) {
            (Some((d, since)), 0) if *d == now => {
                if since.elapsed() >= std::time::Duration::from_secs(3) {
                    assert_eq!(
                        out.lines().last(),
                        Some(
                            "Plan: 0 to create, 0 to update, 0 to remove, 1 blocked, 2 unchanged."
                        ),
                        "{out}"
                    );
                    assert!(out.starts_with(&format!("! blocked {porch_id} (")), "{out}");
                    assert!(out.contains("(as now)"), "{out}");
                    break;
                }
            }
            (_, 0) => stable = Some((now, std::time::Instant::now())),
            _ => stable = None,
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the plan of the cluster's own objects never settled on exit 0: {code}\n{out}\n{err}\n{}",
            c.dump()
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let names = Names::read(&c);

    // Golden plans.
    let mut channel = base_docs.clone();
    channel44(&mut channel);
    let mut approved = base_docs.clone();
    let mut porch_doc = json!({
        "apiVersion": porch_node["apiVersion"],
        "kind": "MeshNode",
        "metadata": {"name": porch_node["metadata"]["name"]},
        "spec": porch_node["spec"],
    });
    porch_doc["spec"]["approved"] = json!(true);
    approved.push(porch_doc);
    let removed: Vec<Value> = base_docs
        .iter()
        .filter(|d| d["metadata"]["name"] != "attic-pi")
        .cloned()
        .collect();
    let cases = [
        ("channel", channel.clone()),
        ("new-node", approved),
        ("removed-node", removed),
    ];
    let passphrase = {
        use base64::Engine as _;
        let s = c
            .api
            .get("v1/secrets", "default", "riverside-mesh")
            .unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s["data"]["passphrase"].as_str().unwrap())
            .unwrap();
        String::from_utf8(raw).unwrap()
    };
    assert!(passphrase.len() >= 8);
    let mut mismatches = Vec::new();
    for (name, docs) in &cases {
        let folder = write_folder(&dir.join(name), docs);
        let (code, out, err) = plan(&kc, &folder, &[]).await;
        assert_eq!(code, 2, "{name}: {out}\n{err}");
        let (code, report) = plan_json(&kc, &folder).await;
        assert_eq!(code, 2, "{name}");
        let json = serde_json::to_string(&report).unwrap();
        assert!(
            !out.contains(&passphrase) && !json.contains(&passphrase),
            "{name}: the mesh passphrase is shown"
        );
        assert_eq!(out, report.to_text(), "{name}: text and JSON disagree");
        check_golden(
            &format!("{name}.txt"),
            &names.text(&report),
            &mut mismatches,
        );
        check_golden(
            &format!("{name}.json"),
            &names.json(&report),
            &mut mismatches,
        );
    }
    assert!(
        mismatches.is_empty(),
        "golden plans differ (review, then UPDATE_GOLDEN=1 cargo test -p sidenet-controller --test kubernetes_plan):\n{}",
        mismatches.join("\n")
    );
    // Planning wrote nothing: the objects are as they were.
    assert_eq!(desired(&c), names.desired.to_vec());

    // Errors: a broken manifest (named by file and field); --offline has no meaning here.
    let mut broken = base_docs.clone();
    broken[0]["spec"]["prefix"] = json!("10.0.0.0/8");
    let folder = write_folder(&dir.join("broken"), &broken);
    let (code, _, err) = plan(&kc, &folder, &[]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("manifests.yaml") && err.contains("prefix"),
        "{err}"
    );
    let (code, _, err) = plan(&kc, &same, &["--offline"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--offline"), "{err}");

    // Put the channel change in force: every node ends on exactly the planned revision.
    let folder = dir.join("channel");
    let (code, report) = plan_json(&kc, &folder).await;
    assert_eq!(code, 2);
    assert_eq!(report.summary.update, 2, "{}", report.to_text());
    let mark = obs.mark();
    let mut spec = channel[0]["spec"].clone();
    spec.as_object_mut().unwrap().retain(|k, _| k == "radio");
    Api::<Mesh>::namespaced(c.client.clone(), "default")
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": spec })),
        )
        .await
        .unwrap();
    let planned: Vec<(String, u64)> = report
        .changes
        .iter()
        .map(|ch| (ch.node.clone(), ch.revision.rev))
        .collect();
    for (id, rev) in &planned {
        eventually(
            "the planned revision published",
            || (obs.revisions_since(id, mark).last() == Some(rev)).then_some(()),
            || c.dump(),
        )
        .await;
    }
    for (id, _) in &planned {
        assert_eq!(
            obs.revisions_since(id, mark).len(),
            1,
            "{id}: more than the planned revision was published"
        );
    }
    let now = desired(&c);
    for (id, rev) in &planned {
        assert!(now.contains(&(id.clone(), *rev)), "{now:?} vs {planned:?}");
    }
    // And planning the folder now in force again finds nothing to do.
    eventually_plan_zero(&c, &kc, &folder).await;
    assert!(c.api.refused().is_empty(), "{:?}", c.api.refused());
    run.stop().await;
}

/// Waits until the plan of `folder` exits 0 (the controller wrote every new status).
async fn eventually_plan_zero(c: &Cluster, kc: &Path, folder: &Path) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (code, out, err) = plan(kc, folder, &[]).await;
        if code == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the plan of the folder in force never exited 0: {code}\n{out}\n{err}\n{}",
            c.dump()
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// An MQTT client with client id `id` (a node's: the embedded broker lets a node that is
/// still enrolling in without a password, confined to its own topics).
async fn node_client(port: u16, id: &str) -> rumqttc::AsyncClient {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    });
    client
}

/// With the embedded broker the MeshNode status keeps each node's signed envelope
/// (`configEnvelope`), and the plan diffs against it: with the controller stopped and the Mesh
/// changed in the cluster behind its back, the plan of the changed folder still shows the
/// change against what was published (a render of the cluster's objects could not: they
/// already hold the change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_embedded_broker_the_plan_diffs_against_the_kept_envelope() {
    let c = Cluster::new();
    let (mut kitchen, attic) = test_keys();
    let keys = with_keys(&kitchen, &attic);
    c.riverside(true, &keys).await;
    let mqtt_port = common::free_port();
    let mut o = c.opts("ctl-embedded");
    o.broker = None;
    o.listen = format!("127.0.0.1:{mqtt_port}").parse().unwrap();
    let run = c.start(o);
    let port = kubefake::serve::serve(c.api.tagged("sidenetctl")).await;
    let kc = c.dir.path().join("kubeconfig");
    kubefake::serve::kubeconfig(&kc, port, "default");
    eventually("the Mesh public key", || c.mesh_key(), || c.dump()).await;
    let mqtt = node_client(mqtt_port, &kitchen.id()).await;
    c.enrol(
        &mqtt,
        &mut kitchen,
        ("default", "kitchen"),
        "kitchen",
        "tplink-archer-c7-v2",
    )
    .await;
    let st = eventually(
        "kitchen's envelope in its status",
        || {
            let st = c.node("kitchen")?["status"].clone();
            st["configEnvelope"].is_string().then_some(st)
        },
        || c.dump(),
    )
    .await;
    let rev = st["desiredRevision"].as_u64().unwrap();
    let dir = c.dir.path();
    let base_docs = example_docs(&keys);
    let same = write_folder(&dir.join("same"), &base_docs);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (code, out, err) = plan(&kc, &same, &[]).await;
        if code == 0 {
            assert_eq!(
                out.lines().last(),
                Some("Plan: 0 to create, 0 to update, 0 to remove, 1 blocked, 1 unchanged."),
                "{out}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the plan of the cluster's own objects never exited 0: {code}\n{out}\n{err}\n{}",
            c.dump()
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    run.stop().await;

    // The channel changes in the cluster while no controller runs.
    let mut channel = base_docs.clone();
    channel44(&mut channel);
    let mut spec = channel[0]["spec"].clone();
    spec.as_object_mut().unwrap().retain(|k, _| k == "radio");
    Api::<Mesh>::namespaced(c.client.clone(), "default")
        .patch(
            "riverside",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": spec })),
        )
        .await
        .unwrap();
    let folder = write_folder(&dir.join("channel"), &channel);
    let (code, report) = plan_json(&kc, &folder).await;
    assert_eq!(code, 2, "{}", report.to_text());
    assert_eq!(report.changes.len(), 1, "{}", report.to_text());
    let ch = &report.changes[0];
    assert_eq!(ch.node, kitchen.id());
    assert_eq!(ch.reason, None, "{}", report.to_text());
    assert_eq!(ch.previous.map(|p| p.rev), Some(rev));
    assert_eq!(ch.revision.rev, rev + 1);
    let wireless = ch
        .files
        .iter()
        .find(|f| f.path == "etc/sidenet/uci/wireless")
        .unwrap_or_else(|| panic!("{}", report.to_text()));
    assert!(
        wireless
            .diff
            .contains("-require wireless.radio0.channel='36'")
            && wireless
                .diff
                .contains("+require wireless.radio0.channel='44'"),
        "{}",
        wireless.diff
    );
    // The same folder without the envelope (as with an external broker) cannot be compared:
    // the status's digest is not that of what the objects give now.
    Api::<sidenet_crds::MeshNode>::namespaced(c.client.clone(), "default")
        .patch_status(
            "kitchen",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"configEnvelope": null}})),
        )
        .await
        .unwrap();
    let (code, report) = plan_json(&kc, &folder).await;
    assert_eq!(code, 2, "{}", report.to_text());
    assert_eq!(
        report.changes[0].reason.as_deref(),
        Some(sidenet_controller::kubernetes::plan::UNKNOWN_CONTENT),
        "{}",
        report.to_text()
    );
}
