//! The OpenWrt feed package of the agent (`packaging/openwrt/sidenet-agent`) against the
//! install descriptor `sidenetctl provision` uses on OpenWrt (`templates/openwrt/install.yaml`),
//! as far as this machine allows without the OpenWrt SDK: GNU make reads the real Makefile
//! with stand-ins for the SDK's include files (`rules.mk`, `package.mk`, the packages feed's
//! `rust-package.mk`) that record each package's variant, conffiles and cargo command and run its
//! install recipe into a folder. The installed files must be where the descriptor puts them,
//! the init script must be the descriptor's service (plus its guard against a missing config),
//! the conffiles and the sysupgrade keep list must hold the bootstrap config and the node's
//! keys, and the init script must pass `sh -n` and shellcheck.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sidenet_provision::install::load_spec;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn package() -> PathBuf {
    repo().join("packaging/openwrt/sidenet-agent")
}

/// Stand-ins for the SDK's include files. `BuildPackage` does what OpenWrt's does with a
/// package definition that matters here: evaluates it (variant, provides, conflicts), writes
/// its conffiles, and makes a rule that runs its install recipe into `$(OUT)/root-NAME`.
const RULES_MK: &str = "INCLUDE_DIR:=$(TOPDIR)/include\nBUILD_DIR:=$(OUT)/build\n";
const PACKAGE_MK: &str = r#"PKG_BUILD_DIR?=$(BUILD_DIR)/$(PKG_NAME)
INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
CP:=cp -fpR
all:
define BuildPackage
$(eval VARIANT:=)$(eval PROVIDES:=)$(eval CONFLICTS:=)$(eval DEFAULT_VARIANT:=)
$(eval $(Package/$(1)))
$(file >$(OUT)/$(1).meta,VARIANT=$(VARIANT) PROVIDES=$(PROVIDES) CONFLICTS=$(CONFLICTS) DEFAULT_VARIANT=$(DEFAULT_VARIANT) DEPENDS=$(DEPENDS))
$(file >$(OUT)/$(1).conffiles,$(Package/$(1)/conffiles))
all: install-$(1)
install-$(1):
$(call Package/$(1)/install,$(OUT)/root-$(1))
endef
prepare:
	$(Build/Prepare)
print-cargo:
	@echo '$(subst ','"'"',$(Build/Compile/Cargo))'
"#;
const RUST_PACKAGE_MK: &str = r#"RUST_ARCH_DEPENDS:=@(aarch64||arm||mips||mipsel||x86_64)
CARGO_PKG_PROFILE:=release
define Build/Compile/Cargo
cargo install --profile $(CARGO_PKG_PROFILE) $(if $(strip $(RUST_PKG_FEATURES)),--features "$(strip $(RUST_PKG_FEATURES))") --root $(PKG_INSTALL_DIR) --path "$(PKG_BUILD_DIR)/$(MAKE_PATH)" --locked
endef
"#;

struct Sdk {
    dir: tempfile::TempDir,
}

