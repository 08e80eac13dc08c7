//! `lattice:bindings/d1`: SQL in SQLite's dialect (workerd D1).
//!
//! The guest SDK builds prepare/bind/first/all/raw/run on `query`; the host enforces D1's
//! limits and runs `batch` and `exec` as one transaction each.

use std::sync::Arc;

use lattice_backends::{SqlBackend, SqlError, SqlStatement, SqlValue};
use wasmtime::component::Resource;

use super::generated::lattice::bindings::d1::{
    D1Error, ExecResult, Host, HostDatabase, Meta, QueryResult, Statement, Value,
};
use super::{GuestError, guest_error};
use crate::state::{Gate, WorkerState};

/// D1 / SQLite-backed Durable Object limit: bound parameters per query.
pub const MAX_BOUND_PARAMETERS: usize = 100;
/// D1 limit: length of one SQL statement.
pub const MAX_STATEMENT_BYTES: usize = 100 * 1024;
/// Statements in one batch (keeps one transaction's lock time bounded).
pub const MAX_BATCH_STATEMENTS: usize = 1_000;

pub struct Database {
    name: String,
    backend: Arc<dyn SqlBackend>,
}

fn to_backend(v: Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(i),
        Value::Real(f) => SqlValue::Real(f),
        Value::Text(s) => SqlValue::Text(s),
        Value::Blob(b) => SqlValue::Blob(b),
    }
}

fn to_guest(v: SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => Value::Integer(i),
        SqlValue::Real(f) => Value::Real(f),
        SqlValue::Text(s) => Value::Text(s),
        SqlValue::Blob(b) => Value::Blob(b),
    }
}

fn check_statement(s: &Statement) -> Result<(), String> {
    if s.sql.trim().is_empty() {
        return Err("D1_ERROR: No SQL statements detected.".into());
    }
    if s.sql.len() > MAX_STATEMENT_BYTES {
        return Err(format!(
            "D1_ERROR: statement too long: {} bytes (max {MAX_STATEMENT_BYTES})",
            s.sql.len()
        ));
    }
    if s.params.len() > MAX_BOUND_PARAMETERS {
        return Err(format!(
            "D1_ERROR: too many SQL variables: {} (max {MAX_BOUND_PARAMETERS})",
            s.params.len()
        ));
    }
    Ok(())
}

fn result(out: lattice_backends::QueryOutput) -> QueryResult {
    QueryResult {
        columns: out.columns,
        rows: out.rows.into_iter().map(|r| r.into_iter().map(to_guest).collect()).collect(),
        meta: Meta {
            duration_ms: out.meta.duration_ms,
            changes: out.meta.changes,
            last_row_id: out.meta.last_row_id,
            changed_db: out.meta.changed_db,
            rows_read: out.meta.rows_read,
            rows_written: out.meta.rows_written,
            size_after: out.meta.size_after,
        },
    }
}

impl WorkerState {
    async fn run_batch(
        &mut self,
        db: &Resource<Database>,
        statements: Vec<SqlStatement>,
    ) -> wasmtime::Result<Result<Vec<lattice_backends::QueryOutput>, (String, SqlError)>> {
        let (name, backend) = {
            let d = self.table.get(db)?;
            (d.name.clone(), d.backend.clone())
        };
        let metrics = self.shared.metrics.clone();
        let started = std::time::Instant::now();
        // Inside an object whose storage lives in this database, the batch joins the object's
        // next commit (see `crate::objects`); otherwise it waits for the writes before it.
        let statements = match self.inv.object.as_mut() {
            Some(event) => match event.attach(&backend, statements) {
                Ok(answer) => Err(answer),
                Err(statements) => Ok(statements),
            },
            None => Ok(statements),
        };
        let out = match statements {
            Ok(statements) => {
                let fence = self.inv.object.as_ref().map(|e| e.fence());
                // Drawn while this event still holds its object, just before it seals its writes.
                let ticket = self.inv.object.as_ref().map(|_| crate::objects::next_seal_ticket());
                self.waiting(Gate::Open, backend.batch_ordered(statements, fence, ticket)).await?
            }
            Err(answer) => {
                let waited = std::time::Instant::now();
                let outcome = answer.await;
                if let Some(event) = self.inv.object.as_mut() {
                    event.close_input_gate().await;
                }
                self.inv.host_wait += waited.elapsed();
                match outcome {
                    Ok(Ok(out)) => out,
                    Ok(Err(e)) => return Err(wasmtime::Error::msg(format!("Durable Object: {e}"))),
                    Err(_) => {
                        return Err(wasmtime::Error::msg(
                            "Durable Object: the commit carrying a batch ended",
                        ));
                    }
                }
            }
        };
        metrics.binding_call("d1", backend.name(), started.elapsed(), out.is_err());
        if matches!(out, Err(SqlError::Backend(lattice_backends::BackendError::Fenced { .. }))) {
            metrics.fenced_d1_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(out.map_err(|e| (name, e)))
    }
}

impl HostDatabase for WorkerState {
    async fn open(&mut self, binding: String) -> wasmtime::Result<Result<Resource<Database>, GuestError>> {
        let Some(backend) = self.shared.d1.get(&binding).cloned() else {
            return Ok(Err(GuestError::UnknownBinding(binding)));
        };
        Ok(Ok(self.table.push(Database { name: binding, backend })?))
    }

