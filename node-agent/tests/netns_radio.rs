//! The radio-like segment of the network-namespace testbed (issue 15, acceptance 1). Run it with
//! `tests/netns/run` (root; it builds the binaries, sets SIDENET_TESTBED_* and cleans up).
//!
//! ```text
//!   P ──┐
//!   Q ──┤ one layer-2 segment (a bridge in its own namespace): each node's `mesh0` carries
//!   R ──┤ only IPv6 link-local addresses, like an 802.11s radio
//!   S ──┘── W   a wired line, 10.0.9.0/24 (IPv4 only)
//! root namespace: controller + embedded broker on 10.201.0.1 (bridge), every node's up0 on it.
//! ```
//!
//! The nodes find each other by their signed discovery beacons only (no shared subnet on the
//! segment), pair by mutual observation with WireGuard endpoints `[fe80::…%mesh0]:PORT`, and
//! reach each other's side-net addresses over WireGuard and babel; W joins through S by subnet.
//! Then R is pulled off the segment: it is unpaired, its former peers get new configs, and its
//! links leave the status; the time that takes is printed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod netns_common;
use netns_common::{bin, join_code, must, poll, repo, sh};

const NODES: [&str; 5] = ["p", "q", "r", "s", "w"];
const RADIO: [&str; 4] = ["p", "q", "r", "s"];
const PROFILE: &str = "raspberrypi-4b-awus036acm";
const WAIT: Duration = Duration::from_secs(60);

struct Node {
    name: &'static str,
    ns: String,
    id: String,
    dir: PathBuf,
    underlay: &'static str,
    agent: Option<Child>,
}

struct Radiobed {
    prefix: String,
    dir: PathBuf,
    port: u16,
    nodes: Vec<Node>,
    controller: Option<Child>,
    userspace: String,
    started: Instant,
}

