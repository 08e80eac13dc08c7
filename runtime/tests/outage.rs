//! Backend outages: a stopped PostgreSQL, Redis or S3 server gives the guest `unavailable`
//! (the conformance guest answers 503 with Retry-After), writes nothing partial, and the
//! backend is used again once it is back, without restarting the runtime.
//!
//! One test function, so no other test of this binary runs while a service is down.

#[path = "common/production.rs"]
mod production;
#[path = "common/support.rs"]
mod support;

use std::time::{Duration, Instant};

use production::{production_setup, service};
use serde_json::json;
use support::{Reply, Server, post, send, start, unique};

/// A request during an outage must fail fast and say when to retry.
fn assert_unavailable(r: &Reply, started: Instant, what: &str) {
    assert_eq!(r.status, 503, "{what}: {}", String::from_utf8_lossy(&r.body));
    assert!(r.headers.contains_key("retry-after"), "{what}: no Retry-After");
    assert!(started.elapsed() < Duration::from_secs(15), "{what}: took {:?}", started.elapsed());
}

/// Polls until `probe` answers 200 (the backend is back), at most 60 s.
async fn until_ok(what: &str, probe: impl AsyncFn() -> Reply) {
    let start = Instant::now();
    loop {
        let r = probe().await;
        if r.status == 200 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} never came back: {}",
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn sql(s: &Server, sql: &str) -> Reply {
    post(&format!("{}/d1/query", s.url), json!({"sql": sql, "params": []}).to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_backends_give_503_and_recover_without_restart() {
    let Some(setup) = production_setup("") else { return };
    let s = start(setup);
    let t = format!("outage{}", unique());

    // PostgreSQL (D1 and Durable Object storage).
    assert_eq!(sql(&s, &format!("CREATE TABLE {t} (id INTEGER PRIMARY KEY, v TEXT)")).await.status, 200);
    assert_eq!(post(&format!("{}/do/increment?name={t}", s.url), "").await.json()["count"], 1);
    let unconfirmed = format!("{t}-unconfirmed");
    assert_eq!(post(&format!("{}/do/increment?name={unconfirmed}", s.url), "").await.json()["count"], 1);
    service("stop-one", "postgres");
    // An unconfirmed write is answered without waiting for its commit, which cannot happen now.
    let started = Instant::now();
    let r = post(&format!("{}/do/put-unconfirmed?name={unconfirmed}&key=k", s.url), "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "an unconfirmed write waited {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let batch = json!([
        {"sql": format!("INSERT INTO {t} (id, v) VALUES (1, 'a')"), "params": []},
        {"sql": format!("INSERT INTO {t} (id, v) VALUES (2, 'b')"), "params": []},
    ]);
    let r = post(&format!("{}/d1/batch", s.url), batch.to_string()).await;
    assert_unavailable(&r, started, "D1 batch with PostgreSQL down");
    let started = Instant::now();
    let r = post(&format!("{}/do/increment?name={t}", s.url), "").await;
    assert_unavailable(&r, started, "Durable Object write with PostgreSQL down");
    // The pod stays ready (every pod shares the backend), answers its probe at once, and
    // reports the outage in the probe's body.
    let d1_up = async || {
        let r = support::get(&format!("{}/readyz", s.admin)).await;
        assert_eq!(r.status, 200, "a backend outage made the pod unready");
        r.json()["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["binding"] == "d1.DB").map(|b| b["up"] == true))
    };
    let started = Instant::now();
    assert!(d1_up().await.is_some());
    assert!(started.elapsed() < Duration::from_millis(500), "/readyz waited on the backend");
    support::eventually("/readyz to report PostgreSQL down", async || {
        (d1_up().await == Some(false)).then_some(())
    })
    .await;
    service("start-one", "postgres");
    until_ok("PostgreSQL", async || sql(&s, "SELECT 1").await).await;
    support::eventually("/readyz to report PostgreSQL up", async || {
        (d1_up().await == Some(true)).then_some(())
    })
    .await;
    let r = sql(&s, &format!("SELECT count(*) FROM {t}")).await.json();
    assert_eq!(r["rows"], json!([[0]]), "a batch refused during the outage left rows behind");
    // The object was reset after its failed write; it reloads from storage: the failed
    // increment never became durable, so the next one is 2.
    until_ok("the Durable Object", async || post(&format!("{}/do/state?name={t}", s.url), "").await).await;
    assert_eq!(post(&format!("{}/do/increment?name={t}", s.url), "").await.json()["count"], 2);
    // Its object lost the write with the failed commit, and serves again with its durable state.
    until_ok("the object of the unconfirmed write", async || {
        post(&format!("{}/do/state?name={unconfirmed}", s.url), "").await
    })
    .await;
    assert_eq!(post(&format!("{}/do/increment?name={unconfirmed}", s.url), "").await.json()["count"], 2);

    // Redis (KV).
    let key = format!("{t}-k");
    assert_eq!(send("PUT", &format!("{}/kv?key={key}", s.url), &[], "v1").await.status, 200);
    service("stop-one", "redis");
    let started = Instant::now();
    let r = send("PUT", &format!("{}/kv?key={key}", s.url), &[], "v2").await;
    assert_unavailable(&r, started, "KV put with Redis down");
    service("start-one", "redis");
    until_ok("Redis", async || send("PUT", &format!("{}/kv?key={key}-probe", s.url), &[], "x").await).await;
    assert_eq!(send("PUT", &format!("{}/kv?key={key}", s.url), &[], "v3").await.status, 200);

    // S3 (R2).
    let obj = format!("{t}/o");
    service("stop-one", "s3");
    let started = Instant::now();
    let r = send("PUT", &format!("{}/r2?key={obj}", s.url), &[], "body").await;
    assert_unavailable(&r, started, "R2 put with S3 down");
    service("start-one", "s3");
    until_ok("S3", async || send("PUT", &format!("{}/r2?key={obj}", s.url), &[], "body").await).await;
    let r = send("GET", &format!("{}/r2?key={obj}", s.url), &[], "").await.json();
    assert_eq!(r["body"], "body");
}
