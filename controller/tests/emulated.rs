//! The agent as built for the routers' own CPUs (`scripts/build-agents`), run under qemu-user
//! as an emulated OpenWrt router against the standalone controller and a real Mosquitto.
//!
//! The router is a root folder with OpenWrt's reload commands (`etc/init.d/network`,
//! `sbin/wifi`, ...) as small scripts that record each call, and the stock `/etc/config` of the
//! architecture's profile (tests/openwrt-stock, the owner's home AP on each radio); the agent
//! runs the `openwrt` backend on it, as a guest, with OpenWrt's own `uci` tool. Per architecture found in the cross-built
//! agents' folder (`SIDENET_CROSS_AGENTS`, default `target/agents/dist`, as `scripts/test`
//! builds it), the test checks what an emulated CPU of another endianness and word size would
//! get wrong: it enrols, verifies and applies revision 1 through the health check (the signed
//! acknowledgement round trip), its files are the controller's rendering byte for byte once the
//! sealed passphrase (opened on the node: X25519 + ChaCha20-Poly1305) and its own WireGuard key
//! are filled in, its WireGuard public key is the one `wg pubkey` derives, and its status
//! reports verify with its node key. Then a bad template gives it a config it cannot apply: it
//! rolls back to revision 1 byte for byte (reloading nothing: the bad revision changed no uci
//! section), reports the failure, and the controller
//! shows it `Failed`; the fixed template gives it a new revision, applied.
//!
//! `mips_24kc` (big-endian 32-bit MIPS, the most common CPU of 16 MB-flash routers) is required
//! when `SIDENET_REQUIRE_CROSS_AGENTS` is set (`scripts/test` sets it after building that agent);
//! every other architecture present in the folder is tested too.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Proc, bin, free_port, repo, wait_for};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::reconcile::model::StatusRow;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::{NodeConfig, StatusReport};

/// Emulation is slow to start (a second or more per process under load): generous deadlines.
const WAIT: Duration = Duration::from_secs(90);
/// The agent's health-check deadline (`--health-deadline`).
const DEADLINE: u64 = 30;
/// The architecture a CI run must test.
const REQUIRED: &str = "mips_24kc";

/// Architecture folder → (qemu-user emulator, a hardware profile of that architecture with its
/// board name). The emulators come with Debian's qemu-user-static.
fn emulation(arch: &str) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match arch {
        "mips_24kc" => (
            "qemu-mips-static",
            "tplink-archer-c7-v2",
            "tplink,archer-c7-v2",
        ),
        "mipsel_24kc" => ("qemu-mipsel-static", "asus-rt-ax53u", "asus,rt-ax53u"),
        "aarch64_cortex-a53" => (
            "qemu-aarch64-static",
            "glinet-gl-mt3000",
            "glinet,gl-mt3000",
        ),
        "arm_cortex-a15_neon-vfpv4" => ("qemu-arm-static", "netgear-r7800", "netgear,r7800"),
        _ => return None,
    })
}

/// OpenWrt's own `uci` tool, built for this machine by scripts/install-peers: the emulated
/// agent runs it as a router runs its own (qemu-user hands the host binary to the host).
fn uci_bin() -> PathBuf {
    let p = repo().join(".tools/bin/uci");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-peers once, it builds OpenWrt's uci tool",
        p.display()
    );
    p
}

fn agents_dir() -> PathBuf {
    std::env::var_os("SIDENET_CROSS_AGENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/agents/dist"))
}

/// The OpenWrt commands the backend runs, as scripts under the router's root that record
/// their calls in `calls`.
const COMMANDS: [&str; 4] = [
    "etc/init.d/network",
    "etc/init.d/firewall",
    "etc/init.d/babeld",
    "sbin/wifi",
];
struct Router {
    arch: String,
    dir: tempfile::TempDir,
    broker: String,
    ctl: Option<Proc>,
    agent: Option<Proc>,
    _mosquitto: Proc,
}

