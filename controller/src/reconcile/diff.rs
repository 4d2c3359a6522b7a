//! What a manifest change would publish (`sidenetctl plan`): the report's types, the
//! comparison of two configs file by file, unified diffs and secret masking. Pure: the core
//! ([`crate::reconcile::core::Controller::plan_changes`]) decides which nodes change and hands
//! the old and new configs in.

use serde::{Deserialize, Serialize};
use sidenet_wire::Revision;
use sidenet_wire::messages::NodeConfig;

/// Put in place of a secret wherever it would appear in a diff.
pub const MASK: &str = "(secret masked)";

/// Lines of context around each change of a unified diff.
const CONTEXT: usize = 3;

/// Above this many line pairs (old × new lines) a file is shown as wholly replaced instead of
/// being diffed line by line (the comparison is quadratic).
const MAX_DIFF_CELLS: usize = 4_000_000;

/// What the controller would do to one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Its first config: a revision is published where none was.
    Create,
    /// A new revision replaces the published one.
    Update,
}

/// A node that would get no new config, and why (its published config, if any, stays).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockedNode {
    /// Node id.
    pub node: String,
    /// MeshNode name, when a manifest names the node.
    pub name: Option<String>,
    /// Mesh network name (empty when the node's mesh is not in the manifests).
    pub mesh: String,
    /// Why.
    pub reason: String,
    /// The revision published now, if any (it stays in force).
    pub published: Option<Revision>,
    /// The running controller gives another reason, or none, now (always true offline: a
    /// stopped controller's reasons are not kept).
    pub new: bool,
}

/// How one file of a config changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileAction {
    /// A file the published config did not have.
    Added,
    /// A file the new config no longer has.
    Removed,
    /// Content or mode changed.
    Modified,
}

/// One changed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileChange {
    /// Path inside the config (`FileSpec::path`).
    pub path: String,
    /// What happens to it.
    pub change: FileAction,
    /// Unix mode before (`None`: the file is added).
    pub old_mode: Option<u32>,
    /// Unix mode after (`None`: the file is removed).
    pub new_mode: Option<u32>,
    /// Unified diff of the content (secrets masked), `---`/`+++` lines included; empty when
    /// only the mode changed, or when the content differs only in masked secrets.
    pub diff: String,
    /// The content differs only where secrets are masked (`diff` is then empty).
    pub secrets_only: bool,
}

/// A config field other than files that changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// `hostname`, `role`, `profile`, `family`, `subnet`, `addresses`, `actions` or `requires`.
    pub field: String,
    /// Before, as JSON text (`None` for a node's first config).
    pub old: Option<String>,
    /// After, as JSON text.
    pub new: String,
}

/// A sealed secret whose sealed value changes (the secret itself is never shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretChange {
    /// Its name in `NodeConfig::sealed`.
    pub name: String,
    /// `added`, `removed` or `resealed`.
    pub change: String,
}

/// One node the plan changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeChange {
    /// Node id.
    pub node: String,
    /// MeshNode name, when a manifest names the node.
    pub name: Option<String>,
    /// Mesh network name (empty when the node's mesh is not in the manifests).
    pub mesh: String,
    /// What happens.
    pub action: Action,
    /// The revision now published, if any.
    pub previous: Option<Revision>,
    /// The revision that would be published.
    pub revision: Revision,
    /// Why a revision without a content change is published, if that is the case.
    pub reason: Option<String>,
    /// Changed config fields other than files.
    pub fields: Vec<FieldChange>,
    /// Changed files, by path.
    pub files: Vec<FileChange>,
    /// Sealed secrets that change.
    pub secrets: Vec<SecretChange>,
}

/// Counts over every node considered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Nodes that would get their first revision.
    pub create: usize,
    /// Nodes that would get a new revision.
    pub update: usize,
    /// Nodes that would get no config (listed in [`PlanReport::blocked`]).
    pub blocked: usize,
    /// Nodes whose published config stays as it is (including nodes whose new content is
    /// withheld because it failed on them).
    pub unchanged: usize,
    /// Nodes whose MeshNode the manifests delete (Kubernetes mode only: listed in
    /// [`PlanReport::removed`]); `None` (and left out of the JSON) in standalone mode, where
    /// a node leaves only by `sidenetctl remove`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove: Option<usize>,
}

