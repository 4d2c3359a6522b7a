//! `sidenetctl`: the sidenet admin CLI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::reconcile::core::Controller;
use sidenet_controller::reconcile::model::{Secrets, StatusRow};
use sidenet_controller::reconcile::render::Renderer;
use sidenet_controller::reconcile::store::Store;
use sidenet_controller::spec::manifest::{self, ManifestSet};
use sidenet_controller::{errln, out, outln};
use sidenet_crds::SecretKeyRef;
use sidenet_wire::keys::KeyPair;

#[derive(Debug, Parser)]
#[command(name = "sidenetctl", version, about = "sidenet admin CLI")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// Work against a cluster in Kubernetes mode through this kubeconfig (its current
    /// context) instead of a standalone controller's state folder: status, approve, remove,
    /// token and join-code read and write the custom resources (docs/helm.md); plan reads
    /// them (docs/rollouts.md).
    #[arg(long, global = true, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// With --kubeconfig: the namespace of the Mesh and MeshNode objects [default: the
    /// context's namespace, else default].
    #[arg(long, global = true, value_name = "NS")]
    namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// `sidenetctl rollout ...`.
#[derive(Debug, Subcommand)]
enum RolloutCmd {
    /// Every mesh's rollout (or --mesh's): phase, waves, healthy nodes, failed nodes and why.
    Status(RolloutArgs),
    /// No new wave starts until `resume` (the current wave still bakes).
    Pause(RolloutArgs),
    /// A paused rollout goes on.
    Resume(RolloutArgs),
    /// Stop the rollout: nodes that got the new revision get the last good content again.
    Abort(RolloutArgs),
}

