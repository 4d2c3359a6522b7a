//! A host's SSH session, shared by provisioning ([`crate::host`]) and removal
//! ([`crate::remove`]): log in, detect the board and resolve the family's descriptor
//! ([`Run::open`]), read what is installed ([`inspect_script`]), install the packages the
//! configs need ([`Run::packages`]), stage files, and wait until the controller sees the node
//! online with the installed agent ([`Run::wait_online`]).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sidenet_crds::HardwareProfile;
use sidenet_wire::codec::sha256_hex;

use crate::context::{Context, HostError, HostReport, NodeSeen, Outcome, Step};
use crate::detect::{self, Facts};
use crate::install::{InstallSpec, Layout, shell_quote};
use crate::knownhosts::HostKey;
use crate::packages::{self, PackagesSpec};
use crate::plan::Target;
use crate::ssh::{self, Conn, Endpoint, KeyOutcome};

/// What the host has installed.
#[derive(Debug, Default)]
pub(crate) struct Installed {
    pub(crate) agent_sha: Option<String>,
    pub(crate) service_sha: Option<String>,
    pub(crate) keep_sha: Option<String>,
    /// `X.Y.Z` from the installed agent's `--version`.
    pub(crate) version: Option<String>,
    /// The installed agent's `--help` offers `--uninstall`.
    pub(crate) uninstall: bool,
    pub(crate) config: Option<String>,
    pub(crate) running: bool,
    pub(crate) node_id: Option<String>,
    pub(crate) stale: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ShowId {
    node: String,
}

pub(crate) fn sha_or_none(s: Option<&String>) -> Option<String> {
    s.map(|v| v.trim().to_string())
        .filter(|v| v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit()))
}

impl Installed {
    pub(crate) fn parse(out: &str) -> Self {
        let s = detect::sections(out);
        Self {
            agent_sha: sha_or_none(s.get("agent")),
            service_sha: sha_or_none(s.get("service")),
            keep_sha: sha_or_none(s.get("keep")),
            version: s.get("version").and_then(|v| parse_version(v)),
            uninstall: s.get("help").is_some_and(|h| h.contains("--uninstall")),
            config: s.get("config").filter(|c| !c.trim().is_empty()).cloned(),
            running: s.get("running").is_some_and(|r| r.trim() == "yes"),
            node_id: s.get("id").and_then(|t| parse_show_id(t)),
            stale: s
                .get("stale")
                .map(|t| t.lines().map(str::to_string).collect())
                .unwrap_or_default(),
        }
    }
}

/// `0.1.0` from `sidenet-agent 0.1.0 (no tls)`.
pub(crate) fn parse_version(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("sidenet-agent ")?;
        let v = rest.split_whitespace().next()?;
        (!v.is_empty()).then(|| v.to_string())
    })
}

pub(crate) fn parse_show_id(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| serde_json::from_str::<ShowId>(l.trim()).ok())
        .map(|s| s.node)
        .filter(|n| sidenet_wire::names::check_node_id(n).is_ok())
}

/// The staging name of a destination: `.NAME.sidenet-new.RUN` in the same folder, so the
/// rename is atomic and nothing scanning the folder (init.d, systemd) picks it up.
pub(crate) fn staging_path(dest: &str, run: &str) -> String {
    let (dir, base) = dest.rsplit_once('/').unwrap_or(("", dest));
    format!("{dir}/.{base}.sidenet-new.{run}")
}

pub(crate) fn parent(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some(("", _)) => "/",
        Some((d, _)) => d,
        None => ".",
    }
}

