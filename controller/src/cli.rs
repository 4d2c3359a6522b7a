//! Helpers shared by the two command-line programs (`sidenet-controller`, `sidenetctl`):
//! output that ends cleanly on a closed pipe, shell completions, and the default paths.

use std::io::Write;
use std::path::PathBuf;

/// Writes `text` to standard output. A reader that went away (`sidenetctl status | head -1`)
/// ends the program quietly with exit status 0, as the reader asked for no more; any other
/// write error ends it with status 1 and a message.
pub fn stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        exit_on_write_error(&e);
    }
}

/// Writes `text` to standard error, ignoring a closed stream (there is nobody to tell).
pub fn stderr(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
}

fn exit_on_write_error(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    stderr(&format!("cannot write to standard output: {e}\n"));
    std::process::exit(1);
}

/// Prints like `println!`, through [`stdout`].
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::stdout("\n") };
    ($($arg:tt)*) => { $crate::cli::stdout(&format!("{}\n", format_args!($($arg)*))) };
}

/// Prints like `print!`, through [`stdout`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::stdout(&format!($($arg)*)) };
}

/// Prints like `eprintln!`, through [`stderr`].
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::cli::stderr(&format!("{}\n", format_args!($($arg)*))) };
}

/// The shells `completions` can write a script for.
pub use clap_complete::Shell;

/// Writes the completion script of the program described by `cmd` for `shell` to stdout.
pub fn completions(shell: Shell, mut cmd: clap::Command) {
    let name = cmd.get_name().to_string();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    stdout(&String::from_utf8_lossy(&buf));
}

/// Default hardware profile folder, relative to the working directory.
pub const DEFAULT_PROFILES: &str = "hardware-profiles";

/// The hardware profile folders to load. Folders given explicitly must exist; without any,
/// `hardware-profiles/` is used when the working directory has one (the repository root), and
/// otherwise none (the manifests may carry their own `HardwareProfile`s).
pub fn profile_folders(given: Option<Vec<PathBuf>>) -> Result<Vec<PathBuf>, String> {
    match given {
        Some(paths) => {
            for p in &paths {
                if !p.exists() {
                    return Err(format!(
                        "--profiles {}: no such file or folder{}",
                        p.display(),
                        relative_hint(p)
                    ));
                }
            }
            Ok(paths)
        }
        None => {
            let p = PathBuf::from(DEFAULT_PROFILES);
            Ok(if p.is_dir() { vec![p] } else { Vec::new() })
        }
    }
}

/// ` (relative to DIR)` for a relative path, to say where it was looked for.
pub fn relative_hint(p: &std::path::Path) -> String {
    if p.is_absolute() {
        return String::new();
    }
    match std::env::current_dir() {
        Ok(cwd) => format!(" (relative to {})", cwd.display()),
        Err(_) => String::new(),
    }
}

/// The public key and join code of mesh `mesh` (network name), read from the standalone
/// controller's state folder (`STATE/keys/MESH.key`, which the controller writes when it first
/// loads the mesh). See `sidenet_wire::join` for how the code is made.
pub fn join_code(
    state: &std::path::Path,
    mesh: &str,
) -> Result<(sidenet_wire::PublicKey, sidenet_wire::join::JoinCode), String> {
    sidenet_wire::names::check_mesh_name(mesh).map_err(|e| format!("--mesh {mesh:?}: {e}"))?;
    let path = state.join("keys").join(format!("{mesh}.key"));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "no signing key of mesh {mesh}: {}: {e} (the standalone controller creates it when it loads a Mesh whose network name is {mesh}: run this where its --state is, or pass --state)",
            path.display()
        )
    })?;
    let key = sidenet_wire::keys::KeyPair::from_file_text(&text)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .public();
    Ok((key, sidenet_wire::join::JoinCode::new(mesh, &key)))
}

