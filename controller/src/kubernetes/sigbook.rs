//! Signatures of the watched objects, kept up to date from the watch events.
//!
//! A sync ([`super::sync`]) starts by asking whether any object changed since the last one.
//! Hashing every object of the caches for that costs O(n) at every reconcile, which made an
//! enrolment storm of n nodes cost O(n²). Here each object's row (kind, name, uid, generation,
//! deletion and labels: what the manifest set is built from) is kept per object and the
//! namespace sums are updated as each watch event passes, after the reflector has applied it to
//! the cache: O(log n) per event, and the question is answered from the sums.
//!
//! The book follows the cache's own rules: `Apply` replaces an object's row, `Delete` removes
//! it, and a relist (`Init`, `InitApply`…, `InitDone`) replaces every row of its kind at
//! `InitDone`. Because it is updated after the cache, a sync may see an object a moment before
//! its row counts; it then records the older sum, and the next check finds a change and syncs
//! once more: never the other way round (a change the sync missed but the sums already hold).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::Event;

/// What the manifest set depends on in an object's metadata: its identity, generation (the
/// spec), deletion and labels (policies select nodes by them). Status writes change none.
pub(crate) fn row(kind: &str, m: &ObjectMeta) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        kind,
        m.name.as_deref().unwrap_or(""),
        m.uid.as_deref().unwrap_or(""),
        m.generation,
        m.deletion_timestamp.is_some(),
        &m.labels,
    )
        .hash(&mut h);
    h.finish()
}

/// The signatures at one moment: one per namespace, one of the HardwareProfiles (cluster
/// scoped), and one of everything.
#[derive(Debug, Clone, Default)]
pub(crate) struct Signatures {
    pub(crate) total: u64,
    per_ns: BTreeMap<String, u64>,
    profiles: u64,
}

impl Signatures {
    /// What one namespace's validation depends on: its objects and the profiles.
    pub(crate) fn namespace(&self, ns: &str) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (ns, self.per_ns.get(ns), self.profiles).hash(&mut h);
        h.finish()
    }

    fn new(per_ns: BTreeMap<String, u64>, profiles: u64) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&per_ns, profiles).hash(&mut h);
        Signatures {
            total: h.finish(),
            per_ns,
            profiles,
        }
    }
}

/// One object's place in the book: its namespace (`None`: cluster scoped) and row.
type Entry = (Option<String>, u64);

#[derive(Default)]
struct Book {
    /// `KIND/NS/NAME` → entry.
    rows: HashMap<String, Entry>,
    /// Order-independent sums of the rows (wrapping) and how many there are, per namespace.
    per_ns: BTreeMap<String, (u64, usize)>,
    /// The same for the cluster-scoped kinds.
    cluster: u64,
    /// A relist in progress, per kind: the rows it listed so far.
    relist: HashMap<String, HashMap<String, Entry>>,
}

impl Book {
    fn add(&mut self, key: String, e: Entry) {
        self.remove(&key);
        match &e.0 {
            Some(ns) => {
                let s = self.per_ns.entry(ns.clone()).or_default();
                *s = (s.0.wrapping_add(e.1), s.1 + 1);
            }
            None => self.cluster = self.cluster.wrapping_add(e.1),
        }
        self.rows.insert(key, e);
    }

    fn remove(&mut self, key: &str) {
        let Some((ns, r)) = self.rows.remove(key) else {
            return;
        };
        match ns {
            Some(ns) => {
                if let Some(s) = self.per_ns.get_mut(&ns) {
                    *s = (s.0.wrapping_sub(r), s.1.saturating_sub(1));
                    if s.1 == 0 {
                        self.per_ns.remove(&ns);
                    }
                }
            }
            None => self.cluster = self.cluster.wrapping_sub(r),
        }
    }
}

/// The book of every watched kind that the manifest set is built from (module docs).
#[derive(Default)]
pub(crate) struct SigBook {
    book: Mutex<Book>,
}

fn key(kind: &str, m: &ObjectMeta) -> String {
    format!(
        "{kind}/{}/{}",
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or("")
    )
}

fn entry(kind: &str, m: &ObjectMeta) -> Entry {
    (m.namespace.clone(), row(kind, m))
}

