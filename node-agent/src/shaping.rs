//! The shaping table `etc/sidenet/shaping` (compiled by the controller, format in
//! `docs/policies.md`): HTB classes on ifb devices, the rates of every stretch of the local
//! week, and the UTC offsets of the Mesh's time zone, so the node finds its local minute of the
//! week, and the rates in force, from its own clock with no time zone database and no message.
//!
//! Most of this module is pure: it parses the table, picks the stretch in force at a Unix time
//! and turns the table into `ip`/`tc` command lines; [`Shaper`] runs them through the backend's
//! [`Runner`] (the `linux` backend applies the table and calls [`Shaper::tick`] every second).

use crate::backend::Runner;

/// One HTB class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    /// `MAJOR:MINOR`.
    pub id: String,
    /// The parent class, or `root` (the class right under the qdisc).
    pub parent: String,
    /// Whether traffic ends here (it gets a leaf qdisc).
    pub leaf: bool,
    /// What it holds (`own`, `relayed`, `toward:NAME`...).
    pub name: String,
}

/// One ifb device and its HTB tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ifb {
    /// `egress` (the side-net links' egress is redirected to it) or `ingress`.
    pub direction: String,
    /// Device name.
    pub dev: String,
    /// HTB handle (major).
    pub major: u32,
    /// Its classes, parents first.
    pub classes: Vec<Class>,
}

/// A stretch of the local week: from `minute` (Monday 00:00 = 0) to the next stretch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stretch {
    /// Minute of the local week it starts at.
    pub minute: u32,
    /// The scheduled policies whose windows are open (empty: none).
    pub windows: Vec<String>,
    /// Class id → ceiling, kbit/s.
    pub rates: Vec<(String, u64)>,
}

/// The parsed table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    /// The preferred leaf qdisc (`fq_codel`); `pfifo` when the kernel lacks it.
    pub leaf: String,
    /// The ifb devices.
    pub ifbs: Vec<Ifb>,
    /// Ingress u32 filters: class id, destination and source prefixes.
    pub filters: Vec<(String, Option<String>, Option<String>)>,
    /// `(from, seconds)`: the UTC offset from Unix time `from` on.
    pub offsets: Vec<(i64, i64)>,
    /// The stretches of the week, sorted by minute.
    pub stretches: Vec<Stretch>,
}

/// The leaf qdisc used when the preferred one cannot be created.
pub const FALLBACK_LEAF: &str = "pfifo";
/// Minutes in a week.
const WEEK: i64 = 7 * 1440;

fn word(w: &str) -> bool {
    !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_:.,/+*[]=".contains(c))
}

/// Parses the table; the error names the line and what was expected.
pub fn parse(text: &str) -> Result<Table, String> {
    let mut t = Table::default();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = |what: &str| format!("shaping line {}: {what}: {raw:?}", n + 1);
        if let Some(w) = f.iter().find(|w| !word(w)) {
            return Err(bad(&format!("unexpected character in {w:?}")));
        }
        let num = |s: &str| s.parse::<i64>().map_err(|_| bad("expected a number"));
        match f[0] {
            "leaf" if f.len() == 2 => t.leaf = f[1].to_string(),
            "ifb" if f.len() == 4 => t.ifbs.push(Ifb {
                direction: f[1].to_string(),
                dev: f[2].to_string(),
                major: u32::try_from(num(f[3])?).map_err(|_| bad("bad handle"))?,
                classes: Vec::new(),
            }),
            "class" if f.len() == 5 => {
                let ifb = t
                    .ifbs
                    .last_mut()
                    .ok_or_else(|| bad("a class before any ifb"))?;
                ifb.classes.push(Class {
                    id: f[1].to_string(),
                    parent: f[2].to_string(),
                    leaf: f[3] == "leaf",
                    name: f[4].to_string(),
                });
            }
            "filter" if f.len().is_multiple_of(2) => {
                let mut dst = None;
                let mut src = None;
                for kv in f[2..].chunks(2) {
                    match kv[0] {
                        "dst" => dst = Some(kv[1].to_string()),
                        "src" => src = Some(kv[1].to_string()),
                        _ => return Err(bad("expected dst or src")),
                    }
                }
                t.filters.push((f[1].to_string(), dst, src));
            }
            "offset" if f.len() == 3 => t.offsets.push((num(f[1])?, num(f[2])?)),
            "at" if f.len() >= 3 => {
                let minute = u32::try_from(num(f[1])?).map_err(|_| bad("bad minute"))?;
                let windows = if f[2] == "-" {
                    Vec::new()
                } else {
                    f[2].split(',').map(str::to_string).collect()
                };
                let mut rates = Vec::new();
                for r in &f[3..] {
                    let (id, k) = r.split_once('=').ok_or_else(|| bad("expected ID=KBIT"))?;
                    let k = u64::try_from(num(k)?).map_err(|_| bad("bad rate"))?;
                    rates.push((id.to_string(), k.max(8)));
                }
                t.stretches.push(Stretch {
                    minute,
                    windows,
                    rates,
                });
            }
            _ => return Err(bad("unknown statement or wrong number of fields")),
        }
    }
    if t.stretches.is_empty() {
        return Err("shaping: no `at` line".into());
    }
    t.offsets.sort_unstable();
    t.stretches.sort_by_key(|s| s.minute);
    Ok(t)
}

