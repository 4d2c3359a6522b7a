//! `sidenetctl`: the sidenet admin CLI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::core::{Controller, Secrets, StatusRow};
use sidenet_controller::manifest::{self, ManifestSet};
use sidenet_controller::render::Renderer;
use sidenet_controller::store::Store;
use sidenet_crds::SecretKeyRef;
use sidenet_wire::keys::KeyPair;

#[derive(Debug, Parser)]
#[command(name = "sidenetctl", version, about = "sidenet admin CLI")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check manifests offline with the controller's own checks.
    Validate {
        /// Manifest files or folders.
        #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Hardware profile folder(s) to load with them (skipped if missing).
        #[arg(long, default_value = "hardware-profiles", value_delimiter = ',')]
        profiles: Vec<PathBuf>,
    },
    /// Show what a node would receive, before signing.
    Render {
        /// Node id or MeshNode name.
        #[arg(long)]
        node: String,
        /// Ask the running controller with this state folder (default when no -f is given).
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
        /// Render offline from these manifests instead.
        #[arg(short = 'f', long = "file")]
        files: Vec<PathBuf>,
        /// Hardware profile folder(s) for offline rendering.
        #[arg(long, default_value = "hardware-profiles", value_delimiter = ',')]
        profiles: Vec<PathBuf>,
        /// Template folder for offline rendering.
        #[arg(long, default_value = "templates")]
        templates: PathBuf,
        /// Print only this file's content.
        #[arg(long)]
        path: Option<String>,
    },
    /// Nodes: phase, online, desired vs applied revision, last seen.
    Status {
        /// State folder of the running controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
    /// Approve a pending node (approval mode).
    Approve {
        /// Node id or MeshNode name.
        node: String,
        /// State folder of the running controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
    },
    /// Create a single-use enrolment token (token mode). Shown once; only its hash is stored.
    Token {
        /// Mesh network name.
        #[arg(long)]
        mesh: String,
        /// Validity in hours.
        #[arg(long, default_value_t = 24)]
        hours: u64,
        /// State folder of the running controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
    },
    /// Generate an ed25519 key pair (secret written with mode 0600).
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sidenetctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn with_profiles(mut files: Vec<PathBuf>, profiles: Vec<PathBuf>) -> Vec<PathBuf> {
    files.extend(profiles.into_iter().filter(|p| p.exists()));
    files
}

fn run(args: Args) -> Result<ExitCode, String> {
    match args.cmd {
        Cmd::Validate { files, profiles } => {
            match manifest::load(&with_profiles(files, profiles)) {
                Ok(set) => {
                    println!(
                        "ok: {} mesh(es), {} node(s), {} hardware profile(s)",
                        set.meshes.len(),
                        set.nodes.len(),
                        set.profiles.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errs) => {
                    for e in &errs.0 {
                        println!("error: {e}");
                    }
                    eprintln!("{} error(s)", errs.0.len());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Render {
            node,
            state,
            files,
            profiles,
            templates,
            path,
        } => {
            let config = if files.is_empty() {
                match admin::call(&state, &Request::Render { node })? {
                    Response::Render { config } => *config,
                    Response::Error { message } => return Err(message),
                    other => return Err(format!("unexpected answer: {other:?}")),
                }
            } else {
                render_offline(&with_profiles(files, profiles), &templates, &node)?
            };
            match path {
                Some(p) => {
                    let f = config
                        .files
                        .iter()
                        .find(|f| f.path == p)
                        .ok_or_else(|| format!("the config has no file {p:?}"))?;
                    print!("{}", f.content);
                }
                None => {
                    let text = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
                    println!("{text}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { state, output } => match admin::call(&state, &Request::Status)? {
            Response::Status {
                nodes,
                manifest_errors,
                ..
            } => {
                match output {
                    Output::Json => {
                        let text =
                            serde_json::to_string_pretty(&nodes).map_err(|e| e.to_string())?;
                        println!("{text}");
                    }
                    Output::Table => print_table(&nodes),
                }
                for e in &manifest_errors {
                    eprintln!("manifest error (last good manifests still in force): {e}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        },
        Cmd::Approve { node, state } => match admin::call(&state, &Request::Approve { node })? {
            Response::Approved { node, published } => {
                println!("approved {node} ({published} config(s) published)");
                Ok(ExitCode::SUCCESS)
            }
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        },
        Cmd::Token { mesh, hours, state } => {
            match admin::call(
                &state,
                &Request::Token {
                    mesh,
                    ttl_s: hours * 3600,
                },
            )? {
                Response::Token { token, .. } => {
                    println!("{token}");
                    eprintln!("single-use, valid for {hours} h; give it to the agent with --token");
                    Ok(ExitCode::SUCCESS)
                }
                Response::Error { message } => Err(message),
                other => Err(format!("unexpected answer: {other:?}")),
            }
        }
        Cmd::Keygen { out } => {
            let seed = sidenet_controller::standalone::random32()?;
            let key = KeyPair::from_seed(&seed);
            write_new_secret(&out, &key.to_file_text())?;
            println!("public key: {}", key.public());
            println!("node id:    {}", key.public().node_id());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn write_new_secret(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Offline preview: the manifests' Secrets or a placeholder stand in for the passphrase.
struct PreviewSecrets;

impl Secrets for PreviewSecrets {
    fn mesh_key(&mut self, _: &str) -> Result<KeyPair, String> {
        Err("offline preview does not sign".into())
    }
    fn passphrase(&mut self, set: &ManifestSet, r: &SecretKeyRef) -> Result<String, String> {
        Ok(set
            .secrets
            .get(&r.name)
            .and_then(|s| s.get(&r.key))
            .cloned()
            .unwrap_or_else(|| format!("<generated: Secret {}/{}>", r.name, r.key)))
    }
}

fn render_offline(
    files: &[PathBuf],
    templates: &Path,
    node: &str,
) -> Result<sidenet_wire::messages::NodeConfig, String> {
    let set = manifest::load(files).map_err(|e| e.to_string())?;
    let renderer = Renderer::load(templates).map_err(|e| e.to_string())?;
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = Store::open(&tmp.path().join("preview.redb"), 0).map_err(|e| e.to_string())?;
    let mut ctl = Controller::new(store, renderer, Box::new(PreviewSecrets));
    ctl.set = set;
    ctl.preview(node).map_err(|e| e.to_string())
}

fn ago(t: Option<u64>) -> String {
    let Some(t) = t else { return "-".into() };
    let d = sidenet_controller::now().saturating_sub(t);
    match d {
        0..=119 => format!("{d}s"),
        120..=7199 => format!("{}m", d / 60),
        _ => format!("{}h", d / 3600),
    }
}

fn print_table(rows: &[StatusRow]) {
    let header = [
        "NODE",
        "NAME",
        "MESH",
        "PHASE",
        "ONLINE",
        "APPLIED",
        "DESIRED",
        "LAST SEEN",
        "ADDRESS",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        table.push(vec![
            r.node.clone(),
            r.name
                .clone()
                .or_else(|| r.hostname.clone())
                .unwrap_or_else(|| "-".into()),
            r.mesh.clone(),
            r.phase.clone(),
            match r.online {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            },
            r.applied.map_or("-".into(), |v| v.rev.to_string()),
            r.desired.map_or("-".into(), |v| v.rev.to_string()),
            ago(r.last_seen),
            r.address.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| table.iter().map(|row| row[i].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    for r in rows {
        if let Some(reason) = &r.reason {
            println!("  {}: {reason}", r.node);
        }
        if let Some(f) = &r.failure {
            println!("  {}: last failure: {f}", r.node);
        }
    }
}
