//! A Mesh's policies: [`schedule`] (windows in the Mesh's time zone), [`eval`] (what the policies
//! say about a connection: the precedence of `docs/policies.md`), [`check`] (the field checks and
//! the policy tests run at every load) and [`explain`] (`sidenetctl explain`).

pub mod check;
pub mod compile;
pub mod eval;
pub mod explain;
pub mod schedule;

/// Whether a mesh has `rateLimit` policies: its nodes' configs may then carry a shaping table,
/// and provisioning installs the policy shaping's packages (`packages.shaping` of the install
/// descriptor) on its hosts.
pub fn shapes(spec: &sidenet_crds::MeshSpec) -> bool {
    spec.policies
        .iter()
        .any(|p| p.type_ == sidenet_crds::PolicyType::RateLimit)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn a_mesh_shapes_when_it_has_a_rate_policy() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/riverside/mesh.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let mesh: sidenet_crds::Mesh = sidenet_crds::yaml::from_str(&text).unwrap();
        let mut spec = mesh.spec;
        assert!(super::shapes(&spec), "the example has a rateLimit policy");
        spec.policies
            .retain(|p| p.type_ != sidenet_crds::PolicyType::RateLimit);
        assert!(!spec.policies.is_empty());
        assert!(!super::shapes(&spec));
    }
}
