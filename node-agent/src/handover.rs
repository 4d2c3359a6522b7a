//! Handover (`docs/dataplane.md`, "Handover"): for each service another node publishes, send its
//! traffic over the side-net while the pathfinder probes to the owner are good, else over the
//! internet.
//!
//! The controller renders everything else: babeld installs the routes to the services' prefixes
//! in their own table (`install ... table T`), never in the main one. This module only adds or
//! removes one `ip -6 rule to PREFIX lookup T priority P` per prefix: with the rule, traffic
//! for the service looks in table T first (and falls through to the main table, the internet,
//! when babel has no route there); without it, the main table decides.
//!
//! Every probe interval is one round: the owner's probe window (its last
//! [`crate::probe::WINDOW`] probes) is good when its loss is at most the threshold and its
//! median round-trip time at most the latency threshold. A service moves to the side-net after
//! `good` good rounds in a row and back to the internet after `bad` bad rounds in a row.
//!
//! In a mesh with internet gateways (`docs/dataplane.md`, "Gateways that route") the same loop
//! keeps [`lan_default`]: babel's `default from MESH`, which only the node's side-net address
//! can use, copied without the source into a table of its own for the LAN.

use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sidenet_wire::messages::{Probe, ServiceRoute};
use tokio::sync::watch;

use crate::probe::{Handover, Internet, ProbePlan, Service};

/// `side-net`.
pub const SIDE_NET: &str = "side-net";
/// `internet`.
pub const INTERNET: &str = "internet";

/// The states the status reports carry.
pub type States = Arc<Mutex<Vec<ServiceRoute>>>;

/// One service's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The route as reported.
    pub route: ServiceRoute,
    good: u32,
    bad: u32,
}

impl State {
    /// A service starts on the internet.
    pub fn new(s: &Service, now: u64) -> Self {
        Self {
            route: ServiceRoute {
                name: s.name.clone(),
                node: s.node.clone(),
                prefixes: s.prefixes.clone(),
                via: INTERNET.to_string(),
                since: now,
                why: "no probe round yet".to_string(),
            },
            good: 0,
            bad: 0,
        }
    }

    /// Whether the side-net is used now.
    pub fn on_side_net(&self) -> bool {
        self.route.via == SIDE_NET
    }

    /// One round with the owner's probe window (`None`: no probe result yet). Returns true
    /// when the path changes.
    pub fn round(&mut self, h: &Handover, probe: Option<&Probe>, now: u64) -> bool {
        let (good, figures) = judge(h, probe);
        if good {
            self.good = self.good.saturating_add(1);
            self.bad = 0;
        } else {
            self.bad = self.bad.saturating_add(1);
            self.good = 0;
        }
        let switch = if self.on_side_net() {
            (self.bad >= h.bad).then(|| {
                (
                    INTERNET,
                    format!("{figures} for {} rounds in a row", self.bad),
                )
            })
        } else {
            (self.good >= h.good).then(|| {
                (
                    SIDE_NET,
                    format!("{figures} for {} rounds in a row", self.good),
                )
            })
        };
        match switch {
            Some((via, why)) => {
                self.route.via = via.to_string();
                self.route.since = now;
                self.route.why = why;
                true
            }
            None => false,
        }
    }
}

