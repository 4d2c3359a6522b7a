//! The controller core: what each node runs and why, as `sidenetctl status` and the MeshNode
//! status show it, and the preview of a node's config.

use sidenet_wire::messages::{ApplyState, NodeConfig};

use super::plan::{Desired, build_config_with, decide};
use super::state::{Controller, CoreError};
use crate::reconcile::model::StatusRow;
use crate::spec::manifest::network_name;

impl Controller {
    /// The config a node would receive now, before signing.
    pub fn preview(&mut self, who: &str) -> Result<NodeConfig, CoreError> {
        let id = self.resolve(who)?;
        let mesh = self.mesh_for(&id).ok_or_else(|| {
            CoreError::Request(format!("node {id}: its mesh is not in the manifests"))
        })?;
        let net = network_name(&mesh).to_string();
        let mesh_name = mesh.metadata.name.clone().unwrap_or_default();
        let (pass, next) = self
            .passphrases(&mesh_name, crate::now())
            .map_err(CoreError::Request)?;
        let subnet = self
            .store
            .subnets
            .get(&(net.clone(), id.clone()))
            .copied()
            .unwrap_or_else(|| crate::spec::ipam::preferred(&net, &id).max(1));
        let manifest = self.set.node(&id);
        let rec = self.store.nodes.get(&id);
        match decide(&self.set, &mesh, &id, manifest, rec, subnet, &pass) {
            Desired::Config { mut inputs, .. } => {
                inputs.passphrase_next = next.as_deref();
                let gw = crate::reconcile::peers::gateways(&self.store, &self.set, &mesh);
                let mut dp = crate::reconcile::peers::dataplane(
                    &self.peers,
                    &self.store,
                    &self.set,
                    &mesh,
                    &id,
                    &gw,
                );
                let services = crate::reconcile::peers::services(&self.store, &self.set, &mesh);
                crate::reconcile::peers::with_services(&mut dp, &services, &mesh, &id);
                dp.names = crate::reconcile::peers::names(&self.store, &self.set, &mesh);
                build_config_with(&self.renderer, &inputs, Some(dp)).map_err(CoreError::Request)
            }
            Desired::Pending(r) | Desired::Blocked(r) => Err(CoreError::Request(r)),
        }
    }

    /// Status of every known node.
    pub fn status(&self) -> Vec<StatusRow> {
        let mut rows: Vec<StatusRow> = self
            .candidates()
            .into_iter()
            .map(|id| self.status_row(id))
            .collect();
        // Nodes waiting for approval (in memory; see crate::reconcile::pending).
        for (id, p) in self.pending.iter() {
            if !self.set.nodes.contains_key(id) && !self.store.nodes.contains_key(id) {
                rows.push(StatusRow {
                    mesh: p.mesh.clone(),
                    hostname: Some(p.hostname.clone()),
                    phase: "Pending".into(),
                    reason: Some(super::enrol::pending_reason(id)),
                    online: self.online.get(id).copied(),
                    last_seen: Some(p.last_seen),
                    agent_version: Some(p.agent_version.clone()),
                    agent_epoch: Some(p.last_seq.epoch),
                    ..self.status_row(id.clone())
                });
            }
        }
        rows.sort_by(|a, b| a.node.cmp(&b.node));
        rows
    }

    /// Status of one node, if it is known (a MeshNode or an enrolled node).
    pub fn status_of(&self, id: &str) -> Option<StatusRow> {
        (self.set.nodes.contains_key(id) || self.store.nodes.contains_key(id))
            .then(|| self.status_row(id.to_string()))
    }

    pub(super) fn status_row(&self, id: String) -> StatusRow {
        let rec = self.store.nodes.get(&id);
        let manifest = self.set.node(&id);
        let published = self.store.published.get(&id);
        let mesh = rec.map(|r| r.mesh.clone()).or_else(|| {
            manifest
                .and_then(|m| self.set.mesh_of(m))
                .map(|m| network_name(m).to_string())
        });
        let desired = published.map(|p| p.revision);
        let applied = rec.and_then(|r| r.applied);
        let reason = self.blocked.get(&id).cloned();
        let online = self.online.get(&id).copied();
        let reason = reason
            .or_else(|| crate::reconcile::health::missing_reason(rec))
            .or_else(|| {
                (rec.is_none() && self.pending.get(&id).is_some())
                    .then(|| super::enrol::pending_reason(&id))
            });
        let phase = if let Some(r) = &reason {
            if r.starts_with("waiting for approval") {
                "Pending"
            } else {
                "Blocked"
            }
        } else if rec.and_then(|r| r.state) == Some(ApplyState::Failed) {
            "Failed"
        } else if online == Some(false) {
            "Offline"
        } else if desired.is_some() && desired == applied {
            "Ready"
        } else if rec.is_none() {
            "Declared"
        } else {
            "Configuring"
        };
        let address = mesh.as_ref().and_then(|m| {
            let base = self
                .set
                .mesh_by_network(m)
                .and_then(|mm| crate::spec::manifest::parse_ula48(&mm.spec.prefix).ok())?;
            let sid = self.store.subnets.get(&(m.clone(), id.clone()))?;
            Some(crate::spec::ipam::node_address(base, *sid).to_string())
        });
        StatusRow {
            name: manifest.and_then(|m| m.metadata.name.clone()),
            mesh: mesh.unwrap_or_default(),
            hostname: rec.map(|r| r.hostname.clone()),
            phase: phase.to_string(),
            reason,
            online,
            desired,
            applied,
            last_seen: rec.and_then(|r| r.last_seen),
            address,
            failure: rec.and_then(|r| r.failure.as_ref().map(|f| f.error.clone())),
            neighbours: rec.map(|r| r.neighbours.clone()).unwrap_or_default(),
            probes: rec.map(|r| r.probes.clone()).unwrap_or_default(),
            agent_version: rec.and_then(|r| r.agent_version.clone()),
            agent_epoch: rec.and_then(|r| r.last_seq.map(|s| s.epoch)),
            missing: rec.map(|r| r.missing.clone()).unwrap_or_default(),
            shaping: rec.and_then(|r| r.shaping.clone()),
            services: rec.map(|r| r.services.clone()).unwrap_or_default(),
            node: id,
        }
    }
}
