//! Production backends on PostgreSQL: D1 ([`PostgresSql`], pipelined over tokio-postgres, see
//! `pgwire.rs`) and Durable Object storage ([`PostgresObjectStorage`], over sqlx).
//!
//! D1 is SQLite's dialect; the guest's SQL runs unchanged on a portable subset. The only
//! rewrites ([`translate`]) are `?`/`?NNN` placeholders to `$N`, SQLite type names whose
//! PostgreSQL meaning differs (`BLOB` -> `BYTEA`, `INTEGER` -> `BIGINT` since SQLite integers
//! are 64-bit, `REAL` -> `DOUBLE PRECISION` since SQLite reals are 8 bytes) and backquoted
//! identifiers to double-quoted ones, all outside literals, quoted identifiers and comments.
//!
//! Shard epochs live in `lattice_do_shards (namespace, shard, epoch)`, created by both backends
//! on first use, so a D1 batch carrying a [`Fence`] is checked in its own transaction against the
//! epochs [`PostgresObjectStorage::acquire_shard`] hands out when both share a database.
//!
//! Every call is bounded: the pool's acquire timeout ([`CONNECT_TIMEOUT`]) covers connecting,
//! and [`OPERATION_TIMEOUT`] the whole operation; both become [`BackendError::Unavailable`].

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions};
use tokio::sync::OnceCell;

use crate::pgwire::{BatchError, Clients, Job, Lead, Lease, Mode, is_ddl, run_pipelined};
use crate::sqlite::list_range_sql;
use crate::{
    BackendError, Fence, ObjectAddr, ObjectListRange, ObjectStorageBackend, ObjectWrite, QueryOutput,
    SqlBackend, SqlError, SqlStatement,
};

const BACKEND: &str = "postgres";

/// How long getting a connection may take, including connecting: a database that is down
/// answers `Unavailable` after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound for one backend call (a whole batch or commit).
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long PostgreSQL lets a session sit idle inside a transaction before ending it.
pub const IDLE_IN_TRANSACTION_TIMEOUT_MS: &str = "5000";
/// Connections per pool; PostgreSQL's default `max_connections` is 100 for every client.
pub const MAX_CONNECTIONS: u32 = 10;

const SHARDS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS lattice_do_shards (
    namespace TEXT NOT NULL,
    shard BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    PRIMARY KEY (namespace, shard)
);
";

const DO_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS lattice_do_entries (
    namespace TEXT NOT NULL,
    object_id TEXT NOT NULL,
    key BYTEA NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (namespace, object_id, key)
);
CREATE TABLE IF NOT EXISTS lattice_do_alarms (
    namespace TEXT NOT NULL,
    object_id TEXT NOT NULL,
    shard BIGINT NOT NULL,
    scheduled_ms BIGINT NOT NULL,
    PRIMARY KEY (namespace, object_id)
);
CREATE INDEX IF NOT EXISTS lattice_do_alarms_due ON lattice_do_alarms (namespace, shard, scheduled_ms);
";

fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
    BackendError::unavailable(BACKEND, e)
}

/// A pooled connection idle at least this long is pinged before it is used again.
const PING_IF_IDLE: Duration = Duration::from_secs(1);

/// A lazily connecting pool with bounded waits.
pub(crate) fn pool(url: &str) -> Result<PgPool, BackendError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(unavailable)?
        .application_name("lattice")
        // A client that stops inside a transaction (a paused pod) would keep its locks, and a
        // fenced write's lock on its shard row holds off the next owner's epoch bump: the
        // server ends such sessions, so a failover waits for this at most.
        .options([("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION_TIMEOUT_MS)])
        .disable_statement_logging();
    Ok(PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(CONNECT_TIMEOUT)
        .idle_timeout(Duration::from_secs(300))
        // sqlx pings every connection it hands out by default: a round trip before each call.
        // Only a connection that sat idle may have been cut (a server restart, a firewall);
        // one in steady use is handed out as it is, and a failure on it is `unavailable`.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < PING_IF_IDLE {
                    return Ok(true);
                }
                Ok(sqlx::Connection::ping(conn).await.is_ok())
            })
        })
        .connect_lazy_with(options))
}

pub(crate) async fn bounded<T, E: From<BackendError>>(
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(OPERATION_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(elapsed) => Err(E::from(unavailable(elapsed))),
    }
}

/// What [`SqlBackend::database`] and [`ObjectStorageBackend::database`] answer: a digest of the
/// URL, so that two backends on the same URL pair up and no password reaches a log.
fn database_id(url: &str) -> String {
    use sha2::Digest as _;
    format!("postgres:{}", hex::encode(&sha2::Sha256::digest(url.as_bytes())[..12]))
}

/// Creates the tables once per process (again after a failure).
pub(crate) async fn ensure_schema(
    cell: &OnceCell<()>,
    pool: &PgPool,
    schema: &'static str,
) -> Result<(), BackendError> {
    cell.get_or_try_init(|| async {
        // Two processes (or two backends of one) creating the same table at once can collide
        // in PostgreSQL's catalog even with IF NOT EXISTS; the loser's retry finds it there.
        match sqlx::raw_sql(schema).execute(pool).await {
            Ok(_) => Ok(()),
            Err(_) => sqlx::raw_sql(schema).execute(pool).await.map(drop).map_err(unavailable),
        }
    })
    .await
    .map(drop)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// SQLite dialect -> PostgreSQL

/// A statement rewritten for PostgreSQL, with what the rewrite learned about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub sql: String,
    /// The first keyword, upper-cased (`SELECT`, `INSERT`, `WITH`, ...).
    pub first_word: String,
    /// Whether `INSERT`, `UPDATE`, `DELETE` or `MERGE` appears as a keyword: the command's row
    /// count is then the number of rows changed.
    pub writes: bool,
}

