//! The controller core: what nodes send (enrolment requests, status reports) and what admins
//! ask (approve, remove, tokens, names).

use std::collections::BTreeMap;

use sidenet_crds::EnrollmentMode;
use sidenet_wire::codec::sha256_hex;
use sidenet_wire::envelope::Expect;
use sidenet_wire::messages::StatusReport;
use sidenet_wire::topics::{self, Incoming};
use sidenet_wire::{Envelope, Kind, PublicKey, WireError};

use super::state::{Controller, CoreError};
use crate::reconcile::model::{MAX_FAILED_REVISIONS, Rejection};
use crate::reconcile::store::{Batch, TokenRecord};
use crate::spec::manifest::closest;

impl Controller {
    /// Handles a message from the broker.
    pub fn on_message(&mut self, topic: &str, payload: &[u8], now: u64) -> Result<(), CoreError> {
        self.current_mesh = topic.split('/').nth(2).unwrap_or_default().to_string();
        match topics::parse(topic) {
            Some(Incoming::Enroll { mesh, node }) => {
                let (mesh, node) = (mesh.to_string(), node.to_string());
                self.on_enroll(&mesh, &node, payload, now)
            }
            Some(Incoming::Status { mesh, node }) => {
                let (mesh, node) = (mesh.to_string(), node.to_string());
                self.on_status(&mesh, &node, payload, now)
            }
            Some(Incoming::Online { node, .. }) => {
                // Only for nodes the controller knows: anyone can publish presence for any id.
                if self.store.nodes.contains_key(node)
                    || self.set.nodes.contains_key(node)
                    || self.pending.get(node).is_some()
                {
                    self.online.insert(node.to_string(), payload == b"online");
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    pub(super) fn reject(&mut self, what: &str, node: &str, why: impl std::fmt::Display) {
        self.counters.rejected_messages += 1;
        tracing::warn!(node = %node, "refused {what}: {why}");
        // Bounded: an adapter that never drains this keeps only the latest refusals.
        if self.rejections.len() >= 256 {
            self.rejections.remove(0);
        }
        self.rejections.push(Rejection {
            what: what.to_string(),
            mesh: self.current_mesh.clone(),
            node: node.to_string(),
            why: why.to_string(),
        });
    }

    /// Forgets a node whose `MeshNode` was deleted (Kubernetes mode): its enrolment, published
    /// revision and subnet leave the in-memory state, so it is no longer reconciled, and its
    /// neighbours are reconciled without it. The state database is not changed (Kubernetes
    /// mode's database is a cache rebuilt from the cluster at every start).
    pub fn forget(&mut self, id: &str, now: u64) -> Result<(), CoreError> {
        let affected = self.drop_node(id);
        self.reconcile(&affected, now)
    }

    /// [`Controller::forget`] without reconciling: returns the nodes whose WireGuard
    /// neighbours change (the caller reconciles them, or plans them: `sidenetctl plan` in
    /// Kubernetes mode).
    pub fn drop_node(&mut self, id: &str) -> Vec<String> {
        if let Some(rec) = self.store.nodes.get(id) {
            self.credentials
                .push(crate::reconcile::credentials::Credential::Revoke {
                    mesh: rec.mesh.clone(),
                    node: id.to_string(),
                });
        }
        self.issued.remove(id);
        self.sealed.remove(id);
        self.awaiting_manifest.remove(id);
        self.store.nodes.remove(id);
        self.store.published.remove(id);
        let subnets: Vec<(String, String)> = self
            .store
            .subnets
            .keys()
            .filter(|(_, n)| n == id)
            .cloned()
            .collect();
        for key in subnets {
            if let Some(sid) = self.store.subnets.remove(&key)
                && let Some(t) = self.store.taken.get_mut(&key.0)
            {
                t.remove(&sid);
            }
        }
        self.blocked.remove(id);
        self.online.remove(id);
        let mut affected = self.peers.replace(id, None);
        affected.remove(id);
        affected.into_iter().collect()
    }

    /// Removes an enrolled node (standalone `sidenetctl remove`): its record is deleted, its
    /// broker credentials revoked, its retained config cleared; its revision counter stays, so
    /// if it enrols again (and is approved) its configs continue above what it runs. Returns
    /// the config topic to clear (`None` for a node that waited for approval, or was approved
    /// ahead: that is taken back, and it has no config).
    pub fn remove_node(&mut self, id: &str, now: u64) -> Result<Option<String>, CoreError> {
        let Some(rec) = self.store.nodes.get(id).cloned() else {
            if self.forget_unenrolled(id) {
                return Ok(None);
            }
            return Err(CoreError::Request(format!("node {id} is not enrolled")));
        };
        let mut batch = Batch::default();
        self.store.remove_node(&mut batch, id);
        self.batch.merge(batch);
        self.credentials
            .push(crate::reconcile::credentials::Credential::Revoke {
                mesh: rec.mesh.clone(),
                node: id.to_string(),
            });
        self.issued.remove(id);
        self.sealed.remove(id);
        self.blocked.remove(id);
        self.online.remove(id);
        tracing::info!(mesh = %rec.mesh, node = %id, "node removed");
        let mut affected = self.peers.replace(id, None);
        affected.remove(id);
        self.reconcile(&affected.into_iter().collect::<Vec<_>>(), now)?;
        Ok(Some(topics::config(&rec.mesh, id)))
    }

    pub(super) fn on_status(
        &mut self,
        mesh: &str,
        node: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<(), CoreError> {
        let Some(rec) = self.store.nodes.get(node).cloned() else {
            // Not enrolled: nothing to verify against.
            return Ok(());
        };
        let Ok(key) = PublicKey::from_base64(&rec.public_key) else {
            return Ok(());
        };
        let verified =
            match Envelope::parse(payload, 64 * 1024).and_then(|e| e.verify(Kind::Status, &key)) {
                Ok(v) => v,
                Err(e) => {
                    self.reject("status", node, e);
                    return Ok(());
                }
            };
        match verified.check(&Expect {
            mesh,
            node: Some(node),
            after: rec.last_seq,
            now,
        }) {
            Ok(()) => {}
            // Status reports are retained: after a restart the controller receives the last
            // report of every node again. The one it already processed, or one too old to
            // count, is expected, not an attack.
            Err(WireError::Stale { got, .. }) if Some(got) == rec.last_seq => return Ok(()),
            Err(e @ WireError::Expired { .. }) => {
                tracing::debug!(node = %node, "ignored status report: {e}");
                return Ok(());
            }
            Err(e) => {
                self.reject("status", node, e);
                return Ok(());
            }
        }
        let report: StatusReport = match verified.body_json() {
            Ok(r) => r,
            Err(e) => {
                self.reject("status", node, e);
                return Ok(());
            }
        };
        let mut rec = rec;
        rec.last_seen = Some(now);
        rec.last_seq = Some(verified.header.revision());
        rec.applied = report.applied;
        rec.applied_sha256 = report.applied_sha256.clone();
        rec.state = Some(report.state);
        if let Some(f) = &report.failure
            && let Some(r) = f.revision
            && !rec.failed_revisions.contains(&r)
        {
            rec.failed_revisions.push(r);
            // Only the newest matter (a failed body is withheld while it is the node's latest
            // revision); a node must not be able to grow its own record without bound.
            let excess = rec
                .failed_revisions
                .len()
                .saturating_sub(MAX_FAILED_REVISIONS);
            rec.failed_revisions.drain(..excess);
        }
        rec.failure = report.failure.clone();
        rec.agent_version = Some(report.agent_version.clone());
        rec.missing = report.missing.clone();
        rec.shaping = report.shaping.clone();
        rec.services = report.services.clone();
        rec.probes = report.probes.clone();
        rec.neighbours = report.neighbours.clone();
        let moved = report.wireguard.is_some() && report.wireguard != rec.wireguard;
        if moved {
            rec.wireguard = report.wireguard.clone();
        }
        if report.mqtt_auth && !rec.mqtt_armed && self.issued.contains_key(node) {
            // The node logs in with its own password: from now on the broker insists on it.
            rec.mqtt_armed = true;
            tracing::info!(node = %node, "node logs in to the broker with its own password: its id now needs it");
            self.credentials
                .push(crate::reconcile::credentials::Credential::Arm {
                    mesh: mesh.to_string(),
                    node: node.to_string(),
                });
        }
        self.online.insert(node.to_string(), true);
        let mut batch = Batch::default();
        self.store.put_node(&mut batch, node, rec);
        self.batch.merge(batch);
        if let Some(trial) = &report.trial
            && crate::reconcile::health::should_ack(
                self.store.published.get(node),
                self.store.epoch,
                trial,
            )
        {
            let key = self.mesh_key(mesh)?;
            let seq = verified.header.revision();
            self.outbox.push(crate::reconcile::health::ack(
                &key, mesh, node, seq, trial, now,
            ));
        }
        if moved {
            let affected = self.peers.replace(node, self.store.nodes.get(node));
            self.reconcile(&affected.into_iter().collect::<Vec<_>>(), now)?;
        }
        Ok(())
    }

    /// Forgets the enrolment tokens that expired at or before `now` (used or not), in memory
    /// now and in the state database at the next commit: their hashes.
    pub fn prune_tokens(&mut self, now: u64) -> Vec<String> {
        let mut batch = Batch::default();
        let gone = self.store.prune_tokens(&mut batch, now);
        self.batch.merge(batch);
        gone
    }

    /// Creates a single-use enrolment token for a mesh, valid for `ttl` seconds. Only its hash
    /// is stored (expired ones go at the same time: [`Controller::prune_tokens`]).
    pub fn create_token(
        &mut self,
        mesh: &str,
        token: &str,
        ttl: u64,
        now: u64,
    ) -> Result<EnrollmentMode, CoreError> {
        let Some(mode) = self
            .set
            .mesh_by_network(mesh)
            .map(|m| m.spec.enrollment.mode)
        else {
            return Err(CoreError::Request(format!("no mesh named {mesh}")));
        };
        let mut batch = Batch::default();
        self.store.prune_tokens(&mut batch, now);
        self.store.put_token(
            &mut batch,
            &sha256_hex(token.as_bytes()),
            TokenRecord {
                mesh: mesh.to_string(),
                created: now,
                expires: now.saturating_add(ttl),
                used_by: None,
            },
        );
        self.batch.merge(batch);
        Ok(mode)
    }

    /// A node id from what an admin typed: the node id, its MeshNode name, or its hostname (the
    /// one it reported at enrolment or the one its MeshNode sets), when that hostname names
    /// exactly one node. An ambiguous hostname gives the candidates.
    pub fn resolve(&self, who: &str) -> Result<String, CoreError> {
        if self.store.nodes.contains_key(who)
            || self.set.nodes.contains_key(who)
            || self.pending.get(who).is_some()
            || self.store.approvals.contains_key(who)
        {
            return Ok(who.to_string());
        }
        if let Some((id, _)) = self
            .set
            .nodes
            .iter()
            .find(|(_, n)| n.metadata.name.as_deref() == Some(who))
        {
            return Ok(id.clone());
        }
        let mut by_hostname: BTreeMap<&str, &str> = BTreeMap::new();
        for (id, rec) in &self.store.nodes {
            if rec.hostname == who {
                by_hostname.insert(id, &rec.mesh);
            }
        }
        for (id, p) in self.pending.iter() {
            if p.hostname == who {
                by_hostname.insert(id, &p.mesh);
            }
        }
        for (id, n) in &self.set.nodes {
            if n.spec.overrides.hostname.as_deref() == Some(who) {
                by_hostname.insert(id, &n.spec.mesh);
            }
        }
        match by_hostname.len() {
            1 => {
                return Ok(by_hostname
                    .keys()
                    .next()
                    .map(|id| id.to_string())
                    .unwrap_or_default());
            }
            0 => {}
            _ => {
                let list: Vec<String> = by_hostname
                    .iter()
                    .map(|(id, mesh)| format!("{id} (mesh {mesh})"))
                    .collect();
                return Err(CoreError::Request(format!(
                    "hostname {who:?} names {} nodes: {}; give the node id",
                    list.len(),
                    list.join(", ")
                )));
            }
        }
        let names: Vec<String> = self
            .store
            .nodes
            .iter()
            .flat_map(|(id, r)| [id.clone(), r.hostname.clone()])
            .chain(
                self.pending
                    .iter()
                    .flat_map(|(id, p)| [id.clone(), p.hostname.clone()]),
            )
            .chain(self.set.nodes.iter().flat_map(|(id, n)| {
                std::iter::once(id.clone())
                    .chain(n.metadata.name.clone())
                    .chain(n.spec.overrides.hostname.clone())
            }))
            .collect();
        Err(CoreError::Request(format!(
            "no node {who:?} (by id, MeshNode name or hostname); closest: {}",
            closest(who, names.iter())
        )))
    }
}
