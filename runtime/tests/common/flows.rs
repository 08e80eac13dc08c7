//! One conformance flow per binding, driven through the conformance guest over HTTP. Each runs
//! against every backend: `host.rs` on the embedded ones, `services.rs` on PostgreSQL, Redis
//! and S3.
#![allow(dead_code, reason = "each test binary uses a different part of the flows")]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use crate::support::{Server, eventually, get, post, send, unique};

pub async fn d1(s: &Server) {
    // A table of its own, so runs against a long-lived database do not collide.
    let t = format!("t{}", unique());
    let q = |sql: &str, params: serde_json::Value| {
        let url = format!("{}/d1/query", s.url);
        let body = json!({"sql": sql.replace("{t}", &t), "params": params}).to_string();
        async move { post(&url, body).await }
    };
    let r =
        q("CREATE TABLE {t} (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, data BLOB)", json!([])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = q("INSERT INTO {t} (id, name, data) VALUES (?, ?, ?)", json!([1, "a", {"blob": [1, 2, 255]}]))
        .await
        .json();
    assert_eq!(r["meta"]["changes"], 1);
    if s.embedded {
        // SQLite's rowid; PostgreSQL has none (see ARCHITECTURE.md: use RETURNING).
        assert_eq!(r["meta"]["last_row_id"], 1);
    }
    let r = q("SELECT id, name, data FROM {t} WHERE name = ?1", json!(["a"])).await.json();
    assert_eq!(r["columns"], json!(["id", "name", "data"]));
    assert_eq!(r["rows"], json!([[1, "a", {"blob": [1, 2, 255]}]]));

    // A failing batch changes nothing.
    let batch = json!([
        {"sql": format!("INSERT INTO {t} (id, name) VALUES (?, ?)"), "params": [2, "b"]},
        {"sql": format!("INSERT INTO {t} (id, name) VALUES (?, ?)"), "params": [3, "a"]},
    ]);
    let r = post(&format!("{}/d1/batch", s.url), batch.to_string()).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "batch");
    assert_eq!(r.json()["index"], 1);
    let r = q("SELECT count(*) AS n FROM {t}", json!([])).await.json();
    assert_eq!(r["rows"], json!([[1]]), "the failed batch left a row behind");

    // exec runs line by line in one transaction and names the failing line.
    let r = post(
        &format!("{}/d1/exec", s.url),
        json!({"sql": format!("INSERT INTO {t} (id, name) VALUES (4, 'x')\nINSERT INTO nope VALUES (1)")})
            .to_string(),
    )
    .await;
    assert_eq!(r.status, 400);
    let j = r.json();
    assert_eq!(j["line"], 2);
    assert!(j["message"].as_str().unwrap_or_default().starts_with("D1_EXEC_ERROR: Error in line 2:"), "{j}");
    let r = q("SELECT count(*) FROM {t} WHERE name = 'x'", json!([])).await.json();
    assert_eq!(r["rows"], json!([[0]]));

    // first(column) on a missing column.
    let r = post(
        &format!("{}/d1/first", s.url),
        json!({"sql": format!("SELECT name FROM {t}"), "column": "nope"}).to_string(),
    )
    .await;
    assert!(r.json()["message"].as_str().unwrap_or_default().contains("D1_COLUMN_NOTFOUND"), "{}", r.json());

    // Syntax errors and too many parameters are D1_ERRORs, not traps.
    let r = q("SELEC 1", json!([])).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap_or_default().starts_with("D1_ERROR"));
    let many: Vec<i64> = (0..101).collect();
    let r = q("SELECT 1", json!(many)).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap_or_default().contains("too many SQL variables"));
}

