//! The radio check against the Linux wireless-regdb, table-driven: each row is a (country,
//! band, channel, width, radio) setting with the verdict wireless-regdb's rules give and the
//! exact message. Every row runs twice:
//!
//! 1. through `validate` (manifest loading), with a MeshNode that names its HardwareProfile;
//! 2. through the reconcile and render path, with the same MeshNode minus `hardwareProfile`,
//!    the profile coming from the node's enrolment request; the controller either renders a
//!    config or blocks the node with exactly the errors `validate` gave.
//!
//! The rules quoted in the comments are wireless-regdb 2026.09.03's db.txt.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use common::repo;
use sidenet_controller::reconcile::core::Controller;
use sidenet_controller::reconcile::render::Renderer;
use sidenet_controller::reconcile::store::Store;
use sidenet_controller::spec::manifest::{self, ManifestSet};
use sidenet_controller::standalone::FsSecrets;
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::EnrollRequest;
use sidenet_wire::{Header, Kind, topics};

const T0: u64 = 1_900_000_000;
const MESH: &str = "riverside";

/// One row. `profile: None` checks the Mesh alone (no node).
struct Case {
    country: &'static str,
    band: &'static str,
    channel: u32,
    width: u32,
    profile: Option<&'static str>,
    channel_override: Option<u32>,
    tx_power: Option<u32>,
    /// Expected errors: (`Mesh` or `MeshNode`, field, message). Empty: allowed.
    expect: &'static [(&'static str, &'static str, &'static str)],
}

const fn case(
    country: &'static str,
    band: &'static str,
    channel: u32,
    width: u32,
    profile: Option<&'static str>,
    expect: &'static [(&'static str, &'static str, &'static str)],
) -> Case {
    Case {
        country,
        band,
        channel,
        width,
        profile,
        channel_override: None,
        tx_power: None,
        expect,
    }
}

const ARCHER: Option<&str> = Some("tplink-archer-c7-v2");
const MT3000: Option<&str> = Some("glinet-gl-mt3000");
const E8450: Option<&str> = Some("linksys-e8450");
const APU2: Option<&str> = Some("pcengines-apu2-wle600vx");
const PI: Option<&str> = Some("raspberrypi-4b-awus036acm");
const AR300M: Option<&str> = Some("glinet-gl-ar300m");
const UNIFI: Option<&str> = Some("ubnt-unifi-ac-lite");
const ASUS: Option<&str> = Some("asus-rt-ax53u");
const OK: &[(&str, &str, &str)] = &[];

