//! The `openwrt` backend as a guest on household routers, against OpenWrt's own `uci` tool
//! (built by scripts/install-peers) on the stock `/etc/config` of every OpenWrt profile
//! (tests/openwrt-stock, the owner's home AP on each radio) with the configs the controller
//! renders for it (controller/tests/golden):
//!
//! - after install + apply, `uci export` of every section not named `sidenet_*` is byte for byte
//!   what it was, and sidenet's sections are exactly the rendered ones;
//! - a rollback (and a crash in the middle of an apply, recovered from the journal) leaves the
//!   owner's sections untouched too, also when the owner edits them meanwhile;
//! - `sidenet-agent --uninstall` gives back the whole `/etc/config` byte for byte (comments,
//!   layout and file modes included);
//! - a config whose radio requirements the owner's radio does not meet is refused before
//!   anything changes, with a message naming the option.
//!
//! Reloads are recorded: the backend is rooted in a temporary folder and runs OpenWrt's reload
//! commands under it (`ROOT/etc/init.d/network reload`, `ROOT/sbin/wifi reload`, ...).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sidenet_agent::backend::{Backend, DataplaneArgs, Recorder};
use sidenet_agent::files::{Applier, Phase, Recovery};
use sidenet_agent::openwrt::Openwrt;
use sidenet_agent::uci::{Batch, Uci, parse_export};
use sidenet_agent::wgkey::WgKey;
use sidenet_wire::Revision;
use sidenet_wire::messages::{FileSpec, NodeConfig};

const PASSPHRASE: &str = "golden passphrase 1";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn uci_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SIDENET_TEST_UCI") {
        return PathBuf::from(p);
    }
    let p = repo().join(".tools/bin/uci");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-peers once, it builds OpenWrt's uci tool",
        p.display()
    );
    p
}

/// `uci -c CONF` as the router's owner runs it, with a change folder of the test's own: uci's
/// default one (/tmp/.uci) is shared by every uci on the machine, and an uncommitted change
/// there is seen by every other uci (which is exactly why the agent refuses to commit when it
/// finds one).
fn uci_at(conf: &Path) -> Command {
    let dir = conf.join("../../../owner-uci");
    let mut c = Command::new(uci_bin());
    c.arg("-c").arg(conf).arg("-t").arg(dir);
    c
}

/// Every OpenWrt profile with a stock config.
fn profiles() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo().join("tests/openwrt-stock"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    assert!(v.len() >= 7, "expected the 7 OpenWrt profiles, found {v:?}");
    v
}

/// The modes a first boot leaves (config_generate runs with umask 077; see
/// tests/openwrt-stock/generate).
fn stock_mode(name: &str) -> u32 {
    match name {
        "network" | "system" | "wireless" => 0o600,
        _ => 0o644,
    }
}

/// The rendered files of `profile` (with WireGuard neighbours from the with-peers set), as the
/// core hands them to the backend (the mesh passphrase opened).
fn rendered(profile: &str, with_peers: bool) -> NodeConfig {
    let base = if with_peers {
        repo()
            .join("controller/tests/golden/with-peers")
            .join(profile)
    } else {
        repo().join("controller/tests/golden").join(profile)
    };
    let files = [
        ("etc/sidenet/uci/network", "reload:network", 0o644),
        ("etc/sidenet/uci/wireless", "reload:wireless", 0o600),
        ("etc/sidenet/shaping.nft", "reload:firewall", 0o644),
        ("etc/sidenet/uci/firewall", "reload:firewall", 0o644),
        ("etc/sidenet/uci/babeld", "restart:babeld", 0o644),
        ("etc/sidenet/uci/dhcp", "reload:dhcp", 0o644),
        ("etc/sidenet/probes", "apply:probes", 0o644),
    ];
    let mut actions: Vec<String> = Vec::new();
    for (_, a, _) in files {
        if !actions.iter().any(|x| x == a) {
            actions.push(a.into());
        }
    }
    NodeConfig {
        mesh: "riverside".into(),
        node: "goldennode234567".into(),
        hostname: "golden".into(),
        role: "router".into(),
        profile: profile.into(),
        family: "openwrt".into(),
        subnet: "fdfc:b395:f348:1c2d::/64".into(),
        addresses: vec!["fdfc:b395:f348:1c2d::1/64".into()],
        files: files
            .iter()
            .map(|(p, _, mode)| FileSpec {
                path: p.to_string(),
                mode: *mode,
                content: std::fs::read_to_string(base.join(p))
                    .unwrap_or_else(|e| panic!("{}: {e}", base.join(p).display()))
                    .replace("@sidenet-secret:mesh-passphrase@", PASSPHRASE),
            })
            .collect(),
        actions,
        sealed: Default::default(),
        requires: Vec::new(),
    }
}

