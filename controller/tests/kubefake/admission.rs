//! What the in-memory API server checks before it stores a write (module docs of `kubefake`):
//! the custom resources against their CRD's `openAPIV3Schema` (read from the repo's `crds/`, as
//! `crdgen` generates them), and Events as `events.k8s.io/v1` validates them.
//!
//! Custom resources, in the order of a real API server: unknown fields are pruned, `null` is
//! dropped from fields that are not `nullable`, missing fields that have a `default` get it
//! (at every level that is present), then the object is validated with the `jsonschema` crate
//! (`nullable: true` read as "or null"). CEL rules (`x-kubernetes-validations`) and formats are
//! not checked; `metadata` is not pruned.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use serde_json::{Map, Value};

/// One CRD: its kind, scope and structural schema.
pub struct Crd {
    pub kind: String,
    pub namespaced: bool,
    schema: Value,
    validator: jsonschema::Validator,
}

/// Every CRD of `crds/*.yaml`, by `group/version/plural` (version: the first served one).
pub fn crds() -> &'static BTreeMap<String, Crd> {
    static CRDS: OnceLock<BTreeMap<String, Crd>> = OnceLock::new();
    CRDS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        let mut out = BTreeMap::new();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let crd: Value = sidenet_crds::yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let spec = &crd["spec"];
            let version = &spec["versions"][0];
            let schema = version["schema"]["openAPIV3Schema"].clone();
            let validator = jsonschema::validator_for(&as_json_schema(&schema))
                .unwrap_or_else(|e| panic!("{}: schema: {e}", f.display()));
            out.insert(
                format!(
                    "{}/{}/{}",
                    spec["group"].as_str().unwrap(),
                    version["name"].as_str().unwrap(),
                    spec["names"]["plural"].as_str().unwrap()
                ),
                Crd {
                    kind: spec["names"]["kind"].as_str().unwrap().to_string(),
                    namespaced: spec["scope"] == "Namespaced",
                    schema,
                    validator,
                },
            );
        }
        out
    })
}

/// The OpenAPI schema as JSON Schema: `nullable: true` becomes a `type` that also allows null.
fn as_json_schema(s: &Value) -> Value {
    match s {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let v = match k.as_str() {
                    "properties" | "patternProperties" => Value::Object(
                        v.as_object()
                            .map(|p| {
                                p.iter()
                                    .map(|(k, v)| (k.clone(), as_json_schema(v)))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    ),
                    "items" | "additionalProperties" | "not" => as_json_schema(v),
                    "allOf" | "anyOf" | "oneOf" => Value::Array(
                        v.as_array()
                            .map(|a| a.iter().map(as_json_schema).collect())
                            .unwrap_or_default(),
                    ),
                    // Annotations and Kubernetes extensions only.
                    "nullable" | "format" => continue,
                    _ => v.clone(),
                };
                out.insert(k.clone(), v);
            }
            if m.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = m.get("type")
            {
                out.insert("type".into(), serde_json::json!([t, "null"]));
            }
            Value::Object(out)
        }
        v => v.clone(),
    }
}

/// Prunes, drops non-nullable nulls and defaults `v` in place, following `schema`.
fn structural(v: &mut Value, schema: &Value, top: bool) {
    let Some(obj) = v.as_object_mut() else {
        if let Some(items) = schema.get("items")
            && let Some(a) = v.as_array_mut()
        {
            for x in a {
                structural(x, items, false);
            }
        }
        return;
    };
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .is_some_and(|p| p == true);
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        if !preserve {
            obj.retain(|k, _| {
                props.contains_key(k)
                    || (top && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
            });
        }
        for (k, ps) in props {
            if top && k == "metadata" {
                continue;
            }
            if obj.get(k).is_some_and(Value::is_null)
                && ps.get("nullable") != Some(&Value::Bool(true))
            {
                obj.remove(k);
            }
            if !obj.contains_key(k)
                && let Some(d) = ps.get("default")
            {
                obj.insert(k.clone(), d.clone());
            }
            if let Some(x) = obj.get_mut(k) {
                structural(x, ps, false);
            }
        }
    } else if let Some(ap) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        for x in obj.values_mut() {
            structural(x, ap, false);
        }
    }
}

