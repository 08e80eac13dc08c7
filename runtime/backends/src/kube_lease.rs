//! Leases as Kubernetes `coordination.k8s.io/v1` Lease objects, for pods placed by the API
//! server instead of a shared PostgreSQL.
//!
//! Every lease is one Lease in the backend's namespace, named as it is (lease names are
//! DNS-1123 labels) and labelled `lattice.dev/lease=true` so that [`LeaseBackend::list`] can
//! select ours. The holder is `spec.holderIdentity` (empty or absent once released), its peer
//! address the annotation `lattice.dev/peer-address`.
//!
//! Expiry follows client-go's leader election: a Lease is live while `renewTime +
//! leaseDurationSeconds` is after now *by the caller's clock*, so pods' clocks must roughly
//! agree (unlike [`crate::lease::PostgresLeases`], which asks the database's clock). Durations
//! are rounded up to whole seconds, the Lease's unit. Every write is a `replace` carrying the
//! `resourceVersion` just read (or a `create`), so of two pods racing for a Lease one gets a
//! 409 and is told it lost.
//!
//! Every API request is bounded by [`CALL_TIMEOUT`]; a timeout, an unreachable API server or
//! any answer other than "absent" or "changed meanwhile" is [`BackendError::Unavailable`].

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::BackendError;
use crate::lease::{LeaseBackend, LeaseRecord};

const BACKEND: &str = "kubernetes";
/// The label on every Lease this backend creates, and its selector.
const LABEL: &str = "lattice.dev/lease";
const SELECTOR: &str = "lattice.dev/lease=true";
/// The annotation holding the holder's peer address.
const ADDRESS: &str = "lattice.dev/peer-address";

/// How long one API request may take before the API server counts as unavailable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many Lease requests of one `renew` or `release` are in flight at once.
const CONCURRENCY: usize = 16;
/// How often `release` re-reads a Lease that changed under it and is still ours.
const RELEASE_ATTEMPTS: usize = 3;

/// Leases as `coordination.k8s.io/v1` Lease objects in one namespace.
#[derive(Debug, Clone)]
pub struct KubeLeases {
    api: Api<Lease>,
}

fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
    BackendError::unavailable(BACKEND, e)
}

/// One API request within [`CALL_TIMEOUT`]; any failure is [`BackendError::Unavailable`].
async fn bounded<T>(request: impl Future<Output = Result<T, kube::Error>>) -> Result<T, BackendError> {
    match tokio::time::timeout(CALL_TIMEOUT, request).await {
        Ok(answer) => answer.map_err(unavailable),
        Err(_) => Err(timed_out()),
    }
}

/// One write within [`CALL_TIMEOUT`]; `Ok(None)` when the API server answers with one of the
/// `lost` codes: the Lease is gone, already exists or changed since it was read, so another
/// holder got there first.
async fn contested<T>(
    request: impl Future<Output = Result<T, kube::Error>>,
    lost: &[u16],
) -> Result<Option<T>, BackendError> {
    match tokio::time::timeout(CALL_TIMEOUT, request).await {
        Ok(Ok(answer)) => Ok(Some(answer)),
        Ok(Err(kube::Error::Api(status))) if lost.contains(&status.code) => Ok(None),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(timed_out()),
    }
}

/// A `replace` with a stale resourceVersion (409 Conflict) or of a Lease deleted meanwhile (404).
const REPLACE_LOST: &[u16] = &[404, 409];
/// A `create` of a Lease created meanwhile (409 AlreadyExists). A 404 here is a missing
/// namespace, which is not a lost race.
const CREATE_LOST: &[u16] = &[409];

fn timed_out() -> BackendError {
    unavailable(format!("no answer from the Kubernetes API server within {CALL_TIMEOUT:?}"))
}

/// `duration` in the Lease's unit: whole seconds, rounded up, at least one.
fn whole_seconds(duration: Duration) -> i32 {
    let secs = duration.as_secs().saturating_add(u64::from(duration.subsec_nanos() > 0)).max(1);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

fn holder_of(spec: &LeaseSpec) -> &str {
    spec.holder_identity.as_deref().unwrap_or_default()
}

/// `renewTime + leaseDurationSeconds` is after `now`; a Lease never renewed is not live.
fn live(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(MicroTime(renewed)) = spec.renew_time else { return false };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    renewed.saturating_add(duration).is_ok_and(|until| until > now)
}

fn record(lease: &Lease, now: Timestamp) -> LeaseRecord {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseRecord {
        name: lease.metadata.name.clone().unwrap_or_default(),
        holder: holder_of(&spec).to_owned(),
        address: lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ADDRESS))
            .cloned()
            .unwrap_or_default(),
        live: live(&spec, now),
    }
}

/// Labels the Lease as ours and records the holder's address.
fn mark(metadata: &mut ObjectMeta, address: &str) {
    metadata.labels.get_or_insert_with(BTreeMap::new).insert(LABEL.to_owned(), "true".to_owned());
    metadata.annotations.get_or_insert_with(BTreeMap::new).insert(ADDRESS.to_owned(), address.to_owned());
}

