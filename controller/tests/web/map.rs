//! The map in headless Chromium (Debian `chromium`) against a standalone controller with 50
//! real agents, and a staged rollout held at its canary listed above the map. The screenshot is kept at `target/web-map/map.png` (CI keeps it as an artifact).

use super::*;

const FLEET: usize = 50;
/// Nodes on the ring of reported links: RING links.
const RING: usize = 12;

/// The `target/` folder of this build.
fn target_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_sidenet-controller"));
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn chromium() -> PathBuf {
    let p = std::env::var("SIDENET_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let p = PathBuf::from(p);
    assert!(
        p.exists(),
        "{} is missing: scripts/install-peers installs Debian's chromium",
        p.display()
    );
    p
}

/// Runs headless Chromium on `url` with every network path but loopback dead (a proxy that
/// does not exist for everything else, no host name resolves), recording its network log.
/// Returns the DOM after `budget_ms` of virtual time, and every URL the page requested.
fn browse(
    s: &Setup,
    url: &str,
    budget_ms: u32,
    screenshot: Option<&Path>,
) -> (String, Vec<String>) {
    let profile = tempfile::tempdir().unwrap();
    let netlog = s.path(&format!("netlog-{}.json", free_port()));
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--window-size=1500,1000",
        &format!("--virtual-time-budget={budget_ms}"),
        &format!("--user-data-dir={}", profile.path().display()),
        &format!("--log-net-log={}", netlog.display()),
    ]);
    match screenshot {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&netlog).unwrap();
    let log: serde_json::Value = serde_json::from_str(&log)
        .or_else(|_| serde_json::from_str(&format!("{}]}}", log.trim_end().trim_end_matches(','))))
        .unwrap_or_else(|e| panic!("{}: {e}", netlog.display()));
    // Requests the page made: those whose initiator is the page's origin (the browser's own
    // background requests have none), plus the navigation itself.
    let origin = url.trim_end_matches('/').to_string();
    let mut urls: Vec<String> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let p = &e["params"];
            let u = p["url"].as_str()?;
            (p["initiator"].as_str() == Some(origin.as_str()) || u == url).then(|| u.to_string())
        })
        .collect();
    urls.sort();
    urls.dedup();
    (String::from_utf8_lossy(&out.stdout).to_string(), urls)
}

/// The opening tag around the first occurrence of `needle`.
fn tag_with<'a>(dom: &'a str, needle: &str) -> Option<&'a str> {
    let at = dom.find(needle)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    tag[at..].split('"').next()
}

/// The text of the revision cell of `node`'s table row.
fn revision_cell<'a>(dom: &'a str, node: &str) -> Option<&'a str> {
    let row = &dom[dom.find(&format!("<tr data-id=\"{node}\""))?..];
    let row = &row[..row.find("</tr>")?];
    let cell = &row[row.find("class=\"revision\">")? + "class=\"revision\">".len()..];
    cell.split('<').next()
}

fn pair(a: &StatusRow, b: &StatusRow) -> String {
    let (x, y) = if a.node < b.node { (a, b) } else { (b, a) };
    format!("data-pair=\"{} {}\"", x.node, y.node)
}

