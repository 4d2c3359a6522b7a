//! The controller's HTTP service, the same in both modes (docs/web.md): the mesh map and its
//! assets, the topology as JSON and NetJSON, `/metrics`, `/healthz` and `/readyz`.
//!
//! A deliberately small HTTP/1.1 server: GET and HEAD, and POST for the ALTO filtered cost map
//! only ([`alto`], a body of at most 64 KiB with `Content-Length`), one request per connection
//! (`Connection: close`), request head capped at 8 KiB, the request read within 5 s. Every
//! asset is compiled in ([`assets`]): the page needs nothing but this port.
//!
//! Access: on a loopback address nothing is asked. On any other address the data routes
//! (`/api/...`, `/alto/...`, and `/metrics` unless [`Service::open_metrics`]) need `Authorization: Bearer
//! TOKEN`, else 401; the probes and the static page (which holds no data) stay open.

pub mod alto;
pub mod assets;
pub mod metrics;

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::reconcile::alto::Policies;
use crate::reconcile::model::{Counters, StatusRow};
use crate::reconcile::topology::{self, Snapshot, Thresholds};

pub use metrics::Metrics;

/// What the data routes are made of: the status table and what goes with it.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Status rows.
    pub rows: Vec<StatusRow>,
    /// Current manifest problems.
    pub manifest_errors: Vec<String>,
    /// Counters (standalone).
    pub counters: Counters,
    /// State epoch.
    pub epoch: u64,
    /// Rollouts in progress, for the map ([`rollout_views`]).
    pub rollouts: Vec<topology::RolloutView>,
    /// The meshes' policies, for the ALTO rate cost (`priv:sidenet-rate`).
    pub policies: Arc<Policies>,
}

/// The map's rollout lines: every rollout not complete (progressing, paused, halted, aborted),
/// from the same status as `sidenetctl rollout status`.
pub fn rollout_views(list: &[crate::reconcile::rollout::Status]) -> Vec<topology::RolloutView> {
    list.iter()
        .filter(|r| r.in_progress())
        .map(|r| topology::RolloutView {
            mesh: r.mesh.clone(),
            summary: r.summary(),
        })
        .collect()
}

/// A future the [`Source`] returns.
pub type ViewFuture<'a> = Pin<Box<dyn Future<Output = Result<View, String>> + Send + 'a>>;

/// Where the service gets the status table from (the standalone engine task, or the
/// Kubernetes engine).
pub trait Source: Send + Sync {
    /// The current view, or why there is none.
    fn view(&self) -> ViewFuture<'_>;
}

/// How long one view is reused: many open pages cost one status table per second.
const CACHE: Duration = Duration::from_millis(1000);

/// The service's configuration and shared state.
pub struct Service {
    /// The Kubernetes adapter's counters and readiness; `None` in standalone mode, where
    /// `/metrics` is made from the view and `/readyz` answers when the engine does.
    pub metrics: Option<Arc<Metrics>>,
    /// The status table; `None`: the data routes answer 503.
    pub source: Option<Arc<dyn Source>>,
    /// Whether the data routes need the bearer token (the listen address is not loopback).
    pub require_token: bool,
    /// The token; `None` while required: every data request is refused.
    pub token: Option<String>,
    /// `/metrics` needs no token even when exposed (Kubernetes mode, scraped through its
    /// Service as before).
    pub open_metrics: bool,
    /// The limits links are graded with.
    pub thresholds: Thresholds,
    cache: Mutex<Option<(Instant, Arc<View>)>>,
}

impl Service {
    /// A service for a listener on `listen` (a token is required unless it is loopback).
    pub fn new(listen: SocketAddr, token: Option<String>) -> Self {
        Self {
            metrics: None,
            source: None,
            require_token: token_required(&listen),
            token,
            open_metrics: false,
            thresholds: Thresholds::default(),
            cache: Mutex::new(None),
        }
    }

    async fn view(&self) -> Result<Arc<View>, String> {
        if let Ok(c) = self.cache.lock()
            && let Some((at, v)) = c.as_ref()
            && at.elapsed() < CACHE
        {
            return Ok(v.clone());
        }
        let source = self
            .source
            .as_ref()
            .ok_or("this controller has no node table to show (Kubernetes mode: only the pod that reconciles has one)")?;
        let v = Arc::new(source.view().await?);
        if let Ok(mut c) = self.cache.lock() {
            *c = Some((Instant::now(), v.clone()));
        }
        Ok(v)
    }

    async fn snapshot(&self) -> Result<Snapshot, String> {
        let v = self.view().await?;
        Ok(self.snapshot_of(&v))
    }

