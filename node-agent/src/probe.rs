//! Pathfinder probes: small UDP echo probes over the side-net.
//!
//! Every agent answers probes on one UDP port (6699 unless the config says otherwise; the
//! firewall admits it on side-net interfaces only), echoing the packet back unchanged and no
//! larger than it came. Every agent sends one probe per interval to each target of its config's
//! `etc/sidenet/probes`: its WireGuard neighbours over their own link (`fe80::..%sn-..`) and the
//! mesh gateways across the side-net. For each target it keeps the last [`WINDOW`] probes and
//! reports the median round-trip time and the lost fraction; a probe counts as lost when no
//! answer came within [`TIMEOUT`] (or the interval, if shorter).
//!
//! Probe format: `SNP1` ‖ 8-byte nonce of this agent run ‖ 4-byte sequence number (16 bytes).

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sidenet_wire::messages::Probe;
use tokio::net::UdpSocket;
use tokio::sync::watch;

const MAGIC: &[u8; 4] = b"SNP1";
/// Probes kept per target.
pub const WINDOW: usize = 10;
/// A probe without an answer after this long is lost.
pub const TIMEOUT: Duration = Duration::from_secs(1);

/// One target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Node id.
    pub node: String,
    /// `neighbour` or `gateway`.
    pub kind: String,
    /// Address, with `%IFACE` for link-local ones.
    pub address: String,
}

/// What to probe, from `etc/sidenet/probes`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbePlan {
    /// Port every agent answers on.
    pub port: u16,
    /// Targets.
    pub targets: Vec<Target>,
    /// Handover thresholds (`handover` line), when the node routes to published services.
    pub handover: Option<Handover>,
    /// Services other nodes publish (`service` lines), for [`crate::handover`].
    pub services: Vec<Service>,
    /// The mesh has internet gateways (`internet` line), for [`crate::handover::lan_default`].
    pub internet: Option<Internet>,
}

/// `internet from PREFIX table TABLE priority PRIORITY`: babel may install the gateways'
/// `default from PREFIX`; the agent copies its next hop into table TABLE (without the source),
/// which a rule of PRIORITY, after the main table's, lets the LAN use (`docs/dataplane.md`,
/// "Gateways that route").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Internet {
    /// The mesh prefix (the source prefix of the gateways' route).
    pub from: (Ipv6Addr, u8),
    /// The table of the copy.
    pub table: u32,
    /// The priority of the rule into it.
    pub priority: u32,
}

/// `handover loss PERCENT latency MS good ROUNDS bad ROUNDS table TABLE priority PRIORITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// Highest loss of a good round, percent.
    pub loss: u32,
    /// Highest median round-trip time of a good round, ms.
    pub latency: u32,
    /// Good rounds in a row before a service moves to the side-net.
    pub good: u32,
    /// Bad rounds in a row before it moves back to the internet.
    pub bad: u32,
    /// The table babeld installs the service routes in.
    pub table: u32,
    /// The priority of the rules into it.
    pub priority: u32,
}

/// `service NAME OWNER PREFIX...`: a service another node publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Its name.
    pub name: String,
    /// Its owner's node id (probed through an `owner` target).
    pub node: String,
    /// Its IPv6 prefixes.
    pub prefixes: Vec<String>,
}

impl ProbePlan {
    /// Parses the probes file: `port N`, `neighbour NODE ADDR%IFACE`, `gateway NODE ADDR`,
    /// `owner NODE ADDR`, `handover ...`, `service NAME NODE PREFIX...`, `internet ...`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut plan = ProbePlan {
            port: 6699,
            ..Default::default()
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["port", p] => {
                    plan.port = p
                        .parse()
                        .map_err(|_| format!("probes line {}: bad port {p:?}", n + 1))?;
                }
                [
                    "handover",
                    "loss",
                    l,
                    "latency",
                    m,
                    "good",
                    g,
                    "bad",
                    b,
                    "table",
                    t,
                    "priority",
                    p,
                ] => {
                    let n = |s: &str| {
                        s.parse::<u32>()
                            .map_err(|_| format!("probes line {}: bad number {s:?}", n + 1))
                    };
                    plan.handover = Some(Handover {
                        loss: n(l)?,
                        latency: n(m)?,
                        good: n(g)?.max(1),
                        bad: n(b)?.max(1),
                        table: n(t)?,
                        priority: n(p)?,
                    });
                }
                ["internet", "from", prefix, "table", t, "priority", p] => {
                    let bad = || format!("probes line {}: cannot read {line:?}", n + 1);
                    let (a, l) = prefix.split_once('/').ok_or_else(bad)?;
                    plan.internet = Some(Internet {
                        from: (
                            a.parse().map_err(|_| bad())?,
                            l.parse().ok().filter(|l| *l <= 128).ok_or_else(bad)?,
                        ),
                        table: t.parse().map_err(|_| bad())?,
                        priority: p.parse().map_err(|_| bad())?,
                    });
                }
                ["service", name, node, prefixes @ ..] if !prefixes.is_empty() => {
                    for p in prefixes {
                        let ok = p.split_once('/').is_some_and(|(a, l)| {
                            a.parse::<Ipv6Addr>().is_ok() && l.parse::<u8>().is_ok_and(|l| l <= 128)
                        });
                        if !ok {
                            return Err(format!("probes line {}: bad prefix {p:?}", n + 1));
                        }
                    }
                    plan.services.push(Service {
                        name: name.to_string(),
                        node: node.to_string(),
                        prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
                    });
                }
                [kind @ ("neighbour" | "gateway" | "owner"), node, addr] => {
                    resolve(addr, 1)
                        .ok_or_else(|| format!("probes line {}: bad address {addr:?}", n + 1))?;
                    plan.targets.push(Target {
                        node: node.to_string(),
                        kind: kind.to_string(),
                        address: addr.to_string(),
                    });
                }
                _ => return Err(format!("probes line {}: cannot read {line:?}", n + 1)),
            }
        }
        Ok(plan)
    }
}

