//! Golden tests: every template family × every hardware profile, rendered for the example mesh,
//! compared with the files under `tests/golden/` (reviewed in the diff). Regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p sidenet-controller --test golden`.
//!
//! The OpenWrt renders are also parsed back by OpenWISP's netjsonconfig (an independent
//! implementation of the UCI format, installed by `scripts/test`).
//!
//! A second set, under `tests/golden/with-peers/`, renders one Linux and one OpenWrt profile for
//! a gateway node with two WireGuard neighbours (one over IPv4, one over IPv6), another gateway
//! to probe, and a mesh policy that lets it forward side-net traffic to its uplink.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::repo;
use sidenet_controller::reconcile::peers::{self, Dataplane, GatewayCtx, HostName, PeerCtx};
use sidenet_controller::reconcile::render::{self, NodeInputs, Renderer};
use sidenet_controller::spec::manifest::{self, ManifestSet};
use sidenet_controller::spec::policy::compile;
use sidenet_controller::spec::policy::eval::Member;
use sidenet_crds::{
    Direction, NodeRole, NodeSelector, Policy, PolicyType, PortSpec, Protocol, Window,
};

const NODE: &str = "goldennode234567";
const SUBNET: u16 = 0x1c2d;
const PASSPHRASE: &str = "golden passphrase 1";

