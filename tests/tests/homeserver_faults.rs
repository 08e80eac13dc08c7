//! D1 failing after a room's object has decided events loses nothing and reorders nothing.
//!
//! A trigger on `events` (switched by a row in a table of the test's own) makes every event
//! insert fail, the way a D1 outage between the object's decision and its D1 write would.
//! Sends made meanwhile get an error; the object keeps their events in its outbox. Once D1
//! works again, new sends (whose flushes find the earlier entries claimed by the failed ones,
//! so their outbox guard fails and they write from the start), retries with the same
//! transaction ids and the object's alarm bring everything to D1: each event exactly once, in
//! the order the object decided, and a syncer that started before the failure sees all of it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lattice_backends::SqlBackend as _;
use lattice_e2e::{Backend, Client, Homeserver, Options, enc, fresh_postgres_database, services};
use serde_json::{Value, json};

const SENDERS: usize = 6;

/// Switches event inserts on the homeserver's D1 database off and on again.
enum Breaker {
    Postgres(String),
    Sqlite(lattice_backends::sqlite::SqliteSql),
}

impl Breaker {
    async fn install(&self) {
        match self {
            Self::Postgres(url) => {
                pg(
                    url,
                    "CREATE TABLE lattice_test_fail (x INTEGER);
                     CREATE FUNCTION lattice_test_fail_fn() RETURNS trigger AS $f$
                       BEGIN
                         IF EXISTS (SELECT 1 FROM lattice_test_fail) THEN
                           RAISE EXCEPTION 'injected failure';
                         END IF;
                         RETURN NEW;
                       END $f$ LANGUAGE plpgsql;
                     CREATE TRIGGER lattice_test_fail_tr BEFORE INSERT ON events
                       FOR EACH ROW EXECUTE FUNCTION lattice_test_fail_fn();",
                )
                .await;
            }
            Self::Sqlite(db) => {
                sqlite(db, "CREATE TABLE lattice_test_fail (x INTEGER)").await;
                sqlite(
                    db,
                    "CREATE TRIGGER lattice_test_fail_tr BEFORE INSERT ON events \
                     WHEN (SELECT COUNT(*) FROM lattice_test_fail) > 0 \
                     BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
                )
                .await;
            }
        }
    }

    async fn set(&self, failing: bool) {
        let q = if failing {
            "INSERT INTO lattice_test_fail (x) VALUES (1)"
        } else {
            "DELETE FROM lattice_test_fail"
        };
        match self {
            Self::Postgres(url) => pg(url, q).await,
            Self::Sqlite(db) => sqlite(db, q).await,
        }
    }
}

async fn pg(url: &str, q: &str) {
    use sqlx::Connection as _;
    let mut c = sqlx::PgConnection::connect(url).await.expect("connect to PostgreSQL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(q.to_owned())).execute(&mut c).await.expect(q);
}

async fn sqlite(db: &lattice_backends::sqlite::SqliteSql, q: &str) {
    db.batch(vec![lattice_backends::SqlStatement { sql: q.into(), params: vec![] }], None).await.expect(q);
}

/// Sends `body` with transaction id `txn`; the response.
async fn send(c: &Client, room: &str, txn: &str) -> lattice_e2e::Response {
    c.put(
        &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)),
        json!({"msgtype": "m.text", "body": txn}),
    )
    .await
}

/// Sends from every sender at once, `txn` prefixed with `round`.
async fn round(senders: &[Client], room: &str, round: &str) -> Vec<(String, lattice_e2e::Response)> {
    let tasks = senders.iter().enumerate().map(|(i, c)| {
        let (c, room, txn) = (c.clone(), room.to_owned(), format!("{round}{i}"));
        tokio::spawn(async move {
            let r = send(&c, &room, &txn).await;
            (txn, r)
        })
    });
    futures::future::join_all(tasks).await.into_iter().map(|r| r.expect("sender")).collect()
}

/// The bodies of the room's messages, oldest first, through `/messages`.
async fn timeline(c: &Client, room: &str) -> Vec<String> {
    let r = c.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1000", enc(room))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().expect("body").to_owned())
        .collect()
}