fn cases() -> Vec<Case> {
    vec![
        // DE (5150 - 5250 @ 80), (200 mW), NO-OUTDOOR, AUTO-BW: the example mesh.
        case("DE", "5g", 36, 80, ARCHER, OK),
        // Leaky case 1: DE ch140 @ 80 MHz is the block 132-144; 144 (5710-5730 MHz) crosses
        // the end of (5470 - 5725 @ 160) into (5725 - 5875 @ 80), (25 mW).
        case(
            "DE",
            "5g",
            140,
            80,
            ARCHER,
            &[(
                "Mesh",
                "spec.radio.channels.5g.width",
                "80 MHz on channel 140 covers channels 132-144 (5650-5730 MHz), and channel 144 (5710-5730 MHz) is not allowed in DE: it straddles the rules 5470-5725 and 5725-5875 MHz, and no single rule holds it",
            )],
        ),
        // Leaky case 2: US ch165 @ 80 MHz is the block 165-177; 169 crosses 5850 MHz.
        case(
            "US",
            "5g",
            165,
            80,
            MT3000,
            &[(
                "Mesh",
                "spec.radio.channels.5g.width",
                "80 MHz on channel 165 covers channels 165-177 (5815-5895 MHz), and channel 169 (5835-5855 MHz) is not allowed in US: it straddles the rules 5730-5850 and 5850-5895 MHz, and no single rule holds it",
            )],
        ),
        // Leaky case 3: 160 MHz on the Archer C7's QCA9880, which has no VHT160.
        case(
            "DE",
            "5g",
            36,
            160,
            ARCHER,
            &[(
                "MeshNode",
                "spec.hardwareProfile",
                "radio radio0 of HardwareProfile/tplink-archer-c7-v2 supports no mode for 160 MHz on 5g (has HT20, HT40, VHT20, VHT40, VHT80) (Mesh/riverside sets spec.radio.channels.5g: channel 36, width 160 MHz)",
            )],
        ),
        // Leaky case 4: a DFS channel (5250 - 5350 ... DFS) on Debian's ath10k without DFS.
        case(
            "DE",
            "5g",
            52,
            20,
            APU2,
            &[(
                "MeshNode",
                "spec.hardwareProfile",
                "channel 52 needs radar detection (DFS) in DE, and radio wlan0 of HardwareProfile/pcengines-apu2-wle600vx cannot do it (dfs: false) (Mesh/riverside sets spec.radio.channels.5g: channel 52, width 20 MHz)",
            )],
        ),
        // 160 MHz on 36-64 joins two AUTO-BW rules (200 MHz); 52-64 need DFS, which the MT7981 has.
        case("DE", "5g", 36, 160, MT3000, OK),
        case("DE", "5g", 36, 160, E8450, OK),
        // Both problems of a radio are named.
        case(
            "DE",
            "5g",
            36,
            160,
            PI,
            &[
                (
                    "MeshNode",
                    "spec.hardwareProfile",
                    "radio wlan1 of HardwareProfile/raspberrypi-4b-awus036acm supports no mode for 160 MHz on 5g (has HT20, HT40, VHT20, VHT40, VHT80) (Mesh/riverside sets spec.radio.channels.5g: channel 36, width 160 MHz)",
                ),
                (
                    "MeshNode",
                    "spec.hardwareProfile",
                    "channels 52-64 need radar detection (DFS) in DE, and radio wlan1 of HardwareProfile/raspberrypi-4b-awus036acm cannot do it (dfs: false) (Mesh/riverside sets spec.radio.channels.5g: channel 36, width 160 MHz)",
                ),
            ],
        ),
        case(
            "DE",
            "5g",
            36,
            160,
            ASUS,
            &[(
                "MeshNode",
                "spec.hardwareProfile",
                "radio radio1 of HardwareProfile/asus-rt-ax53u supports no mode for 160 MHz on 5g (has HT20, HT40, VHT20, VHT40, VHT80, HE20, HE40, HE80) (Mesh/riverside sets spec.radio.channels.5g: channel 36, width 160 MHz)",
            )],
        ),
        // DE (5470 - 5725 @ 160), (500 mW), DFS.
        case("DE", "5g", 100, 160, E8450, OK),
        case("DE", "5g", 64, 40, ARCHER, OK),
        case("DE", "5g", 60, 80, UNIFI, OK),
        // 132 is in no 160 MHz channel of the 5 GHz channelisation.
        case(
            "DE",
            "5g",
            132,
            160,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.5g.width",
                "no 160 MHz channel on 5g contains channel 132",
            )],
        ),
        // DE (5725 - 5875 @ 80), (25 mW): short-range devices, no flags.
        case("DE", "5g", 149, 80, ARCHER, OK),
        case("DE", "5g", 165, 20, ARCHER, OK),
        case(
            "DE",
            "5g",
            144,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.5g.channel",
                "channel 144 (5710-5730 MHz) is not allowed in DE: it straddles the rules 5470-5725 and 5725-5875 MHz, and no single rule holds it",
            )],
        ),
        // Not on the 5 GHz 20 MHz raster.
        case(
            "DE",
            "5g",
            37,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.5g.channel",
                "channel 37 is not a 20 MHz channel on 5g; expected 32-144 or 149-177 in steps of 4",
            )],
        ),
        // GB (5470 - 5730 @ 160), (500 mW), DFS: 144 is inside it.
        case("GB", "5g", 144, 20, ARCHER, OK),
        // US (5730 - 5850 @ 80), (30), AUTO-BW.
        case("US", "5g", 149, 80, ARCHER, OK),
        // US (5850 - 5895 @ 40), (27), NO-OUTDOOR, AUTO-BW, NO-IR.
        case(
            "US",
            "5g",
            173,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.5g.channel",
                "channel 173 (5855-5875 MHz) is no-initiate-radiation in US (rule 5850-5895 MHz @ 40 MHz, 27 dBm, NO-OUTDOOR, NO-IR, AUTO-BW): a mesh point may not start transmitting there",
            )],
        ),
        case(
            "US",
            "5g",
            149,
            160,
            E8450,
            &[(
                "Mesh",
                "spec.radio.channels.5g.width",
                "160 MHz on channel 149 covers channels 149-177 (5735-5895 MHz), and channel 169 (5835-5855 MHz) is not allowed in US: it straddles the rules 5730-5850 and 5850-5895 MHz, and no single rule holds it",
            )],
        ),
        // JP has no rule above 5730 MHz.
        case(
            "JP",
            "5g",
            149,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.5g.channel",
                "channel 149 (5735-5755 MHz) is not allowed in JP: no rule holds it (JP's 5g rules: 4910-4990, 5170-5250, 5250-5330, 5490-5730 MHz)",
            )],
        ),
        // AU (5470 - 5600 @ 80) and (5650 - 5730 @ 80): 120-128 are left out (weather radar).
        case(
            "AU",
            "5g",
            124,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.5g.channel",
                "channel 124 (5610-5630 MHz) is not allowed in AU: no rule holds it (AU's 5g rules: 5150-5250, 5250-5350, 5470-5600, 5650-5730, 5730-5850, 5850-5875 MHz)",
            )],
        ),
        case(
            "AU",
            "5g",
            116,
            80,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.5g.width",
                "80 MHz on channel 116 covers channels 116-128 (5570-5650 MHz), and channel 120 (5590-5610 MHz) is not allowed in AU: no rule holds it (AU's 5g rules: 5150-5250, 5250-5350, 5470-5600, 5650-5730, 5730-5850, 5850-5875 MHz)",
            )],
        ),
        // AU (5470 - 5600 @ 80) has no AUTO-BW: 80 MHz at most.
        case(
            "AU",
            "5g",
            100,
            160,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.5g.width",
                "channel 100 (5490-5510 MHz) allows at most 80 MHz in AU (rule 5470-5600 MHz @ 80 MHz, 26.98 dBm, DFS), not 160 MHz",
            )],
        ),
        case("AU", "5g", 149, 80, UNIFI, OK),
        // CN (5250 - 5330 @ 80), (23), DFS: not on a radio without radar detection.
        case(
            "CN",
            "5g",
            56,
            20,
            PI,
            &[(
                "MeshNode",
                "spec.hardwareProfile",
                "channel 56 needs radar detection (DFS) in CN, and radio wlan1 of HardwareProfile/raspberrypi-4b-awus036acm cannot do it (dfs: false) (Mesh/riverside sets spec.radio.channels.5g: channel 56, width 20 MHz)",
            )],
        ),
        // The world domain 00 allows no initiating radiation on 5 GHz.
        case(
            "00",
            "5g",
            36,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.5g.channel",
                "channel 36 (5170-5190 MHz) is no-initiate-radiation in 00 (rule 5170-5250 MHz @ 80 MHz, 20 dBm, NO-IR, AUTO-BW): a mesh point may not start transmitting there",
            )],
        ),
        // 2.4 GHz. DE (2400 - 2483.5 @ 40), (100 mW).
        case("DE", "2g", 13, 20, AR300M, OK),
        case("DE", "2g", 6, 40, AR300M, OK),
        case(
            "DE",
            "2g",
            14,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.2g.channel",
                "channel 14 (2474-2494 MHz) is not allowed in DE: no rule holds it (DE's 2g rules: 2400-2483.5 MHz)",
            )],
        ),
        case(
            "DE",
            "2g",
            6,
            160,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.2g.width",
                "width 160 MHz is not possible on 2g; expected one of [20, 40]",
            )],
        ),
        // US (2400 - 2472 @ 40), (30): 12 and 13 are out, 11 with 7 below it is in.
        case(
            "US",
            "2g",
            12,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.2g.channel",
                "channel 12 (2457-2477 MHz) is not allowed in US: no rule holds it (US's 2g rules: 2400-2472 MHz)",
            )],
        ),
        case("US", "2g", 11, 40, AR300M, OK),
        // 9 at 40 MHz is HT40-: channels 5 and 9, both inside the rule.
        case("US", "2g", 9, 40, AR300M, OK),
        // KP (2402 - 2482 @ 20), (20): no 40 MHz.
        case(
            "KP",
            "2g",
            6,
            40,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.2g.width",
                "channel 6 (2427-2447 MHz) allows at most 20 MHz in KP (rule 2402-2482 MHz @ 20 MHz, 20 dBm), not 40 MHz",
            )],
        ),
        // JP (2474 - 2494 @ 20), (20), NO-OFDM: 802.11b only.
        case(
            "JP",
            "2g",
            14,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.2g.channel",
                "channel 14 (2474-2494 MHz) allows only 802.11b in JP (rule 2474-2494 MHz @ 20 MHz, 20 dBm, NO-OFDM); the mesh needs OFDM",
            )],
        ),
        // 6 GHz. DE (5945 - 6425 @ 320), (23), NO-OUTDOOR; US (5925 - 7125 @ 320), (12),
        // NO-OUTDOOR, NO-IR.
        case("DE", "6g", 1, 160, None, OK),
        case(
            "DE",
            "6g",
            97,
            20,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.6g.channel",
                "channel 97 (6425-6445 MHz) is not allowed in DE: no rule holds it (DE's 6g rules: 5945-6425 MHz)",
            )],
        ),
        case(
            "US",
            "6g",
            37,
            80,
            None,
            &[(
                "Mesh",
                "spec.radio.channels.6g.channel",
                "channel 37 (6125-6145 MHz) is no-initiate-radiation in US (rule 5925-7125 MHz @ 320 MHz, 12 dBm, NO-OUTDOOR, NO-IR): a mesh point may not start transmitting there",
            )],
        ),
        // Overrides: the node's channel with the mesh's width, and its tx power.
        Case {
            channel_override: Some(140),
            ..case(
                "DE",
                "5g",
                36,
                80,
                ARCHER,
                &[(
                    "MeshNode",
                    "spec.overrides.channel",
                    "80 MHz on channel 140 covers channels 132-144 (5650-5730 MHz), and channel 144 (5710-5730 MHz) is not allowed in DE: it straddles the rules 5470-5725 and 5725-5875 MHz, and no single rule holds it",
                )],
            )
        },
        Case {
            channel_override: Some(140),
            ..case("US", "5g", 36, 80, ARCHER, OK)
        },
        Case {
            channel_override: Some(177),
            ..case(
                "DE",
                "5g",
                36,
                80,
                ARCHER,
                &[(
                    "MeshNode",
                    "spec.overrides.channel",
                    "channel 177 is not supported by radio radio0 of HardwareProfile/tplink-archer-c7-v2",
                )],
            )
        },
        Case {
            channel_override: Some(100),
            ..case(
                "DE",
                "5g",
                36,
                80,
                PI,
                &[(
                    "MeshNode",
                    "spec.overrides.channel",
                    "channels 100-112 need radar detection (DFS) in DE, and radio wlan1 of HardwareProfile/raspberrypi-4b-awus036acm cannot do it (dfs: false)",
                )],
            )
        },
        // 23 dBm is within 200 mW (23.01 dBm); 24 is above the radio's maximum.
        Case {
            tx_power: Some(23),
            ..case("DE", "5g", 36, 80, ARCHER, OK)
        },
        Case {
            tx_power: Some(24),
            ..case(
                "DE",
                "5g",
                36,
                80,
                ARCHER,
                &[(
                    "MeshNode",
                    "spec.overrides.txPower",
                    "24 dBm is above the maximum of radio radio0 (23 dBm)",
                )],
            )
        },
        // DE (5250 - 5350 @ 80), (100 mW): 20 dBm.
        Case {
            tx_power: Some(21),
            ..case(
                "DE",
                "5g",
                52,
                80,
                ARCHER,
                &[(
                    "MeshNode",
                    "spec.overrides.txPower",
                    "21 dBm is above the limit in DE for channel 52 at 80 MHz (channels 52-64 (5250-5330 MHz)): 20 dBm EIRP (rule 5250-5350 MHz @ 80 MHz, 20 dBm, NO-OUTDOOR, DFS, AUTO-BW)",
                )],
            )
        },
        // DE (5725 - 5875 @ 80), (25 mW) is 13.97 dBm: 14 dBm is too much.
        Case {
            tx_power: Some(14),
            ..case(
                "DE",
                "5g",
                149,
                20,
                ARCHER,
                &[(
                    "MeshNode",
                    "spec.overrides.txPower",
                    "14 dBm is above the limit in DE for channel 149 at 20 MHz (channel 149 (5735-5755 MHz)): 13.97 dBm EIRP (rule 5725-5875 MHz @ 80 MHz, 13.97 dBm)",
                )],
            )
        },
        Case {
            tx_power: Some(13),
            ..case("DE", "5g", 149, 20, ARCHER, OK)
        },
        // US (5150 - 5250 @ 80), (23), AUTO-BW.
        Case {
            tx_power: Some(23),
            ..case("US", "5g", 36, 80, E8450, OK)
        },
    ]
}

