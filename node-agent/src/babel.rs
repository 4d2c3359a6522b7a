//! Reading babeld's state through its local configuration interface (`local-path` socket or
//! `local-port` on ::1): `dump` lists interfaces, neighbours and routes, one per line.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

/// One babel neighbour as babeld reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct BabelNeighbour {
    /// Link-local address.
    pub address: String,
    /// Interface.
    pub interface: String,
    /// Reachability bitmap (hex).
    pub reach: String,
    /// Link cost (65535: unreachable).
    pub cost: u32,
}

/// One route.
#[derive(Debug, Clone, PartialEq)]
pub struct BabelRoute {
    /// Prefix.
    pub prefix: String,
    /// Installed in the kernel.
    pub installed: bool,
    /// Metric.
    pub metric: u32,
    /// Next hop.
    pub via: String,
    /// Interface.
    pub interface: String,
}

/// What `dump` returned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dump {
    /// Neighbours.
    pub neighbours: Vec<BabelNeighbour>,
    /// Routes.
    pub routes: Vec<BabelRoute>,
}

fn field<'a>(words: &'a [&'a str], key: &str) -> Option<&'a str> {
    words.windows(2).find(|w| w[0] == key).map(|w| w[1])
}

/// Parses the lines of a dump.
pub fn parse(text: &str) -> Dump {
    let mut d = Dump::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["add" | "change", "neighbour", ..] => {
                let (Some(address), Some(interface)) = (field(&w, "address"), field(&w, "if"))
                else {
                    continue;
                };
                d.neighbours.push(BabelNeighbour {
                    address: address.into(),
                    interface: interface.into(),
                    reach: field(&w, "reach").unwrap_or("0000").into(),
                    cost: field(&w, "cost")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(65535),
                });
            }
            ["add" | "change", "route", ..] => {
                let Some(prefix) = field(&w, "prefix") else {
                    continue;
                };
                d.routes.push(BabelRoute {
                    prefix: prefix.into(),
                    installed: field(&w, "installed") == Some("yes"),
                    metric: field(&w, "metric")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(65535),
                    via: field(&w, "via").unwrap_or("").into(),
                    interface: field(&w, "if").unwrap_or("").into(),
                });
            }
            _ => {}
        }
    }
    d
}

fn exchange<S: std::io::Read + Write>(stream: S) -> std::io::Result<String> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // Greeting: BABEL 1.0, version, host, my-id, then "ok".
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("babeld closed the connection"));
        }
        if line.trim() == "ok" {
            break;
        }
    }
    reader.get_mut().write_all(b"dump\n")?;
    let mut out = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let t = line.trim();
        if t == "ok" || t.starts_with("bad") || t.starts_with("no") {
            break;
        }
        out.push_str(&line);
    }
    let _ = reader.get_mut().write_all(b"quit\n");
    Ok(out)
}

/// Dumps babeld's state over its local socket at `path`.
pub fn dump_path(path: &Path, timeout: Duration) -> std::io::Result<Dump> {
    let s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    exchange(s).map(|t| parse(&t))
}

/// Dumps babeld's state over its local TCP port on ::1.
pub fn dump_port(port: u16, timeout: Duration) -> std::io::Result<Dump> {
    let addr = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    exchange(s).map(|t| parse(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_babeld_1_12_dump() {
        let text = "add interface sn-peer up true ipv6 fe80::a
add neighbour 556f160192f0 address fe80::b if sn-peer reach fffc ureach 0000 rxcost 96 txcost 96 rtt 9.245 rttcost 0 cost 96
add route 5605d2b0 prefix fd00:b::/64 from ::/0 installed yes id 2c:46:65:32:89:0e:3f:b2 metric 96 price 0 refmetric 0 via fe80::b if sn-peer
add xroute prefix fd00:a::/64 from ::/0 metric 0
";
        let d = parse(text);
        assert_eq!(
            d.neighbours,
            [BabelNeighbour {
                address: "fe80::b".into(),
                interface: "sn-peer".into(),
                reach: "fffc".into(),
                cost: 96
            }]
        );
        assert_eq!(d.routes.len(), 1);
        assert_eq!(d.routes[0].prefix, "fd00:b::/64");
        assert!(d.routes[0].installed);
        assert_eq!(d.routes[0].via, "fe80::b");
    }

    #[test]
    fn talks_the_local_protocol() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("babel.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        let server = std::thread::spawn(move || -> std::io::Result<String> {
            let (mut s, _) = listener.accept()?;
            s.write_all(b"BABEL 1.0\nversion babeld-1.12.1\nhost x\nmy-id 1\nok\n")?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut cmd = String::new();
            r.read_line(&mut cmd)?;
            s.write_all(b"add neighbour 1 address fe80::b if sn-x reach ffff cost 96\nok\n")?;
            Ok(cmd)
        });
        let d = dump_path(&path, Duration::from_secs(5))?;
        assert_eq!(d.neighbours.len(), 1);
        let cmd = server.join().map_err(|_| "server panicked")??;
        assert_eq!(cmd, "dump\n");
        Ok(())
    }
}