/// `sidenetctl plan --offline`: the plan against a stopped controller's state folder, with the
/// controller's own secrets (a mesh new in the manifests gets its key there, as on a start).
pub fn plan_offline(
    files: &[std::path::PathBuf],
    state: &std::path::Path,
    templates: &std::path::Path,
) -> Result<crate::reconcile::diff::PlanReport, String> {
    let set = crate::spec::manifest::load(files).map_err(|e| e.to_string())?;
    let db = state.join("sidenet.redb");
    if !db.is_file() {
        return Err(format!(
            "--state {}: no controller state there ({} is missing)",
            state.display(),
            db.display()
        ));
    }
    let store = crate::reconcile::store::Store::open(&db, crate::now()).map_err(|e| {
        format!(
            "{}: {e} (a running controller holds it: plan without --offline)",
            db.display()
        )
    })?;
    let renderer =
        crate::reconcile::render::Renderer::load(templates).map_err(|e| e.to_string())?;
    let mut ctl = crate::reconcile::core::Controller::new(
        store,
        renderer,
        Box::new(crate::standalone::FsSecrets::new(state)),
    );
    ctl.plan_changes(set, crate::now())
        .map_err(|e| e.to_string())
}

/// The phases a node can be in, as `sidenetctl status` shows them.
pub const PHASES: [&str; 7] = [
    "Ready",
    "Configuring",
    "Offline",
    "Failed",
    "Blocked",
    "Pending",
    "Declared",
];

/// `sidenetctl status --phase/--mesh/--name`: which rows to show. Each given filter must
/// match; a filter given several times (or with commas) matches any of its values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusFilter {
    /// Phases (canonical spelling, see [`PHASES`]).
    pub phases: Vec<String>,
    /// Mesh network names, exactly.
    pub meshes: Vec<String>,
    /// Patterns matched against the MeshNode name, the hostname and the node id: `*` matches
    /// any run of characters and the pattern must match the whole value; without `*`, a
    /// case-insensitive substring.
    pub names: Vec<String>,
}

