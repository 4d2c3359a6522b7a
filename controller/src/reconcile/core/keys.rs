//! The controller core: mesh signing keys and their rotation, passphrases, announcements and
//! per-node broker credentials.

use std::collections::BTreeMap;

use sidenet_crds::Mesh;
use sidenet_wire::envelope::seal;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::Announce;
use sidenet_wire::topics::{self};
use sidenet_wire::{Header, Kind, PublicKey};

use super::plan::validity;
use super::state::{Controller, CoreError};
use crate::reconcile::model::Publish;
use crate::spec::manifest::network_name;

impl Controller {
    /// The passphrases a mesh's configs carry at `now`: the one its mesh point uses, and during
    /// a scheduled rotation's overlap (before `switchAt`) the next one, for a second mesh point.
    pub(super) fn passphrases(
        &mut self,
        mesh_name: &str,
        now: u64,
    ) -> Result<(String, Option<String>), String> {
        let mesh = self
            .set
            .meshes
            .get(mesh_name)
            .ok_or_else(|| format!("mesh {mesh_name} is not in the manifests"))?;
        let current_ref = mesh.spec.encryption.passphrase_secret_ref.clone();
        let rotation = mesh.spec.encryption.rotation.clone();
        let current = self.secrets.passphrase(&self.set, &current_ref)?;
        let Some(rot) = rotation else {
            return Ok((current, None));
        };
        let switch_at = crate::parse_rfc3339(&rot.switch_at).ok_or_else(|| {
            format!(
                "spec.encryption.rotation.switchAt {:?} is not an RFC 3339 UTC time",
                rot.switch_at
            )
        })?;
        let next = self
            .secrets
            .passphrase(&self.set, &rot.next_passphrase_secret_ref)
            .map_err(|e| format!("next passphrase: {e}"))?;
        if next == current {
            return Ok((current, None));
        }
        Ok(if now >= switch_at {
            (next, None)
        } else {
            (current, Some(next))
        })
    }

    /// The earliest passphrase switch still to come, if any (the driver reconciles then).
    pub fn next_switch(&self, now: u64) -> Option<u64> {
        self.set
            .meshes
            .values()
            .filter_map(|m| m.spec.encryption.rotation.as_ref())
            .filter_map(|r| crate::parse_rfc3339(&r.switch_at))
            .filter(|t| *t > now)
            .min()
    }

    /// Broker credential changes since the last call: passwords issued with configs, nodes that
    /// now log in with theirs, nodes removed. Take them after [`Self::flush`] (they describe
    /// committed state) and hand them to the broker ([`crate::transport::acl::CredentialBook`] or an
    /// external broker's user store).
    pub fn take_credentials(&mut self) -> Vec<crate::reconcile::credentials::Credential> {
        std::mem::take(&mut self.credentials)
    }

    /// Every enrolled node's credentials as changes (for a broker starting empty): its
    /// password, and `Arm` for nodes that log in with it. Nodes of meshes whose secret cannot
    /// be had are left out (their nodes connect as enrolling nodes until it can).
    pub fn credential_snapshot(&mut self) -> Vec<crate::reconcile::credentials::Credential> {
        use crate::reconcile::credentials::Credential;
        let mut secrets: BTreeMap<String, Option<[u8; 32]>> = BTreeMap::new();
        let mut out = Vec::new();
        let nodes: Vec<(String, String, bool)> = self
            .store
            .nodes
            .iter()
            .filter(|(id, _)| self.store.published.contains_key(*id))
            .map(|(id, r)| (id.clone(), r.mesh.clone(), r.mqtt_armed))
            .collect();
        for (id, mesh, armed) in nodes {
            let secret = *secrets.entry(mesh.clone()).or_insert_with(|| {
                self.secrets
                    .mqtt_secret(&mesh)
                    .map_err(|e| tracing::warn!(mesh = %mesh, "broker secret: {e}"))
                    .ok()
            });
            let Some(secret) = secret else { continue };
            let password = crate::reconcile::credentials::node_password(&secret, &mesh, &id);
            self.issued.insert(id.clone(), password.clone());
            out.push(Credential::Issue {
                mesh: mesh.clone(),
                node: id.clone(),
                password,
            });
            if armed {
                out.push(Credential::Arm { mesh, node: id });
            }
        }
        out
    }

