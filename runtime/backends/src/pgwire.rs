//! D1 on PostgreSQL, pipelined ([`Clients`], [`run_pipelined`]).
//!
//! sqlx waits for each statement's answer before it sends the next, so a batch of N statements
//! in a transaction cost N + 2 round trips. tokio-postgres sends a request as soon as its future
//! is first polled, so this module builds a batch's requests — `BEGIN`, the fence check, every
//! statement, `COMMIT` — and polls them in order: one round trip for the whole batch once its
//! statements are prepared (a second one the first time a connection sees a statement).
//!
//! An error in a pipelined transaction aborts it: every later request fails with
//! `in_failed_sql_transaction` and `COMMIT` rolls back, so nothing of a failed batch is kept.
//! The fence check is a statement that fails (division by zero) when the shard's epoch is not
//! the caller's, so a fenced batch aborts in the same round trip instead of committing.
//!
//! Connections are pooled here ([`Clients`]): at most [`MAX_CONNECTIONS`], connected lazily, each
//! with its own cache of prepared statements; a connection whose request was cancelled midway
//! (a timeout) or that saw an infrastructure error is closed instead of reused.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

use bytes::BufMut;
use futures::TryStreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, Kind, ToSql, Type};
use tokio_postgres::{Client, Config, NoTls, Statement};

use crate::postgres::{
    CONNECT_TIMEOUT, IDLE_IN_TRANSACTION_TIMEOUT_MS, MAX_CONNECTIONS, Translated, numeric_to_f64,
};
use crate::{BackendError, Fence, QueryMeta, QueryOutput, SqlError, SqlStatement, SqlValue};

const BACKEND: &str = "postgres";

/// A pooled connection idle at least this long is checked before it is used again.
const CHECK_IF_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
    BackendError::unavailable(BACKEND, e)
}

/// The fence as one statement: the shard's epoch read `FOR SHARE`; a different epoch divides by
/// zero, which aborts the batch's transaction. No row (a shard never acquired in this
/// database) passes, as before.
const FENCE_CHECK: &str = "SELECT CASE WHEN epoch = $3 THEN 0 ELSE 1 / (epoch - epoch) END AS fenced \
     FROM lattice_do_shards WHERE namespace = $1 AND shard = $2 FOR SHARE";

// ---------------------------------------------------------------------------------------------
// The pool

/// A pool of tokio-postgres connections.
pub(crate) struct Clients {
    config: Config,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients").finish_non_exhaustive()
    }
}

/// One connection and the statements prepared on it (by translated SQL and parameter types).
pub(crate) struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
    idle_since: Instant,
}

/// A connection taken from the pool; it goes back only when [`Lease::done`] said it is clean.
pub(crate) struct Lease<'a> {
    conn: Option<Conn>,
    clean: bool,
    pool: &'a Clients,
    _permit: OwnedSemaphorePermit,
}

impl Clients {
    pub(crate) fn new(url: &str) -> Result<Self, BackendError> {
        let mut config = Config::from_str(url).map_err(unavailable)?;
        config
            .application_name("lattice")
            .connect_timeout(CONNECT_TIMEOUT)
            // A client that stops inside a transaction (a paused pod) would keep its locks: the
            // server ends such sessions.
            .options(format!("-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}"));
        Ok(Self {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS as usize)),
        })
    }

    /// A connection: an idle one (checked with a round trip if it sat idle a while) or a new
    /// one; both within [`CONNECT_TIMEOUT`].
    pub(crate) async fn acquire(&self) -> Result<Lease<'_>, BackendError> {
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            let permit = self.permits.clone().acquire_owned().await.map_err(unavailable)?;
            loop {
                let candidate = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let Some(conn) = candidate else { break };
                if conn.client.is_closed() {
                    continue;
                }
                if conn.idle_since.elapsed() >= CHECK_IF_IDLE && conn.client.check_connection().await.is_err()
                {
                    continue;
                }
                return Ok(Lease { conn: Some(conn), clean: false, pool: self, _permit: permit });
            }
            let (client, connection) = self.config.connect(NoTls).await.map_err(unavailable)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "PostgreSQL connection ended");
                }
            });
            let conn = Conn { client, statements: HashMap::new(), idle_since: Instant::now() };
            Ok(Lease { conn: Some(conn), clean: false, pool: self, _permit: permit })
        })
        .await
        .map_err(unavailable)?
    }
}

