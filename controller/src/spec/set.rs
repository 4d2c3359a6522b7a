//! The validated manifest set, where its objects came from, and the errors of a manifest.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use sidenet_crds::{HardwareProfile, Mesh, MeshNode, NodeProvision};

/// Where an object came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// File path.
    pub file: PathBuf,
    /// Document index in the file, 1-based.
    pub doc: usize,
}

/// One problem with a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// File path.
    pub file: PathBuf,
    /// Document index, 1-based (0 when the file could not be split into documents).
    pub doc: usize,
    /// Line, when known (YAML syntax errors).
    pub line: Option<usize>,
    /// `Kind/name` of the object, when known.
    pub object: Option<String>,
    /// Field path (`spec.radio.channels.5g.channel`), when the problem is a field.
    pub field: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.doc > 0 {
            write!(f, ": document {}", self.doc)?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// All problems found in a manifest set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

/// A validated set of manifests.
#[derive(Debug, Clone, Default)]
pub struct ManifestSet {
    /// Meshes by `metadata.name`.
    pub meshes: BTreeMap<String, Mesh>,
    /// Mesh nodes by node id. Shared, not copied, between the sets made from one object
    /// (Kubernetes mode's parse cache, each namespace's set and the merged set hold one node
    /// each: docs/benchmarks.md, "Controller memory").
    pub nodes: BTreeMap<String, std::sync::Arc<MeshNode>>,
    /// Hardware profiles by name.
    pub profiles: BTreeMap<String, HardwareProfile>,
    /// Provisioning jobs by `metadata.name`.
    pub provisions: BTreeMap<String, NodeProvision>,
    /// Secrets (`v1/Secret`): name → key → value.
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    /// Where each object came from, by `Kind/name`.
    pub sources: BTreeMap<String, Source>,
}

/// The mesh id (what nodes join by and topics use) of a Mesh.
pub fn network_name(mesh: &Mesh) -> &str {
    mesh.spec
        .network_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .or(mesh.metadata.name.as_deref())
        .unwrap_or_default()
}

impl ManifestSet {
    /// The MeshNode of node id `id`, if the set declares one.
    pub fn node(&self, id: &str) -> Option<&MeshNode> {
        self.nodes.get(id).map(|n| &**n)
    }

    /// The Mesh whose network name is `net`.
    pub fn mesh_by_network(&self, net: &str) -> Option<&Mesh> {
        self.meshes.values().find(|m| network_name(m) == net)
    }

    /// The Mesh a MeshNode refers to.
    pub fn mesh_of(&self, node: &MeshNode) -> Option<&Mesh> {
        self.meshes.get(&node.spec.mesh)
    }

    /// Profiles whose board names include `board`.
    pub fn profile_for_board(&self, board: &str) -> Option<&HardwareProfile> {
        self.profiles
            .values()
            .find(|p| p.spec.board_names.iter().any(|b| b == board))
    }
}

/// The closest known names to `wanted` (by shared prefix, then edit distance), for error hints.
pub fn closest<'a>(wanted: &str, known: impl Iterator<Item = &'a String>) -> String {
    let mut scored: Vec<(usize, &str)> = known
        .map(|k| (sidenet_wire::names::edit_distance(wanted, k), k.as_str()))
        .collect();
    scored.sort();
    let best: Vec<&str> = scored.iter().take(3).map(|(_, k)| *k).collect();
    if best.is_empty() {
        "none known".into()
    } else {
        best.join(", ")
    }
}

/// The closest hardware profile names, or, when none is loaded at all, where they come from.
pub fn closest_profile(wanted: &str, set: &ManifestSet) -> String {
    if set.profiles.is_empty() {
        "no HardwareProfile is loaded at all (pass --profiles DIR, or run from the repository root, which has hardware-profiles/)".into()
    } else {
        format!("closest: {}", closest(wanted, set.profiles.keys()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_names() {
        let known = [
            "tplink-archer-c7-v2".to_string(),
            "glinet-gl-ar300m".to_string(),
        ];
        assert!(closest("tplink-archer-c7", known.iter()).starts_with("tplink-archer-c7-v2"));
    }
}
