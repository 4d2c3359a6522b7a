//! Stock routers and Debian hosts for the provisioning tests: a package manager recorder (opkg,
//! apk or apt-get: a script that records its calls and simulates the installed state), firmware
//! images (an OpenWrt board with its stock wpad-basic, init scripts and `wifi`; a Debian host),
//! and dropbear with busybox as the SSH server and shell, as a factory-fresh OpenWrt router runs
//! them (root with a blank password, let in through the SSH `none` method).
//!
//! A device is a root folder, as in the other provisioning tests. Its `usr/bin` and `usr/sbin`
//! are where programs live: dropbear runs in its own mount namespace with them bind-mounted over
//! `/usr/bin` and `/usr/sbin` (and the device's `etc/init.d` over `/etc/init.d`), so every
//! command a session runs is busybox or what the recorder installed; an OpenSSH host gets them
//! first on its sessions' `PATH`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Proc, free_port, run, wait_for};

/// A package manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pm {
    Opkg,
    Apk,
    Apt,
}

impl Pm {
    pub fn command(self) -> &'static str {
        match self {
            Pm::Opkg => "opkg",
            Pm::Apk => "apk",
            Pm::Apt => "apt-get",
        }
    }
}

fn write_exec(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// busybox and a link per applet in `dir` (what an OpenWrt image has in /bin and /usr/bin).
pub fn busybox_tree(dir: &Path) {
    let bb = PathBuf::from("/usr/bin/busybox");
    assert!(
        bb.exists(),
        "/usr/bin/busybox is missing: run `scripts/install-peers` (it installs busybox)"
    );
    std::fs::create_dir_all(dir).unwrap();
    if !dir.join("busybox").exists() {
        std::fs::copy(&bb, dir.join("busybox")).unwrap();
    }
    let list = run(Command::new(&bb).arg("--list"));
    for applet in list.split_whitespace() {
        let link = dir.join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).unwrap();
        }
    }
}

/// Which programs each package installs (`PACKAGE PATH[,PATH...] [VARIANT]`): OpenWrt's and
/// Debian's names for what the configs need, and the stock wpad.
const CATALOG: &str = "\
babeld /usr/sbin/babeld,/etc/init.d/babeld
wireguard-tools /usr/bin/wg
kmod-wireguard -
iw /usr/sbin/iw
wpad-basic-mbedtls /usr/sbin/wpa_supplicant,/usr/sbin/hostapd basic
wpad-mesh-mbedtls /usr/sbin/wpa_supplicant,/usr/sbin/hostapd mesh
wpasupplicant /usr/sbin/wpa_supplicant mesh
nftables /usr/sbin/nft
iproute2 /usr/sbin/ip
";