/// Whether one round is good, and its figures in words.
fn judge(h: &Handover, probe: Option<&Probe>) -> (bool, String) {
    let Some(p) = probe.filter(|p| p.sent > 0) else {
        return (false, "no probe results".to_string());
    };
    let loss = (p.loss * 100.0).round() as u32;
    match p.rtt_ms {
        None => (false, format!("no answer to {} probes", p.sent)),
        Some(_) if loss > h.loss => (
            false,
            format!("loss {loss}% > {}% of {} probes", h.loss, p.sent),
        ),
        Some(r) if r > f64::from(h.latency) => (false, format!("rtt {r:.1} ms > {} ms", h.latency)),
        Some(r) => (
            true,
            format!(
                "loss {loss}% <= {}%, rtt {r:.1} ms <= {} ms",
                h.loss, h.latency
            ),
        ),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `ip -6 rule ARGS...`; true when it succeeded.
fn ip_rule(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(["-6", "rule"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Removes every rule of `priority` (left by an earlier run, or for services gone).
fn flush(priority: u32) {
    let p = priority.to_string();
    for _ in 0..256 {
        if !ip_rule(&["del", "priority", &p]) {
            break;
        }
    }
}

fn set_rules(h: &Handover, s: &Service, on: bool) -> bool {
    let (t, p) = (h.table.to_string(), h.priority.to_string());
    let mut ok = true;
    for prefix in &s.prefixes {
        let args = ["to", prefix.as_str(), "lookup", &t, "priority", &p];
        if on {
            ok &= ip_rule(&[&["add"][..], &args[..]].concat());
        } else {
            // Gone already is fine.
            ip_rule(&[&["del"][..], &args[..]].concat());
        }
    }
    ok
}

/// `ip -6 ARGS...`'s output (empty when it failed).
fn ip6(args: &[&str]) -> String {
    std::process::Command::new("ip")
        .arg("-6")
        .args(args)
        .stderr(std::process::Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The next hop (`via`, `dev`) of the first `default` route in `ip -6 route show` output whose
/// source prefix is `from` (`None`: a route without one).
fn default_hop(text: &str, from: Option<(Ipv6Addr, u8)>) -> Option<(String, String)> {
    text.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let get = |k: &str| w.windows(2).find(|p| p[0] == k).map(|p| p[1]);
        let src = get("from").map(|s| {
            s.split_once('/')
                .and_then(|(a, l)| Some((a.parse().ok()?, l.parse().ok()?)))
        });
        let same = match (src, from) {
            (None, None) => true,
            (Some(s), Some(f)) => s == Some(f),
            _ => false,
        };
        (w.first() == Some(&"default") && same)
            .then(|| Some((get("via")?.to_string(), get("dev")?.to_string())))
            .flatten()
    })
}

/// Copies babel's route `default from MESH` (through the nearest gateway) into the table of
/// `i` without the source, or removes the copy when babel has none. Traffic from the LAN (not
/// from a mesh address, so the main table has no route for it when the node has no default
/// route of its own) finds it there through the rule of [`lan_rule`] and leaves over the
/// side-net with the node's address (NAT66).
pub fn lan_default(i: &Internet) {
    let t = i.table.to_string();
    let want = default_hop(&ip6(&["route", "show", "proto", "babel"]), Some(i.from));
    let have = default_hop(&ip6(&["route", "show", "table", &t]), None);
    if want == have {
        return;
    }
    match &want {
        Some((via, dev)) => {
            ip6(&[
                "route", "replace", "default", "via", via, "dev", dev, "table", &t,
            ]);
        }
        None => {
            ip6(&["route", "flush", "table", &t]);
        }
    }
    tracing::info!("LAN default route over the side-net: {want:?}");
}

/// Sets (or removes) the rule of `i`: after the main table, look in its table.
fn lan_rule(i: &Internet, on: bool) {
    flush(i.priority);
    let (t, p) = (i.table.to_string(), i.priority.to_string());
    if on {
        ip_rule(&["add", "lookup", &t, "priority", &p]);
        lan_default(i);
    } else {
        ip6(&["route", "flush", "table", &t]);
    }
}

/// Runs handover for the services of `plan` until it is closed, one round per `interval`,
/// publishing the states to `states`.
pub async fn run(
    mut plan: watch::Receiver<Option<ProbePlan>>,
    probes: crate::probe::Results,
    states: States,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current: Option<(Handover, Vec<Service>)> = None;
    let mut flushed: Option<u32> = None;
    let mut mine: Vec<State> = Vec::new();
    let mut lan: Option<Internet> = None;
    loop {
        let want_lan = plan.borrow().as_ref().and_then(|p| p.internet.clone());
        if want_lan != lan {
            if let Some(old) = &lan {
                lan_rule(old, false);
            }
            if let Some(new) = &want_lan {
                lan_rule(new, true);
            }
            lan = want_lan;
        }
        let want = plan
            .borrow()
            .as_ref()
            .and_then(|p| p.handover.map(|h| (h, p.services.clone())));
        if want != current {
            // A new plan: start over from the internet for every service (rules of the old
            // priority removed); services that stay keep their state and rules.
            if let Some((old, _)) = &current
                && want
                    .as_ref()
                    .is_none_or(|(h, _)| h.priority != old.priority || h.table != old.table)
            {
                flush(old.priority);
                mine.clear();
            }
            if let Some((h, services)) = &want {
                if flushed != Some(h.priority) {
                    flush(h.priority);
                    flushed = Some(h.priority);
                    mine.clear();
                }
                for st in &mine {
                    let kept = services.iter().any(|s| {
                        s.name == st.route.name
                            && s.node == st.route.node
                            && s.prefixes == st.route.prefixes
                    });
                    if !kept && st.on_side_net() {
                        let s = Service {
                            name: st.route.name.clone(),
                            node: st.route.node.clone(),
                            prefixes: st.route.prefixes.clone(),
                        };
                        set_rules(h, &s, false);
                    }
                }
                let t = now();
                mine = services
                    .iter()
                    .map(|s| {
                        mine.iter()
                            .find(|st| {
                                st.route.name == s.name
                                    && st.route.node == s.node
                                    && st.route.prefixes == s.prefixes
                            })
                            .cloned()
                            .unwrap_or_else(|| State::new(s, t))
                    })
                    .collect();
            } else {
                mine.clear();
            }
            current = want;
            *states.lock().unwrap_or_else(|e| e.into_inner()) =
                mine.iter().map(|s| s.route.clone()).collect();
        }
        tokio::select! {
            changed = plan.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tick.tick() => {
                if let Some(i) = &lan {
                    lan_default(i);
                }
                let Some((h, services)) = &current else { continue };
                let results = probes.lock().map(|p| p.clone()).unwrap_or_default();
                let t = now();
                for (st, s) in mine.iter_mut().zip(services) {
                    let probe = results
                        .iter()
                        .find(|p| p.kind.as_deref() == Some("owner") && p.node.as_deref() == Some(s.node.as_str()));
                    let was = st.clone();
                    if st.round(h, probe, t) {
                        if !set_rules(h, s, st.on_side_net()) {
                            set_rules(h, s, false);
                            *st = was;
                            st.route.why = "ip -6 rule failed".to_string();
                            tracing::warn!("handover of {}: ip -6 rule failed", s.name);
                        } else {
                            tracing::info!("handover: {} via {}: {}", s.name, st.route.via, st.route.why);
                        }
                    }
                }
                *states.lock().unwrap_or_else(|e| e.into_inner()) =
                    mine.iter().map(|s| s.route.clone()).collect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Handover = Handover {
        loss: 25,
        latency: 150,
        good: 3,
        bad: 2,
        table: 2121,
        priority: 2121,
    };

    fn probe(loss: f64, rtt: Option<f64>) -> Probe {
        Probe {
            target: "fd00::1".into(),
            rtt_ms: rtt,
            loss,
            node: Some("c".into()),
            kind: Some("owner".into()),
            sent: 10,
        }
    }

    #[test]
    fn finds_the_default_route_of_a_source() {
        let main = "fd23:1:1:1::/64 via fe80::1 dev sn-a proto babel metric 1024 onlink pref medium\n\
                    default from fd23:1::/48 via fe80::2 dev sn-b proto babel metric 1024 onlink pref medium\n";
        let mesh = ("fd23:1:0::".parse().unwrap_or(Ipv6Addr::UNSPECIFIED), 48);
        assert_eq!(
            default_hop(main, Some(mesh)),
            Some(("fe80::2".to_string(), "sn-b".to_string()))
        );
        assert_eq!(default_hop(main, None), None);
        assert_eq!(default_hop(main, Some((mesh.0, 56))), None);
        let table = "default via fe80::2 dev sn-b metric 1024 pref medium\n";
        assert_eq!(
            default_hop(table, None),
            Some(("fe80::2".to_string(), "sn-b".to_string()))
        );
    }

    #[test]
    fn hysteresis_in_both_directions() {
        let s = Service {
            name: "web".into(),
            node: "c".into(),
            prefixes: vec!["2001:db8::80/128".into()],
        };
        let mut st = State::new(&s, 100);
        let good = probe(0.1, Some(2.0));
        let lossy = probe(0.3, Some(2.0));
        let slow = probe(0.0, Some(200.0));
        assert!(!st.round(&H, None, 101));
        assert!(!st.round(&H, Some(&good), 102));
        assert!(!st.round(&H, Some(&good), 103));
        // A bad round resets the count of good ones.
        assert!(!st.round(&H, Some(&slow), 104));
        assert!(!st.round(&H, Some(&good), 105));
        assert!(!st.round(&H, Some(&good), 106));
        assert!(st.round(&H, Some(&good), 107));
        assert_eq!((st.route.via.as_str(), st.route.since), (SIDE_NET, 107));
        assert!(st.route.why.contains("for 3 rounds"), "{}", st.route.why);
        // One bad round between good ones changes nothing.
        for t in 108..120 {
            let p = if t % 2 == 0 { &lossy } else { &good };
            assert!(!st.round(&H, Some(p), t));
        }
        assert!(!st.round(&H, Some(&lossy), 120));
        assert!(st.round(&H, Some(&probe(1.0, None)), 121));
        assert_eq!((st.route.via.as_str(), st.route.since), (INTERNET, 121));
        assert_eq!(st.route.why, "no answer to 10 probes for 2 rounds in a row");
    }
}
