//! One host, start to end (blocking): connect and check the host key, log in, detect the board,
//! match a profile, compare what is installed with what should be, install the missing packages
//! ([`crate::packages`]), stage and verify what differs, switch it into place, start the service
//! (restart it when anything changed) and wait until the controller sees the node online,
//! running the installed agent version, with a report from this start and nothing missing.
//!
//! Every file is staged next to its destination as `.NAME.sidenet-new.RUN` and checked on the
//! device (SHA-256) by the same remote script that received it: if the upload is cut (the
//! provisioning process killed, the network gone) that script sees a short file and deletes it.
//! Only when every changed file is staged and verified are they renamed into place (each rename
//! atomic; the service definition last), so a host never runs a half-written agent. Leftovers of
//! an interrupted run are removed by the next one.

use std::io::Read;

use sidenet_wire::codec::sha256_hex;

pub use crate::context::{
    AGENT_FILE, Binary, Context, ControlPlane, HostError, HostReport, NodeSeen, Outcome, Step,
};
use crate::install::{Bootstrap, shell_quote};
use crate::plan::Target;
use crate::session::{
    Installed, Opened, Run, drive, inspect_script, parse_version, stage_script, staging_path,
};

/// Wraps a reader to report upload progress.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    last_pct: u64,
    report: &'a dyn Fn(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        if pct != self.last_pct {
            self.last_pct = pct;
            (self.report)(pct);
        }
        Ok(n)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Provisions one host; `progress` hears every step. Never panics and never returns early
/// without a report: a failure is a report with the step and the reason.
pub fn provision_host(t: &Target, ctx: &Context, progress: &dyn Fn(Step, &str)) -> HostReport {
    drive(t, ctx, progress, |run| run.go())
}

