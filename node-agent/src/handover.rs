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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sidenet_wire::messages::{Probe, ServiceRoute};
use tokio::sync::watch;

use crate::probe::{Handover, ProbePlan, Service};

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
    loop {
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
