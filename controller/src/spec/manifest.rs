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
