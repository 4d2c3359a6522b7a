//! The packages a config needs ([`NodeConfig::requires`](sidenet_wire::messages::NodeConfig)):
//! the backends that run programs (`linux`, `openwrt`) check them before every apply and at
//! start, so a missing program is reported (`missing: babeld, wpad-mesh-mbedtls`) instead of
//! failing the apply and rolling it back. The rule is the one `sidenetctl provision` uses: the
//! program is an executable file (an absolute path, or a name found in a folder of `PATH`) and,
//! with `args`, exits 0 when run with them.

use std::path::{Path, PathBuf};

use sidenet_wire::messages::Requirement;

use crate::backend::Runner;

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where `program` is: itself when absolute, else the first executable of that name on `path`
/// (the value of `PATH`).
pub fn find(program: &str, path: &str) -> Option<PathBuf> {
    if program.starts_with('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    if program.is_empty() || program.contains('/') {
        return None;
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
}

/// The agent's `PATH` (OpenWrt's procd and systemd both set one; this is the fallback).
pub fn search_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
}

/// The packages of `reqs` that are not there, in order, each once; programs are looked up on
/// `path` ([`search_path`]).
pub fn missing(reqs: &[Requirement], path: &str, runner: &mut dyn Runner) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in reqs {
        let met = find(&r.program, path).is_some_and(|p| {
            if r.args.is_empty() {
                return true;
            }
            let p = p.to_string_lossy();
            let mut argv: Vec<&str> = vec![&p];
            argv.extend(r.args.iter().map(String::as_str));
            runner.run(&argv).is_ok()
        });
        if !met && !out.contains(&r.package) {
            out.push(r.package.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::SystemRunner;

    fn req(package: &str, program: &str, args: &[&str]) -> Requirement {
        Requirement {
            package: package.into(),
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn script(dir: &Path, name: &str, body: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn programs_on_path_with_capability_checks() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        script(&bin, "babeld", "exit 0", 0o755);
        // A wpad without mesh support: OpenWrt's `-vmesh` feature check fails.
        script(
            &bin,
            "wpa_supplicant",
            "[ \"$1\" = -vmesh ] && exit 255; exit 0",
            0o755,
        );
        // Not executable: not there.
        script(&bin, "wg", "exit 0", 0o644);
        let path = format!("{}:/nonexistent", bin.display());
        assert_eq!(find("babeld", &path), Some(bin.join("babeld")));
        assert_eq!(find("wg", &path), None);
        assert_eq!(find("../bin/babeld", &path), None);
        let abs = bin.join("babeld").display().to_string();
        assert_eq!(find(&abs, ""), Some(bin.join("babeld")));
        let reqs = [
            req("babeld", "babeld", &[]),
            req("wireguard-tools", "wg", &[]),
            req("wpad-mesh-mbedtls", "wpa_supplicant", &["-vmesh"]),
            req("iw", "iw", &[]),
            req("babeld", &abs, &[]),
        ];
        let missing_now = |reqs: &[Requirement]| missing(reqs, &path, &mut SystemRunner::default());
        assert_eq!(
            missing_now(&reqs),
            ["wireguard-tools", "wpad-mesh-mbedtls", "iw"]
        );
        // The mesh-capable wpad replaced the basic one.
        script(&bin, "wpa_supplicant", "exit 0", 0o755);
        assert!(missing_now(&reqs[2..3]).is_empty());
    }
}
