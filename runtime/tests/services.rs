//! The conformance flows against the production backends: D1 and Durable Object storage on
//! PostgreSQL, KV on Redis, R2 on an S3 server, all started by `scripts/services.sh`.
//!
//! Without the `LATTICE_TEST_*` variables these tests have nothing to run against: they fail
//! when `LATTICE_REQUIRE_SERVICES=1` (as in `cargo xtask ci`) and are skipped otherwise.

#[path = "common/flows.rs"]
mod flows;
#[path = "common/production.rs"]
mod production;
#[path = "common/support.rs"]
mod support;

use production::production_setup;
use support::start;

macro_rules! flow_test {
    ($name:ident, $flow:ident, $extra:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(setup) = production_setup($extra) else { return };
            flows::$flow(&start(setup)).await;
        }
    };
}

flow_test!(d1_on_postgres, d1, "");
flow_test!(kv_on_redis, kv, "");
flow_test!(r2_on_s3, r2, "");
flow_test!(durable_objects_on_postgres, objects, "");
flow_test!(transactions_on_postgres, transactions, "");
flow_test!(alarms_on_postgres, alarms, "[limits]\nalarm_poll_ms = 50\n");

/// D1 and the objects' storage share one PostgreSQL database, so an event's D1 insert joins
/// its object's storage commit: one transaction for both, and for the events grouped with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_writes_and_their_d1_batches_commit_together_on_postgres() {
    let Some(setup) = production_setup("") else { return };
    let s = start(setup);
    let joined = flows::object_writes_then_d1(&s).await;
    assert_eq!(joined, 30.0, "every insert followed a write, so every one joins a commit");
    let commits = flows::metric(&s, "lattice_object_commits_total{namespace=\"COUNTERS\"}").await;
    assert!(commits < 30.0, "the 30 events' writes and inserts were grouped ({commits} commits)");
}

/// Two runtimes that both claim every shard of one namespace on one PostgreSQL: the later
/// acquisition bumps the epochs, so the earlier owner's writes are refused (fenced) instead of
/// overwriting the newer owner's data, and the newer owner continues from the last durable value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_owner_is_fenced() {
    let Some(first_setup) = production_setup("") else { return };
    let secrets = tempfile::tempdir().expect("tempdir");
    let mut first_setup = first_setup;
    first_setup.secrets_dir = Some(secrets.path().to_owned());
    let first = start(first_setup);
    let name = format!("fence{}", support::unique());
    let inc = |s: &support::Server| {
        let url = format!("{}/do/increment?name={name}", s.url);
        async move { support::post(&url, "").await }
    };
    assert_eq!(inc(&first).await.json()["count"], 1);
    let Some(mut second_setup) = production_setup("") else { return };
    second_setup.secrets_dir = Some(secrets.path().to_owned());
    let second = start(second_setup);
    let r = inc(&first).await;
    assert_eq!(r.status, 503, "the superseded owner wrote: {}", String::from_utf8_lossy(&r.body));
    assert!(first.log().contains("write fenced"), "{}", first.log());
    assert_eq!(inc(&second).await.json()["count"], 2);
}

/// A request parked on one runtime process wakes when another process signals its key
/// (signals over Redis pub/sub).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_cross_processes_over_redis() {
    let signals = "[signals]\nbackend = \"redis\"\nurl_env = \"LATTICE_TEST_REDIS_URL\"\n";
    let (Some(a), Some(b)) = (production_setup(signals), production_setup(signals)) else { return };
    let (a, b) = (start(a), start(b));
    let key = format!("room-{}", support::unique());
    let url = format!("{}/wait?key={key}&timeout=60000", a.url);
    let waiter = tokio::spawn(async move { support::get(&url).await });
    support::eventually("the request to park on the first process", async || {
        let m = support::get(&format!("{}/metrics", a.admin)).await;
        String::from_utf8_lossy(&m.body).contains("lattice_parked_requests 1").then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    assert_eq!(support::post(&format!("{}/signal?key={key}", b.url), "").await.status, 200);
    let r = waiter.await.expect("task");
    assert_eq!(r.json()["woke"], "signal");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "wake-up took {:?}", started.elapsed());
}
