//! Names in DNS (issue 21, `docs/dataplane.md`, "Names"): every MeshNode of a mesh is
//! `NODE.MESH.sidenet.arpa` (its side-net address) and every address of its published services
//! `SERVICE.NODE.MESH.sidenet.arpa`. `NODE` is the MeshNode's `spec.dnsName`, else its
//! `metadata.name` when that is one DNS label; `MESH` is the Mesh's `metadata.name`. The
//! controller renders the names into each node's config; the node's own resolver (dnsmasq)
//! serves them.

use crate::spec::set::ManifestSet;

/// The zone every mesh's names live under.
pub const ZONE: &str = "sidenet.arpa";

/// Longest name DNS carries (RFC 1035: 255 octets on the wire, 253 characters written).
pub const MAX_NAME: usize = 253;

/// Whether `s` is one DNS label as sidenet writes them: 1 to 63 lowercase letters, digits and
/// `-`, not starting or ending with `-`.
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The zone of mesh `mesh` (its `metadata.name`): `MESH.sidenet.arpa`.
pub fn zone(mesh: &str) -> String {
    format!("{mesh}.{ZONE}")
}

/// What a DNS label is, for error messages.
const LABEL_RULE: &str =
    "1 to 63 lowercase letters, digits and '-', not starting or ending with '-'";

/// The label that names MeshNode `node` in DNS: `spec.dnsName`, else `metadata.name` when that
/// is one label; `None` for a node named with dots and without `spec.dnsName` (and for an
/// invalid `spec.dnsName`, which [`check`] refuses), and for a MeshNode the Kubernetes
/// controller created for an enrolled node (label `app.kubernetes.io/managed-by:
/// sidenet-controller`) without `spec.dnsName`: every name is in every node's config, so a name
/// per enrolment would re-render the whole mesh at each one.
pub fn node_label(node: &sidenet_crds::MeshNode) -> Option<String> {
    let created_by_controller = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/managed-by"))
        .is_some_and(|v| v == "sidenet-controller");
    match &node.spec.dns_name {
        Some(n) => Some(n.clone()).filter(|n| is_label(n)),
        None if created_by_controller => None,
        None => node.metadata.name.clone().filter(|n| is_label(n)),
    }
}

/// What is wrong with `zone` as a DNS name, if anything.
fn zone_error(mesh: &str) -> Option<String> {
    let z = zone(mesh);
    if let Some(bad) = mesh.split('.').find(|l| !is_label(l)) {
        return Some(format!(
            "{mesh:?} cannot name the mesh's DNS zone {z}: {bad:?} is not a DNS label ({LABEL_RULE})"
        ));
    }
    // Room for NODE. and SERVICE. of one character each.
    (z.len() + 4 > MAX_NAME).then(|| {
        format!(
            "{mesh:?} is too long for the mesh's DNS zone {z}: names under it would pass {MAX_NAME} characters"
        )
    })
}

/// The name errors of `set`: `(Kind/name, field, message)`.
pub fn check(set: &ManifestSet) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for name in set.meshes.keys() {
        if let Some(e) = zone_error(name) {
            out.push((format!("Mesh/{name}"), "metadata.name".to_string(), e));
        }
    }
    // (mesh, label) → the first MeshNode with that DNS name
    let mut taken: std::collections::BTreeMap<(String, String), String> = Default::default();
    for (id, node) in &set.nodes {
        let key = format!(
            "MeshNode/{}",
            node.metadata.name.as_deref().unwrap_or(id.as_str())
        );
        // The CRD's patterns are admission-only: the same rules, with file, document and field.
        if let Some(n) = &node.spec.dns_name
            && !is_label(n)
        {
            out.push((
                key.clone(),
                "spec.dnsName".to_string(),
                format!("{n:?} is not a DNS label ({LABEL_RULE})"),
            ));
        }
        for (i, s) in node.spec.services.iter().enumerate() {
            if !is_label(&s.name) {
                out.push((
                    key.clone(),
                    format!("spec.services[{i}].name"),
                    format!("{:?} is not a DNS label ({LABEL_RULE})", s.name),
                ));
            }
        }
        let Some(label) = node_label(node) else {
            continue;
        };
        let field = if node.spec.dns_name.is_some() {
            "spec.dnsName"
        } else {
            "metadata.name"
        };
        let Some(mesh) = set
            .mesh_of(node)
            .and_then(|m| m.metadata.name.clone())
            .filter(|m| zone_error(m).is_none())
        else {
            continue;
        };
        let fqdn = format!("{label}.{}", zone(&mesh));
        if let Some(other) = taken.get(&(mesh.clone(), label.clone())) {
            out.push((
                key.clone(),
                field.to_string(),
                format!("{fqdn} is already the name of {other} (two nodes of a mesh cannot share a DNS name; set spec.dnsName)"),
            ));
        } else {
            taken.insert((mesh.clone(), label.clone()), key.clone());
        }
        if fqdn.len() > MAX_NAME {
            out.push((
                key.clone(),
                field.to_string(),
                format!("{fqdn} is longer than {MAX_NAME} characters"),
            ));
            continue;
        }
        for (i, s) in node.spec.services.iter().enumerate() {
            let name = format!("{}.{fqdn}", s.name);
            if name.len() > MAX_NAME {
                out.push((
                    key.clone(),
                    format!("spec.services[{i}].name"),
                    format!("the service's DNS name {name} is longer than {MAX_NAME} characters"),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn labels() {
        for good in ["a", "web", "node-7", "0", &"x".repeat(63)] {
            assert!(is_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "é", &"x".repeat(64)] {
            assert!(!is_label(bad), "{bad}");
        }
        assert_eq!(zone("riverside"), "riverside.sidenet.arpa");
        assert!(zone_error("riverside").is_none());
        assert!(zone_error("river.side").is_none());
        assert!(
            zone_error(&"x".repeat(64)).is_some_and(|e| e.contains("is not a DNS label")),
            "a 64-character label"
        );
    }

    #[test]
    fn a_node_the_controller_created_is_named_only_with_its_dns_name() {
        let mut node = sidenet_crds::MeshNode::new(
            "porch",
            serde_json::from_value(serde_json::json!({"mesh": "riverside", "nodeId": "abc"}))
                .unwrap(),
        );
        assert_eq!(node_label(&node).as_deref(), Some("porch"));
        node.metadata.labels = Some(
            [(
                "app.kubernetes.io/managed-by".to_string(),
                "sidenet-controller".to_string(),
            )]
            .into(),
        );
        assert_eq!(node_label(&node), None);
        node.spec.dns_name = Some("porch-pi".into());
        assert_eq!(node_label(&node).as_deref(), Some("porch-pi"));
    }
}
