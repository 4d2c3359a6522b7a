//! The broker against real clients: rumqttc, Mosquitto's command-line clients, and a raw socket
//! where exact bytes matter. Every test binds 127.0.0.1:0 and waits with deadlines.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{LastWill, Packet, QoS, SubscribeReasonCode};
use sidenet_broker::{Authorizer, Broker, Config, Refusal};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_and_wildcard_subscriptions() {
    let b = start(Config::default()).await;
    let mut sub = Client::connect("sub", b.port()).await;
    for f in ["a/b", "x/+/z", "w/#", "+/only"] {
        let ack = sub.subscribe(f, QoS::AtMostOnce).await;
        assert_eq!(
            ack.return_codes,
            [SubscribeReasonCode::Success(QoS::AtMostOnce)]
        );
    }
    let publ = Client::connect("pub", b.port()).await;
    // Messages from one publisher arrive in order, so the marker at the end proves that the
    // non-matching ones in between were not delivered.
    for t in [
        "a/b",
        "a/c",
        "a/b/c",
        "x/y/z",
        "x/y/z/q",
        "w",
        "w/1/2",
        "ww/1",
        "q/only",
        "q/only/no",
        "a/b",
    ] {
        publ.publish(t, QoS::AtMostOnce, false, t.as_bytes()).await;
    }
    let mut got = Vec::new();
    for _ in 0..6 {
        let p = sub.publish_in().await;
        assert!(!p.retain);
        got.push(p.topic);
    }
    assert_eq!(got, ["a/b", "x/y/z", "w", "w/1/2", "q/only", "a/b"]);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_set_replace_delete_and_delivery_on_subscribe() {
    let b = start(Config::default()).await;
    let publ = Client::connect("pub", b.port()).await;
    publ.publish("r/n1/config", QoS::AtLeastOnce, true, b"v1")
        .await;
    publ.publish("r/n1/config", QoS::AtLeastOnce, true, b"v2")
        .await;
    publ.publish("r/n2/config", QoS::AtLeastOnce, true, b"n2")
        .await;
    publ.publish("r/n3/config", QoS::AtLeastOnce, true, b"n3")
        .await;
    publ.publish("r/n3/config", QoS::AtLeastOnce, true, b"")
        .await;
    let h = b.handle.clone();
    until("retained stored", || {
        h.stats().retained == 2 && h.retained("r/n3/config").is_none()
    })
    .await;
    assert_eq!(h.retained("r/n1/config").as_deref(), Some(&b"v2"[..]));

    // Exact filter: the replaced value, retain flag set, at the subscription's QoS.
    let mut exact = Client::connect("exact", b.port()).await;
    exact.subscribe("r/n1/config", QoS::AtLeastOnce).await;
    let p = exact.publish_in().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain, p.qos),
        ("r/n1/config", &b"v2"[..], true, QoS::AtLeastOnce)
    );

    // Wildcard filter: both remaining ones, not the deleted one.
    let mut wild = Client::connect("wild", b.port()).await;
    wild.subscribe("r/+/config", QoS::AtMostOnce).await;
    let mut got = [wild.publish_in().await, wild.publish_in().await];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got[0].topic, "r/n1/config");
    assert_eq!(got[1].topic, "r/n2/config");
    assert!(got.iter().all(|p| p.retain && p.qos == QoS::AtMostOnce));

    // A live retained publish reaches current subscribers with retain = 0.
    publ.publish("r/n2/config", QoS::AtLeastOnce, true, b"n2b")
        .await;
    let p = wild.publish_in().await;
    assert_eq!((&p.payload[..], p.retain), (&b"n2b"[..], false));

    // Mosquitto's client sees the retained message too (and sets one).
    let (ok, out) = mosquitto(
        "mosquitto_sub",
        &[
            "-p",
            &b.port().to_string(),
            "-i",
            "msub",
            "-t",
            "r/#",
            "-v",
            "-C",
            "2",
            "-W",
            "10",
        ],
    )
    .await;
    assert!(ok);
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["r/n1/config v2", "r/n2/config n2b"]);
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &[
            "-p",
            &b.port().to_string(),
            "-i",
            "mpub",
            "-t",
            "m/x",
            "-m",
            "from-mosquitto",
            "-r",
            "-q",
            "1",
        ],
    )
    .await;
    assert!(ok);
    let mut late = Client::connect("late", b.port()).await;
    late.subscribe("m/#", QoS::AtLeastOnce).await;
    let p = late.publish_in().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("m/x", &b"from-mosquitto"[..])
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_is_acknowledged_both_ways() {
    // A small in-flight window: 200 messages only get through if the subscriber's PUBACKs are
    // processed.
    let b = start(Config {
        max_inflight: 4,
        ..Config::default()
    })
    .await;
    let mut sub = Client::connect("sub", b.port()).await;
    sub.subscribe("q/#", QoS::AtLeastOnce).await;
    let mut publ = Client::connect("pub", b.port()).await;
    for i in 0..200u32 {
        publ.publish("q/1", QoS::AtLeastOnce, false, &i.to_be_bytes())
            .await;
    }
    let mut acks = 0;
    while acks < 200 {
        match publ.next().await {
            Ok(Packet::PubAck(_)) => acks += 1,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    for i in 0..200u32 {
        let p = sub.publish_in().await;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(&p.payload[..], &i.to_be_bytes());
    }
    // QoS 2 from Mosquitto's client is accepted and delivered at QoS 1.
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &[
            "-p",
            &b.port().to_string(),
            "-i",
            "mpub2",
            "-t",
            "q/two",
            "-m",
            "exactly",
            "-q",
            "2",
        ],
    )
    .await;
    assert!(ok);
    let p = sub.publish_in().await;
    assert_eq!((p.topic.as_str(), p.qos), ("q/two", QoS::AtLeastOnce));
    let s = b.handle.stats();
    assert_eq!(s.messages_in, 201);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_on_abrupt_disconnect_not_on_disconnect() {
    let b = start(Config::default()).await;
    let mut watcher = Client::connect("watcher", b.port()).await;
    watcher.subscribe("n/+/online", QoS::AtLeastOnce).await;

    // An agent-like client: retained will "offline", then "online" retained.
    let mut o = Client::options("n1", b.port());
    o.set_last_will(LastWill::new(
        "n/n1/online",
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let agent = Client::connect_with(o).await;
    agent
        .publish("n/n1/online", QoS::AtLeastOnce, true, b"online")
        .await;
    assert_eq!(&watcher.publish_in().await.payload[..], b"online");
    agent.kill(); // the TCP connection drops without DISCONNECT
    let p = watcher.publish_in().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("n/n1/online", &b"offline"[..])
    );
    let h = b.handle.clone();
    until("will retained", || {
        h.retained("n/n1/online").as_deref() == Some(&b"offline"[..])
    })
    .await;

    // A clean DISCONNECT publishes no will: the next message is the marker.
    let (mut raw, code) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"n2",
            will: Some(("n/n2/online", b"offline", 1, true)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    raw.send(&[0xe0, 0]).await;
    raw.closed().await;
    let marker = Client::connect("marker", b.port()).await;
    marker
        .publish("n/marker/online", QoS::AtLeastOnce, false, b"m")
        .await;
    assert_eq!(watcher.publish_in().await.topic, "n/marker/online");
    assert!(b.handle.retained("n/n2/online").is_none());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_takeover_closes_the_first_connection() {
    let b = start(Config::default()).await;
    let mut watcher = Client::connect("watcher", b.port()).await;
    watcher.subscribe("t/#", QoS::AtLeastOnce).await;
    let (mut first, code) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"same",
            will: Some(("t/will", b"first-died", 1, false)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(first.subscribe("t/old", 0).await, 0);
    let (mut second, code) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"same",
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    first.closed().await;
    // The first session's subscription is gone, the second connection works, and no will was
    // published for the takeover.
    assert_eq!(second.subscribe("t/new", 0).await, 0);
    second.publish("t/new", b"hello", false).await;
    let (first_byte, body) = second.read().await.expect("own message");
    assert_eq!(first_byte & 0xf0, 0x30);
    assert!(body.ends_with(b"hello"));
    let p = watcher.publish_in().await;
    assert_eq!(p.topic, "t/new");
    let s = b.handle.stats();
    assert_eq!(s.takeovers, 1);
    assert_eq!(s.subscriptions, 2); // watcher's t/# and second's t/new
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_expiry_disconnects_and_fires_the_will() {
    let b = start(Config::default()).await;
    let mut watcher = Client::connect("watcher", b.port()).await;
    watcher.subscribe("k/#", QoS::AtLeastOnce).await;
    let started = std::time::Instant::now();
    let (mut silent, code) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"silent",
            keep_alive: 1,
            will: Some(("k/silent", b"gone", 0, false)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    silent.closed().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}"
    );
    assert_eq!(&watcher.publish_in().await.payload[..], b"gone");

    // PINGREQ keeps a connection alive past 1.5 x keepalive.
    let (mut pinger, _) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"pinger",
            keep_alive: 1,
            ..Default::default()
        },
    )
    .await;
    for _ in 0..4 {
        pinger.send(&[0xc0, 0]).await;
        assert_eq!(pinger.read().await.map(|p| p.0), Some(0xd0));
        tokio::time::sleep(Duration::from_millis(700)).await; // the client's own pace, not a wait
    }
    assert_eq!(b.handle.stats().connections, 2);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_packet_disconnects() {
    let b = start(Config {
        max_packet_size: 1024,
        ..Config::default()
    })
    .await;
    let (mut raw, code) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"big",
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    // Only the header of a 1 MiB publish is sent: the broker must not wait for the body.
    raw.send(&[0x30, 0x80, 0x80, 0x40]).await;
    raw.closed().await;
    // rumqttc sees its connection end as well.
    let mut c = Client::connect("big2", b.port()).await;
    c.publish("x", QoS::AtMostOnce, false, &[0u8; 2000]).await;
    if let Ok(p) = c.next().await {
        panic!("expected the connection to end, got {p:?}");
    }
    // Just under the limit is fine.
    let mut sub = Client::connect("sub", b.port()).await;
    sub.subscribe("ok", QoS::AtMostOnce).await;
    sub.publish("ok", QoS::AtMostOnce, false, &[1u8; 1000])
        .await;
    assert_eq!(sub.publish_in().await.payload.len(), 1000);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_ids_and_protocol_levels_are_refused() {
    let b = start(Config::default()).await;
    for id in [&b""[..], b"a+b", b"a#", b"node/1", b"a\x01b", b"a\x7f"] {
        let (mut r, code) = Raw::connect(
            b.port(),
            &RawConnect {
                id,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(code, 2, "client id {id:?}");
        r.closed().await;
    }
    for level in [3u8, 5] {
        let (mut r, code) = Raw::connect(
            b.port(),
            &RawConnect {
                level,
                id: b"ok",
                ..Default::default()
            },
        )
        .await;
        assert_eq!(code, 1, "level {level}");
        r.closed().await;
    }
    let port = b.port().to_string();
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &["-p", &port, "-i", "bad/id", "-t", "x", "-m", "1"],
    )
    .await;
    assert!(!ok, "mosquitto_pub with client id bad/id was accepted");
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &["-p", &port, "-i", "good-id", "-t", "x", "-m", "1"],
    )
    .await;
    assert!(ok);
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &[
            "-p", &port, "-i", "v5", "-V", "mqttv5", "-t", "x", "-m", "1",
        ],
    )
    .await;
    assert!(!ok, "MQTT 5 connect was accepted");
    let mut c = Client::start(Client::options("a+b", b.port()));
    assert_eq!(c.next().await.unwrap_err(), "refused BadClientId");

    // Without strict ids, an empty id with clean session gets one assigned.
    let lax = start(Config {
        strict_client_ids: false,
        ..Config::default()
    })
    .await;
    let (_r, code) = Raw::connect(
        lax.port(),
        &RawConnect {
            id: b"",
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    assert!(b.handle.stats().refused_connects >= 9);
    lax.stop().await;
    b.stop().await;
}

/// A small policy in the spirit of sidenet's: user `node-X` with password `pw-X` must use client
/// id X, may publish only under `s/X/` and subscribe only to `c/X`; user `admin` may do anything.
struct Policy;

enum Who {
    Node(String),
    Admin,
}

impl Authorizer for Policy {
    type Principal = Who;

    fn connect(
        &self,
        client_id: &str,
        user: Option<&str>,
        pass: Option<&[u8]>,
    ) -> Result<Who, Refusal> {
        match (user, pass) {
            (Some("admin"), Some(b"secret")) => Ok(Who::Admin),
            (Some(u), Some(p)) if u.starts_with("node-") => {
                let id = &u[5..];
                if p != format!("pw-{id}").as_bytes() {
                    Err(Refusal::BadCredentials)
                } else if client_id != id {
                    Err(Refusal::NotAuthorized)
                } else {
                    Ok(Who::Node(id.to_string()))
                }
            }
            _ => Err(Refusal::BadCredentials),
        }
    }

    fn may_publish(&self, who: &Who, topic: &str) -> bool {
        match who {
            Who::Admin => true,
            Who::Node(id) => topic.starts_with(&format!("s/{id}/")),
        }
    }

    fn may_subscribe(&self, who: &Who, filter: &str) -> bool {
        match who {
            Who::Admin => true,
            Who::Node(id) => filter == format!("c/{id}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorizer_decides_connect_publish_subscribe() {
    let b = start_with(Broker::with_authorizer(Config::default(), Policy)).await;
    let port = b.port().to_string();
    let creds = |id: &str, user: &str, pass: &str| {
        let mut o = Client::options(id, b.port());
        o.set_credentials(user, pass);
        o
    };
    // Connect: no credentials, wrong password → 4; someone else's client id → 5.
    let mut c = Client::start(Client::options("n1", b.port()));
    assert_eq!(c.next().await.unwrap_err(), "refused BadUserNamePassword");
    let mut c = Client::start(creds("n1", "node-n1", "wrong"));
    assert_eq!(c.next().await.unwrap_err(), "refused BadUserNamePassword");
    let mut c = Client::start(creds("n2", "node-n1", "pw-n1"));
    assert_eq!(c.next().await.unwrap_err(), "refused NotAuthorized");
    let (ok, _) = mosquitto(
        "mosquitto_pub",
        &[
            "-p", &port, "-i", "n1", "-u", "node-n1", "-P", "nope", "-t", "s/n1/x", "-m", "1",
        ],
    )
    .await;
    assert!(!ok);

    let mut admin = Client::connect_with(creds("admin", "admin", "secret")).await;
    admin.subscribe("#", QoS::AtLeastOnce).await;
    let mut n1 = Client::connect_with(creds("n1", "node-n1", "pw-n1")).await;

    // Subscribe: own config topic granted, others 0x80, per filter in one packet.
    n1.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("c/n1".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("c/n2".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("c/+".into(), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let ack = loop {
        if let Ok(Packet::SubAck(a)) = n1.next().await {
            break a;
        }
    };
    assert_eq!(
        ack.return_codes,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure
        ]
    );
    // Publish: allowed topic delivered; denied ones acknowledged but dropped.
    n1.publish("s/n2/status", QoS::AtLeastOnce, false, b"forged")
        .await;
    n1.publish("c/n2", QoS::AtLeastOnce, true, b"forged").await;
    n1.publish("s/n1/status", QoS::AtLeastOnce, false, b"mine")
        .await;
    let p = admin.publish_in().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("s/n1/status", &b"mine"[..])
    );
    assert!(b.handle.retained("c/n2").is_none());
    // The admin's message to n1's config topic reaches n1; one to n2's does not.
    admin
        .publish("c/n2", QoS::AtLeastOnce, true, b"for-n2")
        .await;
    admin
        .publish("c/n1", QoS::AtLeastOnce, true, b"for-n1")
        .await;
    assert_eq!(&n1.publish_in().await.payload[..], b"for-n1");
    let s = b.handle.stats();
    assert_eq!(s.denied_publishes, 2);
    assert_eq!(s.denied_subscriptions, 2);

    // The will is subject to the policy as well: n1's will to another node's topic is dropped.
    let mut o = creds("n1", "node-n1", "pw-n1");
    o.set_last_will(LastWill::new("s/n3/online", "x", QoS::AtLeastOnce, true));
    let n1b = Client::connect_with(o).await; // takes over n1
    n1b.kill();
    let h = b.handle.clone();
    until("will denied", || h.stats().denied_publishes == 3).await;
    assert!(h.retained("s/n3/online").is_none());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_closes_a_client_and_publishes_its_will() {
    let b = start(Config::default()).await;
    let mut watcher = Client::connect("watcher", b.port()).await;
    watcher.subscribe("o/#", QoS::AtLeastOnce).await;
    let mut o = Client::options("victim", b.port());
    o.set_last_will(LastWill::new("o/victim", "offline", QoS::AtLeastOnce, true));
    let mut victim = Client::connect_with(o).await;
    assert!(b.handle.kick("victim"));
    assert!(!b.handle.kick("nobody"));
    assert!(victim.next().await.is_err());
    assert_eq!(&watcher.publish_in().await.payload[..], b"offline");
    assert_eq!(b.handle.stats().kicks, 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_has_a_bounded_queue() {
    let b = start(Config {
        max_queued_messages: 8,
        max_queued_bytes: 1 << 20,
        ..Config::default()
    })
    .await;
    // A subscriber that never reads its socket.
    let (mut slow, _) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"slow",
            ..Default::default()
        },
    )
    .await;
    assert_eq!(slow.subscribe("flood/#", 1).await, 1);
    let publ = Client::connect("pub", b.port()).await;
    let chunk = vec![7u8; 60_000];
    let h = b.handle.clone();
    // QoS 0: once socket buffers and the queue are full, messages for it are dropped.
    within("QoS 0 dropped", async {
        while h.stats().dropped == 0 {
            publ.publish("flood/0", QoS::AtMostOnce, false, &chunk)
                .await;
            tokio::task::yield_now().await;
        }
    })
    .await;
    // QoS 1 that does not fit disconnects it.
    within("QoS 1 overflow", async {
        while h.stats().overflows == 0 {
            publ.publish("flood/1", QoS::AtLeastOnce, false, &chunk)
                .await;
            tokio::task::yield_now().await;
        }
    })
    .await;
    until("slow reader disconnected", || h.stats().connections == 1).await;
    drop(slow);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_and_connection_limit() {
    let b = start(Config {
        max_connections: 3,
        ..Config::default()
    })
    .await;
    // A wildcard in a publish topic closes the connection.
    let (mut r, _) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"w",
            ..Default::default()
        },
    )
    .await;
    r.publish("a/+", b"x", false).await;
    r.closed().await;
    // Invalid filters get 0x80 without closing.
    let (mut r, _) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"f",
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.subscribe("a/#/b", 0).await, 0x80);
    assert_eq!(r.subscribe("a+", 0).await, 0x80);
    assert_eq!(r.subscribe("a/+/b", 2).await, 1); // QoS 2 granted as 1
    // Not CONNECT first: closed.
    let mut r2 = Raw::open(b.port()).await;
    r2.send(&[0xc0, 0]).await;
    r2.closed().await;
    // Limit: 3 sockets open, the 4th is closed at once.
    let (_a, _) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"a",
            ..Default::default()
        },
    )
    .await;
    let (_b, _) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"b",
            ..Default::default()
        },
    )
    .await;
    let h = b.handle.clone();
    until("3 sockets", || h.stats().sockets == 3).await;
    let mut over = Raw::open(b.port()).await;
    over.send(
        &RawConnect {
            id: b"c",
            ..Default::default()
        }
        .bytes(),
    )
    .await;
    over.closed().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_each_get_their_own_retained_topic() {
    // The sidenet shape: N retained configs, N clients subscribing to their own exact topic.
    let b = start(Config::default()).await;
    let n = 300;
    let publ = Client::connect("controller", b.port()).await;
    for i in 0..n {
        publ.publish(
            &format!("mesh/nodes/{i}/config"),
            QoS::AtLeastOnce,
            true,
            format!("cfg{i}").as_bytes(),
        )
        .await;
    }
    let h = b.handle.clone();
    until("all retained", || h.stats().retained == n).await;
    let mut joins = Vec::new();
    for i in 0..n {
        let port = b.port();
        joins.push(tokio::spawn(async move {
            let mut c = Client::connect(&format!("node{i}"), port).await;
            c.subscribe(&format!("mesh/nodes/{i}/config"), QoS::AtLeastOnce)
                .await;
            let p = c.publish_in().await;
            assert_eq!(p.payload, format!("cfg{i}").as_bytes());
            c
        }));
    }
    let mut clients = Vec::new();
    for j in joins {
        clients.push(j.await.unwrap());
    }
    assert_eq!(b.handle.stats().connections, n + 1);
    b.stop().await;
    for mut c in clients {
        assert!(c.next().await.is_err(), "connection should end at shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_resend_is_routed_once_and_sessions_are_not_persisted() {
    let b = start(Config::default()).await;
    let mut sub = Client::connect("sub", b.port()).await;
    sub.subscribe("e/#", QoS::AtLeastOnce).await;
    // Clean session off is accepted, served as a clean session (session present = 0).
    let (mut raw, code) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"q2",
            persistent: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    let mut body = Vec::new();
    string(&mut body, b"e/once");
    body.extend_from_slice(&7u16.to_be_bytes());
    body.extend_from_slice(b"payload");
    raw.send(&frame(0x34, &body)).await; // QoS 2
    assert_eq!(raw.read().await, Some((0x50, vec![0, 7]))); // PUBREC
    raw.send(&frame(0x3c, &body)).await; // resent with DUP before PUBREL
    assert_eq!(raw.read().await, Some((0x50, vec![0, 7])));
    raw.send(&[0x62, 2, 0, 7]).await; // PUBREL
    assert_eq!(raw.read().await, Some((0x70, vec![0, 7]))); // PUBCOMP
    raw.publish("e/marker", b"m", false).await;
    let p = sub.publish_in().await;
    assert_eq!((p.topic.as_str(), p.qos), ("e/once", QoS::AtLeastOnce));
    assert_eq!(sub.publish_in().await.topic, "e/marker");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_agent_gets_retained_and_live_configs_and_leaves_a_will() {
    let b = start(Config::default()).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv-peers/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/install-peers (it installs paho-mqtt)",
        python.display()
    );
    let mut ctl = Client::connect("controller", b.port()).await;
    ctl.subscribe("p/+/online", QoS::AtLeastOnce).await;
    ctl.publish("p/config/a", QoS::AtLeastOnce, true, b"retained-a")
        .await;
    let h = b.handle.clone();
    until("retained a", || h.retained("p/config/a").is_some()).await;

    let child = tokio::process::Command::new(&python)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/paho_client.py"))
        .arg(b.port().to_string())
        .arg("paho-1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // It publishes "online", then subscribes; live configs go out once its subscription is in.
    let p = ctl.publish_in().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("p/paho-1/online", &b"online"[..])
    );
    until("paho subscribed", || h.stats().subscriptions == 2).await;
    ctl.publish("p/config/b", QoS::AtLeastOnce, false, b"live-b")
        .await;
    ctl.publish("p/config/end", QoS::AtMostOnce, false, b"")
        .await;
    let out = within("paho client", child.wait_with_output())
        .await
        .unwrap();
    assert!(out.status.success(), "paho client: {:?}", out.status);
    let lines: Vec<serde_like::Line> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(serde_like::parse)
        .collect();
    assert_eq!(
        lines,
        [
            serde_like::Line::new("p/config/a", "retained-a", true, 1),
            serde_like::Line::new("p/config/b", "live-b", false, 1),
            serde_like::Line::new("p/config/end", "", false, 0),
        ]
    );
    // It exited without DISCONNECT: its will replaces the retained "online".
    let p = ctl.publish_in().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("p/paho-1/online", &b"offline"[..])
    );
    until("will retained", || {
        h.retained("p/paho-1/online").as_deref() == Some(&b"offline"[..])
    })
    .await;
    b.stop().await;
}

/// Just enough parsing of the paho client's JSON lines (no JSON crate in this crate's deps).
mod serde_like {
    #[derive(Debug, PartialEq, Eq)]
    pub struct Line(pub String);

    impl Line {
        pub fn new(topic: &str, payload: &str, retain: bool, qos: u8) -> Line {
            Line(format!(
                "{{\"topic\": \"{topic}\", \"payload\": \"{payload}\", \"retain\": {retain}, \"qos\": {qos}}}"
            ))
        }
    }

    pub fn parse(s: &str) -> Line {
        Line(s.trim().to_string())
    }
}

/// Before CONNECT a socket may send at most `max_connect_packet_size` (4 KiB by default): a
/// larger first packet is refused as soon as its fixed header arrives, long before the CONNECT
/// timeout. A CONNECT of exactly 4 KiB is accepted, and after CONNECT the normal limit applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_packet_before_connect_is_refused_at_once() {
    let b = start(Config {
        connect_timeout: Duration::from_secs(60),
        ..Config::default()
    })
    .await;
    assert_eq!(sidenet_broker::DEFAULT_MAX_CONNECT_PACKET, 4096);
    let h = b.handle.clone();
    // Only the fixed header of a 5,003-byte CONNECT (remaining length 5,000).
    let mut raw = Raw::open(b.port()).await;
    let t0 = std::time::Instant::now();
    raw.send(&[0x10, 0x88, 0x27]).await;
    raw.closed().await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    until("the refused socket released", || h.stats().sockets == 0).await;

    // A CONNECT of exactly 4,096 bytes (a long password) is accepted; one byte more is not.
    let connect_of = |size: usize| {
        let base = RawConnect {
            id: b"pw",
            user: Some(("u", b"")),
            ..Default::default()
        }
        .bytes()
        .len();
        // Header grows from 2 to 3 bytes once the remaining length passes 127.
        let pad = size - base - 1;
        let password = vec![b'p'; pad];
        let bytes = RawConnect {
            id: b"pw",
            user: Some(("u", &password)),
            ..Default::default()
        }
        .bytes();
        assert_eq!(bytes.len(), size);
        bytes
    };
    let mut ok = Raw::open(b.port()).await;
    ok.send(&connect_of(4096)).await;
    let (first, body) = ok.read().await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0));
    let mut over = Raw::open(b.port()).await;
    over.send(&connect_of(4097)).await;
    over.closed().await;

    // Connected, a 64 KiB publish is fine (the limit after CONNECT is max_packet_size).
    assert_eq!(ok.subscribe("big", 0).await, 0);
    ok.publish("big", &vec![7u8; 64 * 1024], false).await;
    let (first, body) = ok.read().await.expect("the 64 KiB publish back");
    assert_eq!(first & 0xf0, 0x30);
    assert_eq!(body.len(), 2 + 3 + 64 * 1024);
    b.stop().await;
}

/// Only complete packets keep a connection alive (MQTT-3.1.2-24): a client that trickles one
/// byte of a packet every 100 ms after CONNECT (keepalive 1 s) is disconnected 1.5 s after its
/// last complete packet, and its will is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_after_connect_is_dropped_after_one_and_a_half_keepalives() {
    let b = start(Config::default()).await;
    let h = b.handle.clone();
    let mut watcher = Client::connect("watcher", b.port()).await;
    watcher.subscribe("will/slow", QoS::AtMostOnce).await;
    let (mut slow, code) = Raw::connect(
        b.port(),
        &RawConnect {
            id: b"slow",
            keep_alive: 1,
            will: Some(("will/slow", b"gone", 0, false)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    // The last complete packet the broker saw is the CONNECT, before this instant.
    let t0 = std::time::Instant::now();
    // A PUBLISH of 1,000 bytes, sent one byte per tick: it never completes in time.
    let mut packet = vec![0x30, 0xe8, 0x07];
    packet.extend(std::iter::repeat_n(b'x', 1000));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut bytes = packet.iter();
    let mut buf = [0u8; 64];
    let closed_after = within("the slowloris to be disconnected", async {
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let Some(byte) = bytes.next() else { panic!("the whole packet went out") };
                    if tokio::io::AsyncWriteExt::write_all(&mut slow.stream, &[*byte]).await.is_err() {
                        return t0.elapsed();
                    }
                }
                r = tokio::io::AsyncReadExt::read(&mut slow.stream, &mut buf) => match r {
                    Ok(0) | Err(_) => return t0.elapsed(),
                    Ok(_) => panic!("unexpected bytes from the broker"),
                },
            }
        }
    })
    .await;
    assert!(
        closed_after >= Duration::from_millis(1400),
        "closed after {closed_after:?}, before 1.5 x keepalive"
    );
    assert!(
        closed_after < Duration::from_secs(6),
        "closed after {closed_after:?}"
    );
    let will = watcher.publish_in().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("will/slow", &b"gone"[..])
    );
    until("the slowloris gone", || h.stats().connections == 1).await;
    b.stop().await;
}

/// The socket and connection counters and the session table are released by guards: when the
/// broker's task is aborted mid-flight (its connection tasks are dropped, not returned), the
/// counts go back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_released_when_connection_tasks_are_dropped() {
    let b = start(Config::default()).await;
    let h = b.handle.clone();
    let mut clients = Vec::new();
    for id in ["c1", "c2", "c3"] {
        let mut c = Client::connect(id, b.port()).await;
        c.subscribe(&format!("t/{id}"), QoS::AtLeastOnce).await;
        clients.push(c);
    }
    // Two sockets that never send CONNECT.
    let _idle = [Raw::open(b.port()).await, Raw::open(b.port()).await];
    until("5 sockets, 3 connections, 3 subscriptions", || {
        let s = h.stats();
        (s.sockets, s.connections, s.subscriptions) == (5, 3, 3)
    })
    .await;
    b.abort().await;
    until("every counter released", || {
        let s = h.stats();
        (s.sockets, s.connections, s.subscriptions) == (0, 0, 0)
    })
    .await;
}