pub(crate) fn inspect_script(l: &Layout) -> String {
    let q = shell_quote;
    let keep = l.keep.as_ref().map(|k| k.0.clone());
    let stale: Vec<String> = [
        Some(&l.agent),
        Some(&l.config),
        Some(&l.service),
        keep.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|d| {
        let p = staging_path(d, "");
        // Quote everything but the trailing glob.
        format!("{}*", q(&p))
    })
    .collect();
    format!(
        "h() {{ if [ -f \"$1\" ]; then sha256sum \"$1\" 2>/dev/null | cut -d' ' -f1; fi; }}\n\
         echo @@agent; h {agent}\n\
         echo @@service; h {service}\n\
         echo @@keep; {keep}\n\
         echo @@config; cat {config} 2>/dev/null\n\
         echo\n\
         echo @@running; if ({running}) </dev/null >/dev/null 2>&1; then echo yes; else echo no; fi\n\
         echo @@id; if [ -x {agent} ] && [ -f {config} ]; then {agent} --config {config} --show-id 2>/dev/null </dev/null; fi\n\
         echo @@version; if [ -x {agent} ]; then {agent} --version 2>/dev/null </dev/null; fi\n\
         echo @@help; if [ -x {agent} ]; then {agent} --help 2>/dev/null </dev/null | grep -e --uninstall; fi\n\
         echo @@stale; for f in {stale}; do if [ -e \"$f\" ]; then rm -f \"$f\" && echo \"$f\"; fi; done\n\
         echo @@end\n",
        agent = q(&l.agent),
        service = q(&l.service),
        keep = keep
            .as_deref()
            .map(|k| format!("h {}", q(k)))
            .unwrap_or_else(|| ":".into()),
        config = q(&l.config),
        running = l.running,
        stale = stale.join(" "),
    )
}

pub(crate) fn stage_script(tmp: &str, sha: &str, mode: u32) -> String {
    let t = shell_quote(tmp);
    let d = shell_quote(parent(tmp));
    format!(
        "trap '' PIPE HUP\n\
         command -v sha256sum >/dev/null 2>&1 || {{ echo 'sha256sum is not installed on the host' >&2; exit 13; }}\n\
         mkdir -p {d} || exit 10\n\
         rm -f {t}\n\
         (umask 077; cat > {t}) || {{ rm -f {t}; echo 'cannot write {tmp}' >&2; exit 11; }}\n\
         s=$(sha256sum {t} 2>/dev/null | cut -d' ' -f1)\n\
         if [ \"$s\" != {sha} ]; then n=$(wc -c < {t} 2>/dev/null); rm -f {t}; echo \"checksum mismatch after upload: expected {sha}, got ${{s:-nothing}} (${{n:-0}} bytes)\" >&2; exit 12; fi\n\
         chmod {mode:o} {t}\n",
    )
}

pub(crate) struct Run<'a> {
    pub(crate) t: &'a Target,
    pub(crate) ctx: &'a Context,
    pub(crate) progress: &'a dyn Fn(Step, &str),
    pub(crate) rep: HostReport,
    pub(crate) conn: Option<Conn>,
    pub(crate) staged: Vec<String>,
}

/// A host logged in to, with its board detected and its family's descriptor resolved.
pub(crate) struct Opened<'a> {
    pub(crate) facts: Facts,
    pub(crate) profile: &'a HardwareProfile,
    pub(crate) desc_path: &'a Path,
    pub(crate) spec: &'a InstallSpec,
    pub(crate) layout: Layout,
}

/// Runs `body` on one host and turns its result into the report.
pub(crate) fn drive<'a>(
    t: &'a Target,
    ctx: &'a Context,
    progress: &'a dyn Fn(Step, &str),
    body: impl FnOnce(&mut Run<'a>) -> Result<Outcome, HostError>,
) -> HostReport {
    let started = Instant::now();
    let mut run = Run {
        t,
        ctx,
        progress,
        rep: HostReport::new(t),
        conn: None,
        staged: Vec::new(),
    };
    let result = body(&mut run);
    match result {
        Ok(outcome) => {
            run.rep.result = outcome;
            run.rep.step = Step::Done;
        }
        Err(e) => {
            run.cleanup();
            run.rep.result = Outcome::Failed;
            run.rep.error = Some(format!("{}: {}: {e}", t.label(), run.rep.step.as_str()));
        }
    }
    run.rep.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    (run.progress)(
        Step::Done,
        run.rep.error.as_deref().unwrap_or(run.rep.result.as_str()),
    );
    run.rep
}

impl<'a> Run<'a> {
    pub(crate) fn at(&mut self, step: Step, detail: &str) {
        self.rep.step = step;
        (self.progress)(step, detail);
    }

    pub(crate) fn conn(&self) -> Result<&Conn, HostError> {
        self.conn
            .as_ref()
            .ok_or_else(|| HostError::Other("not connected".into()))
    }

