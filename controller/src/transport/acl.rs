//! Who may publish and subscribe to what on the broker: one pure policy, used by the embedded
//! broker ([`MeshAuthorizer`]) and documented for external brokers.
//!
//! | role | subscribe | publish |
//! | --- | --- | --- |
//! | controller (username `sidenet-controller` + the password the controller generated at start) | anything under `sidenet/v1/` | anything under `sidenet/v1/` |
//! | node (client id = its node id) | `sidenet/v1/M/announce` and its shards `announce/S`, its own `nodes/ID/config` and `nodes/ID/ack` | its own `enroll/ID`, `nodes/ID/status`, `nodes/ID/online` |
//! | anything else | nothing | nothing |
//!
//! Node filters must be exact topics (no `+` or `#`), so a node can never read another node's
//! topics; client ids that are not node ids (or contain `+`, `#`, `/`, control characters) are
//! refused at CONNECT.
//!
//! Per-node credentials ([`CredentialBook`]): every config carries the node's own broker
//! password sealed to the node ([`sidenet_wire::seal::MQTT_PASSWORD`], derived from a per-mesh
//! secret, [`crate::reconcile::credentials::node_password`]). The agent logs in with username = its node id and that password,
//! and says so in its signed status report; from then on the node is *armed* and the broker
//! refuses any connection claiming its client id without the password — no session takeover,
//! no reading its topics. Before that (a node that is still enrolling, which has nothing to
//! protect yet but its sealed first config) a connection without password is let in, confined
//! to the id's own topics as above. A password given for an id the broker does not know is
//! ignored, so a node keeps working against a broker rebuilt from scratch.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use sidenet_broker::{Authorizer, QueueLimits, Refusal};
use sidenet_wire::{names, topics};

use crate::reconcile::credentials::Credential;

/// The username of the controller's own connection.
pub const CONTROLLER_USER: &str = "sidenet-controller";

/// A connected client's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The controller: everything under `sidenet/v1/`.
    Controller,
    /// A node, by its id.
    Node(String),
}

/// Publish or subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// PUBLISH (including a will).
    Publish,
    /// SUBSCRIBE (one filter).
    Subscribe,
}

/// Whether `role` may `action` on `topic` (a topic, or a subscription filter).
pub fn allowed(role: &Role, action: Action, topic: &str) -> bool {
    let Some(rest) = topic.strip_prefix("sidenet/v1/") else {
        return false;
    };
    match role {
        Role::Controller => true,
        Role::Node(id) => {
            if topic.contains(['+', '#']) {
                return false;
            }
            let parts: Vec<&str> = rest.split('/').collect();
            let mesh_ok = |m: &str| names::check_mesh_name(m).is_ok();
            match (action, parts.as_slice()) {
                (Action::Subscribe, [m, "announce"]) => mesh_ok(m),
                (Action::Subscribe, [m, "announce", s]) => {
                    mesh_ok(m) && s.len() == 1 && topics::ANNOUNCE_SHARDS.contains(s)
                }
                (Action::Subscribe, [m, "nodes", n, "config" | "ack"]) => mesh_ok(m) && n == id,
                (Action::Publish, [m, "enroll", n]) => mesh_ok(m) && n == id,
                (Action::Publish, [m, "nodes", n, "status" | "online"]) => mesh_ok(m) && n == id,
                _ => false,
            }
        }
    }
}

/// What the broker knows about one node's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// SHA-256 of the password (the book holds no passwords).
    digest: [u8; 32],
    /// The node logged in with it: connections without it are refused.
    armed: bool,
}

/// The node credentials the embedded broker checks, shared between the controller's core
/// (which issues and arms them) and the broker's connection tasks.
#[derive(Debug, Clone, Default)]
pub struct CredentialBook {
    inner: Arc<RwLock<HashMap<String, Entry>>>,
}

impl CredentialBook {
    /// Applies changes from the core.
    pub fn apply(&self, changes: &[Credential]) {
        let Ok(mut map) = self.inner.write() else {
            return;
        };
        for c in changes {
            match c {
                Credential::Issue { node, password, .. } => {
                    let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
                    let e = map.entry(node.clone()).or_insert(Entry {
                        digest,
                        armed: false,
                    });
                    if e.digest != digest {
                        // A new password (a new mesh secret): armed stays as it was — the
                        // node gets it in its next config before it reconnects.
                        e.digest = digest;
                    }
                }
                Credential::Arm { node, .. } => {
                    if let Some(e) = map.get_mut(node) {
                        e.armed = true;
                    }
                }
                Credential::Revoke { node, .. } => {
                    map.remove(node);
                }
            }
        }
    }

