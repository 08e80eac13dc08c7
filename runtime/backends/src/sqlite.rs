//! Embedded defaults on SQLite files: D1 ([`SqliteSql`]), KV ([`SqliteKv`]) and Durable Object
//! storage ([`SqliteObjectStorage`]).
//!
//! Each backend owns one connection to its file (WAL journal, `synchronous=FULL`, a busy
//! timeout) behind a mutex, and runs every call on tokio's blocking pool, so SQLite never blocks
//! the async runtime. Calls on one backend are serialised; that is SQLite's own write model, and
//! embedded mode has one process.
//!
//! Keys that are ordered (KV keys, Durable Object storage keys) are stored as BLOBs, so that
//! SQLite compares them with `memcmp`: byte order of the UTF-8 encoding, as workerd does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};

use crate::{
    BackendError, Fence, KvBackend, KvEntry, KvKey, ObjectAddr, ObjectListRange, ObjectStorageBackend,
    ObjectWrite, QueryMeta, QueryOutput, SqlBackend, SqlError, SqlStatement, SqlValue,
};

/// How long a statement waits for a lock held by another connection to the same file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows deleted per lazy clean-up of expired KV entries, so one `list` stays cheap.
const EXPIRED_SWEEP_LIMIT: usize = 256;

/// The table of shard epochs, shared by [`SqliteObjectStorage`] and the fence check of
/// [`SqliteSql`] when both use the same file.
const SHARDS_TABLE: &str = "_lattice_do_shards";

/// One SQLite connection used from tokio's blocking pool.
#[derive(Clone)]
pub(crate) struct SqliteDb {
    backend: &'static str,
    path: Arc<PathBuf>,
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDb").field("backend", &self.backend).field("path", &self.path).finish()
    }
}

impl SqliteDb {
    /// Opens (creating it if needed) the file and runs `schema` once.
    pub(crate) async fn open(
        backend: &'static str,
        path: impl AsRef<Path>,
        schema: &'static str,
    ) -> Result<Self, BackendError> {
        let path = path.as_ref().to_path_buf();
        let opened = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> rusqlite::Result<Connection> {
            let conn = Connection::open(&opened)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // `journal_mode` answers with a row, so it is read rather than executed.
            let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
            conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
            conn.execute_batch(schema)?;
            Ok(conn)
        })
        .await
        .map_err(|e| BackendError::unavailable(backend, e))?
        .map_err(|e| BackendError::unavailable(backend, e))?;
        Ok(Self { backend, path: Arc::new(path), conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `f` with the connection on the blocking pool.
    pub(crate) async fn call<T, E>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<BackendError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let backend = self.backend;
        tokio::task::spawn_blocking(move || {
            // A panic while the lock was held leaves no open transaction behind (rusqlite rolls
            // back on drop), so a poisoned lock is still a usable connection.
            let mut guard = conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut guard)
        })
        .await
        .map_err(|e| E::from(BackendError::unavailable(backend, e)))?
    }

    pub(crate) fn backend(&self) -> &'static str {
        self.backend
    }
}

/// Maps a rusqlite error to `Unavailable`.
pub(crate) fn unavailable(backend: &'static str) -> impl Fn(rusqlite::Error) -> BackendError {
    move |e| BackendError::unavailable(backend, e)
}

/// The smallest byte string greater than every string that starts with `prefix`, or `None`
/// when there is none (the prefix is empty or all `0xff`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn now_ms_f64(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// D1

/// D1 over one SQLite database file, with miniflare's result meta.
///
/// Meta: `changes` is the delta of `sqlite3_total_changes()` over the statement, `last_row_id` is
/// `sqlite3_last_insert_rowid()`, `size_after` is `page_count * page_size`, and `changed_db` is
/// true when the changes, the last row id or the size moved (as miniflare computes it).
/// `rows_read` and `rows_written` are best effort: rows returned and rows changed, not the SQLite
/// VM's cursor counters that D1 reports.
///
/// Fencing: embedded mode is the degenerate case where one process owns every shard, so a
/// [`Fence`] is trivially satisfied. It is still checked, inside the batch's transaction, when the
/// database file also holds [`SqliteObjectStorage`]'s shard table (`_lattice_do_shards`), i.e.
/// when D1 and Durable Object storage share a file; a shard with no row there is not fenced.
///
/// Group commit: fenced batches (the writes Durable Objects make) queue up and the first to get
/// the connection commits every queued one in one transaction, each in its own savepoint, so
/// many batches share one fsync and each still commits or fails alone.
#[derive(Debug, Clone)]
pub struct SqliteSql {
    db: SqliteDb,
    group: Arc<Mutex<Vec<GroupJob>>>,
}

