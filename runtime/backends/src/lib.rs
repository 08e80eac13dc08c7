//! Lattice backends: one trait per binding, implementations picked by name from the config file.
//!
//! The binding layer (`crate::bindings`) owns validation, limits and workerd semantics; a
//! backend only stores and fetches. Every backend error that is not the guest's fault becomes
//! [`BackendError::Unavailable`]: the guest sees `unavailable` with a retry-after, the details
//! go to the log.
//!
//! Layout: the traits and their value types are here, one module per infrastructure:
//! [`sqlite`] (embedded D1, KV and Durable Object storage on SQLite files), [`fs`] (embedded R2
//! on a directory), [`postgres`] (D1 and Durable Object storage), [`redis`] (KV), [`s3`] (R2)
//! and [`kube_lease`] (placement leases as Kubernetes Lease objects). `tests/contract.rs` holds
//! one contract per trait, run against every backend; `scripts/services.sh` starts the real
//! services it needs. Shard epochs are kept per `(namespace, shard)` in the Durable Object
//! store's database, and a [`Fence`] is checked in the same transaction as the writes it guards.

pub mod fs;
pub mod kube_lease;
pub mod lease;
mod pgwire;
pub mod postgres;
pub mod redis;
pub mod s3;
pub mod sqlite;

use async_trait::async_trait;

/// Why a backend call failed, as far as the binding layer needs to know.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend could not be reached, timed out or failed internally. Nothing was written.
    #[error("{backend} unavailable: {source}")]
    Unavailable {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A Durable Object write carried a stale shard epoch: another owner holds the shard.
    #[error("write fenced: shard {shard} epoch {epoch} is no longer current")]
    Fenced { shard: u32, epoch: u64 },
}

impl BackendError {
    pub fn unavailable(
        backend: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Unavailable { backend, source: source.into() }
    }
}

// ---------------------------------------------------------------------------------------------
// D1 (SQL)