impl Router {
    fn new(arch: &str) -> Router {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("manifests")).unwrap();
        // Without the example's rate policy: the emulated router shares the host's kernel, and
        // its shaping (ifb devices, tc) would act on the host (controller/tests/openwrt.rs and
        // node-agent/tests/openwrt_guest.rs cover the OpenWrt shaping).
        let mesh = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap();
        let without = mesh.replace("    - type: rateLimit\n      rateKbit: 20000\n", "");
        assert_ne!(
            without, mesh,
            "the example's rate policy is not where the test expects it"
        );
        std::fs::write(p.join("manifests/mesh.yaml"), without).unwrap();
        copy_tree(&repo().join("templates"), &p.join("templates"));
        let root = p.join("router");
        for c in COMMANDS {
            let f = root.join(c);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(
                &f,
                format!(
                    "#!/bin/sh\necho \"{c} $*\" >> '{}'\n",
                    p.join("calls").display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // The router's own config as its first boot left it, with the owner's home AP on each
        // radio (tests/openwrt-stock; the mesh point rides the 5 GHz one).
        let stock = repo()
            .join("tests/openwrt-stock")
            .join(emulation(arch).unwrap().1)
            .join("etc/config");
        copy_tree(&stock, &root.join("etc/config"));
        let (mosquitto, port) = common::mosquitto(p);
        let mut r = Router {
            arch: arch.to_string(),
            broker: format!("mqtt://127.0.0.1:{port}"),
            dir,
            ctl: None,
            agent: None,
            _mosquitto: mosquitto,
        };
        r.start_controller();
        r
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn root(&self) -> PathBuf {
        self.path("router")
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    fn start_controller(&mut self) {
        if let Some(mut c) = self.ctl.take() {
            c.kill();
        }
        let n = std::fs::read_dir(self.dir.path()).map_or(0, |d| d.count());
        let mut cmd = Command::new(bin("sidenet-controller"));
        cmd.arg("standalone")
            .arg("--manifests")
            .arg(self.path("manifests"))
            .arg("--profiles")
            .arg(repo().join("hardware-profiles"))
            .arg("--templates")
            .arg(self.path("templates"))
            .arg("--state")
            .arg(self.state())
            .arg("--poll-ms")
            .arg("100")
            .arg("--broker")
            .arg(&self.broker);
        self.ctl = Some(Proc::spawn(
            "controller",
            &mut cmd,
            &self.path(&format!("controller-{n}.log")),
        ));
        wait_for(
            "the controller's admin socket",
            WAIT,
            || admin::call(&self.state(), &Request::Status).ok(),
            || self.logs(),
        );
    }

    fn start_agent(&mut self, agent: &Path, qemu: &str, profile: &str, board: &str) {
        let mut cmd = Command::new(qemu);
        cmd.arg(agent)
            .args(["--mesh", "riverside", "--broker", &self.broker])
            .args(["--backend", "openwrt", "--uci"])
            .arg(uci_bin())
            .arg("--root")
            .arg(self.root())
            .args(["--profile", profile, "--board", board])
            .args(["--hostname", &format!("emulated-{}", self.arch)])
            .args(["--status-interval", "2"])
            .args(["--join", &common::join_code(&self.state())])
            .args(["--health-deadline", &DEADLINE.to_string()]);
        self.agent = Some(Proc::spawn("agent", &mut cmd, &self.path("agent.log")));
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for p in [&self.ctl, &self.agent].into_iter().flatten() {
            let text = p.log_text();
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!(
                "--- {} ({})\n{}\n",
                p.name,
                self.arch,
                lines[lines.len().saturating_sub(60)..].join("\n")
            ));
        }
        s
    }

    /// The emulated router's row in the controller's node table.
    fn row(&self) -> Option<StatusRow> {
        match admin::call(&self.state(), &Request::Status).ok()? {
            Response::Status { nodes, .. } => nodes.into_iter().find(|n| {
                n.hostname.as_deref() == Some(format!("emulated-{}", self.arch).as_str())
            }),
            _ => None,
        }
    }

    fn wait_row(&self, what: &str, ok: impl Fn(&StatusRow) -> bool) -> StatusRow {
        wait_for(
            &format!("{} ({})", what, self.arch),
            WAIT,
            || self.row().filter(|r| ok(r)),
            || format!("row: {:?}\n{}", self.row(), self.logs()),
        )
    }

    fn node_key(&self) -> KeyPair {
        KeyPair::from_file_text(&read(&self.root(), "etc/sidenet-agent/node.key")).unwrap()
    }

    fn calls(&self) -> Vec<String> {
        read(self.dir.path(), "calls")
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every file under the router's `etc/config` and `etc/sidenet` (sidenet's uci batches in
    /// `etc/sidenet/uci` included), with its mode.
    fn snapshot(&self) -> BTreeMap<String, (u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut dirs = vec!["etc/config".to_string(), "etc/sidenet".to_string()];
        while let Some(d) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(self.root().join(&d)) else {
                continue;
            };
            for e in entries {
                let e = e.unwrap();
                let name = format!("{d}/{}", e.file_name().to_string_lossy());
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    dirs.push(name);
                } else if meta.is_file() {
                    out.insert(
                        name,
                        (
                            meta.permissions().mode() & 0o7777,
                            std::fs::read(e.path()).unwrap(),
                        ),
                    );
                }
            }
        }
        out
    }
}

/// `n` rounds of the openwrt backend's reload commands, in the order it runs them.
fn reloads(n: usize) -> Vec<String> {
    [
        "etc/init.d/network reload",
        "sbin/wifi reload",
        "etc/init.d/firewall reload",
        "etc/init.d/babeld restart",
    ]
    .repeat(n)
    .into_iter()
    .map(String::from)
    .collect()
}

fn read(root: &Path, p: &str) -> String {
    std::fs::read_to_string(root.join(p)).unwrap_or_default()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The first `n` messages on `topic` (retained ones included), as a curious client sees them.
fn messages(broker: &str, topic: &str, n: usize) -> Vec<Vec<u8>> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let (host, port) = sidenet_wire::topics::parse_broker_url(broker).unwrap();
    let mut opts = MqttOptions::new(format!("observer-{}", free_port()), host, port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 100);
    client.subscribe(topic, QoS::AtLeastOnce).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {n} messages on {topic}"
        );
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p.payload.to_vec()),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("observer: {e}"),
        }
    }
    let _ = client.disconnect();
    got
}

