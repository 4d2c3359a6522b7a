//! Radio bring-up on Linux, checked against `iw`'s own syntax: the `linux` backend converges the
//! golden render of a Raspberry Pi dongle node (its `etc/sidenet/radio` and wpa_supplicant
//! config) with recording stand-ins for `iw`, `ip`, `nft` and `wpa_supplicant` (real
//! executables that append their argv to a log; `iw` and `ip` keep the interfaces it created
//! in a folder), then every recorded `iw` command is matched against the command lines that
//! the real `iw help` (Debian package iw) prints. There is no wifi hardware here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use sidenet_agent::backend::{Backend, DataplaneArgs, Runner, SystemRunner};
use sidenet_agent::linux::Linux;
use sidenet_agent::wgkey::WgKey;
use sidenet_wire::messages::{FileSpec, NodeConfig};

const GOLDEN: &str = "../controller/tests/golden/raspberrypi-4b-awus036acm";

/// Runs every program from the fake folder (a stand-in for each one the backend calls).
struct FakePath {
    dir: PathBuf,
    inner: SystemRunner,
}

impl FakePath {
    fn map(&self, argv: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        v[0] = self.dir.join(argv[0]).display().to_string();
        v
    }
}

impl Runner for FakePath {
    fn run(&mut self, argv: &[&str]) -> Result<String, String> {
        let v = self.map(argv);
        self.inner
            .run(&v.iter().map(String::as_str).collect::<Vec<_>>())
    }
    fn spawn(&mut self, argv: &[&str], log: &Path) -> Result<u32, String> {
        let v = self.map(argv);
        self.inner
            .spawn(&v.iter().map(String::as_str).collect::<Vec<_>>(), log)
    }
    fn alive(&mut self, pid: u32, name: &str) -> bool {
        self.inner.alive(pid, name)
    }
    fn stop(&mut self, pid: u32, grace: Duration) -> Result<(), String> {
        self.inner.stop(pid, grace)
    }
}

