//! The two command-line programs as a newcomer meets them (issue "the first ten minutes"): names
//! that `sidenetctl` accepts, closed pipes, paths that do not exist, shell completions, the
//! human `render` output, the token warning outside token mode, and `status` with broken
//! manifests. Each test failed before its fix.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Proc, bin, free_port, repo, wait_for};
use sidenet_controller::admin::{self, Request};
use sidenet_controller::now;
use sidenet_controller::reconcile::core::Controller;
use sidenet_controller::reconcile::render::Renderer;
use sidenet_controller::reconcile::store::Store;
use sidenet_controller::spec::manifest;
use sidenet_controller::standalone::FsSecrets;
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::EnrollRequest;
use sidenet_wire::{Header, Kind, topics};

const WAIT: Duration = Duration::from_secs(30);

fn enrol(ctl: &mut Controller, seed: u8, hostname: &str, at: u64) -> String {
    let key = KeyPair::from_seed(&[seed; 32]);
    let id = key.public().node_id();
    let req = EnrollRequest {
        hostname: hostname.into(),
        profile: Some("raspberrypi-4b-awus036acm".into()),
        backend: "files".into(),
        agent_version: "test".into(),
        ..EnrollRequest::default()
    };
    let header = Header {
        mesh: "riverside".into(),
        node: Some(id.clone()),
        epoch: 1,
        rev: 1,
        iat: at,
        exp: at + 3600,
        len: 0,
        sha256: String::new(),
    };
    let payload = seal(
        Kind::Enroll,
        header,
        &serde_json::to_vec(&req).unwrap(),
        &key,
    );
    ctl.on_message(&topics::enroll("riverside", &id), &payload, at)
        .unwrap();
    id
}

/// Before: only the 16-character id and the MeshNode name worked; `approve node1` answered
/// `no node "node1"` although `status` showed that name.
#[test]
fn nodes_are_named_by_id_meshnode_name_or_unique_hostname() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = now();
    let store = Store::open(&dir.path().join("sidenet.redb"), t0).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(dir.path())));
    let files = manifest::collect_files(&[
        repo().join("examples/riverside"),
        repo().join("hardware-profiles"),
    ])
    .unwrap();
    let texts: Vec<(PathBuf, String)> = files
        .into_iter()
        .map(|f| {
            let t = std::fs::read_to_string(&f).unwrap();
            (f, t)
        })
        .collect();
    ctl.set_manifests(manifest::load_texts(&texts).unwrap(), t0)
        .unwrap();
    let solo = enrol(&mut ctl, 1, "solo", t0);
    let twin_a = enrol(&mut ctl, 2, "twin", t0);
    let twin_b = enrol(&mut ctl, 3, "twin", t0);

    assert_eq!(ctl.resolve(&solo).unwrap(), solo);
    assert_eq!(ctl.resolve("solo").unwrap(), solo);
    // The MeshNode name and the hostname its manifest sets both name the example's kitchen.
    let kitchen = ctl.resolve("kitchen").unwrap();
    assert_eq!(ctl.resolve("riverside-kitchen").unwrap(), kitchen);
    let err = ctl.resolve("twin").unwrap_err().to_string();
    assert!(err.contains("hostname \"twin\" names 2 nodes"), "{err}");
    assert!(err.contains(&twin_a) && err.contains(&twin_b), "{err}");
    assert!(err.contains("give the node id"), "{err}");
    let err = ctl.resolve("sollo").unwrap_err().to_string();
    assert!(err.contains("by id, MeshNode name or hostname"), "{err}");
    assert!(err.contains("closest: solo"), "{err}");
    // Approve and remove take the hostname too.
    ctl.approve("solo", t0).unwrap();
    let id = ctl.resolve("solo").unwrap();
    ctl.remove_node(&id, t0).unwrap();
    assert!(ctl.resolve("solo").is_err());
}