impl Lease<'_> {
    pub(crate) fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a lease holds its connection until dropped")
    }

    /// Whether the operation finished with the connection healthy and outside any transaction,
    /// so that it may be reused. Until this says so, the connection is closed when dropped.
    pub(crate) fn set_clean(&mut self, clean: bool) {
        self.clean = clean;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take()
            && self.clean
            && !conn.client.is_closed()
        {
            conn.idle_since = Instant::now();
            self.pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        }
    }
}

impl Conn {
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Forgets every prepared statement (after PostgreSQL said a cached plan went stale).
    pub(crate) fn forget_statements(&mut self) {
        self.statements.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Values

/// A parameter as PostgreSQL receives it: the type it is declared with at prepare time and its
/// binary encoding. NULL is declared with OID 0 ("unspecified"), so it fits any column, as in
/// SQLite.
#[derive(Debug)]
struct Param<'a>(&'a SqlValue);

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            SqlValue::Null => return Ok(IsNull::Yes),
            SqlValue::Integer(v) => out.put_i64(*v),
            SqlValue::Real(v) => out.put_f64(*v),
            SqlValue::Text(v) => out.put_slice(v.as_bytes()),
            SqlValue::Blob(v) => out.put_slice(v),
        }
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

fn declared_type(v: &SqlValue) -> Type {
    match v {
        SqlValue::Null => Type::new("unspecified".into(), 0, Kind::Pseudo, "pg_catalog".into()),
        SqlValue::Integer(_) => Type::INT8,
        SqlValue::Real(_) => Type::FLOAT8,
        SqlValue::Text(_) => Type::TEXT,
        SqlValue::Blob(_) => Type::BYTEA,
    }
}

/// A statement's cache key: its text and its parameters' declared types (a statement prepared
/// for an `INT8` parameter must not be reused with a `TEXT` one).
fn cache_key(sql: &str, params: &[SqlValue]) -> String {
    let sig: String = params
        .iter()
        .map(|p| match p {
            SqlValue::Null => 'n',
            SqlValue::Integer(_) => 'i',
            SqlValue::Real(_) => 'r',
            SqlValue::Text(_) => 't',
            SqlValue::Blob(_) => 'b',
        })
        .collect();
    format!("{sig}\0{sql}")
}

/// A column's value as PostgreSQL sent it (binary), whatever its type.
struct Raw<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw)))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

fn fixed<const N: usize>(b: &[u8], column: &str) -> Result<[u8; N], String> {
    b.try_into().map_err(|_| format!("column {column:?}: {} bytes where {N} were expected", b.len()))
}

fn text(b: &[u8], column: &str) -> Result<SqlValue, String> {
    String::from_utf8(b.to_vec()).map(SqlValue::Text).map_err(|e| format!("column {column:?}: {e}"))
}

/// Statements a connection keeps prepared before it forgets them all.
const MAX_CACHED_STATEMENTS: usize = 1024;

/// Whether [`decode_value`] takes values of this type.
fn representable(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::INT2
            | Type::INT4
            | Type::INT8
            | Type::OID
            | Type::FLOAT4
            | Type::FLOAT8
            | Type::NUMERIC
            | Type::BOOL
            | Type::TEXT
            | Type::VARCHAR
            | Type::BPCHAR
            | Type::NAME
            | Type::CHAR
            | Type::UNKNOWN
            | Type::JSON
            | Type::JSONB
            | Type::UUID
            | Type::BYTEA
            | Type::VOID
    ) || ty.name() == "citext"
}

