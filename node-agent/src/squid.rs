//! The neighbourhood web cache on a node (`restart:squid`, `etc/sidenet/squid.conf`): the agent
//! runs Squid with sidenet's own config file and nothing else. All the logic (siblings, who may
//! use it, sizes) is in the rendered file; here it is only started, restarted when the file
//! changed, and stopped when a config no longer has it. Used by both backends.
//!
//! Squid runs in the foreground (`-N`) in its own process group, like babeld, with its pid in
//! `STATE/run/squid.pid`: it survives an agent restart, and a restarted agent keeps it when the
//! file did not change. Before a start the agent makes the folder the file names
//! (`coredump_dir`, which holds the cache, its log and pid file) and gives it to the user
//! Squid runs as (`cache_effective_user`), checks the file (`squid -k parse`) and creates the
//! cache's folders (`squid -z`).

use std::path::Path;
use std::time::Duration;

use crate::backend::{Runner, poll_until, read_pid};

/// The rendered config, under the agent's root.
pub const CONF: &str = "etc/sidenet/squid.conf";
/// The action that (re)starts it.
pub const ACTION: &str = "restart:squid";

/// The folder (`coredump_dir`) and user (`cache_effective_user`) a rendered config names.
pub fn folder_and_user(text: &str) -> Result<(String, String), String> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(key)).then(|| w.next().unwrap_or_default().to_string())
        })
    };
    let dir = value("coredump_dir").filter(|d| d.starts_with('/') && !d.contains(".."));
    let user = value("cache_effective_user").filter(|u| {
        !u.is_empty()
            && u.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    });
    match (dir, user) {
        (Some(d), Some(u)) => Ok((d, u)),
        _ => Err(format!(
            "{CONF} names no absolute coredump_dir or no cache_effective_user"
        )),
    }
}

/// Makes Squid run with the installed `etc/sidenet/squid.conf` when `wanted`, else stops it.
pub fn converge(
    runner: &mut dyn Runner,
    root: &Path,
    run: &Path,
    wanted: bool,
) -> Result<(), String> {
    let pidfile = run.join("squid.pid");
    let snapshot = run.join("squid.conf.running");
    if !wanted {
        stop(runner, run);
        return Ok(());
    }
    let conf = root.join(CONF);
    let text = std::fs::read_to_string(&conf)
        .map_err(|e| format!("cannot read {}: {e}", conf.display()))?;
    let running = read_pid(&pidfile).filter(|p| runner.alive(*p, "squid"));
    if running.is_some() && std::fs::read_to_string(&snapshot).ok().as_deref() == Some(&text) {
        return Ok(());
    }
    stop(runner, run);
    let (dir, user) = folder_and_user(&text)?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    runner.run(&["chown", &user, &dir])?;
    let conf_s = conf.to_string_lossy();
    runner.run(&["squid", "-k", "parse", "-f", &conf_s])?;
    runner.run(&["squid", "-N", "-z", "-f", &conf_s])?;
    // Squid writes its own pid file once it runs: the sign it started.
    let own_pid = Path::new(&dir).join("squid.pid");
    let _ = std::fs::remove_file(&own_pid);
    let log = run.join("squid.log");
    let pid = runner.spawn(&["squid", "-N", "-f", &conf_s], &log)?;
    crate::files::write_atomic(&pidfile, pid.to_string().as_bytes(), 0o644)
        .map_err(|e| e.to_string())?;
    let started = poll_until(Duration::from_secs(10), || {
        own_pid.exists() || !runner.alive(pid, "squid")
    });
    if !started || !runner.alive(pid, "squid") {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let cache_log =
            std::fs::read_to_string(Path::new(&dir).join("cache.log")).unwrap_or_default();
        let tail: Vec<&str> = said
            .lines()
            .chain(cache_log.lines())
            .rev()
            .take(5)
            .collect();
        stop(runner, run);
        return Err(format!(
            "squid did not start: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    crate::files::write_atomic(&snapshot, text.as_bytes(), 0o644).map_err(|e| e.to_string())
}

/// Stops the Squid this agent started, if it runs.
pub fn stop(runner: &mut dyn Runner, run: &Path) {
    let pidfile = run.join("squid.pid");
    if let Some(pid) = read_pid(&pidfile).filter(|p| runner.alive(*p, "squid"))
        && let Err(e) = runner.stop(pid, Duration::from_secs(5))
    {
        tracing::warn!("stopping squid: {e}");
    }
    let _ = std::fs::remove_file(&pidfile);
    let _ = std::fs::remove_file(run.join("squid.conf.running"));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_folder_and_user_come_from_the_file() {
        let text = "http_port [fd00::1]:3128\ncache_effective_user proxy\ncoredump_dir /var/spool/sidenet-squid\n";
        assert_eq!(
            folder_and_user(text).unwrap(),
            ("/var/spool/sidenet-squid".to_string(), "proxy".to_string())
        );
        assert!(folder_and_user("coredump_dir relative\ncache_effective_user proxy\n").is_err());
        assert!(folder_and_user("coredump_dir /x\ncache_effective_user a;b\n").is_err());
        assert!(folder_and_user("cache_effective_user proxy\n").is_err());
    }
}