struct Router {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    rec: Recorder,
    ow: Openwrt,
    applier: Applier,
    /// The last confirmed config and the one on trial, as the shell keeps them.
    good: Option<NodeConfig>,
    trial: Option<NodeConfig>,
}

/// A router with `profile`'s stock config, and the agent's state folder next to it.
fn router(profile: &str) -> Router {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let state = dir.path().join("state");
    let conf = root.join("etc/config");
    std::fs::create_dir_all(&conf).unwrap();
    let stock = repo()
        .join("tests/openwrt-stock")
        .join(profile)
        .join("etc/config");
    for e in std::fs::read_dir(&stock).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dst = conf.join(&name);
        std::fs::copy(e.path(), &dst).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(stock_mode(&name))).unwrap();
    }
    // A stock router has dnsmasq's init script; the agent reloads it only where it exists (the
    // recorder logs the call, nothing runs it).
    let init = root.join("etc/init.d");
    std::fs::create_dir_all(&init).unwrap();
    std::fs::write(init.join("dnsmasq"), "#!/bin/sh\n").unwrap();
    // The agent's identity (--uninstall checks it is a state folder).
    sidenet_agent::state::State::open(&state)
        .unwrap()
        .node_key()
        .unwrap();
    let (ow, rec) = backend(&root, &state);
    Router {
        applier: Applier::new(&root, &state),
        _dir: dir,
        root,
        state,
        rec,
        ow,
        good: None,
        trial: None,
    }
}

/// A fresh backend over the router (as after an agent restart): real uci, recorded reloads.
fn backend(root: &Path, state: &Path) -> (Openwrt, Recorder) {
    let rec = Recorder::new();
    let uci = uci_bin().to_string_lossy().into_owned();
    rec.run_for_real(&uci);
    let args = DataplaneArgs {
        uci,
        underlay: vec![],
        ..DataplaneArgs::default()
    };
    let key = WgKey::load_or_create(&state.join("wg.key")).unwrap();
    (
        Openwrt::new(root, state, key, &args, Box::new(rec.clone())),
        rec,
    )
}

impl Router {
    /// Applies `config` as the shell does (prepare, install, converge, trial); an error rolls
    /// back at once.
    fn apply(&mut self, config: &NodeConfig, rev: u64) -> Result<(), String> {
        let mut cfg = config.clone();
        self.ow.prepare(&mut cfg).map_err(|e| e.0)?;
        let r = Revision { epoch: 1, rev };
        self.applier
            .install(r, &format!("sha{rev}"), b"env", &cfg)
            .map_err(|e| e.to_string())?;
        if let Err(e) = self.ow.converge(Some(&cfg)) {
            // As the shell: files back, and the system back to the last good config (which
            // fails the same way when the refusal was about the router, not the config).
            self.applier.rollback().unwrap();
            let _ = self.ow.converge(self.good.as_ref());
            return Err(e.0);
        }
        self.applier.set_phase(Phase::Trial).unwrap();
        self.trial = Some(cfg);
        Ok(())
    }

    fn confirm(&mut self) {
        self.applier.confirm().unwrap();
        self.good = self.trial.take();
    }

    fn roll_back(&mut self) {
        self.applier.rollback().unwrap();
        self.trial = None;
        self.ow.converge(self.good.as_ref()).unwrap();
    }

    fn conf(&self) -> PathBuf {
        self.root.join("etc/config")
    }

    /// `uci export` of every package in /etc/config.
    fn exports(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(self.conf()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let o = uci_at(&self.conf())
                .args(["export", &name])
                .output()
                .unwrap();
            assert!(o.status.success(), "uci export {name}: {o:?}");
            out.insert(name, String::from_utf8(o.stdout).unwrap());
        }
        out
    }

