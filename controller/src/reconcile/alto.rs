//! The mesh as an ALTO service (IETF RFC 7285): the information resource directory, the
//! network map, the cost maps and the filtered cost map, each a pure function of a topology
//! [`Snapshot`]. The HTTP routes live in `crate::web`; docs/content.md ("The topology guru")
//! describes every resource, and `docs/schemas/alto/` holds the JSON Schemas of the answers.
//!
//! - A PID is one node: its name is the node id, its contents the node's /64 (`ipv6`). Nodes
//!   without a /64 yet have no PID.
//! - Costs follow the route babel takes: the least-cost path over the directed links that
//!   babel sees (`up`, a finite cost), the cost of a link being the one its source reports.
//!   `routingcost` is the sum of babel's link costs along that path; `delay-rt` (RFC 9439,
//!   microseconds) the sum of the links' median probe round-trip times along the same path,
//!   absent when a link of the path has no probe result. A PID's cost to itself is 0; a pair
//!   with no path has no entry.
//! - `priv:sidenet-rate` (a private metric, RFC 7285 §10.6) is the rate limit of the mesh's
//!   policies that holds traffic between two PIDs at the moment of the snapshot, in kbit/s:
//!   the smallest limit in force, in the Mesh's time zone, among the source's egress limits,
//!   the destination's ingress limits and the relayed-traffic limits of the nodes between them
//!   on the same path ([`Policies`], [`rates`]). A pair no limit holds (a PID and itself
//!   included) has no entry.
//! - `priv:sidenet-loss-rt` (a private metric) is the pathfinder probes' round-trip loss along
//!   the same path, in percent with one decimal: `100 × (1 − Π(1 − loss of each link))`, each
//!   link's loss being that of its source's last 10 probes ([`loss_percent`]); absent when a
//!   link of the path has no probe result. RFC 9439's `lossrate` is one-way loss, which the
//!   probes do not measure, so it is not offered under that name.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use jiff::Timestamp;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sidenet_crds::{Direction, Mesh, MeshSpec};

use crate::reconcile::topology::{BABEL_INFINITY, Snapshot};
use crate::spec::policy::eval::{Member, MeshPolicies};
use crate::spec::policy::schedule::week_minute;
use crate::spec::set::{ManifestSet, network_name};

/// Media type of the information resource directory (RFC 7285 §9).
pub const MT_DIRECTORY: &str = "application/alto-directory+json";
/// Media type of a network map (§11.2.1).
pub const MT_NETWORKMAP: &str = "application/alto-networkmap+json";
/// Media type of a cost map, filtered or not (§11.2.3, §11.3.2).
pub const MT_COSTMAP: &str = "application/alto-costmap+json";
/// Media type of a filtered cost map request (§11.3.2).
pub const MT_COSTMAPFILTER: &str = "application/alto-costmapfilter+json";
/// Media type of an error (§8.5).
pub const MT_ERROR: &str = "application/alto-error+json";

/// Resource id of the network map (also the directory's default network map).
pub const NETWORK_MAP: &str = "networkmap";
/// Resource id of the filtered cost map.
pub const FILTERED: &str = "filtered-costmap";

/// Route of the directory.
pub const PATH_DIRECTORY: &str = "/alto/directory";
/// Route of the network map.
pub const PATH_NETWORKMAP: &str = "/alto/networkmap";
/// Route of the filtered cost map (POST).
pub const PATH_FILTER: &str = "/alto/costmap/filter";

/// A cost metric this service offers, numerical mode only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// RFC 7285 §6.1.1.1: babel's cost, summed along the path.
    RoutingCost,
    /// RFC 9439 §4.2: round-trip delay in microseconds, summed along the path.
    DelayRt,
    /// `priv:sidenet-rate`: the policies' rate limit in force on the path, kbit/s.
    Rate,
    /// `priv:sidenet-loss-rt`: the probes' round-trip loss along the path, percent.
    LossRt,
}

