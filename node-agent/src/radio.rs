//! Radio bring-up on Linux: the 802.11s interface on the profile's phy, from
//! `etc/sidenet/radio` (action `restart:mesh`, before wpa_supplicant starts on it).
//!
//! # `etc/sidenet/radio`
//!
//! UTF-8 text, one statement per line; empty lines and lines starting with `#` are comments:
//!
//! | line | meaning |
//! | --- | --- |
//! | `phy PHY` | the wiphy of the profile's mesh radio (`phy1`, as `iw phy` names it) |
//! | `iface IFACE` | the mesh point to create on it (`mesh0`) |
//! | `iface-next IFACE` | during a passphrase rotation's overlap, a second mesh point (`mesh1`) |
//! | `freq CONTROL WIDTH [CENTER1]` | control frequency and width in MHz (20, 40, 80, 160), and the block's centre frequency (not for 20) |
//! | `txpower auto` or `txpower fixed MBM` | transmit power (mBm: dBm × 100) |
//!
//! A file without a `phy` line leaves the radio alone (a profile that names no phy).
//!
//! # What the agent runs
//!
//! `iw phy PHY info` tells whether the radio is on this host; when it is not (a host without
//! wifi, the network-namespace testbed), nothing below happens and the side-net runs over the
//! other `--underlay` interfaces. Otherwise, whenever the file changed since it was last
//! applied (or an interface had to be created):
//!
//! 1. wpa_supplicant is stopped on the mesh points (it holds the channel while joined);
//! 2. `iw phy PHY interface add IFACE type mesh` (802.11s mesh point; `iw help` lists the type as
//!    `mesh`, `mp` is its alias) for each mesh point that does not exist yet
//!    (remembered in `STATE/run/radio.json` as created by the agent);
//! 3. `iw dev IFACE set freq CONTROL WIDTH [CENTER1]` and `iw dev IFACE set txpower …` on each;
//! 4. then [`crate::linux`] starts wpa_supplicant on each (SAE, `wpa_supplicant-mesh.conf`).
//!
//! Going back to a config without the radio (or `None`: rollback to nothing, uninstall) runs
//! `iw dev IFACE del` for the interfaces the agent created, after wpa_supplicant stopped.
//! Rollback is the same converge with the last good config's file.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, Runner, read_pid};
use crate::files::write_atomic;

/// The rendered file.
pub const FILE: &str = "etc/sidenet/radio";
/// wpa_supplicant's pid files (under `STATE/run`) of the two mesh points, as [`crate::linux`]
/// names them, and their snapshots of the config they run with.
const WPA: [&str; 2] = ["wpa_supplicant", "wpa_supplicant-next"];

/// `txpower`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxPower {
    /// Let the driver decide.
    Auto,
    /// Fixed, in mBm.
    Fixed(u32),
}

/// `etc/sidenet/radio`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadioFile {
    /// The wiphy.
    pub phy: String,
    /// Mesh points to create, `iface` first.
    pub ifaces: Vec<String>,
    /// Control frequency, MHz.
    pub freq: u32,
    /// Width, MHz.
    pub width: u32,
    /// Centre frequency of the block, MHz (none for 20 MHz).
    pub center: Option<u32>,
    /// Transmit power.
    pub txpower: TxPower,
}

fn name_ok(w: &str) -> bool {
    !w.is_empty()
        && w.len() <= 15
        && !w.starts_with('-')
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Parses `etc/sidenet/radio`; `None` when it names no phy.
pub fn parse(text: &str) -> Result<Option<RadioFile>, String> {
    let (mut phy, mut iface, mut next, mut freq, mut tx) = (None, None, None, None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| format!("{FILE} line {}: {what}: {line:?}", n + 1);
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| s.parse::<u32>().map_err(|_| bad("expected a number"));
        match w.as_slice() {
            ["phy", p] if name_ok(p) => phy = Some(p.to_string()),
            ["iface", i] if name_ok(i) => iface = Some(i.to_string()),
            ["iface-next", i] if name_ok(i) => next = Some(i.to_string()),
            ["freq", f, wd] => freq = Some((num(f)?, num(wd)?, None)),
            ["freq", f, wd, c] => freq = Some((num(f)?, num(wd)?, Some(num(c)?))),
            ["txpower", "auto"] => tx = Some(TxPower::Auto),
            ["txpower", "fixed", m] => tx = Some(TxPower::Fixed(num(m)?)),
            _ => return Err(bad("cannot read")),
        }
    }
    let Some(phy) = phy else { return Ok(None) };
    let missing = |what: &str| format!("{FILE}: phy {phy} is given but no {what} line");
    let iface = iface.ok_or_else(|| missing("iface"))?;
    let (freq, width, center) = freq.ok_or_else(|| missing("freq"))?;
    if ![20, 40, 80, 160].contains(&width) || (width > 20 && center.is_none()) {
        return Err(format!(
            "{FILE}: width {width} MHz needs to be 20, 40, 80 or 160 (with a centre frequency above 20)"
        ));
    }
    Ok(Some(RadioFile {
        phy,
        ifaces: std::iter::once(iface).chain(next).collect(),
        freq,
        width,
        center: center.filter(|_| width > 20),
        txpower: tx.unwrap_or(TxPower::Auto),
    }))
}

/// What the agent did to the radio, kept in `STATE/run/radio.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Applied {
    /// Interfaces the agent created (and deletes when the radio goes away).
    created: Vec<String>,
    /// The file as last applied.
    text: String,
}

