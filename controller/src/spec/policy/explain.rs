//! `sidenetctl explain --from A --to B [--port P] [--protocol tcp|udp] [--at TIME]`: which
//! policies apply to a connection and why, as text.

use std::fmt::Write as _;

use sidenet_crds::{Direction, Protocol};

use crate::spec::policy::check::decided;
use crate::spec::policy::eval::MeshPolicies;
use crate::spec::policy::schedule::{parse_at, show_minute};

/// What `explain` is asked.
#[derive(Debug, Clone)]
pub struct Question {
    /// The node that opens the connection (MeshNode name or node id).
    pub from: String,
    /// The node it connects to.
    pub to: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Destination port.
    pub port: Option<u32>,
    /// When (`tue 23:30` local, or RFC 3339); none: the minute `now` (Unix seconds) falls in.
    pub at: Option<String>,
}

/// The explanation, or what is wrong with the question (`--from`, `--to`, `--at`).
pub fn explain(mp: &MeshPolicies<'_>, q: &Question, now: i64) -> Result<String, String> {
    let from = mp.find(&q.from).ok_or_else(|| {
        format!(
            "--from {:?}: no node of mesh {} by that name or id",
            q.from,
            mp.mesh.metadata.name.as_deref().unwrap_or_default()
        )
    })?;
    let to = mp.find(&q.to).ok_or_else(|| {
        format!(
            "--to {:?}: no node of mesh {} by that name or id",
            q.to,
            mp.mesh.metadata.name.as_deref().unwrap_or_default()
        )
    })?;
    let at = q.at.clone().unwrap_or_else(|| {
        jiff::Timestamp::from_second(now)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_string()
    });
    let minute = parse_at(&at, &mp.tz).map_err(|e| format!("--at: {e}"))?;
    let v = mp.verdict(from, to, q.protocol, q.port, minute);
    let mut s = String::new();
    let tz = mp.mesh.spec.time_zone.as_deref().unwrap_or("UTC");
    let _ = writeln!(
        s,
        "{} ({}) to {} ({}), {}{}, at {} ({tz})",
        from.name,
        from.id,
        to.name,
        to.id,
        q.protocol.as_str(),
        q.port.map(|p| format!(" port {p}")).unwrap_or_default(),
        show_minute(minute)
    );
    let _ = writeln!(
        s,
        "access: {} {}",
        if v.allowed { "allowed" } else { "denied" },
        decided(mp, v.decided_by)
    );
    match v.rate_kbit() {
        None => {
            let _ = writeln!(s, "rate: unlimited (no rate limit in force)");
        }
        Some(r) => {
            let _ = writeln!(s, "rate: at most {r} kbit/s (the smallest limit in force)");
        }
    }
    for l in &v.limits {
        let p = &mp.mesh.spec.policies[l.policy];
        let _ = writeln!(
            s,
            "  in force: spec.policies[{}]{} on {}, {} {}{}: {} kbit/s",
            l.policy,
            p.name
                .as_ref()
                .map(|n| format!(" {n:?}"))
                .unwrap_or_default(),
            l.node,
            l.direction.as_str(),
            p.scope.unwrap_or(sidenet_crds::Scope::Own).as_str(),
            if p.toward.is_some() {
                match l.direction {
                    Direction::Egress => ", toward the destination",
                    Direction::Ingress => ", from the source",
                }
            } else {
                ""
            },
            l.rate_kbit
        );
    }
    for i in &v.idle {
        let p = &mp.mesh.spec.policies[i.policy];
        let _ = writeln!(
            s,
            "  not in force: spec.policies[{}]{} on {}: {}",
            i.policy,
            p.name
                .as_ref()
                .map(|n| format!(" {n:?}"))
                .unwrap_or_default(),
            i.node,
            i.why
        );
    }
    let _ = writeln!(
        s,
        "relays: limits with scope relayed or all on the nodes between them also apply; own budgets of relays never do"
    );
    Ok(s)
}
