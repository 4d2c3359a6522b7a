//! `sidenetctl plan`: golden plans (a channel change, a policy change, a new node, a removed
//! node) made by the reconcile core over a real state store, the exit codes of the CLI offline,
//! and a plan asked of a running controller with real agents that matches exactly the revisions
//! it then publishes.
//!
//! Regenerate the golden files with
//! `UPDATE_GOLDEN=1 cargo test -p sidenet-controller --test plan`, and review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Proc, bin, free_port, repo, wait_for};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::reconcile::core::Controller;
use sidenet_controller::reconcile::diff::PlanReport;
use sidenet_controller::reconcile::render::Renderer;
use sidenet_controller::reconcile::store::Store;
use sidenet_controller::spec::manifest;
use sidenet_controller::standalone::FsSecrets;
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::EnrollRequest;
use sidenet_wire::{Header, Kind, topics};

const MESH: &str = "riverside";
const T0: u64 = 1_900_000_000;
const LINUX: &str = "raspberrypi-4b-awus036acm";
const OPENWRT: &str = "tplink-archer-c7-v2";

fn key(seed: u8) -> KeyPair {
    KeyPair::from_seed(&[seed; 32])
}

fn id(seed: u8) -> String {
    key(seed).public().node_id()
}

fn mesh_text() -> String {
    std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap()
}

fn meshnode(name: &str, seed: u8, profile: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata:\n  name: {name}\nspec:\n  mesh: riverside\n  nodeId: {}\n  hardwareProfile: {profile}\n{extra}",
        id(seed)
    )
}

/// The starting manifests: alpha (OpenWrt) and bravo (Linux, a hostname override) have
/// MeshNodes; node 3 enrolled without one; node 4 enrolled without a hardware profile.
fn base_nodes() -> Vec<String> {
    vec![
        meshnode("alpha", 1, OPENWRT, ""),
        meshnode(
            "bravo",
            2,
            LINUX,
            "  overrides:\n    hostname: riverside-bravo\n",
        ),
    ]
}

fn write_manifests(dir: &Path, mesh: &str, nodes: &[String]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), mesh).unwrap();
    std::fs::write(dir.join("nodes.yaml"), nodes.concat()).unwrap();
}

fn load(dir: &Path) -> manifest::ManifestSet {
    manifest::load(&[dir.to_path_buf(), repo().join("hardware-profiles")]).unwrap()
}

fn enrol(ctl: &mut Controller, seed: u8, profile: Option<&str>, now: u64) {
    let k = key(seed);
    let body = EnrollRequest {
        hostname: format!("host{seed}"),
        profile: profile.map(str::to_string),
        backend: "files".into(),
        agent_version: "test".into(),
        ..Default::default()
    };
    let h = Header {
        mesh: MESH.into(),
        node: Some(k.public().node_id()),
        epoch: 5,
        rev: 1,
        iat: now,
        exp: now + 600,
        len: 0,
        sha256: String::new(),
    };
    let env = seal(Kind::Enroll, h, &serde_json::to_vec(&body).unwrap(), &k);
    ctl.on_message(&topics::enroll(MESH, &k.public().node_id()), &env, now)
        .unwrap();
    ctl.flush().unwrap();
}

/// A controller with the base manifests and four enrolled nodes, everything published.
fn controller(state: &Path, manifests: &Path) -> Controller {
    std::fs::create_dir_all(state).unwrap();
    let store = Store::open(&state.join("sidenet.redb"), T0).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(state)));
    write_manifests(manifests, &mesh_text(), &base_nodes());
    ctl.set_manifests(load(manifests), T0).unwrap();
    enrol(&mut ctl, 1, Some(OPENWRT), T0);
    enrol(&mut ctl, 2, Some(LINUX), T0);
    enrol(&mut ctl, 3, Some(LINUX), T0);
    enrol(&mut ctl, 4, None, T0);
    ctl.flush().unwrap();
    ctl
}

fn channel44(t: String) -> String {
    t.replace("        channel: 36\n", "        channel: 44\n")
}

fn policy(t: String) -> String {
    t.replace("rateKbit: 20000", "rateKbit: 5000")
}