impl Metric {
    /// Every metric, in directory order.
    pub const ALL: [Metric; 4] = [
        Metric::RoutingCost,
        Metric::DelayRt,
        Metric::Rate,
        Metric::LossRt,
    ];

    /// The metric's registered name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::RoutingCost => "routingcost",
            Metric::DelayRt => "delay-rt",
            Metric::Rate => "priv:sidenet-rate",
            Metric::LossRt => "priv:sidenet-loss-rt",
        }
    }

    /// The cost type's name in the directory.
    pub fn type_name(self) -> &'static str {
        match self {
            Metric::RoutingCost => "num-routingcost",
            Metric::DelayRt => "num-delay-rt",
            Metric::Rate => "num-sidenet-rate",
            Metric::LossRt => "num-sidenet-loss-rt",
        }
    }

    /// The resource id of the metric's full cost map.
    pub fn resource_id(self) -> &'static str {
        match self {
            Metric::RoutingCost => "costmap-routingcost",
            Metric::DelayRt => "costmap-delay-rt",
            Metric::Rate => "costmap-sidenet-rate",
            Metric::LossRt => "costmap-sidenet-loss-rt",
        }
    }

    /// The route of the metric's full cost map.
    pub fn path(self) -> &'static str {
        match self {
            Metric::RoutingCost => "/alto/costmap/routingcost",
            Metric::DelayRt => "/alto/costmap/delay-rt",
            Metric::Rate => "/alto/costmap/sidenet-rate",
            Metric::LossRt => "/alto/costmap/sidenet-loss-rt",
        }
    }

    /// The metric of `name`, if offered.
    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }

    fn cost_type(self) -> Value {
        let mut t = json!({"cost-mode": "numerical", "cost-metric": self.name()});
        match self {
            Metric::RoutingCost => {
                t["description"] = json!(
                    "babel's link costs summed along the route babel takes (65535 on a link: unreachable)"
                );
            }
            Metric::DelayRt => {
                t["cost-context"] = json!({"cost-source": "estimation"});
                t["description"] = json!(
                    "median probe round-trip times of the links along the route babel takes, summed, in microseconds"
                );
            }
            Metric::Rate => {
                t["cost-context"] = json!({"cost-source": "nominal"});
                t["description"] = json!(
                    "the smallest rate limit of the mesh's policies in force at the time of the request (windows in the Mesh's timeZone), in kbit/s: the source's egress, the destination's ingress and the relayed-traffic limits of the nodes between them on the route babel takes; pairs no limit holds are left out"
                );
            }
            Metric::LossRt => {
                t["cost-context"] = json!({"cost-source": "estimation"});
                t["description"] = json!(
                    "round-trip loss of the pathfinder probes along the route babel takes, in percent (0 to 100, one decimal): 100 x (1 - the product of (1 - each link's loss over its last 10 probes)); pairs with a link without probe results are left out"
                );
            }
        }
        t
    }
}

/// The PIDs of `s`: node id → its /64, sorted.
pub fn pids(s: &Snapshot) -> BTreeMap<String, String> {
    s.nodes
        .iter()
        .filter_map(|n| Some((n.id.clone(), n.prefix.clone()?)))
        .filter(|(id, _)| is_identifier(id))
        .collect()
}

/// RFC 7285 §10.1: 1 to 64 characters of `A-Z a-z 0-9 - : @ _ .`.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-:@_.".contains(&b))
}