const RECORDER: &str = r#"#!/bin/sh
# Package manager recorder (sidenet provisioning tests): records every call and simulates the
# installed state under the device root; the catalog says which programs a package installs.
R=@ROOT@
S="$R/var/lib/pkgrec"
echo "$(basename "$0") $*" >> "$S/calls"
has() { grep -qx "$1" "$S/installed" 2>/dev/null; }
entry() { grep "^$1 " "$S/catalog"; }
offline() { [ -e "$S/offline" ]; }
stub() {
  f="$R$1"; mkdir -p "$(dirname "$f")"
  case "$2" in
    mesh) printf '#!/bin/sh\n# recorder stub: wpad with 802.11s\n[ "$1" = -vmesh ] && exit 0\nexit 0\n' ;;
    basic) printf '#!/bin/sh\n# recorder stub: wpad without 802.11s\n[ "$1" = -vmesh ] && exit 255\nexit 0\n' ;;
    *) printf '#!/bin/sh\n# recorder stub\nexit 0\n' ;;
  esac > "$f.new" && chmod 755 "$f.new" && mv "$f.new" "$f"
}
add() {
  has "$1" && { echo "Package $1 is already installed"; return 0; }
  e=$(entry "$1") || { echo "Unknown package '$1'." >&2; return 1; }
  set -- $e
  for p in $(echo "$2" | tr , ' '); do [ "$p" = - ] || stub "$p" "$3"; done
  echo "$1" >> "$S/installed"
  echo "Installing $1 (1.0-1)"
}
del() {
  has "$1" || { echo "No packages removed."; return 0; }
  e=$(entry "$1"); set -- $e
  for p in $(echo "$2" | tr , ' '); do [ "$p" = - ] || rm -f "$R$p"; done
  grep -vx "$1" "$S/installed" > "$S/installed.new"; mv "$S/installed.new" "$S/installed"
  echo "Removing package $1"
}
conflict() {
  case $1 in
    wpad*) for i in $(cat "$S/installed"); do case $i in wpad*) [ "$i" != "$1" ] && { echo "$i"; return 0; } ;; esac; done ;;
  esac
  return 1
}
case "$(basename "$0")" in
opkg)
  case "$1" in
  update)
    if offline; then echo "Collected errors:" >&2; echo " * opkg_download: Failed to download the package list of feed openwrt_core, wget returned 4." >&2; exit 255; fi
    touch "$S/lists"; echo "Updated list of available packages"; exit 0 ;;
  install)
    shift; rc=0
    for a; do
      case $a in
        -*) continue ;;
        *.ipk) [ -e "$a" ] || { echo " * opkg_install_cmd: $a: no such file" >&2; rc=255; continue; }; n=$(basename "$a"); n=${n%%_*} ;;
        *) [ -e "$S/lists" ] || { echo " * opkg_install_cmd: Cannot install package $a." >&2; rc=255; continue; }; n=$a ;;
      esac
      if c=$(conflict "$n"); then echo " * check_data_file_clashes: Package $n wants to install file $R/usr/sbin/wpad But that file is already provided by package  * $c" >&2; rc=255; continue; fi
      add "$n" || rc=255
    done
    exit $rc ;;
  download)
    [ -e "$S/lists" ] && entry "$2" >/dev/null || { echo " * opkg_download_cmd: Cannot find package $2." >&2; exit 255; }
    echo "$2" > "./$2_1.0-1_all.ipk"; echo "Downloaded $2 as ./$2_1.0-1_all.ipk"; exit 0 ;;
  remove) shift; for a; do del "$a"; done; exit 0 ;;
  list-installed) while read -r n; do echo "$n - 1.0-1"; done < "$S/installed"; exit 0 ;;
  esac ;;
apk)
  case "$1" in
  update)
    if offline; then echo "WARNING: updating and opening the repository: network error (check Internet connection and firewall)" >&2; echo "1 unavailable, 0 stale; 0 distinct packages available"; exit 1; fi
    touch "$S/lists"; echo "OK: 1 distinct packages available"; exit 0 ;;
  add)
    shift; gone=""; new=""
    for a; do case $a in -*) ;; '!'*) gone="$gone ${a#!}" ;; *) new="$new $a" ;; esac; done
    [ -e "$S/lists" ] || { echo "ERROR: unable to select packages:$new (no such package)" >&2; exit 1; }
    for n in $new; do
      entry "$n" >/dev/null || { echo "ERROR: unable to select packages: $n (no such package)" >&2; exit 1; }
      if c=$(conflict "$n") && ! echo " $gone " | grep -q " $c "; then echo "ERROR: unable to select packages: $n: conflicts: $c" >&2; exit 1; fi
    done
    for g in $gone; do del "$g"; done
    for n in $new; do add "$n"; done
    exit 0 ;;
  del) shift; for a; do del "$a"; done; exit 0 ;;
  info) [ "$2" = -e ] && has "$3" && { echo "$3"; exit 0; }; exit 1 ;;
  esac ;;
