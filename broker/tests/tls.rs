//! The TLS listener against real clients: rumqttc over rustls (pinned to the test CA), a client
//! pinned to another CA, a plain MQTT client on the TLS port, and a socket that never starts
//! the handshake. Certificates come from the openssl command-line tool
//! (`tests/peers/make-pki`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
use sidenet_broker::tls::rustls;
use sidenet_broker::{Broker, BrokerHandle, Config, Listener};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn make_pki(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/make-pki");
    let out = std::process::Command::new(script)
        .arg(dir)
        .output()
        .expect("tests/peers/make-pki (needs the openssl command)");
    assert!(out.status.success(), "make-pki: {out:?}");
    dir.to_path_buf()
}

fn client_tls(ca: &Path) -> TlsConfiguration {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConfiguration::Rustls(Arc::new(config))
}

fn tls_options(id: &str, port: u16, ca: &Path) -> MqttOptions {
    let mut o = Client::options(id, port);
    o.set_transport(Transport::tls_with_config(client_tls(ca)));
    o
}

struct Both {
    plain: u16,
    tls: u16,
    handle: BrokerHandle,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_both(config: Config, pki: &Path) -> Both {
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (pp, tp) = (
        plain.local_addr().unwrap().port(),
        tls.local_addr().unwrap().port(),
    );
    let server =
        sidenet_broker::tls::server_config(&pki.join("server.pem"), &pki.join("server.key"))
            .unwrap();
    let broker = Broker::new(config);
    let handle = broker.handle();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(broker.run_listeners(
        vec![Listener::plain(plain), Listener::tls(tls, server)],
        async move {
            let _ = rx.await;
        },
    ));
    Both {
        plain: pp,
        tls: tp,
        handle,
        stop,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_plain_clients_talk_through_one_broker() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(&dir.path().join("pki"));
    let b = start_both(Config::default(), &pki).await;
    // A TLS subscriber receives what a plain publisher sends, and the other way round, with
    // retained messages and configs big enough to need several TLS records.
    let mut tls_sub =
        Client::connect_with(tls_options("tls-sub", b.tls, &pki.join("ca.pem"))).await;
    let mut plain_sub = Client::connect("plain-sub", b.plain).await;
    tls_sub.subscribe("t/from-plain", QoS::AtLeastOnce).await;
    plain_sub.subscribe("t/from-tls", QoS::AtLeastOnce).await;
    let big = vec![b'x'; 200 * 1024];
    let publ = Client::connect("plain-pub", b.plain).await;
    publ.publish("t/from-plain", QoS::AtLeastOnce, true, &big)
        .await;
    let p = tls_sub.publish_in().await;
    assert_eq!(
        (p.topic.as_str(), p.payload.len()),
        ("t/from-plain", big.len())
    );
    tls_sub
        .publish("t/from-tls", QoS::AtLeastOnce, false, b"hello")
        .await;
    let p = plain_sub.publish_in().await;
    assert_eq!(&p.payload[..], b"hello");
    // A retained message reaches a TLS client that subscribes later.
    let mut late = Client::connect_with(tls_options("tls-late", b.tls, &pki.join("ca.pem"))).await;
    late.subscribe("t/from-plain", QoS::AtLeastOnce).await;
    let p = late.publish_in().await;
    assert!(p.retain);
    assert_eq!(p.payload.len(), big.len());
    assert_eq!(b.handle.stats().tls_failures, 0);
    let _ = b.stop.send(());
    within("broker shutdown", b.task).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinned_to_another_ca_and_a_plain_client_are_refused_on_the_tls_port() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(&dir.path().join("pki"));
    let other = make_pki(&dir.path().join("other"));
    let b = start_both(Config::default(), &pki).await;
    let mut wrong = Client::start(tls_options("wrong-ca", b.tls, &other.join("ca.pem")));
    let e = wrong.next().await.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    // Plain MQTT on the TLS port: the CONNECT is not a TLS hello.
    let mut plain = Client::start(Client::options("plain-on-tls", b.tls));
    assert!(plain.next().await.is_err());
    until("both handshakes counted as failed", || {
        b.handle.stats().tls_failures == 2
    })
    .await;
    assert_eq!(b.handle.stats().connects_total, 0);
    let _ = b.stop.send(());
    within("broker shutdown", b.task).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_stall_the_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(&dir.path().join("pki"));
    // Long enough that a broker which waited for the silent sockets' handshakes in its accept
    // loop would make the clients below miss their deadlines (`WAIT`, 10 s).
    let config = Config {
        tls_handshake_timeout: Duration::from_secs(60),
        ..Config::default()
    };
    let b = start_both(config, &pki).await;
    // Ten sockets open TCP to the TLS port and send nothing.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", b.tls))
                .await
                .unwrap(),
        );
    }
    until("the silent sockets to be accepted", || {
        b.handle.stats().sockets == 10
    })
    .await;
    // TLS and plain clients connect and exchange messages meanwhile.
    let mut sub = Client::connect_with(tls_options("sub", b.tls, &pki.join("ca.pem"))).await;
    sub.subscribe("t", QoS::AtLeastOnce).await;
    let publ = Client::connect("pub", b.plain).await;
    publ.publish("t", QoS::AtLeastOnce, false, b"through").await;
    assert_eq!(&sub.publish_in().await.payload[..], b"through");
    let s = b.handle.stats();
    assert_eq!((s.sockets, s.connections, s.tls_failures), (12, 2, 0));
    drop(silent);
    let _ = b.stop.send(());
    within("broker shutdown", b.task).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_without_a_handshake_is_closed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(&dir.path().join("pki"));
    let timeout = Duration::from_millis(500);
    let config = Config {
        tls_handshake_timeout: timeout,
        ..Config::default()
    };
    let b = start_both(config, &pki).await;
    let opened = Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", b.tls))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = within("the silent socket to be closed", s.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        opened.elapsed() >= timeout,
        "closed after {:?}",
        opened.elapsed()
    );
    until("the timeout to be counted", || {
        b.handle.stats().tls_failures == 1 && b.handle.stats().sockets == 0
    })
    .await;
    let _ = b.stop.send(());
    within("broker shutdown", b.task).await.unwrap();
}
