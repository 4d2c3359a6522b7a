//! The standalone controller's state: an embedded database (redb) in the state folder.
//!
//! Everything is mirrored in memory (a few hundred bytes per node) and written through in
//! batches: a [`Batch`] collects changes and commits them in one durable transaction. The
//! controller commits a new revision *before* publishing it, so a crash can never make it reuse a
//! revision number or publish two different payloads under one.
//!
//! Tables (values are JSON unless noted):
//! - `meta`: `epoch` (u64 as decimal text): when this state was created.
//! - `nodes`: node id → [`NodeRecord`] (enrolment, approval, last status).
//! - `published`: node id → [`Published`] (revision, body hash, input fingerprint, times).
//! - `envelopes`: node id → the exact signed bytes last published (raw).
//! - `subnets`: `mesh/node` → subnet id (u16 as decimal text).
//! - `tokens`: SHA-256 of an enrolment token → [`TokenRecord`]; removed once expired
//!   ([`Store::prune_tokens`]).
//! - `approvals`: node id → Unix seconds: nodes an admin approved before they asked to join
//!   (`sidenetctl approve NODE_ID`); consumed when the node enrols.
//! - `rollouts`: Mesh name → [`crate::reconcile::rollout::Record`] (the last good spec and the
//!   progress of a staged rollout, so a restarted controller resumes the right wave).
//!
//! Nodes waiting for approval have no record here (they wait in memory:
//! [`crate::reconcile::pending`]).

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sidenet_wire::Revision;
use sidenet_wire::messages::{ApplyState, Failure, Neighbour, Probe, WireguardInfo};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const PUBLISHED: TableDefinition<&str, &[u8]> = TableDefinition::new("published");
const ENVELOPES: TableDefinition<&str, &[u8]> = TableDefinition::new("envelopes");
const SUBNETS: TableDefinition<&str, &str> = TableDefinition::new("subnets");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const APPROVALS: TableDefinition<&str, &str> = TableDefinition::new("approvals");
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("state database: {0}")]
    Db(String),
    /// A stored record could not be decoded.
    #[error("state database record {table}/{key}: {message}")]
    Corrupt {
        table: &'static str,
        key: String,
        message: String,
    },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// What the controller knows about an enrolled node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NodeRecord {
    /// Mesh network name.
    pub mesh: String,
    /// Node public key (base64).
    pub public_key: String,
    /// Hostname the node reported.
    pub hostname: String,
    /// Board name the node reported.
    #[serde(default)]
    pub board: Option<String>,
    /// Profile the node asked for.
    #[serde(default)]
    pub profile: Option<String>,
    /// Agent backend.
    #[serde(default)]
    pub backend: String,
    /// Approved by an admin (`sidenetctl approve`) or by a valid token.
    #[serde(default)]
    pub approved: bool,
    /// First enrolment, Unix seconds.
    pub enrolled_at: u64,
    /// Last message from the node, Unix seconds.
    #[serde(default)]
    pub last_seen: Option<u64>,
    /// Highest sequence seen from the node (replay protection).
    #[serde(default)]
    pub last_seq: Option<Revision>,
    /// Revision the node reports running.
    #[serde(default)]
    pub applied: Option<Revision>,
    /// Body hash of that revision.
    #[serde(default)]
    pub applied_sha256: Option<String>,
    /// Last reported state.
    #[serde(default)]
    pub state: Option<ApplyState>,
    /// Last reported failure.
    #[serde(default)]
    pub failure: Option<Failure>,
    /// Revisions that failed on the node (not re-pushed blindly).
    #[serde(default)]
    pub failed_revisions: Vec<Revision>,
    /// Last probe results.
    #[serde(default)]
    pub probes: Vec<Probe>,
    /// Babel neighbours the node last reported.
    #[serde(default)]
    pub neighbours: Vec<Neighbour>,
    /// WireGuard public key and underlay endpoints (from enrolment and status).
    #[serde(default)]
    pub wireguard: Option<WireguardInfo>,
    /// The node logs in to the broker with its own password (it said so in a signed status
    /// report): the broker refuses its id without it ([`crate::transport::acl`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mqtt_armed: bool,
    /// Agent version of the last status report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Packages the last status report says are missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// The policy shaping the last status report says runs (leaf qdisc, open windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<sidenet_wire::messages::ShapingStatus>,
    /// Handover: the path the node's last status report gives for each published service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<sidenet_wire::messages::ServiceRoute>,
}

