//! The MQTT topic tree. Every topic lives under one versioned root.
//!
//! ```text
//! sidenet/v1/{mesh}/announce                 retained, controller: mesh public key, signed
//! sidenet/v1/{mesh}/announce/{shard}         the same, once per shard (first letter of node ids)
//! sidenet/v1/{mesh}/enroll/{node}            agent → controller, signed by node key
//! sidenet/v1/{mesh}/nodes/{node}/config      retained QoS1, controller → agent, signed by mesh key
//! sidenet/v1/{mesh}/nodes/{node}/status      agent → controller, signed by node key
//! sidenet/v1/{mesh}/nodes/{node}/ack         controller → agent, signed by mesh key
//! sidenet/v1/{mesh}/nodes/{node}/online      last will: online / offline
//! ```
//!
//! Callers validate names with [`crate::names`] first; these functions only format.

/// The versioned root of every topic.
pub const ROOT: &str = "sidenet/v1";

/// The signed, retained mesh announcement.
pub fn announce(mesh: &str) -> String {
    format!("{ROOT}/{mesh}/announce")
}

/// The letters node ids start with (lowercase RFC 4648 base32): one announcement shard each.
pub const ANNOUNCE_SHARDS: &str = "abcdefghijklmnopqrstuvwxyz234567";

/// The copy of the announcement that node `node` subscribes to: `announce/{first letter of
/// its id}`. Every agent subscribing to one topic makes a broker keep one subscriber list of
/// the whole fleet, and Mosquitto walks that list (comparing client ids) on every subscribe and
/// every disconnect, so a reconnect storm of N agents costs it O(N²); 32 shards divide that by
/// 32. The controller publishes every shard, and the unsharded topic for older agents.
pub fn announce_shard(mesh: &str, node: &str) -> String {
    let shard = node
        .chars()
        .next()
        .filter(|c| ANNOUNCE_SHARDS.contains(*c))
        .unwrap_or('a');
    format!("{ROOT}/{mesh}/announce/{shard}")
}

/// Every topic the announcement of `mesh` is published to: the unsharded one, then each shard.
pub fn announce_all(mesh: &str) -> Vec<String> {
    std::iter::once(announce(mesh))
        .chain(
            ANNOUNCE_SHARDS
                .chars()
                .map(|c| format!("{ROOT}/{mesh}/announce/{c}")),
        )
        .collect()
}

/// Whether `topic` carries the announcement of `mesh` (unsharded or a shard).
pub fn is_announce(mesh: &str, topic: &str) -> bool {
    let Some(rest) = topic
        .strip_prefix(ROOT)
        .and_then(|t| t.strip_prefix('/'))
        .and_then(|t| t.strip_prefix(mesh))
        .and_then(|t| t.strip_prefix("/announce"))
    else {
        return false;
    };
    match rest.strip_prefix('/') {
        None => rest.is_empty(),
        Some(s) => s.len() == 1 && ANNOUNCE_SHARDS.contains(s),
    }
}

/// Where a node asks to join.
pub fn enroll(mesh: &str, node: &str) -> String {
    format!("{ROOT}/{mesh}/enroll/{node}")
}

/// A node's retained config.
pub fn config(mesh: &str, node: &str) -> String {
    format!("{ROOT}/{mesh}/nodes/{node}/config")
}

/// A node's status reports.
pub fn status(mesh: &str, node: &str) -> String {
    format!("{ROOT}/{mesh}/nodes/{node}/status")
}

/// The controller's acknowledgements of a node's status reports (not retained).
pub fn ack(mesh: &str, node: &str) -> String {
    format!("{ROOT}/{mesh}/nodes/{node}/ack")
}

/// A node's presence (retained `online`, last will `offline`).
pub fn online(mesh: &str, node: &str) -> String {
    format!("{ROOT}/{mesh}/nodes/{node}/online")
}

/// Filters the controller subscribes to for one mesh.
pub fn controller_filters(mesh: &str) -> [String; 3] {
    [
        format!("{ROOT}/{mesh}/enroll/+"),
        format!("{ROOT}/{mesh}/nodes/+/status"),
        format!("{ROOT}/{mesh}/nodes/+/online"),
    ]
}

/// What a topic received by the controller is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// An enrolment request from `node`.
    Enroll { mesh: &'a str, node: &'a str },
    /// A status report from `node`.
    Status { mesh: &'a str, node: &'a str },
    /// A presence change of `node`.
    Online { mesh: &'a str, node: &'a str },
}