impl SigBook {
    /// Applies one watch event of kind `K` (after the reflector applied it to the cache).
    pub(crate) fn apply<K: Resource<DynamicType = ()>>(&self, ev: &Event<K>) {
        let kind = K::kind(&()).to_string();
        let Ok(mut b) = self.book.lock() else {
            return;
        };
        match ev {
            Event::Apply(o) => b.add(key(&kind, o.meta()), entry(&kind, o.meta())),
            Event::Delete(o) => b.remove(&key(&kind, o.meta())),
            Event::Init => {
                b.relist.insert(kind, HashMap::new());
            }
            Event::InitApply(o) => {
                let (k, e) = (key(&kind, o.meta()), entry(&kind, o.meta()));
                b.relist.entry(kind).or_default().insert(k, e);
            }
            Event::InitDone => {
                let listed = b.relist.remove(&kind).unwrap_or_default();
                let prefix = format!("{kind}/");
                let stale: Vec<String> = b
                    .rows
                    .keys()
                    .filter(|k| k.starts_with(&prefix))
                    .cloned()
                    .collect();
                for k in stale {
                    b.remove(&k);
                }
                for (k, e) in listed {
                    b.add(k, e);
                }
            }
        }
    }

    /// The step of a reflector's event stream (its `inspect`) that applies each event to
    /// `book`, after the reflector applied it to the cache.
    pub(crate) fn feeder<K: Resource<DynamicType = ()>, E>(
        book: &std::sync::Arc<Self>,
    ) -> impl FnMut(&Result<Event<K>, E>) + use<K, E> {
        let book = book.clone();
        move |ev| {
            if let Ok(ev) = ev {
                book.apply(ev)
            }
        }
    }

    /// The signatures now.
    pub(crate) fn snapshot(&self) -> Signatures {
        match self.book.lock() {
            Ok(b) => Signatures::new(
                b.per_ns
                    .iter()
                    .map(|(ns, (s, _))| (ns.clone(), *s))
                    .collect(),
                b.cluster,
            ),
            Err(_) => Signatures::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sidenet_crds::{Mesh, MeshNode};

    fn node(ns: &str, name: &str, generation: i64) -> MeshNode {
        let mut n: MeshNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "sidenet.io/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                         "generation": generation},
            "spec": {"mesh": "riverside", "nodeId": "abc"}
        }))
        .unwrap();
        n.metadata.generation = Some(generation);
        n
    }

    #[test]
    fn the_sums_follow_the_events_and_a_relist() {
        let book = SigBook::default();
        let empty = book.snapshot();
        book.apply(&Event::Apply(node("a", "n1", 1)));
        let one = book.snapshot();
        assert_ne!(one.total, empty.total);
        book.apply(&Event::Apply(node("b", "n2", 1)));
        let two = book.snapshot();
        // Another namespace's object changes that namespace only.
        assert_eq!(two.namespace("a"), one.namespace("a"));
        assert_ne!(two.namespace("b"), one.namespace("b"));
        // A new generation changes the sums; going back restores them (order independent).
        book.apply(&Event::Apply(node("a", "n1", 2)));
        assert_ne!(book.snapshot().namespace("a"), two.namespace("a"));
        book.apply(&Event::Apply(node("a", "n1", 1)));
        assert_eq!(book.snapshot().total, two.total);
        // A relist that lists only n2 drops n1; other kinds are untouched.
        let mesh: Mesh = serde_json::from_value(serde_json::json!({
            "apiVersion": "sidenet.io/v1alpha1", "kind": "Mesh",
            "metadata": {"name": "riverside", "namespace": "a", "generation": 1},
            "spec": {
                "networkName": "riverside", "prefix": "fd5e:1d0e:7a00::/48",
                "radio": {"country": "DE", "meshBand": "5g",
                          "channels": {"5g": {"channel": 36, "width": 80}}},
                "encryption": {"passphraseSecretRef": {"name": "riverside-mesh", "key": "passphrase"}},
                "routing": {"protocol": "babel"},
                "enrollment": {"mode": "auto"}
            }
        }))
        .unwrap();
        book.apply(&Event::Apply(mesh.clone()));
        let with_mesh = book.snapshot();
        book.apply(&Event::<MeshNode>::Init);
        book.apply(&Event::InitApply(node("b", "n2", 1)));
        // Until InitDone the old rows still count, as in the cache.
        assert_eq!(book.snapshot().total, with_mesh.total);
        book.apply(&Event::<MeshNode>::InitDone);
        let after = book.snapshot();
        book.apply(&Event::Delete(mesh));
        book.apply(&Event::Apply(node("a", "n1", 1)));
        book.apply(&Event::Delete(node("a", "n1", 1)));
        assert_eq!(book.snapshot().namespace("b"), after.namespace("b"));
        book.apply(&Event::Delete(node("b", "n2", 1)));
        assert_eq!(book.snapshot().total, empty.total);
    }
}
