//! The controller core: deciding what each node should run, rendering and sealing it, and
//! recording what was published (one revision per content change).

use std::collections::BTreeMap;

use sidenet_crds::{HardwareProfile, Mesh, MeshNode, NodeRole};
use sidenet_wire::codec::sha256_hex;
use sidenet_wire::envelope::seal_hashed;
use sidenet_wire::keys::KeyPair;
use sidenet_wire::messages::NodeConfig;
use sidenet_wire::topics::{self};
use sidenet_wire::{Header, Kind, PublicKey, Revision};

use super::state::{Controller, CoreError};
use crate::reconcile::admission::approved;
use crate::reconcile::model::{
    DEFAULT_VALIDITY, MESH_PASSPHRASE, MESH_PASSPHRASE_NEXT, MQTT_PASSWORD, Publish,
};
use crate::reconcile::render::{self, NodeInputs, Renderer};
use crate::reconcile::store::{Batch, NodeRecord, Published};
use crate::spec::manifest::{ManifestSet, closest_profile, network_name};

/// What a node should get.
pub(super) enum Desired<'a> {
    Config { inputs: Box<NodeInputs<'a>> },
    Pending(String),
    Blocked(String),
}

impl Controller {
    /// Reconciles every node.
    pub fn reconcile_all(&mut self, now: u64) -> Result<(), CoreError> {
        // Every node is a candidate again: nothing stays deferred twice.
        self.deferred.clear();
        let ids = self.candidates();
        self.reconcile(&ids, now)
    }

    /// Reconciles at most `n` nodes per call from now on (`None`: every node at once, the
    /// default). The rest of a larger reconcile waits in [`Controller::has_deferred`] for
    /// [`Controller::reconcile_deferred`]: the adapter commits and publishes each chunk
    /// ([`Controller::flush`]) before rendering the next, so a mesh-wide change holds at most one
    /// chunk of signed envelopes in memory instead of one per node of the mesh.
    pub fn set_chunk(&mut self, n: Option<usize>) {
        self.chunk = n.map(|n| n.max(1));
    }

    /// Whether nodes of an earlier reconcile wait for [`Controller::reconcile_deferred`].
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Reconciles the next chunk of deferred nodes. Reconcile is level-triggered, so a node
    /// deferred while its inputs changed again is simply reconciled with the newer inputs.
    pub fn reconcile_deferred(&mut self, now: u64) -> Result<(), CoreError> {
        let n = self.chunk.unwrap_or(usize::MAX).min(self.deferred.len());
        let ids: Vec<String> = self.deferred.drain(..n).collect();
        self.reconcile_now(&ids, now)
    }

    /// Reconciles the given nodes; what to publish is handed out by [`Controller::flush`]. With
    /// a chunk size set ([`Controller::set_chunk`]), only the first chunk is reconciled now and
    /// the rest is deferred.
    pub fn reconcile(&mut self, ids: &[String], now: u64) -> Result<(), CoreError> {
        match self.chunk {
            Some(n) if ids.len() > n => {
                self.deferred.extend(ids[n..].iter().cloned());
                self.reconcile_now(&ids[..n], now)
            }
            _ => self.reconcile_now(ids, now),
        }
    }

    fn reconcile_now(&mut self, ids: &[String], now: u64) -> Result<(), CoreError> {
        self.reconcile_staged(ids, now) // holds back nodes of a staged rollout (staged.rs)
    }

    /// Three phases: plan each node (sequential: approval, profile, subnet, fingerprint), render
    /// and sign the ones whose inputs changed (in parallel, on every core), then record the new
    /// revisions (sequential).
    pub(super) fn reconcile_plain(&mut self, ids: &[String], now: u64) -> Result<(), CoreError> {
        let mut batch = Batch::default();
        let mut plans = Vec::new();
        let mut cache = PlanCache::default();
        for id in ids {
            match self.plan(id, now, &mut batch, &mut cache) {
                Ok(Some(p)) => plans.push(p),
                Ok(None) => {}
                Err(e) => {
                    self.batch.merge(batch);
                    return Err(e);
                }
            }
        }
        let results = self.render_plans(&plans, now);
        let before = self.counters.published;
        for (plan, result) in plans.into_iter().zip(results) {
            self.record(plan, result, now, &mut batch);
        }
        let published = self.counters.published - before;
        if published == 1 {
            if let Some(p) = self.outbox.last() {
                tracing::info!("publishing config {}", p.topic);
            }
        } else if published > 1 {
            tracing::info!("publishing {published} configs");
        }
        self.batch.merge(batch);
        Ok(())
    }