    /// What the ALTO routes read: the snapshot and the policies, of one view.
    async fn topology(&self) -> Result<(Snapshot, Arc<Policies>), String> {
        let v = self.view().await?;
        Ok((self.snapshot_of(&v), v.policies.clone()))
    }

    fn snapshot_of(&self, v: &View) -> Snapshot {
        let mut s = topology::snapshot(
            &v.rows,
            &v.manifest_errors,
            v.epoch,
            crate::now(),
            &self.thresholds,
        );
        s.rollouts = v.rollouts.clone();
        s
    }

    fn authorized(&self, head: &str) -> bool {
        if !self.require_token {
            return true;
        }
        let Some(token) = &self.token else {
            return false;
        };
        head.lines().skip(1).any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("authorization")
                    && v.trim()
                        .strip_prefix("Bearer ")
                        .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()))
            })
        })
    }
}

/// Whether a listener on `addr` needs the bearer token: anything but a loopback address.
pub fn token_required(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// Shortest token accepted from a file.
pub const MIN_TOKEN: usize = 16;

/// Reads a token file: its first line, without surrounding white space, at least
/// [`MIN_TOKEN`] characters.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the token: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < MIN_TOKEN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{}: the token (first line) must be at least {MIN_TOKEN} characters without spaces",
            path.display()
        ));
    }
    Ok(token)
}

/// The token in `path`, created there first if missing (mode 0600; 32 random bytes in
/// base32, 52 characters).
pub fn ensure_token(path: &std::path::Path) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !path.exists() {
        let token = sidenet_wire::codec::base32(&crate::random::random32()?);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("{}: cannot create the token: {e}", path.display()))?;
        f.write_all(format!("{token}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: cannot write the token: {e}", path.display()))?;
    }
    read_token(path)
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, svc: Arc<Service>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let svc = svc.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), handle(stream, &svc)).await;
        });
    }
}

/// One response.
struct Reply {
    code: u16,
    content_type: &'static str,
    body: Vec<u8>,
    extra: Cow<'static, str>,
}

fn from(a: alto::Answer) -> Reply {
    Reply {
        code: a.code,
        content_type: a.content_type,
        body: a.body,
        extra: a.extra,
    }
}

fn reply(code: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
    Reply {
        code,
        content_type,
        body: body.into(),
        extra: Cow::Borrowed(""),
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
/// The page may load only its own assets and talk only to this service.
const CSP: &str = "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n";

async fn handle(mut stream: TcpStream, svc: &Service) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 8192 {
            let r = reply(431, TEXT, "request head too large\n");
            return respond(&mut stream, r, false).await;
        }
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&buf[..end.unwrap_or(buf.len())]).into_owned();
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    let path = target.split('?').next().unwrap_or("");
    if method == "POST" && path == crate::reconcile::alto::PATH_FILTER {
        if !svc.authorized(&head) {
            return respond(&mut stream, unauthorized(svc), false).await;
        }
        let r = match read_body(&mut stream, &buf, end, &head).await? {
            Ok(body) => from(alto::post(&head, &body, || svc.topology()).await),
            Err(r) => r,
        };
        return respond(&mut stream, r, false).await;
    }
    if method != "GET" && !head_only {
        let mut r = reply(405, TEXT, "only GET\n");
        r.extra = "Allow: GET, HEAD\r\n".into();
        return respond(&mut stream, r, false).await;
    }
    let r = route(svc, target, &head).await;
    respond(&mut stream, r, head_only).await
}

/// The request's body: `Content-Length` bytes (at most [`alto::MAX_BODY`]), some of them
/// maybe already in `buf` after the head ending at `end`.
async fn read_body(
    stream: &mut TcpStream,
    buf: &[u8],
    end: Option<usize>,
    head: &str,
) -> std::io::Result<Result<Vec<u8>, Reply>> {
    let Some(end) = end else {
        return Ok(Err(reply(400, TEXT, "incomplete request head\n")));
    };
    let Some(len) = alto::header(head, "content-length").and_then(|v| v.parse::<usize>().ok())
    else {
        return Ok(Err(reply(411, TEXT, "a body needs Content-Length\n")));
    };
    if len > alto::MAX_BODY {
        return Ok(Err(reply(
            413,
            TEXT,
            format!("the body may have at most {} bytes\n", alto::MAX_BODY),
        )));
    }
    let mut body = buf[end + 4..].to_vec();
    let mut chunk = [0u8; 4096];
    while body.len() < len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(reply(
                400,
                TEXT,
                "the body is shorter than Content-Length\n",
            )));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(Ok(body))
}