fn set() -> ManifestSet {
    manifest::load(&[
        repo().join("examples/riverside/mesh.yaml"),
        repo().join("hardware-profiles"),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Profiles rendered a second time with WireGuard neighbours.
const WITH_PEERS: [&str; 2] = ["raspberrypi-4b-awus036acm", "tplink-archer-c7-v2"];

/// Two neighbours, a gateway to probe, and `allowInternet` for this node.
fn sample_dataplane() -> Dataplane {
    let mut dp = Dataplane::for_node(NODE);
    let peer = |node: &str, name: &str, key: &str, host: &str, port: u16, link: &str| {
        let endpoint = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        PeerCtx {
            node: node.into(),
            name: name.into(),
            iface: peers::iface_for(node),
            listen_port: 51837,
            public_key: key.into(),
            endpoint,
            endpoint_host: host.into(),
            endpoint_port: port,
            link_local: peers::link_local(node).to_string(),
            link: link.into(),
        }
    };
    dp.peers = vec![
        peer(
            "peerbbbbbbbbbbbb",
            "kitchen",
            "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
            "10.0.1.2",
            51990,
            "10.0.1.0/24",
        ),
        peer(
            "peercccccccccccc",
            "attic",
            "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=",
            "2001:db8:5::2",
            52011,
            "2001:db8:5::/64",
        ),
    ];
    dp.peers[1].listen_port = 52400;
    dp.gateways = vec![GatewayCtx {
        node: "gatewaydddddddddd".into(),
        name: "corner-shop".into(),
        address: "fdfc:b395:f348:1::1".into(),
    }];
    // The mesh's names (docs/dataplane.md, "Names"): the nodes and attic's service `web`.
    let name = |name: &str, address: &str| HostName {
        name: format!("{name}.riverside.sidenet.arpa"),
        address: address.into(),
    };
    dp.names = vec![
        name("attic", "fdfc:b395:f348:3::1"),
        name("golden", "fdfc:b395:f348:1c2d::1"),
        name("kitchen", "fdfc:b395:f348:2::1"),
        name("web.attic", "2001:db8:5::80"),
    ];
    dp
}

/// The with-peers node's policies (on top of the example's 20000 kbit/s budget): 40000 kbit/s
/// from 23:00 to 07:00 Berlin time, 8000 kbit/s toward attic, 12000 kbit/s received from
/// kitchen, kitchen may reach it on tcp/5201 and attic may not reach it at all. `tests/netns/shaping` measures these files.
fn with_peers_policies() -> Vec<Policy> {
    let sel = |n: &str| NodeSelector {
        nodes: vec![n.into()],
        ..Default::default()
    };
    vec![
        Policy {
            name: Some("night".into()),
            rate_kbit: Some(40000),
            schedule: vec![Window {
                days: vec![],
                start: "23:00".into(),
                end: "07:00".into(),
            }],
            ..Policy::new(PolicyType::RateLimit)
        },
        Policy {
            name: Some("to-attic".into()),
            rate_kbit: Some(8000),
            toward: Some(sel("attic")),
            ..Policy::new(PolicyType::RateLimit)
        },
        Policy {
            name: Some("from-kitchen".into()),
            rate_kbit: Some(12000),
            direction: Some(Direction::Ingress),
            toward: Some(sel("kitchen")),
            ..Policy::new(PolicyType::RateLimit)
        },
        Policy {
            name: Some("kitchen-iperf".into()),
            from: Some(sel("kitchen")),
            to: Some(sel("golden")),
            protocol: Some(Protocol::Tcp),
            ports: vec![PortSpec::Number(5201)],
            ..Policy::new(PolicyType::Allow)
        },
        Policy {
            name: Some("no-attic".into()),
            from: Some(sel("attic")),
            to: Some(sel("golden")),
            ..Policy::new(PolicyType::Deny)
        },
    ]
}

/// The with-peers node and its two neighbours with their /64s in the example's prefix.
fn located() -> Vec<compile::Located> {
    [
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
    .collect()
}

fn render_variant(
    set: &ManifestSet,
    renderer: &Renderer,
    profile: &str,
    with_peers: bool,
) -> Vec<(String, String)> {
    render_cached(set, renderer, profile, with_peers, false)
}

/// The web cache of a with-peers node: both neighbours are siblings (`docs/content.md`).
fn sample_cache() -> sidenet_controller::reconcile::cache::CacheCtx {
    use sidenet_controller::reconcile::cache::{CacheCtx, HTTP_PORT, ICP_PORT, LanCtx, SiblingCtx};
    CacheCtx {
        address: "fdfc:b395:f348:1c2d::1".into(),
        http_port: HTTP_PORT,
        icp_port: ICP_PORT,
        dir: "/var/spool/sidenet-squid".into(),
        disk_mb: 256,
        memory_mb: 16,
        max_object_mb: 16,
        public_only: true,
        lan: vec![LanCtx {
            address: "192.168.1.1".into(),
            ipv6: false,
            subnet: "192.168.1.0/24".into(),
        }],
        siblings: vec![
            SiblingCtx {
                node: "peerbbbbbbbbbbbb".into(),
                name: "kitchen".into(),
                address: "fdfc:b395:f348:2::1".into(),
            },
            SiblingCtx {
                node: "peercccccccccccc".into(),
                name: "attic".into(),
                address: "fdfc:b395:f348:3::1".into(),
            },
        ],
    }
}

/// [`render_variant`], optionally with the node running the web cache ([`sample_cache`]).
fn render_cached(
    set: &ManifestSet,
    renderer: &Renderer,
    profile: &str,
    with_peers: bool,
    cache: bool,
) -> Vec<(String, String)> {
    let p = set.profiles.get(profile).unwrap();
    let mut mesh = mesh_for(set, profile);
    if with_peers {
        mesh.spec
            .policies
            .retain(|p| p.type_ != PolicyType::NoInternet);
        mesh.spec.policies.push(Policy {
            nodes: vec!["golden".into()],
            ..Policy::new(PolicyType::AllowInternet)
        });
        mesh.spec.policies.extend(with_peers_policies());
        mesh.spec.time_zone = Some("Europe/Berlin".into());
    }
    let inputs = NodeInputs {
        mesh: &mesh,
        profile: p,
        id: NODE,
        name: Some("golden"),
        reported_hostname: None,
        role: NodeRole::Router,
        channel: None,
        // OpenWrt keeps the transmit power on the owner's radio, which sidenet never changes.
        tx_power: (p.spec.firmware == sidenet_crds::FirmwareFamily::Linux).then_some(17),
        hostname: None,
        uplinks: &[],
        subnet_id: SUBNET,
        passphrase: PASSPHRASE,
        passphrase_next: None,
        labels: None,
    };
    let mut ctx = render::context(&inputs).unwrap_or_else(|e| panic!("{profile}: {e}"));
    if with_peers {
        ctx.dataplane = sample_dataplane();
        ctx.dataplane.policy = compile::node_policy(&mesh, &located(), NODE);
    }
    if cache {
        ctx.cache = Some(sample_cache());
    }
    renderer
        .render(p.spec.firmware.as_str(), &ctx)
        .unwrap_or_else(|e| panic!("{profile}: {e}"))
        .into_iter()
        .map(|f| (f.file.path, f.file.content))
        .collect()
}

/// The example mesh, moved to 2.4 GHz for devices without a 5 GHz mesh radio (travel routers).
fn mesh_for(set: &ManifestSet, profile: &str) -> sidenet_crds::Mesh {
    let mut mesh = set.meshes.get("riverside").unwrap().clone();
    let p = set.profiles.get(profile).unwrap();
    if p.spec.mesh_radio(mesh.spec.radio.mesh_band).is_none() {
        mesh.spec.radio.mesh_band = sidenet_crds::Band::TwoG;
    }
    mesh
}

fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p);
            }
        }
    }
    out
}