fn decode_value(ty: &Type, raw: Option<&[u8]>, column: &str) -> Result<SqlValue, String> {
    let Some(b) = raw else { return Ok(SqlValue::Null) };
    Ok(match *ty {
        Type::INT2 => SqlValue::Integer(i16::from_be_bytes(fixed(b, column)?).into()),
        Type::INT4 => SqlValue::Integer(i32::from_be_bytes(fixed(b, column)?).into()),
        Type::INT8 => SqlValue::Integer(i64::from_be_bytes(fixed(b, column)?)),
        Type::OID => SqlValue::Integer(u32::from_be_bytes(fixed(b, column)?).into()),
        Type::FLOAT4 => SqlValue::Real(f32::from_be_bytes(fixed(b, column)?).into()),
        Type::FLOAT8 => SqlValue::Real(f64::from_be_bytes(fixed(b, column)?)),
        Type::NUMERIC => SqlValue::Real(numeric_to_f64(b).map_err(|e| format!("column {column:?}: {e}"))?),
        Type::BOOL => SqlValue::Integer(i64::from(fixed::<1>(b, column)?[0] != 0)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::CHAR | Type::UNKNOWN | Type::JSON => {
            text(b, column)?
        }
        // Binary JSONB is a version byte (1) followed by the JSON text.
        Type::JSONB => text(b.get(1..).unwrap_or_default(), column)?,
        Type::UUID => {
            let h = hex::encode(b);
            if h.len() != 32 {
                return Err(format!("column {column:?}: bad UUID"));
            }
            SqlValue::Text(format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]))
        }
        Type::BYTEA => SqlValue::Blob(b.to_vec()),
        Type::VOID => SqlValue::Null,
        _ if ty.name() == "citext" => text(b, column)?,
        // `representable` refused such columns before the statement ran.
        _ => return Err(format!("column {column:?}: no decoding for type {}", ty.name())),
    })
}

// ---------------------------------------------------------------------------------------------
// Errors

/// How one batch failed.
pub(crate) enum BatchError {
    Sql(SqlError),
    /// PostgreSQL refused a cached prepared statement because a table changed under it: nothing
    /// was committed; forget the statements and run the batch again.
    StalePlan,
}

impl From<BackendError> for BatchError {
    fn from(e: BackendError) -> Self {
        Self::Sql(SqlError::Backend(e))
    }
}

/// Whether an error is the infrastructure's fault rather than the statement's.
fn is_infrastructure(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // 08 connection, 40 serialisation/deadlock, 53 resources, 57 shutdown/cancel,
            // 58 system, XX internal.
            ["08", "40", "53", "57", "58", "XX"].iter().any(|class| code.starts_with(class))
        }
        // Not from the server: the connection closed, I/O, or the protocol.
        None => true,
    }
}

fn is_stale_plan(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::FEATURE_NOT_SUPPORTED && db.message().contains("cached plan")
    })
}

fn statement_error(index: usize, e: &tokio_postgres::Error) -> BatchError {
    if is_stale_plan(e) {
        BatchError::StalePlan
    } else if is_infrastructure(e) {
        BatchError::Sql(SqlError::Backend(unavailable(e.to_string())))
    } else {
        let message = e.as_db_error().map_or_else(|| e.to_string(), |db| db.message().to_owned());
        BatchError::Sql(SqlError::Statement { index, message })
    }
}

// ---------------------------------------------------------------------------------------------
// Pipelines

/// One job of a pipeline: a batch, with its fence, committed or failed as a whole; its
/// statements as the guest wrote them and as [`crate::postgres::translate`] made them for PostgreSQL (the
/// caller translates once, since it also needs to know which statements write).
pub(crate) struct Job<'a> {
    pub statements: &'a [SqlStatement],
    pub translated: &'a [Translated],
    pub fence: Option<&'a Fence>,
    /// A Durable Object's storage write that runs before the statements (only in
    /// [`Mode::Write`]).
    pub lead: Option<&'a Lead<'a>>,
}