/// A node whose MeshNode the manifests delete (Kubernetes mode): its finalizer clears its
/// retained config and revokes its broker login, and the controller forgets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemovedNode {
    /// Node id.
    pub node: String,
    /// MeshNode name.
    pub name: String,
    /// Mesh network name.
    pub mesh: String,
    /// The revision published now, if any (cleared).
    pub published: Option<Revision>,
}

/// A plan: every node that changes, and the counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanReport {
    /// Nodes that would get a new revision, by node id.
    pub changes: Vec<NodeChange>,
    /// Nodes that would get no config, by node id.
    pub blocked: Vec<BlockedNode>,
    /// Nodes whose MeshNode is deleted, by node id (Kubernetes mode; left out of the JSON
    /// when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<RemovedNode>,
    /// Counts.
    pub summary: Summary,
}

impl PlanReport {
    /// Whether any node would get a new revision (the `sidenetctl plan` exit code 2).
    pub fn changes_anything(&self) -> bool {
        !self.changes.is_empty() || !self.removed.is_empty()
    }

    /// The plan as `sidenetctl plan` prints it (docs/rollouts.md, "Text output").
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for c in &self.changes {
            let who = match &c.name {
                Some(n) => format!("{} ({n})", c.node),
                None => c.node.clone(),
            };
            let line = match (c.action, &c.previous) {
                (Action::Update, Some(p)) if p.epoch != c.revision.epoch => format!(
                    "~ update {who} in mesh {}: rev {} -> rev {} (new epoch {})",
                    c.mesh, p.rev, c.revision.rev, c.revision.epoch
                ),
                (Action::Update, Some(p)) => format!(
                    "~ update {who} in mesh {}: rev {} -> rev {}",
                    c.mesh, p.rev, c.revision.rev
                ),
                _ => format!("+ create {who} in mesh {}: rev {}", c.mesh, c.revision.rev),
            };
            out.push_str(&line);
            out.push('\n');
            if let Some(r) = &c.reason {
                out.push_str(&format!("    reason: {r}\n"));
            }
            for f in &c.fields {
                out.push_str(&format!(
                    "    field {}: {} -> {}\n",
                    f.field,
                    f.old.as_deref().unwrap_or("(none)"),
                    f.new
                ));
            }
            for s in &c.secrets {
                out.push_str(&format!("    sealed secret {}: {}\n", s.name, s.change));
            }
            for f in &c.files {
                let mode = |m: Option<u32>| m.map_or("-".to_string(), |m| format!("{m:o}"));
                match f.change {
                    FileAction::Modified if f.old_mode != f.new_mode => out.push_str(&format!(
                        "    file {}: mode {} -> {}\n",
                        f.path,
                        mode(f.old_mode),
                        mode(f.new_mode)
                    )),
                    FileAction::Added => out.push_str(&format!(
                        "    file {}: added, mode {}\n",
                        f.path,
                        mode(f.new_mode)
                    )),
                    FileAction::Removed => {
                        out.push_str(&format!("    file {}: removed\n", f.path));
                    }
                    FileAction::Modified => {}
                }
                if f.secrets_only {
                    out.push_str(&format!(
                        "    file {}: differs only in masked secrets\n",
                        f.path
                    ));
                }
            }
            for f in &c.files {
                out.push_str(&f.diff);
            }
        }
        for b in &self.blocked {
            let who = match &b.name {
                Some(n) => format!("{} ({n})", b.node),
                None => b.node.clone(),
            };
            let kept = b
                .published
                .map_or(String::new(), |r| format!(", rev {} stays", r.rev));
            let new = if b.new { "" } else { " (as now)" };
            out.push_str(&format!(
                "! blocked {who} in mesh {}{kept}{new}: {}\n",
                b.mesh, b.reason
            ));
        }
        for r in &self.removed {
            let rev = r
                .published
                .map_or(String::new(), |p| format!(", rev {} cleared", p.rev));
            out.push_str(&format!(
                "- remove {} ({}) in mesh {}{rev}: its MeshNode is deleted\n",
                r.node, r.name, r.mesh
            ));
        }
        if !self.changes.is_empty() || !self.blocked.is_empty() || !self.removed.is_empty() {
            out.push('\n');
        }
        let s = &self.summary;
        let remove = s
            .remove
            .map_or(String::new(), |r| format!("{r} to remove, "));
        out.push_str(&format!(
            "Plan: {} to create, {} to update, {remove}{} blocked, {} unchanged.\n",
            s.create, s.update, s.blocked, s.unchanged
        ));
        out
    }
}