/// Rewrites SQLite-dialect SQL for PostgreSQL (see the module docs). Errors name the problem.
pub fn translate(sql: &str) -> Result<Translated, String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len() + 16);
    let mut first_word = String::new();
    let mut writes = false;
    let mut max_index: u32 = 0;
    let mut i = 0;
    // Copies a quoted run starting at `i` (the opening quote) up to its closing quote, where a
    // doubled quote is an escaped one; returns the index after it.
    let quoted = |i: usize, q: char, out: &mut String| -> Result<usize, String> {
        let mut j = i + 1;
        loop {
            match chars.get(j) {
                None => return Err(format!("unterminated {q} quote")),
                Some(&c) if c == q => {
                    if chars.get(j + 1) == Some(&q) {
                        j += 2;
                    } else {
                        out.extend(&chars[i..=j]);
                        return Ok(j + 1);
                    }
                }
                Some(_) => j += 1,
            }
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\'' | '"' => i = quoted(i, c, &mut out)?,
            '`' => {
                let start = i;
                let mut j = i + 1;
                while j < chars.len() && chars[j] != '`' {
                    j += 1;
                }
                if j == chars.len() {
                    return Err("unterminated ` quote".into());
                }
                let inner: String = chars[start + 1..j].iter().collect();
                out.push('"');
                out.push_str(&inner.replace('"', "\"\""));
                out.push('"');
                i = j + 1;
            }
            '-' if chars.get(i + 1) == Some(&'-') => {
                let mut j = i;
                while j < chars.len() && chars[j] != '\n' {
                    j += 1;
                }
                out.extend(&chars[i..j]);
                i = j;
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                let mut j = i + 2;
                while j < chars.len() && !(chars[j] == '*' && chars.get(j + 1) == Some(&'/')) {
                    j += 1;
                }
                let end = (j + 2).min(chars.len());
                out.extend(&chars[i..end]);
                i = end;
            }
            '?' => {
                let mut j = i + 1;
                while j < chars.len() && chars[j].is_ascii_digit() {
                    j += 1;
                }
                let index = if j > i + 1 {
                    let digits: String = chars[i + 1..j].iter().collect();
                    match digits.parse::<u32>() {
                        Ok(n) if (1..=32766).contains(&n) => n,
                        _ => return Err(format!("invalid parameter ?{digits}")),
                    }
                } else {
                    max_index + 1
                };
                max_index = max_index.max(index);
                out.push('$');
                out.push_str(&index.to_string());
                i = j;
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut j = i;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_' || chars[j] == '$') {
                    j += 1;
                }
                let word: String = chars[i..j].iter().collect();
                let upper = word.to_ascii_uppercase();
                if first_word.is_empty() {
                    first_word = upper.clone();
                }
                match upper.as_str() {
                    "BLOB" => out.push_str("BYTEA"),
                    "INTEGER" => out.push_str("BIGINT"),
                    "REAL" => out.push_str("DOUBLE PRECISION"),
                    "INSERT" | "UPDATE" | "DELETE" | "MERGE" => {
                        writes = true;
                        out.push_str(&word);
                    }
                    _ => out.push_str(&word),
                }
                i = j;
            }
            c if c.is_ascii_digit() => {
                // A number, with its exponent or hex digits, so `1e5` stays one token.
                let mut j = i;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '.') {
                    j += 1;
                }
                out.extend(&chars[i..j]);
                i = j;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(Translated { sql: out, first_word, writes })
}

// ---------------------------------------------------------------------------------------------
// Values

