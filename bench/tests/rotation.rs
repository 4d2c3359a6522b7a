//! Mesh signing key rotation with 50 agents (simulated: real MQTT sessions, keys and checks)
//! behind Mosquitto and the standalone controller: 49 online agents, one offline through the
//! whole rotation and its overlap. The online ones switch to the new key without re-enrolling;
//! after the overlap a config signed by the old key is refused; the offline one comes back
//! with only the old key pinned, follows the endorsement and converges.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Setup, Witness, assert_clean, until};
use sidenet_controller::admin::{self, Request, Response};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_key_rotation_with_an_agent_offline_through_the_overlap() {
    let mut s = Setup::new();
    s.agents = 49;
    let _broker = s.broker();
    s.wait_broker().await;
    let _ctl = s.controller();
    s.wait_controller().await;
    let witness = Witness::start(s.port);
    let old = s.mesh_key();

    // The late agent: enrolled with the old key pinned (as provisioning pins it), then offline.
    let late = s.fleet_with(1, 99, Some(old));
    s.converged(&late, Duration::from_secs(60)).await;
    let late_id = late.ids[0].clone();
    let late_rev = late.revision(0);
    late.stop().await;

    let fleet = s.fleet_with(49, 7, Some(old));
    s.converged(&fleet, Duration::from_secs(120)).await;
    let before: Vec<u64> = fleet.snapshot();
    let ids_before = fleet.ids.clone();

    // Keep a copy of the old secret key: a thief's, for the forged config below.
    std::fs::copy(s.path("state/keys/riverside.key"), s.path("old-mesh.key")).unwrap();
    // Rotate with a 3-second overlap.
    let overlap = 3;
    let resp = admin::call(
        &s.path("state"),
        &Request::RotateKey {
            mesh: "riverside".into(),
            overlap_s: overlap,
        },
    )
    .unwrap();
    let Response::Rotated {
        key,
        previous_until,
        published,
        ..
    } = resp
    else {
        panic!("{resp:?}")
    };
    let new = s.mesh_key();
    assert_eq!(new.to_base64(), key);
    assert_ne!(new, old);
    assert_eq!(
        published, 50,
        "every node (the offline one too) gets a config signed by the new key"
    );

    // Online agents: a new revision each, from the new key, without enrolling again.
    s.converged(&fleet, Duration::from_secs(60)).await;
    assert_eq!(fleet.past(&before), 49);
    assert_eq!(fleet.ids, ids_before);
    let signers = witness.latest_signers();
    for id in &fleet.ids {
        assert_eq!(signers.get(id), Some(&new), "{id}'s newest config");
    }
    let rows = s.status().unwrap();
    assert_eq!(rows.len(), 50, "nobody enrolled twice");

    // After the overlap, a config signed by the old key (a newer revision, as a thief of the
    // old key would send) is refused by an online agent.
    until(
        "the overlap to end",
        Duration::from_secs(overlap + 5),
        || (sidenet_controller::now() > previous_until).then_some(()),
    )
    .await;
    let victim = 0;
    let rev_now = fleet.revision(victim);
    let forged = forged_config(&s, &fleet.ids[victim], rev_now + 5);
    let (port, node) = (s.port, fleet.ids[victim].clone());
    tokio::task::spawn_blocking(move || publish(port, &node, forged))
        .await
        .unwrap();
    // The agent answers a refused config with a status report naming the failure; wait for the
    // controller to show it, then check nothing was applied.
    until(
        "the refusal to be reported",
        Duration::from_secs(30),
        || {
            s.status()?
                .into_iter()
                .find(|r| r.node == fleet.ids[victim])?
                .failure
                .filter(|f| f.contains("refused"))
        },
    )
    .await;
    assert_eq!(fleet.revision(victim), rev_now);

    // The late agent comes back after the overlap with only the old key pinned.
    let late = s.fleet_with(1, 99, Some(old));
    assert_eq!(late.ids[0], late_id);
    s.converged(&late, Duration::from_secs(60)).await;
    assert!(late.revision(0) > late_rev);
    assert_eq!(witness.latest_signers().get(&late_id), Some(&new));

    assert_clean(&fleet, &witness);
    eprintln!(
        "rotation: 49 online agents switched, 1 offline agent recovered; {} applies",
        fleet
            .ledger
            .applies
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    late.stop().await;
    fleet.stop().await;
}

/// A config for `node` at `rev`, well-formed and signed by the mesh's *old* key (the copy the
/// test kept before the rotation replaced it).
fn forged_config(s: &Setup, node: &str, rev: u64) -> Vec<u8> {
    let old = old_key_copy(s);
    let body = serde_json::json!({
        "mesh": "riverside", "node": node, "hostname": "forged", "role": "router",
        "profile": "raspberrypi-4b-awus036acm", "family": "linux", "subnet": "fd00::/64",
        "addresses": [], "files": [], "actions": [],
    });
    let epoch = s
        .status()
        .unwrap()
        .into_iter()
        .find(|r| r.node == node)
        .and_then(|r| r.desired)
        .unwrap()
        .epoch;
    let now = sidenet_controller::now();
    sidenet_wire::envelope::seal(
        sidenet_wire::Kind::Config,
        sidenet_wire::Header {
            mesh: "riverside".into(),
            node: Some(node.into()),
            epoch,
            rev,
            iat: now,
            exp: now + 3600,
            len: 0,
            sha256: String::new(),
        },
        &serde_json::to_vec(&body).unwrap(),
        &old,
    )
}

fn old_key_copy(s: &Setup) -> sidenet_wire::keys::KeyPair {
    let text = std::fs::read_to_string(s.path("old-mesh.key")).unwrap();
    sidenet_wire::keys::KeyPair::from_file_text(&text).unwrap()
}

fn publish(port: u16, node: &str, payload: Vec<u8>) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(format!("thief-{port}"), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 10);
    client
        .publish(
            sidenet_wire::topics::config("riverside", node),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .unwrap();
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let _ = client.disconnect();
}