    /// Whether `node`'s id is armed (connections without its password are refused).
    pub fn armed(&self, node: &str) -> bool {
        self.inner
            .read()
            .is_ok_and(|m| m.get(node).is_some_and(|e| e.armed))
    }

    /// Checks a node's CONNECT.
    fn check(
        &self,
        node: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        let Ok(map) = self.inner.read() else {
            return Err(Refusal::NotAuthorized);
        };
        let Some(entry) = map.get(node) else {
            // Not (yet) a node with credentials: an enrolling node, confined to its topics.
            return Ok(());
        };
        match (username, password) {
            (Some(u), Some(p)) if u == node => {
                let digest: [u8; 32] = Sha256::digest(p).into();
                if same(&digest, &entry.digest) {
                    Ok(())
                } else {
                    Err(Refusal::BadCredentials)
                }
            }
            (Some(_), _) => Err(Refusal::BadCredentials),
            (None, _) if entry.armed => Err(Refusal::NotAuthorized),
            (None, _) => Ok(()),
        }
    }
}

/// The embedded broker's authorizer: the controller by its password, nodes by their ids and,
/// once armed, their own passwords.
#[derive(Debug)]
pub struct MeshAuthorizer {
    controller_password: String,
    book: CredentialBook,
}

impl MeshAuthorizer {
    /// Lets in the controller with `controller_password`, and nodes as `book` says.
    pub fn new(controller_password: String, book: CredentialBook) -> Self {
        Self {
            controller_password,
            book,
        }
    }
}