/// `wg pubkey` (wireguard-tools, scripts/install-peers) of a base64 private key.
fn wg_pubkey(private: &str) -> String {
    use std::io::Write;
    let mut c = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wg (wireguard-tools; scripts/install-peers installs it)");
    c.stdin
        .take()
        .unwrap()
        .write_all(format!("{private}\n").as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "wg pubkey: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn run(arch: &str, agent: &Path) {
    let (qemu, profile, board) = emulation(arch).unwrap();
    let mut r = Router::new(arch);
    r.start_agent(agent, qemu, profile, board);

    // ---- Enrols, verifies, applies revision 1 through the health check.
    let row = r.wait_row("the emulated router to enrol and apply revision 1", |r| {
        r.phase == "Ready" && r.applied.is_some() && r.applied == r.desired
    });
    let rev1 = row.applied.unwrap();
    let version = Command::new(qemu)
        .arg(agent)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("sidenet-agent "));
    let key = r.node_key();
    assert_eq!(row.node, key.public().node_id());

    // Its files are the config it was sent (the retained one on the broker, checked here with
    // the mesh key), with the sealed secrets opened (here, with its node key: the emulated CPU
    // opened them the same way) and its own WireGuard key filled in.
    let mesh_key = KeyPair::from_file_text(&read(&r.state(), "keys/riverside.key")).unwrap();
    let env = messages(
        &r.broker,
        &sidenet_wire::topics::config("riverside", &row.node),
        1,
    )
    .remove(0);
    let cfg: NodeConfig = sidenet_wire::Envelope::parse(&env, 1 << 20)
        .unwrap()
        .verify(sidenet_wire::Kind::Config, &mesh_key.public())
        .unwrap()
        .body_json()
        .unwrap();
    assert!(!cfg.sealed.is_empty(), "the config carries sealed secrets");
    let wg_private = read(&r.root(), "etc/sidenet-agent/wg.key")
        .trim()
        .to_string();
    let applied = r.snapshot();
    assert!(!cfg.files.is_empty());
    for f in &cfg.files {
        let mut want = f
            .content
            .replace("@sidenet-wireguard-private-key@", &wg_private);
        for (name, sealed) in &cfg.sealed {
            let ctx = sidenet_wire::seal::Context {
                mesh: "riverside",
                node: &row.node,
                name,
            };
            let plain = sidenet_wire::seal::open(&key, ctx, sealed).unwrap();
            want = want.replace(
                &format!("@sidenet-secret:{name}@"),
                std::str::from_utf8(&plain).unwrap(),
            );
        }
        let (mode, got) = applied
            .get(&f.path)
            .unwrap_or_else(|| panic!("{arch}: {} was not written", f.path));
        assert_eq!(
            String::from_utf8_lossy(got),
            want,
            "{arch}: {} differs from the controller's rendering",
            f.path
        );
        let want_mode = if f.content.contains("@sidenet-wireguard-private-key@") {
            0o600
        } else {
            f.mode
        };
        assert_eq!(*mode, want_mode, "{arch}: mode of {}", f.path);
    }
    let pass = std::fs::read_dir(r.state().join("secrets"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .next()
        .unwrap();
    assert!(
        read(&r.root(), "etc/config/wireless").contains(&format!("option key '{}'", pass.trim()))
    );
    // The router's own reload commands ran once, in OpenWrt's order, for revision 1, which
    // added sidenet's sections to all four packages. Starting the agent reloaded nothing: a
    // guest with no config yet changes nothing on the router.
    assert_eq!(r.calls(), reloads(1), "{arch}\n{}", r.logs());
    // Its status reports verify with its node key, and name its WireGuard key as wg derives it.
    let status = messages(
        &r.broker,
        &sidenet_wire::topics::status("riverside", &row.node),
        1,
    )
    .remove(0);
    let report: StatusReport = sidenet_wire::Envelope::parse(&status, 1 << 20)
        .unwrap()
        .verify(sidenet_wire::Kind::Status, &key.public())
        .unwrap_or_else(|e| panic!("{arch}: its status report does not verify: {e}"))
        .body_json()
        .unwrap();
    let wg = report.wireguard.as_ref().expect("wireguard in status");
    assert_eq!(wg.public_key, wg_pubkey(&wg_private), "{arch}");
    assert_eq!(report.applied, Some(rev1));

    // ---- A template error gives it a config it cannot apply: it rolls back and reports.
    let tpl = r.path("templates/openwrt/probes.j2");
    let good = std::fs::read_to_string(&tpl).unwrap();
    std::fs::write(
        &tpl,
        format!("{good}gateway {{{{ node.id }}}} not-an-address\n"),
    )
    .unwrap();
    r.start_controller();
    let row = r.wait_row(
        "the emulated router to roll back the bad revision and report it",
        |r| r.phase == "Failed" && r.applied == Some(rev1) && r.desired > Some(rev1),
    );
    let bad = row.desired.unwrap();
    let failure = row.failure.clone().unwrap_or_default();
    assert!(
        failure.contains("probes line") && failure.contains("not-an-address"),
        "{arch}: {failure}"
    );
    assert_eq!(
        r.snapshot(),
        applied,
        "{arch}: the rollback did not restore revision {rev1} byte for byte"
    );
    // The bad revision changed only the probe plan, no uci section: it failed at the probes,
    // revision 1's files came back, and the owner's router was reloaded neither time.
    assert_eq!(r.calls(), reloads(1), "{arch}\n{}", r.logs());
    let journal = r.root().join("etc/sidenet-agent/journal.json");
    assert!(!journal.exists(), "{arch}: a journal was left behind");

    // ---- The fixed template: a new revision, applied.
    std::fs::write(&tpl, &good).unwrap();
    r.start_controller();
    let row = r.wait_row("the emulated router to apply the fixed revision", |r| {
        r.phase == "Ready" && r.applied > Some(bad) && r.applied == r.desired
    });
    assert_eq!(
        r.snapshot().keys().collect::<Vec<_>>(),
        applied.keys().collect::<Vec<_>>()
    );
    eprintln!(
        "{arch}: enrolled and applied revision {rev1}; rolled back {bad} ({failure}); applied {}",
        row.applied.unwrap()
    );
}

#[test]
fn cross_built_agents_run_an_emulated_openwrt_router() {
    let dir = agents_dir();
    let required = std::env::var_os("SIDENET_REQUIRE_CROSS_AGENTS").is_some();
    let mut arches: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let arch = e.file_name().to_string_lossy().to_string();
                let agent = e.path().join("sidenet-agent");
                (emulation(&arch).is_some() && agent.is_file()).then_some((arch, agent))
            })
            .collect()
        })
        .unwrap_or_default();
    arches.sort();
    if required {
        assert!(
            arches.iter().any(|(a, _)| a == REQUIRED),
            "no {REQUIRED} agent in {}: build it with `scripts/build-agents --plain --out {} {REQUIRED}`",
            dir.display(),
            dir.display()
        );
    }
    if arches.is_empty() {
        eprintln!(
            "NOT RUN: no cross-built agents in {} (scripts/test builds {REQUIRED} there with scripts/build-agents)",
            dir.display()
        );
        return;
    }
    for (arch, agent) in &arches {
        run(arch, agent);
    }
}