    /// Decides whether a node needs rendering. `None`: nothing to do (unchanged, pending or
    /// blocked, with the reason kept in `self.blocked`).
    pub(super) fn plan(
        &mut self,
        id: &str,
        now: u64,
        batch: &mut Batch,
        cache: &mut PlanCache,
    ) -> Result<Option<Plan>, CoreError> {
        let Some(mesh_name) = self.mesh_name_for(id) else {
            self.blocked
                .insert(id.to_string(), "its mesh is not in the manifests".into());
            return Ok(None);
        };
        let Some(mesh) = self.set.meshes.get(&mesh_name) else {
            return Ok(None);
        };
        let net = network_name(mesh).to_string();
        if !cache.meshes.contains_key(&mesh_name) {
            let pass = self.passphrases(&mesh_name, now);
            let key = self.mesh_key(&net);
            let mesh = self.set.meshes.get(&mesh_name).ok_or_else(|| {
                CoreError::Request(format!("mesh {mesh_name} vanished during reconcile"))
            })?;
            let fp = sha256_hex(
                &serde_json::to_vec(&(&mesh.metadata.name, &mesh.spec)).unwrap_or_default(),
            );
            let mqtt = self.secrets.mqtt_secret(&net);
            cache.meshes.insert(
                mesh_name.clone(),
                (pass, key.map_err(|e| e.to_string()), fp, mqtt),
            );
        }
        let Some((pass, key, mesh_fp, mqtt)) = cache.meshes.get(&mesh_name) else {
            return Ok(None);
        };
        let mqtt_secret = match mqtt {
            Ok(s) => *s,
            Err(e) => {
                self.blocked
                    .insert(id.to_string(), format!("broker secret: {e}"));
                return Ok(None);
            }
        };
        let (passphrase, passphrase_next) = match pass {
            Ok(p) => p.clone(),
            Err(e) => {
                self.blocked
                    .insert(id.to_string(), format!("mesh passphrase: {e}"));
                return Ok(None);
            }
        };
        let key = match key {
            Ok(k) => k.clone(),
            Err(e) => {
                self.blocked.insert(id.to_string(), e.clone());
                return Ok(None);
            }
        };
        let mesh_fp = mesh_fp.clone();
        // No subnet for a node nobody admitted (docs/security.md, "Enrolment floods").
        if let Some(m) = self.set.meshes.get(&mesh_name)
            && !approved(m, self.set.node(id), self.store.nodes.get(id))
        {
            self.blocked
                .insert(id.to_string(), super::enrol::pending_reason(id));
            return Ok(None);
        }
        let Some(subnet_id) = self.store.subnet(batch, &net, id) else {
            self.blocked.insert(
                id.to_string(),
                "the mesh prefix has no free /64 left".into(),
            );
            return Ok(None);
        };
        if !self.set.nodes.contains_key(id) && self.awaiting_manifest.contains(id) {
            // Its manifest is being created: rendered once, when it is in the set. (Before
            // the mesh-wide work below, which would cost O(nodes) for each such enrolment.)
            self.blocked.remove(id);
            return Ok(None);
        }
        if !cache.names.contains_key(&mesh_name)
            && let Some(mesh) = self.set.meshes.get(&mesh_name)
        {
            // Every admitted MeshNode of the mesh gets its /64 now, as its own plan would: the
            // names must not depend on the order nodes are planned in, nor change when a
            // declared node enrols.
            let admitted: Vec<String> = self
                .set
                .nodes
                .iter()
                .filter(|(nid, m)| {
                    self.set.mesh_of(m).map(network_name) == Some(net.as_str())
                        && approved(mesh, Some(m), self.store.nodes.get(*nid))
                })
                .map(|(nid, _)| nid.clone())
                .collect();
            for nid in &admitted {
                let _ = self.store.subnet(batch, &net, nid);
            }
            let names = crate::reconcile::peers::names(&self.store, &self.set, mesh);
            cache.names.insert(mesh_name.clone(), names);
        }
        let set = &self.set;
        let Some(mesh) = set.meshes.get(&mesh_name) else {
            return Ok(None);
        };
        let manifest = set.node(id);
        let rec = self.store.nodes.get(id);
        // Secrets are sealed to the node's own key: no config before the node enrolled.
        let recipient = match rec.map(|r| PublicKey::from_base64(&r.public_key)) {
            Some(Ok(k)) => k,
            Some(Err(e)) => {
                self.blocked
                    .insert(id.to_string(), format!("stored node key is unusable: {e}"));
                return Ok(None);
            }
            None => {
                self.blocked.insert(
                    id.to_string(),
                    "waiting for the node to enrol (its config carries the mesh passphrase sealed to the node's key)".into(),
                );
                return Ok(None);
            }
        };
        let mqtt_password = crate::reconcile::credentials::node_password(&mqtt_secret, &net, id);
        let seal_id = sha256_hex(
            format!(
                "{passphrase}\0{}\0{mqtt_password}\0{}",
                passphrase_next.as_deref().unwrap_or(""),
                recipient.to_base64()
            )
            .as_bytes(),
        );
        let sealed = self
            .sealed
            .get(id)
            .filter(|(k, _)| *k == seal_id)
            .map(|(_, s)| s.clone());
        let mut inputs = match decide(set, mesh, id, manifest, rec, subnet_id, &passphrase) {
            Desired::Config { inputs, .. } => inputs,
            Desired::Pending(r) | Desired::Blocked(r) => {
                self.blocked.insert(id.to_string(), r);
                return Ok(None);
            }
        };
        inputs.passphrase_next = passphrase_next.as_deref();
        let profile_name = inputs.profile.metadata.name.clone().unwrap_or_default();
        let profile_fp = cache
            .profiles
            .entry(profile_name.clone())
            .or_insert_with(|| {
                sha256_hex(&serde_json::to_vec(&inputs.profile.spec).unwrap_or_default())
            })
            .clone();
        let gateways = cache
            .gateways
            .entry(mesh_name.clone())
            .or_insert_with(|| crate::reconcile::peers::gateways(&self.store, set, mesh));
        let mut dataplane =
            crate::reconcile::peers::dataplane(&self.peers, &self.store, set, mesh, id, gateways);
        let services = cache
            .services
            .entry(mesh_name.clone())
            .or_insert_with(|| crate::reconcile::peers::services(&self.store, set, mesh));
        crate::reconcile::peers::with_services(&mut dataplane, services, mesh, id);
        dataplane.names = cache.names.get(&mesh_name).cloned().unwrap_or_default();
        dataplane.policy = if crate::spec::policy::compile::needs_members(mesh) {
            let located = cache
                .located
                .entry(mesh_name.clone())
                .or_insert_with(|| crate::reconcile::peers::located(&self.store, set, mesh));
            crate::spec::policy::compile::node_policy(mesh, located, id)
        } else {
            // The node alone: every member of the mesh, built for each reconcile of one node
            // (each enrolment), made a standalone storm O(nodes^2).
            let me = crate::reconcile::peers::located_node(&self.store, set, mesh, id);
            crate::spec::policy::compile::node_policy(mesh, &me, id)
        };
        let fingerprint = crate::reconcile::peers::fingerprint(
            fingerprint(
                &self.renderer.fingerprint,
                &mesh_fp,
                &profile_fp,
                &inputs,
                manifest,
            ),
            &dataplane,
        );
        let owned = OwnedInputs::from(&inputs, &mesh_name, &profile_name);
        let validity = validity(mesh);
        let prev = self.store.published.get(id).cloned();
        let signer = key.public().to_base64();
        let rotated = self
            .rotations
            .get(&net)
            .is_some_and(|r| !r.chain.is_empty());
        // Due for re-signing: half its validity passed, or signed by a key that was rotated out.
        let refresh_due = prev.as_ref().is_some_and(|p| {
            now >= p.iat + (p.exp.saturating_sub(p.iat)) / 2
                || match &p.signer {
                    Some(s) => *s != signer,
                    None => rotated,
                }
        });
        if let Some(p) = &prev
            && p.input == fingerprint
            && !refresh_due
            && p.revision.epoch == self.store.epoch
        {
            self.blocked.remove(id);
            return Ok(None);
        }
        let revision = match &prev {
            Some(p) if p.revision.epoch == self.store.epoch => Revision {
                epoch: self.store.epoch,
                rev: p.revision.rev + 1,
            },
            _ => Revision {
                epoch: self.store.epoch,
                rev: 1,
            },
        };
        Ok(Some(Plan {
            id: id.to_string(),
            net,
            inputs: owned,
            fingerprint,
            prev,
            refresh_due,
            revision,
            key,
            recipient,
            sealed,
            seal_id,
            mqtt_password,
            validity,
            dataplane,
        }))
    }

