//! The packages a family's rendered configs need (`packages` in `TEMPLATES/FAMILY/install.yaml`),
//! how a host shows they are there, and the scripts that install what is missing with the host's
//! own package manager.
//!
//! They are declared per firmware family, in the install descriptor, not per hardware profile:
//! what a config needs follows from the family's templates and firmware, not from the board.
//! One declaration serves both sides: provisioning installs every package whose check fails,
//! and the controller puts the same list into every config of the family
//! ([`sidenet_wire::messages::NodeConfig::requires`]), so the agent checks it the same way
//! before each apply. A requirement is met when its `program` is found (an absolute path that is
//! an executable file, or a name found on `PATH`) and, with `args`, exits 0 when run with them.
//!
//! Which package manager a host has depends on its firmware version: `packages.managers` maps
//! version prefixes (`VERSION_ID` of `/etc/os-release`) to `opkg`, `apk` or `apt`. Package
//! names are the same for every version a descriptor lists; a version whose names differ needs a
//! descriptor of its own.
//!
//! Installing (only when something is missing):
//!
//! - `opkg`: `opkg update`, then `opkg install` of the missing packages. A package that
//!   `replaces` one that is installed (a mesh-capable wpad for the stock `wpad-basic-*`) is
//!   downloaded first, then the old one is removed and the downloaded file installed; if that
//!   install fails, the old package goes back (from its own download when it could be fetched).
//! - `apk`: `apk update`, then one `apk add` of the missing packages, with `!OLD` for each
//!   installed package they replace (one transaction: all or nothing).
//! - `apt`: `apt-get update`, then `apt-get install -y --no-install-recommends`.
//!
//! When the update fails (no network, no feed), nothing is installed and the host fails with
//! the exact list of missing packages. (`apt-get update` exits 0 even when it reaches no
//! source; there an install that fails after an update that said "Failed to fetch", or that
//! cannot fetch itself, counts as no package source.)

use serde::{Deserialize, Serialize};
use sidenet_wire::messages::Requirement;

use crate::detect::sections;
use crate::install::shell_quote;

/// `packages` of an install descriptor.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackagesSpec {
    /// The package manager per firmware version; the first rule that matches wins.
    pub managers: Vec<ManagerRule>,
    /// What the rendered configs need, in the order the agent reports them.
    pub require: Vec<PackageSpec>,
    /// What configs with a policy shaping table need besides `require` (`docs/policies.md`):
    /// only those configs carry them, and provisioning installs them for a mesh with
    /// `rateLimit` policies ([`crate::Settings::shaping`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shaping: Vec<PackageSpec>,
}

/// Which package manager hosts of some firmware versions use.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManagerRule {
    /// Prefixes of `VERSION_ID` (`23.05` matches `23.05.5`); empty: every version.
    #[serde(default)]
    pub versions: Vec<String>,
    /// The package manager.
    pub manager: Manager,
}

/// A package manager.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    /// OpenWrt up to 24.10.
    Opkg,
    /// OpenWrt 25 and later (apk-tools 3), Alpine.
    Apk,
    /// Debian and its derivatives (`apt-get`).
    Apt,
}

impl Manager {
    /// The command on the host.
    pub fn command(self) -> &'static str {
        match self {
            Self::Opkg => "opkg",
            Self::Apk => "apk",
            Self::Apt => "apt-get",
        }
    }

    /// As written in the descriptor.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opkg => "opkg",
            Self::Apk => "apk",
            Self::Apt => "apt",
        }
    }
}

/// One package a config needs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageSpec {
    /// Package name.
    pub package: String,
    /// The program that shows it is installed: an absolute path or a name looked up on `PATH`.
    pub program: String,
    /// Arguments the program must exit 0 with (a capability check, e.g. `-vmesh`).
    #[serde(default)]
    pub args: Vec<String>,
    /// Installed packages this one takes the place of (they conflict with it).
    #[serde(default)]
    pub replaces: Vec<String>,
}

impl PackageSpec {
    /// What the agent checks.
    pub fn requirement(&self) -> Requirement {
        Requirement {
            package: self.package.clone(),
            program: self.program.clone(),
            args: self.args.clone(),
        }
    }
}

/// One package's names, program and arguments: the error names the field.
fn check_package(p: &PackageSpec) -> Result<(), String> {
    if !plain(&p.package) {
        return Err(format!(
            "package: {:?} is not a package name (letters, digits, - _ . +)",
            p.package
        ));
    }
    let ok = match p.program.strip_prefix('/') {
        Some(abs) => abs.split('/').all(|s| plain(s) && s != "." && s != ".."),
        None => plain(&p.program) && p.program != "." && p.program != "..",
    };
    if !ok {
        return Err(format!(
            "program: {:?} must be a program name or an absolute path",
            p.program
        ));
    }
    if let Some(r) = p.replaces.iter().find(|r| !plain(r)) {
        return Err(format!("replaces: {r:?} is not a package name"));
    }
    if p.args.iter().any(|a| a.chars().any(char::is_control)) {
        return Err("args: control characters are not allowed".into());
    }
    Ok(())
}

fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
}

impl PackagesSpec {
    /// Checks names and programs (they end up in shell scripts and in every config).
    pub fn check(&self) -> Result<(), String> {
        if self.managers.is_empty() {
            return Err("packages.managers: at least one rule is needed".into());
        }
        for (i, r) in self.managers.iter().enumerate() {
            if let Some(v) = r.versions.iter().find(|v| !plain(v)) {
                return Err(format!(
                    "packages.managers[{i}].versions: {v:?} is not a version prefix"
                ));
            }
        }
        let lists = [("require", &self.require), ("shaping", &self.shaping)];
        for (list, specs) in lists {
            for (i, p) in specs.iter().enumerate() {
                check_package(p).map_err(|e| format!("packages.{list}[{i}].{e}"))?;
            }
        }
        Ok(())
    }

    /// The requirements every config of the family carries.
    pub fn requirements(&self) -> Vec<Requirement> {
        self.require.iter().map(PackageSpec::requirement).collect()
    }

    /// What a config with a shaping table carries besides [`Self::requirements`].
    pub fn shaping_requirements(&self) -> Vec<Requirement> {
        self.shaping.iter().map(PackageSpec::requirement).collect()
    }

    /// The spec provisioning installs for a mesh with `rateLimit` policies: `require`, then
    /// `shaping`.
    pub fn with_shaping(&self) -> PackagesSpec {
        let mut all = self.clone();
        all.require.extend(self.shaping.iter().cloned());
        all.shaping.clear();
        all
    }

    /// The package manager for a firmware version.
    pub fn manager_for(&self, version: Option<&str>) -> Result<Manager, String> {
        let v = version.unwrap_or("");
        self.managers
            .iter()
            .find(|r| r.versions.is_empty() || r.versions.iter().any(|p| v.starts_with(p.as_str())))
            .map(|r| r.manager)
            .ok_or_else(|| {
                let covered: Vec<&str> = self
                    .managers
                    .iter()
                    .flat_map(|r| r.versions.iter().map(String::as_str))
                    .collect();
                format!(
                    "packages.managers has no rule for version {} (it covers {})",
                    if v.is_empty() { "(unknown)" } else { v },
                    covered.join(", ")
                )
            })
    }
}

/// A shell function `p PROGRAM [ARGS...]` that exits 0 when the requirement is met, the same
/// rule as the agent's check.
const CHECK_FN: &str = "p() {\n\
    \x20 prog=$1; shift\n\
    \x20 case $prog in\n\
    \x20   /*) { [ -f \"$prog\" ] && [ -x \"$prog\" ]; } || return 1 ;;\n\
    \x20   *) command -v \"$prog\" >/dev/null 2>&1 || return 1 ;;\n\
    \x20 esac\n\
    \x20 [ $# -eq 0 ] || \"$prog\" \"$@\" </dev/null >/dev/null 2>&1\n\
    }\n";

/// The check: which packages are missing, whether the package manager is there, and which of
/// the packages the missing ones replace are installed.
pub fn check_script(spec: &PackagesSpec, manager: Manager) -> String {
    let q = shell_quote;
    let mut s = String::from(CHECK_FN);
    s.push_str("m=\necho @@missing\n");
    for p in &spec.require {
        let mut call = vec![q(&p.program)];
        call.extend(p.args.iter().map(|a| q(a)));
        s.push_str(&format!(
            "p {} || {{ echo {pkg}; m=1; }}\n",
            call.join(" "),
            pkg = q(&p.package)
        ));
    }
    s.push_str(&format!(
        "echo @@manager\ncommand -v {} >/dev/null 2>&1 && echo yes\necho @@installed\n",
        manager.command()
    ));
    let replaced: Vec<String> = spec
        .require
        .iter()
        .flat_map(|p| p.replaces.iter().map(|r| q(r)))
        .collect();
    // The package manager is asked only when something is missing.
    if !replaced.is_empty() {
        let list = replaced.join(" ");
        let query = match manager {
            Manager::Opkg => format!(
                "opkg list-installed 2>/dev/null | while read -r n rest; do for r in {list}; do [ \"$n\" = \"$r\" ] && echo \"$n\"; done; done"
            ),
            Manager::Apk => format!(
                "for r in {list}; do apk info -e \"$r\" >/dev/null 2>&1 && echo \"$r\"; done"
            ),
            Manager::Apt => format!(
                "for r in {list}; do dpkg-query -W -f='${{Status}}' \"$r\" 2>/dev/null | grep -q 'install ok installed' && echo \"$r\"; done"
            ),
        };
        s.push_str(&format!("if [ -n \"$m\" ]; then {query}; fi\n"));
    }
    s.push_str("echo @@end\n");
    s
}

