//! Loading and validating manifests.
//!
//! A manifest set is read from files and folders (`*.yaml`, `*.yml`, multi-document), each
//! document checked against the strict JSON Schema generated from the CRD types (the `jsonschema`
//! crate), then decoded into the typed resources, then checked as a whole (references between
//! objects, regulatory rules, prefixes, names). Every error names the file, the document, the
//! object, the field path and what was expected.
//!
//! A set with any error is refused as a whole: the controller keeps running on the last good set.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use serde_json::Value;
use sidenet_crds::{
    API_VERSION, HardwareProfile, HardwareProfileSpec, Mesh, MeshNode, NodeProvision, PolicyType,
    SecretKeyRef,
};
use sidenet_wire::names;

use crate::spec::regdb;

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
    /// Mesh nodes by node id.
    pub nodes: BTreeMap<String, MeshNode>,
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

/// Collects `*.yaml` / `*.yml` files under the given paths (files are taken as they are),
/// sorted, so the load order and error order are stable.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ManifestError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out).map_err(|e| io_error(p, &e))?;
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(io_error(
                p,
                &std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml") | Some("yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

fn io_error(path: &Path, e: &std::io::Error) -> ManifestError {
    ManifestError {
        file: path.to_path_buf(),
        doc: 0,
        line: None,
        object: None,
        field: None,
        message: format!("cannot read: {e}"),
    }
}

/// Loads and validates manifests from files and folders.
pub fn load(paths: &[PathBuf]) -> Result<ManifestSet, ManifestErrors> {
    let files = collect_files(paths).map_err(|e| ManifestErrors(vec![e]))?;
    let mut texts = Vec::with_capacity(files.len());
    let mut errors = Vec::new();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(t) => texts.push((f, t)),
            Err(e) => errors.push(io_error(&f, &e)),
        }
    }
    if !errors.is_empty() {
        return Err(ManifestErrors(errors));
    }
    load_texts(&texts)
}