/// A JSON pointer (`/spec/overrides/txPower`) as the API server writes a field path.
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        if seg.chars().all(|c| c.is_ascii_digit()) && !seg.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg.replace("~1", "/").replace("~0", "~"));
        }
    }
    out
}

/// Admits a custom resource: prunes and defaults `obj`, then validates it. The error is the
/// API server's 422 message: `Kind.group "name" is invalid: [path: Invalid value: ...]`.
/// On an update (`old`), a field that fails but is unchanged does not count (validation
/// ratcheting, on by default since Kubernetes 1.30): an object stored before a bound existed
/// can still get its status written.
pub fn admit_custom(resource: &str, obj: &mut Value, old: Option<&Value>) -> Result<(), String> {
    let Some(crd) = crds().get(resource) else {
        return Ok(());
    };
    structural(obj, &crd.schema, true);
    let errors: Vec<String> = crd
        .validator
        .iter_errors(obj)
        .filter(|e| {
            let path = e.instance_path().to_string();
            old.and_then(|o| o.pointer(&path)) != Some(e.instance().as_ref())
        })
        .map(|e| {
            format!(
                "{}: Invalid value: {}: {e}",
                field_path(&e.instance_path().to_string()),
                e.instance()
            )
        })
        .collect();
    if errors.is_empty() {
        return Ok(());
    }
    let group = resource.split('/').next().unwrap_or("");
    Err(format!(
        "{}.{group} \"{}\" is invalid: [{}]",
        crd.kind,
        obj["metadata"]["name"].as_str().unwrap_or(""),
        errors.join(", ")
    ))
}

/// The API's length limits of an `events.k8s.io/v1` Event.
pub const NOTE_LIMIT: usize = 1024;
const FIELD_LIMIT: usize = 128;

/// Validates an `events.k8s.io/v1` Event stored in namespace `ns`, as the API server does on
/// create and update (`pkg/apis/core/validation/events.go`), and one rule stricter: an Event
/// about a namespaced object must be in that object's namespace (the API only requires that an
/// Event about a cluster-scoped object is in `default` or `kube-system`).
pub fn validate_event(ns: &str, ev: &Value) -> Result<(), String> {
    let mut errors = Vec::new();
    let s = |f: &str| ev[f].as_str().unwrap_or("").to_string();
    if ev["eventTime"].is_null() {
        errors.push("eventTime: Required value".to_string());
    }
    if !matches!(s("type").as_str(), "Normal" | "Warning") {
        errors.push(format!(
            "type: Invalid value: {:?}: has invalid value",
            s("type")
        ));
    }
    for (f, required) in [
        ("reportingController", true),
        ("reportingInstance", true),
        ("action", true),
        ("reason", true),
    ] {
        let v = s(f);
        if required && v.is_empty() {
            errors.push(format!("{f}: Required value"));
        }
        if v.len() > FIELD_LIMIT {
            errors.push(format!(
                "{f}: Too long: may not be more than {FIELD_LIMIT} bytes"
            ));
        }
    }
    if s("note").len() > NOTE_LIMIT {
        errors.push(format!(
            "note: Too long: may not be more than {NOTE_LIMIT} bytes (got {})",
            s("note").len()
        ));
    }
    let regarding_ns = ev["regarding"]["namespace"].as_str().unwrap_or("");
    if regarding_ns.is_empty() {
        if !matches!(ns, "" | "default" | "kube-system") {
            errors.push(format!(
                "regarding.namespace: Invalid value: \"\": does not match event.namespace {ns:?} (an Event about a cluster-scoped object belongs in default or kube-system)"
            ));
        }
    } else if regarding_ns != ns {
        errors.push(format!(
            "regarding.namespace: Invalid value: {regarding_ns:?}: does not match event.namespace {ns:?}"
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Event.events.k8s.io \"{}\" is invalid: [{}]",
            ev["metadata"]["name"].as_str().unwrap_or(""),
            errors.join(", ")
        ))
    }
}