impl Drop for Radiobed {
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

impl Radiobed {
    fn say(&self, msg: &str) {
        println!("[{:6.1}s] {msg}", self.started.elapsed().as_secs_f64());
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    fn node(&self, n: &str) -> &Node {
        self.nodes.iter().find(|x| x.name == n).unwrap()
    }

    fn nsx(&self, n: &str, argv: &[&str]) -> Result<String, String> {
        let ns = self.ns(n);
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(argv);
        sh(&v)
    }

    fn sysctl(&self, ns: &str, s: &str) {
        must(&["ip", "netns", "exec", ns, "sysctl", "-qw", s]);
    }

    fn new() -> Self {
        let prefix = std::env::var("SIDENET_TESTBED_PREFIX")
            .unwrap_or_else(|_| format!("sntb{}", std::process::id()));
        assert!(
            prefix.starts_with("sntb") && prefix.len() <= 11,
            "bad prefix {prefix}"
        );
        let dir = PathBuf::from(
            std::env::var("SIDENET_TESTBED_DIR").expect("run through tests/netns/run"),
        )
        .join("radio");
        std::fs::create_dir_all(&dir).unwrap();
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
        let mut tb = Self {
            prefix,
            dir,
            port,
            nodes: Vec::new(),
            controller: None,
            userspace,
            started: Instant::now(),
        };
        tb.build_network();
        tb.write_manifests();
        tb
    }

    fn build_network(&mut self) {
        let p = self.prefix.clone();
        let br = format!("{p}rb");
        must(&["ip", "link", "add", "name", &br, "type", "bridge"]);
        must(&["ip", "addr", "add", "10.201.0.1/24", "dev", &br]);
        must(&["ip", "link", "set", &br, "up"]);
        // The radio-like segment: a bridge in its own namespace, no addresses of its own.
        let air = self.ns("air");
        must(&["ip", "netns", "add", &air]);
        must(&["ip", "-n", &air, "link", "add", "br0", "type", "bridge"]);
        self.sysctl(&air, "net.ipv6.conf.br0.disable_ipv6=1");
        must(&["ip", "-n", &air, "link", "set", "br0", "up"]);
        for (i, n) in NODES.iter().enumerate() {
            let ns = self.ns(n);
            must(&["ip", "netns", "add", &ns]);
            self.sysctl(&ns, "net.ipv6.conf.all.accept_dad=0");
            self.sysctl(&ns, "net.ipv6.conf.default.accept_dad=0");
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            let root_end = format!("{p}r{n}");
            must(&[
                "ip", "link", "add", "name", &root_end, "type", "veth", "peer", "name", "up0",
                "netns", &ns,
            ]);
            must(&["ip", "link", "set", &root_end, "master", &br, "up"]);
            let mgmt = format!("10.201.0.{}/24", 11 + i);
            must(&["ip", "-n", &ns, "addr", "add", &mgmt, "dev", "up0"]);
            self.sysctl(&ns, "net.ipv6.conf.up0.disable_ipv6=1");
            must(&["ip", "-n", &ns, "link", "set", "up0", "up"]);
            if RADIO.contains(n) {
                // mesh0: IPv6 with its link-local address only, on the shared segment.
                let port = format!("a-{n}");
                must(&[
                    "ip", "link", "add", "name", "mesh0", "netns", &ns, "type", "veth", "peer",
                    "name", &port, "netns", &air,
                ]);
                self.sysctl(&ns, "net.ipv6.conf.mesh0.disable_ipv6=0");
                self.sysctl(&air, &format!("net.ipv6.conf.{port}.disable_ipv6=1"));
                must(&[
                    "ip", "-n", &air, "link", "set", &port, "master", "br0", "up",
                ]);
                must(&["ip", "-n", &ns, "link", "set", "mesh0", "up"]);
            }
            let dir = self.dir.join(n);
            for sub in ["state", "root", "wireguard"] {
                std::fs::create_dir_all(dir.join(sub)).unwrap();
            }
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
            let underlay = match *n {
                "s" => "mesh0,s2w",
                "w" => "w2s",
                _ => "mesh0",
            };
            self.nodes.push(Node {
                name: n,
                ns,
                id,
                dir,
                underlay,
                agent: None,
            });
        }
        // The wired line S–W: IPv4 only.
        let (ns_s, ns_w) = (self.ns("s"), self.ns("w"));
        must(&[
            "ip", "link", "add", "name", "s2w", "netns", &ns_s, "type", "veth", "peer", "name",
            "w2s", "netns", &ns_w,
        ]);
        for (ns, i, addr) in [(&ns_s, "s2w", "10.0.9.1/24"), (&ns_w, "w2s", "10.0.9.2/24")] {
            self.sysctl(ns, &format!("net.ipv6.conf.{i}.disable_ipv6=1"));
            must(&["ip", "-n", ns, "addr", "add", addr, "dev", i]);
            must(&["ip", "-n", ns, "link", "set", i, "up"]);
        }
        // The segment carries only link-local addresses.
        for n in RADIO {
            let a = must(&["ip", "-n", &self.ns(n), "addr", "show", "dev", "mesh0"]);
            assert!(
                a.contains("inet6 fe80:") && !a.contains("inet ") && !a.contains("scope global"),
                "{n}'s mesh0: {a}"
            );
        }
        self.say(
            "radio network: P, Q, R, S on one segment with link-local addresses only; S–W wired",
        );
    }

    fn write_manifests(&self) {
        let text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap();
        let mut text = text.replace("helloInterval: 4", "helloInterval: 1");
        let at = text.find("  policies:").unwrap();
        text.truncate(at);
        text.push_str("  policies:\n    - type: noInternet\n");
        for n in &self.nodes {
            text.push_str(&format!(
                "---\napiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata:\n  name: {}\nspec:\n  mesh: riverside\n  nodeId: {}\n  hardwareProfile: {PROFILE}\n  role: router\n  approved: true\n",
                n.name, n.id
            ));
        }
        let m = self.dir.join("manifests");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("mesh.yaml"), text).unwrap();
    }

