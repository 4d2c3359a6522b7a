//! The HTTP service in standalone mode ([`crate::web`], docs/web.md): the map, its JSON and
//! NetJSON, `/metrics`, `/healthz`, `/readyz`. The data comes from the engine task through the
//! same channel as the admin socket's `status` request (and the in-process `policies` one, for
//! the ALTO rate cost).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::admin::{Request, Response};
use crate::web::{Service, Source, View, ViewFuture};

/// A request to the engine task, as the admin socket sends them.
pub type AdminCall = (Request, oneshot::Sender<Response>);

/// Default listen address of the HTTP service.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8480";
/// File name of the generated token in the state folder.
pub const TOKEN_FILE: &str = "http-token";

/// Where the HTTP service listens.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Listen address.
    pub listen: SocketAddr,
    /// The address was given (`--http-listen`): failing to listen there stops the controller.
    /// The default address may be taken (another controller on the host): then the controller
    /// logs a warning and runs without the service.
    pub explicit: bool,
    /// Token file; `None`: `STATE/http-token`, created when first needed.
    pub token_file: Option<PathBuf>,
}

struct AdminSource(mpsc::Sender<AdminCall>);

impl Source for AdminSource {
    fn view(&self) -> ViewFuture<'_> {
        Box::pin(status(&self.0))
    }
}

/// Asks the engine task, as the admin socket does.
async fn ask(engine: &mpsc::Sender<AdminCall>, req: Request) -> Result<Response, String> {
    let stopping = || "the controller is stopping".to_string();
    let (tx, rx) = oneshot::channel();
    engine.send((req, tx)).await.map_err(|_| stopping())?;
    rx.await.map_err(|_| stopping())
}

/// The status table and the rollouts, asked of the engine task like the admin socket's
/// `status` and `rollout status`.
async fn status(engine: &mpsc::Sender<AdminCall>) -> Result<View, String> {
    let mut view = table(engine).await?;
    let req = Request::Rollout {
        action: "status".into(),
        mesh: None,
    };
    match ask(engine, req).await? {
        Response::Rollouts { rollouts } => view.rollouts = crate::web::rollout_views(&rollouts),
        Response::Error { message } => return Err(message),
        _ => return Err("unexpected answer to a rollout status request".to_string()),
    }
    match ask(engine, Request::Policies).await? {
        Response::Policies { policies } => view.policies = policies,
        Response::Error { message } => return Err(message),
        _ => return Err("unexpected answer to a policies request".to_string()),
    }
    Ok(view)
}

async fn table(engine: &mpsc::Sender<AdminCall>) -> Result<View, String> {
    match ask(engine, Request::Status).await {
        Ok(Response::Status {
            nodes,
            manifest_errors,
            counters,
            epoch,
            ..
        }) => Ok(View {
            rows: nodes,
            manifest_errors,
            counters,
            epoch,
            rollouts: Vec::new(),
            policies: Default::default(),
        }),
        Ok(Response::Error { message }) => Err(message),
        Ok(_) => Err("unexpected answer to a status request".to_string()),
        Err(e) => Err(e),
    }
}

/// Starts the service, if `http` says so.
pub async fn start(
    http: Option<&HttpOptions>,
    state: &Path,
    engine: mpsc::Sender<AdminCall>,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    let Some(h) = http else { return Ok(None) };
    let token = if crate::web::token_required(&h.listen) {
        let t = match &h.token_file {
            Some(p) => crate::web::read_token(p),
            None => crate::web::ensure_token(&state.join(TOKEN_FILE)),
        };
        Some(t.map_err(|e| format!("--http-listen {}: {e}", h.listen))?)
    } else {
        None
    };
    let listener = match tokio::net::TcpListener::bind(h.listen).await {
        Ok(l) => l,
        Err(e) if !h.explicit => {
            tracing::warn!(
                "the HTTP service (map, /metrics) is off: cannot listen on the default {}: {e} (give --http-listen)",
                h.listen
            );
            return Ok(None);
        }
        Err(e) => return Err(format!("--http-listen {}: {e}", h.listen)),
    };
    let addr = listener.local_addr().unwrap_or(h.listen);
    let mut svc = Service::new(h.listen, token);
    svc.source = Some(Arc::new(AdminSource(engine)));
    if svc.require_token {
        tracing::info!(
            "mesh map on http://{addr}/ (data routes need the bearer token of {})",
            h.token_file
                .clone()
                .unwrap_or_else(|| state.join(TOKEN_FILE))
                .display()
        );
    } else {
        tracing::info!("mesh map on http://{addr}/");
    }
    Ok(Some(tokio::spawn(crate::web::serve(
        listener,
        Arc::new(svc),
    ))))
}
