//! The homeserver's SQL: every statement of the registry (`homeserver/src/db/sql.rs`) runs on
//! SQLite and on PostgreSQL through the runtime's own D1 backends; migrations give the same
//! schema from an empty database and from each earlier version; no SQL lives elsewhere; and
//! migrations run once when several servers start together on one database.

use std::collections::BTreeSet;

use lattice_backends::postgres::PostgresSql;
use lattice_backends::sqlite::SqliteSql;
use lattice_backends::{SqlBackend, SqlStatement, SqlValue};
use lattice_e2e::{Backend, Client, Homeserver, Options, fresh_postgres_database, services};
use lattice_homeserver::db::sql::{self, ALL, MIGRATIONS, Sql};

fn stmt(s: &Sql, params: Vec<SqlValue>) -> SqlStatement {
    SqlStatement { sql: s.text.to_owned(), params }
}

/// Sample values for a statement's parameters, distinct per statement so that inserts from
/// different statements never collide.
fn sample_params(index: usize, s: &Sql) -> Vec<SqlValue> {
    s.params
        .chars()
        .enumerate()
        .map(|(n, c)| match c {
            't' => SqlValue::Text(format!("x{index}_{n}")),
            'i' => SqlValue::Integer(i64::try_from(index * 100 + n).expect("small")),
            'b' => SqlValue::Blob(vec![1, 2, 3]),
            'T' | 'I' => SqlValue::Null,
            other => panic!("{}: unknown parameter kind {other:?}", s.name),
        })
        .collect()
}

async fn migrate_to(db: &dyn SqlBackend, target: i64) {
    db.batch(vec![stmt(&sql::MIGRATIONS_TABLE, vec![]), stmt(&sql::MIGRATION_LOCK_TABLE, vec![])], None)
        .await
        .expect("bookkeeping tables");
    let current = db
        .batch(vec![stmt(&sql::SCHEMA_VERSION, vec![])], None)
        .await
        .expect("schema version")
        .remove(0)
        .rows
        .first()
        .and_then(|r| match r.first() {
            Some(SqlValue::Integer(v)) => Some(*v),
            _ => None,
        })
        .unwrap_or(0);
    for (version, name, statements) in MIGRATIONS {
        if *version <= current || *version > target {
            continue;
        }
        let mut batch: Vec<SqlStatement> = statements.iter().map(|s| stmt(s, vec![])).collect();
        batch.push(stmt(
            &sql::MIGRATION_RECORD,
            vec![SqlValue::Integer(*version), SqlValue::Text((*name).into()), SqlValue::Integer(0)],
        ));
        db.batch(batch, None).await.unwrap_or_else(|e| panic!("migration {version} ({name}): {e:?}"));
    }
}

/// `(table, column)` pairs of the schema, as the engine describes it.
async fn schema(db: &dyn SqlBackend, postgres: bool) -> BTreeSet<(String, String)> {
    let q = if postgres {
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"
    } else {
        "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE m.type = 'table'"
    };
    let out =
        db.batch(vec![SqlStatement { sql: q.into(), params: vec![] }], None).await.expect("schema query");
    out[0]
        .rows
        .iter()
        .map(|r| match (&r[0], &r[1]) {
            (SqlValue::Text(t), SqlValue::Text(c)) => (t.clone(), c.clone()),
            other => panic!("unexpected row {other:?}"),
        })
        .collect()
}

async fn check_engine(fresh: impl AsyncFn() -> Box<dyn SqlBackend>, postgres: bool) {
    let latest = MIGRATIONS.last().expect("migrations").0;
    // From empty straight to the newest version.
    let reference = fresh().await;
    migrate_to(reference.as_ref(), latest).await;
    let want = schema(reference.as_ref(), postgres).await;
    assert!(want.iter().any(|(t, _)| t == "events"), "the schema has an events table: {want:?}");
    // From each earlier version.
    for from in 0..latest {
        let db = fresh().await;
        migrate_to(db.as_ref(), from).await;
        migrate_to(db.as_ref(), latest).await;
        assert_eq!(schema(db.as_ref(), postgres).await, want, "upgrading from version {from}");
    }
    // Migrating again changes nothing and does not fail.
    migrate_to(reference.as_ref(), latest).await;
    // Every statement of the registry runs, each in its own transaction (the outbox guard is
    // meant to fail on values that name no event; it has its own check below).
    for (i, s) in ALL.iter().enumerate() {
        if s.name == sql::OUTBOX_GUARD.name {
            continue;
        }
        reference
            .batch(vec![stmt(s, sample_params(i, s))], None)
            .await
            .unwrap_or_else(|e| panic!("{} on {}: {e:?}\n{}", s.name, reference.name(), s.text));
    }
    outbox_guard(reference.as_ref()).await;
}

