//! Watch streams that survive an undecodable object, and the predicates that keep status writes
//! from re-triggering reconciles.
//!
//! kube-runtime's typed watcher decodes a whole list at once: one object the types cannot read
//! (a `txPower` of 5000000000 admitted by an API server without the CRD's bounds, a field
//! written by a newer version) fails every list and watch of the kind, so the cache never
//! becomes ready and nothing is published in any namespace. Here each kind is watched as
//! [`DynamicObject`]s and decoded one object at a time (`typed`): an object that does not
//! decode is reported on itself (log and a Warning Event `Undecodable`, once per
//! resourceVersion) and left out, while its last decodable version, if any, stays in the
//! cache (the last good spec, as for an invalid one) until it is deleted.
//!
//! `spec_changes` and `mesh_changes` are the predicates of the triggers: a reconcile runs
//! for a change of spec (generation), labels, deletion or finalizers, not for the
//! controller's own status writes.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use sidenet_crds::Mesh;

use super::http::Metrics;

/// Reports objects that do not decode, once per object and resourceVersion.
#[derive(Clone)]
pub(crate) struct Undecodable {
    pub(crate) recorder: Recorder,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) seen: Arc<Mutex<HashSet<(String, String)>>>,
}

impl Undecodable {
    fn report(&self, obj: &DynamicObject, ar: &ApiResource, error: &str) {
        let uid = obj.metadata.uid.clone().unwrap_or_default();
        let rv = obj.metadata.resource_version.clone().unwrap_or_default();
        let fresh = self
            .seen
            .lock()
            .map(|mut s| {
                if s.len() > 10_000 {
                    s.clear();
                }
                s.insert((uid.clone(), rv))
            })
            .unwrap_or(true);
        if !fresh {
            return;
        }
        let ns = obj.metadata.namespace.clone();
        let name = obj.name_any();
        let where_ = match &ns {
            Some(ns) => format!("{}/{ns}/{name}", ar.kind),
            None => format!("{}/{name}", ar.kind),
        };
        tracing::warn!(object = %where_, "cannot read {where_}: {error}; it is left out (its last readable version, if any, stays in use)");
        self.metrics.failed(&ar.kind);
        let reference = ObjectReference {
            api_version: Some(ar.api_version.clone()),
            kind: Some(ar.kind.clone()),
            name: Some(name),
            // Cluster-scoped: none, and the Event goes to `default` (engine::Ctx::event).
            namespace: ns,
            uid: Some(uid),
            ..Default::default()
        };
        let ev = KubeEvent {
            type_: EventType::Warning,
            reason: "Undecodable".into(),
            note: Some(super::engine::truncate_note(&format!(
                "the controller cannot read this object: {error}; until it is fixed, its last readable version (if any) stays in use"
            ))),
            action: "Watch".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::warn!("cannot record Event Undecodable: {e}");
            }
        });
    }
}

/// Decodes a [`DynamicObject`] watch stream into `K`, one object at a time (module docs).
/// `cache` is the store the result is reflected into: it supplies the last decodable version
/// of an object that no longer decodes.
pub(crate) fn typed<K>(
    events: impl Stream<Item = Result<Event<DynamicObject>, watcher::Error>> + Send + 'static,
    ar: ApiResource,
    cache: Store<K>,
    report: Undecodable,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Send + Sync + 'static,
{
    events.filter_map(move |ev| {
        let out = match ev {
            Err(e) => Some(Err(e)),
            Ok(Event::Init) => Some(Ok(Event::Init)),
            Ok(Event::InitDone) => Some(Ok(Event::InitDone)),
            Ok(Event::Apply(o)) => decode(o, &ar, &cache, &report).map(|k| Ok(Event::Apply(k))),
            Ok(Event::InitApply(o)) => {
                decode(o, &ar, &cache, &report).map(|k| Ok(Event::InitApply(k)))
            }
            Ok(Event::Delete(o)) => {
                let stale = stale(&o, &cache);
                match o.try_parse::<K>() {
                    Ok(k) => Some(Ok(Event::Delete(k))),
                    Err(_) => stale.map(|k| Ok(Event::Delete(k))),
                }
            }
        };
        std::future::ready(out)
    })
}

fn stale<K>(o: &DynamicObject, cache: &Store<K>) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let mut r = ObjectRef::<K>::new(&o.name_any());
    if let Some(ns) = &o.metadata.namespace {
        r = r.within(ns);
    }
    cache.get(&r).map(|k| (*k).clone())
}

fn decode<K>(
    o: DynamicObject,
    ar: &ApiResource,
    cache: &Store<K>,
    report: &Undecodable,
) -> Option<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone,
{
    let mut o = o;
    trim(&mut o);
    let stale = stale(&o, cache);
    let shown = o.clone();
    match o.try_parse::<K>() {
        Ok(k) => Some(k),
        Err(e) => {
            report.report(&shown, ar, &e.to_string());
            stale
        }
    }
}

/// Leaves out of the cache what the controller never reads and a real API server adds to
/// every object: `metadata.managedFields` (one entry per field manager: kubectl, the
/// controller's status writes…) and kubectl's copy of the whole object in the annotation
/// `kubectl.kubernetes.io/last-applied-configuration`. With 10,000 MeshNodes each is
/// megabytes held for nothing.
fn trim(o: &mut DynamicObject) {
    o.metadata.managed_fields = None;
    if let Some(a) = o.metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        if a.is_empty() {
            o.metadata.annotations = None;
        }
    }
}

/// A change worth a reconcile of the object itself: its spec (generation), its labels
/// (policies select nodes by them), its deletion or its finalizers. Status writes change none
/// of them.
pub(crate) fn spec_changes<K: Resource>(o: &K) -> Option<u64> {
    let m = o.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        m.generation,
        &m.labels,
        m.deletion_timestamp.is_some(),
        &m.finalizers,
        &m.uid,
    )
        .hash(&mut h);
    Some(h.finish())
}

/// A Mesh change its MeshNodes must see: a spec change, its deletion, or its signing key
/// becoming (un)usable (a node blocked on the key shows why). Not the revision counters the
/// controller writes into its status at every publish.
pub(crate) fn mesh_changes(m: &Mesh) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    spec_changes(m).hash(&mut h);
    let s = m.status.as_ref();
    s.and_then(|s| s.public_key.as_ref()).hash(&mut h);
    if let Some(s) = s {
        for c in &s.conditions {
            (&c.type_, &c.status, &c.reason).hash(&mut h);
        }
    }
    Some(h.finish())
}
