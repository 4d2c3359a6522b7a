//! What the controller renders for OpenWrt routers, checked by the programs that read it:
//!
//! - one name per WireGuard link in every file (the netifd section/device, babeld's interface,
//!   the firewall zone, the probe plan through which the agent maps babel neighbours to nodes);
//! - babeld keeps running on a node with no WireGuard neighbour yet (a real babeld, fed the
//!   babeld.conf the OpenWrt init script makes of the uci config);
//! - no render names the board's ethernet ports (the owner's LAN and WAN, DSA or swconfig), and
//!   each profile's ports are those its stock OpenWrt config really has;
//! - the policy shaping of every profile: the table the agent applies, the classification that
//!   fw4 includes in its table (checked by nft itself, inside a table like fw4's), the firewall
//!   section that includes it, and the hotplug script that puts re-created WireGuard links back
//!   through the classes (run for real in a network namespace of its own).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::repo;
use sidenet_controller::reconcile::peers::{self, Dataplane, PeerCtx};
use sidenet_controller::reconcile::render::{self, NodeInputs, Renderer};
use sidenet_controller::spec::manifest::{self, ManifestSet};
use sidenet_controller::spec::policy::compile;
use sidenet_controller::spec::policy::eval::Member;
use sidenet_crds::{
    Direction, FirmwareFamily, NodeRole, NodeSelector, Policy, PolicyType, Scope, Window,
};

const NODE: &str = "goldennode234567";

fn set() -> ManifestSet {
    manifest::load(&[
        repo().join("examples/riverside/mesh.yaml"),
        repo().join("hardware-profiles"),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn openwrt_profiles(set: &ManifestSet) -> Vec<String> {
    set.profiles
        .iter()
        .filter(|(_, p)| p.spec.firmware == FirmwareFamily::Openwrt)
        .map(|(n, _)| n.clone())
        .collect()
}

fn peer(node: &str, name: &str) -> PeerCtx {
    PeerCtx {
        node: node.into(),
        name: name.into(),
        iface: peers::iface_for(node),
        listen_port: 51900,
        public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
        endpoint: "10.0.1.2:51990".into(),
        endpoint_host: "10.0.1.2".into(),
        endpoint_port: 51990,
        link_local: peers::link_local(node).to_string(),
        link: "10.0.1.0/24".into(),
    }
}

/// The files of `profile` for a node with these peers, optionally during a passphrase rotation.
fn render(
    set: &ManifestSet,
    profile: &str,
    peers: Vec<PeerCtx>,
    rotating: bool,
) -> Vec<(String, String)> {
    let mesh = set.meshes.get("riverside").unwrap().clone();
    render_mesh(set, profile, &mesh, peers, rotating, None)
}

/// The files of `profile` in `mesh` with these peers and the policy compiled for the node
/// (`None`: the node's own policies only, as the render context compiles them).
fn render_with(
    set: &ManifestSet,
    profile: &str,
    mesh: &sidenet_crds::Mesh,
    peers: Vec<PeerCtx>,
    policy: Option<compile::NodePolicy>,
) -> Vec<(String, String)> {
    render_mesh(set, profile, mesh, peers, false, policy)
}

fn render_mesh(
    set: &ManifestSet,
    profile: &str,
    mesh: &sidenet_crds::Mesh,
    peers: Vec<PeerCtx>,
    rotating: bool,
    policy: Option<compile::NodePolicy>,
) -> Vec<(String, String)> {
    let p = set.profiles.get(profile).unwrap();
    let mut mesh = mesh.clone();
    if p.spec.mesh_radio(mesh.spec.radio.mesh_band).is_none() {
        mesh.spec.radio.mesh_band = sidenet_crds::Band::TwoG;
    }
    let inputs = NodeInputs {
        mesh: &mesh,
        profile: p,
        id: NODE,
        name: Some("golden"),
        reported_hostname: None,
        role: NodeRole::Router,
        channel: None,
        tx_power: None,
        hostname: None,
        uplinks: &[],
        subnet_id: 0x1c2d,
        passphrase: "golden passphrase 1",
        passphrase_next: rotating.then_some("golden passphrase 2"),
        labels: None,
    };
    let mut ctx = render::context(&inputs).unwrap();
    let mut dp = Dataplane::for_node(NODE);
    dp.peers = peers;
    dp.policy = policy.unwrap_or_else(|| ctx.dataplane.policy.clone());
    ctx.dataplane = dp;
    Renderer::load(&repo().join("templates"))
        .unwrap()
        .render("openwrt", &ctx)
        .unwrap()
        .into_iter()
        .map(|f| (f.file.path, f.file.content))
        .collect()
}

fn file<'a>(files: &'a [(String, String)], path: &str) -> &'a str {
    files
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, c)| c.as_str())
        .unwrap_or_else(|| panic!("no {path} rendered"))
}

