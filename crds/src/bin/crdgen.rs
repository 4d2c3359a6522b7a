//! Regenerates `crds/*.yaml` and the Helm chart's copy from the Rust types.
//!
//! `cargo run -p sidenet-crds --bin crdgen` writes the files; `--check` only compares and exits
//! non-zero when a committed file differs (CI's drift check).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let targets = [root.clone(), root.join("../charts/sidenet/crds")];
    let docs = match sidenet_crds::crd_documents() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("crdgen: cannot serialise CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut drift = Vec::new();
    for dir in &targets {
        for (file, text) in &docs {
            let path = dir.join(file);
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current == *text {
                continue;
            }
            if check {
                drift.push(path.display().to_string());
                continue;
            }
            if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, text))
            {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        }
    }
    if !drift.is_empty() {
        eprintln!(
            "crdgen: generated CRDs are out of date: {}\nrun `cargo run -p sidenet-crds --bin crdgen` and commit the result",
            drift.join(", ")
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