    /// The bytes and mode of every file in /etc/config.
    fn files(&self) -> BTreeMap<String, (Vec<u8>, u32)> {
        std::fs::read_dir(self.conf())
            .unwrap()
            .flatten()
            .map(|e| {
                let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
                (
                    e.file_name().to_string_lossy().into_owned(),
                    (std::fs::read(e.path()).unwrap(), mode),
                )
            })
            .collect()
    }

    /// Reload commands run since the last call (uci's own invocations left out).
    fn reloads(&self) -> Vec<String> {
        let uci = uci_bin().to_string_lossy().into_owned();
        let root = format!("{}/", self.root.display());
        let out = self
            .rec
            .commands()
            .into_iter()
            .filter(|c| !c.starts_with(&uci))
            .map(|c| c.replace(&root, "/"))
            .collect();
        self.rec.clear();
        out
    }
}

/// Every section of every package that is not sidenet's, as `uci export` prints it.
fn owner_sections(exports: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    exports
        .iter()
        .map(|(p, text)| {
            let owner: String = parse_export(text)
                .into_iter()
                .filter(|s| !s.is_sidenet())
                .map(|s| s.text)
                .collect();
            (p.clone(), owner)
        })
        .collect()
}

/// sidenet's sections of every package, as `uci export` prints them.
fn sidenet_sections(exports: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    exports
        .iter()
        .map(|(p, text)| {
            let ours: String = parse_export(text)
                .into_iter()
                .filter(|s| s.is_sidenet())
                .map(|s| s.text)
                .collect();
            (p.clone(), ours)
        })
        .filter(|(_, t)| !t.is_empty())
        .collect()
}

/// What sidenet's sections must be for `config` (from its batches, with the node's key).
fn expected_sections(config: &NodeConfig, key: &str) -> BTreeMap<String, String> {
    config
        .files
        .iter()
        .filter_map(|f| {
            let package = f.path.strip_prefix("etc/sidenet/uci/")?;
            let text = f
                .content
                .replace(sidenet_agent::openwrt::KEY_PLACEHOLDER, key);
            let b = Batch::parse(package, &text).unwrap();
            let t: String = b.exported().into_iter().map(|s| s.text).collect();
            // A batch without sections (the names of a node without neighbours' list) leaves
            // none, as sidenet_sections() counts them.
            (!t.is_empty()).then(|| (package.to_string(), t))
        })
        .collect()
}

fn private_key(state: &Path) -> String {
    WgKey::load_or_create(&state.join("wg.key"))
        .unwrap()
        .private_base64()
        .unwrap()
}

#[test]
fn apply_changes_only_sidenets_sections_on_every_stock_router() {
    for profile in profiles() {
        let mut r = router(&profile);
        let stock = r.exports();
        let stock_files = r.files();
        assert!(
            !stock.contains_key("babeld"),
            "{profile}: stock has no babeld"
        );
        let cfg = rendered(&profile, false);
        r.apply(&cfg, 1)
            .unwrap_or_else(|e| panic!("{profile}: the apply failed: {e}"));
        r.confirm();
        let now = r.exports();
        assert_eq!(
            owner_sections(&now),
            owner_sections(&stock)
                .into_iter()
                .chain([("babeld".to_string(), String::new())])
                .collect(),
            "{profile}: a section that is not sidenet's changed"
        );
        assert_eq!(
            sidenet_sections(&now),
            expected_sections(&cfg, &private_key(&r.state)),
            "{profile}: sidenet's sections are not the rendered ones"
        );
        // Files sidenet adds no section to are not even rewritten.
        let files = r.files();
        for untouched in ["dhcp", "system"] {
            assert_eq!(
                files[untouched], stock_files[untouched],
                "{profile}: {untouched}"
            );
        }
        // Modes stay the owner's (uci commit keeps them).
        for (name, (_, mode)) in &stock_files {
            assert_eq!(files[name].1, *mode, "{profile}: mode of {name}");
        }
        assert_eq!(
            r.reloads(),
            [
                "/etc/init.d/network reload",
                "/sbin/wifi reload",
                "/etc/init.d/firewall reload",
                "/etc/init.d/babeld restart"
            ],
            "{profile}"
        );
        // The same config again: nothing to commit, nothing to reload.
        r.apply(&cfg, 2).unwrap();
        r.confirm();
        assert_eq!(r.reloads(), Vec::<String>::new(), "{profile}");
        assert!(
            !r.rec.commands().iter().any(|c| c.contains(" commit ")),
            "{profile}"
        );
        assert_eq!(r.files(), files, "{profile}: a no-op apply rewrote a file");
    }
}

