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
use sidenet_controller::reconcile::peers::{self, Dataplane, GatewayCtx, PeerCtx};
use sidenet_controller::reconcile::render::{self, NodeInputs, Renderer};
use sidenet_controller::spec::manifest::{self, ManifestSet};
use sidenet_crds::{NodeRole, Policy, PolicyType};

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
    dp
}

fn render_variant(
    set: &ManifestSet,
    renderer: &Renderer,
    profile: &str,
    with_peers: bool,
) -> Vec<(String, String)> {
    let p = set.profiles.get(profile).unwrap();
    let mut mesh = mesh_for(set, profile);
    if with_peers {
        mesh.spec
            .policies
            .retain(|p| p.type_ != PolicyType::NoInternet);
        mesh.spec.policies.push(Policy {
            type_: PolicyType::AllowInternet,
            nodes: vec!["golden".into()],
            rate_kbit: None,
        });
    }
    let inputs = NodeInputs {
        mesh: &mesh,
        profile: p,
        id: NODE,
        name: Some("golden"),
        reported_hostname: None,
        role: NodeRole::Router,
        channel: None,
        tx_power: Some(17),
        hostname: None,
        subnet_id: SUBNET,
        passphrase: PASSPHRASE,
        passphrase_next: None,
    };
    let mut ctx = render::context(&inputs).unwrap_or_else(|e| panic!("{profile}: {e}"));
    if with_peers {
        ctx.dataplane = sample_dataplane();
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
    if manifest::mesh_radio(&p.spec, mesh.spec.radio.mesh_band).is_none() {
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

#[test]
fn openwrt_renders_parse_back_with_netjsonconfig() {
    let set = set();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let python = common::peer_python();
    let mut checked = 0;
    let openwrt = set
        .profiles
        .iter()
        .filter(|(_, p)| p.spec.firmware == sidenet_crds::FirmwareFamily::Openwrt)
        .map(|(n, _)| (n.clone(), false));
    let with_peers = WITH_PEERS
        .iter()
        .filter(|n| set.profiles[**n].spec.firmware == sidenet_crds::FirmwareFamily::Openwrt)
        .map(|n| (n.to_string(), true));
    for (name, peers) in openwrt.chain(with_peers) {
        let name = &name;
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in render_variant(&set, &renderer, name, peers) {
            // What lands on the router: the agent fills in its WireGuard private key.
            let content = content.replace(
                "@sidenet-wireguard-private-key@",
                "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=",
            );
            let f = dir.path().join(path);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, content).unwrap();
        }
        let out = std::process::Command::new(&python)
            .arg(repo().join("tests/peers/check_openwrt.py"))
            .arg(dir.path())
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
        assert!(ifaces.contains("sidenet"), "{name}: {v}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains(PASSPHRASE));
        if peers {
            for link in ["sn_peerbbbbbbbb", "sn_peercccccccc"] {
                assert!(
                    ifaces.contains(link),
                    "{name}: no WireGuard link {link}: {v}"
                );
            }
            assert!(
                v["zones"].to_string().contains("sidenet_radio"),
                "{name}: {v}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} OpenWrt renders checked");
}
