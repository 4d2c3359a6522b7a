//! Loading and validating manifests.
//!
//! A manifest set is read from files and folders (`*.yaml`, `*.yml`, multi-document), each
//! document checked against the strict JSON Schema generated from the CRD types (the `jsonschema`
//! crate), then decoded into the typed resources, then checked as a whole (references between
//! objects, regulatory rules, prefixes, names). Every error names the file, the document, the
//! object, the field path and what was expected.
//!
//! A set with any error is refused as a whole: the controller keeps running on the last good set.
//!
//! # Layout
//!
//! - [`crate::spec::loader`] reads the files and folders, within limits (regular files only,
//!   sizes, symlink loops);
//! - [`crate::spec::parse`] turns each file's documents into typed objects (YAML, JSON Schema,
//!   decoding);
//! - [`crate::spec::checks`] checks the set as a whole;
//! - [`crate::spec::set`] holds the set and the error types.
//!
//! This module puts them together, and names what the rest of the controller uses.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::spec::checks::check_set;
use crate::spec::parse::{VALIDATORS, check_capacity, parse_file};

pub use crate::spec::checks::{node_radio_errors, parse_ula48, passphrase_ok};
pub use crate::spec::loader::{
    MAX_ENTRIES, MAX_FILE_BYTES, MAX_FILES, MAX_TOTAL_BYTES, collect_files, read_texts,
    read_texts_with,
};
pub use crate::spec::set::{
    ManifestError, ManifestErrors, ManifestSet, Source, closest, closest_profile, network_name,
};

/// Loads and validates manifests from files and folders.
pub fn load(paths: &[PathBuf]) -> Result<ManifestSet, ManifestErrors> {
    load_texts(&read_texts(paths)?)
}