fn mesh_yaml(c: &Case) -> String {
    format!(
        "apiVersion: sidenet.io/v1alpha1
kind: Mesh
metadata:
  name: {MESH}
spec:
  prefix: fdfc:b395:f348::/48
  radio:
    country: \"{}\"
    meshBand: {}
    channels:
      {}:
        channel: {}
        width: {}
  encryption:
    passphraseSecretRef:
      name: riverside-mesh
      key: passphrase
  enrollment:
    mode: auto
",
        c.country, c.band, c.band, c.channel, c.width
    )
}

fn node_yaml(c: &Case, id: &str, with_profile: bool) -> String {
    let mut s = format!(
        "apiVersion: sidenet.io/v1alpha1
kind: MeshNode
metadata:
  name: probe
spec:
  mesh: {MESH}
  nodeId: {id}
  approved: true
"
    );
    if with_profile && let Some(p) = c.profile {
        s.push_str(&format!("  hardwareProfile: {p}\n"));
    }
    s.push_str("  overrides:\n    hostname: probe\n");
    if let Some(ch) = c.channel_override {
        s.push_str(&format!("    channel: {ch}\n"));
    }
    if let Some(p) = c.tx_power {
        s.push_str(&format!("    txPower: {p}\n"));
    }
    s
}

/// The shipped profiles, their radios as they are, but every one on the `linux` family: on
/// OpenWrt the guest rules (the mesh point rides the owner's radio: no channel or txPower
/// overrides, `controller/tests/openwrt.rs`) would refuse override rows before the regulatory
/// checks these rows are about.
fn profiles() -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(repo().join("hardware-profiles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .unwrap()
                .replace("firmware: openwrt", "firmware: linux");
            (p, text)
        })
        .collect();
    out.sort();
    out
}