impl Run<'_> {
    fn go(&mut self) -> Result<Outcome, HostError> {
        let ctx = self.ctx;
        let s = &ctx.settings;
        let Opened {
            facts,
            profile,
            desc_path,
            spec,
            layout,
        } = self.open()?;
        let profile_name = profile.metadata.name.clone().unwrap_or_default();
        let binary = ctx.binary_for(profile)?;

        self.at(Step::Inspect, "");
        let out = self
            .conn()?
            .run("inspect the installed agent", &inspect_script(&layout))?
            .check("inspect the installed agent")?;
        let installed = Installed::parse(&out.stdout);
        if !installed.stale.is_empty() {
            self.rep.changes.push(format!(
                "removed {} file(s) left staged by an interrupted run",
                installed.stale.len()
            ));
        }

        // Refuse before anything is uploaded when the configs' packages cannot be installed.
        let packages = match &spec.packages {
            Some(p) if s.shaping => self.packages(&p.with_shaping(), &facts, desc_path)?,
            Some(p) => self.packages(p, &facts, desc_path)?,
            None => Vec::new(),
        };

        let mut desired = Bootstrap {
            mesh: s.mesh.clone(),
            broker: s.broker.clone(),
            broker_ca: s.broker_ca.clone(),
            mesh_key: s.mesh_key.clone(),
            join_code: sidenet_wire::PublicKey::from_base64(&s.mesh_key)
                .ok()
                .map(|k| sidenet_wire::join::JoinCode::new(&s.mesh, &k).to_string()),
            root: self.t.root.clone(),
            state: layout.state.clone(),
            hostname: self.t.hostname(),
            board: facts.board_name.clone(),
            profile: Some(profile_name),
            token: None,
        };
        let service_sha = sha256_hex(layout.service_content.as_bytes());
        let agent_ok = installed.agent_sha.as_deref() == Some(binary.sha256.as_str());
        let service_ok = installed.service_sha.as_deref() == Some(service_sha.as_str());
        let keep_ok = match &layout.keep {
            Some((_, _, content)) => {
                installed.keep_sha.as_deref() == Some(sha256_hex(content.as_bytes()).as_str())
            }
            None => true,
        };
        let config_ok = installed
            .config
            .as_deref()
            .is_some_and(|c| desired.same_as_installed(c));

        if agent_ok
            && service_ok
            && keep_ok
            && config_ok
            && installed.running
            && packages.is_empty()
        {
            let node = match installed.node_id.clone() {
                Some(n) => n,
                None => self.show_id(&layout)?,
            };
            self.rep.node_id = Some(node.clone());
            let version = match installed.version.clone() {
                Some(v) => v,
                None => self.agent_version(&layout.agent)?,
            };
            self.rep.agent_version = Some(version.clone());
            self.wait_online(&node, &version, None, &layout)?;
            return Ok(Outcome::AlreadyProvisioned);
        }

        if !config_ok {
            let known = match &installed.node_id {
                Some(id) => ctx
                    .control
                    .node(&s.mesh, id)
                    .map_err(|e| HostError::Other(format!("asking the controller: {e}")))?
                    .is_some(),
                None => false,
            };
            if !known {
                desired.token = ctx.control.enrolment_token(&s.mesh).map_err(|e| {
                    HostError::Other(format!(
                        "getting an enrolment token from the controller: {e}"
                    ))
                })?;
            }
        }

        // Stage and verify everything that differs before anything is switched.
        let mut switch: Vec<(String, String)> = Vec::new();
        let mut version = installed.version.clone();
        if !agent_ok {
            let tmp = staging_path(&layout.agent, &ctx.run_id);
            self.at(
                Step::Upload,
                &format!("agent {} ({})", profile.spec.cpu_arch, mib(binary.size)),
            );
            let file = std::fs::File::open(&binary.path).map_err(|e| {
                HostError::Other(format!(
                    "cannot read agent binary {}: {e}",
                    binary.path.display()
                ))
            })?;
            let progress = self.progress;
            let size = binary.size;
            let report = move |pct: u64| {
                progress(Step::Upload, &format!("agent {pct}% of {}", mib(size)));
            };
            let mut reader = Counting {
                inner: file,
                done: 0,
                total: binary.size,
                last_pct: 0,
                report: &report,
            };
            self.staged.push(tmp.clone());
            self.conn()?
                .run_with_input(
                    "upload the agent",
                    &stage_script(&tmp, &binary.sha256, 0o755),
                    Some(&mut reader),
                )?
                .check("upload the agent")?;
            let out = self.conn()?.run(
                "run the uploaded agent",
                &format!("{} --version 2>&1 </dev/null", shell_quote(&tmp)),
            )?;
            let parsed = parse_version(&out.stdout);
            if out.status != 0 || parsed.is_none() {
                return Err(HostError::Other(format!(
                    "the agent for {} ({}) does not run on this host (exit status {}): {}",
                    profile.spec.cpu_arch,
                    binary.path.display(),
                    out.status,
                    out.stdout.trim().chars().take(300).collect::<String>()
                )));
            }
            version = parsed;
            // `sidenet-agent X.Y.Z (tls)`: built with the cargo feature `tls`.
            if s.broker.starts_with("mqtts://") && !out.stdout.contains("(tls)") {
                return Err(HostError::Other(format!(
                    "the agent {} cannot speak mqtts:// (its --version says {:?}): build it with `--features tls`",
                    binary.path.display(),
                    out.stdout.trim()
                )));
            }
            switch.push((tmp, layout.agent.clone()));
            self.rep.changes.push("agent binary".into());
        }
        if !config_ok {
            self.at(Step::Upload, "bootstrap config");
            let bytes = desired.to_bytes();
            let tmp =
                self.stage_bytes(&layout.config, &bytes, 0o600, "upload the bootstrap config")?;
            switch.push((tmp, layout.config.clone()));
            self.rep.changes.push("bootstrap config".into());
        }
        if !keep_ok && let Some((path, mode, content)) = &layout.keep {
            self.at(Step::Upload, "keep list");
            let tmp = self.stage_bytes(
                path,
                content.as_bytes(),
                *mode,
                "upload the list of files a firmware upgrade keeps",
            )?;
            switch.push((tmp, path.clone()));
            self.rep.changes.push("keep list".into());
        }
        if !service_ok {
            self.at(Step::Upload, "service");
            let tmp = self.stage_bytes(
                &layout.service,
                layout.service_content.as_bytes(),
                layout.service_mode,
                "upload the service definition",
            )?;
            switch.push((tmp, layout.service.clone()));
            self.rep.changes.push("service".into());
        }

        // Switch (each rename atomic, the service definition last), then enable: also when
        // nothing was switched, in case an interrupted run switched but did not enable.
        self.at(Step::Install, "");
        let mut script = String::from("set -e\n");
        for (tmp, dest) in &switch {
            script.push_str(&format!(
                "mv -f {} {}\n",
                shell_quote(tmp),
                shell_quote(dest)
            ));
        }
        script.push_str(&layout.enable);
        script.push('\n');
        self.conn()?
            .run("switch the new files into place", &script)?
            .check("switch the new files into place")?;
        self.staged.clear();
        let node = self.show_id(&layout)?;
        self.rep.node_id = Some(node.clone());
        let version = match version {
            Some(v) => v,
            None => self.agent_version(&layout.agent)?,
        };
        self.rep.agent_version = Some(version.clone());

        // The agent checks the packages when it starts: a new package means a restart too.
        let restart = installed.running && (!switch.is_empty() || !packages.is_empty());
        // What the controller heard from the node before: only a report from a later start
        // counts as the (re)started agent's.
        let before = if s.wait_for_enrolment {
            ctx.control
                .node(&s.mesh, &node)
                .ok()
                .flatten()
                .and_then(|n| n.agent_epoch)
        } else {
            None
        };
        self.at(Step::Start, "");
        let mut script = String::new();
        if restart {
            script.push_str(&format!("{}\n", layout.stop));
        }
        script.push_str(&format!(
            "{start}\n\
             i=0\n\
             while ! ({running}) </dev/null >/dev/null 2>&1; do\n\
             \x20 i=$((i+1)); if [ $i -ge 10 ]; then echo 'the service does not run 10 s after it was started' >&2; exit 1; fi\n\
             \x20 sleep 1\n\
             done\n",
            start = layout.start,
            running = layout.running,
        ));
        self.conn()?
            .run("start the service", &script)?
            .check("start the service")?;
        self.rep.changes.push(if restart {
            "restarted".into()
        } else if installed.running {
            "running".into()
        } else {
            "started".into()
        });
        self.wait_online(&node, &version, Some(before), &layout)?;
        Ok(Outcome::Provisioned)
    }
}