async fn failed_d1_writes_lose_nothing(backend: Backend) {
    let database_url = match backend {
        Backend::Production => {
            let Some(s) = services() else { return };
            Some(fresh_postgres_database(&s["LATTICE_TEST_POSTGRES_URL"]).await)
        }
        Backend::Embedded => None,
    };
    let mut options = Options::new(backend);
    if let Some(url) = &database_url {
        options = options.database_url(url);
    }
    let Some(hs) = Homeserver::start(options).await else { return };
    let anon = Client::new(&hs.url);
    let owner = anon.register("owner", "pw-owner").await;
    let r = owner.post("/_matrix/client/v3/createRoom", json!({"preset": "public_chat"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let room = r.body["room_id"].as_str().expect("room_id").to_owned();
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let c = anon.register(&format!("sender{i}"), "pw-sender").await;
        let r = c.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        senders.push(c);
    }
    let first = owner.get("/_matrix/client/v3/sync").await;
    let mut since = first.body["next_batch"].as_str().expect("next_batch").to_owned();

    let breaker = match &database_url {
        Some(url) => Breaker::Postgres(url.clone()),
        None => Breaker::Sqlite(
            lattice_backends::sqlite::SqliteSql::open(hs.dir.path().join("data/d1.sqlite"))
                .await
                .expect("open the homeserver's D1 file"),
        ),
    };
    breaker.install().await;

    // D1 fails: every send is refused with a clear error, nothing is half-written.
    breaker.set(true).await;
    for (txn, r) in round(&senders, &room, "a").await {
        assert!(r.status >= 500, "{txn} while D1 fails: {} {:?}", r.status, r.body);
        assert!(!r.errcode().is_empty(), "{txn}: a Matrix error: {:?}", r.body);
    }
    assert!(timeline(&owner, &room).await.is_empty(), "nothing reached D1 while it failed");

    // D1 works again. New sends succeed at once: their flushes write the earlier events too.
    breaker.set(false).await;
    let mut ids: HashMap<String, String> = HashMap::new();
    for (txn, r) in round(&senders, &room, "b").await {
        assert_eq!(r.status, 200, "{txn}: {:?}", r.body);
        ids.insert(txn, r.body["event_id"].as_str().expect("event_id").to_owned());
    }
    let bodies = timeline(&owner, &room).await;
    assert_eq!(bodies.len(), 2 * SENDERS, "the refused sends' events arrived with the next ones: {bodies:?}");
    // Retries of the refused sends give back the events decided the first time.
    for (txn, r) in round(&senders, &room, "a").await {
        assert_eq!(r.status, 200, "retry of {txn}: {:?}", r.body);
        ids.insert(txn, r.body["event_id"].as_str().expect("event_id").to_owned());
    }
    let bodies = timeline(&owner, &room).await;
    assert_eq!(bodies.len(), 2 * SENDERS, "retries added nothing: {bodies:?}");
    let (a, b): (Vec<&String>, Vec<&String>) = bodies.iter().partition(|b| b.starts_with('a'));
    assert_eq!(a.len(), SENDERS, "{bodies:?}");
    assert_eq!(b.len(), SENDERS, "{bodies:?}");
    assert!(bodies[..SENDERS].iter().all(|b| b.starts_with('a')), "the object's order is kept: {bodies:?}");

    // A failure that no later send repairs: the alarm writes the event.
    breaker.set(true).await;
    let r = send(&senders[0], &room, "c0").await;
    assert!(r.status >= 500, "{:?}", r.body);
    breaker.set(false).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while timeline(&owner, &room).await.len() < 2 * SENDERS + 1 {
        assert!(Instant::now() < deadline, "the alarm never wrote the refused event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The syncer from before the failure sees every event exactly once.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 2 * SENDERS + 1 {
        assert!(Instant::now() < deadline, "sync never delivered everything: {seen:?}");
        let filter = enc(&json!({"room": {"timeline": {"limit": 100}}}).to_string());
        let r =
            owner.get(&format!("/_matrix/client/v3/sync?since={since}&timeout=1000&filter={filter}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        since = r.body["next_batch"].as_str().expect("next_batch").to_owned();
        let events =
            r.body["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
        for e in events.iter().filter(|e| e["type"] == "m.room.message") {
            *seen.entry(e["content"]["body"].as_str().map(str::to_owned).unwrap_or_default()).or_default() +=
                1;
        }
        let limited: &Value = &r.body["rooms"]["join"][&room]["timeline"]["limited"];
        assert_ne!(limited, &json!(true), "a small gap is not limited");
    }
    assert!(seen.values().all(|n| *n == 1), "each event once: {seen:?}");
    let r = owner.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&ids["a0"]))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["content"]["body"], "a0");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_d1_writes_lose_nothing_embedded() {
    failed_d1_writes_lose_nothing(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_d1_writes_lose_nothing_production() {
    failed_d1_writes_lose_nothing(Backend::Production).await;
}