/// Decodes PostgreSQL's binary NUMERIC into an f64.
pub(crate) fn numeric_to_f64(bytes: &[u8]) -> Result<f64, String> {
    let word = |i: usize| -> Result<i16, String> {
        bytes
            .get(i..i + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated NUMERIC".to_string())
    };
    let ndigits = usize::try_from(word(0)?).map_err(|_| "bad NUMERIC".to_string())?;
    let weight = i32::from(word(2)?);
    let sign = word(4)? as u16;
    match sign {
        0xC000 => return Ok(f64::NAN),
        0xD000 => return Ok(f64::INFINITY),
        0xF000 => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    let mut value = 0f64;
    for d in 0..ndigits {
        let digit = f64::from(word(8 + 2 * d)?);
        let exp = weight - i32::try_from(d).map_err(|_| "bad NUMERIC".to_string())?;
        value += digit * 10000f64.powi(exp);
    }
    Ok(if sign == 0x4000 { -value } else { value })
}

// ---------------------------------------------------------------------------------------------
// D1

/// D1 on PostgreSQL.
///
/// Meta: `changes` and `rows_written` are the rows the command changed (its row count when the
/// statement contains `INSERT`, `UPDATE`, `DELETE` or `MERGE`, else 0); `rows_read` is the rows
/// returned; `last_row_id` is always 0 (PostgreSQL has no rowid: use `RETURNING`); `size_after`
/// is 0 (measuring the database on every statement would cost more than the statement);
/// `changed_db` is true when rows changed or the statement was DDL.
///
/// Round trips: every batch is pipelined (see [`crate::pgwire`]): one round trip for a batch
/// whose statements this connection has prepared before, in a transaction (`REPEATABLE READ
/// READ ONLY` for reads only, so the batch sees one snapshot as on SQLite) unless it is one
/// unfenced statement, which runs in autocommit.
///
/// Fencing: with a [`Fence`], the batch's transaction first reads the shard's row in
/// `lattice_do_shards` `FOR SHARE`: a different epoch fails the batch with
/// [`BackendError::Fenced`] (and rolls it back), and the lock holds off a concurrent
/// `acquire_shard` until the batch commits. A shard with no row has never been acquired in this database (Durable Object storage
/// lives elsewhere) and is not fenced here.
///
/// Group commit: fenced batches (the writes Durable Objects make) that arrive while another
/// group is committing are queued and committed together in one transaction: one WAL flush for
/// many batches. Each batch still commits or fails alone: when one fails, the transaction rolls
/// back, that batch gets its error and the others are committed again without it.
/// Unfenced batches (reads and writes from stateless requests) run on their own connection
/// and transaction, in parallel.
#[derive(Debug, Clone)]
pub struct PostgresSql {
    database: String,
    clients: std::sync::Arc<Clients>,
    schema: std::sync::Arc<OnceCell<()>>,
    group: std::sync::Arc<Queue<GroupJob>>,
    units: std::sync::Arc<Queue<(Unit, UnitReply)>>,
}

/// Fenced batches one group commit carries at most.
pub const MAX_GROUP_BATCHES: usize = 64;

type BatchReply = tokio::sync::oneshot::Sender<Result<Vec<QueryOutput>, SqlError>>;

struct GroupJob {
    statements: Vec<SqlStatement>,
    translated: Vec<Translated>,
    fence: Option<Fence>,
    reply: BatchReply,
    /// The ticket of [`SqlBackend::batch_ordered`]: a group runs its jobs in ticket order.
    ticket: Option<u64>,
    /// Failed once in this group and was moved behind the others (see `commit_group`).
    deferred: bool,
}

/// Work waiting for the next shared transaction, and the lock its leader holds: a caller
/// queues its item and then either finds its answer ready or, holding the lock, commits what
/// queued itself (D1 group commits, object commits).
struct Queue<T> {
    items: std::sync::Mutex<Vec<T>>,
    leader: tokio::sync::Mutex<()>,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self { items: std::sync::Mutex::new(Vec::new()), leader: tokio::sync::Mutex::new(()) }
    }
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl<T> Queue<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to `max` queued items, oldest first.
    fn take(&self, max: usize) -> Vec<T> {
        let mut q = self.lock();
        let n = q.len().min(max);
        q.drain(..n).collect()
    }

    /// Waits for the leader lock, then: the answer of the caller's queued item when it is
    /// there (`None` when its reply was dropped), or else up to `max` queued items for this
    /// caller to commit while it holds the lock (the guard). Callers loop until answered.
    async fn turn<R>(&self, answer: &mut tokio::sync::oneshot::Receiver<R>, max: usize) -> Turn<'_, T, R> {
        let leader = self.leader.lock().await;
        match answer.try_recv() {
            Ok(r) => Turn::Answered(Some(r)),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Turn::Answered(None),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => Turn::Lead(self.take(max), leader),
        }
    }
}

/// See [`Queue::turn`].
enum Turn<'a, T, R> {
    Answered(Option<R>),
    Lead(Vec<T>, tokio::sync::MutexGuard<'a, ()>),
}

/// A batch's statements for PostgreSQL; a statement it cannot take fails the batch before
/// anything runs.
fn translate_all(statements: &[SqlStatement]) -> Result<Vec<Translated>, SqlError> {
    statements
        .iter()
        .enumerate()
        .map(|(index, st)| translate(&st.sql).map_err(|message| SqlError::Statement { index, message }))
        .collect()
}

impl PostgresSql {
    /// A backend for `url` (`postgres://user@host:port/db`). Connects lazily: a database that is
    /// down makes calls fail with `Unavailable`, not this constructor.
    pub fn new(url: &str) -> Result<Self, BackendError> {
        Ok(Self {
            database: database_id(url),
            clients: std::sync::Arc::new(Clients::new(url)?),
            schema: Default::default(),
            group: Default::default(),
            units: Default::default(),
        })
    }

    /// Creates the shard table fenced batches read, once per process (again after a failure).
    async fn ensure_shards(&self) -> Result<(), BackendError> {
        self.schema
            .get_or_try_init(|| async {
                let mut lease = self.clients.acquire().await?;
                // Two processes creating the same table at once can collide in PostgreSQL's
                // catalog even with IF NOT EXISTS; the loser's retry finds it there.
                let client = lease.conn().client();
                let r = match client.batch_execute(SHARDS_SCHEMA).await {
                    Ok(()) => Ok(()),
                    Err(_) => client.batch_execute(SHARDS_SCHEMA).await.map_err(unavailable),
                };
                lease.set_clean(r.is_ok());
                r
            })
            .await
            .map(drop)
    }

    /// Queues a batch for the next group commit; whoever takes the leader lock first commits
    /// everything queued, so a caller either finds its answer ready or commits a group itself.
    async fn grouped(
        &self,
        statements: Vec<SqlStatement>,
        translated: Vec<Translated>,
        fence: Option<Fence>,
        ticket: Option<u64>,
    ) -> Result<Vec<QueryOutput>, SqlError> {
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        self.group.lock().push(GroupJob { statements, translated, fence, reply, ticket, deferred: false });
        loop {
            match self.group.turn(&mut answer, MAX_GROUP_BATCHES).await {
                Turn::Answered(r) => {
                    return r.unwrap_or_else(|| {
                        Err(SqlError::Backend(unavailable("the group commit carrying this batch failed")))
                    });
                }
                Turn::Lead(mut jobs, _leader) => {
                    // Objects' batches queue in the order their waits for durability end, which
                    // is not the order their events sealed when one storage commit made several
                    // durable.
                    jobs.sort_by_key(|j| j.ticket);
                    self.commit_group(jobs).await;
                }
            }
        }
    }