/// The guard fails, taking its batch with it, unless the room's event at the given position is
/// there; it passes once it is.
async fn outbox_guard(db: &dyn SqlBackend) {
    let guard = |seq: i64| {
        stmt(
            &sql::OUTBOX_GUARD,
            vec![SqlValue::Text("!guard".into()), SqlValue::Text("!guard".into()), SqlValue::Integer(seq)],
        )
    };
    let event = |seq: i64| {
        let mut params = sample_params(9_000 + usize::try_from(seq).expect("small"), &sql::EVENT_INSERT);
        params[0] = SqlValue::Text(format!("$guard{seq}"));
        params[1] = SqlValue::Text("!guard".into());
        params[2] = SqlValue::Integer(seq);
        stmt(&sql::EVENT_INSERT, params)
    };
    let newest = async || {
        let out = db
            .batch(
                vec![stmt(
                    &sql::ROOM_SEQ_AT,
                    vec![SqlValue::Text("!guard".into()), SqlValue::Integer(i64::MAX)],
                )],
                None,
            )
            .await
            .expect("room seq");
        out[0].rows[0][0].clone()
    };
    let r = db.batch(vec![guard(1), event(2)], None).await;
    assert!(r.is_err(), "the guard passed without event 1 on {}: {r:?}", db.name());
    assert_eq!(newest().await, SqlValue::Null, "the failed batch left nothing");
    db.batch(vec![event(1)], None).await.expect("event 1");
    db.batch(vec![guard(1), event(2)], None).await.expect("the guard passes once event 1 is there");
    assert_eq!(newest().await, SqlValue::Integer(2), "event 2 is stored after the guard passed");
}

#[tokio::test]
async fn every_statement_and_migration_runs_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = std::sync::atomic::AtomicUsize::new(0);
    check_engine(
        async || {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::new(SqliteSql::open(dir.path().join(format!("db{i}.sqlite"))).await.expect("sqlite"))
                as Box<dyn SqlBackend>
        },
        false,
    )
    .await;
}

#[tokio::test]
async fn every_statement_and_migration_runs_on_postgres() {
    let Some(s) = services() else { return };
    let base = s["LATTICE_TEST_POSTGRES_URL"].clone();
    check_engine(
        async || {
            let url = fresh_postgres_database(&base).await;
            Box::new(PostgresSql::new(&url).expect("postgres")) as Box<dyn SqlBackend>
        },
        true,
    )
    .await;
}

fn source(path: &str) -> String {
    std::fs::read_to_string(lattice_e2e::manifest_dir().join("..").join(path))
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Every statement defined is in the registry (or a migration), and parameter lists match.
#[test]
fn the_registry_lists_every_statement() {
    let text = source("homeserver/src/db/sql.rs");
    let defined = text.matches(": Sql =").count();
    let in_migrations: usize = MIGRATIONS.iter().map(|m| m.2.len()).sum();
    assert_eq!(defined, ALL.len() + in_migrations, "a statement is missing from sql::ALL or MIGRATIONS");
    let mut names = BTreeSet::new();
    for s in ALL.iter().chain(MIGRATIONS.iter().flat_map(|m| m.2.iter())) {
        assert!(names.insert(s.name), "two statements are named {}", s.name);
        let placeholders = s.text.matches('?').count();
        assert_eq!(
            placeholders,
            s.params.len(),
            "{}: {} placeholders, params {:?}",
            s.name,
            placeholders,
            s.params
        );
    }
}

/// No SQL text anywhere in the homeserver but the registry.
#[test]
fn no_sql_outside_the_registry() {
    let root = lattice_e2e::manifest_dir().join("../homeserver/src");
    let mut offenders = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.ends_with("db/sql.rs") || p.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).expect("read");
            for kw in [
                "\"SELECT ",
                "\"INSERT ",
                "\"UPDATE ",
                "\"DELETE ",
                "\"CREATE ",
                "\"WITH ",
                "\"DROP ",
                "\"ALTER ",
            ] {
                if text.contains(kw) {
                    offenders.push(format!("{}: {kw}", p.display()));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "SQL outside homeserver/src/db/sql.rs: {offenders:?}");
}

/// Several homeservers start together on one empty PostgreSQL database: the schema is created
/// once (one row per migration), and every server then works.
#[tokio::test(flavor = "multi_thread")]
async fn migrations_run_once_when_servers_start_together() {
    let Some(s) = services() else { return };
    let url = fresh_postgres_database(&s["LATTICE_TEST_POSTGRES_URL"]).await;
    let name = format!("shared{}.test", lattice_e2e::unique());
    let mut servers = Vec::new();
    for _ in 0..3 {
        let options = Options::new(Backend::Production).database_url(&url).server_name(&name);
        servers.push(Homeserver::start(options).await.expect("services"));
    }
    // Everyone asks at once; some may be told to retry while another migrates.
    let attempts = servers.iter().enumerate().map(|(i, hs)| {
        let client = Client::new(&hs.url);
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let r = client.get("/_matrix/client/v3/register/available?username=probe").await;
                if r.status == 200 {
                    return;
                }
                assert_eq!(r.status, 503, "server {i}: {:?}", r.body);
                assert!(std::time::Instant::now() < deadline, "server {i} never got past the migration");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    });
    futures::future::join_all(attempts).await;
    let db = PostgresSql::new(&url).expect("postgres");
    let rows = db
        .batch(
            vec![SqlStatement { sql: "SELECT version FROM schema_migrations".into(), params: vec![] }],
            None,
        )
        .await
        .expect("query");
    assert_eq!(rows[0].rows.len(), MIGRATIONS.len(), "each migration recorded once");
    // All servers share the one database: a user registered on one logs in on another.
    Client::new(&servers[0].url).register("shared", "pw-shared-1").await;
    let login = Client::new(&servers[2].url)
        .post(
            "/_matrix/client/v3/login",
            serde_json::json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "shared"}, "password": "pw-shared-1"}),
        )
        .await;
    assert_eq!(login.status, 200, "{:?}", login.body);
}
