#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::reconcile::model::StatusRow;
use crate::reconcile::topology::{Thresholds, snapshot};
use sidenet_wire::messages::{Neighbour, Probe};

fn row(id: &str, sid: u16, links: &[(&str, u32, Option<f64>)]) -> StatusRow {
    StatusRow {
        node: id.into(),
        name: None,
        mesh: "m".into(),
        hostname: Some(id.into()),
        phase: "Ready".into(),
        reason: None,
        online: Some(true),
        desired: None,
        applied: None,
        last_seen: Some(100),
        address: Some(format!("fd12:3456:789a:{sid:x}::1")),
        failure: None,
        neighbours: links
            .iter()
            .map(|(to, cost, _)| Neighbour {
                address: "fe80::1".into(),
                interface: format!("sn-{to}"),
                node: Some((*to).into()),
                cost: Some(*cost),
            })
            .collect(),
        probes: links
            .iter()
            .map(|(to, _, rtt)| Probe {
                target: format!("fe80::1%sn-{to}"),
                rtt_ms: *rtt,
                loss: 0.0,
                node: Some((*to).into()),
                kind: Some("neighbour".into()),
                sent: 10,
            })
            .collect(),
        agent_version: None,
        agent_epoch: Some(1),
        missing: vec![],
        shaping: None,
        services: Vec::new(),
    }
}

/// A line a—b—c (cost 96 each, 10 ms and 20 ms) and a direct a—c of cost 500 and 5 ms; d has
/// no link; e has no address.
fn fleet(ab_rtt: f64) -> Snapshot {
    let mut e = row("e", 5, &[]);
    e.address = None;
    let rows = vec![
        row("a", 1, &[("b", 96, Some(ab_rtt)), ("c", 500, Some(5.0))]),
        row("b", 2, &[("a", 96, Some(ab_rtt)), ("c", 96, Some(20.0))]),
        row("c", 3, &[("b", 96, Some(20.0)), ("a", 500, Some(5.0))]),
        row("d", 4, &[]),
        e,
    ];
    snapshot(&rows, &[], 1, 100, &Thresholds::default())
}

