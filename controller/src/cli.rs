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