    /// Renders and signs every plan, spread over the available cores.
    pub(super) fn render_plans(&self, plans: &[Plan], now: u64) -> Vec<Result<Rendered, String>> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(plans.len().div_ceil(64))
            .max(1);
        let (renderer, set, epoch) = (&self.renderer, &self.set, self.store.epoch);
        let work = move |plans: &[Plan]| -> Vec<Result<Rendered, String>> {
            plans
                .iter()
                .map(|p| render_and_seal(renderer, set, p, epoch, now))
                .collect()
        };
        if threads == 1 {
            return work(plans);
        }
        let chunk = plans.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = plans
                .chunks(chunk)
                .map(|c| s.spawn(move || work(c)))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec![Err("render thread panicked".to_string())])
                })
                .collect()
        })
    }

    /// Records the outcome of one plan: blocked, unchanged, or a new revision to publish.
    pub(super) fn record(
        &mut self,
        plan: Plan,
        result: Result<Rendered, String>,
        now: u64,
        batch: &mut Batch,
    ) {
        let r = match result {
            Ok(r) => r,
            Err(e) => {
                self.blocked.insert(plan.id, e);
                return;
            }
        };
        self.counters.rendered += 1;
        self.blocked.remove(&plan.id);
        self.sealed
            .insert(plan.id.clone(), (plan.seal_id.clone(), r.sealed.clone()));
        if self.issued.get(&plan.id) != Some(&plan.mqtt_password) {
            self.issued
                .insert(plan.id.clone(), plan.mqtt_password.clone());
            self.credentials
                .push(crate::reconcile::credentials::Credential::Issue {
                    mesh: plan.net.clone(),
                    node: plan.id.clone(),
                    password: plan.mqtt_password.clone(),
                });
            // A node that logged in with it before (a record restored after a restart).
            if self.store.nodes.get(&plan.id).is_some_and(|r| r.mqtt_armed) {
                self.credentials
                    .push(crate::reconcile::credentials::Credential::Arm {
                        mesh: plan.net.clone(),
                        node: plan.id.clone(),
                    });
            }
        }
        if let Some(p) = &plan.prev
            && p.sha256 == r.sha256
            && !plan.refresh_due
            && p.revision.epoch == self.store.epoch
        {
            // Same content: remember the new fingerprint, publish nothing.
            let mut p = p.clone();
            p.input = plan.fingerprint;
            self.store.put_published_record(batch, &plan.id, p);
            return;
        }
        let Some(envelope) = r.envelope else {
            return;
        };
        if crate::reconcile::health::withhold(
            plan.prev.as_ref(),
            self.store.nodes.get(&plan.id),
            &r.sha256,
        ) {
            // This body failed on the node: no new revision until the config changes.
            return;
        }
        self.store.put_published(
            batch,
            &plan.id,
            Published {
                revision: plan.revision,
                sha256: r.sha256,
                input: plan.fingerprint,
                iat: now,
                exp: now.saturating_add(plan.validity),
                signer: Some(plan.key.public().to_base64()),
            },
            envelope.clone(),
        );
        self.counters.published += 1;
        tracing::debug!(mesh = %plan.net, node = %plan.id, rev = plan.revision.rev, "publishing config");
        self.outbox.push(Publish {
            topic: topics::config(&plan.net, &plan.id),
            payload: envelope,
            retain: true,
        });
    }
}

