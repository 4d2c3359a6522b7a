#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use sidenet_wire::messages::{Neighbour, Probe};

fn row(id: &str, mesh: &str, phase: &str, sid: u16) -> StatusRow {
    StatusRow {
        node: id.into(),
        name: Some(format!("name-{id}")),
        mesh: mesh.into(),
        hostname: Some(format!("host-{id}")),
        phase: phase.into(),
        reason: None,
        online: Some(true),
        desired: Some(Revision { epoch: 9, rev: 3 }),
        applied: Some(Revision { epoch: 9, rev: 3 }),
        last_seen: Some(100),
        address: Some(format!("fd12:3456:789a:{sid:x}::1")),
        failure: None,
        neighbours: vec![],
        probes: vec![],
        agent_version: Some("0.1.0".into()),
        agent_epoch: Some(1),
        missing: vec![],
        shaping: None,
        services: Vec::new(),
    }
}

fn neighbour(to: &str, cost: u32) -> Neighbour {
    Neighbour {
        address: format!("fe80::{}", to.len()),
        interface: format!("sn-{to}"),
        node: Some(to.into()),
        cost: Some(cost),
    }
}

fn probe(to: &str, rtt: Option<f64>, loss: f64) -> Probe {
    Probe {
        target: format!("fe80::1%sn-{to}"),
        rtt_ms: rtt,
        loss,
        node: Some(to.into()),
        kind: Some("neighbour".into()),
        sent: 10,
    }
}

/// a—b good, b—c with 50 % loss on b's side, a probing an unknown node, a second mesh.
fn fleet() -> Vec<StatusRow> {
    let mut a = row("a", "m", "Ready", 1);
    a.neighbours = vec![neighbour("b", 96)];
    a.probes = vec![
        probe("b", Some(1.2), 0.0),
        probe("stranger", Some(1.0), 0.0),
    ];
    let mut b = row("b", "m", "Ready", 2);
    b.neighbours = vec![neighbour("a", 96), neighbour("c", 256)];
    b.probes = vec![probe("a", Some(1.1), 0.0), probe("c", Some(80.0), 0.5)];
    let mut c = row("c", "m", "Configuring", 3);
    c.applied = Some(Revision { epoch: 9, rev: 2 });
    c.neighbours = vec![neighbour("b", 256)];
    let mut d = row("d", "other", "Failed", 1);
    d.failure = Some("apply: uci commit failed".into());
    vec![a, b, c, d]
}

fn schema(name: &str) -> jsonschema::Validator {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/schemas")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

fn errors(v: &jsonschema::Validator, doc: &serde_json::Value) -> Vec<String> {
    v.iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn grades_links_against_the_thresholds() {
    let t = Thresholds::default();
    assert_eq!(grade(false, None, None, None, &t), Quality::Unknown);
    assert_eq!(grade(true, Some(96), None, None, &t), Quality::Good);
    assert_eq!(
        grade(true, Some(96), Some(1.0), Some(0.0), &t),
        Quality::Good
    );
    assert_eq!(
        grade(true, Some(96), Some(60.0), Some(0.0), &t),
        Quality::Degraded
    );
    assert_eq!(
        grade(true, Some(96), Some(1.0), Some(0.1), &t),
        Quality::Degraded
    );
    assert_eq!(
        grade(true, Some(96), Some(1.0), Some(0.2), &t),
        Quality::Bad
    );
    assert_eq!(
        grade(true, Some(96), Some(250.0), Some(0.0), &t),
        Quality::Bad
    );
    assert_eq!(
        grade(true, Some(65535), Some(1.0), Some(0.0), &t),
        Quality::Bad
    );
    // Probed, but babel does not list the neighbour: down.
    assert_eq!(grade(false, None, None, Some(1.0), &t), Quality::Bad);
    assert_eq!(grade(false, None, Some(1.0), Some(0.0), &t), Quality::Bad);
}

#[test]
fn prefixes_are_the_nodes_64s() {
    assert_eq!(
        prefix64("fd12:3456:789a:1f::1").as_deref(),
        Some("fd12:3456:789a:1f::/64")
    );
    assert_eq!(prefix64("not an address"), None);
}

#[test]
fn snapshot_has_nodes_links_and_health() {
    let s = snapshot(
        &fleet(),
        &["mesh.yaml: bad".into()],
        9,
        1234,
        &Thresholds::default(),
    );
    assert_eq!(s.nodes.len(), 4);
    assert_eq!(s.generated, 1234);
    assert_eq!(s.manifest_errors, vec!["mesh.yaml: bad".to_string()]);
    // Directed, between known nodes only (the stranger is left out).
    let pairs: Vec<(&str, &str, Quality)> = s
        .links
        .iter()
        .map(|l| (l.source.as_str(), l.target.as_str(), l.quality))
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("a", "b", Quality::Good),
            ("b", "a", Quality::Good),
            ("b", "c", Quality::Bad),
            ("c", "b", Quality::Good),
        ]
    );
    let bc = &s.links[2];
    assert_eq!(
        (bc.cost, bc.rtt_ms, bc.loss),
        (Some(256), Some(80.0), Some(0.5))
    );
    assert_eq!(bc.interface, "sn-c");
    let by = |id: &str| s.nodes.iter().find(|n| n.id == id).unwrap();
    assert_eq!(by("a").health, Health::Healthy);
    assert_eq!(by("b").health, Health::Degraded, "a bad link");
    assert_eq!(by("c").health, Health::Degraded, "not on its revision yet");
    assert_eq!(by("d").health, Health::Failed);
    assert_eq!(by("a").prefix.as_deref(), Some("fd12:3456:789a:1::/64"));
    assert_eq!(by("a").label, "name-a");
    assert_eq!(s.phases.get("Ready"), Some(&2));
    assert_eq!(by("d").failure.as_deref(), Some("apply: uci commit failed"));
}

