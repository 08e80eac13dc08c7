//! Leader election on a `coordination.k8s.io/Lease`, so two operator replicas never reconcile
//! at once (kube-runtime has none; this is client-go's leaderelection in small).
//!
//! A replica takes the Lease when it is free or expired, with optimistic concurrency on its
//! `resourceVersion`, and renews it every third of its duration. A replica that cannot renew
//! before the Lease would expire stops reconciling: `hold` returns and the binary exits, to be
//! restarted as a follower.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

/// How long a Lease stays valid without renewal (client-go's default).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often a follower looks whether the Lease is free.
const RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election Lease {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost the leader election Lease {name} to {holder}")]
    Lost { name: String, holder: String },
}

#[derive(Debug, Clone)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElection {
    pub fn new(api: Api<Lease>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self { api, name: name.into(), identity: identity.into(), duration: LEASE_DURATION }
    }

    /// A Lease duration other than `LEASE_DURATION` (whole seconds, at least one).
    #[must_use]
    pub fn with_duration(mut self, duration: Duration) -> Self {
        self.duration = duration.max(Duration::from_secs(1));
        self
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api { name: self.name.clone(), source }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        loop {
            if self.try_acquire().await? {
                tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                return Ok(());
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Takes the Lease if it is free, expired or already ours.
    pub async fn try_acquire(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(|e| self.err(e))? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(now, 0, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours && !expired(&spec, now) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { spec.acquire_time.map_or(now, |t| t.0) } else { now };
        lease.spec = Some(self.spec(acquired, transitions, now));
        // `replace` carries the resourceVersion read above: a concurrent taker makes it fail.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Renews the Lease until renewal fails for longer than the Lease lasts; then returns why.
    pub async fn hold(&self) -> LeaderError {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    let holder = self
                        .api
                        .get_opt(&self.name)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|l| l.spec?.holder_identity)
                        .unwrap_or_default();
                    return LeaderError::Lost { name: self.name.clone(), holder };
                }
                Err(e) if last_renewed.elapsed() >= self.duration => return e,
                Err(e) => tracing::warn!(error = %e, "renewing the leader Lease failed; retrying"),
            }
        }
    }

    fn spec(&self, acquired: Timestamp, transitions: i32, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(15)),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().map(|t| t.0) else { return true };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renewed.checked_add(duration).is_ok_and(|until| until < now)
}
