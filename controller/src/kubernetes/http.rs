//! `/healthz`, `/readyz` and `/metrics` on `SIDENET_METRICS_LISTEN`.
//!
//! A deliberately small HTTP/1.1 server: GET only, one request per connection
//! (`Connection: close`), request head capped at 8 KiB and read within 5 s. It runs on its own
//! task and reads only atomics and a small mutex, so `/healthz` answers while the API server or
//! the broker is down.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), handle(stream, &metrics)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 8192 {
            return respond(&mut stream, 431, "text/plain", "request head too large\n").await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    match path {
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/readyz" => {
            if metrics.ready.load(Ordering::Relaxed) {
                respond(&mut stream, 200, "text/plain", "ready\n").await
            } else {
                respond(&mut stream, 503, "text/plain", "not ready\n").await
            }
        }
        "/metrics" => {
            let body = metrics.render();
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
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