/// The last config published to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Its revision.
    pub revision: Revision,
    /// SHA-256 of the body.
    pub sha256: String,
    /// Fingerprint of the inputs it was rendered from.
    pub input: String,
    /// Issued at.
    pub iat: u64,
    /// Expires at.
    pub exp: u64,
    /// Public key (base64) that signed it; `None` in records written before key rotation existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

/// An enrolment token (stored by hash only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Mesh network name it admits to.
    pub mesh: String,
    /// Created, Unix seconds.
    pub created: u64,
    /// Expires, Unix seconds.
    pub expires: u64,
    /// Node that used it.
    #[serde(default)]
    pub used_by: Option<String>,
}

/// The state, in memory and on disk.
#[derive(Debug)]
pub struct Store {
    db: Database,
    /// State epoch (Unix seconds at creation): the first part of every revision.
    pub epoch: u64,
    /// Enrolled nodes.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Published configs.
    pub published: BTreeMap<String, Published>,
    /// Subnet allocations: (mesh, node) → id.
    pub subnets: BTreeMap<(String, String), u16>,
    /// Taken subnet ids per mesh.
    pub taken: BTreeMap<String, crate::spec::ipam::Taken>,
    /// Tokens by hash.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Node ids approved before they enrolled → when.
    pub approvals: BTreeMap<String, u64>,
    /// Staged rollouts by Mesh name.
    pub rollouts: BTreeMap<String, crate::reconcile::rollout::Record>,
}

/// Pending writes, committed together.
#[derive(Debug, Default)]
pub struct Batch {
    nodes: BTreeMap<String, Vec<u8>>,
    published: BTreeMap<String, (Vec<u8>, Option<Vec<u8>>)>,
    subnets: BTreeMap<String, String>,
    /// Tokens to write (`Some`) or delete (`None`).
    tokens: BTreeMap<String, Option<Vec<u8>>>,
    /// Node records to delete.
    removed: std::collections::BTreeSet<String>,
    /// Approvals to write (`Some`) or delete (`None`).
    approvals: BTreeMap<String, Option<u64>>,
    /// Subnet allocations to delete (`mesh/node`).
    subnets_removed: std::collections::BTreeSet<String>,
    /// Rollout records to write (`Some`) or delete (`None`).
    rollouts: BTreeMap<String, Option<Vec<u8>>>,
}

impl Batch {
    /// Takes over the changes of `other` (later writes win).
    pub fn merge(&mut self, other: Batch) {
        for k in other.removed {
            self.nodes.remove(&k);
            self.removed.insert(k);
        }
        for k in other.nodes.keys() {
            self.removed.remove(k);
        }
        self.nodes.extend(other.nodes);
        for (k, (rec, env)) in other.published {
            let env = env.or_else(|| self.published.remove(&k).and_then(|(_, e)| e));
            self.published.insert(k, (rec, env));
        }
        for k in other.subnets_removed {
            self.subnets.remove(&k);
            self.subnets_removed.insert(k);
        }
        for k in other.subnets.keys() {
            self.subnets_removed.remove(k);
        }
        self.subnets.extend(other.subnets);
        self.tokens.extend(other.tokens);
        self.approvals.extend(other.approvals);
        self.rollouts.extend(other.rollouts);
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.published.is_empty()
            && self.subnets.is_empty()
            && self.tokens.is_empty()
            && self.removed.is_empty()
            && self.approvals.is_empty()
            && self.subnets_removed.is_empty()
            && self.rollouts.is_empty()
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table,
        key: key.to_string(),
        message: e.to_string(),
    })
}