fn ifindex(iface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `addr` (`fe80::1%sn-x` or `fd00::1` or `10.0.0.1`) with `port`. `None` if it does not parse
/// or its interface does not exist.
fn resolve(addr: &str, port: u16) -> Option<SocketAddr> {
    if let Some((ip, iface)) = addr.split_once('%') {
        let ip: Ipv6Addr = ip.parse().ok()?;
        // Parsing only (plan check): any scope will do.
        let scope = if port == 1 { 0 } else { ifindex(iface)? };
        return Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)));
    }
    let ip: IpAddr = addr.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

#[derive(Debug, Default)]
struct Track {
    /// Completed probes: `Some(rtt)` or `None` (lost).
    done: VecDeque<Option<Duration>>,
    /// Sent, unanswered: seq → when.
    out: BTreeMap<u32, Instant>,
}

impl Track {
    fn push(&mut self, r: Option<Duration>) {
        self.done.push_back(r);
        while self.done.len() > WINDOW {
            self.done.pop_front();
        }
    }

    fn expire(&mut self, now: Instant, timeout: Duration) {
        let late: Vec<u32> = self
            .out
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= timeout)
            .map(|(s, _)| *s)
            .collect();
        for s in late {
            self.out.remove(&s);
            self.push(None);
        }
    }

    fn report(&self, t: &Target) -> Option<Probe> {
        if self.done.is_empty() {
            return None;
        }
        let mut rtts: Vec<f64> = self
            .done
            .iter()
            .flatten()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        rtts.sort_by(f64::total_cmp);
        let lost = self.done.iter().filter(|d| d.is_none()).count();
        Some(Probe {
            target: t.address.clone(),
            rtt_ms: (!rtts.is_empty()).then(|| (rtts[rtts.len() / 2] * 1000.0).round() / 1000.0),
            loss: lost as f64 / self.done.len() as f64,
            node: Some(t.node.clone()),
            kind: Some(t.kind.clone()),
            sent: self.done.len() as u32,
        })
    }
}

/// Shared latest results.
pub type Results = Arc<Mutex<Vec<Probe>>>;

async fn bind(port: u16) -> Option<UdpSocket> {
    match UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("probe responder cannot bind UDP port {port}: {e}");
            None
        }
    }
}

