//! Replays the seeds, the minimised fuzz corpus and the regression inputs of the `mqtt_codec`
//! fuzz target (`fuzz/{seeds,corpus,regressions}/mqtt_codec/`) through the function the target
//! calls, so CI checks every input without cargo-fuzz or a nightly compiler.
//!
//! `cargo test -p sidenet-broker --test fuzz_corpus -- --ignored write_seeds` writes the seeds:
//! what real clients send (Mosquitto's `mosquitto_pub`/`mosquitto_sub` recorded on the way to
//! this broker, rumqttc's encoder in the shapes the sidenet agent and controller use) and edge
//! cases written byte by byte; see `docs/fuzzing.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use common::*;
use rumqttc::{
    Connect, Disconnect, LastWill, Login, PingReq, PubAck, Publish, QoS, Subscribe,
    SubscribeFilter, Unsubscribe,
};
use sidenet_broker::Config;
use sidenet_broker::fuzzing::mqtt_codec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

const TARGET: &str = "mqtt_codec";

#[test]
fn mqtt_codec_corpus() {
    let mut files = Vec::new();
    for sub in ["seeds", "corpus", "regressions"] {
        if let Ok(rd) = std::fs::read_dir(fuzz_dir().join(sub).join(TARGET)) {
            files.extend(
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file()),
            );
        }
    }
    files.sort();
    assert!(
        files.len() > 10,
        "no corpus for {TARGET} under {}",
        fuzz_dir().display()
    );
    eprintln!("{TARGET}: replaying {} inputs", files.len());
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if catch_unwind(AssertUnwindSafe(|| mqtt_codec(&data))).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs of {TARGET} panic:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

/// The seeds feed the index comparison: the controller-shaped seed decodes whole into wildcard
/// filters and topics (so the target compares the indexes on them, not on nothing).
#[test]
fn seeds_reach_the_index_comparison() {
    let seed = std::fs::read(
        fuzz_dir()
            .join("seeds")
            .join(TARGET)
            .join("rumqttc-controller-w"),
    )
    .expect("seed rumqttc-controller-w: run write_seeds");
    let (control, stream) = seed.split_first().unwrap();
    let limit = sidenet_broker::fuzzing::LIMITS[usize::from(control & 3)];
    let mut buf = BytesMut::from(stream);
    let (mut filters, mut topics) = (0, 0);
    while let Ok(Some(p)) = sidenet_broker::codec::decode(&mut buf, limit) {
        match p {
            sidenet_broker::codec::Packet::Subscribe(_, f) => filters += f.len(),
            sidenet_broker::codec::Packet::Publish(_) => topics += 1,
            _ => {}
        }
    }
    assert!(
        filters >= 3 && topics >= 3,
        "{filters} filters, {topics} topics"
    );
    assert!(buf.is_empty());
}

// ---- seeds ---------------------------------------------------------------------------------

/// Control bytes the seeds are written with: (limit index, read size).
const CONTROLS: [(u8, u8, &str); 3] = [(1, 1, "c"), (3, 7, "w"), (2, 64, "m")];

fn control(limit: u8, read: u8) -> u8 {
    limit | ((read - 1) << 2)
}

fn write_seed(name: &str, stream: &[u8]) {
    let dir = fuzz_dir().join("seeds").join(TARGET);
    std::fs::create_dir_all(&dir).unwrap();
    for (limit, read, tag) in CONTROLS {
        let mut data = vec![control(limit, read)];
        data.extend_from_slice(stream);
        // Every seed must pass the target before it is written.
        mqtt_codec(&data);
        std::fs::write(dir.join(format!("{name}-{tag}")), &data).unwrap();
    }
}

fn enc(packets: &[&dyn Fn(&mut BytesMut)]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for p in packets {
        p(&mut out);
    }
    out.to_vec()
}

const NODE: &str = "qi4chuluc3u2giv7gxk5rjbqyh5bqcx3q3s7d2yjbrjqdp3mnlda";
const MESH: &str = "riverside";