/// How long configs and announcements of `mesh` stay valid. Callers add it to the current time
/// with `saturating_add`: a huge `configValiditySeconds` means "never expires", not an expiry
/// that wraps around into the past (which would make every agent refuse every config).
pub(super) fn validity(mesh: &Mesh) -> u64 {
    mesh.spec
        .config_validity_seconds
        .unwrap_or(DEFAULT_VALIDITY)
        .max(60)
}

pub(super) fn profile_for<'a>(
    set: &'a ManifestSet,
    id: &str,
    manifest: Option<&MeshNode>,
    rec: Option<&NodeRecord>,
) -> Result<&'a HardwareProfile, String> {
    let wanted = manifest
        .and_then(|m| m.spec.hardware_profile.clone())
        .or_else(|| rec.and_then(|r| r.profile.clone()));
    if let Some(p) = wanted {
        return set.profiles.get(&p).ok_or_else(|| {
            format!(
                "no HardwareProfile named {p:?}; {}",
                closest_profile(&p, set)
            )
        });
    }
    match rec.and_then(|r| r.board.clone()) {
        Some(board) => set.profile_for_board(&board).ok_or_else(|| {
            format!(
                "board {board:?} has no profile; {}",
                closest_profile(&board, set)
            )
        }),
        None => Err(format!(
            "node {id} has no hardware profile: set spec.hardwareProfile in its MeshNode or start the agent with --profile"
        )),
    }
}