#[test]
fn pids_are_nodes_with_a_prefix() {
    let m = network_map(&fleet(10.0));
    let map = m["network-map"].as_object().unwrap();
    assert_eq!(map.keys().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
    assert_eq!(
        m["network-map"]["c"],
        json!({"ipv6": ["fd12:3456:789a:3::/64"]})
    );
    assert_eq!(m["meta"]["vtag"]["resource-id"], "networkmap");
    let tag = m["meta"]["vtag"]["tag"].as_str().unwrap().to_string();
    assert_eq!(tag.len(), 32);
    // Same map, same tag, whatever the links; another map, another tag.
    assert_eq!(
        network_map(&fleet(80.0))["meta"]["vtag"]["tag"],
        tag.as_str()
    );
    let mut s = fleet(10.0);
    s.nodes.retain(|n| n.id != "d");
    assert_ne!(network_map(&s)["meta"]["vtag"]["tag"], tag.as_str());
}

#[test]
fn costs_follow_babels_route() {
    let s = fleet(10.0);
    let rc = cost_map(&s, &Policies::default(), Metric::RoutingCost, None);
    assert_eq!(rc["cost-map"]["a"], json!({"a": 0, "b": 96, "c": 192}));
    assert_eq!(rc["cost-map"]["d"], json!({"d": 0}));
    assert_eq!(rc["meta"]["cost-type"]["cost-metric"], "routingcost");
    assert_eq!(
        rc["meta"]["dependent-vtags"][0],
        network_map(&s)["meta"]["vtag"]
    );
    let rt = cost_map(&s, &Policies::default(), Metric::DelayRt, None);
    // a→c goes through b (96 + 96 < 500): 10 ms + 20 ms, not the direct 5 ms.
    assert_eq!(
        rt["cost-map"]["a"],
        json!({"a": 0, "b": 10_000, "c": 30_000})
    );
    // The a—b link slows down: the delay changes, the route does not.
    let slow = cost_map(&fleet(80.0), &Policies::default(), Metric::DelayRt, None);
    assert_eq!(slow["cost-map"]["a"]["c"], 100_000);
    // Babel's cost of a→b rises: a reaches c directly.
    let mut rows_cost = fleet(10.0);
    for l in &mut rows_cost.links {
        if l.source == "a" && l.target == "b" {
            l.cost = Some(1000);
        }
    }
    let rc = cost_map(&rows_cost, &Policies::default(), Metric::RoutingCost, None);
    assert_eq!(rc["cost-map"]["a"], json!({"a": 0, "b": 596, "c": 500}));
    let rt = cost_map(&rows_cost, &Policies::default(), Metric::DelayRt, None);
    assert_eq!(
        rt["cost-map"]["a"],
        json!({"a": 0, "b": 25_000, "c": 5_000})
    );
    // Unreachable (infinite cost, or babel does not list it): no entry.
    for l in &mut rows_cost.links {
        if l.source == "a" {
            l.cost = Some(BABEL_INFINITY);
        }
    }
    let rc = cost_map(&rows_cost, &Policies::default(), Metric::RoutingCost, None);
    assert_eq!(rc["cost-map"]["a"], json!({"a": 0}));
    // A hop with no probe result: no delay for the pair, the routing cost stays.
    let mut s = fleet(10.0);
    for l in &mut s.links {
        if l.source == "b" && l.target == "c" {
            l.rtt_ms = None;
        }
    }
    assert_eq!(
        cost_map(&s, &Policies::default(), Metric::DelayRt, None)["cost-map"]["a"],
        json!({"a": 0, "b": 10_000})
    );
    assert_eq!(
        cost_map(&s, &Policies::default(), Metric::RoutingCost, None)["cost-map"]["a"]["c"],
        192
    );
}

#[test]
fn filters_select_pids_and_costs() {
    let s = fleet(10.0);
    let f = parse_filter(
        br#"{"cost-type": {"cost-mode": "numerical", "cost-metric": "delay-rt"},
            "pids": {"srcs": ["a", "nobody"], "dsts": []},
            "constraints": ["gt 0", "le 1e4"]}"#,
    )
    .unwrap();
    assert_eq!(f.metric, Metric::DelayRt);
    let m = cost_map(&s, &Policies::default(), Metric::DelayRt, Some(&f));
    assert_eq!(m["cost-map"], json!({"a": {"b": 10_000}}));
    let f = parse_filter(br#"{"cost-type": {"cost-mode": "numerical", "cost-metric": "routingcost"}, "constraints": ["eq 192"]}"#).unwrap();
    assert_eq!(
        cost_map(&s, &Policies::default(), Metric::RoutingCost, Some(&f))["cost-map"],
        json!({"a": {"c": 192}, "c": {"a": 192}})
    );
}

#[test]
fn bad_filters_name_code_and_field() {
    let err = |body: &str| parse_filter(body.as_bytes()).unwrap_err();
    let ct = r#""cost-type": {"cost-mode": "numerical", "cost-metric": "routingcost"}"#;
    let e = err("{");
    assert_eq!(e.code, "E_SYNTAX");
    assert!(e.body()["meta"]["syntax-error"].is_string());
    assert_eq!(err("[1]").code, "E_SYNTAX");
    let e = err("{}");
    assert_eq!(
        (e.code, e.field.as_deref()),
        ("E_MISSING_FIELD", Some("cost-type"))
    );
    let e = err(r#"{"cost-type": {"cost-metric": "routingcost"}}"#);
    assert_eq!(e.field.as_deref(), Some("cost-type/cost-mode"));
    let e = err(r#"{"cost-type": "routingcost"}"#);
    assert_eq!(
        (e.code, e.field.as_deref()),
        ("E_INVALID_FIELD_TYPE", Some("cost-type"))
    );
    let e = err(r#"{"cost-type": {"cost-mode": "numerical", "cost-metric": "hopcount"}}"#);
    assert_eq!(
        e.body(),
        json!({"meta": {"code": "E_INVALID_FIELD_VALUE", "field": "cost-type/cost-metric", "value": "hopcount"}})
    );
    let e = err(r#"{"cost-type": {"cost-mode": "ordinal", "cost-metric": "routingcost"}}"#);
    assert_eq!(e.field.as_deref(), Some("cost-type/cost-mode"));
    for c in [
        "\"below 3\"",
        "\"le\"",
        "\"le 3 4\"",
        "\"le inf\"",
        "\"le NaN\"",
        "\"lt  3\"",
    ] {
        let e = err(&format!("{{{ct}, \"constraints\": [{c}]}}"));
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("E_INVALID_FIELD_VALUE", Some("constraints")),
            "{c}"
        );
        assert_eq!(e.value.unwrap(), serde_json::from_str::<Value>(c).unwrap());
    }
    let e = err(&format!("{{{ct}, \"constraints\": \"le 3\"}}"));
    assert_eq!(
        (e.code, e.field.as_deref()),
        ("E_INVALID_FIELD_TYPE", Some("constraints"))
    );
    let e = err(&format!("{{{ct}, \"pids\": {{\"srcs\": \"a\"}}}}"));
    assert_eq!(
        (e.code, e.field.as_deref()),
        ("E_INVALID_FIELD_TYPE", Some("pids/srcs"))
    );
    let e = err(&format!("{{{ct}, \"pids\": {{\"dsts\": [1]}}}}"));
    assert_eq!(e.field.as_deref(), Some("pids/dsts"));
}

#[test]
fn the_directory_lists_every_resource() {
    let d = directory();
    assert_eq!(d["meta"]["default-alto-network-map"], "networkmap");
    assert_eq!(
        d["meta"]["cost-types"]["num-delay-rt"]["cost-metric"],
        "delay-rt"
    );
    let r = d["resources"].as_object().unwrap();
    assert_eq!(
        r.keys().collect::<Vec<_>>(),
        [
            "costmap-delay-rt",
            "costmap-routingcost",
            "costmap-sidenet-loss-rt",
            "costmap-sidenet-rate",
            "filtered-costmap",
            "networkmap"
        ]
    );
    let rate = &d["meta"]["cost-types"]["num-sidenet-rate"];
    assert_eq!(rate["cost-metric"], "priv:sidenet-rate");
    assert_eq!(rate["cost-mode"], "numerical");
    assert_eq!(rate["cost-context"], json!({"cost-source": "nominal"}));
    assert_eq!(
        r["costmap-sidenet-rate"]["capabilities"],
        json!({"cost-type-names": ["num-sidenet-rate"]})
    );
    assert_eq!(
        r["costmap-sidenet-rate"]["uri"],
        "/alto/costmap/sidenet-rate"
    );
    assert_eq!(
        r["filtered-costmap"]["capabilities"]["cost-type-names"],
        json!([
            "num-routingcost",
            "num-delay-rt",
            "num-sidenet-rate",
            "num-sidenet-loss-rt"
        ])
    );
    let loss = &d["meta"]["cost-types"]["num-sidenet-loss-rt"];
    assert_eq!(loss["cost-metric"], "priv:sidenet-loss-rt");
    assert_eq!(loss["cost-context"], json!({"cost-source": "estimation"}));
    assert!(Metric::LossRt.name().len() <= 32);
    // RFC 7285 §10.6: a private metric is `priv:` and something, 32 characters at most.
    let name = Metric::Rate.name();
    assert!(name.starts_with("priv:") && name.len() > 5 && name.len() <= 32);
    assert_eq!(Metric::from_name("priv:sidenet-rate"), Some(Metric::Rate));
    for (id, res) in r {
        assert!(is_identifier(id));
        if id != "networkmap" {
            assert_eq!(res["uses"], json!(["networkmap"]));
        }
    }
    assert_eq!(r["filtered-costmap"]["accepts"], MT_COSTMAPFILTER);
}

/// The fleet's mesh with a day of windows in Berlin: a budget of 5000 kbit/s on a and b, 50000
/// from 23:00 to 07:00 and 1000 from 18:00 to 20:00 (both windows override the budget of their
/// slot), b's traffic toward c held to 4000, and b's relayed traffic to 8000. c and d carry no
/// limit of their own.
fn berlin() -> Policies {
    with_policies(
        r#"
- type: noInternet
- type: rateLimit
  name: daytime
  rateKbit: 5000
  nodes: [a, b]
- type: rateLimit
  name: night
  rateKbit: 50000
  nodes: [a, b]
  schedule:
    - start: "23:00"
      end: "07:00"
- type: rateLimit
  name: evening
  rateKbit: 1000
  nodes: [a, b]
  schedule:
    - start: "18:00"
      end: "20:00"
- type: rateLimit
  name: b-to-c
  rateKbit: 4000
  nodes: [b]
  toward: {nodes: [c]}
- type: rateLimit
  name: b-relays
  rateKbit: 8000
  nodes: [b]
  scope: relayed
"#,
    )
}

/// Mesh `m` (the fleet's) on Berlin time with `policies` (YAML); a has a MeshNode named "a".
fn with_policies(policies: &str) -> Policies {
    let mut mesh: Mesh =
        sidenet_crds::yaml::from_str(include_str!("../../../examples/riverside/mesh.yaml"))
            .unwrap();
    mesh.spec.network_name = Some("m".into());
    mesh.spec.time_zone = Some("Europe/Berlin".into());
    mesh.spec.policies = sidenet_crds::yaml::from_str(policies).unwrap();
    let mut p = Policies::default();
    // a has a MeshNode (named "a"); the others are enrolled without one (named by node id).
    p.insert(
        &mesh,
        vec![Member {
            id: "a".into(),
            name: "a".into(),
            labels: Default::default(),
        }],
    );
    p
}

/// The rate cost map of the fleet at Unix time `at`.
fn rates_at(at: u64) -> Value {
    let mut s = fleet(10.0);
    s.generated = at;
    cost_map(&s, &berlin(), Metric::Rate, None)
}

// Tuesday 2026-12-01, Berlin on winter time (UTC+1).
const TUE_NOON: u64 = 1_796_122_800; // 11:00Z, 12:00 in Berlin
const TUE_EVENING: u64 = 1_796_148_000; // 18:00Z, 19:00 in Berlin
const TUE_NIGHT: u64 = 1_796_164_200; // 22:30Z, 23:30 in Berlin

#[test]
fn the_rate_follows_the_windows_of_the_hour() {
    let noon = rates_at(TUE_NOON);
    assert_eq!(
        noon["meta"]["cost-type"]["cost-metric"],
        "priv:sidenet-rate"
    );
    // a's budget; a→c goes through b, whose relay limit (8000) is above it.
    assert_eq!(noon["cost-map"]["a"], json!({"b": 5000, "c": 5000}));
    // b toward c: its per-path limit under its budget.
    assert_eq!(noon["cost-map"]["b"], json!({"a": 5000, "c": 4000}));
    // c has no limit of its own: c→b is unlimited (no entry), c→a is held by b as a relay.
    assert_eq!(noon["cost-map"]["c"], json!({"a": 8000}));
    // d reaches nobody, and a PID's traffic to itself is never held: no row for d.
    assert!(noon["cost-map"].get("d").is_none());

    // 19:00: the evening window overrides the budget of its slot.
    let evening = rates_at(TUE_EVENING);
    assert_eq!(evening["cost-map"]["a"], json!({"b": 1000, "c": 1000}));
    assert_eq!(evening["cost-map"]["b"], json!({"a": 1000, "c": 1000}));
    assert_eq!(evening["cost-map"]["c"], json!({"a": 8000}));

    // 23:30: the night window; now b's relay limit holds a→c, and the per-path one b→c.
    let night = rates_at(TUE_NIGHT);
    assert_eq!(night["cost-map"]["a"], json!({"b": 50_000, "c": 8000}));
    assert_eq!(night["cost-map"]["b"], json!({"a": 50_000, "c": 4000}));

    // The window's end is excluded: 07:00 sharp is day again (Wednesday 06:00Z).
    let seven = rates_at(TUE_NOON + 19 * 3600);
    assert_eq!(seven["cost-map"]["a"]["b"], 5000);
    assert_eq!(
        rates_at(TUE_NOON + 19 * 3600 - 60)["cost-map"]["a"]["b"],
        50_000
    );

    // Summer time: 21:30Z on Tuesday 2026-07-07 is 23:30 in Berlin (UTC+2), the night window,
    // though 21:30 on the UTC clock would be day.
    assert_eq!(rates_at(1_783_459_800)["cost-map"]["a"]["b"], 50_000);
    // The same instant with the mesh on UTC: the budget.
    let mut s = fleet(10.0);
    s.generated = 1_783_459_800;
    let mut utc = berlin();
    for (_, spec, _) in utc.meshes.values_mut() {
        spec.time_zone = None;
    }
    assert_eq!(
        cost_map(&s, &utc, Metric::Rate, None)["cost-map"]["a"]["b"],
        5000
    );
}

#[test]
fn the_rate_follows_the_route() {
    // Babel's cost of a→b rises: a reaches c directly, b no longer relays for it (8000 before).
    let mut s = fleet(10.0);
    s.generated = TUE_NIGHT;
    for l in &mut s.links {
        if l.source == "a" && l.target == "b" {
            l.cost = Some(1000);
        }
    }
    let night = cost_map(&s, &berlin(), Metric::Rate, None);
    assert_eq!(night["cost-map"]["a"], json!({"b": 50_000, "c": 50_000}));
    let r = &paths(&s)["a"];
    assert_eq!(via(r, "a", "b"), ["c"]);
    assert!(via(r, "a", "c").is_empty());
    // No policies for the mesh (or another mesh's): no entries at all.
    assert_eq!(
        cost_map(&s, &Policies::default(), Metric::Rate, None)["cost-map"],
        json!({})
    );
    let mut other = berlin();
    other.meshes = other
        .meshes
        .into_values()
        .map(|v| ("elsewhere".to_string(), v))
        .collect();
    assert_eq!(
        cost_map(&s, &other, Metric::Rate, None)["cost-map"],
        json!({})
    );
}

#[test]
fn the_rate_filters_like_any_cost() {
    let mut s = fleet(10.0);
    s.generated = TUE_NOON;
    let f = parse_filter(
        br#"{"cost-type": {"cost-mode": "numerical", "cost-metric": "priv:sidenet-rate"},
            "pids": {"srcs": ["a", "b"], "dsts": []}, "constraints": ["ge 5000"]}"#,
    )
    .unwrap();
    assert_eq!(f.metric, Metric::Rate);
    assert_eq!(
        cost_map(&s, &berlin(), f.metric, Some(&f))["cost-map"],
        json!({"a": {"b": 5000, "c": 5000}, "b": {"a": 5000}})
    );
}

#[test]
fn routes_name_the_nodes_between() {
    let r = paths(&fleet(10.0));
    assert_eq!(via(&r["a"], "a", "c"), ["b"]);
    assert_eq!((r["a"]["c"].cost, r["a"]["c"].rtt_us), (192, Some(30_000)));
    assert_eq!(r["a"]["c"].prev.as_deref(), Some("b"));
    assert_eq!(r["a"]["b"].prev.as_deref(), Some("a"));
    assert!(via(&r["a"], "a", "b").is_empty());
    assert!(via(&r["a"], "a", "a").is_empty());
    assert_eq!(r["a"]["a"].prev, None);
    assert_eq!(via(&r["c"], "c", "a"), ["b"]);
    assert!(via(&r["d"], "d", "a").is_empty());
}

#[test]
fn every_relay_of_a_long_path_counts() {
    // A line n0—n1—n2—n3—n4: n1 relays at most 9000 (egress), n2 receives at most 7000
    // (ingress, scope all: what it relays and what it receives itself), n3 has no limit.
    let ids = ["n0", "n1", "n2", "n3", "n4"];
    let rows: Vec<StatusRow> = (0..ids.len())
        .map(|i| {
            let mut links = Vec::new();
            if i > 0 {
                links.push((ids[i - 1], 96, Some(1.0)));
            }
            if i + 1 < ids.len() {
                links.push((ids[i + 1], 96, Some(1.0)));
            }
            row(ids[i], i as u16 + 1, &links)
        })
        .collect();
    let mut s = snapshot(&rows, &[], 1, 100, &Thresholds::default());
    s.generated = TUE_NOON;
    let p = with_policies(
        r#"
- {type: rateLimit, rateKbit: 9000, nodes: [n1], scope: relayed}
- {type: rateLimit, rateKbit: 7000, nodes: [n2], scope: all, direction: ingress}
"#,
    );
    let m = cost_map(&s, &p, Metric::Rate, None);
    assert_eq!(
        m["cost-map"]["n0"],
        json!({"n2": 7000, "n3": 7000, "n4": 7000})
    );
    assert_eq!(
        m["cost-map"]["n1"],
        json!({"n2": 7000, "n3": 7000, "n4": 7000})
    );
    assert_eq!(
        m["cost-map"]["n4"],
        json!({"n0": 7000, "n1": 7000, "n2": 7000})
    );
    assert_eq!(
        m["cost-map"]["n3"],
        json!({"n0": 7000, "n1": 7000, "n2": 7000})
    );
    // From n2: its own egress is not limited; toward n0 only n1 relays.
    assert_eq!(m["cost-map"]["n2"], json!({"n0": 9000}));
}

/// The loss cost: the probes' round-trip loss of each link along babel's route, combined.
#[test]
fn the_loss_cost_combines_the_links_of_the_path() {
    let with_loss = |id: &str, sid: u16, links: &[(&str, u32, Option<f64>, f64)]| {
        let plain: Vec<(&str, u32, Option<f64>)> =
            links.iter().map(|&(t, c, r, _)| (t, c, r)).collect();
        let mut r = row(id, sid, &plain);
        for (p, l) in r.probes.iter_mut().zip(links) {
            p.loss = l.3;
        }
        r
    };
    let rows = vec![
        with_loss(
            "a",
            1,
            &[("b", 96, Some(10.0), 0.1), ("c", 500, Some(5.0), 0.0)],
        ),
        with_loss(
            "b",
            2,
            &[("a", 96, Some(10.0), 0.1), ("c", 96, Some(20.0), 0.2)],
        ),
        with_loss(
            "c",
            3,
            &[("b", 96, Some(20.0), 0.2), ("a", 500, Some(5.0), 0.0)],
        ),
        row("d", 4, &[]),
    ];
    let s = snapshot(&rows, &[], 1, 100, &Thresholds::default());
    let m = cost_map(&s, &Policies::default(), Metric::LossRt, None);
    assert_eq!(
        m["meta"]["cost-type"]["cost-metric"],
        "priv:sidenet-loss-rt"
    );
    let c = &m["cost-map"];
    // a→c goes through b (cost 192 < 500): 1 - 0.9 × 0.8 = 28 %.
    assert_eq!(c["a"]["c"], json!(28.0));
    assert_eq!(c["a"]["b"], json!(10.0));
    assert_eq!(c["c"]["a"], json!(28.0));
    assert_eq!(c["a"]["a"], json!(0.0));
    assert!(c.get("d").is_none_or(|r| r.get("a").is_none()), "{c}");
    let f = parse_filter(
        br#"{"cost-type": {"cost-mode": "numerical", "cost-metric": "priv:sidenet-loss-rt"}, "pids": {"srcs": ["a"], "dsts": []}, "constraints": ["le 15"]}"#,
    )
    .unwrap();
    let m = cost_map(&s, &Policies::default(), Metric::LossRt, Some(&f));
    assert_eq!(m["cost-map"], json!({"a": {"a": 0.0, "b": 10.0}}));
    assert_eq!(loss_percent(1.0 - 1e-9), 0.0);
    assert_eq!(loss_percent(0.0), 100.0);
}