    /// Commits `jobs` in one transaction. A job that fails is answered with its error and the
    /// transaction is run again without it; each job is answered only once its outcome is
    /// final (committed, or failed alone).
    ///
    /// A job whose statement fails while others are in the group (or waiting for the next one)
    /// first gets a second run behind them, in the same transaction: concurrent batches have
    /// no order among themselves, and a batch that checks a row another one writes (the room
    /// object's outbox guard) would otherwise fail only because it was queued first. It is
    /// answered with its error when it fails again.
    async fn commit_group(&self, jobs: Vec<GroupJob>) {
        let mut lease = match self.clients.acquire().await {
            Ok(l) => l,
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(SqlError::Backend(unavailable(e.to_string()))));
                }
                return;
            }
        };
        let mut pending = jobs;
        let mut retried_stale = false;
        while !pending.is_empty() {
            let runs: Vec<Job<'_>> = pending
                .iter()
                .map(|j| Job {
                    statements: &j.statements,
                    translated: &j.translated,
                    fence: j.fence.as_ref(),
                    lead: None,
                })
                .collect();
            let (outcomes, clean) = run_pipelined(lease.conn(), &runs, Mode::Write).await;
            drop(runs);
            lease.set_clean(clean);
            let mut again = Vec::new();
            let mut stale = false;
            let mut deferred = None;
            let others_in_group = pending.len() > 1;
            let others_waiting = || others_in_group || !self.group.lock().is_empty();
            for (mut job, outcome) in pending.into_iter().zip(outcomes) {
                match outcome {
                    None => again.push(job),
                    Some(Ok(out)) => {
                        let _ = job.reply.send(Ok(out));
                    }
                    Some(Err(BatchError::Sql(SqlError::Statement { .. })))
                        if !job.deferred && others_waiting() =>
                    {
                        job.deferred = true;
                        deferred = Some(job);
                    }
                    Some(Err(BatchError::Sql(e))) => {
                        let _ = job.reply.send(Err(e));
                    }
                    Some(Err(BatchError::StalePlan)) if !retried_stale => {
                        stale = true;
                        again.push(job);
                    }
                    Some(Err(BatchError::StalePlan)) => {
                        let _ = job.reply.send(Err(SqlError::Backend(unavailable(
                            "prepared statement still stale after a retry",
                        ))));
                    }
                }
            }
            if stale {
                retried_stale = true;
                lease.conn().forget_statements();
            }
            if let Some(job) = deferred {
                // Batches queued meanwhile join this transaction ahead of the deferred one.
                let mut q = self.group.lock();
                let n = q.len().min(MAX_GROUP_BATCHES.saturating_sub(again.len() + 1));
                again.extend(q.drain(..n));
                drop(q);
                again.sort_by_key(|j| j.ticket);
                again.push(job);
            }
            pending = again;
        }
    }
}

/// Object commits one transaction carries at most ([`PostgresSql::commit_with_object`]).
pub const MAX_GROUP_OBJECT_COMMITS: usize = 32;

/// One object's commit: its storage write and the D1 batches its events sent after it.
struct Unit {
    addr: ObjectAddr,
    epoch: u64,
    write: ObjectWrite,
    batches: Vec<Vec<SqlStatement>>,
    translated: Vec<Vec<Translated>>,
}

/// One batch's outcome, and a unit's.
type BatchOutcome = Result<Vec<QueryOutput>, SqlError>;
type UnitOutcome = Result<Vec<BatchOutcome>, BackendError>;

type UnitReply = tokio::sync::oneshot::Sender<UnitOutcome>;

/// What a job of [`PostgresSql::commit_units`] stands for: a unit's write, or one of its batches.
#[derive(Clone, Copy)]
struct Part {
    unit: usize,
    batch: Option<usize>,
}

impl PostgresSql {
    /// Queues an object's commit; whoever takes the leader lock first commits every queued one
    /// in one transaction (as [`Self::grouped`] does for D1 batches): objects that commit at
    /// the same time share one WAL flush and one hold of the rows they all write (a stream
    /// counter), instead of queueing on it one commit after another.
    async fn grouped_unit(&self, unit: Unit) -> UnitOutcome {
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        self.units.lock().push((unit, reply));
        loop {
            match self.units.turn(&mut answer, MAX_GROUP_OBJECT_COMMITS).await {
                Turn::Answered(r) => {
                    return r.unwrap_or_else(|| {
                        Err(unavailable("the transaction carrying this object commit failed"))
                    });
                }
                Turn::Lead(group, _leader) => {
                    let (units, replies): (Vec<Unit>, Vec<UnitReply>) = group.into_iter().unzip();
                    for (reply, outcome) in replies.into_iter().zip(self.commit_units(&units).await) {
                        let _ = reply.send(outcome);
                    }
                }
            }
        }
    }