impl Job<'_> {
    fn each(&self) -> impl Iterator<Item = (&SqlStatement, &Translated)> {
        self.statements.iter().zip(self.translated)
    }
}

/// A Durable Object's storage write in a pipeline's transaction (see
/// `PostgresSql::commit_with_object`). Its statement fails (division by zero) unless the
/// shard's epoch is still the object's, so a stale owner's write aborts the transaction like
/// any failed job.
pub(crate) struct Lead<'a> {
    pub sql: &'static str,
    pub types: &'static [Type],
    pub params: Vec<&'a (dyn ToSql + Sync)>,
    pub shard: u32,
    pub epoch: u64,
}

impl Lead<'_> {
    /// What its failure means: a division by zero is a stale epoch; anything else leaves the
    /// write's outcome unknown to the guest, as a failed commit does.
    fn failure(&self, e: &tokio_postgres::Error) -> BatchError {
        if e.code() == Some(&SqlState::DIVISION_BY_ZERO) {
            BatchError::Sql(SqlError::Backend(BackendError::Fenced { shard: self.shard, epoch: self.epoch }))
        } else {
            BatchError::Sql(SqlError::Backend(unavailable(e.to_string())))
        }
    }
}

/// How a pipeline runs its jobs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// One job of one unfenced statement: autocommit, no transaction.
    Single,
    /// Reads only: one snapshot (`REPEATABLE READ READ ONLY`).
    Snapshot,
    /// Every job in one read-write transaction.
    Write,
}

type Step<'a> = Pin<Box<dyn Future<Output = StepResult> + Send + 'a>>;

enum StepResult {
    Command(Result<(), tokio_postgres::Error>),
    Lead(Result<(), tokio_postgres::Error>),
    Fence(Result<(), tokio_postgres::Error>),
    Rows(Result<(Vec<tokio_postgres::Row>, u64), tokio_postgres::Error>, Instant),
}

/// Polls every future in order until all are done, so each sends its request before the next
/// does (tokio-postgres writes a request when its future is first polled).
async fn all_in_order<'a>(mut steps: Vec<Step<'a>>) -> Vec<StepResult> {
    let mut out: Vec<Option<StepResult>> = steps.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (step, slot) in steps.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match step.as_mut().poll(cx) {
                    Poll::Ready(r) => *slot = Some(r),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|r| r.expect("every step finished")).collect()
}