/// The network map's version tag: 32 hex digits of SHA-256 over its PIDs and prefixes, so it
/// changes exactly when the map does.
pub fn tag(pids: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (pid, prefix) in pids {
        h.update(pid.as_bytes());
        h.update([0]);
        h.update(prefix.as_bytes());
        h.update([0]);
    }
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn vtag(pids: &BTreeMap<String, String>) -> Value {
    json!({"resource-id": NETWORK_MAP, "tag": tag(pids)})
}

/// The information resource directory (§9.2); URIs are absolute paths on this service.
pub fn directory() -> Value {
    let mut cost_types = serde_json::Map::new();
    let mut resources = serde_json::Map::new();
    resources.insert(
        NETWORK_MAP.into(),
        json!({"uri": PATH_NETWORKMAP, "media-type": MT_NETWORKMAP}),
    );
    for m in Metric::ALL {
        cost_types.insert(m.type_name().into(), m.cost_type());
        resources.insert(
            m.resource_id().into(),
            json!({
                "uri": m.path(),
                "media-type": MT_COSTMAP,
                "capabilities": {"cost-type-names": [m.type_name()]},
                "uses": [NETWORK_MAP],
            }),
        );
    }
    resources.insert(
        FILTERED.into(),
        json!({
            "uri": PATH_FILTER,
            "media-type": MT_COSTMAP,
            "accepts": MT_COSTMAPFILTER,
            "capabilities": {
                "cost-constraints": true,
                "cost-type-names": Metric::ALL.iter().map(|m| m.type_name()).collect::<Vec<_>>(),
            },
            "uses": [NETWORK_MAP],
        }),
    );
    json!({
        "meta": {
            "cost-types": cost_types,
            "default-alto-network-map": NETWORK_MAP,
        },
        "resources": resources,
    })
}

/// The network map (§11.2.1.6): one PID per node with a /64.
pub fn network_map(s: &Snapshot) -> Value {
    let pids = pids(s);
    let map: serde_json::Map<String, Value> = pids
        .iter()
        .map(|(pid, prefix)| (pid.clone(), json!({"ipv6": [prefix]})))
        .collect();
    json!({"meta": {"vtag": vtag(&pids)}, "network-map": map})
}

/// A usable link from a node: (target, babel cost, round-trip time in µs).
type Hop<'a> = (&'a str, u64, Option<u64>, Option<f64>);

/// The path from one PID to another that the costs follow.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// babel's link costs, summed.
    pub cost: u64,
    /// The links' round-trip times in µs, summed, if every link of the path has one.
    pub rtt_us: Option<u64>,
    /// The fraction of probes that cross every link of the path (the product of each link's
    /// `1 - loss`), if every link of the path has probe results.
    pub kept: Option<f64>,
    /// The node before the destination on the path: the source itself over a direct link,
    /// none from a PID to itself.
    pub prev: Option<String>,
}

/// The nodes between `src` and `dst` on the path `row` (the routes from `src`) holds, in path
/// order: empty over a direct link, from a PID to itself, or when `row` has no route to `dst`.
pub fn via(row: &BTreeMap<String, Route>, src: &str, dst: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut at = row.get(dst).and_then(|r| r.prev.as_deref());
    while let Some(n) = at.filter(|n| *n != src && v.len() < row.len()) {
        v.push(n.to_string());
        at = row.get(n).and_then(|r| r.prev.as_deref());
    }
    v.reverse();
    v
}

