//! `sidenetctl provision --remove`: takes the agent off a host again.
//!
//! Per host, after the same connect, login and detection as provisioning: stop the service and
//! disable it (`commands.stop`, `commands.disable` of the family's descriptor), let the agent
//! undo what it changed on the system (`sidenet-agent --uninstall --config FILE`, when its
//! `--help` offers that flag; if it fails, nothing is deleted so the next run can try again),
//! then delete the agent binary, the bootstrap config, the service file, the keep list and the
//! state folder (node key included), and tell the controller to forget the node. Packages that
//! provisioning installed for the configs stay: the report names them (the owner may use them
//! too, and putting back a replaced wpad needs a package source).

use crate::context::{Context, HostError, HostReport, Outcome, Step};
use crate::install::shell_quote;
use crate::plan::Target;
use crate::session::{Installed, Run, drive, inspect_script};

/// Removes the agent from one host; never panics, a failure is a report.
pub fn remove_host(t: &Target, ctx: &Context, progress: &dyn Fn(Step, &str)) -> HostReport {
    drive(t, ctx, progress, go)
}

fn go(run: &mut Run<'_>) -> Result<Outcome, HostError> {
    let opened = run.open()?;
    let l = &opened.layout;
    let q = shell_quote;
    run.at(Step::Inspect, "");
    let out = run
        .conn()?
        .run("inspect the installed agent", &inspect_script(l))?
        .check("inspect the installed agent")?;
    let installed = Installed::parse(&out.stdout);
    run.rep.node_id = installed.node_id.clone();
    let mut files: Vec<String> = vec![l.agent.clone(), l.config.clone(), l.service.clone()];
    if let Some((keep, _, _)) = &l.keep {
        files.push(keep.clone());
    }
    let present = run
        .conn()?
        .run(
            "look for the agent's files",
            &format!(
                "for f in {} {}; do if [ -e \"$f\" ]; then echo \"$f\"; fi; done\n",
                files.iter().map(|f| q(f)).collect::<Vec<_>>().join(" "),
                q(&l.state)
            ),
        )?
        .check("look for the agent's files")?;
    if present.stdout.trim().is_empty() && !installed.running {
        return Ok(Outcome::NotInstalled);
    }

    run.at(Step::Uninstall, "stop the service");
    let mut script = String::new();
    if installed.running {
        script.push_str(&format!(
            "{stop}\n\
             i=0\n\
             while ({running}) </dev/null >/dev/null 2>&1; do\n\
             \x20 i=$((i+1)); if [ $i -ge 10 ]; then echo 'the service still runs 10 s after it was stopped' >&2; exit 1; fi\n\
             \x20 sleep 1\n\
             done\n",
            stop = l.stop,
            running = l.running,
        ));
    }
    if let Some(d) = &l.disable {
        script.push_str(&format!("if [ -e {} ]; then {d}; fi\n", q(&l.service)));
    }
    if !script.is_empty() {
        run.conn()?
            .run("stop and disable the service", &script)?
            .check("stop and disable the service")?;
        run.rep.changes.push("service stopped and disabled".into());
    }

    if installed.uninstall {
        run.at(Step::Uninstall, "sidenet-agent --uninstall");
        let out = run.conn()?.run(
            "sidenet-agent --uninstall",
            &format!(
                "{} --uninstall --config {} </dev/null 2>&1\n",
                q(&l.agent),
                q(&l.config)
            ),
        )?;
        if out.status != 0 {
            return Err(HostError::Other(format!(
                "`{} --uninstall --config {}` failed (exit status {}), so its files were left in place for another try: {}",
                l.agent,
                l.config,
                out.status,
                out.stdout.trim().chars().take(600).collect::<String>()
            )));
        }
        run.rep
            .changes
            .push("the agent undid its changes (--uninstall)".into());
    } else if installed.agent_sha.is_some() {
        run.rep.warnings.push(format!(
            "{} has no --uninstall: what it configured on the system was left as it is",
            l.agent
        ));
    }

    run.at(Step::Uninstall, "delete the files");
    let dirs: Vec<String> = files
        .iter()
        .filter_map(|f| f.rsplit_once('/').map(|(d, _)| d.to_string()))
        .filter(|d| !d.is_empty())
        .collect();
    run.conn()?
        .run(
            "delete the agent's files",
            &format!(
                "set -e\nrm -f {}\nrm -rf {}\n\
                 for d in {}; do rmdir \"$d\" 2>/dev/null || true; done\n",
                files.iter().map(|f| q(f)).collect::<Vec<_>>().join(" "),
                q(&l.state),
                // Folders only the agent used (e.g. /etc/sidenet) go when empty.
                dirs.iter().map(|d| q(d)).collect::<Vec<_>>().join(" "),
            ),
        )?
        .check("delete the agent's files")?;
    run.rep.changes.push(format!(
        "deleted {} and the state folder {}",
        present
            .stdout
            .lines()
            .filter(|f| *f != l.state)
            .collect::<Vec<_>>()
            .join(", "),
        l.state
    ));
    if let Some(spec) = &opened.spec.packages {
        let names: Vec<&str> = spec.require.iter().map(|p| p.package.as_str()).collect();
        run.rep.warnings.push(format!(
            "packages the configs needed were left installed: {}",
            names.join(", ")
        ));
    }
    let s = &run.ctx.settings;
    if s.wait_for_enrolment
        && let Some(node) = &installed.node_id
    {
        run.ctx.control.remove_node(&s.mesh, node).map_err(|e| {
            HostError::Other(format!(
                "the agent is removed, but the controller could not forget node {node}: {e}"
            ))
        })?;
        run.rep
            .changes
            .push(format!("node {node} removed from the controller"));
    }
    Ok(Outcome::Removed)
}
