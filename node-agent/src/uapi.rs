//! The userspace WireGuard control socket (the cross-platform UAPI of wireguard.com/xplatform,
//! `/var/run/wireguard/IFACE.sock`), for the one thing `wg` cannot hand a userspace
//! implementation: an endpoint scoped to an interface (`[fe80::1%mesh0]:51820`, a neighbour
//! heard over the air). `wg` resolves the scope and prints it back as an interface *name*,
//! which boringtun's address parser refuses (`errno=-22`); written here with the interface
//! *index* (`[fe80::1%7]:51820`) it is accepted. Kernel WireGuard takes `wg set` as it is.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use base64::Engine as _;

/// Folder of the control sockets (as `wg` looks for them).
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// `[ADDR%NAME]:PORT` → `[ADDR%INDEX]:PORT`, with the index of interface NAME from sysfs.
pub fn numeric_scope(endpoint: &str) -> Option<String> {
    let (host, port) = endpoint.strip_prefix('[')?.split_once("]:")?;
    let (addr, scope) = host.split_once('%')?;
    if scope.is_empty() || scope.contains('/') || scope.starts_with('.') {
        return None;
    }
    let idx: u32 = std::fs::read_to_string(format!("/sys/class/net/{scope}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(format!("[{addr}%{idx}]:{port}"))
}

/// The `set=1` request that makes `public_key` (base64) the peer of an interface, reached at
/// `endpoint`, with any address allowed and a keepalive of `keepalive` seconds.
pub fn set_peer_request(
    public_key: &str,
    endpoint: &str,
    keepalive: &str,
) -> Result<String, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(public_key)
        .map_err(|e| format!("public key {public_key}: {e}"))?;
    if raw.len() != 32 {
        return Err(format!("public key {public_key}: not 32 bytes"));
    }
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "set=1\npublic_key={hex}\nendpoint={endpoint}\npersistent_keepalive_interval={keepalive}\nreplace_allowed_ips=true\nallowed_ip=::/0\nallowed_ip=0.0.0.0/0\n\n"
    ))
}

/// Sends `request` to the control socket of `iface`; fails unless it answers `errno=0`.
pub fn send(iface: &str, request: &str) -> Result<(), String> {
    let path = format!("{SOCKET_DIR}/{iface}.sock");
    let mut s = UnixStream::connect(&path).map_err(|e| format!("{path}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(request.as_bytes())
        .map_err(|e| format!("{path}: {e}"))?;
    let mut answer = String::new();
    let mut buf = [0u8; 256];
    while !answer.contains("\n\n") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    if answer.lines().any(|l| l == "errno=0") {
        Ok(())
    } else {
        Err(format!("{path} refused the peer: {}", answer.trim()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_and_scopes() {
        let r = set_peer_request(
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "[fe80::1%3]:51820",
            "15",
        )
        .unwrap();
        assert!(r.starts_with("set=1\npublic_key=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\nendpoint=[fe80::1%3]:51820\n"));
        assert!(r.ends_with("allowed_ip=0.0.0.0/0\n\n"));
        assert!(set_peer_request("short", "x", "15").is_err());
        let lo = std::fs::read_to_string("/sys/class/net/lo/ifindex").unwrap();
        assert_eq!(
            numeric_scope("[fe80::1%lo]:51820"),
            Some(format!("[fe80::1%{}]:51820", lo.trim()))
        );
        assert_eq!(numeric_scope("[fe80::1%../x]:1"), None);
        assert_eq!(numeric_scope("10.0.0.1:1"), None);
        assert_eq!(numeric_scope("[fe80::1%nosuchif0]:1"), None);
    }
}
