//! One manifest file into typed objects: each YAML document checked against the strict JSON
//! Schema generated from the CRD types (the `jsonschema` crate), then decoded, and added to the
//! set. Every error names the file, the document, the object and the field.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use serde_json::Value;
use sidenet_crds::yaml::YamlError;
use sidenet_crds::{API_VERSION, HardwareProfile, Mesh, MeshNode, NodeProvision};

use crate::spec::set::{ManifestError, ManifestSet, Source};
use crate::spec::{hints, ipam};

/// The sidenet kinds a manifest set holds (besides `v1/Secret`).
const KINDS: [&str; 4] = ["Mesh", "MeshNode", "HardwareProfile", "NodeProvision"];
/// The schemas depend on the CRD types alone: compiled once per process, not on every reload.
pub(crate) static VALIDATORS: LazyLock<Validators> = LazyLock::new(Validators::new);

pub(crate) struct Validators {
    by_kind: BTreeMap<&'static str, jsonschema::Validator>,
}

impl Validators {
    fn new() -> Self {
        let mut by_kind = BTreeMap::new();
        for kind in KINDS {
            if let Some(schema) = sidenet_crds::strict_schema(kind)
                && let Ok(v) = jsonschema::validator_for(&schema)
            {
                by_kind.insert(kind, v);
            }
        }
        Self { by_kind }
    }
}

/// The documents of one file, parsed as YAML.
pub(crate) type Documents = Vec<Result<Value, YamlError>>;

/// Checks that no mesh has more `MeshNode`s than its /48 holds ([`ipam::SUBNETS`]), before the
/// documents are checked one by one: a folder with 66,000 nodes for one mesh gets this one error
/// at once. The error names the first `MeshNode` document that does not fit.
pub(crate) fn check_capacity(files: &[(&Path, Documents)], errors: &mut Vec<ManifestError>) {
    let mut counts: BTreeMap<&str, (usize, Option<ManifestError>)> = BTreeMap::new();
    for (file, docs) in files {
        for (i, doc) in docs.iter().enumerate() {
            let Ok(v) = doc else { continue };
            if v.get("kind").and_then(Value::as_str) != Some("MeshNode") {
                continue;
            }
            let Some(mesh) = v.pointer("/spec/mesh").and_then(Value::as_str) else {
                continue;
            };
            let (n, first) = counts.entry(mesh).or_default();
            *n += 1;
            if *n == ipam::SUBNETS + 1 {
                let name = v
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                *first = Some(ManifestError {
                    file: file.to_path_buf(),
                    doc: i + 1,
                    line: None,
                    object: Some(format!("MeshNode/{name}")),
                    field: Some("spec.mesh".into()),
                    message: String::new(),
                });
            }
        }
    }
    for (mesh, (n, first)) in counts {
        if let Some(mut e) = first {
            e.message = format!(
                "mesh {mesh:?} has {n} MeshNodes and this is number {}; a mesh's /48 has room for {} nodes (one /64 each, subnet 0 reserved): split the nodes over several meshes",
                ipam::SUBNETS + 1,
                ipam::SUBNETS
            );
            errors.push(e);
        }
    }
}