/// Parses a topic the controller subscribed to. Returns `None` for anything else.
pub fn parse(topic: &str) -> Option<Incoming<'_>> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [mesh, "enroll", node] => Some(Incoming::Enroll { mesh, node }),
        [mesh, "nodes", node, "status"] => Some(Incoming::Status { mesh, node }),
        [mesh, "nodes", node, "online"] => Some(Incoming::Online { mesh, node }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_shards() {
        let node = crate::keys::KeyPair::from_seed(&[3; 32]).public().node_id();
        let mine = announce_shard("m", &node);
        assert_eq!(mine, format!("sidenet/v1/m/announce/{}", &node[..1]));
        let all = announce_all("m");
        assert_eq!(all.len(), 33);
        assert_eq!(all[0], "sidenet/v1/m/announce");
        assert!(all.contains(&mine));
        assert!(all.iter().all(|t| is_announce("m", t)));
        for t in [
            "sidenet/v1/m/announce/",
            "sidenet/v1/m/announce/ab",
            "sidenet/v1/m/announce/1",
            "sidenet/v1/m/announce/+",
            "sidenet/v1/m/announcex",
            "sidenet/v1/mm/announce",
            "sidenet/v1/m/nodes/a/config",
        ] {
            assert!(!is_announce("m", t), "{t}");
        }
        // Every id a node can have has its own shard.
        for i in 0..200u8 {
            let id = crate::keys::KeyPair::from_seed(&[i; 32]).public().node_id();
            assert!(ANNOUNCE_SHARDS.contains(&id[..1]), "{id}");
        }
    }

    #[test]
    fn formats_and_parses() {
        assert_eq!(
            config("riverside", "abc"),
            "sidenet/v1/riverside/nodes/abc/config"
        );
        assert_eq!(
            parse(&status("m", "n")),
            Some(Incoming::Status {
                mesh: "m",
                node: "n"
            })
        );
        assert_eq!(
            parse(&enroll("m", "n")),
            Some(Incoming::Enroll {
                mesh: "m",
                node: "n"
            })
        );
        assert_eq!(parse("sidenet/v1/m/nodes/n/config"), None);
        assert_eq!(parse("other/v1/m/enroll/n"), None);
        assert_eq!(parse("sidenet/v1/m/enroll/n/extra"), None);
    }
}

/// Parses a broker URL `mqtt://host:port` (port defaults to 1883; `[v6]:port` works) into host
/// and port.
pub fn parse_broker_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| format!("broker URL {url:?} must start with mqtt://"))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(format!("broker URL {url:?} names no host"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("broker URL {url:?}: unclosed '['"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("broker URL {url:?}: port {p:?} is not a number"))?,
        None => 1883,
    };
    Ok((host, port))
}

/// A broker URL taken apart: `mqtt://host[:port]` (plain, default port 1883) or
/// `mqtts://host[:port]` (TLS, default port 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://`: the connection is TLS.
    pub tls: bool,
}

/// Parses `mqtt://`, `tcp://` or `mqtts://` URLs (see [`BrokerUrl`]).
pub fn parse_broker(url: &str) -> Result<BrokerUrl, String> {
    let Some(rest) = url.strip_prefix("mqtts://") else {
        if !url.starts_with("mqtt://") && !url.starts_with("tcp://") {
            return Err(format!(
                "broker URL {url:?} must start with mqtt:// or mqtts://"
            ));
        }
        let (host, port) = parse_broker_url(url)?;
        return Ok(BrokerUrl {
            host,
            port,
            tls: false,
        });
    };
    let (host, port) = parse_broker_url(&format!("mqtt://{rest}"))
        .map_err(|e| e.replace("mqtt://", "mqtts://"))?;
    let trimmed = rest.trim_end_matches('/');
    let explicit = match trimmed.strip_prefix('[') {
        Some(v6) => v6
            .split_once(']')
            .is_some_and(|(_, after)| after.starts_with(':')),
        None => trimmed.contains(':'),
    };
    Ok(BrokerUrl {
        host,
        port: if explicit { port } else { 8883 },
        tls: true,
    })
}

#[cfg(test)]
mod url_tests {
    use super::{BrokerUrl, parse_broker, parse_broker_url};

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1884"),
            Ok(("127.0.0.1".into(), 1884))
        );
        assert_eq!(
            parse_broker_url("mqtt://broker"),
            Ok(("broker".into(), 1883))
        );
        assert_eq!(
            parse_broker_url("mqtt://[fd00::1]:1883"),
            Ok(("fd00::1".into(), 1883))
        );
        assert!(parse_broker_url("http://x").is_err());
        assert!(parse_broker_url("mqtt://x:abc").is_err());
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn tls_broker_urls() {
        let u = |host: &str, port, tls| BrokerUrl {
            host: host.into(),
            port,
            tls,
        };
        assert_eq!(parse_broker("mqtt://h"), Ok(u("h", 1883, false)));
        assert_eq!(parse_broker("tcp://h:1"), Ok(u("h", 1, false)));
        assert_eq!(parse_broker("mqtts://h"), Ok(u("h", 8883, true)));
        assert_eq!(parse_broker("mqtts://h:9000/"), Ok(u("h", 9000, true)));
        assert_eq!(parse_broker("mqtts://[::1]"), Ok(u("::1", 8883, true)));
        assert_eq!(parse_broker("mqtts://[::1]:9001"), Ok(u("::1", 9001, true)));
        let e = parse_broker("https://h").unwrap_err();
        assert!(e.contains("mqtt:// or mqtts://"), "{e}");
        let e = parse_broker("mqtts://h:x").unwrap_err();
        assert!(e.contains("\"mqtts://h:x\""), "{e}");
        assert!(parse_broker("mqtts://").is_err());
    }
}
