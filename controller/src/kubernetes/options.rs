//! The options of Kubernetes mode (the environment variables of docs/helm.md) and its error
//! type, shared by every part of the adapter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::leader::{self, LeaseTiming};

/// Options of Kubernetes mode (the environment variables of docs/helm.md).
#[derive(Debug, Clone)]
pub struct Options {
    /// Namespace to watch (`SIDENET_NAMESPACE`); `None` = all namespaces.
    pub namespace: Option<String>,
    /// External broker (`SIDENET_BROKER`); `None` runs the embedded broker.
    pub broker: Option<String>,
    /// Listen address of the embedded broker (`SIDENET_LISTEN`).
    pub listen: SocketAddr,
    /// TLS listener of the embedded broker (`SIDENET_TLS_LISTEN`, `SIDENET_TLS_CERT`,
    /// `SIDENET_TLS_KEY`).
    pub tls: Option<crate::transport::broker::TlsListen>,
    /// External broker user name (`SIDENET_BROKER_USERNAME`).
    pub broker_username: Option<String>,
    /// External broker password (`SIDENET_BROKER_PASSWORD`).
    pub broker_password: Option<String>,
    /// CA bundle for `mqtts://` (`SIDENET_BROKER_CA`).
    pub broker_ca: Option<PathBuf>,
    /// The external broker is Mosquitto with its dynamic security plugin, administered by the
    /// user above (`SIDENET_BROKER_DYNSEC`): node credentials and ACLs go there.
    pub broker_dynsec: bool,
    /// `/metrics`, `/healthz`, `/readyz` (`SIDENET_METRICS_LISTEN`); `None` serves nothing.
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token of the map's data routes on a non-loopback `metrics_listen` (read from
    /// `SIDENET_HTTP_TOKEN_FILE`, a mounted Secret); `None` refuses them there (docs/web.md).
    pub http_token: Option<String>,
    /// Take the Lease before reconciling (`SIDENET_LEADER_ELECTION`).
    pub leader_election: bool,
    /// Lease holder identity (`POD_NAME`).
    pub pod_name: String,
    /// Namespace of the Lease (`POD_NAMESPACE`).
    pub pod_namespace: String,
    /// Template folder (`SIDENET_TEMPLATES`).
    pub templates: PathBuf,
    /// Folder of the state database, a cache rebuilt from the cluster at every start.
    pub cache_dir: PathBuf,
    /// Agent binaries for `NodeProvision` objects, one folder per architecture
    /// (`SIDENET_AGENTS`).
    pub agents: PathBuf,
    /// Lease timing.
    pub lease: LeaseTiming,
    /// How often every object is reconciled even without a change (config renewal, Secrets).
    pub refresh: Duration,
    /// Connection limit of the embedded broker.
    pub max_connections: usize,
}

/// Kubernetes mode failed to start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// An API call failed.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// The core failed.
    #[error(transparent)]
    Core(#[from] crate::reconcile::core::CoreError),
    /// The state cache failed.
    #[error(transparent)]
    Store(#[from] crate::reconcile::store::StoreError),
    /// Templates are broken.
    #[error(transparent)]
    Render(#[from] crate::reconcile::render::RenderError),
    /// The embedded broker could not start.
    #[error(transparent)]
    Broker(#[from] crate::transport::broker::BrokerError),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<KubeError>>),
    /// Lost the Lease: stop publishing (the process exits and restarts as a standby).
    #[error(
        "lost the Lease {}; stopping so a restart comes back as a standby",
        leader::LEASE_NAME
    )]
    LeaseLost,
    /// Anything else.
    #[error("{0}")]
    Other(String),
}
