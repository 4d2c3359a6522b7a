//! What one node's data plane enforces of the mesh's policies. Today: the node's budget for its
//! own side-net egress (the policer of the Linux and OpenWrt templates, which exempts relayed
//! traffic). Windows, per-path limits, ingress limits and allow/deny rules are checked, tested
//! and explained by the controller but not yet compiled for the node (`docs/policies.md`).

use sidenet_crds::{Direction, Mesh, PolicyType, Scope};

use crate::spec::policy::eval::{Member, MeshPolicies};

/// The node's budget for its own side-net egress in kbit/s: the smallest rate of the rateLimit
/// policies that apply to `node` and have no schedule, no `toward`, direction egress (the
/// default) and scope own (the default). None: no such policy.
pub fn node_budget(mesh: &Mesh, node: &Member) -> Option<u64> {
    let mp = MeshPolicies::new(mesh, vec![node.clone()]);
    mesh.spec
        .policies
        .iter()
        .filter(|p| {
            p.type_ == PolicyType::RateLimit
                && p.schedule.is_empty()
                && p.toward.is_none()
                && p.direction.unwrap_or(Direction::Egress) == Direction::Egress
                && p.scope.unwrap_or(Scope::Own) == Scope::Own
                && mp.applies(p, node)
        })
        .filter_map(|p| p.rate_kbit)
        .min()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sidenet_crds::{NodeGroup, NodeSelector, Policy, Window};

    fn mesh(policies: Vec<Policy>) -> Mesh {
        let mut m: Mesh = sidenet_crds::yaml::from_str(
            "apiVersion: sidenet.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  prefix: fd00:1:2::/48\n  radio: {country: DE, meshBand: 5g, channels: {5g: {channel: 36, width: 80}}}\n  encryption: {passphraseSecretRef: {name: s, key: k}}\n",
        )
        .unwrap();
        m.spec.policies = policies;
        m.spec.node_groups = vec![NodeGroup {
            name: "upstairs".into(),
            nodes: vec![],
            match_labels: [("floor".to_string(), "1".to_string())].into(),
        }];
        m
    }

    fn member(name: &str, floor: &str) -> Member {
        Member {
            id: format!("{name}-id"),
            name: name.into(),
            labels: [("floor".to_string(), floor.to_string())].into(),
        }
    }

    #[test]
    fn budget_counts_only_plain_own_egress_policies_of_the_node() {
        let rate = |r| Policy {
            rate_kbit: Some(r),
            ..Policy::new(PolicyType::RateLimit)
        };
        let m = mesh(vec![
            rate(20000),
            Policy {
                groups: vec!["upstairs".into()],
                ..rate(8000)
            },
            Policy {
                name: Some("night".into()),
                schedule: vec![Window {
                    days: vec![],
                    start: "23:00".into(),
                    end: "07:00".into(),
                }],
                ..rate(1000)
            },
            Policy {
                toward: Some(NodeSelector {
                    nodes: vec!["b".into()],
                    ..Default::default()
                }),
                ..rate(1000)
            },
            Policy {
                scope: Some(Scope::Relayed),
                ..rate(1000)
            },
            Policy {
                direction: Some(Direction::Ingress),
                ..rate(1000)
            },
        ]);
        assert_eq!(node_budget(&m, &member("a", "1")), Some(8000));
        assert_eq!(node_budget(&m, &member("a", "0")), Some(20000));
        assert_eq!(node_budget(&mesh(vec![]), &member("a", "0")), None);
        // A policy naming only a group no longer applies to every node.
        let g = mesh(vec![Policy {
            groups: vec!["upstairs".into()],
            ..rate(8000)
        }]);
        assert_eq!(node_budget(&g, &member("a", "0")), None);
    }
}
