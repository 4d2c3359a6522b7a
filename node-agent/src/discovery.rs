//! Neighbours over the air: the agent's discovery beacons ([`sidenet_wire::beacon`]).
//!
//! Every `--beacon-interval` seconds the agent sends one signed beacon from each of its
//! `--underlay` interfaces to `ff02::1` port [`PORT`] (link-local source, hop limit 1). It
//! listens on `[::]:`[`PORT`] and keeps, per (sender, interface), the last beacon it accepted:
//! the sender's link-local address (the beacon's source), its WireGuard key and when it was
//! heard. The status report carries every sender heard within the hold time (`--beacon-hold`,
//! default 8 s: four beacons in a row lost) as [`Heard`]; the controller pairs two nodes that
//! hear each other. Interfaces without IPv6 (wired links with IPv4 subnets) send and receive
//! nothing: those links pair by subnet.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sidenet_wire::NodeKey;
use sidenet_wire::beacon::{Beacon, PORT};
use sidenet_wire::messages::Heard;

/// What the receiver remembers of one sender on one interface.
#[derive(Debug, Clone)]
struct Entry {
    address: Ipv6Addr,
    public_key: String,
    stamp: (u64, u64),
    at: Instant,
}

/// Who receives: the mesh and node id beacons must be for and not from.
#[derive(Debug, Clone, Copy)]
pub struct Receiver<'a> {
    /// Mesh name.
    pub mesh: &'a str,
    /// This node's id.
    pub node: &'a str,
}

/// The neighbours heard, by (node id, interface).
#[derive(Debug, Default)]
pub struct Table {
    entries: BTreeMap<(String, String), Entry>,
}

impl Table {
    /// Takes in a frame that arrived on `iface` from `src`; whether it was accepted.
    pub fn receive(
        &mut self,
        frame: &[u8],
        src: Ipv6Addr,
        iface: &str,
        me: &Receiver<'_>,
        now: u64,
        at: Instant,
    ) -> Result<(), String> {
        let Receiver { mesh, node: me } = *me;
        if src.segments()[0] & 0xffc0 != 0xfe80 {
            return Err(format!("from {src}, not a link-local address"));
        }
        let b = Beacon::open(frame).map_err(|e| e.to_string())?;
        let key = (b.node(), iface.to_string());
        let last = self.entries.get(&key).map(|e| e.stamp);
        b.accept(mesh, me, now, last).map_err(|e| e.to_string())?;
        self.entries.insert(
            key,
            Entry {
                address: src,
                public_key: base64::engine::general_purpose::STANDARD.encode(b.wireguard),
                stamp: (b.time, b.seq),
                at,
            },
        );
        Ok(())
    }

    /// The neighbours heard within `hold` before `now`, sorted; older ones are forgotten.
    pub fn heard(&mut self, now: Instant, hold: Duration) -> Vec<Heard> {
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.at) <= hold);
        self.entries
            .iter()
            .map(|((node, iface), e)| Heard {
                node: node.clone(),
                interface: iface.clone(),
                address: e.address.to_string(),
                public_key: e.public_key.clone(),
            })
            .collect()
    }
}

/// Shared between the discovery task and the shell.
pub type Shared = Arc<Mutex<Table>>;

/// What the discovery task needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Mesh name.
    pub mesh: String,
    /// Interfaces to send on and listen to.
    pub ifaces: Vec<String>,
    /// The node's WireGuard public key (base64).
    pub wireguard: String,
    /// Seconds between beacons.
    pub interval: Duration,
}

