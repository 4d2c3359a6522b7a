//! The map's data in Kubernetes mode: the node table of the pod that reconciles, read from its
//! engine ([`crate::web::Source`]). A standby pod (or one still starting) has none: the data
//! routes answer 503 there.

use std::sync::{Arc, Mutex, Weak};

use super::engine::Ctx;
use crate::web::{Source, View, ViewFuture};

/// Where [`super::run`] leaves the context of the pod that reconciles, for the HTTP service.
pub type Slot = Arc<Mutex<Weak<Ctx>>>;

/// The engine's status table.
pub struct EngineSource(pub Slot);

impl Source for EngineSource {
    fn view(&self) -> ViewFuture<'_> {
        Box::pin(view(&self.0))
    }
}

async fn view(slot: &Slot) -> Result<View, String> {
    let ctx = slot.lock().ok().and_then(|w| w.upgrade()).ok_or_else(|| {
        "this pod does not reconcile (a standby, or still starting): ask the one holding the Lease"
            .to_string()
    })?;
    let engine = ctx
        .engine
        .get()
        .ok_or_else(|| "the engine is still loading the cluster's objects".to_string())?;
    let eng = engine.lock().await;
    Ok(View {
        rows: eng.ctl.status(),
        manifest_errors: eng
            .invalid
            .iter()
            .map(|(k, e)| format!("{k}: {e}"))
            .collect(),
        counters: eng.ctl.counters,
        epoch: eng.ctl.store.epoch,
        rollouts: crate::web::rollout_views(&eng.ctl.rollout_status(crate::now())),
        policies: Arc::new(crate::reconcile::alto::Policies::of(&eng.ctl.set)),
    })
}