    fn start_controller(&mut self) {
        let log = std::fs::File::create(self.dir.join("controller.log")).unwrap();
        let child = Command::new(bin("sidenet-controller"))
            .arg("standalone")
            .arg("--manifests")
            .arg(self.dir.join("manifests"))
            .arg("--profiles")
            .arg(repo().join("hardware-profiles"))
            .arg("--templates")
            .arg(repo().join("templates"))
            .arg("--state")
            .arg(self.dir.join("state"))
            .arg("--listen")
            .arg(format!("10.201.0.1:{}", self.port))
            .arg("--poll-ms")
            .arg("100")
            .env("RUST_LOG", "info,rumqttd=warn,rumqttd::server::broker=off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("../pids"))
            .unwrap();
        let _ = writeln!(f, "{}", child.id());
        self.controller = Some(child);
        poll("the controller's admin socket", WAIT, || self.status().ok());
    }

    fn start_agent(&mut self, n: &str) {
        let join = join_code(&self.dir.join("state"));
        let node = self.node(n);
        let log = std::fs::File::create(node.dir.join("agent.log")).unwrap();
        let script = format!(
            "mkdir -p /run/wireguard && mount --bind {wg} /run/wireguard && exec {agent} \
             --mesh riverside --broker mqtt://10.201.0.1:{port} --backend linux \
             --root {root} --state {state} --profile {PROFILE} --hostname {n} \
             --status-interval 2 --underlay {underlay} --wg-userspace {us} \
             --health-deadline 10 --probe-interval 1 --join {join}",
            wg = node.dir.join("wireguard").display(),
            agent = bin("sidenet-agent").display(),
            port = self.port,
            root = node.dir.join("root").display(),
            state = node.dir.join("state").display(),
            underlay = node.underlay,
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
        self.nodes.iter_mut().find(|x| x.name == n).unwrap().agent = Some(child);
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
        let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        Ok(v.get("nodes")
            .and_then(Value::as_array)
            .cloned()
            .or_else(|| v.as_array().cloned())
            .unwrap_or_default())
    }

    fn rows(&self) -> BTreeMap<&'static str, Value> {
        let rows = self.status().unwrap_or_default();
        self.nodes
            .iter()
            .filter_map(|n| {
                let r = rows.iter().find(|r| r["node"] == *n.id.as_str())?;
                Some((n.name, r.clone()))
            })
            .collect()
    }

    fn names(&self, row: &Value) -> BTreeSet<String> {
        row["neighbours"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["node"].as_str())
                    .filter_map(|id| self.nodes.iter().find(|n| n.id == id))
                    .map(|n| n.name.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn applied(row: &Value) -> Option<u64> {
        row["applied"].get("rev").and_then(Value::as_u64)
    }

    /// The peers (node names) and endpoints of `n`'s installed WireGuard file.
    fn wg_peers(&self, n: &str) -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(self.node(n).dir.join("root/etc/sidenet/wireguard"))
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                if w.first() != Some(&"peer") || w.len() < 6 {
                    return None;
                }
                let name = self.nodes.iter().find(|x| x.id == w[3])?.name;
                Some((name.to_string(), w[5].to_string()))
            })
            .collect()
    }