#[derive(Debug, clap::Args)]
struct RolloutArgs {
    /// Mesh (Mesh name or network name); required but for `status`.
    #[arg(long)]
    mesh: Option<String>,
    /// State folder of the running controller.
    #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
    state: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check manifests offline with the controller's own checks.
    Validate {
        /// Manifest files or folders.
        #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Hardware profile folder(s) to load with them [default: hardware-profiles, when the
        /// working directory has it].
        #[arg(long, value_delimiter = ',')]
        profiles: Option<Vec<PathBuf>>,
    },
    /// Explain which policies apply to a connection between two nodes, and why.
    Explain {
        /// Manifest files or folders.
        #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Hardware profile folder(s) to load with them [default: hardware-profiles, when the
        /// working directory has it].
        #[arg(long, value_delimiter = ',')]
        profiles: Option<Vec<PathBuf>>,
        /// The mesh (needed when the manifests hold more than one).
        #[arg(long)]
        mesh: Option<String>,
        /// The node that opens the connection (MeshNode name or node id).
        #[arg(long)]
        from: String,
        /// The node it connects to.
        #[arg(long)]
        to: String,
        /// Destination port.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65535))]
        port: Option<u32>,
        /// Transport protocol.
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
        protocol: String,
        /// When: a day and local time in the Mesh's time zone ("tue 23:30") or an RFC 3339
        /// time [default: now].
        #[arg(long)]
        at: Option<String>,
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
        /// Hardware profile folder(s) for offline rendering [default: hardware-profiles, when
        /// the working directory has it].
        #[arg(long, value_delimiter = ',')]
        profiles: Option<Vec<PathBuf>>,
        /// Template folder for offline rendering.
        #[arg(long, default_value = "templates")]
        templates: PathBuf,
        /// Print only this file's content.
        #[arg(long)]
        path: Option<String>,
        /// Output format: the files one after another (table), or the whole config as JSON.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
    /// Show what putting these manifests in force would publish: each node that would get a
    /// new revision, with a unified diff of each changed file (secrets masked), and counts.
    /// Asks the running controller, or with --offline reads the state folder of a stopped one.
    /// With --kubeconfig: against the namespace's objects and the revisions their status
    /// records; the folder replaces the namespace's Meshes and MeshNodes (nodes whose MeshNode
    /// goes are listed as removed), nothing in the cluster is written (docs/rollouts.md).
    /// Exit status: 0 nothing changes, 2 something changes, 1 error.
    Plan {
        /// Manifest files or folders.
        #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Hardware profile folder(s) to load with them [default: hardware-profiles, when the
        /// working directory has it; with --kubeconfig none: the cluster's HardwareProfiles,
        /// replaced by name by those given].
        #[arg(long, value_delimiter = ',')]
        profiles: Option<Vec<PathBuf>>,
        /// State folder of the controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
        /// Plan against the state folder directly (the controller must be stopped).
        #[arg(long)]
        offline: bool,
        /// Template folder, for --offline and --kubeconfig (the controller's version of them).
        #[arg(long, default_value = "templates")]
        templates: PathBuf,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
        /// The same as `-o json`.
        #[arg(long)]
        json: bool,
    },
    /// Staged rollouts of Mesh spec changes (Mesh.spec.rollout, docs/rollouts.md).
    Rollout {
        /// What to do.
        #[command(subcommand)]
        action: RolloutCmd,
    },
    /// Nodes: phase, online, desired vs applied revision, last seen; then a summary line (every
    /// node by phase, and how many the filters show).
    Status {
        /// State folder of the running controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
        /// Only nodes in this phase (Ready, Configuring, Offline, Failed, Blocked, Pending,
        /// Declared; any case). Repeat or separate with commas for several.
        #[arg(long, value_name = "PHASE")]
        phase: Vec<String>,
        /// Only nodes of this mesh (network name). Repeat for several.
        #[arg(long, value_name = "MESH")]
        mesh: Vec<String>,
        /// Only nodes whose MeshNode name, hostname or id contains this text (any case), or
        /// matches it whole with `*` wildcards (`garden-*`). Repeat for several.
        #[arg(long, value_name = "PATTERN")]
        name: Vec<String>,
    },
    /// NodeProvision jobs of the running controller: live progress per host while a job runs,
    /// then the result per host (board, profile, node id, result, duration).
    Provisions {
        /// State folder of the running controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
    /// Prometheus metrics of the running controller's nodes: presence, revisions, babel
    /// neighbours and link costs, probe round-trip times and loss.
    Metrics {
        /// State folder of the running controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
    },
    /// Approve a pending node (approval mode).
    Approve {
        /// Node id or MeshNode name.
        node: String,
        /// State folder of the running controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
    },
    /// Remove an enrolled node: its record is deleted, its broker credentials revoked and its
    /// retained config cleared. It may enrol again (and needs approval again, unless the mesh
    /// auto-approves).
    Remove {
        /// Node id or MeshNode name.
        node: String,
        /// State folder of the running controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
    },
    /// Rotate a mesh's signing key: the old key endorses a new one, every node gets its config
    /// again signed by the new key, and agents accept the old key for --overlap more seconds.
    /// Agents offline meanwhile follow the endorsement when they come back.
    RotateKey {
        /// Mesh network name.
        mesh: String,
        /// Seconds agents still accept configs signed by the old key.
        #[arg(long, default_value_t = 86_400)]
        overlap: u64,
        /// State folder of the running controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
    },
    /// Print the mesh's join code, MESH~FINGERPRINT: give it to a new agent (`sidenet-agent
    /// --join CODE`), which then trusts only the mesh key it names. The fingerprint is the first
    /// 20 characters of lowercase base32 (RFC 4648, no padding) of SHA-256("sidenet-join-v1",
    /// 0x00, mesh name, 0x00, the 32 bytes of the ed25519 key). Reads STATE/keys/MESH.key.
    JoinCode {
        /// Mesh network name.
        #[arg(long)]
        mesh: String,
        /// State folder of the controller.
        #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
        state: PathBuf,
        /// Output format: the code alone (table), or JSON with the key too.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
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
    /// Install the agent on routers over SSH and wait until they enrol.
    Provision(Box<ProvisionArgs>),
    /// Generate an ed25519 key pair (secret written with mode 0600).
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a shell completion script, e.g. `sidenetctl completions bash >
    /// /etc/bash_completion.d/sidenetctl`.
    Completions {
        /// The shell.
        shell: sidenet_controller::cli::Shell,
    },
}

/// `sidenetctl provision`: an inventory file, or hosts given on the command line.
#[derive(Debug, clap::Args)]
struct ProvisionArgs {
    /// Hosts for a one-off run, as [user@]host[:port] (log in with --identity or
    /// --password-file).
    hosts: Vec<String>,
    /// Inventory file (YAML: mesh, broker, defaults, one row per host).
    #[arg(short = 'i', long)]
    inventory: Option<PathBuf>,
    /// Mesh network name (overrides the inventory's).
    #[arg(long)]
    mesh: Option<String>,
    /// Broker URL as the hosts reach it (overrides the inventory's). mqtts://HOST:PORT needs
    /// --broker-ca and agents built with the cargo feature `tls`.
    #[arg(long)]
    broker: Option<String>,
    /// CA bundle (PEM) of an mqtts:// broker: written into every agent's bootstrap config
    /// (brokerCa), the only CA the agents trust for the broker.
    #[arg(long, value_name = "FILE")]
    broker_ca: Option<PathBuf>,
    /// Private key file for hosts given on the command line.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Password file for hosts given on the command line.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Hardware profile for hosts given on the command line (default: detect).
    #[arg(long)]
    hardware_profile: Option<String>,
    /// Root the install paths are relative to, for hosts given on the command line.
    #[arg(long, default_value = "/")]
    root: String,
    /// State folder of the running controller: mesh key, tokens, enrolment, known_hosts.
    #[arg(long, env = "SIDENET_STATE", default_value = ".sidenet-state")]
    state: PathBuf,
    /// Mesh public key (base64) the agents pin (default: from the state folder).
    #[arg(long)]
    mesh_key: Option<String>,
    /// Pinned SSH host keys (default: STATE/known_hosts).
    #[arg(long)]
    known_hosts: Option<PathBuf>,
    /// Pin the host key of a host seen for the first time (trust on first use). A changed key
    /// always aborts that host.
    #[arg(long)]
    accept_new_host_keys: bool,
    /// Agent binaries, one folder per architecture: AGENTS/<arch>/sidenet-agent, and for an
    /// mqtts:// broker AGENTS/tls/<arch>/sidenet-agent first (as scripts/build-agents makes them).
    #[arg(long, default_value = "dist")]
    agents: PathBuf,
    /// Hardware profile folder(s).
    #[arg(long, default_value = "hardware-profiles", value_delimiter = ',')]
    profiles: Vec<PathBuf>,
    /// Templates folder with the install descriptors (FAMILY/install.yaml).
    #[arg(long, default_value = "templates")]
    templates: PathBuf,
    /// Hosts worked on at once (default: the inventory's, else 4).
    #[arg(long, short = 'p')]
    parallel: Option<usize>,
    /// Create a single-use enrolment token for every new node (meshes in token mode).
    #[arg(long)]
    tokens: bool,
    /// Seconds to wait for each node to enrol.
    #[arg(long, default_value_t = 120)]
    enrol_timeout: u64,
    /// Do not ask the controller whether nodes enrolled (it runs elsewhere).
    #[arg(long)]
    no_wait: bool,
    /// Also install the policy shaping's packages (the install descriptor's
    /// `packages.shaping`): for a mesh with rateLimit policies (docs/policies.md).
    #[arg(long)]
    shaping: bool,
    /// SSH connect and per-operation timeout, in seconds.
    #[arg(long, default_value_t = 30)]
    ssh_timeout: u64,
    /// Output format of the final report.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
    /// Take the agent off the hosts instead: stop and disable its service, let it undo its
    /// changes (`sidenet-agent --uninstall`, when it has that flag), delete its files, keep
    /// list and state folder, and remove the node from the controller (unless --no-wait).
    #[arg(long)]
    remove: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            errln!("sidenetctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn with_profiles(
    mut files: Vec<PathBuf>,
    profiles: Option<Vec<PathBuf>>,
) -> Result<Vec<PathBuf>, String> {
    files.extend(sidenet_controller::cli::profile_folders(profiles)?);
    Ok(files)
}

fn run(args: Args) -> Result<ExitCode, String> {
    if let Some(kubeconfig) = &args.kubeconfig {
        return cluster(kubeconfig, args.namespace.as_deref(), args.cmd);
    }
    match args.cmd {
        Cmd::Validate { files, profiles } => {
            match manifest::load(&with_profiles(files, profiles)?) {
                Ok(set) => {
                    outln!(
                        "ok: {} mesh(es), {} node(s), {} hardware profile(s)",
                        set.meshes.len(),
                        set.nodes.len(),
                        set.profiles.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errs) => {
                    for e in &errs.0 {
                        outln!("error: {e}");
                    }
                    errln!("{} error(s)", errs.0.len());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Explain {
            files,
            profiles,
            mesh,
            from,
            to,
            port,
            protocol,
            at,
        } => {
            let set = match manifest::load(&with_profiles(files, profiles)?) {
                Ok(set) => set,
                Err(errs) => {
                    for e in &errs.0 {
                        outln!("error: {e}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
            };
            let (name, m) = match (&mesh, set.meshes.len()) {
                (Some(n), _) => set
                    .meshes
                    .get_key_value(n)
                    .ok_or_else(|| format!("--mesh {n:?}: no such Mesh in the manifests"))?,
                (None, 1) => set
                    .meshes
                    .iter()
                    .next()
                    .ok_or_else(|| "no Mesh in the manifests".to_string())?,
                (None, 0) => return Err("no Mesh in the manifests".into()),
                (None, _) => {
                    return Err("the manifests hold several meshes; name one with --mesh".into());
                }
            };
            use sidenet_controller::spec::policy::{check, eval, explain};
            let mp = eval::MeshPolicies::new(m, check::members(&set, name));
            let q = explain::Question {
                from,
                to,
                protocol: if protocol == "udp" {
                    sidenet_crds::Protocol::Udp
                } else {
                    sidenet_crds::Protocol::Tcp
                },
                port,
                at,
            };
            out!(
                "{}",
                explain::explain(&mp, &q, sidenet_controller::now() as i64)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Render {
            node,
            state,
            files,
            profiles,
            templates,
            path,
            output,
        } => {
            let config = if files.is_empty() {
                match admin::call(&state, &Request::Render { node })? {
                    Response::Render { config } => *config,
                    Response::Error { message } => return Err(message),
                    other => return Err(format!("unexpected answer: {other:?}")),
                }
            } else {
                render_offline(&with_profiles(files, profiles)?, &templates, &node)?
            };
            match path {
                Some(p) => {
                    let f = config
                        .files
                        .iter()
                        .find(|f| f.path == p)
                        .ok_or_else(|| format!("the config has no file {p:?}"))?;
                    out!("{}", f.content);
                }
                None if matches!(output, Output::Json) => {
                    let text = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
                    outln!("{text}");
                }
                None => print_config(&config),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plan {
            files,
            profiles,
            state,
            offline,
            templates,
            output,
            json,
        } => {
            let files = with_profiles(files, profiles)?;
            let report = if offline {
                sidenet_controller::cli::plan_offline(&files, &state, &templates)?
            } else {
                let files = files
                    .iter()
                    .map(|f| std::path::absolute(f).map_err(|e| format!("-f {}: {e}", f.display())))
                    .collect::<Result<Vec<_>, _>>()?;
                match admin::call(&state, &Request::Plan { files })? {
                    Response::Plan { report } => *report,
                    Response::Error { message } => return Err(message),
                    other => return Err(format!("unexpected answer: {other:?}")),
                }
            };
            print_plan(&report, json || matches!(output, Output::Json))
        }
        Cmd::Rollout { action } => {
            let (name, a) = match action {
                RolloutCmd::Status(a) => ("status", a),
                RolloutCmd::Pause(a) => ("pause", a),
                RolloutCmd::Resume(a) => ("resume", a),
                RolloutCmd::Abort(a) => ("abort", a),
            };
            let req = Request::Rollout {
                action: name.to_string(),
                mesh: a.mesh.clone(),
            };
            match admin::call(&a.state, &req)? {
                Response::Rollouts { rollouts } if matches!(a.output, Output::Json) => {
                    let text =
                        serde_json::to_string_pretty(&rollouts).map_err(|e| e.to_string())?;
                    outln!("{text}");
                }
                Response::Rollouts { rollouts } if rollouts.is_empty() => {
                    outln!(
                        "no rollout has started (a Mesh with spec.rollout rolls out its next change)"
                    );
                }
                Response::Rollouts { rollouts } => {
                    for r in rollouts {
                        out!("{}", r.to_text());
                    }
                }
                Response::Error { message } => return Err(message),
                other => return Err(format!("unexpected answer: {other:?}")),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status {
            state,
            output,
            phase,
            mesh,
            name,
        } => match admin::call(&state, &Request::Status)? {
            Response::Status {
                nodes: all,
                manifest_errors,
                provisions,
                counters,
                ..
            } => {
                let filter = sidenet_controller::cli::StatusFilter::new(&phase, &mesh, &name)?;
                let nodes: Vec<StatusRow> =
                    all.iter().filter(|r| filter.matches(r)).cloned().collect();
                let summary = sidenet_controller::cli::status_summary(&all, nodes.len(), &filter);
                let overflow = (counters.pending_rate_limited, counters.pending_evicted);
                match output {
                    Output::Json => {
                        let text = serde_json::to_string_pretty(&serde_json::json!({
                            "summary": summary,
                            "nodes": nodes,
                            "manifestErrors": manifest_errors,
                            "enrolmentOverflow": {
                                "rateLimited": overflow.0,
                                "evicted": overflow.1,
                            },
                        }))
                        .map_err(|e| e.to_string())?;
                        outln!("{text}");
                    }
                    Output::Table => {
                        print_table(&nodes);
                        outln!("{summary}");
                        if overflow != (0, 0) {
                            outln!(
                                "\nenrolment overflow since start: {} request(s) of new nodes not listed as pending (rate limit), {} pending node(s) pushed out by newer ones (list full); approve an expected node by its id",
                                overflow.0,
                                overflow.1
                            );
                        }
                        if !provisions.is_empty() {
                            outln!();
                            print_provisions(&provisions);
                        }
                    }
                }
                for e in &manifest_errors {
                    errln!("manifest error (last good manifests still in force): {e}");
                }
                // Broken manifests are something to fix: scripts see it in the exit status.
                Ok(if manifest_errors.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        },
        Cmd::Approve { node, state } => match admin::call(&state, &Request::Approve { node })? {
            Response::Approved {
                node, ahead: true, ..
            } => {
                outln!(
                    "approved {node} ahead: it has not asked to join yet, and is admitted when it does"
                );
                Ok(ExitCode::SUCCESS)
            }
            Response::Approved {
                node, published, ..
            } => {
                outln!("approved {node} ({published} config(s) published)");
                Ok(ExitCode::SUCCESS)
            }
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        },
        Cmd::Remove { node, state } => match admin::call(&state, &Request::Remove { node })? {
            Response::Removed {
                node,
                topic: Some(topic),
            } => {
                outln!("removed {node} (credentials revoked, {topic} cleared)");
                Ok(ExitCode::SUCCESS)
            }
            Response::Removed { node, topic: None } => {
                outln!(
                    "removed {node} (it was waiting for approval, or approved ahead; it had no config)"
                );
                Ok(ExitCode::SUCCESS)
            }
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        },
        Cmd::RotateKey {
            mesh,
            overlap,
            state,
        } => match admin::call(
            &state,
            &Request::RotateKey {
                mesh,
                overlap_s: overlap,
            },
        )? {
            Response::Rotated {
                mesh,
                key,
                previous_until,
                published,
            } => {
                outln!(
                    "mesh {mesh}: new signing key {key}; {published} config(s) re-signed; the old key is accepted until {}",
                    sidenet_controller::rfc3339(previous_until)
                );
                Ok(ExitCode::SUCCESS)
            }
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        },
        Cmd::JoinCode {
            mesh,
            state,
            output,
        } => {
            let (key, code) = sidenet_controller::cli::join_code(&state, &mesh)?;
            print_join_code(&mesh, &key, &code, &output)
        }
        Cmd::Token { mesh, hours, state } => {
            match admin::call(
                &state,
                &Request::Token {
                    mesh: mesh.clone(),
                    ttl_s: hours * 3600,
                },
            )? {
                Response::Token { token, mode, .. } => {
                    outln!("{token}");
                    match mode.as_deref() {
                        Some("token") | None => errln!(
                            "single-use, valid for {hours} h; give it to the agent with --token"
                        ),
                        Some(mode) => errln!(
                            "warning: mesh {mesh} enrols in {mode} mode, where a token changes nothing ({}); it admits a node only once the Mesh sets enrollment.mode: token",
                            if mode == "auto" {
                                "every node that asks is admitted"
                            } else {
                                "each node waits for `sidenetctl approve`"
                            }
                        ),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Response::Error { message } => Err(message),
                other => Err(format!("unexpected answer: {other:?}")),
            }
        }
        Cmd::Provision(p) => provision(*p),
        Cmd::Provisions { state, output } => match admin::call(&state, &Request::Status)? {
            Response::Status { provisions, .. } => {
                match output {
                    Output::Json => outln!(
                        "{}",
                        serde_json::to_string_pretty(&provisions).map_err(|e| e.to_string())?
                    ),
                    Output::Table if provisions.is_empty() => {
                        outln!("no NodeProvision manifests")
                    }
                    Output::Table => print_provisions(&provisions),
                }
                let failed = provisions
                    .iter()
                    .any(|p| p.state == sidenet_controller::admin::JobState::Failed);
                Ok(if failed {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                })
            }
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        },
        Cmd::Metrics { state } => match admin::call(&state, &Request::Status)? {
            Response::Status { nodes, .. } => {
                out!(
                    "{}",
                    sidenet_controller::reconcile::health::prometheus(&nodes)
                );
                Ok(ExitCode::SUCCESS)
            }
            Response::Error { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        },
        Cmd::Completions { shell } => {
            sidenet_controller::cli::completions(shell, Args::command());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keygen { out } => {
            let seed = sidenet_controller::random::random32()?;
            let key = KeyPair::from_seed(&seed);
            write_new_secret(&out, &key.to_file_text())?;
            outln!("public key: {}", key.public());
            outln!("node id:    {}", key.public().node_id());
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

/// The files of a config one after another, each under a header line naming its path and
/// mode (like `head` with several files), after one line naming node and mesh.
fn print_config(config: &sidenet_wire::messages::NodeConfig) {
    outln!(
        "# node {} ({}) of mesh {}: {} file(s)",
        config.node,
        config.hostname,
        config.mesh,
        config.files.len()
    );
    for f in &config.files {
        outln!();
        outln!("==> {} (mode {:o}) <==", f.path, f.mode);
        out!("{}", f.content);
        if !f.content.is_empty() && !f.content.ends_with('\n') {
            outln!();
        }
    }
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
        outln!("{}", line.join("  ").trim_end());
    }
    for r in rows {
        if let Some(reason) = &r.reason {
            outln!("  {}: {reason}", r.node);
        }
        if let Some(f) = &r.failure {
            outln!("  {}: last failure: {f}", r.node);
        }
        if let Some(s) = &r.shaping {
            let w = if s.windows.is_empty() {
                "none".to_string()
            } else {
                s.windows.join(", ")
            };
            outln!(
                "  {}: shaping: {} leaves, windows open: {w}",
                r.node,
                s.leaf
            );
        }
        for line in sidenet_controller::reconcile::health::link_lines(r) {
            outln!("  {}: {line}", r.node);
        }
        for line in sidenet_controller::reconcile::health::service_lines(r) {
            outln!("  {}: {line}", r.node);
        }
    }
}

/// NodeProvision jobs: one header line per job, then one line per host.
fn print_provisions(rows: &[sidenet_controller::admin::ProvisionRow]) {
    use sidenet_controller::admin::JobState;
    for p in rows {
        let counts = p
            .status
            .as_ref()
            .map(|s| format!(" ({} succeeded, {} failed)", s.succeeded, s.failed))
            .unwrap_or_default();
        let state = match p.state {
            JobState::Running => "running",
            JobState::Complete => "complete",
            JobState::Failed => "failed",
        };
        outln!("NodeProvision/{}  mesh {}  {state}{counts}", p.name, p.mesh);
        if p.state == JobState::Running {
            for h in &p.live {
                let detail = if h.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", h.detail)
                };
                let result = h.result.as_deref().unwrap_or("…");
                outln!("  {:<28} {:<10} {result}{detail}", h.host, h.step);
            }
        } else if let Some(st) = &p.status {
            for c in st.conditions.iter().filter(|c| c.status != "True") {
                outln!("  {}: {}", c.reason, c.message);
            }
            for h in &st.hosts {
                outln!(
                    "  {:<28} {:<22} {:<26} {:<16} {:<18} {:>5.1}s  {}",
                    h.host,
                    h.board.as_deref().unwrap_or("-"),
                    h.profile.as_deref().unwrap_or("-"),
                    h.node_id.as_deref().unwrap_or("-"),
                    h.result,
                    h.duration_ms as f64 / 1000.0,
                    h.message
                );
            }
        }
    }
}

/// `[user@]host[:port]`.
fn parse_host(spec: &str) -> Result<(Option<String>, String, Option<u16>), String> {
    let (user, rest) = match spec.split_once('@') {
        Some((u, r)) => (Some(u.to_string()), r),
        None => (None, spec),
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (
            h.to_string(),
            Some(
                p.parse()
                    .map_err(|_| format!("{spec:?}: port {p:?} is not a number"))?,
            ),
        ),
        _ => (rest.to_string(), None),
    };
    if host.is_empty() {
        return Err(format!("{spec:?}: no host"));
    }
    Ok((user, host, port))
}

/// The broker URL, its CA and the mesh key the agents pin, for `sidenetctl provision`.
fn provision_endpoints(
    a: &ProvisionArgs,
    inv: &sidenet_provision::plan::Inventory,
    mesh: &str,
) -> Result<(String, Option<String>, String), String> {
    let broker = a.broker.clone().or(inv.broker.clone()).ok_or(
        "no broker: set broker in the inventory or pass --broker (the URL the routers reach)"
            .to_string(),
    )?;
    let url = sidenet_wire::topics::parse_broker(&broker).map_err(|e| format!("broker: {e}"))?;
    let broker_ca = match (&a.broker_ca, url.tls) {
        (Some(path), true) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--broker-ca {}: cannot read: {e}", path.display()))?;
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!(
                    "--broker-ca {}: no PEM certificate in it (expected \"-----BEGIN CERTIFICATE-----\")",
                    path.display()
                ));
            }
            Some(text)
        }
        (None, true) => {
            return Err(format!(
                "broker {broker} is mqtts://: pass --broker-ca FILE (the CA the agents pin for it)"
            ));
        }
        (Some(_), false) => {
            return Err(format!(
                "--broker-ca is given, but broker {broker} is not an mqtts:// URL"
            ));
        }
        (None, false) => None,
    };
    let mesh_key = match &a.mesh_key {
        Some(k) => sidenet_wire::PublicKey::from_base64(k)
            .map_err(|e| format!("--mesh-key: {e}"))?
            .to_base64(),
        None => {
            let path = a.state.join("keys").join(format!("{mesh}.key"));
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "no mesh key to pin: {}: {e} (run this where the controller's --state is, or pass --mesh-key)",
                    path.display()
                )
            })?;
            KeyPair::from_file_text(&text)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .public()
                .to_base64()
        }
    };
    Ok((broker, broker_ca, mesh_key))
}

fn provision(a: ProvisionArgs) -> Result<ExitCode, String> {
    use sidenet_provision::plan::{Inventory, Row};
    use std::io::IsTerminal;
    use std::sync::Arc;

    let (mut inv, inv_path) = match &a.inventory {
        Some(p) => (Inventory::load(p).map_err(|e| e.to_string())?, p.clone()),
        None => (Inventory::default(), PathBuf::from("command line")),
    };
    for h in &a.hosts {
        let (user, host, port) = parse_host(h)?;
        inv.hosts.push(Row {
            host: Some(host),
            port,
            user,
            private_key_file: a.identity.clone(),
            password_file: a.password_file.clone(),
            hardware_profile: a.hardware_profile.clone(),
            root: Some(a.root.clone()),
            ..Row::default()
        });
    }
    if inv.hosts.is_empty() {
        return Err("no hosts: give an inventory (-i FILE) or hosts ([user@]host[:port])".into());
    }
    let targets = inv.targets(&inv_path).map_err(|e| e.to_string())?;
    let mesh = a
        .mesh
        .clone()
        .or(inv.mesh.clone())
        .ok_or("no mesh: set mesh in the inventory or pass --mesh".to_string())?;
    sidenet_wire::names::check_mesh_name(&mesh).map_err(|e| format!("mesh: {e}"))?;
    let (broker, broker_ca, mesh_key) = if a.remove {
        // Removing needs neither the broker nor the mesh key.
        (
            a.broker.clone().or(inv.broker.clone()).unwrap_or_default(),
            None,
            String::new(),
        )
    } else {
        provision_endpoints(&a, &inv, &mesh)?
    };
    let set = manifest::load(&a.profiles).map_err(|e| e.to_string())?;
    let settings = sidenet_provision::Settings {
        mesh,
        broker,
        broker_ca,
        mesh_key,
        agents: a.agents.clone(),
        templates: a.templates.clone(),
        known_hosts: a
            .known_hosts
            .clone()
            .unwrap_or_else(|| a.state.join("known_hosts")),
        trust_on_first_use: a.accept_new_host_keys,
        parallelism: a.parallel.or(inv.parallelism).unwrap_or(4).max(1),
        ssh_timeout: std::time::Duration::from_secs(a.ssh_timeout.max(1)),
        enrol_timeout: std::time::Duration::from_secs(a.enrol_timeout),
        wait_for_enrolment: !a.no_wait,
        shaping: a.shaping,
    };
    let state = a.state.clone();
    let control = Arc::new(sidenet_controller::provisioning::AdminControlPlane::new(
        move |req| admin::call(&state, &req),
        a.tokens,
        !a.no_wait,
    ));
    let ctx =
        sidenet_provision::Context::new(settings, set.profiles.into_values().collect(), control)
            .map_err(|e| e.to_string())?;
    let progress: Arc<dyn sidenet_provision::Progress> =
        if std::io::stderr().is_terminal() && matches!(a.output, Output::Table) {
            Arc::new(sidenet_provision::report::Bars::new())
        } else {
            Arc::new(sidenet_provision::report::Lines::default())
        };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let reports = if a.remove {
        rt.block_on(sidenet_provision::remove(targets, Arc::new(ctx), progress))
    } else {
        rt.block_on(sidenet_provision::provision(
            targets,
            Arc::new(ctx),
            progress,
        ))
    };
    match a.output {
        Output::Json => outln!("{}", sidenet_provision::report::json(&reports)),
        Output::Table => {
            out!("{}", sidenet_provision::report::table(&reports));
            outln!("{}", sidenet_provision::report::summary(&reports));
        }
    }
    if reports.iter().all(|r| r.ok()) {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

/// The commands of `--kubeconfig`: against the custom resources of a cluster.
fn cluster(kubeconfig: &Path, namespace: Option<&str>, cmd: Cmd) -> Result<ExitCode, String> {
    use sidenet_controller::clusterctl;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (client, ns) = clusterctl::connect(kubeconfig, namespace).await?;
        match cmd {
            Cmd::Status { output, .. } => {
                let (nodes, provisions) = clusterctl::status(&client, &ns).await?;
                match output {
                    Output::Json => outln!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "namespace": ns,
                            "nodes": nodes,
                            "provisions": provisions,
                        }))
                        .map_err(|e| e.to_string())?
                    ),
                    Output::Table => {
                        let mut table = vec![
                            ["MESHNODE", "NODE", "MESH", "APPROVED", "PHASE", "APPLIED", "DESIRED", "LAST SEEN", "ADDRESS"]
                                .map(String::from)
                                .to_vec(),
                        ];
                        for n in &nodes {
                            table.push(vec![
                                n.name.clone(),
                                n.node.clone(),
                                n.mesh.clone(),
                                if n.approved { "yes" } else { "no" }.into(),
                                n.phase.clone(),
                                n.applied.map_or("-".into(), |v| v.to_string()),
                                n.desired.map_or("-".into(), |v| v.to_string()),
                                n.last_seen.clone().unwrap_or_else(|| "-".into()),
                                n.addresses.first().cloned().unwrap_or_else(|| "-".into()),
                            ]);
                        }
                        print_columns(&table);
                        for p in &provisions {
                            outln!(
                                "NodeProvision/{}  mesh {}  {} ({} succeeded, {} failed)",
                                p.name,
                                p.mesh,
                                p.state,
                                p.succeeded,
                                p.failed
                            );
                        }
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Approve { node, .. } => {
                let (name, id) = clusterctl::approve(&client, &ns, &node).await?;
                outln!("approved {id} (MeshNode {ns}/{name}: spec.approved: true)");
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Remove { node, .. } => {
                let (name, id) = clusterctl::remove(&client, &ns, &node).await?;
                outln!(
                    "removed {id} (MeshNode {ns}/{name} deleted; the controller clears its config and revokes its broker login)"
                );
                Ok(ExitCode::SUCCESS)
            }
            Cmd::Token { mesh, hours, .. } => {
                let (token, _, mode) =
                    clusterctl::token(&client, &ns, &mesh, hours.saturating_mul(3600)).await?;
                outln!("{token}");
                if mode == sidenet_crds::EnrollmentMode::Token {
                    errln!("single-use, valid for {hours} h; give it to the agent with --token");
                } else {
                    errln!(
                        "warning: mesh {mesh} enrols in {} mode, where a token changes nothing; it admits a node only once the Mesh sets enrollment.mode: token",
                        mode.as_str()
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Cmd::JoinCode { mesh, output, .. } => {
                let (key, code) = clusterctl::join_code(&client, &ns, &mesh).await?;
                print_join_code(&mesh, &key, &code, &output)
            }
            Cmd::Plan {
                files,
                profiles,
                offline,
                templates,
                output,
                json,
                ..
            } => {
                if offline {
                    return Err(
                        "--offline plans against a stopped standalone controller's state folder; with --kubeconfig the plan is made against the cluster's objects".into(),
                    );
                }
                // Profiles come from the cluster; --profiles adds (and replaces by name) only
                // when given.
                let mut files = files;
                if let Some(p) = profiles {
                    files.extend(sidenet_controller::cli::profile_folders(Some(p))?);
                }
                let report = clusterctl::plan(&client, &ns, &files, &templates).await?;
                print_plan(&report, json || matches!(output, Output::Json))
            }
            _ => Err(
                "--kubeconfig works with status, approve, remove, token, join-code and plan; run the other commands against a standalone controller".into(),
            ),
        }
    })
}

/// `plan`'s output and exit status (0 nothing changes, 2 something does), the same in both
/// modes.
fn print_plan(
    report: &sidenet_controller::reconcile::diff::PlanReport,
    json: bool,
) -> Result<ExitCode, String> {
    if json {
        let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        outln!("{text}");
    } else {
        out!("{}", report.to_text());
    }
    Ok(if report.changes_anything() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Left-aligned columns, two spaces apart.
fn print_columns(table: &[Vec<String>]) {
    let cols = table.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!("{}", line.join("  ").trim_end());
    }
}

/// `join-code`'s output, the same from a state folder and from a cluster.
fn print_join_code(
    mesh: &str,
    key: &sidenet_wire::PublicKey,
    code: &sidenet_wire::join::JoinCode,
    output: &Output,
) -> Result<ExitCode, String> {
    match output {
        Output::Table => outln!("{code}"),
        Output::Json => outln!(
            "{}",
            serde_json::json!({
                "mesh": mesh,
                "key": key.to_base64(),
                "fingerprint": code.fingerprint(),
                "joinCode": code.to_string(),
            })
        ),
    }
    Ok(ExitCode::SUCCESS)
}
