//! What the controller renders for OpenWrt routers, checked by the programs that read it:
//!
//! - one name per WireGuard link in every file (the netifd section/device, babeld's interface,
//!   the firewall zone, the probe plan through which the agent maps babel neighbours to nodes);
//! - babeld keeps running on a node with no WireGuard neighbour yet (a real babeld, fed the
//!   babeld.conf the OpenWrt init script makes of the uci config);
//! - no render names the board's ethernet ports (the owner's LAN and WAN, DSA or swconfig), and
//!   each profile's ports are those its stock OpenWrt config really has;
//! - the rate limit covers both mesh points of a passphrase rotation (checked by nft itself).

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
use sidenet_crds::{FirmwareFamily, NodeRole};

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
    let p = set.profiles.get(profile).unwrap();
    let mut mesh = set.meshes.get("riverside").unwrap().clone();
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
        subnet_id: 0x1c2d,
        passphrase: "golden passphrase 1",
        passphrase_next: rotating.then_some("golden passphrase 2"),
        labels: None,
    };
    let mut ctx = render::context(&inputs).unwrap();
    let mut dp = Dataplane::for_node(NODE);
    dp.peers = peers;
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
                for k in [
                    "ip", "eq", "le", "ge", "src_ip", "neigh", "id", "proto", "if",
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

#[test]
fn babeld_keeps_running_on_a_node_without_neighbours() {
    let set = set();
    let files = render(&set, "tplink-archer-c7-v2", Vec::new(), false);
    let batch = file(&files, "etc/sidenet/uci/babeld");
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
    assert!(!out.contains("no interfaces"), "{out}");
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

#[test]
fn the_rate_limit_covers_both_mesh_points_of_a_rotation() {
    let set = set();
    for rotating in [false, true] {
        let files = render(&set, "linksys-e8450", Vec::new(), rotating);
        let mesh_points: Vec<String> = batch_options(file(&files, "etc/sidenet/uci/wireless"))
            .into_iter()
            .filter(|(_, o, _)| o == "ifname")
            .map(|(_, _, v)| v)
            .collect();
        assert_eq!(mesh_points.len(), if rotating { 2 } else { 1 });
        let nft = file(&files, "etc/sidenet/ratelimit.nft");
        let limit = nft
            .lines()
            .find(|l| l.contains("limit rate over"))
            .unwrap_or_else(|| panic!("no policer:\n{nft}"));
        for m in &mesh_points {
            assert!(
                limit.contains(&format!("\"{m}\"")),
                "rotating={rotating}: the policer does not cover mesh point {m}: {limit}"
            );
        }
        // fw4 includes the file inside its table: nft itself checks it there.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fw4.nft");
        std::fs::write(&f, format!("table inet fw4 {{\n{nft}}}\n")).unwrap();
        check_nft(&f);
    }
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
