//! The network-namespace testbed of the linux data plane. Run it with `tests/netns/run` (root;
//! it builds the binaries, sets SIDENET_TESTBED_* and cleans up afterwards).
//!
//! Topology (all underlay links IPv4, IPv6 off on them, so a capture shows any plaintext):
//!
//! ```text
//!            10.0.1.0/24          10.0.2.0/24
//!       A ─────────────────── B ─────────────────── C ──┐
//!       │ 10.0.3.0/24                                   │ 10.0.4.0/24: one layer-2 segment
//!       └──────────────────── D ────────────────────────┤ (a bridge in E) shared by D, C, E
//!                                                       E
//! root namespace: controller + embedded broker on 10.200.0.1 (bridge), every node's up0 on it;
//! A's up0 also has 2001:db8:ffff::a/64 and a default route: the "internet" 2001:db8:ffff::1.
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod netns_common;
use netns_common::{bin, join_code, must, poll, repo, sh};

const NODES: [&str; 5] = ["a", "b", "c", "d", "e"];
const PROFILE: &str = "raspberrypi-4b-awus036acm";
const DEADLINE: u64 = 10;
const WAIT: Duration = Duration::from_secs(60);

struct Node {
    name: &'static str,
    ns: String,
    id: String,
    dir: PathBuf,
    underlay: Vec<&'static str>,
    agent: Option<Child>,
}

impl Node {
    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
}

struct Testbed {
    prefix: String,
    dir: PathBuf,
    port: u16,
    nodes: Vec<Node>,
    controller: Option<Child>,
    templates: PathBuf,
    userspace: String,
    log: std::fs::File,
    started: Instant,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.agent.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(repo().join("tests/netns/cleanup"))
            .arg(&self.prefix)
            .status();
    }
}

impl Testbed {
    fn say(&mut self, msg: &str) {
        let line = format!("[{:6.1}s] {msg}", self.started.elapsed().as_secs_f64());
        println!("{line}");
        let _ = writeln!(self.log, "{line}");
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    fn node(&self, n: &str) -> &Node {
        self.nodes.iter().find(|x| x.name == n).unwrap()
    }

    fn node_mut(&mut self, n: &str) -> &mut Node {
        self.nodes.iter_mut().find(|x| x.name == n).unwrap()
    }

    fn nsx(&self, n: &str, argv: &[&str]) -> Result<String, String> {
        let ns = self.ns(n);
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(argv);
        sh(&v)
    }

    fn record_pid(&self, pid: u32) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pids"))
            .unwrap();
        let _ = writeln!(f, "{pid}");
    }

