//! The layer rule of the agent crate (`node-agent/src/lib.rs`, `LAYERS`), checked on its
//! sources: the sans-IO core at the bottom, the backend trait below its implementations, the
//! shell on top; no loops between files. `an_upward_import_is_found` shows the check catching
//! the core reaching up into a backend.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use sidenet_layercheck::check;

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn imports_run_one_way() {
    let r = check(&src(), sidenet_agent::LAYERS, &[]);
    assert!(
        r.upward.is_empty() && r.loops.is_empty(),
        "layer rule broken (node-agent/src/lib.rs):\nupward or sideways:\n  {}\nloops:\n  {}",
        r.upward.join("\n  "),
        r.loops.join("\n  ")
    );
}

#[test]
fn an_upward_import_is_found() {
    let r = check(
        &src(),
        sidenet_agent::LAYERS,
        &[
            ("core", "\nuse crate::backend::Observation;\n"),
            ("linux", "\nuse crate::openwrt::Openwrt;\n"),
        ],
    );
    assert!(
        r.upward
            .iter()
            .any(|u| u.starts_with("core (layer 0) uses backend (layer 2)")),
        "{r:?}"
    );
    assert!(
        r.upward
            .iter()
            .any(|u| u.starts_with("linux (layer 4) uses openwrt (layer 4)")),
        "{r:?}"
    );
}
