//! Namespaces: which object owns a mesh name, a network name and a node id.
//!
//! Each namespace is validated on its own ([`super::sync`]), so a MeshNode's `spec.mesh` names
//! a Mesh of its own namespace and nothing else. The core and the broker, however, are shared:
//! configs are published under `sidenet/v1/NETWORK/nodes/NODE/config`, the core keys meshes
//! by `metadata.name` and nodes by node id. So one mesh name, one network name and one node id
//! belong to one object across the cluster, and [`merge`] decides which:
//!
//! - A Mesh keeps a name it already holds (`held`). Otherwise the older object wins
//!   (`metadata.creationTimestamp`; namespace and name break ties). The Mesh that loses is
//!   refused, with a reason on that object only, and so are the MeshNodes that name it; the
//!   running one is never evicted.
//! - A node id that enrolled (proved its key on a network's enrolment topic) belongs to the
//!   MeshNode in the namespace of that network's Mesh. Otherwise: held, then older, wins.
//! - An object being deleted keeps its claims until it is gone (its finalizer is clearing its
//!   topics; a newcomer must not publish there meanwhile).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;

use crate::spec::manifest::{ManifestSet, network_name};

/// Who owns what: the result of [`merge`], kept for the next one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Mesh `metadata.name` → namespace of the Mesh that holds it.
    pub mesh_names: BTreeMap<String, String>,
    /// Network name → (namespace, Mesh name).
    pub networks: BTreeMap<String, (String, String)>,
    /// Node id → (namespace, MeshNode name).
    pub nodes: BTreeMap<String, (String, String)>,
}

impl Claims {
    /// Whether Mesh `ns/name` holds its network name.
    pub fn owns_mesh(&self, ns: &str, name: &str) -> bool {
        self.mesh_names.get(name).is_some_and(|n| n == ns)
    }

    /// Whether MeshNode `ns/name` holds node id `id`.
    pub fn owns_node(&self, id: &str, ns: &str, name: &str) -> bool {
        self.nodes
            .get(id)
            .is_some_and(|(n, m)| n == ns && m == name)
    }
}

/// The result of validating one namespace.
#[derive(Debug, Default)]
pub struct Validated {
    /// What its objects looked like (see `Ctx::signatures`); `None`: validate again.
    pub signature: Option<u64>,
    pub set: ManifestSet,
    /// Why an object's current spec is not used, by key.
    pub invalid: BTreeMap<String, String>,
    /// Objects whose last good spec stands in for their current one.
    pub fallback: BTreeSet<String>,
}

/// What [`merge`] needs to know besides the validated sets.
#[derive(Debug, Default)]
pub struct Context<'a> {
    /// Claims of the previous merge.
    pub held: Option<&'a Claims>,
    /// Claims of objects being deleted: reserved until they are gone.
    pub leaving: Claims,
    /// Creation time by object key (`Kind/namespace/name`, as `engine::key_of` writes it).
    pub created: BTreeMap<String, Timestamp>,
    /// Network name of each enrolled node id (the core's enrolment records).
    pub enrolled: BTreeMap<String, String>,
}

/// The result of [`merge`].
#[derive(Debug, Default)]
pub struct Merged {
    /// The set the core works on.
    pub set: ManifestSet,
    /// Who owns what (including the `leaving` claims).
    pub claims: Claims,
    /// Refused objects by key, with the reason.
    pub refused: BTreeMap<String, String>,
}

/// How a MeshNode ranks for its node id, best first: (not in the namespace it enrolled into,
/// not the holder, creation time, namespace, name).
type NodeRank<'a> = (bool, bool, Timestamp, &'a str, &'a str);

