//! The ALTO service (RFC 7285, docs/content.md "The topology guru") of a standalone controller
//! with three real agents: every answer validates against the schemas in docs/schemas/alto/,
//! bad filters answer alto-error with the right code and field, the cost maps follow the
//! links' metrics as the nodes report them (a slower link, then a costlier one), and the rate
//! cost follows the policies' windows and the route.

use super::*;

/// `curl -s` with `method`, `headers` and `body`: (status, content type, body).
fn fetch(method: &str, url: &str, headers: &[&str], body: Option<&str>) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "20", "-X", method]);
    cmd.args(["-w", "\n%{http_code} %{content_type}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    let out = cmd.arg(url).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", "0 "));
    let (code, ct) = tail.split_once(' ').unwrap_or((tail, ""));
    (code.parse().unwrap_or(0), ct.to_string(), body.to_string())
}

fn schema(name: &str) -> jsonschema::Validator {
    let path = repo().join(format!("docs/schemas/alto/{name}.json"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&v).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn valid(name: &str, doc: &serde_json::Value) {
    let errors: Vec<String> = schema(name)
        .iter_errors(doc)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{name}: {errors:?}\n{doc:#}");
}

/// GET `path`: checks status 200 and `media_type`, validates against `name`, returns the
/// document.
fn get(s: &Setup, path: &str, media_type: &str, name: &str) -> serde_json::Value {
    let (code, ct, body) = fetch("GET", &s.url(path), &[], None);
    assert_eq!((code, ct.as_str()), (200, media_type), "{path}: {body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    valid(name, &doc);
    doc
}

const FILTER: &str = "Content-Type: application/alto-costmapfilter+json";
const COSTMAP: &str = "application/alto-costmap+json";
const ERROR: &str = "application/alto-error+json";

/// POSTs a filter (which must itself be valid or not, as `request_valid` says) and returns
/// (status, content type, document).
fn filter(s: &Setup, body: &str, request_valid: bool) -> (u16, String, serde_json::Value) {
    if let Ok(req) = serde_json::from_str::<serde_json::Value>(body) {
        let ok = schema("costmapfilter").is_valid(&req);
        assert_eq!(ok, request_valid, "the filter schema on {body}");
    }
    let accept = format!("Accept: {COSTMAP},{ERROR}");
    let (code, ct, text) = fetch(
        "POST",
        &s.url("/alto/costmap/filter"),
        &[FILTER, &accept],
        Some(body),
    );
    let doc = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    if code == 200 {
        assert_eq!(ct, COSTMAP);
        valid("costmap", &doc);
    } else if ct == ERROR {
        valid("error", &doc);
    }
    (code, ct, doc)
}

/// `hh:mm` (UTC) of the current time plus `minutes`, on the 24-hour clock.
fn utc_hhmm(minutes: i64) -> String {
    let now = sidenet_controller::now() as i64 / 60 + minutes;
    let m = now.rem_euclid(1440);
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// The example mesh on UTC, with its budget (20000 kbit/s on every node), a window `now` of
/// 50000 kbit/s from `start` to `end` (same slot: it overrides the budget while open) and a
/// relayed-traffic limit of 8000 on every node.
fn write_mesh(s: &Setup, start: &str, end: &str) {
    let text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml")).unwrap();
    let text = text.replacen("spec:\n", "spec:\n  timeZone: UTC\n", 1);
    assert!(text.trim_end().ends_with("rateKbit: 20000"), "{text}");
    let extra = format!(
        r#"
    - type: rateLimit
      name: now
      rateKbit: 50000
      schedule:
        - start: "{start}"
          end: "{end}"
    - type: rateLimit
      name: relays
      rateKbit: 8000
      scope: relayed
"#
    );
    let path = s.path("manifests/mesh.yaml");
    let tmp = s.path("mesh.yaml.tmp");
    std::fs::write(&tmp, text.trim_end().to_string() + &extra).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

#[test]
fn alto_maps_validate_and_follow_the_links() {
    let s = Setup::new();
    // A window open now (an hour either side), so the rate cost has something to show.
    write_mesh(&s, &utc_hhmm(-60), &utc_hhmm(60));
    let ctl = s.controller(&format!("127.0.0.1:{}", s.http), &[]);
    let names = ["alpha", "bravo", "charlie"];
    let agents: Vec<Proc> = names.iter().map(|n| s.agent(n)).collect();
    let rows = wait_ready(&s, 3, &|| ctl.log_text());
    let by = |h: &str| {
        rows.iter()
            .find(|r| r.hostname.as_deref() == Some(h))
            .unwrap()
    };
    let (a, b, c) = (by("alpha"), by("bravo"), by("charlie"));
    let report = |r: &StatusRow, i: usize, rev: u64, links: &[(&StatusRow, u32, f64)]| {
        report_as_node(
            &s,
            &agents[i],
            &s.path(names[i]),
            r,
            rev,
            links
                .iter()
                .map(|(to, cost, _)| neighbour(to, *cost))
                .collect(),
            links
                .iter()
                .map(|(to, _, rtt)| probe(to, *rtt, 0.0))
                .collect(),
        );
    };
    // A line alpha—bravo—charlie (babel cost 96, 10 ms and 20 ms) and a direct alpha—charlie
    // link that babel rates 500 (5 ms).
    report(a, 0, 1_000_000, &[(b, 96, 10.0), (c, 500, 5.0)]);
    report(b, 1, 1_000_000, &[(a, 96, 10.0), (c, 96, 20.0)]);
    report(c, 2, 1_000_000, &[(b, 96, 20.0), (a, 500, 5.0)]);

    // The directory: every resource, cost type and dependency.
    let dir = get(
        &s,
        "/alto/directory",
        "application/alto-directory+json",
        "directory",
    );
    let res = &dir["resources"];
    assert_eq!(res["networkmap"]["uri"], "/alto/networkmap");
    assert_eq!(
        res["costmap-routingcost"]["uri"],
        "/alto/costmap/routingcost"
    );
    assert_eq!(res["costmap-delay-rt"]["uri"], "/alto/costmap/delay-rt");
    assert_eq!(
        res["filtered-costmap"]["accepts"],
        "application/alto-costmapfilter+json"
    );
    assert_eq!(
        dir["meta"]["cost-types"]["num-delay-rt"]["cost-metric"],
        "delay-rt"
    );
    assert_eq!(
        dir["meta"]["cost-types"]["num-sidenet-rate"]["cost-metric"],
        "priv:sidenet-rate"
    );
    assert_eq!(
        res["costmap-sidenet-rate"]["uri"],
        "/alto/costmap/sidenet-rate"
    );
    assert_eq!(
        res["filtered-costmap"]["capabilities"]["cost-type-names"],
        serde_json::json!([
            "num-routingcost",
            "num-delay-rt",
            "num-sidenet-rate",
            "num-sidenet-loss-rt"
        ])
    );

    // The network map: one PID per node, its /64.
    let map = get(
        &s,
        "/alto/networkmap",
        "application/alto-networkmap+json",
        "networkmap",
    );
    let pids = map["network-map"].as_object().unwrap();
    assert_eq!(pids.len(), 3, "{map:#}");
    for r in [a, b, c] {
        let addr: std::net::Ipv6Addr = r.address.as_deref().unwrap().parse().unwrap();
        let seg = addr.segments();
        let prefix = std::net::Ipv6Addr::new(seg[0], seg[1], seg[2], seg[3], 0, 0, 0, 0);
        assert_eq!(
            pids[&r.node]["ipv6"],
            serde_json::json!([format!("{prefix}/64")])
        );
    }
    let vtag = map["meta"]["vtag"].clone();

    // Cost maps, once the reports are in: alpha reaches charlie through bravo (192 < 500).
    let cost = |metric: &str, from: &StatusRow, to: &StatusRow| {
        let m = get(&s, &format!("/alto/costmap/{metric}"), COSTMAP, "costmap");
        assert_eq!(m["meta"]["dependent-vtags"][0], vtag);
        assert_eq!(m["meta"]["cost-type"]["cost-metric"], metric);
        m["cost-map"][&from.node][&to.node].as_u64()
    };
    let until = |what: &str, metric: &str, want: u64| {
        wait_for(
            what,
            WAIT,
            || (cost(metric, a, c) == Some(want)).then_some(()),
            || ctl.log_text(),
        )
    };
    until("routingcost alpha→charlie 192", "routingcost", 192);
    until("delay-rt alpha→charlie 30 ms", "delay-rt", 30_000);
    assert_eq!(cost("routingcost", a, a), Some(0));
    assert_eq!(cost("delay-rt", c, a), Some(30_000));
    // The loss cost (the agents here report no probe loss): 0 % along the path, as a number.
    let loss = get(&s, "/alto/costmap/sidenet-loss-rt", COSTMAP, "costmap");
    assert_eq!(
        loss["meta"]["cost-type"]["cost-metric"],
        "priv:sidenet-loss-rt"
    );
    assert_eq!(loss["cost-map"][&a.node][&c.node], serde_json::json!(0.0));
    assert_eq!(loss["cost-map"][&a.node][&a.node], serde_json::json!(0.0));

    // The rate cost: the window `now` is open (50000 overrides the budget); alpha→charlie goes
    // through bravo, whose relayed-traffic limit (8000) holds it. A PID and itself: no entry.
    let rate = |from: &StatusRow, to: &StatusRow| {
        let m = get(&s, "/alto/costmap/sidenet-rate", COSTMAP, "costmap");
        assert_eq!(m["meta"]["dependent-vtags"][0], vtag);
        assert_eq!(m["meta"]["cost-type"]["cost-metric"], "priv:sidenet-rate");
        assert!(m["cost-map"][&from.node].get(&from.node).is_none(), "{m:#}");
        m["cost-map"][&from.node][&to.node].as_u64()
    };
    let rate_until = |what: &str, from: &StatusRow, to: &StatusRow, want: u64| {
        wait_for(
            what,
            WAIT,
            || (rate(from, to) == Some(want)).then_some(()),
            || ctl.log_text(),
        )
    };
    rate_until("rate alpha→bravo 50000 in the window", a, b, 50_000);
    assert_eq!(rate(a, c), Some(8000));
    // The schema holds the rate to whole kbit/s, delay-rt to non-negative numbers, and a
    // cost-source to those RFC 9439 registers.
    let mut bad = get(&s, "/alto/costmap/sidenet-rate", COSTMAP, "costmap");
    bad["cost-map"][&a.node][&b.node] = serde_json::json!(12.5);
    assert!(!schema("costmap").is_valid(&bad));
    let mut bad = get(&s, "/alto/costmap/delay-rt", COSTMAP, "costmap");
    bad["cost-map"][&a.node][&b.node] = serde_json::json!(-1);
    assert!(!schema("costmap").is_valid(&bad));
    let mut bad = dir.clone();
    bad["meta"]["cost-types"]["num-delay-rt"]["cost-context"]["cost-source"] =
        serde_json::json!("import");
    assert!(!schema("directory").is_valid(&bad));
    let rate_body = format!(
        r#"{{"cost-type": {{"cost-mode": "numerical", "cost-metric": "priv:sidenet-rate"}}, "pids": {{"srcs": ["{}"], "dsts": []}}, "constraints": ["gt 10000"]}}"#,
        a.node
    );
    let (code, _, doc) = filter(&s, &rate_body, true);
    assert_eq!(code, 200, "{doc}");
    assert_eq!(
        doc["cost-map"],
        serde_json::json!({ &a.node: { &b.node: 50_000 } })
    );
    // RFC 9439 §6.2: the maps say how fresh their data is (the newest report; for the rate, the
    // moment the windows were read).
    for path in [
        "/alto/costmap/delay-rt",
        "/alto/costmap/sidenet-rate",
        "/alto/networkmap",
    ] {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-D", "-", &s.url(path)])
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&out.stdout).to_string();
        let date = head
            .lines()
            .find_map(|l| l.strip_prefix("Last-Modified: "))
            .unwrap_or_else(|| panic!("{path}: no Last-Modified in {head}"));
        let t = jiff::fmt::rfc2822::parse(date.trim()).unwrap().timestamp();
        let age = sidenet_controller::now() as i64 - t.as_second();
        assert!((0..300).contains(&age), "{path}: Last-Modified {date}");
    }
    // The window moves to later in the day: the budget holds again.
    write_mesh(&s, &utc_hhmm(180), &utc_hhmm(240));
    rate_until("rate alpha→bravo 20000 outside the window", a, b, 20_000);
    assert_eq!(rate(a, c), Some(8000));

    // Filtered: one pair, then a constraint it does not meet.
    let body = |metric: &str, extra: &str| {
        format!(
            r#"{{"cost-type": {{"cost-mode": "numerical", "cost-metric": "{metric}"}}, "pids": {{"srcs": ["{}"], "dsts": ["{}"]}}{extra}}}"#,
            a.node, c.node
        )
    };
    let (code, _, doc) = filter(&s, &body("delay-rt", ""), true);
    assert_eq!(code, 200, "{doc}");
    assert_eq!(
        doc["cost-map"],
        serde_json::json!({ &a.node: { &c.node: 30_000 } })
    );
    let (_, _, doc) = filter(
        &s,
        &body("delay-rt", r#", "constraints": ["lt 20000"]"#),
        true,
    );
    assert_eq!(doc["cost-map"], serde_json::json!({}));
    let (_, _, doc) = filter(
        &s,
        &body("routingcost", r#", "constraints": ["ge 192", "le 192"]"#),
        true,
    );
    assert_eq!(
        doc["cost-map"],
        serde_json::json!({ &a.node: { &c.node: 192 } })
    );

    // Errors.
    let (code, ct, doc) = filter(
        &s,
        &body("delay-rt", r#", "constraints": ["below 3"]"#),
        false,
    );
    assert_eq!((code, ct.as_str()), (400, ERROR));
    assert_eq!(doc["meta"]["code"], "E_INVALID_FIELD_VALUE");
    assert_eq!(doc["meta"]["field"], "constraints");
    assert_eq!(doc["meta"]["value"], "below 3");
    let (code, ct, doc) = filter(&s, &body("hopcount", ""), true);
    assert_eq!((code, ct.as_str()), (400, ERROR));
    assert_eq!(doc["meta"]["field"], "cost-type/cost-metric");
    assert_eq!(doc["meta"]["value"], "hopcount");
    let (code, _, doc) = filter(&s, r#"{"pids": {"srcs": [], "dsts": []}}"#, false);
    assert_eq!(code, 400);
    assert_eq!(doc["meta"]["code"], "E_MISSING_FIELD");
    assert_eq!(doc["meta"]["field"], "cost-type");
    let (code, _, doc) = filter(
        &s,
        r#"{"cost-type": {"cost-mode": "numerical", "cost-metric": "routingcost"}, "pids": {"srcs": "all", "dsts": []}}"#,
        false,
    );
    assert_eq!(code, 400);
    assert_eq!(doc["meta"]["code"], "E_INVALID_FIELD_TYPE");
    assert_eq!(doc["meta"]["field"], "pids/srcs");
    let (code, ct, doc) = filter(&s, r#"{"cost-type": "#, false);
    assert_eq!((code, ct.as_str()), (400, ERROR));
    assert_eq!(doc["meta"]["code"], "E_SYNTAX");
    let url = s.url("/alto/costmap/filter");
    let ok = body("routingcost", "");
    let wrong_type = fetch("POST", &url, &["Content-Type: application/json"], Some(&ok));
    assert_eq!(wrong_type.0, 415, "{wrong_type:?}");
    assert_eq!(fetch("GET", &url, &[], None).0, 405);
    let html = fetch(
        "GET",
        &s.url("/alto/networkmap"),
        &["Accept: text/html"],
        None,
    );
    assert_eq!(html.0, 406, "{html:?}");
    let any = fetch(
        "GET",
        &s.url("/alto/networkmap"),
        &["Accept: application/*;q=0.5"],
        None,
    );
    assert_eq!(any.0, 200);

    // Alpha's link to bravo slows to 80 ms: the delay changes, the route does not.
    report(a, 0, 1_000_001, &[(b, 96, 80.0), (c, 500, 5.0)]);
    until("delay-rt alpha→charlie 100 ms", "delay-rt", 100_000);
    assert_eq!(cost("routingcost", a, c), Some(192));
    // Babel rates it 1000 now: alpha goes to charlie directly.
    report(a, 0, 1_000_002, &[(b, 1000, 80.0), (c, 500, 5.0)]);
    until("routingcost alpha→charlie 500", "routingcost", 500);
    assert_eq!(cost("delay-rt", a, c), Some(5_000));
    assert_eq!(cost("routingcost", a, b), Some(596));
    // Direct now: no relay between them, alpha's budget holds; alpha→bravo goes through
    // charlie, whose relayed-traffic limit holds it.
    assert_eq!(rate(a, c), Some(20_000));
    assert_eq!(rate(a, b), Some(8000));
    // The network map did not change: same tag.
    let again = get(
        &s,
        "/alto/networkmap",
        "application/alto-networkmap+json",
        "networkmap",
    );
    assert_eq!(again["meta"]["vtag"], vtag);
}
