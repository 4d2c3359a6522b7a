//! Scheduled mesh passphrase rotation with 50 agents (simulated: real MQTT sessions, keys and
//! checks) behind Mosquitto and the standalone controller: 49 online agents, one offline
//! through the whole rotation. During the overlap every online agent's config carries both
//! passphrases sealed to it (the current one for its mesh point, the next one for a second mesh
//! point); at `switchAt` the controller switches every config to the next passphrase alone; the
//! offline agent comes back after the switch on its old config and converges to the new
//! passphrase without re-enrolling.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Setup, Witness, assert_clean, until};
use sidenet_wire::messages::NodeConfig;

const OLD: &str = "old-passphrase-0123";
const NEW: &str = "new-passphrase-4567";

/// The example mesh, with `rotation` (a `switchAt`) added when given; both passphrases as
/// Secret manifests.
fn write_manifests(s: &Setup, switch_at: Option<u64>) {
    let secrets = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: riverside-mesh\nstringData:\n  passphrase: {OLD}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: riverside-mesh-next\nstringData:\n  passphrase: {NEW}\n"
    );
    std::fs::write(s.path("manifests/secrets.yaml"), secrets).unwrap();
    let mut text =
        std::fs::read_to_string(common::repo().join("examples/riverside/mesh.yaml")).unwrap();
    if let Some(t) = switch_at {
        let old = "    passphraseSecretRef:\n      name: riverside-mesh\n      key: passphrase\n";
        assert!(text.contains(old));
        text = text.replace(
            old,
            &format!(
                "{old}    rotation:\n      nextPassphraseSecretRef:\n        name: riverside-mesh-next\n        key: passphrase\n      switchAt: \"{}\"\n",
                sidenet_controller::rfc3339(t)
            ),
        );
    }
    let tmp = s.path("mesh.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, s.path("manifests/mesh.yaml")).unwrap();
}

/// The passphrases a node's newest config carries, opened with its key: (current, next).
fn passphrases(
    witness: &Witness,
    node: &str,
    key: &sidenet_wire::keys::KeyPair,
) -> Option<(String, Option<String>)> {
    let c: NodeConfig = witness.latest_config(node)?;
    let open = |name: &str| {
        c.sealed.get(name).map(|v| {
            let ctx = sidenet_wire::seal::Context {
                mesh: "riverside",
                node,
                name,
            };
            String::from_utf8(sidenet_wire::seal::open(key, ctx, v).unwrap()).unwrap()
        })
    };
    let next = open("mesh-passphrase-next");
    // The second mesh point's file exists exactly while there is a next passphrase.
    let file = c
        .files
        .iter()
        .find(|f| f.path == "etc/sidenet/wpa_supplicant-mesh-next.conf");
    assert_eq!(
        file.is_some(),
        next.is_some(),
        "{node}: second mesh point file"
    );
    if let Some(f) = file {
        assert!(f.content.contains("@sidenet-secret:mesh-passphrase-next@"));
    }
    Some((open("mesh-passphrase")?, next))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passphrase_rotation_with_an_agent_offline_through_the_switch() {
    let mut s = Setup::new();
    s.agents = 49;
    write_manifests(&s, None);
    let _broker = s.broker();
    s.wait_broker().await;
    let _ctl = s.controller();
    s.wait_controller().await;
    let witness = Witness::start(s.port);
    let key = |seed: u64, i: usize| sidenet_bench::fleet::key(seed, i);

    // The late agent enrols on the old passphrase, then goes offline.
    let late = s.fleet_with(1, 99, None);
    s.converged(&late, Duration::from_secs(60)).await;
    let late_id = late.ids[0].clone();
    let late_rev = late.revision(0);
    late.stop().await;

    let fleet = s.fleet_with(49, 7, None);
    s.converged(&fleet, Duration::from_secs(120)).await;
    for (i, id) in fleet.ids.iter().enumerate() {
        assert_eq!(
            passphrases(&witness, id, &key(7, i)),
            Some((OLD.to_string(), None))
        );
    }

    // The overlap: a switch scheduled an hour ahead. Every online node gets both.
    write_manifests(&s, Some(sidenet_controller::now() + 3600));
    until(
        "every online node carrying both passphrases",
        Duration::from_secs(60),
        || {
            fleet
                .ids
                .iter()
                .enumerate()
                .all(|(i, id)| {
                    passphrases(&witness, id, &key(7, i))
                        == Some((OLD.to_string(), Some(NEW.to_string())))
                })
                .then_some(())
        },
    )
    .await;
    s.converged(&fleet, Duration::from_secs(60)).await;
    let overlap: Vec<u64> = fleet.snapshot();

    // The switch, moved to 3 seconds from now: the controller switches every config then.
    let switch_at = sidenet_controller::now() + 3;
    write_manifests(&s, Some(switch_at));
    until(
        "every online node on the new passphrase alone",
        Duration::from_secs(60),
        || {
            fleet
                .ids
                .iter()
                .enumerate()
                .all(|(i, id)| {
                    passphrases(&witness, id, &key(7, i)) == Some((NEW.to_string(), None))
                })
                .then_some(())
        },
    )
    .await;
    assert!(sidenet_controller::now() >= switch_at, "switched early");
    s.converged(&fleet, Duration::from_secs(60)).await;
    for (i, rev) in fleet.snapshot().iter().enumerate() {
        assert!(*rev > overlap[i], "agent {i} applied the switched config");
    }

    // The late agent comes back after the switch with its old config, gets the new passphrase
    // without enrolling again (same id, revisions continue).
    let late = s.fleet_with(1, 99, None);
    assert_eq!(late.ids[0], late_id);
    s.converged(&late, Duration::from_secs(60)).await;
    assert!(late.revision(0) > late_rev);
    assert_eq!(
        passphrases(&witness, &late_id, &key(99, 0)),
        Some((NEW.to_string(), None))
    );
    assert_clean(&fleet, &witness);
    fleet.stop().await;
    late.stop().await;
}
