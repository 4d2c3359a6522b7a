//! The checks of `Mesh.spec.rollout` the JSON Schema cannot express: exactly one kind of
//! canary, canary nodes that exist, and strictly increasing wave percentages.

use sidenet_crds::Mesh;
use sidenet_wire::names;

use crate::spec::set::ManifestSet;

/// The rollout errors of `mesh`, as (field, message).
pub fn check(set: &ManifestSet, mesh: &Mesh) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(r) = &mesh.spec.rollout else {
        return out;
    };
    let c = &r.canary;
    let kinds = usize::from(!c.nodes.is_empty())
        + usize::from(c.count.is_some())
        + usize::from(c.percent.is_some());
    if kinds != 1 {
        out.push((
            "spec.rollout.canary".to_string(),
            format!(
                "{}; expected exactly one of nodes (MeshNode names or node ids), count or percent",
                if kinds == 0 {
                    "empty"
                } else {
                    "more than one kind of canary"
                }
            ),
        ));
    }
    let name = mesh.metadata.name.as_deref();
    for (i, n) in c.nodes.iter().enumerate() {
        let is_meshnode = set.nodes.values().any(|m| {
            m.metadata.name.as_deref() == Some(n.as_str())
                && set.mesh_of(m).and_then(|x| x.metadata.name.as_deref()) == name
        });
        let is_id = set.nodes.contains_key(n) || names::check_node_id(n).is_ok();
        if !is_meshnode && !is_id {
            out.push((
                format!("spec.rollout.canary.nodes[{i}]"),
                format!(
                    "{n:?} is neither a MeshNode of this mesh nor a node id; expected a MeshNode name or a node id (`sidenetctl status` lists them)"
                ),
            ));
        }
    }
    let mut last = 0u8;
    for (i, w) in r.waves.iter().enumerate() {
        if *w == 0 || *w > 100 || *w <= last {
            out.push((
                format!("spec.rollout.waves[{i}]"),
                format!(
                    "{w} is not allowed here; expected cumulative percentages, strictly increasing, each 1 to 100 (e.g. [25, 50, 100])"
                ),
            ));
        }
        last = last.max(*w);
    }
    out
}