/// Per source PID, per destination PID: the least-cost path. Every PID reaches itself at
/// cost 0, round trip 0.
pub fn paths(s: &Snapshot) -> BTreeMap<String, BTreeMap<String, Route>> {
    let pids = pids(s);
    // Adjacency: source → [(target, cost, rtt µs)], usable links only.
    let mut adj: BTreeMap<&str, Vec<Hop<'_>>> = BTreeMap::new();
    for l in &s.links {
        let Some(cost) = l.cost.filter(|c| l.up && *c < BABEL_INFINITY) else {
            continue;
        };
        if !pids.contains_key(&l.source) || !pids.contains_key(&l.target) {
            continue;
        }
        let rtt = l
            .rtt_ms
            .filter(|r| r.is_finite() && *r >= 0.0)
            .map(|r| (r * 1000.0).round() as u64);
        let loss = l.loss.filter(|x| x.is_finite() && (0.0..=1.0).contains(x));
        adj.entry(l.source.as_str()).or_default().push((
            l.target.as_str(),
            u64::from(cost),
            rtt,
            loss,
        ));
    }
    let mut out = BTreeMap::new();
    for src in pids.keys() {
        // Dijkstra on (cost, hops, name): ties go to fewer hops, then to the smaller id, so
        // the answer does not depend on the order of the links. Per node: (cost, hops, rtt,
        // the node before it).
        type Best<'a> = (u64, usize, Option<u64>, Option<f64>, Option<&'a str>);
        let mut best: BTreeMap<&str, Best<'_>> = BTreeMap::new();
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut heap = BinaryHeap::new();
        best.insert(src.as_str(), (0, 0, Some(0), Some(1.0), None));
        heap.push(std::cmp::Reverse((0u64, 0usize, src.as_str())));
        while let Some(std::cmp::Reverse((cost, hops, node))) = heap.pop() {
            if !done.insert(node) {
                continue;
            }
            let rtt = best.get(node).and_then(|b| b.2);
            let kept = best.get(node).and_then(|b| b.3);
            for &(next, c, r, loss) in adj.get(node).map(Vec::as_slice).unwrap_or(&[]) {
                let cand = (cost + c, hops + 1);
                let better = match best.get(next) {
                    None => true,
                    Some(&(bc, bh, _, _, _)) => cand < (bc, bh),
                };
                if better && !done.contains(next) {
                    let rt = match (rtt, r) {
                        (Some(a), Some(b)) => Some(a + b),
                        _ => None,
                    };
                    let k = kept.zip(loss).map(|(k, l)| k * (1.0 - l));
                    best.insert(next, (cand.0, cand.1, rt, k, Some(node)));
                    heap.push(std::cmp::Reverse((cand.0, cand.1, next)));
                }
            }
        }
        let row = best
            .iter()
            .map(|(d, &(cost, _, rtt_us, kept, prev))| {
                let route = Route {
                    cost,
                    rtt_us,
                    kept,
                    prev: prev.map(str::to_string),
                };
                (d.to_string(), route)
            })
            .collect();
        out.insert(src.clone(), row);
    }
    out
}

/// What the `priv:sidenet-rate` cost reads: each mesh's policies and the nodes they name, by
/// mesh network name (what a PID's node carries as its mesh).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    meshes: BTreeMap<String, (String, MeshSpec, Vec<Member>)>,
}

impl Policies {
    /// The policies of every Mesh in `set`, with its MeshNodes.
    pub fn of(set: &ManifestSet) -> Self {
        let mut p = Policies::default();
        for (name, mesh) in &set.meshes {
            p.insert(mesh, crate::spec::policy::check::members(set, name));
        }
        p
    }

    /// Adds `mesh` and its MeshNodes `members`. A PID of the mesh no member names is a node
    /// enrolled without a MeshNode: its policies name it by its node id and it has no labels.
    pub fn insert(&mut self, mesh: &Mesh, members: Vec<Member>) {
        self.meshes.insert(
            network_name(mesh).to_string(),
            (
                mesh.metadata.name.clone().unwrap_or_default(),
                mesh.spec.clone(),
                members,
            ),
        );
    }
}