#[test]
fn the_map_in_headless_chromium_shows_a_fleet_of_50_agents() {
    let s = Setup::new();
    let ctl = s.controller(&format!("127.0.0.1:{}", s.http), &[]);
    let names: Vec<String> = (0..FLEET).map(|i| format!("node{i:02}")).collect();
    let agents: Vec<Proc> = names.iter().map(|n| s.agent(n)).collect();
    let rows = wait_ready(&s, FLEET, &|| ctl.log_text());
    let root_of = |r: &StatusRow| s.path(r.hostname.as_deref().unwrap());
    let proc_of = |r: &StatusRow| {
        let i = names
            .iter()
            .position(|n| Some(n.as_str()) == r.hostname.as_deref())
            .unwrap();
        &agents[i]
    };

    // A ring of RING nodes: each reports both ring neighbours, babel cost 96, 1.5 ms, no loss.
    let ring: Vec<&StatusRow> = rows.iter().take(RING).collect();
    for (i, r) in ring.iter().enumerate() {
        let prev = ring[(i + RING - 1) % RING];
        let next = ring[(i + 1) % RING];
        report_as_node(
            &s,
            proc_of(r),
            &root_of(r),
            r,
            1_000_000,
            vec![neighbour(prev, 96), neighbour(next, 96)],
            vec![probe(prev, 1.5, 0.0), probe(next, 1.5, 0.0)],
        );
    }
    wait_for(
        "the ring's links in the status table, every node Ready and online again",
        WAIT * 2,
        || {
            let rows = s.rows();
            let linked = rows.iter().filter(|r| r.neighbours.len() == 2).count();
            (linked == RING
                && rows
                    .iter()
                    .all(|r| r.phase == "Ready" && r.online == Some(true)))
            .then_some(())
        },
        || ctl.log_text(),
    );

    let url = s.url("/");
    let (dom, urls) = browse(&s, &url, 6000, None);
    assert!(dom.contains("data-state=\"ready\""), "{dom}");
    assert!(dom.contains(&format!("data-nodes=\"{FLEET}\"")), "{dom}");
    assert!(dom.contains(&format!("data-links=\"{RING}\"")), "{dom}");
    assert_eq!(dom.matches("<circle class=\"node").count(), FLEET);
    assert_eq!(dom.matches("<line class=\"link").count(), RING);
    assert_eq!(dom.matches("<tr data-id=").count(), FLEET);
    // One node's revision, as the controller has it.
    let one = &rows[RING + 3];
    let rev = one.applied.unwrap().rev.to_string();
    assert_eq!(revision_cell(&dom, &one.node), Some(rev.as_str()));
    let first = tag_with(&dom, &pair(ring[0], ring[1])).unwrap();
    assert_eq!(attr(first, "stroke"), Some("#2ca02c"), "{first}");
    assert_eq!(dom.matches("data-quality=\"good\"").count(), RING);
    // Nothing but the controller was asked for anything.
    let origin = format!("http://127.0.0.1:{}/", s.http);
    let web: Vec<&String> = urls
        .iter()
        .filter(|u| u.contains("://"))
        .filter(|u| !u.starts_with(&origin))
        .collect();
    assert!(
        web.is_empty(),
        "the page reached beyond the controller: {web:?}"
    );
    for asset in ["", "map.js", "map.css", "api/nodes"] {
        assert!(
            urls.contains(&format!("{origin}{asset}")),
            "{asset} not requested: {urls:?}"
        );
    }

    // The first ring node now sees 50 % loss and 300 ms to the second: that link turns red.
    report_as_node(
        &s,
        proc_of(ring[0]),
        &root_of(ring[0]),
        ring[0],
        1_000_001,
        vec![neighbour(ring[RING - 1], 96), neighbour(ring[1], 480)],
        vec![probe(ring[RING - 1], 1.5, 0.0), probe(ring[1], 300.0, 0.5)],
    );
    wait_for(
        "the degraded link in the status table",
        WAIT,
        || {
            s.rows()
                .iter()
                .any(|r| r.node == ring[0].node && r.probes.iter().any(|p| p.loss == 0.5))
                .then_some(())
        },
        || ctl.log_text(),
    );
    // A staged rollout of a channel change, held at its canary (a node off the ring) by a long
    // bake: the map lists it above the map, as `sidenetctl rollout status` has it.
    let canary = &rows[FLEET - 1];
    let mesh = std::fs::read_to_string(s.path("manifests/mesh.yaml")).unwrap();
    let staged = format!(
        "{}  rollout:\n    canary:\n      nodes: [{}]\n    waves: [100]\n    bakeSeconds: 3600\n    progressDeadlineSeconds: 3600\n",
        mesh.replace("        channel: 36\n", "        channel: 44\n"),
        canary.node
    );
    std::fs::write(s.path("manifests/mesh.yaml.new"), staged).unwrap();
    std::fs::rename(
        s.path("manifests/mesh.yaml.new"),
        s.path("manifests/mesh.yaml"),
    )
    .unwrap();
    let rollout = wait_for(
        "the rollout to start",
        WAIT,
        || {
            let req = Request::Rollout {
                action: "status".into(),
                mesh: None,
            };
            match admin::call(&s.state(), &req).ok()? {
                Response::Rollouts { rollouts } => rollouts.into_iter().find(|r| r.mesh == MESH),
                _ => None,
            }
        },
        || ctl.log_text(),
    );
    assert_eq!(rollout.waves[0].nodes, vec![canary.node.clone()]);
    // A broken manifest: listed above the map (the controller keeps the last good ones).
    std::fs::write(
        s.path("manifests/broken.yaml"),
        "apiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata: {name: x}\nspec: {}\n",
    )
    .unwrap();
    wait_for(
        "the manifest error in the status",
        WAIT,
        || match admin::call(&s.state(), &Request::Status).ok()? {
            Response::Status {
                manifest_errors, ..
            } => manifest_errors
                .iter()
                .any(|e| e.contains("broken.yaml"))
                .then_some(()),
            _ => None,
        },
        || ctl.log_text(),
    );
    let (dom, _) = browse(&s, &url, 6000, None);
    let errors = &dom[dom.find("<ul id=\"errors\"").unwrap()..];
    let errors = &errors[..errors.find("</ul>").unwrap()];
    assert!(
        errors.contains("<li>manifest: ") && errors.contains("broken.yaml"),
        "{errors}"
    );
    let listed = errors.matches("<li>").count();
    let summary = &dom[dom.find("<span id=\"summary\">").unwrap()..];
    let summary = &summary[..summary.find("</span>").unwrap()];
    assert!(
        listed >= 1 && summary.ends_with(&format!("· {listed} manifest errors")),
        "{summary}"
    );
    let listed = &dom[dom.find("<ul id=\"rollouts\"").unwrap()..];
    let listed = &listed[..listed.find("</ul>").unwrap()];
    let line = format!(
        "<li>rollout in progress on {MESH}: rollout {} Progressing, wave 0 of 2 (1 nodes, ",
        &rollout.id[..12]
    );
    assert!(
        listed.contains(&line)
            && !tag_with(listed, "id=\"rollouts\"")
                .unwrap()
                .contains("hidden"),
        "{listed}"
    );
    let bad = tag_with(&dom, &pair(ring[0], ring[1])).unwrap();
    assert_eq!(attr(bad, "stroke"), Some("#d62728"), "{bad}");
    assert_eq!(attr(bad, "data-quality"), Some("bad"), "{bad}");
    assert_eq!(dom.matches("data-quality=\"good\"").count(), RING - 1);
    assert!(dom.contains("1 bad, 0 degraded"), "summary line");

    // The screenshot, kept for CI.
    let shots = target_dir().join("web-map");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("map.png");
    let _ = std::fs::remove_file(&png);
    browse(&s, &url, 6000, Some(&png));
    let bytes = std::fs::read(&png).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{}",
        png.display()
    );
}
