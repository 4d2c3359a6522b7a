//! A stateful in-memory Kubernetes API server for tests, served to kube's `Client` as a
//! `tower::Service` (`Client::new(FakeApi, "default")`).
//!
//! Generic over kinds: objects are JSON values keyed by (`group/version/plural`, namespace,
//! name); nothing is kind-specific except which plurals have a status subresource.
//!
//! Supported: GET (object, list across one or all namespaces), WATCH (streamed `ADDED` /
//! `MODIFIED` / `DELETED` lines from a resourceVersion, then live), POST (409 AlreadyExists),
//! PUT (409 Conflict on a stale `metadata.resourceVersion`), PATCH (JSON Patch with `test`
//! operations; merge patch; server-side apply and strategic merge are applied as a JSON merge
//! patch — a simplification: no field ownership, lists replaced whole), the `status`
//! subresource (writes to it change only `.status`; writes to the main resource never change
//! `.status` of kinds that have the subresource), DELETE with finalizers (`deletionTimestamp`
//! set while finalizers remain; removed when the last one goes) and background garbage
//! collection through `ownerReferences`. `metadata.generation` grows when anything outside
//! metadata and status changes, and when deletion starts.
//!
//! A write that changes nothing (after admission) is not stored: no new resourceVersion, no
//! watch event (as the API server does).
//!
//! Admission ([`admission`]): custom resources are pruned, defaulted and validated against
//! their CRD's `openAPIV3Schema` from the repo's `crds/`; `events.k8s.io/v1` Events are
//! validated (required fields, length limits with the note's 1024 bytes, namespace). A refused
//! write answers 422 Invalid. A handle from [`FakeApi::unchecked`] skips admission: it stands
//! for an API server without the CRD's current bounds (objects injected past admission).
//!
//! RBAC ([`rbac`]): with [`FakeApi::set_policy`], every request of the untagged handle (the
//! controllers') is checked against the rules bound to its service account, by verb, group,
//! resource, namespace and resourceNames; a denied request answers 403 Forbidden. Tagged
//! handles (the test's own client) are cluster admins.
//!
//! Not supported: label and field selectors, pagination, bookmarks, CEL rules and formats,
//! webhooks.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub mod admission;
pub mod rbac;
pub mod serve;

pub use rbac::Rule;

/// Plurals whose kinds have a status subresource.
const STATUS_SUBRESOURCE: [&str; 3] = ["meshes", "meshnodes", "nodeprovisions"];

type Key = (String, String, String);

struct Watcher {
    resource: String,
    namespace: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<(u64, String, Key, Value)>,
    watchers: Vec<Watcher>,
    requests: Vec<String>,
    /// The controllers' service account and the rules bound to it.
    policy: Option<(String, Vec<Rule>)>,
    /// Writes refused at admission, as `resource ns/name: message`.
    refused: Vec<String>,
}

/// The fake API server. Clones share state.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    tag: String,
    /// Skips admission (schema and Event validation).
    unchecked: bool,
}

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(v: Value, code: StatusCode) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .unwrap()
}

fn status(code: u16, reason: &str, message: String) -> Response<Body> {
    full(
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
        StatusCode::from_u16(code).unwrap(),
    )
}