/// Per source PID, per destination PID (another PID of the same mesh that `routes` reaches):
/// the rate limit that holds the traffic at Unix time `at`, kbit/s, when some limit does. The
/// limits are those of `docs/policies.md` ("Precedence"), at the minute of the week `at` falls
/// on in the Mesh's `timeZone` (UTC without one): the source's egress slots and the
/// destination's ingress slots that count own traffic toward the other end, and on each node
/// between them ([`via`]), the egress and ingress slots that count relayed traffic; the
/// smallest in force holds.
pub fn rates(
    s: &Snapshot,
    routes: &BTreeMap<String, BTreeMap<String, Route>>,
    policies: &Policies,
    at: u64,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    let t = i64::try_from(at)
        .ok()
        .and_then(|a| Timestamp::from_second(a).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH);
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (network, (name, spec, members)) in &policies.meshes {
        let in_mesh: BTreeSet<&str> = s
            .nodes
            .iter()
            .filter(|n| &n.mesh == network)
            .map(|n| n.id.as_str())
            .collect();
        let mut members = members.clone();
        for id in &in_mesh {
            if !members.iter().any(|m| m.id == *id) {
                members.push(Member {
                    id: id.to_string(),
                    name: id.to_string(),
                    labels: BTreeMap::new(),
                });
            }
        }
        let mesh = Mesh::new(name, spec.clone());
        let mp = MeshPolicies::new(&mesh, members);
        let minute = week_minute(t.as_second(), mp.tz.to_offset(t).seconds());
        let by_id: BTreeMap<&str, &Member> =
            mp.members.iter().map(|m| (m.id.as_str(), m)).collect();
        let member = |id: &str| by_id.get(id).copied();
        // What each node holds the traffic it relays to, both directions: the same for every
        // pair it relays for.
        let relay: BTreeMap<&str, Option<u64>> = mp
            .members
            .iter()
            .map(|m| {
                let (mut limits, mut idle) = (Vec::new(), Vec::new());
                for d in [Direction::Egress, Direction::Ingress] {
                    mp.relay_limits(m, d, minute, &mut limits, &mut idle);
                }
                (m.id.as_str(), limits.iter().map(|l| l.rate_kbit).min())
            })
            .collect();
        for (src, row) in routes {
            let Some(from) = member(src).filter(|_| in_mesh.contains(src.as_str())) else {
                continue;
            };
            let held = relayed_on_paths(row, src, &relay);
            for dst in row.keys() {
                let Some(to) = member(dst).filter(|_| in_mesh.contains(dst.as_str())) else {
                    continue;
                };
                if dst == src {
                    continue;
                }
                let (mut limits, mut idle) = (Vec::new(), Vec::new());
                mp.node_limits(from, to, Direction::Egress, minute, &mut limits, &mut idle);
                mp.node_limits(to, from, Direction::Ingress, minute, &mut limits, &mut idle);
                let ends = limits.iter().map(|l| l.rate_kbit);
                let relays = held.get(dst.as_str()).copied().flatten();
                if let Some(rate) = ends.chain(relays).min() {
                    out.entry(src.clone())
                        .or_default()
                        .insert(dst.clone(), rate);
                }
            }
        }
    }
    out
}

/// What a filtered cost map request asks (§11.3.2.3), checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// The cost metric.
    pub metric: Metric,
    /// Source PIDs; empty: all.
    pub srcs: Vec<String>,
    /// Destination PIDs; empty: all.
    pub dsts: Vec<String>,
    /// Constraints, all of which a cost must meet.
    pub constraints: Vec<(Op, f64)>,
}

/// A constraint's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Less than.
    Lt,
    /// Less than or equal.
    Le,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Ge,
    /// Equal.
    Eq,
}

impl Op {
    fn holds(self, x: f64, v: f64) -> bool {
        match self {
            Op::Lt => x < v,
            Op::Le => x <= v,
            Op::Gt => x > v,
            Op::Ge => x >= v,
            Op::Eq => x == v,
        }
    }
}

/// An ALTO error (§8.5.2).
#[derive(Debug, Clone, PartialEq)]
pub struct AltoError {
    /// `E_SYNTAX`, `E_MISSING_FIELD`, `E_INVALID_FIELD_TYPE` or `E_INVALID_FIELD_VALUE`.
    pub code: &'static str,
    /// The field, as a path of member names joined with `/` (e.g. `cost-type/cost-mode`).
    pub field: Option<String>,
    /// The offending value (`E_INVALID_FIELD_VALUE`).
    pub value: Option<Value>,
    /// What is wrong with the syntax (`E_SYNTAX`).
    pub syntax_error: Option<String>,
}

impl AltoError {
    fn syntax(why: impl Into<String>) -> Self {
        AltoError {
            code: "E_SYNTAX",
            field: None,
            value: None,
            syntax_error: Some(why.into()),
        }
    }

