//! The checks of a Mesh's policies, node groups and time zone, and its policy tests: every
//! problem as a field path (`spec.policies[2].schedule[0].end`) and what was expected.

use std::collections::BTreeSet;

use sidenet_crds::{Mesh, NodeSelector, PolicyType, Protocol, Scope};
use sidenet_wire::names;

use crate::spec::policy::eval::{Member, MeshPolicies, port_range};
use crate::spec::policy::schedule::{parse_at, show_minute, time_zone, window_minutes};
use crate::spec::set::{ManifestSet, closest};

/// The members of mesh `mesh` in `set`: its MeshNodes.
pub fn members(set: &ManifestSet, mesh: &str) -> Vec<Member> {
    set.nodes
        .values()
        .filter(|n| n.spec.mesh == mesh)
        .map(|n| Member::of(n))
        .collect()
}

/// Checks the policies of `mesh` (named `name` in `set`): `(field, message)` for each problem.
/// The policy tests run only when everything else is right.
pub fn check_mesh(set: &ManifestSet, name: &str, mesh: &Mesh) -> Vec<(String, String)> {
    let mut errs: Vec<(String, String)> = Vec::new();
    let spec = &mesh.spec;
    if let Some(z) = &spec.time_zone
        && let Err(e) = time_zone(z)
    {
        errs.push(("spec.timeZone".into(), e));
    }
    let mut group_names = BTreeSet::new();
    for (i, g) in spec.node_groups.iter().enumerate() {
        if !simple_name(&g.name) {
            errs.push((
                format!("spec.nodeGroups[{i}].name"),
                format!(
                    "{:?} is not a group name; expected letters, digits and '-'",
                    g.name
                ),
            ));
        }
        if !group_names.insert(g.name.as_str()) {
            errs.push((
                format!("spec.nodeGroups[{i}].name"),
                format!("group {:?} is defined twice", g.name),
            ));
        }
        if g.nodes.is_empty() && g.match_labels.is_empty() {
            errs.push((
                format!("spec.nodeGroups[{i}]"),
                "the group has neither nodes nor matchLabels; name its nodes or their labels"
                    .into(),
            ));
        }
        for (j, n) in g.nodes.iter().enumerate() {
            if let Some(m) = node_error(set, name, n) {
                errs.push((format!("spec.nodeGroups[{i}].nodes[{j}]"), m));
            }
        }
    }
    let group_error = |g: &str| {
        (!group_names.contains(g)).then(|| {
            let known: Vec<String> = spec.node_groups.iter().map(|g| g.name.clone()).collect();
            format!(
                "{g:?} is not a group of spec.nodeGroups; closest: {}",
                closest(g, known.iter())
            )
        })
    };
    let mut policy_names = BTreeSet::new();
    for (i, p) in spec.policies.iter().enumerate() {
        let at = |f: &str| format!("spec.policies[{i}].{f}");
        let t = p.type_.as_str();
        if let Some(n) = &p.name {
            if !simple_name(n) {
                errs.push((
                    at("name"),
                    format!("{n:?} is not a policy name; expected letters, digits and '-'"),
                ));
            }
            if !policy_names.insert(n.as_str()) {
                errs.push((at("name"), format!("policy name {n:?} is used twice")));
            }
        }
        let rate = p.type_ == PolicyType::RateLimit;
        let rule = matches!(p.type_, PolicyType::Allow | PolicyType::Deny);
        if rate && p.rate_kbit.is_none() {
            errs.push((
                at("rateKbit"),
                "missing: a rateLimit policy needs rateKbit (kbit/s)".into(),
            ));
        }
        let only = |field: &str, set: bool, ok: bool, who: &str| {
            (set && !ok).then(|| {
                (
                    at(field),
                    format!("a {t} policy takes no {field}; only {who}"),
                )
            })
        };
        let misplaced = [
            only("rateKbit", p.rate_kbit.is_some(), rate, "rateLimit does"),
            only("direction", p.direction.is_some(), rate, "rateLimit does"),
            only("scope", p.scope.is_some(), rate, "rateLimit does"),
            only("toward", p.toward.is_some(), rate, "rateLimit does"),
            only("schedule", !p.schedule.is_empty(), rate, "rateLimit does"),
            only("groups", !p.groups.is_empty(), rate, "rateLimit does"),
            only(
                "nodes",
                !p.nodes.is_empty(),
                !rule,
                "allow and deny do not (they take from and to)",
            ),
            only("from", p.from.is_some(), rule, "allow and deny do"),
            only("to", p.to.is_some(), rule, "allow and deny do"),
            only("protocol", p.protocol.is_some(), rule, "allow and deny do"),
            only("ports", !p.ports.is_empty(), rule, "allow and deny do"),
        ];
        errs.extend(misplaced.into_iter().flatten());
        for (j, n) in p.nodes.iter().enumerate() {
            if let Some(m) = node_error(set, name, n) {
                errs.push((at(&format!("nodes[{j}]")), m));
            }
        }
        for (j, g) in p.groups.iter().enumerate() {
            if let Some(m) = group_error(g) {
                errs.push((at(&format!("groups[{j}]")), m));
            }
        }
        for (field, sel) in [("toward", &p.toward), ("from", &p.from), ("to", &p.to)] {
            if let Some(sel) = sel {
                selector_errors(set, name, sel, &at(field), &group_error, &mut errs);
            }
        }
        if p.toward.as_ref().is_some_and(NodeSelector::is_empty) {
            errs.push((
                at("toward"),
                "an empty toward selects every node; leave it out for the node's whole budget, or name nodes, groups or matchLabels".into(),
            ));
        }
        if !p.schedule.is_empty() {
            if p.name.is_none() {
                errs.push((
                    at("name"),
                    "missing: a policy with a schedule needs a name (it shows in status as the active window)".into(),
                ));
            }
            if spec.time_zone.is_none() {
                errs.push((
                    at("schedule"),
                    "the windows' times need the Mesh's spec.timeZone (an IANA name like Europe/Berlin)".into(),
                ));
            }
        }
        for (j, w) in p.schedule.iter().enumerate() {
            if let Err((f, m)) = window_minutes(w) {
                errs.push((at(&format!("schedule[{j}].{f}")), m));
            }
        }
        for (j, port) in p.ports.iter().enumerate() {
            if let Err(m) = port_range(port) {
                errs.push((at(&format!("ports[{j}]")), m));
            }
        }
        if rate && p.scope == Some(Scope::Relayed) && p.toward.is_some() {
            errs.push((
                at("toward"),
                "a relayed-traffic limit has no path of the node's own; leave toward out or use scope own or all".into(),
            ));
        }
    }
    for (i, t) in spec.policy_tests.iter().enumerate() {
        let at = |f: &str| format!("spec.policyTests[{i}].{f}");
        for (f, n) in [("from", &t.from), ("to", &t.to)] {
            if let Some(m) = node_error(set, name, n) {
                errs.push((at(f), m));
            }
        }
        if let Some(p) = t.port
            && !(1..=65535).contains(&p)
        {
            errs.push((at("port"), format!("{p} is not a port; expected 1-65535")));
        }
        if let Some(a) = &t.at
            && let Err(m) = parse_at(a, &jiff::tz::TimeZone::UTC)
        {
            errs.push((at("at"), m));
        }
        if t.expect.unlimited && t.expect.max_rate_kbit.is_some() {
            errs.push((
                at("expect"),
                "unlimited and maxRateKbit contradict each other; keep one".into(),
            ));
        }
    }
    if !errs.is_empty() {
        return errs;
    }
    let mut all = members(set, name);
    for t in &spec.policy_tests {
        for n in [&t.from, &t.to] {
            if !all.iter().any(|m| m.is(n)) {
                all.push(Member {
                    id: n.clone(),
                    name: n.clone(),
                    labels: Default::default(),
                });
            }
        }
    }
    let mp = MeshPolicies::new(mesh, all);
    for i in 0..spec.policy_tests.len() {
        if let Err(m) = run_test(&mp, i) {
            errs.push((format!("spec.policyTests[{i}]"), m));
        }
    }
    errs
}

