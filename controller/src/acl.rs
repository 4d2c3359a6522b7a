//! Who may publish and subscribe to what on the broker: one pure policy, used by the embedded
//! broker ([`MeshAuthorizer`]) and documented for external brokers.
//!
//! | role | subscribe | publish |
//! | --- | --- | --- |
//! | controller (username `sidenet-controller` + the password the controller generated at start) | anything under `sidenet/v1/` | anything under `sidenet/v1/` |
//! | node (client id = its node id) | `sidenet/v1/M/announce`, its own `nodes/ID/config` and `nodes/ID/ack` | its own `enroll/ID`, `nodes/ID/status`, `nodes/ID/online` |
//! | anything else | nothing | nothing |
//!
//! Node filters must be exact topics (no `+` or `#`), so a node can never read another node's
//! topics; client ids that are not node ids (or contain `+`, `#`, `/`, control characters) are
//! refused at CONNECT. A node is identified by its client id only: until per-node broker
//! credentials exist, a client that claims another node's id can take over that node's session
//! and read its config — whose secrets are sealed to the node's key and whose signature the
//! claimant cannot forge (docs/security.md).

use sidenet_broker::{Authorizer, QueueLimits, Refusal};
use sidenet_wire::names;

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
                (Action::Subscribe, [m, "nodes", n, "config" | "ack"]) => mesh_ok(m) && n == id,
                (Action::Publish, [m, "enroll", n]) => mesh_ok(m) && n == id,
                (Action::Publish, [m, "nodes", n, "status" | "online"]) => mesh_ok(m) && n == id,
                _ => false,
            }
        }
    }
}

/// The embedded broker's authorizer: the controller by its password, nodes by their ids.
#[derive(Debug)]
pub struct MeshAuthorizer {
    controller_password: String,
}

impl MeshAuthorizer {
    /// Lets in the controller with `controller_password`, and nodes.
    pub fn new(controller_password: String) -> Self {
        Self {
            controller_password,
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
        if names::check_node_id(client_id).is_ok() {
            Ok(Role::Node(client_id.to_string()))
        } else {
            Err(Refusal::NotAuthorized)
        }
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
            "sidenet/v1/riverside/nodes/+/config",
            "#",
            "$SYS/#",
            "other/v1/riverside/announce",
        ] {
            assert!(!allowed(&node, Action::Subscribe, f), "{f}");
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
        let auth = MeshAuthorizer::new("s3cret".into());
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
}
