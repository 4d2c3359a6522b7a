//! Mesh signing keys and passphrases in Secrets.
//!
//! The core asks for secrets synchronously ([`Secrets`]); Secrets are read asynchronously. So
//! the adapter loads them first ([`load_mesh_secrets`], on every Mesh reconcile) into a
//! [`SecretCache`], and [`KubeSecrets`] answers the core from that cache.
//!
//! - Signing key: Secret `<mesh>-signing-key` in the Mesh's namespace, key `signing.key` (the
//!   base64 seed, as in standalone's `keys/MESH.key`). Created when missing; on 409
//!   AlreadyExists (another pod won the race) read again. An existing Secret that does not hold
//!   a valid key is an error, never overwritten: replacing a mesh key would orphan every agent
//!   that pinned the old one.
//! - Passphrase: the Secret named by `spec.encryption.passphraseSecretRef`, created with a
//!   random passphrase when missing.
//!
//! Values are never logged or written to any custom resource.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use sidenet_crds::{Mesh, SecretKeyRef};
use sidenet_wire::keys::KeyPair;

use crate::random::random32;
use crate::reconcile::model::Secrets;
use crate::spec::manifest::{ManifestSet, network_name};

/// Key of the signing key within its Secret.
pub const SIGNING_KEY: &str = "signing.key";

/// Name of the signing key Secret of a Mesh.
pub fn signing_key_secret(mesh_name: &str) -> String {
    format!("{mesh_name}-signing-key")
}

/// What was loaded, by mesh network name and by (namespace, Secret, key).
#[derive(Debug, Default)]
pub struct SecretCache {
    keys: BTreeMap<String, Result<KeyPair, String>>,
    passphrases: BTreeMap<(String, String, String), Result<String, String>>,
    /// Network name → namespace of its Mesh (to look passphrases up).
    namespaces: BTreeMap<String, String>,
}

impl SecretCache {
    /// Records the outcome of [`load_mesh_secrets`]; true when anything changed.
    pub fn put(&mut self, mesh: &Mesh, loaded: Loaded) -> bool {
        let net = network_name(mesh).to_string();
        let ns = mesh.metadata.namespace.clone().unwrap_or_default();
        let r = &mesh.spec.encryption.passphrase_secret_ref;
        let pkey = (ns.clone(), r.name.clone(), r.key.clone());
        let same_key = match (self.keys.get(&net), &loaded.key) {
            (Some(Ok(a)), Ok(b)) => a.public() == b.public(),
            (Some(Err(a)), Err(b)) => a == b,
            _ => false,
        };
        let same_pass = self.passphrases.get(&pkey) == Some(&loaded.passphrase);
        let mut same_next = true;
        if let (Some(rot), Some(next)) = (&mesh.spec.encryption.rotation, loaded.next) {
            let r = &rot.next_passphrase_secret_ref;
            let nkey = (ns.clone(), r.name.clone(), r.key.clone());
            same_next = self.passphrases.get(&nkey) == Some(&next);
            self.passphrases.insert(nkey, next);
        }
        self.namespaces.insert(net.clone(), ns);
        self.keys.insert(net, loaded.key);
        self.passphrases.insert(pkey, loaded.passphrase);
        !(same_key && same_pass && same_next)
    }

    /// The public key of a mesh, if its signing key is loaded.
    pub fn public_key(&self, net: &str) -> Option<String> {
        match self.keys.get(net) {
            Some(Ok(k)) => Some(k.public().to_base64()),
            _ => None,
        }
    }
}

/// The core's view of the cache.
#[derive(Debug, Clone, Default)]
pub struct KubeSecrets(pub Arc<Mutex<SecretCache>>);

impl Secrets for KubeSecrets {
    fn mesh_key(&mut self, network: &str) -> Result<KeyPair, String> {
        let cache = self
            .0
            .lock()
            .map_err(|_| "secret cache poisoned".to_string())?;
        match cache.keys.get(network) {
            Some(r) => r.clone(),
            None => Err(format!(
                "the signing key Secret of mesh {network} has not been read yet"
            )),
        }
    }

    fn passphrase(&mut self, set: &ManifestSet, r: &SecretKeyRef) -> Result<String, String> {
        let cache = self
            .0
            .lock()
            .map_err(|_| "secret cache poisoned".to_string())?;
        // The Secret lives in the namespace of the Mesh that references it.
        let ns = set
            .meshes
            .values()
            .find(|m| {
                m.spec.encryption.passphrase_secret_ref == *r
                    || m.spec
                        .encryption
                        .rotation
                        .as_ref()
                        .is_some_and(|rot| rot.next_passphrase_secret_ref == *r)
            })
            .and_then(|m| cache.namespaces.get(network_name(m)))
            .cloned()
            .unwrap_or_default();
        match cache
            .passphrases
            .get(&(ns.clone(), r.name.clone(), r.key.clone()))
        {
            Some(v) => v.clone(),
            None => Err(format!("Secret {ns}/{} has not been read yet", r.name)),
        }
    }
}

/// A Mesh's secrets as read from the cluster.
#[derive(Debug)]
pub struct Loaded {
    /// The signing key, or what is wrong with its Secret.
    pub key: Result<KeyPair, String>,
    /// The passphrase, or what is wrong with its Secret.
    pub passphrase: Result<String, String>,
    /// During a scheduled rotation, the next passphrase (never created: the admin provides it).
    pub next: Option<Result<String, String>>,
}

