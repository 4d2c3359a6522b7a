//! `sidenet-controller check`: what the chart's `helm test` Pod runs (the controller image has no
//! shell and no curl). Each check names what it reached and what it got back.
//!
//! - `--http URL`: `GET` of an `http://HOST:PORT/PATH` URL must answer with status 200
//!   (the controller's `/readyz`).
//! - `--mqtt HOST:PORT`: an MQTT 3.1.1 `CONNECT` (client id `sidenet-check`, clean session, no
//!   credentials) must be answered with a `CONNACK`, whatever its return code: the port is the
//!   broker, not just an open port. The connection is closed right after.
//! - `--tcp HOST:PORT`: a TCP connection must be accepted (the TLS listener: the Pod has no CA to
//!   finish a handshake with).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: cannot resolve: {e}"))?
        .collect();
    let mut last = format!("{addr}: resolves to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_read_timeout(Some(timeout))
                    .and_then(|()| s.set_write_timeout(Some(timeout)))
                    .map_err(|e| format!("{addr}: {e}"))?;
                return Ok(s);
            }
            Err(e) => last = format!("{addr} ({a}): cannot connect: {e}"),
        }
    }
    Err(last)
}

/// `GET url` answers 200. Only `http://HOST:PORT/PATH`.
pub fn http_ok(url: &str, timeout: Duration) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: expected an http://HOST:PORT/PATH URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if !authority.contains(':') {
        return Err(format!(
            "{url}: expected an http://HOST:PORT/PATH URL (the port is missing)"
        ));
    }
    let mut s = connect(authority, timeout)?;
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    // One write: `write!` on the bare stream would send each piece of the format on its own,
    // and a server that answers after the first piece and closes makes the rest fail.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .map_err(|e| format!("{url}: cannot send the request: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("{url}: no answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.lines().next().unwrap_or_default().to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("{url}: answered {status:?}, expected status 200"))
    }
}

/// The CONNECT packet of `mqtt_connack`.
fn connect_packet() -> Vec<u8> {
    let client_id = b"sidenet-check";
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x0a];
    body.extend_from_slice(&u16::try_from(client_id.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(client_id);
    let mut p = vec![0x10, u8::try_from(body.len()).unwrap_or(0)];
    p.extend_from_slice(&body);
    p
}

/// An MQTT CONNECT to `addr` is answered with a CONNACK; returns its return code (0 accepted,
/// 4 bad user name or password, 5 not authorised, ...).
pub fn mqtt_connack(addr: &str, timeout: Duration) -> Result<u8, String> {
    let mut s = connect(addr, timeout)?;
    s.write_all(&connect_packet())
        .map_err(|e| format!("{addr}: cannot send an MQTT CONNECT: {e}"))?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)
        .map_err(|e| format!("{addr}: no MQTT CONNACK to a CONNECT: {e}"))?;
    if ack[0] != 0x20 || ack[1] != 0x02 {
        return Err(format!(
            "{addr}: answered {:02x} {:02x} to an MQTT CONNECT, expected a CONNACK (20 02)",
            ack[0], ack[1]
        ));
    }
    // DISCONNECT, so the broker does not log a dropped connection.
    let _ = s.write_all(&[0xe0, 0x00]);
    Ok(ack[3])
}

/// A TCP connection to `addr` is accepted.
pub fn tcp_open(addr: &str, timeout: Duration) -> Result<(), String> {
    connect(addr, timeout).map(drop)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::TcpListener;

    /// An HTTP server answering `status_line` to every connection, after reading the request
    /// head, for as long as the test process runs; returns its address.
    fn serve_once(status_line: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                // The whole request head first, as a server does (anything but a GET, such
                // as an MQTT CONNECT, is answered at once).
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                let http = |h: &[u8]| h.len() < 4 || h.starts_with(b"GET ");
                while http(&head) && !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 4096
                {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ =
                    s.write_all(format!("{status_line}\r\nContent-Length: 0\r\n\r\n").as_bytes());
            }
        });
        addr
    }

    #[test]
    fn http_ok_wants_status_200() {
        let t = Duration::from_secs(5);
        let a = serve_once("HTTP/1.1 200 OK");
        http_ok(&format!("http://{a}/readyz"), t).unwrap();
        let a = serve_once("HTTP/1.1 503 Service Unavailable");
        let e = http_ok(&format!("http://{a}/readyz"), t).unwrap_err();
        assert!(
            e.contains("503") && e.contains("expected status 200"),
            "{e}"
        );
    }

    #[test]
    fn a_port_that_is_not_a_broker_fails_the_mqtt_check() {
        let a = serve_once("HTTP/1.1 200 OK");
        let e = mqtt_connack(&a, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("expected a CONNACK"), "{e}");
    }

    #[test]
    fn the_connect_packet_is_mqtt_3_1_1() {
        let p = connect_packet();
        assert_eq!(p[0], 0x10);
        assert_eq!(usize::from(p[1]), p.len() - 2);
        assert_eq!(&p[2..9], b"\x00\x04MQTT\x04");
        assert_eq!(&p[p.len() - 13..], b"sidenet-check");
    }

    #[test]
    fn http_urls_without_a_port_or_scheme_are_refused() {
        let t = Duration::from_millis(100);
        assert!(
            http_ok("https://example.org:1/", t)
                .unwrap_err()
                .contains("http://HOST:PORT")
        );
        assert!(
            http_ok("http://localhost/readyz", t)
                .unwrap_err()
                .contains("port is missing")
        );
    }
}