    fn missing(field: &str) -> Self {
        AltoError {
            code: "E_MISSING_FIELD",
            field: Some(field.into()),
            value: None,
            syntax_error: None,
        }
    }

    fn wrong_type(field: &str) -> Self {
        AltoError {
            code: "E_INVALID_FIELD_TYPE",
            field: Some(field.into()),
            value: None,
            syntax_error: None,
        }
    }

    fn bad_value(field: &str, value: &Value) -> Self {
        AltoError {
            code: "E_INVALID_FIELD_VALUE",
            field: Some(field.into()),
            value: Some(value.clone()),
            syntax_error: None,
        }
    }

    /// The error's body (`application/alto-error+json`).
    pub fn body(&self) -> Value {
        let mut meta = json!({"code": self.code});
        if let Some(f) = &self.field {
            meta["field"] = json!(f);
        }
        if let Some(v) = &self.value {
            meta["value"] = v.clone();
        }
        if let Some(e) = &self.syntax_error {
            meta["syntax-error"] = json!(e);
        }
        json!({"meta": meta})
    }
}

fn pid_list(pids: &Value, key: &str) -> Result<Vec<String>, AltoError> {
    let field = format!("pids/{key}");
    match pids.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| match p {
                Value::String(s) => Ok(s.clone()),
                _ => Err(AltoError::wrong_type(&field)),
            })
            .collect(),
        Some(_) => Err(AltoError::wrong_type(&field)),
    }
}

fn constraint(c: &Value) -> Result<(Op, f64), AltoError> {
    let bad = || AltoError::bad_value("constraints", c);
    let Value::String(text) = c else {
        return Err(AltoError::wrong_type("constraints"));
    };
    let (op, value) = text.split_once(' ').ok_or_else(bad)?;
    let op = match op {
        "lt" => Op::Lt,
        "le" => Op::Le,
        "gt" => Op::Gt,
        "ge" => Op::Ge,
        "eq" => Op::Eq,
        _ => return Err(bad()),
    };
    // A JSON number (RFC 8259 §6), nothing else: no spaces, `inf` or `NaN`.
    let v: f64 = Some(value)
        .filter(|v| !v.is_empty() && !v.contains(char::is_whitespace))
        .and_then(|v| serde_json::from_str::<f64>(v).ok())
        .filter(|v| v.is_finite())
        .ok_or_else(bad)?;
    Ok((op, v))
}

/// The string member `k` of the cost type `ct`.
fn text<'a>(ct: &'a Value, k: &str) -> Result<&'a str, AltoError> {
    let field = format!("cost-type/{k}");
    match ct.get(k) {
        None => Err(AltoError::missing(&field)),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(AltoError::wrong_type(&field)),
    }
}

/// Reads a filtered cost map request (§11.3.2.3) from its body.
pub fn parse_filter(body: &[u8]) -> Result<Filter, AltoError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| AltoError::syntax(e.to_string()))?;
    if !v.is_object() {
        return Err(AltoError::syntax("the request is not a JSON object"));
    }
    let ct = v
        .get("cost-type")
        .ok_or_else(|| AltoError::missing("cost-type"))?;
    if !ct.is_object() {
        return Err(AltoError::wrong_type("cost-type"));
    }
    let (mode, metric) = (text(ct, "cost-mode")?, text(ct, "cost-metric")?);
    let metric = Metric::from_name(metric)
        .ok_or_else(|| AltoError::bad_value("cost-type/cost-metric", &json!(metric)))?;
    if mode != "numerical" {
        return Err(AltoError::bad_value("cost-type/cost-mode", &json!(mode)));
    }
    let constraints = match v.get("constraints") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().map(constraint).collect::<Result<_, _>>()?,
        Some(_) => return Err(AltoError::wrong_type("constraints")),
    };
    let (srcs, dsts) = match v.get("pids") {
        None => (Vec::new(), Vec::new()),
        Some(p @ Value::Object(_)) => (pid_list(p, "srcs")?, pid_list(p, "dsts")?),
        Some(_) => return Err(AltoError::wrong_type("pids")),
    };
    Ok(Filter {
        metric,
        srcs,
        dsts,
        constraints,
    })
}