    /// The signing key of a mesh (network name).
    pub fn mesh_key(&mut self, network: &str) -> Result<KeyPair, CoreError> {
        if let Some(k) = self.keys.get(network) {
            return Ok(k.clone());
        }
        let k = self
            .secrets
            .mesh_key(network)
            .map_err(|e| CoreError::Request(format!("signing key of mesh {network}: {e}")))?;
        let r = self
            .secrets
            .rotation(network)
            .map_err(|e| CoreError::Request(format!("key rotations of mesh {network}: {e}")))?;
        self.keys.insert(network.to_string(), k.clone());
        self.rotations.insert(network.to_string(), r);
        Ok(k)
    }

    /// Rotates the signing key of mesh `network` to the key of `seed`: the old key endorses the
    /// new one, agents learn it from the next announcement (which carries every endorsement
    /// since the first key) and accept configs of the old key for `overlap` more seconds. Every
    /// node gets its config again, signed by the new key, under a new revision. Returns the new
    /// public key.
    pub fn rotate_key(
        &mut self,
        network: &str,
        seed: &[u8; 32],
        overlap: u64,
        now: u64,
    ) -> Result<PublicKey, CoreError> {
        if self.set.mesh_by_network(network).is_none() {
            return Err(CoreError::Request(format!("no mesh named {network}")));
        }
        let old = self.mesh_key(network)?;
        let new = KeyPair::from_seed(seed);
        let mut rotation = self.rotations.get(network).cloned().unwrap_or_default();
        rotation.chain.push(sidenet_wire::rotation::endorse(
            &old,
            network,
            &new.public(),
            now,
        ));
        rotation.previous_until = Some(now.saturating_add(overlap));
        self.secrets
            .rotate_mesh_key(network, &new, &rotation)
            .map_err(|e| CoreError::Request(format!("rotating the key of mesh {network}: {e}")))?;
        tracing::info!(
            mesh = %network,
            old = %old.public().fingerprint(),
            new = %new.public().fingerprint(),
            overlap_s = overlap,
            "mesh signing key rotated"
        );
        self.keys.insert(network.to_string(), new.clone());
        self.rotations.insert(network.to_string(), rotation);
        // The announcement first, so agents pin the new key before its configs arrive.
        let ann = self.announcements(now)?;
        self.outbox.extend(ann);
        let ids: Vec<String> = self
            .store
            .nodes
            .iter()
            .filter(|(_, r)| r.mesh == network)
            .map(|(id, _)| id.clone())
            .chain(
                self.set
                    .nodes
                    .iter()
                    .filter(|(_, n)| {
                        self.set
                            .mesh_of(n)
                            .is_some_and(|m| network_name(m) == network)
                    })
                    .map(|(id, _)| id.clone()),
            )
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        self.reconcile(&ids, now)?;
        Ok(new.public())
    }

    /// Signed, retained announcements of every mesh.
    pub fn announcements(&mut self, now: u64) -> Result<Vec<Publish>, CoreError> {
        let meshes: Vec<Mesh> = self.set.meshes.values().cloned().collect();
        let mut out = Vec::new();
        for mesh in meshes {
            let net = network_name(&mesh).to_string();
            // A mesh without a usable key is not announced; its nodes show why they are
            // blocked. The other meshes carry on.
            let key = match self.mesh_key(&net) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!("{e}; mesh {net} is not announced");
                    continue;
                }
            };
            let body = Announce {
                mesh: net.clone(),
                key: key.public().to_base64(),
                enrollment: mesh.spec.enrollment.mode.as_str().into(),
                prefix: mesh.spec.prefix.clone(),
                controller: self.version.clone(),
                acks: true,
                chain: self
                    .rotations
                    .get(&net)
                    .map(|r| r.chain.clone())
                    .unwrap_or_default(),
                previous_until: self.rotations.get(&net).and_then(|r| r.previous_until),
            };
            let header = Header {
                mesh: net.clone(),
                node: None,
                epoch: self.store.epoch,
                rev: 0,
                iat: now,
                exp: now.saturating_add(validity(&mesh)),
                len: 0,
                sha256: String::new(),
            };
            let payload = seal(
                Kind::Announce,
                header,
                &serde_json::to_vec(&body).unwrap_or_default(),
                &key,
            );
            for topic in topics::announce_all(&net) {
                out.push(Publish {
                    topic,
                    payload: payload.clone(),
                    retain: true,
                });
            }
        }
        Ok(out)
    }
}
