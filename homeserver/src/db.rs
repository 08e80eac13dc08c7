//! Storage over the D1 binding: the statement registry ([`sql`]), migrations, and typed rows.

pub mod sql;

use lattice_worker::bindings::lattice::bindings::d1::{self, Database, Value};
use lattice_worker::bindings::lattice::bindings::types;

pub use sql::Sql;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("the database is unavailable")]
    Unavailable { retry_after_secs: u32 },
    #[error("{statement}: {message}")]
    Sql { statement: &'static str, message: String },
    #[error("the database binding: {0}")]
    Binding(String),
    #[error("the schema migration lock is held by another process")]
    Migrating,
}

fn binding_error(e: &types::Error) -> DbError {
    match e {
        types::Error::Unavailable(u) => DbError::Unavailable { retry_after_secs: u.retry_after_secs.max(1) },
        types::Error::Fenced => DbError::Unavailable { retry_after_secs: 1 },
        other => DbError::Binding(format!("{other:?}")),
    }
}

fn d1_error(statement: &'static str, e: d1::D1Error) -> DbError {
    match e {
        d1::D1Error::Sql(message) | d1::D1Error::Exec((_, message)) => DbError::Sql { statement, message },
        d1::D1Error::Batch((i, message)) => {
            DbError::Sql { statement, message: format!("statement {i}: {message}") }
        }
        d1::D1Error::Binding(b) => binding_error(&b),
    }
}

/// One value to bind.
pub type Param = Value;

pub fn t(s: impl Into<String>) -> Param {
    Value::Text(s.into())
}
pub fn i(n: i64) -> Param {
    Value::Integer(n)
}
pub fn opt_t(s: Option<impl Into<String>>) -> Param {
    s.map_or(Value::Null, |s| Value::Text(s.into()))
}
pub fn opt_i(n: Option<i64>) -> Param {
    n.map_or(Value::Null, Value::Integer)
}

/// A row with named columns.
#[derive(Debug, Clone)]
pub struct Row {
    columns: std::rc::Rc<Vec<String>>,
    values: Vec<Value>,
}

impl Row {
    fn get(&self, column: &str) -> Option<&Value> {
        self.columns.iter().position(|c| c == column).and_then(|i| self.values.get(i))
    }
    pub fn text(&self, column: &str) -> Option<String> {
        match self.get(column)? {
            Value::Text(s) => Some(s.clone()),
            Value::Integer(n) => Some(n.to_string()),
            _ => None,
        }
    }
    pub fn str(&self, column: &str) -> String {
        self.text(column).unwrap_or_default()
    }
    pub fn int(&self, column: &str) -> Option<i64> {
        match self.get(column)? {
            Value::Integer(n) => Some(*n),
            Value::Real(f) => Some(*f as i64),
            Value::Text(s) => s.parse().ok(),
            _ => None,
        }
    }
}

/// A statement with its parameters, for batches.
#[derive(Debug, Clone)]
pub struct Bound {
    pub sql: Sql,
    pub params: Vec<Param>,
}

pub fn bound(sql: Sql, params: Vec<Param>) -> Bound {
    Bound { sql, params }
}

/// The homeserver's database (the `DB` D1 binding).
pub struct Db {
    db: Database,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Db")
    }
}

/// The D1 binding's name in the runtime's config.
pub const BINDING: &str = "DB";

impl Db {
    pub fn open() -> Result<Self, DbError> {
        Ok(Self { db: Database::open(BINDING).map_err(|e| binding_error(&e))? })
    }

    pub fn query(&self, sql: Sql, params: Vec<Param>) -> Result<Vec<Row>, DbError> {
        let r = self
            .db
            .query(&d1::Statement { sql: sql.text.to_owned(), params })
            .map_err(|e| d1_error(sql.name, e))?;
        let columns = std::rc::Rc::new(r.columns);
        Ok(r.rows.into_iter().map(|values| Row { columns: columns.clone(), values }).collect())
    }