/// Node ids vary with nothing (fixed seeds); the revision epoch is T0. The golden text names
/// nodes by seed, so a reader sees which node is which.
fn normalise(text: &str) -> String {
    let mut t = text.to_string();
    for s in 1..=4u8 {
        t = t.replace(&id(s), &format!("<node{s}>"));
    }
    t.replace(&T0.to_string(), "<T0>")
}

fn check_golden(name: &str, got: &str, mismatches: &mut Vec<String>) {
    let path = repo().join(format!("controller/tests/golden-plan/{name}"));
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

#[test]
fn golden_plans_for_a_channel_a_policy_a_new_node_and_a_removed_node() {
    let dir = tempfile::tempdir().unwrap();
    let (state, manifests) = (dir.path().join("state"), dir.path().join("m"));
    let mut ctl = controller(&state, &manifests);
    let before: Vec<_> = ctl
        .store
        .published
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        before.len(),
        3,
        "nodes 1-3 are configured, node 4 has no profile"
    );

    // Nothing changed: nothing to publish, node 4 still blocked for the same reason.
    let same = ctl.plan_changes(load(&manifests), T0 + 10).unwrap();
    assert!(!same.changes_anything(), "{}", same.to_text());
    assert_eq!(same.summary.unchanged, 3);
    assert_eq!(same.blocked.len(), 1);
    assert!(!same.blocked[0].new);

    let new_node = {
        let mut n = base_nodes();
        n.push(meshnode("delta", 4, LINUX, ""));
        n
    };
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        ("channel", channel44(mesh_text()), base_nodes()),
        ("policy", policy(mesh_text()), base_nodes()),
        ("new-node", mesh_text(), new_node),
        ("removed-node", mesh_text(), vec![base_nodes()[0].clone()]),
    ];
    let mut mismatches = Vec::new();
    for (name, mesh, nodes) in cases {
        let m = dir.path().join(name);
        write_manifests(&m, &mesh, &nodes);
        let report = ctl.plan_changes(load(&m), T0 + 10).unwrap();
        // Planning changed nothing.
        let after: Vec<_> = ctl
            .store
            .published
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(before, after, "{name}: the plan published something");
        assert!(
            ctl.flush().unwrap().is_empty(),
            "{name}: the plan left messages"
        );
        assert!(report.changes_anything(), "{name}");
        let text = normalise(&report.to_text());
        assert!(
            !text.contains(&ctl_passphrase(&state)),
            "{name}: the passphrase is shown"
        );
        check_golden(&format!("{name}.txt"), &text, &mut mismatches);
        let json = normalise(&serde_json::to_string_pretty(&report).unwrap());
        check_golden(
            &format!("{name}.json"),
            &format!("{json}\n"),
            &mut mismatches,
        );
        let back: PlanReport =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(back, report);
    }
    assert!(
        mismatches.is_empty(),
        "golden plans differ (review, then UPDATE_GOLDEN=1 cargo test -p sidenet-controller --test plan):\n{}",
        mismatches.join("\n")
    );

    // The plan is what applying publishes: the channel change, applied for real.
    let m = dir.path().join("channel");
    let report = ctl.plan_changes(load(&m), T0 + 20).unwrap();
    ctl.set_manifests(load(&m), T0 + 20).unwrap();
    let out = ctl.flush().unwrap();
    let mut published: Vec<(String, u64)> = out
        .iter()
        .filter(|p| p.topic.ends_with("/config"))
        .map(|p| {
            let node = p.topic.split('/').nth(4).unwrap().to_string();
            (node.clone(), ctl.store.published[&node].revision.rev)
        })
        .collect();
    published.sort();
    let planned: Vec<(String, u64)> = report
        .changes
        .iter()
        .map(|c| (c.node.clone(), c.revision.rev))
        .collect();
    assert_eq!(planned, published);
}

fn ctl_passphrase(state: &Path) -> String {
    std::fs::read_to_string(state.join("secrets/riverside-mesh.passphrase"))
        .unwrap()
        .trim()
        .to_string()
}

