//! `sidenetctl plan`: what a manifest set would publish, decided by the very code that
//! publishes ([`Controller::plan`], [`Controller::render_plans`], the same comparisons as
//! [`Controller::record`]), then undone: nothing is committed, published or kept.

use sidenet_wire::Kind;
use sidenet_wire::envelope::Envelope;
use sidenet_wire::messages::NodeConfig;

use super::state::{Controller, CoreError, NODE_MESSAGE_CAP};
use crate::reconcile::diff::{self, Action, BlockedNode, NodeChange, PlanReport};
use crate::reconcile::store::Batch;
use crate::spec::manifest::ManifestSet;

impl Controller {
    /// What putting `set` in force at `now` would publish, node by node, with the diff of each
    /// changed config against the one published now. The controller's state is as before when
    /// this returns (the only lasting effect: a mesh that is new in `set` gets its signing key
    /// and generated passphrase, as applying it would).
    pub fn plan_changes(&mut self, set: ManifestSet, now: u64) -> Result<PlanReport, CoreError> {
        let old_set = std::mem::replace(&mut self.set, set);
        let old_blocked = self.blocked.clone();
        let old_subnets = (self.store.subnets.clone(), self.store.taken.clone());
        let result = self.plan_changes_inner(&old_blocked, now);
        self.set = old_set;
        self.blocked = old_blocked;
        (self.store.subnets, self.store.taken) = old_subnets;
        result
    }

    fn plan_changes_inner(
        &mut self,
        old_blocked: &std::collections::BTreeMap<String, String>,
        now: u64,
    ) -> Result<PlanReport, CoreError> {
        let mut batch = Batch::default();
        let mut cache = super::plan::PlanCache::default();
        let mut plans = Vec::new();
        let mut report = PlanReport::default();
        for id in self.candidates() {
            self.blocked.remove(&id);
            if let Some(p) = self.plan(&id, now, &mut batch, &mut cache)? {
                plans.push(p);
                continue;
            }
            match self.blocked.get(&id).cloned() {
                Some(reason) => {
                    let new = old_blocked.get(&id) != Some(&reason);
                    report.blocked.push(BlockedNode {
                        node: id.clone(),
                        name: self.name_of(&id),
                        mesh: self.network_of(&id),
                        published: self.published_revision(&id),
                        reason,
                        new,
                    });
                    report.summary.blocked += 1;
                }
                None => report.summary.unchanged += 1,
            }
        }
        let results = self.render_plans(&plans, now);
        for (plan, result) in plans.into_iter().zip(results) {
            let rendered = match result {
                Ok(r) => r,
                Err(e) => {
                    report.blocked.push(BlockedNode {
                        node: plan.id.clone(),
                        name: self.name_of(&plan.id),
                        mesh: plan.net.clone(),
                        published: self.published_revision(&plan.id),
                        new: old_blocked.get(&plan.id) != Some(&e),
                        reason: e,
                    });
                    report.summary.blocked += 1;
                    continue;
                }
            };
            // The same tests as `record`: unchanged content, or content withheld because it
            // failed on the node, publishes nothing.
            let Some(envelope) = rendered.envelope else {
                report.summary.unchanged += 1;
                continue;
            };
            if crate::reconcile::health::withhold(
                plan.prev.as_ref(),
                self.store.nodes.get(&plan.id),
                &rendered.sha256,
            ) {
                report.summary.unchanged += 1;
                continue;
            }
            let new = config_of(&envelope)?;
            // A record without a digest only carries a revision counter (Kubernetes mode's
            // seed of a node that never had a config): the node gets its first config.
            let previous = plan
                .prev
                .as_ref()
                .filter(|p| !p.sha256.is_empty())
                .map(|p| p.revision);
            let old = match self.store.envelope(&plan.id)? {
                Some(bytes) if previous.is_some() => Some(config_of(&bytes)?),
                _ => None,
            };
            let mut secrets = plan.inputs.secrets();
            secrets.push(plan.mqtt_password.clone());
            let (fields, files, sealed) = diff::compare(old.as_ref(), &new, &secrets);
            let reason = if plan.refresh_due && fields.is_empty() && files.is_empty() {
                Some("signature renewal: half the config's validity has passed, or its signing key was rotated".to_string())
            } else if fields.is_empty() && files.is_empty() && !sealed.is_empty() {
                Some("secrets sealed again: a secret's value changed (mesh passphrase or broker password)".to_string())
            } else {
                None
            };
            let action = if previous.is_some() {
                report.summary.update += 1;
                Action::Update
            } else {
                report.summary.create += 1;
                Action::Create
            };
            report.changes.push(NodeChange {
                node: plan.id.clone(),
                name: self.name_of(&plan.id),
                mesh: plan.net.clone(),
                action,
                previous,
                revision: plan.revision,
                reason,
                fields,
                files,
                secrets: sealed,
            });
        }
        report.changes.sort_by(|a, b| a.node.cmp(&b.node));
        report.blocked.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(report)
    }