#[test]
fn every_profile_matches_its_golden_files() {
    let set = set();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let golden = repo().join("controller/tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut expected = BTreeSet::new();
    let mut mismatches = Vec::new();
    assert!(
        set.profiles.len() >= 8,
        "expected at least 8 hardware profiles"
    );
    let variants = set
        .profiles
        .keys()
        .map(|n| (n.clone(), false, golden.join(n)))
        .chain(
            WITH_PEERS
                .iter()
                .map(|n| (n.to_string(), true, golden.join("with-peers").join(n))),
        );
    for (name, with_peers, dir) in variants {
        for (path, content) in render_variant(&set, &renderer, &name, with_peers) {
            let file = dir.join(&path);
            expected.insert(file.clone());
            if update {
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &content).unwrap();
            } else if std::fs::read_to_string(&file).ok().as_deref() != Some(content.as_str()) {
                mismatches.push(file.display().to_string());
            }
        }
    }
    let stale: Vec<_> = files_under(&golden)
        .difference(&expected)
        .cloned()
        .collect();
    if update {
        for s in &stale {
            std::fs::remove_file(s).unwrap();
        }
        return;
    }
    assert!(
        mismatches.is_empty() && stale.is_empty(),
        "golden files differ: {mismatches:?}\nstale golden files: {stale:?}\nreview and regenerate with UPDATE_GOLDEN=1 cargo test -p sidenet-controller --test golden"
    );
}

/// Copies the stock `/etc/config` of `profile` (tests/openwrt-stock) into `dir/etc/config`.
fn stock_config(profile: &str, dir: &Path) -> PathBuf {
    let conf = dir.join("etc/config");
    std::fs::create_dir_all(&conf).unwrap();
    let stock = repo()
        .join("tests/openwrt-stock")
        .join(profile)
        .join("etc/config");
    for e in std::fs::read_dir(&stock)
        .unwrap_or_else(|e| panic!("{}: {e}", stock.display()))
        .flatten()
    {
        std::fs::copy(e.path(), conf.join(e.file_name())).unwrap();
    }
    conf
}