pub(super) fn decide<'a>(
    set: &'a ManifestSet,
    mesh: &'a Mesh,
    id: &'a str,
    manifest: Option<&'a MeshNode>,
    rec: Option<&'a NodeRecord>,
    subnet_id: u16,
    passphrase: &'a str,
) -> Desired<'a> {
    if !approved(mesh, manifest, rec) {
        return Desired::Pending(format!(
            "waiting for approval: `sidenetctl approve {id}` or a MeshNode with approved: true"
        ));
    }
    let profile = match profile_for(set, id, manifest, rec) {
        Ok(p) => p,
        Err(e) => return Desired::Blocked(e),
    };
    let radio = crate::spec::manifest::node_radio_errors(set, mesh, id, manifest, profile);
    if !radio.is_empty() {
        return Desired::Blocked(crate::spec::manifest::ManifestErrors(radio).to_string());
    }
    let spec = manifest.map(|m| &m.spec);
    Desired::Config {
        inputs: Box::new(NodeInputs {
            mesh,
            profile,
            id,
            name: manifest.and_then(|m| m.metadata.name.as_deref()),
            reported_hostname: rec.map(|r| r.hostname.as_str()),
            role: spec.map(|s| s.role).unwrap_or(NodeRole::Router),
            channel: spec.and_then(|s| s.overrides.channel),
            tx_power: spec.and_then(|s| s.overrides.tx_power),
            hostname: spec.and_then(|s| s.overrides.hostname.as_deref()),
            uplinks: spec.map(|s| s.overrides.uplinks.as_slice()).unwrap_or(&[]),
            subnet_id,
            passphrase,
            passphrase_next: None,
            labels: manifest.and_then(|m| m.metadata.labels.as_ref()),
        }),
    }
}

/// Renders the config for `inputs` (used by previews and `sidenetctl render`).
pub fn build_config(renderer: &Renderer, inputs: &NodeInputs<'_>) -> Result<NodeConfig, String> {
    build_config_with(renderer, inputs, None)
}

/// [`build_config`] with the node's WireGuard peers and gateways (else none).
pub fn build_config_with(
    renderer: &Renderer,
    inputs: &NodeInputs<'_>,
    dataplane: Option<crate::reconcile::peers::Dataplane>,
) -> Result<NodeConfig, String> {
    let mut ctx = render::context(inputs).map_err(|e| e.to_string())?;
    if let Some(dp) = dataplane {
        ctx.cache = crate::reconcile::cache::with_address(dp.cache.clone(), &ctx.node.address);
        ctx.dataplane = dp;
    }
    let family = inputs.profile.spec.firmware.as_str();
    let files = renderer.render(family, &ctx).map_err(|e| e.to_string())?;
    let mut actions: Vec<String> = Vec::new();
    for f in &files {
        for a in &f.actions {
            if !actions.contains(a) {
                actions.push(a.clone());
            }
        }
    }
    let mut requires = crate::reconcile::cache::requires(renderer.requirements(family), &ctx.cache);
    if !ctx.dataplane.policy.shaping.is_empty() {
        requires.extend(renderer.shaping_requirements(family));
    }
    Ok(NodeConfig {
        mesh: ctx.mesh.network_name.clone(),
        node: inputs.id.to_string(),
        hostname: ctx.node.hostname.clone(),
        role: ctx.node.role.clone(),
        profile: ctx.profile.name.clone(),
        family: family.to_string(),
        subnet: ctx.node.subnet.clone(),
        addresses: vec![format!("{}/{}", ctx.node.address, ctx.node.prefix_len)],
        files: files.into_iter().map(|f| f.file).collect(),
        actions,
        sealed: BTreeMap::new(),
        requires,
    })
}