pub struct Target {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let plural = rest.first()?;
    Some(Target {
        resource: format!("{gv}/{plural}"),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Everything but metadata and status: what bumps `generation`.
fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, kind: &str, key: &Key, obj: &Value) {
        let rv = self.rv;
        self.log
            .push((rv, kind.to_string(), key.clone(), obj.clone()));
        let line = Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})));
        self.watchers.retain(|w| {
            if w.resource != key.0 {
                return true;
            }
            if let Some(ns) = &w.namespace
                && *ns != key.1
            {
                return true;
            }
            w.tx.send(line.clone()).is_ok()
        });
    }

    fn store(&mut self, key: &Key, mut obj: Value, kind: &str) -> Value {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key.clone(), obj.clone());
        self.emit(kind, key, &obj);
        obj
    }

    fn remove(&mut self, key: &Key) {
        let Some(mut obj) = self.objects.remove(key) else {
            return;
        };
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit("DELETED", key, &obj);
        // Background garbage collection of dependents.
        let uid = obj["metadata"]["uid"].as_str().unwrap_or("").to_string();
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == json!(uid)))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for d in dependents {
            self.delete(&d);
        }
    }

    /// DELETE semantics: finalizers hold the object with a deletionTimestamp.
    fn delete(&mut self, key: &Key) -> Option<Value> {
        let obj = self.objects.get(key)?.clone();
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                let mut obj = obj;
                obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
                obj["metadata"]["generation"] = json!(g + 1);
                return Some(self.store(key, obj, "MODIFIED"));
            }
            return Some(obj);
        }
        self.remove(key);
        Some(obj)
    }

    /// Writes an updated object: status rules, admission, generation, finalizer-driven removal.
    /// Nothing is stored when the result equals the stored object.
    fn update(
        &mut self,
        key: &Key,
        old: &Value,
        mut new: Value,
        sub: Option<&str>,
        check: bool,
    ) -> Result<Value, String> {
        let has_status_sub = STATUS_SUBRESOURCE
            .iter()
            .any(|p| key.0.ends_with(&format!("/{p}")));
        if sub == Some("status") {
            let mut merged = old.clone();
            merged["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            new = merged;
        } else {
            if has_status_sub {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            // Immutable and server-owned metadata.
            for f in [
                "uid",
                "creationTimestamp",
                "namespace",
                "name",
                "deletionTimestamp",
            ] {
                if !old["metadata"][f].is_null() {
                    new["metadata"][f] = old["metadata"][f].clone();
                }
            }
        }
        if check {
            admit(&key.0, &key.1, &mut new, Some(old))?;
        }
        let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(if spec_part(old) != spec_part(&new) {
            g + 1
        } else {
            g
        });
        let deleting = !new["metadata"]["deletionTimestamp"].is_null();
        let finalizers_left = new["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if deleting && !finalizers_left {
            self.objects.insert(key.clone(), new.clone());
            self.remove(key);
            return Ok(new);
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if new == *old {
            return Ok(new);
        }
        Ok(self.store(key, new, "MODIFIED"))
    }
}

/// Admission of a create or update of `resource` in namespace `ns` (module docs).
fn admit(resource: &str, ns: &str, obj: &mut Value, old: Option<&Value>) -> Result<(), String> {
    if resource == "events.k8s.io/v1/events" {
        admission::validate_event(ns, obj)
    } else {
        admission::admit_custom(resource, obj, old)
    }
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle on the same state whose writes skip admission (module docs).
    pub fn unchecked(&self, tag: &str) -> Self {
        Self {
            state: self.state.clone(),
            tag: tag.to_string(),
            unchecked: true,
        }
    }

    /// Checks every request of the untagged handle against `rules`, bound to `user`.
    pub fn set_policy(&self, user: &str, rules: Vec<Rule>) {
        self.state.lock().unwrap().policy = Some((user.to_string(), rules));
    }

    /// Requests refused by RBAC and writes refused at admission, in order.
    pub fn refused(&self) -> Vec<String> {
        self.state.lock().unwrap().refused.clone()
    }

    /// A handle on the same state whose requests are logged with `tag` (to tell the test's own
    /// requests from the controller's).
    pub fn tagged(&self, tag: &str) -> Self {
        Self {
            state: self.state.clone(),
            tag: tag.to_string(),
            unchecked: false,
        }
    }

    /// Every request seen, as `METHOD path?query content-type tag`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// One object as JSON, if it exists.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(&(
                resource.to_string(),
                namespace.to_string(),
                name.to_string(),
            ))
            .cloned()
    }

    /// Every object of a resource (`group/version/plural`).
    pub fn list(&self, resource: &str) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn handle(
        &self,
        method: Method,
        uri: http::Uri,
        content_type: String,
        body: Bytes,
    ) -> Response<Body> {
        let mut st = self.state.lock().unwrap();
        st.requests.push(format!(
            "{method} {}?{} {content_type} {}",
            uri.path(),
            uri.query().unwrap_or(""),
            self.tag
        ));
        let Some(t) = parse_path(uri.path()) else {
            return status(404, "NotFound", format!("no route {}", uri.path()));
        };
        let q = query(&uri);
        let ns = t.namespace.clone().unwrap_or_default();
        if self.tag.is_empty()
            && let Some((user, rules)) = &st.policy
        {
            let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
            let a = rbac::Attributes::of(&method, &t, watch);
            if !rbac::allowed(rules, &a) {
                let m = a.forbidden(user);
                st.refused.push(format!("403 {m}"));
                return status(403, "Forbidden", m);
            }
        }
        let check = !self.unchecked;
        let parsed: Option<Value> = if body.is_empty() {
            None
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => Some(v),
                Err(e) => return status(400, "BadRequest", format!("body is not JSON: {e}")),
            }
        };
        match (method, &t.name) {
            (Method::GET, None) => {
                let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
                if watch {
                    let from: u64 = q
                        .get("resourceVersion")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let (tx, rx) = mpsc::unbounded_channel();
                    for (rv, kind, key, obj) in &st.log {
                        if *rv > from
                            && key.0 == t.resource
                            && t.namespace.as_ref().is_none_or(|n| *n == key.1)
                        {
                            let line = format!("{}\n", json!({"type": kind, "object": obj}));
                            let _ = tx.send(Bytes::from(line));
                        }
                    }
                    st.watchers.push(Watcher {
                        resource: t.resource.clone(),
                        namespace: t.namespace.clone(),
                        tx,
                    });
                    let stream = futures::stream::unfold(rx, |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                    });
                    return Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(StreamBody::new(stream).boxed_unsync())
                        .unwrap();
                }
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| {
                        k.0 == t.resource && t.namespace.as_ref().is_none_or(|n| *n == k.1)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                full(
                    json!({"apiVersion": "v1", "kind": "List",
                           "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
                    StatusCode::OK,
                )
            }
            (Method::GET, Some(name)) => {
                match st
                    .objects
                    .get(&(t.resource.clone(), ns.clone(), name.clone()))
                {
                    Some(o) => full(o.clone(), StatusCode::OK),
                    None => status(
                        404,
                        "NotFound",
                        format!("{} {ns}/{name} not found", t.resource),
                    ),
                }
            }
            (Method::POST, None) => {
                let Some(mut obj) = parsed else {
                    return status(400, "BadRequest", "no body".into());
                };
                let name = match obj["metadata"]["name"].as_str() {
                    Some(n) => n.to_string(),
                    None => match obj["metadata"]["generateName"].as_str() {
                        Some(g) => format!("{g}{}", st.rv + 1),
                        None => {
                            return status(422, "Invalid", "metadata.name: Required value".into());
                        }
                    },
                };
                let key = (t.resource.clone(), ns.clone(), name.clone());
                if st.objects.contains_key(&key) {
                    return status(
                        409,
                        "AlreadyExists",
                        format!("{} \"{name}\" already exists", t.resource),
                    );
                }
                obj["metadata"]["name"] = json!(name);
                if t.namespace.is_some() {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                obj["metadata"]["uid"] = json!(format!("uid-{}", st.rv + 1));
                obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
                obj["metadata"]["generation"] = json!(1);
                if STATUS_SUBRESOURCE
                    .iter()
                    .any(|p| t.resource.ends_with(&format!("/{p}")))
                    && let Some(m) = obj.as_object_mut()
                {
                    m.remove("status");
                }
                if check && let Err(m) = admit(&t.resource, &ns, &mut obj, None) {
                    st.refused.push(format!("422 {m}"));
                    return status(422, "Invalid", m);
                }
                let stored = st.store(&key, obj, "ADDED");
                full(stored, StatusCode::CREATED)
            }
            (Method::PUT, Some(name)) => {
                let key = (t.resource.clone(), ns.clone(), name.clone());
                let Some(old) = st.objects.get(&key).cloned() else {
                    return status(
                        404,
                        "NotFound",
                        format!("{} {ns}/{name} not found", t.resource),
                    );
                };
                let Some(new) = parsed else {
                    return status(400, "BadRequest", "no body".into());
                };
                if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != old["metadata"]["resourceVersion"].as_str()
                {
                    return status(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified",
                            t.resource
                        ),
                    );
                }
                match st.update(&key, &old, new, t.sub.as_deref(), check) {
                    Ok(out) => full(out, StatusCode::OK),
                    Err(m) => {
                        st.refused.push(format!("422 {m}"));
                        status(422, "Invalid", m)
                    }
                }
            }
            (Method::PATCH, Some(name)) => {
                let key = (t.resource.clone(), ns.clone(), name.clone());
                let Some(old) = st.objects.get(&key).cloned() else {
                    return status(
                        404,
                        "NotFound",
                        format!("{} {ns}/{name} not found", t.resource),
                    );
                };
                let Some(patch) = parsed else {
                    return status(400, "BadRequest", "no body".into());
                };
                let mut new = old.clone();
                if content_type.starts_with("application/json-patch+json") {
                    // Like the API server: `test` for null passes on a missing path.
                    let mut patch = patch;
                    if let Some(ops) = patch.as_array_mut() {
                        ops.retain(|op| {
                            !(op["op"] == "test"
                                && op["value"].is_null()
                                && new.pointer(op["path"].as_str().unwrap_or("")).is_none())
                        });
                    }
                    let p: json_patch::Patch = match serde_json::from_value(patch) {
                        Ok(p) => p,
                        Err(e) => return status(400, "BadRequest", format!("bad JSON patch: {e}")),
                    };
                    if let Err(e) = json_patch::patch(&mut new, &p.0) {
                        return status(422, "Invalid", format!("JSON patch failed: {e}"));
                    }
                } else {
                    json_patch::merge(&mut new, &patch);
                }
                match st.update(&key, &old, new, t.sub.as_deref(), check) {
                    Ok(out) => full(out, StatusCode::OK),
                    Err(m) => {
                        st.refused.push(format!("422 {m}"));
                        status(422, "Invalid", m)
                    }
                }
            }
            (Method::DELETE, Some(name)) => {
                let key = (t.resource.clone(), ns.clone(), name.clone());
                match st.delete(&key) {
                    Some(o) => full(o, StatusCode::OK),
                    None => status(
                        404,
                        "NotFound",
                        format!("{} {ns}/{name} not found", t.resource),
                    ),
                }
            }
            (m, _) => status(405, "MethodNotAllowed", format!("{m} {}", uri.path())),
        }
    }
}

impl tower::Service<Request<kube::client::Body>> for FakeApi {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let ct = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            Ok(this.handle(parts.method, parts.uri, ct, bytes))
        })
    }
}