/// A SQLite value as D1 sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct SqlStatement {
    pub sql: String,
    pub params: Vec<SqlValue>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryMeta {
    pub duration_ms: f64,
    pub changes: u64,
    pub last_row_id: i64,
    pub changed_db: bool,
    pub rows_read: u64,
    pub rows_written: u64,
    pub size_after: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryOutput {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
    pub meta: QueryMeta,
}

/// A fencing token: the shard and epoch a Durable Object event runs under. A SQL backend that
/// receives one checks it inside the same transaction as the statements.
///
/// It names the Durable Object namespace too, because shard epochs are kept per
/// `(namespace, shard)` (see [`ObjectStorageBackend::acquire_shard`]); this is why it is `Clone`
/// and not `Copy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub namespace: String,
    pub shard: u32,
    pub epoch: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// Statement `index` of the batch failed; the transaction was rolled back.
    #[error("statement {index}: {message}")]
    Statement { index: usize, message: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[async_trait]
pub trait SqlBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// The database this backend writes to, when it can also hold Durable Object storage: the
    /// runtime pairs a D1 binding with a namespace whose [`ObjectStorageBackend::database`]
    /// is the same (see [`Self::commit_with_object`]).
    fn database(&self) -> Option<&str> {
        None
    }
    /// Commits a Durable Object's storage write (under `epoch`, as
    /// [`ObjectStorageBackend::commit`] would) and, after it, each of `batches` (as
    /// [`Self::batch`] would, with the object's fence), in one transaction: one commit makes
    /// the object's writes and the D1 batches its events sent after them durable together.
    ///
    /// The write commits whatever the batches do: a batch that fails is left out and answered
    /// with its error. `Err` means nothing committed (a stale epoch is `Fenced`). Only for a
    /// backend whose [`Self::database`] holds the object's storage.
    async fn commit_with_object(
        &self,
        addr: &ObjectAddr,
        epoch: u64,
        write: ObjectWrite,
        batches: Vec<Vec<SqlStatement>>,
    ) -> Result<Vec<Result<Vec<QueryOutput>, SqlError>>, BackendError> {
        let _ = (addr, epoch, write, batches);
        Err(BackendError::unavailable(self.name(), "this database holds no Durable Object storage"))
    }
    /// Runs every statement in one transaction: all commit or none do.
    async fn batch(
        &self,
        statements: Vec<SqlStatement>,
        fence: Option<Fence>,
    ) -> Result<Vec<QueryOutput>, SqlError> {
        self.batch_ordered(statements, fence, None).await
    }
    /// [`SqlBackend::batch`] with the ticket a Durable Object event drew when it sealed its
    /// writes (tickets grow in the order events seal). A backend that commits concurrent
    /// fenced batches as one group runs the group in ticket order, so one object's batches
    /// keep the order of its events; concurrent batches have no other order to keep.
    async fn batch_ordered(
        &self,
        statements: Vec<SqlStatement>,
        fence: Option<Fence>,
        ticket: Option<u64>,
    ) -> Result<Vec<QueryOutput>, SqlError>;
    /// Whether the backend answers at all (for /readyz and metrics).
    async fn ping(&self) -> Result<(), BackendError>;
}

// ---------------------------------------------------------------------------------------------
// KV

#[derive(Debug, Clone, PartialEq)]
pub struct KvEntry {
    pub value: Vec<u8>,
    pub metadata: Option<String>,
    /// Seconds since the Unix epoch.
    pub expiration: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KvKey {
    pub name: String,
    pub expiration: Option<u64>,
    pub metadata: Option<String>,
}

/// Key-value storage. `now` (seconds since the epoch, from the runtime's clock) decides what is
/// expired: expired entries are invisible to `get` and `list`, and may be removed lazily.
#[async_trait]
pub trait KvBackend: Send + Sync {
    fn name(&self) -> &'static str;
    async fn get(&self, ns: &str, key: &str, now: u64) -> Result<Option<KvEntry>, BackendError>;
    /// Stores an entry; `now` (the runtime clock's seconds) lets a backend with native expiry
    /// set it relative to the caller's clock.
    async fn put(&self, ns: &str, key: &str, entry: KvEntry, now: u64) -> Result<(), BackendError>;
    async fn delete(&self, ns: &str, key: &str) -> Result<(), BackendError>;
    /// Up to `limit` live keys with `prefix`, strictly after `start_after`, in byte order.
    async fn list(
        &self,
        ns: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        now: u64,
    ) -> Result<Vec<KvKey>, BackendError>;
    async fn ping(&self) -> Result<(), BackendError>;
}

// ---------------------------------------------------------------------------------------------
// R2

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpMetadata {
    pub content_type: Option<String>,
    pub content_language: Option<String>,
    pub content_disposition: Option<String>,
    pub content_encoding: Option<String>,
    pub cache_control: Option<String>,
    pub cache_expiry: Option<u64>,
}

/// What R2 keeps about an object besides its body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectMeta {
    pub key: String,
    /// A fresh id per write.
    pub version: String,
    pub size: u64,
    /// Hex MD5 of the body, or `<md5 of part md5s>-<parts>` for multipart objects.
    pub etag: String,
    /// Milliseconds since the Unix epoch.
    pub uploaded: u64,
    pub http: HttpMetadata,
    pub custom: Vec<(String, String)>,
    pub md5: Option<Vec<u8>>,
    pub sha256: Option<Vec<u8>>,
}

/// A resolved byte range: `offset` and `length`, both within the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectList {
    pub objects: Vec<ObjectMeta>,
    pub delimited_prefixes: Vec<String>,
    pub truncated: bool,
    /// The last key or prefix returned; pass it back as `start_after`.
    pub cursor: Option<String>,
}