/// Constant-time comparison (a password check must not leak how much of it matched).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authorizer for MeshAuthorizer {
    type Principal = Role;

    fn connect(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Role, Refusal> {
        if username == Some(CONTROLLER_USER) {
            return match password {
                Some(p) if same(p, self.controller_password.as_bytes()) => Ok(Role::Controller),
                _ => Err(Refusal::BadCredentials),
            };
        }
        if names::check_node_id(client_id).is_err() {
            return Err(Refusal::NotAuthorized);
        }
        self.book.check(client_id, username, password)?;
        Ok(Role::Node(client_id.to_string()))
    }

    fn may_publish(&self, who: &Role, topic: &str) -> bool {
        allowed(who, Action::Publish, topic)
    }

    fn may_subscribe(&self, who: &Role, filter: &str) -> bool {
        allowed(who, Action::Subscribe, filter)
    }

    fn queue_limits(&self, who: &Role) -> Option<QueueLimits> {
        match who {
            // The controller's connection takes in every node's reports (the broker's default
            // is sized for it); a node gets its config, acks and the announcement.
            Role::Controller => None,
            Role::Node(_) => Some(QueueLimits {
                messages: 64,
                bytes: 4 * 1024 * 1024,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::credentials::node_password;

    const A: &str = "aaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbb";

    /// Every role × topic class × action.
    #[test]
    fn matrix() {
        let node = Role::Node(A.into());
        let ctl = Role::Controller;
        let own = |s: &str| format!("sidenet/v1/riverside/{}", s.replace("ID", A));
        let other = |s: &str| format!("sidenet/v1/riverside/{}", s.replace("ID", B));
        let classes = [
            "announce",
            "enroll/ID",
            "nodes/ID/config",
            "nodes/ID/status",
            "nodes/ID/ack",
            "nodes/ID/online",
        ];
        for class in classes {
            for action in [Action::Publish, Action::Subscribe] {
                assert!(
                    allowed(&ctl, action, &own(class)),
                    "controller {action:?} {class}"
                );
                let expected = match action {
                    Action::Subscribe => {
                        matches!(class, "announce" | "nodes/ID/config" | "nodes/ID/ack")
                    }
                    Action::Publish => {
                        matches!(class, "enroll/ID" | "nodes/ID/status" | "nodes/ID/online")
                    }
                };
                assert_eq!(
                    allowed(&node, action, &own(class)),
                    expected,
                    "node {action:?} own {class}"
                );
                if class != "announce" {
                    assert!(
                        !allowed(&node, action, &other(class)),
                        "node {action:?} other's {class}"
                    );
                }
            }
        }
        // Wildcards and foreign roots.
        for f in [
            "sidenet/#",
            "sidenet/v1/+/announce",
            "sidenet/v1/riverside/announce/+",
            "sidenet/v1/riverside/announce/#",
            "sidenet/v1/riverside/announce/ab",
            "sidenet/v1/riverside/announce/1",
            "sidenet/v1/riverside/announce/a/b",
            "sidenet/v1/riverside/nodes/+/config",
            "#",
            "$SYS/#",
            "other/v1/riverside/announce",
        ] {
            assert!(!allowed(&node, Action::Subscribe, f), "{f}");
        }
        // Announcement shards: any node may read any of them (they are the announcement).
        for shard in ["a", "z", "2", "7"] {
            let t = format!("sidenet/v1/riverside/announce/{shard}");
            assert!(allowed(&node, Action::Subscribe, &t), "{t}");
            assert!(!allowed(&node, Action::Publish, &t), "{t}");
        }
        assert!(allowed(&ctl, Action::Subscribe, "sidenet/v1/+/enroll/+"));
        assert!(!allowed(&ctl, Action::Subscribe, "#"));
        assert!(!allowed(
            &node,
            Action::Publish,
            "sidenet/v1/riverside/announce"
        ));
        assert!(!allowed(
            &node,
            Action::Publish,
            &format!("sidenet/v1/riverside/nodes/{A}/config/x")
        ));
    }

    #[test]
    fn connect_rules() {
        let auth = MeshAuthorizer::new("s3cret".into(), CredentialBook::default());
        assert_eq!(
            auth.connect("x", Some(CONTROLLER_USER), Some(b"s3cret")),
            Ok(Role::Controller)
        );
        assert_eq!(
            auth.connect("x", Some(CONTROLLER_USER), Some(b"s3cre")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.connect("x", Some(CONTROLLER_USER), None),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(auth.connect(A, None, None), Ok(Role::Node(A.into())));
        for bad in [
            "",
            "+",
            "#",
            "a/b",
            "a+b",
            "AAAAAAAAAAAAAAAA",
            "aaaa\u{7}aaaaaaaaaaa",
        ] {
            assert_eq!(
                auth.connect(bad, None, None),
                Err(Refusal::NotAuthorized),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn armed_nodes_need_their_password() {
        let book = CredentialBook::default();
        let auth = MeshAuthorizer::new("s3cret".into(), book.clone());
        let secret = [7u8; 32];
        let pa = node_password(&secret, "riverside", A);
        let pb = node_password(&secret, "riverside", B);
        assert_ne!(pa, pb);
        assert_ne!(pa, node_password(&secret, "hillside", A));
        assert_ne!(pa, node_password(&[8u8; 32], "riverside", A));
        // Unknown ids: let in with or without a password (an enrolling node; a node whose
        // broker was rebuilt).
        assert!(auth.connect(A, None, None).is_ok());
        assert!(auth.connect(A, Some(A), Some(pa.as_bytes())).is_ok());
        book.apply(&[Credential::Issue {
            mesh: "riverside".into(),
            node: A.into(),
            password: pa.clone(),
        }]);
        // Issued, not armed: without a password still let in; a wrong one is not.
        assert!(auth.connect(A, None, None).is_ok());
        assert_eq!(
            auth.connect(A, Some(A), Some(pb.as_bytes())),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.connect(A, Some(B), Some(pa.as_bytes())),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.connect(A, Some(A), Some(pa.as_bytes())),
            Ok(Role::Node(A.into()))
        );
        book.apply(&[Credential::Arm {
            mesh: "riverside".into(),
            node: A.into(),
        }]);
        assert!(book.armed(A));
        // Armed: the takeover attempts fail, the owner gets in.
        assert_eq!(auth.connect(A, None, None), Err(Refusal::NotAuthorized));
        assert_eq!(
            auth.connect(A, None, Some(b"x")),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            auth.connect(A, Some(A), Some(pb.as_bytes())),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.connect(A, Some(A), Some(b"")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.connect(A, Some(A), Some(pa.as_bytes())),
            Ok(Role::Node(A.into()))
        );
        // B's password does not open A, and B's id is unaffected.
        assert!(auth.connect(B, None, None).is_ok());
        // Removing the node forgets it: its id may enrol again.
        book.apply(&[Credential::Revoke {
            mesh: "riverside".into(),
            node: A.into(),
        }]);
        assert!(!book.armed(A));
        assert!(auth.connect(A, None, None).is_ok());
    }
}