#[test]
fn uninstall_gives_back_the_whole_config_byte_for_byte() {
    let agent = env!("CARGO_BIN_EXE_sidenet-agent");
    for profile in profiles() {
        let mut r = router(&profile);
        let stock_files = r.files();
        r.apply(&rendered(&profile, false), 1).unwrap();
        r.confirm();
        if profile == "tplink-archer-c7-v2" {
            r.apply(&rendered(&profile, true), 2).unwrap();
            r.confirm();
        }
        assert_ne!(r.files(), stock_files, "{profile}: nothing was applied");
        // Stand-ins for OpenWrt's reload commands under the root, logging their calls.
        let log = r.root.join("reloads.log");
        for p in [
            "etc/init.d/network",
            "etc/init.d/firewall",
            "etc/init.d/babeld",
            "etc/init.d/dnsmasq",
            "sbin/wifi",
        ] {
            let f = r.root.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(
                &f,
                format!("#!/bin/sh\necho \"/{p} $*\" >> '{}'\n", log.display()),
            )
            .unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let out = Command::new(agent)
            .args(["--backend", "openwrt", "--uninstall", "--uci"])
            .arg(uci_bin())
            .arg("--root")
            .arg(&r.root)
            .arg("--state")
            .arg(&r.state)
            .env_remove("SIDENET_BACKEND")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{profile}: --uninstall failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            r.files(),
            stock_files,
            "{profile}: /etc/config is not back byte for byte:\n{stdout}"
        );
        assert!(
            stdout.contains("back exactly as it was before sidenet"),
            "{stdout}"
        );
        assert!(!r.root.join("etc/sidenet").exists(), "{profile}: {stdout}");
        assert!(!r.state.exists(), "{profile}: the state folder is left");
        let reloads = std::fs::read_to_string(&log).unwrap_or_default();
        for want in [
            "/etc/init.d/network reload",
            "/sbin/wifi reload",
            "/etc/init.d/firewall reload",
            // The stock router has no babeld config left: babeld is stopped, not restarted
            // into "asked to run on no interfaces".
            "/etc/init.d/babeld stop",
        ] {
            assert!(
                reloads.contains(want),
                "{profile}: {want:?} not run:\n{reloads}"
            );
        }
        // The with-peers render names four hosts in dhcp: removing them reloads dnsmasq (and
        // /etc/config/dhcp is back byte for byte, above).
        assert_eq!(
            reloads.contains("/etc/init.d/dnsmasq reload"),
            profile == "tplink-archer-c7-v2",
            "{profile}:\n{reloads}"
        );
    }
}