fn key(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

/// Merges the validated set of each namespace into one, refusing newcomers that clash with an
/// object of another namespace (see the module docs).
pub fn merge<S: std::borrow::Borrow<ManifestSet>>(
    sets: &BTreeMap<String, S>,
    cx: &Context<'_>,
) -> Merged {
    let mut out = Merged {
        claims: cx.leaving.clone(),
        ..Default::default()
    };
    let held = cx.held.cloned().unwrap_or_default();
    let age = |k: &str| cx.created.get(k).copied().unwrap_or(Timestamp::MAX);

    for set in sets.values() {
        let set = set.borrow();
        for (name, p) in &set.profiles {
            out.set.profiles.entry(name.clone()).or_insert(p.clone());
        }
        for (name, s) in &set.secrets {
            out.set.secrets.entry(name.clone()).or_insert(s.clone());
        }
    }

    // Meshes: holders first, then the oldest.
    let mut meshes: Vec<(bool, Timestamp, &str, &str)> = Vec::new();
    for (ns, set) in sets {
        for (name, mesh) in &set.borrow().meshes {
            let net = network_name(mesh);
            let holds = held.owns_mesh(ns, name)
                && held
                    .networks
                    .get(net)
                    .is_some_and(|(n, m)| n == ns && m == name);
            meshes.push((!holds, age(&key("Mesh", ns, name)), ns, name));
        }
    }
    meshes.sort();
    let mut refused_meshes: BTreeSet<(String, String)> = BTreeSet::new();
    for (_, _, ns, name) in meshes {
        let Some(mesh) = sets.get(ns).and_then(|s| s.borrow().meshes.get(name)) else {
            continue;
        };
        let net = network_name(mesh).to_string();
        let why = if let Some(other) = out.claims.mesh_names.get(name).filter(|o| *o != ns) {
            Some(format!(
                "metadata.name: the mesh name {name:?} is already used by the Mesh in namespace {other:?} (mesh names are unique across namespaces: one controller, one broker); this Mesh and its MeshNodes are not used"
            ))
        } else if let Some((other_ns, other)) = out
            .claims
            .networks
            .get(&net)
            .filter(|(n, m)| n != ns || m != name)
        {
            Some(format!(
                "the network name {net:?} is already used by Mesh {other_ns}/{other} (network names are unique on one broker); this Mesh and its MeshNodes are not used"
            ))
        } else {
            None
        };
        match why {
            Some(why) => {
                out.refused.insert(key("Mesh", ns, name), why);
                refused_meshes.insert((ns.to_string(), name.to_string()));
            }
            None => {
                out.claims
                    .mesh_names
                    .insert(name.to_string(), ns.to_string());
                out.claims
                    .networks
                    .insert(net, (ns.to_string(), name.to_string()));
                out.set.meshes.insert(name.to_string(), mesh.clone());
            }
        }
    }

    // Nodes: the enrolment's namespace first, then holders, then the oldest.
    let mut by_id: BTreeMap<&str, Vec<NodeRank<'_>>> = BTreeMap::new();
    for (ns, set) in sets {
        for (id, node) in &set.borrow().nodes {
            let name = node.metadata.name.as_deref().unwrap_or_default();
            let k = key("MeshNode", ns, name);
            if refused_meshes.contains(&(ns.clone(), node.spec.mesh.clone())) {
                out.refused.insert(
                    k,
                    format!(
                        "spec.mesh: Mesh {ns}/{} is not used (see its Events)",
                        node.spec.mesh
                    ),
                );
                continue;
            }
            let enrolled_here = cx
                .enrolled
                .get(id)
                .and_then(|net| out.claims.networks.get(net))
                .is_some_and(|(n, _)| n == ns);
            let holds = held.owns_node(id, ns, name);
            by_id
                .entry(id)
                .or_default()
                .push((!enrolled_here, !holds, age(&k), ns, name));
        }
    }
    for (id, mut candidates) in by_id {
        candidates.sort();
        let mut winner: Option<(String, String)> = out.claims.nodes.get(id).cloned();
        for (_, _, _, ns, name) in candidates {
            match &winner {
                Some((wns, wname)) if wns != ns || wname != name => {
                    let place = if wns == ns {
                        format!("MeshNode {wname}")
                    } else {
                        format!("a MeshNode in namespace {wns:?}")
                    };
                    out.refused.insert(
                        key("MeshNode", ns, name),
                        format!(
                            "spec.nodeId: node {id} is already declared by {place}; a node belongs to one MeshNode, and this one is not used"
                        ),
                    );
                }
                Some(_) => {}
                None => {
                    if let Some(node) = sets.get(ns).and_then(|s| s.borrow().nodes.get(id)) {
                        out.set.nodes.insert(id.to_string(), node.clone());
                        winner = Some((ns.to_string(), name.to_string()));
                    }
                }
            }
        }
        if let Some(w) = winner {
            out.claims.nodes.insert(id.to_string(), w);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::spec::manifest;
    use std::path::PathBuf;

    fn read(path: &str) -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The example's Mesh, renamed; network name `net`, else its name.
    fn mesh(name: &str, net: Option<&str>) -> String {
        read("examples/riverside/mesh.yaml")
            .replace("name: riverside", &format!("name: {name}"))
            .replace(
                "networkName: riverside",
                &format!("networkName: {}", net.unwrap_or(name)),
            )
    }

    fn node(name: &str, mesh: &str, id: &str) -> String {
        format!(
            "apiVersion: sidenet.io/v1alpha1
kind: MeshNode
metadata: {{name: {name}}}
spec: {{mesh: {mesh}, nodeId: {id}, hardwareProfile: tplink-archer-c7-v2, approved: true}}
"
        )
    }

    fn set(docs: &[String]) -> ManifestSet {
        let mut texts = vec![(
            PathBuf::from("p.yaml"),
            read("hardware-profiles/tplink-archer-c7-v2.yaml"),
        )];
        for (i, d) in docs.iter().enumerate() {
            texts.push((PathBuf::from(format!("{i}.yaml")), d.clone()));
        }
        manifest::load_texts(&texts).unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    const A: &str = "aaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbb";

    #[test]
    fn the_older_mesh_keeps_its_name_and_the_newcomer_alone_is_refused() {
        let sets = BTreeMap::from([
            (
                "community".to_string(),
                set(&[mesh("riverside", None), node("kitchen", "riverside", A)]),
            ),
            (
                "aaa".to_string(),
                set(&[mesh("riverside", None), node("x", "riverside", B)]),
            ),
        ]);
        let mut cx = Context::default();
        cx.created
            .insert(key("Mesh", "community", "riverside"), at(100));
        cx.created.insert(key("Mesh", "aaa", "riverside"), at(200));
        let m = merge(&sets, &cx);
        assert!(m.claims.owns_mesh("community", "riverside"));
        assert_eq!(m.set.nodes.keys().collect::<Vec<_>>(), vec![A]);
        assert!(m.refused["Mesh/aaa/riverside"].contains("namespace \"community\""));
        assert!(m.refused["MeshNode/aaa/x"].contains("Mesh aaa/riverside is not used"));
        assert!(!m.refused.contains_key("Mesh/community/riverside"));

        // Held beats older: a mesh that runs is never evicted by an older object appearing.
        cx.held = Some(&m.claims);
        cx.created.insert(key("Mesh", "aaa", "riverside"), at(1));
        let again = merge(&sets, &cx);
        assert!(again.claims.owns_mesh("community", "riverside"));
        assert!(again.refused.contains_key("Mesh/aaa/riverside"));
    }

    #[test]
    fn distinct_meshes_in_two_namespaces_both_work() {
        let sets = BTreeMap::from([
            (
                "a".to_string(),
                set(&[mesh("north", None), node("n1", "north", A)]),
            ),
            (
                "b".to_string(),
                set(&[mesh("south", None), node("s1", "south", B)]),
            ),
        ]);
        let m = merge(&sets, &Context::default());
        assert!(m.refused.is_empty(), "{:?}", m.refused);
        assert_eq!(m.set.meshes.len(), 2);
        assert_eq!(m.set.nodes.len(), 2);
        assert!(m.claims.owns_node(A, "a", "n1"));
        assert!(m.claims.owns_node(B, "b", "s1"));
    }

    #[test]
    fn a_network_name_is_unique_across_namespaces() {
        let sets = BTreeMap::from([
            ("a".to_string(), set(&[mesh("north", Some("shared"))])),
            ("b".to_string(), set(&[mesh("south", Some("shared"))])),
        ]);
        let mut cx = Context::default();
        cx.created.insert(key("Mesh", "a", "north"), at(5));
        cx.created.insert(key("Mesh", "b", "south"), at(3));
        let m = merge(&sets, &cx);
        assert!(m.claims.owns_mesh("b", "south"));
        assert!(m.refused["Mesh/a/north"].contains("network name \"shared\""));
    }

    #[test]
    fn an_enrolled_node_belongs_to_its_networks_namespace_whatever_the_age() {
        let sets = BTreeMap::from([
            (
                "community".to_string(),
                set(&[mesh("riverside", None), node("kitchen", "riverside", A)]),
            ),
            (
                "evil".to_string(),
                set(&[mesh("evilnet", None), node("grab", "evilnet", A)]),
            ),
        ]);
        let mut cx = Context::default();
        cx.created.insert(key("MeshNode", "evil", "grab"), at(1));
        cx.created
            .insert(key("MeshNode", "community", "kitchen"), at(9));
        cx.enrolled.insert(A.to_string(), "riverside".to_string());
        let m = merge(&sets, &cx);
        assert!(m.claims.owns_node(A, "community", "kitchen"));
        assert!(m.refused["MeshNode/evil/grab"].contains("namespace \"community\""));
        assert_eq!(m.set.nodes[A].spec.mesh, "riverside");

        // Not enrolled: the older declaration wins.
        cx.enrolled.clear();
        let m = merge(&sets, &cx);
        assert!(m.claims.owns_node(A, "evil", "grab"));
    }

    #[test]
    fn claims_of_objects_being_deleted_are_reserved() {
        let sets = BTreeMap::from([("b".to_string(), set(&[mesh("riverside", None)]))]);
        let mut cx = Context::default();
        cx.leaving.mesh_names.insert("riverside".into(), "a".into());
        cx.leaving
            .networks
            .insert("riverside".into(), ("a".into(), "riverside".into()));
        let m = merge(&sets, &cx);
        assert!(m.set.meshes.is_empty());
        assert!(m.refused.contains_key("Mesh/b/riverside"));
        cx.leaving = Claims::default();
        assert!(merge(&sets, &cx).claims.owns_mesh("b", "riverside"));
    }
}
