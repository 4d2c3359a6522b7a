//! The neighbourhood web cache (issue 22, `docs/content.md`), as the controller renders it.
//!
//! - Every hardware profile that gives the cache storage, on both template families, renders a
//!   `squid.conf` for the example mesh with the cache on, in three variants (siblings and an
//!   IPv4 LAN; public content only with an IPv6 LAN; no siblings and no LAN). Each is compared
//!   with its golden file under `tests/golden-cache/` (regenerate with `UPDATE_GOLDEN=1`) and
//!   checked by Debian's Squid: `squid -k parse -f FILE` (acceptance 1). Squid comes from
//!   `scripts/install-peers`; the test fails when it is missing.
//! - Nodes without the cache (mesh off, profile without storage, MeshNode opt-out) get no
//!   `squid.conf`, no `restart:squid` and no squid requirement; nodes with it get all three.
//! - Wrong cache settings are manifest errors naming the file, document, object and field.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::repo;
use sidenet_controller::reconcile::cache::{self, SiblingCtx};
use sidenet_controller::reconcile::core::build_config_with;
use sidenet_controller::reconcile::peers::Dataplane;
use sidenet_controller::reconcile::render::{NodeInputs, Renderer};
use sidenet_controller::spec::manifest::{self, ManifestSet};
use sidenet_crds::{Mesh, MeshCache, MeshNode, NodeCache, NodeRole};
use sidenet_wire::messages::NodeConfig;

const NODE: &str = "cachenode2345678";
const SUBNET: u16 = 0x0c0c;

fn set() -> ManifestSet {
    manifest::load(&[
        repo().join("examples/riverside/mesh.yaml"),
        repo().join("hardware-profiles"),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The example mesh with the cache on, moved to 2.4 GHz for devices without a 5 GHz mesh radio.
fn mesh(set: &ManifestSet, profile: &str, public_only: bool) -> Mesh {
    let mut mesh = set.meshes.get("riverside").unwrap().clone();
    if set.profiles[profile]
        .spec
        .mesh_radio(mesh.spec.radio.mesh_band)
        .is_none()
    {
        mesh.spec.radio.mesh_band = sidenet_crds::Band::TwoG;
    }
    mesh.spec.cache = Some(MeshCache {
        enabled: true,
        public_only,
        max_object_mb: None,
    });
    mesh
}

fn meshnode(cache: Option<NodeCache>) -> MeshNode {
    let mut m: MeshNode = sidenet_crds::yaml::from_str(&format!(
        "apiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata:\n  name: cachenode\nspec:\n  mesh: riverside\n  nodeId: {NODE}\n"
    ))
    .unwrap();
    m.spec.cache = cache;
    m
}

fn siblings() -> Vec<SiblingCtx> {
    vec![
        SiblingCtx {
            node: "peerbbbbbbbbbbbb".into(),
            name: "kitchen".into(),
            address: "fdfc:b395:f348:1::1".into(),
        },
        SiblingCtx {
            node: "peercccccccccccc".into(),
            name: "attic".into(),
            address: "fdfc:b395:f348:2a::1".into(),
        },
    ]
}

/// Renders the node on `profile` with `mesh` and `node`, with `siblings` when it runs the cache.
fn render(
    renderer: &Renderer,
    set: &ManifestSet,
    profile: &str,
    mesh: &Mesh,
    node: &MeshNode,
    siblings: Vec<SiblingCtx>,
) -> NodeConfig {
    let p = &set.profiles[profile];
    let inputs = NodeInputs {
        mesh,
        profile: p,
        id: NODE,
        name: Some("cachenode"),
        reported_hostname: None,
        role: NodeRole::Router,
        channel: None,
        tx_power: None,
        hostname: None,
        uplinks: &[],
        subnet_id: SUBNET,
        passphrase: "cache passphrase 1",
        passphrase_next: None,
        labels: None,
    };
    let mut dp = Dataplane::for_node(NODE);
    dp.cache = cache::node_cache(mesh, Some(node), Some(p)).map(|mut c| {
        c.siblings = siblings;
        c
    });
    build_config_with(renderer, &inputs, Some(dp)).unwrap_or_else(|e| panic!("{profile}: {e}"))
}

fn squid_conf(config: &NodeConfig) -> Option<&str> {
    config
        .files
        .iter()
        .find(|f| f.path == "etc/sidenet/squid.conf")
        .map(|f| f.content.as_str())
}

fn squid() -> PathBuf {
    ["/usr/sbin/squid", "/usr/bin/squid"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("Debian's squid is missing: run scripts/install-peers")
}

/// `squid -k parse -f FILE`: its exit status and what it said about problems.
fn parse(file: &Path) -> Result<(), String> {
    let out = Command::new(squid())
        .args(["-k", "parse", "-f"])
        .arg(file)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Squid 5 reports unknown directives and bad values as ERROR or WARNING lines and may
    // still exit 0: count those as failures too.
    let bad: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("FATAL") || l.contains("WARNING"))
        .collect();
    if out.status.success() && bad.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {:?}\n{said}", file.display(), out.status))
    }
}

/// The check itself: Squid 5 exits 0 after some errors, and `parse` still refuses them.
#[test]
fn the_parse_check_refuses_what_squid_complains_about() {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "unknown-acl-type.conf",
            "acl both anyof a b\nhttp_port 3128\n",
        ),
        (
            "two-headers.conf",
            "acl x req_header Cookie .\nacl x req_header Authorization .\nhttp_port 3128\n",
        ),
        (
            "unknown-user.conf",
            "http_port 3128\ncache_effective_user sidenet-no-such-user\n",
        ),
    ] {
        let f = d.path().join(name);
        std::fs::write(&f, text).unwrap();
        assert!(parse(&f).is_err(), "{name} passed the parse check");
    }
    let ok = d.path().join("ok.conf");
    std::fs::write(&ok, "http_port 3128\nhttp_access deny all\n").unwrap();
    parse(&ok).unwrap();
}