    async fn query(
        &mut self,
        db: Resource<Database>,
        statement: Statement,
    ) -> wasmtime::Result<Result<QueryResult, D1Error>> {
        if let Err(m) = check_statement(&statement) {
            return Ok(Err(D1Error::Sql(m)));
        }
        let stmt = SqlStatement {
            sql: statement.sql,
            params: statement.params.into_iter().map(to_backend).collect(),
        };
        Ok(match self.run_batch(&db, vec![stmt]).await? {
            Ok(mut outs) => Ok(result(outs.pop().unwrap_or_default())),
            Err((_, SqlError::Statement { message, .. })) => {
                Err(D1Error::Sql(format!("D1_ERROR: {message}")))
            }
            Err((name, SqlError::Backend(e))) => Err(D1Error::Binding(guest_error(&name, e))),
        })
    }

    async fn batch(
        &mut self,
        db: Resource<Database>,
        statements: Vec<Statement>,
    ) -> wasmtime::Result<Result<Vec<QueryResult>, D1Error>> {
        if statements.is_empty() {
            return Ok(Err(D1Error::Sql("D1_ERROR: No SQL statements detected.".into())));
        }
        if statements.len() > MAX_BATCH_STATEMENTS {
            return Ok(Err(D1Error::Sql(format!(
                "D1_ERROR: too many statements in one batch (max {MAX_BATCH_STATEMENTS})"
            ))));
        }
        for (i, s) in statements.iter().enumerate() {
            if let Err(m) = check_statement(s) {
                return Ok(Err(D1Error::Batch((u32::try_from(i).unwrap_or(u32::MAX), m))));
            }
        }
        let stmts = statements
            .into_iter()
            .map(|s| SqlStatement { sql: s.sql, params: s.params.into_iter().map(to_backend).collect() })
            .collect();
        Ok(match self.run_batch(&db, stmts).await? {
            Ok(outs) => Ok(outs.into_iter().map(result).collect()),
            Err((_, SqlError::Statement { index, message })) => Err(D1Error::Batch((
                u32::try_from(index).unwrap_or(u32::MAX),
                format!("D1_ERROR: {message}"),
            ))),
            Err((name, SqlError::Backend(e))) => Err(D1Error::Binding(guest_error(&name, e))),
        })
    }

    async fn exec(
        &mut self,
        db: Resource<Database>,
        sql: String,
    ) -> wasmtime::Result<Result<ExecResult, D1Error>> {
        // workerd splits on newlines and sends each line as its own statement.
        let lines: Vec<(u32, String)> = sql
            .split('\n')
            .enumerate()
            .map(|(i, l)| (u32::try_from(i + 1).unwrap_or(u32::MAX), l.trim().to_owned()))
            .filter(|(_, l)| !l.is_empty())
            .collect();
        if lines.is_empty() {
            return Ok(Err(D1Error::Sql("D1_ERROR: No SQL statements detected.".into())));
        }
        for (n, l) in &lines {
            if l.len() > MAX_STATEMENT_BYTES {
                return Ok(Err(D1Error::Exec((
                    *n,
                    format!("D1_EXEC_ERROR: Error in line {n}: statement too long"),
                ))));
            }
        }
        let stmts = lines.iter().map(|(_, l)| SqlStatement { sql: l.clone(), params: vec![] }).collect();
        let started = std::time::Instant::now();
        Ok(match self.run_batch(&db, stmts).await? {
            Ok(outs) => Ok(ExecResult {
                count: u32::try_from(outs.len()).unwrap_or(u32::MAX),
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            }),
            Err((_, SqlError::Statement { index, message })) => {
                let (n, line) = lines.get(index).cloned().unwrap_or((0, String::new()));
                Err(D1Error::Exec((n, format!("D1_EXEC_ERROR: Error in line {n}: {line}: {message}"))))
            }
            Err((name, SqlError::Backend(e))) => Err(D1Error::Binding(guest_error(&name, e))),
        })
    }

    async fn drop(&mut self, rep: Resource<Database>) -> wasmtime::Result<()> {
        self.table.delete(rep)?;
        Ok(())
    }
}

impl Host for WorkerState {}
