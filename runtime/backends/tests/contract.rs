//! One contract per binding trait, run against every backend.
//!
//! Embedded backends always run. PostgreSQL, Redis and S3 run when their `LATTICE_TEST_*`
//! variables are set (`scripts/services.sh start <dir>` writes them to `<dir>/env`); with
//! `LATTICE_REQUIRE_SERVICES=1` a missing variable fails the test instead of skipping it.
//! Every run uses fresh names (tables, namespaces, buckets), so runs never see each other's data.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::net::TcpListener;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lattice_backends::fs::FsObjects;
use lattice_backends::postgres::{PostgresObjectStorage, PostgresSql};
use lattice_backends::redis::RedisKv;
use lattice_backends::s3::{S3Config, S3Objects};
use lattice_backends::sqlite::{SqliteKv, SqliteObjectStorage, SqliteSql};
use lattice_backends::{
    BackendError, ByteRange, Fence, HttpMetadata, KvBackend, KvEntry, ObjectAddr, ObjectBackend,
    ObjectListRange, ObjectMeta, ObjectStorageBackend, ObjectWrite, SqlBackend, SqlError, SqlStatement,
    SqlValue,
};

// ---------------------------------------------------------------------------------------------
// helpers

/// The values of `vars`, or `None` (skip) when one is unset; fails instead under
/// `LATTICE_REQUIRE_SERVICES=1`.
fn service_env(vars: &[&str]) -> Option<Vec<String>> {
    let values: Vec<Option<String>> =
        vars.iter().map(|v| std::env::var(v).ok().filter(|s| !s.is_empty())).collect();
    if values.iter().all(Option::is_some) {
        return Some(values.into_iter().flatten().collect());
    }
    let missing: Vec<&str> = vars.iter().zip(&values).filter(|(_, v)| v.is_none()).map(|(n, _)| *n).collect();
    if std::env::var("LATTICE_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!(
            "LATTICE_REQUIRE_SERVICES=1 but {missing:?} unset (source the env file of scripts/services.sh)"
        );
    }
    eprintln!("skipped: {missing:?} unset");
    None
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 6]>()))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn st(sql: &str, params: Vec<SqlValue>) -> SqlStatement {
    SqlStatement { sql: sql.to_owned(), params }
}

fn text(s: &str) -> SqlValue {
    SqlValue::Text(s.to_owned())
}

/// A loopback port with nothing listening.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