    fn check_agents(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = n.agent.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                let log = std::fs::read_to_string(n.dir.join("agent.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "the agent of {} exited ({st}):\n{}",
                    n.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }

    fn ping(&self, from: &str, dst: &str) -> bool {
        self.nsx(from, &["ping", "-6", "-n", "-q", "-c", "1", "-W", "1", dst])
            .is_ok()
    }

    /// The interface of `from`'s route to `dst`.
    fn dev(&self, from: &str, dst: &str) -> Option<String> {
        let out = self.nsx(from, &["ip", "-6", "route", "get", dst]).ok()?;
        out.split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .map(str::to_string)
    }

    fn iface_to(&self, peer: &str) -> String {
        format!("sn-{}", &self.node(peer).id[..12])
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
#[ignore = "needs root and network namespaces: run tests/netns/run"]
fn radio_segment_pairs_by_mutual_observation() {
    let mut tb = Radiobed::new();
    tb.start_controller();
    let t0 = Instant::now();
    for n in NODES {
        tb.start_agent(n);
    }
    // ---- All pair by mutual observation (radio) or subnet (wire), and babel converges.
    let expect: BTreeMap<&str, BTreeSet<String>> = BTreeMap::from([
        ("p", set(&["q", "r", "s"])),
        ("q", set(&["p", "r", "s"])),
        ("r", set(&["p", "q", "s"])),
        ("s", set(&["p", "q", "r", "w"])),
        ("w", set(&["s"])),
    ]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        tb.check_agents();
        let rows = tb.rows();
        let done = NODES.iter().all(|n| {
            rows.get(n).is_some_and(|r| {
                r["phase"] == "Ready" && tb.names(r) == expect[n] && Radiobed::applied(r).is_some()
            })
        });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for every node to be Ready with its babel neighbours: {:?}",
            NODES.map(|n| (
                n,
                rows.get(n).map(|r| tb.names(r)),
                rows.get(n).map(|r| r["phase"].clone())
            ))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let paired = t0.elapsed().as_secs_f64();
    // The radio pairs are over the air: scoped link-local endpoints on mesh0; W–S by subnet.
    for n in RADIO {
        let peers = tb.wg_peers(n);
        for m in RADIO.iter().filter(|m| **m != n) {
            let ep = &peers[*m];
            assert!(
                ep.starts_with("[fe80::") && ep.contains("%mesh0]:"),
                "{n}'s endpoint for {m}: {ep}"
            );
        }
    }
    assert_eq!(
        tb.wg_peers("w")
            .get("s")
            .map(String::as_str)
            .map(|e| e.starts_with("10.0.9.1:")),
        Some(true)
    );
    tb.say(&format!(
        "radio: all 5 Ready, paired (P, Q, R, S over the air by mutual observation, W–S by subnet) with babel neighbours as expected {paired:.1}s after the agents started"
    ));
    // Everyone reaches everyone's side-net address over WireGuard.
    let addr: BTreeMap<&str, String> = tb
        .rows()
        .iter()
        .map(|(n, r)| (*n, r["address"].as_str().unwrap().to_string()))
        .collect();
    let t = Instant::now();
    for from in NODES {
        for to in NODES.iter().filter(|t| **t != from) {
            poll(
                &format!("{from} to reach {to} ({})", addr[to]),
                Duration::from_secs(20),
                || tb.ping(from, &addr[to]).then_some(()),
            );
        }
    }
    // Babel has converged: every node has a babel route to every other node's /64, over a
    // WireGuard link (never the radio itself); W's routes all run through S.
    for from in NODES {
        for to in NODES.iter().filter(|t| **t != from) {
            let dev = tb.dev(from, &addr[to]).unwrap_or_default();
            assert!(dev.starts_with("sn-"), "{from}'s route to {to}: {dev}");
        }
    }
    assert_eq!(tb.dev("w", &addr["p"]), Some(tb.iface_to("s")));
    tb.say(&format!(
        "radio: all 20 ordered pairs ping each other's side-net address over WireGuard ({:.1}s)",
        t.elapsed().as_secs_f64()
    ));

    // ---- R leaves the segment.
    let before: BTreeMap<&str, u64> = tb
        .rows()
        .iter()
        .map(|(n, r)| (*n, Radiobed::applied(r).unwrap()))
        .collect();
    let pulled = Instant::now();
    must(&["ip", "-n", &tb.ns("air"), "link", "set", "a-r", "nomaster"]);
    let mut configs_at = None;
    let mut links_at = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while configs_at.is_none() || links_at.is_none() {
        tb.check_agents();
        let rows = tb.rows();
        if configs_at.is_none()
            && ["p", "q", "s"].iter().all(|n| {
                rows.get(n)
                    .and_then(Radiobed::applied)
                    .is_some_and(|a| a > before[n])
                    && !tb.wg_peers(n).contains_key("r")
            })
            && tb.wg_peers("r").is_empty()
        {
            configs_at = Some(pulled.elapsed().as_secs_f64());
        }
        if links_at.is_none()
            && ["p", "q", "s"]
                .iter()
                .all(|n| rows.get(n).is_some_and(|r| !tb.names(r).contains("r")))
            && rows.get("r").is_some_and(|r| tb.names(r).is_empty())
        {
            links_at = Some(pulled.elapsed().as_secs_f64());
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for R to be unpaired (configs {configs_at:?}, links {links_at:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (configs_at, links_at) = (configs_at.unwrap(), links_at.unwrap());
    // The others keep their links and reach each other.
    // (A node whose peers change restarts babeld: its neighbours come back within seconds.)
    poll("the others' babel neighbours without R", WAIT, || {
        let rows = tb.rows();
        (tb.names(&rows["p"]) == set(&["q", "s"])
            && tb.names(&rows["q"]) == set(&["p", "s"])
            && tb.names(&rows["s"]) == set(&["p", "q", "w"]))
        .then_some(())
    });
    poll("P to reach W after R left", Duration::from_secs(20), || {
        tb.ping("p", &addr["w"]).then_some(())
    });
    tb.say(&format!(
        "radio: R pulled off the segment: P, Q, S and R applied configs without the R links {configs_at:.1}s later; R's links gone from status {links_at:.1}s later (beacon hold 8 s)"
    ));
}