/// What the check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Check {
    /// Packages whose requirement is not met, in the descriptor's order.
    pub missing: Vec<String>,
    /// The package manager is on the host.
    pub manager: bool,
    /// Installed packages that missing ones replace.
    pub installed: Vec<String>,
}

/// Reads the check's output.
pub fn parse_check(out: &str) -> Check {
    let s = sections(out);
    let lines = |k: &str| -> Vec<String> {
        s.get(k)
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    Check {
        missing: lines("missing"),
        manager: s.get("manager").is_some_and(|t| t.trim() == "yes"),
        installed: lines("installed"),
    }
}

/// Exit status of the install script when the package source cannot be reached.
pub const NO_SOURCE: i32 = 20;
/// Exit status of the install script when installing failed.
pub const INSTALL_FAILED: i32 = 21;

/// The install script for the `missing` packages; `installed` are the installed packages the
/// check found that missing ones replace. It prints the manager's output of a failing step.
pub fn install_script(
    spec: &PackagesSpec,
    manager: Manager,
    missing: &[String],
    installed: &[String],
) -> String {
    let q = shell_quote;
    let wanted: Vec<&PackageSpec> = spec
        .require
        .iter()
        .filter(|p| missing.contains(&p.package))
        .collect();
    // (new, the installed packages it replaces)
    let swaps: Vec<(&str, Vec<&str>)> = wanted
        .iter()
        .map(|p| {
            let old: Vec<&str> = p
                .replaces
                .iter()
                .filter(|r| installed.contains(r))
                .map(String::as_str)
                .collect();
            (p.package.as_str(), old)
        })
        .collect();
    let mut s = format!(
        "log=/tmp/.sidenet-packages.$$\n\
         fail() {{ code=$1; shift; echo \"@@$*\"; tail -n 15 \"$log\" 2>/dev/null; rm -f \"$log\"; exit $code; }}\n\
         run() {{ echo \"\\$ $*\" >>\"$log\"; \"$@\" >>\"$log\" 2>&1 </dev/null; }}\n\
         : >\"$log\"\n\
         {}\n",
        match manager {
            Manager::Apt => "export DEBIAN_FRONTEND=noninteractive",
            _ => ":",
        }
    );
    let update = match manager {
        Manager::Opkg => "opkg update",
        Manager::Apk => "apk update",
        Manager::Apt => "apt-get update",
    };
    s.push_str(&format!(
        "run {update} || fail {NO_SOURCE} '`{update}` failed'\n"
    ));
    match manager {
        Manager::Opkg => {
            let simple: Vec<String> = swaps
                .iter()
                .filter(|(_, old)| old.is_empty())
                .map(|(n, _)| q(n))
                .collect();
            if !simple.is_empty() {
                s.push_str(&format!(
                    "run opkg install {} || fail {INSTALL_FAILED} '`opkg install` failed'\n",
                    simple.join(" ")
                ));
            }
            for (new, old) in swaps.iter().filter(|(_, old)| !old.is_empty()) {
                let olds: Vec<String> = old.iter().map(|o| q(o)).collect();
                // Download first: once the old one is removed, a lost connection must not
                // leave the router without it.
                s.push_str(&format!(
                    "d=/tmp/.sidenet-pkg.$$\n\
                     rm -rf \"$d\"; mkdir -p \"$d\" && cd \"$d\" || fail {INSTALL_FAILED} 'cannot create '\"$d\"\n\
                     run opkg download {nq} || {{ cd /; rm -rf \"$d\"; fail {INSTALL_FAILED} '`opkg download {new}` failed'; }}\n\
                     for o in {olds}; do run opkg download \"$o\" || true; done\n\
                     run opkg remove {olds} || {{ cd /; rm -rf \"$d\"; fail {INSTALL_FAILED} '`opkg remove {old_text}` failed'; }}\n\
                     if ! run opkg install ./{nq}_*.ipk; then\n\
                     \x20 for o in {olds}; do if ls ./\"$o\"_*.ipk >/dev/null 2>&1; then run opkg install ./\"$o\"_*.ipk; else run opkg install \"$o\"; fi; done\n\
                     \x20 cd /; rm -rf \"$d\"; fail {INSTALL_FAILED} '`opkg install {new}` failed; put back {old_text}'\n\
                     fi\n\
                     cd /; rm -rf \"$d\"\n",
                    nq = q(new),
                    olds = olds.join(" "),
                    old_text = old.join(" "),
                ));
            }
        }
        Manager::Apk => {
            let mut args: Vec<String> = swaps.iter().map(|(n, _)| q(n)).collect();
            for (_, old) in &swaps {
                args.extend(old.iter().map(|o| q(&format!("!{o}"))));
            }
            s.push_str(&format!(
                "run apk add {} || fail {INSTALL_FAILED} '`apk add` failed'\n",
                args.join(" ")
            ));
        }
        Manager::Apt => {
            // `apt-get update` exits 0 when a source cannot be reached (it warns "Failed to
            // fetch" and keeps old lists): judge by whether the install then finds the packages.
            let names: Vec<String> = swaps.iter().map(|(n, _)| q(n)).collect();
            s.push_str(&format!(
                "if grep -q 'Failed to fetch' \"$log\"; then unreached=1; else unreached=0; fi\n\
                 if ! run apt-get install -y --no-install-recommends {names}; then\n\
                 \x20 if [ $unreached = 1 ] || tail -n 20 \"$log\" | grep -q -e 'Failed to fetch' -e 'Temporary failure resolving'; then\n\
                 \x20   fail {NO_SOURCE} '`apt-get update` could not reach a package source'\n\
                 \x20 fi\n\
                 \x20 fail {INSTALL_FAILED} '`apt-get install` failed'\n\
                 fi\n",
                names = names.join(" ")
            ));
        }
    }
    s.push_str("rm -f \"$log\"\necho @@done\n");
    s
}

/// `babeld, wpad-mesh-mbedtls (replacing wpad-basic-mbedtls)`.
pub fn describe(missing: &[String], spec: &PackagesSpec, installed: &[String]) -> String {
    missing
        .iter()
        .map(|m| {
            let old: Vec<&str> = spec
                .require
                .iter()
                .filter(|p| &p.package == m)
                .flat_map(|p| p.replaces.iter())
                .filter(|r| installed.contains(r))
                .map(String::as_str)
                .collect();
            if old.is_empty() {
                m.clone()
            } else {
                format!("{m} (replacing {})", old.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> PackagesSpec {
        sidenet_crds::yaml::from_str(
            "managers:\n  - { versions: ['23.05', '24.10'], manager: opkg }\n  - { versions: ['25.'], manager: apk }\nrequire:\n  - { package: babeld, program: babeld }\n  - { package: wpad-mesh-mbedtls, program: wpa_supplicant, args: [-vmesh], replaces: [wpad-basic-mbedtls, wpad-basic-wolfssl] }\n",
        )
        .unwrap()
    }

    #[test]
    fn managers_by_version_prefix() {
        let s = spec();
        s.check().unwrap();
        assert_eq!(s.manager_for(Some("23.05.5")), Ok(Manager::Opkg));
        assert_eq!(s.manager_for(Some("24.10.0")), Ok(Manager::Opkg));
        assert_eq!(s.manager_for(Some("25.12.0-rc1")), Ok(Manager::Apk));
        let e = s.manager_for(Some("22.03.7")).unwrap_err();
        assert_eq!(
            e,
            "packages.managers has no rule for version 22.03.7 (it covers 23.05, 24.10, 25.)"
        );
        assert!(s.manager_for(None).unwrap_err().contains("(unknown)"));
    }

    #[test]
    fn bad_names_are_refused() {
        let mut s = spec();
        s.require[0].package = "babeld; rm -rf /".into();
        assert!(
            s.check()
                .unwrap_err()
                .starts_with("packages.require[0].package")
        );
        let mut s = spec();
        s.require[1].program = "../wpa".into();
        assert!(
            s.check()
                .unwrap_err()
                .starts_with("packages.require[1].program")
        );
    }

    #[test]
    fn check_output_is_read() {
        let c = parse_check(
            "@@missing\nbabeld\nwpad-mesh-mbedtls\n@@manager\nyes\n@@installed\nwpad-basic-mbedtls\n@@end\n",
        );
        assert_eq!(c.missing, ["babeld", "wpad-mesh-mbedtls"]);
        assert!(c.manager);
        assert_eq!(c.installed, ["wpad-basic-mbedtls"]);
        assert_eq!(
            describe(&c.missing, &spec(), &c.installed),
            "babeld, wpad-mesh-mbedtls (replacing wpad-basic-mbedtls)"
        );
        let c = parse_check("@@missing\n@@manager\n@@installed\n@@end\n");
        assert!(c.missing.is_empty() && !c.manager);
    }

    #[test]
    fn apk_replaces_in_one_transaction() {
        let s = install_script(
            &spec(),
            Manager::Apk,
            &["babeld".into(), "wpad-mesh-mbedtls".into()],
            &["wpad-basic-mbedtls".into()],
        );
        assert!(s.contains("run apk update || fail 20"), "{s}");
        assert!(
            s.contains("run apk add 'babeld' 'wpad-mesh-mbedtls' '!wpad-basic-mbedtls' || fail 21"),
            "{s}"
        );
    }
}