/// Prepares (concurrently, in one round trip) the statements this connection has not seen.
async fn prepare_missing(conn: &mut Conn, jobs: &[Job<'_>]) -> Result<(), (usize, BatchError)> {
    let mut wanted: Vec<(String, &str, Vec<Type>, usize)> = Vec::new();
    for (job_index, job) in jobs.iter().enumerate() {
        for (st, t) in job.each() {
            let key = cache_key(&t.sql, &st.params);
            if !conn.statements.contains_key(&key) && !wanted.iter().any(|w| w.0 == key) {
                wanted.push((key, &t.sql, st.params.iter().map(declared_type).collect(), job_index));
            }
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let client = &conn.client;
    let steps: Vec<_> = wanted.iter().map(|(_, sql, types, _)| client.prepare_typed(sql, types)).collect();
    let prepared = futures::future::join_all(steps).await;
    let mut failed = None;
    for ((key, _, _, job_index), r) in wanted.into_iter().zip(prepared) {
        match r {
            Ok(stmt) => {
                conn.statements.insert(key, stmt);
            }
            Err(e) if failed.is_none() => {
                let index = jobs[job_index]
                    .each()
                    .position(|(st, t)| cache_key(&t.sql, &st.params) == key)
                    .unwrap_or(0);
                failed = Some((job_index, statement_error(index, &e)));
            }
            Err(_) => {}
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Runs `jobs` in one pipeline (in one transaction unless `mode` is [`Mode::Single`]) and
/// returns each job's outcome. When a job fails, the transaction rolled back: that job's
/// outcome is its error and the others have none (`None`), for the caller to run again without
/// it. When `BEGIN` or `COMMIT` fails, every job fails.
///
/// Also returns whether the connection may be reused (no infrastructure error on it).
pub(crate) async fn run_pipelined(
    conn: &mut Conn,
    jobs: &[Job<'_>],
    mode: Mode,
) -> (Vec<Option<Result<Vec<QueryOutput>, BatchError>>>, bool) {
    let mut outcomes: Vec<Option<Result<Vec<QueryOutput>, BatchError>>> = jobs.iter().map(|_| None).collect();
    debug_assert!(
        jobs.iter().all(|j| j.lead.is_none()) || mode == Mode::Write,
        "a lead write needs a transaction"
    );
    // A batch that changes the schema cannot be prepared ahead: its later statements may name
    // a table its earlier ones create. It runs alone, one statement after another (callers
    // with lead writes do not pass one).
    if let Some(n) = jobs.iter().position(|j| j.translated.iter().any(is_ddl)) {
        let (outcome, clean) = run_sequential(conn, &jobs[n], mode).await;
        outcomes[n] = Some(outcome);
        return (outcomes, clean);
    }
    if conn.statements.len() > MAX_CACHED_STATEMENTS {
        // Dropping them closes them on the server.
        conn.statements.clear();
    }
    if let Err((job, e)) = prepare_missing(conn, jobs).await {
        // Preparing runs outside any transaction: nothing happened. The caller runs the others
        // again.
        outcomes[job] = Some(Err(e));
        return (outcomes, true);
    }
    // Whatever would fail on this side must fail before anything is sent: a request refused
    // here is never sent, and the ones after it would still run and commit. So the parameter
    // counts are checked now, and every column must be one D1 can represent (a decoding error
    // after the pipeline would come after its COMMIT).
    for (n, job) in jobs.iter().enumerate() {
        for (index, (st, t)) in job.each().enumerate() {
            let stmt = conn.statements.get(&cache_key(&t.sql, &st.params)).expect("prepared above");
            let message = if stmt.params().len() != st.params.len() {
                format!(
                    "{} parameters given where the statement takes {}",
                    st.params.len(),
                    stmt.params().len()
                )
            } else if let Some(c) = stmt.columns().iter().find(|c| !representable(c.type_())) {
                unrepresentable(c)
            } else {
                continue;
            };
            outcomes[n] = Some(Err(BatchError::Sql(SqlError::Statement { index, message })));
            return (outcomes, true);
        }
    }
    let fence_stmt = match jobs.iter().any(|j| j.fence.is_some()) {
        false => None,
        true => match fence_statement(conn).await {
            Ok(s) => Some(s),
            Err(e) => {
                for outcome in &mut outcomes {
                    *outcome = Some(Err(BatchError::Sql(SqlError::Backend(unavailable(e.to_string())))));
                }
                return (outcomes, !is_infrastructure(&e));
            }
        },
    };
    let lead_stmt = match jobs.iter().find_map(|j| j.lead) {
        None => None,
        Some(l) => match prepared(conn, l.sql, l.types).await {
            Ok(s) => Some(s),
            Err(e) => {
                for outcome in &mut outcomes {
                    *outcome = Some(Err(BatchError::Sql(SqlError::Backend(unavailable(e.to_string())))));
                }
                return (outcomes, !is_infrastructure(&e));
            }
        },
    };
    let fence_params: Vec<[SqlValue; 3]> = jobs.iter().filter_map(|j| j.fence.map(fence_values)).collect();
    let client = &conn.client;
    let started = Instant::now();
    let mut steps: Vec<Step<'_>> = Vec::new();
    match mode {
        Mode::Single => {}
        Mode::Snapshot => steps.push(Box::pin(async move {
            StepResult::Command(client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await)
        })),
        Mode::Write => {
            steps.push(Box::pin(async move { StepResult::Command(client.batch_execute("BEGIN").await) }))
        }
    }
    // Where each job's steps start in `steps` (its fence step, then its lead write, first when
    // it has them).
    let mut layout: Vec<(usize, bool, bool)> = Vec::new();
    let mut fence_values = fence_params.iter();
    for job in jobs {
        let start = steps.len();
        let fenced = job.fence.is_some();
        if fenced && let (Some(stmt), Some(values)) = (fence_stmt.clone(), fence_values.next()) {
            steps.push(Box::pin(async move {
                let r = async {
                    let rows = client.query_raw(&stmt, values.iter().map(Param)).await?;
                    rows.try_collect::<Vec<_>>().await.map(drop)
                }
                .await;
                StepResult::Fence(r)
            }));
        }
        if let (Some(l), Some(stmt)) = (job.lead, lead_stmt.clone()) {
            steps.push(Box::pin(async move {
                let r = async {
                    let rows = client.query_raw(&stmt, l.params.iter().copied()).await?;
                    rows.try_collect::<Vec<_>>().await.map(drop)
                }
                .await;
                StepResult::Lead(r)
            }));
        }
        for (st, t) in job.each() {
            let stmt = conn.statements.get(&cache_key(&t.sql, &st.params)).cloned().expect("prepared above");
            steps.push(Box::pin(async move {
                let r = async {
                    let stream = client.query_raw(&stmt, st.params.iter().map(Param)).await?;
                    futures::pin_mut!(stream);
                    let mut rows = Vec::new();
                    while let Some(row) = stream.try_next().await? {
                        rows.push(row);
                    }
                    Ok((rows, stream.rows_affected().unwrap_or(0)))
                }
                .await;
                StepResult::Rows(r, Instant::now())
            }));
        }
        layout.push((start, fenced, job.lead.is_some()));
    }
    if mode != Mode::Single {
        steps.push(Box::pin(async move { StepResult::Command(client.batch_execute("COMMIT").await) }));
    }
    let results = all_in_order(steps).await;

    // BEGIN or COMMIT failed: nothing can be said about any job.
    if mode != Mode::Single {
        for r in [results.first(), results.last()].into_iter().flatten() {
            if let StepResult::Command(Err(e)) = r {
                for outcome in &mut outcomes {
                    *outcome = Some(Err(BatchError::Sql(SqlError::Backend(unavailable(e.to_string())))));
                }
                return (outcomes, !is_infrastructure(e));
            }
        }
    }
    let mut clean = true;
    let mut answers: Vec<Result<Vec<QueryOutput>, BatchError>> = Vec::with_capacity(jobs.len());
    for (job, (start, fenced, led)) in jobs.iter().zip(&layout) {
        let mut at = *start;
        let mut error: Option<BatchError> = None;
        if *fenced {
            if let (StepResult::Fence(Err(e)), Some(f)) = (&results[at], job.fence) {
                clean &= !is_infrastructure(e);
                error = Some(fence_failure(f, e));
            }
            at += 1;
        }
        if *led {
            if let (StepResult::Lead(Err(e)), Some(l), None) = (&results[at], job.lead, &error) {
                clean &= !is_infrastructure(e);
                error = Some(l.failure(e));
            }
            at += 1;
        }
        let mut outputs = Vec::with_capacity(job.statements.len());
        for (index, (st, t)) in job.each().enumerate() {
            if error.is_some() {
                break;
            }
            match &results[at + index] {
                StepResult::Rows(Ok((rows, affected)), finished) => {
                    let stmt = conn.statements.get(&cache_key(&t.sql, &st.params)).expect("prepared above");
                    // Column types were checked before the pipeline, so this cannot fail after
                    // the transaction committed.
                    match output(stmt, rows, *affected, t, finished.duration_since(started)) {
                        Ok(o) => outputs.push(o),
                        Err(message) => error = Some(BatchError::Sql(SqlError::Statement { index, message })),
                    }
                }
                StepResult::Rows(Err(e), _) => {
                    clean &= !is_infrastructure(e);
                    error = Some(statement_error(index, e));
                }
                _ => unreachable!("a statement step answers rows"),
            }
        }
        answers.push(error.map_or(Ok(outputs), Err));
    }
    // In a transaction the first failed job aborted it: the jobs after it only saw
    // `in_failed_sql_transaction` and the ones before it were rolled back. That job gets its
    // error; the others get no outcome and are run again by the caller.
    match answers.iter().position(Result::is_err) {
        Some(failed) if mode != Mode::Single => {
            outcomes[failed] = Some(answers.swap_remove(failed));
        }
        _ => {
            for (outcome, answer) in outcomes.iter_mut().zip(answers) {
                *outcome = Some(answer);
            }
        }
    }
    (outcomes, clean)
}

pub(crate) fn is_ddl(t: &Translated) -> bool {
    matches!(t.first_word.as_str(), "CREATE" | "ALTER" | "DROP")
}

/// [`FENCE_CHECK`], prepared once per connection.
async fn fence_statement(conn: &mut Conn) -> Result<Statement, tokio_postgres::Error> {
    prepared(conn, FENCE_CHECK, &[Type::TEXT, Type::INT8, Type::INT8]).await
}

/// One of the runtime's own statements (not a guest's), prepared once per connection.
async fn prepared(conn: &mut Conn, sql: &str, types: &[Type]) -> Result<Statement, tokio_postgres::Error> {
    let key = cache_key(sql, &[]);
    if let Some(s) = conn.statements.get(&key) {
        return Ok(s.clone());
    }
    let s = conn.client.prepare_typed(sql, types).await?;
    conn.statements.insert(key, s.clone());
    Ok(s)
}

/// [`FENCE_CHECK`]'s parameters for `f`.
fn fence_values(f: &Fence) -> [SqlValue; 3] {
    [
        SqlValue::Text(f.namespace.clone()),
        SqlValue::Integer(i64::from(f.shard)),
        SqlValue::Integer(i64::try_from(f.epoch).unwrap_or(i64::MAX)),
    ]
}

/// What a failed [`FENCE_CHECK`] means: the division by zero is a stale epoch.
fn fence_failure(f: &Fence, e: &tokio_postgres::Error) -> BatchError {
    if e.code() == Some(&SqlState::DIVISION_BY_ZERO) {
        BatchError::Sql(SqlError::Backend(BackendError::Fenced { shard: f.shard, epoch: f.epoch }))
    } else {
        statement_error(0, e)
    }
}

/// One job, one request at a time (each statement prepared just before it runs), in a
/// transaction unless `mode` is [`Mode::Single`]; rolled back on the first error.
async fn run_sequential(
    conn: &mut Conn,
    job: &Job<'_>,
    mode: Mode,
) -> (Result<Vec<QueryOutput>, BatchError>, bool) {
    let in_transaction = mode != Mode::Single;
    if in_transaction && let Err(e) = conn.client.batch_execute("BEGIN").await {
        return (Err(BatchError::Sql(SqlError::Backend(unavailable(e.to_string())))), false);
    }
    let result = sequential_steps(conn, job).await;
    let clean = match (&result, in_transaction) {
        (_, false) => result.as_ref().err().is_none_or(|(_, clean)| *clean),
        (Ok(_), true) => match conn.client.batch_execute("COMMIT").await {
            Ok(()) => true,
            Err(e) => return (Err(BatchError::Sql(SqlError::Backend(unavailable(e.to_string())))), false),
        },
        (Err(_), true) => conn.client.batch_execute("ROLLBACK").await.is_ok(),
    };
    (result.map_err(|(e, _)| e), clean)
}

/// The statements of [`run_sequential`]; an error says whether the connection is still usable.
async fn sequential_steps(conn: &mut Conn, job: &Job<'_>) -> Result<Vec<QueryOutput>, (BatchError, bool)> {
    let started = Instant::now();
    let fail = |index: usize, e: &tokio_postgres::Error| (statement_error(index, e), !is_infrastructure(e));
    if let Some(f) = job.fence {
        let stmt = fence_statement(conn).await.map_err(|e| fail(0, &e))?;
        let values = fence_values(f);
        if let Err(e) =
            conn.client.query(&stmt, &[&Param(&values[0]), &Param(&values[1]), &Param(&values[2])]).await
        {
            return Err((fence_failure(f, &e), !is_infrastructure(&e)));
        }
    }
    let mut outputs = Vec::with_capacity(job.statements.len());
    for (index, (st, t)) in job.each().enumerate() {
        let key = cache_key(&t.sql, &st.params);
        let stmt = match conn.statements.get(&key) {
            Some(s) => s.clone(),
            None => {
                let types: Vec<Type> = st.params.iter().map(declared_type).collect();
                let s = conn.client.prepare_typed(&t.sql, &types).await.map_err(|e| fail(index, &e))?;
                if !is_ddl(t) {
                    conn.statements.insert(key, s.clone());
                }
                s
            }
        };
        if let Some(c) = stmt.columns().iter().find(|c| !representable(c.type_())) {
            return Err((BatchError::Sql(SqlError::Statement { index, message: unrepresentable(c) }), true));
        }
        let stream =
            conn.client.query_raw(&stmt, st.params.iter().map(Param)).await.map_err(|e| fail(index, &e))?;
        futures::pin_mut!(stream);
        let mut rows = Vec::new();
        while let Some(row) = stream.try_next().await.map_err(|e| fail(index, &e))? {
            rows.push(row);
        }
        let affected = stream.rows_affected().unwrap_or(0);
        let out = output(&stmt, &rows, affected, t, started.elapsed())
            .map_err(|message| (BatchError::Sql(SqlError::Statement { index, message }), true))?;
        outputs.push(out);
    }
    Ok(outputs)
}

fn unrepresentable(c: &tokio_postgres::Column) -> String {
    format!(
        "column {:?} has PostgreSQL type {}, which D1 cannot represent; \
         CAST it to TEXT, INTEGER or REAL in the query",
        c.name(),
        c.type_().name().to_uppercase()
    )
}

fn output(
    stmt: &Statement,
    rows: &[tokio_postgres::Row],
    affected: u64,
    t: &Translated,
    took: std::time::Duration,
) -> Result<QueryOutput, String> {
    let columns: Vec<String> = stmt.columns().iter().map(|c| c.name().to_owned()).collect();
    let mut out_rows = Vec::with_capacity(rows.len());
    for row in rows {
        let mut values = Vec::with_capacity(columns.len());
        for (i, c) in stmt.columns().iter().enumerate() {
            let raw: Raw<'_> = row.try_get(i).map_err(|e| format!("column {:?}: {e}", c.name()))?;
            values.push(decode_value(c.type_(), raw.0, c.name())?);
        }
        out_rows.push(values);
    }
    let changes = if t.writes { affected } else { 0 };
    let ddl = matches!(t.first_word.as_str(), "CREATE" | "ALTER" | "DROP");
    Ok(QueryOutput {
        columns,
        meta: QueryMeta {
            duration_ms: took.as_secs_f64() * 1000.0,
            changes,
            last_row_id: 0,
            changed_db: changes > 0 || ddl,
            rows_read: out_rows.len() as u64,
            rows_written: changes,
            size_after: 0,
        },
        rows: out_rows,
    })
}
