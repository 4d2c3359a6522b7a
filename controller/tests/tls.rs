//! MQTT over TLS with real processes: `sidenet-agent --broker mqtts://… --ca CA.pem` against the
//! standalone controller's embedded broker (`--tls-listen`) and against a Mosquitto TLS
//! listener. Agents pinned to another CA never connect and say why; start errors name the flag
//! or file. Certificates: `tests/peers/make-pki` (the openssl command-line tool).
//!
//! The agent must be built with the cargo feature `tls` (`scripts/test` does:
//! `cargo test --workspace --features sidenet-agent/tls`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, bin, free_port, repo, wait_for};
use sidenet_controller::admin::{self, Request, Response};

const PROFILE: &str = "raspberrypi-4b-awus036acm";
const WAIT: Duration = Duration::from_secs(30);

fn make_pki(dir: &Path) -> PathBuf {
    let out = Command::new(repo().join("tests/peers/make-pki"))
        .arg(dir)
        .output()
        .expect("tests/peers/make-pki (needs the openssl command)");
    assert!(out.status.success(), "make-pki: {out:?}");
    dir.to_path_buf()
}

/// The agent binary, checked to speak mqtts://.
fn tls_agent() -> PathBuf {
    let agent = bin("sidenet-agent");
    let out = Command::new(&agent).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains("(tls)"),
        "{} was built without the cargo feature `tls` ({version:?}): build it with `cargo build -p sidenet-agent --features tls` (scripts/test does)",
        agent.display()
    );
    agent
}