impl Sdk {
    fn new() -> Sdk {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("sdk");
        for (p, text) in [
            ("rules.mk", RULES_MK),
            ("include/package.mk", PACKAGE_MK),
            ("feeds/packages/lang/rust/rust-package.mk", RUST_PACKAGE_MK),
        ] {
            let f = top.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, text).unwrap();
        }
        // What `cargo install` would have left in PKG_INSTALL_DIR.
        let bin = dir.path().join("install/bin/sidenet-agent");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, "#!/bin/sh\necho sidenet-agent 0.1.0\n").unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        Sdk { dir }
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// `make -C packaging/openwrt/sidenet-agent TARGET` with the stand-in SDK.
    fn make(&self, variant: &str, target: &str) -> String {
        let out = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(package())
            .arg(format!("TOPDIR={}", self.dir.path().join("sdk").display()))
            .arg(format!("OUT={}", self.out().display()))
            .arg(format!(
                "PKG_INSTALL_DIR={}",
                self.dir.path().join("install").display()
            ))
            .arg(format!("BUILD_VARIANT={variant}"))
            .arg(target)
            .output()
            .expect("GNU make");
        assert!(
            out.status.success(),
            "make {target}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.out().join(name)).unwrap()
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The lines that do something: no comments, no blank lines.
fn directives(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_feed_package_installs_what_provisioning_installs() {
    let desc = repo().join("templates/openwrt/install.yaml");
    let spec = load_spec(&desc).unwrap();
    let layout = spec.layout(&desc, "/", "riverside", "kitchen").unwrap();
    let sdk = Sdk::new();
    sdk.make("plain", "all");

    // Both variants, the TLS one replacing the plain one.
    let meta = sdk.read("sidenet-agent.meta");
    assert!(meta.starts_with("VARIANT=plain "), "{meta}");
    assert!(meta.contains("DEFAULT_VARIANT=1"), "{meta}");
    assert!(meta.contains("DEPENDS=@(aarch64"), "{meta}");
    let meta = sdk.read("sidenet-agent-tls.meta");
    assert!(
        meta.starts_with("VARIANT=tls PROVIDES=sidenet-agent CONFLICTS=sidenet-agent "),
        "{meta}"
    );

    // Conffiles: the bootstrap config and the node's keys, where the descriptor puts them.
    let expect: Vec<String> = [layout.config.clone()]
        .into_iter()
        .chain(
            ["node.key", "wg.key", "mesh.pub", "mqtt.password"]
                .iter()
                .map(|f| format!("{}/{f}", layout.state)),
        )
        .collect();
    for pkg in ["sidenet-agent", "sidenet-agent-tls"] {
        let conffiles = directives(&sdk.read(&format!("{pkg}.conffiles")));
        assert_eq!(conffiles, expect, "{pkg}");
    }

    for pkg in ["sidenet-agent", "sidenet-agent-tls"] {
        let root = sdk.out().join(format!("root-{pkg}"));
        // The agent where provisioning puts it, executable.
        let agent = root.join(&spec.agent);
        assert!(agent.is_file(), "{pkg}: no {}", spec.agent);
        assert_eq!(mode(&agent), 0o755, "{pkg}");
        // The init script where provisioning puts it, with the descriptor's mode, and the same
        // service: the descriptor's directives, plus a guard against a missing config.
        let init = root.join(&spec.service.path);
        assert_eq!(mode(&init), spec.service.mode, "{pkg}");
        let text = std::fs::read_to_string(&init).unwrap();
        let mut ours = directives(&text);
        let guard_start = ours
            .iter()
            .position(|l| l.starts_with("if [ ! -s "))
            .expect("the init script checks the config exists");
        let guard: Vec<String> = ours.drain(guard_start..guard_start + 4).collect::<Vec<_>>();
        assert_eq!(
            guard[0],
            format!("if [ ! -s {} ]; then", layout.config),
            "{pkg}"
        );
        assert!(guard[1].starts_with("echo ") && guard[2] == "return 1" && guard[3] == "fi");
        assert_eq!(ours, directives(&layout.service_content), "{pkg}");
        assert!(text.starts_with("#!/bin/sh /etc/rc.common\n"));
        // sysupgrade keeps the config and the whole state folder.
        let keep = std::fs::read_to_string(root.join("lib/upgrade/keep.d/sidenet-agent")).unwrap();
        assert_eq!(
            directives(&keep),
            [layout.config.clone(), format!("{}/", layout.state)],
            "{pkg}"
        );
        // Nothing else.
        let mut files: Vec<String> = walk(&root)
            .iter()
            .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "etc/init.d/sidenet-agent",
                "lib/upgrade/keep.d/sidenet-agent",
                "usr/bin/sidenet-agent"
            ],
            "{pkg}"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_feed_package_builds_the_agent_crate_with_the_size_profile() {
    let sdk = Sdk::new();
    let plain = sdk.make("plain", "print-cargo");
    assert!(plain.contains("cargo install --profile agent "), "{plain}");
    assert!(plain.contains("/node-agent\""), "{plain}");
    assert!(plain.contains("--locked"), "{plain}");
    assert!(!plain.contains("--features"), "{plain}");
    let tls = sdk.make("tls", "print-cargo");
    assert!(tls.contains("--features \"tls\""), "{tls}");
    // Build/Prepare copies the workspace (the agent's crate and the lock file), without build
    // output.
    sdk.make("plain", "prepare");
    let build = sdk.out().join("build/sidenet-agent");
    for f in [
        "Cargo.toml",
        "Cargo.lock",
        "node-agent/Cargo.toml",
        "wire/src/lib.rs",
    ] {
        assert!(build.join(f).is_file(), "Build/Prepare did not copy {f}");
    }
    assert!(!build.join("target").exists());
    assert!(!build.join(".git").exists());
}

#[test]
fn the_init_script_is_valid_shell() {
    let init = package().join("files/sidenet-agent.init");
    let out = Command::new("sh").arg("-n").arg(&init).output().unwrap();
    assert!(out.status.success(), "sh -n: {out:?}");
    let out = Command::new("shellcheck")
        .args(["-s", "sh"])
        .arg(&init)
        .output()
        .expect("shellcheck (scripts/install-peers installs it)");
    assert!(
        out.status.success(),
        "shellcheck {}:\n{}",
        init.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}