pub(super) fn fingerprint(
    templates: &str,
    mesh_fp: &str,
    profile_fp: &str,
    inputs: &NodeInputs<'_>,
    manifest: Option<&MeshNode>,
) -> String {
    let doc = serde_json::json!({
        "templates": templates,
        "mesh": mesh_fp,
        "profile": profile_fp,
        "profileName": inputs.profile.metadata.name,
        "node": manifest.map(|m| &m.spec),
        "name": inputs.name,
        "reported": inputs.reported_hostname,
        "subnet": inputs.subnet_id,
        "passphrase": sha256_hex(inputs.passphrase.as_bytes()),
        "passphraseNext": inputs.passphrase_next.map(|p| sha256_hex(p.as_bytes())),
        "labels": inputs.labels,
    });
    sha256_hex(&serde_json::to_vec(&doc).unwrap_or_default())
}

type MeshMemo = (
    Result<(String, Option<String>), String>,
    Result<KeyPair, String>,
    String,
    Result<[u8; 32], String>,
);

/// Per-reconcile memo of what is the same for every node of a mesh or profile.
#[derive(Default)]
pub(super) struct PlanCache {
    /// Mesh name → (passphrase, signing key, fingerprint of the Mesh spec).
    meshes: BTreeMap<String, MeshMemo>,
    profiles: BTreeMap<String, String>,
    /// Mesh name → its gateways.
    gateways: BTreeMap<String, Vec<crate::reconcile::peers::GatewayCtx>>,
    /// Mesh name → the services its nodes publish.
    services: BTreeMap<String, Vec<crate::reconcile::peers::ServiceCtx>>,
    /// Mesh name → its names in DNS.
    names: BTreeMap<String, Vec<crate::reconcile::peers::HostName>>,
    /// Mesh name → its nodes with their /64s (the policy compiler's input).
    located: BTreeMap<String, Vec<crate::spec::policy::compile::Located>>,
}

/// [`NodeInputs`] without borrows, so plans outlive the borrow of the manifest set.
pub(super) struct OwnedInputs {
    mesh: String,
    profile: String,
    id: String,
    name: Option<String>,
    reported_hostname: Option<String>,
    role: NodeRole,
    channel: Option<u32>,
    tx_power: Option<u32>,
    hostname: Option<String>,
    uplinks: Vec<String>,
    subnet_id: u16,
    passphrase: String,
    passphrase_next: Option<String>,
    labels: Option<std::collections::BTreeMap<String, String>>,
}

impl OwnedInputs {
    /// The secrets these inputs carry (masked in plans).
    pub(super) fn secrets(&self) -> Vec<String> {
        let mut v = vec![self.passphrase.clone()];
        v.extend(self.passphrase_next.clone());
        v
    }

    fn from(i: &NodeInputs<'_>, mesh: &str, profile: &str) -> Self {
        Self {
            mesh: mesh.to_string(),
            profile: profile.to_string(),
            id: i.id.to_string(),
            name: i.name.map(str::to_string),
            reported_hostname: i.reported_hostname.map(str::to_string),
            role: i.role,
            channel: i.channel,
            tx_power: i.tx_power,
            hostname: i.hostname.map(str::to_string),
            uplinks: i.uplinks.to_vec(),
            subnet_id: i.subnet_id,
            passphrase: i.passphrase.to_string(),
            passphrase_next: i.passphrase_next.map(str::to_string),
            labels: i.labels.cloned(),
        }
    }

    fn borrow<'a>(&'a self, set: &'a ManifestSet) -> Option<NodeInputs<'a>> {
        Some(NodeInputs {
            mesh: set.meshes.get(&self.mesh)?,
            profile: set.profiles.get(&self.profile)?,
            id: &self.id,
            name: self.name.as_deref(),
            reported_hostname: self.reported_hostname.as_deref(),
            role: self.role,
            channel: self.channel,
            tx_power: self.tx_power,
            hostname: self.hostname.as_deref(),
            uplinks: &self.uplinks,
            subnet_id: self.subnet_id,
            passphrase: &self.passphrase,
            passphrase_next: self.passphrase_next.as_deref(),
            labels: self.labels.as_ref(),
        })
    }
}

