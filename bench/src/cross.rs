//! The agents for the routers' own CPUs, as `scripts/build-agents` builds them: the size of each
//! architecture's binary (plain and TLS), and the idle RSS of the big-endian MIPS agent under
//! qemu-user against an embedded-broker controller.
//!
//! Under qemu-user the guest's memory lives in one 4 GiB window of the qemu process (placed at
//! [`GUEST_BASE`] with `-B`); the RSS of the mappings inside it is what the agent itself holds
//! (its binary's touched pages, heap, stacks), apart from qemu's own translator and buffers,
//! which are reported separately. It is an upper bound for a real router: qemu's loader makes
//! most of the binary's text resident, where a router's kernel pages in only what runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The architecture of most 16 MB-flash routers (big-endian MIPS32, 24Kc), whose figures the
/// targets apply to.
pub const MIPS: &str = "mips_24kc";
/// Where qemu-user puts the guest's address space (`-B`), inside the host process.
pub const GUEST_BASE: u64 = 0x40_0000_0000;
/// A 32-bit guest's address space.
const GUEST_SIZE: u64 = 1 << 32;

/// The command that builds the binaries measured here, into [`default_dir`].
pub const BUILD_COMMAND: &str = "scripts/build-agents --out target/agents/dist";

/// Sizes of `DIR/ARCH/sidenet-agent` (plain) and `DIR/tls/ARCH/sidenet-agent`, by architecture.
pub fn sizes(dir: &Path) -> anyhow::Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
    let read = |dir: &Path| -> anyhow::Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        let entries = std::fs::read_dir(dir).with_context(|| {
            format!("{}: build the agents with `{BUILD_COMMAND}`", dir.display())
        })?;
        for e in entries {
            let e = e?;
            let bin = e.path().join("sidenet-agent");
            if bin.is_file() {
                out.insert(
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::metadata(&bin)?.len(),
                );
            }
        }
        Ok(out)
    };
    let plain = read(dir)?;
    let tls = if dir.join("tls").is_dir() {
        read(&dir.join("tls"))?
    } else {
        BTreeMap::new()
    };
    Ok((plain, tls))
}

/// The qemu-user command that runs the MIPS agent with the guest at [`GUEST_BASE`].
pub fn mips_command(agent: &Path) -> Command {
    let mut c = Command::new("qemu-mips-static");
    c.arg("-B").arg(format!("{GUEST_BASE:#x}")).arg(agent);
    c
}

/// (guest RSS, whole qemu process RSS) of a qemu-user process started by [`mips_command`].
pub fn guest_rss_bytes(pid: u32) -> anyhow::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut guest, mut total) = (0u64, 0u64);
    let mut inside = false;
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Rss:") {
            let kb: u64 = kb
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .context("smaps: bad Rss line")?;
            total += kb * 1024;
            if inside {
                guest += kb * 1024;
            }
        } else if let Some((range, _)) = line.split_once(' ')
            && let Some((a, b)) = range.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            inside = a >= GUEST_BASE && b <= GUEST_BASE + GUEST_SIZE;
        }
    }
    if guest == 0 {
        bail!("no guest mappings at {GUEST_BASE:#x} in process {pid}: was it started with -B?");
    }
    Ok((guest, total))
}

/// Every figure: sizes by architecture and the MIPS agent's idle RSS.
pub async fn measure(repo: &Path, dir: &Path) -> anyhow::Result<BTreeMap<&'static str, Value>> {
    let (plain, tls) = sizes(dir)?;
    let mips = dir.join(MIPS).join("sidenet-agent");
    if !mips.is_file() {
        bail!(
            "{} is missing: build it with `{BUILD_COMMAND} {MIPS}`",
            mips.display()
        );
    }
    let (guest, process) =
        crate::agent_footprint_with(repo, mips_command(&mips), "tplink-archer-c7-v2", |pid| {
            guest_rss_bytes(pid)
        })
        .await?;
    let mut r = BTreeMap::new();
    r.insert("agent_binary_bytes_mips", json!(plain.get(MIPS)));
    r.insert("agent_tls_binary_bytes_mips", json!(tls.get(MIPS)));
    r.insert("agent_idle_rss_bytes_mips", json!(guest));
    r.insert("agent_idle_rss_qemu_process_bytes_mips", json!(process));
    r.insert("agent_binary_bytes_by_arch", json!(plain));
    r.insert("agent_tls_binary_bytes_by_arch", json!(tls));
    r.insert("agents_measured_at", json!(crate::today()));
    let shown = dir.strip_prefix(repo).unwrap_or(dir);
    r.insert(
        "agents_command",
        json!(format!("sidenet-bench agents --dir {}", shown.display())),
    );
    Ok(r)
}

