//! The layer rule of the controller crate (`controller/src/lib.rs`, `LAYERS`), checked on its
//! sources with `sidenet-layercheck`: imports run one way (down the layers, never between the
//! two adapters), and no files import each other in a loop.
//!
//! `layer_violations_are_found` shows the check failing on a deliberately upward import (the
//! reconcile layer naming the Kubernetes adapter), on one adapter naming the other, and on a
//! loop between two files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use sidenet_layercheck::check;

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn imports_run_one_way() {
    let r = check(&src(), sidenet_controller::LAYERS, &[]);
    assert!(
        r.upward.is_empty() && r.loops.is_empty(),
        "layer rule broken (controller/src/lib.rs):\nupward or sideways:\n  {}\nloops:\n  {}",
        r.upward.join("\n  "),
        r.loops.join("\n  ")
    );
}

/// The check is not blind: an import from the reconcile core up to the Kubernetes adapter, one
/// between the two adapters, and a loop between two files are each found.
#[test]
fn layer_violations_are_found() {
    let r = check(
        &src(),
        sidenet_controller::LAYERS,
        &[
            ("reconcile::model", "\nuse crate::kubernetes::KubeError;\n"),
            ("standalone", "\nfn f() { crate::kubernetes::run; }\n"),
            ("spec::ipam", "\nuse crate::spec::regdb::country;\n"),
            ("spec::regdb", "\nuse crate::spec::ipam::allocate;\n"),
        ],
    );
    assert!(
        r.upward
            .iter()
            .any(|u| u.starts_with("reconcile::model (layer 2) uses kubernetes (layer 6)")),
        "{r:?}"
    );
    assert!(
        r.upward
            .iter()
            .any(|u| u.starts_with("standalone (layer 6) uses kubernetes (layer 6)")),
        "{r:?}"
    );
    assert!(
        r.loops
            .iter()
            .any(|l| l.contains("spec::ipam") && l.contains("spec::regdb")),
        "{r:?}"
    );
}