/// Loads and validates manifests given as (path, text) pairs.
pub fn load_texts(texts: &[(PathBuf, String)]) -> Result<ManifestSet, ManifestErrors> {
    let mut set = ManifestSet::default();
    let mut errors = Vec::new();
    let files: Vec<_> = texts
        .iter()
        .map(|(file, text)| (file.as_path(), sidenet_crds::yaml::documents(text)))
        .collect();
    check_capacity(&files, &mut errors);
    if !errors.is_empty() {
        return Err(ManifestErrors(errors));
    }
    for ((file, docs), (_, text)) in files.into_iter().zip(texts) {
        parse_file(file, text, docs, &VALIDATORS, &mut set, &mut errors);
    }
    if errors.is_empty() {
        check_set(&set, &mut errors);
    }
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// What [`load_texts_cached`] keeps of each text: the SHA-256 of the text, and what parsing it
/// alone gave.
///
/// Kubernetes mode hands over one text per object, so a cache of n objects holds n parts of
/// one object each. A part is kept in vectors, not in a [`ManifestSet`] of its own: a map of
/// one entry allocates room for eleven, and at 10,000 MeshNodes that was 100 MB of empty slots
/// (docs/benchmarks.md, "Controller memory").
#[derive(Debug, Default)]
pub struct ParseCache {
    entries: HashMap<PathBuf, ([u8; 32], Part, Vec<ManifestError>)>,
}

impl ParseCache {
    /// How many texts it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The objects of one text, as [`ManifestSet`]'s maps hold them.
#[derive(Debug, Default)]
struct Part {
    meshes: Vec<(String, sidenet_crds::Mesh)>,
    nodes: Vec<(String, std::sync::Arc<sidenet_crds::MeshNode>)>,
    profiles: Vec<(String, sidenet_crds::HardwareProfile)>,
    provisions: Vec<(String, sidenet_crds::NodeProvision)>,
    secrets: Vec<(String, std::collections::BTreeMap<String, String>)>,
    sources: Vec<(String, Source)>,
}

impl From<ManifestSet> for Part {
    fn from(s: ManifestSet) -> Self {
        // Collected from exact-size iterators: no spare capacity.
        Part {
            meshes: s.meshes.into_iter().collect(),
            nodes: s.nodes.into_iter().collect(),
            profiles: s.profiles.into_iter().collect(),
            provisions: s.provisions.into_iter().collect(),
            secrets: s.secrets.into_iter().collect(),
            sources: s.sources.into_iter().collect(),
        }
    }
}

/// [`load_texts`], with each text (one file) parsed, schema-checked and decoded only when it
/// is not the one `cache` saw at that path (by SHA-256); the set is then put together from the
/// cached parts and checked as a whole. The result is the one [`load_texts`] gives: a case
/// where parts interact (two objects with one key or node id, more documents than a mesh's
/// /48 has room for) is left to [`load_texts`] itself.
pub fn load_texts_cached(
    texts: &[(PathBuf, String)],
    cache: &mut ParseCache,
) -> Result<ManifestSet, ManifestErrors> {
    if texts.len() > crate::spec::ipam::SUBNETS {
        return load_texts(texts);
    }
    let present: std::collections::HashSet<&PathBuf> = texts.iter().map(|(p, _)| p).collect();
    cache.entries.retain(|p, _| present.contains(p));
    let mut set = ManifestSet::default();
    let mut errors = Vec::new();
    for (file, text) in texts {
        let digest = sidenet_wire::codec::sha256(text.as_bytes());
        let fresh = cache.entries.get(file).is_none_or(|(d, _, _)| *d != digest);
        if fresh {
            let mut part = ManifestSet::default();
            let mut errs = Vec::new();
            let docs = sidenet_crds::yaml::documents(text);
            parse_file(file, text, docs, &VALIDATORS, &mut part, &mut errs);
            errs.shrink_to_fit();
            cache
                .entries
                .insert(file.clone(), (digest, Part::from(part), errs));
        }
        let Some((_, part, errs)) = cache.entries.get(file) else {
            return load_texts(texts);
        };
        if !add_part(&mut set, part) {
            return load_texts(texts);
        }
        errors.extend(errs.iter().cloned());
    }
    if errors.is_empty() {
        check_set(&set, &mut errors);
    }
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(ManifestErrors(errors))
    }
}

/// Adds the objects of `part` to `set`; false (and `set` left partly filled) when one of them
/// collides with an object already there.
fn add_part(set: &mut ManifestSet, part: &Part) -> bool {
    fn add<K: Ord + Clone, V: Clone>(
        to: &mut std::collections::BTreeMap<K, V>,
        from: &[(K, V)],
    ) -> bool {
        for (k, v) in from {
            if to.insert(k.clone(), v.clone()).is_some() {
                return false;
            }
        }
        true
    }
    add(&mut set.meshes, &part.meshes)
        && add(&mut set.nodes, &part.nodes)
        && add(&mut set.profiles, &part.profiles)
        && add(&mut set.provisions, &part.provisions)
        && add(&mut set.secrets, &part.secrets)
        && add(&mut set.sources, &part.sources)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The example mesh, its nodes and every hardware profile, one object per text (as
    /// Kubernetes mode hands them over).
    fn texts() -> Vec<(PathBuf, String)> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut out = Vec::new();
        let mut files = vec![
            repo.join("examples/riverside/mesh.yaml"),
            repo.join("examples/riverside/nodes.yaml"),
        ];
        files.extend(collect_files(&[repo.join("hardware-profiles")]).unwrap());
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, doc) in sidenet_crds::yaml::documents(&text).into_iter().enumerate() {
                let v: serde_json::Value = doc.unwrap();
                if !v.is_null() {
                    out.push((PathBuf::from(format!("{}#{i}", f.display())), v.to_string()));
                }
            }
        }
        out
    }

    fn same(texts: &[(PathBuf, String)], cache: &mut ParseCache) -> String {
        let a = format!("{:?}", load_texts(texts));
        let b = format!("{:?}", load_texts_cached(texts, cache));
        assert_eq!(a, b, "the cached load differs");
        a
    }

    #[test]
    fn the_cached_load_is_the_load() {
        let mut cache = ParseCache::default();
        let mut t = texts();
        let n = t.len();
        assert!(same(&t, &mut cache).starts_with("Ok("));
        assert_eq!(cache.len(), n);
        // One object changed, then broken (a schema error), then a duplicate node id, then
        // fixed again: each time what the full load says.
        let node = t
            .iter()
            .position(|(_, s)| s.contains("\"kind\":\"MeshNode\""))
            .unwrap();
        let good = t[node].1.clone();
        t[node].1 = good.replace("\"role\":\"router\"", "\"role\":\"gateway\"");
        same(&t, &mut cache);
        t[node].1 = good.replace("\"mesh\":\"riverside\"", "\"mesh\":7");
        assert!(same(&t, &mut cache).starts_with("Err("));
        let mut copy: serde_json::Value = serde_json::from_str(&good).unwrap();
        copy["metadata"]["name"] = "copy".into();
        t[node].1 = good.clone();
        t.push((PathBuf::from("copy"), copy.to_string()));
        assert!(same(&t, &mut cache).starts_with("Err("));
        t.pop();
        assert!(same(&t, &mut cache).starts_with("Ok("));
        // Texts that are gone leave the cache.
        t.truncate(3);
        same(&t, &mut cache);
        assert_eq!(cache.len(), 3);
    }
}