struct GroupJob {
    statements: Vec<SqlStatement>,
    fence: Option<Fence>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<QueryOutput>, SqlError>>,
    /// The ticket of [`SqlBackend::batch_ordered`]: a group runs its jobs in ticket order.
    ticket: Option<u64>,
}

impl std::fmt::Debug for GroupJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupJob").field("statements", &self.statements.len()).finish_non_exhaustive()
    }
}

impl SqliteSql {
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, BackendError> {
        Ok(Self { db: SqliteDb::open("sqlite", path, "").await?, group: Default::default() })
    }

    async fn grouped(
        &self,
        statements: Vec<SqlStatement>,
        fence: Option<Fence>,
        ticket: Option<u64>,
    ) -> Result<Vec<QueryOutput>, SqlError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.group.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(GroupJob {
            statements,
            fence,
            reply,
            ticket,
        });
        let queue = Arc::clone(&self.group);
        let backend = self.db.backend();
        self.db
            .call(move |conn| -> Result<(), SqlError> {
                let mut jobs: Vec<GroupJob> =
                    std::mem::take(&mut *queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
                // In the order the objects' events sealed, not the order they queued.
                jobs.sort_by_key(|j| j.ticket);
                if jobs.is_empty() {
                    // An earlier caller committed this batch with its group.
                    return Ok(());
                }
                commit_group(conn, jobs, backend);
                Ok(())
            })
            .await?;
        answer.await.unwrap_or_else(|_| {
            Err(SqlError::Backend(BackendError::unavailable(
                backend,
                "the group commit carrying this batch failed",
            )))
        })
    }
}

/// Commits queued batches in one transaction, each in a savepoint, and answers each. A batch
/// whose statement fails while others are in the group runs once more after them before its
/// error is final (as on PostgreSQL: concurrent batches have no order of their own).
fn commit_group(conn: &mut Connection, jobs: Vec<GroupJob>, backend: &'static str) {
    let fail_all = |jobs: Vec<GroupJob>, e: rusqlite::Error| {
        let message = e.to_string();
        for j in jobs {
            let _ = j.reply.send(Err(SqlError::Backend(BackendError::unavailable(backend, message.clone()))));
        }
    };
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(t) => t,
        Err(e) => return fail_all(jobs, e),
    };
    let run = |tx: &mut rusqlite::Transaction<'_>, job: &GroupJob| -> Result<Vec<QueryOutput>, SqlError> {
        let sp = tx.savepoint().map_err(unavailable(backend))?;
        if let Some(fence) = &job.fence {
            check_sql_fence(&sp, fence, backend)?;
        }
        let mut outputs = Vec::with_capacity(job.statements.len());
        for (index, st) in job.statements.iter().enumerate() {
            // On error the savepoint is dropped, which rolls it back.
            outputs.push(run_statement(&sp, index, st, backend)?);
        }
        sp.commit().map_err(unavailable(backend))?;
        Ok(outputs)
    };
    let mut results: Vec<Result<Vec<QueryOutput>, SqlError>> =
        jobs.iter().map(|job| run(&mut tx, job)).collect();
    if jobs.len() > 1 {
        for (job, out) in jobs.iter().zip(results.iter_mut()) {
            if matches!(out, Err(SqlError::Statement { .. })) {
                *out = run(&mut tx, job);
            }
        }
    }
    if let Err(e) = tx.commit() {
        return fail_all(jobs, e);
    }
    for (job, out) in jobs.into_iter().zip(results) {
        let _ = job.reply.send(out);
    }
}

