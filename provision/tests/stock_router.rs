//! A stock OpenWrt router, end to end: dropbear with busybox as the SSH server and shell, root
//! with a blank password (a factory-fresh router lets root in through the SSH `none` method),
//! opkg a recorder with the stock wpad-basic installed, and the agent run with the openwrt
//! backend against the image's init scripts.
//!
//! - First login without credentials, packages, install, enrolment: provisioned once the node
//!   reports the installed agent version online.
//! - A simulated sysupgrade (everything but what the keep.d list names is wiped, the image comes
//!   back): the agent boots with the same node id and reports the packages it lacks; the next
//!   run installs them and restarts it.
//! - An agent that starts but never connects: failed, not provisioned.
//! - `--remove`: service stopped and disabled, `--uninstall` run when the agent has it (and a
//!   failing one leaves the files for another try), files and state deleted, node forgotten.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::router::{self, Dropbear, Pm};
use common::{Agents, Controller, agent_pid, alive, bin, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn provision(args: &[String], cwd: &Path) -> (i32, BTreeMap<String, Value>, String) {
    let out = Command::new(bin("sidenetctl"))
        .arg("provision")
        .args(args)
        .args(["-o", "json"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let list: Vec<Value> = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));
    (
        out.status.code().unwrap_or(-1),
        list.into_iter()
            .map(|r| (r["name"].as_str().unwrap().to_string(), r))
            .collect(),
        format!("{stdout}\n{stderr}"),
    )
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What a sysupgrade keeps: every path the keep.d lists name (folders with what is in them).
fn save_kept(root: &Path, to: &Path) -> Vec<PathBuf> {
    let mut kept = Vec::new();
    for e in std::fs::read_dir(root.join("lib/upgrade/keep.d")).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let p = PathBuf::from(line.trim_end_matches('/'));
            assert!(p.starts_with(root), "{line}: outside the device");
            if std::fs::symlink_metadata(&p).is_ok() {
                kept.push(p);
            }
        }
    }
    for p in &kept {
        let dest = to.join(p.strip_prefix(root).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        common::run(Command::new("cp").arg("-a").arg(p).arg(&dest));
    }
    kept
}

/// Wipes the device but the folders dropbear's namespace has bind-mounted (emptied instead).
fn wipe(root: &Path) {
    let keep_dirs = ["usr/bin", "usr/sbin", "etc/init.d"];
    for d in keep_dirs {
        for e in std::fs::read_dir(root.join(d)).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
    fn walk(d: &Path, root: &Path, keep: &[&str]) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            if keep.contains(&rel.as_str()) {
                continue;
            }
            if keep.iter().any(|k| k.starts_with(&format!("{rel}/"))) {
                walk(&p, root, keep);
                continue;
            }
            if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
    walk(root, root, &keep_dirs);
}

#[test]
fn a_factory_fresh_router_is_provisioned_survives_a_sysupgrade_and_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ctl = Controller::start(&t.join("ctl"), "auto");
    common::test_templates_with(
        &t.join("templates"),
        &common::Templates {
            packages: true,
            keep: true,
            openwrt_args: " --backend openwrt --health-deadline 30".into(),
        },
    );
    common::dist(&t.join("dist"), &["mips_24kc"]);
    let real = bin("sidenet-agent");
    let root = t.join("devices/router");
    let board = "tplink-archer-c7-v2.json";
    router::openwrt_image(&root, board, "23.05.5", Pm::Opkg);
    let _agents = Agents(vec![root.clone()]);
    let db = Dropbear::start(&t.join("dropbear"), "router", &root, true, "");
    // The same firmware without -B: root's blank password does not let anyone in.
    let locked_root = t.join("devices/locked");
    router::openwrt_image(&locked_root, board, "23.05.5", Pm::Opkg);
    let locked = Dropbear::start(&t.join("dropbear"), "locked", &locked_root, false, "");

    let inventory = |agents: &str, timeout: u64| -> Vec<String> {
        std::fs::write(
            t.join("inventory.yaml"),
            format!(
                "mesh: riverside\nbroker: {}\nhosts:\n  - {{ host: 127.0.0.1, port: {}, name: router, root: {} }}\n",
                ctl.broker(),
                db.port,
                root.display()
            ),
        )
        .unwrap();
        vec![
            "-i".into(),
            t.join("inventory.yaml").display().to_string(),
            "--state".into(),
            ctl.state().display().to_string(),
            "--agents".into(),
            t.join(agents).display().to_string(),
            "--templates".into(),
            t.join("templates").display().to_string(),
            "--profiles".into(),
            common::repo()
                .join("hardware-profiles")
                .display()
                .to_string(),
            "--enrol-timeout".into(),
            timeout.to_string(),
            "--accept-new-host-keys".into(),
        ]
    };
    let logs = || {
        format!(
            "--- controller\n{}\n--- agent\n{}\n--- dropbear\n{}\n--- opkg calls\n{:?}",
            common::tail(&ctl.proc.log_text(), 30),
            common::tail(
                &std::fs::read_to_string(root.join("var/log/sidenet-agent.log"))
                    .unwrap_or_default(),
                30
            ),
            common::tail(&db.log_text(), 10),
            router::calls(&root)
        )
    };
    let row = |id: &str| ctl.nodes().into_iter().find(|n| n.node == id);

    // ---- No credentials: the router lets root in through `none`; the locked one does not.
    let args = inventory("dist", 60);
    let (code, r, text) = provision(&args, t);
    let ctx = || format!("{text}\n{}", logs());
    assert_eq!(code, 0, "{}", ctx());
    let r = &r["router"];
    assert_eq!(r["result"], "provisioned", "{}", ctx());
    assert_eq!(r["login"], "none");
    assert!(
        strs(&r["warnings"])[0].starts_with("logged in as root without a password"),
        "{r}"
    );
    assert_eq!(r["agentVersion"], VERSION);
    assert_eq!(
        strs(&r["packages"]),
        ["babeld", "wireguard-tools", "wpad-mesh-mbedtls", "iw"]
    );
    let id = r["nodeId"].as_str().unwrap().to_string();
    // It enrolled, and its openwrt backend applied and confirmed its config (the image's init
    // scripts, the recorder's babeld).
    wait_for(
        "the router Ready",
        WAIT,
        || row(&id).filter(|n| n.phase == "Ready").map(|_| ()),
        || format!("{:?}\n{}", row(&id), logs()),
    );
    assert!(root.join("etc/config/wireless").exists());
    let locked_args: Vec<String> = {
        let mut a = args.clone();
        let inv = t.join("locked.yaml");
        std::fs::write(
            &inv,
            format!(
                "mesh: riverside\nbroker: {}\nhosts:\n  - {{ host: 127.0.0.1, port: {}, name: locked, root: {} }}\n",
                ctl.broker(),
                locked.port,
                locked_root.display()
            ),
        )
        .unwrap();
        a[1] = inv.display().to_string();
        a
    };
    let (_, rl, _) = provision(&locked_args, t);
    let e = rl["locked"]["error"].as_str().unwrap();
    assert_eq!(rl["locked"]["step"], "login", "{e}");
    assert!(
        e.contains("authentication as root with no credentials failed: the server does not let root in without them (it accepts: publickey,password)"),
        "{e}"
    );

    // ---- Sysupgrade: the firmware is replaced, only what keep.d lists comes back.
    db.sh(
        &format!("{}/etc/init.d/sidenet-agent stop", root.display()),
        None,
    );
    let saved = t.join("sysupgrade-backup");
    let kept = save_kept(&root, &saved);
    let epoch_before = row(&id).and_then(|n| n.agent_epoch).unwrap();
    wipe(&root);
    assert!(!root.join("usr/bin/sidenet-agent").exists());
    router::openwrt_image(&root, board, "23.05.5", Pm::Opkg);
    common::run(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", saved.display()))
            .arg(&root),
    );
    for p in &kept {
        assert!(std::fs::symlink_metadata(p).is_ok(), "{}", p.display());
    }
    // Boot: rc.d's start links.
    db.sh(
        &format!(
            "for s in {}/etc/rc.d/S*; do \"$s\" start; done",
            root.display()
        ),
        None,
    );
    // The same node, back online, saying which packages the new firmware lacks.
    let missing = ["babeld", "wireguard-tools", "wpad-mesh-mbedtls", "iw"];
    wait_for(
        "the upgraded router to report its missing packages",
        WAIT,
        || {
            row(&id)
                .filter(|n| {
                    n.online == Some(true)
                        && n.agent_epoch.is_some_and(|e| e > epoch_before)
                        && n.missing == missing
                        && n.phase == "Blocked"
                })
                .map(|_| ())
        },
        || format!("{:?}\n{}", row(&id), logs()),
    );
    assert_eq!(
        ctl.nodes().len(),
        1,
        "a second node enrolled: {:?}",
        ctl.nodes()
    );
    let status = common::run(
        Command::new(bin("sidenetctl"))
            .arg("status")
            .arg("--state")
            .arg(ctl.state()),
    );
    assert!(
        status.contains(&format!(
            "{id}: missing: babeld, wireguard-tools, wpad-mesh-mbedtls, iw"
        )),
        "{status}"
    );
    // A new config meanwhile (the admin names the node): it waits for the packages, it is
    // neither applied, nor failed, nor rolled back.
    let applied_before = row(&id).and_then(|n| n.applied).unwrap();
    let tmp_manifest = ctl.dir.join("node.yaml.tmp");
    std::fs::write(
        &tmp_manifest,
        format!(
            "apiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata:\n  name: router\nspec:\n  mesh: riverside\n  nodeId: {id}\n  approved: true\n  overrides:\n    hostname: riverside-router\n"
        ),
    )
    .unwrap();
    std::fs::rename(&tmp_manifest, ctl.manifests().join("node.yaml")).unwrap();
    let waiting = wait_for(
        "the new revision to wait for the packages",
        WAIT,
        || {
            let log =
                std::fs::read_to_string(root.join("var/log/sidenet-agent.log")).unwrap_or_default();
            let n = row(&id)?;
            let desired = n.desired.filter(|d| *d > applied_before)?;
            log.contains(&format!(
                "revision {} waits for packages: missing: babeld, wireguard-tools, wpad-mesh-mbedtls, iw",
                desired.rev
            ))
            .then_some((n, desired))
        },
        || format!("{:?}\n{}", row(&id), logs()),
    );
    let (n, desired) = waiting;
    assert_eq!(n.applied, Some(applied_before), "{n:?}");
    assert_eq!(n.failure, None, "{n:?}");
    assert_eq!(n.phase, "Blocked", "{n:?}");
    // Provisioning again installs them and restarts the agent: the waiting config is applied,
    // Ready again, same id.
    let (code, r, text) = provision(&args, t);
    let r = &r["router"];
    assert_eq!(code, 0, "{text}\n{}", logs());
    assert_eq!(r["result"], "provisioned");
    assert_eq!(r["nodeId"], id.as_str());
    assert_eq!(
        strs(&r["changes"]),
        [
            "packages: babeld, wireguard-tools, wpad-mesh-mbedtls (replacing wpad-basic-mbedtls), iw",
            "restarted"
        ]
    );
    wait_for(
        "the router Ready again with nothing missing, running the new revision",
        WAIT,
        || {
            row(&id)
                .filter(|n| {
                    n.phase == "Ready" && n.missing.is_empty() && n.applied == Some(desired)
                })
                .map(|_| ())
        },
        || format!("{:?}\n{}", row(&id), logs()),
    );

    // ---- An agent that starts but never connects: failed, not provisioned.
    let hang = t.join("dist-hang/mips_24kc/sidenet-agent");
    write_exec(
        &hang,
        &format!(
            "#!/bin/sh\n# Starts, answers --version and --show-id, never connects.\n\
             for a in \"$@\"; do case $a in --version|--help|--show-id) exec {real} \"$@\" ;; esac; done\n\
             exec sleep 100000\n",
            real = real.display()
        ),
    );
    let (code, r, text) = provision(&inventory("dist-hang", 8), t);
    let r = &r["router"];
    assert_eq!(code, 1, "{text}");
    assert_eq!(r["result"], "failed", "{text}");
    assert_eq!(r["step"], "enrol");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains(&format!(
            "node {id} did not come online with agent {VERSION} within 8s"
        )) && e.contains("service running: yes"),
        "{e}"
    );
    assert!(
        e.contains("offline") || e.contains("its last report is from before the agent was started"),
        "{e}"
    );
    let pid = agent_pid(&root).unwrap();
    assert!(alive(pid), "the stand-in agent runs");
    // The real agent again.
    let (code, r, text) = provision(&args, t);
    assert_eq!(code, 0, "{text}\n{}", logs());
    assert_eq!(r["router"]["result"], "provisioned");

    // ---- Remove.
    let files = [
        "usr/bin/sidenet-agent",
        "etc/init.d/sidenet-agent",
        "etc/sidenet/agent.json",
        "lib/upgrade/keep.d/sidenet-agent",
        "etc/rc.d/S95sidenet-agent",
        "etc/rc.d/K10sidenet-agent",
        "etc/sidenet-agent",
    ];
    let pid = agent_pid(&root).unwrap();
    let mut remove_args = args.clone();
    remove_args.push("--remove".into());
    let (code, r, text) = provision(&remove_args, t);
    let r = &r["router"];
    assert_eq!(code, 0, "{text}");
    assert_eq!(r["result"], "removed", "{text}");
    for f in files {
        assert!(
            std::fs::symlink_metadata(root.join(f)).is_err(),
            "{f} is still there"
        );
    }
    assert!(!alive(pid), "the agent still runs");
    // Forgotten: only its MeshNode (declared above) is left of it.
    assert!(
        row(&id).is_none_or(|n| n.phase == "Declared"),
        "the controller still has {id} enrolled: {:?}",
        row(&id)
    );
    let has_uninstall = common::run(Command::new(&real).arg("--help")).contains("--uninstall");
    if has_uninstall {
        assert!(strs(&r["changes"]).contains(&"the agent undid its changes (--uninstall)".into()));
    } else {
        assert!(
            strs(&r["warnings"]).iter().any(|w| w.ends_with(
                "has no --uninstall: what it configured on the system was left as it is"
            )),
            "{r}"
        );
    }
    assert!(
        strs(&r["warnings"]).contains(
            &"packages the configs needed were left installed: babeld, wireguard-tools, wpad-mesh-mbedtls, iw".into()
        ),
        "{r}"
    );
    let (_, r, text) = provision(&remove_args, t);
    assert_eq!(r["router"]["result"], "not-installed", "{text}");

    // ---- An agent with --uninstall: run before anything is deleted; when it fails, nothing is.
    let uninst = t.join("dist-uninstall/mips_24kc/sidenet-agent");
    let marker = root.join("uninstalled");
    let fail = t.join("fail-uninstall");
    write_exec(
        &uninst,
        &format!(
            "#!/bin/sh\n# The agent, with an --uninstall that leaves a marker.\n\
             case \"$1\" in\n\
             --help) {real} --help; echo '      --uninstall  Undo every change to the system'; exit 0 ;;\n\
             --uninstall) if [ -e {fail} ]; then echo 'cannot restore /etc/config/wireless' >&2; exit 3; fi; echo \"$@\" > {marker}; exit 0 ;;\n\
             esac\n\
             exec {real} \"$@\"\n",
            real = real.display(),
            fail = fail.display(),
            marker = marker.display()
        ),
    );
    let (code, r, text) = provision(&inventory("dist-uninstall", 60), t);
    assert_eq!(code, 0, "{text}\n{}", logs());
    let id2 = r["router"]["nodeId"].as_str().unwrap().to_string();
    assert_ne!(id2, id, "a removed router comes back as a new node");
    std::fs::write(&fail, "").unwrap();
    let mut remove_args = inventory("dist-uninstall", 60);
    remove_args.push("--remove".into());
    let (code, r, text) = provision(&remove_args, t);
    let r = &r["router"];
    assert_eq!(code, 1, "{text}");
    assert_eq!(r["step"], "uninstall");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains(&format!(
            "`{}/usr/bin/sidenet-agent --uninstall --config {}/etc/sidenet/agent.json` failed (exit status 3), so its files were left in place for another try: cannot restore /etc/config/wireless",
            root.display(),
            root.display()
        )),
        "{e}"
    );
    assert!(root.join("usr/bin/sidenet-agent").exists());
    assert!(root.join("etc/sidenet-agent").exists());
    std::fs::remove_file(&fail).unwrap();
    let (code, r, text) = provision(&remove_args, t);
    assert_eq!(code, 0, "{text}");
    assert_eq!(r["router"]["result"], "removed");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        format!(
            "--uninstall --config {}/etc/sidenet/agent.json",
            root.display()
        )
    );
    for f in files {
        assert!(std::fs::symlink_metadata(root.join(f)).is_err(), "{f}");
    }
    assert!(row(&id2).is_none());
}
