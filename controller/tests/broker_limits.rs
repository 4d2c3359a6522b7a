//! The embedded broker's connection cap against the open-file limit, with the real controller
//! binary started under `ulimit`, a real agent, and 1,100 MQTT clients flooding the broker.
//!
//! At a soft limit of 1024 the controller used to let the broker take every descriptor: the
//! broker logged `accept: Too many open files` and the controller could no longer read its
//! manifests. Now it raises the soft limit to the hard limit and caps the broker's connections
//! below it, keeping room for its own files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Proc, bin, free_port, repo, wait_for};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_wire::keys::KeyPair;

const WAIT: Duration = Duration::from_secs(30);
const FLOOD: usize = 1100;

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        std::fs::copy(
            repo().join("examples/riverside/mesh.yaml"),
            dir.path().join("manifests/mesh.yaml"),
        )
        .unwrap();
        Setup {
            dir,
            port: free_port(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// The controller under `ulimit -n`: soft limit `soft`, and hard limit `hard` (or the
    /// inherited one).
    fn controller(&self, soft: u64, hard: Option<u64>, log: &str) -> Proc {
        let limits = match hard {
            Some(h) => format!("ulimit -S -n {soft} && ulimit -H -n {h}"),
            None => format!("ulimit -S -n {soft}"),
        };
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("{limits} && exec \"$@\""))
            .arg("bash")
            .arg(bin("sidenet-controller"))
            .arg("standalone")
            .arg("--manifests")
            .arg(self.path("manifests"))
            .arg("--profiles")
            .arg(repo().join("hardware-profiles"))
            .arg("--templates")
            .arg(repo().join("templates"))
            .arg("--state")
            .arg(self.state())
            .arg("--poll-ms")
            .arg("100")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port));
        let p = Proc::spawn("controller", &mut cmd, &self.path(log));
        wait_for(
            "the controller's admin socket",
            WAIT,
            || admin::call(&self.state(), &Request::Status).ok(),
            || p.log_text(),
        );
        p
    }

    fn agent(&self, name: &str) -> Proc {
        Proc::spawn(
            name,
            Command::new(bin("sidenet-agent")).args([
                "--mesh",
                "riverside",
                "--broker",
                &format!("mqtt://127.0.0.1:{}", self.port),
                "--root",
                &self.path(name).display().to_string(),
                "--profile",
                "raspberrypi-4b-awus036acm",
                "--hostname",
                name,
                "--status-interval",
                "2",
                "--join",
                &common::join_code(&self.state()),
            ]),
            &self.path(&format!("{name}.log")),
        )
    }

    fn applied_rev(&self, name: &str) -> Option<u64> {
        let text = std::fs::read(self.path(name).join("etc/sidenet-agent/current.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        v["revision"]["rev"].as_u64()
    }

    fn set_channel(&self, c: u32) {
        let p = self.path("manifests/mesh.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replacen("channel: 36", &format!("channel: {c}"), 1);
        std::fs::write(&p, text).unwrap();
    }
}

/// The number in `line` right after `before`.
fn number_after(log: &str, before: &str) -> Option<usize> {
    let rest = &log[log.find(before)? + before.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Opens `n` sockets to the broker, each sending a CONNECT with a fresh node id (keepalive 0,
/// so a connected one stays). Returns the connected sockets (CONNACK 0) and how many were
/// closed without a CONNACK.
fn flood(port: u16, n: usize, seed: u8) -> (Vec<TcpStream>, usize) {
    let mut connected = Vec::new();
    let mut closed = 0;
    for i in 0..n {
        let mut key = [seed; 32];
        key[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let id = KeyPair::from_seed(&key).public().node_id();
        let mut body = Vec::new();
        body.extend_from_slice(&[0, 4]);
        body.extend_from_slice(b"MQTT");
        body.extend_from_slice(&[4, 0x02, 0, 0]);
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend_from_slice(&body);
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            closed += 1;
            continue;
        };
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut ack = [0u8; 4];
        match s.write_all(&packet).and_then(|_| s.read_exact(&mut ack)) {
            Ok(()) if ack == [0x20, 2, 0, 0] => connected.push(s),
            Ok(()) => panic!("CONNACK {ack:?} for {id}"),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("no CONNACK and no close within {WAIT:?}")
            }
            Err(_) => closed += 1,
        }
    }
    (connected, closed)
}

fn soft_limit_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn status_names(state: &Path) -> (Vec<String>, Vec<String>) {
    match admin::call(state, &Request::Status).unwrap() {
        Response::Status {
            nodes,
            manifest_errors,
            ..
        } => (
            nodes
                .into_iter()
                .map(|n| n.hostname.or(n.name).unwrap_or(n.node))
                .collect(),
            manifest_errors,
        ),
        other => panic!("{other:?}"),
    }
}

/// 1,100 MQTT clients at a soft and hard open-file limit of 1024: the broker takes connections
/// only up to its cap (1024 minus the files open at start minus 256), says so in the log, and
/// refuses the rest right after accept; meanwhile the controller reads its manifests (a broken
/// one is reported, a change reaches the connected agent) and `sidenetctl status` answers, and
/// nothing logs "Too many open files". Then with only the soft limit at 1024: the controller
/// raises it to the hard limit and all 1,100 get in.
#[test]
fn flood_at_1024_open_files_leaves_the_controller_working() {
    // This test process holds the flood's sockets itself.
    let own = sidenet_broker::limits::raise_open_files().unwrap();
    assert!(
        own.soft >= 2 * FLOOD as u64 + 200,
        "the test needs an open-file limit of at least {} (ulimit -Hn), has {}",
        2 * FLOOD + 200,
        own.soft
    );
    let s = Setup::new();
    let mut ctl = s.controller(1024, Some(1024), "controller-1024.log");
    assert_eq!(soft_limit_of(ctl.child.id()), Some(1024));
    let mut alpha = s.agent("alpha");
    wait_for(
        "alpha to apply revision 1",
        WAIT,
        || (s.applied_rev("alpha") == Some(1)).then_some(()),
        || format!("{}\n{}", ctl.log_text(), alpha.log_text()),
    );
    let log = ctl.log_text();
    let cap = number_after(&log, "the embedded broker accepts at most ")
        .unwrap_or_else(|| panic!("no clamp warning in the log:\n{log}"));
    let open = number_after(&log, "open-file limit 1024, ").unwrap();
    assert!(
        log.contains(&format!(
            "--max-connections 20000 is more than the open-file limit allows: the embedded broker accepts at most {cap} connections (open-file limit 1024, {open} files open, 256 kept for the controller)"
        )),
        "{log}"
    );
    assert_eq!(cap, 1024 - open - 256);
    assert!(cap < FLOOD);

    // Alpha reconnects once, with the broker password its first config carried.
    wait_for(
        "alpha to log in with its broker password",
        WAIT,
        || {
            alpha
                .log_text()
                .contains("with this node's broker password")
                .then_some(())
        },
        || alpha.log_text(),
    );
    let (held, closed) = flood(s.port, FLOOD, 1);
    // The controller's own client holds one of the cap's sockets, alpha another.
    assert_eq!(
        held.len(),
        cap - 2,
        "connected of {FLOOD} with a cap of {cap}"
    );
    assert_eq!(held.len() + closed, FLOOD);
    wait_for(
        "the connection-limit warning",
        WAIT,
        || {
            ctl.log_text()
                .contains(&format!("connection limit of {cap} sockets reached"))
                .then_some(())
        },
        || ctl.log_text(),
    );

    // sidenetctl answers.
    let out = Command::new(bin("sidenetctl"))
        .arg("status")
        .arg("--state")
        .arg(s.state())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sidenetctl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("alpha"));

    // The controller reads its manifest folder: a broken file is reported as what it is...
    std::fs::write(
        s.path("manifests/zz-broken.yaml"),
        "apiVersion: sidenet.io/v1alpha1\nkind: Mesh\nmetadata: [not, a, map]\n",
    )
    .unwrap();
    let errors = wait_for(
        "the broken manifest to be reported",
        WAIT,
        || {
            let (_, errors) = status_names(&s.state());
            errors
                .iter()
                .any(|e| e.contains("zz-broken.yaml"))
                .then_some(errors)
        },
        || ctl.log_text(),
    );
    assert!(
        errors.iter().all(|e| !e.contains("os error 24")),
        "{errors:?}"
    );
    // ... and once it is gone, a change reaches the connected agent through the broker.
    std::fs::remove_file(s.path("manifests/zz-broken.yaml")).unwrap();
    s.set_channel(44);
    wait_for(
        "alpha to apply revision 2 during the flood",
        WAIT,
        || (s.applied_rev("alpha") == Some(2)).then_some(()),
        || format!("{}\n{}", ctl.log_text(), alpha.log_text()),
    );
    let (names, errors) = status_names(&s.state());
    assert!(
        names.len() == 1 && names[0].contains("alpha") && errors.is_empty(),
        "{names:?} {errors:?}"
    );
    let log = ctl.log_text();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(!log.contains("os error 24"), "{log}");
    drop(held);
    alpha.kill();
    ctl.kill();

    // Only the soft limit at 1024: raised to the hard limit, and the whole flood gets in.
    let hard = own.hard;
    let ctl = s.controller(1024, None, "controller-raised.log");
    let want = if hard == u64::MAX {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    } else {
        hard
    };
    assert_eq!(soft_limit_of(ctl.child.id()), Some(want));
    let log = ctl.log_text();
    assert!(
        log.contains(&format!("open-file limit raised from 1024 to {want}")),
        "{log}"
    );
    let (held, closed) = flood(s.port, FLOOD, 2);
    assert_eq!((held.len(), closed), (FLOOD, 0));
    let (names, _) = status_names(&s.state());
    assert!(names.len() == 1 && names[0].contains("alpha"), "{names:?}");
}