pub(crate) fn parse_file(
    file: &Path,
    text: &str,
    docs: Documents,
    validators: &Validators,
    set: &mut ManifestSet,
    errors: &mut Vec<ManifestError>,
) {
    for (i, parsed) in docs.into_iter().enumerate() {
        let doc = i + 1;
        let err = |object: Option<String>, field: Option<String>, message: String| ManifestError {
            file: file.to_path_buf(),
            doc,
            line: None,
            object,
            field,
            message,
        };
        let value = match parsed {
            Ok(v) => v,
            Err(e) => {
                let (field, message) = hints::yaml_error(text, doc, &e);
                errors.push(ManifestError {
                    file: file.to_path_buf(),
                    doc,
                    line: e.line,
                    object: None,
                    field,
                    message,
                });
                // The rest of the file cannot be split reliably.
                return;
            }
        };
        if value.is_null() {
            continue;
        }
        let Some(obj) = value.as_object().cloned() else {
            errors.push(err(
                None,
                None,
                "expected a mapping with apiVersion, kind, metadata and spec".into(),
            ));
            continue;
        };
        const KIND_LIST: &str =
            "expected one of Mesh, MeshNode, HardwareProfile, NodeProvision, Secret";
        // apiVersion, kind and metadata.name are strings: another type is said as such, not
        // taken as missing.
        let mut wrong_type = None;
        if let Some(v) = obj.get("kind").filter(|v| !v.is_string() && !v.is_null()) {
            wrong_type = Some(("kind", hints::not_a_string(v, KIND_LIST, false)));
        } else if let Some(v) = obj
            .get("apiVersion")
            .filter(|v| !v.is_string() && !v.is_null())
        {
            wrong_type = Some((
                "apiVersion",
                hints::not_a_string(
                    v,
                    &format!("expected {API_VERSION:?} (or \"v1\" for a Secret)"),
                    false,
                ),
            ));
        } else if let Some(v) = obj
            .get("metadata")
            .filter(|v| !v.is_object() && !v.is_null())
        {
            wrong_type = Some((
                "metadata",
                format!(
                    "{} is not a mapping; expected a mapping with name",
                    hints::describe(v)
                ),
            ));
        } else if let Some(v) = obj
            .get("metadata")
            .and_then(|m| m.get("name"))
            .filter(|v| !v.is_string() && !v.is_null())
        {
            wrong_type = Some((
                "metadata.name",
                hints::not_a_string(
                    v,
                    "expected a name of lowercase letters, digits, '-' and '.'",
                    true,
                ),
            ));
        }
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        let api = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = obj
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let object = Some(format!(
            "{}/{}",
            if kind.is_empty() { "?" } else { kind },
            if name.is_empty() { "?" } else { &name }
        ));
        if let Some((field, message)) = wrong_type {
            errors.push(err(object, Some(field.into()), message));
            continue;
        }
        if kind.is_empty() {
            errors.push(err(
                None,
                Some("kind".into()),
                format!("missing; {KIND_LIST}"),
            ));
            continue;
        }
        if kind == "Secret" {
            if api != "v1" {
                errors.push(err(
                    object,
                    Some("apiVersion".into()),
                    format!("{api:?} is not valid for a Secret; expected \"v1\""),
                ));
                continue;
            }
            if let Err(e) = check_object_name(&name) {
                let e = if name.is_empty() {
                    "missing; every object needs a name".to_string()
                } else {
                    e
                };
                errors.push(err(object, Some("metadata.name".into()), e));
                continue;
            }
            match parse_secret(&obj) {
                Ok(data) => {
                    if let Some(prev) = set.sources.insert(
                        format!("Secret/{name}"),
                        Source {
                            file: file.to_path_buf(),
                            doc,
                        },
                    ) {
                        errors.push(err(
                            object,
                            Some("metadata.name".into()),
                            format!(
                                "duplicate Secret {name:?}, first defined in {} document {}",
                                prev.file.display(),
                                prev.doc
                            ),
                        ));
                    }
                    set.secrets.insert(name, data);
                }
                Err((field, msg)) => errors.push(err(object, Some(field), msg)),
            }
            continue;
        }
        if !KINDS.contains(&kind) {
            errors.push(err(
                object,
                Some("kind".into()),
                format!(
                    "unknown kind {kind:?}; expected one of Mesh, MeshNode, HardwareProfile, NodeProvision, Secret"
                ),
            ));
            continue;
        }
        if api != API_VERSION {
            errors.push(err(
                object,
                Some("apiVersion".into()),
                format!("{api:?} is not served; expected {API_VERSION:?}"),
            ));
            continue;
        }
        if name.is_empty() {
            errors.push(err(
                object,
                Some("metadata.name".into()),
                "missing; every object needs a name".into(),
            ));
            continue;
        }
        if let Err(e) = check_object_name(&name) {
            errors.push(err(object, Some("metadata.name".into()), e));
            continue;
        }
        if let Some(v) = validators.by_kind.get(kind) {
            let mut schema_errors: Vec<ManifestError> = v
                .iter_errors(&value)
                .map(|e| {
                    let mut path = pointer_to_path(&e.instance_path().to_string());
                    let mut message = describe_schema_error(&e);
                    if let jsonschema::error::ValidationErrorKind::Required { property } = e.kind()
                    {
                        let prop = property.as_str().unwrap_or_default();
                        path = if path.is_empty() {
                            prop.to_string()
                        } else {
                            format!("{path}.{prop}")
                        };
                        message = "missing required field".into();
                    }
                    if let Some(m) = removed_setting(&path, e.instance()) {
                        message = m;
                    }
                    let field = if path.is_empty() {
                        "(document)".into()
                    } else {
                        path
                    };
                    err(object.clone(), Some(field), message)
                })
                .collect();
            if !schema_errors.is_empty() {
                schema_errors.sort_by(|a, b| a.field.cmp(&b.field));
                schema_errors.dedup();
                errors.extend(schema_errors);
                continue;
            }
        }
        let key = format!("{kind}/{name}");
        let src = Source {
            file: file.to_path_buf(),
            doc,
        };
        let decoded = match kind {
            "Mesh" => decode::<Mesh>(value).map(|m| {
                set.meshes.insert(name.clone(), m);
            }),
            "MeshNode" => decode::<MeshNode>(value).map(|n| {
                let id = n.spec.node_id.clone();
                if let Some(prev) = set.nodes.insert(id.clone(), std::sync::Arc::new(n))
                    && prev.metadata.name.as_deref() != Some(name.as_str())
                {
                    errors.push(err(
                        object.clone(),
                        Some("spec.nodeId".into()),
                        format!(
                            "node id {id:?} is already used by MeshNode/{}",
                            prev.metadata.name.clone().unwrap_or_default()
                        ),
                    ));
                }
            }),
            "NodeProvision" => decode::<NodeProvision>(value).map(|p| {
                set.provisions.insert(name.clone(), p);
            }),
            _ => decode::<HardwareProfile>(value).map(|p| {
                set.profiles.insert(name.clone(), p);
            }),
        };
        if let Err((field, message)) = decoded {
            errors.push(err(object.clone(), field, message));
            continue;
        }
        if let Some(prev) = set.sources.insert(key, src) {
            errors.push(err(
                object,
                Some("metadata.name".into()),
                format!(
                    "duplicate {kind} {name:?}, first defined in {} document {}",
                    prev.file.display(),
                    prev.doc
                ),
            ));
        }
    }
}