/// Runs policy test `i`: `Err` says what came out instead of what was expected.
pub fn run_test(mp: &MeshPolicies<'_>, i: usize) -> Result<(), String> {
    let t = &mp.mesh.spec.policy_tests[i];
    let (Some(from), Some(to)) = (mp.find(&t.from), mp.find(&t.to)) else {
        return Err("names a node that is not in the mesh".into());
    };
    let protocol = t.protocol.unwrap_or(Protocol::Tcp);
    let minutes = match &t.at {
        Some(a) => vec![parse_at(a, &mp.tz)?],
        None => mp.boundaries(),
    };
    let what = format!(
        "{}{} to {} {}{}",
        t.name
            .as_ref()
            .map(|n| format!("{n:?}: "))
            .unwrap_or_default(),
        from.name,
        to.name,
        protocol.as_str(),
        t.port.map(|p| format!("/{p}")).unwrap_or_default()
    );
    for m in minutes {
        let v = mp.verdict(from, to, protocol, t.port, m);
        let when = show_minute(m);
        if v.allowed != t.expect.allowed {
            return Err(format!(
                "{what} at {when}: expected {}, got {} {}",
                if t.expect.allowed {
                    "allowed"
                } else {
                    "denied"
                },
                if v.allowed { "allowed" } else { "denied" },
                decided(mp, v.decided_by)
            ));
        }
        let rate = v.rate_kbit();
        let by = || {
            v.limits
                .iter()
                .filter(|l| Some(l.rate_kbit) == rate)
                .map(|l| format!("spec.policies[{}] on {}", l.policy, l.node))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (t.expect.unlimited, t.expect.max_rate_kbit, rate) {
            (true, _, Some(r)) => {
                return Err(format!(
                    "{what} at {when}: expected unlimited, got {r} kbit/s ({})",
                    by()
                ));
            }
            (_, Some(max), None) => {
                return Err(format!(
                    "{what} at {when}: expected at most {max} kbit/s, got unlimited"
                ));
            }
            (_, Some(max), Some(r)) if r > max => {
                return Err(format!(
                    "{what} at {when}: expected at most {max} kbit/s, got {r} kbit/s ({})",
                    by()
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Who decided: `by spec.policies[2] (deny "no-attic")`, or `by default: …`.
pub fn decided(mp: &MeshPolicies<'_>, by: Option<usize>) -> String {
    match by {
        None => "by default: no allow or deny policy matches".into(),
        Some(i) => {
            let p = &mp.mesh.spec.policies[i];
            format!(
                "by spec.policies[{i}] ({}{})",
                p.type_.as_str(),
                p.name
                    .as_ref()
                    .map(|n| format!(" {n:?}"))
                    .unwrap_or_default()
            )
        }
    }
}

fn selector_errors(
    set: &ManifestSet,
    mesh: &str,
    sel: &NodeSelector,
    at: &str,
    group_error: &dyn Fn(&str) -> Option<String>,
    errs: &mut Vec<(String, String)>,
) {
    for (j, n) in sel.nodes.iter().enumerate() {
        if let Some(m) = node_error(set, mesh, n) {
            errs.push((format!("{at}.nodes[{j}]"), m));
        }
    }
    for (j, g) in sel.groups.iter().enumerate() {
        if let Some(m) = group_error(g) {
            errs.push((format!("{at}.groups[{j}]"), m));
        }
    }
}

fn simple_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// What is wrong with `n` as the name of a node of `mesh`: a MeshNode of another mesh, or
/// neither a MeshNode name nor a node id.
pub fn node_error(set: &ManifestSet, mesh: &str, n: &str) -> Option<String> {
    let by_id = set.nodes.get(n);
    let by_name = set
        .nodes
        .values()
        .find(|m| m.metadata.name.as_deref() == Some(n));
    match by_id.or(by_name) {
        Some(m) if m.spec.mesh == mesh => None,
        Some(m) => Some(format!(
            "MeshNode/{} belongs to mesh {:?}, not to this one",
            m.metadata.name.as_deref().unwrap_or_default(),
            m.spec.mesh
        )),
        // A well-formed node id may be a node that enrols without a MeshNode (auto mode).
        None if names::check_node_id(n).is_ok() && n.len() == 16 => None,
        None => {
            let known: Vec<String> = set
                .nodes
                .values()
                .filter(|m| m.spec.mesh == mesh)
                .filter_map(|m| m.metadata.name.clone())
                .collect();
            Some(format!(
                "{n:?} names no MeshNode of this mesh (by name or node id) and is not a node id; closest: {}",
                closest(n, known.iter())
            ))
        }
    }
}