/// Loads and validates manifests given as (path, text) pairs.
pub fn load_texts(texts: &[(PathBuf, String)]) -> Result<ManifestSet, ManifestErrors> {
    let mut set = ManifestSet::default();
    let mut errors = Vec::new();
    for (file, text) in texts {
        parse_file(file, text, &VALIDATORS, &mut set, &mut errors);
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

/// The sidenet kinds a manifest set holds (besides `v1/Secret`).
const KINDS: [&str; 4] = ["Mesh", "MeshNode", "HardwareProfile", "NodeProvision"];
/// The schemas depend on the CRD types alone: compiled once per process, not on every reload.
static VALIDATORS: LazyLock<Validators> = LazyLock::new(Validators::new);

struct Validators {
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

fn parse_file(
    file: &Path,
    text: &str,
    validators: &Validators,
    set: &mut ManifestSet,
    errors: &mut Vec<ManifestError>,
) {
    for (i, parsed) in sidenet_crds::yaml::documents(text).into_iter().enumerate() {
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
                errors.push(ManifestError {
                    file: file.to_path_buf(),
                    doc,
                    line: e.line,
                    object: None,
                    field: None,
                    message: format!("not valid YAML: {e}"),
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
        if kind.is_empty() {
            errors.push(err(
                None,
                Some("kind".into()),
                "missing; expected one of Mesh, MeshNode, HardwareProfile, NodeProvision, Secret"
                    .into(),
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
            "Mesh" => serde_json::from_value::<Mesh>(value).map(|m| {
                set.meshes.insert(name.clone(), m);
            }),
            "MeshNode" => serde_json::from_value::<MeshNode>(value).map(|n| {
                let id = n.spec.node_id.clone();
                if let Some(prev) = set.nodes.insert(id.clone(), n)
                    && prev.metadata.name.as_deref() != Some(name.as_str())
                {
                    errors.push(err(
                        object.clone(),
                        Some("spec.nodeId".into()),
                        format!(
                            "node id {id:?} is already used by MeshNode/{}",
                            prev.metadata.name.unwrap_or_default()
                        ),
                    ));
                }
            }),
            "NodeProvision" => serde_json::from_value::<NodeProvision>(value).map(|p| {
                set.provisions.insert(name.clone(), p);
            }),
            _ => serde_json::from_value::<HardwareProfile>(value).map(|p| {
                set.profiles.insert(name.clone(), p);
            }),
        };
        if let Err(e) = decoded {
            errors.push(err(object.clone(), None, format!("cannot be decoded: {e}")));
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

fn check_object_name(name: &str) -> Result<(), String> {
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
        return format!("unknown field: {msg}");
    }
    msg
}

/// What to say about a setting sidenet no longer has (the schema alone would only list the
/// values it has now).
fn removed_setting(path: &str, value: &Value) -> Option<String> {
    (path == "spec.routing.protocol" && value.as_str() == Some("batman-adv")).then(|| {
        "\"batman-adv\" is no longer supported: it validated but could not work (Linux nodes never created bat0, OpenWrt nodes had no route for the mesh prefix); use \"babel\" (the default: babel over one WireGuard link per neighbour), or leave spec.routing.protocol out".to_string()
    })
}

/// Checks a mesh prefix: an IPv6 ULA (fc00::/7) /48. Returns the network address.
pub fn parse_ula48(prefix: &str) -> Result<Ipv6Addr, String> {
    let (addr, len) = prefix.split_once('/').ok_or_else(|| {
        format!("{prefix:?} is not a prefix; expected an IPv6 ULA /48 like fd5e:1d0e:7a00::/48")
    })?;
    let addr: Ipv6Addr = addr.parse().map_err(|_| {
        format!(
            "{addr:?} is not an IPv6 address; expected an IPv6 ULA /48 like fd5e:1d0e:7a00::/48"
        )
    })?;
    if len != "48" {
        return Err(format!(
            "prefix length is /{len}; expected /48 (each node gets a /64 from it)"
        ));
    }
    let seg = addr.segments();
    if seg[0] & 0xfe00 != 0xfc00 {
        return Err(format!(
            "{prefix} is not a unique local address; expected a prefix inside fc00::/7 (pick a random fdXX:XXXX:XXXX::/48)"
        ));
    }
    if seg[3..].iter().any(|s| *s != 0) {
        return Err(format!(
            "{prefix} has host bits set; expected {}::/48",
            Ipv6Addr::new(seg[0], seg[1], seg[2], 0, 0, 0, 0, 0)
        ));
    }
    Ok(addr)
}

fn check_set(set: &ManifestSet, errors: &mut Vec<ManifestError>) {
    let err = |key: &str, field: &str, message: String| {
        let src = set.sources.get(key).cloned().unwrap_or(Source {
            file: PathBuf::new(),
            doc: 0,
        });
        ManifestError {
            file: src.file,
            doc: src.doc,
            line: None,
            object: Some(key.to_string()),
            field: Some(field.to_string()),
            message,
        }
    };

    let mut networks: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, mesh) in &set.meshes {
        let key = format!("Mesh/{name}");
        let net = network_name(mesh);
        let net_field = if mesh.spec.network_name.is_some() {
            "spec.networkName"
        } else {
            "metadata.name"
        };
        if let Err(e) = names::check_mesh_name(net) {
            errors.push(err(&key, net_field, e.to_string()));
        }
        if let Some(other) = networks.insert(net, name) {
            errors.push(err(
                &key,
                net_field,
                format!("network name {net:?} is already used by Mesh/{other}"),
            ));
        }
        if let Err(e) = parse_ula48(&mesh.spec.prefix) {
            errors.push(err(&key, "spec.prefix", e));
        }
        let radio = &mesh.spec.radio;
        for (field, message) in regdb::check_mesh_radio(radio) {
            errors.push(err(&key, &field, message));
        }
        if radio.channels.get(radio.mesh_band).is_none() {
            errors.push(err(
                &key,
                &format!("spec.radio.channels.{}", radio.mesh_band.as_str()),
                format!(
                    "missing: meshBand is {} so a channel for it is required",
                    radio.mesh_band.as_str()
                ),
            ));
        }
        let sref = &mesh.spec.encryption.passphrase_secret_ref;
        if check_object_name(&sref.name).is_err() {
            errors.push(err(
                &key,
                "spec.encryption.passphraseSecretRef.name",
                format!("{:?} is not a valid Secret name", sref.name),
            ));
        }
        if let Some(data) = set.secrets.get(&sref.name) {
            match data.get(&sref.key) {
                None => errors.push(err(&key, "spec.encryption.passphraseSecretRef.key", format!("Secret/{} has no key {:?}", sref.name, sref.key))),
                Some(p) if !passphrase_ok(p) => errors.push(err(&key, "spec.encryption.passphraseSecretRef", format!("the passphrase in Secret/{} must be 8 to 63 characters without quotes or newlines", sref.name))),
                Some(_) => {}
            }
        }
        if let Some(rot) = &mesh.spec.encryption.rotation {
            let nref = &rot.next_passphrase_secret_ref;
            if crate::parse_rfc3339(&rot.switch_at).is_none() {
                errors.push(err(
                    &key,
                    "spec.encryption.rotation.switchAt",
                    format!(
                        "{:?} is not an RFC 3339 UTC time like 2026-12-01T03:00:00Z",
                        rot.switch_at
                    ),
                ));
            }
            if nref == sref {
                errors.push(err(
                    &key,
                    "spec.encryption.rotation.nextPassphraseSecretRef",
                    "names the current passphrase (passphraseSecretRef); point it at the next one"
                        .to_string(),
                ));
            }
            if check_object_name(&nref.name).is_err() {
                errors.push(err(
                    &key,
                    "spec.encryption.rotation.nextPassphraseSecretRef.name",
                    format!("{:?} is not a valid Secret name", nref.name),
                ));
            }
            if let Some(data) = set.secrets.get(&nref.name) {
                match data.get(&nref.key) {
                    None => errors.push(err(&key, "spec.encryption.rotation.nextPassphraseSecretRef.key", format!("Secret/{} has no key {:?}", nref.name, nref.key))),
                    Some(p) if !passphrase_ok(p) => errors.push(err(&key, "spec.encryption.rotation.nextPassphraseSecretRef", format!("the passphrase in Secret/{} must be 8 to 63 characters without quotes or newlines", nref.name))),
                    Some(_) => {}
                }
            }
        }
        for (i, p) in mesh.spec.policies.iter().enumerate() {
            if p.type_ == PolicyType::RateLimit && p.rate_kbit.is_none() {
                errors.push(err(
                    &key,
                    &format!("spec.policies[{i}].rateKbit"),
                    "missing: a rateLimit policy needs rateKbit (kbit/s)".into(),
                ));
            }
            if p.type_ != PolicyType::RateLimit && p.rate_kbit.is_some() {
                errors.push(err(
                    &key,
                    &format!("spec.policies[{i}].rateKbit"),
                    "only a rateLimit policy takes rateKbit".into(),
                ));
            }
        }
        let no = mesh
            .spec
            .policies
            .iter()
            .any(|p| p.type_ == PolicyType::NoInternet);
        let allow = mesh
            .spec
            .policies
            .iter()
            .any(|p| p.type_ == PolicyType::AllowInternet);
        if no && allow {
            errors.push(err(
                &key,
                "spec.policies",
                "noInternet and allowInternet contradict each other; keep one".into(),
            ));
        }
    }

    for (name, profile) in &set.profiles {
        let key = format!("HardwareProfile/{name}");
        check_profile(&profile.spec, &mut |field, msg| {
            errors.push(err(&key, field, msg))
        });
    }

    for (id, node) in &set.nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let key = format!("MeshNode/{name}");
        if let Err(e) = names::check_node_id(id) {
            errors.push(err(&key, "spec.nodeId", e.to_string()));
        }
        if let Some(pk) = &node.spec.public_key {
            match sidenet_wire::PublicKey::from_base64(pk) {
                Ok(k) if k.node_id() != *id => errors.push(err(
                    &key,
                    "spec.publicKey",
                    format!("this key belongs to node {}, not {id}", k.node_id()),
                )),
                Ok(_) => {}
                Err(e) => errors.push(err(&key, "spec.publicKey", e.to_string())),
            }
        }
        if let Some(h) = &node.spec.overrides.hostname
            && names::check_node_id(h).is_err()
        {
            errors.push(err(&key, "spec.overrides.hostname", format!("{h:?} is not a valid hostname: lowercase letters, digits and '-', at most 63 characters")));
        }
        let Some(mesh) = set.mesh_of(node) else {
            let known: Vec<&str> = set.meshes.keys().map(String::as_str).collect();
            errors.push(err(
                &key,
                "spec.mesh",
                format!(
                    "no Mesh named {:?}; known: {}",
                    node.spec.mesh,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
            continue;
        };
        let profile = match &node.spec.hardware_profile {
            None => None,
            Some(p) => match set.profiles.get(p) {
                Some(p) => Some(p),
                None => {
                    errors.push(err(
                        &key,
                        "spec.hardwareProfile",
                        format!(
                            "no HardwareProfile named {p:?}; {}",
                            closest_profile(p, set)
                        ),
                    ));
                    continue;
                }
            },
        };
        let Some(profile) = profile else { continue };
        errors.extend(node_radio_errors(set, mesh, id, Some(node), profile));
        // The radio rule of OpenWrt routers, for fields that passed the checks above.
        for (field, message) in crate::spec::openwrt::check_node(mesh, profile, node) {
            if !errors.iter().any(|e| {
                e.object.as_deref() == Some(key.as_str()) && e.field.as_deref() == Some(field)
            }) {
                errors.push(err(&key, field, message));
            }
        }
    }

    for (name, np) in &set.provisions {
        let key = format!("NodeProvision/{name}");
        check_provision(set, np, &mut |field, message| {
            errors.push(err(&key, field, message))
        });
    }
}

/// References of a `NodeProvision`: its mesh, hardware profiles and credential Secrets must be
/// in the set, and its broker URL must be one the agents can use.
fn check_provision(set: &ManifestSet, np: &NodeProvision, report: &mut dyn FnMut(&str, String)) {
    let spec = &np.spec;
    if set.mesh_by_network(&spec.mesh).is_none() {
        let known: Vec<String> = set
            .meshes
            .values()
            .map(|m| network_name(m).to_string())
            .collect();
        report(
            "spec.mesh",
            format!(
                "no Mesh with network name {:?}; closest: {}",
                spec.mesh,
                closest(&spec.mesh, known.iter())
            ),
        );
    }
    if let Err(e) = sidenet_wire::topics::parse_broker_url(&spec.broker) {
        report("spec.broker", e);
    }
    let mut check_profile_ref = |field: &str, p: &Option<String>| {
        if let Some(p) = p
            && !set.profiles.contains_key(p)
        {
            report(
                field,
                format!(
                    "no HardwareProfile named {p:?}; {}",
                    closest_profile(p, set)
                ),
            );
        }
    };
    check_profile_ref(
        "spec.defaults.hardwareProfile",
        &spec.defaults.hardware_profile,
    );
    for (i, t) in spec.targets.iter().enumerate() {
        check_profile_ref(
            &format!("spec.targets[{i}].hardwareProfile"),
            &t.hardware_profile,
        );
    }
    let mut check_secret = |field: String, r: &Option<SecretKeyRef>| {
        let Some(r) = r else { return };
        match set.secrets.get(&r.name) {
            None => report(
                &field,
                format!(
                    "no Secret named {:?} in the manifests; closest: {}",
                    r.name,
                    closest(&r.name, set.secrets.keys())
                ),
            ),
            Some(data) if !data.contains_key(&r.key) => report(
                &format!("{field}.key"),
                format!(
                    "Secret {:?} has no key {:?}; it has: {}",
                    r.name,
                    r.key,
                    data.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ),
            Some(_) => {}
        }
    };
    let mut creds = vec![(
        "spec.defaults.credentials".to_string(),
        &spec.defaults.credentials,
    )];
    for (i, t) in spec.targets.iter().enumerate() {
        creds.push((format!("spec.targets[{i}].credentials"), &t.credentials));
    }
    for (field, c) in creds {
        let Some(c) = c else { continue };
        check_secret(
            format!("{field}.privateKeySecretRef"),
            &c.private_key_secret_ref,
        );
        check_secret(format!("{field}.passwordSecretRef"), &c.password_secret_ref);
    }
}

/// Semantic checks of a hardware profile.
fn check_profile(p: &HardwareProfileSpec, report: &mut dyn FnMut(&str, String)) {
    let mut names = BTreeSet::new();
    for (i, r) in p.radios.iter().enumerate() {
        if !names.insert(r.name.as_str()) {
            report(
                &format!("spec.radios[{i}].name"),
                format!("duplicate radio name {:?}", r.name),
            );
        }
        if r.bands.is_empty() {
            report(
                &format!("spec.radios[{i}].bands"),
                "a radio needs at least one band".into(),
            );
        }
        if r.channels.is_empty() {
            report(
                &format!("spec.radios[{i}].channels"),
                "a radio needs its list of supported channels".into(),
            );
        }
        if p.firmware == sidenet_crds::FirmwareFamily::Openwrt && r.path.is_none() {
            report(
                &format!("spec.radios[{i}].path"),
                "OpenWrt radios need their device path (option path in /etc/config/wireless)"
                    .into(),
            );
        }
    }
}

/// The radio problems of node `id` of `mesh` on `profile` ([`regdb::check_node`]: the channel
/// and width on its mesh radio, radar detection, its overrides), as errors on its MeshNode
/// document when there is one, else on the Mesh document. `validate` and the reconcile (before
/// rendering a node) both call this, so they give the same verdict.
pub fn node_radio_errors(
    set: &ManifestSet,
    mesh: &Mesh,
    id: &str,
    node: Option<&MeshNode>,
    profile: &HardwareProfile,
) -> Vec<ManifestError> {
    let at = |key: String, field: &str, message: String| {
        let src = set.sources.get(&key).cloned().unwrap_or(Source {
            file: PathBuf::new(),
            doc: 0,
        });
        ManifestError {
            file: src.file,
            doc: src.doc,
            line: None,
            object: Some(key),
            field: Some(field.to_string()),
            message,
        }
    };
    let radio_spec = &mesh.spec.radio;
    let band = radio_spec.mesh_band;
    let pname = profile.metadata.name.as_deref().unwrap_or_default();
    let radio = profile.spec.mesh_radio(band);
    let issues = match radio {
        Some(radio) => regdb::check_node(radio_spec, node.map(|n| &n.spec.overrides), pname, radio),
        None => Vec::new(),
    };
    if radio.is_some() && issues.is_empty() {
        return Vec::new();
    }
    let mesh_key = format!("Mesh/{}", mesh.metadata.name.clone().unwrap_or_default());
    let node_key =
        node.map(|n| format!("MeshNode/{}", n.metadata.name.clone().unwrap_or_default()));
    let mesh_field = |leaf: &str| format!("spec.radio.channels.{}.{leaf}", band.as_str());
    if radio.is_none() {
        let message = format!(
            "HardwareProfile/{pname} has no radio that can run an 802.11s mesh on {}",
            band.as_str()
        );
        return vec![match node_key {
            Some(k) => at(k, "spec.hardwareProfile", message),
            None => at(
                mesh_key,
                "spec.radio.meshBand",
                format!("node {id}: {message}"),
            ),
        }];
    }
    let chan = radio_spec.channels.get(band);
    issues
        .into_iter()
        .map(|i| match (i.about, &node_key) {
            (regdb::About::OverrideChannel, Some(k)) => {
                at(k.clone(), "spec.overrides.channel", i.message)
            }
            (regdb::About::OverrideTxPower, Some(k)) => {
                at(k.clone(), "spec.overrides.txPower", i.message)
            }
            (_, Some(k)) => at(
                k.clone(),
                "spec.hardwareProfile",
                format!(
                    "{} ({mesh_key} sets spec.radio.channels.{}: channel {}, width {} MHz)",
                    i.message,
                    band.as_str(),
                    chan.map_or(0, |c| c.channel),
                    chan.map_or(0, |c| c.width)
                ),
            ),
            (about, None) => at(
                mesh_key.clone(),
                &mesh_field(if about == regdb::About::MeshWidth {
                    "width"
                } else {
                    "channel"
                }),
                format!("node {id} (HardwareProfile/{pname}): {}", i.message),
            ),
        })
        .collect()
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

/// Whether `p` can be a mesh passphrase: SAE needs 8 to 63 characters, and the templates quote
/// it (no quotes, no newlines).
pub fn passphrase_ok(p: &str) -> bool {
    (8..=63).contains(&p.len()) && !p.contains(['\'', '\n', '"'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ula_checks() {
        assert!(parse_ula48("fd5e:1d0e:7a00::/48").is_ok());
        assert!(parse_ula48("2001:db8::/48").is_err());
        assert!(parse_ula48("fd00::/64").is_err());
        assert!(parse_ula48("fd00::1/48").is_err());
        assert!(parse_ula48("fd00::").is_err());
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

    #[test]
    fn closest_names() {
        let known = [
            "tplink-archer-c7-v2".to_string(),
            "glinet-gl-ar300m".to_string(),
        ];
        assert!(closest("tplink-archer-c7", known.iter()).starts_with("tplink-archer-c7-v2"));
    }
}
