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
    let rc = cost_map(&s, Metric::RoutingCost, None);
    assert_eq!(rc["cost-map"]["a"], json!({"a": 0, "b": 96, "c": 192}));
    assert_eq!(rc["cost-map"]["d"], json!({"d": 0}));
    assert_eq!(rc["meta"]["cost-type"]["cost-metric"], "routingcost");
    assert_eq!(
        rc["meta"]["dependent-vtags"][0],
        network_map(&s)["meta"]["vtag"]
    );
    let rt = cost_map(&s, Metric::DelayRt, None);
    // a→c goes through b (96 + 96 < 500): 10 ms + 20 ms, not the direct 5 ms.
    assert_eq!(
        rt["cost-map"]["a"],
        json!({"a": 0, "b": 10_000, "c": 30_000})
    );
    // The a—b link slows down: the delay changes, the route does not.
    let slow = cost_map(&fleet(80.0), Metric::DelayRt, None);
    assert_eq!(slow["cost-map"]["a"]["c"], 100_000);
    // Babel's cost of a→b rises: a reaches c directly.
    let mut rows_cost = fleet(10.0);
    for l in &mut rows_cost.links {
        if l.source == "a" && l.target == "b" {
            l.cost = Some(1000);
        }
    }
    let rc = cost_map(&rows_cost, Metric::RoutingCost, None);
    assert_eq!(rc["cost-map"]["a"], json!({"a": 0, "b": 596, "c": 500}));
    let rt = cost_map(&rows_cost, Metric::DelayRt, None);
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
    let rc = cost_map(&rows_cost, Metric::RoutingCost, None);
    assert_eq!(rc["cost-map"]["a"], json!({"a": 0}));
    // A hop with no probe result: no delay for the pair, the routing cost stays.
    let mut s = fleet(10.0);
    for l in &mut s.links {
        if l.source == "b" && l.target == "c" {
            l.rtt_ms = None;
        }
    }
    assert_eq!(
        cost_map(&s, Metric::DelayRt, None)["cost-map"]["a"],
        json!({"a": 0, "b": 10_000})
    );
    assert_eq!(
        cost_map(&s, Metric::RoutingCost, None)["cost-map"]["a"]["c"],
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
    let m = cost_map(&s, Metric::DelayRt, Some(&f));
    assert_eq!(m["cost-map"], json!({"a": {"b": 10_000}}));
    let f = parse_filter(br#"{"cost-type": {"cost-mode": "numerical", "cost-metric": "routingcost"}, "constraints": ["eq 192"]}"#).unwrap();
    assert_eq!(
        cost_map(&s, Metric::RoutingCost, Some(&f))["cost-map"],
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
            "filtered-costmap",
            "networkmap"
        ]
    );
    for (id, res) in r {
        assert!(is_identifier(id));
        if id != "networkmap" {
            assert_eq!(res["uses"], json!(["networkmap"]));
        }
    }
    assert_eq!(r["filtered-costmap"]["accepts"], MT_COSTMAPFILTER);
}