/// Merges `figures` into `OUT/benchmarks.json` and rewrites the agents' table in
/// `OUT/benchmarks.md` (between its markers), leaving every other figure as it was.
pub fn update(out_dir: &Path, figures: &BTreeMap<&'static str, Value>) -> anyhow::Result<()> {
    let json_path = out_dir.join("benchmarks.json");
    let mut all: BTreeMap<String, Value> = match std::fs::read_to_string(&json_path) {
        Ok(t) => serde_json::from_str(&t).with_context(|| json_path.display().to_string())?,
        Err(_) => BTreeMap::new(),
    };
    for (k, v) in figures {
        all.insert(k.to_string(), v.clone());
    }
    std::fs::write(
        &json_path,
        format!("{}\n", serde_json::to_string_pretty(&all)?),
    )?;
    let md_path = out_dir.join("benchmarks.md");
    let existing = std::fs::read_to_string(&md_path).unwrap_or_default();
    let table = markdown(figures);
    let (begin, end) = ("<!-- agents:begin -->", "<!-- agents:end -->");
    let text = match (existing.find(begin), existing.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{begin}\n{table}{}", &existing[..b], &existing[e..])
        }
        _ => format!("{existing}\n## The agent on the routers' CPUs\n\n{begin}\n{table}{end}\n"),
    };
    std::fs::write(&md_path, text)?;
    Ok(())
}

fn markdown(f: &BTreeMap<&'static str, Value>) -> String {
    let bytes = |v: Option<&Value>| v.and_then(Value::as_f64);
    let mib = |v: Option<&Value>| {
        bytes(v).map_or("not built".to_string(), |b| {
            format!("{:.2} MiB ({b} bytes)", b / 1_048_576.0)
        })
    };
    // Met, missed, or not measured.
    let ok = |k: &str, limit: f64| match bytes(f.get(k)) {
        Some(b) if b <= limit => "met",
        Some(_) => "**missed**",
        None => "—",
    };
    let by = |k: &str| {
        f.get(k)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let (plain, tls) = (
        by("agent_binary_bytes_by_arch"),
        by("agent_tls_binary_bytes_by_arch"),
    );
    let mut md = format!(
        "Measured on {} with `{}` (`bench/run` runs it on what `{BUILD_COMMAND}` builds): static \
musl executables, size profile, `panic=immediate-abort`, stripped. Sizes are file sizes; \
1 MiB = 1,048,576 bytes, the unit of the project's 1.5 MB and 4 MB targets as `bench/run` checks them.\n\n\
| Architecture | Plain | With `tls` |\n|---|---|---|\n",
        f.get("agents_measured_at")
            .and_then(Value::as_str)
            .unwrap_or("?"),
        f.get("agents_command")
            .and_then(Value::as_str)
            .unwrap_or("sidenet-bench agents"),
    );
    let arches: std::collections::BTreeSet<&String> = plain.keys().chain(tls.keys()).collect();
    for a in arches {
        md.push_str(&format!(
            "| `{a}` | {} | {} |\n",
            mib(plain.get(a)),
            mib(tls.get(a))
        ));
    }
    let mb = 1_048_576.0;
    md.push_str(&format!(
        "\n| MIPS (`{MIPS}`) | Result | Target | |\n|---|---|---|---|\n\
| Agent binary, plain | {} | ≤ 1.5 MiB | {} |\n\
| Agent binary with `tls` | {} | ≤ 1.5 MiB | {} |\n\
| Agent idle RSS under `qemu-mips-static` (the guest's own memory) | {} | ≤ 4 MiB | {} |\n\
| The qemu-user process around it (emulator included; not a router figure) | {} | — | — |\n",
        mib(f.get("agent_binary_bytes_mips")),
        ok("agent_binary_bytes_mips", 1.5 * mb),
        mib(f.get("agent_tls_binary_bytes_mips")),
        ok("agent_tls_binary_bytes_mips", 1.5 * mb),
        mib(f.get("agent_idle_rss_bytes_mips")),
        ok("agent_idle_rss_bytes_mips", 4.0 * mb),
        mib(f.get("agent_idle_rss_qemu_process_bytes_mips")),
    ));
    md
}

/// The default folder of the cross-built agents.
pub fn default_dir(repo: &Path) -> PathBuf {
    repo.join("target/agents/dist")
}
