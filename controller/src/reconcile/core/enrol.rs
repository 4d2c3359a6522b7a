//! The controller core: enrolment requests, the nodes waiting for approval, and approvals.
//!
//! Who is admitted at the moment a node asks ([`crate::reconcile::admission`]) gets a durable
//! record with `approved` set, so a mesh switched from `auto` to `approval` keeps every node it
//! admitted. In `approval` mode a node nobody approved yet gets no record and no subnet: it
//! waits in memory ([`crate::reconcile::pending`]), bounded and rate-limited per mesh, until an
//! admin approves it.

use sidenet_crds::EnrollmentMode;
use sidenet_wire::codec::sha256_hex;
use sidenet_wire::envelope::Expect;
use sidenet_wire::messages::EnrollRequest;
use sidenet_wire::{Envelope, Kind};

use super::state::{Controller, CoreError, NODE_MESSAGE_MAX_AGE};
use crate::reconcile::pending::{Limits, Offer, PendingNode};
use crate::reconcile::store::{Batch, NodeRecord};

/// What `approve` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// The node (waiting, or enrolled) is admitted now.
    Admitted(String),
    /// The node has not asked to join (or is not listed): it will be admitted when it does.
    Ahead(String),
}

impl Approval {
    /// The node id.
    pub fn node(&self) -> &str {
        match self {
            Approval::Admitted(id) | Approval::Ahead(id) => id,
        }
    }
}

/// Whether `s` has the shape of a node id (16 characters of lowercase base32).
fn looks_like_node_id(s: &str) -> bool {
    s.len() == 16
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c))
}

impl Controller {
    /// Changes the bounds of the waiting lists.
    pub fn set_pending_limits(&mut self, limits: Limits) {
        self.pending.set_limits(limits);
    }

    /// Nodes pushed out of a waiting list since the last call, as (mesh, node id): Kubernetes
    /// mode deletes the MeshNode it made for them.
    pub fn take_pending_evictions(&mut self) -> Vec<(String, String)> {
        self.pending.take_evictions()
    }

