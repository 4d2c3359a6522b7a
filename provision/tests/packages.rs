//! `sidenetctl provision` installs the packages the rendered configs need, with each host's own
//! package manager: real sshd hosts (OpenSSH, and dropbear with busybox as on a stock router)
//! whose opkg, apk or apt-get is a recorder (it records its calls and simulates the installed
//! state, including the stock wpad-basic that a mesh-capable wpad replaces). Each package is
//! installed once, a second run does not touch the package manager, and a host without a
//! package source is refused with the exact list of what is missing, before anything else is
//! put on it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::router::{self, Dropbear, Pm};
use common::{Agents, Auth, Controller, Sshd, bin, wait_for};
use serde_json::Value;

const OPENWRT_MISSING: [&str; 4] = ["babeld", "wireguard-tools", "wpad-mesh-mbedtls", "iw"];
const REPLACES: &str =
    "wpad-basic-mbedtls wpad-basic-wolfssl wpad-basic-openssl wpad-basic wpad-mini";

fn provision(args: &[String], cwd: &Path) -> (i32, BTreeMap<String, Value>, String) {
    let out = Command::new(bin("sidenetctl"))
        .arg("provision")
        .args(args)
        .args(["-o", "json"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let list: Vec<Value> = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));
    (
        out.status.code().unwrap_or(-1),
        list.into_iter()
            .map(|r| (r["name"].as_str().unwrap().to_string(), r))
            .collect(),
        format!("{stdout}\n{stderr}"),
    )
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn runs_mesh_wpad(root: &Path) -> bool {
    Command::new(root.join("usr/sbin/wpa_supplicant"))
        .arg("-vmesh")
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn provisioning_installs_the_packages_once_and_refuses_hosts_without_a_package_source() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ctl = Controller::start(&t.join("ctl"), "auto");
    common::test_templates_with(
        &t.join("templates"),
        &common::Templates {
            packages: true,
            keep: true,
            ..Default::default()
        },
    );
    common::dist(
        &t.join("dist"),
        &["mips_24kc", "mipsel_24kc", "aarch64", "armv7l", "x86_64"],
    );
    std::fs::create_dir_all(t.join("keys")).unwrap();
    common::keygen(&t.join("keys/admin"));
    let admin_pub = std::fs::read_to_string(t.join("keys/admin.pub")).unwrap();
    let tools = t.join("busybox");
    router::busybox_tree(&tools);

    let dev = |n: &str| t.join("devices").join(n);
    router::openwrt_image(
        &dev("ow23"),
        "tplink-archer-c7-v2.json",
        "23.05.5",
        Pm::Opkg,
    );
    router::openwrt_image(&dev("ow25"), "glinet-gl-mt3000.json", "25.12.0", Pm::Apk);
    router::debian_image(&dev("deb"), &["iproute2", "nftables"]);
    router::openwrt_image(
        &dev("ow23-offline"),
        "netgear-r7800.json",
        "23.05.5",
        Pm::Opkg,
    );
    router::set_offline(&dev("ow23-offline"), true);
    router::debian_image(&dev("deb-offline"), &["iproute2", "nftables"]);
    router::set_offline(&dev("deb-offline"), true);
    router::openwrt_image(
        &dev("ow22"),
        "tplink-archer-c7-v2.json",
        "22.03.7",
        Pm::Opkg,
    );
    router::openwrt_image(&dev("db24"), "ubnt-unifi-ac-lite.json", "24.10.0", Pm::Opkg);
    router::openwrt_image(&dev("db25"), "linksys-e8450.json", "25.12.0", Pm::Apk);
    let names = [
        "ow23",
        "ow25",
        "deb",
        "ow23-offline",
        "deb-offline",
        "ow22",
        "db24",
        "db25",
    ];
    let _agents = Agents(names.iter().map(|n| dev(n)).collect());

    let sshd_dir = t.join("sshd");
    let openssh = |name: &str| {
        Sshd::start_with(
            &sshd_dir,
            name,
            Auth::Key,
            &admin_pub,
            &format!("SetEnv PATH={}\n", router::session_path(&dev(name), &tools)),
        )
    };
    let servers: Vec<Sshd> = ["ow23", "ow25", "deb", "ow23-offline", "deb-offline", "ow22"]
        .iter()
        .map(|n| openssh(n))
        .collect();
    let hosts: Vec<(String, u16)> = servers.iter().map(|s| (s.name.clone(), s.port)).collect();
    let db24 = Dropbear::start(&t.join("dropbear"), "db24", &dev("db24"), false, &admin_pub);
    let db25 = Dropbear::start(&t.join("dropbear"), "db25", &dev("db25"), false, &admin_pub);
    let mut rows = String::new();
    for (name, port) in hosts
        .iter()
        .cloned()
        .chain([("db24".into(), db24.port), ("db25".into(), db25.port)])
    {
        rows.push_str(&format!(
            "  - {{ host: 127.0.0.1, port: {port}, name: {name}, root: {} }}\n",
            dev(&name).display()
        ));
    }
    std::fs::write(
        t.join("inventory.yaml"),
        format!(
            "mesh: riverside\nbroker: {}\nparallelism: 4\ndefaults:\n  user: root\n  privateKeyFile: keys/admin\nhosts:\n{rows}",
            ctl.broker()
        ),
    )
    .unwrap();
    let args: Vec<String> = vec![
        "-i".into(),
        t.join("inventory.yaml").display().to_string(),
        "--state".into(),
        ctl.state().display().to_string(),
        "--agents".into(),
        t.join("dist").display().to_string(),
        "--templates".into(),
        t.join("templates").display().to_string(),
        "--profiles".into(),
        common::repo()
            .join("hardware-profiles")
            .display()
            .to_string(),
        "--enrol-timeout".into(),
        "60".into(),
        "--accept-new-host-keys".into(),
    ];
    let logs = || {
        let mut s = format!(
            "--- controller\n{}\n",
            common::tail(&ctl.proc.log_text(), 30)
        );
        for n in names {
            s.push_str(&format!(
                "--- {n} agent\n{}\n--- {n} calls\n{:?}\n",
                common::tail(
                    &std::fs::read_to_string(dev(n).join("var/log/sidenet-agent.log"))
                        .unwrap_or_default(),
                    10
                ),
                router::calls(&dev(n))
            ));
        }
        s.push_str(&format!("--- db24\n{}\n", db24.log_text()));
        s
    };

    // ---- First run.
    let (code, r1, text) = provision(&args, t);
    let ctx1 = || format!("{text}\n{}", logs());
    assert_eq!(
        code,
        1,
        "the hosts without a package source fail the run\n{}",
        ctx1()
    );
    for n in ["ow23", "ow25", "db24", "db25"] {
        let r = &r1[n];
        assert_eq!(r["result"], "provisioned", "{n}\n{}", ctx1());
        assert_eq!(strs(&r["packages"]), OPENWRT_MISSING, "{n}");
        assert!(
            strs(&r["changes"]).contains(
                &"packages: babeld, wireguard-tools, wpad-mesh-mbedtls (replacing wpad-basic-mbedtls), iw".to_string()
            ),
            "{n}: {:?}",
            r["changes"]
        );
        assert!(runs_mesh_wpad(&dev(n)), "{n}: the wpad has no mesh support");
        let mut inst = router::installed(&dev(n));
        inst.sort();
        assert_eq!(
            inst,
            ["babeld", "iw", "wireguard-tools", "wpad-mesh-mbedtls"],
            "{n}"
        );
        assert!(r["nodeId"].is_string() && r["phase"].is_string(), "{n}");
    }
    // opkg: the replacement is downloaded before the stock wpad is removed.
    for n in ["ow23", "db24"] {
        assert_eq!(
            router::calls(&dev(n)),
            [
                "opkg list-installed",
                "opkg update",
                "opkg install babeld wireguard-tools iw",
                "opkg download wpad-mesh-mbedtls",
                "opkg download wpad-basic-mbedtls",
                "opkg remove wpad-basic-mbedtls",
                "opkg install ./wpad-mesh-mbedtls_1.0-1_all.ipk",
            ],
            "{n}"
        );
    }
    // apk: one transaction that swaps the wpad.
    for n in ["ow25", "db25"] {
        let mut want: Vec<String> = REPLACES
            .split(' ')
            .map(|r| format!("apk info -e {r}"))
            .collect();
        want.push("apk update".into());
        want.push("apk add babeld wireguard-tools wpad-mesh-mbedtls iw !wpad-basic-mbedtls".into());
        assert_eq!(router::calls(&dev(n)), want, "{n}");
    }
    let r = &r1["deb"];
    assert_eq!(r["result"], "provisioned", "{}", ctx1());
    assert_eq!(
        strs(&r["packages"]),
        ["wpasupplicant", "iw", "wireguard-tools", "babeld"]
    );
    assert_eq!(
        router::calls(&dev("deb")),
        [
            "apt-get update",
            "apt-get install -y --no-install-recommends wpasupplicant iw wireguard-tools babeld",
        ]
    );
    // No package source: refused before anything was uploaded, with the exact list.
    let e = r1["ow23-offline"]["error"].as_str().unwrap();
    assert_eq!(r1["ow23-offline"]["step"], "packages", "{e}");
    assert!(
        e.contains("no package source: `opkg update` failed, so nothing was installed. Missing: babeld, wireguard-tools, wpad-mesh-mbedtls, iw."),
        "{e}"
    );
    assert!(e.contains("Failed to download the package list"), "{e}");
    assert_eq!(
        router::calls(&dev("ow23-offline")),
        ["opkg list-installed", "opkg update"]
    );
    assert_eq!(
        router::installed(&dev("ow23-offline")),
        ["wpad-basic-mbedtls"]
    );
    let e = r1["deb-offline"]["error"].as_str().unwrap();
    assert!(
        e.contains("no package source: `apt-get update` could not reach a package source, so nothing was installed. Missing: wpasupplicant, iw, wireguard-tools, babeld."),
        "{e}"
    );
    assert!(e.contains("E: Unable to locate package"), "{e}");
    for n in ["ow23-offline", "deb-offline"] {
        assert!(
            !dev(n).join("usr/bin/sidenet-agent").exists()
                && !dev(n).join("usr/local/bin/sidenet-agent").exists()
                && !dev(n).join("etc/sidenet/agent.json").exists(),
            "{n}: the agent was installed although its packages were not"
        );
    }
    // A version the descriptor does not cover: named, with what it covers.
    let e = r1["ow22"]["error"].as_str().unwrap();
    assert!(
        e.contains("templates/openwrt/install.yaml: packages.managers has no rule for version 22.03.7 (it covers 23.05, 24.10, 25.); this host runs OpenWrt 22.03.7"),
        "{e}"
    );
    assert!(router::calls(&dev("ow22")).is_empty());

    // The agents run and the controller sees them, with nothing missing.
    let ids: Vec<String> = ["ow23", "ow25", "deb", "db24", "db25"]
        .iter()
        .map(|n| r1[*n]["nodeId"].as_str().unwrap().to_string())
        .collect();
    wait_for(
        "every provisioned node Ready",
        Duration::from_secs(60),
        || {
            let nodes = ctl.nodes();
            ids.iter()
                .all(|id| {
                    nodes
                        .iter()
                        .any(|n| &n.node == id && n.phase == "Ready" && n.missing.is_empty())
                })
                .then_some(())
        },
        || format!("{:?}\n{}", ctl.nodes(), logs()),
    );
    // The keep list a sysupgrade reads names the agent, its service, config and state.
    let keep =
        std::fs::read_to_string(dev("ow23").join("lib/upgrade/keep.d/sidenet-agent")).unwrap();
    for p in [
        "usr/bin/sidenet-agent",
        "etc/init.d/sidenet-agent",
        "etc/rc.d/S95sidenet-agent",
        "etc/sidenet/agent.json",
        "etc/sidenet-agent/",
        "lib/upgrade/keep.d/sidenet-agent",
    ] {
        assert!(
            keep.lines()
                .any(|l| l == dev("ow23").join(p).display().to_string()
                    || l == format!("{}/{p}", dev("ow23").display())),
            "{p} not in the keep list:\n{keep}"
        );
    }
    assert!(
        !dev("deb").join("lib/upgrade").exists(),
        "Debian has no sysupgrade"
    );

    // ---- Second run: nothing to install, the package managers are not even asked.
    let before: BTreeMap<&str, Vec<String>> =
        names.iter().map(|n| (*n, router::calls(&dev(n)))).collect();
    let (code, r2, text) = provision(&args, t);
    assert_eq!(code, 1, "{text}");
    for n in ["ow23", "ow25", "deb", "db24", "db25"] {
        assert_eq!(r2[n]["result"], "already-provisioned", "{n}\n{text}");
        assert!(strs(&r2[n]["packages"]).is_empty(), "{n}");
        assert_eq!(
            router::calls(&dev(n)),
            before[n],
            "{n}: the package manager was called"
        );
    }
    assert_eq!(
        r2["ow23-offline"]["error"], r1["ow23-offline"]["error"],
        "the same refusal"
    );

    // ---- The offline router gets its package source back: installed then.
    router::set_offline(&dev("ow23-offline"), false);
    let (_, r3, text) = provision(&args, t);
    assert_eq!(r3["ow23-offline"]["result"], "provisioned", "{text}");
    assert_eq!(strs(&r3["ow23-offline"]["packages"]), OPENWRT_MISSING);
    assert!(runs_mesh_wpad(&dev("ow23-offline")));
    drop(servers);
}
