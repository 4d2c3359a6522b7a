//! `sidenetctl provision` against a fleet of real OpenSSH servers on loopback, with a running
//! standalone controller: the agents really start (from the bootstrap config the provisioner
//! wrote) and really enrol.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Agents, Auth, Controller, Sshd, agent_pid, alive, bin, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

struct Run {
    code: i32,
    reports: BTreeMap<String, Value>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn provision(args: &[&str], cwd: &Path) -> Run {
    let started = Instant::now();
    let out: Output = Command::new(bin("sidenetctl"))
        .arg("provision")
        .args(args)
        .args(["-o", "json"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let list: Vec<Value> = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        reports: list
            .into_iter()
            .map(|r| (r["name"].as_str().unwrap().to_string(), r))
            .collect(),
        stdout: stdout.into_owned(),
        stderr,
        elapsed,
    }
}

fn s<'a>(r: &'a Value, k: &str) -> &'a str {
    r[k].as_str().unwrap_or("")
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

fn staged_leftovers(root: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                walk(&p, out);
            } else if p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(".sidenet-new."))
            {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out
}

/// Six sshd instances and a stopped one: key auth, password auth, a host that refuses
/// connections, wrong credentials, and a host whose key changes after the first run.
#[test]
fn fleet_provisioning_is_idempotent_and_reports_each_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ctl = Controller::start(&t.join("ctl"), "auto");
    common::test_templates(&t.join("templates"));
    common::dist(
        &t.join("dist"),
        &[
            "mips_24kc",
            "aarch64",
            "arm_cortex-a15_neon-vfpv4",
            "x86_64",
        ],
    );
    std::fs::create_dir_all(t.join("keys")).unwrap();
    common::keygen(&t.join("keys/admin"));
    common::keygen(&t.join("keys/stranger"));
    std::fs::write(t.join("keys/shed.password"), "correct horse\n").unwrap();
    let admin_pub = std::fs::read_to_string(t.join("keys/admin.pub")).unwrap();

    let dev = |n: &str| t.join("devices").join(n);
    // Fake devices: what detection reads comes from each root.
    common::fake_device(
        &dev("kitchen"),
        Some("tplink-archer-c7-v2.json"),
        &["phy0", "phy1"],
    );
    common::fake_device(&dev("attic"), None, &["phy0"]);
    common::fake_device(
        &dev("hallway"),
        Some("glinet-gl-mt3000.json"),
        &["phy0", "phy1"],
    );
    common::fake_device(&dev("shed"), None, &["phy0"]);
    common::fake_device(&dev("garage"), None, &["phy0"]);
    common::fake_device(&dev("cellar"), None, &["phy0"]);
    common::fake_device(&dev("porch"), Some("netgear-r7800.json"), &["phy0", "phy1"]);
    let _agents = Agents(
        [
            "kitchen", "attic", "hallway", "shed", "garage", "cellar", "porch",
        ]
        .iter()
        .map(|n| dev(n))
        .collect(),
    );

    let sshd_dir = t.join("sshd");
    let kitchen = Sshd::start(&sshd_dir, "kitchen", Auth::Key, &admin_pub);
    let attic = Sshd::start(&sshd_dir, "attic", Auth::Key, &admin_pub);
    let hallway = Sshd::start(&sshd_dir, "hallway", Auth::Key, &admin_pub);
    let shed = Sshd::start(&sshd_dir, "shed", Auth::Password("correct horse"), "");
    let mut garage = Sshd::start(&sshd_dir, "garage", Auth::Key, &admin_pub);
    garage.stop();
    let cellar = Sshd::start(&sshd_dir, "cellar", Auth::Key, &admin_pub);
    let mut porch = Sshd::start(&sshd_dir, "porch", Auth::Key, &admin_pub);
    let fleet: Vec<(String, PathBuf)> =
        [&kitchen, &attic, &hallway, &shed, &garage, &cellar, &porch]
            .iter()
            .map(|h| (h.name.clone(), h.dir.clone()))
            .collect();

    let row = |s: &Sshd, extra: &str| {
        format!(
            "  - {{ host: 127.0.0.1, port: {}, name: {}, root: {}{extra} }}\n",
            s.port,
            s.name,
            dev(&s.name).display()
        )
    };
    let inventory = format!(
        "mesh: riverside\nbroker: {}\nparallelism: 4\ndefaults:\n  user: root\n  privateKeyFile: keys/admin\nhosts:\n{}{}{}{}{}{}{}",
        ctl.broker(),
        row(&kitchen, ""),
        row(&attic, ""),
        row(&hallway, ", hardwareProfile: glinet-gl-mt3000"),
        row(&shed, ", passwordFile: keys/shed.password"),
        row(&garage, ""),
        row(&cellar, ", privateKeyFile: keys/stranger"),
        row(&porch, ""),
    );
    std::fs::write(t.join("inventory.yaml"), &inventory).unwrap();
    let repo = common::repo();
    let state = ctl.state();
    let base: Vec<String> = vec![
        "-i".into(),
        t.join("inventory.yaml").display().to_string(),
        "--state".into(),
        state.display().to_string(),
        "--agents".into(),
        t.join("dist").display().to_string(),
        "--templates".into(),
        t.join("templates").display().to_string(),
        "--profiles".into(),
        repo.join("hardware-profiles").display().to_string(),
        "--enrol-timeout".into(),
        "60".into(),
    ];
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = base.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let logs = || {
        let mut s = format!(
            "--- controller\n{}\n",
            common::tail(&ctl.proc.log_text(), 40)
        );
        for (name, dir) in &fleet {
            let log = dev(name).join("var/log/sidenet-agent.log");
            s.push_str(&format!(
                "--- {name} agent\n{}\n--- {name} sshd\n{}\n",
                common::tail(&std::fs::read_to_string(log).unwrap_or_default(), 15),
                common::tail(&common::sshd_log(dir), 8)
            ));
        }
        s
    };

    let host_keys: BTreeMap<String, String> = [&kitchen, &attic, &hallway, &shed, &porch]
        .iter()
        .map(|h| (h.name.clone(), h.host_key_line()))
        .collect();
    let fp = |line: &str| {
        sidenet_provision::knownhosts::HostKey::parse(line)
            .unwrap()
            .fingerprint()
    };

    // ---- First run: trust on first use allowed.
    let a1 = args(&["--accept-new-host-keys"]);
    let r1 = provision(&a1.iter().map(String::as_str).collect::<Vec<_>>(), t);
    let ctx1 = || format!("{:#?}\n{}\n{}", r1.reports, r1.stderr, logs());
    assert_eq!(r1.code, 1, "a failed host makes the run fail\n{}", ctx1());
    let good = ["kitchen", "attic", "hallway", "shed", "porch"];
    let expect = [
        ("kitchen", "tplink,archer-c7-v2", "tplink-archer-c7-v2"),
        ("attic", "debian 12 x86_64", "pcengines-apu2-wle600vx"),
        ("hallway", "glinet,gl-mt3000", "glinet-gl-mt3000"),
        ("shed", "debian 12 x86_64", "pcengines-apu2-wle600vx"),
        ("porch", "netgear,r7800", "netgear-r7800"),
    ];
    for (name, board, profile) in expect {
        let r = &r1.reports[name];
        assert_eq!(s(r, "result"), "provisioned", "{name}\n{}", ctx1());
        assert_eq!(s(r, "board"), board, "{name}");
        assert_eq!(s(r, "profile"), profile, "{name}");
        let changes: Vec<&str> = r["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(
            changes,
            ["agent binary", "bootstrap config", "service", "started"],
            "{name}"
        );
        assert_eq!(
            s(r, "pinnedHostKey"),
            format!("ssh-ed25519 {}", fp(&host_keys[name])),
            "{name}"
        );
        assert!(
            r["phase"].is_string(),
            "{name}: seen by the controller\n{}",
            ctx1()
        );
    }
    let garage_r = &r1.reports["garage"];
    assert_eq!(s(garage_r, "result"), "failed");
    assert_eq!(s(garage_r, "step"), "connect");
    assert!(
        s(garage_r, "error").starts_with(&format!("root@127.0.0.1:{}: connect: ", garage.port))
            && s(garage_r, "error").contains("connection refused"),
        "{}",
        s(garage_r, "error")
    );
    let cellar_r = &r1.reports["cellar"];
    assert_eq!(s(cellar_r, "result"), "failed");
    assert_eq!(s(cellar_r, "step"), "login");
    assert!(
        s(cellar_r, "error").contains("authentication as root with private key")
            && s(cellar_r, "error").contains("keys/stranger failed"),
        "{}",
        s(cellar_r, "error")
    );
    // Nothing was put on the hosts that failed.
    for name in ["garage", "cellar"] {
        assert!(!dev(name).join("usr").exists(), "{name} got files");
    }

    // The agents really run (started by the installed service, from the bootstrap config) and
    // really enrolled: the controller lists exactly these node ids, and each applied its config.
    let ids: BTreeMap<&str, String> = good
        .iter()
        .map(|n| (*n, s(&r1.reports[*n], "nodeId").to_string()))
        .collect();
    wait_for(
        "every provisioned node Ready at the controller",
        WAIT,
        || {
            let nodes = ctl.nodes();
            ids.values()
                .all(|id| nodes.iter().any(|n| &n.node == id && n.phase == "Ready"))
                .then_some(())
        },
        || format!("{:?}\n{}", ctl.nodes(), logs()),
    );
    assert_eq!(ctl.nodes().len(), good.len());
    let mut pids = BTreeMap::new();
    let mut bin_mtimes = BTreeMap::new();
    for name in good {
        let root = dev(name);
        let pid = agent_pid(&root).unwrap_or_else(|| panic!("{name}: no pid file"));
        assert!(alive(pid), "{name}: agent {pid} is not running");
        pids.insert(name, pid);
        let openwrt = ["kitchen", "hallway", "porch"].contains(&name);
        let agent = root.join(if openwrt {
            "usr/bin/sidenet-agent"
        } else {
            "usr/local/bin/sidenet-agent"
        });
        bin_mtimes.insert(name, mtime(&agent));
        assert_eq!(
            std::fs::read(&agent).unwrap(),
            std::fs::read(bin("sidenet-agent")).unwrap()
        );
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(root.join("etc/sidenet/agent.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["mesh"], "riverside");
        assert_eq!(cfg["broker"], ctl.broker());
        assert_eq!(cfg["hostname"], name);
        // The mesh key was pinned at install, not trusted on first use; the join code names it.
        let mesh_key = sidenet_wire::keys::KeyPair::from_file_text(
            &std::fs::read_to_string(state.join("keys/riverside.key")).unwrap(),
        )
        .unwrap()
        .public();
        let mesh_pub = mesh_key.to_base64();
        assert_eq!(cfg["meshKey"], mesh_pub.as_str());
        assert_eq!(
            cfg["joinCode"],
            sidenet_wire::join::JoinCode::new("riverside", &mesh_key)
                .to_string()
                .as_str()
        );
        let state_dir = root.join(if openwrt {
            "etc/sidenet-agent"
        } else {
            "var/lib/sidenet-agent"
        });
        assert_eq!(
            std::fs::read_to_string(state_dir.join("mesh.pub"))
                .unwrap()
                .trim(),
            mesh_pub
        );
        // The controller rendered the family's files for the detected profile.
        let applied = if openwrt {
            "etc/sidenet/uci/wireless"
        } else {
            "etc/sidenet/wpa_supplicant-mesh.conf"
        };
        wait_for(
            &format!("{name} to write {applied}"),
            WAIT,
            || root.join(applied).exists().then_some(()),
            logs,
        );
        // The enable command of the descriptor ran.
        assert!(
            root.join("etc/rc.d/S95sidenet-agent").is_symlink(),
            "{name}"
        );
        assert!(
            staged_leftovers(&root).is_empty(),
            "{name}: {:?}",
            staged_leftovers(&root)
        );
    }
    let known_hosts = std::fs::read_to_string(state.join("known_hosts")).unwrap();
    assert!(known_hosts.contains(&format!(
        "[127.0.0.1]:{} {}",
        porch.port,
        porch.host_key_line()
    )));

    // ---- The porch router's host key changes (reinstalled, or someone in the middle).
    let old_porch_key = porch.host_key_line();
    porch.change_host_key();

    // ---- Second run, no trust on first use: nothing changes on the good hosts, the same
    // failures on the bad ones, and porch is aborted before logging in.
    let a2 = args(&[]);
    let r2 = provision(&a2.iter().map(String::as_str).collect::<Vec<_>>(), t);
    let ctx2 = || format!("{:#?}\n{}\n{}", r2.reports, r2.stderr, logs());
    assert_eq!(r2.code, 1, "{}", ctx2());
    for name in ["kitchen", "attic", "hallway", "shed"] {
        let r = &r2.reports[name];
        assert_eq!(s(r, "result"), "already-provisioned", "{name}\n{}", ctx2());
        assert_eq!(r["changes"].as_array().map(Vec::len), Some(0), "{name}");
        assert_eq!(s(r, "nodeId"), ids[name], "{name}");
        assert_eq!(
            agent_pid(&dev(name)),
            Some(pids[name]),
            "{name}: agent restarted"
        );
        assert!(alive(pids[name]), "{name}");
        let openwrt = ["kitchen", "hallway"].contains(&name);
        let agent = dev(name).join(if openwrt {
            "usr/bin/sidenet-agent"
        } else {
            "usr/local/bin/sidenet-agent"
        });
        assert_eq!(mtime(&agent), bin_mtimes[name], "{name}: binary rewritten");
    }
    for name in ["garage", "cellar"] {
        assert_eq!(s(&r2.reports[name], "result"), "failed", "{name}");
        assert_eq!(
            s(&r2.reports[name], "error"),
            s(&r1.reports[name], "error"),
            "{name}: a different failure the second time"
        );
    }
    let p = &r2.reports["porch"];
    assert_eq!(s(p, "result"), "failed", "{}", ctx2());
    assert_eq!(s(p, "step"), "connect");
    let err = s(p, "error");
    assert!(
        err.contains("HOST KEY CHANGED")
            && err.contains(&fp(&porch.host_key_line()))
            && err.contains(&fp(&old_porch_key)),
        "{err}"
    );
    // Aborted before authentication: porch's sshd saw no login on the new key.
    assert!(
        !porch
            .log_text()
            .split("Server listening")
            .last()
            .unwrap_or("")
            .contains("Accepted publickey")
    );
    assert_eq!(agent_pid(&dev("porch")), Some(pids["porch"]));
    // The pin was not replaced.
    assert_eq!(
        std::fs::read_to_string(state.join("known_hosts")).unwrap(),
        known_hosts
    );
    // ---- What an admin sees: the table and the summary (a third run, same state).
    let out = Command::new(bin("sidenetctl"))
        .arg("provision")
        .args(&a2)
        .current_dir(t)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "HOST", "ADDRESS", "BOARD", "PROFILE", "NODE", "RESULT", "TIME"
        ],
        "{table}"
    );
    let line = |name: &str| {
        *lines
            .iter()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
    };
    assert!(
        line("kitchen").contains("tplink,archer-c7-v2  tplink-archer-c7-v2"),
        "{table}"
    );
    assert!(
        line("kitchen").contains(&format!("{}  already provisioned (Ready)", ids["kitchen"])),
        "{table}"
    );
    assert!(line("garage").contains("failed at connect"), "{table}");
    assert!(line("cellar").contains("failed at login"), "{table}");
    assert!(line("porch").contains("failed at connect"), "{table}");
    assert!(
        table.contains(&format!(
            "porch: root@127.0.0.1:{}: connect: HOST KEY CHANGED",
            porch.port
        )),
        "{table}"
    );
    assert!(
        table.ends_with("7 hosts: 0 provisioned, 4 already provisioned, 3 failed\n"),
        "{table}"
    );
    eprintln!("--- the table\n{table}");
    let durations = |r: &Run| {
        r.reports
            .iter()
            .map(|(n, v)| format!("{n} {}ms", v["durationMs"]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let first: Vec<sidenet_provision::HostReport> = serde_json::from_str(&r1.stdout).unwrap();
    eprintln!(
        "--- first run's progress\n{}\n--- first run's table\n{}{}",
        r1.stderr,
        sidenet_provision::report::table(&first),
        sidenet_provision::report::summary(&first)
    );
    eprintln!("--- second run's progress\n{}", r2.stderr);
    eprintln!(
        "first run {:.1?} ({}), second run {:.1?} ({}); {} hosts, parallelism 4",
        r1.elapsed,
        durations(&r1),
        r2.elapsed,
        durations(&r2),
        fleet.len()
    );
}