/// Whether a SQLite error is the backend's fault (I/O, locks, corruption) rather than the
/// statement's.
fn is_infrastructure(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => matches!(
            f.code,
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::DatabaseCorrupt
                | ErrorCode::NotADatabase
                | ErrorCode::OutOfMemory
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::ReadOnly
        ),
        _ => false,
    }
}

fn statement_error(backend: &'static str, index: usize, e: rusqlite::Error) -> SqlError {
    if is_infrastructure(&e) {
        SqlError::Backend(BackendError::unavailable(backend, e))
    } else {
        let message = match &e {
            rusqlite::Error::SqliteFailure(_, Some(msg)) => msg.clone(),
            other => other.to_string(),
        };
        SqlError::Statement { index, message }
    }
}

fn to_sql_value(v: &SqlValue) -> ToSqlOutput<'_> {
    match v {
        SqlValue::Null => ToSqlOutput::Borrowed(ValueRef::Null),
        SqlValue::Integer(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
        SqlValue::Real(r) => ToSqlOutput::Borrowed(ValueRef::Real(*r)),
        SqlValue::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        SqlValue::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
    }
}

fn from_value_ref(v: ValueRef<'_>) -> SqlValue {
    match v {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(i) => SqlValue::Integer(i),
        ValueRef::Real(r) => SqlValue::Real(r),
        ValueRef::Text(t) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
    }
}

fn db_size(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(u64::try_from(pages.saturating_mul(size)).unwrap_or(0))
}

fn run_statement(
    conn: &Connection,
    index: usize,
    st: &SqlStatement,
    backend: &'static str,
) -> Result<QueryOutput, SqlError> {
    let err = |e| statement_error(backend, index, e);
    let start = Instant::now();
    let changes_before = conn.total_changes();
    let rowid_before = conn.last_insert_rowid();
    let size_before = db_size(conn).map_err(unavailable(backend))?;

    let mut stmt = conn.prepare(&st.sql).map_err(err)?;
    let expected = stmt.parameter_count();
    // workerd refuses a count that differs either way; SQLite alone would bind NULL to the
    // missing ones, and PostgreSQL refuses them too.
    if st.params.len() != expected {
        return Err(SqlError::Statement {
            index,
            message: format!(
                "Wrong number of parameter bindings for SQL query: {} given, {} expected",
                st.params.len(),
                expected
            ),
        });
    }
    for (i, p) in st.params.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, to_sql_value(p)).map_err(err)?;
    }
    let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    let width = columns.len();
    let mut out_rows = Vec::new();
    {
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next().map_err(err)? {
            let mut values = Vec::with_capacity(width);
            for c in 0..width {
                values.push(from_value_ref(row.get_ref(c).map_err(err)?));
            }
            out_rows.push(values);
        }
    }
    drop(stmt);

    let changes = conn.total_changes().saturating_sub(changes_before);
    let last_row_id = conn.last_insert_rowid();
    let size_after = db_size(conn).map_err(unavailable(backend))?;
    let meta = QueryMeta {
        duration_ms: now_ms_f64(start),
        changes,
        last_row_id,
        changed_db: changes != 0 || last_row_id != rowid_before || size_after != size_before,
        rows_read: out_rows.len() as u64,
        rows_written: changes,
        size_after,
    };
    Ok(QueryOutput { columns, rows: out_rows, meta })
}

fn check_sql_fence(tx: &Connection, fence: &Fence, backend: &'static str) -> Result<(), BackendError> {
    let has_table: bool = tx
        .query_row(
            "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type='table' AND name=?1)",
            [SHARDS_TABLE],
            |r| r.get(0),
        )
        .map_err(unavailable(backend))?;
    if !has_table {
        return Ok(());
    }
    let current: Option<i64> = tx
        .query_row(
            "SELECT epoch FROM _lattice_do_shards WHERE namespace=?1 AND shard=?2",
            params![fence.namespace, fence.shard],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable(backend))?;
    match current {
        Some(e) if u64::try_from(e).ok() != Some(fence.epoch) => {
            Err(BackendError::Fenced { shard: fence.shard, epoch: fence.epoch })
        }
        _ => Ok(()),
    }
}