fn sidenetctl(args: &[&str], manifests: &Path, state: &Path) -> (i32, String, String) {
    let out = Command::new(bin("sidenetctl"))
        .arg("plan")
        .arg("-f")
        .arg(manifests)
        .arg("--profiles")
        .arg(repo().join("hardware-profiles"))
        .arg("--templates")
        .arg(repo().join("templates"))
        .arg("--state")
        .arg(state)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exit_codes_offline_0_unchanged_2_changed_1_error() {
    let dir = tempfile::tempdir().unwrap();
    let (state, manifests) = (dir.path().join("state"), dir.path().join("m"));
    drop(controller(&state, &manifests));

    let (code, out, err) = sidenetctl(&["--offline"], &manifests, &state);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("Plan: 0 to create, 0 to update, 1 blocked, 3 unchanged."),
        "{out}"
    );

    let changed = dir.path().join("changed");
    write_manifests(&changed, &channel44(mesh_text()), &base_nodes());
    let (code, out, err) = sidenetctl(&["--offline"], &changed, &state);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("Plan: 0 to create, 3 to update, 1 blocked, 0 unchanged."),
        "{out}"
    );
    assert!(
        out.contains("+        channel: 44")
            || out.contains("channel='44'")
            || out.contains("frequency=5220"),
        "{out}"
    );
    let (code, out, _) = sidenetctl(&["--offline", "--json"], &changed, &state);
    assert_eq!(code, 2);
    let report: PlanReport = serde_json::from_str(&out).unwrap();
    assert_eq!(report.summary.update, 3);

    // Errors: a broken manifest (named by file and field), no controller, no state.
    let broken = dir.path().join("broken");
    write_manifests(
        &broken,
        &mesh_text().replace("prefix: fdfc:b395:f348::/48", "prefix: 10.0.0.0/8"),
        &base_nodes(),
    );
    let (code, _, err) = sidenetctl(&["--offline"], &broken, &state);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("mesh.yaml") && err.contains("prefix"), "{err}");
    let (code, _, err) = sidenetctl(&[], &changed, &state);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the controller"), "{err}");
    let (code, _, err) = sidenetctl(&["--offline"], &changed, &dir.path().join("nowhere"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no controller state there"), "{err}");
}

const WAIT: Duration = Duration::from_secs(60);

fn applied_rev(root: &Path) -> Option<u64> {
    let text = std::fs::read(root.join("etc/sidenet-agent/current.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v["revision"]["rev"].as_u64()
}

/// A plan asked of a running controller, with agents running, lists exactly the nodes and
/// revisions the controller publishes when the manifests are then put in force.
#[test]
fn a_plan_of_a_running_mesh_matches_what_is_then_published() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    write_manifests(&manifests, &mesh_text(), &[]);
    let state = dir.path().join("state");
    let port = free_port();
    let mut cmd = Command::new(bin("sidenet-controller"));
    cmd.arg("standalone")
        .arg("--manifests")
        .arg(&manifests)
        .arg("--profiles")
        .arg(repo().join("hardware-profiles"))
        .arg("--templates")
        .arg(repo().join("templates"))
        .arg("--state")
        .arg(&state)
        .arg("--poll-ms")
        .arg("100")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"));
    let ctl = Proc::spawn("controller", &mut cmd, &dir.path().join("controller.log"));
    wait_for(
        "the admin socket",
        WAIT,
        || admin::call(&state, &Request::Status).ok(),
        || ctl.log_text(),
    );
    let mut agents = Vec::new();
    let mut roots: Vec<PathBuf> = Vec::new();
    for (i, profile) in [LINUX, LINUX, OPENWRT, LINUX].iter().enumerate() {
        let name = format!("n{i}");
        let root = dir.path().join(&name);
        agents.push(Proc::spawn(
            &name,
            Command::new(bin("sidenet-agent")).args([
                "--mesh",
                "riverside",
                "--broker",
                &format!("mqtt://127.0.0.1:{port}"),
                "--root",
                &root.display().to_string(),
                "--profile",
                profile,
                "--hostname",
                &name,
                "--status-interval",
                "2",
                "--join",
                &common::join_code(&state),
            ]),
            &dir.path().join(format!("{name}.log")),
        ));
        roots.push(root);
    }
    let logs = || {
        let mut s = format!("--- controller\n{}\n", ctl.log_text());
        for a in &agents {
            s.push_str(&format!("--- {}\n{}\n", a.name, a.log_text()));
        }
        s
    };
    for r in &roots {
        wait_for(
            "rev 1 applied",
            WAIT,
            || (applied_rev(r) == Some(1)).then_some(()),
            logs,
        );
    }
    let node_of = |r: &Path| {
        let t = std::fs::read_to_string(r.join("etc/sidenet-agent/node.key")).unwrap();
        KeyPair::from_file_text(&t).unwrap().public().node_id()
    };
    // The next manifests: channel 44 for everyone, and n1 gets a MeshNode with its own tx
    // power on top (so n1's plan differs from the others').
    let next = dir.path().join("next");
    let n1 = format!(
        "---\napiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata:\n  name: n1\nspec:\n  mesh: riverside\n  nodeId: {}\n  hardwareProfile: {LINUX}\n  overrides:\n    hostname: riverside-n1\n",
        node_of(&roots[1])
    );
    // One file changes (a change of two files may be read half done, between the renames).
    write_manifests(&next, &format!("{}{n1}", channel44(mesh_text())), &[]);
    let plan = |dir: &Path| {
        let out = Command::new(bin("sidenetctl"))
            .args(["plan", "--json", "-f"])
            .arg(dir)
            .arg("--profiles")
            .arg(repo().join("hardware-profiles"))
            .arg("--state")
            .arg(&state)
            .output()
            .unwrap();
        (
            out.status.code(),
            serde_json::from_slice::<PlanReport>(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr))),
        )
    };
    // The mesh settles first: agents report their WireGuard keys after their first config, and
    // the neighbours' configs change with them. Settled: every node runs its desired revision
    // and nothing is left to publish, unchanged for 5 s (more than two status intervals).
    let desired_now = || -> Option<Vec<(String, u64)>> {
        let Response::Status { nodes, .. } = admin::call(&state, &Request::Status).ok()? else {
            return None;
        };
        let ready = nodes.len() == 4
            && nodes
                .iter()
                .all(|n| n.applied.is_some() && n.applied == n.desired);
        let mut d: Vec<(String, u64)> = nodes
            .iter()
            .map(|n| (n.node.clone(), n.desired.map_or(0, |r| r.rev)))
            .collect();
        d.sort();
        ready.then_some(d)
    };
    let mut stable: Option<(Vec<(String, u64)>, std::time::Instant)> = None;
    wait_for(
        "the mesh to settle",
        WAIT,
        || {
            let now = desired_now().filter(|_| plan(&manifests).0 == Some(0));
            match (now, &stable) {
                (Some(d), Some((s, since))) if *s == d => {
                    (since.elapsed() >= Duration::from_secs(5)).then_some(())
                }
                (Some(d), _) => {
                    stable = Some((d, std::time::Instant::now()));
                    None
                }
                (None, _) => {
                    stable = None;
                    None
                }
            }
        },
        logs,
    );
    let (code, report) = plan(&next);
    assert_eq!(code, Some(2));
    assert_eq!(report.summary.update, 4, "{}", report.to_text());
    let n1_change = report
        .changes
        .iter()
        .find(|c| c.node == node_of(&roots[1]))
        .unwrap();
    assert!(n1_change.fields.iter().any(|f| f.field == "hostname"));

    // Put them in force; every node ends on exactly the planned revision.
    let tmp = dir.path().join("mesh.yaml.new");
    std::fs::copy(next.join("mesh.yaml"), &tmp).unwrap();
    std::fs::rename(&tmp, manifests.join("mesh.yaml")).unwrap();
    for c in &report.changes {
        let root = roots.iter().find(|r| node_of(r) == c.node).unwrap();
        wait_for(
            "the planned revision applied",
            WAIT,
            || (applied_rev(root) == Some(c.revision.rev)).then_some(()),
            logs,
        );
    }
    let Response::Status { nodes, .. } = admin::call(&state, &Request::Status).unwrap() else {
        panic!()
    };
    let mut desired: Vec<(String, u64)> = nodes
        .iter()
        .map(|n| (n.node.clone(), n.desired.unwrap().rev))
        .collect();
    desired.sort();
    let planned: Vec<(String, u64)> = report
        .changes
        .iter()
        .map(|c| (c.node.clone(), c.revision.rev))
        .collect();
    assert_eq!(
        planned,
        desired,
        "published revisions differ from the plan:\n{}\n{}",
        report.to_text(),
        logs()
    );
    // And planning again now finds nothing to do.
    let (code, again) = plan(&manifests);
    assert_eq!(code, Some(0), "{}", again.to_text());
}