#[async_trait]
pub trait ObjectBackend: Send + Sync {
    fn name(&self) -> &'static str;
    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectMeta>, BackendError>;
    async fn get(
        &self,
        bucket: &str,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<(ObjectMeta, Vec<u8>)>, BackendError>;
    /// Stores the body and its metadata (already checked and completed by the binding layer).
    async fn put(&self, bucket: &str, meta: &ObjectMeta, body: Vec<u8>) -> Result<(), BackendError>;
    async fn delete(&self, bucket: &str, keys: &[String]) -> Result<(), BackendError>;
    async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ObjectList, BackendError>;
    /// Multipart: parts are kept until complete or abort.
    async fn put_part(
        &self,
        bucket: &str,
        upload_id: &str,
        part_number: u32,
        body: Vec<u8>,
    ) -> Result<(), BackendError>;
    /// Reads the parts in the order given, concatenated; `None` when one is missing.
    async fn take_parts(
        &self,
        bucket: &str,
        upload_id: &str,
        part_numbers: &[u32],
    ) -> Result<Option<Vec<Vec<u8>>>, BackendError>;
    async fn abort_parts(&self, bucket: &str, upload_id: &str) -> Result<(), BackendError>;
    async fn ping(&self) -> Result<(), BackendError>;
}

// ---------------------------------------------------------------------------------------------
// Durable Object storage

/// One object's address in its storage backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectAddr {
    pub namespace: String,
    /// 64 hex digits.
    pub id: String,
    pub shard: u32,
}

/// What one commit changes in an object's storage. Applied atomically, or not at all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectWrite {
    pub delete_all: bool,
    /// `None` deletes the key. Applied after `delete_all`.
    pub entries: Vec<(String, Option<Vec<u8>>)>,
    /// `Some(None)` clears the alarm, `Some(Some(ms))` sets it.
    pub alarm: Option<Option<u64>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectListRange {
    pub start: Option<String>,
    pub start_after: Option<String>,
    pub end: Option<String>,
    pub prefix: Option<String>,
    pub reverse: bool,
    pub limit: Option<usize>,
}

#[async_trait]
pub trait ObjectStorageBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// The database the objects are kept in, when a [`SqlBackend`] with the same
    /// [`SqlBackend::database`] can commit their writes ([`SqlBackend::commit_with_object`]).
    fn database(&self) -> Option<&str> {
        None
    }
    /// Takes ownership of a shard: bumps and returns its epoch. Writes carrying an older epoch
    /// are refused from then on.
    async fn acquire_shard(&self, namespace: &str, shard: u32) -> Result<u64, BackendError>;
    async fn get(&self, addr: &ObjectAddr, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, BackendError>;
    async fn list(
        &self,
        addr: &ObjectAddr,
        range: &ObjectListRange,
    ) -> Result<Vec<(String, Vec<u8>)>, BackendError>;
    async fn get_alarm(&self, addr: &ObjectAddr) -> Result<Option<u64>, BackendError>;
    /// Applies every write in one transaction, if `epoch` is still the shard's epoch.
    async fn commit(&self, addr: &ObjectAddr, epoch: u64, writes: &ObjectWrite) -> Result<(), BackendError>;
    /// Objects of `namespace` in `shards` whose alarm is due at `now_ms`.
    async fn due_alarms(
        &self,
        namespace: &str,
        shards: &[u32],
        now_ms: u64,
    ) -> Result<Vec<(ObjectAddr, u64)>, BackendError>;
    async fn ping(&self) -> Result<(), BackendError>;
}

// ---------------------------------------------------------------------------------------------
// Signals across processes

/// Carries `signal(key)` to every runtime process. Each process keeps its own parked requests;
/// a bus only fans keys out, so a signal published after a commit reaches every pod after it.
#[async_trait]
pub trait SignalBus: Send + Sync {
    fn name(&self) -> &'static str;
    /// Publishes `key` to every subscribed process (this one included).
    async fn publish(&self, key: &str) -> Result<(), BackendError>;
    /// Calls `deliver` for every key published anywhere, until the process ends; reconnects on
    /// its own after an outage (signals published during it are lost: parked requests still
    /// wake at their timeout).
    fn subscribe(&self, deliver: std::sync::Arc<dyn Fn(&str) + Send + Sync>);
}