#[test]
fn every_rendered_squid_conf_matches_its_golden_file_and_passes_squid_parse() {
    let set = set();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let golden = repo().join("controller/tests/golden-cache");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let with_cache: Vec<&String> = set
        .profiles
        .iter()
        .filter(|(_, p)| p.spec.cache.is_some())
        .map(|(n, _)| n)
        .collect();
    let families: std::collections::BTreeSet<&str> = with_cache
        .iter()
        .map(|n| set.profiles[*n].spec.firmware.as_str())
        .collect();
    assert_eq!(
        families.into_iter().collect::<Vec<_>>(),
        ["linux", "openwrt"],
        "profiles with cache storage on both families: {with_cache:?}"
    );
    let v4_lan = NodeCache {
        lan: vec!["192.168.1.1/24".into()],
        ..NodeCache::default()
    };
    let v6_lan = NodeCache {
        lan: vec!["fd12:3456:789a::1/64".into(), "10.8.0.1/16".into()],
        public_only: Some(true),
        ..NodeCache::default()
    };
    let mut checked = Vec::new();
    let mut mismatches = Vec::new();
    let scratch = tempfile::tempdir().unwrap();
    for name in &with_cache {
        let variants = [
            (
                "siblings",
                mesh(&set, name, false),
                Some(v4_lan.clone()),
                siblings(),
            ),
            (
                "public-only",
                mesh(&set, name, false),
                Some(v6_lan.clone()),
                siblings()[..1].to_vec(),
            ),
            ("alone", mesh(&set, name, true), None, Vec::new()),
        ];
        for (variant, mesh, node_cache, sibs) in variants {
            let config = render(&renderer, &set, name, &mesh, &meshnode(node_cache), sibs);
            let text = squid_conf(&config)
                .unwrap_or_else(|| panic!("{name}/{variant}: no squid.conf"))
                .to_string();
            assert!(config.actions.iter().any(|a| a == "restart:squid"));
            assert!(
                config
                    .requires
                    .iter()
                    .any(|r| r.package == "squid" && r.program == "squid")
            );
            let file = golden.join(format!("{name}.{variant}.conf"));
            if update {
                std::fs::create_dir_all(&golden).unwrap();
                std::fs::write(&file, &text).unwrap();
            } else if std::fs::read_to_string(&file).ok().as_deref() != Some(text.as_str()) {
                mismatches.push(file.display().to_string());
            }
            let tmp = scratch.path().join(format!("{name}.{variant}.conf"));
            std::fs::write(&tmp, &text).unwrap();
            parse(&tmp).unwrap_or_else(|e| panic!("squid -k parse refuses {name}/{variant}: {e}"));
            checked.push(format!("{name}/{variant}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "rendered squid.conf differs from its golden file (UPDATE_GOLDEN=1 to regenerate, then review the diff): {mismatches:?}"
    );
    println!(
        "squid -k parse accepted {} configs: {checked:?}",
        checked.len()
    );
    assert!(checked.len() >= 12, "{checked:?}");
}

/// The rules that make the cache safe, read back from a rendered file.
#[test]
fn the_rendered_rules_keep_siblings_to_hits_and_listen_only_where_they_should() {
    let set = set();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let profile = "raspberrypi-4b-awus036acm";
    let node = meshnode(Some(NodeCache {
        lan: vec!["192.168.1.1/24".into()],
        ..NodeCache::default()
    }));
    let config = render(
        &renderer,
        &set,
        profile,
        &mesh(&set, profile, false),
        &node,
        siblings(),
    );
    let text = squid_conf(&config).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    let own =
        sidenet_controller::spec::ipam::node_address("fdfc:b395:f348::".parse().unwrap(), SUBNET);
    // Listens on the side-net address and the LAN address only.
    let ports: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("http_port"))
        .collect();
    assert_eq!(
        ports,
        [
            &&*format!("http_port [{own}]:3128"),
            &"http_port 192.168.1.1:3128"
        ]
    );
    assert!(lines.contains(&&*format!("udp_incoming_address {own}")));
    // Siblings over side-net addresses only, proxy-only, ICP.
    let peers: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("cache_peer "))
        .collect();
    assert_eq!(peers.len(), 2);
    for (p, s) in peers.iter().zip(siblings()) {
        assert_eq!(
            **p,
            format!(
                "cache_peer {} sibling 3128 3130 proxy-only no-digest name={}",
                s.address, s.node
            )
        );
    }
    // Misses are denied to siblings before anything allows them; LAN and siblings only.
    let miss: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("miss_access"))
        .collect();
    assert_eq!(
        miss,
        [&"miss_access deny siblings", &"miss_access allow all"]
    );
    let access: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("http_access"))
        .collect();
    assert_eq!(access.last().unwrap(), &&"http_access deny all");
    assert!(access.contains(&&"http_access allow lan"));
    assert!(access.contains(&&"http_access deny siblings CONNECT"));
    assert!(lines.contains(&"acl lan src 192.168.1.0/24"));
    assert!(lines.contains(&"cache_dir ufs /var/spool/sidenet-squid/cache 2048 16 256"));
    assert!(lines.contains(&"cache_mem 64 MB"));
    assert!(lines.contains(&"access_log none"));
}

