//! Golden tests: every template family × every hardware profile, rendered for the example mesh,
//! compared with the files under `tests/golden/` (reviewed in the diff). Regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p sidenet-controller --test golden`.
//!
//! The OpenWrt renders are also parsed back by OpenWISP's netjsonconfig (an independent
//! implementation of the UCI format, installed by `scripts/test`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::repo;
use sidenet_controller::manifest::{self, ManifestSet};
use sidenet_controller::render::{self, NodeInputs, Renderer};
use sidenet_crds::NodeRole;

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

fn render_profile(set: &ManifestSet, renderer: &Renderer, profile: &str) -> Vec<(String, String)> {
    let p = set.profiles.get(profile).unwrap();
    let mesh = mesh_for(set, profile);
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
    };
    let ctx = render::context(&inputs).unwrap_or_else(|e| panic!("{profile}: {e}"));
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
    for name in set.profiles.keys() {
        for (path, content) in render_profile(&set, &renderer, name) {
            let file = golden.join(name).join(&path);
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
    for (name, p) in &set.profiles {
        if p.spec.firmware != sidenet_crds::FirmwareFamily::Openwrt {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in render_profile(&set, &renderer, name) {
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
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} OpenWrt profiles checked");
}
