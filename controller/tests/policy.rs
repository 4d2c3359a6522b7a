//! Policies (issue 19): the policy fixtures of `controller/tests/fixtures/policy` through
//! `sidenetctl validate` (each file's first line is `# expect: ok` or the exact error after the
//! file name), and `sidenetctl explain` against golden outputs
//! (`UPDATE_GOLDEN=1 cargo test -p sidenet-controller --test policy` rewrites them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::Ipv6Addr;
use std::path::Path;
use std::process::Command;

use common::{bin, repo};

const DIR: &str = "controller/tests/fixtures/policy";

#[test]
fn every_policy_fixture_gives_its_exact_message() {
    let mut files: Vec<_> = std::fs::read_dir(repo().join(DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "only {} policy fixtures", files.len());
    let (mut passing, mut failing) = (0, 0);
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let rel = format!("{DIR}/{name}");
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{rel} lacks an '# expect: ' first line"))
            .trim()
            .to_string();
        let out = Command::new(bin("sidenetctl"))
            .current_dir(repo())
            .args(["validate", "-f", &rel])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if expect == "ok" {
            passing += 1;
            assert!(out.status.success(), "{rel} should validate:\n{stdout}");
            continue;
        }
        failing += 1;
        assert!(!out.status.success(), "{rel} validated:\n{stdout}");
        let errors: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(
            errors,
            vec![format!("error: {rel}: {expect}")],
            "{rel}: the output was:\n{stdout}"
        );
    }
    assert!(
        passing >= 3 && failing >= 17,
        "{passing} passing, {failing} failing"
    );
}

fn explain(args: &[&str]) -> String {
    let out = Command::new(bin("sidenetctl"))
        .current_dir(repo())
        .args([
            "explain",
            "-f",
            &format!("{DIR}/01-pass-offpeak-tests.yaml"),
        ])
        .args(args)
        .output()
        .unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    format!(
        "$ sidenetctl explain {}\nexit: {}\n{s}",
        args.join(" "),
        out.status.code().unwrap_or(-1)
    )
}

#[test]
fn explain_matches_its_golden_output() {
    let cases: &[&[&str]] = &[
        &[
            "--from",
            "kitchen",
            "--to",
            "porch",
            "--port",
            "80",
            "--at",
            "tue 23:30",
        ],
        &[
            "--from",
            "kitchen",
            "--to",
            "porch",
            "--at",
            "2026-12-01T12:00:00Z",
        ],
        &[
            "--from",
            "kitchen",
            "--to",
            "attic-pi",
            "--port",
            "22",
            "--at",
            "sun 02:00",
        ],
        &[
            "--from",
            "attic-pi",
            "--to",
            "kitchen",
            "--port",
            "22",
            "--protocol",
            "udp",
            "--at",
            "wed 07:00",
        ],
        &["--from", "kitchen", "--to", "nobody", "--at", "wed 07:00"],
        &["--from", "kitchen", "--to", "porch", "--at", "someday"],
    ];
    let got: String = cases.iter().map(|c| explain(c) + "\n").collect();
    let golden = repo().join(DIR).join("explain.golden");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(Path::new(&golden)).unwrap_or_default();
    assert_eq!(
        got,
        want,
        "explain output differs from {}; review and regenerate with UPDATE_GOLDEN=1",
        golden.display()
    );
}

/// Whether `addr` lies in `prefix` (`fd..::/64`, `fd..::/48`).
fn in_prefix(addr: Ipv6Addr, prefix: &str) -> bool {
    let (net, len) = prefix.split_once('/').unwrap();
    let net: Ipv6Addr = net.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    u128::from(addr) & mask == u128::from(net) & mask
}

/// Whether `port` is one of `ports` (`22`, `8000-8080`).
fn port_in(ports: &[String], port: u32) -> bool {
    ports.iter().any(|p| match p.split_once('-') {
        Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).contains(&port),
        None => p.parse::<u32>().unwrap() == port,
    })
}

