//! Fault tests: a real service stops and comes back, and the same backend object answers
//! `Unavailable` quickly while it is down and works again once it is up, without a restart.
//!
//! They stop services with `scripts/services.sh stop-one`, so they need the state directory
//! that script started the services in (`LATTICE_TEST_SERVICES_STATE`, written to its env file).
//! They live in their own test binary: cargo runs test binaries one after the other, so the
//! contract tests never see a service vanish under them.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::Command;
use std::time::{Duration, Instant};

use lattice_backends::postgres::PostgresSql;
use lattice_backends::redis::RedisKv;
use lattice_backends::s3::{S3Config, S3Objects};
use lattice_backends::{BackendError, KvBackend, ObjectBackend, SqlBackend, SqlError, SqlStatement};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The state directory, or `None` (skip); fails instead under `LATTICE_REQUIRE_SERVICES=1`.
fn state_dir() -> Option<String> {
    let state = env("LATTICE_TEST_SERVICES_STATE");
    if state.is_none() {
        assert!(
            std::env::var("LATTICE_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "LATTICE_REQUIRE_SERVICES=1 but LATTICE_TEST_SERVICES_STATE unset"
        );
        eprintln!("skipped: LATTICE_TEST_SERVICES_STATE unset");
    }
    state
}

fn services(action: &str, service: &str, state: &str) {
    let script = manifest_dir().join("../../scripts/services.sh");
    let status = Command::new("bash").arg(script).args([action, service, state]).status().unwrap();
    assert!(status.success(), "services.sh {action} {service} failed");
}

/// Retries `op` until it succeeds, for at most `within`.
async fn eventually<F, Fut, T, E>(within: Duration, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let deadline = Instant::now() + within;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("still failing after {within:?}: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn services_stop_and_come_back() {
    let Some(state) = state_dir() else { return };

    // Redis.
    let kv = RedisKv::new(&env("LATTICE_TEST_REDIS_URL").unwrap()).unwrap();
    kv.ping().await.unwrap();
    services("stop-one", "redis", &state);
    let started = Instant::now();
    let r = kv.get("ns", "k", 0).await;
    assert!(matches!(r, Err(BackendError::Unavailable { .. })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    services("start-one", "redis", &state);
    eventually(Duration::from_secs(10), || kv.ping()).await;

    // PostgreSQL.
    let sql = PostgresSql::new(&env("LATTICE_TEST_POSTGRES_URL").unwrap()).unwrap();
    let select = || vec![SqlStatement { sql: "SELECT 1".into(), params: vec![] }];
    sql.batch(select(), None).await.unwrap();
    services("stop-one", "postgres", &state);
    let started = Instant::now();
    let r = sql.batch(select(), None).await;
    assert!(matches!(r, Err(SqlError::Backend(BackendError::Unavailable { .. }))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    services("start-one", "postgres", &state);
    eventually(Duration::from_secs(10), || sql.batch(select(), None)).await;

    // S3.
    let s3 = S3Objects::new(&S3Config {
        endpoint: env("LATTICE_TEST_S3_ENDPOINT").unwrap(),
        region: env("LATTICE_TEST_S3_REGION").unwrap(),
        bucket: env("LATTICE_TEST_S3_BUCKET").unwrap(),
        access_key: env("LATTICE_TEST_S3_ACCESS_KEY").unwrap(),
        secret_key: env("LATTICE_TEST_S3_SECRET_KEY").unwrap(),
        path_style: true,
        tls: None,
    })
    .unwrap();
    s3.ping().await.unwrap();
    services("stop-one", "s3", &state);
    let started = Instant::now();
    let r = s3.head("b", "k").await;
    assert!(matches!(r, Err(BackendError::Unavailable { .. })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    services("start-one", "s3", &state);
    eventually(Duration::from_secs(10), || s3.ping()).await;
}

/// This package's directory: where `cargo test` says it is when it runs the test (a test binary
/// reused from a build in another checkout of the same target directory keeps that checkout's
/// path in `env!`), else where it was built.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
