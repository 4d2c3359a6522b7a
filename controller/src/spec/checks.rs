//! The checks of a manifest set as a whole: references between objects, names, prefixes and
//! address capacity, regulatory rules (through [`regdb`]) and the OpenWrt guest rules (through
//! [`crate::spec::openwrt`]). Every error names the file, the document, the object and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;
use std::path::PathBuf;

use sidenet_crds::{
    HardwareProfile, HardwareProfileSpec, Mesh, MeshNode, NodeProvision, PolicyType, SecretKeyRef,
};
use sidenet_wire::names;

use crate::spec::parse::check_object_name;
use crate::spec::regdb;
use crate::spec::set::{
    ManifestError, ManifestSet, Source, closest, closest_profile, network_name,
};

/// Checks a mesh prefix: an IPv6 ULA (fc00::/7) /48. Returns the network address.
pub fn parse_ula48(prefix: &str) -> Result<Ipv6Addr, String> {
    if prefix.trim() != prefix {
        return Err(format!(
            "{prefix:?} has spaces around it; write {:?}",
            prefix.trim()
        ));
    }
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
            "{prefix} has host bits set (a /48 ends after its third group); expected {}/48",
            Ipv6Addr::new(seg[0], seg[1], seg[2], 0, 0, 0, 0, 0)
        ));
    }
    Ok(addr)
}

/// Checks `set` as a whole, adding what is wrong to `errors`.
pub(crate) fn check_set(set: &ManifestSet, errors: &mut Vec<ManifestError>) {
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

    // Where an object was defined, for "already used by" messages: the one defined later (by
    // file and document) is the one reported.
    let place = |key: &str| {
        set.sources
            .get(key)
            .map(|s| (s.file.clone(), s.doc))
            .unwrap_or_default()
    };
    let at = |key: &str| {
        set.sources
            .get(key)
            .map(|s| format!(" ({} document {})", s.file.display(), s.doc))
            .unwrap_or_default()
    };
    let mut meshes: Vec<(&String, &Mesh)> = set.meshes.iter().collect();
    meshes.sort_by_key(|(name, _)| place(&format!("Mesh/{name}")));
    let mut networks: BTreeMap<&str, &str> = BTreeMap::new();
    let mut prefixes: BTreeMap<Ipv6Addr, &str> = BTreeMap::new();
    for (name, mesh) in meshes {
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
                format!(
                    "network name {net:?} is already used by Mesh/{other}{}",
                    at(&format!("Mesh/{other}"))
                ),
            ));
        }
        match parse_ula48(&mesh.spec.prefix) {
            Err(e) => errors.push(err(&key, "spec.prefix", e)),
            Ok(base) => {
                if let Some(other) = prefixes.insert(base, name) {
                    errors.push(err(
                        &key,
                        "spec.prefix",
                        format!(
                            "{} is already the prefix of Mesh/{other}{}; each mesh needs a /48 of its own (pick a random fdXX:XXXX:XXXX::/48)",
                            mesh.spec.prefix,
                            at(&format!("Mesh/{other}"))
                        ),
                    ));
                }
            }
        }
        if let Some(v) = mesh.spec.config_validity_seconds
            && v < MIN_CONFIG_VALIDITY
        {
            errors.push(err(
                &key,
                "spec.configValiditySeconds",
                format!(
                    "{v} is too short; expected at least {MIN_CONFIG_VALIDITY} seconds (configs are re-signed when half their validity has passed, checked once a minute), or leave it out for 30 days"
                ),
            ));
        }
        for (field, message) in crate::spec::rollout::check(set, mesh) {
            errors.push(err(&key, &field, message));
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
        for (field, message) in crate::spec::policy::check::check_mesh(set, name, mesh) {
            errors.push(err(&key, &field, message));
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

    // Hostname overrides name one node each in a mesh.
    let mut by_place: Vec<(String, &MeshNode)> = set
        .nodes
        .values()
        .map(|n| {
            (
                format!(
                    "MeshNode/{}",
                    n.metadata.name.as_deref().unwrap_or_default()
                ),
                &**n,
            )
        })
        .collect();
    by_place.sort_by_key(|(key, _)| place(key));
    let mut hostnames: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for (key, node) in &by_place {
        let Some(h) = &node.spec.overrides.hostname else {
            continue;
        };
        if names::check_node_id(h).is_err() {
            continue;
        }
        if let Some(other) = hostnames.insert((node.spec.mesh.as_str(), h.as_str()), key) {
            errors.push(err(
                key,
                "spec.overrides.hostname",
                format!(
                    "{h:?} is already the hostname of {other}{} in mesh {:?}; a hostname names one node",
                    at(other),
                    node.spec.mesh
                ),
            ));
        }
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
        for (i, u) in node.spec.overrides.uplinks.iter().enumerate() {
            let valid = !u.is_empty()
                && u.len() <= 15
                && u.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid {
                errors.push(err(
                    &key,
                    &format!("spec.overrides.uplinks[{i}]"),
                    format!("{u:?} is not a Linux interface name: 1 to 15 letters, digits, '-', '_' or '.', starting with a letter or digit"),
                ));
            }
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

    // The neighbourhood web cache's settings (docs/content.md).
    for (key, field, message) in crate::spec::cache::check(set) {
        errors.push(err(&key, &field, message));
    }
    // Published services and the handover thresholds (docs/dataplane.md, "Handover").
    for (key, field, message) in crate::spec::services::check(set) {
        errors.push(err(&key, &field, message));
    }
    // Names in DNS (docs/dataplane.md, "Names").
    for (key, field, message) in crate::spec::names::check(set) {
        errors.push(err(&key, &field, message));
    }

    for (name, np) in &set.provisions {
        let key = format!("NodeProvision/{name}");
        check_provision(set, np, &mut |field, message| {
            errors.push(err(&key, field, message))
        });
    }
}

/// Shortest `configValiditySeconds` accepted.
pub const MIN_CONFIG_VALIDITY: u64 = 300;

/// What is wrong with `n` in the `nodes` of a policy of Mesh `mesh`, if anything: it must be the
/// name or node id of a MeshNode of that mesh, or the node id of a node enrolled without one.
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
    let mut hosts: BTreeMap<(String, u16), usize> = BTreeMap::new();
    for (i, t) in spec.targets.iter().enumerate() {
        let port = t.port.or(spec.defaults.port).unwrap_or(22);
        let host = t.host.trim().to_ascii_lowercase();
        if let Some(first) = hosts.insert((host, port), i) {
            report(
                &format!("spec.targets[{i}].host"),
                format!(
                    "{}:{port} is already spec.targets[{first}]; list each host once",
                    t.host
                ),
            );
        }
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
}