impl Store {
    /// Opens (or creates) the database at `path`. A new database gets a new epoch: `now`, or one
    /// past `min_epoch` if that is later.
    pub fn open(path: &Path, now: u64) -> Result<Self, StoreError> {
        // Everything the controller needs is mirrored in memory; a small page cache is enough
        // (redb's default would let the cache grow to 1 GiB).
        let db = redb::Builder::new()
            .set_cache_size(16 << 20)
            .create(path)
            .map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        let epoch;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let existing = meta
                .get("epoch")
                .map_err(db_err)?
                .map(|v| v.value().to_string());
            epoch = match existing {
                Some(e) => e.parse().map_err(|_| StoreError::Corrupt {
                    table: "meta",
                    key: "epoch".into(),
                    message: format!("{e:?} is not a number"),
                })?,
                None => {
                    meta.insert("epoch", now.to_string().as_str())
                        .map_err(db_err)?;
                    now
                }
            };
            txn.open_table(NODES).map_err(db_err)?;
            txn.open_table(PUBLISHED).map_err(db_err)?;
            txn.open_table(ENVELOPES).map_err(db_err)?;
            txn.open_table(SUBNETS).map_err(db_err)?;
            txn.open_table(TOKENS).map_err(db_err)?;
            txn.open_table(APPROVALS).map_err(db_err)?;
            txn.open_table(ROLLOUTS).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;

        let mut store = Self {
            db,
            epoch,
            nodes: BTreeMap::new(),
            published: BTreeMap::new(),
            subnets: BTreeMap::new(),
            taken: BTreeMap::new(),
            tokens: BTreeMap::new(),
            approvals: BTreeMap::new(),
            rollouts: BTreeMap::new(),
        };
        let read = store.db.begin_read().map_err(db_err)?;
        for row in read
            .open_table(NODES)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            store.nodes.insert(
                k.value().to_string(),
                decode("nodes", k.value(), v.value())?,
            );
        }
        for row in read
            .open_table(PUBLISHED)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            store.published.insert(
                k.value().to_string(),
                decode("published", k.value(), v.value())?,
            );
        }
        for row in read
            .open_table(SUBNETS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let key = k.value().to_string();
            let (mesh, node) = key.split_once('/').ok_or_else(|| StoreError::Corrupt {
                table: "subnets",
                key: key.clone(),
                message: "expected mesh/node".into(),
            })?;
            let id: u16 = v.value().parse().map_err(|_| StoreError::Corrupt {
                table: "subnets",
                key: key.clone(),
                message: "not a subnet id".into(),
            })?;
            store.taken.entry(mesh.to_string()).or_default().insert(id);
            store
                .subnets
                .insert((mesh.to_string(), node.to_string()), id);
        }
        for row in read
            .open_table(TOKENS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            store.tokens.insert(
                k.value().to_string(),
                decode("tokens", k.value(), v.value())?,
            );
        }
        for row in read
            .open_table(APPROVALS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let at: u64 = v.value().parse().map_err(|_| StoreError::Corrupt {
                table: "approvals",
                key: k.value().to_string(),
                message: "not a time".into(),
            })?;
            store.approvals.insert(k.value().to_string(), at);
        }
        for row in read
            .open_table(ROLLOUTS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            store.rollouts.insert(
                k.value().to_string(),
                decode("rollouts", k.value(), v.value())?,
            );
        }
        Ok(store)
    }

    /// Records a node (in memory now, on disk at commit).
    pub fn put_node(&mut self, batch: &mut Batch, id: &str, rec: NodeRecord) {
        batch.removed.remove(id);
        batch
            .nodes
            .insert(id.to_string(), serde_json::to_vec(&rec).unwrap_or_default());
        self.nodes.insert(id.to_string(), rec);
    }

    /// Deletes a node's record (in memory now, on disk at commit). Its published record stays:
    /// if the node enrols again, its revisions continue where they were.
    pub fn remove_node(&mut self, batch: &mut Batch, id: &str) -> Option<NodeRecord> {
        batch.nodes.remove(id);
        batch.removed.insert(id.to_string());
        self.nodes.remove(id)
    }

    /// Records a published config and its envelope (kept on disk only: envelopes are read back
    /// just when republishing everything after a broker reconnect).
    pub fn put_published(
        &mut self,
        batch: &mut Batch,
        id: &str,
        rec: Published,
        envelope: Vec<u8>,
    ) {
        batch.published.insert(
            id.to_string(),
            (serde_json::to_vec(&rec).unwrap_or_default(), Some(envelope)),
        );
        self.published.insert(id.to_string(), rec);
    }

    /// Updates a published record without touching its envelope.
    pub fn put_published_record(&mut self, batch: &mut Batch, id: &str, rec: Published) {
        let envelope = batch.published.remove(id).and_then(|(_, e)| e);
        batch.published.insert(
            id.to_string(),
            (serde_json::to_vec(&rec).unwrap_or_default(), envelope),
        );
        self.published.insert(id.to_string(), rec);
    }

    /// Every stored envelope, by node id.
    pub fn envelopes(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(ENVELOPES).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The ids of every node with a stored envelope, in order.
    pub fn envelope_ids(&self) -> Result<Vec<String>, StoreError> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(ENVELOPES).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (k, _) = row.map_err(db_err)?;
            out.push(k.value().to_string());
        }
        Ok(out)
    }

    /// The stored envelope of one node.
    pub fn envelope(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(ENVELOPES).map_err(db_err)?;
        Ok(table.get(id).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// The subnet of a node, allocating one if needed.
    pub fn subnet(&mut self, batch: &mut Batch, mesh: &str, node: &str) -> Option<u16> {
        if let Some(id) = self.subnets.get(&(mesh.to_string(), node.to_string())) {
            return Some(*id);
        }
        let taken = self.taken.entry(mesh.to_string()).or_default();
        let id = crate::spec::ipam::allocate(mesh, node, taken)?;
        taken.insert(id);
        self.subnets
            .insert((mesh.to_string(), node.to_string()), id);
        batch
            .subnets
            .insert(format!("{mesh}/{node}"), id.to_string());
        Some(id)
    }

    /// Frees the subnet of `node` in `mesh`, if it has one (in memory now, on disk at commit).
    pub fn free_subnet(&mut self, batch: &mut Batch, mesh: &str, node: &str) {
        let key = (mesh.to_string(), node.to_string());
        if let Some(id) = self.subnets.remove(&key) {
            if let Some(t) = self.taken.get_mut(mesh) {
                t.remove(&id);
            }
            let k = format!("{mesh}/{node}");
            batch.subnets.remove(&k);
            batch.subnets_removed.insert(k);
        }
    }

    /// Records that an admin approved node `id` before it enrolled (`Some(time)`), or
    /// forgets that approval (`None`).
    pub fn put_approval(&mut self, batch: &mut Batch, id: &str, at: Option<u64>) {
        match at {
            Some(t) => {
                self.approvals.insert(id.to_string(), t);
            }
            None => {
                self.approvals.remove(id);
            }
        }
        batch.approvals.insert(id.to_string(), at);
    }

    /// Records the rollout of mesh `mesh` (`None`: forgets it), in memory now, on disk at
    /// commit.
    pub fn put_rollout(
        &mut self,
        batch: &mut Batch,
        mesh: &str,
        rec: Option<crate::reconcile::rollout::Record>,
    ) {
        let bytes = rec
            .as_ref()
            .map(|r| serde_json::to_vec(r).unwrap_or_default());
        batch.rollouts.insert(mesh.to_string(), bytes);
        match rec {
            Some(r) => {
                self.rollouts.insert(mesh.to_string(), r);
            }
            None => {
                self.rollouts.remove(mesh);
            }
        }
    }

    /// Records a token.
    pub fn put_token(&mut self, batch: &mut Batch, hash: &str, rec: TokenRecord) {
        batch.tokens.insert(
            hash.to_string(),
            Some(serde_json::to_vec(&rec).unwrap_or_default()),
        );
        self.tokens.insert(hash.to_string(), rec);
    }

    /// Deletes the tokens that expired at or before `now`, used or not (an expired token admits
    /// no one, so its record has nothing left to refuse): their hashes.
    pub fn prune_tokens(&mut self, batch: &mut Batch, now: u64) -> Vec<String> {
        let gone: Vec<String> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.expires <= now)
            .map(|(h, _)| h.clone())
            .collect();
        for h in &gone {
            self.tokens.remove(h);
            batch.tokens.insert(h.clone(), None);
        }
        gone
    }

    /// Commits a batch in one durable transaction.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut nodes = txn.open_table(NODES).map_err(db_err)?;
            for k in &batch.removed {
                nodes.remove(k.as_str()).map_err(db_err)?;
            }
            for (k, v) in &batch.nodes {
                nodes.insert(k.as_str(), v.as_slice()).map_err(db_err)?;
            }
            let mut published = txn.open_table(PUBLISHED).map_err(db_err)?;
            let mut envelopes = txn.open_table(ENVELOPES).map_err(db_err)?;
            for (k, (rec, env)) in &batch.published {
                published
                    .insert(k.as_str(), rec.as_slice())
                    .map_err(db_err)?;
                if let Some(env) = env {
                    envelopes
                        .insert(k.as_str(), env.as_slice())
                        .map_err(db_err)?;
                }
            }
            let mut subnets = txn.open_table(SUBNETS).map_err(db_err)?;
            for k in &batch.subnets_removed {
                subnets.remove(k.as_str()).map_err(db_err)?;
            }
            for (k, v) in &batch.subnets {
                subnets.insert(k.as_str(), v.as_str()).map_err(db_err)?;
            }
            let mut approvals = txn.open_table(APPROVALS).map_err(db_err)?;
            for (k, v) in &batch.approvals {
                match v {
                    Some(t) => {
                        approvals
                            .insert(k.as_str(), t.to_string().as_str())
                            .map_err(db_err)?;
                    }
                    None => {
                        approvals.remove(k.as_str()).map_err(db_err)?;
                    }
                }
            }
            let mut rollouts = txn.open_table(ROLLOUTS).map_err(db_err)?;
            for (k, v) in &batch.rollouts {
                match v {
                    Some(b) => {
                        rollouts.insert(k.as_str(), b.as_slice()).map_err(db_err)?;
                    }
                    None => {
                        rollouts.remove(k.as_str()).map_err(db_err)?;
                    }
                }
            }
            let mut tokens = txn.open_table(TOKENS).map_err(db_err)?;
            for (k, v) in &batch.tokens {
                match v {
                    Some(v) => {
                        tokens.insert(k.as_str(), v.as_slice()).map_err(db_err)?;
                    }
                    None => {
                        tokens.remove(k.as_str()).map_err(db_err)?;
                    }
                }
            }
        }
        txn.commit().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_keeps_epoch() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state.redb");
        {
            let mut s = Store::open(&path, 1000)?;
            let mut b = Batch::default();
            s.put_node(
                &mut b,
                "n1",
                NodeRecord {
                    mesh: "m".into(),
                    ..Default::default()
                },
            );
            let id = s.subnet(&mut b, "m", "n1");
            assert!(id.is_some());
            s.put_published(
                &mut b,
                "n1",
                Published {
                    revision: Revision {
                        epoch: 1000,
                        rev: 3,
                    },
                    sha256: "x".into(),
                    input: "i".into(),
                    iat: 1,
                    exp: 2,
                    signer: None,
                },
                vec![1, 2, 3],
            );
            s.commit(b)?;
        }
        let s = Store::open(&path, 5000)?;
        assert_eq!(s.epoch, 1000);
        assert_eq!(s.nodes.get("n1").map(|n| n.mesh.as_str()), Some("m"));
        assert_eq!(s.published.get("n1").map(|p| p.revision.rev), Some(3));
        assert_eq!(s.envelope("n1")?, Some(vec![1, 2, 3]));
        assert_eq!(s.subnets.len(), 1);
        Ok(())
    }
}
