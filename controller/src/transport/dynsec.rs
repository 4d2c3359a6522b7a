//! The same broker rules as [`crate::transport::acl`], on Mosquitto, driven through its dynamic security
//! plugin (`$CONTROL/dynamic-security/v1`).
//!
//! Mosquitto 2.0's plugin has no client-id substitution (`%c`) in its ACLs, so the rules are
//! written out per node, as literal topics:
//!
//! - default access: no publishing, no subscribing, **no delivery** (`publishClientReceive`
//!   denied: a subscription made while it was allowed stops delivering the moment its
//!   permission is withdrawn).
//! - role `sidenet-controller` (added to the controller's own broker user, which must also hold
//!   the plugin's admin role): everything under `sidenet/v1/`. The controller asks for its
//!   user's roles and adds this one only when missing: the plugin disconnects a client whose
//!   roles change, so the controller reconnects once, after the very first setup.
//! - the anonymous group's role `sidenet-anonymous`: every mesh's announcement, publishing to
//!   `sidenet/v1/+/enroll/+` (an enrolment counts only if signed by the key of the id in its
//!   topic), and — only while a node is *issued but not armed*, i.e. between approval and its
//!   first login with its password — that node's own `config`/`ack` (read) and
//!   `status`/`online` (write) topics.
//! - per node: client `ID` (username = node id, bound to client id `ID`, the password of
//!   [`crate::reconcile::credentials::node_password`]) with role `sidenet-node-ID`: the announcement, its own
//!   `config` and `ack` (read), its own `enroll`, `status` and `online` (write).
//!
//! Once a node is armed its anonymous entries are removed (and its enrolment topic denied to
//! anonymous clients, priority 10): a connection claiming its client id without its password
//! gets nothing of it. (Mosquitto still lets such a connection take over
//! the session — the node is disconnected, then reconnects with its password and takes it
//! back — a nuisance, not a read or a write. The embedded broker refuses the connection.)

use serde_json::{Value, json};

use crate::reconcile::credentials::Credential;

/// The plugin's command topic.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where the plugin answers.
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// The controller's role.
pub const CONTROLLER_ROLE: &str = "sidenet-controller";
/// The anonymous group and its role.
pub const ANONYMOUS: &str = "sidenet-anonymous";

fn node_role(node: &str) -> String {
    format!("sidenet-node-{node}")
}

fn acl(acltype: &str, topic: &str, allow: bool) -> Value {
    json!({ "acltype": acltype, "topic": topic, "priority": 0, "allow": allow })
}

/// The topics a node reads and writes, by (subscribe-and-receive, send).
fn node_topics(mesh: &str, node: &str) -> (Vec<String>, Vec<String>) {
    let base = format!("sidenet/v1/{mesh}");
    (
        vec![
            format!("{base}/announce"),
            sidenet_wire::topics::announce_shard(mesh, node),
            format!("{base}/nodes/{node}/config"),
            format!("{base}/nodes/{node}/ack"),
        ],
        vec![
            format!("{base}/enroll/{node}"),
            format!("{base}/nodes/{node}/status"),
            format!("{base}/nodes/{node}/online"),
        ],
    )
}

/// What an enrolling (issued, not armed) node may do without its password: its own topics
/// except the announcement and enrolment, which every anonymous client has anyway.
fn window_acls(mesh: &str, node: &str) -> Vec<Value> {
    let base = format!("sidenet/v1/{mesh}/nodes/{node}");
    let mut out = Vec::new();
    for t in ["config", "ack"] {
        let topic = format!("{base}/{t}");
        out.push(acl("subscribeLiteral", &topic, true));
        out.push(acl("publishClientReceive", &topic, true));
    }
    for t in ["status", "online"] {
        out.push(acl("publishClientSend", &format!("{base}/{t}"), true));
    }
    out
}

fn add_acls(role: &str, acls: Vec<Value>) -> impl Iterator<Item = Value> + '_ {
    acls.into_iter().map(move |mut a| {
        a["command"] = json!("addRoleACL");
        a["rolename"] = json!(role);
        a
    })
}

fn remove_acls(role: &str, acls: Vec<Value>) -> impl Iterator<Item = Value> + '_ {
    acls.into_iter().map(move |a| {
        json!({
            "command": "removeRoleACL",
            "rolename": role,
            "acltype": a["acltype"],
            "topic": a["topic"],
        })
    })
}