/// Replaces every occurrence of each secret in `text` with [`MASK`].
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), MASK);
    }
    out
}

/// Compares the published config `old` (`None`: the node has none) with `new`: the changed
/// fields, files and sealed secrets, secrets masked.
pub fn compare(
    old: Option<&NodeConfig>,
    new: &NodeConfig,
    secrets: &[String],
) -> (Vec<FieldChange>, Vec<FileChange>, Vec<SecretChange>) {
    let json = |v: serde_json::Value| mask(&v.to_string(), secrets);
    let field_pairs = |c: &NodeConfig| -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("hostname", serde_json::json!(c.hostname)),
            ("role", serde_json::json!(c.role)),
            ("profile", serde_json::json!(c.profile)),
            ("family", serde_json::json!(c.family)),
            ("subnet", serde_json::json!(c.subnet)),
            ("addresses", serde_json::json!(c.addresses)),
            ("actions", serde_json::json!(c.actions)),
            ("requires", serde_json::json!(c.requires)),
        ]
    };
    let old_fields = old.map(field_pairs);
    let mut fields = Vec::new();
    for (i, (name, value)) in field_pairs(new).into_iter().enumerate() {
        let before = old_fields.as_ref().map(|f| f[i].1.clone());
        if before.as_ref() != Some(&value) {
            fields.push(FieldChange {
                field: name.to_string(),
                old: before.map(json),
                new: json(value),
            });
        }
    }
    let empty = Vec::new();
    let old_files = old.map_or(&empty, |o| &o.files);
    let mut paths: Vec<&str> = old_files
        .iter()
        .chain(&new.files)
        .map(|f| f.path.as_str())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    let mut files = Vec::new();
    for p in paths {
        let a = old_files.iter().find(|f| f.path == p);
        let b = new.files.iter().find(|f| f.path == p);
        let (change, old_text, new_text) = match (a, b) {
            (Some(a), Some(b)) if a.content == b.content && a.mode == b.mode => continue,
            (Some(a), Some(b)) => (FileAction::Modified, Some(&a.content), Some(&b.content)),
            (None, Some(b)) => (FileAction::Added, None, Some(&b.content)),
            (Some(a), None) => (FileAction::Removed, Some(&a.content), None),
            (None, None) => continue,
        };
        let (old_masked, new_masked) = (
            old_text.map(|t| mask(t, secrets)),
            new_text.map(|t| mask(t, secrets)),
        );
        let secrets_only = old_text != new_text && old_masked == new_masked;
        let diff = if old_masked == new_masked {
            String::new()
        } else {
            unified(p, old_masked.as_deref(), new_masked.as_deref())
        };
        files.push(FileChange {
            path: p.to_string(),
            change,
            old_mode: a.map(|f| f.mode),
            new_mode: b.map(|f| f.mode),
            diff,
            secrets_only,
        });
    }
    let mut names: Vec<&String> = new
        .sealed
        .keys()
        .chain(old.map(|o| o.sealed.keys()).into_iter().flatten())
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut sealed = Vec::new();
    for n in names {
        let a = old.and_then(|o| o.sealed.get(n));
        let b = new.sealed.get(n);
        let change = match (a, b) {
            (Some(a), Some(b)) if a == b => continue,
            (Some(_), Some(_)) => "resealed",
            (None, Some(_)) => "added",
            (Some(_), None) => "removed",
            (None, None) => continue,
        };
        sealed.push(SecretChange {
            name: n.clone(),
            change: change.to_string(),
        });
    }
    (fields, files, sealed)
}

/// One step of a line edit script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Same(usize, usize),
    Del(usize),
    Ins(usize),
}