/// A loopback listener that accepts connections (the kernel does) but never answers.
fn silent_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn assert_unavailable<T: std::fmt::Debug>(r: Result<T, BackendError>, started: Instant, within: Duration) {
    assert!(matches!(r, Err(BackendError::Unavailable { .. })), "expected Unavailable, got {r:?}");
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// D1

/// `fence_store` shares the SQL backend's database, so its epochs fence the batches.
async fn sql_contract(b: &dyn SqlBackend, fence_store: Option<&dyn ObjectStorageBackend>) {
    b.ping().await.unwrap();
    let t = unique("t_");
    let out = b
        .batch(
            vec![st(
                &format!("CREATE TABLE {t} (id INTEGER PRIMARY KEY, name TEXT, score REAL, data BLOB)"),
                vec![],
            )],
            None,
        )
        .await
        .unwrap();
    assert!(out[0].meta.changed_db);

    // Insert with numbered and plain placeholders.
    let out = b
        .batch(
            vec![
                st(
                    &format!("INSERT INTO {t} (id, name, score, data) VALUES (?1, ?2, ?3, ?4)"),
                    vec![
                        SqlValue::Integer(1),
                        text("one"),
                        SqlValue::Real(1.5),
                        SqlValue::Blob(vec![0, 1, 255]),
                    ],
                ),
                st(
                    &format!("INSERT INTO {t} (id, name, score, data) VALUES (?, ?, ?, ?)"),
                    vec![SqlValue::Integer(5_000_000_000), text("big"), SqlValue::Null, SqlValue::Null],
                ),
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].meta.changes, 1);
    assert_eq!(out[0].meta.rows_written, 1);
    assert!(out[0].meta.changed_db);
    assert!(out[0].columns.is_empty());

    let out = b
        .batch(
            vec![st(
                &format!("SELECT id, name, score, data FROM {t} WHERE id >= ?2 AND name <> ?1 ORDER BY id"),
                vec![text("nobody"), SqlValue::Integer(0)],
            )],
            None,
        )
        .await
        .unwrap();
    assert_eq!(out[0].columns, ["id", "name", "score", "data"]);
    assert_eq!(
        out[0].rows,
        vec![
            vec![SqlValue::Integer(1), text("one"), SqlValue::Real(1.5), SqlValue::Blob(vec![0, 1, 255])],
            vec![SqlValue::Integer(5_000_000_000), text("big"), SqlValue::Null, SqlValue::Null],
        ]
    );
    assert_eq!(out[0].meta.rows_read, 2);
    assert_eq!(out[0].meta.changes, 0);

    // An empty result still names its columns; aggregates are integers.
    let out = b
        .batch(
            vec![
                st(&format!("SELECT name AS n FROM {t} WHERE id = ?"), vec![SqlValue::Integer(42)]),
                st(&format!("SELECT count(*) AS c FROM {t}"), vec![]),
                st("SELECT ? AS a, ? AS b", vec![SqlValue::Integer(7), text("x")]),
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(out[0].columns, ["n"]);
    assert!(out[0].rows.is_empty());
    assert_eq!(out[1].rows, vec![vec![SqlValue::Integer(2)]]);
    assert_eq!(out[2].rows, vec![vec![SqlValue::Integer(7), text("x")]]);

    // UPDATE reports the rows it changed; string literals with `?` are left alone.
    let out = b
        .batch(
            vec![st(&format!("UPDATE {t} SET name = 'why?' WHERE id > ?"), vec![SqlValue::Integer(0)])],
            None,
        )
        .await
        .unwrap();
    assert_eq!(out[0].meta.changes, 2);

    // Atomicity: the second statement fails, the first leaves nothing behind.
    let err = b
        .batch(
            vec![
                st(
                    &format!("INSERT INTO {t} (id, name) VALUES (?, ?)"),
                    vec![SqlValue::Integer(2), text("two")],
                ),
                st(
                    &format!("INSERT INTO {t} (id, name) VALUES (?, ?)"),
                    vec![SqlValue::Integer(1), text("dup")],
                ),
            ],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SqlError::Statement { index: 1, .. }), "{err:?}");
    let err = b.batch(vec![st("SELEC nonsense", vec![])], None).await.unwrap_err();
    assert!(matches!(err, SqlError::Statement { index: 0, .. }), "{err:?}");
    // A statement given too few parameters fails the batch before anything of it is kept,
    // including a later statement, and one with an unrepresentable column likewise.
    // SQLite represents a timestamp as text, so there only the parameter count fails.
    for (bad, fails_on_sqlite) in [
        (st(&format!("INSERT INTO {t} (id, name) VALUES (?, ?)"), vec![SqlValue::Integer(3)]), true),
        (st("SELECT CURRENT_TIMESTAMP AS now, ? AS x", vec![SqlValue::Integer(1)]), false),
    ] {
        let r = b
            .batch(
                vec![
                    st(
                        &format!("INSERT INTO {t} (id, name) VALUES (?, ?)"),
                        vec![SqlValue::Integer(2), text("two")],
                    ),
                    bad,
                    st(
                        &format!("INSERT INTO {t} (id, name) VALUES (?, ?)"),
                        vec![SqlValue::Integer(4), text("four")],
                    ),
                ],
                None,
            )
            .await;
        if fails_on_sqlite || b.name() != "sqlite" {
            let err = r.expect_err("the batch fails");
            assert!(matches!(err, SqlError::Statement { index: 1, .. }), "{err:?}");
        } else {
            r.expect("SQLite takes the timestamp");
            b.batch(vec![st(&format!("DELETE FROM {t} WHERE id IN (2, 4)"), vec![])], None).await.unwrap();
        }
    }
    let out = b
        .batch(vec![st(&format!("SELECT count(*) FROM {t} WHERE id IN (2, 4)"), vec![])], None)
        .await
        .unwrap();
    assert_eq!(out[0].rows, vec![vec![SqlValue::Integer(0)]]);

    if let Some(store) = fence_store {
        let ns = unique("ns");
        let e1 = store.acquire_shard(&ns, 3).await.unwrap();
        let e2 = store.acquire_shard(&ns, 3).await.unwrap();
        assert!(e2 > e1);
        let insert = |id: i64| {
            vec![st(&format!("INSERT INTO {t} (id, name) VALUES (?, 'fenced')"), vec![SqlValue::Integer(id)])]
        };
        let stale = Fence { namespace: ns.clone(), shard: 3, epoch: e1 };
        let err = b.batch(insert(10), Some(stale)).await.unwrap_err();
        assert!(matches!(err, SqlError::Backend(BackendError::Fenced { shard: 3, .. })), "{err:?}");
        let current = Fence { namespace: ns.clone(), shard: 3, epoch: e2 };
        b.batch(insert(11), Some(current)).await.unwrap();
        // A shard never acquired in this database is not fenced here.
        let other = Fence { namespace: unique("other"), shard: 0, epoch: 99 };
        b.batch(insert(12), Some(other)).await.unwrap();
        let out = b
            .batch(vec![st(&format!("SELECT id FROM {t} WHERE name = 'fenced' ORDER BY id"), vec![])], None)
            .await
            .unwrap();
        assert_eq!(out[0].rows, vec![vec![SqlValue::Integer(11)], vec![SqlValue::Integer(12)]]);
    }

    b.batch(vec![st(&format!("DROP TABLE {t}"), vec![])], None).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// KV

fn kv(value: &str, metadata: Option<&str>, expiration: Option<u64>) -> KvEntry {
    KvEntry { value: value.as_bytes().to_vec(), metadata: metadata.map(str::to_owned), expiration }
}

async fn kv_contract(b: &dyn KvBackend) {
    b.ping().await.unwrap();
    let ns = unique("ns");
    let other = unique("other");
    let now = now_secs();
    for key in ["a", "Z", "é", "pre/1", "pre/3", "pre/2", "b"] {
        b.put(&ns, key, kv(&format!("v-{key}"), Some(&format!("{{\"k\":\"{key}\"}}")), None), now)
            .await
            .unwrap();
    }
    b.put(&other, "a", kv("other", None, None), now).await.unwrap();

    let got = b.get(&ns, "a", now).await.unwrap().unwrap();
    assert_eq!(got, kv("v-a", Some("{\"k\":\"a\"}"), None));
    assert_eq!(b.get(&ns, "missing", now).await.unwrap(), None);
    assert_eq!(b.get(&other, "a", now).await.unwrap().unwrap().value, b"other");

    let names = |keys: Vec<lattice_backends::KvKey>| keys.into_iter().map(|k| k.name).collect::<Vec<_>>();
    // Byte order: "Z" < "a" < "é".
    assert_eq!(
        names(b.list(&ns, "", None, 100, now).await.unwrap()),
        ["Z", "a", "b", "pre/1", "pre/2", "pre/3", "é"]
    );
    assert_eq!(names(b.list(&ns, "pre/", None, 100, now).await.unwrap()), ["pre/1", "pre/2", "pre/3"]);
    assert_eq!(names(b.list(&ns, "pre/", None, 2, now).await.unwrap()), ["pre/1", "pre/2"]);
    assert_eq!(names(b.list(&ns, "pre/", Some("pre/2"), 2, now).await.unwrap()), ["pre/3"]);
    assert_eq!(names(b.list(&ns, "", Some("b"), 2, now).await.unwrap()), ["pre/1", "pre/2"]);
    assert_eq!(names(b.list(&ns, "pre/", Some("a"), 1, now).await.unwrap()), ["pre/1"]);
    let listed = b.list(&ns, "pre/1", None, 10, now).await.unwrap();
    assert_eq!(listed[0].metadata.as_deref(), Some("{\"k\":\"pre/1\"}"));

    // Expiry, judged by the caller's clock.
    let exp = now + 3600;
    b.put(&ns, "pre/0", kv("soon", None, Some(exp)), now).await.unwrap();
    assert_eq!(b.get(&ns, "pre/0", now).await.unwrap(), Some(kv("soon", None, Some(exp))));
    let listed = b.list(&ns, "pre/", None, 1, now).await.unwrap();
    assert_eq!(listed[0].name, "pre/0");
    assert_eq!(listed[0].expiration, Some(exp));
    assert_eq!(b.get(&ns, "pre/0", exp).await.unwrap(), None);
    // Limit counts live keys only.
    assert_eq!(names(b.list(&ns, "pre/", None, 2, exp + 1).await.unwrap()), ["pre/1", "pre/2"]);

    // Overwrite replaces value, metadata and expiration.
    b.put(&ns, "pre/0", kv("again", None, None), now).await.unwrap();
    assert_eq!(b.get(&ns, "pre/0", exp + 10).await.unwrap(), Some(kv("again", None, None)));

    b.delete(&ns, "pre/2").await.unwrap();
    b.delete(&ns, "never-there").await.unwrap();
    assert_eq!(b.get(&ns, "pre/2", now).await.unwrap(), None);
    assert_eq!(names(b.list(&ns, "pre/", None, 10, now).await.unwrap()), ["pre/0", "pre/1", "pre/3"]);

    // Binary values survive.
    let bytes: Vec<u8> = (0..=255).collect();
    b.put(&ns, "bin", KvEntry { value: bytes.clone(), metadata: None, expiration: None }, now).await.unwrap();
    assert_eq!(b.get(&ns, "bin", now).await.unwrap().unwrap().value, bytes);
}

// ---------------------------------------------------------------------------------------------
// R2

fn object(key: &str, body: &[u8], n: u32) -> ObjectMeta {
    use md5::Digest as _;
    ObjectMeta {
        key: key.to_owned(),
        version: format!("v{n}-{}", hex::encode(rand::random::<[u8; 8]>())),
        size: body.len() as u64,
        etag: hex::encode(md5::Md5::digest(body)),
        uploaded: 1_700_000_000_000 + u64::from(n),
        http: HttpMetadata {
            content_type: Some("text/plain; charset=utf-8".into()),
            content_language: n.is_multiple_of(2).then(|| "en".into()),
            content_disposition: Some("attachment; filename=\"ünï.txt\"".into()),
            content_encoding: None,
            cache_control: Some("max-age=60".into()),
            cache_expiry: (!n.is_multiple_of(2)).then_some(1_800_000_000_000),
        },
        custom: vec![("Owner".into(), "@alice:example.org".into()), ("ünï".into(), "v ✓".into())],
        md5: Some(md5::Md5::digest(body).to_vec()),
        sha256: n.is_multiple_of(2).then(|| vec![7; 32]),
    }
}

async fn objects_contract(b: &dyn ObjectBackend) {
    b.ping().await.unwrap();
    let bucket = unique("bkt");
    let keys = ["a/1", "a/2", "b", "c/x/1", "d"];
    let mut metas = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        let body = format!("body of {key}: 0123456789");
        let meta = object(key, body.as_bytes(), n as u32);
        b.put(&bucket, &meta, body.into_bytes()).await.unwrap();
        metas.push(meta);
    }

    assert_eq!(b.head(&bucket, "b").await.unwrap(), Some(metas[2].clone()));
    assert_eq!(b.head(&bucket, "nope").await.unwrap(), None);
    assert_eq!(b.get(&bucket, "nope", None).await.unwrap(), None);
    let (meta, body) = b.get(&bucket, "a/2", None).await.unwrap().unwrap();
    assert_eq!(meta, metas[1]);
    assert_eq!(body, b"body of a/2: 0123456789");
    let (meta, body) =
        b.get(&bucket, "a/2", Some(ByteRange { offset: 13, length: 4 })).await.unwrap().unwrap();
    assert_eq!(meta.size, 23);
    assert_eq!(body, b"0123");
    let (_, body) = b.get(&bucket, "a/2", Some(ByteRange { offset: 5, length: 0 })).await.unwrap().unwrap();
    assert!(body.is_empty());

    let all = b.list(&bucket, "", None, None, 100).await.unwrap();
    assert_eq!(all.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), keys);
    assert_eq!(all.objects[3], metas[3]);
    assert!(all.delimited_prefixes.is_empty());
    assert!(!all.truncated);

    let page = b.list(&bucket, "", None, None, 2).await.unwrap();
    assert_eq!(page.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["a/1", "a/2"]);
    assert!(page.truncated);
    assert_eq!(page.cursor.as_deref(), Some("a/2"));
    let page = b.list(&bucket, "", None, Some("a/2"), 2).await.unwrap();
    assert_eq!(page.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["b", "c/x/1"]);

    let delimited = b.list(&bucket, "", Some("/"), None, 100).await.unwrap();
    assert_eq!(delimited.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["b", "d"]);
    assert_eq!(delimited.delimited_prefixes, ["a/", "c/"]);
    assert!(!delimited.truncated);

    let page = b.list(&bucket, "", Some("/"), None, 2).await.unwrap();
    assert_eq!(page.delimited_prefixes, ["a/"]);
    assert_eq!(page.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["b"]);
    assert!(page.truncated);
    assert_eq!(page.cursor.as_deref(), Some("b"));
    let page = b.list(&bucket, "", Some("/"), Some("a/"), 100).await.unwrap();
    assert_eq!(page.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["b", "d"]);
    assert_eq!(page.delimited_prefixes, ["c/"]);

    let sub = b.list(&bucket, "c/", Some("/"), None, 100).await.unwrap();
    assert_eq!(sub.delimited_prefixes, ["c/x/"]);
    assert!(sub.objects.is_empty());
    let sub = b.list(&bucket, "a/", None, None, 100).await.unwrap();
    assert_eq!(sub.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["a/1", "a/2"]);

    // Overwrite and delete.
    let new_meta = object("b", b"new", 9);
    b.put(&bucket, &new_meta, b"new".to_vec()).await.unwrap();
    assert_eq!(b.get(&bucket, "b", None).await.unwrap(), Some((new_meta, b"new".to_vec())));
    b.delete(&bucket, &["a/1".to_owned(), "missing".to_owned()]).await.unwrap();
    assert_eq!(b.head(&bucket, "a/1").await.unwrap(), None);
    let empty = object("empty", b"", 4);
    b.put(&bucket, &empty, Vec::new()).await.unwrap();
    assert_eq!(b.get(&bucket, "empty", None).await.unwrap(), Some((empty, Vec::new())));

    // Multipart parts, invisible to listings.
    let upload = unique("upload-");
    b.put_part(&bucket, &upload, 1, b"first-old".to_vec()).await.unwrap();
    b.put_part(&bucket, &upload, 2, b"second".to_vec()).await.unwrap();
    b.put_part(&bucket, &upload, 1, b"first".to_vec()).await.unwrap();
    let listed = b.list(&bucket, "", None, None, 100).await.unwrap();
    assert_eq!(
        listed.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
        ["a/2", "b", "c/x/1", "d", "empty"]
    );
    assert_eq!(b.take_parts(&bucket, &upload, &[1, 3]).await.unwrap(), None);
    assert_eq!(
        b.take_parts(&bucket, &upload, &[1, 2]).await.unwrap(),
        Some(vec![b"first".to_vec(), b"second".to_vec()])
    );
    assert_eq!(b.take_parts(&bucket, &upload, &[1]).await.unwrap(), None);
    let aborted = unique("upload-");
    b.put_part(&bucket, &aborted, 1, b"x".to_vec()).await.unwrap();
    b.abort_parts(&bucket, &aborted).await.unwrap();
    assert_eq!(b.take_parts(&bucket, &aborted, &[1]).await.unwrap(), None);
    b.abort_parts(&bucket, &aborted).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Durable Object storage

async fn object_storage_contract(b: &dyn ObjectStorageBackend) {
    b.ping().await.unwrap();
    let ns = unique("ns");
    let e1 = b.acquire_shard(&ns, 0).await.unwrap();
    let e2 = b.acquire_shard(&ns, 0).await.unwrap();
    assert!(e2 > e1, "{e1} then {e2}");
    let addr = ObjectAddr { namespace: ns.clone(), id: "aa".repeat(32), shard: 0 };
    let other = ObjectAddr { namespace: ns.clone(), id: "bb".repeat(32), shard: 0 };

    let put = |k: &str, v: &str| (k.to_owned(), Some(v.as_bytes().to_vec()));
    let writes = ObjectWrite {
        delete_all: false,
        entries: vec![
            put("a", "1"),
            put("b", "2"),
            put("c", "3"),
            put("pre/x", "4"),
            put("pre/y", "5"),
            put("é", "6"),
        ],
        alarm: Some(Some(1000)),
    };
    b.commit(&addr, e2, &writes).await.unwrap();
    b.commit(&other, e2, &ObjectWrite { entries: vec![put("a", "other")], ..Default::default() })
        .await
        .unwrap();

    let got = b.get(&addr, &["c".into(), "missing".into(), "a".into()]).await.unwrap();
    assert_eq!(got, vec![("c".into(), b"3".to_vec()), ("a".into(), b"1".to_vec())]);

    let keys = |r: Vec<(String, Vec<u8>)>| r.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let list = |range: ObjectListRange| {
        let addr = addr.clone();
        async move { keys(b.list(&addr, &range).await.unwrap()) }
    };
    assert_eq!(list(ObjectListRange::default()).await, ["a", "b", "c", "pre/x", "pre/y", "é"]);
    assert_eq!(
        list(ObjectListRange { start: Some("b".into()), ..Default::default() }).await,
        ["b", "c", "pre/x", "pre/y", "é"]
    );
    assert_eq!(
        list(ObjectListRange { start_after: Some("b".into()), ..Default::default() }).await,
        ["c", "pre/x", "pre/y", "é"]
    );
    assert_eq!(list(ObjectListRange { end: Some("c".into()), ..Default::default() }).await, ["a", "b"]);
    assert_eq!(
        list(ObjectListRange { prefix: Some("pre/".into()), ..Default::default() }).await,
        ["pre/x", "pre/y"]
    );
    assert_eq!(
        list(ObjectListRange { reverse: true, limit: Some(2), ..Default::default() }).await,
        ["é", "pre/y"]
    );
    assert_eq!(
        list(ObjectListRange {
            start: Some("b".into()),
            end: Some("pre/y".into()),
            limit: Some(2),
            ..Default::default()
        })
        .await,
        ["b", "c"]
    );
    assert_eq!(
        list(ObjectListRange { prefix: Some("pre/".into()), reverse: true, ..Default::default() }).await,
        ["pre/y", "pre/x"]
    );

    // Alarms.
    assert_eq!(b.get_alarm(&addr).await.unwrap(), Some(1000));
    assert_eq!(b.get_alarm(&other).await.unwrap(), None);
    assert!(b.due_alarms(&ns, &[0], 999).await.unwrap().is_empty());
    assert_eq!(b.due_alarms(&ns, &[0, 1], 1000).await.unwrap(), vec![(addr.clone(), 1000)]);
    assert!(b.due_alarms(&ns, &[1], 5000).await.unwrap().is_empty());

    // Fencing: the superseded epoch writes nothing.
    let stale = ObjectWrite { entries: vec![put("z", "stale")], alarm: Some(None), delete_all: true };
    let err = b.commit(&addr, e1, &stale).await.unwrap_err();
    assert!(matches!(err, BackendError::Fenced { shard: 0, .. }), "{err:?}");
    assert_eq!(b.get(&addr, &["z".into(), "a".into()]).await.unwrap(), vec![("a".into(), b"1".to_vec())]);
    assert_eq!(b.get_alarm(&addr).await.unwrap(), Some(1000));
    // Without delete_all too (PostgreSQL writes these in one statement): no put, no delete, no
    // alarm change.
    let stale = ObjectWrite {
        entries: vec![put("z", "stale"), (String::from("a"), None)],
        alarm: Some(Some(7)),
        delete_all: false,
    };
    let err = b.commit(&addr, e1, &stale).await.unwrap_err();
    assert!(matches!(err, BackendError::Fenced { shard: 0, .. }), "{err:?}");
    assert_eq!(b.get(&addr, &["z".into(), "a".into()]).await.unwrap(), vec![("a".into(), b"1".to_vec())]);
    assert_eq!(b.get_alarm(&addr).await.unwrap(), Some(1000));
    let stale = ObjectWrite { alarm: Some(None), ..Default::default() };
    assert!(matches!(b.commit(&addr, e1, &stale).await, Err(BackendError::Fenced { .. })));
    assert_eq!(b.get_alarm(&addr).await.unwrap(), Some(1000));
    // A shard never acquired is fenced too.
    let unowned = ObjectAddr { shard: 7, ..addr.clone() };
    assert!(matches!(b.commit(&unowned, 1, &ObjectWrite::default()).await, Err(BackendError::Fenced { .. })));

    // Deletes, last write wins, delete_all, clearing the alarm.
    let writes = ObjectWrite {
        delete_all: false,
        entries: vec![(String::from("a"), None), put("b", "first"), put("b", "second"), put("n", "new")],
        alarm: Some(None),
    };
    b.commit(&addr, e2, &writes).await.unwrap();
    assert_eq!(
        b.get(&addr, &["a".into(), "b".into(), "n".into()]).await.unwrap(),
        vec![("b".into(), b"second".to_vec()), ("n".into(), b"new".to_vec())]
    );
    assert_eq!(b.get_alarm(&addr).await.unwrap(), None);
    let writes = ObjectWrite { delete_all: true, entries: vec![put("only", "1")], alarm: None };
    b.commit(&addr, e2, &writes).await.unwrap();
    assert_eq!(list(ObjectListRange::default()).await, ["only"]);
    assert_eq!(keys(b.list(&other, &ObjectListRange::default()).await.unwrap()), ["a"]);

    // A later epoch takes over.
    let e3 = b.acquire_shard(&ns, 0).await.unwrap();
    assert!(matches!(b.commit(&addr, e2, &ObjectWrite::default()).await, Err(BackendError::Fenced { .. })));
    b.commit(&addr, e3, &ObjectWrite { alarm: Some(Some(5)), ..Default::default() }).await.unwrap();
    assert_eq!(b.get_alarm(&addr).await.unwrap(), Some(5));
}

// ---------------------------------------------------------------------------------------------
// embedded backends

#[tokio::test]
async fn sqlite_sql() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d1.sqlite");
    let sql = SqliteSql::open(&path).await.unwrap();
    let store = SqliteObjectStorage::open(&path).await.unwrap();
    sql_contract(&sql, Some(&store)).await;
}

#[tokio::test]
async fn sqlite_kv() {
    let dir = tempfile::tempdir().unwrap();
    kv_contract(&SqliteKv::open(dir.path().join("kv.sqlite")).await.unwrap()).await;
}

#[tokio::test]
async fn sqlite_object_storage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("do.sqlite");
    object_storage_contract(&SqliteObjectStorage::open(&path).await.unwrap()).await;
    // Two owners sharing the file are fenced against each other.
    let a = SqliteObjectStorage::open(&path).await.unwrap();
    let b = SqliteObjectStorage::open(&path).await.unwrap();
    let ea = a.acquire_shard("shared", 1).await.unwrap();
    let eb = b.acquire_shard("shared", 1).await.unwrap();
    let addr = ObjectAddr { namespace: "shared".into(), id: "cc".repeat(32), shard: 1 };
    let w = ObjectWrite { entries: vec![("k".into(), Some(b"v".to_vec()))], ..Default::default() };
    assert!(matches!(a.commit(&addr, ea, &w).await, Err(BackendError::Fenced { .. })));
    b.commit(&addr, eb, &w).await.unwrap();
}