/// Stand-ins: each appends its name and arguments (tab-separated) to `log`.
fn fakes(dir: &Path, log: &Path) {
    let links = dir.join("links");
    std::fs::create_dir_all(&links).unwrap();
    let record = format!(
        "n=$(basename \"$0\"); {{ printf '%s' \"$n\"; for a in \"$@\"; do printf '\\t%s' \"$a\"; done; echo; }} >> {}",
        log.display()
    );
    let scripts = [
        (
            "iw",
            format!(
                "{record}\ncase \"$1 $3 $4\" in\n\"phy info \") exit 0 ;;\n\"phy interface add\") touch {l}/$5; exit 0 ;;\nesac\ncase \"$1 $3\" in\n\"dev del\") rm -f {l}/$2; exit 0 ;;\n\"dev info\") test -e {l}/$2; exit $? ;;\nesac\nexit 0",
                l = links.display()
            ),
        ),
        (
            "ip",
            format!(
                "{record}\nif [ \"$1 $2\" = \"link show\" ] && [ \"$3\" = dev ]; then test -e {}/$4; exit $?; fi\nexit 0",
                links.display()
            ),
        ),
        ("nft", format!("{record}\nexit 0")),
        // Runs until stopped, like the daemon.
        ("wpa_supplicant", format!("{record}\nexec sleep 600")),
    ];
    for (name, body) in scripts {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn recorded(log: &Path, prog: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect::<Vec<_>>())
        .filter(|v| v[0] == prog)
        .map(|v| v[1..].to_vec())
        .collect()
}

fn config(root: &Path) -> NodeConfig {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    let files: Vec<FileSpec> = ["etc/sidenet/radio", "etc/sidenet/wpa_supplicant-mesh.conf"]
        .iter()
        .map(|p| FileSpec {
            path: p.to_string(),
            mode: 0o600,
            content: std::fs::read_to_string(base.join(p)).unwrap(),
        })
        .collect();
    for f in &files {
        let p = root.join(&f.path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &f.content).unwrap();
    }
    NodeConfig {
        mesh: "riverside".into(),
        node: "goldennode234567".into(),
        hostname: "golden".into(),
        role: "router".into(),
        profile: "raspberrypi-4b-awus036acm".into(),
        family: "linux".into(),
        subnet: "fdfc:b395:f348:1c2d::/64".into(),
        addresses: Vec::new(),
        files,
        actions: vec!["restart:mesh".into()],
        sealed: Default::default(),
        requires: Vec::new(),
    }
}

// ---- `iw help` grammar: `word`, `<placeholder>`, `a|b|c`, `<a|b>`, `[optional ...]`, `<x>*`.

#[derive(Debug, Clone)]
enum Tok {
    Word(Vec<String>),
    Any { name: String, many: bool },
    Opt(Vec<Tok>),
}

fn lex(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut angle = false;
    for c in line.chars() {
        match c {
            '<' => {
                angle = true;
                cur.push(c);
            }
            '>' => {
                angle = false;
                cur.push(c);
            }
            '[' | ']' if !angle => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            }
            c if c.is_whitespace() && !angle => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn parse_seq(toks: &[String], i: &mut usize) -> Vec<Tok> {
    let mut seq = Vec::new();
    while *i < toks.len() {
        let t = &toks[*i];
        *i += 1;
        match t.as_str() {
            "[" => seq.push(Tok::Opt(parse_seq(toks, i))),
            "]" => return seq,
            t if t.starts_with('<') && !t.trim_end_matches('*').ends_with('>') => {
                seq.push(Tok::Word(vec![t.to_string()]))
            }
            t if t.starts_with('<') => {
                let many = t.ends_with('*');
                let inner = t.trim_end_matches('*');
                let inner = &inner[1..inner.len() - 1];
                if inner.contains('|') {
                    seq.push(Tok::Word(inner.split('|').map(str::to_string).collect()));
                } else {
                    seq.push(Tok::Any {
                        name: inner.to_string(),
                        many,
                    });
                }
            }
            t => seq.push(Tok::Word(t.split('|').map(str::to_string).collect())),
        }
    }
    seq
}

/// Whether `args` match the pattern `seq` completely (backtracking over optionals).
fn matches(seq: &[Tok], args: &[String]) -> bool {
    let Some((first, rest)) = seq.split_first() else {
        return args.is_empty();
    };
    match first {
        Tok::Word(alts) => !args.is_empty() && alts.contains(&args[0]) && matches(rest, &args[1..]),
        Tok::Any { name, many } => {
            let numeric = name.contains("freq") || name.contains("mBm");
            let ok = |a: &String| !numeric || a.chars().all(|c| c.is_ascii_digit());
            if *many {
                (0..=args.len()).any(|k| args[..k].iter().all(ok) && matches(rest, &args[k..]))
            } else {
                !args.is_empty() && ok(&args[0]) && matches(rest, &args[1..])
            }
        }
        Tok::Opt(inner) => {
            matches(rest, args) || {
                let mut joined = inner.clone();
                joined.extend(rest.iter().cloned());
                matches(&joined, args)
            }
        }
    }
}

/// The command lines of the real `iw help`, and the interface types it lists.
fn iw_help() -> (Vec<Vec<Tok>>, Vec<String>) {
    let out = std::process::Command::new("iw")
        .arg("help")
        .output()
        .expect("iw (Debian package iw) is needed: scripts/install-peers installs it");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut syntax = Vec::new();
    let mut types = Vec::new();
    for line in text.lines() {
        // Command lines start with one tab; their descriptions with two.
        if let Some(cmd) = line.strip_prefix('\t')
            && !cmd.starts_with('\t')
            && !cmd.trim().is_empty()
        {
            let toks = lex(cmd);
            let mut i = 0;
            syntax.push(parse_seq(&toks, &mut i));
        }
        if let Some(t) = line.trim().strip_prefix("Valid interface types are:") {
            types = t
                .trim()
                .trim_end_matches('.')
                .split(", ")
                .map(str::to_string)
                .collect();
        }
    }
    assert!(syntax.len() > 50, "iw help printed too little: {text}");
    assert!(types.contains(&"mesh".to_string()), "{types:?}");
    (syntax, types)
}

#[test]
fn the_linux_backend_brings_the_mesh_point_up_and_down_with_valid_iw_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, log) = (dir.path().join("bin"), dir.path().join("argv.log"));
    std::fs::create_dir_all(&fake).unwrap();
    fakes(&fake, &log);
    let (root, run) = (dir.path().join("root"), dir.path().join("run"));
    std::fs::create_dir_all(&run).unwrap();
    let key = WgKey::load_or_create(&dir.path().join("wg.key")).unwrap();
    let runner = FakePath {
        dir: fake.clone(),
        inner: SystemRunner::default(),
    };
    let mut lx = Linux::new(
        &root,
        &run,
        key,
        &DataplaneArgs::default(),
        Box::new(runner),
    );
    let cfg = config(&root);
    lx.converge(Some(&cfg)).unwrap();

    let iw = recorded(&log, "iw");
    let wanted: Vec<Vec<String>> = [
        "phy phy1 info",
        "phy phy1 interface add mesh0 type mesh",
        "dev mesh0 set freq 5180 80 5210",
        // The golden node's txPower override: 17 dBm.
        "dev mesh0 set txpower fixed 1700",
    ]
    .iter()
    .map(|l| l.split(' ').map(str::to_string).collect())
    .collect();
    assert_eq!(iw, wanted, "the bring-up sequence");
    // wpa_supplicant runs on the new interface with the rendered SAE config.
    let wpa = recorded(&log, "wpa_supplicant");
    let conf = root.join("etc/sidenet/wpa_supplicant-mesh.conf");
    assert_eq!(
        wpa,
        [vec![
            "-i".to_string(),
            "mesh0".into(),
            "-D".into(),
            "nl80211".into(),
            "-c".into(),
            conf.display().to_string()
        ]]
    );
    let pid: u32 = std::fs::read_to_string(run.join("wpa_supplicant.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    // Rollback to a config without the radio (here: nothing at all) stops wpa_supplicant and
    // removes the interface the agent created.
    lx.converge(None).unwrap();
    let iw_all = recorded(&log, "iw");
    assert_eq!(
        iw_all.last().map(|v| v.join(" ")),
        Some("dev mesh0 del".to_string())
    );
    assert!(!fake.join("links/mesh0").exists());
    let gone = (0..200).any(|_| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
        false
    });
    assert!(gone, "wpa_supplicant {pid} still runs after the teardown");

    // Every iw command the agent ran has the shape `iw help` documents.
    let (syntax, types) = iw_help();
    for cmd in &iw_all {
        assert!(
            syntax.iter().any(|s| matches(s, cmd)),
            "`iw {}` matches no command line of `iw help`",
            cmd.join(" ")
        );
        if let Some(i) = cmd.iter().position(|a| a == "type") {
            assert!(types.contains(&cmd[i + 1]), "interface type {}", cmd[i + 1]);
        }
    }
    // The matcher itself refuses what iw would refuse.
    for bad in [
        "dev mesh0 set freq 5180 80 5210 5290 5300",
        "dev mesh0 set freq 5180 eighty",
        "dev mesh0 set freq high",
        "dev mesh0 set txpower max",
        "phy phy1 interface add mesh0",
        "phy phy1 interface add mesh0 type mesh extra",
    ] {
        let v: Vec<String> = bad.split(' ').map(str::to_string).collect();
        assert!(
            !syntax.iter().any(|s| matches(s, &v)),
            "`iw {bad}` accepted"
        );
    }
}