fn labels(mesh: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            "sidenet-controller".to_string(),
        ),
        ("sidenet.io/mesh".to_string(), mesh.to_string()),
    ])
}

/// Gets Secret `name`, creating it with `make()` when missing (on 409, another pod created it
/// first: get it again).
async fn get_or_create(
    api: &Api<Secret>,
    name: &str,
    mesh: &str,
    make: impl FnOnce() -> Result<BTreeMap<String, ByteString>, String>,
) -> Result<(Secret, bool), String> {
    let ns = api_ns(api);
    match api.get_opt(name).await {
        Ok(Some(s)) => return Ok((s, false)),
        Ok(None) => {}
        Err(e) => return Err(format!("cannot read Secret {ns}/{name}: {e}")),
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels(mesh)),
            ..Default::default()
        },
        data: Some(make()?),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(s) => Ok((s, true)),
        Err(kube::Error::Api(s)) if s.code == 409 => api
            .get(name)
            .await
            .map(|s| (s, false))
            .map_err(|e| format!("cannot read Secret {ns}/{name}: {e}")),
        Err(e) => Err(format!("cannot create Secret {ns}/{name}: {e}")),
    }
}

fn api_ns(api: &Api<Secret>) -> String {
    api.resource_url()
        .split("/namespaces/")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or_default()
        .to_string()
}

fn value(s: &Secret, key: &str) -> Option<Vec<u8>> {
    if let Some(v) = s.data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.0.clone());
    }
    s.string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.as_bytes().to_vec())
}

/// The passphrase under `r.key` of Secret `s` (namespace `ns`), which `field` of Mesh `mesh`
/// names.
pub(crate) fn passphrase_in(
    s: &Secret,
    ns: &str,
    r: &SecretKeyRef,
    field: &str,
    mesh: &str,
) -> Result<String, String> {
    match value(s, &r.key).map(String::from_utf8) {
        None => Err(format!(
            "Secret {ns}/{} has no key {:?} ({field}.key of Mesh {ns}/{mesh})",
            r.name, r.key
        )),
        Some(Ok(p)) if crate::spec::manifest::passphrase_ok(&p) => Ok(p),
        Some(_) => Err(format!(
            "the passphrase in Secret {ns}/{} key {:?} must be 8 to 63 characters without quotes or newlines",
            r.name, r.key
        )),
    }
}

/// The signing key Secret `s` (`ns/key_name`) holds.
pub(crate) fn signing_key_in(s: &Secret, ns: &str, key_name: &str) -> Result<KeyPair, String> {
    match value(s, SIGNING_KEY) {
        None => Err(format!(
            "Secret {ns}/{key_name} has no key {SIGNING_KEY:?} (expected the base64 ed25519 seed); fix or delete the Secret"
        )),
        Some(bytes) => String::from_utf8(bytes)
            .map_err(|_| "not UTF-8".to_string())
            .and_then(|t| KeyPair::from_file_text(&t).map_err(|e| e.to_string()))
            .map_err(|e| format!("Secret {ns}/{key_name} key {SIGNING_KEY:?}: {e}")),
    }
}

/// Reads (creating when missing) the signing key and passphrase Secrets of `mesh`.
pub async fn load_mesh_secrets(client: &Client, mesh: &Mesh) -> Loaded {
    let name = mesh.metadata.name.clone().unwrap_or_default();
    let ns = mesh.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);

    let key_name = signing_key_secret(&name);
    let key = match get_or_create(&api, &key_name, &name, || {
        let key = KeyPair::from_seed(&random32()?);
        Ok(BTreeMap::from([(
            SIGNING_KEY.to_string(),
            ByteString(key.to_file_text().into_bytes()),
        )]))
    })
    .await
    {
        Err(e) => Err(e),
        Ok((s, created)) => signing_key_in(&s, &ns, &key_name).inspect(|k| {
            if created {
                tracing::info!(mesh = %name, key = %k.public(), "created mesh signing key Secret {ns}/{key_name}");
            }
        }),
    };

    let r = &mesh.spec.encryption.passphrase_secret_ref;
    let passphrase = match get_or_create(&api, &r.name, &name, || {
        let pass = sidenet_wire::codec::base32(&random32()?[..20]);
        Ok(BTreeMap::from([(
            r.key.clone(),
            ByteString(pass.into_bytes()),
        )]))
    })
    .await
    {
        Err(e) => Err(e),
        Ok((s, created)) => {
            if created {
                tracing::info!(mesh = %name, "generated the mesh passphrase in Secret {ns}/{}", r.name);
            }
            passphrase_in(&s, &ns, r, "spec.encryption.passphraseSecretRef", &name)
        }
    };
    let next = match &mesh.spec.encryption.rotation {
        None => None,
        Some(rot) => {
            let r = &rot.next_passphrase_secret_ref;
            Some(match api.get_opt(&r.name).await {
                Err(e) => Err(format!("cannot read Secret {ns}/{}: {e}", r.name)),
                Ok(None) => Err(format!(
                    "Secret {ns}/{} (spec.encryption.rotation.nextPassphraseSecretRef of Mesh {ns}/{name}) does not exist",
                    r.name
                )),
                Ok(Some(s)) => passphrase_in(
                    &s,
                    &ns,
                    r,
                    "spec.encryption.rotation.nextPassphraseSecretRef",
                    &name,
                ),
            })
        }
    };
    Loaded {
        key,
        passphrase,
        next,
    }
}