/// A node whose inputs changed: to be rendered and, if its content changed, signed.
pub(super) struct Plan {
    pub(super) id: String,
    pub(super) net: String,
    pub(super) inputs: OwnedInputs,
    fingerprint: String,
    pub(super) prev: Option<Published>,
    pub(super) refresh_due: bool,
    pub(super) revision: Revision,
    key: KeyPair,
    /// The node's key, to seal secrets to.
    recipient: PublicKey,
    /// The secrets sealed to the node, when they were sealed before.
    sealed: Option<BTreeMap<String, String>>,
    /// What `sealed` was sealed from (passphrase, broker password and node key hash).
    seal_id: String,
    /// The node's broker password.
    pub(super) mqtt_password: String,
    validity: u64,
    dataplane: crate::reconcile::peers::Dataplane,
}

/// The result of rendering a plan.
pub(super) struct Rendered {
    pub(super) sha256: String,
    /// The sealed secrets the config carries (kept for the next render).
    sealed: BTreeMap<String, String>,
    /// `None` when the content did not change (nothing to sign).
    pub(super) envelope: Option<Vec<u8>>,
}

/// A config's JSON body, as signed. The buffer is sized for the files' contents up front (a
/// config is ~9 KB: growing from serde_json's default would reallocate about seven times).
pub fn config_body(config: &NodeConfig) -> serde_json::Result<Vec<u8>> {
    let estimate = 1024
        + config
            .files
            .iter()
            .map(|f| f.path.len() + f.content.len() + f.content.len() / 16 + 48)
            .sum::<usize>();
    let mut body = Vec::with_capacity(estimate);
    serde_json::to_writer(&mut body, config)?;
    Ok(body)
}

pub(super) fn render_and_seal(
    renderer: &Renderer,
    set: &ManifestSet,
    plan: &Plan,
    epoch: u64,
    now: u64,
) -> Result<Rendered, String> {
    let inputs = plan
        .inputs
        .borrow(set)
        .ok_or_else(|| "its mesh or profile vanished".to_string())?;
    let mut config = build_config_with(renderer, &inputs, Some(plan.dataplane.clone()))?;
    let sealed = match &plan.sealed {
        Some(s) => s.clone(),
        None => {
            let seal = |name: &str, secret: &str| {
                sidenet_wire::seal::seal(
                    &plan.key,
                    &plan.recipient,
                    sidenet_wire::seal::Context {
                        mesh: &plan.net,
                        node: &plan.id,
                        name,
                    },
                    secret.as_bytes(),
                )
            };
            let mut m = BTreeMap::from([
                (
                    MESH_PASSPHRASE.to_string(),
                    seal(MESH_PASSPHRASE, &plan.inputs.passphrase),
                ),
                (
                    MQTT_PASSWORD.to_string(),
                    seal(MQTT_PASSWORD, &plan.mqtt_password),
                ),
            ]);
            if let Some(next) = &plan.inputs.passphrase_next {
                m.insert(
                    MESH_PASSPHRASE_NEXT.to_string(),
                    seal(MESH_PASSPHRASE_NEXT, next),
                );
            }
            m
        }
    };
    config.sealed.extend(sealed.clone());
    let body = config_body(&config).map_err(|e| e.to_string())?;
    let digest = sidenet_wire::codec::sha256(&body);
    let sha256 = sidenet_wire::codec::hex(&digest);
    let unchanged = plan
        .prev
        .as_ref()
        .is_some_and(|p| p.sha256 == sha256 && !plan.refresh_due && p.revision.epoch == epoch);
    if unchanged {
        return Ok(Rendered {
            sha256,
            sealed,
            envelope: None,
        });
    }
    let header = Header {
        mesh: plan.net.clone(),
        node: Some(plan.id.clone()),
        epoch: plan.revision.epoch,
        rev: plan.revision.rev,
        iat: now,
        exp: now.saturating_add(plan.validity),
        len: 0,
        sha256: String::new(),
    };
    Ok(Rendered {
        sha256,
        sealed,
        envelope: Some(seal_hashed(Kind::Config, header, &body, &digest, &plan.key)),
    })
}