struct Setup {
    dir: tempfile::TempDir,
    pki: PathBuf,
    other: PathBuf,
    ctl: Option<Proc>,
    procs: Vec<Proc>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = make_pki(&dir.path().join("pki"));
        let other = make_pki(&dir.path().join("other-ca"));
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        std::fs::copy(
            repo().join("examples/riverside/mesh.yaml"),
            dir.path().join("manifests/mesh.yaml"),
        )
        .unwrap();
        Setup {
            dir,
            pki,
            other,
            ctl: None,
            procs: Vec::new(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The standalone controller: its embedded broker (plain `listen`, TLS on `tls` if given)
    /// or the external `broker`.
    fn controller(&mut self, listen: u16, tls: Option<u16>, broker: Option<&str>) {
        let mut cmd = Command::new(bin("sidenet-controller"));
        cmd.arg("standalone")
            .arg("--manifests")
            .arg(self.path("manifests"))
            .arg("--profiles")
            .arg(repo().join("hardware-profiles"))
            .arg("--templates")
            .arg(repo().join("templates"))
            .arg("--state")
            .arg(self.path("state"))
            .arg("--poll-ms")
            .arg("100")
            .arg("--listen")
            .arg(format!("127.0.0.1:{listen}"));
        if let Some(t) = tls {
            cmd.arg("--tls-listen")
                .arg(format!("127.0.0.1:{t}"))
                .arg("--tls-cert")
                .arg(self.pki.join("server.pem"))
                .arg("--tls-key")
                .arg(self.pki.join("server.key"));
        }
        if let Some(b) = broker {
            cmd.arg("--broker").arg(b);
            if b.starts_with("mqtts://") {
                cmd.arg("--broker-ca").arg(self.pki.join("ca.pem"));
            }
        }
        self.ctl = Some(Proc::spawn(
            "controller",
            &mut cmd,
            &self.path("controller.log"),
        ));
        let state = self.path("state");
        wait_for(
            "the controller's admin socket",
            WAIT,
            || admin::call(&state, &Request::Status).ok(),
            || self.logs(),
        );
    }

    /// An agent named `name` (root and log under the test folder) with `args`.
    fn agent(&mut self, name: &str, args: &[String]) -> PathBuf {
        let root = self.path(name);
        let mut cmd = Command::new(tls_agent());
        cmd.args([
            "--mesh",
            "riverside",
            "--profile",
            PROFILE,
            "--hostname",
            name,
        ])
        .arg("--root")
        .arg(&root)
        .args(["--status-interval", "2"])
        .args(args);
        if !args.iter().any(|a| a == "--config") {
            cmd.args(["--join", &common::join_code(&self.path("state"))]);
        }
        self.procs.push(Proc::spawn(
            name,
            &mut cmd,
            &self.path(&format!("{name}.log")),
        ));
        root
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for p in self.ctl.iter().chain(&self.procs) {
            let text = p.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            s.push_str(&format!("--- {}\n{tail}\n", p.name));
        }
        s
    }

    fn wait_rev(&self, root: &Path, rev: u64) {
        wait_for(
            &format!("{} to apply revision {rev}", root.display()),
            WAIT,
            || (applied_rev(root) == Some(rev)).then_some(()),
            || self.logs(),
        );
    }

    /// The hostnames of the nodes the controller knows (enrolled or declared and seen).
    fn hostnames(&self) -> Vec<String> {
        match admin::call(&self.path("state"), &Request::Status) {
            Ok(Response::Status { nodes, .. }) => {
                nodes.into_iter().filter_map(|n| n.hostname).collect()
            }
            other => panic!("status: {other:?}"),
        }
    }

    /// An agent pinned to the other CA: it keeps failing the handshake, says so in its log,
    /// and the controller never hears of it; meanwhile `good` (started alongside) enrols.
    fn assert_wrong_ca_never_connects(&mut self, broker: &str, good: &Path) {
        let other_ca = self.other.join("ca.pem");
        let wrong = self.agent(
            "wrong-ca",
            &[
                "--broker".into(),
                broker.into(),
                "--ca".into(),
                other_ca.display().to_string(),
            ],
        );
        // Several attempts (the backoff starts at 250 ms), each refused with the reason.
        let reason = "not signed by the pinned CA";
        wait_for(
            "the wrong-CA agent to be refused three times",
            WAIT,
            || (self.log("wrong-ca").matches(reason).count() >= 3).then_some(()),
            || self.logs(),
        );
        self.wait_rev(good, 1);
        let log = self.log("wrong-ca");
        assert!(log.contains("UnknownIssuer"), "{log}");
        assert!(log.contains(&other_ca.display().to_string()), "{log}");
        assert!(!log.contains("connected to"), "{log}");
        assert!(applied_rev(&wrong).is_none());
        let known = self.hostnames();
        assert!(
            known.iter().any(|h| h == "good") && !known.iter().any(|h| h == "wrong-ca"),
            "{known:?}"
        );
    }
}

fn applied_rev(root: &Path) -> Option<u64> {
    let text = std::fs::read(root.join("etc/sidenet-agent/current.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v["revision"]["rev"].as_u64()
}

/// Agents over TLS to the embedded broker: one with `--ca`, one with the CA in its bootstrap
/// config (and the host as a DNS name); a plain agent on the plain listener alongside. A change
/// reaches all three.
#[test]
fn agents_enrol_over_tls_to_the_embedded_broker() {
    let mut s = Setup::new();
    let (plain, tls) = (free_port(), free_port());
    s.controller(plain, Some(tls), None);
    let ca = s.pki.join("ca.pem");
    let flag = s.agent(
        "good",
        &[
            "--broker".into(),
            format!("mqtts://127.0.0.1:{tls}"),
            "--ca".into(),
            ca.display().to_string(),
        ],
    );
    let config = s.path("bootstrap.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "mesh": "riverside",
            "broker": format!("mqtts://localhost:{tls}"),
            "brokerCa": std::fs::read_to_string(&ca).unwrap(),
            "joinCode": common::join_code(&s.path("state")),
        })
        .to_string(),
    )
    .unwrap();
    let boot = s.agent(
        "bootstrapped",
        &["--config".into(), config.display().to_string()],
    );
    let plain_agent = s.agent(
        "plain",
        &["--broker".into(), format!("mqtt://127.0.0.1:{plain}")],
    );
    for r in [&flag, &boot, &plain_agent] {
        s.wait_rev(r, 1);
    }
    assert!(s.log("good").contains(&format!(
        "trusting only the CA bundle from --ca {}",
        ca.display()
    )));
    assert!(
        s.log("bootstrapped")
            .contains("trusting only the CA bundle from brokerCa in --config")
    );
    let mesh = s.path("manifests/mesh.yaml");
    let text = std::fs::read_to_string(&mesh).unwrap();
    std::fs::write(&mesh, text.replace("channel: 36", "channel: 44")).unwrap();
    for r in [&flag, &boot, &plain_agent] {
        s.wait_rev(r, 2);
    }
}

/// An agent pinned to another CA never gets through the embedded broker's TLS listener.
#[test]
fn an_agent_pinned_to_another_ca_never_connects_to_the_embedded_broker() {
    let mut s = Setup::new();
    let (plain, tls) = (free_port(), free_port());
    s.controller(plain, Some(tls), None);
    let url = format!("mqtts://127.0.0.1:{tls}");
    let ca = s.pki.join("ca.pem").display().to_string();
    let good = s.agent("good", &["--broker".into(), url.clone(), "--ca".into(), ca]);
    s.assert_wrong_ca_never_connects(&url, &good);
}

/// Mosquitto with a TLS listener only: the controller (`--broker mqtts://… --broker-ca`) and an
/// agent pinned to the test CA enrol and apply; an agent pinned to another CA never connects.
#[test]
fn agents_over_tls_to_mosquitto() {
    let mut s = Setup::new();
    let tls = free_port();
    let certs = s.pki.clone();
    let conf = s.path("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\nmessage_size_limit 1048576\n\
             listener {tls} 127.0.0.1\ncafile {c}/ca.pem\ncertfile {c}/server.pem\nkeyfile {c}/server.key\n",
            c = certs.display()
        ),
    )
    .unwrap();
    let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("mosquitto is not installed: run `scripts/test` once, it installs the test peers");
    let mosq = Proc::spawn(
        "mosquitto",
        Command::new(exe).arg("-c").arg(&conf),
        &s.path("mosquitto.log"),
    );
    s.procs.push(mosq);
    wait_for(
        "mosquitto to listen",
        Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", tls)).ok(),
        || s.logs(),
    );
    let url = format!("mqtts://127.0.0.1:{tls}");
    s.controller(free_port(), None, Some(&url));
    let ca = s.pki.join("ca.pem").display().to_string();
    let good = s.agent("good", &["--broker".into(), url.clone(), "--ca".into(), ca]);
    s.wait_rev(&good, 1);
    s.assert_wrong_ca_never_connects(&url, &good);
}

/// Runs the agent with `args` and returns its exit status and stderr (it must exit by itself).
fn agent_start_error(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let mut p = Proc::spawn(
        "agent",
        Command::new(tls_agent())
            .args([
                "--mesh",
                "riverside",
                "--join",
                "riverside~aaaaaaaaaaaaaaaaaaaa",
                "--root",
            ])
            .arg(dir.path().join("root"))
            .args(args),
        &log,
    );
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            return (status.code().unwrap_or(-1), p.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit: {}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tls_start_errors_name_the_flag_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(&dir.path().join("pki"));
    let (code, err) = agent_start_error(&["--broker", "mqtts://127.0.0.1:1"]);
    assert_ne!(code, 0);
    assert!(err.contains("no CA is given: pass --ca FILE"), "{err}");
    let missing = dir.path().join("missing.pem");
    let (code, err) = agent_start_error(&[
        "--broker",
        "mqtts://127.0.0.1:1",
        "--ca",
        missing.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("--ca {}: cannot read", missing.display())),
        "{err}"
    );
    // The server's key is no CA bundle.
    let key = pki.join("server.key");
    let (code, err) = agent_start_error(&[
        "--broker",
        "mqtts://127.0.0.1:1",
        "--ca",
        key.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("--ca {}: no certificate", key.display())),
        "{err}"
    );
    // A CA with a plain URL is a mistake, not a silent downgrade.
    let ca = pki.join("ca.pem");
    let (code, err) = agent_start_error(&[
        "--broker",
        "mqtt://127.0.0.1:1",
        "--ca",
        ca.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("is not an mqtts:// URL"), "{err}");
    // The controller's TLS options go together.
    let out = Command::new(bin("sidenet-controller"))
        .args(["standalone", "--tls-listen", "127.0.0.1:1"])
        .arg("--state")
        .arg(dir.path().join("state"))
        .current_dir(repo())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("missing: --tls-cert, --tls-key"), "{err}");
    // A key that is not the certificate's.
    let other = make_pki(&dir.path().join("other"));
    let out = Command::new(bin("sidenet-controller"))
        .args(["standalone", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--tls-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--tls-cert")
        .arg(pki.join("server.pem"))
        .arg("--tls-key")
        .arg(other.join("server.key"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--manifests")
        .arg(repo().join("examples/riverside"))
        .arg("--profiles")
        .arg(repo().join("hardware-profiles"))
        .arg("--templates")
        .arg(repo().join("templates"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("the key does not fit the certificate"),
        "{err}"
    );
}