/// Decodes a document that passed the schema; an error names the field.
fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, (Option<String>, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = hints::decode_error(&e.inner().to_string());
        if path == "." {
            (None, format!("cannot be decoded: {message}"))
        } else {
            (Some(path), message)
        }
    })
}

/// Checks a Kubernetes object name (RFC 1123 subdomain: lowercase letters, digits, '-' and
/// '.', at most 253 characters, starting and ending with a letter or digit).
pub fn check_object_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid object name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        ))
    }
}

fn parse_secret(
    obj: &serde_json::Map<String, Value>,
) -> Result<BTreeMap<String, String>, (String, String)> {
    use base64::Engine;
    let mut out = BTreeMap::new();
    if let Some(data) = obj.get("data") {
        let map = data.as_object().ok_or((
            "data".to_string(),
            "expected a mapping of key: base64 value".to_string(),
        ))?;
        for (k, v) in map {
            let s = v
                .as_str()
                .ok_or((format!("data.{k}"), "expected a base64 string".into()))?;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|e| (format!("data.{k}"), format!("not valid base64: {e}")))?;
            let text = String::from_utf8(raw)
                .map_err(|_| (format!("data.{k}"), "not UTF-8 text".to_string()))?;
            out.insert(k.clone(), text);
        }
    }
    if let Some(data) = obj.get("stringData") {
        let map = data.as_object().ok_or((
            "stringData".to_string(),
            "expected a mapping of key: value".to_string(),
        ))?;
        for (k, v) in map {
            let s = v
                .as_str()
                .ok_or((format!("stringData.{k}"), "expected a string".into()))?;
            out.insert(k.clone(), s.to_string());
        }
    }
    Ok(out)
}

/// `/spec/radio/channels/5g` → `spec.radio.channels.5g`; array indices as `[0]`.
fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').skip(1) {
        let part = part.replace("~1", "/").replace("~0", "~");
        if part.chars().all(|c| c.is_ascii_digit()) && !part.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&part);
        }
    }
    out
}

fn describe_schema_error(e: &jsonschema::ValidationError<'_>) -> String {
    let msg = e.to_string();
    // jsonschema words "Additional properties are not allowed ('x' was unexpected)": say it in
    // the admin's terms.
    if msg.contains("Additional properties are not allowed") {
        return hints::unknown_field(&msg);
    }
    hints::schema_numbers(&msg)
}

/// What to say about a setting sidenet no longer has (the schema alone would only list the
/// values it has now).
fn removed_setting(path: &str, value: &Value) -> Option<String> {
    (path == "spec.routing.protocol" && value.as_str() == Some("batman-adv")).then(|| {
        "\"batman-adv\" is no longer supported: it validated but could not work (Linux nodes never created bat0, OpenWrt nodes had no route for the mesh prefix); use \"babel\" (the default: babel over one WireGuard link per neighbour), or leave spec.routing.protocol out".to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(mesh: &str, n: usize) -> Documents {
        (0..n)
            .map(|i| {
                Ok(serde_json::json!({
                    "kind": "MeshNode",
                    "metadata": {"name": format!("n{i}")},
                    "spec": {"mesh": mesh},
                }))
            })
            .collect()
    }

    #[test]
    fn a_mesh_holds_65535_nodes() {
        let a = Path::new("a.yaml");
        let b = Path::new("b.yaml");
        let mut errors = Vec::new();
        // Full, but not over: two meshes, and the count spans files.
        let full = [
            (a, nodes("riverside", 60_000)),
            (b, nodes("riverside", 5_535)),
            (b, nodes("oakstreet", 100)),
        ];
        check_capacity(&full, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let over = [
            (a, nodes("riverside", 60_000)),
            (b, nodes("riverside", 6_000)),
        ];
        check_capacity(&over, &mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!((e.file.as_path(), e.doc), (b, 5_536));
        assert_eq!(e.object.as_deref(), Some("MeshNode/n5535"));
        assert_eq!(e.field.as_deref(), Some("spec.mesh"));
        assert!(e.message.contains("has 66000 MeshNodes"), "{e}");
    }

    #[test]
    fn pointer_paths() {
        assert_eq!(
            pointer_to_path("/spec/radio/channels/5g"),
            "spec.radio.channels.5g"
        );
        assert_eq!(
            pointer_to_path("/spec/policies/0/type"),
            "spec.policies[0].type"
        );
        assert_eq!(pointer_to_path(""), "");
    }
}