/// The commands that set the plugin up for `meshes` (network names), with `controller_user`
/// the controller's own broker user. Safe to send again: "already exists" answers are expected.
pub fn setup(controller_user: &str, meshes: &[String]) -> Vec<Value> {
    let mut out = vec![
        json!({
            "command": "setDefaultACLAccess",
            "acls": [
                { "acltype": "publishClientSend", "allow": false },
                { "acltype": "publishClientReceive", "allow": false },
                { "acltype": "subscribe", "allow": false },
                { "acltype": "unsubscribe", "allow": true },
            ],
        }),
        json!({
            "command": "createRole",
            "rolename": CONTROLLER_ROLE,
            "acls": [
                acl("subscribePattern", "sidenet/v1/#", true),
                acl("publishClientSend", "sidenet/v1/#", true),
                acl("publishClientReceive", "sidenet/v1/#", true),
            ],
        }),
        // Whether the controller's user holds its role: answered with the user's roles, see
        // [`controller_role_missing`]. (Adding a role disconnects the user's clients, so it is
        // added only when missing.)
        json!({ "command": "getClient", "username": controller_user }),
        json!({ "command": "createRole", "rolename": ANONYMOUS, "acls": [] }),
        json!({ "command": "createGroup", "groupname": ANONYMOUS }),
        json!({ "command": "addGroupRole", "groupname": ANONYMOUS, "rolename": ANONYMOUS }),
        json!({ "command": "setAnonymousGroup", "groupname": ANONYMOUS }),
    ];
    for mesh in meshes {
        let announce = format!("sidenet/v1/{mesh}/announce");
        let shards = format!("{announce}/+");
        out.extend(add_acls(
            ANONYMOUS,
            vec![
                acl("subscribeLiteral", &announce, true),
                acl("publishClientReceive", &announce, true),
                acl("subscribePattern", &shards, true),
                acl("publishClientReceive", &shards, true),
                acl(
                    "publishClientSend",
                    &format!("sidenet/v1/{mesh}/enroll/+"),
                    true,
                ),
            ],
        ));
    }
    out
}

/// The plugin commands for credential changes from the core.
pub fn commands(changes: &[Credential]) -> Vec<Value> {
    let mut out = Vec::new();
    for c in changes {
        match c {
            Credential::Issue {
                mesh,
                node,
                password,
            } => {
                let role = node_role(node);
                let (read, write) = node_topics(mesh, node);
                let mut acls = Vec::new();
                for t in &read {
                    acls.push(acl("subscribeLiteral", t, true));
                    acls.push(acl("publishClientReceive", t, true));
                }
                for t in &write {
                    acls.push(acl("publishClientSend", t, true));
                }
                out.push(json!({ "command": "createRole", "rolename": role, "acls": acls }));
                out.push(json!({
                    "command": "createClient",
                    "username": node,
                    "password": password,
                    "clientid": node,
                    "roles": [{ "rolename": role }],
                }));
                // When the client existed (a controller restart, a new mesh secret).
                out.push(json!({
                    "command": "setClientPassword",
                    "username": node,
                    "password": password,
                }));
                out.extend(add_acls(ANONYMOUS, window_acls(mesh, node)));
            }
            Credential::Arm { mesh, node } => {
                out.extend(remove_acls(ANONYMOUS, window_acls(mesh, node)));
                // Its enrolment topic too (anonymous clients may otherwise publish to any).
                let mut deny = acl(
                    "publishClientSend",
                    &format!("sidenet/v1/{mesh}/enroll/{node}"),
                    false,
                );
                deny["priority"] = json!(10);
                out.extend(add_acls(ANONYMOUS, vec![deny]));
            }
            Credential::Revoke { mesh, node } => {
                out.extend(remove_acls(ANONYMOUS, window_acls(mesh, node)));
                out.extend(remove_acls(
                    ANONYMOUS,
                    vec![acl(
                        "publishClientSend",
                        &format!("sidenet/v1/{mesh}/enroll/{node}"),
                        false,
                    )],
                ));
                out.push(json!({ "command": "deleteClient", "username": node }));
                out.push(json!({ "command": "deleteRole", "rolename": node_role(node) }));
            }
        }
    }
    out
}

/// Command messages for the plugin: `commands` in payloads of at most `per_message` commands.
pub fn messages(commands: Vec<Value>, per_message: usize) -> Vec<Vec<u8>> {
    commands
        .chunks(per_message.max(1))
        .map(|c| serde_json::to_vec(&json!({ "commands": c })).unwrap_or_default())
        .collect()
}