/// `(section, option, value)` of every `set`/`add_list` line of a sidenet batch.
fn batch_options(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("set ")
                .or_else(|| l.strip_prefix("add_list "))?;
            let (path, value) = rest.split_once('=')?;
            let mut parts = path.split('.').skip(1);
            let (section, option) = (parts.next()?, parts.next()?);
            Some((
                section.to_string(),
                option.to_string(),
                value.trim_matches('\'').to_string(),
            ))
        })
        .collect()
}

#[test]
fn every_file_names_a_wireguard_link_alike() {
    let set = set();
    let peers = vec![
        peer("peerbbbbbbbbbbbb", "kitchen"),
        peer("peercccccccccccc", "attic"),
    ];
    for profile in openwrt_profiles(&set) {
        let files = render(&set, &profile, peers.clone(), false);
        let network = batch_options(file(&files, "etc/sidenet/uci/network"));
        // netifd creates a WireGuard device named after its section.
        let devices: BTreeSet<String> = network
            .iter()
            .filter(|(_, o, v)| o == "proto" && v == "wireguard")
            .map(|(s, _, _)| s.clone())
            .collect();
        assert_eq!(devices.len(), 2, "{profile}: {devices:?}");
        for d in &devices {
            assert!(
                d.len() <= 15,
                "{profile}: {d} is longer than a Linux interface name"
            );
        }
        let babeld: BTreeSet<String> = batch_options(file(&files, "etc/sidenet/uci/babeld"))
            .into_iter()
            .filter(|(_, o, _)| o == "ifname")
            .map(|(_, _, v)| v)
            .collect();
        assert_eq!(
            babeld, devices,
            "{profile}: babeld runs on other interfaces"
        );
        let zone: BTreeSet<String> = batch_options(file(&files, "etc/sidenet/uci/firewall"))
            .into_iter()
            .filter(|(s, o, _)| s == "sidenet_zone" && o == "network")
            .map(|(_, _, v)| v)
            .collect();
        assert_eq!(
            zone, devices,
            "{profile}: the sidenet zone has other networks"
        );
        let probes = file(&files, "etc/sidenet/probes");
        let mut probed = BTreeSet::new();
        for p in &peers {
            let line = probes
                .lines()
                .find(|l| l.starts_with(&format!("neighbour {} ", p.node)))
                .unwrap_or_else(|| panic!("{profile}: no probe for {}", p.node));
            let dev = line.rsplit_once('%').unwrap().1.to_string();
            // The agent maps the babel neighbour on this device to the node: it must be the
            // device whose name carries that node's id.
            assert!(dev.ends_with(&p.node[..7]), "{profile}: {line}");
            probed.insert(dev);
        }
        assert_eq!(
            probed, devices,
            "{profile}: probes address other interfaces"
        );
    }
}

/// babeld.conf as the OpenWrt babeld package's init script writes it from `uci export babeld`.
fn babeld_conf(export: &str) -> String {
    let mut general = Vec::new();
    let mut interfaces = Vec::new();
    let mut filters = Vec::new();
    let mut blocks: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in export.lines() {
        if let Some(rest) = line.strip_prefix("config ") {
            blocks.push((rest.split(' ').next().unwrap().to_string(), Vec::new()));
        } else if let Some(rest) = line.trim_start().strip_prefix("option ") {
            let (o, v) = rest.split_once(' ').unwrap();
            blocks
                .last_mut()
                .unwrap()
                .1
                .push((o.to_string(), v.trim_matches('\'').to_string()));
        }
    }
    for (kind, opts) in blocks {
        let get = |k: &str| opts.iter().find(|(o, _)| o == k).map(|(_, v)| v.clone());
        if matches!(get("ignore").as_deref(), Some("1" | "true")) {
            continue;
        }
        match kind.as_str() {
            "general" => {
                for (o, v) in &opts {
                    general.push(format!("{} {v}", o.replace('_', "-")));
                }
            }
            "interface" => {
                let Some(ifname) = get("ifname") else {
                    continue;
                };
                let mut l = format!("interface {ifname}");
                for (o, v) in opts.iter().filter(|(o, _)| o != "ifname") {
                    l.push_str(&format!(" {} {v}", o.replace('_', "-")));
                }
                interfaces.push(l);
            }
            "filter" => {
                let mut l = get("type").unwrap_or_default();
                if get("local").as_deref() == Some("true") {
                    l.push_str(" local");
                }
                // In the init script's order.
                for k in [
                    "ip", "eq", "le", "ge", "src_ip", "src_eq", "src_le", "src_ge", "neigh", "id",
                    "proto", "if",
                ] {
                    if let Some(v) = get(k) {
                        l.push_str(&format!(" {} {v}", k.replace('_', "-")));
                    }
                }
                l.push_str(&format!(" {}", get("action").unwrap_or_default()));
                filters.push(l);
            }
            _ => {}
        }
    }
    let mut out = general;
    out.extend(filters);
    out.extend(interfaces);
    out.join("\n") + "\n"
}

