//! Leases: who owns a Durable Object shard (and who is a live shard member) for placement.
//!
//! A lease is a named record `(holder, address, expiry)`. The [`LeaseBackend`] trait is the seam
//! between the runtime's placement loop and where leases live: a row in PostgreSQL
//! ([`PostgresLeases`], outside Kubernetes) or a `coordination.k8s.io/v1` Lease
//! ([`crate::kube_lease::KubeLeases`]). Names are DNS-1123 labels (lower-case letters, digits and
//! `-`, at most 63 characters) so that both backends can use them as they are.
//!
//! A lease is *not* a fencing token by itself: a paused former holder does not know it lost it.
//! Fencing is the shard epoch in the object store, bumped on every acquisition (see
//! `ObjectStorageBackend::acquire_shard`).

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use tokio::sync::OnceCell;

use crate::BackendError;

/// One lease as its backend sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub name: String,
    /// Empty when released.
    pub holder: String,
    /// The holder's peer address (where other pods forward calls).
    pub address: String,
    /// Unexpired, judged by the backend's clock (PostgreSQL's `now()`; for Kubernetes the
    /// caller's clock against `renewTime + leaseDurationSeconds`, as client-go does).
    pub live: bool,
}

impl LeaseRecord {
    /// Held by someone and not expired.
    pub fn held(&self) -> bool {
        self.live && !self.holder.is_empty()
    }
}

#[async_trait]
pub trait LeaseBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Every lease whose name starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<LeaseRecord>, BackendError>;
    /// Takes `name` for `holder` when it is free, expired, or `holder`'s already; `Ok(false)`
    /// when someone else holds it. A take from another holder counts a transition.
    async fn acquire(
        &self,
        name: &str,
        holder: &str,
        address: &str,
        duration: Duration,
    ) -> Result<bool, BackendError>;
    /// Extends those of `names` that `holder` still holds and that have not expired; returns
    /// the names renewed. A name missing from the answer is lost.
    async fn renew(
        &self,
        names: &[String],
        holder: &str,
        duration: Duration,
    ) -> Result<Vec<String>, BackendError>;
    /// Gives `names` up at once (those `holder` holds), so another pod can take them without
    /// waiting for them to expire.
    async fn release(&self, names: &[String], holder: &str) -> Result<(), BackendError>;
}

const BACKEND: &str = "postgres";

const LEASES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS lattice_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    address TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    transitions BIGINT NOT NULL
);
";

/// Leases as rows of `lattice_leases`; expiry is judged by the database's clock, so pods'
/// clocks do not matter.
#[derive(Debug, Clone)]
pub struct PostgresLeases {
    pool: PgPool,
    schema: std::sync::Arc<OnceCell<()>>,
}

fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
    BackendError::unavailable(BACKEND, e)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PostgresLeases {
    /// Connects lazily.
    pub fn new(url: &str) -> Result<Self, BackendError> {
        Ok(Self { pool: crate::postgres::pool(url)?, schema: Default::default() })
    }

    async fn ready(&self) -> Result<(), BackendError> {
        crate::postgres::ensure_schema(&self.schema, &self.pool, LEASES_SCHEMA).await
    }
}

#[async_trait]
impl LeaseBackend for PostgresLeases {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LeaseRecord>, BackendError> {
        crate::postgres::bounded(async {
            self.ready().await?;
            let rows: Vec<(String, String, String, bool)> = sqlx::query_as(
                "SELECT name, holder, address, expires_at > now() FROM lattice_leases
                 WHERE starts_with(name, $1) ORDER BY name",
            )
            .bind(prefix)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(rows
                .into_iter()
                .map(|(name, holder, address, live)| LeaseRecord { name, holder, address, live })
                .collect())
        })
        .await
    }

    async fn acquire(
        &self,
        name: &str,
        holder: &str,
        address: &str,
        duration: Duration,
    ) -> Result<bool, BackendError> {
        crate::postgres::bounded(async {
            self.ready().await?;
            let taken: Option<String> = sqlx::query_scalar(
                "INSERT INTO lattice_leases AS l (name, holder, address, expires_at, transitions)
                 VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond', 1)
                 ON CONFLICT (name) DO UPDATE SET
                     holder = EXCLUDED.holder,
                     address = EXCLUDED.address,
                     expires_at = EXCLUDED.expires_at,
                     transitions = l.transitions + CASE WHEN l.holder = EXCLUDED.holder THEN 0 ELSE 1 END
                 WHERE l.holder = EXCLUDED.holder OR l.holder = '' OR l.expires_at <= now()
                 RETURNING name",
            )
            .bind(name)
            .bind(holder)
            .bind(address)
            .bind(millis(duration))
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(taken.is_some())
        })
        .await
    }

    async fn renew(
        &self,
        names: &[String],
        holder: &str,
        duration: Duration,
    ) -> Result<Vec<String>, BackendError> {
        if names.is_empty() {
            return Ok(vec![]);
        }
        crate::postgres::bounded(async {
            self.ready().await?;
            sqlx::query_scalar(
                "UPDATE lattice_leases SET expires_at = now() + $3 * interval '1 millisecond'
                 WHERE name = ANY($1) AND holder = $2 AND expires_at > now()
                 RETURNING name",
            )
            .bind(names)
            .bind(holder)
            .bind(millis(duration))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)
        })
        .await
    }

    async fn release(&self, names: &[String], holder: &str) -> Result<(), BackendError> {
        if names.is_empty() {
            return Ok(());
        }
        crate::postgres::bounded(async {
            self.ready().await?;
            sqlx::query(
                "UPDATE lattice_leases SET holder = '', address = '', expires_at = now()
                 WHERE name = ANY($1) AND holder = $2",
            )
            .bind(names)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(unavailable)
        })
        .await
    }
}