apt-get)
  for a; do case $a in update|install|remove|purge) cmd=$a; break ;; esac; done
  case "$cmd" in
  update)
    if offline; then echo "Err:1 http://127.0.0.1:9/debian bookworm InRelease"; echo "W: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/InRelease  Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)" >&2; echo "W: Some index files failed to download. They have been ignored, or old ones used instead." >&2; exit 0; fi
    touch "$S/lists"; echo "Reading package lists... Done"; exit 0 ;;
  install)
    seen=0; rc=0
    for a; do
      case $a in -*|install) continue ;; esac
      if offline || [ ! -e "$S/lists" ]; then echo "E: Unable to locate package $a" >&2; exit 100; fi
      add "$a" || rc=100
    done
    exit $rc ;;
  remove|purge) for a; do case $a in -*|remove|purge) ;; *) del "$a" ;; esac; done; exit 0 ;;
  esac ;;
esac
echo "recorder: unsupported call: $(basename "$0") $*" >&2
exit 64
"#;

/// The recorder for `pm` in `ROOT/usr/bin`, with `installed` packages already there (their
/// programs too).
pub fn recorder(root: &Path, pm: Pm, installed: &[&str]) {
    let state = root.join("var/lib/pkgrec");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("catalog"), CATALOG).unwrap();
    std::fs::write(state.join("installed"), "").unwrap();
    if !state.join("calls").exists() {
        std::fs::write(state.join("calls"), "").unwrap();
    }
    let text = RECORDER.replace("@ROOT@", &root.display().to_string());
    write_exec(&root.join("usr/bin").join(pm.command()), &text);
    // What the image ships: its programs and its line in the installed list.
    let mut list = String::new();
    for p in installed {
        let line = CATALOG
            .lines()
            .find(|l| l.split_whitespace().next() == Some(*p))
            .unwrap_or_else(|| panic!("{p} is not in the recorder's catalog"));
        let mut w = line.split_whitespace();
        let (_, paths, variant) = (w.next(), w.next().unwrap(), w.next());
        for path in paths.split(',').filter(|p| *p != "-") {
            let body = match variant {
                Some("mesh") => {
                    "#!/bin/sh\n# recorder stub: wpad with 802.11s\n[ \"$1\" = -vmesh ] && exit 0\nexit 0\n"
                }
                Some("basic") => {
                    "#!/bin/sh\n# recorder stub: wpad without 802.11s\n[ \"$1\" = -vmesh ] && exit 255\nexit 0\n"
                }
                _ => "#!/bin/sh\n# recorder stub\nexit 0\n",
            };
            write_exec(&root.join(path.trim_start_matches('/')), body);
        }
        list.push_str(p);
        list.push('\n');
    }
    std::fs::write(state.join("installed"), list).unwrap();
}