/// Per destination of `row` (the routes from `src`): the smallest of `relay` (per node, the
/// limit on what it relays) over the nodes between `src` and it, if any holds. Each path is
/// its predecessor's plus one node, so every destination costs one step once its predecessor
/// is known.
fn relayed_on_paths<'a>(
    row: &'a BTreeMap<String, Route>,
    src: &'a str,
    relay: &BTreeMap<&str, Option<u64>>,
) -> BTreeMap<&'a str, Option<u64>> {
    let min = |a: Option<u64>, b: Option<u64>| a.into_iter().chain(b).min();
    let mut held: BTreeMap<&str, Option<u64>> = BTreeMap::new();
    held.insert(src, None);
    for dst in row.keys() {
        let mut chain = Vec::new();
        let mut at = dst.as_str();
        while !held.contains_key(at) && chain.len() <= row.len() {
            chain.push(at);
            match row.get(at).and_then(|r| r.prev.as_deref()) {
                Some(p) => at = p,
                None => break,
            }
        }
        let (mut acc, mut last) = match held.get(at) {
            Some(&v) => (v, at),
            None => (None, src),
        };
        for n in chain.into_iter().rev() {
            if last != src {
                acc = min(acc, relay.get(last).copied().flatten());
            }
            held.insert(n, acc);
            last = n;
        }
    }
    held
}

/// A cost map (§11.2.3.6) of `metric`; with `filter`, only its PIDs (unknown ones are ignored,
/// an empty list is every PID) and the costs meeting every constraint (§11.3.2). The rate cost
/// reads `policies` at the snapshot's time ([`Snapshot::generated`]).
pub fn cost_map(
    s: &Snapshot,
    policies: &Policies,
    metric: Metric,
    filter: Option<&Filter>,
) -> Value {
    let pids = pids(s);
    let all = paths(s);
    let rates = match metric {
        Metric::Rate => rates(s, &all, policies, s.generated),
        _ => BTreeMap::new(),
    };
    let wanted = |list: Option<&Vec<String>>, pid: &str| {
        list.is_none_or(|l| l.is_empty() || l.iter().any(|p| p == pid))
    };
    let mut map = serde_json::Map::new();
    for (src, row) in &all {
        if !wanted(filter.map(|f| &f.srcs), src) {
            continue;
        }
        let mut costs = serde_json::Map::new();
        for (dst, route) in row {
            if !wanted(filter.map(|f| &f.dsts), dst) {
                continue;
            }
            let value = match metric {
                Metric::RoutingCost => Some(route.cost as f64),
                Metric::DelayRt => route.rtt_us.map(|v| v as f64),
                Metric::Rate => rates.get(src).and_then(|r| r.get(dst)).map(|&v| v as f64),
                Metric::LossRt => route.kept.map(loss_percent),
            };
            let Some(value) = value else { continue };
            let ok = filter.is_none_or(|f| f.constraints.iter().all(|(op, v)| op.holds(value, *v)));
            if ok {
                let v = match metric {
                    Metric::LossRt => json!(value),
                    // Whole numbers: printed without a fraction.
                    _ => json!(value as u64),
                };
                costs.insert(dst.clone(), v);
            }
        }
        if !costs.is_empty() {
            map.insert(src.clone(), Value::Object(costs));
        }
    }
    json!({
        "meta": {
            "dependent-vtags": [vtag(&pids)],
            "cost-type": {"cost-mode": "numerical", "cost-metric": metric.name()},
        },
        "cost-map": map,
    })
}

/// The round-trip loss in percent, one decimal, of a path that keeps `kept` of the probes.
pub fn loss_percent(kept: f64) -> f64 {
    ((1.0 - kept) * 1000.0).round().clamp(0.0, 1000.0) / 10.0
}

#[cfg(test)]
#[path = "alto_tests.rs"]
mod tests;
