//! Host tests: guest programs built to wasm32-wasip2, served by the real `lattice` binary, driven
//! over real HTTP. Embedded backends; the real services are covered in `services.rs`.

#[path = "common/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use support::{Setup, get, guest, post, send, start};

fn conformance(extra: &str) -> support::Server {
    let mut s = Setup::new(guest("conformance"));
    s.extra = extra.to_owned();
    start(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_component_serves_over_http() {
    let mut setup = Setup::new(guest("hello"));
    setup.bindings = Some(String::new());
    let server = start(setup);
    let r = get(&format!("{}/anything", server.url)).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"Hello from Lattice\n");
    let health = get(&format!("{}/healthz", server.admin)).await;
    assert_eq!(health.status, 200);
    let ready = get(&format!("{}/readyz", server.admin)).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["ready"], true);
    let metrics = get(&format!("{}/metrics", server.admin)).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("lattice_http_requests_total{status=\"200\"} 1"), "{text}");
    assert!(text.contains("lattice_instantiate_duration_seconds_count 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d1_statements_batches_and_exec() {
    let s = conformance("");
    let q = |sql: &str, params: serde_json::Value| {
        let url = format!("{}/d1/query", s.url);
        let body = json!({"sql": sql, "params": params}).to_string();
        async move { post(&url, body).await }
    };
    let r = q("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, data BLOB)", json!([])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = q("INSERT INTO t (name, data) VALUES (?, ?)", json!(["a", {"blob": [1, 2, 255]}])).await.json();
    assert_eq!(r["meta"]["changes"], 1);
    assert_eq!(r["meta"]["last_row_id"], 1);
    let r = q("SELECT id, name, data FROM t WHERE name = ?1", json!(["a"])).await.json();
    assert_eq!(r["columns"], json!(["id", "name", "data"]));
    assert_eq!(r["rows"], json!([[1, "a", {"blob": [1, 2, 255]}]]));

    // A failing batch changes nothing.
    let batch = json!([
        {"sql": "INSERT INTO t (name) VALUES (?)", "params": ["b"]},
        {"sql": "INSERT INTO t (name) VALUES (?)", "params": ["a"]},
    ]);
    let r = post(&format!("{}/d1/batch", s.url), batch.to_string()).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "batch");
    assert_eq!(r.json()["index"], 1);
    let r = q("SELECT count(*) AS n FROM t", json!([])).await.json();
    assert_eq!(r["rows"], json!([[1]]), "the failed batch left a row behind");

    // exec runs line by line in one transaction and names the failing line.
    let r = post(
        &format!("{}/d1/exec", s.url),
        json!({"sql": "INSERT INTO t (name) VALUES ('x')\nINSERT INTO nope VALUES (1)"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 400);
    let j = r.json();
    assert_eq!(j["line"], 2);
    assert!(j["message"].as_str().unwrap_or_default().starts_with("D1_EXEC_ERROR: Error in line 2:"), "{j}");
    let r = q("SELECT count(*) FROM t WHERE name = 'x'", json!([])).await.json();
    assert_eq!(r["rows"], json!([[0]]));

    // first(column) on a missing column.
    let r = post(&format!("{}/d1/first", s.url), json!({"sql": "SELECT name FROM t", "column": "nope"}).to_string()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_semantics_limits_and_expiry() {
    let s = conformance("");
    let put = |key: &str, value: &str, query: &str| {
        let url = format!("{}/kv?key={key}{query}", s.url);
        let value = value.to_owned();
        async move { send("PUT", &url, &[("x-metadata", "{\"v\":1}")], value).await }
    };
    for k in ["b", "a", "c/1", "c/2", "c/3"] {
        assert_eq!(put(k, &format!("value-{k}"), "").await.status, 200);
    }
    let r = get(&format!("{}/kv?key=a", s.url)).await.json();
    assert_eq!(r, json!({"value": "value-a", "metadata": "{\"v\":1}"}));
    let r = get(&format!("{}/kv/list?prefix=c/&limit=2", s.url)).await.json();
    let names: Vec<&str> = r["keys"].as_array().map(|a| a.iter().filter_map(|k| k["name"].as_str()).collect()).unwrap_or_default();
    assert_eq!(names, ["c/1", "c/2"]);
    assert_eq!(r["list_complete"], false);
    let cursor = r["cursor"].as_str().unwrap_or_default().to_owned();
    let r = get(&format!("{}/kv/list?prefix=c/&limit=2&cursor={cursor}", s.url)).await.json();
    assert_eq!(r["keys"][0]["name"], "c/3");
    assert_eq!(r["list_complete"], true);
    let r = get(&format!("{}/kv/list", s.url)).await.json();
    let all: Vec<&str> = r["keys"].as_array().map(|a| a.iter().filter_map(|k| k["name"].as_str()).collect()).unwrap_or_default();
    assert_eq!(all, ["a", "b", "c/1", "c/2", "c/3"], "keys come back in byte order");

    // workerd's limits.
    assert_eq!(put("short", "v", "&ttl=59").await.status, 400);
    assert_eq!(put("..", "v", "").await.status, 400);
    assert_eq!(put(&"k".repeat(513), "v", "").await.status, 400);
    assert_eq!(get(&format!("{}/kv/list?limit=1001", s.url)).await.status, 400);
    let big_meta = format!("{{\"m\":\"{}\"}}", "x".repeat(1100));
    let r = send("PUT", &format!("{}/kv?key=m", s.url), &[("x-metadata", &big_meta)], "v").await;
    assert_eq!(r.status, 413);

    // Expired keys vanish: the runtime's clock is a manual one in tests.
    assert_eq!(put("ttl", "soon gone", "&ttl=60").await.status, 200);
    assert_eq!(get(&format!("{}/kv?key=ttl", s.url)).await.json()["value"], "soon gone");
    let r = post(&format!("{}/testing/clock/advance?ms=61000", s.admin), "").await;
    assert_eq!(r.status, 200);
    assert_eq!(get(&format!("{}/kv?key=ttl", s.url)).await.json(), serde_json::Value::Null);
    let r = get(&format!("{}/kv/list", s.url)).await.json();
    assert!(!r.to_string().contains("\"ttl\""), "expired key still listed: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r2_ranges_conditionals_lists_and_multipart() {
    let s = conformance("");
    let r = send("PUT", &format!("{}/r2?key=media/a.txt", s.url), &[("content-type", "text/plain")], "0123456789").await;
    assert_eq!(r.status, 200);
    let put = r.json();
    let etag = put["object"]["etag"].as_str().unwrap_or_default().to_owned();
    assert_eq!(etag, "781e5e245d69b566979b86e28d23f2c7", "etag is the body's md5");

    let r = get(&format!("{}/r2?key=media/a.txt&offset=2&length=3", s.url)).await.json();
    assert_eq!(r["body"], "234");
    assert_eq!(r["object"]["range"], json!([2, 3]));
    let r = get(&format!("{}/r2?key=media/a.txt&suffix=4", s.url)).await.json();
    assert_eq!(r["body"], "6789");
    assert_eq!(get(&format!("{}/r2?key=media/a.txt&offset=11", s.url)).await.status, 400);

    // onlyIf miss: metadata, no body.
    let r = send("GET", &format!("{}/r2?key=media/a.txt", s.url), &[("x-if-match", "nope")], "").await.json();
    assert_eq!(r["precondition_failed"], true);
    assert_eq!(r["object"]["size"], 10);
    assert!(r.get("body").is_none());
    let r = send("GET", &format!("{}/r2?key=media/a.txt", s.url), &[("x-if-none-match", &etag)], "").await.json();
    assert_eq!(r["precondition_failed"], true);
    // Conditional put that fails writes nothing.
    let r = send("PUT", &format!("{}/r2?key=media/a.txt", s.url), &[("x-if-match", "nope")], "changed").await.json();
    assert_eq!(r["written"], false);
    assert_eq!(get(&format!("{}/r2?key=media/a.txt", s.url)).await.json()["body"], "0123456789");

    // Checksums are verified.
    let r = send("PUT", &format!("{}/r2?key=bad", s.url), &[("x-md5", "00000000000000000000000000000000")], "x").await;
    assert_eq!(r.status, 400);
    assert_eq!(get(&format!("{}/r2/head?key=bad", s.url)).await.json(), serde_json::Value::Null);

    for k in ["media/b.txt", "media/sub/c.txt", "other.txt"] {
        assert_eq!(send("PUT", &format!("{}/r2?key={k}", s.url), &[], "x").await.status, 200);
    }
    let r = get(&format!("{}/r2/list?prefix=media/&delimiter=/", s.url)).await.json();
    assert_eq!(r["keys"], json!(["media/a.txt", "media/b.txt"]));
    assert_eq!(r["prefixes"], json!(["media/sub/"]));
    let r = get(&format!("{}/r2/list?limit=2", s.url)).await.json();
    assert_eq!(r["truncated"], true);
    let cursor = r["cursor"].as_str().unwrap_or_default().to_owned();
    let r2 = get(&format!("{}/r2/list?limit=10&cursor={cursor}", s.url)).await.json();
    assert_eq!(r2["keys"], json!(["media/sub/c.txt", "other.txt"]));

    let body = "abcdefghij".repeat(100);
    let r = post(&format!("{}/r2/multipart?key=big&parts=3", s.url), body.clone()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["etag"].as_str().unwrap_or_default().ends_with("-3"));
    let r = get(&format!("{}/r2?key=big", s.url)).await.json();
    assert_eq!(r["body"], body);

    assert_eq!(send("DELETE", &format!("{}/r2?key=other.txt", s.url), &[], "").await.status, 200);
    assert_eq!(get(&format!("{}/r2?key=other.txt", s.url)).await.json()["found"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_object_events_run_one_at_a_time_and_claims_are_exactly_once() {
    let s = conformance("");
    // 50 concurrent increments of one counter: no lost update, every value exactly once.
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = format!("{}/do/increment?name=c1", s.url);
            tokio::spawn(async move { post(&url, "").await })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(seen.insert(r.json()["count"].as_u64().unwrap_or(0)), "a counter value was handed out twice");
    }
    assert_eq!(seen, (1..=50).collect::<BTreeSet<u64>>());

    // 20 items, 50 concurrent claims: exactly 20 distinct items go out.
    assert_eq!(post(&format!("{}/do/fill?name=pool&n=20", s.url), "").await.status, 200);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = format!("{}/do/claim?name=pool", s.url);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_object_response_waits_for_durable_write() {
    let s = conformance("");
    let r = post(&format!("{}/do/increment?name=durable", s.url), "").await;
    assert_eq!(r.json()["count"], 1);
    // The moment the response arrives, the write is in the SQLite file: read it from another
    // connection, then kill the runtime without warning and read it again.
    let db = s.dir.path().join("data/objects.sqlite");
    let read = || {
        let c = rusqlite::Connection::open(&db).expect("open objects db");
        let mut stmt = c.prepare("SELECT CAST(value AS TEXT) FROM _lattice_do_entries WHERE CAST(key AS TEXT) = 'count'").expect("prepare");
        let rows: Vec<String> = stmt.query_map([], |r| r.get(0)).expect("query").filter_map(Result::ok).collect();
        rows
    };
    assert_eq!(read(), ["1"]);
    let mut s = s;
    let _ = s.child.kill();
    let _ = s.child.wait();
    assert_eq!(read(), ["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_fire_on_the_clock_and_retry_with_backoff() {
    let s = conformance("[limits]\nalarm_poll_ms = 50\n");
    let now = 1_700_000_000_000u64;
    let r = post(&format!("{}/do/alarm?name=al&at={}&fail=2", s.url, now + 10_000), "").await;
    assert_eq!(r.status, 200);
    let state = || {
        let url = format!("{}/do/state?name=al", s.url);
        async move { get(&url).await.json() }
    };
    assert_eq!(state().await["alarm"], now + 10_000);
    // Not due yet.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(state().await["entries"].get("alarm_runs").is_none());
    // Due: first run fails, then retries after 2 s and 4 s (of the manual clock).
    post(&format!("{}/testing/clock/advance?ms=10000", s.admin), "").await;
    for _ in 0..100 {
        if state().await["entries"].get("alarm_runs").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state().await["entries"]["alarm_runs"], "1");
    for expected in ["2", "3"] {
        post(&format!("{}/testing/clock/advance?ms=6000", s.admin), "").await;
        for _ in 0..100 {
            if state().await["entries"]["alarm_runs"] == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(state().await["entries"]["alarm_runs"], expected);
    }
    let st = state().await;
    assert_eq!(st["entries"]["alarm_fired"], "yes");
    assert_eq!(st["alarm"], serde_json::Value::Null, "a fired alarm is cleared: {st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_and_endless_loops_do_not_stop_the_host() {
    let s = conformance("[limits]\nexecution_ms = 300\n");
    let r = get(&format!("{}/trap", s.url)).await;
    assert_eq!(r.status, 500);
    assert_eq!(get(&format!("{}/hello", s.url)).await.status, 200);
    let started = std::time::Instant::now();
    let r = get(&format!("{}/spin", s.url)).await;
    assert_eq!(r.status, 503);
    assert!(r.headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(5), "spin was not stopped at its deadline");
    assert_eq!(get(&format!("{}/hello", s.url)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_requests_hold_no_instance_and_wake_on_signal_or_timeout() {
    // Four instance slots, twenty parked requests.
    let s = conformance("[limits]\npool_instances = 4\n");
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let url = format!("{}/wait?key=room1&timeout=60000", s.url);
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    let admin = s.admin.clone();
    let parked = || {
        let admin = admin.clone();
        async move {
            let m = get(&format!("{admin}/metrics")).await;
            String::from_utf8_lossy(&m.body)
                .lines()
                .find_map(|l| l.strip_prefix("lattice_parked_requests ").map(|v| v.trim().parse::<i64>().unwrap_or(0)))
                .unwrap_or(0)
        }
    };
    for _ in 0..500 {
        if parked().await == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(parked().await, 20, "not all requests parked");
    // With every waiter parked, the four slots are free: other requests are served.
    for _ in 0..8 {
        assert_eq!(get(&format!("{}/hello", s.url)).await.status, 200);
    }
    assert_eq!(post(&format!("{}/signal?key=room1", s.url), "").await.status, 200);
    for w in waiters {
        let r = w.await.expect("task");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["woke"], "signal");
    }
    let r = get(&format!("{}/wait?key=quiet&timeout=50", s.url)).await;
    assert_eq!(r.json()["woke"], "timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_before_the_guest_runs() {
    let s = conformance("[limits]\nmax_request_body_bytes = 1024\n");
    let r = post(&format!("{}/size", s.url), vec![b'x'; 1024]).await;
    assert_eq!(r.json()["bytes"], 1024);
    let r = post(&format!("{}/size", s.url), vec![b'x'; 1025]).await;
    assert_eq!(r.status, 413);
    let m = get(&format!("{}/metrics", s.admin)).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("lattice_body_too_large_total 1"), "{text}");
    // One instance ran: the accepted request (the rejected one never reached a guest).
    assert!(text.contains("lattice_instantiate_duration_seconds_count 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_to_private_ranges_are_refused_unless_allowed() {
    // A local HTTP server to call.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from("ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let denied = conformance("");
    let r = get(&format!("{}/outbound?url=http://127.0.0.1:{port}/", denied.url)).await;
    assert_eq!(r.status, 502);
    assert!(r.json()["error"].as_str().unwrap_or_default().contains("DestinationIpProhibited"), "{}", r.json());
    let r = get(&format!("{}/outbound?url=http://localhost:{port}/", denied.url)).await;
    assert_eq!(r.status, 502);

    let allowed = conformance("[outbound]\nallow_private = true\n");
    let r = get(&format!("{}/outbound?url=http://127.0.0.1:{port}/", allowed.url)).await;
    assert_eq!(r.json()["status"], 200);

    let overridden = conformance(&format!("[outbound]\noverrides = {{ \"peer.test\" = \"127.0.0.1:{port}\" }}\n"));
    let r = get(&format!("{}/outbound?url=http://peer.test/", overridden.url)).await;
    assert_eq!(r.json()["status"], 200);
}

#[test]
fn malformed_config_names_the_key_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n[tls]\nplain_http = true\n[component]\npath = \"x.wasm\"\n[limits]\nexecution_msec = 5\n",
    )
    .expect("write");
    let out = std::process::Command::new(support::lattice_bin()).args(["check-config", "--config"]).arg(&path).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 9"), "{err}");
    assert!(err.contains("execution_msec"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_secrets_reach_the_guest() {
    let s = conformance("");
    assert_eq!(get(&format!("{}/config?name=greeting", s.url)).await.json()["value"], "hello");
    assert_eq!(get(&format!("{}/config?name=missing", s.url)).await.json()["value"], serde_json::Value::Null);
    assert_eq!(get(&format!("{}/secret?name=counters_key", s.url)).await.json()["length"], 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_parked_requests_and_exits() {
    let s = conformance("");
    let url = format!("{}/wait?key=never&timeout=60000", s.url);
    let waiter = tokio::spawn(async move { get(&url).await });
    let mut parked = false;
    for _ in 0..500 {
        let m = get(&format!("{}/metrics", s.admin)).await;
        if String::from_utf8_lossy(&m.body).contains("lattice_parked_requests 1") {
            parked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(parked, "the request never parked\n{}", s.log());
    let pid = s.child.id().to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(status.success());
    let r = waiter.await.expect("task");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["woke"], "shutdown");
    let mut s = s;
    let exit = s.child.wait().expect("wait");
    assert!(exit.success(), "runtime exited with {exit:?}\n{}", s.log());
}
