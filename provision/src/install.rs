//! Where the agent goes on a host and how its service is run, per firmware family.
//!
//! Each family has a descriptor, `TEMPLATES/FAMILY/install.yaml` (next to the family's config
//! templates): the agent binary, bootstrap config and state paths, the service file (path, mode,
//! content) and the commands that enable, start, stop and check it. Paths are relative to the
//! host's root (inventory `root`, default `/`); the service content and the commands are
//! minijinja templates that see the absolute paths (`root`, `agent`, `config`, `state`,
//! `service`) and `mesh` and `name`. Nothing about procd or systemd is in the code: a test points
//! every path at a temporary root and runs the agent with a plain background command by giving
//! its own descriptors.
//!
//! Optional parts: `keep` (a file that makes the install survive a firmware upgrade: OpenWrt's
//! `sysupgrade` keeps what `/lib/upgrade/keep.d/*` lists), `commands.disable` (used by
//! `sidenetctl provision --remove`) and `packages` (what the rendered configs need, see
//! [`crate::packages`]). Templates also get `under("REL")`: REL under the host's root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use sidenet_crds::FirmwareFamily;

use crate::packages::PackagesSpec;

/// File name of a family's descriptor.
pub const DESCRIPTOR: &str = "install.yaml";

/// A family's install descriptor, as written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstallSpec {
    /// Agent binary, relative to the root.
    pub agent: String,
    /// Bootstrap config the agent reads with `--config`, relative to the root.
    pub config: String,
    /// Agent state folder (node key, pinned mesh key), relative to the root.
    pub state: String,
    /// The service definition.
    pub service: ServiceSpec,
    /// Service commands (shell, run as the SSH user).
    pub commands: Commands,
    /// A file that lists what must survive a firmware upgrade (OpenWrt:
    /// `lib/upgrade/keep.d/sidenet-agent`), written like the service file.
    #[serde(default)]
    pub keep: Option<ServiceSpec>,
    /// Packages the rendered configs need ([`crate::packages`]).
    #[serde(default)]
    pub packages: Option<PackagesSpec>,
}

/// The service file (also the shape of `keep`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Path relative to the root.
    pub path: String,
    /// File mode, decimal (493 = 0755, 420 = 0644).
    pub mode: u32,
    /// Content (a template).
    pub content: String,
}

/// Service commands (templates).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Commands {
    /// Registers the service to start at boot (run after every install).
    pub enable: String,
    /// Starts the service.
    pub start: String,
    /// Stops the service.
    pub stop: String,
    /// Exits 0 when the service runs.
    pub running: String,
    /// Stops the service from starting at boot (`sidenetctl provision --remove`).
    #[serde(default)]
    pub disable: Option<String>,
}

