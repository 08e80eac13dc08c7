//! The OpenAPI response validator and the validating proxy, on plain data: no homeserver needed.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use lattice_e2e::openapi::Validator;
use lattice_e2e::proxy::ValidatingProxy;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const LOGIN: &str = "/_matrix/client/v3/login";

fn validate(method: &str, path: &str, status: u16, body: &Value) -> Result<bool, String> {
    Validator::get().validate(method, path, status, body)
}

fn expect_violation(method: &str, path: &str, status: u16, body: &Value, mentions: &[&str]) -> String {
    let message = match validate(method, path, status, body) {
        Err(message) => message,
        Ok(matched) => panic!("{method} {path} {status} {body} should not conform (matched: {matched})"),
    };
    for needle in mentions {
        assert!(message.contains(needle), "the message should mention {needle:?}:\n{message}");
    }
    message
}

#[test]
fn all_response_schemas_compile() {
    let v = Validator::get();
    eprintln!(
        "{} operations, {} response schemas, {} recursive $refs cut, unresolved $refs: {:#?}",
        v.operation_count(),
        v.schema_count(),
        v.cycles_cut(),
        v.unresolved_refs()
    );
    assert!(v.compile_errors().is_empty(), "schemas that do not compile:\n{}", v.compile_errors().join("\n"));
    assert!(v.operation_count() > 100, "only {} operations", v.operation_count());
    assert!(v.schema_count() > 100, "only {} response schemas", v.schema_count());
}

#[test]
fn conforming_responses_validate() {
    let versions = json!({
        "versions": ["r0.6.1", "v1.1", "v1.12"],
        "unstable_features": { "org.matrix.msc3575": true }
    });
    assert_eq!(validate("GET", "/_matrix/client/versions", 200, &versions), Ok(true));

    let login = json!({ "user_id": "@alice:hs", "access_token": "syt_abc", "device_id": "ABCDEF" });
    assert_eq!(validate("POST", LOGIN, 200, &login), Ok(true));
    let flows = json!({ "flows": [{ "type": "m.login.password" }] });
    assert_eq!(validate("GET", LOGIN, 200, &flows), Ok(true));

    let sent = json!({ "event_id": "$abc" });
    let send = "/_matrix/client/v3/rooms/!abc:hs/send/m.room.message/t1";
    assert_eq!(validate("PUT", send, 200, &sent), Ok(true));
    assert_eq!(validate("PUT", &send.replace("!abc:hs", "%21abc%3Ahs"), 200, &sent), Ok(true));

    // An empty state key: the last segment is empty.
    let name = json!({ "name": "Room" });
    assert_eq!(validate("GET", "/_matrix/client/v3/rooms/!abc:hs/state/m.room.name/", 200, &name), Ok(true));

    let well_known = json!({ "m.homeserver": { "base_url": "https://hs.example" } });
    assert_eq!(validate("GET", "/.well-known/matrix/client", 200, &well_known), Ok(true));
    assert_eq!(
        validate("GET", "/_matrix/client/v1/media/config", 200, &json!({ "m.upload.size": 1 })),
        Ok(true)
    );
    assert_eq!(validate("GET", "/_matrix/media/v3/config", 200, &json!({})), Ok(true));
}

#[test]
fn login_mismatches_are_reported() {
    let message = expect_violation(
        "POST",
        LOGIN,
        200,
        &json!({ "access_token": "syt_abc", "device_id": "ABCDEF" }),
        &["user_id", "login", "200"],
    );
    eprintln!("{message}");
    expect_violation(
        "POST",
        LOGIN,
        200,
        &json!({ "user_id": "@alice:hs", "device_id": "D" }),
        &["access_token"],
    );
    let message = expect_violation(
        "POST",
        LOGIN,
        200,
        &json!({ "user_id": "@alice:hs", "access_token": 5, "device_id": "D" }),
        &["/access_token", "string"],
    );
    eprintln!("{message}");
    expect_violation("POST", LOGIN, 200, &json!([]), &["object"]);
}

#[test]
fn sync_event_with_wrong_type_is_reported() {
    let mut sync = json!({
        "next_batch": "s72595_4483_1934",
        "rooms": { "join": { "!726s6s6q:example.com": {
            "state": { "events": [] },
            "timeline": {
                "limited": false,
                "prev_batch": "t34",
                "events": [{
                    "event_id": "$143273582443PhrSn:example.org",
                    "type": "m.room.message",
                    "sender": "@alice:example.com",
                    "origin_server_ts": 1432735824653_u64,
                    "content": { "msgtype": "m.text", "body": "hello" },
                    "unsigned": { "age": 1234 }
                }]
            }
        }}}
    });
    let path = "/_matrix/client/v3/sync";
    assert_eq!(validate("GET", path, 200, &sync), Ok(true));
    sync["rooms"]["join"]["!726s6s6q:example.com"]["timeline"]["events"][0]["origin_server_ts"] =
        json!("yesterday");
    let message = expect_violation(
        "GET",
        path,
        200,
        &sync,
        &["/rooms/join/!726s6s6q:example.com/timeline/events/0/origin_server_ts", "integer"],
    );
    eprintln!("{message}");
}