fn uci(conf: &Path, args: &[&str], input: Option<&str>) -> std::process::Output {
    use std::io::Write;
    // A change folder of the test's own: uci's default (/tmp/.uci) is shared machine-wide.
    let mut child = std::process::Command::new(common::uci_cli())
        .arg("-c")
        .arg(conf)
        .arg("-t")
        .arg(conf.join("../uci-changes"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.unwrap_or("").as_bytes()).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// The sections of `uci export` output: (name, text).
fn sections(export: &str) -> Vec<(Option<String>, String)> {
    let mut out: Vec<(Option<String>, String)> = Vec::new();
    for line in export.lines() {
        if let Some(rest) = line.strip_prefix("config ") {
            let name = rest
                .split_once(' ')
                .map(|(_, n)| n.trim_matches('\'').to_string());
            out.push((name, format!("{line}\n")));
        } else if line.starts_with('\t')
            && let Some(s) = out.last_mut()
        {
            s.1.push_str(line);
            s.1.push('\n');
        }
    }
    out
}

/// Every OpenWrt render (with and without WireGuard neighbours) is fed to OpenWrt's own `uci`
/// tool on that profile's stock config: each command of each sidenet batch (every line that
/// is not blank, a comment or a `require`) must be taken without a complaint, one change each,
/// and only `sidenet_*` sections may change. Then sidenet's sections (and the owner's radio the
/// mesh point uses) are parsed back by OpenWISP's netjsonconfig. Every profile is also fed once
/// with WireGuard neighbours and the web cache: the cache's firewall rules must come out of
/// `uci export` with the siblings' addresses.
#[test]
fn openwrt_renders_apply_with_uci_and_parse_back_with_netjsonconfig() {
    let set = set();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let python = common::peer_python();
    let mut checked = 0;
    let openwrt = set
        .profiles
        .iter()
        .filter(|(_, p)| p.spec.firmware == sidenet_crds::FirmwareFamily::Openwrt)
        .map(|(n, _)| (n.clone(), false, false));
    let cached: Vec<(String, bool, bool)> =
        openwrt.clone().map(|(n, _, _)| (n, true, true)).collect();
    let with_peers = WITH_PEERS
        .iter()
        .filter(|n| set.profiles[**n].spec.firmware == sidenet_crds::FirmwareFamily::Openwrt)
        .map(|n| (n.to_string(), true, false));
    let mut cache_checked = 0;
    for (name, peers, cache) in openwrt.chain(with_peers).chain(cached) {
        let name = &name;
        let dir = tempfile::tempdir().unwrap();
        let conf = stock_config(name, dir.path());
        let rendered = render_cached(&set, &renderer, name, peers, cache);
        assert!(
            !rendered.iter().any(|(p, _)| p.starts_with("etc/config/")),
            "{name}: an OpenWrt render must not write /etc/config files whole"
        );
        let before: Vec<String> = ["network", "wireless", "firewall", "dhcp", "system"]
            .iter()
            .map(|p| String::from_utf8_lossy(&uci(&conf, &["export", p], None).stdout).into())
            .collect();
        // The babeld package is not on a stock router: the agent creates its file.
        std::fs::write(conf.join("babeld"), "").unwrap();
        for (path, content) in &rendered {
            let Some(package) = path.strip_prefix("etc/sidenet/uci/") else {
                continue;
            };
            // What lands on the router: the agent fills in its WireGuard private key.
            let content = content.replace(
                "@sidenet-wireguard-private-key@",
                "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=",
            );
            let commands: Vec<&str> = content
                .lines()
                .filter(|l| {
                    let t = l.trim();
                    !t.is_empty() && !t.starts_with('#') && !t.starts_with("require ")
                })
                .collect();
            for c in &commands {
                assert!(
                    c.starts_with(&format!("set {package}.sidenet_"))
                        || c.starts_with(&format!("add_list {package}.sidenet_")),
                    "{name} {path}: {c:?} touches something that is not sidenet's"
                );
            }
            let out = uci(&conf, &["batch"], Some(&(commands.join("\n") + "\n")));
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "{name} {path}: uci refused it: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let changes = uci(&conf, &["changes", package], None);
            assert_eq!(
                String::from_utf8_lossy(&changes.stdout).lines().count(),
                commands.len(),
                "{name} {path}: uci did not take every command"
            );
            let out = uci(&conf, &["commit", package], None);
            assert!(out.status.success(), "{name}: uci commit {package} failed");
        }
        for (p, was) in ["network", "wireless", "firewall", "dhcp", "system"]
            .iter()
            .zip(&before)
        {
            let now: String =
                String::from_utf8_lossy(&uci(&conf, &["export", p], None).stdout).into();
            let owner = |t: &str| -> Vec<(Option<String>, String)> {
                sections(t)
                    .into_iter()
                    .filter(|(n, _)| !n.as_deref().is_some_and(|n| n.starts_with("sidenet_")))
                    .collect()
            };
            assert_eq!(owner(&now), owner(was), "{name}: the owner's {p} changed");
        }
        if peers {
            // The mesh's names, as OpenWrt's dnsmasq init script reads `domain` sections (one
            // "IP NAME" line of its hosts file each): exactly the data plane's names.
            let dhcp: String =
                String::from_utf8_lossy(&uci(&conf, &["export", "dhcp"], None).stdout).into();
            let hosts: Vec<String> = sections(&dhcp)
                .into_iter()
                .filter(|(n, t)| {
                    n.as_deref().is_some_and(|n| n.starts_with("sidenet_name_"))
                        && t.starts_with("config domain ")
                })
                .map(|(_, t)| {
                    let opt = |o: &str| {
                        t.lines()
                            .find_map(|l| l.strip_prefix(&format!("\toption {o} ")))
                            .map(|v| v.trim_matches('\'').to_string())
                            .unwrap_or_default()
                    };
                    format!("{} {}", opt("ip"), opt("name"))
                })
                .collect();
            let want: Vec<String> = sample_dataplane()
                .names
                .iter()
                .map(|n| format!("{} {}", n.address, n.name))
                .collect();
            assert_eq!(hosts, want, "{name}: the names in uci export dhcp:\n{dhcp}");
        }
        if cache {
            let fw: String =
                String::from_utf8_lossy(&uci(&conf, &["export", "firewall"], None).stdout).into();
            for (rule, proto, port) in [
                ("sidenet_allow_cache_http", "tcp", "3128"),
                ("sidenet_allow_cache_icp", "udp", "3130"),
            ] {
                let (_, text) = sections(&fw)
                    .into_iter()
                    .find(|(n, _)| n.as_deref() == Some(rule))
                    .unwrap_or_else(|| panic!("{name}: no {rule} in uci export:\n{fw}"));
                let lines: Vec<&str> = text.lines().map(str::trim).collect();
                for want in [
                    format!("config rule '{rule}'"),
                    "option src 'sidenet'".to_string(),
                    format!("option proto '{proto}'"),
                    format!("option dest_port '{port}'"),
                    "option family 'ipv6'".to_string(),
                    "list src_ip 'fdfc:b395:f348:2::1'".to_string(),
                    "list src_ip 'fdfc:b395:f348:3::1'".to_string(),
                    "option target 'ACCEPT'".to_string(),
                ] {
                    assert!(
                        lines.contains(&want.as_str()),
                        "{name}: {rule} has no {want:?}:\n{text}"
                    );
                }
            }
            cache_checked += 1;
        }
        // netjsonconfig reads sidenet's sections and the owner's radio the mesh point uses.
        let view = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(view.path().join("etc/config")).unwrap();
        for p in ["network", "wireless", "firewall", "babeld"] {
            let export: String =
                String::from_utf8_lossy(&uci(&conf, &["export", p], None).stdout).into();
            let all = sections(&export);
            let radio = all
                .iter()
                .find(|(n, _)| n.as_deref() == Some("sidenet_mesh"))
                .and_then(|(_, t)| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("\toption device "))
                        .map(|d| d.trim_matches('\'').to_string())
                });
            let kept: String = all
                .iter()
                .filter(|(n, _)| {
                    n.as_deref().is_some_and(|n| n.starts_with("sidenet_"))
                        || (n.is_some() && *n == radio)
                })
                .map(|(_, t)| format!("\n{t}"))
                .collect();
            std::fs::write(view.path().join("etc/config").join(p), kept).unwrap();
        }
        let out = std::process::Command::new(&python)
            .arg(repo().join("tests/peers/check_openwrt.py"))
            .arg(view.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: netjsonconfig refused the config:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["mesh_id"], "riverside", "{name}: {v}");
        let want = mesh_for(&set, name)
            .spec
            .radio
            .channels
            .get(mesh_for(&set, name).spec.radio.mesh_band)
            .unwrap()
            .channel;
        assert_eq!(v["channel"], want, "{name}: {v}");
        assert_eq!(v["encryption"], "wpa3_personal", "{name}: {v}");
        assert_eq!(
            v["ieee80211w"].to_string().trim_matches('"'),
            "2",
            "{name}: {v}"
        );
        let addrs = v["addresses"].to_string();
        assert!(addrs.contains("fdfc:b395:f348:1c2d::1/64"), "{name}: {v}");
        let ifaces = v["interfaces"].to_string() + &v["networks"].to_string();
        assert!(ifaces.contains("sidenet_mesh"), "{name}: {v}");
        assert!(
            v["zones"].to_string().contains("sidenet_radio"),
            "{name}: {v}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains(PASSPHRASE));
        if peers {
            for link in ["sidenet_peerbbb", "sidenet_peerccc"] {
                assert!(
                    ifaces.contains(link),
                    "{name}: no WireGuard link {link}: {v}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} OpenWrt renders checked");
    assert!(
        cache_checked >= 7,
        "only {cache_checked} cache renders checked"
    );
}

/// A Linux gateway forwards and masquerades side-net traffic out of its uplinks only: the
/// MeshNode's `spec.overrides.uplinks`, else the profile's `wan` ports; with neither, its
/// config is refused with the reason (docs/dataplane.md, "Gateways that route").
#[test]
fn a_linux_gateway_forwards_only_out_of_its_uplinks() {
    let set = set();
    let profile = "raspberrypi-4b-awus036acm";
    let mut mesh = mesh_for(&set, profile);
    mesh.spec
        .policies
        .retain(|p| p.type_ != PolicyType::NoInternet);
    mesh.spec.policies.push(Policy {
        nodes: vec!["golden".into()],
        ..Policy::new(PolicyType::AllowInternet)
    });
    let mut p = set.profiles.get(profile).unwrap().clone();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let firewall = |p: &sidenet_crds::HardwareProfile, uplinks: &[String]| {
        let inputs = NodeInputs {
            mesh: &mesh,
            profile: p,
            id: NODE,
            name: Some("golden"),
            reported_hostname: None,
            role: NodeRole::Gateway,
            channel: None,
            tx_power: None,
            hostname: None,
            uplinks,
            subnet_id: SUBNET,
            passphrase: PASSPHRASE,
            passphrase_next: None,
            labels: None,
        };
        render::context(&inputs).map(|ctx| {
            renderer
                .render("linux", &ctx)
                .unwrap()
                .into_iter()
                .find(|f| f.file.path == "etc/sidenet/firewall.nft")
                .unwrap()
                .file
                .content
        })
    };
    let prefix = &mesh.spec.prefix;
    let fw = firewall(&p, &[]).unwrap();
    assert!(
        fw.contains(&format!(
            "oifname {{ \"eth0\" }} ip6 saddr {prefix} counter name \"internet_out\" accept"
        )),
        "{fw}"
    );
    assert!(
        fw.contains(&format!(
            "oifname {{ \"eth0\" }} ip6 saddr {prefix} masquerade"
        )),
        "{fw}"
    );
    let fw = firewall(&p, &["wlan0".to_string(), "usb0".to_string()]).unwrap();
    assert!(
        fw.contains(&format!(
            "oifname {{ \"wlan0\", \"usb0\" }} ip6 saddr {prefix} masquerade"
        )),
        "{fw}"
    );
    assert!(!fw.contains("\"eth0\""), "{fw}");
    p.spec
        .ethernet
        .retain(|e| e.role != sidenet_crds::PortRole::Wan);
    let e = firewall(&p, &[]).unwrap_err().to_string();
    assert!(
        e.contains("node golden a gateway, but it has no uplink: HardwareProfile/raspberrypi-4b-awus036acm has no ethernet port with role wan and the MeshNode sets no spec.overrides.uplinks"),
        "{e}"
    );
}
