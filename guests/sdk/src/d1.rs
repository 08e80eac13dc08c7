//! workerd's D1 statement API over the host's `query`.

use crate::bindings::lattice::bindings::d1::{Database, QueryResult, Statement as Raw, Value};

pub use crate::bindings::lattice::bindings::d1::{D1Error, Meta};

/// A prepared statement with its bound values.
#[derive(Debug, Clone)]
pub struct Statement {
    raw: Raw,
}

/// Anything D1 can bind (workerd: numbers, strings, booleans as 1/0, null, bytes).
pub trait IntoValue {
    fn into_value(self) -> Value;
}

impl IntoValue for i64 {
    fn into_value(self) -> Value {
        Value::Integer(self)
    }
}
impl IntoValue for i32 {
    fn into_value(self) -> Value {
        Value::Integer(i64::from(self))
    }
}
impl IntoValue for u32 {
    fn into_value(self) -> Value {
        Value::Integer(i64::from(self))
    }
}
impl IntoValue for f64 {
    fn into_value(self) -> Value {
        Value::Real(self)
    }
}
impl IntoValue for bool {
    fn into_value(self) -> Value {
        Value::Integer(i64::from(self))
    }
}
impl IntoValue for &str {
    fn into_value(self) -> Value {
        Value::Text(self.to_owned())
    }
}
impl IntoValue for String {
    fn into_value(self) -> Value {
        Value::Text(self)
    }
}
impl IntoValue for Vec<u8> {
    fn into_value(self) -> Value {
        Value::Blob(self)
    }
}
impl IntoValue for &[u8] {
    fn into_value(self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl IntoValue for Value {
    fn into_value(self) -> Value {
        self
    }
}
impl<T: IntoValue> IntoValue for Option<T> {
    fn into_value(self) -> Value {
        self.map_or(Value::Null, IntoValue::into_value)
    }
}

/// `db.prepare(sql)`.
pub fn prepare(sql: impl Into<String>) -> Statement {
    Statement { raw: Raw { sql: sql.into(), params: Vec::new() } }
}

/// `.raw()`'s answer: the column names when asked for, and the rows as arrays.
pub type RawRows = (Option<Vec<String>>, Vec<Vec<Value>>);

/// One row: column names and values.
#[derive(Debug, Clone)]
pub struct Row {
    pub columns: std::rc::Rc<Vec<String>>,
    pub values: Vec<Value>,
}

impl Row {
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.columns.iter().position(|c| c == column).and_then(|i| self.values.get(i))
    }
}

impl Statement {
    /// Appends one positional value.
    pub fn bind(mut self, v: impl IntoValue) -> Self {
        self.raw.params.push(v.into_value());
        self
    }

    pub fn raw_statement(&self) -> &Raw {
        &self.raw
    }

    /// `.run()`: the whole result, meta included.
    pub fn run(&self, db: &Database) -> Result<QueryResult, D1Error> {
        db.query(&self.raw)
    }

    /// `.all()`: every row.
    pub fn all(&self, db: &Database) -> Result<(Vec<Row>, Meta), D1Error> {
        let r = self.run(db)?;
        let columns = std::rc::Rc::new(r.columns);
        Ok((r.rows.into_iter().map(|values| Row { columns: columns.clone(), values }).collect(), r.meta))
    }

    /// `.first()`: the first row, or none.
    pub fn first(&self, db: &Database) -> Result<Option<Row>, D1Error> {
        Ok(self.all(db)?.0.into_iter().next())
    }

    /// `.first(column)`: one column of the first row; `D1_COLUMN_NOTFOUND` when it is missing.
    pub fn first_column(&self, db: &Database, column: &str) -> Result<Option<Value>, D1Error> {
        let r = self.run(db)?;
        let Some(row) = r.rows.into_iter().next() else { return Ok(None) };
        let Some(i) = r.columns.iter().position(|c| c == column) else {
            return Err(D1Error::Sql(format!("D1_COLUMN_NOTFOUND: Column not found ({column})")));
        };
        Ok(row.into_iter().nth(i))
    }

    /// `.raw({columnNames})`: rows as arrays, optionally led by the column names.
    pub fn raw(&self, db: &Database, column_names: bool) -> Result<RawRows, D1Error> {
        let r = self.run(db)?;
        Ok((column_names.then_some(r.columns), r.rows))
    }
}

/// `db.batch([...])`: all statements in one transaction.
pub fn batch(db: &Database, statements: &[Statement]) -> Result<Vec<QueryResult>, D1Error> {
    let raws: Vec<Raw> = statements.iter().map(|s| s.raw.clone()).collect();
    db.batch(&raws)
}