    pub(super) fn on_enroll(
        &mut self,
        mesh: &str,
        node: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<(), CoreError> {
        let verified = match Envelope::parse(payload, 64 * 1024)
            .and_then(|e| e.verify_self_signed(Kind::Enroll))
        {
            Ok(v) => v,
            Err(e) => {
                self.reject("enrolment", node, e);
                return Ok(());
            }
        };
        if verified.signer.node_id() != node {
            self.reject(
                "enrolment",
                node,
                format!("signed by the key of node {}", verified.signer.node_id()),
            );
            return Ok(());
        }
        let last = self
            .store
            .nodes
            .get(node)
            .and_then(|r| r.last_seq)
            .or_else(|| self.pending.get(node).map(|p| p.last_seq));
        if let Err(e) = verified.check(&Expect {
            mesh,
            node: Some(node),
            after: last,
            now,
        }) {
            self.reject("enrolment", node, e);
            return Ok(());
        }
        // `iat` is whatever the sender signed: near u64::MAX the sum must not overflow.
        if verified.header.iat.saturating_add(NODE_MESSAGE_MAX_AGE) < now {
            self.reject("enrolment", node, "too old");
            return Ok(());
        }
        let req: EnrollRequest = match verified.body_json() {
            Ok(r) => r,
            Err(e) => {
                self.reject("enrolment", node, e);
                return Ok(());
            }
        };
        let Some(m) = self.set.mesh_by_network(mesh).cloned() else {
            self.reject("enrolment", node, format!("no mesh named {mesh}"));
            return Ok(());
        };
        let mode = m.spec.enrollment.mode;
        let mut batch = Batch::default();
        let existing = self.store.nodes.get(node).cloned();
        let ahead = self.store.approvals.contains_key(node);
        // Admission is recorded when it happens: in auto mode too, so switching the mesh to
        // approval keeps the nodes it admitted.
        let mut approved = existing.as_ref().is_some_and(|r| r.approved)
            || mode == EnrollmentMode::Auto
            || ahead
            || self.set.nodes.get(node).is_some_and(|n| n.spec.approved);
        if mode == EnrollmentMode::Token && !approved {
            let Some(token) = req.token.as_deref() else {
                self.counters.refused += 1;
                self.reject("enrolment", node, "this mesh needs an enrolment token");
                return Ok(());
            };
            let hash = sha256_hex(token.as_bytes());
            match self.store.tokens.get(&hash).cloned() {
                Some(t) if t.mesh == mesh && t.used_by.is_none() && t.expires > now => {
                    let mut t = t;
                    t.used_by = Some(node.to_string());
                    self.store.put_token(&mut batch, &hash, t);
                    approved = true;
                }
                Some(t) if t.used_by.is_some() => {
                    self.counters.refused += 1;
                    self.reject("enrolment", node, "token already used");
                    return Ok(());
                }
                _ => {
                    self.counters.refused += 1;
                    self.reject("enrolment", node, "invalid or expired token");
                    return Ok(());
                }
            }
        }
        let seq = verified.header.revision();
        let key = verified.signer.to_base64();
        if !approved {
            if existing.is_some() && !self.store.published.contains_key(node) {
                // A record of an unapproved node that never got a config (written by an
                // earlier version): it goes, with its subnet, and the node waits in memory.
                self.store.remove_node(&mut batch, node);
                self.store.free_subnet(&mut batch, mesh, node);
                let _ = self.peers.replace(node, None);
            }
            if !self.store.nodes.contains_key(node) {
                self.batch.merge(batch);
                self.park(node, PendingNode::new(mesh, &key, &req, seq, now), now);
                return Ok(());
            }
            // Else an unapproved node that ran a config once (its MeshNode approved it, and
            // no longer does): its record stays, as before.
        }
        if ahead {
            self.store.put_approval(&mut batch, node, None);
        }
        // A node admitted while it waited (a MeshNode approved it meanwhile).
        let waited = self.pending.remove(node);
        let rec = NodeRecord {
            mesh: mesh.to_string(),
            public_key: key,
            hostname: req.hostname.clone(),
            board: req.board.clone(),
            profile: req.profile.clone(),
            backend: req.backend.clone(),
            approved,
            enrolled_at: existing
                .as_ref()
                .map(|r| r.enrolled_at)
                .or(waited.map(|w| w.first_seen))
                .unwrap_or(now),
            last_seen: Some(now),
            last_seq: Some(seq),
            wireguard: req
                .wireguard
                .clone()
                .or_else(|| existing.as_ref().and_then(|r| r.wireguard.clone())),
            ..existing.clone().unwrap_or_default()
        };
        // Asked again with nothing changed but the time and sequence, while online and with a
        // config of this epoch published (retained on the broker): the node's inputs and its
        // neighbours' are what the last reconcile saw, so reconciling would publish nothing,
        // at a cost that grows with the mesh (each plan works out mesh-wide names and
        // policies). Agents repeat an enrolment until their config arrives, so in a storm
        // most requests are such repeats.
        let unchanged = existing.as_ref().is_some_and(|old| {
            *old == NodeRecord {
                last_seen: old.last_seen,
                last_seq: old.last_seq,
                ..rec.clone()
            }
        }) && self.online.get(node) == Some(&true)
            && self
                .store
                .published
                .get(node)
                .is_some_and(|p| p.revision.epoch == self.store.epoch && !p.sha256.is_empty());
        self.online.insert(node.to_string(), true);
        if existing.is_none() {
            self.counters.enrolled += 1;
            tracing::info!(mesh = %mesh, node = %node, hostname = %req.hostname, "node enrolled");
        }
        self.store.put_node(&mut batch, node, rec);
        self.batch.merge(batch);
        if unchanged {
            return Ok(());
        }
        let affected = self.peers.replace(node, self.store.nodes.get(node));
        self.reconcile(&affected.into_iter().collect::<Vec<_>>(), now)
    }

    /// Lists a node that waits for approval (bounded, rate-limited; see
    /// [`crate::reconcile::pending`]).
    fn park(&mut self, id: &str, node: PendingNode, now: u64) {
        let mesh = node.mesh.clone();
        let hostname = node.hostname.clone();
        match self.pending.offer(id, node, now) {
            Offer::Refreshed => {
                self.online.insert(id.to_string(), true);
            }
            Offer::Added { evicted } => {
                if let Some(old) = evicted {
                    self.online.remove(&old);
                }
                self.online.insert(id.to_string(), true);
                tracing::debug!(mesh = %mesh, node = %id, hostname = %hostname, "node asks to join and waits for approval");
                if self.pending.note_added(&mesh, now) {
                    tracing::info!(mesh = %mesh, node = %id, hostname = %hostname, "node asks to join and waits for approval: sidenetctl approve {id}");
                }
            }
            Offer::RateLimited => {}
        }
        self.counters.pending_rate_limited = self.pending.counts.rate_limited;
        self.counters.pending_evicted = self.pending.counts.evicted;
        if let Some(note) = self.pending.overflow_note(&mesh, now) {
            tracing::warn!("{note}");
        }
    }

    /// Admits the waiting nodes a MeshNode now approves, and records as admitted every node of
    /// a mesh in `auto` mode (records written before admission was recorded in auto mode too),
    /// so a later switch to approval keeps them. Called when the manifests change.
    pub(super) fn admit_approved_waiting(&mut self, now: u64) -> Result<(), CoreError> {
        let auto: Vec<String> = self
            .store
            .nodes
            .iter()
            .filter(|(_, r)| {
                !r.approved
                    && self
                        .set
                        .mesh_by_network(&r.mesh)
                        .is_some_and(|m| m.spec.enrollment.mode == EnrollmentMode::Auto)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut batch = Batch::default();
        for id in auto {
            if let Some(mut rec) = self.store.nodes.get(&id).cloned() {
                rec.approved = true;
                self.store.put_node(&mut batch, &id, rec);
            }
        }
        self.batch.merge(batch);
        let ids: Vec<String> = self
            .pending
            .iter()
            .filter(|(id, _)| self.set.nodes.get(*id).is_some_and(|n| n.spec.approved))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.admit_waiting(&id, now)?;
        }
        let meshes = self
            .set
            .meshes
            .values()
            .map(|m| crate::spec::manifest::network_name(m).to_string())
            .collect();
        self.pending.retain_meshes(&meshes);
        Ok(())
    }

    /// Gives a waiting node its record (approved) and reconciles it.
    fn admit_waiting(&mut self, id: &str, now: u64) -> Result<bool, CoreError> {
        let Some(p) = self.pending.remove(id) else {
            return Ok(false);
        };
        let rec = p.approved_record();
        tracing::info!(mesh = %rec.mesh, node = %id, hostname = %rec.hostname, "node approved and enrolled");
        self.counters.enrolled += 1;
        let mut batch = Batch::default();
        self.store.put_node(&mut batch, id, rec);
        self.batch.merge(batch);
        self.blocked.remove(id);
        let affected = self.peers.replace(id, self.store.nodes.get(id));
        self.reconcile(&affected.into_iter().collect::<Vec<_>>(), now)?;
        Ok(true)
    }

    /// Approves a node by id, MeshNode name or hostname: a waiting node is admitted, an
    /// enrolled one approved; a node id the controller has not heard from is approved ahead
    /// (durably), and admitted when it asks to join.
    pub fn approve(&mut self, who: &str, now: u64) -> Result<Approval, CoreError> {
        let id = match self.resolve(who) {
            Ok(id) => id,
            Err(_) if looks_like_node_id(who) => who.to_string(),
            Err(e) => return Err(e),
        };
        if self.admit_waiting(&id, now)? {
            return Ok(Approval::Admitted(id));
        }
        if let Some(mut rec) = self.store.nodes.get(&id).cloned() {
            rec.approved = true;
            let mut batch = Batch::default();
            self.store.put_node(&mut batch, &id, rec);
            self.batch.merge(batch);
            self.reconcile(std::slice::from_ref(&id), now)?;
            return Ok(Approval::Admitted(id));
        }
        if !looks_like_node_id(&id) {
            return Err(CoreError::Request(format!(
                "{id} is not a node id and names no node that asked to join; approve a node by its id (16 characters, `sidenet-agent --show-id` prints it)"
            )));
        }
        let mut batch = Batch::default();
        self.store.put_approval(&mut batch, &id, Some(now));
        self.batch.merge(batch);
        tracing::info!(node = %id, "node approved before it asked to join: it is admitted when it does");
        Ok(Approval::Ahead(id))
    }

    /// Takes back what the controller holds about a node that has no record: its place in a
    /// waiting list, or an approval given ahead. `true` if there was something.
    pub(super) fn forget_unenrolled(&mut self, id: &str) -> bool {
        let waited = self.pending.remove(id).is_some();
        let ahead = self.store.approvals.contains_key(id);
        if ahead {
            let mut batch = Batch::default();
            self.store.put_approval(&mut batch, id, None);
            self.batch.merge(batch);
        }
        if waited || ahead {
            self.blocked.remove(id);
            self.online.remove(id);
        }
        waited || ahead
    }
}

/// Why a waiting node has no config.
pub fn pending_reason(id: &str) -> String {
    format!("waiting for approval: `sidenetctl approve {id}` or a MeshNode with approved: true")
}
