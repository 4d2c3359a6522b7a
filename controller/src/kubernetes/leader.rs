//! Leader election on a `coordination.k8s.io/v1` Lease, with the verbs the chart grants:
//! `get`, `create` and `update` (never `patch` or `delete`).
//!
//! Expiry is judged the way client-go does it: not by comparing the holder's `renewTime` with
//! our clock (clocks may be skewed), but by how long the Lease record has been unchanged since
//! *we* first saw it. A holder that stops renewing is replaced `leaseDurationSeconds` after its
//! last renewal was observed; a holder that cannot renew for `renew_deadline` gives up.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

/// Name of the Lease (fixed: one release per namespace).
pub const LEASE_NAME: &str = "sidenet-controller";

/// Lease timing. Client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// The holder gives up when it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// One candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    identity: String,
    timing: LeaseTiming,
    /// The Lease record last seen (holder, renew time, transitions) and when it changed.
    observed: Option<(String, Instant)>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("identity", &self.identity)
            .finish()
    }
}

fn record_of(spec: &LeaseSpec) -> String {
    format!(
        "{:?}|{:?}|{:?}",
        spec.holder_identity,
        spec.renew_time.as_ref().map(|t| t.0.to_string()),
        spec.lease_transitions
    )
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl Elector {
    /// A candidate named `identity` (the pod name) for the Lease in `api`'s namespace.
    pub fn new(api: Api<Lease>, identity: String, timing: LeaseTiming) -> Self {
        Self {
            api,
            identity,
            timing,
            observed: None,
        }
    }

    /// One attempt: `Ok(true)` when this candidate holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs(self.timing.duration)),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = record_of(&spec);
        let changed_at = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record, at));
                at
            }
        };
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let duration = spec
            .lease_duration_seconds
            .map_or(self.timing.duration, |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            });
        if !ours && !holder.is_empty() && changed_at.elapsed() < duration {
            return Ok(false);
        }
        let mut new = spec;
        if !ours {
            new.acquire_time = Some(now.clone());
            new.lease_transitions = Some(new.lease_transitions.unwrap_or(0) + 1);
            new.holder_identity = Some(self.identity.clone());
        }
        new.renew_time = Some(now);
        new.lease_duration_seconds = Some(secs(self.timing.duration));
        lease.spec = Some(new);
        // `replace` is an update carrying our resourceVersion: a concurrent writer makes it
        // fail with 409 instead of both believing they won.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                if let Some(s) = &l.spec {
                    self.observed = Some((record_of(s), Instant::now()));
                }
                if !ours {
                    tracing::info!(identity = %self.identity, "acquired the Lease {LEASE_NAME}");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!("Lease {LEASE_NAME}: {e}"),
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews the Lease until a renewal has failed for the renew deadline; then returns (the
    /// caller must stop reconciling at once).
    pub async fn hold(&mut self) {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            let attempt =
                tokio::time::timeout(self.timing.renew_deadline, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(true)) => last = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!("the Lease {LEASE_NAME} is held by another pod");
                    return;
                }
                Ok(Err(e)) => tracing::warn!("renewing the Lease {LEASE_NAME}: {e}"),
                Err(_) => tracing::warn!("renewing the Lease {LEASE_NAME}: timed out"),
            }
            if last.elapsed() >= self.timing.renew_deadline {
                tracing::error!(
                    "could not renew the Lease {LEASE_NAME} for {:?}",
                    self.timing.renew_deadline
                );
                return;
            }
        }
    }

    /// Gives the Lease up (on shutdown), so a standby takes over at its next retry instead of
    /// waiting for the Lease to expire.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!("released the Lease {LEASE_NAME}"),
            Err(e) => tracing::warn!("releasing the Lease {LEASE_NAME}: {e}"),
        }
    }
}