/// The command that gives the controller's user its role, if `payload` (a plugin response)
/// shows the user without it.
pub fn controller_role_missing(payload: &[u8], controller_user: &str) -> Option<Value> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let client = v["responses"].as_array()?.iter().find(|r| {
        r["command"] == "getClient" && r["data"]["client"]["username"] == controller_user
    })?;
    let has = client["data"]["client"]["roles"]
        .as_array()
        .is_some_and(|roles| roles.iter().any(|r| r["rolename"] == CONTROLLER_ROLE));
    (!has).then(|| {
        json!({ "command": "addClientRole", "username": controller_user, "rolename": CONTROLLER_ROLE })
    })
}

/// Errors in a plugin response other than the expected "already exists" / "not found" of
/// idempotent commands, as `command: error` lines.
pub fn response_errors(payload: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return vec!["unreadable response from the dynamic security plugin".into()];
    };
    let Some(responses) = v["responses"].as_array() else {
        return Vec::new();
    };
    responses
        .iter()
        .filter_map(|r| {
            let err = r["error"].as_str()?;
            let lower = err.to_ascii_lowercase();
            let command = r["command"].as_str().unwrap_or("?");
            // Mosquitto 2.0 answers "Internal error" to adding a role a client already has.
            if lower.contains("already")
                || lower.contains("not found")
                || (command == "addClientRole" && lower.contains("internal error"))
            {
                return None;
            }
            Some(format!("{command}: {err}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_node_loses_its_anonymous_window() {
        let issue = commands(&[Credential::Issue {
            mesh: "riverside".into(),
            node: "aaaaaaaaaaaaaaaa".into(),
            password: "pw".into(),
        }]);
        let added: Vec<&Value> = issue
            .iter()
            .filter(|c| c["command"] == "addRoleACL")
            .collect();
        assert_eq!(added.len(), 6);
        assert!(added.iter().all(|c| {
            c["rolename"] == ANONYMOUS
                && c["topic"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("sidenet/v1/riverside/nodes/aaaaaaaaaaaaaaaa/"))
        }));
        let arm = commands(&[Credential::Arm {
            mesh: "riverside".into(),
            node: "aaaaaaaaaaaaaaaa".into(),
        }]);
        assert_eq!(arm.len(), 7);
        assert_eq!(arm[6]["command"], "addRoleACL");
        assert_eq!(arm[6]["allow"], false);
        assert_eq!(
            arm[6]["topic"],
            "sidenet/v1/riverside/enroll/aaaaaaaaaaaaaaaa"
        );
        for (a, r) in added.iter().zip(&arm) {
            assert_eq!(r["command"], "removeRoleACL");
            assert_eq!(a["topic"], r["topic"]);
            assert_eq!(a["acltype"], r["acltype"]);
        }
        assert!(issue.iter().any(|c| c["command"] == "createClient"
            && c["clientid"] == "aaaaaaaaaaaaaaaa"
            && c["username"] == "aaaaaaaaaaaaaaaa"));
        // No wildcard in any per-node rule.
        assert!(
            issue
                .iter()
                .filter_map(|c| c["topic"].as_str())
                .all(|t| !t.contains(['+', '#']))
        );
        assert_eq!(messages(issue, 4).len(), 3);
    }

    #[test]
    fn the_controller_role_is_added_only_when_missing() {
        let without = br#"{"responses":[{"command":"getClient","data":{"client":{"username":"admin","roles":[{"rolename":"admin"}]}}}]}"#;
        let with = br#"{"responses":[{"command":"getClient","data":{"client":{"username":"admin","roles":[{"rolename":"admin"},{"rolename":"sidenet-controller"}]}}}]}"#;
        assert!(
            controller_role_missing(without, "admin")
                .is_some_and(|c| c["command"] == "addClientRole")
        );
        assert!(controller_role_missing(with, "admin").is_none());
        assert!(controller_role_missing(without, "other").is_none());
    }

    #[test]
    fn idempotent_errors_are_quiet() {
        let r = br#"{"responses":[{"command":"createRole","error":"Role already exists"},{"command":"deleteClient","error":"Client not found"},{"command":"addRoleACL","error":"Internal error"},{"command":"createClient"}]}"#;
        assert_eq!(response_errors(r), vec!["addRoleACL: Internal error"]);
    }
}