#[tokio::test]
async fn fs_objects() {
    let dir = tempfile::tempdir().unwrap();
    objects_contract(&FsObjects::open(dir.path()).await.unwrap()).await;
    // Keys never become paths.
    let store = FsObjects::open(dir.path()).await.unwrap();
    let meta = object("../../etc/passwd", b"x", 1);
    store.put("b", &meta, b"x".to_vec()).await.unwrap();
    assert_eq!(store.get("b", "../../etc/passwd", None).await.unwrap().unwrap().1, b"x");
    fn names(dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            out.push(e.file_name().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                names(&e.path(), out);
            }
        }
    }
    let mut all = Vec::new();
    names(dir.path(), &mut all);
    assert!(all.iter().all(|n| !n.contains("passwd") && !n.contains("..")), "{all:?}");
}

// ---------------------------------------------------------------------------------------------
// real services

fn postgres_url() -> Option<String> {
    service_env(&["LATTICE_TEST_POSTGRES_URL"]).map(|mut v| v.remove(0))
}

fn redis_url() -> Option<String> {
    service_env(&["LATTICE_TEST_REDIS_URL"]).map(|mut v| v.remove(0))
}

fn s3_config() -> Option<S3Config> {
    let v = service_env(&[
        "LATTICE_TEST_S3_ENDPOINT",
        "LATTICE_TEST_S3_REGION",
        "LATTICE_TEST_S3_BUCKET",
        "LATTICE_TEST_S3_ACCESS_KEY",
        "LATTICE_TEST_S3_SECRET_KEY",
    ])?;
    Some(S3Config {
        endpoint: v[0].clone(),
        region: v[1].clone(),
        bucket: v[2].clone(),
        access_key: v[3].clone(),
        secret_key: v[4].clone(),
        path_style: true,
        tls: None,
    })
}

