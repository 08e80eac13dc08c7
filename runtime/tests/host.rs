//! Host tests: guest programs built to wasm32-wasip2, served by the real `lattice` binary, driven
//! over real HTTP. Embedded backends; the real services are covered in `services.rs`.

#[path = "common/flows.rs"]
mod flows;
#[path = "common/support.rs"]
mod support;

use std::time::Duration;

use serde_json::{Value, json};

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
    flows::d1(&conformance("")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_semantics_limits_and_expiry() {
    flows::kv(&conformance("")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r2_ranges_conditionals_lists_and_multipart() {
    flows::r2(&conformance("")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_object_events_run_one_at_a_time_and_claims_are_exactly_once() {
    flows::objects(&conformance("")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_object_writes_then_d1_inserts_land_once() {
    // Embedded D1 and object storage are separate SQLite files: nothing joins a commit.
    assert_eq!(flows::object_writes_then_d1(&conformance("")).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_object_transactions_commit_and_roll_back() {
    flows::transactions(&conformance("")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_object_response_waits_for_durable_write() {
    let s = conformance("");
    let r = post(&format!("{}/do/increment?name=durable", s.url), "").await;
    assert_eq!(r.json()["count"], 1);
    // The moment the response arrives, the write is in the SQLite file: read it from another
    // connection, then kill the runtime without warning and read it again.
    let db = s.dir.path().join("data/objects.sqlite");
    let read = |key: &str| {
        let c = rusqlite::Connection::open(&db).expect("open objects db");
        let mut stmt = c
            .prepare("SELECT CAST(value AS TEXT) FROM _lattice_do_entries WHERE CAST(key AS TEXT) = ?1")
            .expect("prepare");
        let rows: Vec<String> =
            stmt.query_map([key], |r| r.get(0)).expect("query").filter_map(Result::ok).collect();
        rows
    };
    assert_eq!(read("count"), ["1"]);
    // An unconfirmed write is durable once a later confirmed write of the object is: they
    // commit in order.
    let r = post(&format!("{}/do/put-unconfirmed?name=durable&key=later", s.url), "").await;
    assert_eq!(r.status, 200);
    assert_eq!(post(&format!("{}/do/increment?name=durable", s.url), "").await.json()["count"], 2);
    assert_eq!(read("later"), ["1"]);
    let mut s = s;
    let _ = s.child.kill();
    let _ = s.child.wait();
    assert_eq!(read("count"), ["2"]);
    assert_eq!(read("later"), ["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_fire_on_the_clock_and_retry_with_backoff() {
    flows::alarms(&conformance("[limits]\nalarm_poll_ms = 50\n")).await;
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
                .find_map(|l| {
                    l.strip_prefix("lattice_parked_requests ").map(|v| v.trim().parse::<i64>().unwrap_or(0))
                })
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
    assert_eq!(r.json()["note"], Value::Null, "a plain park keeps no note");
    // A note the parked invocation kept reaches the re-run, whether woken or timed out; a
    // client's own wake header does not make a first run look like one.
    let r = get(&format!("{}/wait?key=quiet&timeout=50&note=kept", s.url)).await;
    assert_eq!((r.json()["woke"].clone(), r.json()["note"].clone()), (json!("timeout"), json!("kept")));
    let noted = {
        let url = format!("{}/wait?key=room2&timeout=60000&note=from-the-first-run", s.url);
        tokio::spawn(async move { get(&url).await })
    };
    for _ in 0..500 {
        if parked().await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(post(&format!("{}/signal?key=room2", s.url), "").await.status, 200);
    let r = noted.await.expect("task");
    assert_eq!(r.json()["note"], "from-the-first-run");
    let url = format!("{}/wait?key=quiet&timeout=50", s.url);
    let forged = send("GET", &url, &[("lattice-wake", "signal")], "").await;
    assert_eq!(forged.json()["woke"], "timeout", "the host replaces a client's wake header");
    assert_eq!(forged.json()["note"], Value::Null);
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
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from("ok"),
                    )))
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
    assert!(
        r.json()["error"].as_str().unwrap_or_default().contains("DestinationIpProhibited"),
        "{}",
        r.json()
    );
    let r = get(&format!("{}/outbound?url=http://localhost:{port}/", denied.url)).await;
    assert_eq!(r.status, 502);

    let allowed = conformance("[outbound]\nallow_private = true\n");
    let r = get(&format!("{}/outbound?url=http://127.0.0.1:{port}/", allowed.url)).await;
    assert_eq!(r.json()["status"], 200);

    let overridden =
        conformance(&format!("[outbound]\noverrides = {{ \"peer.test\" = \"127.0.0.1:{port}\" }}\n"));
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
    let out = std::process::Command::new(support::lattice_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
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
async fn the_host_signs_with_a_secret_the_guest_names() {
    let s = conformance("");
    let r = post(&format!("{}/sign?key=counters_key", s.url), "a message").await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let hex = |v: &Value| hex::decode(v.as_str().expect("hex")).expect("hex");
    let (public, signature) = (hex(&r.json()["public_key"]), hex(&r.json()["signature"]));
    assert_eq!((public.len(), signature.len()), (32, 64));
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, public);
    key.verify(b"a message", &signature).expect("the signature verifies");
    assert!(key.verify(b"another message", &signature).is_err());
    let r = post(&format!("{}/sign?key=no_such_secret", s.url), "a message").await;
    assert_eq!((r.status, r.json()["error"].clone()), (400, json!("invalid")));
    let r = post(&format!("{}/sign?key=counters_key", s.url), vec![b'x'; 1024 * 1024 + 1]).await;
    assert_eq!((r.status, r.json()["error"].clone()), (413, json!("too-large")));
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

/// Reads until the server closes the connection; returns what it sent and how long it took.
fn read_until_closed(mut tcp: std::net::TcpStream) -> (Vec<u8>, Duration) {
    use std::io::Read as _;
    let started = std::time::Instant::now();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => return (got, started.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    use std::io::Write as _;
    let s = conformance("[limits]\nheader_timeout_ms = 300\n");
    // Half a request line, then nothing: closed after the header timeout.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n").expect("write");
    let (_, took) = read_until_closed(tcp);
    assert!(took < Duration::from_secs(5), "slow headers kept the connection for {took:?}");
    // A whole request, then an idle keep-alive connection: closed too.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let (got, took) = read_until_closed(tcp);
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    assert!(took < Duration::from_secs(5), "an idle connection was kept for {took:?}");
}

/// The compiled-component cache: a read-only seed cache (what a container image ships) is used
/// when the writable cache has no entry, and nothing is written then; an empty or foreign seed
/// falls back to compiling into the writable cache.
#[test]
fn a_seed_cache_is_used_and_never_written() {
    use lattice_runtime::engine::{build_engine, load_component};
    let engine = build_engine(&lattice_runtime::config::Limits::default()).expect("engine");
    let hello = guest("hello");
    let files = |d: &std::path::Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    let seed = tempfile::tempdir().expect("tempdir");
    load_component(&engine, &hello, seed.path(), None).expect("compile into the seed");
    assert_eq!(files(seed.path()), 1, "the build step wrote one entry");
    let cache = tempfile::tempdir().expect("tempdir");
    let writable = cache.path().join("compiled");
    load_component(&engine, &hello, &writable, Some(seed.path())).expect("load from the seed");
    assert_eq!(files(&writable), 0, "loading from the seed writes nothing");
    let empty = tempfile::tempdir().expect("tempdir");
    load_component(&engine, &hello, &writable, Some(empty.path())).expect("compile");
    assert_eq!(files(&writable), 1, "no seed entry: compiled into the writable cache");
}