/// The shortest edit script from `a` to `b` by longest common subsequence.
fn edit_script(a: &[&str], b: &[&str]) -> Vec<Op> {
    // Common head and tail first: most config edits touch a few lines of a long file.
    let head = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let tail = a[head..]
        .iter()
        .rev()
        .zip(b[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[head..a.len() - tail], &b[head..b.len() - tail]);
    let mut ops: Vec<Op> = (0..head).map(|i| Op::Same(i, i)).collect();
    let (n, m) = (am.len(), bm.len());
    if n.saturating_mul(m) > MAX_DIFF_CELLS {
        ops.extend((0..n).map(|i| Op::Del(head + i)));
        ops.extend((0..m).map(|j| Op::Ins(head + j)));
    } else {
        // lcs[i][j]: length of the LCS of am[i..] and bm[j..].
        let w = m + 1;
        let mut lcs = vec![0u32; (n + 1) * w];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i * w + j] = if am[i] == bm[j] {
                    lcs[(i + 1) * w + j + 1] + 1
                } else {
                    lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && am[i] == bm[j] {
                ops.push(Op::Same(head + i, head + j));
                i += 1;
                j += 1;
            } else if i < n && (j == m || lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) {
                // Deletions before insertions, as diff -u prints them.
                ops.push(Op::Del(head + i));
                i += 1;
            } else {
                ops.push(Op::Ins(head + j));
                j += 1;
            }
        }
    }
    let (a0, b0) = (a.len() - tail, b.len() - tail);
    ops.extend((0..tail).map(|k| Op::Same(a0 + k, b0 + k)));
    ops
}