/// The interface index of `name` (from sysfs), if it exists.
fn ifindex(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends and receives beacons until the task is aborted.
pub async fn run(settings: Settings, key: NodeKey, table: Shared) {
    let me = key.public().node_id();
    let mut wg = [0u8; 32];
    match base64::engine::general_purpose::STANDARD.decode(&settings.wireguard) {
        Ok(b) if b.len() == 32 => wg.copy_from_slice(&b),
        _ => {
            tracing::warn!("no WireGuard key to announce: not sending discovery beacons");
            return;
        }
    }
    let bind = SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT));
    let sock = loop {
        match tokio::net::UdpSocket::bind(bind).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!("discovery beacons: cannot listen on {bind}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    };
    let _ = sock.set_multicast_loop_v6(false);
    let mut tick = tokio::time::interval(settings.interval);
    let mut seq: u64 = 0;
    let mut buf = [0u8; 512];
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                names = settings
                    .ifaces
                    .iter()
                    .filter_map(|i| Some((ifindex(i)?, i.clone())))
                    .collect();
                let frame = Beacon {
                    mesh: settings.mesh.clone(),
                    node_key: key.public(),
                    wireguard: wg,
                    time: unix_now(),
                    seq,
                }
                .seal(&key);
                seq += 1;
                for (idx, name) in &names {
                    let dst = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), PORT, 0, *idx);
                    if let Err(e) = sock.send_to(&frame, dst).await {
                        // No IPv6 on this interface (a wired IPv4 link): nothing to discover.
                        tracing::debug!("beacon on {name}: {e}");
                    }
                }
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, SocketAddr::V6(src))) = r else { continue };
                let Some(iface) = names.get(&src.scope_id()) else { continue };
                let who = Receiver { mesh: &settings.mesh, node: &me };
                let res = table.lock().map_err(|e| e.to_string()).and_then(|mut t| {
                    t.receive(&buf[..n], *src.ip(), iface, &who, unix_now(), Instant::now())
                });
                if let Err(e) = res {
                    tracing::debug!("beacon from {src} on {iface}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(seed: u8, time: u64, seq: u64) -> (String, Vec<u8>) {
        let key = NodeKey::from_seed(&[seed; 32]);
        let b = Beacon {
            mesh: "riverside".into(),
            node_key: key.public(),
            wireguard: [seed; 32],
            time,
            seq,
        };
        (key.public().node_id(), b.seal(&key))
    }

    const R: &Receiver<'static> = &Receiver {
        mesh: "riverside",
        node: "me",
    };

    #[test]
    fn keeps_what_it_hears_refuses_replays_and_forgets_the_silent() {
        let mut t = Table::default();
        let t0 = Instant::now();
        let hold = Duration::from_secs(8);
        let ll: Ipv6Addr = "fe80::b".parse().unwrap();
        let (b, f1) = frame(2, 1000, 0);
        let (c, f2) = frame(3, 1000, 0);
        assert!(t.receive(&f1, ll, "mesh0", R, 1001, t0).is_ok());
        assert!(
            t.receive(&f2, "fe80::c".parse().unwrap(), "mesh0", R, 1001, t0)
                .is_ok()
        );
        // The same frame again is a replay; a global source is not a link neighbour.
        assert!(t.receive(&f1, ll, "mesh0", R, 1001, t0).is_err());
        let (_, f3) = frame(2, 1002, 1);
        assert!(
            t.receive(&f3, "2001:db8::b".parse().unwrap(), "mesh0", R, 1002, t0)
                .is_err()
        );
        let heard = t.heard(t0, hold);
        assert_eq!(heard.len(), 2);
        let mut want = [b.clone(), c.clone()];
        want.sort();
        assert_eq!(
            heard.iter().map(|h| h.node.clone()).collect::<Vec<_>>(),
            want
        );
        let hb = heard.iter().find(|h| h.node == b).unwrap();
        assert_eq!(hb.address, "fe80::b");
        assert_eq!(hb.interface, "mesh0");
        assert_eq!(
            hb.public_key,
            base64::engine::general_purpose::STANDARD.encode([2u8; 32])
        );
        // b keeps sending, c falls silent: after the hold time only b is left.
        let later = t0 + Duration::from_secs(6);
        assert!(t.receive(&f3, ll, "mesh0", R, 1006, later).is_ok());
        let heard = t.heard(t0 + Duration::from_secs(9), hold);
        assert_eq!(heard.len(), 1);
        assert_eq!(heard[0].node, b);
    }
}
