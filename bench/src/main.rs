//! `sidenet-bench`: the fleet simulator and every benchmark of docs/benchmarks.md.
//!
//! `bench/run` builds the release binaries and runs `sidenet-bench all`, which writes
//! `docs/benchmarks.json` and `docs/benchmarks.md`. `sidenet-bench all --smoke --out-dir DIR`
//! runs the same code with 200 agents (CI, so the benchmark cannot rot; no timing is asserted).

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod cross;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use sidenet_bench::fleet::{Fleet, FleetOptions};
use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::reconcile::render::{self, NodeInputs, Renderer};
use sidenet_controller::spec::manifest::{self, ManifestSet};
use sidenet_crds::NodeRole;
use sidenet_wire::envelope::{seal, seal_hashed};
use sidenet_wire::keys::KeyPair;
use sidenet_wire::{Header, Kind};

#[derive(Debug, Parser)]
#[command(
    name = "sidenet-bench",
    about = "sidenet fleet simulator and benchmarks"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Where one config's time goes (single thread): context, templates, JSON, hash, signature.
    Breakdown {
        /// Configs to time.
        #[arg(long, default_value_t = 5_000)]
        nodes: usize,
    },
    /// Render + sign configs on several threads and print configs/s.
    RenderSign {
        /// Configs to produce.
        #[arg(long, default_value_t = 20_000)]
        nodes: usize,
        /// Threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Agent verify + apply of one config (agent core and the files backend's journal),
    /// averaged over N revisions, in a temporary folder (on the file system of TMPDIR).
    AgentApply {
        /// Revisions to apply.
        #[arg(long, default_value_t = 200)]
        iterations: u64,
    },
    /// Run N simulated agents against a broker until interrupted, printing progress.
    Fleet {
        /// Broker host.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Broker port.
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// Mesh network name.
        #[arg(long, default_value = "riverside")]
        mesh: String,
        /// Number of agents.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Key seed: the same seed gives the same node ids (reuse a previous run's nodes).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Hardware profile the agents ask for.
        #[arg(long, default_value = "raspberrypi-4b-awus036acm")]
        profile: String,
    },
    /// First rollout (enrolment of N new agents) and second rollout (a mesh-wide change) on
    /// the embedded broker or Mosquitto; prints the figures as JSON.
    Rollout {
        /// Number of agents.
        #[arg(long, default_value_t = 2000)]
        nodes: usize,
        /// Use Mosquitto instead of the controller's embedded broker.
        #[arg(long)]
        mosquitto: bool,
        /// Key seed of the agents.
        #[arg(long, default_value_t = 14)]
        seed: u64,
        /// Repository root (manifests, profiles, templates).
        #[arg(long, default_value = ".")]
        repo: PathBuf,
    },
    /// The agents for the routers' CPUs (`scripts/build-agents`): binary size per architecture,
    /// plain and TLS, and the MIPS agent's idle RSS under qemu-user. Updates only these figures
    /// in benchmarks.json and their table in benchmarks.md.
    Agents {
        /// The cross-built agents: DIR/ARCH/sidenet-agent and DIR/tls/ARCH/sidenet-agent
        /// [default: REPO/target/agents/dist].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where benchmarks.json and benchmarks.md are.
        #[arg(long, default_value = "docs")]
        out_dir: PathBuf,
        /// Repository root (manifests, profiles, templates).
        #[arg(long, default_value = ".")]
        repo: PathBuf,
    },
    /// Every measurement; writes benchmarks.json and benchmarks.md.
    All {
        /// Small sizes (200 agents), for CI.
        #[arg(long)]
        smoke: bool,
        /// Where to write benchmarks.json and benchmarks.md.
        #[arg(long, default_value = "docs")]
        out_dir: PathBuf,
        /// Repository root (manifests, profiles, templates, peers).
        #[arg(long, default_value = ".")]
        repo: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.cmd {
        Cmd::Breakdown { nodes } => {
            let b = breakdown(&PathBuf::from("."), nodes)?;
            println!("{b}");
            Ok(())
        }
        Cmd::RenderSign { nodes, threads } => {
            let repo = PathBuf::from(".");
            let per_s = render_sign(&repo, nodes, threads)?;
            println!(
                "{}",
                json!({"configs": nodes, "threads": threads, "per_s": per_s})
            );
            Ok(())
        }
        Cmd::AgentApply { iterations } => {
            let s = agent_apply(&PathBuf::from("."), iterations)?;
            println!(
                "{}",
                json!({"iterations": iterations, "ms_per_apply": (s * 1e6).round() / 1e3})
            );
            Ok(())
        }
        Cmd::Fleet {
            host,
            port,
            mesh,
            nodes,
            seed,
            profile,
        } => rt.block_on(async move {
            let f = Fleet::start(&FleetOptions {
                host,
                port,
                mesh,
                nodes,
                seed,
                profile,
                mesh_key: None,
            });
            let mut last = (usize::MAX, 0);
            loop {
                let now = (f.connected(), f.at_least(1));
                if now != last {
                    eprintln!("{} connected, {} configured", now.0, now.1);
                    last = now;
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            f.stop().await;
            Ok(())
        }),
        Cmd::Rollout {
            nodes,
            mosquitto,
            seed,
            repo,
        } => rt.block_on(async move {
            let repo = std::fs::canonicalize(&repo)?;
            let r = rollout(&repo, nodes, mosquitto, false, seed).await?;
            println!(
                "{}",
                json!({
                    "nodes": nodes,
                    "broker": if mosquitto { "Mosquitto" } else { "embedded sidenet-broker" },
                    "first_rollout_s": round3(r.first_s),
                    "second_rollout_s": round3(r.second_s),
                    "controller_rss_bytes": r.controller_rss,
                })
            );
            Ok(())
        }),
        Cmd::Agents { dir, out_dir, repo } => rt.block_on(async move {
            let repo = std::fs::canonicalize(&repo)?;
            let dir = dir.unwrap_or_else(|| cross::default_dir(&repo));
            let figures = cross::measure(&repo, &dir).await?;
            cross::update(&out_dir, &figures)?;
            println!("{}", serde_json::to_string_pretty(&figures)?);
            Ok(())
        }),
        Cmd::All {
            smoke,
            out_dir,
            repo,
        } => rt.block_on(all(smoke, &out_dir, &repo)),
    }
}

// ---------------------------------------------------------------------------------------------
// Render + sign
// ---------------------------------------------------------------------------------------------

fn load_set(repo: &Path) -> anyhow::Result<ManifestSet> {
    manifest::load(&[
        repo.join("examples/riverside/mesh.yaml"),
        repo.join("hardware-profiles"),
    ])
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Renders and signs `nodes` distinct configs (half OpenWrt, half Linux) on `threads` threads,
/// exactly as the controller does for each node: context, templates, JSON body, SHA-256, seal
/// (signing the header that carries that SHA-256).
fn render_sign(repo: &Path, nodes: usize, threads: usize) -> anyhow::Result<f64> {
    let set = load_set(repo)?;
    let renderer = Renderer::load(&repo.join("templates"))?;
    let key = KeyPair::from_seed(&[7u8; 32]);
    let mesh = set.meshes.get("riverside").context("example mesh")?;
    let profiles = [
        set.profiles
            .get("tplink-archer-c7-v2")
            .context("archer profile")?,
        set.profiles
            .get("raspberrypi-4b-awus036acm")
            .context("pi profile")?,
    ];
    let ids: Vec<String> = (0..nodes).map(|i| format!("node{i:012}")).collect();
    let start = Instant::now();
    let chunk = nodes.div_ceil(threads.max(1));
    let total: usize = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .chunks(chunk)
            .enumerate()
            .map(|(t, ids)| {
                let renderer = &renderer;
                let key = &key;
                s.spawn(move || {
                    let mut bytes = 0usize;
                    for (j, id) in ids.iter().enumerate() {
                        let i = t * chunk + j;
                        let profile = profiles[i % 2];
                        let inputs = NodeInputs {
                            mesh,
                            profile,
                            id,
                            name: None,
                            reported_hostname: Some("bench"),
                            role: NodeRole::Router,
                            channel: None,
                            tx_power: None,
                            hostname: None,
                            uplinks: &[],
                            subnet_id: (i % 65_000 + 1) as u16,
                            passphrase: "bench passphrase",
                            passphrase_next: None,
                            labels: None,
                        };
                        let Ok(config) =
                            sidenet_controller::reconcile::core::build_config(renderer, &inputs)
                        else {
                            continue;
                        };
                        let body = sidenet_controller::reconcile::core::config_body(&config)
                            .unwrap_or_default();
                        let digest = sidenet_wire::codec::sha256(&body);
                        let env = seal_hashed(
                            Kind::Config,
                            Header {
                                mesh: "riverside".into(),
                                node: Some(id.clone()),
                                epoch: 1,
                                rev: 1,
                                iat: 1,
                                exp: 2,
                                len: 0,
                                sha256: String::new(),
                            },
                            &body,
                            &digest,
                            key,
                        );
                        bytes += env.len();
                    }
                    bytes
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    if total == 0 {
        bail!("nothing rendered");
    }
    let _ = render::context; // the controller's own path (build_config) is what is measured
    Ok(nodes as f64 / secs)
}

/// Microseconds per config spent in each step of the controller's render + sign path.
fn breakdown(repo: &Path, nodes: usize) -> anyhow::Result<Value> {
    let set = load_set(repo)?;
    let renderer = Renderer::load(&repo.join("templates"))?;
    let key = KeyPair::from_seed(&[7u8; 32]);
    let mesh = set.meshes.get("riverside").context("example mesh")?;
    let profile = set
        .profiles
        .get("tplink-archer-c7-v2")
        .context("archer profile")?;
    let ids: Vec<String> = (0..nodes).map(|i| format!("node{i:012}")).collect();
    let mut t = [Duration::ZERO; 5];
    let mut size = 0usize;
    for (i, id) in ids.iter().enumerate() {
        let inputs = NodeInputs {
            mesh,
            profile,
            id,
            name: None,
            reported_hostname: Some("bench"),
            role: NodeRole::Router,
            channel: None,
            tx_power: None,
            hostname: None,
            uplinks: &[],
            subnet_id: (i % 65_000 + 1) as u16,
            passphrase: "bench passphrase",
            passphrase_next: None,
            labels: None,
        };
        let s0 = Instant::now();
        let ctx = render::context(&inputs)?;
        let s1 = Instant::now();
        let files = renderer.render("openwrt", &ctx)?;
        let s2 = Instant::now();
        let config = sidenet_wire::messages::NodeConfig {
            mesh: "riverside".into(),
            node: id.clone(),
            hostname: ctx.node.hostname.clone(),
            role: ctx.node.role.clone(),
            profile: ctx.profile.name.clone(),
            family: "openwrt".into(),
            subnet: ctx.node.subnet.clone(),
            addresses: vec![ctx.node.address.clone()],
            files: files.into_iter().map(|f| f.file).collect(),
            actions: Vec::new(),
            sealed: BTreeMap::new(),
            requires: Vec::new(),
        };
        let body = sidenet_controller::reconcile::core::config_body(&config)?;
        let s3 = Instant::now();
        let digest = sidenet_wire::codec::sha256(&body);
        let s4 = Instant::now();
        let env = seal_hashed(
            Kind::Config,
            Header {
                mesh: "riverside".into(),
                node: Some(id.clone()),
                epoch: 1,
                rev: 1,
                iat: 1,
                exp: 2,
                len: 0,
                sha256: String::new(),
            },
            &body,
            &digest,
            &key,
        );
        let s5 = Instant::now();
        size += env.len();
        for (k, d) in [s1 - s0, s2 - s1, s3 - s2, s4 - s3, s5 - s4]
            .into_iter()
            .enumerate()
        {
            t[k] += d;
        }
    }
    let us = |d: Duration| (d.as_secs_f64() * 1e6 / nodes as f64 * 10.0).round() / 10.0;
    Ok(json!({
        "configs": nodes,
        "envelope_bytes": size / nodes.max(1),
        "us_context": us(t[0]),
        "us_templates": us(t[1]),
        "us_json_body": us(t[2]),
        "us_sha256_body": us(t[3]),
        "us_seal_sign": us(t[4]),
        "us_total": us(t.iter().sum()),
    }))
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the workspace binaries first (bench/run does)",
            p.display()
        );
    }
    Ok(p)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn mosquitto(dir: &Path) -> anyhow::Result<(Proc, u16)> {
    let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("mosquitto is not installed (bench/run installs it)")?;
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000\nmessage_size_limit 1048576\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("mosquitto.log"))?;
    let child = Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    Ok((Proc(child), port))
}

struct Controller {
    proc: Proc,
    state: PathBuf,
    manifests: PathBuf,
}

impl Controller {
    async fn start(
        repo: &Path,
        dir: &Path,
        broker: Option<u16>,
        listen: u16,
    ) -> anyhow::Result<Controller> {
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let mesh = std::fs::read_to_string(repo.join("examples/riverside/mesh.yaml"))?;
        std::fs::write(manifests.join("mesh.yaml"), mesh)?;
        let state = dir.join("state");
        let mut cmd = Command::new(sibling("sidenet-controller")?);
        cmd.arg("standalone")
            .arg("--manifests")
            .arg(&manifests)
            .arg("--profiles")
            .arg(repo.join("hardware-profiles"))
            .arg("--templates")
            .arg(repo.join("templates"))
            .arg("--state")
            .arg(&state)
            .arg("--poll-ms")
            .arg("50")
            .env("RUST_LOG", "warn");
        match broker {
            Some(p) => cmd.arg("--broker").arg(format!("mqtt://127.0.0.1:{p}")),
            None => cmd.arg("--listen").arg(format!("127.0.0.1:{listen}")),
        };
        let log = std::fs::File::create(dir.join("controller.log"))?;
        let child = cmd
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let c = Controller {
            proc: Proc(child),
            state,
            manifests,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while admin::call(&c.state, &Request::Status).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "controller did not start; see {}",
                    dir.join("controller.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(c)
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    fn counters(&self) -> anyhow::Result<sidenet_controller::reconcile::model::Counters> {
        match admin::call(&self.state, &Request::Status).map_err(anyhow::Error::msg)? {
            Response::Status { counters, .. } => Ok(counters),
            other => bail!("unexpected {other:?}"),
        }
    }

    fn set_channel(&self, ch: u32) -> anyhow::Result<()> {
        let p = self.manifests.join("mesh.yaml");
        let text = std::fs::read_to_string(&p)?;
        let mut out = String::new();
        let mut in_5g = false;
        for line in text.lines() {
            if line.trim_start().starts_with("5g:") {
                in_5g = true;
            }
            if in_5g && line.trim_start().starts_with("channel:") {
                out.push_str(&format!("        channel: {ch}\n"));
                in_5g = false;
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        // Write-and-rename so the controller never reads a half-written file.
        let tmp = self.manifests.join(".mesh.yaml.tmp");
        std::fs::write(&tmp, out)?;
        std::fs::rename(tmp, p)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

struct Rollout {
    first_s: f64,
    second_s: f64,
    incremental_publishes: Option<u64>,
    incremental_renders: Option<u64>,
    controller_rss: u64,
}

/// Starts a controller (external broker or embedded), a fleet of `n` new agents (enrolment =
/// first rollout), then a mesh-wide channel change (second rollout), optionally a one-node
/// override (incremental).
/// One rollout in a scratch folder, which is kept (and named) when the rollout fails, for the
/// controller's and Mosquitto's logs.
async fn rollout(
    repo: &Path,
    n: usize,
    mosquitto_broker: bool,
    incremental: bool,
    seed: u64,
) -> anyhow::Result<Rollout> {
    let dir = tempfile::tempdir()?;
    let r = rollout_in(dir.path(), repo, n, mosquitto_broker, incremental, seed).await;
    if r.is_err() {
        eprintln!("  logs kept in {}", dir.keep().display());
    }
    r
}

async fn rollout_in(
    dir: &Path,
    repo: &Path,
    n: usize,
    mosquitto_broker: bool,
    incremental: bool,
    seed: u64,
) -> anyhow::Result<Rollout> {
    let (_mosq, broker_port) = if mosquitto_broker {
        let (p, port) = mosquitto(dir)?;
        wait_port(port).await?;
        (Some(p), Some(port))
    } else {
        (None, None)
    };
    let listen = free_port()?;
    let ctl = Controller::start(repo, dir, broker_port, listen).await?;
    let port = broker_port.unwrap_or(listen);
    wait_port(port).await?;
    let broker = if mosquitto_broker {
        "Mosquitto"
    } else {
        "embedded sidenet-broker"
    };
    let opts = FleetOptions {
        host: "127.0.0.1".into(),
        port,
        mesh: "riverside".into(),
        nodes: n,
        seed,
        profile: "raspberrypi-4b-awus036acm".into(),
        mesh_key: None,
    };
    let keys = Fleet::keys(&opts);
    eprintln!("{n} agents on {broker}: enrolling");
    let start = Instant::now();
    let fleet = Fleet::start_with(&opts, keys);
    let timeout = Duration::from_secs(120);
    let first = fleet.wait_all(1, start, timeout).await?;
    eprintln!("  all {n} configured in {:.2} s", first.as_secs_f64());
    // The change is made to a settled fleet: every agent has logged in again with its password.
    fleet.wait_logged_in(timeout).await?;
    let snap = fleet.snapshot();
    let start = Instant::now();
    ctl.set_channel(44)?;
    let second = fleet.wait_past(&snap, start, timeout).await?;
    eprintln!(
        "  channel change applied by all {n} in {:.3} s",
        second.as_secs_f64()
    );
    let controller_rss = rss_bytes(ctl.pid())?;
    let (mut inc_pub, mut inc_ren) = (None, None);
    if incremental {
        let node = fleet.ids[0].clone();
        let manifest = |overrides: &str| {
            format!(
                "apiVersion: sidenet.io/v1alpha1\nkind: MeshNode\nmetadata:\n  name: bench-one\nspec:\n  mesh: riverside\n  nodeId: {node}\n  hardwareProfile: raspberrypi-4b-awus036acm\n{overrides}"
            )
        };
        // First the node is declared: its name (bench-one.riverside.sidenet.arpa) goes into
        // every node's list of names (docs/dataplane.md, "Names"), so every node gets a new
        // config. The fleet settles, then the one-node change is measured.
        let snap = fleet.snapshot();
        std::fs::write(ctl.manifests.join("override.yaml"), manifest(""))?;
        let start = Instant::now();
        fleet.wait_past(&snap, start, timeout).await?;
        fleet.wait_logged_in(timeout).await?;
        let before = ctl.counters()?;
        let snap = fleet.snapshot();
        std::fs::write(
            ctl.manifests.join("override.yaml"),
            manifest("  overrides:\n    hostname: renamed-by-bench\n"),
        )?;
        let deadline = Instant::now() + timeout;
        while fleet.revision(0) <= snap[0] {
            if Instant::now() > deadline {
                bail!("the overridden node never got its new config");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let after = ctl.counters()?;
        inc_pub = Some(after.published - before.published);
        inc_ren = Some(after.rendered - before.rendered);
        let others = fleet.past(&snap) - 1;
        eprintln!(
            "  one-node override: {} published, {} rendered, {others} other agents changed",
            after.published - before.published,
            after.rendered - before.rendered
        );
    }
    fleet.stop().await;
    Ok(Rollout {
        first_s: first.as_secs_f64(),
        second_s: second.as_secs_f64(),
        incremental_publishes: inc_pub,
        incremental_renders: inc_ren,
        controller_rss,
    })
}

/// Verify + apply of one real config by the agent core and the files backend, averaged.
fn agent_apply(repo: &Path, iterations: u64) -> anyhow::Result<f64> {
    use sidenet_agent::core::{Agent, Effect, Event, Settings};
    use sidenet_agent::files::Applier;
    let set = load_set(repo)?;
    let renderer = Renderer::load(&repo.join("templates"))?;
    let mesh_key = KeyPair::from_seed(&[9u8; 32]);
    let node_key = KeyPair::from_seed(&[10u8; 32]);
    let id = node_key.public().node_id();
    let mesh = set.meshes.get("riverside").context("mesh")?;
    let profile = set.profiles.get("tplink-archer-c7-v2").context("profile")?;
    let inputs = NodeInputs {
        mesh,
        profile,
        id: &id,
        name: None,
        reported_hostname: Some("bench"),
        role: NodeRole::Router,
        channel: None,
        tx_power: None,
        hostname: None,
        uplinks: &[],
        subnet_id: 7,
        passphrase: "bench passphrase",
        passphrase_next: None,
        labels: None,
    };
    let mut config = sidenet_controller::reconcile::core::build_config(&renderer, &inputs)
        .map_err(anyhow::Error::msg)?;
    // As the controller sends it: the passphrase sealed to the node (opened at every apply).
    let name = sidenet_controller::reconcile::model::MESH_PASSPHRASE;
    config.sealed.insert(
        name.to_string(),
        sidenet_wire::seal::seal(
            &mesh_key,
            &node_key.public(),
            sidenet_wire::seal::Context {
                mesh: "riverside",
                node: &id,
                name,
            },
            inputs.passphrase.as_bytes(),
        ),
    );
    let body = serde_json::to_vec(&config)?;
    let root = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let applier = Applier::new(root.path(), state.path());
    let now = 1_900_000_000;
    let mut agent = Agent::new(
        Settings {
            mesh: "riverside".into(),
            max_envelope: sidenet_wire::envelope::DEFAULT_MAX_ENVELOPE,
            enroll: Default::default(),
            status_every: 3600,
            enroll_every: 3600,
        },
        node_key,
        Some(mesh_key.public()),
        None,
        1,
        now,
    );
    let topic = sidenet_wire::topics::config("riverside", &id);
    let envelopes: Vec<Vec<u8>> = (1..=iterations)
        .map(|rev| {
            seal(
                Kind::Config,
                Header {
                    mesh: "riverside".into(),
                    node: Some(id.clone()),
                    epoch: 1,
                    rev,
                    iat: now,
                    exp: now + 3600,
                    len: 0,
                    sha256: String::new(),
                },
                &body,
                &mesh_key,
            )
        })
        .collect();
    let start = Instant::now();
    for env in envelopes {
        for effect in agent.handle(
            Event::Message {
                topic: topic.clone(),
                payload: env,
            },
            now,
        ) {
            if let Effect::Apply {
                revision,
                sha256,
                envelope,
                config,
            } = effect
            {
                applier.apply(revision, &sha256, &envelope, &config)?;
                agent.handle(
                    Event::Applied {
                        revision,
                        sha256,
                        result: Ok(()),
                    },
                    now,
                );
            }
        }
    }
    let per = start.elapsed().as_secs_f64() / iterations as f64;
    if agent.applied().map(|r| r.rev) != Some(iterations) {
        bail!("the agent did not apply every config");
    }
    Ok(per)
}

/// The agent binary on its own against an embedded-broker controller: size and idle RSS.
async fn agent_footprint(repo: &Path, agent_bin: &Path) -> anyhow::Result<(u64, u64)> {
    let size = std::fs::metadata(agent_bin)?.len();
    let (rss, _) = agent_footprint_with(
        repo,
        Command::new(agent_bin),
        "raspberrypi-4b-awus036acm",
        |pid| rss_bytes(pid).map(|r| (r, r)),
    )
    .await?;
    Ok((size, rss))
}

/// An agent started by `cmd` (the agent, or an emulator and its arguments before the agent's
/// own) on the files backend against an embedded-broker controller. Once it applied its
/// config and is idle, `rss` is sampled ten times over a second; the peak of each of its two
/// figures is returned.
async fn agent_footprint_with(
    repo: &Path,
    mut cmd: Command,
    profile: &str,
    rss: impl Fn(u32) -> anyhow::Result<(u64, u64)>,
) -> anyhow::Result<(u64, u64)> {
    let dir = tempfile::tempdir()?;
    let listen = free_port()?;
    let _ctl = Controller::start(repo, dir.path(), None, listen).await?;
    wait_port(listen).await?;
    let root = dir.path().join("node");
    let key_file = dir.path().join("state/keys/riverside.key");
    let deadline = Instant::now() + Duration::from_secs(30);
    let key = loop {
        match std::fs::read_to_string(&key_file) {
            Ok(k) => break k,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => bail!("the controller never wrote {}: {e}", key_file.display()),
        }
    };
    let key = KeyPair::from_file_text(&key).map_err(|e| anyhow::anyhow!("mesh key: {e}"))?;
    let join = sidenet_wire::join::JoinCode::new("riverside", &key.public()).to_string();
    let child = cmd
        .args(["--mesh", "riverside", "--join", &join, "--broker"])
        .arg(format!("mqtt://127.0.0.1:{listen}"))
        .arg("--root")
        .arg(&root)
        .args(["--profile", profile, "--hostname", "footprint"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let agent = Proc(child);
    // Emulated agents start slower.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !root.join("etc/sidenet-agent/current.json").exists() {
        if Instant::now() > deadline {
            bail!("the agent never applied its config");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Idle: configured, connected, nothing to do. Sample a few times and keep the peak.
    let mut peak = (0, 0);
    for _ in 0..10 {
        let (a, b) = rss(agent.0.id())?;
        peak = (peak.0.max(a), peak.1.max(b));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(peak)
}

fn netjsonconfig_per_s(repo: &Path, n: usize) -> anyhow::Result<f64> {
    let set = load_set(repo)?;
    let renderer = Renderer::load(&repo.join("templates"))?;
    let mesh = set.meshes.get("riverside").context("mesh")?;
    let profile = set.profiles.get("tplink-archer-c7-v2").context("profile")?;
    let inputs = NodeInputs {
        mesh,
        profile,
        id: "benchnode2345678",
        name: None,
        reported_hostname: Some("bench"),
        role: NodeRole::Router,
        channel: None,
        tx_power: None,
        hostname: None,
        uplinks: &[],
        subnet_id: 7,
        passphrase: "bench passphrase",
        passphrase_next: None,
        labels: None,
    };
    let config = sidenet_controller::reconcile::core::build_config(&renderer, &inputs)
        .map_err(anyhow::Error::msg)?;
    // An OpenWrt render is uci batches of sidenet's own sections (etc/sidenet/uci/PACKAGE).
    // OpenWrt's own `uci` applies each to an empty package, so netjsonconfig parses exactly
    // the sections sidenet declares, as they land in /etc/config.
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("etc/config");
    std::fs::create_dir_all(&conf)?;
    let uci = repo.join(".tools/bin/uci");
    for f in &config.files {
        let Some(package) = f.path.strip_prefix("etc/sidenet/uci/") else {
            continue;
        };
        let batch: String = f
            .content
            .replace(
                "@sidenet-wireguard-private-key@",
                "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=",
            )
            .lines()
            .filter(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#') && !t.starts_with("require ")
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            + &format!("commit {package}\n");
        std::fs::write(conf.join(package), "")?;
        let out = run_with_input(
            Command::new(&uci)
                .arg("-c")
                .arg(&conf)
                .arg("-t")
                .arg(dir.path().join("uci-changes"))
                .arg("batch"),
            &batch,
        )
        .with_context(|| format!("running {}", uci.display()))?;
        if !out.status.success() || !out.stderr.is_empty() {
            bail!(
                "uci batch {package}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let python = repo.join(".venv-peers/bin/python");
    let out = Command::new(&python)
        .arg(repo.join("tests/peers/netjsonconfig_bench.py"))
        .arg(dir.path())
        .arg(n.to_string())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "netjsonconfig bench: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v["per_s"].as_f64().context("no per_s")
}

/// Runs of each rollout in a full benchmark run.
const ROUNDS: usize = 3;

/// The median (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

async fn all(smoke: bool, out_dir: &Path, repo: &Path) -> anyhow::Result<()> {
    let repo = &std::fs::canonicalize(repo)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (small, large) = if smoke { (200, 200) } else { (1_000, 10_000) };
    let mut r: BTreeMap<&str, Value> = BTreeMap::new();
    r.insert("cores", json!(cores));
    r.insert("smoke", json!(smoke));

    eprintln!("render + sign");
    let rs = render_sign(repo, if smoke { 2_000 } else { 40_000 }, 2)?;
    eprintln!("  {rs:.0} configs/s");
    r.insert("render_sign_per_s", json!(rs.round()));
    eprintln!("netjsonconfig");
    let nj = netjsonconfig_per_s(repo, if smoke { 20 } else { 300 })?;
    eprintln!("  {nj:.1} configs/s");
    r.insert("netjsonconfig_per_s", json!((nj * 10.0).round() / 10.0));

    // The agent's footprint and apply time first, on a quiet file system: the rollouts below
    // create and delete gigabytes of state, and the journal commits that follow (with online
    // discard on this machine) would be timed as part of every fsync of the apply.
    eprintln!("agent footprint");
    let agent_bin = if smoke {
        sibling("sidenet-agent")?
    } else {
        // target/release/sidenet-bench → target/agent/sidenet-agent
        let exe = std::env::current_exe()?;
        let p = exe
            .parent()
            .and_then(Path::parent)
            .map(|t| t.join("agent/sidenet-agent"))
            .context("no target folder")?;
        if !p.exists() {
            bail!(
                "{} is missing: bench/run builds it with --profile agent",
                p.display()
            );
        }
        p
    };
    let (size, rss) = agent_footprint(repo, &agent_bin).await?;
    r.insert("agent_binary_bytes", json!(size));
    // Which build that was: `sidenet-agent 0.1.0 (no tls)` or `... (tls)`.
    let version = Command::new(&agent_bin).arg("--version").output()?;
    r.insert(
        "agent_binary_version",
        json!(String::from_utf8_lossy(&version.stdout).trim()),
    );
    // The build with the cargo feature `tls` (mqtts://), copied aside by bench/run.
    let tls_bin = agent_bin.with_file_name("sidenet-agent-tls");
    if !smoke {
        let tls_size = std::fs::metadata(&tls_bin)
            .with_context(|| format!("{}: bench/run builds it", tls_bin.display()))?
            .len();
        r.insert("agent_tls_binary_bytes", json!(tls_size));
    }
    r.insert("agent_idle_rss_bytes", json!(rss));
    let apply = agent_apply(repo, if smoke { 20 } else { 200 })?;
    r.insert("agent_apply_s", json!((apply * 1e6).round() / 1e6));
    // The agents for the routers' CPUs, built by bench/run with scripts/build-agents.
    let agents = if smoke {
        BTreeMap::new()
    } else {
        eprintln!("agents for the routers' CPUs");
        cross::measure(repo, &cross::default_dir(repo)).await?
    };
    r.extend(agents.clone());

    // Each rollout runs ROUNDS times (fresh controller, broker and agents each time); the
    // figure is the median, and every run's value is kept under `<key>_runs`. On 2 shared
    // cores one run of a storm varies by ±15 %.
    let rounds = if smoke { 1 } else { ROUNDS };
    let timed = |r: &mut BTreeMap<&str, Value>, key: [&'static str; 2], runs: Vec<f64>| {
        r.insert(key[0], json!(round3(median(&runs))));
        if runs.len() > 1 {
            r.insert(
                key[1],
                json!(runs.iter().map(|v| round3(*v)).collect::<Vec<_>>()),
            );
        }
    };
    let mut one = Vec::new();
    for i in 0..rounds {
        one.push(rollout(repo, small, true, false, 11 + 100 * i as u64).await?);
    }
    timed(
        &mut r,
        ["fanout_1k_s", "fanout_1k_s_runs"],
        one.iter().map(|x| x.second_s).collect(),
    );
    let mut big = Vec::new();
    for i in 0..rounds {
        // The one-node override is measured once (it is a count, not a time).
        big.push(rollout(repo, large, true, i == 0, 12 + 100 * i as u64).await?);
    }
    timed(
        &mut r,
        ["fanout_10k_s", "fanout_10k_s_runs"],
        big.iter().map(|x| x.second_s).collect(),
    );
    timed(
        &mut r,
        ["enrol_10k_s", "enrol_10k_s_runs"],
        big.iter().map(|x| x.first_s).collect(),
    );
    r.insert("incremental_publishes", json!(big[0].incremental_publishes));
    r.insert("incremental_renders", json!(big[0].incremental_renders));
    let rss: Vec<f64> = big.iter().map(|x| x.controller_rss as f64).collect();
    r.insert(
        "controller_rss_10k_bytes",
        json!(median(&rss).round() as u64),
    );

    let mut e1 = Vec::new();
    let mut e2 = Vec::new();
    for i in 0..rounds {
        let seed = 100 * i as u64;
        e1.push(rollout(repo, small, false, false, 13 + seed).await?);
        e2.push(
            rollout(
                repo,
                if smoke { 200 } else { 2_000 },
                false,
                false,
                14 + seed,
            )
            .await?,
        );
    }
    timed(
        &mut r,
        [
            "embedded_first_rollout_1k_s",
            "embedded_first_rollout_1k_s_runs",
        ],
        e1.iter().map(|x| x.first_s).collect(),
    );
    timed(
        &mut r,
        [
            "embedded_second_rollout_1k_s",
            "embedded_second_rollout_1k_s_runs",
        ],
        e1.iter().map(|x| x.second_s).collect(),
    );
    timed(
        &mut r,
        [
            "embedded_first_rollout_2k_s",
            "embedded_first_rollout_2k_s_runs",
        ],
        e2.iter().map(|x| x.first_s).collect(),
    );
    timed(
        &mut r,
        [
            "embedded_second_rollout_2k_s",
            "embedded_second_rollout_2k_s_runs",
        ],
        e2.iter().map(|x| x.second_s).collect(),
    );

    r.insert("measured_at", json!(today()));

    std::fs::create_dir_all(out_dir)?;
    let json_text = serde_json::to_string_pretty(&r)?;
    std::fs::write(out_dir.join("benchmarks.json"), format!("{json_text}\n"))?;
    // The generated table replaces what is between the markers; the analysis around it stays.
    let md_path = out_dir.join("benchmarks.md");
    let table = markdown(&r, cores);
    let existing = std::fs::read_to_string(&md_path).unwrap_or_default();
    let (begin, end) = ("<!-- results:begin -->", "<!-- results:end -->");
    let text = match (existing.find(begin), existing.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{begin}\n{table}{}", &existing[..b], &existing[e..])
        }
        _ => format!("# Benchmarks\n\n{begin}\n{table}{end}\n"),
    };
    std::fs::write(&md_path, text)?;
    if !agents.is_empty() {
        cross::update(out_dir, &agents)?;
    }
    println!("{json_text}");
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn today() -> String {
    let out = Command::new("date").arg("-u").arg("+%Y-%m-%d").output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn markdown(r: &BTreeMap<&str, Value>, cores: usize) -> String {
    let f = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
    let num = |k: &str| f(k).as_f64().unwrap_or(f64::NAN);
    let mb = |k: &str| format!("{:.2} MB", num(k) / 1_048_576.0);
    let ok = |met: bool| if met { "met" } else { "**missed**" };
    // A time, with every run's value when the figure is a median.
    let secs = |k: &str| {
        let runs = r
            .get(format!("{k}_runs").as_str())
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|v| format!("{v}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            });
        match runs {
            Some(runs) => format!("{} s (median of {runs})", f(k)),
            None => format!("{} s", f(k)),
        }
    };
    let ratio = num("render_sign_per_s") / num("netjsonconfig_per_s");
    // The footprint rows name the build they measured (its --version).
    let agent_row = format!(
        "Agent binary (stripped, size profile): `{}`",
        f("agent_binary_version").as_str().unwrap_or("?")
    );
    let rows = [
        (
            "Fan-out, 1,000 agents, Mosquitto (channel change → all applied)",
            secs("fanout_1k_s"),
            "—".to_string(),
            "—",
        ),
        (
            "Fan-out, 10,000 agents, Mosquitto",
            secs("fanout_10k_s"),
            "≤ 1.5 s".into(),
            ok(num("fanout_10k_s") <= 1.5),
        ),
        (
            "Render + sign, 2 threads",
            format!("{} configs/s", f("render_sign_per_s")),
            "≥ 50,000/s".into(),
            ok(num("render_sign_per_s") >= 50_000.0),
        ),
        (
            "netjsonconfig render (same OpenWrt config)",
            format!("{} configs/s", f("netjsonconfig_per_s")),
            "—".into(),
            "—",
        ),
        (
            "Ratio render+sign / netjsonconfig",
            format!("{ratio:.0}×"),
            "≥ 100×".into(),
            ok(ratio >= 100.0),
        ),
        (
            "Enrolment storm, 10,000 new agents → first config applied",
            secs("enrol_10k_s"),
            "≤ 15 s".into(),
            ok(num("enrol_10k_s") <= 15.0),
        ),
        (
            "Incremental: one node override → configs published",
            format!(
                "{} published, {} rendered",
                f("incremental_publishes"),
                f("incremental_renders")
            ),
            "exactly 1".into(),
            ok(num("incremental_publishes") == 1.0),
        ),
        (
            agent_row.as_str(),
            mb("agent_binary_bytes"),
            "≤ 1.5 MB".into(),
            ok(num("agent_binary_bytes") <= 1.5 * 1_048_576.0),
        ),
        (
            "Agent binary with `--features tls` (mqtts://, rustls + ring)",
            mb("agent_tls_binary_bytes"),
            "—".into(),
            "—",
        ),
        (
            "Agent idle RSS (the same build)",
            mb("agent_idle_rss_bytes"),
            "≤ 4 MB".into(),
            ok(num("agent_idle_rss_bytes") <= 4.0 * 1_048_576.0),
        ),
        (
            "Agent verify + apply, one config",
            format!("{:.3} ms", num("agent_apply_s") * 1000.0),
            "≤ 5 ms".into(),
            ok(num("agent_apply_s") <= 0.005),
        ),
        (
            "Controller RSS with 10,000 nodes",
            mb("controller_rss_10k_bytes"),
            "≤ 150 MB".into(),
            ok(num("controller_rss_10k_bytes") <= 150.0 * 1_048_576.0),
        ),
        (
            "Embedded broker, 1,000 agents, first rollout (enrol → applied)",
            secs("embedded_first_rollout_1k_s"),
            "—".into(),
            "—",
        ),
        (
            "Embedded broker, 1,000 agents, second rollout",
            secs("embedded_second_rollout_1k_s"),
            "—".into(),
            "—",
        ),
        (
            "Embedded broker, 2,000 agents, first rollout",
            secs("embedded_first_rollout_2k_s"),
            "≤ 3 s".into(),
            ok(num("embedded_first_rollout_2k_s") <= 3.0),
        ),
        (
            "Embedded broker, 2,000 agents, second rollout",
            secs("embedded_second_rollout_2k_s"),
            "—".into(),
            "—",
        ),
    ];
    let mut md = format!(
        "Measured on {} with {cores} cores; controller, broker and the fleet simulator on the same machine. \
Reproduce with `bench/run` (writes this file and `benchmarks.json`; about 15 minutes from nothing built, 2 once built). All figures are from one \
run of it; each rollout (fan-out, storm, embedded broker) ran three times in it, with fresh state each time, and its \
row gives the median and the three values.\n\n\
| Measurement | Result | Target | |\n|---|---|---|---|\n",
        f("measured_at").as_str().unwrap_or("?")
    );
    for (name, value, target, met) in rows {
        md.push_str(&format!("| {name} | {value} | {target} | {met} |\n"));
    }
    md
}

/// Runs `cmd` with `input` on its standard input and collects its output.
fn run_with_input(cmd: &mut Command, input: &str) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    child.wait_with_output()
}