/// Applies a babeld batch with the real `uci` to an empty config, makes babeld.conf of it as the
/// init script does, and starts a real babeld on it in a network namespace of its own: the
/// config and babeld's log once it runs (panics when it exits or does not start).
fn run_babeld(batch: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("config");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("babeld"), "").unwrap();
    let commands: String = batch
        .lines()
        .filter(|l| l.starts_with("set ") || l.starts_with("add_list "))
        .map(|l| format!("{l}\n"))
        .collect();
    // A change folder of the test's own: uci's default (/tmp/.uci) is shared machine-wide.
    let mut child = Command::new(common::uci_cli())
        .arg("-c")
        .arg(&conf)
        .arg("-t")
        .arg(dir.path().join("uci-changes"))
        .arg("batch")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all((commands + "commit babeld\n").as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let export = Command::new(common::uci_cli())
        .arg("-c")
        .arg(&conf)
        .args(["export", "babeld"])
        .output()
        .unwrap();
    let text = babeld_conf(&String::from_utf8_lossy(&export.stdout));
    let cfg = dir.path().join("babeld.conf");
    std::fs::write(&cfg, &text).unwrap();
    // A real babeld in a network namespace of its own (nothing to route, nothing to touch).
    let log = dir.path().join("babeld.log");
    let mut babeld = Command::new("unshare")
        .args(["-rn", "sh", "-c"])
        .arg(format!(
            "ip link set lo up && exec babeld -d 1 -I {pid} -S {state} -c {cfg}",
            pid = dir.path().join("pid").display(),
            state = dir.path().join("state").display(),
            cfg = cfg.display()
        ))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let outcome = loop {
        let mut out = String::new();
        std::fs::File::open(&log)
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        if out.contains("My id") {
            break Ok(out);
        }
        if let Some(status) = babeld.try_wait().unwrap() {
            break Err(format!("babeld exited ({status}):\n{out}"));
        }
        if Instant::now() > deadline {
            break Err(format!("babeld did not start within 20 s:\n{out}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = babeld.kill();
    let _ = babeld.wait();
    let out = outcome.unwrap_or_else(|e| panic!("{e}\nconfig:\n{text}"));
    (text, out)
}

#[test]
fn babeld_keeps_running_on_a_node_without_neighbours() {
    let set = set();
    let files = render(&set, "tplink-archer-c7-v2", Vec::new(), false);
    let (_, out) = run_babeld(file(&files, "etc/sidenet/uci/babeld"));
    assert!(!out.contains("no interfaces"), "{out}");
}

/// Gateways that route (docs/dataplane.md): a gateway announces its default routes for the
/// mesh prefix only (also those of protocol boot), every node of a mesh with `allowInternet`
/// accepts and relays exactly that route, and a mesh without it renders none of it. The uci
/// batches go through the real `uci` and the init script's conversion into a running babeld.
#[test]
fn gateways_announce_and_nodes_accept_the_default_route_for_the_mesh_prefix_only() {
    let set = set();
    let base = set.meshes.get("riverside").unwrap().clone();
    let with = |nodes: &[&str]| {
        let mut m = base.clone();
        m.spec
            .policies
            .retain(|p| p.type_ != PolicyType::NoInternet);
        m.spec.policies.push(Policy {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            ..Policy::new(PolicyType::AllowInternet)
        });
        m
    };
    let mesh = "fdfc:b395:f348::/48";
    let announce = [
        format!("redistribute ip ::/0 eq 0 src-prefix {mesh}"),
        format!("redistribute ip ::/0 eq 0 proto 3 src-prefix {mesh}"),
    ];
    let accept = [
        format!("in ip ::/0 eq 0 src-ip {mesh} src-eq 48 allow"),
        format!("out ip ::/0 eq 0 src-ip {mesh} src-eq 48 allow"),
    ];
    let peers = vec![peer("peerbbbbbbbbbbbb", "kitchen")];
    let cases = [
        ("gateway", with(&["golden"]), true, true),
        (
            "node of a mesh with gateways",
            with(&["kitchen"]),
            false,
            true,
        ),
        (
            "node of a mesh without allowInternet",
            base.clone(),
            false,
            false,
        ),
    ];
    for (what, m, gateway, accepts) in cases {
        let files = render_with(&set, "tplink-archer-c7-v2", &m, peers.clone(), None);
        let (text, _) = run_babeld(file(&files, "etc/sidenet/uci/babeld"));
        let lines: Vec<&str> = text.lines().collect();
        let at = |l: &str| lines.iter().position(|x| *x == l);
        for l in &announce {
            assert_eq!(at(l).is_some(), gateway, "{what}: {l}\n{text}");
            if gateway {
                assert!(at(l) < at("redistribute local deny"), "{what}: {l}\n{text}");
            }
        }
        for (l, last) in accept.iter().zip(["in deny", "out deny"]) {
            assert_eq!(at(l).is_some(), accepts, "{what}: {l}\n{text}");
            if accepts {
                assert!(at(l) < at(last), "{what}: {l} after {last}\n{text}");
            }
        }
        if !accepts {
            assert!(!text.contains("::/0"), "{what}:\n{text}");
        }
        let probes = file(&files, "etc/sidenet/probes");
        let line = format!("internet from {mesh} table 122 priority 32800");
        assert_eq!(probes.contains(&line), accepts, "{what}:\n{probes}");
    }
}

/// Every ethernet name a stock OpenWrt network config uses (devices and bridge ports).
fn stock_ports(profile: &str) -> BTreeSet<String> {
    let p = repo()
        .join("tests/openwrt-stock")
        .join(profile)
        .join("etc/config/network");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("option device ")
                .or_else(|| l.strip_prefix("list ports "))
                .map(|v| v.trim_matches('\'').to_string())
        })
        .filter(|d| d != "lo" && !d.starts_with("br-") && d != "switch0")
        .collect()
}

#[test]
fn renders_leave_the_boards_ports_to_the_owner() {
    let set = set();
    for profile in openwrt_profiles(&set) {
        let p = &set.profiles[&profile];
        let stock = stock_ports(&profile);
        // The profile describes the ports as OpenWrt 23.05/24.10 drives them on this board.
        let declared: BTreeSet<String> = p.spec.ethernet.iter().map(|e| e.name.clone()).collect();
        assert_eq!(
            declared, stock,
            "{profile}: the profile's ethernet ports are not the ones its stock OpenWrt config uses"
        );
        let files = render(
            &set,
            &profile,
            vec![peer("peerbbbbbbbbbbbb", "kitchen")],
            false,
        );
        for (path, content) in files.iter().filter(|(p, _)| p.contains("/uci/")) {
            for (section, option, value) in batch_options(content) {
                assert!(
                    !matches!(option.as_str(), "ports" | "device" | "ifname")
                        || !(stock.contains(&value) || value.starts_with("br-")),
                    "{profile}: {path}: {section}.{option} names the owner's {value}"
                );
                assert_ne!(
                    option, "ports",
                    "{profile}: {path}: {section} sets bridge ports"
                );
            }
        }
    }
}

/// Policies with every kind of class: a budget, a window that opens it, a per-path limit
/// toward kitchen, an ingress limit from attic and a relayed-scope limit.
fn shaping_policies() -> Vec<Policy> {
    let sel = |n: &str| NodeSelector {
        nodes: vec![n.into()],
        ..Default::default()
    };
    let rate = |k| Policy {
        rate_kbit: Some(k),
        ..Policy::new(PolicyType::RateLimit)
    };
    vec![
        Policy {
            name: Some("night".into()),
            schedule: vec![Window {
                days: vec![],
                start: "23:00".into(),
                end: "07:00".into(),
            }],
            ..rate(40000)
        },
        Policy {
            name: Some("to-kitchen".into()),
            toward: Some(sel("kitchen")),
            ..rate(8000)
        },
        Policy {
            name: Some("from-attic".into()),
            direction: Some(Direction::Ingress),
            toward: Some(sel("attic")),
            ..rate(12000)
        },
        Policy {
            name: Some("relay".into()),
            scope: Some(Scope::Relayed),
            ..rate(30000)
        },
    ]
}

/// fw4's table as `fw4 print` starts it, with sidenet's include where fw4 puts a
/// `position 'table-append'` include: at the end of the table's body.
fn fw4_with_include(include: &str) -> String {
    format!(
        "table inet fw4\nflush table inet fw4\n\ntable inet fw4 {{\n\tchain input {{\n\t\ttype filter hook input priority filter; policy drop;\n\t}}\n\n\tchain forward {{\n\t\ttype filter hook forward priority filter; policy drop;\n\t}}\n\n\tchain output {{\n\t\ttype filter hook output priority filter; policy accept;\n\t}}\n\n{include}}}\n"
    )
}

#[test]
fn every_profile_renders_openwrt_shaping_that_nft_and_uci_take() {
    let set = set();
    let peers = vec![
        peer("peerbbbbbbbbbbbb", "kitchen"),
        peer("peercccccccccccc", "attic"),
    ];
    let located: Vec<compile::Located> = [
        (NODE, "golden", 0x1c2d),
        ("peerbbbbbbbbbbbb", "kitchen", 2),
        ("peercccccccccccc", "attic", 3),
    ]
    .into_iter()
    .map(|(id, name, sid)| compile::Located {
        member: Member {
            id: id.into(),
            name: name.into(),
            labels: Default::default(),
        },
        subnet: format!("fdfc:b395:f348:{sid:x}::/64"),
    })
    .collect();
    let mut checked = 0;
    for profile in openwrt_profiles(&set) {
        let mut mesh = set.meshes.get("riverside").unwrap().clone();
        mesh.spec.policies.extend(shaping_policies());
        mesh.spec.time_zone = Some("Europe/Berlin".into());
        let policy = compile::node_policy(&mesh, &located, NODE);
        let files = render_with(&set, &profile, &mesh, peers.clone(), Some(policy.clone()));
        // The table the agent applies: the same as a Linux node's.
        assert_eq!(
            file(&files, "etc/sidenet/shaping").trim_end(),
            policy.shaping.trim_end()
        );
        let table = file(&files, "etc/sidenet/shaping");
        for want in [
            "ifb egress sneg0 1",
            "ifb ingress snin0 2",
            "class 1:4 1:2 leaf relayed",
            "class 1:10 1:3 leaf toward:to-kitchen",
        ] {
            assert!(
                table.lines().any(|l| l == want),
                "{profile}: no {want:?}:\n{table}"
            );
        }
        // fw4 includes the classification inside its table: nft itself checks it there.
        let nft = file(&files, "etc/sidenet/shaping.nft");
        for want in [
            "\toifname != \"sidenet_*\" return",
            "\tiifname \"sidenet_*\" meta priority set 1:4 return",
            "\tip6 daddr { fdfc:b395:f348:2::/64 } meta priority set 1:10 return",
            "\tmeta priority set 1:9",
        ] {
            assert!(
                nft.lines().any(|l| l == want),
                "{profile}: no {want:?}:\n{nft}"
            );
        }
        assert!(
            !nft.contains(" drop"),
            "{profile}: the include drops:\n{nft}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fw4.nft");
        std::fs::write(&f, fw4_with_include(nft)).unwrap();
        check_nft(&f);
        // The firewall batch names it (the golden test feeds every batch to the real uci).
        let fw = batch_options(file(&files, "etc/sidenet/uci/firewall"));
        for (o, v) in [
            ("type", "nftables"),
            ("path", "/etc/sidenet/shaping.nft"),
            ("position", "table-append"),
        ] {
            assert!(
                fw.iter()
                    .any(|(s, oo, vv)| s == "sidenet_shaping" && oo == o && vv == v),
                "{profile}: firewall.sidenet_shaping.{o} is not {v}"
            );
        }
        assert!(
            !files.iter().any(|(p, _)| p.ends_with("ratelimit.nft")),
            "{profile}: the old policer is still rendered"
        );
        let hotplug = file(&files, "etc/hotplug.d/iface/50-sidenet-shaping");
        check_hotplug(hotplug);
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} OpenWrt profiles checked");
    // Without a rate policy nothing of it is rendered, and fw4 includes nothing.
    let mut mesh = set.meshes.get("riverside").unwrap().clone();
    mesh.spec
        .policies
        .retain(|p| p.type_ != PolicyType::RateLimit);
    let files = render_with(&set, "linksys-e8450", &mesh, peers, None);
    for p in [
        "etc/sidenet/shaping",
        "etc/sidenet/shaping.nft",
        "etc/hotplug.d/iface/50-sidenet-shaping",
    ] {
        assert!(
            !files.iter().any(|(f, _)| f == p),
            "{p} rendered without a rate policy"
        );
    }
    assert!(!file(&files, "etc/sidenet/uci/firewall").contains("sidenet_shaping"));
}

/// Runs the hotplug script as OpenWrt's hotplug-call does (sourced in a subshell, with the
/// event in the environment) in network and mount namespaces of their own (sysfs mounted
/// again, so `/sys/class/net` shows that namespace's devices), with the ifbs `sneg0` and
/// `snin0` and a WireGuard-like link `sidenet_peerbbb` (a veth, the other end `lan0`): after
/// an ifup of that link (twice, as netifd may), its traffic goes through both ifbs (their
/// packet counters move with a ping across the link) without the filters piling up; other
/// interfaces and events are left alone.
fn check_hotplug(script: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("50-sidenet-shaping");
    std::fs::write(&f, script).unwrap();
    let ev = |action: &str, iface: &str, dev: &str| {
        format!(
            "(ACTION={action} INTERFACE={iface} DEVICE={dev}; . {f})",
            f = f.display()
        )
    };
    let cmd = [
        "set -e".to_string(),
        "mount -t sysfs sysfs /sys".into(),
        "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0".into(),
        "ip link add sneg0 type ifb".into(),
        "ip link add snin0 type ifb".into(),
        "ip link add sidenet_peerbbb type veth peer name lan0".into(),
        "for d in sneg0 snin0 sidenet_peerbbb lan0; do ip link set $d up; done".into(),
        ev("ifup", "sidenet_peerbbb", "sidenet_peerbbb"),
        ev("ifup", "sidenet_peerbbb", "sidenet_peerbbb"),
        ev("ifup", "lan", "lan0"),
        ev("ifdown", "sidenet_peerbbb", "sidenet_peerbbb"),
        "e0=$(cat /sys/class/net/sneg0/statistics/tx_packets)".into(),
        "i0=$(cat /sys/class/net/snin0/statistics/tx_packets)".into(),
        "ping -6 -c 3 -i 0.2 -W 2 -I sidenet_peerbbb ff02::1 >/dev/null".into(),
        "echo COUNTERS $(( $(cat /sys/class/net/sneg0/statistics/tx_packets) - e0 )) $(( $(cat /sys/class/net/snin0/statistics/tx_packets) - i0 ))".into(),
        "echo FILTERS; tc filter show dev sidenet_peerbbb egress".into(),
        "echo LAN; tc qdisc show dev lan0".into(),
    ]
    .join("\n");
    let out = Command::new("unshare")
        .args(["-nm", "sh", "-c", &cmd])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the hotplug script failed: {}\n{text}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counters: Vec<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("COUNTERS "))
        .unwrap_or_else(|| panic!("{text}"))
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    // Three echo requests out through sneg0, their replies in through snin0.
    assert!(counters[0] >= 3, "egress did not go through sneg0: {text}");
    assert!(counters[1] >= 3, "ingress did not go through snin0: {text}");
    let (filters, lan) = text.split_once("\nLAN").unwrap();
    // The link's u32 filters (its clsact hooks share one u32 table, so both show): one each.
    assert_eq!(
        filters.matches("Redirect to device sneg0").count(),
        1,
        "{filters}"
    );
    assert_eq!(
        filters.matches("Redirect to device snin0").count(),
        1,
        "{filters}"
    );
    assert!(
        !lan.contains("clsact"),
        "a LAN interface was touched: {lan}"
    );
}

fn check_nft(f: &Path) {
    let out = Command::new("unshare")
        .args(["-rn", "nft", "-c", "-f"])
        .arg(f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nft refused it: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(f).unwrap()
    );
}