#[test]
fn nodes_without_the_cache_get_no_squid() {
    let set = set();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let with = "raspberrypi-4b-awus036acm";
    let without = set
        .profiles
        .iter()
        .find(|(_, p)| p.spec.cache.is_none() && p.spec.firmware.as_str() == "linux")
        .map(|(n, _)| n.clone());
    let mut off = mesh(&set, with, false);
    off.spec.cache = None;
    let opted_out = meshnode(Some(NodeCache {
        enabled: Some(false),
        ..NodeCache::default()
    }));
    let mut cases = vec![
        ("mesh without cache", off, meshnode(None), with.to_string()),
        (
            "MeshNode opts out",
            mesh(&set, with, false),
            opted_out,
            with.to_string(),
        ),
    ];
    if let Some(w) = without {
        cases.push((
            "profile without storage",
            mesh(&set, &w, false),
            meshnode(None),
            w,
        ));
    }
    let openwrt_without = set
        .profiles
        .iter()
        .find(|(_, p)| p.spec.cache.is_none() && p.spec.firmware.as_str() == "openwrt")
        .map(|(n, _)| n.clone())
        .unwrap();
    cases.push((
        "OpenWrt profile without storage",
        mesh(&set, &openwrt_without, false),
        meshnode(None),
        openwrt_without,
    ));
    for (what, mesh, node, profile) in cases {
        let config = render(&renderer, &set, &profile, &mesh, &node, siblings());
        assert!(squid_conf(&config).is_none(), "{what}");
        assert!(
            !config.actions.iter().any(|a| a == "restart:squid"),
            "{what}"
        );
        assert!(
            !config.requires.iter().any(|r| r.package == "squid"),
            "{what}"
        );
    }
}

#[test]
fn wrong_cache_settings_name_file_document_and_field() {
    let mesh = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap();
    let node = |cache: &str| {
        format!(
            "apiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata:\n  name: n1\nspec:\n  mesh: riverside\n  nodeId: {NODE}\n  cache:\n{cache}"
        )
    };
    let profile = std::fs::read_to_string(repo().join("hardware-profiles/netgear-r7800.yaml"))
        .unwrap()
        .replace("dir: /mnt/sda1/sidenet-squid", "dir: /mnt/sda1/../x");
    let cases = [
        (
            node("    lan: [\"192.168.1.1\"]\n"),
            "nodes.yaml: document 1 (MeshNode/n1): spec.cache.lan[0]: \"192.168.1.1\" has no prefix length",
        ),
        (
            node("    lan: [\"fdfc:b395:f348:5::1/64\"]\n"),
            "spec.cache.lan[0]: fdfc:b395:f348:5::1 is inside the mesh prefix fdfc:b395:f348::/48",
        ),
        (
            node("    lan: [\"192.168.1.1/24\", \"10.0.0.0/8\"]\n"),
            "spec.cache.lan[1]: 10.0.0.0/8 is the subnet's network address",
        ),
        (node("    enabled: maybe\n"), "spec.cache.enabled"),
        (node("    sizeMb: 5\n"), "spec.cache"),
    ];
    for (text, want) in cases {
        let e = manifest::load_texts(&[
            (PathBuf::from("mesh.yaml"), mesh.clone()),
            (PathBuf::from("nodes.yaml"), text),
        ])
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(e.contains(want), "want {want:?} in:\n{e}");
    }
    let e = manifest::load_texts(&[
        (PathBuf::from("mesh.yaml"), mesh),
        (PathBuf::from("r7800.yaml"), profile),
    ])
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("r7800.yaml: document 1 (HardwareProfile/netgear-r7800): spec.cache.dir: \"/mnt/sda1/../x\" contains '..'"),
        "{e}"
    );
}