fn state_path(run: &Path) -> std::path::PathBuf {
    run.join("radio.json")
}

fn load(run: &Path) -> Applied {
    std::fs::read(state_path(run))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save(run: &Path, a: &Applied) -> Result<(), BackendError> {
    write_atomic(
        &state_path(run),
        &serde_json::to_vec(a).unwrap_or_default(),
        0o600,
    )
    .map_err(|e| BackendError(e.to_string()))
}

/// Stops wpa_supplicant on the mesh points and forgets what it ran with (so it starts again).
fn stop_wpa(runner: &mut dyn Runner, run: &Path) {
    for name in WPA {
        let pidfile = run.join(format!("{name}.pid"));
        if let Some(pid) = read_pid(&pidfile).filter(|p| runner.alive(*p, "wpa_supplicant"))
            && let Err(e) = runner.stop(pid, Duration::from_secs(3))
        {
            tracing::warn!("stopping {name}: {e}");
        }
        let _ = std::fs::remove_file(pidfile);
        let _ = std::fs::remove_file(run.join(format!("{name}.conf.running")));
    }
}

/// Whether the radio is managed here after [`converge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Managed {
    /// The mesh points of the file exist and are tuned: run wpa_supplicant on them.
    Yes(Vec<String>),
    /// No radio file, no phy in it, or the phy is not on this host.
    No(String),
}

/// Brings the radio in line with the installed `etc/sidenet/radio` (see the module docs).
pub fn converge(runner: &mut dyn Runner, root: &Path, run: &Path) -> Result<Managed, BackendError> {
    let text = std::fs::read_to_string(root.join(FILE)).unwrap_or_default();
    let file = parse(&text).map_err(BackendError)?;
    let mut applied = load(run);
    let Some(file) = file else {
        down(runner, run);
        return Ok(Managed::No(format!("{FILE} names no radio")));
    };
    if runner.run(&["iw", "phy", &file.phy, "info"]).is_err() {
        down(runner, run);
        return Ok(Managed::No(format!(
            "there is no wifi radio {} here",
            file.phy
        )));
    }
    // Interfaces created before that this file no longer wants.
    let stale: Vec<String> = applied
        .created
        .iter()
        .filter(|i| !file.ifaces.contains(i))
        .cloned()
        .collect();
    let missing: Vec<String> = file
        .ifaces
        .iter()
        .filter(|i| runner.run(&["ip", "link", "show", "dev", i]).is_err())
        .cloned()
        .collect();
    if applied.text == text && missing.is_empty() && stale.is_empty() {
        return Ok(Managed::Yes(file.ifaces));
    }
    stop_wpa(runner, run);
    for i in &stale {
        let _ = runner.run(&["iw", "dev", i, "del"]);
        applied.created.retain(|c| c != i);
    }
    for i in &missing {
        runner
            .run(&[
                "iw",
                "phy",
                &file.phy,
                "interface",
                "add",
                i,
                "type",
                "mesh",
            ])
            .map_err(BackendError)?;
        applied.created.push(i.clone());
        // Remembered at once: a failure below must not leak the interface.
        save(run, &applied)?;
    }
    let (freq, width) = (file.freq.to_string(), file.width.to_string());
    let center = file.center.map(|c| c.to_string());
    let power = match &file.txpower {
        TxPower::Auto => vec!["auto".to_string()],
        TxPower::Fixed(m) => vec!["fixed".to_string(), m.to_string()],
    };
    for i in &file.ifaces {
        let mut set_freq = vec!["iw", "dev", i, "set", "freq", &freq, &width];
        if let Some(c) = &center {
            set_freq.push(c);
        }
        runner.run(&set_freq).map_err(BackendError)?;
        let mut set_tx = vec!["iw", "dev", i.as_str(), "set", "txpower"];
        set_tx.extend(power.iter().map(String::as_str));
        runner.run(&set_tx).map_err(BackendError)?;
    }
    applied.text = text;
    save(run, &applied)?;
    Ok(Managed::Yes(file.ifaces))
}