    fn new() -> Testbed {
        let prefix = std::env::var("SIDENET_TESTBED_PREFIX")
            .unwrap_or_else(|_| format!("sntb{}", std::process::id()));
        assert!(
            prefix.starts_with("sntb") && prefix.len() <= 11,
            "bad prefix {prefix}"
        );
        let dir = PathBuf::from(
            std::env::var("SIDENET_TESTBED_DIR").expect("run through tests/netns/run"),
        );
        let userspace = std::env::var("SIDENET_WG_USERSPACE").unwrap_or_else(|_| {
            repo()
                .join(".tools/bin/boringtun-cli")
                .display()
                .to_string()
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("testbed.log")).unwrap();
        let mut tb = Testbed {
            prefix,
            dir,
            port,
            nodes: Vec::new(),
            controller: None,
            templates: PathBuf::new(),
            userspace,
            log,
            started: Instant::now(),
        };
        tb.build_network();
        tb.write_manifests();
        tb
    }

    fn build_network(&mut self) {
        let p = self.prefix.clone();
        let br = format!("{p}br");
        must(&["ip", "link", "add", "name", &br, "type", "bridge"]);
        must(&["ip", "addr", "add", "10.200.0.1/24", "dev", &br]);
        must(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{br}.disable_ipv6=0"),
        ]);
        must(&[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:db8:ffff::1/64",
            "dev",
            &br,
            "nodad",
        ]);
        must(&["ip", "link", "set", &br, "up"]);
        let underlay: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
            ("a", vec!["a2b", "a2d"]),
            ("b", vec!["b2a", "b2c"]),
            ("c", vec!["c2b", "c2d"]),
            ("d", vec!["d2a", "d2c"]),
            ("e", vec!["br0"]),
        ]);
        for (i, n) in NODES.iter().enumerate() {
            let ns = self.ns(n);
            must(&["ip", "netns", "add", &ns]);
            for s in [
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ] {
                must(&["ip", "netns", "exec", &ns, "sysctl", "-qw", s]);
            }
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            // Management veth / uplink.
            let root_end = format!("{p}m{n}");
            must(&[
                "ip", "link", "add", "name", &root_end, "type", "veth", "peer", "name", "up0",
                "netns", &ns,
            ]);
            must(&["ip", "link", "set", &root_end, "master", &br, "up"]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.200.0.{}/24", 11 + i),
                "dev",
                "up0",
            ]);
            if *n == "a" {
                must(&[
                    "ip",
                    "-n",
                    &ns,
                    "-6",
                    "addr",
                    "add",
                    "2001:db8:ffff::a/64",
                    "dev",
                    "up0",
                    "nodad",
                ]);
            } else {
                must(&[
                    "ip",
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.up0.disable_ipv6=1",
                ]);
            }
            must(&["ip", "-n", &ns, "link", "set", "up0", "up"]);
            if *n == "a" {
                must(&[
                    "ip",
                    "-n",
                    &ns,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    "2001:db8:ffff::1",
                    "dev",
                    "up0",
                ]);
            }
            let dir = self.dir.join(n);
            std::fs::create_dir_all(dir.join("state")).unwrap();
            std::fs::create_dir_all(dir.join("root")).unwrap();
            std::fs::create_dir_all(dir.join("wireguard")).unwrap();
            // The node key, made beforehand so the MeshNode manifests can name the node ids.
            let out = must(&[
                bin("sidenetctl").to_str().unwrap(),
                "keygen",
                "--out",
                dir.join("state/node.key").to_str().unwrap(),
            ]);
            let id = out
                .lines()
                .find_map(|l| l.strip_prefix("node id:"))
                .unwrap()
                .trim()
                .to_string();
            self.nodes.push(Node {
                name: n,
                ns,
                id,
                dir,
                underlay: underlay[n].clone(),
                agent: None,
            });
        }
        let pair = |a: &str, ia: &str, addr_a: &str, b: &str, ib: &str, addr_b: &str| {
            let (na, nb) = (self.ns(a), self.ns(b));
            must(&[
                "ip", "link", "add", "name", ia, "netns", &na, "type", "veth", "peer", "name", ib,
                "netns", &nb,
            ]);
            for (ns, i, addr) in [(&na, ia, addr_a), (&nb, ib, addr_b)] {
                must(&[
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{i}.disable_ipv6=1"),
                ]);
                if !addr.is_empty() {
                    must(&["ip", "-n", ns, "addr", "add", addr, "dev", i]);
                }
                must(&["ip", "-n", ns, "link", "set", i, "up"]);
            }
        };
        pair("a", "a2b", "10.0.1.1/24", "b", "b2a", "10.0.1.2/24");
        pair("b", "b2c", "10.0.2.2/24", "c", "c2b", "10.0.2.3/24");
        pair("a", "a2d", "10.0.3.1/24", "d", "d2a", "10.0.3.4/24");
        // The shared segment: a bridge in E with D's and C's veths on it.
        let ne = self.ns("e");
        must(&[
            "ip", "-n", &ne, "link", "add", "name", "br0", "type", "bridge",
        ]);
        must(&[
            "ip",
            "netns",
            "exec",
            &ne,
            "sysctl",
            "-qw",
            "net.ipv6.conf.br0.disable_ipv6=1",
        ]);
        pair("d", "d2c", "10.0.4.4/24", "e", "e2d", "");
        pair("c", "c2d", "10.0.4.3/24", "e", "e2c", "");
        for i in ["e2d", "e2c"] {
            must(&["ip", "-n", &ne, "link", "set", i, "master", "br0"]);
        }
        must(&["ip", "-n", &ne, "addr", "add", "10.0.4.5/24", "dev", "br0"]);
        must(&["ip", "-n", &ne, "link", "set", "br0", "up"]);
        self.say(
            "network: 5 namespaces, 4 underlay links (one shared by D, C, E), management bridge",
        );
    }

    fn mesh_yaml(&self, internet_a: bool, e_variant: Option<usize>) -> String {
        let text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap();
        let mut text = text.replace("helloInterval: 4", "helloInterval: 1");
        let mut policies = String::from("  policies:\n");
        if internet_a {
            policies.push_str("    - type: allowInternet\n      nodes: [a]\n");
        } else {
            policies.push_str("    - type: noInternet\n");
        }
        policies.push_str("    - type: rateLimit\n      rateKbit: 20000\n");
        if let Some(v) = e_variant {
            policies.push_str(&format!(
                "    - type: rateLimit\n      rateKbit: {}\n      nodes: [e]\n",
                10000 + v
            ));
        }
        let at = text.find("  policies:").unwrap();
        text.truncate(at);
        text + &policies
    }

    fn nodes_yaml(&self, e_variant: Option<usize>) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let role = if n.name == "a" { "gateway" } else { "router" };
            let overrides = match (n.name, e_variant) {
                ("e", Some(v)) => format!(
                    "  overrides:\n    hostname: e-{v}\n    channel: {}\n",
                    if v % 2 == 0 { 36 } else { 44 }
                ),
                // A's uplink, out of which it forwards with allowInternet (check 5).
                ("a", _) => "  overrides:\n    uplinks: [up0]\n".to_string(),
                _ => String::new(),
            };
            out.push_str(&format!(
                "---\napiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata:\n  name: {}\nspec:\n  mesh: riverside\n  nodeId: {}\n  hardwareProfile: {PROFILE}\n  role: {role}\n  approved: true\n{overrides}",
                n.name, n.id
            ));
        }
        out
    }

    fn write_manifests(&mut self) {
        let m = self.dir.join("manifests");
        std::fs::create_dir_all(&m).unwrap();
        // One file, replaced atomically: the controller never sees half an edit.
        self.set_manifests(false, None);
        self.templates = self.dir.join("templates");
        must(&[
            "cp",
            "-r",
            repo().join("templates").to_str().unwrap(),
            self.templates.to_str().unwrap(),
        ]);
    }

    fn set_manifests(&self, internet_a: bool, e_variant: Option<usize>) {
        let text = self.mesh_yaml(internet_a, e_variant) + &self.nodes_yaml(e_variant);
        let tmp = self.dir.join("manifests.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("manifests/mesh.yaml")).unwrap();
    }

    fn start_controller(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("controller.log"))
            .unwrap();
        let child = Command::new(bin("sidenet-controller"))
            .arg("standalone")
            .arg("--manifests")
            .arg(self.dir.join("manifests"))
            .arg("--profiles")
            .arg(repo().join("hardware-profiles"))
            .arg("--templates")
            .arg(&self.templates)
            .arg("--state")
            .arg(self.dir.join("state"))
            .arg("--listen")
            .arg(format!("10.200.0.1:{}", self.port))
            .arg("--poll-ms")
            .arg("100")
            .env("RUST_LOG", "info,rumqttd=warn,rumqttd::server::broker=off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.record_pid(child.id());
        self.controller = Some(child);
        poll("the controller's admin socket", WAIT, || self.status().ok());
    }

    fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = sh(&["kill", "-TERM", &c.id().to_string()]);
            poll("the controller to stop", Duration::from_secs(10), || {
                c.try_wait().ok().flatten()
            });
        }
    }

    fn start_agent(&mut self, n: &str, broker_port: u16) {
        let node = self.node(n);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("agent.log"))
            .unwrap();
        // Each node gets its own /run/wireguard (userspace WireGuard sockets live there and
        // share one folder across namespaces otherwise) and its own hostname.
        let script = format!(
            "mkdir -p /run/wireguard && mount --bind {wg} /run/wireguard && exec {agent} \
             --mesh riverside --broker mqtt://10.200.0.1:{broker_port} --backend linux \
             --root {root} --state {state} --profile {PROFILE} --hostname {n} \
             --status-interval 2 --underlay {underlay} --wg-userspace {us} \
             --health-deadline {DEADLINE} --probe-interval 1 --join {join}",
            join = join_code(&self.dir.join("state")),
            wg = node.dir.join("wireguard").display(),
            agent = bin("sidenet-agent").display(),
            root = node.root().display(),
            state = node.state().display(),
            underlay = node.underlay.join(","),
            us = self.userspace,
        );
        let path = format!(
            "/usr/local/sbin:/usr/sbin:/sbin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node.ns,
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .env("PATH", path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.node_mut(n).agent = Some(child);
    }

    fn kill_agent(&mut self, n: &str) {
        if let Some(mut c) = self.node_mut(n).agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop_agent(&mut self, n: &str) {
        if let Some(mut c) = self.node_mut(n).agent.take() {
            let _ = sh(&["kill", "-TERM", &c.id().to_string()]);
            poll("an agent to stop", Duration::from_secs(10), || {
                c.try_wait().ok().flatten()
            });
        }
    }

    fn status(&self) -> Result<Vec<Value>, String> {
        let out = sh(&[
            bin("sidenetctl").to_str().unwrap(),
            "status",
            "-o",
            "json",
            "--state",
            self.dir.join("state").to_str().unwrap(),
        ])?;
        // `{"nodes": [...], "manifestErrors": [...]}`.
        let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        v.get("nodes")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| format!("sidenetctl status -o json printed no nodes: {out}"))
    }

    fn row(&self, n: &str) -> Value {
        let id = &self.node(n).id;
        self.status()
            .ok()
            .and_then(|rows| rows.into_iter().find(|r| r["node"] == *id.as_str()))
            .unwrap_or(Value::Null)
    }

    fn address(&self, n: &str) -> String {
        poll("an address", WAIT, || {
            self.row(n)["address"].as_str().map(str::to_string)
        })
    }

    fn rev(v: &Value) -> Option<u64> {
        v.get("rev").and_then(Value::as_u64)
    }

    /// Ready: the node runs what the controller published, and it is not on trial.
    fn ready(&self, n: &str) -> bool {
        let r = self.row(n);
        r["phase"] == "Ready" && Self::rev(&r["applied"]).is_some()
    }

    fn neighbours(&self, n: &str) -> BTreeSet<String> {
        let ids: BTreeMap<String, &str> =
            self.nodes.iter().map(|x| (x.id.clone(), x.name)).collect();
        self.row(n)["neighbours"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["node"].as_str())
                    .filter_map(|id| ids.get(id).map(|s| s.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The WireGuard peer (node name) of A's route to `dst`, from `ip -6 route get`.
    fn via(&self, from: &str, dst: &str) -> Option<String> {
        let out = self.nsx(from, &["ip", "-6", "route", "get", dst]).ok()?;
        let dev = out
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)?
            .to_string();
        self.nodes
            .iter()
            .find(|x| dev == format!("sn-{}", &x.id[..12]))
            .map(|x| x.name.to_string())
    }

    fn ping(&self, from: &str, dst: &str, count: &str) -> bool {
        self.nsx(
            from,
            &[
                "ping", "-6", "-n", "-q", "-c", count, "-i", "0.2", "-W", "1", dst,
            ],
        )
        .is_ok()
    }

    /// Polls until `from` pings `dst` (networks converge); the time it took.
    fn reach(&self, from: &str, dst: &str, what: &str) -> f64 {
        let t = Instant::now();
        poll(what, Duration::from_secs(20), || {
            self.ping(from, dst, "1").then_some(())
        });
        t.elapsed().as_secs_f64()
    }

    fn up(&self, n: &str, iface: &str, up: bool) {
        must(&[
            "ip",
            "-n",
            &self.ns(n),
            "link",
            "set",
            iface,
            if up { "up" } else { "down" },
        ]);
    }

    /// Panics with its log if an agent exited.
    fn check_agents(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = n.agent.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                let log = std::fs::read_to_string(n.dir.join("agent.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "the agent of {} exited ({status}):\n{}",
                    n.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }

    fn wait_all_ready(&mut self, what: &str) -> f64 {
        let t = Instant::now();
        let deadline = t + Duration::from_secs(90);
        while !NODES.iter().all(|n| self.ready(n)) {
            self.check_agents();
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
        t.elapsed().as_secs_f64()
    }
}

/// tcpdump in a namespace, stopped and read on drop of the guard.
struct Capture {
    child: Child,
    out: PathBuf,
}

impl Capture {
    fn start(tb: &Testbed, n: &str, iface: &str, name: &str) -> Capture {
        let out = tb.dir.join(format!("{name}.txt"));
        let err = tb.dir.join(format!("{name}.err"));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &tb.ns(n),
                "tcpdump",
                "-l",
                "-nn",
                "-i",
                iface,
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        poll("tcpdump to listen", Duration::from_secs(10), || {
            std::fs::read_to_string(&err)
                .ok()
                .filter(|e| e.contains("listening on"))
        });
        Capture { child, out }
    }

    /// Waits (up to 5 s) until `pat` appears `n` times: tcpdump writes packets as it handles them.
    fn wait_for(&self, pat: &str, n: usize) {
        let _ = (0..100).find(|_| {
            let text =
                String::from_utf8_lossy(&std::fs::read(&self.out).unwrap_or_default()).into_owned();
            let done = text.matches(pat).count() >= n;
            if !done {
                std::thread::sleep(Duration::from_millis(50));
            }
            done
        });
    }

    fn stop(mut self) -> Vec<String> {
        let _ = sh(&["kill", "-INT", &self.child.id().to_string()]);
        let _ = self.child.wait();
        String::from_utf8_lossy(&std::fs::read(&self.out).unwrap_or_default())
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

fn nft_counter(tb: &Testbed, n: &str) -> u64 {
    let out = tb
        .nsx(
            n,
            &["nft", "list", "counter", "inet", "sidenet", "uplink_drops"],
        )
        .unwrap_or_default();
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) % n.max(1)
}

#[test]
#[ignore = "needs root and network namespaces: run tests/netns/run"]
fn dataplane_in_network_namespaces() {
    let mut tb = Testbed::new();
    tb.start_controller();
    let port = tb.port;
    let t0 = Instant::now();
    for n in NODES {
        tb.start_agent(n, port);
    }
    // ---- 1. All five enrol and apply; A reaches C over WireGuard.
    let ready = tb.wait_all_ready("all five nodes to enrol and apply");
    tb.say(&format!(
        "1: all 5 nodes enrolled and Ready after {ready:.1}s"
    ));
    let expect: BTreeMap<&str, BTreeSet<String>> = BTreeMap::from([
        ("a", ["b", "d"].map(String::from).into()),
        ("b", ["a", "c"].map(String::from).into()),
        ("c", ["b", "d", "e"].map(String::from).into()),
        ("d", ["a", "c", "e"].map(String::from).into()),
        ("e", ["c", "d"].map(String::from).into()),
    ]);
    poll("every node to see its babel neighbours", WAIT, || {
        NODES
            .iter()
            .all(|n| tb.neighbours(n) == expect[n])
            .then_some(())
    });
    let c_addr = tb.address("c");
    poll("a babel route from A to C", WAIT, || tb.via("a", &c_addr));
    poll("A to reach C over the side-net", WAIT, || {
        tb.ping("a", &c_addr, "1").then_some(())
    });
    let reach = t0.elapsed().as_secs_f64();
    tb.say(&format!(
        "1: A pings C ({c_addr}) {reach:.1}s after the agents started; neighbours as the links say"
    ));
    let hop = tb.via("a", &c_addr).unwrap();
    // Routes may be asymmetric (requests via one neighbour, replies via the other): watch both
    // of A's links, outside (the veths) and inside (the WireGuard interfaces).
    let wg_b = format!("sn-{}", &tb.node("b").id[..12]);
    let wg_d = format!("sn-{}", &tb.node("d").id[..12]);
    let caps: Vec<(String, Capture)> = [
        ("a2b", "outer-b"),
        ("a2d", "outer-d"),
        (wg_b.as_str(), "inner-b"),
        (wg_d.as_str(), "inner-d"),
    ]
    .iter()
    .map(|(i, n)| {
        (
            i.to_string(),
            Capture::start(&tb, "a", i, &format!("capture-{n}")),
        )
    })
    .collect();
    assert!(
        tb.nsx(
            "a",
            &[
                "ping", "-6", "-n", "-q", "-c", "5", "-i", "0.2", "-s", "1000", &c_addr
            ]
        )
        .is_ok()
    );
    // tcpdump writes each packet as it handles it: wait until all ten crossed both layers.
    let count = |pat: &str, inner: bool| {
        caps.iter()
            .filter(|(i, _)| i.starts_with("sn-") == inner)
            .map(|(_, c)| {
                String::from_utf8_lossy(&std::fs::read(&c.out).unwrap_or_default())
                    .matches(pat)
                    .count()
            })
            .sum::<usize>()
    };
    let _ = (0..100).find(|_| {
        let done = count("ICMP6, echo", true) >= 10 && count("UDP, length 1080", false) >= 10;
        if !done {
            std::thread::sleep(Duration::from_millis(50));
        }
        done
    });
    let mut outer = Vec::new();
    let mut inner = Vec::new();
    for (i, c) in caps {
        let lines = c.stop();
        if i.starts_with("sn-") {
            inner.extend(lines)
        } else {
            outer.extend(lines)
        }
    }
    let echo_inner = inner
        .iter()
        .filter(|l| l.contains("ICMP6, echo") && l.contains(&c_addr))
        .count();
    assert!(
        echo_inner >= 10,
        "the pings did not cross A's WireGuard links: {inner:#?}"
    );
    let big_udp = outer
        .iter()
        .filter(|l| {
            l.contains(" IP 10.0.") && l.contains("UDP, length") && {
                l.rsplit("length ")
                    .next()
                    .and_then(|n| n.trim().parse::<u32>().ok())
                    .is_some_and(|n| n > 1000)
            }
        })
        .count();
    let plaintext: Vec<&String> = outer
        .iter()
        .filter(|l| {
            !(l.contains(" ARP,") || (l.contains(" IP 10.0.") && l.contains(": UDP, length")))
        })
        .collect();
    assert!(
        big_udp >= 10,
        "the pings did not cross A's veths as WireGuard: {outer:#?}"
    );
    assert!(
        plaintext.is_empty(),
        "plaintext on A's underlay: {plaintext:#?}"
    );
    assert!(
        !outer
            .iter()
            .any(|l| l.contains("IP6") || l.contains(&c_addr))
    );
    tb.say(&format!(
        "1: A->C via {hop}; on A's veths {} packets, all UDP WireGuard ({big_udp} carrying the 1000-byte pings), none in clear; inside the WireGuard links {echo_inner} ICMPv6 echoes",
        outer.len()
    ));

    // ---- 5. Policy firewall: C cannot reach the internet behind A's uplink over the side-net.
    let inet = "2001:db8:ffff::1";
    assert!(
        tb.ping("a", inet, "1"),
        "A's own uplink does not reach {inet}"
    );
    assert!(
        tb.nsx("c", &["ip", "-6", "route", "get", inet]).is_err(),
        "C has a route to the internet"
    );
    for n in ["b", "c", "d", "e"] {
        let routes = tb
            .nsx(n, &["ip", "-6", "route", "show", "proto", "babel"])
            .unwrap_or_default();
        assert!(
            !routes.contains("default") && !routes.contains("2001:db8"),
            "babel leaked a route into {n}: {routes}"
        );
    }
    // Force the path anyway, as a misconfigured or hostile mesh would: C and its next hop
    // route the internet address towards A over the side-net.
    let a_addr = tb.address("a");
    let mut forced = Vec::new();
    let mut at = "c".to_string();
    while at != "a" {
        let out = tb.nsx(&at, &["ip", "-6", "route", "get", &a_addr]).unwrap();
        let w: Vec<&str> = out.split_whitespace().collect();
        let via = w
            .iter()
            .skip_while(|x| **x != "via")
            .nth(1)
            .unwrap()
            .to_string();
        let dev = w
            .iter()
            .skip_while(|x| **x != "dev")
            .nth(1)
            .unwrap()
            .to_string();
        must(&[
            "ip",
            "-n",
            &tb.ns(&at),
            "-6",
            "route",
            "add",
            &format!("{inet}/128"),
            "via",
            &via,
            "dev",
            &dev,
        ]);
        forced.push(at.clone());
        at = tb
            .nodes
            .iter()
            .find(|x| dev == format!("sn-{}", &x.id[..12]))
            .unwrap()
            .name
            .to_string();
    }
    let before = nft_counter(&tb, "a");
    assert!(
        !tb.ping("c", inet, "3"),
        "C reached the internet through A with the default policy"
    );
    let after = nft_counter(&tb, "a");
    assert!(
        after >= before + 3,
        "A's policy did not drop C's packets (uplink_drops {before} -> {after})"
    );
    tb.say(&format!("5: default policy: C -> {inet} forced through {forced:?} -> A is dropped by A's firewall (uplink_drops +{})", after - before));
    // Positive control: with allowInternet for A the same packets get through (masqueraded).
    let a_rev = Testbed::rev(&tb.row("a")["applied"]).unwrap();
    tb.set_manifests(true, None);
    poll("A to apply allowInternet", WAIT, || {
        (Testbed::rev(&tb.row("a")["applied"]) > Some(a_rev) && tb.ready("a")).then_some(())
    });
    tb.reach(
        "c",
        inet,
        "C to reach the internet through A with allowInternet",
    );
    tb.set_manifests(false, None);
    let a_rev = Testbed::rev(&tb.row("a")["applied"]).unwrap();
    poll("A to apply noInternet again", WAIT, || {
        (Testbed::rev(&tb.row("a")["applied"]) > Some(a_rev) && tb.ready("a")).then_some(())
    });
    assert!(
        !tb.ping("c", inet, "2"),
        "noInternet is back but C still reaches {inet}"
    );
    for n in &forced {
        let _ = tb.nsx(n, &["ip", "-6", "route", "del", &format!("{inet}/128")]);
    }
    tb.say("5: control: with allowInternet for A, C reaches it (masqueraded); back to noInternet, it does not");

    // ---- 2. B's links go down: A reaches C via D; status shows it.
    // Make the A->C path go through B first (if babel chose D, move it).
    if tb.via("a", &c_addr).as_deref() != Some("b") {
        tb.up("a", "a2d", false);
        poll("A's route to C to move to B", WAIT, || {
            (tb.via("a", &c_addr).as_deref() == Some("b")).then_some(())
        });
        tb.up("a", "a2d", true);
        poll("D to be A's neighbour again", WAIT, || {
            tb.neighbours("a").contains("d").then_some(())
        });
    }
    assert_eq!(tb.via("a", &c_addr).as_deref(), Some("b"));
    let t = Instant::now();
    tb.up("b", "b2a", false);
    tb.up("b", "b2c", false);
    let switched = poll("A's route to C to switch to D", WAIT, || {
        (tb.via("a", &c_addr).as_deref() == Some("d")).then(|| t.elapsed().as_secs_f64())
    });
    // Babel has converged when both ends moved: C's route back to A (the echo replies) can
    // switch later than A's, under load by seconds.
    let back = poll("C's route to A to switch to D", WAIT, || {
        (tb.via("c", &a_addr).as_deref() == Some("d")).then(|| t.elapsed().as_secs_f64())
    });
    let t_route = Instant::now();
    poll("A to reach C via D", Duration::from_secs(10), || {
        tb.ping("a", &c_addr, "1").then_some(())
    });
    let reached = t_route.elapsed().as_secs_f64();
    tb.say(&format!("2: B's links down: babel moved A->C to D after {switched:.1}s and C->A after {back:.1}s; A pings C {reached:.1}s after that (limit 10s)"));
    let b_id = tb.node("b").id.clone();
    let seen = poll(
        "A's status to show B gone and probes to B lost",
        WAIT,
        || {
            let row = tb.row("a");
            let nb = tb.neighbours("a");
            let loss = row["probes"].as_array().and_then(|p| {
                p.iter()
                    .find(|x| x["node"] == b_id.as_str() && x["kind"] == "neighbour")
                    .and_then(|x| x["loss"].as_f64())
            })?;
            (!nb.contains("b") && nb.contains("d") && loss > 0.5)
                .then(|| (t.elapsed().as_secs_f64(), loss))
        },
    );
    tb.say(&format!(
        "2: A's status {:.1}s after: neighbours {:?}, probe loss to B {:.0}%",
        seen.0,
        tb.neighbours("a"),
        seen.1 * 100.0
    ));
    let rtt = tb.row("a")["probes"].as_array().and_then(|p| {
        p.iter()
            .find(|x| x["kind"] == "neighbour" && x["loss"].as_f64() == Some(0.0))
            .cloned()
    });
    assert!(
        rtt.is_some_and(|p| p["rttMs"].as_f64().or(p["rtt_ms"].as_f64()).is_some()),
        "no healthy probe with an RTT on A"
    );
    let metrics = must(&[
        bin("sidenetctl").to_str().unwrap(),
        "metrics",
        "--state",
        tb.dir.join("state").to_str().unwrap(),
    ]);
    assert!(
        metrics.contains("sidenet_probe_loss_ratio{") && metrics.contains("sidenet_link_cost{"),
        "{metrics}"
    );
    tb.up("b", "b2a", true);
    tb.up("b", "b2c", true);
    poll("B's links to come back", WAIT, || {
        NODES
            .iter()
            .all(|n| tb.neighbours(n) == expect[n])
            .then_some(())
    });
    tb.say("2: B back; every node sees its neighbours again");

    // ---- Handover: A prefers the side-net for mesh prefixes and its uplink for the rest;
    // when the side-net path to C disappears, A's traffic for C stops (A has a default route
    // out of its uplink: without the unreachable route for the mesh prefix it would leak).
    tb.up("c", "c2b", false);
    tb.up("c", "c2d", false);
    let t = Instant::now();
    let gone = poll(
        "A's route to C to disappear",
        Duration::from_secs(90),
        || {
            tb.via("a", &c_addr)
                .is_none()
                .then(|| t.elapsed().as_secs_f64())
        },
    );
    let route = tb.nsx("a", &["ip", "-6", "route", "get", &c_addr]);
    assert!(
        route
            .as_ref()
            .is_err_and(|e| e.contains("No route to host")),
        "A's traffic for C should hit the unreachable route for the mesh prefix: {route:?}"
    );
    let uplink = Capture::start(&tb, "a", "up0", "capture-uplink");
    assert!(
        !tb.ping("a", &c_addr, "2"),
        "A still reaches C without a side-net path"
    );
    assert!(tb.ping("a", inet, "1"), "A lost its uplink");
    uplink.wait_for(inet, 2);
    let lines = uplink.stop();
    let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(&c_addr)).collect();
    assert!(
        leaked.is_empty(),
        "traffic for C leaked to A's uplink: {leaked:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains(inet)),
        "the uplink capture saw nothing: {lines:#?}"
    );
    tb.up("c", "c2b", true);
    tb.up("c", "c2d", true);
    let back = tb.reach("a", &c_addr, "A to reach C again");
    tb.say(&format!(
        "2: handover: C's links down, A's route to C gone after {gone:.1}s: unreachable, nothing for C on A's uplink (which still works); C back, reachable {back:.1}s later"
    ));

    // ---- 3. A config that cuts C off from the controller rolls back by itself.
    let c_applied = Testbed::rev(&tb.row("c")["applied"]).unwrap();
    let tpl = tb.templates.join("linux/addresses.j2");
    let good_tpl = std::fs::read_to_string(&tpl).unwrap();
    std::fs::write(
        &tpl,
        format!("{good_tpl}{{% if node.name == 'c' %}}\n10.200.0.1/32 sidenet0\n{{% endif %}}\n"),
    )
    .unwrap();
    tb.stop_controller();
    tb.start_controller();
    let bad = poll("the controller to publish C's bad revision", WAIT, || {
        Testbed::rev(&tb.row("c")["desired"]).filter(|r| *r > c_applied)
    });
    let t = Instant::now();
    let (took, row) = poll(
        "C to roll back and report the failed revision",
        Duration::from_secs(DEADLINE + 30),
        || {
            let r = tb.row("c");
            (r["phase"] == "Failed" && Testbed::rev(&r["applied"]) == Some(c_applied))
                .then(|| (t.elapsed().as_secs_f64(), r))
        },
    );
    assert!(
        took <= (DEADLINE + 10) as f64,
        "rollback took {took:.1}s (deadline {DEADLINE}s + 10s)"
    );
    let failure = row["failure"].as_str().unwrap_or_default().to_string();
    assert!(failure.contains("did not acknowledge"), "{failure}");
    tb.reach("a", &c_addr, "C to be reachable after its rollback");
    let metrics = must(&[
        bin("sidenetctl").to_str().unwrap(),
        "metrics",
        "--state",
        tb.dir.join("state").to_str().unwrap(),
    ]);
    let c_id = tb.node("c").id.clone();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sidenet_node_failed{")
                && l.contains(&c_id)
                && l.ends_with(" 1"))
    );
    tb.say(&format!("3: C got revision {bad} (broker address on sidenet0: cut off); rolled back to {c_applied} by itself after {took:.1}s (deadline {DEADLINE}s), reported: {failure}"));
    // The controller does not hand it out again: a restart publishes nothing new for C.
    tb.stop_controller();
    tb.start_controller();
    poll("the controller to see C again", WAIT, || {
        (tb.row("c")["online"] == true).then_some(())
    });
    assert_eq!(Testbed::rev(&tb.row("c")["desired"]), Some(bad));
    assert_eq!(Testbed::rev(&tb.row("c")["applied"]), Some(c_applied));
    // Fix the template: C gets a new, good revision.
    std::fs::write(&tpl, &good_tpl).unwrap();
    tb.stop_controller();
    tb.start_controller();
    poll("C to apply the fixed revision", WAIT, || {
        (Testbed::rev(&tb.row("c")["applied"]) > Some(bad) && tb.ready("c")).then_some(())
    });
    tb.say("3: the failed revision is not re-published; the fixed template gives C a new revision, applied");

    // ---- 4. kill -9 during apply, 20 times: always exactly one signed revision afterwards.
    let phases = ["stage", "installing", "applying", "trial", "committing"];
    let mut hits: BTreeMap<String, u32> = BTreeMap::new();
    let e_state = tb.node("e").state();
    let e_root = tb.node("e").root();
    let unreachable_port = 1;
    for i in 0..20 {
        let old = Testbed::rev(&tb.row("e")["applied"]).unwrap();
        let target = phases[i % phases.len()];
        tb.set_manifests(false, Some(i));
        // Kill when the apply reaches the target phase (plus a random 0-3 ms), or just after the
        // apply if that phase was too quick to catch.
        let journal = e_state.join("journal.json");
        let staging = e_state.join("staging");
        let t = Instant::now();
        let jitter = Duration::from_micros(random_below(3000));
        while t.elapsed() < Duration::from_secs(20) {
            let phase = std::fs::read_to_string(&journal).ok().and_then(|j| {
                serde_json::from_str::<Value>(&j).ok()?["phase"]
                    .as_str()
                    .map(str::to_string)
            });
            let now = match phase {
                Some(p) => Some(p),
                None if staging.exists() => Some("stage".to_string()),
                None => None,
            };
            if now.as_deref() == Some(target) {
                break;
            }
            let r = std::fs::read(e_state.join("current.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            if r.and_then(|v| Testbed::rev(&v["revision"]))
                .is_some_and(|r| r > old)
            {
                // Too quick to catch: the kill lands after the apply.
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(jitter);
        tb.kill_agent("e");
        let at = std::fs::read_to_string(&journal)
            .ok()
            .and_then(|j| {
                serde_json::from_str::<Value>(&j).ok()?["phase"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| {
                let committed = std::fs::read(e_state.join("current.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .and_then(|v| Testbed::rev(&v["revision"]))
                    .is_some_and(|r| r > old);
                if committed {
                    "after commit".into()
                } else if staging.exists() {
                    "stage".into()
                } else {
                    "not started".into()
                }
            });
        *hits.entry(at.clone()).or_default() += 1;
        // Restart with no broker: it recovers and converges on its own; then check.
        tb.start_agent("e", unreachable_port);
        poll("E to recover", Duration::from_secs(20), || {
            let log =
                std::fs::read_to_string(tb.node("e").dir.join("agent.log")).unwrap_or_default();
            (log.matches("sidenet agent starting").count() > i * 2 + 1 && !journal.exists())
                .then_some(())
        });
        let current: Value =
            serde_json::from_slice(&std::fs::read(e_state.join("current.json")).unwrap()).unwrap();
        let rev = Testbed::rev(&current["revision"]).unwrap();
        let desired = Testbed::rev(&tb.row("e")["desired"]).unwrap();
        assert!(
            rev == old || rev == desired,
            "E ended on revision {rev}: neither the old {old} nor the new {desired}"
        );
        let env = std::fs::read(e_state.join("current.env")).unwrap();
        let parsed = sidenet_wire::Envelope::parse(&env, 1 << 20).unwrap();
        let verified = parsed
            .verify_self_signed(sidenet_wire::Kind::Config)
            .unwrap();
        assert_eq!(
            verified.header.rev, rev,
            "current.json and current.env disagree"
        );
        let config: sidenet_wire::messages::NodeConfig = verified.body_json().unwrap();
        // The files hold the sealed secrets opened with the node's key.
        let node_key = sidenet_wire::keys::KeyPair::from_file_text(
            &std::fs::read_to_string(e_state.join("node.key")).unwrap(),
        )
        .unwrap();
        let mut open = |name: &str| {
            let sealed = config
                .sealed
                .get(name)
                .ok_or_else(|| sidenet_wire::seal::SealError::Missing(name.into()))?;
            let ctx = sidenet_wire::seal::Context {
                mesh: &config.mesh,
                node: &config.node,
                name,
            };
            Ok(String::from_utf8(sidenet_wire::seal::open(&node_key, ctx, sealed)?).unwrap())
        };
        for f in &config.files {
            let on_disk = std::fs::read_to_string(e_root.join(&f.path)).unwrap_or_default();
            let expected = sidenet_wire::seal::fill(&f.content, &mut open).unwrap();
            assert_eq!(
                on_disk, expected,
                "iteration {i} ({at}): {} is not revision {rev}'s",
                f.path
            );
        }
        let fw = config
            .files
            .iter()
            .find(|f| f.path == "etc/sidenet/firewall.nft")
            .unwrap();
        let rate = fw
            .content
            .split("limit rate over ")
            .nth(2)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("");
        let table = tb
            .nsx("e", &["nft", "list", "table", "inet", "sidenet"])
            .unwrap_or_default();
        assert!(
            rate.is_empty()
                || table.contains(&format!("limit rate over {rate} "))
                || table.contains(&format!(
                    "limit rate over {} kbytes/second",
                    rate.parse::<u64>().unwrap_or(0) / 1000
                )),
            "iteration {i} ({at}): the running firewall is not revision {rev}'s (rate {rate}):\n{table}"
        );
        // With a shaping table the budget is HTB class 1:3 on the ifb sneg0 (docs/policies.md):
        // its ceiling must be this revision's (the `at` line; this mesh has no windows).
        let budget = config
            .files
            .iter()
            .find(|f| f.path == "etc/sidenet/shaping")
            .and_then(|f| f.content.lines().find(|l| l.starts_with("at ")))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("1:3=")))
            .and_then(|k| k.parse::<u64>().ok());
        if let Some(kbit) = budget {
            let classes = tb
                .nsx("e", &["tc", "class", "show", "dev", "sneg0"])
                .unwrap_or_default();
            let want = format!(" ceil {} ", tc_rate(kbit * 1000));
            assert!(
                classes
                    .lines()
                    .any(|l| l.starts_with("class htb 1:3 ") && l.contains(&want)),
                "iteration {i} ({at}): the running shaping is not revision {rev}'s (1:3 at {kbit} kbit/s):\n{classes}"
            );
        }
        tb.say(&format!("4: kill -9 #{:2} aimed at {target:<10} hit {at:<13} -> revision {rev} (old {old}), files, firewall and shaping consistent", i + 1));
        tb.stop_agent("e");
        tb.start_agent("e", port);
        poll("E to apply the new revision", WAIT, || {
            let r = tb.row("e");
            (tb.ready("e") && Testbed::rev(&r["applied"]) > Some(old)).then_some(())
        });
    }
    tb.say(&format!("4: kill points: {hits:?}"));
    assert!(
        hits.keys().filter(|k| phases.contains(&k.as_str())).count() >= 4,
        "kill points did not cover the phases: {hits:?}"
    );
    tb.reach(
        "a",
        &tb.address("e"),
        "E to be reachable after the kill test",
    );
    let total = tb.started.elapsed().as_secs_f64();
    tb.say(&format!("6: testbed checks done in {total:.0}s"));
    assert!(total < 300.0, "the testbed took {total:.0}s");
}

/// A rate in bit/s as `tc` prints it (iproute2's print_rate: `20Mbit`, `10003Kbit`).
fn tc_rate(bits: u64) -> String {
    let units = ["", "K", "M", "G", "T"];
    let mut rate = bits;
    let mut i = 0;
    while i < units.len() - 1 {
        if rate < 1000 || (!rate.is_multiple_of(1000) && rate < 1_000_000) {
            break;
        }
        rate /= 1000;
        i += 1;
    }
    format!("{rate}{}bit", units[i])
}
