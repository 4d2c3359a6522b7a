//! What `/metrics` reports: the Kubernetes adapter's counters ([`Metrics`], read from atomics
//! and a small mutex, so `/metrics` answers while the API server or the broker is down) and the
//! standalone controller's ([`standalone`], from its status answer). Metrics that mean the same
//! have the same names in both modes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::reconcile::model::{Counters, StatusRow};

/// Upper bounds (seconds) of the publish latency histogram.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The kinds the controller reconciles, as metric labels.
pub const KINDS: [&str; 3] = ["Mesh", "MeshNode", "HardwareProfile"];

/// Everything the endpoints report. Shared by the reconcilers (writers) and the server.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Readiness (see docs/helm.md: watches synced and, for the pod that reconciles, the broker).
    pub ready: AtomicBool,
    /// This pod holds the Lease (or leader election is off).
    pub leader: AtomicBool,
    reconciles: [AtomicU64; 3],
    errors: [AtomicU64; 3],
    /// Configs handed to the broker (new ones and, after each (re)connect, the stored ones).
    pub published: AtomicU64,
    /// Enrolments accepted.
    pub enrolled: AtomicU64,
    /// Node messages refused (bad signature, replay, wrong token, ...).
    pub rejected: AtomicU64,
    latency_buckets: [AtomicU64; 11],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    /// Nodes by phase (replaced after each reconcile pass).
    pub phases: Mutex<BTreeMap<String, u64>>,
}

fn kind_index(kind: &str) -> usize {
    KINDS.iter().position(|k| *k == kind).unwrap_or(0)
}

impl Metrics {
    /// Counts one reconcile of `kind`.
    pub fn reconciled(&self, kind: &str) {
        self.reconciles[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one failed reconcile of `kind`.
    pub fn failed(&self, kind: &str) {
        self.errors[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the time from the start of a reconcile to its configs being handed to the broker.
    pub fn observe_publish(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        out.push_str("# HELP sidenet_reconciles_total Reconciles run, by kind.\n# TYPE sidenet_reconciles_total counter\n");
        for (i, k) in KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "sidenet_reconciles_total{{kind=\"{k}\"}} {}",
                g(&self.reconciles[i])
            );
        }
        out.push_str("# HELP sidenet_reconcile_errors_total Reconciles that failed (retried with backoff), by kind.\n# TYPE sidenet_reconcile_errors_total counter\n");
        for (i, k) in KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "sidenet_reconcile_errors_total{{kind=\"{k}\"}} {}",
                g(&self.errors[i])
            );
        }
        out.push_str("# HELP sidenet_configs_published_total Node configs handed to the broker (new revisions, and the stored ones again after each broker (re)connect).\n# TYPE sidenet_configs_published_total counter\n");
        let _ = writeln!(
            out,
            "sidenet_configs_published_total {}",
            g(&self.published)
        );
        out.push_str("# HELP sidenet_enrolments_total Enrolments accepted.\n# TYPE sidenet_enrolments_total counter\n");
        let _ = writeln!(out, "sidenet_enrolments_total {}", g(&self.enrolled));
        out.push_str("# HELP sidenet_rejected_messages_total Node messages refused.\n# TYPE sidenet_rejected_messages_total counter\n");
        let _ = writeln!(out, "sidenet_rejected_messages_total {}", g(&self.rejected));
        out.push_str("# HELP sidenet_publish_duration_seconds From the start of a reconcile to its new configs being persisted and handed to the MQTT client.\n# TYPE sidenet_publish_duration_seconds histogram\n");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "sidenet_publish_duration_seconds_bucket{{le=\"{b}\"}} {}",
                g(&self.latency_buckets[i])
            );
        }
        let count = g(&self.latency_count);
        let _ = writeln!(
            out,
            "sidenet_publish_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "sidenet_publish_duration_seconds_sum {}",
            g(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "sidenet_publish_duration_seconds_count {count}");
        out.push_str("# HELP sidenet_nodes Nodes by phase (as in MeshNode status.phase).\n# TYPE sidenet_nodes gauge\n");
        if let Ok(phases) = self.phases.lock() {
            for (phase, n) in phases.iter() {
                let _ = writeln!(out, "sidenet_nodes{{phase=\"{phase}\"}} {n}");
            }
        }
        out.push_str("# HELP sidenet_leader Whether this pod reconciles (holds the Lease).\n# TYPE sidenet_leader gauge\n");
        let _ = writeln!(
            out,
            "sidenet_leader {}",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
        out
    }
}

/// The standalone controller's `/metrics`: the counters of its status answer under the
/// Kubernetes adapter's names (`sidenet_configs_published_total`, `sidenet_enrolments_total`,
/// `sidenet_rejected_messages_total`, `sidenet_nodes{phase}`), the number of manifest errors,
/// then the per-node and per-link metrics of `sidenetctl metrics`
/// ([`crate::reconcile::health::prometheus`]).
pub fn standalone(rows: &[StatusRow], counters: &Counters, manifest_errors: usize) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter(
        "sidenet_configs_published_total",
        "Node configs signed and published.",
        counters.published,
    );
    counter(
        "sidenet_enrolments_total",
        "Enrolments accepted.",
        counters.enrolled,
    );
    counter(
        "sidenet_rejected_messages_total",
        "Node messages refused.",
        counters.rejected_messages,
    );
    counter(
        "sidenet_enrolments_refused_total",
        "Enrolments refused.",
        counters.refused,
    );
    let mut phases: BTreeMap<&str, u64> = BTreeMap::new();
    for r in rows {
        *phases.entry(r.phase.as_str()).or_insert(0) += 1;
    }
    out.push_str("# HELP sidenet_nodes Nodes by phase (as in MeshNode status.phase).\n# TYPE sidenet_nodes gauge\n");
    for (phase, n) in &phases {
        let _ = writeln!(out, "sidenet_nodes{{phase=\"{phase}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP sidenet_manifest_errors Current manifest problems (the controller runs on the last good manifests).\n# TYPE sidenet_manifest_errors gauge\nsidenet_manifest_errors {manifest_errors}"
    );
    out.push_str(&crate::reconcile::health::prometheus(rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.reconciled("MeshNode");
        m.failed("Mesh");
        m.observe_publish(Duration::from_millis(30));
        m.phases
            .lock()
            .map(|mut p| p.insert("Ready".into(), 2))
            .ok();
        let text = m.render();
        assert!(text.contains("sidenet_reconciles_total{kind=\"MeshNode\"} 1"));
        assert!(text.contains("sidenet_reconcile_errors_total{kind=\"Mesh\"} 1"));
        assert!(text.contains("sidenet_publish_duration_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("sidenet_publish_duration_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("sidenet_publish_duration_seconds_count 1"));
        assert!(text.contains("sidenet_nodes{phase=\"Ready\"} 2"));
    }
}