/// What a rendered Linux `firewall.nft` does with a new connection from `src` to the node:
/// the first rule of its chain `mesh_access` that matches, else the reject that ends
/// `mesh_input`. Only the rule forms the compiler writes are read; another form fails the test.
fn linux_decides(nft: &str, src: Ipv6Addr, proto: &str, port: u32) -> bool {
    let chain = |name: &str| -> Vec<String> {
        let start = format!("\tchain {name} {{");
        let Some(i) = nft.find(&start) else {
            return Vec::new();
        };
        nft[i + start.len()..]
            .lines()
            .map(str::trim)
            .take_while(|l| *l != "}")
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    let input = chain("mesh_input");
    assert_eq!(
        input.last().map(String::as_str),
        Some("reject with icmpx admin-prohibited"),
        "mesh_input does not end in the reject:\n{nft}"
    );
    let set = |s: &str| -> Vec<String> { s.split(", ").map(str::to_string).collect() };
    for rule in chain("mesh_access") {
        let (head, verdict) =
            if let Some(h) = rule.split(" accept comment ").next().filter(|h| *h != rule) {
                (h.to_string(), true)
            } else {
                let h = rule
                    .split(" reject with icmpx admin-prohibited comment ")
                    .next()
                    .unwrap();
                assert_ne!(h, rule, "a rule form this test does not read: {rule}");
                (h.to_string(), false)
            };
        let rest = head
            .strip_prefix("ip6 saddr { ")
            .unwrap_or_else(|| panic!("{rule}"));
        let (srcs, rest) = rest.split_once(" }").unwrap();
        let rest = rest.trim();
        let (protos, ports): (Vec<String>, Vec<String>) = if rest.is_empty() {
            (vec!["tcp".into(), "udp".into()], Vec::new())
        } else {
            let r = rest
                .strip_prefix("meta l4proto ")
                .unwrap_or_else(|| panic!("{rule}"));
            let (p, r) = match r.strip_prefix("{ ") {
                Some(x) => {
                    let (a, b) = x.split_once(" }").unwrap();
                    (set(a), b.trim())
                }
                None => {
                    let (a, b) = r.split_once(' ').unwrap_or((r, ""));
                    (vec![a.to_string()], b.trim())
                }
            };
            let ports = match r.strip_prefix("th dport { ") {
                Some(x) => set(x.trim_end_matches(" }")),
                None => {
                    assert!(r.is_empty(), "{rule}");
                    Vec::new()
                }
            };
            (p, ports)
        };
        if set(srcs).iter().any(|s| in_prefix(src, s))
            && protos.iter().any(|p| p == proto)
            && (ports.is_empty() || port_in(&ports, port))
        {
            return verdict;
        }
    }
    false
}

/// What a rendered OpenWrt firewall batch does with it: the first `sidenet_policy_N` rule that
/// matches, else the input policy of zone `sidenet` (which must be `REJECT`).
fn openwrt_decides(batch: &str, src: Ipv6Addr, proto: &str, port: u32) -> bool {
    let mut rules: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut zone_input = None;
    for l in batch.lines() {
        let Some(rest) = l
            .strip_prefix("set ")
            .or_else(|| l.strip_prefix("add_list "))
        else {
            continue;
        };
        let (path, value) = rest.split_once('=').unwrap();
        let value = value.trim_matches('\'').to_string();
        let parts: Vec<&str> = path.split('.').collect();
        if parts.len() == 3 && parts[1] == "sidenet_zone" && parts[2] == "input" {
            zone_input = Some(value.clone());
        }
        if !parts[1].starts_with("sidenet_policy_") {
            continue;
        }
        if parts.len() == 2 {
            rules.push((parts[1].to_string(), Vec::new()));
        } else {
            rules
                .last_mut()
                .unwrap()
                .1
                .push((parts[2].to_string(), value));
        }
    }
    assert_eq!(zone_input.as_deref(), Some("REJECT"), "{batch}");
    for (_, opts) in rules {
        let get = |k: &str| -> Vec<String> {
            opts.iter()
                .filter(|(o, _)| o == k)
                .map(|(_, v)| v.clone())
                .collect()
        };
        assert_eq!(get("src"), ["sidenet"]);
        let protos = get("proto").join(" ");
        let proto_ok = protos == "all" || protos.split(' ').any(|p| p == proto);
        let ports = get("dest_port");
        if get("src_ip").iter().any(|s| in_prefix(src, s))
            && proto_ok
            && (ports.is_empty() || port_in(&ports, port))
        {
            return get("target") == ["ACCEPT"];
        }
    }
    false
}

/// The documented default holds alike in the model and on both backends: for every pair of the
/// off-peak fixture's nodes and a set of connections, `explain`'s decision (the policy tests'
/// evaluation) equals what the rendered Linux `firewall.nft` and the rendered OpenWrt firewall
/// batch of the destination do, including connections no rule matches (refused everywhere).
#[test]
fn explain_and_both_backends_agree_on_every_connection() {
    use sidenet_controller::reconcile::render::{self, NodeInputs, Renderer};
    use sidenet_controller::spec::policy::compile::{self, Located};
    use sidenet_controller::spec::policy::eval::{Member, MeshPolicies};
    use sidenet_crds::{NodeRole, Protocol};

    let set = sidenet_controller::spec::manifest::load(&[
        repo().join(DIR).join("01-pass-offpeak-tests.yaml"),
        repo().join("hardware-profiles"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let mesh = set.meshes.get("riverside").unwrap();
    let members: Vec<Member> = set.nodes.values().map(|n| Member::of(n)).collect();
    assert_eq!(members.len(), 3);
    let located: Vec<Located> = members
        .iter()
        .enumerate()
        .map(|(k, m)| Located {
            member: m.clone(),
            subnet: format!("fdfc:b395:f348:{:x}::/64", k + 1),
        })
        .collect();
    let mp = MeshPolicies::new(mesh, members.clone());
    let renderer = Renderer::load(&repo().join("templates")).unwrap();
    let (mut allowed, mut by_default) = (0, 0);
    for (di, dest) in located.iter().enumerate() {
        let mut files = Vec::new();
        for profile in ["raspberrypi-4b-awus036acm", "tplink-archer-c7-v2"] {
            let p = set.profiles.get(profile).unwrap();
            let inputs = NodeInputs {
                mesh,
                profile: p,
                id: &dest.member.id,
                name: Some(&dest.member.name),
                reported_hostname: None,
                role: NodeRole::Router,
                channel: None,
                tx_power: None,
                hostname: None,
                uplinks: &[],
                subnet_id: (di + 1) as u16,
                passphrase: "agreement passphrase",
                passphrase_next: None,
                labels: None,
            };
            let mut ctx = render::context(&inputs).unwrap_or_else(|e| panic!("{e}"));
            ctx.dataplane.policy = compile::node_policy(mesh, &located, &dest.member.id);
            files.extend(
                renderer
                    .render(p.spec.firmware.as_str(), &ctx)
                    .unwrap()
                    .into_iter()
                    .map(|f| (f.file.path, f.file.content)),
            );
        }
        let file = |path: &str| {
            &files
                .iter()
                .find(|(p, _)| p == path)
                .unwrap_or_else(|| panic!("no {path}"))
                .1
        };
        let (nft, batch) = (
            file("etc/sidenet/firewall.nft"),
            file("etc/sidenet/uci/firewall"),
        );
        for src in located.iter().filter(|m| m.member.id != dest.member.id) {
            let addr: Ipv6Addr = src.subnet.replace("::/64", "::1").parse().unwrap();
            for (proto, port) in [
                (Protocol::Tcp, 22),
                (Protocol::Tcp, 80),
                (Protocol::Tcp, 443),
                (Protocol::Tcp, 5201),
                (Protocol::Udp, 53),
                (Protocol::Udp, 443),
            ] {
                let v = mp.verdict(&src.member, &dest.member, proto, Some(port), 0);
                let what = format!(
                    "{} to {} {}/{port}",
                    src.member.name,
                    dest.member.name,
                    proto.as_str()
                );
                assert_eq!(
                    linux_decides(nft, addr, proto.as_str(), port),
                    v.allowed,
                    "{what}: Linux and explain disagree\n{nft}"
                );
                assert_eq!(
                    openwrt_decides(batch, addr, proto.as_str(), port),
                    v.allowed,
                    "{what}: OpenWrt and explain disagree\n{batch}"
                );
                allowed += usize::from(v.allowed);
                by_default += usize::from(v.decided_by.is_none());
                if v.decided_by.is_none() {
                    assert!(!v.allowed, "{what}: allowed by default");
                }
            }
        }
    }
    // The cases cover allowed, denied by a rule and refused by default.
    assert!(
        allowed > 0 && by_default > 0,
        "{allowed} allowed, {by_default} by default"
    );
}
