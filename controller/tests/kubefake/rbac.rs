//! RBAC as the API server evaluates it, for one subject: a request is allowed when one rule of
//! a Role bound in the request's namespace, or of a ClusterRole bound cluster-wide, grants its
//! verb on its group and resource (`resource/subresource`), and, when the rule lists
//! `resourceNames`, its object name (never for `create`, `list` or `watch`, which name none).

use super::Target;

/// One policy rule, as bound: `namespace` is the Role's namespace, `None` for a ClusterRole
/// bound with a ClusterRoleBinding.
#[derive(Clone, Debug)]
pub struct Rule {
    pub namespace: Option<String>,
    /// API group: `""` for the core group.
    pub group: String,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub names: Vec<String>,
}

impl Rule {
    pub fn new(namespace: Option<&str>, group: &str, resources: &[&str], verbs: &[&str]) -> Rule {
        Rule {
            namespace: namespace.map(str::to_string),
            group: group.to_string(),
            resources: resources.iter().map(|s| s.to_string()).collect(),
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
            names: Vec::new(),
        }
    }

    pub fn names(mut self, names: &[&str]) -> Rule {
        self.names = names.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// What RBAC sees of a request.
#[derive(Debug)]
pub struct Attributes {
    pub verb: &'static str,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Attributes {
    pub fn of(method: &http::Method, t: &Target, watch: bool) -> Attributes {
        let verb = match (method.as_str(), &t.name) {
            ("GET", None) if watch => "watch",
            ("GET", None) => "list",
            ("GET", Some(_)) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", None) => "deletecollection",
            ("DELETE", Some(_)) => "delete",
            _ => "unknown",
        };
        // `group/version/plural`, or `version/plural` for the core group.
        let mut parts: Vec<&str> = t.resource.split('/').collect();
        let plural = parts.pop().unwrap_or("").to_string();
        let group = if parts.len() == 2 { parts[0] } else { "" }.to_string();
        let resource = match &t.sub {
            Some(s) => format!("{plural}/{s}"),
            None => plural,
        };
        Attributes {
            verb,
            group,
            resource,
            namespace: t.namespace.clone(),
            name: t.name.clone(),
        }
    }

    /// The API server's 403 message.
    pub fn forbidden(&self, user: &str) -> String {
        let scope = match &self.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        let (res, sub) = match self.resource.split_once('/') {
            Some((r, s)) => (r, format!("/{s}")),
            None => (self.resource.as_str(), String::new()),
        };
        let name = self
            .name
            .as_ref()
            .map(|n| format!(" \"{n}\""))
            .unwrap_or_default();
        let qualified = if self.group.is_empty() {
            res.to_string()
        } else {
            format!("{res}.{}", self.group)
        };
        format!(
            "{qualified}{name} is forbidden: User \"{user}\" cannot {} resource \"{res}{sub}\" in API group \"{}\" {scope}",
            self.verb, self.group
        )
    }
}

/// Whether `rules` allow `a`.
pub fn allowed(rules: &[Rule], a: &Attributes) -> bool {
    rules.iter().any(|r| {
        let scope = match &r.namespace {
            None => true,
            Some(ns) => a.namespace.as_deref() == Some(ns.as_str()),
        };
        let names = r.names.is_empty()
            || a.name.as_ref().is_some_and(|n| {
                !matches!(a.verb, "create" | "list" | "watch") && r.names.contains(n)
            });
        scope
            && names
            && r.group == a.group
            && r.resources.iter().any(|x| *x == a.resource || x == "*")
            && r.verbs.iter().any(|v| v == a.verb || v == "*")
    })
}