impl Table {
    /// The local minute of the week at Unix time `now`: UTC plus the offset of the last
    /// `offset` line whose time is not after `now` (none: UTC).
    pub fn week_minute(&self, now: i64) -> u32 {
        let off = self
            .offsets
            .iter()
            .take_while(|(from, _)| *from <= now)
            .last()
            .map_or(0, |&(_, s)| s);
        let minutes = (now + off).div_euclid(60);
        // 1970-01-01 was a Thursday: Monday 00:00 is three days before it.
        (minutes + 3 * 1440).rem_euclid(WEEK) as u32
    }

    /// The index of the stretch in force at Unix time `now` (the last one that starts at or
    /// before the local minute; before the first one, the week's last one still runs).
    pub fn stretch_at(&self, now: i64) -> usize {
        let m = self.week_minute(now);
        self.stretches
            .iter()
            .rposition(|s| s.minute <= m)
            .unwrap_or(self.stretches.len().saturating_sub(1))
    }

    fn class_rate(&self, stretch: usize, id: &str) -> u64 {
        self.stretches
            .get(stretch)
            .and_then(|s| s.rates.iter().find(|(c, _)| c == id))
            .map_or(10_000_000, |&(_, k)| k)
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The `tc class` arguments after `tc class add|change dev DEV` for class `c` at `kbit`: every
/// class but the root guarantees 8 kbit/s (so siblings borrow from their parent and together
/// never exceed it) with a 15,000-byte burst, and is capped at its ceiling with a burst of 10 ms
/// (at least 15,000 bytes).
pub fn class_args(ifb: &Ifb, c: &Class, kbit: u64) -> Vec<String> {
    let root = c.parent == "root";
    let parent = if root {
        format!("{}:", ifb.major)
    } else {
        c.parent.clone()
    };
    let cburst = (kbit * 125 / 100).max(15_000).to_string();
    let (rate, burst) = if root {
        (format!("{kbit}kbit"), cburst.clone())
    } else {
        ("8kbit".to_string(), "15000".to_string())
    };
    let mut v = s(&["parent", &parent, "classid", &c.id, "htb", "rate", &rate]);
    v.extend(s(&[
        "ceil",
        &format!("{kbit}kbit"),
        "burst",
        &burst,
        "cburst",
        &cburst,
        "quantum",
        "1514",
    ]));
    v
}

/// The handle of the leaf qdisc under class `id` (`1:9` → `1009:`).
pub fn leaf_handle(id: &str) -> String {
    let (maj, min) = id.split_once(':').unwrap_or((id, "0"));
    let maj: u32 = maj.parse().unwrap_or(0);
    let min: u32 = min.parse().unwrap_or(0);
    format!("{}:", maj * 1000 + min)
}

/// The commands that build the table's trees at stretch `stretch` (the leaf qdiscs are added
/// separately, see [`leaf_args`]): each ifb recreated, its HTB qdisc and classes, the ingress
/// filters.
pub fn build(t: &Table, stretch: usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for ifb in &t.ifbs {
        out.push(s(&["ip", "link", "add", &ifb.dev, "type", "ifb"]));
        out.push(s(&["ip", "link", "set", &ifb.dev, "up"]));
        out.push(s(&[
            "tc",
            "qdisc",
            "replace",
            "dev",
            &ifb.dev,
            "root",
            "handle",
            &format!("{}:", ifb.major),
            "htb",
        ]));
        for c in &ifb.classes {
            let mut v = s(&["tc", "class", "replace", "dev", &ifb.dev]);
            v.extend(class_args(ifb, c, t.class_rate(stretch, &c.id)));
            out.push(v);
        }
        if ifb.direction == "ingress" {
            for (k, (id, dst, src)) in t.filters.iter().enumerate() {
                let prio = (k + 1).to_string();
                let mut v = s(&[
                    "tc",
                    "filter",
                    "add",
                    "dev",
                    &ifb.dev,
                    "parent",
                    &format!("{}:", ifb.major),
                    "protocol",
                    "ipv6",
                    "prio",
                    &prio,
                    "u32",
                ]);
                for (key, val) in [("dst", dst), ("src", src)] {
                    if let Some(p) = val {
                        v.extend(s(&["match", "ip6", key, p]));
                    }
                }
                v.extend(s(&["flowid", id]));
                out.push(v);
            }
        }
    }
    out
}

/// `tc qdisc replace dev DEV parent ID handle H: LEAF ...` for a leaf class.
pub fn leaf_args(ifb: &Ifb, c: &Class, leaf: &str) -> Vec<String> {
    let mut v = s(&[
        "tc",
        "qdisc",
        "replace",
        "dev",
        &ifb.dev,
        "parent",
        &c.id,
        "handle",
        &leaf_handle(&c.id),
        leaf,
    ]);
    if leaf == FALLBACK_LEAF {
        v.extend(s(&["limit", "128"]));
    }
    v
}

/// The commands that send a side-net link's traffic through the ifb devices: a `clsact`
/// qdisc with a catch-all u32 filter redirecting egress (and ingress) to the matching ifb.
pub fn redirect(t: &Table, iface: &str) -> Vec<Vec<String>> {
    let mut out = vec![s(&["tc", "qdisc", "add", "dev", iface, "clsact"])];
    for ifb in &t.ifbs {
        let hook = if ifb.direction == "ingress" {
            "ingress"
        } else {
            "egress"
        };
        out.push(s(&[
            "tc", "filter", "add", "dev", iface, hook, "protocol", "all", "prio", "1", "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", &ifb.dev,
        ]));
    }
    out
}

/// The `tc class change` commands that move the classes from one stretch's rates to another's
/// (only classes whose rate differs).
pub fn switch(t: &Table, from: Option<usize>, to: usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for ifb in &t.ifbs {
        for c in &ifb.classes {
            let k = t.class_rate(to, &c.id);
            if from.is_some_and(|f| t.class_rate(f, &c.id) == k) {
                continue;
            }
            let mut v = s(&["tc", "class", "change", "dev", &ifb.dev]);
            v.extend(class_args(ifb, c, k));
            out.push(v);
        }
    }
    out
}

/// The environment variable that shifts the agent's clock for the shaping table by a number of
/// seconds (may be negative). **For tests only** (`tests/netns/shaping`): it lets a test cross a
/// window boundary without waiting. It changes nothing else the agent does with time.
pub const TEST_CLOCK_ENV: &str = "SIDENET_TEST_CLOCK_OFFSET";

/// Unix time as the shaping table reads it: the system clock plus [`TEST_CLOCK_ENV`].
pub fn now() -> i64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let off = std::env::var(TEST_CLOCK_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    t.saturating_add(off)
}

/// An applied table.
#[derive(Debug, Clone)]
pub struct Shaper {
    table: Table,
    stretch: usize,
    leaf: String,
    ifaces: Vec<String>,
}

fn run(r: &mut dyn Runner, argv: &[String]) -> Result<String, String> {
    let v: Vec<&str> = argv.iter().map(String::as_str).collect();
    r.run(&v)
}

impl Shaper {
    /// Builds the table's trees at the stretch in force at `now` and sends the side-net links
    /// `ifaces` through them. The leaf qdisc is the table's when the kernel has it (tried on the
    /// first leaf), else [`FALLBACK_LEAF`].
    pub fn apply(
        r: &mut dyn Runner,
        text: &str,
        ifaces: &[String],
        now: i64,
    ) -> Result<Shaper, String> {
        let table = parse(text)?;
        let stretch = table.stretch_at(now);
        remove(r, &table, ifaces);
        for c in build(&table, stretch) {
            run(r, &c)?;
        }
        let mut leaf = table.leaf.clone();
        for ifb in &table.ifbs {
            for c in ifb.classes.iter().filter(|c| c.leaf) {
                if run(r, &leaf_args(ifb, c, &leaf)).is_err() && leaf != FALLBACK_LEAF {
                    tracing::info!(
                        "the kernel has no {leaf} qdisc: the shaping classes use {FALLBACK_LEAF} leaves"
                    );
                    leaf = FALLBACK_LEAF.to_string();
                    run(r, &leaf_args(ifb, c, &leaf))?;
                }
            }
        }
        for i in ifaces {
            for c in redirect(&table, i) {
                run(r, &c)?;
            }
        }
        let windows = &table.stretches[stretch].windows;
        tracing::info!(
            "shaping: {} leaves, windows open: {}",
            leaf,
            if windows.is_empty() {
                "none".to_string()
            } else {
                windows.join(",")
            }
        );
        Ok(Shaper {
            table,
            stretch,
            leaf,
            ifaces: ifaces.to_vec(),
        })
    }

    /// Moves the classes to the rates of the stretch in force at `now` when it changed; whether
    /// it switched.
    pub fn tick(&mut self, r: &mut dyn Runner, now: i64) -> bool {
        let to = self.table.stretch_at(now);
        if to == self.stretch {
            return false;
        }
        let mut ok = true;
        for c in switch(&self.table, Some(self.stretch), to) {
            if let Err(e) = run(r, &c) {
                tracing::warn!("shaping: {}: {e}", c.join(" "));
                ok = false;
            }
        }
        let w = &self.table.stretches[to].windows;
        tracing::info!(
            "shaping: local minute {} of the week, windows open: {}",
            self.table.week_minute(now),
            if w.is_empty() {
                "none".to_string()
            } else {
                w.join(",")
            }
        );
        // Retried at the next tick when a command failed.
        if ok {
            self.stretch = to;
        }
        ok
    }

    /// The leaf qdisc in use.
    pub fn leaf(&self) -> &str {
        &self.leaf
    }

    /// The scheduled policies whose windows are open now.
    pub fn windows(&self) -> &[String] {
        &self.table.stretches[self.stretch].windows
    }

    /// Removes the trees and the links' redirects.
    pub fn down(&self, r: &mut dyn Runner) {
        remove(r, &self.table, &self.ifaces);
    }
}

/// What both backends do with a config's table (`text`; none: the config has no table): the
/// classes of `current` removed (with none applied, what an earlier run of the agent left, when
/// `left`), then `text` applied to the side-net links `links`.
pub fn converge(
    r: &mut dyn Runner,
    current: &mut Option<Shaper>,
    text: Option<&str>,
    links: &[String],
    left: bool,
) -> Result<(), String> {
    match current.take() {
        Some(s) => s.down(r),
        None if left => remove_all(r, links),
        None => {}
    }
    if let Some(t) = text {
        *current = Some(Shaper::apply(r, t, links, now())?);
    }
    Ok(())
}

/// Moves the applied table (if any) to the stretch in force now, and what the status reports of
/// it.
pub fn observe(
    r: &mut dyn Runner,
    current: Option<&mut Shaper>,
) -> Option<sidenet_wire::messages::ShapingStatus> {
    let s = current?;
    s.tick(r, now());
    Some(sidenet_wire::messages::ShapingStatus {
        leaf: s.leaf.clone(),
        windows: s.windows().to_vec(),
    })
}

/// The ifb devices the controller's tables name (`controller/src/spec/policy/compile.rs`).
pub const IFBS: [&str; 2] = ["sneg0", "snin0"];

/// Deletes the ifb devices [`IFBS`] and the `clsact` qdiscs of `ifaces`, whatever table made them.
pub fn remove_all(r: &mut dyn Runner, ifaces: &[String]) {
    for d in IFBS {
        let _ = r.run(&["ip", "link", "del", d]);
    }
    for i in ifaces {
        let _ = r.run(&["tc", "qdisc", "del", "dev", i, "clsact"]);
    }
}

/// Deletes the ifb devices of `t` (their qdiscs go with them) and the links' `clsact` qdiscs;
/// what is not there is no error.
fn remove(r: &mut dyn Runner, t: &Table, ifaces: &[String]) {
    for ifb in &t.ifbs {
        let _ = r.run(&["ip", "link", "del", &ifb.dev]);
    }
    for i in ifaces {
        let _ = r.run(&["tc", "qdisc", "del", "dev", i, "clsact"]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TABLE: &str = "# sidenet shaping\nleaf fq_codel\nifb egress sneg0 1\nclass 1:1 root inner all\nclass 1:3 1:1 inner own\nclass 1:9 1:3 leaf own-other\nifb ingress snin0 2\nclass 2:1 root inner all\nclass 2:9 2:1 leaf own-other\nfilter 2:9 dst fd00:1:2:1::/64\noffset 1704067200 3600\noffset 1711846800 7200\noffset 1729990800 3600\nat 0 off-peak 1:3=50000 1:9=10000000 2:9=8000  # mon 00:00\nat 420 - 1:3=5000 1:9=10000000 2:9=8000  # mon 07:00\nat 1380 off-peak 1:3=50000 1:9=10000000 2:9=8000\n";

    #[test]
    fn picks_the_stretch_of_the_local_week_across_dst() {
        let t = parse(TABLE).unwrap();
        assert_eq!(t.leaf, "fq_codel");
        assert_eq!(t.ifbs.len(), 2);
        // 2024-01-01T06:59:00Z is Monday 07:59 in Berlin (winter, +1).
        assert_eq!(t.week_minute(1_704_092_340), 479);
        assert_eq!(t.stretch_at(1_704_092_340), 1);
        // 2024-07-01T04:59:00Z (a Monday) is 06:59 in Berlin (summer, +2): still the night.
        assert_eq!(t.week_minute(1_719_809_940), 419);
        assert_eq!(t.stretch_at(1_719_809_940), 0);
        assert_eq!(t.stretch_at(1_719_809_940 + 60), 1);
        // Sunday 23:30 is in the last stretch.
        assert_eq!(t.stretch_at(1_704_092_340 - 8 * 3600 - 29 * 60), 2);
        let sw = switch(&t, Some(0), 1);
        assert_eq!(sw.len(), 1);
        assert_eq!(
            sw[0].join(" "),
            "tc class change dev sneg0 parent 1:1 classid 1:3 htb rate 8kbit ceil 5000kbit burst 15000 cburst 15000 quantum 1514"
        );
        let b = build(&t, 1);
        assert!(b.iter().any(|c| c.join(" ")
            == "tc filter add dev snin0 parent 2: protocol ipv6 prio 1 u32 match ip6 dst fd00:1:2:1::/64 flowid 2:9"));
        assert_eq!(
            leaf_args(&t.ifbs[0], &t.ifbs[0].classes[2], "pfifo").join(" "),
            "tc qdisc replace dev sneg0 parent 1:9 handle 1009: pfifo limit 128"
        );
        assert!(parse("leaf fq_codel\n").is_err());
        let e = parse("at 0 - 1:3=x\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        assert!(parse("at 0 - 1:3=5;reboot\n").is_err());
    }
}