    /// The revision published to node `id`, if a config was (a record without a digest only
    /// carries a revision counter).
    fn published_revision(&self, id: &str) -> Option<sidenet_wire::Revision> {
        self.store
            .published
            .get(id)
            .filter(|p| !p.sha256.is_empty())
            .map(|p| p.revision)
    }

    /// Kubernetes mode with an external broker keeps only the digest of each node's published
    /// config (MeshNode `status.configSha256`), not the config. For every node with such a
    /// record and no stored envelope, this renders the config of the manifests in force
    /// (`self.set`) with the same code as a publish; when its body has the recorded digest, that
    /// body is the published one, and it is stored as the node's envelope (signed anew; the
    /// record, revision included, stays) for [`Controller::plan_changes`] to compare with.
    /// Returns the nodes whose render has another digest: their published content is unknown.
    /// Nothing else changes.
    pub fn adopt_published(&mut self, now: u64) -> Result<Vec<String>, CoreError> {
        let old_blocked = self.blocked.clone();
        let old_subnets = (self.store.subnets.clone(), self.store.taken.clone());
        let mut batch = Batch::default();
        let mut cache = super::plan::PlanCache::default();
        let mut plans = Vec::new();
        let mut unknown = Vec::new();
        for id in self.candidates() {
            let Some(p) = self.store.published.get(&id) else {
                continue;
            };
            if p.sha256.is_empty() || self.store.envelope(&id)?.is_some() {
                continue;
            }
            match self.plan(&id, now, &mut batch, &mut cache)? {
                Some(mut plan) => {
                    // Signed whatever the content: the body is what is compared.
                    plan.prev = None;
                    plans.push(plan);
                }
                None => unknown.push(id),
            }
        }
        let results = self.render_plans(&plans, now);
        let mut keep = Batch::default();
        for (plan, result) in plans.into_iter().zip(results) {
            let record = self.store.published.get(&plan.id).cloned();
            match (result, record) {
                (Ok(r), Some(rec)) if r.sha256 == rec.sha256 => match r.envelope {
                    Some(envelope) => self.store.put_published(&mut keep, &plan.id, rec, envelope),
                    None => unknown.push(plan.id),
                },
                _ => unknown.push(plan.id),
            }
        }
        self.store.commit(keep)?;
        self.blocked = old_blocked;
        (self.store.subnets, self.store.taken) = old_subnets;
        unknown.sort();
        Ok(unknown)
    }

    /// The MeshNode name of node `id`, if a manifest names it.
    fn name_of(&self, id: &str) -> Option<String> {
        self.set.nodes.get(id).and_then(|m| m.metadata.name.clone())
    }

    /// The network name of node `id`'s mesh (empty if unknown).
    fn network_of(&self, id: &str) -> String {
        self.mesh_for(id)
            .map(|m| crate::spec::manifest::network_name(&m).to_string())
            .or_else(|| self.store.nodes.get(id).map(|r| r.mesh.clone()))
            .unwrap_or_default()
    }
}

/// The config an envelope carries (the controller's own envelopes, from its store or just
/// sealed: checked against the key they name, only to reach the body).
fn config_of(bytes: &[u8]) -> Result<NodeConfig, CoreError> {
    Envelope::parse(bytes, NODE_MESSAGE_CAP.max(bytes.len()))
        .and_then(|e| e.verify(Kind::Config, &e.claimed_signer()?))
        .and_then(|v| v.body_json::<NodeConfig>())
        .map_err(|e| CoreError::Request(format!("a stored config is unreadable: {e}")))
}