impl KubeLeases {
    /// A client for Leases in `namespace`: from the kubeconfig file at `kubeconfig` (its
    /// current context), or when `None` inferred as kube does (`$KUBECONFIG` or
    /// `~/.kube/config`, else the pod's service account). Does not contact the API server.
    pub async fn new(namespace: &str, kubeconfig: Option<&Path>) -> Result<Self, BackendError> {
        let config = match kubeconfig {
            None => Config::infer().await.map_err(unavailable)?,
            Some(path) => {
                let file = Kubeconfig::read_from(path).map_err(unavailable)?;
                Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                    .await
                    .map_err(unavailable)?
            }
        };
        let client = Client::try_from(config).map_err(unavailable)?;
        Ok(Self { api: Api::namespaced(client, namespace) })
    }

    /// Renews `name` if `holder` holds it and it is live; `false` when it is lost.
    async fn renew_one(&self, name: &str, holder: &str, seconds: i32) -> Result<bool, BackendError> {
        let Some(mut lease) = bounded(self.api.get_opt(name)).await? else { return Ok(false) };
        let now = Timestamp::now();
        let Some(spec) = lease.spec.as_mut() else { return Ok(false) };
        if holder_of(spec) != holder || !live(spec, now) {
            return Ok(false);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        Ok(contested(self.api.replace(name, &PostParams::default(), &lease), REPLACE_LOST).await?.is_some())
    }

    /// Releases `name` if `holder` holds it; re-reads it when it changed meanwhile (a
    /// concurrent renewal of our own, say) and is still ours.
    async fn release_one(&self, name: &str, holder: &str) -> Result<(), BackendError> {
        for _ in 0..RELEASE_ATTEMPTS {
            let Some(mut lease) = bounded(self.api.get_opt(name)).await? else { return Ok(()) };
            let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
            if holder_of(spec) != holder {
                return Ok(());
            }
            // As client-go releases: no holder, and a one-second Lease renewed long enough ago
            // that it has already expired.
            let now = Timestamp::now();
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time =
                Some(MicroTime(now.saturating_sub(SignedDuration::from_secs(1)).unwrap_or(now)));
            if let Some(annotations) = lease.metadata.annotations.as_mut() {
                annotations.remove(ADDRESS);
            }
            if contested(self.api.replace(name, &PostParams::default(), &lease), REPLACE_LOST)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        tracing::warn!(lease = name, holder, "Lease kept changing while being released; left to expire");
        Ok(())
    }
}

#[async_trait]
impl LeaseBackend for KubeLeases {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LeaseRecord>, BackendError> {
        let leases = bounded(self.api.list(&ListParams::default().labels(SELECTOR))).await?;
        let now = Timestamp::now();
        let mut records: Vec<LeaseRecord> = leases
            .items
            .iter()
            .filter(|l| l.metadata.name.as_deref().is_some_and(|n| n.starts_with(prefix)))
            .map(|l| record(l, now))
            .collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    async fn acquire(
        &self,
        name: &str,
        holder: &str,
        address: &str,
        duration: Duration,
    ) -> Result<bool, BackendError> {
        let seconds = whole_seconds(duration);
        let existing = bounded(self.api.get_opt(name)).await?;
        let now = Timestamp::now();
        let Some(mut lease) = existing else {
            let mut lease = Lease {
                metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.to_owned()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            mark(&mut lease.metadata, address);
            // 409 AlreadyExists: another pod created it since we looked.
            return Ok(contested(self.api.create(&PostParams::default(), &lease), CREATE_LOST)
                .await?
                .is_some());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let current = holder_of(spec);
        let ours = current == holder;
        if !ours && !current.is_empty() && live(spec, now) {
            return Ok(false);
        }
        if !ours {
            // A new holder: a transition, and a new acquisition time.
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            spec.acquire_time = Some(MicroTime(now));
            spec.holder_identity = Some(holder.to_owned());
        }
        spec.acquire_time.get_or_insert(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        mark(&mut lease.metadata, address);
        // The metadata read above carries its resourceVersion: a concurrent writer makes this
        // replace fail with 409 Conflict, and we lost the race.
        Ok(contested(self.api.replace(name, &PostParams::default(), &lease), REPLACE_LOST).await?.is_some())
    }

    async fn renew(
        &self,
        names: &[String],
        holder: &str,
        duration: Duration,
    ) -> Result<Vec<String>, BackendError> {
        let seconds = whole_seconds(duration);
        // Each name once: two concurrent renewals of one Lease would conflict with each other.
        let mut seen = HashSet::with_capacity(names.len());
        let unique: Vec<&String> = names.iter().filter(|name| seen.insert(name.as_str())).collect();
        // The requests are made before the stream runs them: closures inside a stream held
        // across an await trip the compiler's `Send` check of `async_trait` futures.
        let requests: Vec<_> = unique.iter().map(|name| self.renew_one(name, holder, seconds)).collect();
        let kept: Vec<bool> = futures::stream::iter(requests).buffered(CONCURRENCY).try_collect().await?;
        Ok(unique.into_iter().zip(kept).filter(|(_, kept)| *kept).map(|(name, _)| name.clone()).collect())
    }

    async fn release(&self, names: &[String], holder: &str) -> Result<(), BackendError> {
        let requests: Vec<_> = names.iter().map(|name| self.release_one(name, holder)).collect();
        futures::stream::iter(requests).buffer_unordered(CONCURRENCY).try_collect().await
    }
}