    pub fn first(&self, sql: Sql, params: Vec<Param>) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Runs a statement and returns how many rows it changed.
    pub fn execute(&self, sql: Sql, params: Vec<Param>) -> Result<u64, DbError> {
        let r = self
            .db
            .query(&d1::Statement { sql: sql.text.to_owned(), params })
            .map_err(|e| d1_error(sql.name, e))?;
        Ok(r.meta.changes)
    }

    /// All statements in one transaction; the rows changed by each.
    pub fn batch(&self, statements: &[Bound]) -> Result<Vec<u64>, DbError> {
        Ok(self.raw_batch(statements)?.iter().map(|r| r.meta.changes).collect())
    }

    fn raw_batch(&self, statements: &[Bound]) -> Result<Vec<d1::QueryResult>, DbError> {
        if statements.is_empty() {
            return Ok(Vec::new());
        }
        let raws: Vec<d1::Statement> = statements
            .iter()
            .map(|b| d1::Statement { sql: b.sql.text.to_owned(), params: b.params.clone() })
            .collect();
        let name = statements.first().map_or("batch", |b| b.sql.name);
        self.db.batch(&raws).map_err(|e| d1_error(name, e))
    }

    /// Read-only statements in one call and one transaction (one consistent view on both
    /// engines); the rows of each.
    pub fn read_batch(&self, statements: &[Bound]) -> Result<Vec<Vec<Row>>, DbError> {
        Ok(self
            .raw_batch(statements)?
            .into_iter()
            .map(|r| {
                let columns = std::rc::Rc::new(r.columns);
                r.rows.into_iter().map(|values| Row { columns: columns.clone(), values }).collect()
            })
            .collect())
    }

    /// Brings the schema to the newest version, once even when many processes start together:
    /// one takes the lock and migrates, the others get [`DbError::Migrating`] and retry.
    pub fn migrate(&self, holder: &str, now_ms: i64) -> Result<(), DbError> {
        let latest = LATEST_SCHEMA;
        if self.schema_version().unwrap_or(0) >= latest {
            return Ok(());
        }
        // Two processes creating these at once can collide in PostgreSQL's catalog; the loser
        // retries once and then sees them.
        for attempt in 0..2 {
            let r =
                self.batch(&[bound(sql::MIGRATIONS_TABLE, vec![]), bound(sql::MIGRATION_LOCK_TABLE, vec![])]);
            match r {
                Ok(_) => break,
                Err(e) if attempt == 1 => return Err(e),
                Err(_) => {}
            }
        }
        self.execute(sql::LOCK_TAKE, vec![t(holder), i(now_ms + LOCK_LEASE_MS), i(now_ms)])?;
        let owner = self.first(sql::LOCK_HOLDER, vec![])?.and_then(|r| r.text("holder"));
        if owner.as_deref() != Some(holder) {
            return Err(DbError::Migrating);
        }
        let result = self.migrate_locked(now_ms, latest);
        let _ = self.execute(sql::LOCK_RELEASE, vec![t(holder)]);
        result
    }

    fn migrate_locked(&self, now_ms: i64, target: i64) -> Result<(), DbError> {
        let current = self.schema_version()?;
        for (version, name, statements) in sql::MIGRATIONS {
            if *version <= current || *version > target {
                continue;
            }
            let mut batch: Vec<Bound> = statements.iter().map(|s| bound(*s, vec![])).collect();
            batch.push(bound(sql::MIGRATION_RECORD, vec![i(*version), t(*name), i(now_ms)]));
            self.batch(&batch)?;
        }
        Ok(())
    }

    /// The applied schema version; 0 on an empty database.
    pub fn schema_version(&self) -> Result<i64, DbError> {
        Ok(self.first(sql::SCHEMA_VERSION, vec![])?.and_then(|r| r.int("version")).unwrap_or(0))
    }
}

/// The newest schema version, the last of [`sql::MIGRATIONS`].
pub const LATEST_SCHEMA: i64 = match sql::MIGRATIONS.last() {
    Some(m) => m.0,
    None => 0,
};

/// How long a migration may hold the lock before another process may take it over.
pub const LOCK_LEASE_MS: i64 = 60_000;
