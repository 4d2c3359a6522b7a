//! Showing a run: live progress (indicatif bars on a terminal, plain lines otherwise), the final
//! table, JSON for scripts, and the `NodeProvision` status for controller mode.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sidenet_crds::{Condition, NodeProvisionStatus, ProvisionHostStatus};

use crate::fleet::Progress;
use crate::host::{HostReport, Outcome, Step};
use crate::plan::Target;

/// One line per host with its step, and an overall bar (for a terminal).
#[derive(Debug, Default)]
pub struct Bars {
    multi: MultiProgress,
    hosts: Mutex<Vec<ProgressBar>>,
    total: Mutex<Option<ProgressBar>>,
}

impl Bars {
    /// Bars drawn on standard error.
    pub fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            ..Self::default()
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

impl Progress for Bars {
    fn begin(&self, targets: &[Target]) {
        let width = targets
            .iter()
            .map(|t| t.hostname().len())
            .max()
            .unwrap_or(0);
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for t in targets {
            let b = self.multi.add(ProgressBar::new_spinner());
            b.set_style(style("{prefix} {spinner} {wide_msg}"));
            b.set_prefix(format!("{:<width$}", t.hostname()));
            b.set_message("queued");
            b.enable_steady_tick(Duration::from_millis(120));
            hosts.push(b);
        }
        let total = self.multi.add(ProgressBar::new(targets.len() as u64));
        total.set_style(style(
            "{elapsed:>4} [{bar:30}] {pos}/{len} hosts {wide_msg}",
        ));
        *self.total.lock().unwrap_or_else(|e| e.into_inner()) = Some(total);
    }

    fn step(&self, index: usize, step: Step, detail: &str) {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = hosts.get(index) {
            if detail.is_empty() {
                b.set_message(step.as_str().to_string());
            } else {
                b.set_message(format!("{}: {detail}", step.as_str()));
            }
        }
    }

    fn done(&self, index: usize, r: &HostReport) {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = hosts.get(index) {
            b.set_style(style("{prefix} {wide_msg}"));
            b.finish_with_message(result_text(r));
        }
        if let Some(t) = self
            .total
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            t.inc(1);
        }
    }

    fn end(&self) {
        if let Some(t) = self.total.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.finish();
        }
    }
}

/// One plain line per step change on standard error (when it is not a terminal: CI logs),
/// with the seconds since the run started.
#[derive(Debug)]
pub struct Lines {
    names: Mutex<Vec<(String, Option<Step>)>>,
    started: std::time::Instant,
}

impl Default for Lines {
    fn default() -> Self {
        Self {
            names: Mutex::default(),
            started: std::time::Instant::now(),
        }
    }
}

impl Progress for Lines {
    fn begin(&self, targets: &[Target]) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        *names = targets.iter().map(|t| (t.hostname(), None)).collect();
    }

    fn step(&self, index: usize, step: Step, detail: &str) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let Some((name, last)) = names.get_mut(index) else {
            return;
        };
        // Upload percentages only every quarter, so logs stay short.
        let is_pct = detail.contains('%');
        if *last == Some(step)
            && is_pct
            && !(detail.contains(" 25%") || detail.contains(" 50%") || detail.contains(" 75%"))
        {
            return;
        }
        *last = Some(step);
        if step == Step::Done {
            return;
        }
        let t = self.started.elapsed().as_secs_f64();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{t:6.1}s {name}: {} {detail}", step.as_str());
    }

    fn done(&self, index: usize, r: &HostReport) {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let name = names.get(index).map(|n| n.0.as_str()).unwrap_or("?");
        let t = self.started.elapsed().as_secs_f64();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{t:6.1}s {name}: {}", result_text(r));
    }
}

