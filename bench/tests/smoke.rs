//! The benchmark at smoke size (200 agents), so it cannot rot: every measurement runs and
//! reports a figure. No timing is asserted here; figures live in docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

#[test]
fn smoke_benchmark_reports_every_figure() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sidenet-bench"))
        .args(["all", "--smoke", "--out-dir"])
        .arg(out.path())
        .arg("--repo")
        .arg(&repo)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "benchmark failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("benchmarks.json")).unwrap())
            .unwrap();
    for key in [
        "cores",
        "fanout_1k_s",
        "fanout_10k_s",
        "render_sign_per_s",
        "netjsonconfig_per_s",
        "enrol_10k_s",
        "incremental_publishes",
        "agent_binary_bytes",
        "agent_idle_rss_bytes",
        "agent_apply_s",
        "controller_rss_10k_bytes",
        "embedded_first_rollout_1k_s",
        "embedded_first_rollout_2k_s",
        "embedded_second_rollout_2k_s",
        "measured_at",
    ] {
        assert!(!v[key].is_null(), "{key} missing in {v}");
    }
    // Exactly one config for a one-node change: a count, not a timing.
    assert_eq!(v["incremental_publishes"], 1, "{v}");
    let md = std::fs::read_to_string(out.path().join("benchmarks.md")).unwrap();
    assert!(md.contains("| Fan-out, 10,000 agents, Mosquitto |"));
}
