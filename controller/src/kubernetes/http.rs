//! `/healthz`, `/readyz` and `/metrics` on `SIDENET_METRICS_LISTEN`: the shared HTTP service
//! ([`crate::web`]) with this adapter's counters. `/metrics` stays open there (Prometheus scrapes
//! it through the metrics Service); the map's data routes need the bearer token of
//! `SIDENET_HTTP_TOKEN_FILE` when the address is not loopback (docs/web.md).

pub use crate::web::metrics::{KINDS, Metrics};
