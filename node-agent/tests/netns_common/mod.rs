//! Helpers shared by the network-namespace testbeds (netns.rs, netns_radio.rs).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary next to this test's (target/debug).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} missing: build the workspace binaries first (tests/netns/run does)",
        p.display()
    );
    p
}

pub fn sh(argv: &[&str]) -> Result<String, String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}`: {}{}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

pub fn must(argv: &[&str]) -> String {
    sh(argv).unwrap_or_else(|e| panic!("{e}"))
}

pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The join code of mesh riverside, once the controller wrote its key into `state`.
pub fn join_code(state: &Path) -> String {
    let path = state.join("keys/riverside.key");
    let text = poll(
        "the controller to write the mesh key",
        Duration::from_secs(30),
        || std::fs::read_to_string(&path).ok(),
    );
    let key = sidenet_wire::keys::KeyPair::from_file_text(&text).unwrap();
    sidenet_wire::join::JoinCode::new("riverside", &key.public()).to_string()
}