fn load(c: &Case, id: &str, with_profile: bool) -> Result<ManifestSet, Vec<String>> {
    let mut texts = vec![(PathBuf::from("mesh.yaml"), mesh_yaml(c))];
    if c.profile.is_some() {
        texts.push((PathBuf::from("node.yaml"), node_yaml(c, id, with_profile)));
    }
    texts.extend(profiles());
    manifest::load_texts(&texts).map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
}

fn expected(c: &Case) -> Vec<String> {
    c.expect
        .iter()
        .map(|(object, field, message)| match *object {
            "Mesh" => format!("mesh.yaml: document 1 (Mesh/{MESH}): {field}: {message}"),
            _ => format!("node.yaml: document 1 (MeshNode/probe): {field}: {message}"),
        })
        .collect()
}

fn label(c: &Case) -> String {
    format!(
        "{} {} channel {} at {} MHz on {:?} (override {:?}, txPower {:?})",
        c.country, c.band, c.channel, c.width, c.profile, c.channel_override, c.tx_power
    )
}

/// The reconcile path: the node enrols asking for its profile, and the controller either
/// renders its config or blocks it with a reason.
fn render_verdict(c: &Case, key: &KeyPair, set: ManifestSet) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb"), 5).unwrap();
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let mut ctl = Controller::new(store, renderer, Box::new(FsSecrets::new(dir.path())));
    ctl.set_manifests(set, T0).unwrap();
    ctl.flush().unwrap();
    let id = key.public().node_id();
    let body = EnrollRequest {
        hostname: "probe".into(),
        profile: c.profile.map(str::to_string),
        backend: "openwrt".into(),
        agent_version: "test".into(),
        ..Default::default()
    };
    let header = Header {
        mesh: MESH.into(),
        node: Some(id.clone()),
        epoch: 5,
        rev: 1,
        iat: T0,
        exp: T0 + 600,
        len: 0,
        sha256: String::new(),
    };
    let env = seal(
        Kind::Enroll,
        header,
        &serde_json::to_vec(&body).unwrap(),
        key,
    );
    ctl.on_message(&topics::enroll(MESH, &id), &env, T0)
        .unwrap();
    ctl.flush().unwrap();
    ctl.preview(&id).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn radio_settings_against_wireless_regdb() {
    let cases = cases();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let key = KeyPair::from_seed(&[7; 32]);
    let id = key.public().node_id();
    let mut failures = Vec::new();
    for c in &cases {
        let want = expected(c);
        // 1. validate
        let got = match load(c, &id, true) {
            Ok(_) => Vec::new(),
            Err(e) => e,
        };
        if got != want {
            failures.push(format!(
                "validate, {}:\n  want {want:#?}\n  got  {got:#?}",
                label(c)
            ));
            continue;
        }
        // 2. reconcile and render, the profile known only from the enrolment.
        if c.profile.is_none() {
            continue;
        }
        let node_level = c.expect.iter().all(|(object, _, _)| *object == "MeshNode");
        if !node_level {
            // A Mesh the rules refuse never loads: the controller keeps its last good set.
            assert!(load(c, &id, false).is_err(), "{}", label(c));
            continue;
        }
        let set = load(c, &id, false)
            .unwrap_or_else(|e| panic!("{}: without hardwareProfile: {e:?}", label(c)));
        let verdict = render_verdict(c, &key, set);
        let want = if want.is_empty() {
            Ok(())
        } else {
            Err(want.join("\n"))
        };
        if verdict != want {
            failures.push(format!(
                "render, {}:\n  want {want:#?}\n  got  {verdict:#?}",
                label(c)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A node known only from its enrolment (no MeshNode): the problem is reported on the Mesh
/// document, at the Mesh's field, naming the node and its profile.
#[test]
fn enrolled_node_without_meshnode_is_blocked_on_the_mesh_field() {
    let c = case("DE", "5g", 36, 160, ARCHER, OK);
    let key = KeyPair::from_seed(&[9; 32]);
    let id = key.public().node_id();
    let mut texts = vec![(PathBuf::from("mesh.yaml"), mesh_yaml(&c))];
    texts.extend(profiles());
    let set = manifest::load_texts(&texts).unwrap();
    let verdict = render_verdict(&c, &key, set);
    assert_eq!(
        verdict,
        Err(format!(
            "mesh.yaml: document 1 (Mesh/{MESH}): spec.radio.channels.5g.width: node {id} (HardwareProfile/tplink-archer-c7-v2): radio radio0 of HardwareProfile/tplink-archer-c7-v2 supports no mode for 160 MHz on 5g (has HT20, HT40, VHT20, VHT40, VHT80)"
        ))
    );
}

/// An unknown country is refused with every code the database has.
#[test]
fn unknown_country_lists_the_database() {
    let c = case("ZZ", "5g", 36, 20, None, OK);
    let err = load(&c, "x", true).unwrap_err();
    let codes: Vec<&str> = sidenet_regdb::countries()
        .iter()
        .map(|c| c.alpha2)
        .collect();
    assert_eq!(
        err,
        vec![format!(
            "mesh.yaml: document 1 (Mesh/{MESH}): spec.radio.country: \"ZZ\" is not a country in wireless-regdb {}; known: {}",
            sidenet_regdb::source().version,
            codes.join(", ")
        )]
    );
}