/// The sidenet agent's session as rumqttc encodes it: CONNECT with its node id, will on its
/// online topic and its broker password; its config and announce subscriptions; a status
/// report; acknowledgements; ping; disconnect.
fn agent_session() -> Vec<u8> {
    let online = format!("sidenet/v1/{MESH}/nodes/{NODE}/online");
    let mut c = Connect::new(NODE);
    c.keep_alive = 30;
    c.clean_session = true;
    c.last_will = Some(LastWill::new(&online, "offline", QoS::AtLeastOnce, true));
    c.login = Some(Login::new(
        NODE,
        "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpiyq",
    ));
    enc(&[
        &|b| {
            c.write(b).unwrap();
        },
        &|b| {
            Subscribe::new_many([
                SubscribeFilter::new(
                    format!("sidenet/v1/{MESH}/nodes/{NODE}/config"),
                    QoS::AtLeastOnce,
                ),
                SubscribeFilter::new(format!("sidenet/v1/{MESH}/announce"), QoS::AtLeastOnce),
            ])
            .write(b)
            .unwrap();
        },
        &|b| {
            let mut p = Publish::new(&online, QoS::AtLeastOnce, "online");
            p.retain = true;
            p.pkid = 1;
            p.write(b).unwrap();
        },
        &|b| {
            let mut p = Publish::new(
                format!("sidenet/v1/{MESH}/nodes/{NODE}/status"),
                QoS::AtLeastOnce,
                vec![0x53u8; 900],
            );
            p.pkid = 2;
            p.write(b).unwrap();
        },
        &|b| {
            PubAck::new(7).write(b).unwrap();
        },
        &|b| {
            PingReq.write(b).unwrap();
        },
        &|b| {
            Disconnect.write(b).unwrap();
        },
    ])
}

/// The controller's session: wildcard subscriptions over every node, retained configs, a
/// retained delete, an enrolment seen on a `+` level, an unsubscribe.
fn controller_session() -> Vec<u8> {
    let mut c = Connect::new("sidenet-controller-4242");
    c.keep_alive = 30;
    c.login = Some(Login::new("sidenet-controller", "secret"));
    let config = |n: &str| format!("sidenet/v1/{MESH}/nodes/{n}/config");
    enc(&[
        &|b| {
            c.write(b).unwrap();
        },
        &|b| {
            Subscribe::new_many([
                SubscribeFilter::new(format!("sidenet/v1/{MESH}/enroll/+"), QoS::AtLeastOnce),
                SubscribeFilter::new(
                    format!("sidenet/v1/{MESH}/nodes/+/status"),
                    QoS::AtLeastOnce,
                ),
                SubscribeFilter::new(format!("sidenet/v1/{MESH}/nodes/+/online"), QoS::AtMostOnce),
                SubscribeFilter::new("sidenet/v1/#".into(), QoS::AtMostOnce),
                SubscribeFilter::new("#".into(), QoS::AtMostOnce),
                SubscribeFilter::new("$SYS/#".into(), QoS::AtMostOnce),
            ])
            .write(b)
            .unwrap();
        },
        &|b| {
            for (i, n) in ["n1", "n2", "n3"].iter().enumerate() {
                let mut p = Publish::new(config(n), QoS::AtLeastOnce, vec![b'c'; 64]);
                p.retain = true;
                p.pkid = 10 + i as u16;
                p.write(b).unwrap();
            }
        },
        &|b| {
            let mut p = Publish::new(config("n2"), QoS::AtLeastOnce, Vec::new());
            p.retain = true;
            p.pkid = 20;
            p.write(b).unwrap();
        },
        &|b| {
            Publish::new(
                format!("sidenet/v1/{MESH}/enroll/{NODE}"),
                QoS::AtMostOnce,
                "e",
            )
            .write(b)
            .unwrap();
            Publish::new("$SYS/broker/uptime", QoS::AtMostOnce, "1")
                .write(b)
                .unwrap();
        },
        &|b| {
            Unsubscribe::new("#").write(b).unwrap();
        },
    ])
}

