//! Chaos: 200 simulated agents (real MQTT sessions, keys and verification) behind a Mosquitto
//! broker, with the standalone controller as a separate process. The broker, then the
//! controller, is killed with SIGKILL and restarted 20 times while mesh-wide changes roll out.
//! Afterwards every agent runs the controller's latest revision, no agent applied a revision
//! twice or two bodies under one revision, and a witness subscribed to every config topic never
//! saw two different envelopes for one (node, revision).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Setup, Witness, assert_clean, until};

const AGENTS: usize = 200;
const KILLS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_20_times_during_rollouts() {
    let s = Setup::new();
    let mut broker = s.broker();
    s.wait_broker().await;
    let _ctl = s.controller();
    s.wait_controller().await;
    let witness = Witness::start(s.port);
    let fleet = s.fleet();
    s.converged(&fleet, Duration::from_secs(180)).await;

    // Channels DE allows without radar detection (the simulated Raspberry Pi's USB radio has
    // none): 36-48 and 149-161 at 80 MHz. Consecutive entries differ, and none is the
    // example's 36, so every change is a rollout.
    let channels = [40, 44, 48, 149, 153, 157, 161, 40, 44, 48];
    for k in 0..KILLS {
        if k % 2 == 0 {
            // A mesh-wide change; the broker dies while it rolls out.
            let before = witness.count();
            s.set_channel(channels[(k / 2) % channels.len()]);
            until("the rollout to start", Duration::from_secs(30), || {
                (witness.count() > before).then_some(())
            })
            .await;
        } else {
            // Or when some agents reconnected and the controller republishes.
            let n = fleet.connected();
            until("agents to reconnect", Duration::from_secs(60), || {
                (fleet.connected() >= n.min(AGENTS / 4)).then_some(())
            })
            .await;
        }
        broker.kill9();
        broker = s.broker();
        s.wait_broker().await;
    }
    s.converged(&fleet, Duration::from_secs(240)).await;
    assert_clean(&fleet, &witness);
    eprintln!(
        "broker chaos: {KILLS} kills, {} applies, {} envelopes witnessed",
        fleet.ledger.applies.load(Ordering::Relaxed),
        witness.count()
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_20_times_during_rollouts() {
    let s = Setup::new();
    let _broker = s.broker();
    s.wait_broker().await;
    let mut ctl = s.controller();
    s.wait_controller().await;
    let witness = Witness::start(s.port);
    let fleet = s.fleet();
    s.converged(&fleet, Duration::from_secs(180)).await;

    // As above; the list wraps around after 12 (153 then 40).
    let channels = [40, 44, 48, 149, 153, 157, 161, 40, 44, 48, 149, 153];
    for k in 0..KILLS {
        let before = witness.count();
        let ch = channels[k % channels.len()];
        match k % 3 {
            // Killed as soon as the change is on disk: before, during or after its reconcile.
            0 => s.set_channel(ch),
            // Killed right after the first config of the rollout reached the broker.
            1 => {
                s.set_channel(ch);
                until("the rollout to start", Duration::from_secs(30), || {
                    (witness.count() > before).then_some(())
                })
                .await;
            }
            // Changed while the controller is down (below).
            _ => {}
        }
        ctl.kill9();
        if k % 3 == 2 {
            s.set_channel(ch);
        }
        ctl = s.controller();
        s.wait_controller().await;
    }
    s.converged(&fleet, Duration::from_secs(240)).await;
    assert_clean(&fleet, &witness);
    // Revisions only grew: each agent's revisions, in the order it applied them, increase
    // (the ledger refuses nothing by itself, so check the controller's view too).
    let rows = s.status().unwrap();
    assert!(rows.iter().all(|r| r.desired.is_some_and(|d| d.rev > 1)));
    eprintln!(
        "controller chaos: {KILLS} kills, {} applies, {} envelopes witnessed",
        fleet.ledger.applies.load(Ordering::Relaxed),
        witness.count()
    );
    fleet.stop().await;
    drop(ctl);
}