/// `provisioned (Ready)`, `already provisioned (Ready)`, `failed at login`.
pub fn result_text(r: &HostReport) -> String {
    match (r.result, &r.phase) {
        (Outcome::Failed, _) => format!("failed at {}", r.step.as_str()),
        (o, Some(p)) => format!("{} ({p})", o.as_str()),
        (o, None) => o.as_str().to_string(),
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// The final table, then one line per failure with its reason.
pub fn table(reports: &[HostReport]) -> String {
    let header = [
        "HOST", "ADDRESS", "BOARD", "PROFILE", "NODE", "RESULT", "TIME",
    ];
    let dash = || "-".to_string();
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in reports {
        rows.push(vec![
            r.name.clone(),
            r.host.clone(),
            r.board.clone().unwrap_or_else(dash),
            r.profile.clone().unwrap_or_else(dash),
            r.node_id.clone().unwrap_or_else(dash),
            result_text(r),
            secs(r.duration_ms),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|row| row[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for r in reports {
        if let Some(e) = &r.error {
            out.push_str(&format!("{}: {e}\n", r.name));
        }
        for w in &r.warnings {
            out.push_str(&format!("{}: warning: {w}\n", r.name));
        }
    }
    out
}

/// `7 hosts: 4 provisioned, 1 already provisioned, 2 failed`.
pub fn summary(reports: &[HostReport]) -> String {
    let count = |o: Outcome| reports.iter().filter(|r| r.result == o).count();
    if reports
        .iter()
        .any(|r| matches!(r.result, Outcome::Removed | Outcome::NotInstalled))
    {
        return format!(
            "{} hosts: {} removed, {} not installed, {} failed",
            reports.len(),
            count(Outcome::Removed),
            count(Outcome::NotInstalled),
            count(Outcome::Failed)
        );
    }
    format!(
        "{} hosts: {} provisioned, {} already provisioned, {} failed",
        reports.len(),
        count(Outcome::Provisioned),
        count(Outcome::AlreadyProvisioned),
        count(Outcome::Failed)
    )
}

/// The reports as pretty JSON (an array, one object per host).
pub fn json(reports: &[HostReport]) -> String {
    serde_json::to_string_pretty(reports).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// The status a `NodeProvision` gets from a run (controller mode).
pub fn status(
    reports: &[HostReport],
    generation: Option<i64>,
    now_rfc3339: &str,
) -> NodeProvisionStatus {
    let failed = reports.iter().filter(|r| !r.ok()).count();
    let succeeded = reports.len() - failed;
    let condition = if failed == 0 {
        Condition {
            type_: "Complete".into(),
            status: "True".into(),
            reason: "AllProvisioned".into(),
            message: format!("{succeeded} host(s) provisioned"),
            last_transition_time: Some(now_rfc3339.to_string()),
            observed_generation: generation,
        }
    } else {
        Condition {
            type_: "Complete".into(),
            status: "False".into(),
            reason: "HostsFailed".into(),
            message: reports
                .iter()
                .filter_map(|r| r.error.clone())
                .collect::<Vec<_>>()
                .join("; "),
            last_transition_time: Some(now_rfc3339.to_string()),
            observed_generation: generation,
        }
    };
    NodeProvisionStatus {
        conditions: vec![condition],
        observed_generation: generation,
        succeeded: u32::try_from(succeeded).unwrap_or(u32::MAX),
        failed: u32::try_from(failed).unwrap_or(u32::MAX),
        hosts: reports
            .iter()
            .map(|r| ProvisionHostStatus {
                host: r.host.clone(),
                board: r.board.clone(),
                profile: r.profile.clone(),
                node_id: r.node_id.clone(),
                result: match r.result {
                    Outcome::Provisioned => "Provisioned",
                    Outcome::AlreadyProvisioned => "AlreadyProvisioned",
                    Outcome::Removed => "Removed",
                    Outcome::NotInstalled => "NotInstalled",
                    Outcome::Failed => "Failed",
                }
                .into(),
                message: r.error.clone().unwrap_or_else(|| {
                    if r.changes.is_empty() {
                        "no changes".into()
                    } else {
                        format!("changed: {}", r.changes.join(", "))
                    }
                }),
                duration_ms: r.duration_ms,
            })
            .collect(),
        fingerprint: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, result: Outcome, step: Step, error: Option<&str>) -> HostReport {
        HostReport {
            host: format!("root@{name}:22"),
            name: name.into(),
            board: Some("tplink,archer-c7-v2".into()),
            profile: Some("tplink-archer-c7-v2".into()),
            node_id: Some("bhctvmiyz6ovk27g".into()),
            phase: (result != Outcome::Failed).then(|| "Ready".into()),
            result,
            step,
            changes: if result == Outcome::Provisioned {
                vec!["agent binary".into(), "started".into()]
            } else {
                Vec::new()
            },
            packages: Vec::new(),
            agent_version: Some("0.1.0".into()),
            login: Some("publickey".into()),
            warnings: Vec::new(),
            pinned_host_key: None,
            error: error.map(str::to_string),
            duration_ms: 4210,
        }
    }

    #[test]
    fn table_summary_and_status() {
        let rs = vec![
            report("kitchen", Outcome::Provisioned, Step::Done, None),
            report("attic", Outcome::AlreadyProvisioned, Step::Done, None),
            report(
                "shed",
                Outcome::Failed,
                Step::Connect,
                Some("root@shed:22: connect: connect to shed:22: connection refused"),
            ),
        ];
        let t = table(&rs);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("HOST     ADDRESS"), "{t}");
        assert!(
            lines[1].contains("provisioned (Ready)") && lines[1].ends_with("4.2s"),
            "{t}"
        );
        assert!(lines[2].contains("already provisioned (Ready)"), "{t}");
        assert!(lines[3].contains("failed at connect"), "{t}");
        assert_eq!(
            lines[4],
            "shed: root@shed:22: connect: connect to shed:22: connection refused"
        );
        assert_eq!(
            summary(&rs),
            "3 hosts: 1 provisioned, 1 already provisioned, 1 failed"
        );
        let st = status(&rs, Some(3), "2026-01-01T00:00:00Z");
        assert_eq!((st.succeeded, st.failed), (2, 1));
        assert_eq!(st.conditions[0].status, "False");
        assert_eq!(st.hosts[0].message, "changed: agent binary, started");
        assert_eq!(st.hosts[1].result, "AlreadyProvisioned");
        assert!(st.hosts[2].message.contains("connection refused"));
        let back: Vec<HostReport> = serde_json::from_str(&json(&rs)).unwrap_or_default();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2].result, Outcome::Failed);
    }
}
