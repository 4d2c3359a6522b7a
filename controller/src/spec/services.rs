//! Published services (`spec.services` of a MeshNode) and the Mesh's handover thresholds
//! (`spec.handover`): their checks and the parsed form the renderer uses
//! (`docs/dataplane.md`, "Handover").

use std::net::Ipv6Addr;

use crate::spec::set::ManifestSet;

/// Routing table the agents' babeld installs the routes to published services in (never the
/// main table: the agent's rule decides whether traffic looks there). Below 256: babeld 1.12
/// passes the table in the 8-bit field of its netlink messages only (2121 became 73).
pub const SERVICE_TABLE: u32 = 121;
/// Priority of the agents' `ip -6 rule`s that send a service's traffic to [`SERVICE_TABLE`]
/// (before the main table's 32766).
pub const SERVICE_RULE_PRIORITY: u32 = 2121;

/// `ADDR` or `ADDR/LEN` as a global IPv6 prefix in canonical form (`2001:db8::80/128`).
pub fn parse_service_prefix(text: &str) -> Result<(Ipv6Addr, u8), String> {
    let (a, l) = match text.split_once('/') {
        Some((a, l)) => (
            a,
            l.parse::<u8>()
                .ok()
                .filter(|l| *l <= 128)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to 128"))?,
        ),
        None => (text, 128),
    };
    if a.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!(
            "{text:?} is IPv4: only IPv6 services can be published (the side-net is IPv6)"
        ));
    }
    let addr: Ipv6Addr = a
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv6 address or prefix"))?;
    if l < 16 {
        return Err(format!(
            "{text:?}: a prefix shorter than /16 would take the internet over the side-net"
        ));
    }
    let bits = u128::from(addr);
    let mask = if l == 0 { 0 } else { u128::MAX << (128 - l) };
    if bits & !mask != 0 {
        return Err(format!(
            "{text:?} has host bits set: write {}/{l} or the address alone",
            Ipv6Addr::from(bits & mask)
        ));
    }
    let s = addr.segments()[0];
    // Global unicast only: 2000::/3.
    if s & 0xe000 != 0x2000 {
        return Err(format!(
            "{text:?} is not a global unicast (internet) address (2000::/3)"
        ));
    }
    Ok((addr, l))
}

/// The service errors of `set`: `(Kind/name, field, message)`.
pub fn check(set: &ManifestSet) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    // (mesh, prefix) → the first node that publishes it
    let mut owners: std::collections::BTreeMap<(String, String), String> = Default::default();
    for (id, node) in &set.nodes {
        let key = format!(
            "MeshNode/{}",
            node.metadata.name.as_deref().unwrap_or(id.as_str())
        );
        let mut names: Vec<&str> = Vec::new();
        for (i, s) in node.spec.services.iter().enumerate() {
            if names.contains(&s.name.as_str()) {
                out.push((
                    key.clone(),
                    format!("spec.services[{i}].name"),
                    format!("{:?} is listed twice", s.name),
                ));
            }
            names.push(&s.name);
            if s.addresses.is_empty() {
                out.push((
                    key.clone(),
                    format!("spec.services[{i}].addresses"),
                    "a service needs at least one address".to_string(),
                ));
            }
            for (j, a) in s.addresses.iter().enumerate() {
                let field = format!("spec.services[{i}].addresses[{j}]");
                match parse_service_prefix(a) {
                    Err(e) => out.push((key.clone(), field, e)),
                    Ok((addr, l)) => {
                        let canon = format!("{addr}/{l}");
                        let mesh = node.spec.mesh.clone();
                        if let Some(other) = owners.get(&(mesh.clone(), canon.clone())) {
                            out.push((
                                key.clone(),
                                field,
                                format!("{canon} is already published by {other}"),
                            ));
                        } else {
                            owners.insert((mesh, canon), key.clone());
                        }
                    }
                }
            }
            if s.ports.contains(&0) {
                out.push((
                    key.clone(),
                    format!("spec.services[{i}].ports"),
                    "port 0 is not a port".to_string(),
                ));
            }
        }
    }
    for (name, mesh) in &set.meshes {
        let Some(h) = &mesh.spec.handover else {
            continue;
        };
        if let Some(l) = h.loss_percent
            && l > 100
        {
            out.push((
                format!("Mesh/{name}"),
                "spec.handover.lossPercent".to_string(),
                format!("{l} is more than 100"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_prefixes() {
        assert_eq!(
            parse_service_prefix("2001:db8:5::80").map(|(a, l)| format!("{a}/{l}")),
            Ok("2001:db8:5::80/128".to_string())
        );
        assert_eq!(
            parse_service_prefix("2001:db8:5::/64").map(|(a, l)| format!("{a}/{l}")),
            Ok("2001:db8:5::/64".to_string())
        );
        for bad in [
            "192.0.2.1",
            "fd00::1",
            "fe80::1",
            "2001:db8::1/64",
            "2001:db8::/8",
            "::/0",
            "2001:db8::/129",
            "nonsense",
        ] {
            assert!(parse_service_prefix(bad).is_err(), "{bad}");
        }
    }
}