    /// Connects, logs in, detects the board and resolves the family's descriptor.
    pub(crate) fn open(&mut self) -> Result<Opened<'a>, HostError> {
        let t = self.t;
        let ctx = self.ctx;
        let s = &ctx.settings;
        self.at(Step::Connect, &format!("{}:{}", t.host, t.port));
        let pinned = t
            .host_key
            .as_deref()
            .map(HostKey::parse)
            .transpose()
            .map_err(|e| HostError::Other(format!("hostKey: {e}")))?;
        let (conn, key) = ssh::connect(
            &Endpoint {
                host: &t.host,
                port: t.port,
                host_key: pinned.as_ref(),
                trust_on_first_use: s.trust_on_first_use,
                timeout: s.ssh_timeout,
            },
            &ctx.known_hosts,
        )?;
        if let KeyOutcome::Pinned(fp) = key {
            self.rep.pinned_host_key = Some(fp);
        }
        self.conn = Some(conn);

        self.at(Step::Login, &t.user);
        let method = self.conn()?.login(&t.user, t.credential.as_ref())?;
        self.rep.login = Some(method.to_string());
        if method == "none" {
            self.rep.warnings.push(format!(
                "logged in as {} without a password (the SSH `none` method): this router has no {} password; set one (`passwd`) or install a key",
                t.user, t.user
            ));
        }