impl StatusFilter {
    /// Checks and normalises the `--phase` values (any case; `ready` is `Ready`).
    pub fn new(phases: &[String], meshes: &[String], names: &[String]) -> Result<Self, String> {
        let split = |v: &[String]| -> Vec<String> {
            v.iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let phases = split(phases)
            .into_iter()
            .map(|p| {
                PHASES
                    .iter()
                    .find(|k| k.eq_ignore_ascii_case(&p))
                    .map(|k| k.to_string())
                    .ok_or_else(|| {
                        format!("--phase {p}: not a phase (one of {})", PHASES.join(", "))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            phases,
            meshes: split(meshes),
            names: split(names),
        })
    }

    /// No filter given.
    pub fn is_empty(&self) -> bool {
        self.phases.is_empty() && self.meshes.is_empty() && self.names.is_empty()
    }

    /// Whether `r` passes.
    pub fn matches(&self, r: &crate::reconcile::model::StatusRow) -> bool {
        (self.phases.is_empty() || self.phases.contains(&r.phase))
            && (self.meshes.is_empty() || self.meshes.contains(&r.mesh))
            && (self.names.is_empty()
                || self.names.iter().any(|p| {
                    [
                        r.name.as_deref(),
                        r.hostname.as_deref(),
                        Some(r.node.as_str()),
                    ]
                    .into_iter()
                    .flatten()
                    .any(|v| name_matches(p, v))
                }))
    }
}

/// `*` globs match the whole value (case-insensitive); plain text is a substring.
fn name_matches(pattern: &str, value: &str) -> bool {
    let (p, v) = (pattern.to_lowercase(), value.to_lowercase());
    if !p.contains('*') {
        return v.contains(&p);
    }
    let parts: Vec<&str> = p.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !v.starts_with(first) || v.len() < first.len() + last.len() || !v.ends_with(last) {
        return false;
    }
    let mut rest = &v[first.len()..v.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The summary line under `sidenetctl status`: every node by phase (in [`PHASES`] order), then
/// how many the filters let through, e.g.
/// `50 nodes: 48 Ready, 2 Offline; 2 shown (--phase Offline)`.
pub fn status_summary(
    all: &[crate::reconcile::model::StatusRow],
    shown: usize,
    filter: &StatusFilter,
) -> String {
    let mut counts: Vec<String> = PHASES
        .iter()
        .filter_map(|p| {
            let n = all.iter().filter(|r| r.phase == *p).count();
            (n > 0).then(|| format!("{n} {p}"))
        })
        .collect();
    let other = all
        .iter()
        .filter(|r| !PHASES.contains(&r.phase.as_str()))
        .count();
    if other > 0 {
        counts.push(format!("{other} other"));
    }
    let plural = if all.len() == 1 { "node" } else { "nodes" };
    let mut line = format!("{} {plural}", all.len());
    if !counts.is_empty() {
        line.push_str(": ");
        line.push_str(&counts.join(", "));
    }
    if !filter.is_empty() {
        let mut given = Vec::new();
        for (flag, v) in [
            ("--phase", &filter.phases),
            ("--mesh", &filter.meshes),
            ("--name", &filter.names),
        ] {
            if !v.is_empty() {
                given.push(format!("{flag} {}", v.join(",")));
            }
        }
        line.push_str(&format!("; {shown} shown ({})", given.join(" ")));
    }
    line
}

#[cfg(test)]
mod status_tests {
    use super::*;
    use crate::reconcile::model::StatusRow;

    fn row(node: &str, name: Option<&str>, mesh: &str, phase: &str) -> StatusRow {
        StatusRow {
            node: node.into(),
            name: name.map(str::to_string),
            mesh: mesh.into(),
            hostname: Some(format!("host-{node}")),
            phase: phase.into(),
            reason: None,
            online: None,
            desired: None,
            applied: None,
            last_seen: None,
            address: None,
            failure: None,
            neighbours: vec![],
            probes: vec![],
            agent_version: None,
            agent_epoch: None,
            missing: vec![],
            shaping: None,
            services: Vec::new(),
        }
    }

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn filters_by_phase_mesh_and_name() -> Result<(), String> {
        let rows = [
            row("aaaa1111", Some("kitchen"), "riverside", "Ready"),
            row("bbbb2222", Some("garden-shed"), "riverside", "Offline"),
            row("cccc3333", None, "hilltop", "Ready"),
            row("dddd4444", Some("garden-gate"), "hilltop", "Failed"),
        ];
        let pick = |f: &StatusFilter| -> Vec<String> {
            rows.iter()
                .filter(|r| f.matches(r))
                .map(|r| r.node.clone())
                .collect()
        };
        let f = StatusFilter::new(&v(&["ready"]), &[], &[])?;
        assert_eq!(f.phases, v(&["Ready"]));
        assert_eq!(pick(&f), v(&["aaaa1111", "cccc3333"]));
        let f = StatusFilter::new(&v(&["Ready,failed"]), &v(&["hilltop"]), &[])?;
        assert_eq!(pick(&f), v(&["cccc3333", "dddd4444"]));
        let f = StatusFilter::new(&[], &[], &v(&["garden-*"]))?;
        assert_eq!(pick(&f), v(&["bbbb2222", "dddd4444"]));
        let f = StatusFilter::new(&[], &[], &v(&["*shed"]))?;
        assert_eq!(pick(&f), v(&["bbbb2222"]));
        let f = StatusFilter::new(&[], &[], &v(&["GATE"]))?;
        assert_eq!(pick(&f), v(&["dddd4444"]));
        // Hostnames and ids match too.
        let f = StatusFilter::new(&[], &[], &v(&["host-cccc*", "aaaa"]))?;
        assert_eq!(pick(&f), v(&["aaaa1111", "cccc3333"]));
        let f = StatusFilter::new(&[], &[], &v(&["g*n*e"]))?;
        assert_eq!(pick(&f), v(&["dddd4444"]));
        let e = StatusFilter::new(&v(&["Redy"]), &[], &[])
            .err()
            .unwrap_or_default();
        assert!(
            e.starts_with("--phase Redy: not a phase (one of Ready, "),
            "{e}"
        );
        // The summary counts every node, then what is shown.
        let f = StatusFilter::new(&v(&["Ready"]), &[], &[])?;
        assert_eq!(
            status_summary(&rows, 2, &f),
            "4 nodes: 2 Ready, 1 Offline, 1 Failed; 2 shown (--phase Ready)"
        );
        assert_eq!(
            status_summary(&rows, 4, &StatusFilter::default()),
            "4 nodes: 2 Ready, 1 Offline, 1 Failed"
        );
        assert_eq!(status_summary(&[], 0, &StatusFilter::default()), "0 nodes");
        Ok(())
    }
}