/// Before: `sidenetctl render | head -1` panicked ("failed printing to stdout: Broken pipe")
/// and exited 101.
#[test]
fn a_closed_pipe_ends_sidenetctl_quietly() {
    let mut child = Command::new(bin("sidenetctl"))
        .current_dir(repo())
        .args(["render", "--node", "kitchen", "-f", "examples/riverside"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader goes away after one line, as `head -1` does.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with("# node "), "{first}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Before: the online and offline `render` printed one JSON document with every file escaped
/// into a string; now the files one after another, and JSON with `-o json`.
#[test]
fn render_prints_the_files_for_people_and_json_for_scripts() {
    let run = |extra: &[&str]| {
        let out = Command::new(bin("sidenetctl"))
            .current_dir(repo())
            .args(["render", "--node", "kitchen", "-f", "examples/riverside"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(&[]);
    assert!(
        text.contains("==> etc/sidenet/uci/wireless (mode 6"),
        "{text}"
    );
    assert!(text.contains("=wifi-iface"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&run(&["-o", "json"])).unwrap();
    assert!(json["files"].as_array().is_some_and(|f| !f.is_empty()));
}

/// Before: `--profiles nope` was skipped silently and every node failed with "closest: none
/// known"; started from another folder, the controller said "cannot read templates: No such
/// file or directory".
#[test]
fn missing_paths_are_named_with_where_they_were_looked_for() {
    let out = Command::new(bin("sidenetctl"))
        .current_dir(repo())
        .args(["validate", "-f", "examples/riverside", "--profiles", "nope"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--profiles nope: no such file or folder"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "(relative to {}",
            repo().canonicalize().unwrap().display()
        )),
        "{stderr}"
    );

    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(bin("sidenetctl"))
        .current_dir(elsewhere.path())
        .args(["validate", "-f"])
        .arg(repo().join("examples/riverside"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("no HardwareProfile is loaded at all (pass --profiles DIR"),
        "{stdout}"
    );

    let out = Command::new(bin("sidenet-controller"))
        .current_dir(elsewhere.path())
        .args(["standalone", "--state"])
        .arg(elsewhere.path().join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--manifests examples/riverside: no such file or folder (relative to"),
        "{stderr}"
    );
    assert!(stderr.contains("run from the repository root"), "{stderr}");
}

/// Before: there was no way to get shell completions.
#[test]
fn both_programs_print_shell_completions() {
    for (prog, sub) in [
        ("sidenetctl", "approve"),
        ("sidenet-controller", "standalone"),
    ] {
        for shell in ["bash", "zsh", "fish"] {
            let out = Command::new(bin(prog))
                .args(["completions", shell])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{prog} completions {shell}");
            assert!(
                text.contains(prog) && text.contains(sub),
                "{prog} {shell}:\n{text}"
            );
        }
    }
}

/// A standalone controller on the example mesh, with `mesh.yaml` edited by `edit`.
fn controller(dir: &std::path::Path, edit: impl Fn(String) -> String) -> Proc {
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap();
    std::fs::write(dir.join("manifests/mesh.yaml"), edit(text)).unwrap();
    let mut cmd = Command::new(bin("sidenet-controller"));
    cmd.arg("standalone")
        .arg("--manifests")
        .arg(dir.join("manifests"))
        .arg("--profiles")
        .arg(repo().join("hardware-profiles"))
        .arg("--templates")
        .arg(repo().join("templates"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--poll-ms")
        .arg("100")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()));
    let p = Proc::spawn("controller", &mut cmd, &dir.join("controller.log"));
    wait_for(
        "the controller's admin socket",
        WAIT,
        || admin::call(&dir.join("state"), &Request::Status).ok(),
        || p.log_text(),
    );
    p
}

fn sidenetctl(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("sidenetctl"))
        .args(args)
        .arg("--state")
        .arg(dir.join("state"))
        .output()
        .unwrap()
}

/// Before: a token was issued for an auto-mode mesh with no word that it does nothing there.
#[test]
fn a_token_outside_token_mode_comes_with_a_warning() {
    for (mode, says) in [
        ("auto", "every node that asks is admitted"),
        ("approval", "each node waits for `sidenetctl approve`"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let _ctl = controller(dir.path(), |t| {
            t.replace("mode: auto", &format!("mode: {mode}"))
        });
        let out = sidenetctl(dir.path(), &["token", "--mesh", "riverside"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim().len(), 32);
        assert!(
            stderr.contains(&format!(
                "warning: mesh riverside enrols in {mode} mode, where a token changes nothing"
            )),
            "{stderr}"
        );
        assert!(stderr.contains(says), "{stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let _ctl = controller(dir.path(), |t| t.replace("mode: auto", "mode: token"));
    let out = sidenetctl(dir.path(), &["token", "--mesh", "riverside"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("warning"),
        "{stderr}"
    );
}

/// `status` exits non-zero while manifest errors are in force, and its JSON carries them.
#[test]
fn status_fails_while_manifests_are_broken() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path(), |t| t);
    let out = sidenetctl(dir.path(), &["status", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["manifestErrors"], serde_json::json!([]));

    std::fs::write(
        dir.path().join("manifests/broken.yaml"),
        "apiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata: {name: x}\nspec: {}\n",
    )
    .unwrap();
    let out = wait_for(
        "status to report the broken manifest",
        WAIT,
        || {
            let out = sidenetctl(dir.path(), &["status", "-o", "json"]);
            (!out.status.success()).then_some(out)
        },
        || ctl.log_text(),
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = v["manifestErrors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("broken.yaml")),
        "{v}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("manifest error (last good manifests still in force)")
    );
}

/// `status --phase/--mesh/--name` show the matching rows, and the summary line counts every
/// node by phase and says how many are shown; a misspelt phase is refused by name.
#[test]
fn status_filters_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path(), |t| t);
    std::fs::copy(
        repo().join("examples/riverside/nodes.yaml"),
        dir.path().join("manifests/nodes.yaml"),
    )
    .unwrap();
    wait_for(
        "the two MeshNodes in the status",
        WAIT,
        || {
            let out = sidenetctl(dir.path(), &["status", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["nodes"].as_array()?.len() == 2).then_some(())
        },
        || ctl.log_text(),
    );
    let text = |args: &[&str]| {
        let out = sidenetctl(dir.path(), args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let all = text(&["status"]);
    assert!(all.lines().any(|l| l == "2 nodes: 2 Blocked"), "{all}");
    let one = text(&["status", "--phase", "blocked", "--name", "KITCH"]);
    assert!(
        one.contains("kitchen") && !one.contains("attic-pi"),
        "{one}"
    );
    assert!(
        one.lines()
            .any(|l| l == "2 nodes: 2 Blocked; 1 shown (--phase Blocked --name KITCH)"),
        "{one}"
    );
    let glob = text(&["status", "--name", "attic-*"]);
    assert!(
        glob.contains("attic-pi") && !glob.contains("kitchen"),
        "{glob}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&text(&["status", "-o", "json", "--mesh", "nowhere"])).unwrap();
    assert_eq!(v["nodes"], serde_json::json!([]));
    assert_eq!(v["summary"], "2 nodes: 2 Blocked; 0 shown (--mesh nowhere)");
    let v: serde_json::Value = serde_json::from_str(&text(&[
        "status",
        "-o",
        "json",
        "--mesh",
        "riverside",
        "--phase",
        "Ready,blocked",
    ]))
    .unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 2);
    let out = sidenetctl(dir.path(), &["status", "--phase", "Redy"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--phase Redy: not a phase (one of Ready, Configuring"),
        "{err}"
    );
}