#[test]
fn error_statuses() {
    let forbidden = json!({ "errcode": "M_FORBIDDEN", "error": "Invalid password" });
    assert_eq!(validate("POST", LOGIN, 403, &forbidden), Ok(true));
    expect_violation("POST", LOGIN, 403, &json!({ "error": "no code" }), &["errcode"]);
    // 429 has its own schema (`retry_after_ms` is an integer).
    let limited = json!({ "errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": "soon" });
    expect_violation("POST", LOGIN, 429, &limited, &["retry_after_ms"]);
    // Undocumented error statuses are checked against the standard error shape.
    assert_eq!(validate("GET", "/_matrix/client/versions", 500, &forbidden), Ok(true));
    expect_violation("GET", "/_matrix/client/versions", 500, &json!({ "errcode": 1 }), &["errcode"]);
    // An undocumented success status is a violation.
    expect_violation("GET", "/_matrix/client/versions", 201, &json!({ "versions": [] }), &["201"]);
    // An operation that uses UIA without documenting its 401 gets the UIA challenge shape.
    let signing = "/_matrix/client/v3/keys/device_signing/upload";
    let challenge = json!({ "flows": [{ "stages": ["m.login.password"] }], "params": {}, "session": "s" });
    assert_eq!(validate("POST", signing, 401, &challenge), Ok(true));
    expect_violation("POST", signing, 401, &json!({ "session": "s" }), &["flows"]);
}

#[test]
fn unknown_paths_are_not_matched() {
    let body = json!({ "anything": 1 });
    assert_eq!(validate("GET", "/_lattice/admin/rooms", 200, &body), Ok(false));
    assert_eq!(validate("GET", "/_matrix/client/v3/not_a_route", 200, &body), Ok(false));
    assert_eq!(validate("GET", "/_matrix/client/unstable/org.matrix.msc0000/x", 200, &body), Ok(false));
    // The path is known, the method is not.
    assert_eq!(validate("OPTIONS", LOGIN, 200, &body), Ok(false));
    assert_eq!(validate("DELETE", "/_matrix/client/versions", 200, &body), Ok(false));
    // Trailing segments do not match.
    assert_eq!(validate("GET", "/_matrix/client/v3/sync/extra", 200, &body), Ok(false));
}

/// What the fake server received, as text.
type Received = mpsc::UnboundedReceiver<String>;

/// A fake upstream answering every request with `status`, a JSON `body`, after `delay`.
async fn fake_upstream(status: &'static str, body: &'static str, delay: Duration) -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the fake upstream");
    let url = format!("http://{}", listener.local_addr().expect("the fake upstream's address"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0_u8; 4096];
                // The head, then as much body as Content-Length says.
                loop {
                    let n = stream.read(&mut buf).await.expect("reading the request");
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .filter_map(|l| l.split_once(':'))
                            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&request).to_string());
                tokio::time::sleep(delay).await;
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     X-Upstream: yes\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).await.expect("writing the response");
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, rx)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("building a client")
}

#[tokio::test]
async fn proxy_forwards_unchanged_and_reports_violations() {
    // No access_token: a violation.
    const BAD_LOGIN: &str = r#"{"user_id":"@alice:hs",  "device_id":"ABC"}"#;
    let (upstream, mut received) = fake_upstream("200 OK", BAD_LOGIN, Duration::ZERO).await;
    let proxy = ValidatingProxy::start(&upstream).await;

    let response = client()
        .post(format!("{}{LOGIN}?via=proxy", proxy.url))
        .header("x-test", "forwarded")
        .header("content-type", "application/json")
        .body(r#"{"type":"m.login.password"}"#)
        .send()
        .await
        .expect("a request through the proxy");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("x-upstream").and_then(|v| v.to_str().ok()), Some("yes"));
    assert_eq!(response.text().await.expect("the body"), BAD_LOGIN, "the body arrives unchanged");

    let request = received.recv().await.expect("the upstream saw the request");
    assert!(request.starts_with(&format!("POST {LOGIN}?via=proxy HTTP/1.1\r\n")), "{request}");
    assert!(request.to_ascii_lowercase().contains("\r\nx-test: forwarded\r\n"), "{request}");
    assert!(request.ends_with("\r\n\r\n{\"type\":\"m.login.password\"}"), "{request}");

    let violations = proxy.violations();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(violations[0].starts_with(&format!("POST {LOGIN} -> 200")), "{}", violations[0]);
    assert!(violations[0].contains("access_token"), "{}", violations[0]);
    assert_eq!(proxy.validated(), 1);

    // A route that is not in the spec: passed through, not validated.
    let response = client().get(format!("{}/_lattice/status", proxy.url)).send().await.expect("a request");
    assert_eq!(response.text().await.expect("the body"), BAD_LOGIN);
    assert_eq!(proxy.violations().len(), 1);
    assert_eq!(proxy.validated(), 1);

    let panic = std::panic::catch_unwind(AssertUnwindSafe(|| proxy.assert_clean()));
    let message = panic.expect_err("assert_clean panics on violations");
    let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("access_token"), "{message}");
}

#[tokio::test]
async fn proxy_serves_concurrent_long_polls() {
    const SYNC: &str = r#"{"next_batch":"s1"}"#;
    let delay = Duration::from_millis(1500);
    let (upstream, _received) = fake_upstream("200 OK", SYNC, delay).await;
    let proxy = ValidatingProxy::start(&upstream).await;

    let started = Instant::now();
    let client = client();
    let polls = (0..4).map(|_| {
        let request = client.get(format!("{}/_matrix/client/v3/sync?timeout=1500", proxy.url)).send();
        async move { request.await.expect("a long poll").text().await.expect("the body") }
    });
    let bodies = futures_join_all(polls).await;
    let elapsed = started.elapsed();
    assert!(bodies.iter().all(|b| b == SYNC), "{bodies:?}");
    assert!(elapsed >= delay, "{elapsed:?}");
    assert!(elapsed < delay * 2, "the polls were served one after another: {elapsed:?}");
    assert_eq!(proxy.validated(), 4);
    proxy.assert_clean();
}

/// Runs the futures concurrently on spawned tasks, in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("a task"));
    }
    out
}