    /// Commits `units` in one transaction: each unit's write, then its batches. A batch whose
    /// statement fails is answered with its error and left out; a write refused (a stale
    /// epoch) fails its unit alone; either way the transaction runs again without it, until a
    /// run commits. An error of the connection fails every unit not answered yet.
    async fn commit_units(&self, units: &[Unit]) -> Vec<UnitOutcome> {
        let mut outcomes: Vec<Option<UnitOutcome>> = units.iter().map(|_| None).collect();
        let mut answers: Vec<Vec<Option<BatchOutcome>>> =
            units.iter().map(|u| u.batches.iter().map(|_| None).collect()).collect();
        let mut lease = match self.clients.acquire().await {
            Ok(l) => l,
            Err(e) => return units.iter().map(|_| Err(unavailable(e.to_string()))).collect(),
        };
        let params: Vec<CommitParams<'_>> = units.iter().map(|u| CommitParams::of(&u.write)).collect();
        let positions: Vec<(i64, i64)> =
            units.iter().map(|u| (i64::from(u.addr.shard), to_i64(u.epoch))).collect();
        let leads: Vec<Lead<'_>> = units
            .iter()
            .zip(&params)
            .zip(&positions)
            .map(|((u, p), (shard, epoch))| Lead {
                sql: COMMIT_FENCED_STATEMENT,
                types: COMMIT_TYPES,
                params: vec![
                    &u.addr.namespace,
                    &u.addr.id,
                    shard,
                    epoch,
                    &p.deletes,
                    &p.put_keys,
                    &p.put_values,
                    &p.alarm_mode,
                    &p.alarm_ms,
                ],
                shard: u.addr.shard,
                epoch: u.epoch,
            })
            .collect();
        let mut pending: Vec<Part> = units
            .iter()
            .enumerate()
            .flat_map(|(unit, u)| {
                std::iter::once(Part { unit, batch: None })
                    .chain((0..u.batches.len()).map(move |b| Part { unit, batch: Some(b) }))
            })
            .collect();
        let mut retried_stale = false;
        while !pending.is_empty() {
            let jobs: Vec<Job<'_>> = pending
                .iter()
                .map(|p| match p.batch {
                    None => Job { statements: &[], translated: &[], fence: None, lead: Some(&leads[p.unit]) },
                    Some(b) => Job {
                        statements: &units[p.unit].batches[b],
                        translated: &units[p.unit].translated[b],
                        fence: None,
                        lead: None,
                    },
                })
                .collect();
            let (results, clean) = run_pipelined(lease.conn(), &jobs, Mode::Write).await;
            drop(jobs);
            lease.set_clean(clean);
            let mut again = Vec::new();
            let mut committed = true;
            let mut stale = false;
            let mut failed: Option<String> = None;
            for (part, result) in pending.iter().copied().zip(results) {
                match (result, part.batch) {
                    (None, _) => again.push(part),
                    (Some(Ok(out)), Some(b)) => answers[part.unit][b] = Some(Ok(out)),
                    (Some(Ok(_)), None) => {}
                    (Some(Err(BatchError::Sql(SqlError::Backend(e)))), None) if clean => {
                        committed = false;
                        outcomes[part.unit] = Some(Err(e));
                    }
                    (Some(Err(BatchError::Sql(SqlError::Statement { .. }))), None) => {
                        unreachable!("a lead write fails as a backend error")
                    }
                    (Some(Err(BatchError::Sql(SqlError::Backend(e)))), _) => {
                        // The connection failed: nothing of this run committed.
                        failed = Some(e.to_string());
                    }
                    (Some(Err(BatchError::Sql(e))), Some(b)) => {
                        committed = false;
                        answers[part.unit][b] = Some(Err(e));
                    }
                    (Some(Err(BatchError::StalePlan)), _) if !retried_stale => {
                        committed = false;
                        stale = true;
                        again.push(part);
                    }
                    (Some(Err(BatchError::StalePlan)), _) => {
                        failed = Some("prepared statement still stale after a retry".into());
                    }
                }
            }
            if let Some(message) = failed {
                for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
                    *outcome = Some(Err(unavailable(message.clone())));
                }
                break;
            }
            if committed {
                break;
            }
            if stale {
                retried_stale = true;
                lease.conn().forget_statements();
            }
            pending = again.into_iter().filter(|p| outcomes[p.unit].is_none()).collect();
        }
        outcomes
            .into_iter()
            .zip(answers)
            .map(|(outcome, answers)| {
                outcome.unwrap_or_else(|| {
                    Ok(answers
                        .into_iter()
                        .map(|a| {
                            a.unwrap_or_else(|| {
                                Err(SqlError::Backend(unavailable("the batch got no outcome")))
                            })
                        })
                        .collect())
                })
            })
            .collect()
    }
}

/// One unfenced batch in a pipeline of its own, run again once if PostgreSQL refused a cached
/// plan (nothing was committed then).
async fn run_alone(
    lease: &mut Lease<'_>,
    statements: &[SqlStatement],
    translated: &[Translated],
    mode: Mode,
) -> Result<Vec<QueryOutput>, SqlError> {
    let mut retried = false;
    loop {
        let job = Job { statements, translated, fence: None, lead: None };
        let (mut outcomes, clean) = run_pipelined(lease.conn(), &[job], mode).await;
        lease.set_clean(clean);
        match outcomes.pop().flatten() {
            Some(Ok(out)) => return Ok(out),
            Some(Err(BatchError::Sql(e))) => return Err(e),
            Some(Err(BatchError::StalePlan)) if !retried => {
                retried = true;
                lease.conn().forget_statements();
            }
            Some(Err(BatchError::StalePlan)) => {
                return Err(SqlError::Backend(unavailable("prepared statement still stale after a retry")));
            }
            None => return Err(SqlError::Backend(unavailable("the batch got no outcome"))),
        }
    }
}

#[async_trait]
impl SqlBackend for PostgresSql {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn database(&self) -> Option<&str> {
        Some(&self.database)
    }