fn unauthorized(svc: &Service) -> Reply {
    let why = if svc.token.is_some() {
        "this address needs `Authorization: Bearer TOKEN` (docs/web.md says where the token is)\n"
    } else {
        "no token is configured for this non-loopback address: every data request is refused (docs/web.md)\n"
    };
    let mut r = reply(401, TEXT, why);
    r.extra = "WWW-Authenticate: Bearer realm=\"sidenet\"\r\n".into();
    r
}

/// The value of `key` in the query of `target`.
fn query<'a>(target: &'a str, key: &str) -> Option<&'a str> {
    target.split_once('?')?.1.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

async fn route(svc: &Service, target: &str, head: &str) -> Reply {
    let path = target.split('?').next().unwrap_or("");
    // Open routes: probes and the static page.
    match path {
        "/healthz" => return reply(200, TEXT, "ok\n"),
        "/readyz" => {
            let ready = match &svc.metrics {
                Some(m) => m.ready.load(Ordering::Relaxed),
                None => svc.view().await.is_ok(),
            };
            return if ready {
                reply(200, TEXT, "ready\n")
            } else {
                reply(503, TEXT, "not ready\n")
            };
        }
        _ => {}
    }
    if let Some((content_type, body)) = assets::get(path) {
        let mut r = reply(200, content_type, body);
        if content_type.starts_with("text/html") {
            r.extra = CSP.into();
        }
        return r;
    }
    let metrics_open = path == "/metrics" && svc.open_metrics;
    let known = matches!(path, "/metrics" | "/api/nodes" | "/api/netjson") || alto::is_route(path);
    if !known {
        return reply(404, TEXT, "not found\n");
    }
    if !metrics_open && !svc.authorized(head) {
        return unauthorized(svc);
    }
    if alto::is_route(path) {
        return from(alto::get(path, head, || svc.topology()).await);
    }
    match path {
        "/metrics" => {
            let body = match &svc.metrics {
                Some(m) => m.render(),
                None => match svc.view().await {
                    Ok(v) => metrics::standalone(&v.rows, &v.counters, v.manifest_errors.len()),
                    Err(e) => return reply(503, TEXT, format!("{e}\n")),
                },
            };
            reply(200, "text/plain; version=0.0.4; charset=utf-8", body)
        }
        "/api/nodes" => match svc.snapshot().await {
            Ok(s) => json(&s),
            Err(e) => reply(503, TEXT, format!("{e}\n")),
        },
        _ => match svc.snapshot().await {
            Ok(s) => match query(target, "mesh") {
                Some(m) if s.nodes.iter().any(|n| n.mesh == m) => json(&topology::netjson(&s, m)),
                Some(m) => reply(404, TEXT, format!("no mesh {m:?} among the nodes\n")),
                None => json(&topology::netjson_all(&s)),
            },
            Err(e) => reply(503, TEXT, format!("{e}\n")),
        },
    }
}

fn json<T: serde::Serialize>(v: &T) -> Reply {
    match serde_json::to_vec(v) {
        Ok(b) => reply(200, JSON, b),
        Err(e) => reply(500, TEXT, format!("{e}\n")),
    }
}

async fn respond(stream: &mut TcpStream, r: Reply, head_only: bool) -> std::io::Result<()> {
    let reason = match r.code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{}Connection: close\r\n\r\n",
        r.code,
        r.content_type,
        r.body.len(),
        r.extra
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(&r.body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_are_asked_off_loopback_only() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(!token_required(&addr("127.0.0.1:8480")));
        assert!(!token_required(&addr("[::1]:8480")));
        assert!(token_required(&addr("0.0.0.0:8480")));
        assert!(token_required(&addr("192.168.1.5:8480")));
        let mut svc = Service::new(addr("0.0.0.0:1"), Some("s3cret".into()));
        let req = |auth: &str| format!("GET /api/nodes HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n");
        assert!(svc.authorized(&req("Authorization: Bearer s3cret")));
        assert!(svc.authorized(&req("authorization:   Bearer s3cret ")));
        assert!(!svc.authorized(&req("Authorization: Bearer s3cre")));
        assert!(!svc.authorized(&req("Authorization: Basic s3cret")));
        assert!(!svc.authorized(&req("")));
        svc.token = None;
        assert!(!svc.authorized(&req("Authorization: Bearer ")));
        assert!(Service::new(addr("127.0.0.1:1"), None).authorized(&req("")));
    }

    #[test]
    fn queries_are_split() {
        assert_eq!(
            query("/api/netjson?mesh=riverside", "mesh"),
            Some("riverside")
        );
        assert_eq!(query("/api/netjson?a=1&mesh=x", "mesh"), Some("x"));
        assert_eq!(query("/api/netjson", "mesh"), None);
    }
}