#[test]
fn netjson_network_graph_validates_against_the_schema() {
    let s = snapshot(&fleet(), &[], 9, 1234, &Thresholds::default());
    let graph_schema = schema("netjson-network-graph.json");
    let g = netjson(&s, "m");
    assert_eq!(errors(&graph_schema, &g), Vec::<String>::new(), "{g:#}");
    assert_eq!(g["type"], "NetworkGraph");
    assert_eq!(g["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(g["links"].as_array().unwrap().len(), 4);
    // Every link names nodes of the graph.
    let ids: Vec<&str> = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    for l in g["links"].as_array().unwrap() {
        assert!(ids.contains(&l["source"].as_str().unwrap()));
        assert!(ids.contains(&l["target"].as_str().unwrap()));
    }
    let bc = &g["links"][2];
    assert_eq!(bc["cost"], 256);
    assert_eq!(bc["cost_text"], "cost 256, rtt 80.0 ms, loss 50%");
    assert_eq!(bc["properties"]["quality"], "bad");
    assert_eq!(g["nodes"][0]["local_addresses"][0], "fd12:3456:789a:1::1");
    assert_eq!(
        g["nodes"][0]["properties"]["prefix"],
        "fd12:3456:789a:1::/64"
    );
    assert_eq!(g["nodes"][2]["properties"]["applied_revision"], 2);

    // Two meshes: a collection of graphs, each valid.
    let all = netjson_all(&s);
    assert_eq!(
        errors(&schema("netjson-network-collection.json"), &all),
        Vec::<String>::new()
    );
    let graphs = all["collection"].as_array().unwrap();
    assert_eq!(graphs.len(), 2);
    for g in graphs {
        assert_eq!(errors(&graph_schema, g), Vec::<String>::new());
    }
    // One mesh: the graph itself.
    let one = snapshot(&fleet()[..3], &[], 9, 1234, &Thresholds::default());
    assert_eq!(netjson_all(&one)["type"], "NetworkGraph");
}

#[test]
fn the_schema_refuses_what_is_not_a_network_graph() {
    let v = schema("netjson-network-graph.json");
    let s = snapshot(&fleet(), &[], 9, 1234, &Thresholds::default());
    let good = netjson(&s, "m");
    let mut no_cost = good.clone();
    no_cost["links"][0].as_object_mut().unwrap().remove("cost");
    assert!(!errors(&v, &no_cost).is_empty());
    let mut bad_type = good.clone();
    bad_type["type"] = "NetworkRoutes".into();
    assert!(!errors(&v, &bad_type).is_empty());
    let mut text_cost = good.clone();
    text_cost["links"][0]["cost"] = "96".into();
    assert!(!errors(&v, &text_cost).is_empty());
    let mut no_id = good;
    no_id["nodes"][0].as_object_mut().unwrap().remove("id");
    assert!(!errors(&v, &no_id).is_empty());
}
