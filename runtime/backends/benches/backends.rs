//! Latency of one call of each binding's backend operation, on every backend: the embedded
//! ones always, PostgreSQL, Redis and S3 when `LATTICE_TEST_*` are set (`cargo xtask bench`
//! starts them). Figures go to BENCHMARKS.md.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lattice_backends::fs::FsObjects;
use lattice_backends::postgres::{PostgresObjectStorage, PostgresSql};
use lattice_backends::redis::RedisKv;
use lattice_backends::s3::{S3Config, S3Objects};
use lattice_backends::sqlite::{SqliteKv, SqliteObjectStorage, SqliteSql};
use lattice_backends::{
    KvBackend, KvEntry, ObjectAddr, ObjectBackend, ObjectMeta, ObjectStorageBackend, ObjectWrite, SqlBackend,
    SqlStatement, SqlValue,
};

const N: usize = 500;

async fn measure<F, Fut>(label: &str, backend: &str, mut op: F)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    for i in 0..20 {
        op(N + i).await;
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(N);
    for i in 0..N {
        let started = Instant::now();
        op(i).await;
        samples.push(started.elapsed());
    }
    samples.sort();
    println!(
        "| {label} | {backend} | {:.0} | {:.0} |",
        samples[N / 2].as_secs_f64() * 1e6,
        samples[N * 99 / 100].as_secs_f64() * 1e6
    );
}

fn stmt(sql: &str, params: Vec<SqlValue>) -> SqlStatement {
    SqlStatement { sql: sql.to_owned(), params }
}

async fn sql(b: Arc<dyn SqlBackend>, table: &str) {
    let name = b.name();
    b.batch(vec![stmt(&format!("CREATE TABLE {table} (id INTEGER PRIMARY KEY, v TEXT)"), vec![])], None)
        .await
        .expect("create");
    measure("D1 insert (1 row)", name, |i| {
        let b = b.clone();
        let sql = format!("INSERT INTO {table} (id, v) VALUES (?, ?)");
        async move {
            let params = vec![SqlValue::Integer(i as i64), SqlValue::Text("x".into())];
            b.batch(vec![stmt(&sql, params)], None).await.expect("insert");
        }
    })
    .await;
    measure("D1 select by key", name, |i| {
        let b = b.clone();
        let sql = format!("SELECT v FROM {table} WHERE id = ?");
        async move {
            b.batch(vec![stmt(&sql, vec![SqlValue::Integer((i % N) as i64)])], None).await.expect("select");
        }
    })
    .await;
}

async fn kv(b: Arc<dyn KvBackend>, ns: &str) {
    let name = b.name();
    measure("KV put (256 B)", name, |i| {
        let b = b.clone();
        let ns = ns.to_owned();
        async move {
            let e = KvEntry { value: vec![7; 256], metadata: None, expiration: None };
            b.put(&ns, &format!("k{}", i % N), e, 0).await.expect("put");
        }
    })
    .await;
    measure("KV get", name, |i| {
        let b = b.clone();
        let ns = ns.to_owned();
        async move {
            b.get(&ns, &format!("k{}", i % N), 0).await.expect("get");
        }
    })
    .await;
}

async fn objects(b: Arc<dyn ObjectBackend>, bucket: &str) {
    let name = b.name();
    measure("R2 put (1 KiB)", name, |i| {
        let b = b.clone();
        let bucket = bucket.to_owned();
        async move {
            let meta =
                ObjectMeta { key: format!("o{}", i % N), size: 1024, etag: "e".into(), ..Default::default() };
            b.put(&bucket, &meta, vec![1; 1024]).await.expect("put");
        }
    })
    .await;
    measure("R2 get (1 KiB)", name, |i| {
        let b = b.clone();
        let bucket = bucket.to_owned();
        async move {
            b.get(&bucket, &format!("o{}", i % N), None).await.expect("get");
        }
    })
    .await;
}

async fn storage(b: Arc<dyn ObjectStorageBackend>, ns: &str) {
    let name = b.name();
    let epoch = b.acquire_shard(ns, 0).await.expect("acquire");
    let addr = ObjectAddr { namespace: ns.to_owned(), id: "0".repeat(64), shard: 0 };
    measure("DO storage commit (1 key)", name, |i| {
        let b = b.clone();
        let addr = addr.clone();
        async move {
            let w = ObjectWrite {
                entries: vec![(format!("k{}", i % N), Some(vec![1; 64]))],
                ..Default::default()
            };
            b.commit(&addr, epoch, &w).await.expect("commit");
        }
    })
    .await;
    measure("DO storage get (1 key, uncached)", name, |i| {
        let b = b.clone();
        let addr = addr.clone();
        async move {
            b.get(&addr, &[format!("k{}", i % N)]).await.expect("get");
        }
    })
    .await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let tag = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        println!("| operation | backend | p50 µs | p99 µs |\n|---|---|---|---|");
        sql(Arc::new(SqliteSql::open(dir.path().join("d1.sqlite")).await.expect("sqlite")), "t").await;
        kv(Arc::new(SqliteKv::open(dir.path().join("kv.sqlite")).await.expect("kv")), "ns").await;
        objects(Arc::new(FsObjects::open(dir.path().join("r2")).await.expect("fs")), "b").await;
        storage(Arc::new(SqliteObjectStorage::open(dir.path().join("do.sqlite")).await.expect("do")), "ns")
            .await;
        let var = |v: &str| std::env::var(v).ok();
        if let Some(url) = var("LATTICE_TEST_POSTGRES_URL") {
            sql(Arc::new(PostgresSql::new(&url).expect("pg")), &format!("bench{tag}")).await;
            storage(Arc::new(PostgresObjectStorage::new(&url).expect("pg")), &format!("bench{tag}")).await;
        }
        if let Some(url) = var("LATTICE_TEST_REDIS_URL") {
            kv(Arc::new(RedisKv::new(&url).expect("redis")), &format!("bench{tag}")).await;
        }
        if let (Some(endpoint), Some(region), Some(bucket), Some(access_key), Some(secret_key)) = (
            var("LATTICE_TEST_S3_ENDPOINT"),
            var("LATTICE_TEST_S3_REGION"),
            var("LATTICE_TEST_S3_BUCKET"),
            var("LATTICE_TEST_S3_ACCESS_KEY"),
            var("LATTICE_TEST_S3_SECRET_KEY"),
        ) {
            let c =
                S3Config { endpoint, region, bucket, access_key, secret_key, path_style: true, tls: None };
            objects(Arc::new(S3Objects::new(&c).expect("s3")), &format!("bench{tag}")).await;
        }
    });
}
