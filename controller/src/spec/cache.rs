//! The checks of the neighbourhood web cache's settings (`docs/content.md`): what a MeshNode's
//! `spec.cache` and a HardwareProfile's `spec.cache` may say. Every value checked here ends up in
//! a rendered `squid.conf`, so nothing that could break a line or add a directive gets through.

use std::net::IpAddr;

use crate::spec::set::ManifestSet;

/// Where a cache folder must be: an absolute path of letters, digits and `._-/`, no `..`.
pub fn dir_ok(dir: &str) -> Result<(), String> {
    let chars_ok = dir
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
    if !dir.starts_with('/') || dir.len() < 2 || !chars_ok {
        return Err(format!(
            "{dir:?} is not an absolute path of letters, digits and ._-/ (e.g. /var/spool/sidenet-squid)"
        ));
    }
    if dir.split('/').any(|part| part == "..") {
        return Err(format!("{dir:?} contains '..'; write the folder itself"));
    }
    if dir.trim_end_matches('/').is_empty() || ["/tmp", "/var", "/etc", "/usr"].contains(&dir) {
        return Err(format!(
            "{dir:?} is a system folder; give the cache a folder of its own (e.g. {dir}/sidenet-squid)"
        ));
    }
    Ok(())
}

/// A LAN address of a node: an address with its prefix length, neither loopback, unspecified,
/// multicast nor link-local, and not a subnet's network address in IPv4.
pub fn parse_lan(cidr: &str) -> Result<(IpAddr, u8), String> {
    let expected = "expected the node's address on its LAN with the prefix length, like 192.168.1.1/24 or fd12:3456:789a::1/64";
    let (addr, len) = cidr
        .split_once('/')
        .ok_or_else(|| format!("{cidr:?} has no prefix length; {expected}"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address; {expected}"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{len:?} is not a prefix length; {expected}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max || len == 0 {
        return Err(format!(
            "/{len} is not a prefix length of this address (1 to {max}); {expected}"
        ));
    }
    let special = match addr {
        IpAddr::V4(a) => {
            a.is_loopback() || a.is_unspecified() || a.is_multicast() || a.is_link_local()
        }
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.segments()[0] & 0xffc0 == 0xfe80
        }
    };
    if special {
        return Err(format!(
            "{addr} is a loopback, unspecified, multicast or link-local address; {expected}"
        ));
    }
    if let IpAddr::V4(a) = addr
        && len < 31
    {
        let host = u32::from(a) & (u32::MAX >> len);
        if host == 0 {
            return Err(format!(
                "{cidr} is the subnet's network address, not the node's; {expected}"
            ));
        }
    }
    Ok((addr, len))
}

/// The subnet of a LAN address, as Squid's `src` ACL takes it (`192.168.1.0/24`).
pub fn lan_subnet(addr: IpAddr, len: u8) -> String {
    match addr {
        IpAddr::V4(a) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// The cache errors of `set`: `(Kind/name, field, message)`.
pub fn check(set: &ManifestSet) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (name, profile) in &set.profiles {
        if let Some(dir) = profile.spec.cache.as_ref().and_then(|c| c.dir.as_deref())
            && let Err(e) = dir_ok(dir)
        {
            out.push((
                format!("HardwareProfile/{name}"),
                "spec.cache.dir".to_string(),
                e,
            ));
        }
    }
    for (id, node) in &set.nodes {
        let Some(cache) = &node.spec.cache else {
            continue;
        };
        let key = format!(
            "MeshNode/{}",
            node.metadata.name.as_deref().unwrap_or(id.as_str())
        );
        let mesh = set.mesh_of(node);
        // The mesh /48 (checked elsewhere; a prefix that does not parse is reported there).
        let prefix = mesh
            .and_then(|m| m.spec.prefix.split_once('/'))
            .and_then(|(a, _)| a.parse::<std::net::Ipv6Addr>().ok());
        let mut seen: Vec<IpAddr> = Vec::new();
        for (i, cidr) in cache.lan.iter().enumerate() {
            let field = format!("spec.cache.lan[{i}]");
            match parse_lan(cidr) {
                Err(e) => out.push((key.clone(), field, e)),
                Ok((addr, _)) => {
                    if let (IpAddr::V6(a), Some(p)) = (addr, prefix)
                        && a.segments()[..3] == p.segments()[..3]
                    {
                        out.push((
                            key.clone(),
                            field,
                            format!(
                                "{addr} is inside the mesh prefix {}: the side-net is not a LAN (the cache listens on the node's side-net address by itself); give the node's address on the household LAN",
                                mesh.map(|m| m.spec.prefix.as_str()).unwrap_or_default()
                            ),
                        ));
                    } else if seen.contains(&addr) {
                        out.push((key.clone(), field, format!("{addr} is listed twice")));
                    }
                    seen.push(addr);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_addresses() {
        assert_eq!(
            parse_lan("192.168.1.1/24").map(|(a, l)| lan_subnet(a, l)),
            Ok("192.168.1.0/24".into())
        );
        assert_eq!(
            parse_lan("fd12:3456:789a::1/64").map(|(a, l)| lan_subnet(a, l)),
            Ok("fd12:3456:789a::/64".into())
        );
        for bad in [
            "192.168.1.1",
            "192.168.1.0/24",
            "192.168.1.1/33",
            "fe80::1/64",
            "127.0.0.1/8",
            "x/24",
            "192.168.1.1/24\nhttp_access allow all",
        ] {
            assert!(parse_lan(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_folders() {
        assert!(dir_ok("/var/spool/sidenet-squid").is_ok());
        assert!(dir_ok("/mnt/sda1/sidenet-squid").is_ok());
        for bad in [
            "var/spool",
            "/",
            "/tmp",
            "/a b",
            "/x/../etc",
            "/x\ncache_dir",
        ] {
            assert!(dir_ok(bad).is_err(), "{bad}");
        }
    }
}