/// An install descriptor problem.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InstallError {
    /// The descriptor cannot be read or parsed.
    #[error("{path}: {message}")]
    Descriptor {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A root or path with characters the install scripts do not take.
    #[error("{what} {path:?} {why}")]
    Path {
        /// Which path.
        what: String,
        /// The path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A template does not render.
    #[error("{path}: {field}: {message}")]
    Template {
        /// File.
        path: PathBuf,
        /// Which template.
        field: String,
        /// Why.
        message: String,
    },
}

/// The descriptors of all families, loaded from a templates folder.
#[derive(Debug, Clone, Default)]
pub struct Installers {
    by_family: BTreeMap<String, Result<(PathBuf, InstallSpec), InstallError>>,
}

impl Installers {
    /// Loads `DIR/openwrt/install.yaml` and `DIR/linux/install.yaml`. A missing or broken
    /// descriptor fails only the hosts of that family.
    pub fn load(dir: &Path) -> Self {
        let mut by_family = BTreeMap::new();
        for fam in [FirmwareFamily::Openwrt, FirmwareFamily::Linux] {
            let path = dir.join(fam.as_str()).join(DESCRIPTOR);
            by_family.insert(
                fam.as_str().to_string(),
                load_spec(&path).map(|s| (path, s)),
            );
        }
        Self { by_family }
    }

    /// The descriptor of a family.
    pub fn get(&self, family: FirmwareFamily) -> Result<(&Path, &InstallSpec), InstallError> {
        match self.by_family.get(family.as_str()) {
            Some(Ok((p, s))) => Ok((p.as_path(), s)),
            Some(Err(e)) => Err(e.clone()),
            None => Err(InstallError::Descriptor {
                path: PathBuf::from(family.as_str()).join(DESCRIPTOR),
                message: "no install descriptor loaded for this family".into(),
            }),
        }
    }
}

/// Reads and checks one descriptor.
pub fn load_spec(path: &Path) -> Result<InstallSpec, InstallError> {
    let err = |message: String| InstallError::Descriptor {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let spec: InstallSpec = sidenet_crds::yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let keep_path = spec.keep.as_ref().map(|k| k.path.clone());
    for (what, p) in [
        ("agent", Some(&spec.agent)),
        ("config", Some(&spec.config)),
        ("state", Some(&spec.state)),
        ("service.path", Some(&spec.service.path)),
        ("keep.path", keep_path.as_ref()),
    ] {
        if let Some(p) = p {
            check_relative(p).map_err(|why| err(format!("{what}: {p:?} {why}")))?;
        }
    }
    for (what, mode) in [
        ("service.mode", Some(spec.service.mode)),
        ("keep.mode", spec.keep.as_ref().map(|k| k.mode)),
    ] {
        if let Some(m) = mode
            && m > 0o7777
        {
            return Err(err(format!(
                "{what}: {m} is not a file mode (write it in decimal: 493 = 0755)"
            )));
        }
    }
    if let Some(p) = &spec.packages {
        p.check().map_err(err)?;
    }
    Ok(spec)
}

/// Only the `packages` of a descriptor (what the controller puts into every config of the
/// family as `requires`); `Ok(None)` when the file or the section is not there.
pub fn load_packages(path: &Path) -> Result<Option<PackagesSpec>, InstallError> {
    #[derive(Deserialize)]
    struct Only {
        #[serde(default)]
        packages: Option<PackagesSpec>,
    }
    let err = |message: String| InstallError::Descriptor {
        path: path.to_path_buf(),
        message,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(format!("cannot read: {e}"))),
    };
    let only: Only = sidenet_crds::yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
    if let Some(p) = &only.packages {
        p.check().map_err(err)?;
    }
    Ok(only.packages)
}

fn safe_chars(p: &str) -> bool {
    p.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+' | ','))
}

fn check_relative(p: &str) -> Result<(), String> {
    if p.is_empty() || p.starts_with('/') {
        return Err("must be relative to the root".into());
    }
    if p.split('/').any(|s| s == ".." || s.is_empty()) {
        return Err("must not contain '..' or empty segments".into());
    }
    if !safe_chars(p) {
        return Err("may only use letters, digits and / . _ - + ,".into());
    }
    Ok(())
}

/// Checks a host root (absolute, plain characters, no `..`).
pub fn check_root(root: &str) -> Result<(), InstallError> {
    let bad = |why: &str| InstallError::Path {
        what: "root".into(),
        path: root.to_string(),
        why: why.into(),
    };
    if !root.starts_with('/') {
        return Err(bad("must be absolute"));
    }
    if root.split('/').any(|s| s == "..") {
        return Err(bad("must not contain '..'"));
    }
    if !safe_chars(root) {
        return Err(bad("may only use letters, digits and / . _ - + ,"));
    }
    Ok(())
}

/// `root` joined with a relative path.
pub fn under(root: &str, rel: &str) -> String {
    format!("{}/{rel}", root.trim_end_matches('/'))
}

/// Quotes a string for POSIX sh.
pub fn shell_quote(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A descriptor resolved for one host: absolute paths, rendered service file and commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// The host's root.
    pub root: String,
    /// Agent binary.
    pub agent: String,
    /// Bootstrap config.
    pub config: String,
    /// Agent state folder.
    pub state: String,
    /// Service file.
    pub service: String,
    /// Service file mode.
    pub service_mode: u32,
    /// Service file content.
    pub service_content: String,
    /// Enable command.
    pub enable: String,
    /// Start command.
    pub start: String,
    /// Stop command.
    pub stop: String,
    /// Running check.
    pub running: String,
    /// Disable command, if the descriptor has one.
    pub disable: Option<String>,
    /// The keep file (path, mode, content), if the descriptor has one.
    pub keep: Option<(String, u32, String)>,
}

impl InstallSpec {
    /// Resolves the descriptor for a host.
    pub fn layout(
        &self,
        path: &Path,
        root: &str,
        mesh: &str,
        name: &str,
    ) -> Result<Layout, InstallError> {
        check_root(root)?;
        let agent = under(root, &self.agent);
        let config = under(root, &self.config);
        let state = under(root, &self.state);
        let service = under(root, &self.service.path);
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
            .map_err(|e| InstallError::Template {
                path: path.to_path_buf(),
                field: "(syntax)".into(),
                message: e.to_string(),
            })?;
        env.set_syntax(syntax);
        let base = root.to_string();
        env.add_function("under", move |rel: String| under(&base, &rel));
        let ctx = minijinja::context! {
            root => root, agent => &agent, config => &config, state => &state,
            service => &service, mesh => mesh, name => name,
        };
        let render = |field: &str, src: &str| {
            env.render_str(src, &ctx)
                .map_err(|e| InstallError::Template {
                    path: path.to_path_buf(),
                    field: field.to_string(),
                    message: e.to_string(),
                })
        };
        Ok(Layout {
            root: root.to_string(),
            service_mode: self.service.mode,
            service_content: render("service.content", &self.service.content)?,
            enable: render("commands.enable", &self.commands.enable)?,
            start: render("commands.start", &self.commands.start)?,
            stop: render("commands.stop", &self.commands.stop)?,
            running: render("commands.running", &self.commands.running)?,
            disable: self
                .commands
                .disable
                .as_deref()
                .map(|d| render("commands.disable", d))
                .transpose()?,
            keep: match &self.keep {
                Some(k) => Some((
                    under(root, &k.path),
                    k.mode,
                    render("keep.content", &k.content)?,
                )),
                None => None,
            },
            agent,
            config,
            state,
            service,
        })
    }
}

/// The bootstrap config the agent reads with `--config FILE` (JSON). Field names match
/// `sidenet-agent`'s `--config` reader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bootstrap {
    /// Mesh network name.
    pub mesh: String,
    /// Broker URL.
    pub broker: String,
    /// CA bundle (PEM text) the agent trusts for an `mqtts://` broker, and only it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_ca: Option<String>,
    /// Pinned mesh public key (base64).
    pub mesh_key: String,
    /// The mesh's join code (`sidenet_wire::join`): names the same key as `mesh_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_code: Option<String>,
    /// Root the files backend writes under.
    pub root: String,
    /// State folder.
    pub state: String,
    /// Hostname to report.
    pub hostname: String,
    /// Board name to report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board: Option<String>,
    /// Hardware profile to ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Single-use enrolment token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Bootstrap {
    /// The file's bytes (pretty JSON and a newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Whether `installed` (the file on the host) says the same, ignoring the token: a token
    /// is only needed until the node enrolled, so an installed config never changes for it.
    pub fn same_as_installed(&self, installed: &str) -> bool {
        match serde_json::from_str::<Bootstrap>(installed) {
            Ok(mut b) => {
                b.token.clone_from(&self.token);
                b == *self
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn repo_templates() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../templates")
    }

    #[test]
    fn shipped_descriptors_resolve_under_any_root() {
        let inst = Installers::load(&repo_templates());
        let (p, ow) = inst.get(FirmwareFamily::Openwrt).unwrap();
        let l = ow.layout(p, "/", "riverside", "kitchen").unwrap();
        assert_eq!(l.agent, "/usr/bin/sidenet-agent");
        assert_eq!(l.service, "/etc/init.d/sidenet-agent");
        assert!(l.service_content.starts_with("#!/bin/sh /etc/rc.common\n"));
        assert!(
            l.service_content.contains(
                "procd_set_param command /usr/bin/sidenet-agent --config /etc/sidenet/agent.json"
            ),
            "{}",
            l.service_content
        );
        assert_eq!(l.start, "/etc/init.d/sidenet-agent start");
        assert_eq!(l.service_mode, 0o755);
        let (p, lx) = inst.get(FirmwareFamily::Linux).unwrap();
        let l = lx.layout(p, "/srv/pi", "riverside", "attic").unwrap();
        assert_eq!(l.agent, "/srv/pi/usr/local/bin/sidenet-agent");
        assert_eq!(
            l.service,
            "/srv/pi/etc/systemd/system/sidenet-agent.service"
        );
        assert!(
            l.service_content.contains(
                "ExecStart=/srv/pi/usr/local/bin/sidenet-agent --config /srv/pi/etc/sidenet/agent.json --backend linux\n"
            ),
            "{}",
            l.service_content
        );
        assert_eq!(l.service_mode, 0o644);
        assert!(l.running.contains("systemctl is-active"));
        assert!(l.keep.is_none(), "Debian has no sysupgrade");
        assert_eq!(
            l.disable.as_deref(),
            Some("systemctl disable sidenet-agent.service && systemctl daemon-reload")
        );
    }

    #[test]
    fn the_openwrt_keep_list_names_what_a_sysupgrade_must_keep() {
        let inst = Installers::load(&repo_templates());
        let (p, ow) = inst.get(FirmwareFamily::Openwrt).unwrap();
        let l = ow.layout(p, "/", "riverside", "kitchen").unwrap();
        assert!(
            l.service_content.contains(
                "procd_set_param command /usr/bin/sidenet-agent --config /etc/sidenet/agent.json --backend openwrt\n"
            ),
            "{}",
            l.service_content
        );
        let (path, mode, content) = l.keep.unwrap();
        assert_eq!(
            (path.as_str(), mode),
            ("/lib/upgrade/keep.d/sidenet-agent", 0o644)
        );
        let lines: Vec<&str> = content.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "/usr/bin/sidenet-agent",
                "/etc/init.d/sidenet-agent",
                "/etc/rc.d/S95sidenet-agent",
                "/etc/rc.d/K10sidenet-agent",
                "/etc/sidenet/agent.json",
                "/etc/sidenet-agent/",
                "/lib/upgrade/keep.d/sidenet-agent",
            ]
        );
        assert_eq!(
            l.disable.as_deref(),
            Some("/etc/init.d/sidenet-agent disable")
        );
        // Under a test root every path moves with it.
        let l = ow.layout(p, "/tmp/dev1", "riverside", "kitchen").unwrap();
        let (path, _, content) = l.keep.unwrap();
        assert_eq!(path, "/tmp/dev1/lib/upgrade/keep.d/sidenet-agent");
        assert!(
            content.contains("\n/tmp/dev1/etc/rc.d/S95sidenet-agent\n"),
            "{content}"
        );
    }

    #[test]
    fn shipped_packages_per_family_and_version() {
        use crate::packages::Manager;
        let ow = load_packages(&repo_templates().join("openwrt/install.yaml"))
            .unwrap()
            .unwrap();
        assert_eq!(ow.manager_for(Some("23.05.5")), Ok(Manager::Opkg));
        assert_eq!(ow.manager_for(Some("24.10.2")), Ok(Manager::Opkg));
        assert_eq!(ow.manager_for(Some("25.12.0")), Ok(Manager::Apk));
        assert!(ow.manager_for(Some("22.03.7")).is_err());
        let names: Vec<&str> = ow.require.iter().map(|p| p.package.as_str()).collect();
        assert_eq!(
            names,
            ["babeld", "wireguard-tools", "wpad-mesh-mbedtls", "iw"]
        );
        let wpad = &ow.require[2];
        assert_eq!(
            (wpad.program.as_str(), wpad.args.as_slice()),
            ("wpa_supplicant", &["-vmesh".to_string()][..])
        );
        assert!(wpad.replaces.contains(&"wpad-basic-mbedtls".to_string()));
        // The policy shaping's packages: carried only by configs that shape, installed for a
        // mesh with rateLimit policies, after the others.
        let shaping: Vec<&str> = ow.shaping.iter().map(|p| p.package.as_str()).collect();
        assert_eq!(
            shaping,
            ["tc-tiny", "ip-tiny", "kmod-ifb", "kmod-sched-core"]
        );
        assert_eq!(ow.shaping_requirements()[0].program, "tc");
        let all: Vec<String> = ow
            .with_shaping()
            .require
            .into_iter()
            .map(|p| p.package)
            .collect();
        assert_eq!(
            all,
            [
                "babeld",
                "wireguard-tools",
                "wpad-mesh-mbedtls",
                "iw",
                "tc-tiny",
                "ip-tiny",
                "kmod-ifb",
                "kmod-sched-core"
            ]
        );
        let lx = load_packages(&repo_templates().join("linux/install.yaml"))
            .unwrap()
            .unwrap();
        assert_eq!(lx.manager_for(Some("12")), Ok(Manager::Apt));
        let names: Vec<&str> = lx.require.iter().map(|p| p.package.as_str()).collect();
        assert_eq!(
            names,
            [
                "iproute2",
                "nftables",
                "wpasupplicant",
                "iw",
                "wireguard-tools",
                "babeld"
            ]
        );
        // Linux nodes shape with what `require` already installs (iproute2's tc).
        assert!(lx.shaping.is_empty());
        // A descriptor without packages: none.
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load_packages(&d.path().join("install.yaml")).unwrap(), None);
        std::fs::write(
            d.path().join("install.yaml"),
            "packages:\n  managers: []\n  require: []\n",
        )
        .unwrap();
        let e = load_packages(&d.path().join("install.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("install.yaml: packages.managers: at least one rule is needed"),
            "{e}"
        );
        std::fs::write(
            d.path().join("install.yaml"),
            "packages:\n  managers: [{manager: opkg}]\n  require: []\n  shaping: [{package: 'tc;x', program: tc}]\n",
        )
        .unwrap();
        let e = load_packages(&d.path().join("install.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(
                "install.yaml: packages.shaping[0].package: \"tc;x\" is not a package name (letters, digits, - _ . +)"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_descriptors_and_roots_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let fam = dir.path().join("linux");
        std::fs::create_dir_all(&fam).unwrap();
        let good = std::fs::read_to_string(repo_templates().join("linux/install.yaml")).unwrap();
        std::fs::write(
            fam.join(DESCRIPTOR),
            good.replace("agent: usr/local/bin/sidenet-agent", "agent: ../bin/agent"),
        )
        .unwrap();
        let inst = Installers::load(dir.path());
        let e = inst.get(FirmwareFamily::Linux).unwrap_err().to_string();
        assert!(
            e.contains("linux/install.yaml") && e.contains("agent") && e.contains(".."),
            "{e}"
        );
        let e = inst.get(FirmwareFamily::Openwrt).unwrap_err().to_string();
        assert!(e.contains("openwrt/install.yaml: cannot read"), "{e}");
        std::fs::write(fam.join(DESCRIPTOR), format!("{good}\nextra: 1\n")).unwrap();
        let e = load_spec(&fam.join(DESCRIPTOR)).unwrap_err().to_string();
        assert!(e.contains("unknown field `extra`"), "{e}");
        let spec: InstallSpec = sidenet_crds::yaml::from_str(&good).unwrap();
        let e = spec
            .layout(Path::new("x"), "/tmp/a b", "m", "n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("root \"/tmp/a b\""), "{e}");
        assert!(spec.layout(Path::new("x"), "relative", "m", "n").is_err());
    }

    #[test]
    fn bootstrap_comparison_ignores_the_token() {
        let b = Bootstrap {
            mesh: "riverside".into(),
            broker: "mqtt://10.0.0.1:1883".into(),
            broker_ca: None,
            mesh_key: "KEY".into(),
            join_code: None,
            root: "/".into(),
            state: "/etc/sidenet-agent".into(),
            hostname: "kitchen".into(),
            board: Some("tplink,archer-c7-v2".into()),
            profile: Some("tplink-archer-c7-v2".into()),
            token: None,
        };
        let mut with_token = b.clone();
        with_token.token = Some("t0k3n".into());
        let installed = String::from_utf8(with_token.to_bytes()).unwrap();
        assert!(b.same_as_installed(&installed));
        let mut other = b.clone();
        other.broker = "mqtt://10.0.0.2:1883".into();
        assert!(!other.same_as_installed(&installed));
        assert!(!b.same_as_installed("not json"));
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(under("/", "usr/bin/x"), "/usr/bin/x");
        assert_eq!(under("/tmp/r/", "usr/bin/x"), "/tmp/r/usr/bin/x");
    }
}
