//! Board detection and hardware profile matching.
//!
//! One probe script runs on the host and prints what identifies it, each part under a `@@name`
//! line: `uname -m`, `/etc/os-release`, `ubus call system board` (OpenWrt), `/etc/board.json`
//! (OpenWrt, written by `board.d` at first boot) and the wireless phys in
//! `/sys/class/ieee80211`. Files are read under the host's root (inventory `root`, default `/`),
//! the same prefix the install paths use, so a test can give every fake device its own identity.
//!
//! Matching (a pure function, [`match_profile`]): an OpenWrt board by `board_name` against the
//! profiles' `boardNames`; a Linux host by `firmware: linux` and `uname -m` against `cpuArch`,
//! narrowed by the phys the profile names when several fit. A profile named in the inventory is
//! checked against what the host reports instead of trusted blindly.

use std::collections::BTreeMap;

use serde::Deserialize;
use sidenet_crds::{FirmwareFamily, HardwareProfile};

/// What a host reported about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// OpenWrt board name (`ubus call system board` → `board_name`, or `/etc/board.json` →
    /// `model.id`).
    pub board_name: Option<String>,
    /// Model as the firmware names it.
    pub model: Option<String>,
    /// OpenWrt release (`OpenWrt 23.05.5 r24106-10cc5fcd00`).
    pub release: Option<String>,
    /// `ID` from os-release (`debian`, `openwrt`, `raspbian`).
    pub os_id: Option<String>,
    /// `VERSION_ID` from os-release.
    pub os_version: Option<String>,
    /// `PRETTY_NAME` from os-release.
    pub os_pretty: Option<String>,
    /// `uname -m`.
    pub arch: Option<String>,
    /// Wireless phys (`phy0`, `phy1`).
    pub phys: Vec<String>,
    /// The root the probe was pointed at is not a folder on the host.
    pub root_missing: bool,
}

/// Why no profile fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    /// The root does not exist on the host.
    #[error("root {root} is not a folder on the host")]
    NoRoot {
        /// The root.
        root: String,
    },
    /// Nothing identifies the host.
    #[error(
        "cannot tell the board: no `ubus call system board`, {root}etc/board.json or {root}etc/os-release answered"
    )]
    Unknown {
        /// The root the files were read under, with a trailing `/`.
        root: String,
    },
    /// OpenWrt without a board name.
    #[error(
        "the host runs OpenWrt but reports no board name (neither `ubus call system board` nor {root}etc/board.json answered)"
    )]
    NoBoardName {
        /// The root the files were read under, with a trailing `/`.
        root: String,
    },
    /// An OpenWrt board without a profile.
    #[error("board {board}{model} has no hardware profile; closest: {closest}")]
    NoProfile {
        /// Board name.
        board: String,
        /// ` (model)` or empty.
        model: String,
        /// The closest profiles.
        closest: String,
    },
    /// A Linux host without a profile for its architecture.
    #[error(
        "{os} on {arch} has no hardware profile (none with firmware linux and cpuArch {arch}); closest: {closest}"
    )]
    NoLinuxProfile {
        /// OS name.
        os: String,
        /// `uname -m`.
        arch: String,
        /// Linux profiles there are.
        closest: String,
    },
    /// Several profiles fit.
    #[error("{what} fits several hardware profiles: {candidates}; name one with hardwareProfile")]
    Ambiguous {
        /// What was detected.
        what: String,
        /// The candidates.
        candidates: String,
    },
    /// The inventory names a profile that does not exist.
    #[error("hardware profile {wanted:?} does not exist; closest: {closest}")]
    UnknownProfile {
        /// Name asked for.
        wanted: String,
        /// Closest names.
        closest: String,
    },
    /// The inventory names a profile that does not fit the host.
    #[error("hardware profile {profile} does not fit this host: {why}")]
    Mismatch {
        /// Profile named.
        profile: String,
        /// What differs.
        why: String,
    },
}

