//! Generates `regdb/src/data.rs` from the committed `regdb/regulatory.db`.
//!
//! - `regdbgen` regenerates `src/data.rs` from `regulatory.db` and `regulatory.db.source`.
//! - `regdbgen --check` regenerates in memory and fails when `src/data.rs` differs (CI's drift
//!   check). It then compares the committed database with the machine's
//!   `/lib/firmware/regulatory.db` and says whether they differ; that never fails the check, so
//!   CI does not depend on the package version installed.
//! - `regdbgen --update [PATH] [--version VERSION]` copies `PATH` (default
//!   `/lib/firmware/regulatory.db`, as installed by the Debian package `wireless-regdb`) over the
//!   committed database, records the package version (`--version`, else `dpkg-query`), and
//!   regenerates `src/data.rs`. Review and commit the three files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sidenet_regdb::generate::{SourceRecord, rust_source, sha256_hex};
use sidenet_regdb::parse::parse;

const INSTALLED: &str = "/lib/firmware/regulatory.db";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("regdbgen: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Paths {
    db: PathBuf,
    source: PathBuf,
    data: PathBuf,
}

fn run() -> Result<ExitCode, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let paths = Paths {
        db: root.join("regulatory.db"),
        source: root.join("regulatory.db.source"),
        data: root.join("src/data.rs"),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {
            write_data(&paths)?;
            Ok(ExitCode::SUCCESS)
        }
        Some("--check") if args.len() == 1 => check(&paths),
        Some("--update") => {
            let mut from = PathBuf::from(INSTALLED);
            let mut version = None;
            let mut rest = args[1..].iter();
            while let Some(a) = rest.next() {
                if a == "--version" {
                    version = Some(rest.next().ok_or("--version needs a value")?.clone());
                } else if a.starts_with('-') {
                    return Err(format!("unknown option {a}"));
                } else {
                    from = PathBuf::from(a);
                }
            }
            update(&paths, &from, version)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => Err(format!(
            "unknown argument {other:?}; usage: regdbgen [--check | --update [PATH] [--version VERSION]]"
        )),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn generated(paths: &Paths) -> Result<String, String> {
    let bytes = read(&paths.db)?;
    let countries = parse(&bytes).map_err(|e| format!("{}: {e}", paths.db.display()))?;
    let text = String::from_utf8(read(&paths.source)?)
        .map_err(|_| format!("{} is not UTF-8", paths.source.display()))?;
    let source =
        SourceRecord::parse(&text).map_err(|e| format!("{}: {e}", paths.source.display()))?;
    Ok(rust_source(&countries, &source, &sha256_hex(&bytes)))
}

fn write_data(paths: &Paths) -> Result<(), String> {
    let text = generated(paths)?;
    if std::fs::read_to_string(&paths.data).ok().as_deref() == Some(text.as_str()) {
        println!("{} is up to date", paths.data.display());
        return Ok(());
    }
    std::fs::write(&paths.data, text)
        .map_err(|e| format!("cannot write {}: {e}", paths.data.display()))?;
    println!("wrote {}", paths.data.display());
    Ok(())
}

fn check(paths: &Paths) -> Result<ExitCode, String> {
    let want = generated(paths)?;
    let have = std::fs::read_to_string(&paths.data).unwrap_or_default();
    if have != want {
        eprintln!(
            "regdbgen: {} is out of date with {}\nrun `cargo run -p sidenet-regdb --bin regdbgen` and commit the result",
            paths.data.display(),
            paths.db.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("{} matches {}", paths.data.display(), paths.db.display());
    // Informational: the machine's database, if any, against the committed one.
    let committed = sha256_hex(&read(&paths.db)?);
    match std::fs::read(INSTALLED) {
        Err(_) => println!("note: no {INSTALLED} on this machine (package wireless-regdb)"),
        Ok(b) if sha256_hex(&b) == committed => {
            println!("note: {INSTALLED} on this machine is the committed database")
        }
        Ok(_) => println!(
            "note: {INSTALLED} on this machine (wireless-regdb {}) differs from the committed database ({}); to take it: `cargo run -p sidenet-regdb --bin regdbgen -- --update`",
            dpkg_version().unwrap_or_else(|e| format!("version unknown: {e}")),
            sidenet_regdb::source().version
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn dpkg_version() -> Result<String, String> {
    let out = std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "wireless-regdb"])
        .output()
        .map_err(|e| format!("cannot run dpkg-query: {e}"))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() {
        return Err("dpkg-query knows no installed wireless-regdb".into());
    }
    Ok(v)
}

fn update(paths: &Paths, from: &Path, version: Option<String>) -> Result<(), String> {
    let real =
        std::fs::canonicalize(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    let bytes = read(&real)?;
    let countries = parse(&bytes).map_err(|e| format!("{}: {e}", real.display()))?;
    let version = match version {
        Some(v) => v,
        None => dpkg_version()
            .map_err(|e| format!("{e}; give the version of {} with --version", real.display()))?,
    };
    let record = SourceRecord {
        package: "wireless-regdb".into(),
        version,
        file: real.display().to_string(),
    };
    std::fs::write(&paths.db, &bytes)
        .map_err(|e| format!("cannot write {}: {e}", paths.db.display()))?;
    std::fs::write(&paths.source, record.to_text())
        .map_err(|e| format!("cannot write {}: {e}", paths.source.display()))?;
    println!(
        "copied {} ({} countries, sha256 {}) to {}",
        real.display(),
        countries.len(),
        sha256_hex(&bytes),
        paths.db.display()
    );
    write_data(paths)
}