pub async fn kv(s: &Server) {
    // Keys of its own, so runs against a long-lived store do not collide.
    let p = format!("run{}-", unique());
    let strip = |names: Vec<&str>| -> Vec<String> {
        names.iter().map(|n| n.trim_start_matches(p.as_str()).to_owned()).collect()
    };
    let put = |key: &str, value: &str, query: &str| {
        let url = format!("{}/kv?key={p}{key}{query}", s.url);
        let value = value.to_owned();
        async move { send("PUT", &url, &[("x-metadata", "{\"v\":1}")], value).await }
    };
    for k in ["b", "a", "c/1", "c/2", "c/3"] {
        assert_eq!(put(k, &format!("value-{k}"), "").await.status, 200);
    }
    let r = get(&format!("{}/kv?key={p}a", s.url)).await.json();
    assert_eq!(r, json!({"value": "value-a", "metadata": "{\"v\":1}"}));
    let r = get(&format!("{}/kv/list?prefix={p}c/&limit=2", s.url)).await.json();
    let names: Vec<&str> = r["keys"]
        .as_array()
        .map(|a| a.iter().filter_map(|k| k["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(strip(names), ["c/1", "c/2"]);
    assert_eq!(r["list_complete"], false);
    let cursor = r["cursor"].as_str().unwrap_or_default().to_owned();
    let r = get(&format!("{}/kv/list?prefix={p}c/&limit=2&cursor={cursor}", s.url)).await.json();
    assert_eq!(r["keys"][0]["name"], format!("{p}c/3"));
    assert_eq!(r["list_complete"], true);
    let r = get(&format!("{}/kv/list?prefix={p}", s.url)).await.json();
    let all: Vec<&str> = r["keys"]
        .as_array()
        .map(|a| a.iter().filter_map(|k| k["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(strip(all), ["a", "b", "c/1", "c/2", "c/3"], "keys come back in byte order");

    // workerd's limits.
    assert_eq!(put("short", "v", "&ttl=59").await.status, 400);
    assert_eq!(send("PUT", &format!("{}/kv?key=..", s.url), &[], "v").await.status, 400);
    assert_eq!(put(&"k".repeat(513 - p.len()), "v", "").await.status, 400);
    assert_eq!(put(&"k".repeat(512 - p.len()), "v", "").await.status, 200);
    assert_eq!(get(&format!("{}/kv/list?limit=1001", s.url)).await.status, 400);
    let big_meta = format!("{{\"m\":\"{}\"}}", "x".repeat(1100));
    let r = send("PUT", &format!("{}/kv?key={p}m", s.url), &[("x-metadata", &big_meta)], "v").await;
    assert_eq!(r.status, 413);

    // Expired keys vanish: the runtime's clock is a manual one in tests.
    assert_eq!(put("ttl", "soon gone", "&ttl=60").await.status, 200);
    assert_eq!(get(&format!("{}/kv?key={p}ttl", s.url)).await.json()["value"], "soon gone");
    let r = post(&format!("{}/testing/clock/advance?ms=61000", s.admin), "").await;
    assert_eq!(r.status, 200);
    assert_eq!(get(&format!("{}/kv?key={p}ttl", s.url)).await.json(), serde_json::Value::Null);
    let r = get(&format!("{}/kv/list?prefix={p}", s.url)).await.json();
    assert!(!r.to_string().contains(&format!("{p}ttl")), "expired key still listed: {r}");
}

pub async fn r2(s: &Server) {
    let p = format!("run{}/", unique());
    let r = send(
        "PUT",
        &format!("{}/r2?key={p}media/a.txt", s.url),
        &[("content-type", "text/plain")],
        "0123456789",
    )
    .await;
    assert_eq!(r.status, 200);
    let put = r.json();
    let etag = put["object"]["etag"].as_str().unwrap_or_default().to_owned();
    assert_eq!(etag, "781e5e245d69b566979b86e28d23f2c7", "etag is the body's md5");

    let r = get(&format!("{}/r2?key={p}media/a.txt&offset=2&length=3", s.url)).await.json();
    assert_eq!(r["body"], "234");
    assert_eq!(r["object"]["range"], json!([2, 3]));
    let r = get(&format!("{}/r2?key={p}media/a.txt&suffix=4", s.url)).await.json();
    assert_eq!(r["body"], "6789");
    assert_eq!(get(&format!("{}/r2?key={p}media/a.txt&offset=11", s.url)).await.status, 400);

    // onlyIf miss: metadata, no body.
    let r =
        send("GET", &format!("{}/r2?key={p}media/a.txt", s.url), &[("x-if-match", "nope")], "").await.json();
    assert_eq!(r["precondition_failed"], true);
    assert_eq!(r["object"]["size"], 10);
    assert!(r.get("body").is_none());
    let r = send("GET", &format!("{}/r2?key={p}media/a.txt", s.url), &[("x-if-none-match", &etag)], "")
        .await
        .json();
    assert_eq!(r["precondition_failed"], true);
    // Conditional put that fails writes nothing.
    let r = send("PUT", &format!("{}/r2?key={p}media/a.txt", s.url), &[("x-if-match", "nope")], "changed")
        .await
        .json();
    assert_eq!(r["written"], false);
    assert_eq!(get(&format!("{}/r2?key={p}media/a.txt", s.url)).await.json()["body"], "0123456789");

    // Checksums are verified.
    let r = send(
        "PUT",
        &format!("{}/r2?key={p}bad", s.url),
        &[("x-md5", "00000000000000000000000000000000")],
        "x",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(get(&format!("{}/r2/head?key={p}bad", s.url)).await.json(), serde_json::Value::Null);

    for k in ["media/b.txt", "media/sub/c.txt", "other.txt"] {
        assert_eq!(send("PUT", &format!("{}/r2?key={p}{k}", s.url), &[], "x").await.status, 200);
    }
    let r = get(&format!("{}/r2/list?prefix={p}media/&delimiter=/", s.url)).await.json();
    assert_eq!(r["keys"], json!([format!("{p}media/a.txt"), format!("{p}media/b.txt")]));
    assert_eq!(r["prefixes"], json!([format!("{p}media/sub/")]));
    let r = get(&format!("{}/r2/list?prefix={p}&limit=2", s.url)).await.json();
    assert_eq!(r["truncated"], true);
    let cursor = r["cursor"].as_str().unwrap_or_default().to_owned();
    let r2 = get(&format!("{}/r2/list?prefix={p}&limit=10&cursor={cursor}", s.url)).await.json();
    assert_eq!(r2["keys"], json!([format!("{p}media/sub/c.txt"), format!("{p}other.txt")]));

    let body = "abcdefghij".repeat(100);
    let r = post(&format!("{}/r2/multipart?key={p}big&parts=3", s.url), body.clone()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["etag"].as_str().unwrap_or_default().ends_with("-3"));
    let r = get(&format!("{}/r2?key={p}big", s.url)).await.json();
    assert_eq!(r["body"], body);

    assert_eq!(send("DELETE", &format!("{}/r2?key={p}other.txt", s.url), &[], "").await.status, 200);
    assert_eq!(get(&format!("{}/r2?key={p}other.txt", s.url)).await.json()["found"], false);
}

/// `n` concurrent POSTs to `url`, each answering `{"count": c}`: the counts are exactly 1..=n.
async fn each_count_once(url: &str, n: u64, twice: &str) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { post(&url, "").await })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(seen.insert(r.json()["count"].as_u64().unwrap_or(0)), "{twice}");
    }
    assert_eq!(seen, (1..=n).collect::<BTreeSet<u64>>());
}

pub async fn objects(s: &Server) {
    let p = format!("run{}-", unique());
    // 50 concurrent increments of one counter: no lost update, every value exactly once.
    each_count_once(
        &format!("{}/do/increment?name={p}c1", s.url),
        50,
        "a counter value was handed out twice",
    )
    .await;
    // Group commit: the 50 events' writes went to storage in fewer commits.
    let commits = metric(s, "lattice_object_commits_total{namespace=\"COUNTERS\"}").await;
    eprintln!("50 increments, {commits} commits");
    assert!(commits < 50.0, "every event committed on its own ({commits} commits)");

    // Reading a secret does not open the input gate (workerd's `env.SECRET` is no I/O): 30
    // concurrent read-secret-then-write events hand out every value exactly once.
    each_count_once(
        &format!("{}/do/secret-then-write?name={p}s1", s.url),
        30,
        "events interleaved across a secret read",
    )
    .await;

    // 20 items, 50 concurrent claims: exactly 20 distinct items go out.
    assert_eq!(post(&format!("{}/do/fill?name={p}pool&n=20", s.url), "").await.status, 200);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = format!("{}/do/claim?name={p}pool", s.url);
            tokio::spawn(async move { post(&url, "").await.json() })
        })
        .collect();
    let mut items = BTreeSet::new();
    let mut empty = 0;
    for t in tasks {
        match t.await.expect("task")["item"].as_str() {
            Some(i) => assert!(items.insert(i.to_owned()), "item {i} claimed twice"),
            None => empty += 1,
        }
    }
    assert_eq!(items.len(), 20);
    assert_eq!(empty, 30);

    // Ids: a bad id is refused; the same name maps to the same object.
    let r = post(&format!("{}/do/increment?id={}", s.url, "0".repeat(64)), "").await;
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap_or_default().contains("not valid for this namespace"));
}

pub async fn alarms(s: &Server) {
    let p = format!("run{}-", unique());
    let now = 1_700_000_000_000u64;
    let r = post(&format!("{}/do/alarm?name={p}al&at={}&fail=2", s.url, now + 10_000), "").await;
    assert_eq!(r.status, 200);
    let state = || {
        let url = format!("{}/do/state?name={p}al", s.url);
        async move { get(&url).await.json() }
    };
    assert_eq!(state().await["alarm"], now + 10_000);
    // Not due yet.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(state().await["entries"].get("alarm_runs").is_none());
    // Due: the first run fails, then retries after 2 s and 4 s of the manual clock. Each step
    // waits until the retry is scheduled before moving the clock, so the schedule is exact.
    post(&format!("{}/testing/clock/advance?ms=10000", s.admin), "").await;
    for (runs, fired) in [("1", false), ("2", false), ("3", true)] {
        let st = eventually("the alarm to run", async || {
            let st = state().await;
            let scheduled_again = !st["alarm"].is_null();
            (st["entries"]["alarm_runs"] == runs && scheduled_again != fired).then_some(st)
        })
        .await;
        if fired {
            assert_eq!(st["entries"]["alarm_fired"], "yes");
            assert_eq!(st["alarm"], serde_json::Value::Null, "a fired alarm is cleared: {st}");
        } else {
            post(&format!("{}/testing/clock/advance?ms=6000", s.admin), "").await;
        }
    }
    let st = state().await;
    assert_eq!(st["entries"]["alarm_fired"], "yes");
    assert_eq!(st["alarm"], serde_json::Value::Null, "a fired alarm is cleared: {st}");
}

/// 30 concurrent events that each write their object's storage and then insert into D1: every
/// count is handed out once, and D1 holds each count once. Returns how many of the batches
/// joined their object's storage commit (`lattice_object_joined_batches_total`).
pub async fn object_writes_then_d1(s: &Server) -> f64 {
    let name = format!("run{}-writes-then-d1", unique());
    let setup = post(
        &format!("{}/d1/exec", s.url),
        r#"{"sql":"CREATE TABLE IF NOT EXISTS fence_log (object TEXT NOT NULL, n BIGINT NOT NULL)"}"#,
    )
    .await;
    assert_eq!(setup.status, 200, "{}", String::from_utf8_lossy(&setup.body));
    let before = metric(s, "lattice_object_joined_batches_total{namespace=\"COUNTERS\"}").await;
    each_count_once(
        &format!("{}/do/d1-increment?name={name}&object={name}&order=storage-first", s.url),
        30,
        "a count was handed out twice across a D1 insert",
    )
    .await;
    let rows = post(
        &format!("{}/d1/query", s.url),
        serde_json::json!({"sql": "SELECT n FROM fence_log WHERE object = ? ORDER BY n", "params": [name]})
            .to_string(),
    )
    .await;
    let got: Vec<u64> =
        rows.json()["rows"].as_array().expect("rows").iter().filter_map(|r| r[0].as_u64()).collect();
    assert_eq!(got, (1..=30).collect::<Vec<u64>>(), "D1 holds each count once: {}", rows.json());
    metric(s, "lattice_object_joined_batches_total{namespace=\"COUNTERS\"}").await - before
}

/// One sample from the admin listener's /metrics.
pub async fn metric(s: &Server, series: &str) -> f64 {
    let m = get(&format!("{}/metrics", s.admin)).await;
    String::from_utf8_lossy(&m.body)
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// Durable Object transactions: commit keeps staged writes, rollback, an event ending inside a
/// transaction and a trap inside one discard them; other I/O inside one is refused.
pub async fn transactions(s: &Server) {
    let p = format!("run{}-", unique());
    let name = format!("{p}txn");
    let state = || {
        let url = format!("{}/do/state?name={name}", s.url);
        async move { get(&url).await.json() }
    };
    assert_eq!(post(&format!("{}/do/increment?name={name}", s.url), "").await.json()["count"], 1);
    for (mode, kept) in [("rollback", false), ("open", false), ("trap", false), ("commit", true)] {
        let key = format!("k-{mode}");
        let r = post(&format!("{}/do/txn?name={name}&mode={mode}&key={key}", s.url), "").await;
        if mode == "trap" {
            assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        } else {
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            assert_eq!(r.json()["seen_inside"], 1, "a transaction reads its own writes");
        }
        let st = state().await;
        assert_eq!(st["entries"].get(&key).is_some(), kept, "{mode}: {st}");
        // The staged delete of `count` goes with the transaction.
        assert_eq!(st["entries"].get("count").is_some(), !kept, "{mode}: {st}");
    }
    let r = post(&format!("{}/do/txn-io?name={name}", s.url), "").await;
    assert_eq!(r.status, 503);
    assert!(state().await["entries"].get("io").is_none());
}