        self.at(Step::Detect, "");
        let out = self
            .conn()?
            .run("detect the board", &detect::probe_script(&t.root))?
            .check("detect the board")?;
        let facts = Facts::from_probe(&out.stdout);
        self.rep.board = Some(facts.summary());
        let profile = detect::match_profile(&facts, &ctx.profiles, t.profile.as_deref(), &t.root)?;
        let profile_name = profile.metadata.name.clone().unwrap_or_default();
        self.rep.profile = Some(profile_name.clone());
        let (desc_path, spec) = ctx.installers.get(profile.spec.firmware)?;
        let layout = spec.layout(desc_path, &t.root, &s.mesh, &t.hostname())?;
        self.at(
            Step::Detect,
            &format!("{} → {profile_name}", facts.summary()),
        );
        Ok(Opened {
            facts,
            profile,
            desc_path,
            spec,
            layout,
        })
    }

    /// Checks the packages the configs need and installs the missing ones; the installed ones.
    pub(crate) fn packages(
        &mut self,
        spec: &PackagesSpec,
        facts: &Facts,
        desc_path: &Path,
    ) -> Result<Vec<String>, HostError> {
        self.at(Step::Packages, "");
        let desc = desc_path.display();
        let version = facts.os_version.as_deref();
        let manager = spec.manager_for(version).map_err(|e| {
            HostError::Other(format!(
                "{desc}: {e}; this host runs {}",
                facts.os_pretty.as_deref().unwrap_or("an unknown version")
            ))
        })?;
        let check = |run: &mut Self| -> Result<packages::Check, HostError> {
            let out = run
                .conn()?
                .run("check the packages", &packages::check_script(spec, manager))?
                .check("check the packages")?;
            Ok(packages::parse_check(&out.stdout))
        };
        let found = check(self)?;
        if found.missing.is_empty() {
            self.at(Step::Packages, "all there");
            return Ok(Vec::new());
        }
        let what = packages::describe(&found.missing, spec, &found.installed);
        if !found.manager {
            return Err(HostError::Other(format!(
                "missing packages: {}; `{}` (the package manager {desc} names for {}) is not on the host, so they cannot be installed",
                found.missing.join(", "),
                manager.command(),
                facts.os_pretty.as_deref().unwrap_or("this version"),
            )));
        }
        self.at(
            Step::Packages,
            &format!("{} install {what}", manager.as_str()),
        );
        let out = self.conn()?.run(
            "install packages",
            &packages::install_script(spec, manager, &found.missing, &found.installed),
        )?;
        let detail = |o: &ssh::Output| {
            let text = o
                .stdout
                .lines()
                .filter(|l| !l.starts_with("@@"))
                .collect::<Vec<_>>()
                .join("\n");
            let text = text.trim();
            if text.is_empty() {
                o.stderr.trim().chars().take(600).collect::<String>()
            } else {
                text.chars().take(1200).collect()
            }
        };
        let step = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("@@").filter(|x| *x != "done"))
            .unwrap_or("the install script failed")
            .to_string();
        match out.status {
            0 => {}
            packages::NO_SOURCE => {
                return Err(HostError::Other(format!(
                    "no package source: {step}, so nothing was installed. Missing: {}. Give the host a package source (internet access or a local feed) and run again, or install them by hand. {}:\n{}",
                    found.missing.join(", "),
                    manager.as_str(),
                    detail(&out)
                )));
            }
            code => {
                return Err(HostError::Other(format!(
                    "installing {what} failed ({step}, exit status {code}); still missing: {}. {}:\n{}",
                    found.missing.join(", "),
                    manager.as_str(),
                    detail(&out)
                )));
            }
        }
        let after = check(self)?;
        if !after.missing.is_empty() {
            let why: Vec<String> = spec
                .require
                .iter()
                .filter(|p| after.missing.contains(&p.package))
                .map(|p| {
                    let mut call = vec![p.program.clone()];
                    call.extend(p.args.iter().cloned());
                    format!("{} (`{}` fails)", p.package, call.join(" "))
                })
                .collect();
            return Err(HostError::Other(format!(
                "`{}` installed {what}, but these are still missing: {}",
                manager.command(),
                why.join(", ")
            )));
        }
        self.rep.packages = found.missing.clone();
        self.rep.changes.push(format!("packages: {what}"));
        Ok(found.missing)
    }

    pub(crate) fn agent_version(&self, agent: &str) -> Result<String, HostError> {
        let out = self.conn()?.run(
            "ask the agent its version",
            &format!("{} --version 2>&1 </dev/null", shell_quote(agent)),
        )?;
        parse_version(&out.stdout).ok_or_else(|| {
            HostError::Other(format!(
                "{agent} --version: unexpected answer (exit status {}): {}",
                out.status,
                out.stdout.trim().chars().take(300).collect::<String>()
            ))
        })
    }

    pub(crate) fn stage_bytes(
        &mut self,
        dest: &str,
        bytes: &[u8],
        mode: u32,
        what: &str,
    ) -> Result<String, HostError> {
        let tmp = staging_path(dest, &self.ctx.run_id);
        self.staged.push(tmp.clone());
        let mut input: &[u8] = bytes;
        self.conn()?
            .run_with_input(
                what,
                &stage_script(&tmp, &sha256_hex(bytes), mode),
                Some(&mut input),
            )?
            .check(what)?;
        Ok(tmp)
    }

    pub(crate) fn show_id(&self, l: &Layout) -> Result<String, HostError> {
        let out = self
            .conn()?
            .run(
                "read the node id",
                &format!(
                    "{} --config {} --show-id </dev/null",
                    shell_quote(&l.agent),
                    shell_quote(&l.config)
                ),
            )?
            .check("read the node id")?;
        parse_show_id(&out.stdout).ok_or_else(|| {
            HostError::Other(format!(
                "read the node id: unexpected answer from {} --show-id: {}",
                l.agent,
                out.stdout.trim()
            ))
        })
    }

    /// Waits until the controller sees `node` online, running agent `version`, with nothing
    /// missing, and (when `before` is given: the agent was just started) from a later start of
    /// the agent than the last report it had before (`Some(None)`: none before).
    pub(crate) fn wait_online(
        &mut self,
        node: &str,
        version: &str,
        before: Option<Option<u64>>,
        l: &Layout,
    ) -> Result<(), HostError> {
        let s = &self.ctx.settings;
        if !s.wait_for_enrolment {
            return Ok(());
        }
        self.at(
            Step::Enrol,
            &format!("{node}: waiting for it online with agent {version}"),
        );
        let deadline = Instant::now() + s.enrol_timeout;
        let mut last_err = None;
        let mut last: Option<NodeSeen> = None;
        loop {
            match self.ctx.control.node(&s.mesh, node) {
                Ok(Some(seen)) => {
                    self.rep.phase = Some(seen.phase.clone());
                    let fresh = match before {
                        Some(Some(b)) => seen.agent_epoch.is_some_and(|e| e > b),
                        _ => true,
                    };
                    if fresh
                        && seen.online == Some(true)
                        && seen.agent_version.as_deref() == Some(version)
                        && seen.missing.is_empty()
                    {
                        return Ok(());
                    }
                    last = Some(seen);
                }
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                let running = self
                    .conn()?
                    .run("check the service", &format!("{}\n", l.running))
                    .map(|o| if o.status == 0 { "yes" } else { "no" })
                    .unwrap_or("unknown");
                let seen = match &last {
                    None => "has not heard from it".to_string(),
                    Some(n) => {
                        let mut parts = vec![format!("phase {}", n.phase)];
                        parts.push(match n.online {
                            Some(true) => "online".into(),
                            Some(false) => "offline".into(),
                            None => "presence unknown".into(),
                        });
                        parts.push(match &n.agent_version {
                            Some(v) => format!("agent {v}"),
                            None => "no status report".into(),
                        });
                        if let (Some(Some(b)), Some(e)) = (before, n.agent_epoch)
                            && e <= b
                        {
                            parts.push(
                                "its last report is from before the agent was started".into(),
                            );
                        }
                        if !n.missing.is_empty() {
                            parts.push(format!("missing: {}", n.missing.join(", ")));
                        }
                        parts.join(", ")
                    }
                };
                return Err(HostError::Other(format!(
                    "node {node} did not come online with agent {version} within {:?}: the controller {seen} (service running: {running}{})",
                    s.enrol_timeout,
                    last_err
                        .map(|e| format!("; controller: {e}"))
                        .unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Removes what this run staged (best effort: the connection may be gone, and the remote
    /// staging script removes a short upload by itself).
    pub(crate) fn cleanup(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        if let Some(conn) = &self.conn {
            let files: Vec<String> = self.staged.iter().map(|f| shell_quote(f)).collect();
            let _ = conn.run("clean up", &format!("rm -f {}\n", files.join(" ")));
        }
        self.staged.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_hidden_siblings() {
        assert_eq!(
            staging_path("/etc/init.d/sidenet-agent", "42-a"),
            "/etc/init.d/.sidenet-agent.sidenet-new.42-a"
        );
        assert_eq!(parent("/etc/init.d/.x"), "/etc/init.d");
        assert_eq!(parent("/x"), "/");
    }

    #[test]
    fn inspect_output_is_read() {
        let sha = "a".repeat(64);
        let out = format!(
            "@@agent\n{sha}\n@@service\n@@config\n{{\"mesh\":\"m\"}}\n\n@@running\nyes\n@@id\n{{\"node\":\"bhctvmiyz6ovk27g\",\"publicKey\":\"x\"}}\n@@stale\n/usr/bin/.sidenet-agent.sidenet-new.1-2\n@@end\n"
        );
        let i = Installed::parse(&out);
        assert_eq!(i.agent_sha.as_deref(), Some(sha.as_str()));
        assert_eq!(i.service_sha, None);
        assert!(i.config.as_deref().is_some_and(|c| c.contains("\"mesh\"")));
        assert!(i.running);
        assert_eq!(i.node_id.as_deref(), Some("bhctvmiyz6ovk27g"));
        assert_eq!(i.stale.len(), 1);
        let i = Installed::parse("@@agent\n@@running\nno\n@@id\nerror: unknown flag\n@@end\n");
        assert_eq!(i.agent_sha, None);
        assert!(!i.running);
        assert_eq!(i.node_id, None);
        assert_eq!(i.version, None);
        assert!(!i.uninstall);
        let i = Installed::parse(&format!(
            "@@agent\n{sha}\n@@keep\n{sha}\n@@version\nsidenet-agent 0.1.0 (no tls)\n@@help\n      --uninstall  Undo every change\n@@end\n"
        ));
        assert_eq!(i.keep_sha.as_deref(), Some(sha.as_str()));
        assert_eq!(i.version.as_deref(), Some("0.1.0"));
        assert!(i.uninstall);
        assert_eq!(
            parse_version("sidenet-agent 0.2.0-rc1 (tls)\n").as_deref(),
            Some("0.2.0-rc1")
        );
        assert_eq!(parse_version("sh: sidenet-agent: not found"), None);
    }
}