/// Stops wpa_supplicant and deletes the mesh points the agent created.
pub fn down(runner: &mut dyn Runner, run: &Path) {
    let applied = load(run);
    if applied == Applied::default() {
        return;
    }
    stop_wpa(runner, run);
    for i in &applied.created {
        if let Err(e) = runner.run(&["iw", "dev", i, "del"]) {
            tracing::warn!("removing the mesh point {i}: {e}");
        }
    }
    let _ = std::fs::remove_file(state_path(run));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::Recorder;

    const FILE_80: &str = "phy phy1\niface mesh0\nfreq 5180 80 5210\ntxpower fixed 2000\n";

    #[test]
    fn parses_the_file_and_refuses_what_would_reach_a_command_line() {
        let f = parse(FILE_80).unwrap().unwrap();
        assert_eq!(f.phy, "phy1");
        assert_eq!(f.ifaces, ["mesh0"]);
        assert_eq!((f.freq, f.width, f.center), (5180, 80, Some(5210)));
        assert_eq!(f.txpower, TxPower::Fixed(2000));
        assert_eq!(parse("# no phy\n").unwrap(), None);
        let f = parse("phy phy0\niface mesh0\niface-next mesh1\nfreq 2412 20\ntxpower auto\n")
            .unwrap()
            .unwrap();
        assert_eq!(f.ifaces, ["mesh0", "mesh1"]);
        assert_eq!(f.center, None);
        for bad in [
            "phy phy1\nfreq 5180 80 5210\n",
            "phy phy1\niface mesh0\n",
            "phy phy1\niface mesh0\nfreq 5180 80\n",
            "phy phy1\niface mesh0\nfreq 5180 30 5190\n",
            "phy -x\niface mesh0\nfreq 5180 20\n",
            "phy phy1\niface mesh0;reboot\nfreq 5180 20\n",
            "phy phy1\niface mesh0\nfreq 5180 20\ntxpower fixed high\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn creates_tunes_retunes_and_removes_the_mesh_point() {
        let dir = tempfile::tempdir().unwrap();
        let (root, run) = (dir.path().join("root"), dir.path().join("run"));
        std::fs::create_dir_all(root.join("etc/sidenet")).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(root.join(FILE), FILE_80).unwrap();
        let rec = Recorder::new();
        let mut r: Box<dyn Runner> = Box::new(rec.clone());
        rec.answer(
            "ip link show dev mesh0",
            Err("Device \"mesh0\" does not exist."),
        );
        let m = converge(r.as_mut(), &root, &run).unwrap();
        assert_eq!(m, Managed::Yes(vec!["mesh0".into()]));
        assert_eq!(
            rec.commands(),
            [
                "iw phy phy1 info",
                "ip link show dev mesh0",
                "iw phy phy1 interface add mesh0 type mesh",
                "iw dev mesh0 set freq 5180 80 5210",
                "iw dev mesh0 set txpower fixed 2000",
            ]
        );
        // Unchanged: nothing is touched.
        rec.answer("ip link show dev mesh0", Ok("5: mesh0: <BROADCAST>"));
        rec.clear();
        converge(r.as_mut(), &root, &run).unwrap();
        assert_eq!(
            rec.commands(),
            ["iw phy phy1 info", "ip link show dev mesh0"]
        );
        // A new channel (or a rollback to the old one): wpa_supplicant stops, the radio is
        // retuned; the interface exists and is kept.
        let pid = r
            .spawn(&["wpa_supplicant", "-i", "mesh0"], &run.join("x.log"))
            .unwrap();
        std::fs::write(run.join("wpa_supplicant.pid"), pid.to_string()).unwrap();
        std::fs::write(
            root.join(FILE),
            "phy phy1\niface mesh0\nfreq 5500 40 5510\ntxpower auto\n",
        )
        .unwrap();
        rec.clear();
        converge(r.as_mut(), &root, &run).unwrap();
        assert_eq!(
            rec.commands(),
            [
                "iw phy phy1 info",
                "ip link show dev mesh0",
                &format!("stop {pid}"),
                "iw dev mesh0 set freq 5500 40 5510",
                "iw dev mesh0 set txpower auto",
            ]
        );
        assert!(!run.join("wpa_supplicant.pid").exists());
        // Torn down: the interface the agent created goes.
        rec.clear();
        down(r.as_mut(), &run);
        assert_eq!(rec.commands(), ["iw dev mesh0 del"]);
        assert!(!run.join("radio.json").exists());
    }

    #[test]
    fn leaves_a_host_without_the_phy_alone_and_never_deletes_what_it_did_not_create() {
        let dir = tempfile::tempdir().unwrap();
        let (root, run) = (dir.path().join("root"), dir.path().join("run"));
        std::fs::create_dir_all(root.join("etc/sidenet")).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(root.join(FILE), FILE_80).unwrap();
        let rec = Recorder::new();
        let mut r: Box<dyn Runner> = Box::new(rec.clone());
        rec.answer(
            "iw phy phy1 info",
            Err("command failed: No such file or directory (-2)"),
        );
        let m = converge(r.as_mut(), &root, &run).unwrap();
        assert!(
            matches!(m, Managed::No(ref why) if why.contains("no wifi radio phy1")),
            "{m:?}"
        );
        assert_eq!(rec.commands(), ["iw phy phy1 info"]);
        // mesh0 made by the admin: tuned, but never deleted.
        rec.answer("iw phy phy1 info", Ok("Wiphy phy1"));
        rec.clear();
        converge(r.as_mut(), &root, &run).unwrap();
        assert!(!rec.commands().iter().any(|c| c.contains("interface add")));
        rec.clear();
        down(r.as_mut(), &run);
        assert!(
            !rec.commands().iter().any(|c| c.contains(" del")),
            "{:?}",
            rec.commands()
        );
    }
}