/// The probe, with file paths under `root` (absolute, e.g. `/` or `/tmp/dev1`). Every marker
/// starts on a line of its own even when a file does not end with a newline.
pub fn probe_script(root: &str) -> String {
    let r = crate::install::shell_quote(root.trim_end_matches('/'));
    format!(
        "R={r}\n\
         if [ ! -d \"$R/\" ]; then echo @@no-root; fi\n\
         echo @@uname-m; uname -m 2>/dev/null\n\
         echo; echo @@os-release; cat \"$R/etc/os-release\" 2>/dev/null || cat \"$R/usr/lib/os-release\" 2>/dev/null\n\
         echo; echo @@ubus-board; ubus call system board 2>/dev/null\n\
         echo; echo @@board.json; cat \"$R/etc/board.json\" 2>/dev/null\n\
         echo; echo @@phys; ls \"$R/sys/class/ieee80211\" 2>/dev/null\n\
         echo; echo @@end\n"
    )
}

/// Splits the probe's output into its parts.
pub fn sections(output: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut name: Option<String> = None;
    let mut body = String::new();
    for line in output.lines() {
        if let Some(n) = line.strip_prefix("@@") {
            if let Some(prev) = name.take() {
                out.insert(prev, std::mem::take(&mut body));
            }
            name = Some(n.trim().to_string());
        } else if name.is_some() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some(prev) = name {
        out.insert(prev, body);
    }
    out
}

#[derive(Deserialize)]
struct UbusBoard {
    board_name: Option<String>,
    model: Option<String>,
    release: Option<UbusRelease>,
}

#[derive(Deserialize)]
struct UbusRelease {
    description: Option<String>,
}

#[derive(Deserialize)]
struct BoardJson {
    model: Option<BoardJsonModel>,
}

#[derive(Deserialize)]
struct BoardJsonModel {
    id: Option<String>,
    name: Option<String>,
}

/// Parses `/etc/os-release` (`KEY=value`, values optionally quoted).
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

impl Facts {
    /// From the probe's output.
    pub fn from_probe(output: &str) -> Self {
        let s = sections(output);
        let get = |k: &str| s.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let mut f = Facts {
            root_missing: s.contains_key("no-root"),
            ..Facts::default()
        };
        if let Some(text) = get("ubus-board") {
            f.add_ubus_board(text);
        }
        if f.board_name.is_none()
            && let Some(text) = get("board.json")
        {
            f.add_board_json(text);
        }
        if let Some(text) = get("os-release") {
            f.add_os_release(text);
        }
        f.arch = get("uname-m").map(str::to_string);
        f.phys = get("phys")
            .map(|p| p.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        f
    }

    /// Adds what `ubus call system board` printed.
    pub fn add_ubus_board(&mut self, json: &str) {
        if let Ok(b) = serde_json::from_str::<UbusBoard>(json) {
            self.board_name = b.board_name.filter(|s| !s.is_empty());
            self.model = b.model.filter(|s| !s.is_empty());
            self.release = b.release.and_then(|r| r.description);
        }
    }

    /// Adds `/etc/board.json`.
    pub fn add_board_json(&mut self, json: &str) {
        if let Ok(b) = serde_json::from_str::<BoardJson>(json)
            && let Some(m) = b.model
        {
            self.board_name = m.id.filter(|s| !s.is_empty());
            self.model = self.model.take().or(m.name);
        }
    }

    /// Adds `/etc/os-release`.
    pub fn add_os_release(&mut self, text: &str) {
        let kv = parse_os_release(text);
        self.os_id = kv.get("ID").cloned();
        self.os_version = kv.get("VERSION_ID").cloned();
        self.os_pretty = kv.get("PRETTY_NAME").cloned();
    }

    /// Whether the host runs OpenWrt.
    pub fn is_openwrt(&self) -> bool {
        self.board_name.is_some() || self.os_id.as_deref() == Some("openwrt")
    }

    /// A short description for tables: the board name, else OS, version and architecture.
    pub fn summary(&self) -> String {
        if let Some(b) = &self.board_name {
            return b.clone();
        }
        let mut parts = Vec::new();
        if let Some(id) = &self.os_id {
            parts.push(id.clone());
        }
        if let Some(v) = &self.os_version {
            parts.push(v.clone());
        }
        if let Some(a) = &self.arch {
            parts.push(a.clone());
        }
        if parts.is_empty() {
            "unknown".into()
        } else {
            parts.join(" ")
        }
    }

    fn os_name(&self) -> String {
        self.os_pretty
            .clone()
            .or_else(|| self.os_id.clone())
            .unwrap_or_else(|| "an unknown OS".into())
    }
}

/// Picks the hardware profile for a host: `wanted` (checked against the facts) or detected.
pub fn match_profile<'a>(
    facts: &Facts,
    profiles: &'a [HardwareProfile],
    wanted: Option<&str>,
    root: &str,
) -> Result<&'a HardwareProfile, DetectError> {
    let name = |p: &HardwareProfile| p.metadata.name.clone().unwrap_or_default();
    if facts.root_missing {
        return Err(DetectError::NoRoot {
            root: root.to_string(),
        });
    }
    if let Some(w) = wanted {
        let p = profiles
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(w))
            .ok_or_else(|| DetectError::UnknownProfile {
                wanted: w.to_string(),
                closest: closest(w, profiles.iter().map(name)),
            })?;
        check_fits(facts, p).map_err(|why| DetectError::Mismatch {
            profile: w.to_string(),
            why,
        })?;
        return Ok(p);
    }
    if let Some(board) = &facts.board_name {
        let found: Vec<&HardwareProfile> = profiles
            .iter()
            .filter(|p| p.spec.board_names.iter().any(|b| b == board))
            .collect();
        return match found.as_slice() {
            [one] => Ok(one),
            [] => Err(DetectError::NoProfile {
                board: board.clone(),
                model: facts
                    .model
                    .as_ref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default(),
                closest: closest(
                    board,
                    profiles.iter().flat_map(|p| {
                        p.spec
                            .board_names
                            .iter()
                            .map(move |b| format!("{} ({b})", name(p)))
                    }),
                ),
            }),
            many => Err(DetectError::Ambiguous {
                what: format!("board {board}"),
                candidates: many.iter().map(|p| name(p)).collect::<Vec<_>>().join(", "),
            }),
        };
    }
    let root = format!("{}/", root.trim_end_matches('/'));
    if facts.is_openwrt() {
        return Err(DetectError::NoBoardName { root });
    }
    if facts.os_id.is_none() {
        return Err(DetectError::Unknown { root });
    }
    let arch = facts.arch.clone().unwrap_or_else(|| "?".into());
    let linux: Vec<&HardwareProfile> = profiles
        .iter()
        .filter(|p| p.spec.firmware == FirmwareFamily::Linux)
        .collect();
    let by_arch: Vec<&HardwareProfile> = linux
        .iter()
        .copied()
        .filter(|p| p.spec.cpu_arch == arch)
        .collect();
    let with_phys: Vec<&HardwareProfile> = by_arch
        .iter()
        .copied()
        .filter(|p| {
            p.spec
                .radios
                .iter()
                .filter_map(|r| r.phy.as_ref())
                .all(|phy| facts.phys.contains(phy))
        })
        .collect();
    let pick = if with_phys.is_empty() {
        by_arch
    } else {
        with_phys
    };
    match pick.as_slice() {
        [one] => Ok(one),
        [] => Err(DetectError::NoLinuxProfile {
            os: facts.os_name(),
            arch: arch.clone(),
            closest: closest(
                &arch,
                linux
                    .iter()
                    .map(|p| format!("{} ({})", name(p), p.spec.cpu_arch)),
            ),
        }),
        many => Err(DetectError::Ambiguous {
            what: format!("{} on {arch}", facts.os_name()),
            candidates: many.iter().map(|p| name(p)).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// Whether a named profile fits what the host reports.
fn check_fits(facts: &Facts, p: &HardwareProfile) -> Result<(), String> {
    match p.spec.firmware {
        FirmwareFamily::Openwrt => {
            let Some(board) = &facts.board_name else {
                return Err(format!(
                    "it is an OpenWrt profile, but the host runs {} and reports no board name",
                    facts.os_name()
                ));
            };
            if !p.spec.board_names.is_empty() && !p.spec.board_names.contains(board) {
                return Err(format!(
                    "the host reports board {board}, the profile lists {}",
                    p.spec.board_names.join(", ")
                ));
            }
            Ok(())
        }
        FirmwareFamily::Linux => {
            if let Some(board) = &facts.board_name {
                return Err(format!(
                    "it is a Linux profile, but the host runs OpenWrt (board {board})"
                ));
            }
            match &facts.arch {
                Some(a) if *a != p.spec.cpu_arch => Err(format!(
                    "the host runs {a}, the profile is for cpuArch {}",
                    p.spec.cpu_arch
                )),
                _ => Ok(()),
            }
        }
    }
}

/// The closest known names to `wanted` (edit distance), for error hints.
pub fn closest(wanted: &str, known: impl Iterator<Item = String>) -> String {
    let mut scored: Vec<(usize, String)> = known
        .map(|k| {
            // Compare with the bracketed board name when there is one.
            let key = k
                .split_once(" (")
                .map(|(_, b)| b.trim_end_matches(')').to_string())
                .unwrap_or_else(|| k.clone());
            (sidenet_wire::names::edit_distance(wanted, &key), k)
        })
        .collect();
    scored.sort();
    let best: Vec<String> = scored.into_iter().take(3).map(|(_, k)| k).collect();
    if best.is_empty() {
        "none known".into()
    } else {
        best.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_output_is_split_and_read() {
        let out = "@@uname-m\nmips\n@@os-release\nNAME=\"OpenWrt\"\nID=\"openwrt\"\nVERSION_ID=\"23.05.5\"\n@@ubus-board\n@@board.json\n{\"model\": {\"id\": \"tplink,archer-c7-v2\", \"name\": \"TP-Link Archer C7 v2\"}}\n@@phys\nphy0\nphy1\n@@end\n";
        let f = Facts::from_probe(out);
        assert_eq!(f.board_name.as_deref(), Some("tplink,archer-c7-v2"));
        assert_eq!(f.model.as_deref(), Some("TP-Link Archer C7 v2"));
        assert_eq!(f.os_id.as_deref(), Some("openwrt"));
        assert_eq!(f.arch.as_deref(), Some("mips"));
        assert_eq!(f.phys, vec!["phy0".to_string(), "phy1".to_string()]);
        assert!(f.is_openwrt());
        assert_eq!(f.summary(), "tplink,archer-c7-v2");
    }

    #[test]
    fn the_probe_reads_files_under_the_root() {
        #![allow(clippy::unwrap_used)]
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("sys/class/ieee80211/phy0")).unwrap();
        // No newline at the end, as board.d writes it.
        std::fs::write(
            root.join("etc/board.json"),
            "{\n\t\"model\": {\n\t\t\"id\": \"netgear,r7800\",\n\t\t\"name\": \"Netgear Nighthawk X4S R7800\"\n\t}\n}",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/os-release"),
            "ID=\"openwrt\"\nVERSION_ID=\"24.10.0\"",
        )
        .unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(probe_script(&root.display().to_string()))
            .output()
            .unwrap();
        let f = Facts::from_probe(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(f.board_name.as_deref(), Some("netgear,r7800"));
        assert_eq!(f.model.as_deref(), Some("Netgear Nighthawk X4S R7800"));
        assert_eq!(f.os_version.as_deref(), Some("24.10.0"));
        assert_eq!(f.phys, vec!["phy0".to_string()]);
        assert!(f.arch.is_some());
    }

    #[test]
    fn a_missing_root_is_named() {
        #![allow(clippy::unwrap_used)]
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(probe_script("/nonexistent/sidenet-root"))
            .output()
            .unwrap();
        let f = Facts::from_probe(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(
            match_profile(&f, &[], None, "/nonexistent/sidenet-root")
                .err()
                .map(|e| e.to_string()),
            Some("root /nonexistent/sidenet-root is not a folder on the host".into())
        );
    }

    #[test]
    fn openwrt_without_a_board_name_is_not_taken_for_linux() {
        let f = Facts::from_probe("@@uname-m\nx86_64\n@@os-release\nID=openwrt\n@@end\n");
        assert_eq!(
            match_profile(&f, &[], None, "/").err(),
            Some(DetectError::NoBoardName { root: "/".into() })
        );
    }

    #[test]
    fn nothing_reported_is_unknown() {
        let f = Facts::from_probe("@@uname-m\nx86_64\n@@os-release\n@@end\n");
        assert_eq!(
            match_profile(&f, &[], None, "/srv/dev1").err(),
            Some(DetectError::Unknown {
                root: "/srv/dev1/".into()
            })
        );
    }

    #[test]
    fn closest_prefers_similar_board_names() {
        let known = [
            "a (tplink,archer-c7-v2)",
            "b (netgear,r7800)",
            "c (glinet,gl-mt3000)",
        ];
        let c = closest("tplink,archer-c7-v5", known.iter().map(|s| s.to_string()));
        assert!(c.starts_with("a (tplink,archer-c7-v2)"), "{c}");
    }
}
