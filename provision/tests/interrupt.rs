//! Killing `sidenetctl provision` in the middle of the agent upload leaves no host with a
//! half-installed agent, and the next run completes. Also: unknown host keys are refused unless
//! trust on first use is allowed, and a mesh in token mode gets one single-use token per node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Agents, Auth, Controller, Proc, Sshd, agent_pid, alive, bin, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn staged(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for dir in [
        "usr/bin",
        "usr/local/bin",
        "etc/sidenet",
        "etc/init.d",
        "etc/systemd/system",
    ] {
        for e in std::fs::read_dir(root.join(dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".sidenet-new.") {
                out.push((e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    out
}

fn reports(stdout: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn killed_mid_upload_leaves_nothing_half_installed_and_the_next_run_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ctl = Controller::start(&t.join("ctl"), "token");
    common::test_templates(&t.join("templates"));
    std::fs::create_dir_all(t.join("keys")).unwrap();
    common::keygen(&t.join("keys/admin"));
    let admin_pub = std::fs::read_to_string(t.join("keys/admin.pub")).unwrap();

    // A real agent made large (an ELF runs with bytes appended), so the upload takes long
    // enough to be caught in the middle.
    let big = t.join("dist/x86_64/sidenet-agent");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    let mut bytes = std::fs::read(bin("sidenet-agent")).unwrap();
    bytes.resize(bytes.len() + 96 * 1024 * 1024, 0);
    let full = bytes.len() as u64;
    std::fs::File::create(&big)
        .and_then(|mut f| f.write_all(&bytes))
        .unwrap();
    drop(bytes);
    std::os::unix::fs::symlink(&big, {
        std::fs::create_dir_all(t.join("dist/mips_24kc")).unwrap();
        t.join("dist/mips_24kc/sidenet-agent")
    })
    .unwrap();

    let dev = |n: &str| t.join("devices").join(n);
    common::fake_device(&dev("north"), None, &["phy0"]);
    common::fake_device(
        &dev("south"),
        Some("tplink-archer-c7-v2.json"),
        &["phy0", "phy1"],
    );
    let _agents = Agents(vec![dev("north"), dev("south")]);
    let north = Sshd::start(&t.join("sshd"), "north", Auth::Key, &admin_pub);
    let south = Sshd::start(&t.join("sshd"), "south", Auth::Key, &admin_pub);
    let inventory = format!(
        "mesh: riverside\nbroker: {}\ndefaults: {{ privateKeyFile: keys/admin }}\nhosts:\n  - {{ host: 127.0.0.1, port: {}, name: north, root: {} }}\n  - {{ host: 127.0.0.1, port: {}, name: south, root: {} }}\n",
        ctl.broker(),
        north.port,
        dev("north").display(),
        south.port,
        dev("south").display()
    );
    std::fs::write(t.join("inventory.yaml"), inventory).unwrap();
    let cmd = |extra: &[&str]| {
        let mut c = Command::new(bin("sidenetctl"));
        c.arg("provision")
            .arg("-i")
            .arg(t.join("inventory.yaml"))
            .arg("--state")
            .arg(ctl.state())
            .arg("--agents")
            .arg(t.join("dist"))
            .arg("--templates")
            .arg(t.join("templates"))
            .arg("--profiles")
            .arg(common::repo().join("hardware-profiles"))
            .args(["--parallel", "2", "--tokens", "-o", "json"])
            .args(extra)
            .stdin(Stdio::null());
        c
    };

    // A one-off host on the command line, no inventory: its unknown host key is refused
    // without --accept-new-host-keys.
    let out = Command::new(bin("sidenetctl"))
        .arg("provision")
        .arg(format!("root@127.0.0.1:{}", north.port))
        .args([
            "--mesh",
            "riverside",
            "--broker",
            &ctl.broker(),
            "--identity",
        ])
        .arg(t.join("keys/admin"))
        .arg("--root")
        .arg(dev("north"))
        .arg("--state")
        .arg(ctl.state())
        .arg("--profiles")
        .arg(common::repo().join("hardware-profiles"))
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = &reports(&out.stdout)[0];
    assert_eq!(r["host"], format!("root@127.0.0.1:{}", north.port));
    assert!(r["error"].as_str().unwrap().contains("is not known"), "{r}");

    // Unknown host keys are refused without --accept-new-host-keys; nothing is pinned.
    let out = cmd(&[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    for r in reports(&out.stdout) {
        let e = r["error"].as_str().unwrap();
        assert!(
            e.contains("host key of [127.0.0.1]:")
                && e.contains("is not known (ssh-ed25519 SHA256:"),
            "{e}"
        );
    }
    assert!(!ctl.state().join("known_hosts").exists());

    // Start a run and kill it while both agents are uploading.
    let mut run = Proc::spawn(
        "sidenetctl provision",
        cmd(&["--accept-new-host-keys"]).current_dir(t),
        &t.join("interrupted.log"),
    );
    let at_kill = wait_for(
        "both hosts to be receiving the agent",
        WAIT,
        || {
            let n = staged(&dev("north"));
            let s = staged(&dev("south"));
            (n.iter().any(|(_, len)| *len > 0) && s.iter().any(|(_, len)| *len > 0)).then(|| {
                run.kill();
                [n, s].concat()
            })
        },
        || std::fs::read_to_string(t.join("interrupted.log")).unwrap_or_default(),
    );
    assert!(
        at_kill.iter().all(|(_, len)| *len < full),
        "the upload finished before the kill: {at_kill:?}"
    );
    // The device side removes the cut upload by itself (its checksum does not match) ...
    for d in ["north", "south"] {
        wait_for(
            &format!("{d}'s partial upload to be removed"),
            Duration::from_secs(20),
            || staged(&dev(d)).is_empty().then_some(()),
            || format!("{:?}", staged(&dev(d))),
        );
        // ... and nothing was switched into place: no agent, config or service, nothing runs.
        for p in [
            "usr/bin/sidenet-agent",
            "usr/local/bin/sidenet-agent",
            "etc/sidenet/agent.json",
            "etc/init.d/sidenet-agent",
            "etc/systemd/system/sidenet-agent.service",
        ] {
            assert!(!dev(d).join(p).exists(), "{d}: {p} exists after the kill");
        }
        assert_eq!(agent_pid(&dev(d)), None, "{d}");
    }
    assert!(ctl.nodes().is_empty(), "{:?}", ctl.nodes());

    // A leftover the device could not remove (say it lost power mid-upload) is cleaned up by
    // the next run.
    std::fs::write(
        dev("north").join("usr/local/bin/.sidenet-agent.sidenet-new.123-abc"),
        b"partial",
    )
    .unwrap();

    // The next run completes, with the host keys pinned during the interrupted one.
    let out = cmd(&[]).current_dir(t).output().unwrap();
    let rs = reports(&out.stdout);
    let ctx = || {
        format!(
            "{rs:#?}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            common::tail(&ctl.proc.log_text(), 30)
        )
    };
    assert_eq!(out.status.code(), Some(0), "{}", ctx());
    for r in &rs {
        assert_eq!(r["result"], "provisioned", "{}", ctx());
    }
    let changes = |i: usize| rs[i]["changes"].as_array().unwrap().clone();
    assert_eq!(
        changes(0)[0],
        "removed 1 file(s) left staged by an interrupted run"
    );
    assert!(staged(&dev("north")).is_empty());
    // Token mode: each node enrolled with its own single-use token and is configured.
    wait_for(
        "both nodes Ready",
        WAIT,
        || {
            let nodes = ctl.nodes();
            (nodes.len() == 2 && nodes.iter().all(|n| n.phase == "Ready")).then_some(())
        },
        || format!("{:?}\n{}", ctl.nodes(), ctx()),
    );
    for (i, d) in ["north", "south"].iter().enumerate() {
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(dev(d).join("etc/sidenet/agent.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["token"].as_str().map(str::len), Some(32), "{d}");
        let agent = if *d == "north" {
            "usr/local/bin/sidenet-agent"
        } else {
            "usr/bin/sidenet-agent"
        };
        assert_eq!(std::fs::metadata(dev(d).join(agent)).unwrap().len(), full);
        assert!(alive(agent_pid(&dev(d)).unwrap()));
        assert!(
            ctl.nodes()
                .iter()
                .any(|n| Some(n.node.as_str()) == rs[i]["nodeId"].as_str())
        );
    }
    let first = std::fs::read_to_string(dev("north").join("etc/sidenet/agent.json")).unwrap();
    assert_ne!(
        first,
        std::fs::read_to_string(dev("south").join("etc/sidenet/agent.json")).unwrap()
    );
    eprintln!(
        "killed at {:?} of {full} bytes; the run that completed took {}",
        at_kill.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
        rs.iter()
            .map(|r| format!("{} {}ms", r["name"], r["durationMs"]))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