/// A unified diff (`diff -u` format, 3 lines of context) of `old` → `new` for file `path`:
/// `--- a/PATH` and `+++ b/PATH` (`/dev/null` for a missing side), then the hunks. A file whose
/// last line has no newline gets `\ No newline at end of file` after that line.
pub fn unified(path: &str, old: Option<&str>, new: Option<&str>) -> String {
    let a: Vec<&str> = old.map_or_else(Vec::new, |t| t.split_inclusive('\n').collect());
    let b: Vec<&str> = new.map_or_else(Vec::new, |t| t.split_inclusive('\n').collect());
    let ops = edit_script(&a, &b);
    let mut out = format!(
        "--- {}\n+++ {}\n",
        if old.is_some() {
            format!("a/{path}")
        } else {
            "/dev/null".into()
        },
        if new.is_some() {
            format!("b/{path}")
        } else {
            "/dev/null".into()
        },
    );
    // Hunks: runs of changes with up to CONTEXT lines around, merged when they touch.
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| !matches!(o, Op::Same(..)))
        .map(|(k, _)| k)
        .collect();
    let mut k = 0;
    while k < changed.len() {
        let start = changed[k].saturating_sub(CONTEXT);
        let mut end = changed[k];
        while k < changed.len() && changed[k] <= end + 2 * CONTEXT + 1 {
            end = changed[k];
            k += 1;
        }
        let end = (end + CONTEXT + 1).min(ops.len());
        let hunk = &ops[start..end];
        let (mut a_start, mut b_start) = (None, None);
        let (mut a_len, mut b_len) = (0, 0);
        for o in hunk {
            match *o {
                Op::Same(i, j) => {
                    a_start.get_or_insert(i);
                    b_start.get_or_insert(j);
                    a_len += 1;
                    b_len += 1;
                }
                Op::Del(i) => {
                    a_start.get_or_insert(i);
                    a_len += 1;
                }
                Op::Ins(j) => {
                    b_start.get_or_insert(j);
                    b_len += 1;
                }
            }
        }
        // An empty side is numbered by the line before it (0 at the top), as diff -u does.
        let pos = |start: Option<usize>, len: usize, before: usize| match (start, len) {
            (_, 0) => format!("{before},0"),
            (Some(s), 1) => format!("{}", s + 1),
            (Some(s), l) => format!("{},{l}", s + 1),
            (None, l) => format!("{before},{l}"),
        };
        let a_before = ops[..start]
            .iter()
            .filter(|o| !matches!(o, Op::Ins(_)))
            .count();
        let b_before = ops[..start]
            .iter()
            .filter(|o| !matches!(o, Op::Del(_)))
            .count();
        out.push_str(&format!(
            "@@ -{} +{} @@\n",
            pos(a_start, a_len, a_before),
            pos(b_start, b_len, b_before)
        ));
        for o in hunk {
            let (sign, line) = match *o {
                Op::Same(i, _) => (' ', a[i]),
                Op::Del(i) => ('-', a[i]),
                Op::Ins(j) => ('+', b[j]),
            };
            out.push(sign);
            out.push_str(line);
            if !line.ends_with('\n') {
                out.push_str("\n\\ No newline at end of file\n");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unified_diff_has_hunks_with_context_like_diff_u() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n";
        let new = "a\nb\nc\nd\nE\nf\ng\nh\ni\nj\nk\n";
        assert_eq!(
            unified("x", Some(old), Some(new)),
            "--- a/x\n+++ b/x\n@@ -2,9 +2,10 @@\n b\n c\n d\n-e\n+E\n f\n g\n h\n i\n j\n+k\n"
        );
    }

    #[test]
    fn distant_changes_get_their_own_hunks() {
        let old: String = (1..=20).map(|i| format!("{i}\n")).collect();
        let new = old
            .replacen("2\n", "two\n", 1)
            .replacen("19\n", "nineteen\n", 1);
        assert_eq!(
            unified("x", Some(&old), Some(&new)),
            "--- a/x\n+++ b/x\n@@ -1,5 +1,5 @@\n 1\n-2\n+two\n 3\n 4\n 5\n@@ -16,5 +16,5 @@\n 16\n 17\n 18\n-19\n+nineteen\n 20\n"
        );
    }

    #[test]
    fn close_changes_share_a_hunk_and_new_files_start_at_zero() {
        let d = unified("x", Some("1\n2\n3\n4\n"), Some("1\nX\n3\nY\n"));
        assert_eq!(
            d,
            "--- a/x\n+++ b/x\n@@ -1,4 +1,4 @@\n 1\n-2\n+X\n 3\n-4\n+Y\n"
        );
        assert_eq!(
            unified("y", None, Some("p\nq")),
            "--- /dev/null\n+++ b/y\n@@ -0,0 +1,2 @@\n+p\n+q\n\\ No newline at end of file\n"
        );
        assert_eq!(
            unified("y", Some("p\n"), None),
            "--- a/y\n+++ /dev/null\n@@ -1 +0,0 @@\n-p\n"
        );
    }

    #[test]
    fn secrets_are_masked_in_files_and_fields_and_sealed_values_never_shown() {
        let mk = |content: &str, sealed: &str| NodeConfig {
            mesh: "m".into(),
            node: "n".into(),
            hostname: "h".into(),
            role: "router".into(),
            profile: "p".into(),
            family: "linux".into(),
            subnet: "s".into(),
            addresses: vec![],
            files: vec![sidenet_wire::messages::FileSpec {
                path: "etc/f".into(),
                mode: 0o600,
                content: content.into(),
            }],
            actions: vec![],
            sealed: [("mesh-passphrase".to_string(), sealed.to_string())].into(),
            requires: vec![],
        };
        let (fields, files, sealed) = compare(
            Some(&mk("key=hunter2\nx=1\n", "AAA")),
            &mk("key=swordfish\nx=2\n", "BBB"),
            &["hunter2".into(), "swordfish".into()],
        );
        assert!(fields.is_empty());
        assert_eq!(files.len(), 1);
        assert!(!files[0].diff.contains("hunter2") && !files[0].diff.contains("swordfish"));
        assert!(files[0].diff.contains(MASK) && !files[0].secrets_only);
        let (_, files, _) = compare(
            Some(&mk("key=hunter2\n", "AAA")),
            &mk("key=swordfish\n", "AAA"),
            &["hunter2".into(), "swordfish".into()],
        );
        assert!(files[0].secrets_only && files[0].diff.is_empty());
        assert_eq!(sealed[0].change, "resealed");
        assert!(!serde_json::to_string(&sealed).unwrap().contains("BBB"));
    }
}
