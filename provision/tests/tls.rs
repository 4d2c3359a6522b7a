//! `sidenetctl provision --broker mqtts://… --broker-ca CA.pem` against a real OpenSSH server and
//! a standalone controller whose embedded broker serves TLS: the CA lands in the agent's
//! bootstrap config (`brokerCa`), the agent started from it enrols over TLS; mistakes are
//! refused (no CA for mqtts://, an agent binary built without `tls`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Agents, Auth, Controller, Sshd, bin, free_port, wait_for};
use serde_json::Value;

fn provision(args: &[String], cwd: &Path) -> (i32, Vec<Value>, String) {
    let out = Command::new(bin("sidenetctl"))
        .arg("provision")
        .args(args)
        .args(["-o", "json"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let reports = serde_json::from_str(&stdout).unwrap_or_default();
    (
        out.status.code().unwrap_or(-1),
        reports,
        format!("{stdout}\n{stderr}"),
    )
}

#[test]
fn provisioning_pins_the_broker_ca_and_the_agent_enrols_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let pki = t.join("pki");
    let made = Command::new(common::repo().join("tests/peers/make-pki"))
        .arg(&pki)
        .output()
        .expect("tests/peers/make-pki (needs the openssl command)");
    assert!(made.status.success(), "{made:?}");
    let tls_port = free_port();
    let extra: Vec<OsString> = vec![
        "--tls-listen".into(),
        format!("127.0.0.1:{tls_port}").into(),
        "--tls-cert".into(),
        pki.join("server.pem").into(),
        "--tls-key".into(),
        pki.join("server.key").into(),
    ];
    let ctl = Controller::start_with_args(
        &t.join("ctl"),
        "auto",
        &common::repo().join("templates"),
        &t.join("dist"),
        &extra,
    );
    common::test_templates(&t.join("templates"));
    common::dist(&t.join("dist"), &["x86_64"]);
    // An "agent" built without TLS, as its --version says.
    let plain = t.join("plain-dist/x86_64");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(
        plain.join("sidenet-agent"),
        "#!/bin/sh\necho 'sidenet-agent 0.1.0 (no tls)'\n",
    )
    .unwrap();
    std::fs::set_permissions(
        plain.join("sidenet-agent"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir_all(t.join("keys")).unwrap();
    common::keygen(&t.join("keys/admin"));
    let admin_pub = std::fs::read_to_string(t.join("keys/admin.pub")).unwrap();
    let root = t.join("devices/attic");
    common::fake_device(&root, None, &["phy0"]);
    let _agents = Agents(vec![root.clone()]);
    let sshd = Sshd::start(&t.join("sshd"), "attic", Auth::Key, &admin_pub);

    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let ca = pki.join("ca.pem");
    let args = |broker: &str, ca: Option<&Path>, agents: &Path| -> Vec<String> {
        let mut a: Vec<String> = vec![
            format!("root@127.0.0.1:{}", sshd.port),
            "--mesh".into(),
            "riverside".into(),
            "--broker".into(),
            broker.into(),
            "--identity".into(),
            t.join("keys/admin").display().to_string(),
            "--accept-new-host-keys".into(),
            "--root".into(),
            root.display().to_string(),
            "--state".into(),
            ctl.state().display().to_string(),
            "--agents".into(),
            agents.display().to_string(),
            "--templates".into(),
            t.join("templates").display().to_string(),
            "--profiles".into(),
            common::repo()
                .join("hardware-profiles")
                .display()
                .to_string(),
            "--enrol-timeout".into(),
            "60".into(),
        ];
        if let Some(ca) = ca {
            a.push("--broker-ca".into());
            a.push(ca.display().to_string());
        }
        a
    };

    // mqtts:// without a CA: refused before any host is touched.
    let out = Command::new(bin("sidenetctl"))
        .arg("provision")
        .args(args(&url, None, &t.join("dist")))
        .current_dir(t)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("pass --broker-ca FILE"), "{err}");

    // An agent binary without TLS: that host fails, and says why.
    let (code, reports, text) = provision(&args(&url, Some(&ca), &t.join("plain-dist")), t);
    assert_eq!(code, 1, "{text}");
    let e = reports[0]["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("cannot speak mqtts://") && e.contains("--features tls"),
        "{text}"
    );

    // The real agent: installed with the CA pinned in its bootstrap config, enrols over TLS.
    let (code, reports, text) = provision(&args(&url, Some(&ca), &t.join("dist")), t);
    let logs = || {
        format!(
            "{text}\n--- controller\n{}\n--- agent\n{}",
            common::tail(&ctl.proc.log_text(), 30),
            common::tail(
                &std::fs::read_to_string(root.join("var/log/sidenet-agent.log"))
                    .unwrap_or_default(),
                30
            )
        )
    };
    assert_eq!(code, 0, "{}", logs());
    assert_eq!(reports[0]["result"], "provisioned", "{}", logs());
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(root.join("etc/sidenet/agent.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["broker"], url.as_str());
    assert_eq!(
        cfg["brokerCa"].as_str(),
        Some(std::fs::read_to_string(&ca).unwrap().as_str())
    );
    wait_for(
        "the agent to say it pinned the CA from its bootstrap config",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(root.join("var/log/sidenet-agent.log"))
                .unwrap_or_default()
                .contains("trusting only the CA bundle from brokerCa in --config")
                .then_some(())
        },
        logs,
    );
    let node = reports[0]["nodeId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ctl.nodes().iter().any(|n| n.node == node),
        "{node} not enrolled\n{}",
        logs()
    );
}
