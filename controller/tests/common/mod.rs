//! Shared helpers for process-level tests: free ports, child processes that die with the test,
//! polling with a deadline, and the peers (Mosquitto, Python) the test scripts install.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of the workspace, built by `cargo test --workspace` next to this package's own.
pub fn bin(name: &str) -> PathBuf {
    let own = PathBuf::from(env!("CARGO_BIN_EXE_sidenet-controller"));
    let p = own.with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run the workspace tests (`cargo test --workspace`) so every binary is built",
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

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Python with the peer packages (PyNaCl, netjsonconfig, paho-mqtt), as installed by
/// `scripts/test`.
pub fn peer_python() -> PathBuf {
    if let Ok(p) = std::env::var("SIDENET_PEER_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo().join(".venv-peers/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `scripts/test` once, it installs the test peers",
        p.display()
    );
    p
}

/// OpenWrt's own `uci` command-line tool, built from the libuci sources by
/// `scripts/install-peers` into `.tools/bin/uci` (or `SIDENET_TEST_UCI`).
pub fn uci_cli() -> PathBuf {
    if let Ok(p) = std::env::var("SIDENET_TEST_UCI") {
        return PathBuf::from(p);
    }
    let p = repo().join(".tools/bin/uci");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-peers once, it builds OpenWrt's uci tool",
        p.display()
    );
    p
}

/// A Mosquitto broker on a free port, configured in `dir`.
pub fn mosquitto(dir: &Path) -> (Proc, u16) {
    mosquitto_with(dir, "")
}

/// User and password of the dynamic security plugin's admin in [`mosquitto_dynsec`].
#[allow(dead_code)]
pub const DYNSEC_ADMIN: (&str, &str) = ("admin", "admin-secret");

/// A Mosquitto broker with its dynamic security plugin, initialised (`mosquitto_ctrl dynsec
/// init`) with the admin [`DYNSEC_ADMIN`] and nothing else.
#[allow(dead_code)]
pub fn mosquitto_dynsec(dir: &Path) -> (Proc, u16) {
    use std::os::unix::fs::PermissionsExt;
    let json = dir.join("dynsec.json");
    let out = Command::new("mosquitto_ctrl")
        .args(["dynsec", "init"])
        .arg(&json)
        .args([DYNSEC_ADMIN.0, DYNSEC_ADMIN.1])
        .output()
        .expect("mosquitto_ctrl (scripts/install-peers installs mosquitto-clients)");
    assert!(json.exists(), "mosquitto_ctrl dynsec init: {out:?}");
    // Mosquitto may switch to its own user: let it read and rewrite the file.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&json, std::fs::Permissions::from_mode(0o666)).unwrap();
    let plugin = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so";
    mosquitto_with(
        dir,
        &format!(
            "plugin {plugin}\nplugin_opt_config_file {}\n",
            json.display()
        ),
    )
}

pub fn mosquitto_with(dir: &Path, extra: &str) -> (Proc, u16) {
    let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("mosquitto is not installed: run `scripts/test` once, it installs the test peers");
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmessage_size_limit 1048576\n{extra}"
        ),
    )
    .unwrap();
    let p = Proc::spawn(
        "mosquitto",
        Command::new(exe).arg("-c").arg(&conf),
        &dir.join("mosquitto.log"),
    );
    wait_for(
        "mosquitto to listen",
        Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        String::new,
    );
    (p, port)
}

/// The join code of mesh `riverside` of the controller whose state folder is `state` (the
/// controller writes the key when it loads the mesh).
pub fn join_code(state: &Path) -> String {
    let text = std::fs::read_to_string(state.join("keys/riverside.key"))
        .expect("the controller's key of mesh riverside");
    let key = sidenet_wire::keys::KeyPair::from_file_text(&text).unwrap();
    sidenet_wire::join::JoinCode::new("riverside", &key.public()).to_string()
}