/// The recorder's calls since it was set up (`opkg install babeld`, ...).
pub fn calls(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("var/lib/pkgrec/calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The packages the recorder has installed.
pub fn installed(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("var/lib/pkgrec/installed"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Cuts the host off its package source (or gives it back).
pub fn set_offline(root: &Path, offline: bool) {
    let f = root.join("var/lib/pkgrec/offline");
    if offline {
        std::fs::write(f, "").unwrap();
    } else {
        let _ = std::fs::remove_file(f);
    }
}

/// An OpenWrt firmware image of `version` for the board of `fixture` under `root`: what
/// detection reads, busybox in `usr/bin`, the init scripts and `wifi` the openwrt backend runs
/// (they succeed), and the stock `wpad-basic-mbedtls` installed by the recorder.
pub fn openwrt_image(root: &Path, fixture: &str, version: &str, pm: Pm) {
    super::fake_device(root, Some(fixture), &["phy0", "phy1"]);
    std::fs::write(
        root.join("etc/os-release"),
        format!(
            "NAME=\"OpenWrt\"\nVERSION=\"{version}\"\nID=\"openwrt\"\nVERSION_ID=\"{version}\"\nPRETTY_NAME=\"OpenWrt {version}\"\n"
        ),
    )
    .unwrap();
    busybox_tree(&root.join("usr/bin"));
    // The board's stock /etc/config as OpenWrt ships it (the owner's home AP on each radio):
    // the agent adds its sidenet_* sections to it with the uci tool.
    let profile = fixture
        .trim_end_matches(".json")
        .trim_end_matches("-legacy");
    let stock = super::repo()
        .join("tests/openwrt-stock")
        .join(profile)
        .join("etc/config");
    std::fs::create_dir_all(root.join("etc/config")).unwrap();
    for e in std::fs::read_dir(&stock)
        .unwrap_or_else(|e| panic!("{}: {e}", stock.display()))
        .map(Result::unwrap)
    {
        std::fs::copy(e.path(), root.join("etc/config").join(e.file_name())).unwrap();
    }
    // OpenWrt's own uci tool, as every OpenWrt image has it (built by scripts/install-peers).
    let uci = super::repo().join(".tools/bin/uci");
    std::fs::copy(&uci, root.join("usr/bin/uci")).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/install-peers once: it builds OpenWrt's uci tool)",
            uci.display()
        )
    });
    std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
    for s in ["network", "firewall", "dnsmasq"] {
        write_exec(
            &root.join("etc/init.d").join(s),
            "#!/bin/sh\n# stock init script (test image; OpenWrt's run through /etc/rc.common)\nexit 0\n",
        );
    }
    write_exec(
        &root.join("sbin/wifi"),
        "#!/bin/sh\n# stock wifi (test image)\nexit 0\n",
    );
    recorder(root, pm, &["wpad-basic-mbedtls"]);
}

/// A Debian host under `root` with the apt recorder and `preinstalled` packages.
pub fn debian_image(root: &Path, preinstalled: &[&str]) {
    super::fake_device(root, None, &["phy0"]);
    std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
    recorder(root, Pm::Apt, preinstalled);
}

/// `PATH` for an OpenSSH host's sessions: the device's programs first, then busybox (from
/// `tools`) for everything else.
pub fn session_path(root: &Path, tools: &Path) -> String {
    format!(
        "{r}/usr/sbin:{r}/usr/bin:{t}",
        r = root.display(),
        t = tools.display()
    )
}

/// dropbear with busybox as the shell, in its own mount namespace: root's shell is /bin/ash, and
/// the device's `usr/bin`, `usr/sbin` and `etc/init.d` are `/usr/bin`, `/usr/sbin` and
/// `/etc/init.d`.
pub struct Dropbear {
    pub name: String,
    pub dir: PathBuf,
    pub root: PathBuf,
    pub port: u16,
    pub blank_password: bool,
    proc: Option<Proc>,
    starts: usize,
}

impl Dropbear {
    /// Starts dropbear for the device at `root`; with `blank_password` root has none and gets
    /// in (`-B`, as on a factory-fresh OpenWrt), else only with a key from `authorized`.
    pub fn start(
        base: &Path,
        name: &str,
        root: &Path,
        blank_password: bool,
        authorized: &str,
    ) -> Dropbear {
        let exe = PathBuf::from("/usr/sbin/dropbear");
        assert!(
            exe.exists(),
            "/usr/sbin/dropbear is missing: run `scripts/install-peers` (it installs dropbear-bin)"
        );
        let dir = base.join(name);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::create_dir_all(dir.join("empty")).unwrap();
        std::fs::create_dir_all(dir.join("home/.ssh")).unwrap();
        // The binary is run from here: /usr/sbin is the device's inside the namespace.
        std::fs::copy(&exe, dir.join("dropbear")).unwrap();
        run(Command::new("dropbearkey")
            .args(["-t", "ed25519", "-f"])
            .arg(dir.join("hostkey")));
        std::fs::write(
            dir.join("etc/passwd"),
            format!("root:x:0:0:root:{}:/bin/ash\n", dir.join("home").display()),
        )
        .unwrap();
        // No password hash: blank. Without -B dropbear refuses it.
        std::fs::write(dir.join("etc/shadow"), "root::19000:0:99999:7:::\n").unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
        std::fs::write(dir.join("etc/shells"), "/bin/ash\n/bin/sh\n").unwrap();
        std::fs::write(dir.join("home/.ssh/authorized_keys"), authorized).unwrap();
        std::fs::set_permissions(
            dir.join("home/.ssh/authorized_keys"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::set_permissions(
            dir.join("home/.ssh"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        std::fs::set_permissions(dir.join("home"), std::fs::Permissions::from_mode(0o700)).unwrap();
        for d in ["usr/bin", "usr/sbin", "etc/init.d"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let mut d = Dropbear {
            name: name.to_string(),
            dir,
            root: root.to_path_buf(),
            port: free_port(),
            blank_password,
            proc: None,
            starts: 0,
        };
        d.launch();
        d
    }

    fn launch(&mut self) {
        let d = self.dir.display().to_string();
        let r = self.root.display().to_string();
        let mut script = String::from("set -e\n");
        for f in ["passwd", "shadow", "group", "shells"] {
            script.push_str(&format!("mount --bind {d}/etc/{f} /etc/{f}\n"));
        }
        for l in ["/usr/local/bin", "/usr/local/sbin"] {
            script.push_str(&format!(
                "if [ -d {l} ]; then mount --bind {d}/empty {l}; fi\n"
            ));
        }
        script.push_str(&format!(
            "mount --bind {r}/etc/init.d /etc/init.d\n\
             mount --bind {r}/usr/sbin /usr/sbin\n\
             mount --bind {r}/usr/bin /usr/bin\n\
             exec {d}/dropbear -F -E {blank}-p 127.0.0.1:{port} -r {d}/hostkey\n",
            blank = if self.blank_password { "-B " } else { "" },
            port = self.port,
        ));
        std::fs::write(self.dir.join("start.sh"), script).unwrap();
        self.starts += 1;
        let log = self.dir.join(format!("dropbear-{}.log", self.starts));
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh"])
            .arg(self.dir.join("start.sh"));
        self.proc = Some(Proc::spawn(
            &format!("dropbear {}", self.name),
            &mut cmd,
            &log,
        ));
        let port = self.port;
        wait_for(
            &format!("dropbear {} to listen on {port}", self.name),
            Duration::from_secs(10),
            || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
            || std::fs::read_to_string(&log).unwrap_or_default(),
        );
    }

    pub fn log_text(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.join(format!("dropbear-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `script` on the device through an SSH session (inside its namespace), as root.
    pub fn sh(&self, script: &str, key: Option<&Path>) -> String {
        ssh_run(self.port, script, key)
    }
}

impl Drop for Dropbear {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// Runs `script` on 127.0.0.1:`port` as root (blank password, or `key`) and returns its
/// standard output; panics with its error output when it fails.
pub fn ssh_run(port: u16, script: &str, key: Option<&Path>) -> String {
    let known = tempfile::tempdir().unwrap();
    let kh = sidenet_provision::knownhosts::KnownHosts::open(&known.path().join("kh")).unwrap();
    let (conn, _) = sidenet_provision::ssh::connect(
        &sidenet_provision::ssh::Endpoint {
            host: "127.0.0.1",
            port,
            host_key: None,
            trust_on_first_use: true,
            timeout: Duration::from_secs(20),
        },
        &kh,
    )
    .unwrap();
    let cred = key.map(|k| sidenet_provision::ssh::Credential::KeyFile(k.to_path_buf()));
    conn.login("root", cred.as_ref()).unwrap();
    let out = conn.run("test script", script).unwrap();
    assert_eq!(
        out.status, 0,
        "{script}\nstdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    out.stdout
}