    async fn commit_with_object(
        &self,
        addr: &ObjectAddr,
        epoch: u64,
        write: ObjectWrite,
        mut batches: Vec<Vec<SqlStatement>>,
    ) -> Result<Vec<Result<Vec<QueryOutput>, SqlError>>, BackendError> {
        if write.delete_all {
            // One statement cannot delete and upsert the same rows; the caller commits such a
            // write through the object storage.
            return Err(unavailable("a deleteAll write cannot share a D1 transaction"));
        }
        let mut answers: Vec<Option<Result<Vec<QueryOutput>, SqlError>>> =
            batches.iter().map(|_| None).collect();
        let mut translated: Vec<Vec<Translated>> = Vec::with_capacity(batches.len());
        for (answer, statements) in answers.iter_mut().zip(&batches) {
            translated.push(translate_all(statements).unwrap_or_else(|e| {
                *answer = Some(Err(e));
                Vec::new()
            }));
        }
        // A batch that changes the schema runs on its own, after the write (see `run_pipelined`).
        let alone: Vec<usize> = (0..batches.len())
            .filter(|&i| answers[i].is_none() && translated[i].iter().any(is_ddl))
            .collect();
        let run: Vec<usize> =
            (0..batches.len()).filter(|i| answers[*i].is_none() && !alone.contains(i)).collect();
        let unit = Unit {
            addr: addr.clone(),
            epoch,
            write,
            batches: run.iter().map(|&i| std::mem::take(&mut batches[i])).collect(),
            translated: run.iter().map(|&i| std::mem::take(&mut translated[i])).collect(),
        };
        let outcomes = bounded(async {
            self.ensure_shards().await?;
            self.grouped_unit(unit).await
        })
        .await?;
        for (i, outcome) in run.into_iter().zip(outcomes) {
            answers[i] = Some(outcome);
        }
        let fence = Fence { namespace: addr.namespace.clone(), shard: addr.shard, epoch };
        for i in alone {
            let statements = std::mem::take(&mut batches[i]);
            answers[i] = Some(self.batch_ordered(statements, Some(fence.clone()), None).await);
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(SqlError::Backend(unavailable("the batch got no outcome")))))
            .collect())
    }

    async fn batch_ordered(
        &self,
        statements: Vec<SqlStatement>,
        fence: Option<Fence>,
        ticket: Option<u64>,
    ) -> Result<Vec<QueryOutput>, SqlError> {
        // Translated once here: a statement PostgreSQL cannot take fails the batch before
        // anything runs.
        let translated = translate_all(&statements)?;
        // Reads need no fence: a stale owner reading harms nothing, and a read-only batch then
        // takes no lock on the shard row and does not wait for (or hold up) a group commit.
        let fence = fence.filter(|_| translated.iter().any(|t| t.writes));
        bounded(async {
            if fence.is_some() {
                self.ensure_shards().await?;
                return self.grouped(statements, translated, fence, ticket).await;
            }
            let reads_only = translated
                .iter()
                .all(|t| !t.writes && matches!(t.first_word.as_str(), "SELECT" | "WITH" | "VALUES"));
            // One statement needs no explicit transaction: in autocommit it is just as atomic.
            let mode = match (statements.len(), reads_only) {
                (1, _) => Mode::Single,
                (_, true) => Mode::Snapshot,
                (_, false) => Mode::Write,
            };
            let mut lease = self.clients.acquire().await?;
            run_alone(&mut lease, &statements, &translated, mode).await
        })
        .await
    }

    async fn ping(&self) -> Result<(), BackendError> {
        bounded(async {
            let mut lease = self.clients.acquire().await?;
            let r = lease.conn().client().check_connection().await.map_err(unavailable);
            lease.set_clean(r.is_ok());
            r
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Durable Object storage

/// Durable Object storage on PostgreSQL, with the same semantics as
/// [`crate::sqlite::SqliteObjectStorage`]. `commit` reads the shard's epoch `FOR SHARE` in its
/// transaction, so it either commits under the current epoch or fails with `Fenced`;
/// `acquire_shard` is one upsert that bumps the epoch and waits for commits in flight.
#[derive(Debug, Clone)]
pub struct PostgresObjectStorage {
    database: String,
    pool: PgPool,
    schema: std::sync::Arc<OnceCell<()>>,
}

impl PostgresObjectStorage {
    /// Connects lazily, like [`PostgresSql::new`].
    pub fn new(url: &str) -> Result<Self, BackendError> {
        Ok(Self { database: database_id(url), pool: pool(url)?, schema: Default::default() })
    }

    async fn ready(&self) -> Result<(), BackendError> {
        self.schema
            .get_or_try_init(|| async {
                let schema = format!("{SHARDS_SCHEMA}{DO_SCHEMA}");
                // A concurrent creator can collide in the catalog; the retry finds the tables.
                match sqlx::raw_sql(AssertSqlSafe(schema.clone())).execute(&self.pool).await {
                    Ok(_) => Ok(()),
                    Err(e) if !matches!(e, sqlx::Error::Database(_)) => Err(unavailable(e)),
                    Err(_) => sqlx::raw_sql(AssertSqlSafe(schema))
                        .execute(&self.pool)
                        .await
                        .map(drop)
                        .map_err(unavailable),
                }
            })
            .await
            .map(drop)
    }
}

/// The writes of both commit statements; the final SELECT follows.
macro_rules! commit_writes {
    () => {
        "
WITH fence AS (
    SELECT epoch FROM lattice_do_shards WHERE namespace = $1 AND shard = $3 FOR SHARE
), owned AS (
    SELECT 1 FROM fence WHERE epoch = $4
), deleted AS (
    DELETE FROM lattice_do_entries
    WHERE namespace = $1 AND object_id = $2 AND key = ANY($5::bytea[]) AND EXISTS (SELECT 1 FROM owned)
), put AS (
    INSERT INTO lattice_do_entries (namespace, object_id, key, value)
    SELECT $1, $2, k, v FROM UNNEST($6::bytea[], $7::bytea[]) AS t(k, v)
    WHERE EXISTS (SELECT 1 FROM owned)
    ON CONFLICT (namespace, object_id, key) DO UPDATE SET value = EXCLUDED.value
), alarm_set AS (
    INSERT INTO lattice_do_alarms (namespace, object_id, shard, scheduled_ms)
    SELECT $1, $2, $3, $9::bigint WHERE $8::int = 1 AND EXISTS (SELECT 1 FROM owned)
    ON CONFLICT (namespace, object_id)
    DO UPDATE SET shard = EXCLUDED.shard, scheduled_ms = EXCLUDED.scheduled_ms
), alarm_deleted AS (
    DELETE FROM lattice_do_alarms
    WHERE namespace = $1 AND object_id = $2 AND $8::int = 2 AND EXISTS (SELECT 1 FROM owned)
)
"
    };
}

/// One object commit: the fence and every write in one statement (preceded, in a transaction,
/// by the deletion `deleteAll` asks for). The data-modifying parts run once whatever the final
/// SELECT reads; each runs only under the
/// caller's epoch ($4). `$8` says what to do with the alarm: 0 nothing, 1 set to `$9`, 2 delete.
const COMMIT_ONE_STATEMENT: &str = concat!(commit_writes!(), "SELECT epoch FROM fence");

/// [`COMMIT_ONE_STATEMENT`] inside a larger transaction ([`PostgresSql::commit_with_object`]):
/// under another epoch (or none) it divides by zero, which aborts the whole transaction.
const COMMIT_FENCED_STATEMENT: &str =
    concat!(commit_writes!(), "SELECT 1 / (SELECT count(*)::int FROM owned) AS fenced");

/// The parameter types of both commit statements.
const COMMIT_TYPES: &[tokio_postgres::types::Type] = {
    use tokio_postgres::types::Type;
    &[
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::BYTEA_ARRAY,
        Type::BYTEA_ARRAY,
        Type::BYTEA_ARRAY,
        Type::INT4,
        Type::INT8,
    ]
};

/// An [`ObjectWrite`] as the commit statements' parameters `$5`..`$9` (the last write to a key
/// wins).
struct CommitParams<'a> {
    deletes: Vec<&'a [u8]>,
    put_keys: Vec<&'a [u8]>,
    put_values: Vec<&'a [u8]>,
    alarm_mode: i32,
    alarm_ms: i64,
}

impl<'a> CommitParams<'a> {
    fn of(writes: &'a ObjectWrite) -> Self {
        let mut last: BTreeMap<&[u8], Option<&Vec<u8>>> = BTreeMap::new();
        for (k, v) in &writes.entries {
            last.insert(k.as_bytes(), v.as_ref());
        }
        let deletes = last.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| *k).collect();
        let (put_keys, put_values) = last.iter().filter_map(|(k, v)| v.map(|v| (*k, v.as_slice()))).unzip();
        let (alarm_mode, alarm_ms) = match writes.alarm {
            None => (0, 0),
            Some(Some(ms)) => (1, to_i64(ms)),
            Some(None) => (2, 0),
        };
        Self { deletes, put_keys, put_values, alarm_mode, alarm_ms }
    }
}

fn key_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[async_trait]
impl ObjectStorageBackend for PostgresObjectStorage {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn database(&self) -> Option<&str> {
        Some(&self.database)
    }

    async fn acquire_shard(&self, namespace: &str, shard: u32) -> Result<u64, BackendError> {
        bounded(async {
            self.ready().await?;
            let epoch: i64 = sqlx::query_scalar(
                "INSERT INTO lattice_do_shards (namespace, shard, epoch) VALUES ($1, $2, 1)
                 ON CONFLICT (namespace, shard)
                 DO UPDATE SET epoch = lattice_do_shards.epoch + 1
                 RETURNING epoch",
            )
            .bind(namespace)
            .bind(i64::from(shard))
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(u64::try_from(epoch).unwrap_or(0))
        })
        .await
    }

    async fn get(&self, addr: &ObjectAddr, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
        bounded(async {
            self.ready().await?;
            let wanted: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
            let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
                "SELECT key, value FROM lattice_do_entries
                 WHERE namespace = $1 AND object_id = $2 AND key = ANY($3)",
            )
            .bind(&addr.namespace)
            .bind(&addr.id)
            .bind(&wanted)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            let mut found: BTreeMap<Vec<u8>, Vec<u8>> = rows.into_iter().collect();
            // In the order asked for, like the SQLite store.
            Ok(keys.iter().filter_map(|k| found.remove(k.as_bytes()).map(|v| (k.clone(), v))).collect())
        })
        .await
    }

    async fn list(
        &self,
        addr: &ObjectAddr,
        range: &ObjectListRange,
    ) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
        bounded(async {
            self.ready().await?;
            let (tail, values) = list_range_sql(range, 3, |n| format!("${n}"));
            let sql = format!(
                "SELECT key, value FROM lattice_do_entries
                 WHERE namespace = $1 AND object_id = $2{tail}"
            );
            let mut q = sqlx::query_as::<_, (Vec<u8>, Vec<u8>)>(AssertSqlSafe(sql))
                .bind(&addr.namespace)
                .bind(&addr.id);
            for v in values {
                q = q.bind(v);
            }
            let rows = q.fetch_all(&self.pool).await.map_err(unavailable)?;
            Ok(rows.into_iter().map(|(k, v)| (key_string(k), v)).collect())
        })
        .await
    }

    async fn get_alarm(&self, addr: &ObjectAddr) -> Result<Option<u64>, BackendError> {
        bounded(async {
            self.ready().await?;
            let ms: Option<i64> = sqlx::query_scalar(
                "SELECT scheduled_ms FROM lattice_do_alarms WHERE namespace = $1 AND object_id = $2",
            )
            .bind(&addr.namespace)
            .bind(&addr.id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(ms.map(|m| u64::try_from(m).unwrap_or(0)))
        })
        .await
    }

    async fn commit(&self, addr: &ObjectAddr, epoch: u64, writes: &ObjectWrite) -> Result<(), BackendError> {
        bounded(async {
            self.ready().await?;
            let p = CommitParams::of(writes);
            let commit = sqlx::query_scalar::<_, i64>(COMMIT_ONE_STATEMENT)
                .bind(&addr.namespace)
                .bind(&addr.id)
                .bind(i64::from(addr.shard))
                .bind(to_i64(epoch))
                .bind(&p.deletes)
                .bind(&p.put_keys)
                .bind(&p.put_values)
                .bind(p.alarm_mode)
                .bind(p.alarm_ms);
            // Without deleteAll the statement runs alone in autocommit: one round trip instead
            // of six (BEGIN, fence, deletes, puts, alarm, COMMIT), and just as atomic. With it,
            // the deletion comes first in a transaction (one statement cannot delete and upsert
            // the same rows), and a stale epoch rolls both back.
            let current = if writes.delete_all {
                let mut tx = self.pool.begin().await.map_err(unavailable)?;
                sqlx::query("DELETE FROM lattice_do_entries WHERE namespace = $1 AND object_id = $2")
                    .bind(&addr.namespace)
                    .bind(&addr.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                let current = commit.fetch_optional(&mut *tx).await.map_err(unavailable)?;
                if current.and_then(|e| u64::try_from(e).ok()) == Some(epoch) {
                    tx.commit().await.map_err(unavailable)?;
                }
                current
            } else {
                commit.fetch_optional(&self.pool).await.map_err(unavailable)?
            };
            if current.and_then(|e| u64::try_from(e).ok()) != Some(epoch) {
                return Err(BackendError::Fenced { shard: addr.shard, epoch });
            }
            Ok(())
        })
        .await
    }

    async fn due_alarms(
        &self,
        namespace: &str,
        shards: &[u32],
        now_ms: u64,
    ) -> Result<Vec<(ObjectAddr, u64)>, BackendError> {
        bounded(async {
            self.ready().await?;
            let shard_list: Vec<i64> = shards.iter().map(|s| i64::from(*s)).collect();
            let rows: Vec<(String, i64, i64)> = sqlx::query_as(
                "SELECT object_id, shard, scheduled_ms FROM lattice_do_alarms
                 WHERE namespace = $1 AND shard = ANY($2) AND scheduled_ms <= $3
                 ORDER BY scheduled_ms",
            )
            .bind(namespace)
            .bind(&shard_list)
            .bind(to_i64(now_ms))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(rows
                .into_iter()
                .map(|(id, shard, ms)| {
                    (
                        ObjectAddr {
                            namespace: namespace.to_owned(),
                            id,
                            shard: u32::try_from(shard).unwrap_or(0),
                        },
                        u64::try_from(ms).unwrap_or(0),
                    )
                })
                .collect())
        })
        .await
    }

    async fn ping(&self) -> Result<(), BackendError> {
        bounded(async { sqlx::query("SELECT 1").execute(&self.pool).await.map(drop).map_err(unavailable) })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::{numeric_to_f64, translate};

    fn check(input: &str, expected: &str) {
        match translate(input) {
            Ok(t) => assert_eq!(t.sql, expected, "translate({input:?})"),
            Err(e) => panic!("translate({input:?}) failed: {e}"),
        }
    }

    #[test]
    fn placeholders() {
        check("SELECT ?", "SELECT $1");
        check("SELECT ?, ?", "SELECT $1, $2");
        check("SELECT ?2, ?1", "SELECT $2, $1");
        check("SELECT ?2, ?", "SELECT $2, $3");
        check("SELECT '?', \"a?\", ? -- ?\n", "SELECT '?', \"a?\", $1 -- ?\n");
        check("SELECT /* ? */ ?", "SELECT /* ? */ $1");
        check("SELECT 'it''s ?', ?", "SELECT 'it''s ?', $1");
        assert!(translate("SELECT ?0").is_err());
        assert!(translate("SELECT 'open").is_err());
    }

    #[test]
    fn type_names() {
        check(
            "CREATE TABLE t (a INTEGER, b REAL, c BLOB, d TEXT)",
            "CREATE TABLE t (a BIGINT, b DOUBLE PRECISION, c BYTEA, d TEXT)",
        );
        check("SELECT 'BLOB', \"blob\", blobby", "SELECT 'BLOB', \"blob\", blobby");
        check("SELECT `a\"b`", "SELECT \"a\"\"b\"");
        check("SELECT 1e5, x1", "SELECT 1e5, x1");
    }

    #[test]
    fn statement_kind() {
        let t =
            translate("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.first_word, "WITH");
        assert!(t.writes);
        let t = translate("  -- c\n select 'insert'").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.first_word, "SELECT");
        assert!(!t.writes);
    }

    #[test]
    fn numeric() {
        // 12345.678 = digits [1, 2345, 6780], weight 1, dscale 3.
        let mut b = Vec::new();
        for w in [3i16, 1, 0, 3, 1, 2345, 6780] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        let v = numeric_to_f64(&b).unwrap_or_else(|e| panic!("{e}"));
        assert!((v - 12345.678).abs() < 1e-9, "{v}");
    }
}
