//! Board detection against recorded real outputs (`controller/tests/fixtures/boards`: OpenWrt
//! `ubus call system board` from several devices, Debian os-release and `uname -m`), matched to
//! the shipped hardware profiles. The probe script itself runs in a local shell with `ubus` and
//! `uname` stand-ins that print the recorded outputs, as the device's own commands would.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sidenet_crds::HardwareProfile;
use sidenet_provision::detect::{DetectError, Facts, match_profile, probe_script};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixtures() -> PathBuf {
    repo().join("controller/tests/fixtures/boards")
}

fn profiles() -> Vec<HardwareProfile> {
    sidenet_controller::spec::manifest::load(&[repo().join("hardware-profiles")])
        .unwrap()
        .profiles
        .into_values()
        .collect()
}

/// The fixture table of the fixtures' README: file → profile it must match.
fn expected() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(fixtures().join("README.md")).unwrap();
    readme
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                cols[1].trim_matches('`').to_string(),
                cols[2].trim_matches('`').to_string(),
            )
        })
        .collect()
}

fn script(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs the real probe in a shell whose `ubus` and `uname` print the recorded outputs, with
/// files read under an empty root.
fn probe(ubus: Option<&Path>, os_release: Option<&Path>, uname_m: Option<&Path>) -> Facts {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    match ubus {
        Some(f) => script(
            &bin,
            "ubus",
            &format!(
                "[ \"$*\" = 'call system board' ] && exec cat '{}'\nexit 1",
                f.display()
            ),
        ),
        // No ubus on a Linux host.
        None => script(&bin, "ubus", "exit 127"),
    }
    if let Some(u) = uname_m {
        script(
            &bin,
            "uname",
            &format!("[ \"$1\" = -m ] && exec cat '{}'\nexit 1", u.display()),
        );
    }
    if let Some(o) = os_release {
        std::fs::copy(o, root.join("etc/os-release")).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(probe_script(&root.display().to_string()))
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(out.status.success());
    Facts::from_probe(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn recorded_boards_match_the_shipped_profiles() {
    let profiles = profiles();
    let table = expected();
    assert!(table.len() >= 12, "{table:?}");
    let mut checked = 0;
    for (file, want) in &table {
        let path = fixtures().join(file);
        let facts = if file.ends_with(".json") {
            probe(Some(&path), None, None)
        } else if let Some(stem) = file.strip_suffix(".os-release") {
            probe(
                None,
                Some(&path),
                Some(&fixtures().join(format!("{stem}.uname-m"))),
            )
        } else {
            // `.uname-m` rows are read together with their os-release.
            continue;
        };
        let got = match_profile(&facts, &profiles, None, "/")
            .unwrap_or_else(|e| panic!("{file}: {e}\n{facts:?}"));
        assert_eq!(got.metadata.name.as_deref(), Some(want.as_str()), "{file}");
        if file.ends_with(".json") {
            let recorded: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert_eq!(facts.board_name.as_deref(), recorded["board_name"].as_str());
            assert_eq!(facts.model.as_deref(), recorded["model"].as_str());
            assert!(facts.is_openwrt());
            assert_eq!(facts.summary(), recorded["board_name"].as_str().unwrap());
        } else {
            assert_eq!(facts.os_id.as_deref(), Some("debian"));
            assert!(!facts.is_openwrt());
        }
        // Naming the right profile explicitly is accepted too.
        assert!(
            match_profile(&facts, &profiles, Some(want), "/").is_ok(),
            "{file}"
        );
        checked += 1;
    }
    assert_eq!(checked, 10, "8 OpenWrt boards and 2 Debian hosts");
}

#[test]
fn a_board_without_a_profile_names_the_closest() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("tplink-archer-c7-v2.json"))
        .unwrap()
        .replace("tplink,archer-c7-v2", "tplink,archer-c7-v5")
        .replace("TP-Link Archer C7 v2", "TP-Link Archer C7 v5");
    let f = tmp.path().join("c7v5.json");
    std::fs::write(&f, text).unwrap();
    let facts = probe(Some(&f), None, None);
    let e = match_profile(&facts, &profiles(), None, "/")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with(
            "board tplink,archer-c7-v5 (TP-Link Archer C7 v5) has no hardware profile; closest: tplink-archer-c7-v2 (tplink,archer-c7-v2)"
        ),
        "{e}"
    );
}

#[test]
fn a_linux_host_of_another_architecture_has_no_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let u = tmp.path().join("uname");
    std::fs::write(&u, "armv7l\n").unwrap();
    let facts = probe(
        None,
        Some(&fixtures().join("raspberrypi-4b-awus036acm.os-release")),
        Some(&u),
    );
    let e = match_profile(&facts, &profiles(), None, "/").err().unwrap();
    assert!(matches!(e, DetectError::NoLinuxProfile { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.starts_with("Debian GNU/Linux 12 (bookworm) on armv7l has no hardware profile")
            && e.contains("raspberrypi-4b-awus036acm (aarch64)"),
        "{e}"
    );
}

#[test]
fn a_named_profile_is_checked_against_the_host() {
    let profiles = profiles();
    let r7800 = probe(Some(&fixtures().join("netgear-r7800.json")), None, None);
    let e = match_profile(&r7800, &profiles, Some("tplink-archer-c7-v2"), "/")
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        e,
        "hardware profile tplink-archer-c7-v2 does not fit this host: the host reports board netgear,r7800, the profile lists tplink,archer-c7-v2"
    );
    let e = match_profile(&r7800, &profiles, Some("netgear-r7900"), "/")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with("hardware profile \"netgear-r7900\" does not exist; closest: netgear-r7800"),
        "{e}"
    );
    let pi = probe(
        None,
        Some(&fixtures().join("raspberrypi-4b-awus036acm.os-release")),
        Some(&fixtures().join("raspberrypi-4b-awus036acm.uname-m")),
    );
    let e = match_profile(&pi, &profiles, Some("pcengines-apu2-wle600vx"), "/")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("the host runs aarch64, the profile is for cpuArch x86_64"),
        "{e}"
    );
    let e = match_profile(&pi, &profiles, Some("netgear-r7800"), "/")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("it is an OpenWrt profile, but the host runs Debian GNU/Linux 12"),
        "{e}"
    );
}
