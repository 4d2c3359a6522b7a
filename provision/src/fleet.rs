//! Running a fleet: every host in its own blocking task (`spawn_blocking`: `ssh2` blocks),
//! at most `parallelism` at once (a semaphore), progress reported as it happens, reports
//! returned in the order of the targets.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::host::{Context, HostReport, Outcome, Step, provision_host};
use crate::plan::Target;
use crate::remove::remove_host;

/// Hears what the hosts are doing.
pub trait Progress: Send + Sync {
    /// Before any host starts.
    fn begin(&self, _targets: &[Target]) {}
    /// Host `index` reached `step`.
    fn step(&self, index: usize, step: Step, detail: &str);
    /// Host `index` finished.
    fn done(&self, index: usize, report: &HostReport);
    /// After the last host.
    fn end(&self) {}
}

/// Progress that goes nowhere (controller mode, tests).
#[derive(Debug, Default)]
pub struct Silent;

impl Progress for Silent {
    fn step(&self, _: usize, _: Step, _: &str) {}
    fn done(&self, _: usize, _: &HostReport) {}
}

/// What is done to one host.
type HostFn = fn(&Target, &Context, &dyn Fn(Step, &str)) -> HostReport;

/// Provisions every target; never fails as a whole: each host has its report.
pub async fn provision(
    targets: Vec<Target>,
    ctx: Arc<Context>,
    progress: Arc<dyn Progress>,
) -> Vec<HostReport> {
    run_all(targets, ctx, progress, provision_host).await
}

/// Takes the agent off every target (`sidenetctl provision --remove`).
pub async fn remove(
    targets: Vec<Target>,
    ctx: Arc<Context>,
    progress: Arc<dyn Progress>,
) -> Vec<HostReport> {
    run_all(targets, ctx, progress, remove_host).await
}

async fn run_all(
    targets: Vec<Target>,
    ctx: Arc<Context>,
    progress: Arc<dyn Progress>,
    each: HostFn,
) -> Vec<HostReport> {
    progress.begin(&targets);
    let slots = Arc::new(Semaphore::new(ctx.settings.parallelism.max(1)));
    let mut tasks = Vec::with_capacity(targets.len());
    for (i, t) in targets.iter().cloned().enumerate() {
        let ctx = ctx.clone();
        let progress = progress.clone();
        let slots = slots.clone();
        tasks.push(tokio::spawn(async move {
            let permit = slots.acquire_owned().await;
            let p2 = progress.clone();
            let t2 = t.clone();
            let res = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                each(&t2, &ctx, &|step, detail| p2.step(i, step, detail))
            })
            .await;
            let report = res.unwrap_or_else(|e| {
                let mut r = HostReport::new(&t);
                r.result = Outcome::Failed;
                r.error = Some(format!("{}: internal error: {e}", t.label()));
                r
            });
            progress.done(i, &report);
            report
        }));
    }
    let mut reports = Vec::with_capacity(tasks.len());
    for (task, t) in tasks.into_iter().zip(&targets) {
        reports.push(task.await.unwrap_or_else(|e| {
            let mut r = HostReport::new(t);
            r.error = Some(format!("{}: internal error: {e}", t.label()));
            r
        }));
    }
    progress.end();
    reports
}