/// Bytes written out: what rumqttc cannot be made to send.
fn handmade() -> Vec<(&'static str, Vec<u8>)> {
    let connect = |name: &[u8], level: u8, flags: u8, id: &[u8]| {
        let mut b = Vec::new();
        string(&mut b, name);
        b.push(level);
        b.push(flags);
        b.extend_from_slice(&60u16.to_be_bytes());
        string(&mut b, id);
        frame(0x10, &b)
    };
    let pub_qos2 = {
        let mut b = Vec::new();
        string(&mut b, b"a/b");
        b.extend_from_slice(&[0, 9]);
        b.extend_from_slice(b"payload");
        frame(0x34, &b)
    };
    let sub_many = {
        let mut b = vec![0, 3];
        for (f, q) in [("a/+/c", 2u8), ("+", 0), ("/#", 1), ("a//c", 0), ("+/+", 1)] {
            string(&mut b, f.as_bytes());
            b.push(q);
        }
        frame(0x82, &b)
    };
    let pubs = {
        let mut out = Vec::new();
        for t in ["a/x/c", "a//c", "/a", "a", "$SYS/a", "a/b"] {
            let mut b = Vec::new();
            string(&mut b, t.as_bytes());
            b.extend_from_slice(b"v");
            out.extend(frame(0x31, &b));
        }
        out
    };
    let with = |parts: &[&[u8]]| parts.concat();
    let ok = connect(b"MQTT", 4, 0x02, b"edge");
    vec![
        (
            "qos2-flow",
            with(&[
                &ok,
                &pub_qos2,
                &pub_qos2,
                &[0x62, 2, 0, 9],
                &[0x50, 2, 0, 9],
                &[0x70, 2, 0, 9],
            ]),
        ),
        ("wildcards", with(&[&ok, &sub_many, &pubs])),
        ("mqtt31", connect(b"MQIsdp", 3, 0x02, b"old")),
        ("mqtt5", connect(b"MQTT", 5, 0x02, b"new")),
        ("bad-protocol-name", connect(b"HTTP", 4, 0x02, b"x")),
        ("reserved-flag", connect(b"MQTT", 4, 0x03, b"x")),
        (
            "oversize-header",
            with(&[&ok, &[0x30, 0xff, 0xff, 0xff, 0x7f]]),
        ),
        (
            "five-length-bytes",
            with(&[&ok, &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]]),
        ),
        (
            "non-minimal-length",
            with(&[&ok, &[0xc0, 0x80, 0x00], &[0xe0, 0x00]]),
        ),
        (
            "partial-publish",
            with(&[&ok, &pub_qos2[..pub_qos2.len() - 3]]),
        ),
        ("server-packet", with(&[&ok, &[0x20, 2, 0, 0]])),
        ("not-utf8", {
            let mut b = Vec::new();
            string(&mut b, &[0xff, 0xfe]);
            with(&[&ok, &frame(0x30, &b)])
        }),
    ]
}

/// A TCP proxy in front of the broker that records what the client sends.
async fn record(broker_port: u16, run: impl AsyncFnOnce(u16)) -> Vec<u8> {
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = proxy.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let (mut client, _) = proxy.accept().await.unwrap();
        let mut server = TcpStream::connect(("127.0.0.1", broker_port))
            .await
            .unwrap();
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let up = async {
            let mut buf = [0u8; 4096];
            loop {
                match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        s.lock().unwrap().extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sw.shutdown().await;
        };
        let down = async {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        };
        tokio::join!(up, down);
    });
    run(port).await;
    within("proxy to finish", task).await.unwrap();
    std::mem::take(&mut *seen.lock().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes fuzz/seeds/mqtt_codec; run by hand (docs/fuzzing.md)"]
async fn write_seeds() {
    let b = start(Config::default()).await;
    let port = b.port();
    let pub_bytes = record(port, async |p| {
        let (ok, _) = mosquitto(
            "mosquitto_pub",
            &[
                "-p",
                &p.to_string(),
                "-i",
                "seed-pub",
                "-t",
                "seed/a/b",
                "-m",
                "hello",
                "-q",
                "2",
                "-r",
                "-u",
                "user",
                "-P",
                "pass",
                "--will-topic",
                "seed/will",
                "--will-payload",
                "gone",
                "--will-qos",
                "1",
            ],
        )
        .await;
        assert!(ok);
    })
    .await;
    let sub_bytes = record(port, async |p| {
        let (ok, out) = mosquitto(
            "mosquitto_sub",
            &[
                "-p",
                &p.to_string(),
                "-i",
                "seed-sub",
                "-t",
                "seed/+/b",
                "-t",
                "seed/#",
                "-t",
                "$SYS/#",
                "-q",
                "1",
                "-C",
                "1",
                "-W",
                "10",
                "-v",
            ],
        )
        .await;
        assert!(ok);
        assert_eq!(out.trim(), "seed/a/b hello");
    })
    .await;
    b.stop().await;
    assert!(pub_bytes.len() > 20 && sub_bytes.len() > 20);
    write_seed("mosquitto-pub", &pub_bytes);
    write_seed("mosquitto-sub", &sub_bytes);
    write_seed("rumqttc-agent", &agent_session());
    write_seed("rumqttc-controller", &controller_session());
    for (name, bytes) in handmade() {
        write_seed(name, &bytes);
    }
}