#[test]
fn uninstall_keeps_the_owners_later_changes() {
    let mut r = router("linksys-e8450");
    r.apply(&rendered("linksys-e8450", false), 1).unwrap();
    r.confirm();
    // The owner renames their network's SSID in LuCI after sidenet was installed.
    let o = uci_at(&r.conf())
        .args(["set", "wireless.default_radio1.ssid=Familie Muster 5G"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = uci_at(&r.conf())
        .args(["commit", "wireless"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let notes = r.ow.uninstall().unwrap();
    let exports = r.exports();
    assert!(sidenet_sections(&exports).is_empty(), "{exports:?}");
    assert!(exports["wireless"].contains("option ssid 'Familie Muster 5G'"));
    assert!(
        notes
            .iter()
            .any(|n| n.contains("wireless: sidenet's sections removed; the owner changed the file")),
        "{notes:?}"
    );
    // The packages the owner did not touch are back byte for byte.
    let stock = repo().join("tests/openwrt-stock/linksys-e8450/etc/config");
    for p in ["network", "firewall", "dhcp", "system"] {
        assert_eq!(
            std::fs::read(r.conf().join(p)).unwrap(),
            std::fs::read(stock.join(p)).unwrap(),
            "{p}"
        );
    }
    assert!(!r.conf().join("babeld").exists());
}

#[test]
fn a_rollback_leaves_the_owners_sections_untouched() {
    let profile = "tplink-archer-c7-v2";
    let mut r = router(profile);
    let rev1 = rendered(profile, false);
    r.apply(&rev1, 1).unwrap();
    r.confirm();
    let after1 = r.exports();
    r.reloads();
    // Revision 2 (two WireGuard neighbours) is on trial when the owner changes their own AP.
    r.apply(&rendered(profile, true), 2).unwrap();
    let o = uci_at(&r.conf())
        .args(["set", "wireless.default_radio1.key=a new family key"])
        .output()
        .unwrap();
    assert!(o.status.success());
    uci_at(&r.conf())
        .args(["commit", "wireless"])
        .output()
        .unwrap();
    let owner_during = owner_sections(&r.exports());
    // The health check fails: back to revision 1.
    r.reloads();
    r.roll_back();
    let now = r.exports();
    assert_eq!(
        owner_sections(&now),
        owner_during,
        "the rollback changed the owner's sections (or lost their edit)"
    );
    assert!(now["wireless"].contains("option key 'a new family key'"));
    assert_eq!(sidenet_sections(&now), sidenet_sections(&after1));
    assert_eq!(
        r.reloads(),
        [
            "/etc/init.d/network reload",
            "/etc/init.d/firewall reload",
            "/etc/init.d/babeld restart",
            // revision 2's names (the with-peers render has four) are gone again
            "/etc/init.d/dnsmasq reload"
        ],
        "only what changed back is reloaded (the wireless sections are the same in both)"
    );
    // And a rollback of the very first config leaves no sidenet section at all.
    let mut r = router(profile);
    let stock = r.exports();
    r.apply(&rev1, 1).unwrap();
    r.roll_back();
    let now = r.exports();
    assert!(sidenet_sections(&now).is_empty(), "{now:?}");
    let mut want = owner_sections(&stock);
    want.insert("babeld".into(), String::new());
    assert_eq!(owner_sections(&now), want);
}

#[test]
fn a_crash_mid_apply_is_recovered_from_the_journal() {
    let profile = "tplink-archer-c7-v2";
    let mut r = router(profile);
    let stock_owner = owner_sections(&r.exports());
    let rev1 = rendered(profile, false);
    r.apply(&rev1, 1).unwrap();
    r.confirm();
    let after1 = sidenet_sections(&r.exports());
    // Revision 2 is installed and the agent dies while converging: the network package is
    // committed already, the wireless batch is in uci's change folder but not committed.
    let mut rev2 = rendered(profile, true);
    r.ow.prepare(&mut rev2).unwrap();
    let rv2 = Revision { epoch: 1, rev: 2 };
    r.applier.install(rv2, "sha2", b"env2", &rev2).unwrap();
    let uci = Uci::new(&uci_bin().to_string_lossy(), &r.root, &r.state);
    let net = Batch::parse(
        "network",
        &std::fs::read_to_string(r.root.join("etc/sidenet/uci/network")).unwrap(),
    )
    .unwrap();
    let mut rec = Recorder::new();
    rec.run_for_real(&uci.bin);
    uci.check(&mut rec, &[]).unwrap();
    assert!(uci.sync(&mut rec, "network", Some(&net)).unwrap());
    std::fs::write(
        r.state.join("run/uci/wireless"),
        "wireless.sidenet_mesh.mesh_id='half-done'\n",
    )
    .unwrap();
    assert_ne!(sidenet_sections(&r.exports()), after1);
    // The agent starts again: the journal rolls the files back, converge re-syncs uci.
    let (mut ow, _rec) = backend(&r.root, &r.state);
    let applier = Applier::new(&r.root, &r.state);
    assert_eq!(
        applier.recover().unwrap(),
        Recovery::RolledBack(rv2, Phase::Applying)
    );
    ow.converge(r.good.as_ref()).unwrap();
    let now = r.exports();
    assert_eq!(sidenet_sections(&now), after1, "not back on revision 1");
    let mut want = stock_owner;
    want.insert("babeld".into(), String::new());
    assert_eq!(owner_sections(&now), want);
    assert!(!now["wireless"].contains("half-done"));
}

#[test]
fn a_radio_the_owner_set_otherwise_is_reported_and_nothing_changes() {
    let profile = "netgear-r7800";
    let cases = [
        (
            "wireless.radio0.channel=44",
            "wireless.radio0.channel is '44' on this router (the owner's setting, which sidenet never changes), but the config needs '36' (every node of mesh 'riverside' meets on channel 36)",
        ),
        (
            "wireless.radio0.disabled=1",
            "wireless.radio0.disabled is '1' on this router",
        ),
        (
            "wireless.radio0.htmode=VHT40",
            "needs 'VHT80' (80 MHz wide, as mesh 'riverside')",
        ),
        (
            "wireless.radio0.country=US",
            "wireless.radio0.country is 'US'",
        ),
    ];
    for (owner_setting, want) in cases {
        let mut r = router(profile);
        for cmd in [vec!["set", owner_setting], vec!["commit", "wireless"]] {
            let o = uci_at(&r.conf()).args(&cmd).output().unwrap();
            assert!(o.status.success());
        }
        let before = r.files();
        let e = r.apply(&rendered(profile, false), 1).unwrap_err();
        assert!(e.contains(want), "{owner_setting}: {e}");
        assert_eq!(r.files(), before, "{owner_setting}: something changed");
        assert_eq!(r.reloads(), Vec::<String>::new(), "{owner_setting}");
    }
    // No country set at all: named as such.
    let mut r = router(profile);
    uci_at(&r.conf())
        .args(["delete", "wireless.radio0.country"])
        .output()
        .unwrap();
    uci_at(&r.conf())
        .args(["commit", "wireless"])
        .output()
        .unwrap();
    let e = r.apply(&rendered(profile, false), 1).unwrap_err();
    assert!(
        e.contains("wireless.radio0.country is not set on this router"),
        "{e}"
    );
}

#[test]
fn someone_elses_uncommitted_changes_are_never_committed() {
    // uci keeps uncommitted changes in a shared folder (/tmp/.uci) that every `uci commit`
    // picks up: the recorder stands in for `uci changes` reporting one.
    let mut r = router("glinet-gl-mt3000");
    let uci = uci_bin().to_string_lossy().into_owned();
    let rec = Recorder::new();
    rec.answer(
        &format!(
            "{uci} -c {} -t {} changes wireless",
            r.conf().display(),
            r.state.join("run/uci").display()
        ),
        Ok("wireless.default_radio0.ssid='half typed'\n"),
    );
    rec.run_for_real(&uci);
    let args = DataplaneArgs {
        uci,
        ..DataplaneArgs::default()
    };
    let key = WgKey::load_or_create(&r.state.join("wg.key")).unwrap();
    r.ow = Openwrt::new(&r.root, &r.state, key, &args, Box::new(rec.clone()));
    r.rec = rec;
    let before = r.files();
    let e = r
        .apply(&rendered("glinet-gl-mt3000", false), 1)
        .unwrap_err();
    assert!(
        e.contains("uncommitted uci changes to wireless made outside sidenet")
            && e.contains("half typed"),
        "{e}"
    );
    assert_eq!(r.files(), before);
}

#[test]
fn whole_config_files_are_refused() {
    let mut r = router("ubnt-unifi-ac-lite");
    let mut cfg = rendered("ubnt-unifi-ac-lite", false);
    cfg.files.push(FileSpec {
        path: "etc/config/network".into(),
        mode: 0o644,
        content: "config interface 'lan'\n".into(),
    });
    let e = r.apply(&cfg, 1).unwrap_err();
    assert!(e.contains("writes etc/config/network whole"), "{e}");
    // And a batch that reaches for the owner's sections.
    let mut cfg = rendered("ubnt-unifi-ac-lite", false);
    cfg.files[0]
        .content
        .push_str("set network.lan.ipaddr='192.168.1.1'\n");
    let e = r.apply(&cfg, 1).unwrap_err();
    assert!(e.contains("section \"lan\" is not sidenet's"), "{e}");
}

#[test]
fn babel_neighbours_map_to_node_ids_through_the_rendered_names() {
    // netifd names each WireGuard device after its network section; babeld reports the
    // neighbour on that device. The probe plan must map it to the peer's node id.
    let profile = "tplink-archer-c7-v2";
    let cfg = rendered(profile, true);
    let content = |p: &str| {
        cfg.files
            .iter()
            .find(|f| f.path == p)
            .map(|f| f.content.clone())
            .unwrap()
    };
    let network = Batch::parse("network", &content("etc/sidenet/uci/network")).unwrap();
    let babeld = Batch::parse("babeld", &content("etc/sidenet/uci/babeld")).unwrap();
    let plan = sidenet_agent::probe::ProbePlan::parse(&content("etc/sidenet/probes")).unwrap();
    let wireguard: Vec<&str> = network
        .sections
        .iter()
        .filter(|s| {
            s.options.iter().any(|(o, v)| {
                o == "proto" && *v == sidenet_agent::uci::Value::One("wireguard".into())
            })
        })
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(wireguard.len(), 2);
    for dev in &wireguard {
        assert!(dev.len() <= 15, "{dev} is too long for a Linux interface");
        let node = sidenet_agent::openwrt::neighbour_node(Some(&plan), dev);
        assert!(
            node.as_deref()
                .is_some_and(|n| n.starts_with(&dev["sidenet_".len()..])),
            "babel neighbour on {dev} maps to {node:?}"
        );
        assert!(
            babeld.sections.iter().any(|s| s.options.iter().any(
                |(o, v)| o == "ifname" && *v == sidenet_agent::uci::Value::One(dev.to_string())
            )),
            "babeld does not run on {dev}"
        );
    }
}

/// The policy shaping on OpenWrt (docs/policies.md, "OpenWrt"): after the reloads, the agent
/// builds the with-peers golden table's HTB classes and redirects the WireGuard links netifd has
/// up (here one of the two) through them; the other link is left to the hotplug script. The
/// status reports the leaf and the open windows; a config without the table takes the classes
/// and the redirects away again.
#[test]
fn the_shaping_table_is_applied_after_the_reloads_and_removed_with_it() {
    let profile = "tplink-archer-c7-v2";
    let mut r = router(profile);
    let base = repo()
        .join("controller/tests/golden/with-peers")
        .join(profile);
    let plain = rendered(profile, true);
    let mut cfg = plain.clone();
    for (path, action) in [
        ("etc/sidenet/shaping", "apply:shaping"),
        ("etc/hotplug.d/iface/50-sidenet-shaping", "apply:shaping"),
    ] {
        cfg.files.push(FileSpec {
            path: path.into(),
            mode: 0o644,
            content: std::fs::read_to_string(base.join(path))
                .unwrap_or_else(|e| panic!("{path}: {e}")),
        });
        if !cfg.actions.iter().any(|a| a == action) {
            cfg.actions.push(action.into());
        }
    }
    // netifd has brought up the link to kitchen, not yet the one to attic.
    std::fs::create_dir_all(r.root.join("sys/class/net/sidenet_peerbbb")).unwrap();
    r.apply(&cfg, 1).unwrap();
    r.confirm();
    let cmds = r.reloads();
    let pos = |c: &str| {
        cmds.iter()
            .position(|x| x == c)
            .unwrap_or_else(|| panic!("no {c:?} in {cmds:#?}"))
    };
    let firewall = pos("/etc/init.d/firewall reload");
    let ifb = pos("ip link add sneg0 type ifb");
    assert!(firewall < ifb, "{cmds:#?}");
    pos("tc qdisc replace dev sneg0 root handle 1: htb");
    pos("tc qdisc replace dev snin0 root handle 2: htb");
    pos("tc qdisc replace dev sneg0 parent 1:10 handle 1010: fq_codel");
    pos("tc qdisc add dev sidenet_peerbbb clsact");
    pos(
        "tc filter add dev sidenet_peerbbb egress protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev sneg0",
    );
    pos(
        "tc filter add dev sidenet_peerbbb ingress protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev snin0",
    );
    assert!(
        !cmds.iter().any(|c| c.contains("sidenet_peerccc")),
        "a link netifd has not brought up was touched: {cmds:#?}"
    );
    let status = r.ow.observe().shaping.expect("no shaping status");
    assert_eq!(status.leaf, "fq_codel");
    // The hotplug script is sidenet's own file, installed by the journal.
    assert!(
        std::fs::read_to_string(r.root.join("etc/hotplug.d/iface/50-sidenet-shaping"))
            .unwrap()
            .contains("redirect dev sneg0")
    );
    r.apply(&plain, 2).unwrap();
    r.confirm();
    let cmds = r.reloads();
    for c in [
        "ip link del sneg0",
        "ip link del snin0",
        "tc qdisc del dev sidenet_peerbbb clsact",
    ] {
        assert!(cmds.iter().any(|x| x == c), "no {c:?} in {cmds:#?}");
    }
    assert!(r.ow.observe().shaping.is_none());
    assert!(
        !r.root
            .join("etc/hotplug.d/iface/50-sidenet-shaping")
            .exists()
    );
}