#[async_trait]
impl SqlBackend for SqliteSql {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn batch_ordered(
        &self,
        statements: Vec<SqlStatement>,
        fence: Option<Fence>,
        ticket: Option<u64>,
    ) -> Result<Vec<QueryOutput>, SqlError> {
        if fence.is_some() {
            return self.grouped(statements, fence, ticket).await;
        }
        let backend = self.db.backend();
        self.db
            .call(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(unavailable(backend))?;
                if let Some(fence) = &fence {
                    check_sql_fence(&tx, fence, backend)?;
                }
                let mut outputs = Vec::with_capacity(statements.len());
                for (index, st) in statements.iter().enumerate() {
                    // On error the transaction is dropped, which rolls it back.
                    outputs.push(run_statement(&tx, index, st, backend)?);
                }
                tx.commit().map_err(unavailable(backend))?;
                Ok(outputs)
            })
            .await
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let backend = self.db.backend();
        self.db
            .call(move |conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable(backend)))
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// KV

const KV_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _lattice_kv (
    namespace TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    expiration INTEGER,
    metadata TEXT,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _lattice_kv_expiration ON _lattice_kv (namespace, expiration)
    WHERE expiration IS NOT NULL;
";

/// KV in one SQLite file, laid out like miniflare's `_mf_entries` (key, value, expiration,
/// metadata) with a namespace column. An entry is expired once `expiration <= now`; expired
/// entries are invisible and deleted lazily by `get` and `list`.
#[derive(Debug, Clone)]
pub struct SqliteKv {
    db: SqliteDb,
}

impl SqliteKv {
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, BackendError> {
        Ok(Self { db: SqliteDb::open("sqlite-kv", path, KV_SCHEMA).await? })
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|v| u64::try_from(v).unwrap_or(0))
}

#[async_trait]
impl KvBackend for SqliteKv {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn get(&self, ns: &str, key: &str, now: u64) -> Result<Option<KvEntry>, BackendError> {
        let backend = self.db.backend();
        let (ns, key) = (ns.to_owned(), key.to_owned());
        self.db
            .call(move |conn| {
                let row = conn
                    .query_row(
                        "SELECT value, metadata, expiration FROM _lattice_kv
                         WHERE namespace=?1 AND key=?2",
                        params![ns, key.as_bytes()],
                        |r| {
                            Ok(KvEntry {
                                value: r.get(0)?,
                                metadata: r.get(1)?,
                                expiration: opt_u64(r.get(2)?),
                            })
                        },
                    )
                    .optional()
                    .map_err(unavailable(backend))?;
                match row {
                    Some(entry) if entry.expiration.is_some_and(|e| e <= now) => {
                        conn.execute(
                            "DELETE FROM _lattice_kv WHERE namespace=?1 AND key=?2
                             AND expiration IS NOT NULL AND expiration <= ?3",
                            params![ns, key.as_bytes(), to_i64(now)],
                        )
                        .map_err(unavailable(backend))?;
                        Ok(None)
                    }
                    other => Ok(other),
                }
            })
            .await
    }

    async fn put(&self, ns: &str, key: &str, entry: KvEntry, _now: u64) -> Result<(), BackendError> {
        let backend = self.db.backend();
        let (ns, key) = (ns.to_owned(), key.to_owned());
        self.db
            .call(move |conn| {
                conn.execute(
                    "INSERT OR REPLACE INTO _lattice_kv (namespace, key, value, expiration, metadata)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![ns, key.as_bytes(), entry.value, entry.expiration.map(to_i64), entry.metadata],
                )
                .map(drop)
                .map_err(unavailable(backend))
            })
            .await
    }

    async fn delete(&self, ns: &str, key: &str) -> Result<(), BackendError> {
        let backend = self.db.backend();
        let (ns, key) = (ns.to_owned(), key.to_owned());
        self.db
            .call(move |conn| {
                conn.execute(
                    "DELETE FROM _lattice_kv WHERE namespace=?1 AND key=?2",
                    params![ns, key.as_bytes()],
                )
                .map(drop)
                .map_err(unavailable(backend))
            })
            .await
    }

    async fn list(
        &self,
        ns: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        now: u64,
    ) -> Result<Vec<KvKey>, BackendError> {
        let backend = self.db.backend();
        let ns = ns.to_owned();
        let lower = match start_after {
            Some(s) if s.as_bytes() >= prefix.as_bytes() => (s.as_bytes().to_vec(), false),
            _ => (prefix.as_bytes().to_vec(), true),
        };
        let upper = prefix_end(prefix.as_bytes());
        self.db
            .call(move |conn| {
                let sql = format!(
                    "SELECT key, expiration, metadata FROM _lattice_kv
                     WHERE namespace=?1 AND key {} ?2 AND (?3 IS NULL OR key < ?3)
                       AND (expiration IS NULL OR expiration > ?4)
                     ORDER BY key LIMIT ?5",
                    if lower.1 { ">=" } else { ">" }
                );
                let mut stmt = conn.prepare_cached(&sql).map_err(unavailable(backend))?;
                let keys = stmt
                    .query_map(params![ns, lower.0, upper, to_i64(now), to_i64(limit as u64)], |r| {
                        let name: Vec<u8> = r.get(0)?;
                        Ok(KvKey {
                            name: String::from_utf8_lossy(&name).into_owned(),
                            expiration: opt_u64(r.get(1)?),
                            metadata: r.get(2)?,
                        })
                    })
                    .map_err(unavailable(backend))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(unavailable(backend))?;
                drop(stmt);
                conn.execute(
                    "DELETE FROM _lattice_kv WHERE namespace=?1 AND key IN (
                        SELECT key FROM _lattice_kv WHERE namespace=?1
                        AND expiration IS NOT NULL AND expiration <= ?2 LIMIT ?3)",
                    params![ns, to_i64(now), to_i64(EXPIRED_SWEEP_LIMIT as u64)],
                )
                .map_err(unavailable(backend))?;
                Ok(keys)
            })
            .await
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let backend = self.db.backend();
        self.db
            .call(move |conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable(backend)))
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// Durable Object storage

const DO_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _lattice_do_shards (
    namespace TEXT NOT NULL,
    shard INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    PRIMARY KEY (namespace, shard)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _lattice_do_entries (
    namespace TEXT NOT NULL,
    object_id TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (namespace, object_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _lattice_do_alarms (
    namespace TEXT NOT NULL,
    object_id TEXT NOT NULL,
    shard INTEGER NOT NULL,
    scheduled_ms INTEGER NOT NULL,
    PRIMARY KEY (namespace, object_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _lattice_do_alarms_due
    ON _lattice_do_alarms (namespace, shard, scheduled_ms);
";

/// Durable Object storage in one SQLite file: shard epochs, entries and alarms.
///
/// `commit` runs in one `BEGIN IMMEDIATE` transaction that first checks the shard's epoch, so
/// two processes sharing the file are fenced exactly like two pods sharing PostgreSQL.
#[derive(Debug, Clone)]
pub struct SqliteObjectStorage {
    db: SqliteDb,
}

impl SqliteObjectStorage {
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, BackendError> {
        Ok(Self { db: SqliteDb::open("sqlite-do", path, DO_SCHEMA).await? })
    }
}

/// SQL conditions and parameters for an [`ObjectListRange`] over a BLOB `key` column, shared by
/// the SQLite and PostgreSQL stores. `placeholder(n)` renders the n-th (1-based) parameter.
pub(crate) fn list_range_sql(
    range: &ObjectListRange,
    first_param: usize,
    placeholder: impl Fn(usize) -> String,
) -> (String, Vec<Vec<u8>>) {
    let mut conds = String::new();
    let mut values: Vec<Vec<u8>> = Vec::new();
    let mut push = |op: &str, v: Vec<u8>, values: &mut Vec<Vec<u8>>| {
        values.push(v);
        conds.push_str(&format!(" AND key {op} {}", placeholder(first_param + values.len() - 1)));
    };
    if let Some(start) = &range.start {
        push(">=", start.as_bytes().to_vec(), &mut values);
    }
    if let Some(after) = &range.start_after {
        push(">", after.as_bytes().to_vec(), &mut values);
    }
    if let Some(end) = &range.end {
        push("<", end.as_bytes().to_vec(), &mut values);
    }
    if let Some(prefix) = &range.prefix {
        push(">=", prefix.as_bytes().to_vec(), &mut values);
        if let Some(end) = prefix_end(prefix.as_bytes()) {
            push("<", end, &mut values);
        }
    }
    let order = if range.reverse { "DESC" } else { "ASC" };
    let limit = match range.limit {
        Some(l) => format!(" LIMIT {l}"),
        None => String::new(),
    };
    (format!("{conds} ORDER BY key {order}{limit}"), values)
}

fn key_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[async_trait]
impl ObjectStorageBackend for SqliteObjectStorage {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn acquire_shard(&self, namespace: &str, shard: u32) -> Result<u64, BackendError> {
        let backend = self.db.backend();
        let namespace = namespace.to_owned();
        self.db
            .call(move |conn| {
                let epoch: i64 = conn
                    .query_row(
                        "INSERT INTO _lattice_do_shards (namespace, shard, epoch) VALUES (?1, ?2, 1)
                         ON CONFLICT (namespace, shard) DO UPDATE SET epoch = epoch + 1
                         RETURNING epoch",
                        params![namespace, shard],
                        |r| r.get(0),
                    )
                    .map_err(unavailable(backend))?;
                Ok(u64::try_from(epoch).unwrap_or(0))
            })
            .await
    }

    async fn get(&self, addr: &ObjectAddr, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
        let backend = self.db.backend();
        let addr = addr.clone();
        let keys = keys.to_vec();
        self.db
            .call(move |conn| {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT value FROM _lattice_do_entries
                         WHERE namespace=?1 AND object_id=?2 AND key=?3",
                    )
                    .map_err(unavailable(backend))?;
                let mut out = Vec::new();
                for key in keys {
                    let value: Option<Vec<u8>> = stmt
                        .query_row(params![addr.namespace, addr.id, key.as_bytes()], |r| r.get(0))
                        .optional()
                        .map_err(unavailable(backend))?;
                    if let Some(value) = value {
                        out.push((key, value));
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn list(
        &self,
        addr: &ObjectAddr,
        range: &ObjectListRange,
    ) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
        let backend = self.db.backend();
        let addr = addr.clone();
        let (tail, values) = list_range_sql(range, 3, |n| format!("?{n}"));
        self.db
            .call(move |conn| {
                let sql = format!(
                    "SELECT key, value FROM _lattice_do_entries
                     WHERE namespace=?1 AND object_id=?2{tail}"
                );
                let mut stmt = conn.prepare(&sql).map_err(unavailable(backend))?;
                stmt.raw_bind_parameter(1, &addr.namespace).map_err(unavailable(backend))?;
                stmt.raw_bind_parameter(2, &addr.id).map_err(unavailable(backend))?;
                for (i, v) in values.iter().enumerate() {
                    stmt.raw_bind_parameter(i + 3, v).map_err(unavailable(backend))?;
                }
                let mut rows = stmt.raw_query();
                let mut out = Vec::new();
                while let Some(row) = rows.next().map_err(unavailable(backend))? {
                    let key: Vec<u8> = row.get(0).map_err(unavailable(backend))?;
                    out.push((key_string(key), row.get(1).map_err(unavailable(backend))?));
                }
                Ok(out)
            })
            .await
    }

    async fn get_alarm(&self, addr: &ObjectAddr) -> Result<Option<u64>, BackendError> {
        let backend = self.db.backend();
        let addr = addr.clone();
        self.db
            .call(move |conn| {
                conn.query_row(
                    "SELECT scheduled_ms FROM _lattice_do_alarms WHERE namespace=?1 AND object_id=?2",
                    params![addr.namespace, addr.id],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map(opt_u64)
                .map_err(unavailable(backend))
            })
            .await
    }

    async fn commit(&self, addr: &ObjectAddr, epoch: u64, writes: &ObjectWrite) -> Result<(), BackendError> {
        let backend = self.db.backend();
        let addr = addr.clone();
        let writes = writes.clone();
        self.db
            .call(move |conn| {
                let err = unavailable(backend);
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
                let current: Option<i64> = tx
                    .query_row(
                        "SELECT epoch FROM _lattice_do_shards WHERE namespace=?1 AND shard=?2",
                        params![addr.namespace, addr.shard],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(&err)?;
                if current.and_then(|e| u64::try_from(e).ok()) != Some(epoch) {
                    return Err(BackendError::Fenced { shard: addr.shard, epoch });
                }
                if writes.delete_all {
                    tx.execute(
                        "DELETE FROM _lattice_do_entries WHERE namespace=?1 AND object_id=?2",
                        params![addr.namespace, addr.id],
                    )
                    .map_err(&err)?;
                }
                {
                    let mut put = tx
                        .prepare_cached(
                            "INSERT OR REPLACE INTO _lattice_do_entries
                             (namespace, object_id, key, value) VALUES (?1, ?2, ?3, ?4)",
                        )
                        .map_err(&err)?;
                    let mut del = tx
                        .prepare_cached(
                            "DELETE FROM _lattice_do_entries
                             WHERE namespace=?1 AND object_id=?2 AND key=?3",
                        )
                        .map_err(&err)?;
                    for (key, value) in &writes.entries {
                        match value {
                            Some(v) => put
                                .execute(params![addr.namespace, addr.id, key.as_bytes(), v])
                                .map_err(&err)?,
                            None => {
                                del.execute(params![addr.namespace, addr.id, key.as_bytes()]).map_err(&err)?
                            }
                        };
                    }
                }
                match writes.alarm {
                    Some(Some(ms)) => {
                        tx.execute(
                            "INSERT OR REPLACE INTO _lattice_do_alarms
                             (namespace, object_id, shard, scheduled_ms) VALUES (?1, ?2, ?3, ?4)",
                            params![addr.namespace, addr.id, addr.shard, to_i64(ms)],
                        )
                        .map_err(&err)?;
                    }
                    Some(None) => {
                        tx.execute(
                            "DELETE FROM _lattice_do_alarms WHERE namespace=?1 AND object_id=?2",
                            params![addr.namespace, addr.id],
                        )
                        .map_err(&err)?;
                    }
                    None => {}
                }
                tx.commit().map_err(&err)
            })
            .await
    }

    async fn due_alarms(
        &self,
        namespace: &str,
        shards: &[u32],
        now_ms: u64,
    ) -> Result<Vec<(ObjectAddr, u64)>, BackendError> {
        let backend = self.db.backend();
        let namespace = namespace.to_owned();
        let shards = shards.to_vec();
        self.db
            .call(move |conn| {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT object_id, scheduled_ms FROM _lattice_do_alarms
                         WHERE namespace=?1 AND shard=?2 AND scheduled_ms <= ?3
                         ORDER BY scheduled_ms",
                    )
                    .map_err(unavailable(backend))?;
                let mut out = Vec::new();
                for shard in shards {
                    let rows = stmt
                        .query_map(params![namespace, shard, to_i64(now_ms)], |r| {
                            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                        })
                        .map_err(unavailable(backend))?;
                    for row in rows {
                        let (id, ms) = row.map_err(unavailable(backend))?;
                        out.push((
                            ObjectAddr { namespace: namespace.clone(), id, shard },
                            u64::try_from(ms).unwrap_or(0),
                        ));
                    }
                }
                out.sort_by_key(|(_, ms)| *ms);
                Ok(out)
            })
            .await
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let backend = self.db.backend();
        self.db
            .call(move |conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable(backend)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_cases() {
        let check = |input: &[u8], expected: Option<&[u8]>| {
            assert_eq!(prefix_end(input).as_deref(), expected, "prefix_end({input:?})");
        };
        check(b"", None);
        check(b"a", Some(b"b"));
        check(b"a\xff", Some(b"b"));
        check(b"\xff\xff", None);
        check(b"ab", Some(b"ac"));
    }
}