async fn recv_on(sock: &Option<UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// Answers and sends probes until `plan` is closed. Results land in `results`.
pub async fn run(
    mut plan: watch::Receiver<Option<ProbePlan>>,
    results: Results,
    interval: Duration,
) {
    let mut nonce = [0u8; 8];
    let _ = getrandom::fill(&mut nonce);
    let timeout = TIMEOUT.min(interval);
    let mut responder: Option<UdpSocket> = None;
    let mut responder_port = 0;
    let sender = bind(0).await;
    let mut tracks: BTreeMap<String, Track> = BTreeMap::new();
    let mut seq: u32 = 0;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expire = tokio::time::interval(Duration::from_millis(100));
    let mut rbuf = [0u8; 64];
    let mut sbuf = [0u8; 64];
    loop {
        let current = plan.borrow().clone();
        let port = current.as_ref().map_or(0, |p| p.port);
        if port != responder_port {
            responder = if port == 0 { None } else { bind(port).await };
            responder_port = port;
        }
        tokio::select! {
            changed = plan.changed() => {
                if changed.is_err() {
                    return;
                }
                let keep: Vec<String> = plan
                    .borrow()
                    .as_ref()
                    .map(|p| p.targets.iter().map(|t| t.address.clone()).collect())
                    .unwrap_or_default();
                tracks.retain(|k, _| keep.contains(k));
            }
            r = recv_on(&responder, &mut rbuf) => {
                if let (Ok((n, from)), Some(s)) = (r, &responder)
                    && n == 16 && &rbuf[..4] == MAGIC
                {
                    let _ = s.send_to(&rbuf[..n], from).await;
                }
            }
            r = recv_on(&sender, &mut sbuf) => {
                if let Ok((16, _)) = r
                    && &sbuf[..4] == MAGIC && sbuf[4..12] == nonce
                {
                    let s = u32::from_be_bytes([sbuf[12], sbuf[13], sbuf[14], sbuf[15]]);
                    for tr in tracks.values_mut() {
                        if let Some(t0) = tr.out.remove(&s) {
                            tr.push(Some(t0.elapsed()));
                            break;
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let Some((p, Some(sock))) = current.as_ref().map(|p| (p, sender.as_ref())) else {
                    continue;
                };
                for t in &p.targets {
                    seq = seq.wrapping_add(1);
                    let tr = tracks.entry(t.address.clone()).or_default();
                    let Some(to) = resolve(&t.address, p.port) else {
                        // Interface gone: the link is down, the probe is lost.
                        tr.push(None);
                        continue;
                    };
                    let mut pkt = [0u8; 16];
                    pkt[..4].copy_from_slice(MAGIC);
                    pkt[4..12].copy_from_slice(&nonce);
                    pkt[12..].copy_from_slice(&seq.to_be_bytes());
                    tr.out.insert(seq, Instant::now());
                    if sock.send_to(&pkt, to).await.is_err() {
                        // No route: counted as lost when it times out.
                    }
                }
            }
            _ = expire.tick() => {
                let now = Instant::now();
                for tr in tracks.values_mut() {
                    tr.expire(now, timeout);
                }
                let out: Vec<Probe> = current
                    .as_ref()
                    .map(|p| {
                        p.targets
                            .iter()
                            .filter_map(|t| tracks.get(&t.address)?.report(t))
                            .collect()
                    })
                    .unwrap_or_default();
                *results.lock().unwrap_or_else(|e| e.into_inner()) = out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rendered_file() {
        let text = "# Managed by sidenet\nport 6699\nneighbour peerb fe80::1%lo\ngateway gw fdfc:b395:f348:1::1\n";
        let p = ProbePlan::parse(text).unwrap_or_default();
        assert_eq!(p.port, 6699);
        assert_eq!(p.targets.len(), 2);
        assert_eq!(p.targets[0].kind, "neighbour");
        assert_eq!(p.targets[1].address, "fdfc:b395:f348:1::1");
        assert!(ProbePlan::parse("neighbour x not-an-address").is_err());
        assert!(ProbePlan::parse("port many").is_err());
        assert!(ProbePlan::parse("gossip x y").is_err());
        let p = ProbePlan::parse("internet from fdfc:b395:f348::/48 table 122 priority 32800")
            .unwrap_or_default();
        assert_eq!(
            p.internet,
            Some(Internet {
                from: (
                    "fdfc:b395:f348::".parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
                    48
                ),
                table: 122,
                priority: 32800,
            })
        );
        assert!(ProbePlan::parse("internet from fdfc::/129 table 122 priority 1").is_err());
        assert!(ProbePlan::parse("internet from fdfc::/48 table x priority 1").is_err());
    }

    #[test]
    fn windows_report_median_and_loss() {
        let t = Target {
            node: "n".into(),
            kind: "gateway".into(),
            address: "fd00::1".into(),
        };
        let mut tr = Track::default();
        assert_eq!(tr.report(&t), None);
        for ms in [5, 1, 3] {
            tr.push(Some(Duration::from_millis(ms)));
        }
        tr.push(None);
        let r = tr.report(&t).unwrap_or_else(|| Probe {
            target: String::new(),
            rtt_ms: None,
            loss: 9.0,
            node: None,
            kind: None,
            sent: 0,
        });
        assert_eq!(r.rtt_ms, Some(3.0));
        assert_eq!(r.loss, 0.25);
        assert_eq!(r.sent, 4);
        for _ in 0..WINDOW {
            tr.push(None);
        }
        let r = tr.report(&t);
        assert_eq!(r.as_ref().map(|r| r.loss), Some(1.0));
        assert_eq!(r.and_then(|r| r.rtt_ms), None);
    }

    #[tokio::test]
    async fn probes_a_responder_and_counts_silence_as_loss()
    -> Result<(), Box<dyn std::error::Error>> {
        // The agent answers its own probes on ::1; 100::1 (the discard prefix) never answers.
        let port = {
            let s = std::net::UdpSocket::bind("[::1]:0")?;
            s.local_addr()?.port()
        };
        let plan = ProbePlan::parse(&format!(
            "port {port}\ngateway self ::1\nneighbour void 100::1\n"
        ))?;
        let (_tx, rx) = watch::channel(Some(plan));
        let results: Results = Arc::default();
        let task = tokio::spawn(run(rx, results.clone(), Duration::from_millis(50)));
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            let r = results.lock().map(|r| r.clone()).unwrap_or_default();
            if r.len() == 2 && r.iter().all(|p| p.sent >= 3) {
                break r;
            }
            assert!(Instant::now() < deadline, "no probe results: {r:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        task.abort();
        assert_eq!(got[0].node.as_deref(), Some("self"));
        assert_eq!(got[0].loss, 0.0, "{got:?}");
        assert!(got[0].rtt_ms.is_some());
        assert_eq!(got[1].node.as_deref(), Some("void"));
        assert_eq!(got[1].kind.as_deref(), Some("neighbour"));
        assert_eq!(got[1].loss, 1.0, "{got:?}");
        assert_eq!(got[1].rtt_ms, None);
        Ok(())
    }
}