#[tokio::test]
async fn postgres_sql() {
    let Some(url) = postgres_url() else { return };
    let sql = PostgresSql::new(&url).unwrap();
    let store = PostgresObjectStorage::new(&url).unwrap();
    sql_contract(&sql, Some(&store)).await;
}

/// A batch of reads sees one snapshot, as it does on SQLite: a row committed by another
/// connection while the batch runs is in neither of its counts.
#[tokio::test]
async fn postgres_read_batch_sees_one_snapshot() {
    let Some(url) = postgres_url() else { return };
    let sql = std::sync::Arc::new(PostgresSql::new(&url).unwrap());
    let t = unique("snap_");
    sql.batch(vec![st(&format!("CREATE TABLE {t} (id INTEGER PRIMARY KEY)"), vec![])], None).await.unwrap();
    sql.batch(vec![st(&format!("INSERT INTO {t} (id) VALUES (1)"), vec![])], None).await.unwrap();
    let count = format!("SELECT count(*) AS n FROM {t}");
    let reader = {
        let (sql, count) = (sql.clone(), count.clone());
        tokio::spawn(async move {
            sql.batch(
                vec![st(&count, vec![]), st("SELECT pg_sleep(0.6) AS slept", vec![]), st(&count, vec![])],
                None,
            )
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    sql.batch(vec![st(&format!("INSERT INTO {t} (id) VALUES (2)"), vec![])], None).await.unwrap();
    let after = sql.batch(vec![st(&count, vec![])], None).await.unwrap();
    assert_eq!(after[0].rows, vec![vec![SqlValue::Integer(2)]], "the insert committed during the batch");
    let out = reader.await.unwrap();
    assert_eq!(out[0].rows, vec![vec![SqlValue::Integer(1)]]);
    assert_eq!(out[2].rows, out[0].rows, "both reads of the batch see the same snapshot");
}

/// A statement prepared before its table changed shape is prepared again, not failed: the
/// same `SELECT *` before and after an `ALTER TABLE`, alone and inside a batch.
#[tokio::test]
async fn postgres_statement_after_alter_table() {
    let Some(url) = postgres_url() else { return };
    let sql = PostgresSql::new(&url).unwrap();
    let t = unique("alter_");
    sql.batch(vec![st(&format!("CREATE TABLE {t} (id INTEGER PRIMARY KEY)"), vec![])], None).await.unwrap();
    sql.batch(vec![st(&format!("INSERT INTO {t} (id) VALUES (1)"), vec![])], None).await.unwrap();
    let all = format!("SELECT * FROM {t}");
    let out = sql.batch(vec![st(&all, vec![])], None).await.unwrap();
    assert_eq!(out[0].columns, ["id"]);
    sql.batch(vec![st(&format!("ALTER TABLE {t} ADD COLUMN note TEXT DEFAULT 'n'"), vec![])], None)
        .await
        .unwrap();
    let out = sql.batch(vec![st(&all, vec![])], None).await.unwrap();
    assert_eq!(out[0].columns, ["id", "note"]);
    assert_eq!(out[0].rows, vec![vec![SqlValue::Integer(1), text("n")]]);
    sql.batch(vec![st(&format!("ALTER TABLE {t} ADD COLUMN extra INTEGER"), vec![])], None).await.unwrap();
    let out = sql.batch(vec![st(&all, vec![]), st(&all, vec![])], None).await.unwrap();
    assert_eq!(out[1].columns, ["id", "note", "extra"]);
}

#[tokio::test]
async fn postgres_sql_types() {
    let Some(url) = postgres_url() else { return };
    let sql = PostgresSql::new(&url).unwrap();
    let out = sql
        .batch(
            vec![st(
                "SELECT 1::int2 AS a, 2::int4 AS b, 2.5::numeric AS c, true AS d, 'x'::varchar AS e, \
                 ?1 AS f, CAST(?2 AS BLOB) AS g, NULL AS h",
                vec![SqlValue::Real(0.25), SqlValue::Blob(vec![9])],
            )],
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        out[0].rows[0],
        vec![
            SqlValue::Integer(1),
            SqlValue::Integer(2),
            SqlValue::Real(2.5),
            SqlValue::Integer(1),
            text("x"),
            SqlValue::Real(0.25),
            SqlValue::Blob(vec![9]),
            SqlValue::Null,
        ]
    );
    // A type D1 cannot carry is a statement error that says what to do.
    let err = sql.batch(vec![st("SELECT now() AS t", vec![])], None).await.unwrap_err();
    assert!(matches!(&err, SqlError::Statement { message, .. } if message.contains("CAST")), "{err:?}");
    // The same statement text with different parameter types reuses nothing it should not.
    for v in [SqlValue::Integer(12345678), text("abcdefgh"), SqlValue::Null, SqlValue::Blob(vec![1; 8])] {
        let out = sql.batch(vec![st("SELECT ? AS v", vec![v.clone()])], None).await.unwrap();
        assert_eq!(out[0].rows[0][0], v);
        let out =
            sql.batch(vec![st("SELECT CAST(? AS TEXT) IS NULL AS n", vec![v.clone()])], None).await.unwrap();
        assert_eq!(out[0].rows[0][0], SqlValue::Integer(i64::from(v == SqlValue::Null)));
    }
    // Known limit: a NULL whose type nothing in the statement constrains.
    let err = sql.batch(vec![st("SELECT ? IS NULL", vec![SqlValue::Null])], None).await.unwrap_err();
    assert!(matches!(&err, SqlError::Statement { message, .. } if message.contains("data type")), "{err:?}");
}

#[tokio::test]
async fn postgres_object_storage() {
    let Some(url) = postgres_url() else { return };
    object_storage_contract(&PostgresObjectStorage::new(&url).unwrap()).await;
}

#[tokio::test]
async fn redis_kv() {
    let Some(url) = redis_url() else { return };
    kv_contract(&RedisKv::new(&url).unwrap()).await;
}

#[tokio::test]
async fn s3_objects() {
    let Some(config) = s3_config() else { return };
    objects_contract(&S3Objects::new(&config).unwrap()).await;
}

/// A TLS-terminating proxy in front of `upstream` with a fresh self-signed certificate for
/// `localhost`; returns its port and a client configuration that trusts the certificate.
fn tls_proxy(upstream: std::net::SocketAddr) -> (u16, std::sync::Arc<rustls::ClientConfig>) {
    use std::sync::Arc;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
    let der = cert.der().clone();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (port, Arc::new(client))
}

/// The same contract through `https://`: a TLS-terminating proxy in front of the real store.
/// A client that does not trust the proxy's certificate gets `Unavailable`, and an `https://`
/// endpoint without a TLS configuration is refused at construction.
#[tokio::test]
async fn s3_objects_over_https() {
    let Some(config) = s3_config() else { return };
    let upstream: url::Url = config.endpoint.parse().unwrap();
    let upstream = upstream.socket_addrs(|| None).unwrap()[0];
    let (port, tls) = tls_proxy(upstream);
    let https = S3Config { endpoint: format!("https://localhost:{port}"), tls: Some(tls), ..config.clone() };
    objects_contract(&S3Objects::new(&https).unwrap()).await;

    let untrusted = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let s3 =
        S3Objects::new(&S3Config { tls: Some(std::sync::Arc::new(untrusted)), ..https.clone() }).unwrap();
    let r = s3.head("b", "k").await;
    assert!(matches!(r, Err(BackendError::Unavailable { .. })), "{r:?}");

    let r = S3Objects::new(&S3Config { tls: None, ..https });
    assert!(matches!(r, Err(BackendError::Unavailable { .. })), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// unreachable services answer Unavailable quickly

#[tokio::test]
async fn postgres_unreachable() {
    let started = Instant::now();
    let sql = PostgresSql::new(&format!("postgres://postgres@127.0.0.1:{}/x", closed_port())).unwrap();
    assert_unavailable(sql.ping().await, started, Duration::from_secs(5));
    let r = sql.batch(vec![st("SELECT 1", vec![])], None).await;
    assert!(matches!(r, Err(SqlError::Backend(BackendError::Unavailable { .. }))), "{r:?}");
    let store =
        PostgresObjectStorage::new(&format!("postgres://postgres@127.0.0.1:{}/x", closed_port())).unwrap();
    let started = Instant::now();
    assert_unavailable(store.acquire_shard("ns", 0).await, started, Duration::from_secs(5));

    // A server that accepts and never answers.
    let (_listener, port) = silent_listener();
    let sql = PostgresSql::new(&format!("postgres://postgres@127.0.0.1:{port}/x")).unwrap();
    let started = Instant::now();
    assert_unavailable(sql.ping().await, started, Duration::from_secs(6));
}

#[tokio::test]
async fn redis_unreachable() {
    let kv = RedisKv::new(&format!("redis://127.0.0.1:{}/", closed_port())).unwrap();
    let started = Instant::now();
    assert_unavailable(kv.get("ns", "k", 0).await, started, Duration::from_secs(3));
    let started = Instant::now();
    assert_unavailable(kv.put("ns", "k", kv_entry(), 0).await, started, Duration::from_secs(3));

    let (_listener, port) = silent_listener();
    let kv = RedisKv::new(&format!("redis://127.0.0.1:{port}/")).unwrap();
    let started = Instant::now();
    assert_unavailable(kv.list("ns", "", None, 10, 0).await, started, Duration::from_secs(5));
}

fn kv_entry() -> KvEntry {
    kv("v", None, None)
}

#[tokio::test]
async fn s3_unreachable() {
    let config = |port: u16| S3Config {
        endpoint: format!("http://127.0.0.1:{port}"),
        region: "us-east-1".into(),
        bucket: "b".into(),
        access_key: "k".into(),
        secret_key: "s".into(),
        path_style: true,
        tls: None,
    };
    let s3 = S3Objects::new(&config(closed_port())).unwrap();
    let started = Instant::now();
    assert_unavailable(s3.head("b", "k").await, started, Duration::from_secs(3));

    let (_listener, port) = silent_listener();
    let s3 = S3Objects::new(&config(port)).unwrap().with_request_timeout(Duration::from_secs(1));
    let started = Instant::now();
    assert_unavailable(s3.get("b", "k", None).await, started, Duration::from_secs(3));
}

/// Fenced batches arriving together are committed as a group, each in its own savepoint: a
/// batch that fails (a bad statement, a stale fence) fails alone and leaves nothing behind,
/// the others all commit.
async fn group_commit_contract(sql: std::sync::Arc<dyn SqlBackend>, store: &dyn ObjectStorageBackend) {
    let ns = unique("group");
    let epoch = store.acquire_shard(&ns, 0).await.unwrap();
    let table = unique("grouped");
    sql.batch(vec![st(&format!("CREATE TABLE {table} (id INTEGER PRIMARY KEY, note TEXT)"), vec![])], None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..40i64 {
        let sql = sql.clone();
        let (table, ns) = (table.clone(), ns.clone());
        tasks.push(tokio::spawn(async move {
            let fence = Fence { namespace: ns, shard: 0, epoch: if i == 13 { epoch + 100 } else { epoch } };
            let mut statements = vec![st(
                &format!("INSERT INTO {table} (id, note) VALUES (?, ?)"),
                vec![SqlValue::Integer(i), text("x")],
            )];
            if i == 7 {
                statements.push(st("SELECT * FROM no_such_table_at_all", vec![]));
            }
            (i, sql.batch(statements, Some(fence)).await)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match i {
            7 => assert!(matches!(r, Err(SqlError::Statement { index: 1, .. })), "batch 7: {r:?}"),
            13 => {
                assert!(matches!(r, Err(SqlError::Backend(BackendError::Fenced { .. }))), "batch 13: {r:?}")
            }
            _ => assert!(r.is_ok(), "batch {i}: {r:?}"),
        }
    }
    let rows =
        sql.batch(vec![st(&format!("SELECT id FROM {table} ORDER BY id"), vec![])], None).await.unwrap();
    let ids: Vec<i64> = rows[0]
        .rows
        .iter()
        .map(|r| match r[0] {
            SqlValue::Integer(n) => n,
            _ => -1,
        })
        .collect();
    let want: Vec<i64> = (0..40).filter(|i| *i != 7 && *i != 13).collect();
    assert_eq!(ids, want, "exactly the batches that succeeded are committed");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_group_commit_keeps_batches_separate() {
    let Some(url) = postgres_url() else { return };
    let store = PostgresObjectStorage::new(&url).unwrap();
    group_commit_contract(std::sync::Arc::new(PostgresSql::new(&url).unwrap()), &store).await;
}

/// Batches in one group have no order among themselves: one that fails on a row another batch
/// of the same group writes is run again behind it, and both commit (the room object's outbox
/// guard checks the event a concurrent flush writes). A failure that stays one is still one.
/// `slow` is a write (on `rows`, inserting id 0) that keeps the group busy for a while.
async fn refused_batch_contract(
    sql: std::sync::Arc<dyn SqlBackend>,
    store: &dyn ObjectStorageBackend,
    slow: impl Fn(&str) -> String,
) {
    let ns = unique("group-order");
    let epoch = store.acquire_shard(&ns, 0).await.unwrap();
    let fence = || Some(Fence { namespace: ns.clone(), shard: 0, epoch });
    let (rows, guards) = (unique("rows"), unique("guards"));
    sql.batch(
        vec![
            st(&format!("CREATE TABLE {rows} (id INTEGER PRIMARY KEY)"), vec![]),
            st(&format!("CREATE TABLE {guards} (seen INTEGER NOT NULL)"), vec![]),
        ],
        None,
    )
    .await
    .unwrap();
    let spawn = |statements: Vec<SqlStatement>, delay_ms: u64| {
        let (sql, fence) = (sql.clone(), fence());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            sql.batch(statements, fence).await
        })
    };
    // The slow write holds the group commit, so the next three queue up in this order: the
    // guard on row 1 (written by the batch after it), the write of row 1, and a guard on a
    // row nobody writes.
    let slow = spawn(vec![st(&slow(&rows), vec![])], 0);
    let guard = |id: i64| {
        vec![st(
            &format!("INSERT INTO {guards} (seen) VALUES ((SELECT id FROM {rows} WHERE id = ?))"),
            vec![SqlValue::Integer(id)],
        )]
    };
    let early = spawn(guard(1), 100);
    let write = spawn(vec![st(&format!("INSERT INTO {rows} (id) VALUES (1)"), vec![])], 150);
    let never = spawn(guard(2), 200);
    slow.await.unwrap().unwrap();
    write.await.unwrap().unwrap();
    early.await.unwrap().expect("the guard runs again behind the write it checks");
    let r = never.await.unwrap();
    assert!(matches!(r, Err(SqlError::Statement { index: 0, .. })), "a real failure stays one: {r:?}");
    let seen = sql.batch(vec![st(&format!("SELECT seen FROM {guards}"), vec![])], None).await.unwrap();
    assert_eq!(seen[0].rows, vec![vec![SqlValue::Integer(1)]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_group_commit_runs_a_refused_batch_again_behind_the_others() {
    let Some(url) = postgres_url() else { return };
    let store = PostgresObjectStorage::new(&url).unwrap();
    refused_batch_contract(std::sync::Arc::new(PostgresSql::new(&url).unwrap()), &store, |rows| {
        format!("INSERT INTO {rows} (id) VALUES (CASE WHEN pg_sleep(0.6) IS NULL THEN 0 ELSE 0 END)")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_group_commit_runs_a_refused_batch_again_behind_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d1.sqlite");
    let store = SqliteObjectStorage::open(&path).await.unwrap();
    // SQLite has no sleep: counting ten million rows keeps its one connection busy.
    refused_batch_contract(std::sync::Arc::new(SqliteSql::open(&path).await.unwrap()), &store, |rows| {
        format!(
            "INSERT INTO {rows} (id) SELECT n * 0 FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000) SELECT count(*) AS n FROM c)"
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_group_commit_keeps_batches_separate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d1.sqlite");
    let store = SqliteObjectStorage::open(&path).await.unwrap();
    group_commit_contract(std::sync::Arc::new(SqliteSql::open(&path).await.unwrap()), &store).await;
}

/// `commit_with_object`: an object's write and the D1 batches after it in one transaction. A
/// failing batch is left out alone; a stale epoch commits nothing, neither the write nor any
/// batch; a batch that changes the schema runs after the write.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_object_write_and_d1_batches_commit_in_one_transaction() {
    let Some(url) = postgres_url() else { return };
    let store = PostgresObjectStorage::new(&url).unwrap();
    let sql = PostgresSql::new(&url).unwrap();
    assert_eq!(sql.database(), store.database(), "the same URL pairs them");
    assert_eq!(
        SqliteSql::open(tempfile::tempdir().unwrap().path().join("x")).await.unwrap().database(),
        None
    );
    let ns = unique("joined");
    let epoch = store.acquire_shard(&ns, 0).await.unwrap();
    let addr = ObjectAddr { namespace: ns.clone(), id: "ab".repeat(32), shard: 0 };
    let (rows, other) = (unique("rows"), unique("other"));
    sql.batch(vec![st(&format!("CREATE TABLE {rows} (id INTEGER PRIMARY KEY, v TEXT)"), vec![])], None)
        .await
        .unwrap();
    let put = |k: &str, v: &str| ObjectWrite {
        delete_all: false,
        entries: vec![(k.to_owned(), Some(v.as_bytes().to_vec()))],
        alarm: Some(Some(12_345)),
    };
    let insert = |id: i64, v: &str| {
        st(
            &format!("INSERT INTO {rows} (id, v) VALUES (?, ?)"),
            vec![SqlValue::Integer(id), SqlValue::Text(v.into())],
        )
    };
    let ids = || async {
        let out =
            sql.batch(vec![st(&format!("SELECT id FROM {rows} ORDER BY id"), vec![])], None).await.unwrap();
        out[0].rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>()
    };

    // The middle batch fails on its second statement (a duplicate key): it alone is left out.
    let out = sql
        .commit_with_object(
            &addr,
            epoch,
            put("k1", "v1"),
            vec![
                vec![insert(1, "a")],
                vec![insert(2, "b"), insert(1, "again")],
                vec![st(
                    &format!("UPDATE {rows} SET v = ? WHERE id = 1 RETURNING v"),
                    vec![SqlValue::Text("c".into())],
                )],
            ],
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    assert!(out[0].is_ok(), "{:?}", out[0]);
    assert!(matches!(out[1], Err(SqlError::Statement { index: 1, .. })), "{:?}", out[1]);
    assert_eq!(out[2].as_ref().unwrap()[0].rows, vec![vec![SqlValue::Text("c".into())]]);
    assert_eq!(store.get(&addr, &["k1".into()]).await.unwrap(), vec![("k1".to_owned(), b"v1".to_vec())]);
    assert_eq!(store.get_alarm(&addr).await.unwrap(), Some(12_345));
    assert_eq!(ids().await, vec![SqlValue::Integer(1)], "nothing of the failed batch landed");

    // Another owner took the shard: nothing commits, neither the write nor the batch.
    let newer = store.acquire_shard(&ns, 0).await.unwrap();
    let r = sql.commit_with_object(&addr, epoch, put("k2", "v2"), vec![vec![insert(3, "d")]]).await;
    assert!(matches!(r, Err(BackendError::Fenced { shard: 0, epoch: e }) if e == epoch), "{r:?}");
    assert!(store.get(&addr, &["k2".into()]).await.unwrap().is_empty());
    assert_eq!(ids().await, vec![SqlValue::Integer(1)]);

    // Under the new epoch: a deletion and no alarm change, a batch that creates a table (it
    // runs after the write, on its own) and one that fails to translate.
    let delete = ObjectWrite { delete_all: false, entries: vec![("k1".into(), None)], alarm: None };
    let out = sql
        .commit_with_object(
            &addr,
            newer,
            delete,
            vec![
                vec![
                    st(&format!("CREATE TABLE {other} (id INTEGER)"), vec![]),
                    st(&format!("INSERT INTO {other} (id) VALUES (7)"), vec![]),
                ],
                vec![st("SELECT 'unterminated", vec![])],
                vec![insert(4, "e")],
            ],
        )
        .await
        .unwrap();
    assert!(out[0].is_ok(), "{:?}", out[0]);
    assert!(matches!(out[1], Err(SqlError::Statement { index: 0, .. })), "{:?}", out[1]);
    assert!(out[2].is_ok(), "{:?}", out[2]);
    assert!(store.get(&addr, &["k1".into()]).await.unwrap().is_empty());
    assert_eq!(store.get_alarm(&addr).await.unwrap(), Some(12_345));
    assert_eq!(ids().await, vec![SqlValue::Integer(1), SqlValue::Integer(4)]);
    let seven = sql.batch(vec![st(&format!("SELECT id FROM {other}"), vec![])], None).await.unwrap();
    assert_eq!(seven[0].rows, vec![vec![SqlValue::Integer(7)]]);

    // A deleteAll cannot share the transaction: refused, nothing written.
    let all = ObjectWrite { delete_all: true, entries: vec![], alarm: None };
    assert!(sql.commit_with_object(&addr, newer, all, vec![vec![insert(5, "f")]]).await.is_err());
    assert_eq!(ids().await, vec![SqlValue::Integer(1), SqlValue::Integer(4)]);
}

/// Object commits queued while another one runs share the next transaction: a stale owner's
/// write fails only its own commit, a failing batch only itself.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_object_commits_share_a_transaction_and_fail_alone() {
    let Some(url) = postgres_url() else { return };
    let store = PostgresObjectStorage::new(&url).unwrap();
    let sql = std::sync::Arc::new(PostgresSql::new(&url).unwrap());
    let (ns, stale_ns) = (unique("units"), unique("units-stale"));
    let epoch = store.acquire_shard(&ns, 0).await.unwrap();
    let old = store.acquire_shard(&stale_ns, 0).await.unwrap();
    store.acquire_shard(&stale_ns, 0).await.unwrap();
    let rows = unique("rows");
    sql.batch(vec![st(&format!("CREATE TABLE {rows} (id INTEGER PRIMARY KEY)"), vec![])], None)
        .await
        .unwrap();
    let addr = |ns: &str, n: u8| ObjectAddr {
        namespace: ns.to_owned(),
        id: format!("{n:02x}").repeat(32),
        shard: 0,
    };
    let put = |v: &str| ObjectWrite {
        delete_all: false,
        entries: vec![("k".to_owned(), Some(v.as_bytes().to_vec()))],
        alarm: None,
    };
    let insert = |id: i64| st(&format!("INSERT INTO {rows} (id) VALUES (?)"), vec![SqlValue::Integer(id)]);
    let commit = |a: ObjectAddr, e: u64, v: &'static str, batches: Vec<Vec<SqlStatement>>, delay_ms: u64| {
        let sql = sql.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            sql.commit_with_object(&a, e, put(v), batches).await
        })
    };
    // The first holds the leader while the next three queue behind it.
    let slow = commit(addr(&ns, 1), epoch, "a", vec![vec![st("SELECT pg_sleep(0.5)", vec![])]], 0);
    let stale = commit(addr(&stale_ns, 2), old, "b", vec![vec![insert(2)]], 150);
    let mixed = commit(addr(&ns, 3), epoch, "c", vec![vec![insert(1), insert(1)], vec![insert(3)]], 200);
    let plain = commit(addr(&ns, 4), epoch, "d", vec![vec![insert(4)]], 250);
    assert!(slow.await.unwrap().unwrap()[0].is_ok());
    let r = stale.await.unwrap();
    assert!(matches!(r, Err(BackendError::Fenced { .. })), "{r:?}");
    let r = mixed.await.unwrap().unwrap();
    assert!(matches!(r[0], Err(SqlError::Statement { index: 1, .. })), "{:?}", r[0]);
    assert!(r[1].is_ok(), "{:?}", r[1]);
    assert!(plain.await.unwrap().unwrap()[0].is_ok());
    let ids = sql.batch(vec![st(&format!("SELECT id FROM {rows} ORDER BY id"), vec![])], None).await.unwrap();
    assert_eq!(ids[0].rows, vec![vec![SqlValue::Integer(3)], vec![SqlValue::Integer(4)]]);
    for (a, want) in [
        (addr(&ns, 1), Some("a")),
        (addr(&stale_ns, 2), None),
        (addr(&ns, 3), Some("c")),
        (addr(&ns, 4), Some("d")),
    ] {
        let got = store.get(&a, &["k".into()]).await.unwrap();
        assert_eq!(got.first().map(|(_, v)| String::from_utf8_lossy(v).into_owned()).as_deref(), want);
    }
}
