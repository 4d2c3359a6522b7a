//! Shared helpers for the provisioning tests: child processes that die with the test, polling
//! with a deadline, a standalone controller, and a fleet of real OpenSSH servers on loopback,
//! each with its own host key, auth settings and fake device root.
//! (Process and polling helpers follow controller/tests/common/mod.rs.)

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod router;

use sidenet_controller::admin::{self, Request, Response};
use sidenet_controller::reconcile::model::StatusRow;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of the workspace (`target/debug/NAME`), built by `cargo test --workspace` or
/// `cargo build --workspace`; this package has no binaries of its own to find it by, so the
/// test executable's own folder (`target/debug/deps`) is the anchor.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target folder");
    assert!(
        p.exists(),
        "{} is missing: run the workspace tests (`cargo test --workspace`) or `cargo build --workspace` first, so every binary is built",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A child process killed when dropped; its output goes to a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env("RUST_LOG", "info,rumqttd=warn,rumqttd::server::broker=off")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            log: log.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns `Some` or the deadline passes; panics with `what` and `context()`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A standalone controller with the riverside example mesh (auto or token enrolment) and its
/// embedded broker.
pub struct Controller {
    pub dir: PathBuf,
    pub port: u16,
    pub proc: Proc,
}

impl Controller {
    pub fn start(dir: &Path, mode: &str) -> Controller {
        Self::start_with(dir, mode, &repo().join("templates"), &dir.join("dist"))
    }

    /// A controller with its own templates folder (render templates + install descriptors) and
    /// agent binaries folder (for `NodeProvision` manifests).
    pub fn start_with(dir: &Path, mode: &str, templates: &Path, agents: &Path) -> Controller {
        Self::start_with_args(dir, mode, templates, agents, &[])
    }

    /// [`Controller::start_with`], with more command-line arguments.
    pub fn start_with_args(
        dir: &Path,
        mode: &str,
        templates: &Path,
        agents: &Path,
        extra: &[std::ffi::OsString],
    ) -> Controller {
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        // Without the example's rate policy: the router runs on the host's kernel, and an OpenWrt
        // config with a shaping table also needs tc, ip and two kernel modules the host has not.
        let text = std::fs::read_to_string(repo().join("examples/riverside/mesh.yaml"))
            .unwrap()
            .replace("    - type: rateLimit\n      rateKbit: 20000\n", "");
        std::fs::write(
            manifests.join("mesh.yaml"),
            text.replace("mode: auto", &format!("mode: {mode}")),
        )
        .unwrap();
        // A restarted controller listens where the agents already connect.
        let port_file = dir.join("port");
        let port = match std::fs::read_to_string(&port_file) {
            Ok(p) => p.trim().parse().unwrap(),
            Err(_) => {
                let p = free_port();
                std::fs::write(&port_file, p.to_string()).unwrap();
                p
            }
        };
        let state = dir.join("state");
        let proc = Proc::spawn(
            "controller",
            Command::new(bin("sidenet-controller"))
                .arg("standalone")
                .arg("--manifests")
                .arg(&manifests)
                .arg("--profiles")
                .arg(repo().join("hardware-profiles"))
                .arg("--templates")
                .arg(templates)
                .arg("--agents")
                .arg(agents)
                .arg("--state")
                .arg(&state)
                .arg("--poll-ms")
                .arg("100")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .args(extra),
            &dir.join("controller.log"),
        );
        let c = Controller {
            dir: dir.to_path_buf(),
            port,
            proc,
        };
        wait_for(
            "the controller's admin socket",
            Duration::from_secs(30),
            || admin::call(&state, &Request::Status).ok(),
            || tail(&c.proc.log_text(), 30),
        );
        c
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn broker(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    pub fn provisions(&self) -> Vec<sidenet_controller::admin::ProvisionRow> {
        match admin::call(&self.state(), &Request::Status).unwrap() {
            Response::Status { provisions, .. } => provisions,
            other => panic!("{other:?}"),
        }
    }

    pub fn nodes(&self) -> Vec<StatusRow> {
        match admin::call(&self.state(), &Request::Status).unwrap() {
            Response::Status { nodes, .. } => nodes,
            other => panic!("{other:?}"),
        }
    }
}

/// How an sshd lets clients in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Public keys in its authorized_keys.
    Key,
    /// Passwords (root's password is `password`, inside sshd's own mount namespace only).
    Password(&'static str),
}

/// One OpenSSH server on loopback: `-D -e` in the foreground, its own folder, host key and
/// authorized_keys.
pub struct Sshd {
    pub name: String,
    pub dir: PathBuf,
    pub port: u16,
    pub auth: Auth,
    proc: Option<Proc>,
    starts: usize,
}

pub fn sshd_exe() -> PathBuf {
    let p = PathBuf::from("/usr/sbin/sshd");
    assert!(
        p.exists(),
        "/usr/sbin/sshd is missing: run `scripts/install-peers` (it installs openssh-server)"
    );
    p
}

pub fn keygen(path: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", ""])
        .arg("-f")
        .arg(path));
}

impl Sshd {
    /// Starts an sshd whose authorized_keys holds `authorized` (public key lines).
    pub fn start(base: &Path, name: &str, auth: Auth, authorized: &str) -> Sshd {
        Self::start_with(base, name, auth, authorized, "")
    }

    /// [`Sshd::start`] with more sshd_config lines (e.g. `SetEnv PATH=...`).
    pub fn start_with(base: &Path, name: &str, auth: Auth, authorized: &str, extra: &str) -> Sshd {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // sshd's privilege separation folder.
        std::fs::create_dir_all("/run/sshd").unwrap();
        keygen(&dir.join("hostkey"));
        std::fs::write(dir.join("authorized_keys"), authorized).unwrap();
        let port = free_port();
        let password = matches!(auth, Auth::Password(_));
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin {prl}\n\
                 PasswordAuthentication {pa}\nKbdInteractiveAuthentication no\nPubkeyAuthentication {pk}\n\
                 UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\nMaxStartups 100\nLogLevel VERBOSE\n{extra}",
                d = dir.display(),
                prl = if password { "yes" } else { "prohibit-password" },
                pa = if password { "yes" } else { "no" },
                pk = if password { "no" } else { "yes" },
            ),
        )
        .unwrap();
        if let Auth::Password(pw) = auth {
            // A copy of /etc/shadow with a known root password, bind-mounted over the real one
            // in sshd's own mount namespace: the machine's accounts stay untouched.
            let hash = run(Command::new("openssl").args(["passwd", "-6", pw]));
            let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
            let mine: String = shadow
                .lines()
                .map(|l| match l.split_once(':') {
                    Some(("root", rest)) => {
                        let rest = rest.split_once(':').map(|(_, r)| r).unwrap_or("");
                        format!("root:{}:{rest}\n", hash.trim())
                    }
                    _ => format!("{l}\n"),
                })
                .collect();
            std::fs::write(dir.join("shadow"), mine).unwrap();
        }
        run(Command::new(sshd_exe())
            .arg("-t")
            .arg("-f")
            .arg(dir.join("sshd_config")));
        let mut s = Sshd {
            name: name.to_string(),
            dir,
            port,
            auth,
            proc: None,
            starts: 0,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let conf = self.dir.join("sshd_config");
        let mut cmd = if matches!(self.auth, Auth::Password(_)) {
            let mut c = Command::new("unshare");
            c.arg("--mount").arg("sh").arg("-c").arg(format!(
                "mount --bind {shadow} /etc/shadow && exec {sshd} -D -e -f {conf}",
                shadow = self.dir.join("shadow").display(),
                sshd = sshd_exe().display(),
                conf = conf.display()
            ));
            c
        } else {
            let mut c = Command::new(sshd_exe());
            c.arg("-D").arg("-e").arg("-f").arg(&conf);
            c
        };
        self.starts += 1;
        let log = self.dir.join(format!("sshd-{}.log", self.starts));
        self.proc = Some(Proc::spawn(&format!("sshd {}", self.name), &mut cmd, &log));
        let port = self.port;
        wait_for(
            &format!("sshd {} to listen on {port}", self.name),
            Duration::from_secs(10),
            || {
                let l = std::fs::read_to_string(&log).unwrap_or_default();
                l.contains("Server listening").then_some(())
            },
            || std::fs::read_to_string(&log).unwrap_or_default(),
        );
    }

    /// Stops the server: connections to its port are refused.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// A new host key on the same port (as after a reinstall, or an impostor).
    pub fn change_host_key(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.dir.join("hostkey"));
        let _ = std::fs::remove_file(self.dir.join("hostkey.pub"));
        keygen(&self.dir.join("hostkey"));
        self.launch();
    }

    pub fn host_key_line(&self) -> String {
        std::fs::read_to_string(self.dir.join("hostkey.pub"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn log_text(&self) -> String {
        sshd_log(&self.dir)
    }
}

/// Everything the sshd of `dir` logged, over all its starts.
pub fn sshd_log(dir: &Path) -> String {
    (1..)
        .map(|i| std::fs::read_to_string(dir.join(format!("sshd-{i}.log"))))
        .take_while(Result::is_ok)
        .map(Result::unwrap_or_default)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The agents the test's "service" started on its fake devices (via sshd, so not children of
/// the test): stopped by their pid files when dropped.
pub struct Agents(pub Vec<PathBuf>);

pub fn agent_pid(root: &Path) -> Option<u32> {
    std::fs::read_to_string(root.join("run/sidenet-agent.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

impl Drop for Agents {
    fn drop(&mut self) {
        for root in &self.0 {
            if let Some(pid) = agent_pid(root) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

/// Install descriptors for the test machine, which has neither procd nor systemd: the same
/// paths as the shipped openwrt/ and linux/ descriptors, and a small sh script as the "service"
/// that runs the agent in the background with a pid file under the device's root.
pub fn test_templates(dir: &Path) {
    test_templates_with(dir, &Templates::default());
}

/// What [`test_templates_with`] adds to the plain test descriptors.
#[derive(Debug, Default, Clone)]
pub struct Templates {
    /// Extra agent arguments per family (`--backend openwrt`).
    pub openwrt_args: String,
    /// The shipped descriptors' `packages` (what the configs need).
    pub packages: bool,
    /// The shipped OpenWrt descriptor's `keep` list, and a `disable` command.
    pub keep: bool,
}

/// [`test_templates`] with the shipped descriptors' `packages`, `keep` and extra agent
/// arguments.
pub fn test_templates_with(dir: &Path, opts: &Templates) {
    for (family, agent, state, service) in [
        (
            "openwrt",
            "usr/bin/sidenet-agent",
            "etc/sidenet-agent",
            "etc/init.d/sidenet-agent",
        ),
        (
            "linux",
            "usr/local/bin/sidenet-agent",
            "var/lib/sidenet-agent",
            "etc/systemd/system/sidenet-agent.service",
        ),
    ] {
        let d = dir.join(family);
        std::fs::create_dir_all(&d).unwrap();
        let shipped: serde_json::Value = sidenet_crds::yaml::from_str(
            &std::fs::read_to_string(repo().join("templates").join(family).join("install.yaml"))
                .unwrap(),
        )
        .unwrap();
        let mut extra = String::new();
        if opts.packages {
            let m = serde_json::json!({ "packages": shipped["packages"].clone() });
            extra.push_str(&sidenet_crds::yaml::to_string(&m).unwrap());
        }
        if opts.keep && family == "openwrt" {
            let m = serde_json::json!({ "keep": shipped["keep"].clone() });
            extra.push_str(&sidenet_crds::yaml::to_string(&m).unwrap());
        }
        let disable = if opts.keep {
            "  disable: rm -f {{ root }}/etc/rc.d/S95sidenet-agent {{ root }}/etc/rc.d/K10sidenet-agent\n"
        } else {
            ""
        };
        let args = if family == "openwrt" {
            opts.openwrt_args.as_str()
        } else {
            ""
        };
        std::fs::write(
            d.join("install.yaml"),
            format!(
                r#"# Test stand-in for {family}: same paths, a background process instead of the service manager.
agent: {agent}
config: etc/sidenet/agent.json
state: {state}
service:
  path: {service}
  mode: 493
  content: |
    #!/bin/sh
    # sidenet agent for mesh {{{{ mesh }}}} on {{{{ name }}}} (test service).
    pidfile={{{{ root }}}}/run/sidenet-agent.pid
    case "$1" in
      start)
        if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then exit 0; fi
        mkdir -p {{{{ root }}}}/run {{{{ root }}}}/var/log
        setsid {{{{ agent }}}} --config {{{{ config }}}} --status-interval 2{args} >>{{{{ root }}}}/var/log/sidenet-agent.log 2>&1 </dev/null &
        echo $! > "$pidfile"
        ;;
      stop)
        if [ -f "$pidfile" ]; then
          pid=$(cat "$pidfile")
          kill "$pid" 2>/dev/null
          i=0
          while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
          # As procd and systemd do: SIGKILL what did not stop within the timeout (an agent
          # busy applying finishes that first), so two agents never share the state folder.
          if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
          fi
          rm -f "$pidfile"
        fi
        ;;
      running)
        [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
        ;;
    esac
commands:
  enable: mkdir -p {{{{ root }}}}/etc/rc.d && ln -sf {{{{ service }}}} {{{{ root }}}}/etc/rc.d/S95sidenet-agent && ln -sf {{{{ service }}}} {{{{ root }}}}/etc/rc.d/K10sidenet-agent
  start: "{{{{ service }}}} start"
  stop: "{{{{ service }}}} stop"
  running: "{{{{ service }}}} running"
{disable}{extra}"#
            ),
        )
        .unwrap();
    }
}

/// A fake device root: an OpenWrt board (`/etc/board.json` as board.d writes it, from a
/// recorded `ubus call system board`) or a Debian host (`/etc/os-release`), with wireless phys.
pub fn fake_device(root: &Path, board_fixture: Option<&str>, phys: &[&str]) {
    let fixtures = repo().join("controller/tests/fixtures/boards");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    match board_fixture {
        Some(f) => {
            let ubus: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(fixtures.join(f)).unwrap()).unwrap();
            let board_json = serde_json::json!({
                "model": {"id": ubus["board_name"], "name": ubus["model"]},
                "network": {"lan": {"device": "br-lan", "protocol": "static"}, "wan": {"device": "wan", "protocol": "dhcp"}},
            });
            std::fs::write(
                root.join("etc/board.json"),
                serde_json::to_string_pretty(&board_json).unwrap(),
            )
            .unwrap();
            std::fs::write(
                root.join("etc/os-release"),
                "NAME=\"OpenWrt\"\nVERSION=\"23.05.5\"\nID=\"openwrt\"\nVERSION_ID=\"23.05.5\"\nPRETTY_NAME=\"OpenWrt 23.05.5\"\n",
            )
            .unwrap();
        }
        None => {
            std::fs::copy(
                fixtures.join("pcengines-apu2-wle600vx.os-release"),
                root.join("etc/os-release"),
            )
            .unwrap();
        }
    }
    for phy in phys {
        std::fs::create_dir_all(root.join("sys/class/ieee80211").join(phy)).unwrap();
    }
}

/// Agent binaries by architecture: the workspace's own x86_64 build for every architecture the
/// fleet claims (the fake devices all run on this x86_64 machine).
pub fn dist(dir: &Path, arches: &[&str]) {
    for a in arches {
        let d = dir.join(a);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(bin("sidenet-agent"), d.join("sidenet-agent")).unwrap();
    }
}
